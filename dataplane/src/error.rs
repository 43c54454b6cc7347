//! Errors the dataplane returns to HTTP clients, as OpenAI-style JSON:
//! `{"error":{"message":"…","type":"…","code":"…"}}`.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode, header};

/// What a request or response body may fail with: any error, as hyper takes it.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request failed before or while reaching an engine. Each kind has a
/// fixed status, OpenAI error `type` and `code`, so clients and dashboards can
/// branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The path is not one of the served API paths.
    UnknownPath,
    /// The path exists but not for this method.
    MethodNotAllowed,
    /// The body exceeds `--max-body-bytes`.
    BodyTooLarge,
    /// The body arrived slower than the minimum rate allows.
    BodyTimeout,
    /// The body is not valid JSON / UTF-8, or not a JSON object.
    InvalidBody,
    /// `Content-Type` is not JSON.
    UnsupportedMediaType,
    /// `model` is missing or not a string.
    InvalidModel,
    /// No ModelRoute serves this model (or none of its rules matched).
    RouteNotFound,
    /// The chosen ModelServer cannot serve this path (a prefill/decode
    /// ModelServer serves completions and chat completions only).
    UnsupportedPath,
    /// The dataplane has not received its first snapshot yet.
    NotReady,
    /// The budget for buffered request bodies is spent: retry shortly.
    Overloaded,
    /// The chosen ModelServer has no ready pod.
    NoReadyPod,
    /// Every attempt to connect to a pod failed.
    UpstreamUnavailable,
    /// The route's external provider does not serve the request's path.
    UnsupportedProviderPath,
    /// The pod did not answer with headers within the ModelServer's timeout.
    UpstreamTimeout,
    /// The pod's connection failed after the request was sent.
    UpstreamFailed,
    /// The HTTPRoute rule that took the request has no backend with a
    /// positive weight (the Gateway API asks for a 500).
    NoBackend,
    /// Every endpoint the endpoint picker could choose is saturated: the
    /// request is dropped, the gateway answers 429.
    Dropped,
    /// Authentication is on and the request's credential is missing or invalid.
    Unauthenticated,
    /// A token budget of the model or of the caller's tier is spent.
    RateLimited,
    /// A global token budget's Redis is unreachable and its policy is to refuse.
    RateLimitUnavailable,
    /// The model's pods are full and its fairness queue (or the caller's
    /// share of it) is full too.
    QueueFull,
    /// The request waited in the fairness queue for the longest wait allowed.
    QueueTimeout,
}

impl ErrorKind {
    /// HTTP status returned to the client.
    pub fn status(self) -> StatusCode {
        match self {
            Self::UnknownPath | Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::InvalidBody
            | Self::InvalidModel
            | Self::UnsupportedMediaType
            | Self::UnsupportedPath
            | Self::UnsupportedProviderPath => StatusCode::BAD_REQUEST,
            Self::NotReady
            | Self::Overloaded
            | Self::NoReadyPod
            | Self::UpstreamUnavailable
            | Self::RateLimitUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::RateLimited | Self::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamTimeout | Self::QueueTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamFailed => StatusCode::BAD_GATEWAY,
            Self::NoBackend => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Dropped => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Stable machine-readable code (`error.code`); see [`Self::error_type`] for metrics.
    pub fn code(self) -> &'static str {
        match self {
            Self::UnknownPath => "unknown_path",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BodyTooLarge => "body_too_large",
            Self::BodyTimeout => "request_timeout",
            Self::InvalidBody => "invalid_request_body",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::InvalidModel => "invalid_model",
            Self::RouteNotFound => "route_not_found",
            Self::UnsupportedPath => "unsupported_path",
            Self::NotReady => "router_not_ready",
            Self::Overloaded => "router_overloaded",
            Self::NoReadyPod => "no_ready_pod",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UnsupportedProviderPath => "provider_unsupported_path",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamFailed => "upstream_failed",
            Self::NoBackend => "no_backend",
            Self::Dropped => "request_dropped",
            Self::Unauthenticated => "invalid_authentication",
            Self::RateLimited => "rate_limit_exceeded",
            Self::RateLimitUnavailable => "rate_limit_unavailable",
            Self::QueueFull => "queue_full",
            Self::QueueTimeout => "queue_timeout",
        }
    }

    /// The metrics `error_type` and access log `error.type`: the code, except
    /// for rate limits, which Kthena's dashboards know as `rate_limit`.
    pub fn error_type(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limit",
            other => other.code(),
        }
    }

    /// OpenAI error `type`: client mistakes vs. server-side failures (and
    /// OpenAI's `tokens` for a spent token budget).
    pub fn openai_type(self) -> &'static str {
        if self == Self::RateLimited {
            "tokens"
        } else if self.status().is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        }
    }
}

/// Longest prefix of a client's string that an error message or a log line
/// quotes: enough to recognise it, never enough to amplify it.
pub const MAX_QUOTED_CLIENT_BYTES: usize = 128;

/// `text` quoted and escaped for a message, cut to its first
/// [`MAX_QUOTED_CLIENT_BYTES`] bytes (at a character boundary) with its
/// length when longer.
pub fn quoted(text: &str) -> String {
    if text.len() <= MAX_QUOTED_CLIENT_BYTES {
        return format!("{text:?}");
    }
    let mut end = MAX_QUOTED_CLIENT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &text[..end], text.len())
}

/// An error response: a kind plus a message for humans, and the headers
/// some kinds carry (`WWW-Authenticate`, `Retry-After`, `x-ratelimit-*`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// Empty for most errors (no allocation).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// The same error with one more response header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind.openai_type(),
                "code": self.kind.code(),
            }
        });
        Bytes::from(body.to_string())
    }

    /// Status, JSON content type and body, for any body type built from `Bytes`.
    /// A refusal that leaves the request body unread closes the connection,
    /// and an overload says when to retry.
    pub fn into_response<B: From<Bytes>>(self) -> http::Response<B> {
        let mut response = http::Response::new(B::from(self.body()));
        *response.status_mut() = self.kind.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self.kind {
            ErrorKind::Overloaded => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(crate::limits::BUDGET_RETRY_AFTER_SECONDS),
                );
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ErrorKind::BodyTimeout | ErrorKind::BodyTooLarge => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_error_object() {
        let error = ApiError::new(ErrorKind::RouteNotFound, "route not found for model \"x\"");
        let body: serde_json::Value = serde_json::from_slice(&error.body()).expect("json");
        assert_eq!(body["error"]["message"], "route not found for model \"x\"");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "route_not_found");
        assert_eq!(ErrorKind::RouteNotFound.status(), StatusCode::NOT_FOUND);
        assert_eq!(ErrorKind::NoReadyPod.openai_type(), "server_error");
    }

    #[test]
    fn rate_limits_and_authentication_failures() {
        let limited = ApiError::new(ErrorKind::RateLimited, "input token rate limit exceeded")
            .with_header(header::RETRY_AFTER, HeaderValue::from_static("20"));
        let response: http::Response<Bytes> = limited.clone().into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "20");
        let body: serde_json::Value = serde_json::from_slice(response.body()).expect("json");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(body["error"]["type"], "tokens");
        assert_eq!(ErrorKind::RateLimited.error_type(), "rate_limit");
        assert_eq!(
            ErrorKind::Unauthenticated.status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            ErrorKind::Unauthenticated.error_type(),
            "invalid_authentication"
        );
    }

    #[test]
    fn client_strings_are_quoted_up_to_a_bound() {
        assert_eq!(quoted("gpt\n4"), r#""gpt\n4""#);
        let long = "é".repeat(100);
        let text = quoted(&long);
        assert!(text.starts_with("\"éé"), "{text}");
        assert!(text.ends_with("\"… (200 bytes)"), "{text}");
        assert!(text.len() < MAX_QUOTED_CLIENT_BYTES + 32);
    }

    #[test]
    fn refusals_that_leave_the_body_unread_close_the_connection() {
        let overloaded: http::Response<Bytes> =
            ApiError::new(ErrorKind::Overloaded, "full").into_response();
        assert_eq!(overloaded.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(overloaded.headers()[header::RETRY_AFTER], "1");
        assert_eq!(overloaded.headers()[header::CONNECTION], "close");
        let slow: http::Response<Bytes> =
            ApiError::new(ErrorKind::BodyTimeout, "slow").into_response();
        assert_eq!(slow.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(slow.headers()[header::CONNECTION], "close");
    }
}
