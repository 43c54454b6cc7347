//! The traffic listener: OpenAI API paths in, engine responses streamed back.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use switchyard_runtime::clock;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::error::{ApiError, ErrorKind};
use crate::metrics::OutcomeLabel;
use crate::observe::{Observer, RequestRecord};
use crate::request::{Edit, apply_edits, parse_body};
use crate::response::ResponseObserver;
use crate::routing::{RequestFacts, Server};
use crate::scheduling::{InFlightGuard, PodState, Ranking, ScheduleError, ScheduleRequest};
use crate::snapshot::SnapshotStore;

/// Default request body limit: large enough for 100k-token agentic prompts
/// (~400 KB of text) many times over, small enough to bound memory per request.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Idle upstream connections are kept this long: engines keep connections
/// open much longer, and reconnecting costs a handshake on the request path.
pub const UPSTREAM_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Bounds connection setup to a pod when the ModelServer sets no timeout: a
/// pod that does not accept within this is as good as gone.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The request header carrying the request id.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// API paths whose POST bodies carry a `model` and are proxied.
const PROXIED_PATHS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the proxy recomputes.
const NOT_FORWARDED: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::HOST,
    header::CONTENT_LENGTH,
];

/// The proxy's settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub max_body_bytes: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// Serves the traffic port.
#[derive(Debug)]
pub struct Proxy {
    store: Arc<SnapshotStore>,
    client: UpstreamClient,
    config: ProxyConfig,
    observer: Arc<Observer>,
}

impl Proxy {
    pub fn new(store: Arc<SnapshotStore>, config: ProxyConfig, observer: Arc<Observer>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(UPSTREAM_CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(UPSTREAM_POOL_IDLE_TIMEOUT)
            .build(connector);
        Self {
            store,
            client,
            config,
            observer,
        }
    }

    /// Handles one request on the traffic port; every request but probes is
    /// recorded (metrics, access log) until its response body ends.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        if request.method() == Method::GET {
            match request.uri().path() {
                "/healthz" => {
                    return json_response(
                        StatusCode::OK,
                        Bytes::from_static(br#"{"message":"ok"}"#),
                    );
                }
                "/readyz" => return readiness(&self.store),
                _ => {}
            }
        }
        let mut record = RequestRecord::start(&self.observer, &request);
        let response = self.respond(request, &mut record).await;
        attach_record(response, record)
    }

    async fn respond(
        &self,
        request: Request<Incoming>,
        record: &mut RequestRecord,
    ) -> Response<ProxyBody> {
        let path = request.uri().path();
        if PROXIED_PATHS.contains(&path) {
            if request.method() != Method::POST {
                return record.failed(ApiError::new(
                    ErrorKind::MethodNotAllowed,
                    format!("{path} only accepts POST"),
                ));
            }
            return match self.proxy(request, record).await {
                Ok(response) => response,
                Err(error) => record.failed(error),
            };
        }
        match (request.method(), path) {
            (&Method::GET, "/v1/models") => match self.store.table() {
                Some(table) => json_response(StatusCode::OK, table.models_body.clone()),
                None => record.failed(not_ready()),
            },
            (_, "/v1/models") => record.failed(ApiError::new(
                ErrorKind::MethodNotAllowed,
                "/v1/models only accepts GET",
            )),
            _ => record.failed(ApiError::new(
                ErrorKind::UnknownPath,
                format!("unknown path {path}: the router serves {PROXIED_PATHS:?} and /v1/models"),
            )),
        }
    }

    async fn proxy(
        &self,
        request: Request<Incoming>,
        record: &mut RequestRecord,
    ) -> Result<Response<ProxyBody>, ApiError> {
        let (parts, body) = request.into_parts();
        check_content_type(&parts.headers)?;
        let body = read_body(body, &parts.headers, self.config.max_body_bytes).await?;
        let parsed = parse_body(&body)?;
        record.set_model(&parsed.model);
        let table = self.store.table().ok_or_else(not_ready)?;
        let decision = table
            .index
            .lookup(&RequestFacts {
                model: &parsed.model,
                path: parts.uri.path(),
                headers: &parts.headers,
            })
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::RouteNotFound,
                    format!("route not found for model {:?}", parsed.model),
                )
            })?;
        record.set_route(&parsed.model, &decision);
        let server = decision.server.clone();
        let served_model = match (&server.model_rewrite, decision.is_lora) {
            (Some(upstream), false) => upstream.as_str(),
            _ => parsed.model.as_str(),
        };
        let prompt_hashes =
            table
                .scheduler
                .prompt_hashes(&parsed.model, &body, parsed.prompt_span.as_ref());

        let mut edits = Vec::new();
        if let (Some(literal), false) = (&server.model_rewrite_literal, decision.is_lora) {
            edits.push(Edit {
                range: parsed.model_span.clone(),
                replacement: literal.clone(),
            });
        }
        let usage_edit = parsed.include_usage_edit(&body);
        let hide_usage_chunk = usage_edit.is_some();
        edits.extend(usage_edit);
        let body = apply_edits(body, &mut edits);

        let request_id = request_id(&parts.headers);
        record.set_request_id(&request_id);

        let ranking = table
            .scheduler
            .schedule(
                &server,
                &ScheduleRequest {
                    model: &parsed.model,
                    served_model,
                    headers: &parts.headers,
                    prompt_hashes: &prompt_hashes,
                    request_id: request_id.to_str().unwrap_or_default(),
                },
            )
            .map_err(|error: ScheduleError| {
                ApiError::new(ErrorKind::NoReadyPod, error.to_string())
            })?;
        // The client's header map becomes the upstream one in place (hop-by-hop
        // headers removed); it is copied only for an attempt that may be
        // followed by another, as the client consumes what it sends.
        let mut headers = parts.headers;
        strip_not_forwarded(&mut headers);
        headers.insert(REQUEST_ID_HEADER, request_id.clone());
        let mut headers = Some(headers);
        // Shares the bytes of the request line, no copy.
        let path_and_query = parts
            .uri
            .into_parts()
            .path_and_query
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut attempt = Attempts::new(&server, ranking);
        loop {
            let Some(pod) = attempt.next_pod() else {
                return Err(attempt.exhausted());
            };
            let guard = pod.begin_request();
            record.begin_attempt(&pod);
            let uri = Uri::builder()
                .scheme("http")
                .authority(pod.authority.clone())
                .path_and_query(path_and_query.clone())
                .build()
                .map_err(|error| {
                    ApiError::new(
                        ErrorKind::InvalidBody,
                        format!("invalid request path: {error}"),
                    )
                })?;
            let mut upstream = Request::new(Full::new(body.clone()));
            *upstream.method_mut() = Method::POST;
            *upstream.uri_mut() = uri;
            let attempt_headers = if attempt.may_follow() {
                headers.clone()
            } else {
                headers.take()
            };
            *upstream.headers_mut() = attempt_headers.unwrap_or_default();
            let pending = self.client.request(upstream);
            let outcome = match server.timeout {
                Some(limit) => match tokio::time::timeout(limit, pending).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        return Err(ApiError::new(
                            ErrorKind::UpstreamTimeout,
                            format!(
                                "pod {} of ModelServer {} sent no response headers within {:?}",
                                pod.key, server.key, limit
                            ),
                        ));
                    }
                },
                None => pending.await,
            };
            let failure = match outcome {
                Ok(response) if RETRYABLE_STATUSES.contains(&response.status()) => {
                    if attempt.may_retry() {
                        Failure::Status(response.status())
                    } else {
                        table.scheduler.on_dispatched(pod.id, &prompt_hashes);
                        return Ok(downstream_response(
                            response,
                            guard,
                            request_id,
                            hide_usage_chunk,
                        ));
                    }
                }
                Ok(response) => {
                    table.scheduler.on_dispatched(pod.id, &prompt_hashes);
                    return Ok(downstream_response(
                        response,
                        guard,
                        request_id,
                        hide_usage_chunk,
                    ));
                }
                Err(error) if error.is_connect() => {
                    record.connect_failed();
                    pod.eject(clock::now());
                    Failure::Connect(error.to_string())
                }
                Err(error) => Failure::BeforeHeaders(error.to_string()),
            };
            drop(guard);
            tracing::warn!(pod = %pod.key, server = %server.key, failure = %failure, "upstream attempt failed");
            if !attempt.record_failure(pod, failure) {
                return Err(attempt.exhausted());
            }
            if !attempt.retry_interval().is_zero() {
                tokio::time::sleep(attempt.retry_interval()).await;
            }
        }
    }
}

/// Engine statuses that mean "this pod cannot serve it now; another may".
const RETRYABLE_STATUSES: [StatusCode; 3] = [
    StatusCode::BAD_GATEWAY,
    StatusCode::SERVICE_UNAVAILABLE,
    StatusCode::GATEWAY_TIMEOUT,
];

/// Why one attempt failed before anything reached the client.
#[derive(Debug)]
enum Failure {
    /// The pod did not accept the connection: always worth another pod.
    Connect(String),
    /// The connection broke before response headers.
    BeforeHeaders(String),
    /// The engine answered 502/503/504.
    Status(StatusCode),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(error) => write!(f, "connect failed: {error}"),
            Self::BeforeHeaders(error) => {
                write!(f, "connection failed before response headers: {error}")
            }
            Self::Status(status) => write!(f, "engine answered {status}"),
        }
    }
}

/// The attempts of one request, over the scheduler's ranked candidates in
/// order: connect failures move on to the next candidate (up to top-N);
/// other retryable failures consume the ModelServer's `retry.attempts`, each
/// on the next candidate.
struct Attempts<'s> {
    server: &'s Server,
    ranking: Ranking,
    tried: Vec<Arc<PodState>>,
    retries_left: u32,
    last_failure: Option<Failure>,
    retry_interval: Duration,
}

impl<'s> Attempts<'s> {
    fn new(server: &'s Server, ranking: Ranking) -> Self {
        Self {
            server,
            ranking,
            tried: Vec::new(),
            retries_left: server.retry_attempts,
            last_failure: None,
            retry_interval: Duration::ZERO,
        }
    }

    fn next_pod(&self) -> Option<Arc<PodState>> {
        self.ranking
            .get(self.tried.len())
            .and_then(|index| self.server.pods.get(index))
            .cloned()
    }

    /// Whether another attempt could follow the one about to start.
    fn may_follow(&self) -> bool {
        self.tried.len() + 1 < self.ranking.len()
    }

    /// Whether a retryable engine status may be retried instead of returned.
    fn may_retry(&self) -> bool {
        self.retries_left > 0 && self.tried.len() + 1 < self.ranking.len()
    }

    /// Records a failed attempt; false when no further attempt is allowed.
    fn record_failure(&mut self, pod: Arc<PodState>, failure: Failure) -> bool {
        self.tried.push(pod);
        let allowed = match failure {
            Failure::Connect(_) => {
                self.retry_interval = Duration::ZERO;
                self.tried.len() < self.ranking.len()
            }
            Failure::BeforeHeaders(_) | Failure::Status(_) => {
                self.retry_interval = self.server.retry_interval;
                let allowed = self.retries_left > 0;
                self.retries_left = self.retries_left.saturating_sub(1);
                allowed
            }
        };
        self.last_failure = Some(failure);
        allowed
    }

    fn retry_interval(&self) -> Duration {
        self.retry_interval
    }

    fn exhausted(&self) -> ApiError {
        let key = &self.server.key;
        match &self.last_failure {
            None => ApiError::new(
                ErrorKind::NoReadyPod,
                format!("no ready pod for ModelServer {key}"),
            ),
            Some(Failure::Connect(error)) => ApiError::new(
                ErrorKind::UpstreamUnavailable,
                format!(
                    "could not connect to any pod of ModelServer {key} ({} tried; last error: {error})",
                    self.tried.len()
                ),
            ),
            Some(failure) => ApiError::new(
                ErrorKind::UpstreamFailed,
                format!(
                    "ModelServer {key}: {failure} ({} attempts)",
                    self.tried.len()
                ),
            ),
        }
    }
}

fn not_ready() -> ApiError {
    ApiError::new(
        ErrorKind::NotReady,
        "router is not ready: no routing snapshot received from the controller yet",
    )
}

fn readiness(store: &SnapshotStore) -> Response<ProxyBody> {
    match store.table() {
        Some(_) => json_response(
            StatusCode::OK,
            Bytes::from_static(br#"{"message":"router is ready"}"#),
        ),
        None => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(br#"{"message":"router is not ready"}"#),
        ),
    }
}

/// Readiness response, shared with the admin listener.
pub fn readiness_response(store: &SnapshotStore) -> Response<ProxyBody> {
    readiness(store)
}

fn json_response(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
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
                "unsupported Content-Type {:?}: send application/json",
                value.to_str().unwrap_or("<non-ASCII>")
            ),
        ))
    }
}

async fn read_body(body: Incoming, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
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
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(error) => Err(ApiError::new(
            ErrorKind::InvalidBody,
            format!("failed to read request body: {error}"),
        )),
    }
}

fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID_HEADER)
        .filter(|value| !value.is_empty())
        .cloned()
        .unwrap_or_else(crate::request_id::generate)
}

/// Removes the headers that must not reach the engine (all their values).
fn strip_not_forwarded(headers: &mut HeaderMap) {
    for name in &NOT_FORWARDED {
        headers.remove(name);
    }
}

fn downstream_response(
    response: Response<Incoming>,
    guard: InFlightGuard,
    request_id: HeaderValue,
    hide_usage_chunk: bool,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    for name in &NOT_FORWARDED {
        if *name != header::CONTENT_LENGTH {
            parts.headers.remove(name);
        }
    }
    let is_event_stream = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if is_event_stream && hide_usage_chunk {
        // The body shrinks when the usage chunk is hidden.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    parts.headers.insert(REQUEST_ID_HEADER, request_id);
    Response::from_parts(
        parts,
        ProxyBody::Upstream(UpstreamBody {
            body,
            observer: ResponseObserver::new(is_event_stream, hide_usage_chunk),
            guard: Some(guard),
            record: None,
            finished: false,
        }),
    )
}

/// Response body: a fixed buffer, or an engine's body streamed frame by frame.
///
/// Not boxed: hyper keeps the body in its per-connection state, so a large
/// variant costs nothing per response while a box would be an allocation each.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum ProxyBody {
    Full(Full<Bytes>),
    Upstream(UpstreamBody),
}

/// An engine's body on its way to the client: frames are observed for usage
/// (and the injected usage chunk hidden) and the pod's in-flight count is held
/// until the body ends or the client goes away.
#[derive(Debug)]
pub struct UpstreamBody {
    body: Incoming,
    observer: ResponseObserver,
    guard: Option<InFlightGuard>,
    record: Option<RequestRecord>,
    finished: bool,
}

/// Hands the record to the response body when the body comes from an engine
/// (it finishes when the body ends), else finishes it now.
fn attach_record(
    mut response: Response<ProxyBody>,
    mut record: RequestRecord,
) -> Response<ProxyBody> {
    let is_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    record.set_response(response.status().as_u16(), is_stream);
    match response.body_mut() {
        ProxyBody::Upstream(upstream) => upstream.record = Some(record),
        ProxyBody::Full(_) => record.finish(None, None),
    }
    response
}

impl From<Bytes> for ProxyBody {
    fn from(bytes: Bytes) -> Self {
        Self::Full(Full::new(bytes))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|frame| frame.map(|result| result.map_err(|never| match never {}))),
            Self::Upstream(upstream) => upstream.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(full) => full.is_end_stream(),
            Self::Upstream(upstream) => upstream.finished,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(full) => full.size_hint(),
            Self::Upstream(upstream) => upstream.body.size_hint(),
        }
    }
}

impl UpstreamBody {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            if self.finished {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let forwarded = self.observer.on_data(data);
                        if forwarded.is_some()
                            && let Some(record) = &mut self.record
                        {
                            record.on_chunk();
                        }
                        if self.body.is_end_stream() {
                            // A sized body may be dropped right after its last
                            // byte is written, without another poll: end here.
                            let rest = self.observer.finish();
                            self.end(None);
                            let last = match (forwarded, rest) {
                                (Some(data), Some(rest)) => Some([data, rest].concat().into()),
                                (data, rest) => data.or(rest),
                            };
                            return Poll::Ready(last.map(|data| Ok(Frame::data(data))));
                        }
                        if let Some(data) = forwarded {
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(error))) => {
                    self.end(Some(OutcomeLabel::UpstreamStreamError));
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(None) => {
                    let rest = self.observer.finish();
                    self.end(None);
                    return Poll::Ready(rest.map(|data| Ok(Frame::data(data))));
                }
            }
        }
    }

    fn end(&mut self, outcome: Option<OutcomeLabel>) {
        self.finished = true;
        if let Some(mut record) = self.record.take() {
            record.finish(self.observer.usage(), outcome);
        }
        if let Some(guard) = self.guard.take() {
            tracing::debug!(
                pod = %guard.pod().key,
                usage = ?self.observer.usage(),
                "response finished"
            );
        }
    }
}
