//! Phase `authenticate`: who sent the request. Every request is anonymous
//! until the router verifies credentials; this phase is where that check
//! goes, before anything is spent on the request.

use super::admit::InferenceRequest;
use crate::error::ApiError;

/// Who a request is accounted to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Identity {
    /// No credentials are checked.
    #[default]
    Anonymous,
}

/// The request's identity, or why it is refused.
pub fn authenticate(_request: &InferenceRequest) -> Result<Identity, ApiError> {
    Ok(Identity::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::inference_request;

    #[test]
    fn every_request_is_anonymous_without_credential_checks() {
        let mut request = inference_request("/v1/completions", r#"{"model":"m"}"#);
        request.head.headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static("Bearer anything"),
        );
        assert_eq!(authenticate(&request), Ok(Identity::Anonymous));
    }
}
