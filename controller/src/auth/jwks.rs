//! Fetching the JWT issuer's public keys (the JWKS), so dataplanes verify
//! tokens without egress: from `jwksUri`, or found by OIDC discovery
//! (`{issuer}/.well-known/openid-configuration`). Refetched on a schedule,
//! and sooner when a dataplane reports a token signed by a key it does not
//! have, at most once per [`JWKS_HINT_MIN_INTERVAL`]: a key rotation reaches
//! the dataplanes in seconds, and random key ids in forged tokens cannot
//! make the controller hammer the issuer.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::router_config::{JwtSettings, RouterConfig};

/// Keys are refetched this often even without a hint: issuers announce
/// rotations ahead in their JWKS, so a new key is in place before use.
pub const JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// A failed fetch is retried after this long (the previous keys stay in use).
pub const JWKS_RETRY_INTERVAL: Duration = Duration::from_secs(10);
/// Fetches triggered by unknown key ids are at least this far apart.
pub const JWKS_HINT_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// Bounds one fetch (discovery included).
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A JWKS or discovery document larger than this is refused: real ones are
/// a few kilobytes.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Key-id hints queued between the stream server and the refresher; more
/// are dropped (one is enough to trigger a fetch).
pub const HINT_QUEUE_CAPACITY: usize = 16;

/// Why keys could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("GET {url}: {message}")]
    Http { url: String, message: String },
    #[error("{url}: {message}")]
    Document { url: String, message: String },
}

/// The issuer's keys, as shipped: each a JWKS entry as canonical JSON
/// (object keys sorted), sorted by `kid`; entries dataplanes cannot use
/// (symmetric keys, encryption keys, unknown types) are left out.
pub fn normalize_jwks(body: &[u8]) -> Result<Vec<String>, String> {
    let document: serde_json::Value =
        serde_json::from_slice(body).map_err(|error| format!("not JSON: {error}"))?;
    let keys = document
        .get("keys")
        .and_then(serde_json::Value::as_array)
        .ok_or("no `keys` array")?;
    let mut usable: Vec<(String, String)> = keys
        .iter()
        .filter(|key| is_usable(key))
        .map(|key| {
            let kid = key
                .get("kid")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned();
            // serde_json's map is ordered by key: the text is canonical.
            (kid, key.to_string())
        })
        .collect();
    usable.sort();
    usable.dedup();
    Ok(usable.into_iter().map(|(_, json)| json).collect())
}

/// A signature-verification public key of a type dataplanes accept.
fn is_usable(key: &serde_json::Value) -> bool {
    let text = |name: &str| key.get(name).and_then(serde_json::Value::as_str);
    if text("use").is_some_and(|usage| usage != "sig") {
        return false;
    }
    match (text("kty"), text("crv")) {
        (Some("RSA"), _) => text("n").is_some() && text("e").is_some(),
        (Some("EC"), Some("P-256" | "P-384")) => text("x").is_some() && text("y").is_some(),
        (Some("OKP"), Some("Ed25519")) => text("x").is_some(),
        _ => false,
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Fetches JWKS documents over HTTP(S), with the system's root certificates.
#[derive(Clone)]
pub struct JwksFetcher {
    client: HttpsClient,
}

impl std::fmt::Debug for JwksFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwksFetcher")
    }
}

impl JwksFetcher {
    pub fn new() -> Result<Self, std::io::Error> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// The keys of `settings`' issuer.
    pub async fn fetch(&self, settings: &JwtSettings) -> Result<Vec<String>, JwksError> {
        tokio::time::timeout(JWKS_FETCH_TIMEOUT, self.fetch_unbounded(settings))
            .await
            .unwrap_or_else(|_| {
                Err(JwksError::Http {
                    url: settings
                        .jwks_uri
                        .clone()
                        .unwrap_or_else(|| settings.issuer.clone()),
                    message: format!("no answer within {JWKS_FETCH_TIMEOUT:?}"),
                })
            })
    }

    async fn fetch_unbounded(&self, settings: &JwtSettings) -> Result<Vec<String>, JwksError> {
        let jwks_uri = match &settings.jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    settings.issuer.trim_end_matches('/')
                );
                let body = self.get(&url).await?;
                let document: serde_json::Value =
                    serde_json::from_slice(&body).map_err(|error| JwksError::Document {
                        url: url.clone(),
                        message: format!("not JSON: {error}"),
                    })?;
                document
                    .get("jwks_uri")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned)
                    .ok_or(JwksError::Document {
                        url,
                        message: "no `jwks_uri` in the discovery document".to_owned(),
                    })?
            }
        };
        let body = self.get(&jwks_uri).await?;
        normalize_jwks(&body).map_err(|message| JwksError::Document {
            url: jwks_uri,
            message,
        })
    }

    async fn get(&self, url: &str) -> Result<Bytes, JwksError> {
        let error = |message: String| JwksError::Http {
            url: url.to_owned(),
            message,
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e| error(format!("invalid URL: {e}")))?;
        let response = self
            .client
            .get(uri)
            .await
            .map_err(|e| error(e.to_string()))?;
        if !response.status().is_success() {
            return Err(error(format!("answered {}", response.status())));
        }
        Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map(|body| body.to_bytes())
            .map_err(|e| error(format!("reading the body: {e}")))
    }
}

/// How the refresher gets keys (the network in production, a script in tests).
pub type FetchKeys =
    Box<dyn Fn(JwtSettings) -> BoxFuture<'static, Result<Vec<String>, String>> + Send + Sync>;

/// Keeps `keys` holding the current issuer's keys: fetched when the
/// settings change, every [`JWKS_REFRESH_INTERVAL`], after
/// [`JWKS_RETRY_INTERVAL`] when a fetch failed, and on a hint naming a key
/// id it does not have (at most once per [`JWKS_HINT_MIN_INTERVAL`]). A
/// failed fetch keeps the previous keys. Runs until it is dropped (the last
/// settings stay in force when their sender is gone).
pub async fn refresh_keys(
    mut settings: watch::Receiver<RouterConfig>,
    mut hints: mpsc::Receiver<Vec<String>>,
    keys: watch::Sender<Vec<String>>,
    fetch: FetchKeys,
) {
    let mut current = settings.borrow_and_update().auth.clone();
    let mut next_fetch = Some(Instant::now());
    let mut last_fetch: Option<Instant> = None;
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut settings_open = true;
    let mut hints_open = true;
    loop {
        let due = next_fetch.filter(|_| current.is_some());
        tokio::select! {
            changed = settings.changed(), if settings_open => {
                if changed.is_err() {
                    settings_open = false;
                    continue;
                }
                let next = settings.borrow_and_update().auth.clone();
                if next != current {
                    let issuer_changed = next.as_ref().map(|s| (&s.issuer, &s.jwks_uri))
                        != current.as_ref().map(|s| (&s.issuer, &s.jwks_uri));
                    current = next;
                    if issuer_changed {
                        // Another issuer's keys must not verify this one's tokens.
                        keys.send_replace(Vec::new());
                        known.clear();
                        next_fetch = Some(Instant::now());
                    }
                }
            }
            kids = hints.recv(), if hints_open => {
                let Some(kids) = kids else {
                    hints_open = false;
                    continue;
                };
                if current.is_none() || kids.iter().all(|kid| known.contains(kid)) {
                    continue;
                }
                let earliest = last_fetch.map_or_else(Instant::now, |at| at + JWKS_HINT_MIN_INTERVAL);
                if next_fetch.is_none_or(|at| at > earliest) {
                    tracing::info!(?kids, "a dataplane saw tokens signed by unknown keys; refetching the JWKS");
                    next_fetch = Some(earliest);
                }
            }
            () = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(settings_now) = current.clone() else { continue };
                last_fetch = Some(Instant::now());
                match fetch(settings_now).await {
                    Ok(fetched) => {
                        known = fetched.iter().filter_map(|key| kid_of(key)).collect();
                        let changed = keys.send_if_modified(|held| {
                            if *held == fetched {
                                return false;
                            }
                            *held = fetched;
                            true
                        });
                        if changed {
                            tracing::info!(keys = known.len(), "JWKS updated");
                        }
                        next_fetch = Some(Instant::now() + JWKS_REFRESH_INTERVAL);
                    }
                    Err(error) => {
                        tracing::warn!(%error, retry_in = ?JWKS_RETRY_INTERVAL, "cannot fetch the JWKS; keeping the previous keys");
                        next_fetch = Some(Instant::now() + JWKS_RETRY_INTERVAL);
                    }
                }
            }
        }
    }
}

fn kid_of(key: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(key)
        .ok()?
        .get("kid")?
        .as_str()
        .map(str::to_owned)
}

/// A [`FetchKeys`] that fetches over the network. Its HTTPS client is built
/// at the first fetch, so a controller without JWT settings never needs the
/// system's root certificates.
pub fn network_fetch() -> FetchKeys {
    let fetcher: Arc<OnceLock<JwksFetcher>> = Arc::default();
    Box::new(move |settings| {
        let fetcher = fetcher.clone();
        Box::pin(async move {
            let client = match fetcher.get() {
                Some(client) => client.clone(),
                None => {
                    let client = JwksFetcher::new().map_err(|error| {
                        format!("cannot load the system's root certificates: {error}")
                    })?;
                    fetcher.get_or_init(|| client).clone()
                }
            };
            client.fetch(&settings).await.map_err(|e| e.to_string())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const RSA_KEY: &str = r#"{"kty":"RSA","kid":"b","use":"sig","n":"AQAB","e":"AQAB"}"#;

    #[test]
    fn keeps_verification_keys_only_in_canonical_order() {
        let body = br#"{"keys":[
            {"kty":"RSA","kid":"b","use":"sig","n":"AQAB","e":"AQAB"},
            {"kid":"a","kty":"EC","crv":"P-256","x":"x","y":"y"},
            {"kty":"oct","kid":"hmac","k":"c2VjcmV0"},
            {"kty":"RSA","kid":"enc","use":"enc","n":"AQAB","e":"AQAB"},
            {"kty":"EC","kid":"p521","crv":"P-521","x":"x","y":"y"},
            {"kty":"OKP","kid":"c","crv":"Ed25519","x":"x"}]}"#;
        let keys = normalize_jwks(body).expect("valid");
        assert_eq!(
            keys,
            [
                r#"{"crv":"P-256","kid":"a","kty":"EC","x":"x","y":"y"}"#,
                r#"{"e":"AQAB","kid":"b","kty":"RSA","n":"AQAB","use":"sig"}"#,
                r#"{"crv":"Ed25519","kid":"c","kty":"OKP","x":"x"}"#,
            ]
        );
        assert!(normalize_jwks(b"{}").expect_err("no keys").contains("keys"));
    }

    fn settings(issuer: &str) -> JwtSettings {
        JwtSettings {
            issuer: issuer.into(),
            audiences: vec![],
            jwks_uri: Some(format!("{issuer}/keys")),
            tier_claim: String::new(),
        }
    }

    fn router(auth: JwtSettings) -> RouterConfig {
        RouterConfig {
            auth: Some(auth),
            ..Default::default()
        }
    }

    /// A fetch that counts its calls and answers from `answers` (the last repeats).
    fn scripted(answers: Vec<Result<Vec<String>, String>>) -> (FetchKeys, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let fetch: FetchKeys = Box::new(move |_| {
            let call = counter.fetch_add(1, Ordering::SeqCst);
            let answer = answers[call.min(answers.len() - 1)].clone();
            Box::pin(async move { answer })
        });
        (fetch, calls)
    }

    struct Running {
        settings: watch::Sender<RouterConfig>,
        hints: mpsc::Sender<Vec<String>>,
        keys: watch::Receiver<Vec<String>>,
        calls: Arc<AtomicUsize>,
    }

    fn start(answers: Vec<Result<Vec<String>, String>>) -> Running {
        let (settings, settings_rx) = watch::channel(router(settings("https://a")));
        let (hints, hints_rx) = mpsc::channel(HINT_QUEUE_CAPACITY);
        let (keys_tx, keys) = watch::channel(Vec::new());
        let (fetch, calls) = scripted(answers);
        tokio::spawn(refresh_keys(settings_rx, hints_rx, keys_tx, fetch));
        Running {
            settings,
            hints,
            keys,
            calls,
        }
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn fetches_at_start_then_on_schedule_and_retries_failures() {
        let run = start(vec![Err("down".into()), Ok(vec![RSA_KEY.into()])]);
        settle().await;
        assert_eq!(run.calls.load(Ordering::SeqCst), 1);
        assert!(run.keys.borrow().is_empty());
        tokio::time::sleep(JWKS_RETRY_INTERVAL).await;
        assert_eq!(run.calls.load(Ordering::SeqCst), 2);
        assert_eq!(*run.keys.borrow(), [RSA_KEY]);
        tokio::time::sleep(JWKS_REFRESH_INTERVAL - Duration::from_secs(1)).await;
        assert_eq!(run.calls.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(run.calls.load(Ordering::SeqCst), 3);
        drop(run.settings);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_key_id_triggers_a_rate_limited_refetch() {
        let run = start(vec![Ok(vec![RSA_KEY.into()])]);
        settle().await;
        assert_eq!(run.calls.load(Ordering::SeqCst), 1);
        // A known kid changes nothing.
        run.hints.send(vec!["b".into()]).await.expect("send");
        settle().await;
        assert_eq!(run.calls.load(Ordering::SeqCst), 1);
        // An unknown one: a fetch as soon as the minimum interval allows.
        run.hints.send(vec!["rotated".into()]).await.expect("send");
        settle().await;
        assert_eq!(
            run.calls.load(Ordering::SeqCst),
            1,
            "too soon after the last fetch"
        );
        tokio::time::sleep(JWKS_HINT_MIN_INTERVAL).await;
        assert_eq!(run.calls.load(Ordering::SeqCst), 2);
        // A flood of forged kids: one fetch per interval at most.
        for index in 0..100 {
            run.hints
                .send(vec![format!("forged-{index}")])
                .await
                .expect("send");
        }
        tokio::time::sleep(JWKS_HINT_MIN_INTERVAL * 3).await;
        let calls = run.calls.load(Ordering::SeqCst);
        assert!((3..=5).contains(&calls), "{calls} fetches");
    }

    #[tokio::test(start_paused = true)]
    async fn another_issuer_drops_the_old_keys_at_once() {
        let run = start(vec![Ok(vec![RSA_KEY.into()]), Err("down".into())]);
        settle().await;
        assert_eq!(run.keys.borrow().len(), 1);
        run.settings.send_replace(router(settings("https://b")));
        settle().await;
        assert!(run.keys.borrow().is_empty());
        assert_eq!(run.calls.load(Ordering::SeqCst), 2);
        // Only the audience changes: same issuer, same keys, no fetch.
        let mut audience = settings("https://b");
        audience.audiences = vec!["x".into()];
        run.settings.send_replace(router(audience));
        settle().await;
        assert_eq!(run.calls.load(Ordering::SeqCst), 2);
    }

    /// Serves `/.well-known/openid-configuration` (pointing at `/keys`) and
    /// `/keys` on loopback; returns the issuer URL.
    async fn serve_issuer(keys: &'static str) -> String {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let issuer = format!("http://{}", listener.local_addr().expect("addr"));
        let discovery = format!(r#"{{"issuer":"{issuer}","jwks_uri":"{issuer}/keys"}}"#);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let discovery = discovery.clone();
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request: http::Request<hyper::body::Incoming>| {
                            let body = match request.uri().path() {
                                "/.well-known/openid-configuration" => Some(discovery.clone()),
                                "/keys" => Some(keys.to_owned()),
                                _ => None,
                            };
                            async move {
                                let mut response = http::Response::new(http_body_util::Full::new(
                                    Bytes::from(body.clone().unwrap_or_default()),
                                ));
                                if body.is_none() {
                                    *response.status_mut() = http::StatusCode::NOT_FOUND;
                                }
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        issuer
    }

    #[tokio::test]
    async fn fetches_over_http_directly_or_by_oidc_discovery() {
        let issuer =
            serve_issuer(r#"{"keys":[{"kty":"RSA","kid":"k1","n":"AQAB","e":"AQAB"}]}"#).await;
        let fetcher = JwksFetcher::new().expect("roots");
        let direct = fetcher.fetch(&settings(&issuer)).await.expect("fetched");
        assert_eq!(
            direct,
            [r#"{"e":"AQAB","kid":"k1","kty":"RSA","n":"AQAB"}"#]
        );
        let discovered = JwtSettings {
            jwks_uri: None,
            ..settings(&issuer)
        };
        assert_eq!(fetcher.fetch(&discovered).await.expect("fetched"), direct);
        let missing = JwtSettings {
            jwks_uri: Some(format!("{issuer}/nothing")),
            ..settings(&issuer)
        };
        let error = fetcher.fetch(&missing).await.expect_err("404").to_string();
        assert!(error.contains("404"), "{error}");
    }
}
