//! External model providers (ExternalModelProvider): what the dataplane
//! builds from the snapshot, and how a request to one is shaped — the URL,
//! the headers that may cross (an allow-list, the provider's static headers
//! and its credential) and the paths each provider type serves. The HTTPS
//! clients (rustls, system roots plus an optional CA bundle) live here too.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use switchyard_snapshot::pb;

/// Paths an OpenAI-compatible provider serves.
pub const OPENAI_PATHS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
];
/// The path an Anthropic-compatible provider serves.
pub const ANTHROPIC_PATHS: [&str; 1] = ["/v1/messages"];

/// Client headers that may reach a provider: content negotiation, the
/// request id and trace context. Everything else (the client's own
/// `Authorization`, cookies, internal headers) stays behind.
const FORWARDED_HEADERS: [&str; 10] = [
    "content-type",
    "accept",
    "x-request-id",
    "traceparent",
    "tracestate",
    "baggage",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
];
/// Further client headers an Anthropic provider gets: the API version and beta flags.
const ANTHROPIC_FORWARDED_HEADERS: [&str; 2] = ["anthropic-version", "anthropic-beta"];

/// Connection setup to a provider (DNS, TCP, TLS) must finish within this:
/// providers answer handshakes in well under a second, and only a failed
/// connection may be retried.
pub const PROVIDER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keep-alive on provider connections: idle pooled connections through
/// NATs and load balancers are noticed dead before a request is put on them.
pub const PROVIDER_TCP_KEEPALIVE: Duration = Duration::from_secs(30);
/// Idle provider connections are pooled this long (providers close theirs
/// after about a minute or more; reconnecting costs a TLS handshake).
pub const PROVIDER_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAi,
    Anthropic,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "OpenAI",
            Self::Anthropic => "Anthropic",
        }
    }

    /// Whether a provider of this kind serves `path`.
    pub fn serves(self, path: &str) -> bool {
        match self {
            Self::OpenAi => OPENAI_PATHS.contains(&path),
            Self::Anthropic => ANTHROPIC_PATHS.contains(&path),
        }
    }
}

/// A provider as the dataplane uses it, built when the snapshot is applied.
pub struct Provider {
    /// `namespace/name`.
    pub key: String,
    pub kind: ProviderKind,
    authority: Authority,
    /// The base URL's path without a trailing `/` ("" for none).
    base_path: String,
    pub insecure_skip_verify: bool,
    /// Static headers, then the credential header (marked sensitive).
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// Never prints the headers: one of them is the credential.
impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("key", &self.key)
            .field("kind", &self.kind)
            .field("authority", &self.authority)
            .field("base_path", &self.base_path)
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// Builds a provider from the snapshot. The error names the field at
    /// fault and never quotes a header value or the credential.
    pub fn from_snapshot(provider: &pb::ExternalProvider) -> Result<Self, String> {
        let key = switchyard_snapshot::object_key(&provider.namespace, &provider.name);
        let uri: Uri = provider
            .base_url
            .parse()
            .map_err(|error| format!("provider {key}: base URL: {error}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("provider {key}: base URL must be https"));
        }
        if uri.query().is_some() {
            return Err(format!("provider {key}: base URL must have no query"));
        }
        let authority = uri
            .authority()
            .filter(|authority| !authority.as_str().contains('@'))
            .cloned()
            .ok_or_else(|| format!("provider {key}: base URL needs a host and no user info"))?;
        let base_path = uri.path().trim_end_matches('/').to_owned();
        let mut headers = Vec::with_capacity(provider.headers.len() + 1);
        for static_header in &provider.headers {
            let name = HeaderName::from_bytes(static_header.name.as_bytes()).map_err(|_| {
                format!(
                    "provider {key}: invalid header name {:?}",
                    static_header.name
                )
            })?;
            let value = HeaderValue::from_str(&static_header.value)
                .map_err(|_| format!("provider {key}: header {name} has an invalid value"))?;
            headers.push((name, value));
        }
        if let Some(credential) = &provider.credential {
            let (name, value) = match credential.scheme() {
                pb::CredentialScheme::Bearer => (
                    header::AUTHORIZATION,
                    format!("Bearer {}", credential.value),
                ),
                pb::CredentialScheme::ApiKey => (
                    HeaderName::from_static("x-api-key"),
                    credential.value.clone(),
                ),
            };
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                format!("provider {key}: the credential is not a valid header value")
            })?;
            // Kept out of HTTP/2 header compression tables and debug output.
            value.set_sensitive(true);
            headers.push((name, value));
        }
        Ok(Self {
            key,
            kind: match provider.provider_type() {
                pb::ProviderType::Openai => ProviderKind::OpenAi,
                pb::ProviderType::Anthropic => ProviderKind::Anthropic,
            },
            authority,
            base_path,
            insecure_skip_verify: provider.insecure_skip_verify,
            headers,
        })
    }

    /// The provider's URL for a client request: base URL + request path
    /// (a base URL already ending in `/v1` does not repeat it) + query.
    pub fn url_for(&self, path_and_query: &PathAndQuery) -> Result<Uri, http::Error> {
        let path = path_and_query.path();
        let path = if self.base_path.ends_with("/v1") {
            path.strip_prefix("/v1").unwrap_or(path)
        } else {
            path
        };
        let mut target =
            String::with_capacity(self.base_path.len() + path_and_query.as_str().len());
        target.push_str(&self.base_path);
        target.push_str(path);
        if let Some(query) = path_and_query.query() {
            target.push('?');
            target.push_str(query);
        }
        Uri::builder()
            .scheme("https")
            .authority(self.authority.clone())
            .path_and_query(target)
            .build()
    }

    /// The upstream request headers: the allowed client headers, then the
    /// static headers and the credential (which win over a client's).
    pub fn request_headers(&self, client: &HeaderMap) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(FORWARDED_HEADERS.len() + self.headers.len());
        let anthropic: &[&str] = match self.kind {
            ProviderKind::Anthropic => &ANTHROPIC_FORWARDED_HEADERS,
            ProviderKind::OpenAi => &[],
        };
        for name in FORWARDED_HEADERS.iter().chain(anthropic) {
            for value in client.get_all(*name) {
                headers.append(HeaderName::from_static(name), value.clone());
            }
        }
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        headers
    }
}

/// A pooled HTTPS client (HTTP/2 when the provider offers it, else HTTP/1.1).
pub type ProviderClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The two HTTPS clients every provider shares: one verifying certificates
/// against the system roots plus the CA bundle, one for providers with
/// `insecureSkipVerify`. Built once per dataplane; connections are pooled
/// per host.
#[derive(Clone, Debug)]
pub struct ProviderClients {
    verified: ProviderClient,
    insecure: ProviderClient,
    /// Kept to build clients with pools of their own ([`Self::with_own_pools`]).
    verified_tls: rustls::ClientConfig,
    insecure_tls: rustls::ClientConfig,
}

/// Why the provider clients could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ProviderTlsError {
    #[error("cannot read the provider CA bundle {path}: {reason}")]
    CaBundle { path: String, reason: String },
}

impl ProviderClients {
    /// Trusts the system roots plus the certificates of `ca_bundle` (PEM).
    pub fn new(ca_bundle: Option<&std::path::Path>) -> Result<Self, ProviderTlsError> {
        let mut roots = rustls::RootCertStore::empty();
        // A missing or partly unreadable system store still leaves the bundle usable.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = ca_bundle {
            let error = |reason: String| ProviderTlsError::CaBundle {
                path: path.display().to_string(),
                reason,
            };
            let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| error(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| error(e.to_string()))?;
            if certificates.is_empty() {
                return Err(error("no PEM certificate in it".to_owned()));
            }
            for certificate in certificates {
                roots.add(certificate).map_err(|e| error(e.to_string()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verified = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ProviderTlsError::CaBundle {
                path: String::new(),
                reason: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let insecure = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ProviderTlsError::CaBundle {
                path: String::new(),
                reason: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth();
        Ok(Self::from_tls(verified, insecure))
    }

    fn from_tls(verified_tls: rustls::ClientConfig, insecure_tls: rustls::ClientConfig) -> Self {
        Self {
            verified: client(verified_tls.clone()),
            insecure: client(insecure_tls.clone()),
            verified_tls,
            insecure_tls,
        }
    }

    /// The same trust, with connection pools of their own: a traffic worker
    /// keeps its provider connections (and their tasks) on its own thread.
    pub fn with_own_pools(&self) -> Self {
        Self::from_tls(self.verified_tls.clone(), self.insecure_tls.clone())
    }

    /// The client for a provider.
    pub fn for_provider(&self, provider: &Provider) -> &ProviderClient {
        if provider.insecure_skip_verify {
            &self.insecure
        } else {
            &self.verified
        }
    }
}

fn client(tls: rustls::ClientConfig) -> ProviderClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(PROVIDER_TCP_KEEPALIVE));
    http.set_connect_timeout(Some(PROVIDER_CONNECT_TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(PROVIDER_POOL_IDLE_TIMEOUT)
        .build(https)
}

/// `insecureSkipVerify`: any certificate is accepted (the handshake's
/// signatures are still checked, so the connection is encrypted, just not
/// authenticated).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(base_url: &str, kind: pb::ProviderType, scheme: pb::CredentialScheme) -> Provider {
        Provider::from_snapshot(&pb::ExternalProvider {
            namespace: "team".into(),
            name: "p".into(),
            provider_type: kind.into(),
            base_url: base_url.into(),
            credential: Some(pb::ProviderCredential {
                scheme: scheme.into(),
                value: "sk-secret".into(),
            }),
            headers: vec![pb::ProviderHeader {
                name: "openai-organization".into(),
                value: "org-1".into(),
            }],
            ..Default::default()
        })
        .expect("valid provider")
    }

    #[test]
    fn the_url_is_the_base_url_plus_the_path_without_a_repeated_v1() {
        let path = PathAndQuery::from_static("/v1/chat/completions?x=1");
        let cases = [
            (
                "https://api.openai.com",
                "https://api.openai.com/v1/chat/completions?x=1",
            ),
            (
                "https://api.openai.com/v1",
                "https://api.openai.com/v1/chat/completions?x=1",
            ),
            (
                "https://api.example.com:8443/openai/v1",
                "https://api.example.com:8443/openai/v1/chat/completions?x=1",
            ),
            (
                "https://gw.example.com/proxy",
                "https://gw.example.com/proxy/v1/chat/completions?x=1",
            ),
        ];
        for (base, expected) in cases {
            let p = provider(base, pb::ProviderType::Openai, pb::CredentialScheme::Bearer);
            assert_eq!(
                p.url_for(&path).expect("url").to_string(),
                expected,
                "{base}"
            );
        }
    }

    #[test]
    fn only_allowed_headers_cross_with_the_static_ones_and_the_credential() {
        let mut client = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer client-key"),
            ("cookie", "session=1"),
            ("x-api-key", "client-key"),
            ("content-type", "application/json"),
            ("x-request-id", "id-1"),
            ("traceparent", "00-abc-def-01"),
            ("anthropic-version", "2023-06-01"),
            ("x-internal", "1"),
        ] {
            client.insert(name, HeaderValue::from_static(value));
        }
        let openai = provider(
            "https://a.example",
            pb::ProviderType::Openai,
            pb::CredentialScheme::Bearer,
        );
        let headers = openai.request_headers(&client);
        assert_eq!(headers["authorization"], "Bearer sk-secret");
        assert!(headers["authorization"].is_sensitive());
        assert!(!headers.contains_key("x-api-key") && !headers.contains_key("cookie"));
        assert!(!headers.contains_key("x-internal") && !headers.contains_key("anthropic-version"));
        assert_eq!(headers["openai-organization"], "org-1");
        assert_eq!(headers["x-request-id"], "id-1");
        assert_eq!(headers["traceparent"], "00-abc-def-01");

        let anthropic = provider(
            "https://a.example",
            pb::ProviderType::Anthropic,
            pb::CredentialScheme::ApiKey,
        );
        let headers = anthropic.request_headers(&client);
        assert_eq!(headers["x-api-key"], "sk-secret");
        assert!(
            !headers.contains_key("authorization"),
            "the client's key stays behind"
        );
        assert_eq!(headers["anthropic-version"], "2023-06-01");
        assert!(!format!("{anthropic:?}").contains("sk-secret"));
    }

    #[test]
    fn paths_are_served_by_type() {
        assert!(ProviderKind::OpenAi.serves("/v1/responses"));
        assert!(!ProviderKind::OpenAi.serves("/v1/messages"));
        assert!(ProviderKind::Anthropic.serves("/v1/messages"));
        assert!(!ProviderKind::Anthropic.serves("/v1/chat/completions"));
    }

    #[test]
    fn invalid_providers_are_refused_without_quoting_secrets() {
        let mut bad = pb::ExternalProvider {
            name: "p".into(),
            base_url: "http://plain.example".into(),
            ..Default::default()
        };
        assert!(Provider::from_snapshot(&bad).is_err());
        bad.base_url = "https://a.example".into();
        bad.credential = Some(pb::ProviderCredential {
            scheme: pb::CredentialScheme::Bearer.into(),
            value: "sk-\nsecret".into(),
        });
        let error = Provider::from_snapshot(&bad).expect_err("invalid credential");
        assert!(!error.contains("secret"), "{error}");
    }
}
