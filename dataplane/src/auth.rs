//! Client authentication: API keys (matched by SHA-256 digest, in constant
//! time) and JWTs (verified against the issuer's public keys the controller
//! ships in the snapshot).
//!
//! A request presents its credential as `Authorization: Bearer <credential>`
//! or `x-api-key: <key>` (the first wins when both are sent). A bearer value
//! shaped like a JWT (three dot-separated parts) is verified as one when JWTs
//! are configured; anything else is looked up as an API key.
//!
//! Error messages say what was wrong with a credential, never what it was.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use switchyard_snapshot::{MAX_UNKNOWN_KEY_IDS, bounded_key_id, pb};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The header clients send an API key in when they do not use `Authorization`.
pub const API_KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");

/// Clock skew tolerated on `exp` and `nbf`: issuers and routers run on
/// different machines, and a few seconds of drift must not fail logins.
pub const JWT_LEEWAY_SECONDS: u64 = 30;

/// The `realm` of `WWW-Authenticate` challenges.
pub const REALM: &str = "switchyard";

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub user_id: String,
    /// The tier whose per-user token budget applies, if any.
    pub tier: Option<String>,
}

/// Why a request was refused. Each becomes a 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "authentication required: send an API key (Authorization: Bearer <key> or x-api-key: <key>) or a JWT (Authorization: Bearer <token>)"
    )]
    MissingCredential,
    #[error("the Authorization header must use the Bearer scheme")]
    UnsupportedScheme,
    #[error("the API key is not valid")]
    UnknownApiKey,
    #[error("the token is not valid: {0}")]
    InvalidToken(TokenProblem),
}

/// What was wrong with a JWT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    #[error("malformed token")]
    Malformed,
    #[error("algorithm {0} is not accepted (RS256, RS384, RS512, ES256, ES384 and EdDSA are)")]
    UnsupportedAlgorithm(String),
    #[error("signing key {0:?} is unknown")]
    UnknownKeyId(String),
    #[error("no key of the issuer verifies {0} tokens")]
    NoKeyForAlgorithm(String),
    #[error("algorithm {alg} does not match signing key {kid:?}")]
    AlgorithmMismatch { alg: String, kid: String },
    #[error("signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token has no {0} claim")]
    MissingClaim(String),
    #[error("issuer does not match")]
    WrongIssuer,
    #[error("audience does not match")]
    WrongAudience,
    #[error("claim {0} is malformed")]
    MalformedClaim(String),
}

impl AuthError {
    /// The `WWW-Authenticate` challenge (RFC 6750): no error attribute when
    /// no credential was sent, `invalid_token` otherwise.
    pub fn challenge(&self) -> HeaderValue {
        let value = match self {
            Self::MissingCredential | Self::UnsupportedScheme => {
                format!("Bearer realm=\"{REALM}\"")
            }
            // The description is one of the fixed messages above plus, for an
            // unknown key id, the id: strip quotes so it cannot break the header.
            other => format!(
                "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"{}\"",
                other.to_string().replace(['"', '\\'], "")
            ),
        };
        HeaderValue::from_str(&value)
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer realm=\"switchyard\""))
    }

    /// The key id to report to the controller when the token was signed by
    /// a key this dataplane does not have.
    pub fn unknown_key_id(&self) -> Option<&str> {
        match self {
            Self::InvalidToken(TokenProblem::UnknownKeyId(kid)) => Some(kid),
            _ => None,
        }
    }
}

/// A batch of unknown key ids goes to the controller at most this often: a
/// rotation needs one report, and forged tokens naming random ids must not
/// turn into a stream of requests.
pub const UNKNOWN_KEY_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Key ids of tokens this dataplane could not verify because it does not
/// have the key, waiting to be reported to the controller over the snapshot
/// stream (which then refetches the issuer's keys).
#[derive(Debug, Default)]
pub struct UnknownKeyIds {
    pending: Mutex<PendingKeyIds>,
    reported: Notify,
}

#[derive(Debug, Default)]
struct PendingKeyIds {
    ids: Vec<String>,
    last_sent: Option<Instant>,
}

impl UnknownKeyIds {
    /// Notes `kid` for the next report (bounded; duplicates dropped).
    pub fn report(&self, kid: &str) {
        let kid = bounded_key_id(kid);
        {
            let mut pending = self.pending.lock();
            if pending.ids.len() >= MAX_UNKNOWN_KEY_IDS || pending.ids.iter().any(|id| id == kid) {
                return;
            }
            pending.ids.push(kid.to_owned());
        }
        self.reported.notify_one();
    }

    /// The next batch to send, at most one per [`UNKNOWN_KEY_REPORT_INTERVAL`].
    pub async fn next_batch(&self) -> Vec<String> {
        loop {
            let wait = {
                let pending = self.pending.lock();
                if pending.ids.is_empty() {
                    None
                } else {
                    Some(pending.last_sent.map_or(Duration::ZERO, |sent| {
                        (sent + UNKNOWN_KEY_REPORT_INTERVAL)
                            .saturating_duration_since(Instant::now())
                    }))
                }
            };
            match wait {
                None => self.reported.notified().await,
                Some(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
                Some(_) => {
                    let mut pending = self.pending.lock();
                    pending.last_sent = Some(Instant::now());
                    return std::mem::take(&mut pending.ids);
                }
            }
        }
    }
}

/// Why an auth section of a snapshot could not be used (the snapshot is NACKed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    #[error("API key {index}: digest is {len} bytes, not 32")]
    BadDigest { index: usize, len: usize },
    #[error("API key {index}: no user id")]
    NoUserId { index: usize },
}

/// The auth section of one snapshot, ready to check requests.
pub struct Authenticator {
    api_keys: HashMap<KeyDigest, Arc<User>>,
    jwt: Option<JwtVerifier>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key digests stay out of logs and dumps.
        f.debug_struct("Authenticator")
            .field("api_keys", &self.api_keys.len())
            .field("jwt", &self.jwt)
            .finish()
    }
}

impl Authenticator {
    /// None when the snapshot configures no authentication.
    pub fn build(config: Option<&pb::AuthConfig>) -> Result<Option<Self>, AuthConfigError> {
        let Some(config) = config else {
            return Ok(None);
        };
        let mut api_keys = HashMap::with_capacity(config.api_keys.len());
        for (index, key) in config.api_keys.iter().enumerate() {
            let digest: [u8; 32] =
                key.key_sha256
                    .as_slice()
                    .try_into()
                    .map_err(|_| AuthConfigError::BadDigest {
                        index,
                        len: key.key_sha256.len(),
                    })?;
            if key.user_id.is_empty() {
                return Err(AuthConfigError::NoUserId { index });
            }
            api_keys.insert(
                KeyDigest(digest),
                Arc::new(User {
                    user_id: key.user_id.clone(),
                    tier: (!key.tier.is_empty()).then(|| key.tier.clone()),
                }),
            );
        }
        Ok(Some(Self {
            api_keys,
            jwt: config.jwt.as_ref().map(JwtVerifier::new),
        }))
    }

    /// Key ids of the JWT verification keys, for the debug view.
    pub fn jwt_key_ids(&self) -> Vec<&str> {
        self.jwt.as_ref().map_or_else(Vec::new, |jwt| {
            jwt.keys
                .iter()
                .filter_map(|key| key.kid.as_deref())
                .collect()
        })
    }

    /// Checks the request's credential.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<User>, AuthError> {
        let credential = credential_of(headers)?;
        if let Some(jwt) = &self.jwt
            && looks_like_jwt(credential)
        {
            return jwt.verify(credential).map(Arc::new);
        }
        let digest = KeyDigest(Sha256::digest(credential.as_bytes()).into());
        self.api_keys
            .get(&digest)
            .cloned()
            .ok_or(AuthError::UnknownApiKey)
    }
}

/// The credential: `Authorization: Bearer` first, else `x-api-key`.
fn credential_of(headers: &HeaderMap) -> Result<&str, AuthError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| AuthError::UnsupportedScheme)?;
        let (scheme, credential) = value
            .trim()
            .split_once(' ')
            .ok_or(AuthError::UnsupportedScheme)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::UnsupportedScheme);
        }
        let credential = credential.trim();
        if credential.is_empty() {
            return Err(AuthError::MissingCredential);
        }
        return Ok(credential);
    }
    match headers.get(API_KEY_HEADER).map(HeaderValue::to_str) {
        Some(Ok(key)) if !key.trim().is_empty() => Ok(key.trim()),
        Some(_) => Err(AuthError::UnknownApiKey),
        None => Err(AuthError::MissingCredential),
    }
}

/// Three base64url segments separated by dots.
fn looks_like_jwt(credential: &str) -> bool {
    credential.split('.').count() == 3
        && credential
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

/// A SHA-256 digest whose equality is constant-time, so looking a key up
/// reveals nothing about how close a wrong key came to a right one.
#[derive(Clone, Copy)]
struct KeyDigest([u8; 32]);

impl PartialEq for KeyDigest {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for KeyDigest {}

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

/// Verifies JWTs: signature with the issuer's key named by `kid` (or any
/// key fitting the algorithm when the token names none), then `exp`
/// (required), `nbf`, `iss` and `aud`.
struct JwtVerifier {
    issuer: Option<String>,
    audiences: Vec<String>,
    tier_claim: Option<String>,
    keys: Vec<VerificationKey>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("tier_claim", &self.tier_claim)
            .field("keys", &self.keys.len())
            .finish()
    }
}

struct VerificationKey {
    kid: Option<String>,
    /// The algorithms this key may verify: fixed by its type and curve, and
    /// narrowed to its `alg` when the JWKS names one.
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// Algorithms accepted at all: asymmetric only, so a public key can never
/// be used as an HMAC secret.
const ACCEPTED_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

impl JwtVerifier {
    fn new(config: &pb::JwtConfig) -> Self {
        let keys = config
            .jwks_keys
            .iter()
            .filter_map(|json| match verification_key(json) {
                Ok(key) => Some(key),
                Err(reason) => {
                    tracing::warn!(%reason, "JWKS key skipped");
                    None
                }
            })
            .collect();
        Self {
            issuer: (!config.issuer.is_empty()).then(|| config.issuer.clone()),
            audiences: config.audiences.clone(),
            tier_claim: (!config.tier_claim.is_empty()).then(|| config.tier_claim.clone()),
            keys,
        }
    }

    fn verify(&self, token: &str) -> Result<User, AuthError> {
        let invalid = AuthError::InvalidToken;
        // A header naming an algorithm jsonwebtoken does not know (`none`)
        // fails to parse; say which, rather than "malformed".
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            invalid(
                algorithm_name(token)
                    .map_or(TokenProblem::Malformed, TokenProblem::UnsupportedAlgorithm),
            )
        })?;
        let alg = header.alg;
        if !ACCEPTED_ALGORITHMS.contains(&alg) {
            return Err(invalid(TokenProblem::UnsupportedAlgorithm(format!(
                "{alg:?}"
            ))));
        }
        let key = match &header.kid {
            Some(kid) => {
                let key = self
                    .keys
                    .iter()
                    .find(|key| key.kid.as_deref() == Some(kid.as_str()))
                    .ok_or_else(|| invalid(TokenProblem::UnknownKeyId(kid.clone())))?;
                if !key.algorithms.contains(&alg) {
                    return Err(invalid(TokenProblem::AlgorithmMismatch {
                        alg: format!("{alg:?}"),
                        kid: kid.clone(),
                    }));
                }
                key
            }
            None => self
                .keys
                .iter()
                .find(|key| key.algorithms.contains(&alg))
                .ok_or_else(|| invalid(TokenProblem::NoKeyForAlgorithm(format!("{alg:?}"))))?,
        };
        let mut validation = Validation::new(alg);
        validation.leeway = JWT_LEEWAY_SECONDS;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &self.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        let claims = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key.key,
            &validation,
        )
        .map_err(|error| invalid(token_problem(&error)))?
        .claims;
        let user_id = match claims.get("sub") {
            Some(serde_json::Value::String(sub)) if !sub.is_empty() => sub.clone(),
            Some(_) => return Err(invalid(TokenProblem::MalformedClaim("sub".into()))),
            None => return Err(invalid(TokenProblem::MissingClaim("sub".into()))),
        };
        let tier = match self.tier_claim.as_ref().and_then(|claim| claims.get(claim)) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(tier)) if !tier.is_empty() => Some(tier.clone()),
            Some(_) => {
                return Err(invalid(TokenProblem::MalformedClaim(
                    self.tier_claim.clone().unwrap_or_default(),
                )));
            }
        };
        Ok(User { user_id, tier })
    }
}

/// The `alg` a token's header names, for the error message (bounded, printable).
fn algorithm_name(token: &str) -> Option<String> {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|value| {
            value
                .get("alg")
                .and_then(|alg| alg.as_str().map(str::to_owned))
        })
        .filter(|alg| alg.len() <= 16 && alg.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn token_problem(error: &jsonwebtoken::errors::Error) -> TokenProblem {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature => TokenProblem::Expired,
        ErrorKind::ImmatureSignature => TokenProblem::NotYetValid,
        ErrorKind::InvalidIssuer => TokenProblem::WrongIssuer,
        ErrorKind::InvalidAudience => TokenProblem::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => TokenProblem::MissingClaim(claim.clone()),
        ErrorKind::InvalidClaimFormat(claim) => TokenProblem::MalformedClaim(claim.clone()),
        ErrorKind::InvalidSignature => TokenProblem::BadSignature,
        _ => TokenProblem::Malformed,
    }
}

/// Turns one JWKS entry into a key, with the algorithms it may verify.
fn verification_key(json: &str) -> Result<VerificationKey, String> {
    let jwk: Jwk = serde_json::from_str(json).map_err(|error| format!("not a JWK: {error}"))?;
    let kid = jwk.common.key_id.clone();
    let name = kid.as_deref().unwrap_or("(no kid)").to_owned();
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err(format!("key {name:?} is for encryption"));
    }
    let by_type: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
        AlgorithmParameters::EllipticCurve(params) => match &params.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            other => return Err(format!("key {name:?}: curve {other:?} is not accepted")),
        },
        AlgorithmParameters::OctetKeyPair(params) => match &params.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            other => return Err(format!("key {name:?}: curve {other:?} is not accepted")),
        },
        _ => {
            return Err(format!(
                "key {name:?}: only RSA, EC and OKP public keys are accepted"
            ));
        }
    };
    let algorithms = match jwk.common.key_algorithm {
        None => by_type,
        Some(named) => {
            let named = key_algorithm(named)
                .filter(|alg| by_type.contains(alg))
                .ok_or_else(|| format!("key {name:?}: alg {named:?} does not fit the key"))?;
            vec![named]
        }
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|error| format!("key {name:?}: {error}"))?;
    Ok(VerificationKey {
        kid,
        algorithms,
        key,
    })
}

fn key_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const ISSUER: &str = "https://issuer.test";
    const AUDIENCE: &str = "switchyard";

    fn pem(name: &str) -> Vec<u8> {
        let path = format!("{}/../testdata/jwt/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|error| panic!("{path}: {error}"))
    }

    /// A signing key from testdata/jwt and its public JWK.
    struct TestKey {
        kid: &'static str,
        alg: Algorithm,
        encoding: EncodingKey,
    }

    impl TestKey {
        fn new(file: &str, kid: &'static str, alg: Algorithm) -> Self {
            let bytes = pem(file);
            let encoding = match alg {
                Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => {
                    EncodingKey::from_rsa_pem(&bytes)
                }
                Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&bytes),
                _ => EncodingKey::from_ed_pem(&bytes),
            }
            .expect("test key");
            Self { kid, alg, encoding }
        }

        fn jwk(&self, with_alg: bool) -> String {
            let mut jwk = Jwk::from_encoding_key(&self.encoding, self.alg).expect("jwk");
            jwk.common.key_id = Some(self.kid.to_owned());
            if !with_alg {
                jwk.common.key_algorithm = None;
            }
            serde_json::to_string(&jwk).expect("json")
        }

        fn sign(&self, claims: &serde_json::Value) -> String {
            let mut header = Header::new(self.alg);
            header.kid = Some(self.kid.to_owned());
            jsonwebtoken::encode(&header, claims, &self.encoding).expect("signs")
        }
    }

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    fn claims() -> serde_json::Value {
        json!({"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600, "tier": "gold"})
    }

    fn authenticator(keys: &[&TestKey], api_keys: Vec<pb::ApiKey>) -> Authenticator {
        Authenticator::build(Some(&pb::AuthConfig {
            api_keys,
            jwt: Some(pb::JwtConfig {
                issuer: ISSUER.into(),
                audiences: vec!["other".into(), AUDIENCE.into()],
                tier_claim: "tier".into(),
                jwks_keys: keys.iter().map(|key| key.jwk(true)).collect(),
            }),
        }))
        .expect("valid")
        .expect("configured")
    }

    fn bearer(credential: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {credential}")).expect("header"),
        );
        headers
    }

    fn api_key(key: &str, user: &str, tier: &str) -> pb::ApiKey {
        pb::ApiKey {
            key_sha256: Sha256::digest(key.as_bytes()).to_vec(),
            user_id: user.into(),
            tier: tier.into(),
        }
    }

    #[test]
    fn every_accepted_algorithm_verifies_and_gives_the_identity() {
        let keys = [
            TestKey::new("rsa-a.pem", "rs256", Algorithm::RS256),
            TestKey::new("rsa-a.pem", "rs384", Algorithm::RS384),
            TestKey::new("rsa-b.pem", "rs512", Algorithm::RS512),
            TestKey::new("ec-p256.pem", "es256", Algorithm::ES256),
            TestKey::new("ec-p384.pem", "es384", Algorithm::ES384),
            TestKey::new("ed25519.pem", "eddsa", Algorithm::EdDSA),
        ];
        let auth = authenticator(&keys.iter().collect::<Vec<_>>(), Vec::new());
        for key in &keys {
            let done = auth
                .authenticate(&bearer(&key.sign(&claims())))
                .unwrap_or_else(|error| panic!("{}: {error}", key.kid));
            assert_eq!(done.user_id, "alice");
            assert_eq!(done.tier.as_deref(), Some("gold"));
        }
    }

    #[test]
    fn bad_tokens_are_refused_with_the_reason() {
        let key = TestKey::new("rsa-a.pem", "a", Algorithm::RS256);
        let other = TestKey::new("rsa-b.pem", "a", Algorithm::RS256);
        let auth = authenticator(&[&key], Vec::new());
        let with = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut claims = claims();
            change(&mut claims);
            key.sign(&claims)
        };
        use base64::Engine as _;
        let b64 = |value: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
        };
        let payload = b64(claims());
        // HS256 with the RSA public key's JWK text as the secret: the classic confusion attack.
        let hs256_with_public_key = jsonwebtoken::encode(
            &Header {
                kid: Some("a".into()),
                ..Header::new(Algorithm::HS256)
            },
            &claims(),
            &EncodingKey::from_secret(key.jwk(true).as_bytes()).expect("hmac key"),
        )
        .expect("signs");
        let cases: Vec<(String, TokenProblem)> = vec![
            (
                with(&|c| c["exp"] = json!(now() - 120)),
                TokenProblem::Expired,
            ),
            (
                with(&|c| c["nbf"] = json!(now() + 120)),
                TokenProblem::NotYetValid,
            ),
            (
                with(&|c| c["iss"] = json!("https://evil.test")),
                TokenProblem::WrongIssuer,
            ),
            (
                with(&|c| c["aud"] = json!("elsewhere")),
                TokenProblem::WrongAudience,
            ),
            (
                with(&|c| {
                    c.as_object_mut().expect("object").remove("exp");
                }),
                TokenProblem::MissingClaim("exp".into()),
            ),
            (
                with(&|c| {
                    c.as_object_mut().expect("object").remove("sub");
                }),
                TokenProblem::MissingClaim("sub".into()),
            ),
            (
                with(&|c| c["tier"] = json!(3)),
                TokenProblem::MalformedClaim("tier".into()),
            ),
            (
                format!("{}.{payload}.", b64(json!({"alg": "none", "typ": "JWT"}))),
                TokenProblem::UnsupportedAlgorithm("none".into()),
            ),
            (
                hs256_with_public_key,
                TokenProblem::UnsupportedAlgorithm("HS256".into()),
            ),
            (other.sign(&claims()), TokenProblem::BadSignature),
            (
                TestKey::new("rsa-a.pem", "rotated", Algorithm::RS256).sign(&claims()),
                TokenProblem::UnknownKeyId("rotated".into()),
            ),
            (
                TestKey::new("rsa-a.pem", "a", Algorithm::RS512).sign(&claims()),
                TokenProblem::AlgorithmMismatch {
                    alg: "RS512".into(),
                    kid: "a".into(),
                },
            ),
            ("abc.def.ghi".into(), TokenProblem::Malformed),
        ];
        for (token, problem) in cases {
            let error = auth.authenticate(&bearer(&token)).expect_err("refused");
            assert_eq!(error, AuthError::InvalidToken(problem.clone()), "{problem}");
            let challenge = error.challenge();
            let challenge = challenge.to_str().expect("ascii");
            assert!(
                challenge.starts_with("Bearer realm=\"switchyard\", error=\"invalid_token\""),
                "{challenge}"
            );
        }
        assert_eq!(
            auth.authenticate(&bearer("rotated-kid"))
                .expect_err("refused")
                .unknown_key_id(),
            None
        );
    }

    #[test]
    fn a_key_without_alg_takes_any_algorithm_of_its_type_and_a_token_without_kid_any_fitting_key() {
        let key = TestKey::new("rsa-a.pem", "a", Algorithm::RS384);
        let auth = Authenticator::build(Some(&pb::AuthConfig {
            api_keys: Vec::new(),
            jwt: Some(pb::JwtConfig {
                jwks_keys: vec![
                    key.jwk(false),
                    "{\"kty\":\"oct\",\"k\":\"c2VjcmV0\"}".into(),
                ],
                ..Default::default()
            }),
        }))
        .expect("valid")
        .expect("configured");
        let no_kid = jsonwebtoken::encode(
            &Header::new(Algorithm::RS384),
            &json!({"sub": "bob", "exp": now() + 60}),
            &key.encoding,
        )
        .expect("signs");
        let user = auth.authenticate(&bearer(&no_kid)).expect("valid");
        assert_eq!(
            *user,
            User {
                user_id: "bob".into(),
                tier: None
            }
        );
        assert_eq!(auth.jwt_key_ids(), vec!["a"], "the HMAC key was skipped");
    }

    #[test]
    fn api_keys_by_digest_from_either_header() {
        let auth = authenticator(
            &[],
            vec![
                api_key("sk-alice", "alice", "gold"),
                api_key("sk-bob", "bob", ""),
            ],
        );
        let found = auth.authenticate(&bearer("sk-alice")).expect("known");
        assert_eq!(found.tier.as_deref(), Some("gold"));
        let mut headers = HeaderMap::new();
        headers.insert(API_KEY_HEADER, HeaderValue::from_static("sk-bob"));
        let found = auth.authenticate(&headers).expect("known");
        assert_eq!(
            *found,
            User {
                user_id: "bob".into(),
                tier: None
            }
        );
        assert_eq!(
            auth.authenticate(&bearer("sk-mallory"))
                .expect_err("unknown"),
            AuthError::UnknownApiKey
        );
        assert_eq!(
            auth.authenticate(&HeaderMap::new()).expect_err("none"),
            AuthError::MissingCredential
        );
        let mut basic = HeaderMap::new();
        basic.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YTpi"),
        );
        assert_eq!(
            auth.authenticate(&basic).expect_err("scheme"),
            AuthError::UnsupportedScheme
        );
        assert_eq!(
            AuthError::MissingCredential.challenge(),
            "Bearer realm=\"switchyard\""
        );
    }

    #[test]
    fn snapshot_problems_are_reported() {
        let bad_digest = pb::AuthConfig {
            api_keys: vec![pb::ApiKey {
                key_sha256: vec![1, 2, 3],
                user_id: "u".into(),
                tier: String::new(),
            }],
            jwt: None,
        };
        assert_eq!(
            Authenticator::build(Some(&bad_digest)).expect_err("bad"),
            AuthConfigError::BadDigest { index: 0, len: 3 }
        );
        assert!(Authenticator::build(None).expect("valid").is_none());
        let auth = authenticator(&[], vec![api_key("sk-secret", "alice", "")]);
        let debug = format!("{auth:?}");
        assert!(
            !debug.contains("key_sha256") && debug.contains("api_keys: 1"),
            "{debug}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_key_ids_go_out_in_bounded_batches_at_most_once_a_second() {
        let hints = Arc::new(UnknownKeyIds::default());
        hints.report("k1");
        hints.report("k1");
        assert_eq!(hints.next_batch().await, ["k1"]);
        let started = Instant::now();
        for index in 0..10 {
            hints.report(&format!("forged-{index}"));
        }
        hints.report(&"x".repeat(1000));
        let batch = hints.next_batch().await;
        assert_eq!(started.elapsed(), UNKNOWN_KEY_REPORT_INTERVAL);
        assert_eq!(batch.len(), MAX_UNKNOWN_KEY_IDS);
        let waiting = tokio::spawn({
            let hints = hints.clone();
            async move { hints.next_batch().await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiting.is_finished(), "nothing pending: it waits");
        hints.report(&"é".repeat(100));
        let batch = waiting.await.expect("joined");
        assert!(
            batch[0].len() <= switchyard_snapshot::MAX_KEY_ID_BYTES,
            "{}",
            batch[0].len()
        );
    }
}
