//! Phase `admit`: is this a request the router serves, and is it well
//! formed? Method and path, content type, body size, then the body parse
//! (only what routing needs). Everything after this phase may rely on a
//! parsed body with a non-empty `model`.

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Method, Request};
use http_body::Body;
use http_body_util::{BodyExt, Limited};

use crate::error::{ApiError, BodyError, ErrorKind};
use crate::request::{ParsedBody, parse_body};

/// Default request body limit: large enough for 100k-token agentic prompts
/// (~400 KB of text) many times over, small enough to bound memory per request.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// API paths whose POST bodies carry a `model` and are proxied.
pub const PROXIED_PATHS: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    // Anthropic's Messages API: external providers, and engines that serve it.
    "/v1/messages",
];

/// The path that lists the served models.
pub const MODELS_PATH: &str = "/v1/models";

/// What an admitted request asks for. Its body is not read yet: the
/// request is authenticated from its head first.
#[derive(Debug)]
pub enum Admitted<B> {
    /// An inference request: proxied to an engine.
    Inference(UnreadRequest<B>),
    /// `GET /v1/models`: answered by the router itself.
    ListModels(Parts),
}

impl<B> Admitted<B> {
    /// The request head (headers, method, URI).
    pub fn head_mut(&mut self) -> &mut Parts {
        match self {
            Self::Inference(request) => &mut request.head,
            Self::ListModels(head) => head,
        }
    }
}

/// An inference request whose head passed the checks.
#[derive(Debug)]
pub struct UnreadRequest<B> {
    pub head: Parts,
    body: B,
}

/// A well-formed inference request.
#[derive(Debug)]
pub struct InferenceRequest {
    /// The client's request head; its headers become the upstream's.
    pub head: Parts,
    /// The body as the client sent it.
    pub body: Bytes,
    pub parsed: ParsedBody,
}

/// Admits `request`'s head (method, path, content type) or says why not.
pub fn admit<B>(request: Request<B>) -> Result<Admitted<B>, ApiError> {
    let path = request.uri().path();
    if PROXIED_PATHS.contains(&path) {
        if request.method() != Method::POST {
            return Err(ApiError::new(
                ErrorKind::MethodNotAllowed,
                format!("{path} only accepts POST"),
            ));
        }
    } else if path == MODELS_PATH {
        if request.method() != Method::GET {
            return Err(ApiError::new(
                ErrorKind::MethodNotAllowed,
                "/v1/models only accepts GET",
            ));
        }
        return Ok(Admitted::ListModels(request.into_parts().0));
    } else {
        return Err(ApiError::new(
            ErrorKind::UnknownPath,
            format!("unknown path {path}: the router serves {PROXIED_PATHS:?} and /v1/models"),
        ));
    }
    let (head, body) = request.into_parts();
    check_content_type(&head.headers)?;
    Ok(Admitted::Inference(UnreadRequest { head, body }))
}

impl<B> UnreadRequest<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BodyError>,
{
    /// Reads the body (at most `max_body_bytes`) and parses what routing needs.
    pub async fn read(self, max_body_bytes: usize) -> Result<InferenceRequest, ApiError> {
        let body = read_body(self.body, &self.head.headers, max_body_bytes).await?;
        let parsed = parse_body(&body)?;
        Ok(InferenceRequest {
            head: self.head,
            body,
            parsed,
        })
    }
}

fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let is_json = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| {
            let media = media.trim();
            media.eq_ignore_ascii_case("application/json")
                || (media.len() > 5 && media[media.len() - 5..].eq_ignore_ascii_case("+json"))
        });
    if is_json {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorKind::UnsupportedMediaType,
            format!(
                "unsupported Content-Type {:?}: send application/json",
                value.to_str().unwrap_or("<non-ASCII>")
            ),
        ))
    }
}

async fn read_body<B>(body: B, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BodyError>,
{
    let too_large = || {
        ApiError::new(
            ErrorKind::BodyTooLarge,
            format!("request body exceeds the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(error) => Err(ApiError::new(
            ErrorKind::InvalidBody,
            format!("failed to read request body: {error}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;

    use super::*;

    /// Admits and reads: None for the model listing.
    async fn admit_and_read(
        request: Request<Full<Bytes>>,
    ) -> Result<Option<InferenceRequest>, ApiError> {
        match admit(request)? {
            Admitted::Inference(request) => request.read(64).await.map(Some),
            Admitted::ListModels(_) => Ok(None),
        }
    }

    async fn admit_one(
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: &'static str,
    ) -> Result<Option<InferenceRequest>, ApiError> {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let request = request
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("request");
        admit_and_read(request).await
    }

    fn kind(result: Result<Option<InferenceRequest>, ApiError>) -> ErrorKind {
        result.expect_err("refused").kind
    }

    #[tokio::test]
    async fn admits_posts_to_api_paths_with_a_model() {
        for path in PROXIED_PATHS {
            let admitted = admit_one(
                Method::POST,
                path,
                Some("application/json"),
                r#"{"model":"m"}"#,
            )
            .await
            .expect("admitted");
            let Some(request) = admitted else {
                panic!("{path}: an inference request");
            };
            assert_eq!(request.parsed.model, "m");
            assert_eq!(request.head.uri.path(), path);
            assert_eq!(request.body, r#"{"model":"m"}"#);
        }
        for content_type in [
            None,
            Some("application/json; charset=utf-8"),
            Some("application/vnd.x+json"),
        ] {
            assert!(
                admit_one(
                    Method::POST,
                    "/v1/completions",
                    content_type,
                    r#"{"model":"m"}"#
                )
                .await
                .is_ok(),
                "{content_type:?}"
            );
        }
    }

    #[tokio::test]
    async fn models_listing_is_get_only() {
        assert!(matches!(
            admit_one(Method::GET, MODELS_PATH, None, "").await,
            Ok(None)
        ));
        assert_eq!(
            kind(admit_one(Method::POST, MODELS_PATH, None, "{}").await),
            ErrorKind::MethodNotAllowed
        );
    }

    #[tokio::test]
    async fn refuses_with_the_specific_kind() {
        let cases = [
            (
                Method::GET,
                "/v1/chat/completions",
                None,
                "",
                ErrorKind::MethodNotAllowed,
            ),
            (
                Method::PUT,
                "/v1/completions",
                None,
                "{}",
                ErrorKind::MethodNotAllowed,
            ),
            (
                Method::POST,
                "/v1/unknown",
                None,
                "{}",
                ErrorKind::UnknownPath,
            ),
            (Method::POST, "/", None, "{}", ErrorKind::UnknownPath),
            (
                Method::POST,
                "/v1/completions",
                Some("text/plain"),
                r#"{"model":"m"}"#,
                ErrorKind::UnsupportedMediaType,
            ),
            (
                Method::POST,
                "/v1/completions",
                Some("application/x-www-form-urlencoded"),
                r#"{"model":"m"}"#,
                ErrorKind::UnsupportedMediaType,
            ),
            (
                Method::POST,
                "/v1/completions",
                None,
                "model=m",
                ErrorKind::InvalidBody,
            ),
            (
                Method::POST,
                "/v1/completions",
                None,
                r#"{"prompt":"hi"}"#,
                ErrorKind::InvalidModel,
            ),
            (
                Method::POST,
                "/v1/completions",
                None,
                r#"{"model":"m","prompt":"far too long for a limit of sixty-four bytes"}"#,
                ErrorKind::BodyTooLarge,
            ),
        ];
        for (method, path, content_type, body, expected) in cases {
            assert_eq!(
                kind(admit_one(method.clone(), path, content_type, body).await),
                expected,
                "{method} {path} {content_type:?} {body}"
            );
        }
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_before_reading() {
        let request = Request::post("/v1/completions")
            .header(header::CONTENT_LENGTH, "1000000")
            .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
            .expect("request");
        assert_eq!(kind(admit_and_read(request).await), ErrorKind::BodyTooLarge);
    }
}
