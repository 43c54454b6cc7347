//! Phase `admit`: is this a request the router serves, and is it well
//! formed? Method and path, content type, body size, then the body parse
//! (only what routing needs). Everything after this phase may rely on a
//! parsed body with a non-empty `model`.

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Method, Request};
use http_body::Body;
use http_body_util::BodyExt;
use switchyard_runtime::clock;

use crate::error::{ApiError, BodyError, ErrorKind, quoted};
use crate::limits::{BodyDeadline, BodyReservation};
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

/// How much body a request may send, and how slowly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Larger bodies get 413.
    pub max_bytes: usize,
    /// Slower bodies get 408.
    pub deadline: BodyDeadline,
}

impl Default for BodyLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BODY_BYTES,
            deadline: BodyDeadline::default(),
        }
    }
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
            format!(
                "unknown path {}: the router serves {PROXIED_PATHS:?} and /v1/models",
                quoted(path)
            ),
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
    /// Reads the body within `limits`, its bytes charged to `reservation` as
    /// they arrive, and parses what routing needs.
    pub async fn read(
        self,
        limits: &BodyLimits,
        reservation: &mut BodyReservation<'_>,
    ) -> Result<InferenceRequest, ApiError> {
        let body = read_body(self.body, &self.head.headers, limits, reservation).await?;
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
                "unsupported Content-Type {}: send application/json",
                quoted(value.to_str().unwrap_or("<non-ASCII>"))
            ),
        ))
    }
}

/// Reads the whole body within `limits`, charging its bytes to
/// `reservation` (up front when `Content-Length` declares them).
async fn read_body<B>(
    body: B,
    headers: &HeaderMap,
    limits: &BodyLimits,
    reservation: &mut BodyReservation<'_>,
) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BodyError>,
{
    let limit = limits.max_bytes;
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
    let declared = declared.map_or(0, |len| len as usize);
    reservation.grow(declared).map_err(|_| budget_exhausted())?;
    let started = clock::now();
    let mut body = std::pin::pin!(body);
    // One frame (the common case) is kept as is; more are copied into one buffer.
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    let mut received = 0usize;
    loop {
        // Most bodies have arrived with their headers: only a body that is
        // not there yet arms the timer.
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => clock::timeout_at(limits.deadline.next(started, received), body.frame())
                .await
                .map_err(|_| too_slow(limits, received))?,
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|error| {
            let error: BodyError = error.into();
            ApiError::new(
                ErrorKind::InvalidBody,
                format!("failed to read request body: {error}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        received += data.len();
        if received > limit {
            return Err(too_large());
        }
        if received > reservation.bytes() {
            reservation
                .grow(received - reservation.bytes())
                .map_err(|_| budget_exhausted())?;
        }
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            Some(previous) => {
                joined.reserve(declared.max(previous.len() + data.len()));
                joined.extend_from_slice(&previous);
                joined.extend_from_slice(&data);
            }
            None => joined.extend_from_slice(&data),
        }
    }
    Ok(first.unwrap_or_else(|| joined.freeze()))
}

fn budget_exhausted() -> ApiError {
    ApiError::new(
        ErrorKind::Overloaded,
        "the router holds too many request bodies right now; retry shortly",
    )
}

fn too_slow(limits: &BodyLimits, received: usize) -> ApiError {
    ApiError::new(
        ErrorKind::BodyTimeout,
        format!(
            "request body arrived too slowly ({received} bytes received): after {} s bodies must arrive at {} bytes/s or faster",
            limits.deadline.grace.as_secs(),
            limits.deadline.min_bytes_per_sec
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{Full, StreamBody};

    use super::*;
    use crate::limits::BodyBudget;

    /// A 64-byte body limit, the default deadline.
    const SMALL: BodyLimits = BodyLimits {
        max_bytes: 64,
        deadline: BodyDeadline {
            grace: crate::limits::DEFAULT_BODY_READ_GRACE,
            min_bytes_per_sec: crate::limits::DEFAULT_MIN_BODY_BYTES_PER_SEC,
        },
    };

    /// Admits and reads within [`SMALL`]: None for the model listing.
    async fn admit_small<B>(request: Request<B>) -> Result<Option<InferenceRequest>, ApiError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BodyError>,
    {
        let budget = BodyBudget::new(1024, 1, 64);
        admit_within(request, &SMALL, &mut budget.reservation()).await
    }

    /// Admits and reads within `limits`, charging `reservation`.
    async fn admit_within<B>(
        request: Request<B>,
        limits: &BodyLimits,
        reservation: &mut BodyReservation<'_>,
    ) -> Result<Option<InferenceRequest>, ApiError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BodyError>,
    {
        match admit(request)? {
            Admitted::Inference(request) => request.read(limits, reservation).await.map(Some),
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
        admit_small(request).await
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
        assert_eq!(kind(admit_small(request).await), ErrorKind::BodyTooLarge);
    }

    type Chunks = StreamBody<
        futures::stream::BoxStream<'static, Result<http_body::Frame<Bytes>, std::io::Error>>,
    >;

    /// A body whose `parts` arrive `gap` apart.
    fn paced_body(parts: Vec<&'static str>, gap: Duration) -> Chunks {
        use futures::StreamExt;
        StreamBody::new(
            futures::stream::iter(parts)
                .then(move |part| async move {
                    clock::sleep(gap).await;
                    Ok(http_body::Frame::data(Bytes::from_static(part.as_bytes())))
                })
                .boxed(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_slower_than_the_minimum_rate_is_cut_with_408() {
        let limits = BodyLimits {
            max_bytes: 1024,
            deadline: BodyDeadline {
                grace: Duration::from_secs(10),
                min_bytes_per_sec: 10,
            },
        };
        let budget = BodyBudget::new(1024, 1, 1024);
        // 10 bytes every 500 ms keeps up with 10 bytes/s after the grace.
        let keeping_up = Request::post("/v1/completions")
            .body(paced_body(
                vec!["{\"model\": ", "\"m\",      ", "\"x\":1}    "],
                Duration::from_millis(500),
            ))
            .expect("request");
        let mut reservation = budget.reservation();
        assert!(
            admit_within(keeping_up, &limits, &mut reservation)
                .await
                .is_ok()
        );
        drop(reservation);
        // 10 bytes every 4 s falls behind: 10 s + 1 s per 10 bytes.
        let started = clock::now();
        let parked = Request::post("/v1/completions")
            .body(paced_body(
                vec!["{\"model\": ", "\"m\",      ", "\"x\":1}    ", "          "],
                Duration::from_secs(4),
            ))
            .expect("request");
        let error = admit_within(parked, &limits, &mut budget.reservation())
            .await
            .expect_err("too slow");
        assert_eq!(error.kind, ErrorKind::BodyTimeout);
        assert_eq!(error.kind.status(), http::StatusCode::REQUEST_TIMEOUT);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(13),
            "cut when 30 bytes had bought 3 s past the grace"
        );
        assert_eq!(budget.used(), 0, "the reservation is given back");
    }

    #[tokio::test]
    async fn bodies_beyond_the_budget_get_503_and_hold_nothing() {
        let budget = BodyBudget::new(100, 1, 64);
        let mut holder = budget.reservation();
        holder.grow(60).expect("fits");
        let declared = Request::post("/v1/completions")
            .header(header::CONTENT_LENGTH, "50")
            .body(Full::new(Bytes::from_static(&[b' '; 50])))
            .expect("request");
        let error = admit_within(declared, &SMALL, &mut budget.reservation())
            .await
            .expect_err("no room");
        assert_eq!(error.kind, ErrorKind::Overloaded);
        assert_eq!(error.kind.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        // Without Content-Length, the bytes are charged as they arrive.
        let chunked = Request::post("/v1/completions")
            .body(paced_body(
                vec!["{\"model\":\"m\",", "\"p\":\"0123456789012345678901234\"}"],
                Duration::ZERO,
            ))
            .expect("request");
        let mut reservation = budget.reservation();
        let error = admit_within(chunked, &SMALL, &mut reservation)
            .await
            .expect_err("no room");
        assert_eq!(error.kind, ErrorKind::Overloaded);
        drop(reservation);
        assert_eq!(budget.used(), 60, "only the holder's bytes remain");
        drop(holder);
        let fits = Request::post("/v1/completions")
            .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
            .expect("request");
        let mut reservation = budget.reservation();
        assert!(admit_within(fits, &SMALL, &mut reservation).await.is_ok());
        assert_eq!(reservation.bytes(), 13, "held while the request is");
    }

    #[tokio::test]
    async fn a_body_in_several_frames_is_joined() {
        let request = Request::post("/v1/completions")
            .body(paced_body(
                vec!["{\"model\"", ":\"m\"", "}"],
                Duration::ZERO,
            ))
            .expect("request");
        let Ok(Some(request)) = admit_small(request).await else {
            panic!("admitted");
        };
        assert_eq!(request.body, r#"{"model":"m"}"#);
    }

    #[tokio::test]
    async fn client_strings_are_quoted_only_in_part() {
        let long_path = format!("/{}", "a".repeat(10_000));
        let request = Request::post(long_path.as_str())
            .body(Full::new(Bytes::new()))
            .expect("request");
        let error = admit_small(request).await.expect_err("unknown path");
        assert!(error.message.len() < 400, "{}", error.message);
        assert!(error.message.contains("(10001 bytes)"), "{}", error.message);
    }
}
