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
    use bytes::Bytes;
    use http::Request;

    use super::*;
    use crate::request::parse_body;

    #[test]
    fn every_request_is_anonymous_without_credential_checks() {
        let body = Bytes::from_static(br#"{"model":"m"}"#);
        let (head, ()) = Request::post("/v1/completions")
            .header("authorization", "Bearer anything")
            .body(())
            .expect("request")
            .into_parts();
        let request = InferenceRequest {
            head,
            parsed: parse_body(&body).expect("parses"),
            body,
        };
        assert_eq!(authenticate(&request), Ok(Identity::Anonymous));
    }
}
