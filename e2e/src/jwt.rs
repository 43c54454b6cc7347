//! JWTs for end-to-end tests: real tokens signed with the keys in
//! `testdata/jwt/`, and an issuer on loopback serving their public halves
//! (a JWKS, and an OIDC discovery document pointing at it) that a test can
//! rotate while the stack runs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;

/// A private key of `testdata/jwt/` with the `kid` it is published under.
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    key: EncodingKey,
}

impl SigningKey {
    /// `file` in `testdata/jwt/` (`rsa-a.pem`, `ec-p256.pem`, ...).
    pub fn load(file: &str, kid: &str, alg: Algorithm) -> Self {
        let path = testdata().join("jwt").join(file);
        let pem = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let key = match alg {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self {
            kid: kid.to_owned(),
            alg,
            key,
        }
    }

    /// The public key as a JWKS entry.
    pub fn jwk(&self) -> serde_json::Value {
        let mut jwk = Jwk::from_encoding_key(&self.key, self.alg).expect("public key");
        jwk.common.key_id = Some(self.kid.clone());
        serde_json::to_value(jwk).expect("JSON")
    }

    /// A token with `claims`, its header naming this key.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).expect("signs")
    }

    /// A token signed with another algorithm than the key's (HS256 with
    /// the public key's JWK text as the secret: the algorithm-confusion
    /// attack), naming this key.
    pub fn sign_hs256_with_public_key(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.kid.clone());
        let secret = EncodingKey::from_secret(self.jwk().to_string().as_bytes()).expect("secret");
        jsonwebtoken::encode(&header, claims, &secret).expect("signs")
    }
}

/// Seconds since the Unix epoch, for `exp`/`nbf` claims.
pub fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// A token with `alg: none` and no signature.
pub fn unsigned_token(claims: &serde_json::Value) -> String {
    use base64::Engine as _;
    let encode = |value: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    };
    format!(
        "{}.{}.",
        encode(&serde_json::json!({"alg": "none", "typ": "JWT"})),
        encode(claims)
    )
}

/// The repository's `testdata/`.
pub fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

/// A JWKS document holding `keys`.
pub fn jwks(keys: &[&SigningKey]) -> String {
    let keys: Vec<serde_json::Value> = keys.iter().map(|key| key.jwk()).collect();
    serde_json::json!({ "keys": keys }).to_string()
}

/// An OIDC issuer on loopback: `/.well-known/openid-configuration` and
/// `/keys` (the JWKS, replaced by [`Issuer::publish`]). Stops when dropped.
pub struct Issuer {
    pub addr: SocketAddr,
    keys: Arc<Mutex<String>>,
    /// JWKS requests served, to see refreshes happen.
    fetches: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Issuer {
    pub async fn start(keys: &[&SigningKey]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the issuer");
        let addr = listener.local_addr().expect("issuer address");
        let url = format!("http://{addr}");
        let served_keys = Arc::new(Mutex::new(jwks(keys)));
        let fetches = Arc::new(Mutex::new(0));
        let task = tokio::spawn({
            let (served_keys, fetches) = (served_keys.clone(), fetches.clone());
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (keys, fetches, url) = (served_keys.clone(), fetches.clone(), url.clone());
                    tokio::spawn(async move {
                        let service = service_fn(move |request: Request<Incoming>| {
                            let body = match request.uri().path() {
                                "/.well-known/openid-configuration" => Some(
                                    serde_json::json!({"issuer": url, "jwks_uri": format!("{url}/keys")})
                                        .to_string(),
                                ),
                                "/keys" => {
                                    *fetches.lock() += 1;
                                    Some(keys.lock().clone())
                                }
                                _ => None,
                            };
                            async move {
                                let status = if body.is_some() {
                                    StatusCode::OK
                                } else {
                                    StatusCode::NOT_FOUND
                                };
                                let mut response =
                                    Response::new(Full::new(Bytes::from(body.unwrap_or_default())));
                                *response.status_mut() = status;
                                Ok::<_, Infallible>(response)
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Self {
            addr,
            keys: served_keys,
            fetches,
            task,
        }
    }

    /// The issuer URL (`iss` of its tokens).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the published keys (a rotation).
    pub fn publish(&self, keys: &[&SigningKey]) {
        *self.keys.lock() = jwks(keys);
    }

    pub fn fetches(&self) -> u64 {
        *self.fetches.lock()
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
