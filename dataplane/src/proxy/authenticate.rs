//! Phase `authenticate`: who sent the request, checked from its headers
//! before its body is read, so an unauthenticated client cannot make the
//! router buffer anything. Without authentication in the snapshot (no API
//! key, no JWT settings) every request is anonymous, as before.
//!
//! With authentication on, the credential headers (`Authorization`,
//! `x-api-key`) are removed from the request: a client's credential is for
//! the router and never reaches an engine.

use std::sync::Arc;

use http::header;
use http::request::Parts;

use crate::auth::{API_KEY_HEADER, Authenticator, UnknownKeyIds, User};
use crate::error::{ApiError, ErrorKind};

/// Who a request is accounted to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Identity {
    /// Authentication is off.
    #[default]
    Anonymous,
    /// A caller whose API key or JWT verified.
    User(Arc<User>),
}

impl Identity {
    pub fn user(&self) -> Option<&User> {
        match self {
            Self::Anonymous => None,
            Self::User(user) => Some(user),
        }
    }
}

/// The request's identity, or a 401 with a `WWW-Authenticate` challenge.
/// A token signed by a key the snapshot lacks is noted in `unknown_keys`
/// for the controller.
pub fn authenticate(
    authenticator: Option<&Authenticator>,
    head: &mut Parts,
    unknown_keys: &UnknownKeyIds,
) -> Result<Identity, ApiError> {
    let Some(authenticator) = authenticator else {
        return Ok(Identity::Anonymous);
    };
    let checked = authenticator.authenticate(&head.headers);
    head.headers.remove(header::AUTHORIZATION);
    head.headers.remove(API_KEY_HEADER);
    match checked {
        Ok(user) => Ok(Identity::User(user)),
        Err(refused) => {
            if let Some(kid) = refused.unknown_key_id() {
                unknown_keys.report(kid);
            }
            Err(
                ApiError::new(ErrorKind::Unauthenticated, refused.to_string())
                    .with_header(header::WWW_AUTHENTICATE, refused.challenge()),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use sha2::Digest;
    use switchyard_snapshot::pb;

    use super::*;
    use crate::proxy::testing::inference_request;

    fn with_key(key: &str) -> Authenticator {
        Authenticator::build(Some(&pb::AuthConfig {
            api_keys: vec![pb::ApiKey {
                key_sha256: sha2::Sha256::digest(key.as_bytes()).to_vec(),
                user_id: "alice".into(),
                tier: "gold".into(),
            }],
            jwt: Some(pb::JwtConfig::default()),
        }))
        .expect("valid")
        .expect("configured")
    }

    #[test]
    fn without_authentication_every_request_is_anonymous_and_keeps_its_headers() {
        let mut request = inference_request("/v1/completions", r#"{"model":"m"}"#);
        request.head.headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer anything"),
        );
        let identity = authenticate(None, &mut request.head, &UnknownKeyIds::default());
        assert_eq!(identity, Ok(Identity::Anonymous));
        assert!(request.head.headers.contains_key(header::AUTHORIZATION));
    }

    #[test]
    fn a_valid_key_gives_the_user_and_no_credential_is_forwarded() {
        let authenticator = with_key("sk-alice");
        let mut request = inference_request("/v1/completions", r#"{"model":"m"}"#);
        request
            .head
            .headers
            .insert(API_KEY_HEADER, HeaderValue::from_static("sk-alice"));
        request.head.headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer meant-for-someone-else"),
        );
        // Authorization wins when both are sent: it is checked, and refused.
        assert!(
            authenticate(Some(&authenticator), &mut request.head, &Default::default()).is_err()
        );
        let mut request = inference_request("/v1/completions", r#"{"model":"m"}"#);
        request
            .head
            .headers
            .insert(API_KEY_HEADER, HeaderValue::from_static("sk-alice"));
        let identity = authenticate(Some(&authenticator), &mut request.head, &Default::default())
            .expect("valid key");
        let user = identity.user().expect("a user");
        assert_eq!(
            (user.user_id.as_str(), user.tier.as_deref()),
            ("alice", Some("gold"))
        );
        assert!(!request.head.headers.contains_key(API_KEY_HEADER));
        assert!(!request.head.headers.contains_key(header::AUTHORIZATION));
    }

    #[test]
    fn refusals_are_401_with_a_challenge_and_unknown_key_ids_are_noted() {
        let authenticator = with_key("sk-alice");
        let mut request = inference_request("/v1/completions", r#"{"model":"m"}"#);
        let error = authenticate(Some(&authenticator), &mut request.head, &Default::default())
            .expect_err("no credential");
        assert_eq!(error.kind, ErrorKind::Unauthenticated);
        assert_eq!(
            error.headers,
            [(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"switchyard\"")
            )]
        );
        // A JWT naming a key the snapshot does not hold (header {"alg":"RS256","kid":"new"}).
        let token = "eyJhbGciOiJSUzI1NiIsImtpZCI6Im5ldyJ9.e30.c2ln";
        let mut request = inference_request("/v1/completions", r#"{"model":"m"}"#);
        request.head.headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
        let unknown_keys = UnknownKeyIds::default();
        let error = authenticate(Some(&authenticator), &mut request.head, &unknown_keys)
            .expect_err("unknown key");
        assert!(error.message.contains("\"new\""), "{}", error.message);
        let reported = futures::executor::block_on(unknown_keys.next_batch());
        assert_eq!(reported, ["new"]);
    }
}
