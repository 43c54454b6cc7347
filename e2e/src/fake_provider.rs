//! Fake external model providers over real HTTPS on loopback, for the
//! provider tests: a test CA generated when the test runs (rcgen), server
//! certificates it signs, and an OpenAI-compatible and an Anthropic-
//! compatible server that answer with fixed usage and record every request
//! they received (path, headers, body).
//!
//! A request whose body contains `fail-400`, `fail-429` or `fail-500` is
//! answered with that status (the 429 with `Retry-After: 7`), as a
//! provider's own errors.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::harness::read_request;

/// Input tokens every fake answer reports (Anthropic: plus the cache's).
pub const FAKE_INPUT_TOKENS: u64 = 12;
/// Output tokens every fake answer reports.
pub const FAKE_OUTPUT_TOKENS: u64 = 3;
/// Anthropic answers' `cache_read_input_tokens` (counted as input).
pub const FAKE_CACHE_READ_TOKENS: u64 = 5;

/// A certificate authority made for one test, and the files of its certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
}

/// A certificate and its key, as PEM files.
pub struct IssuedCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA whose PEM certificate is written to `dir/ca.pem`.
    pub fn new(dir: &Path) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Switchyard test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        std::fs::write(dir.join("ca.pem"), issuer.pem()).expect("write the CA");
        Self {
            issuer,
            dir: dir.to_owned(),
        }
    }

    /// The CA certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `names` (DNS names or IP addresses), valid for
    /// servers and clients, written to `dir/<file>.pem` and `<file>-key.pem`.
    pub fn issue(&self, file: &str, names: &[&str]) -> IssuedCertificate {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        let issued = IssuedCertificate {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}-key.pem")),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("write the certificate");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write the key");
        issued
    }
}

/// The API a fake provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeApi {
    OpenAi,
    Anthropic,
}

/// One request a fake provider received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Path and query.
    pub target: String,
    pub headers: HeaderMap,
    pub body: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: http::Version,
}

/// A fake provider serving HTTPS on loopback until dropped.
pub struct FakeProvider {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    task: JoinHandle<()>,
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeProvider {
    /// Serves `api` on `127.0.0.1` with `certificate` (HTTP/2 and HTTP/1.1 by ALPN).
    pub async fn start(api: FakeApi, certificate: &IssuedCertificate) -> Self {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certificate.cert)
            .expect("certificate file")
            .collect::<Result<_, _>>()
            .expect("certificates");
        let key = PrivateKeyDer::from_pem_file(&certificate.key).expect("key file");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = service_fn(move |request| answer(api, log.clone(), request));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            received,
            task,
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().clone()
    }
}

async fn answer(
    api: FakeApi,
    log: Arc<Mutex<Vec<Received>>>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = read_request(request).await;
    let body = String::from_utf8_lossy(&body).into_owned();
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(String::new, ToString::to_string);
    log.lock().push(Received {
        target: target.clone(),
        headers: parts.headers,
        body: body.clone(),
        version: parts.version,
    });
    for (marker, status) in [
        ("fail-400", StatusCode::BAD_REQUEST),
        ("fail-429", StatusCode::TOO_MANY_REQUESTS),
        ("fail-500", StatusCode::INTERNAL_SERVER_ERROR),
    ] {
        if body.contains(marker) {
            let mut response = json(
                status,
                format!(r#"{{"error":{{"message":"provider says {marker}","type":"fake"}}}}"#),
            );
            if status == StatusCode::TOO_MANY_REQUESTS {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, http::HeaderValue::from_static("7"));
            }
            return Ok(response);
        }
    }
    let stream = body.contains(r#""stream":true"#);
    let include_usage = body.contains(r#""include_usage":true"#);
    let path = target.split('?').next().unwrap_or_default();
    let response = match (api, path, stream) {
        (FakeApi::OpenAi, "/v1/chat/completions", false) => json(
            StatusCode::OK,
            format!(
                r#"{{"id":"c","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"hi"}}}}],"usage":{{"prompt_tokens":{FAKE_INPUT_TOKENS},"completion_tokens":{FAKE_OUTPUT_TOKENS},"total_tokens":15}}}}"#
            ),
        ),
        (FakeApi::OpenAi, "/v1/chat/completions", true) => {
            let mut events = vec![
                r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}"#.to_owned(),
            ];
            if include_usage {
                events.push(format!(
                    r#"data: {{"id":"c","choices":[],"usage":{{"prompt_tokens":{FAKE_INPUT_TOKENS},"completion_tokens":{FAKE_OUTPUT_TOKENS}}}}}"#
                ));
            }
            events.push("data: [DONE]".to_owned());
            sse(&events)
        }
        (FakeApi::OpenAi, "/v1/responses", true) => sse(&[
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}".to_owned(),
            format!(
                "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"r\",\"usage\":{{\"input_tokens\":{FAKE_INPUT_TOKENS},\"output_tokens\":{FAKE_OUTPUT_TOKENS}}}}}}}"
            ),
        ]),
        (FakeApi::OpenAi, "/v1/responses", false) => json(
            StatusCode::OK,
            format!(
                r#"{{"id":"r","object":"response","usage":{{"input_tokens":{FAKE_INPUT_TOKENS},"output_tokens":{FAKE_OUTPUT_TOKENS}}}}}"#
            ),
        ),
        (FakeApi::Anthropic, "/v1/messages", true) => sse(&[
            format!(
                "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"m\",\"usage\":{{\"input_tokens\":{FAKE_INPUT_TOKENS},\"cache_read_input_tokens\":{FAKE_CACHE_READ_TOKENS},\"output_tokens\":1}}}}}}"
            ),
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}".to_owned(),
            format!(
                "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}},\"usage\":{{\"output_tokens\":{FAKE_OUTPUT_TOKENS}}}}}"
            ),
            "event: message_stop\ndata: {\"type\":\"message_stop\"}".to_owned(),
        ]),
        (FakeApi::Anthropic, "/v1/messages", false) => json(
            StatusCode::OK,
            format!(
                r#"{{"id":"m","type":"message","content":[{{"type":"text","text":"hi"}}],"usage":{{"input_tokens":{FAKE_INPUT_TOKENS},"cache_read_input_tokens":{FAKE_CACHE_READ_TOKENS},"output_tokens":{FAKE_OUTPUT_TOKENS}}}}}"#
            ),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            format!(r#"{{"error":{{"message":"the fake provider does not serve {path}"}}}}"#),
        ),
    };
    Ok(response)
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn sse(events: &[String]) -> Response<Full<Bytes>> {
    let mut body = String::new();
    for event in events {
        body.push_str(event);
        body.push_str("\n\n");
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    response
}
