//! Test doubles of the request path: a scripted engine behind the
//! [`Upstream`] seam, and small snapshots to route with.
//!
//! Pod `pN` of every test ModelServer listens on `127.0.0.{N+1}:8000`, so a
//! request's authority names the pod it went to.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;
use switchyard_snapshot::pb;
use switchyard_snapshot::test_builders as builders;

use super::admit::InferenceRequest;
use super::forward::{Upstream, UpstreamError};
use super::log::{Observer, RequestRecord};
use crate::metrics::RouterMetrics;
use crate::pod::PodState;
use crate::request::parse_body;
use crate::routing::{KvConnector, PdGroup, PrefillDecode, Server};
use crate::scheduling::{PairRanking, Ranking, ScheduleRequest, Scheduler, SchedulingShared};
use crate::snapshot::SnapshotStore;

/// Port of every test pod.
const POD_PORT: u16 = 8000;

fn pod_addr(index: usize) -> SocketAddr {
    let host = u8::try_from(index + 1).expect("fewer than 255 test pods");
    SocketAddr::from(([127, 0, 0, host], POD_PORT))
}

/// ModelServer `default/s` with pods `p0..pN` and the given traffic policy.
pub fn server_with_pods(
    pods: usize,
    retry_attempts: u32,
    retry_interval: Duration,
    timeout: Option<Duration>,
) -> Server {
    Server {
        timeout: timeout.unwrap_or(crate::routing::DEFAULT_RESPONSE_HEADER_TIMEOUT),
        retry_attempts,
        retry_interval,
        ..Server::for_tests("default/s", PodState::numbered_for_tests(pods, pod_addr))
    }
}

/// ModelServer `default/s` whose pods form prefill/decode groups `groups`
/// of (name, prefill pods, decode pods): pods are numbered `p0, p1, ...`
/// group by group, prefill pods first.
pub fn pd_server(
    groups: &[(&str, usize, usize)],
    connector: KvConnector,
    retry_attempts: u32,
    retry_interval: Duration,
    timeout: Option<Duration>,
) -> Server {
    let total: usize = groups.iter().map(|(_, p, d)| p + d).sum();
    let mut server = server_with_pods(total, retry_attempts, retry_interval, timeout);
    let mut next = 0;
    let mut take = |count: usize| {
        let pods: Vec<usize> = (next..next + count).collect();
        next += count;
        pods
    };
    let mut built = Vec::new();
    let mut group_of = vec![0; total];
    let mut decode_candidates = Vec::new();
    for (index, (name, prefill, decode)) in groups.iter().enumerate() {
        let group = PdGroup {
            name: (*name).to_owned(),
            prefill: take(*prefill),
            decode: take(*decode),
        };
        for pod in group.prefill.iter().chain(&group.decode) {
            group_of[*pod] = index;
        }
        if group.is_complete() {
            decode_candidates.extend(group.decode.iter().copied());
        }
        built.push(group);
    }
    server.prefill_decode = Some(PrefillDecode {
        connector,
        group_label: "group".into(),
        groups: built,
        decode_candidates,
        group_of,
        bootstrap_ports: vec![0; total],
    });
    server
}

/// The pairs of a [`pd_server`] ranked by least-request alone: idle decode
/// pods in order, each with the first idle prefill pod of its group.
pub fn ranked_pairs(server: &Server) -> PairRanking {
    let pd = server
        .prefill_decode
        .as_ref()
        .expect("a prefill/decode server");
    let headers = HeaderMap::new();
    least_request_scheduler()
        .schedule_pairs(server, pd, &schedule_request(&headers))
        .expect("pairs to rank")
}

/// `server`'s pods ranked by least-request alone (default top-N): idle pods
/// in order `p0, p1, ...` on a fresh server, ejected ones last.
pub fn ranked(server: &Server) -> Ranking {
    let headers = HeaderMap::new();
    least_request_scheduler()
        .schedule(server, &schedule_request(&headers))
        .expect("pods to rank")
}

fn least_request_scheduler() -> Scheduler {
    let config = pb::SchedulerConfig {
        scores: vec![pb::ScorePlugin {
            name: switchyard_snapshot::scheduler::least_request::NAME.into(),
            weight: 1,
        }],
        ..Default::default()
    };
    let shared = Arc::new(SchedulingShared::default());
    Scheduler::build(Some(&config), &["m"], &shared).expect("valid config")
}

/// A request for model `m` with `headers` and no prompt.
fn schedule_request(headers: &HeaderMap) -> ScheduleRequest<'_> {
    ScheduleRequest {
        model: "m",
        served_model: "m",
        headers,
        prompt_hashes: &[],
        request_id: "test",
    }
}

/// A snapshot with route `default/r` serving `model` (and `lora_adapters`)
/// from ModelServer `default/s` with `pods` pods and the default scheduler.
pub fn one_route_store(
    model: &str,
    lora_adapters: &[&str],
    model_rewrite: Option<&str>,
    pods: usize,
) -> SnapshotStore {
    let store = SnapshotStore::new();
    store
        .apply_route_config(
            "v1",
            one_route_config(
                model,
                lora_adapters,
                model_rewrite,
                pods,
                pb::TrafficPolicy::default(),
            ),
        )
        .expect("a valid snapshot");
    store
}

/// The RouteConfig of [`one_route_store`], with `policy` on the ModelServer.
pub fn one_route_config(
    model: &str,
    lora_adapters: &[&str],
    model_rewrite: Option<&str>,
    pods: usize,
    policy: pb::TrafficPolicy,
) -> pb::RouteConfig {
    let pods = (0..pods)
        .map(|i| builders::pod(&format!("p{i}"), &pod_addr(i).ip().to_string()))
        .collect();
    let all = builders::rule("all", None, &[("default/s", 1)]);
    builders::route_config(
        vec![pb::ModelRoute {
            lora_adapters: lora_adapters.iter().map(|a| (*a).to_owned()).collect(),
            ..builders::route_with_rules("r", model, vec![all])
        }],
        vec![pb::ModelServer {
            model: model_rewrite.map(str::to_owned),
            port: u32::from(POD_PORT),
            traffic_policy: Some(policy),
            ..builders::server_in("default", "s", pods)
        }],
    )
}

/// Metrics only (no access log), fresh registry.
pub fn test_observer() -> Arc<Observer> {
    Arc::new(Observer::without_access_log(
        RouterMetrics::new().expect("metrics"),
    ))
}

/// The value of one series in `metrics`' exposition, e.g.
/// `kthena_router_requests_total{error_type="...",model="m",...}`.
pub fn metric(metrics: &RouterMetrics, series: &str) -> Option<f64> {
    let text = String::from_utf8(metrics.render().expect("render")).expect("UTF-8");
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// The record of a `POST /v1/completions`.
pub fn test_record() -> RequestRecord {
    let request = Request::post("/v1/completions").body(()).expect("request");
    RequestRecord::start(&test_observer(), &request)
}

/// An admitted `POST path` with `body`.
pub fn inference_request(path: &str, body: &str) -> InferenceRequest {
    let body = Bytes::copy_from_slice(body.as_bytes());
    let (head, ()) = Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(())
        .expect("request")
        .into_parts();
    InferenceRequest {
        head,
        parsed: parse_body(&body).expect("a valid body"),
        body,
    }
}

/// The body of a scripted response broke off here.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the engine's connection broke")]
pub struct StreamCut;

/// How the engine answers one attempt.
#[derive(Debug, Clone)]
pub enum Script {
    /// A response head, then these body frames.
    Respond {
        status: StatusCode,
        content_type: &'static str,
        frames: Vec<Result<Bytes, StreamCut>>,
    },
    /// The pod refuses the connection.
    Refuse,
    /// The connection breaks before the response head.
    Reset,
    /// A 200 whose head comes after this long.
    SlowHeaders(Duration),
    /// This script, after this long.
    Delayed(Duration, Box<Script>),
    /// A 429 with a JSON error and this `Retry-After`.
    TooManyRequests { retry_after: &'static str },
}

impl Script {
    /// `status` with a small JSON body.
    pub fn status(status: u16) -> Self {
        Self::json(status, r#"{"object":"scripted"}"#)
    }

    pub fn json(status: u16, body: &'static str) -> Self {
        Self::Respond {
            status: StatusCode::from_u16(status).expect("a status"),
            content_type: "application/json",
            frames: vec![Ok(Bytes::from_static(body.as_bytes()))],
        }
    }

    /// A 200 SSE stream of these frames.
    pub fn sse(frames: &[&'static str]) -> Self {
        Self::Respond {
            status: StatusCode::OK,
            content_type: "text/event-stream",
            frames: frames
                .iter()
                .map(|frame| Ok(Bytes::from_static(frame.as_bytes())))
                .collect(),
        }
    }

    /// This script, after `delay`.
    pub fn after(delay: Duration, script: Script) -> Self {
        Self::Delayed(delay, Box::new(script))
    }

    /// A 200 SSE stream that breaks after `first`.
    pub fn cut_stream(first: &'static [u8]) -> Self {
        Self::Respond {
            status: StatusCode::OK,
            content_type: "text/event-stream",
            frames: vec![Ok(Bytes::from_static(first)), Err(StreamCut)],
        }
    }
}

/// A request the scripted engine received.
#[derive(Debug, Clone)]
pub struct SentRequest {
    /// Name of the pod it went to.
    pub pod: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An engine that answers attempts with its scripts, in order, whichever
/// pod they go to, or (built with [`ScriptedUpstream::per_pod`]) with each
/// pod's own scripts, whatever order concurrent legs are sent in.
#[derive(Debug, Default)]
pub struct ScriptedUpstream {
    scripts: Mutex<VecDeque<Script>>,
    pod_scripts: Mutex<HashMap<String, VecDeque<Script>>>,
    sent: Mutex<Vec<SentRequest>>,
    /// Pods of requests dropped before their response head (cancelled).
    cancelled: Arc<Mutex<Vec<String>>>,
}

impl ScriptedUpstream {
    pub fn new(scripts: impl IntoIterator<Item = Script>) -> Self {
        Self {
            scripts: Mutex::new(scripts.into_iter().collect()),
            ..Self::default()
        }
    }

    /// Each pod answers with its own scripts, in order.
    pub fn per_pod<'a>(scripts: impl IntoIterator<Item = (&'a str, Vec<Script>)>) -> Self {
        Self {
            pod_scripts: Mutex::new(
                scripts
                    .into_iter()
                    .map(|(pod, scripts)| (pod.to_owned(), scripts.into()))
                    .collect(),
            ),
            ..Self::default()
        }
    }

    /// The pods of requests whose sender gave up on them before their
    /// response head arrived, in order.
    pub fn cancelled(&self) -> Vec<String> {
        self.cancelled.lock().clone()
    }

    /// What was sent to `pod`, in order.
    pub fn sent_to(&self, pod: &str) -> Vec<SentRequest> {
        self.sent
            .lock()
            .iter()
            .filter(|sent| sent.pod == pod)
            .cloned()
            .collect()
    }

    /// What each attempt sent, in order.
    pub fn sent(&self) -> Vec<SentRequest> {
        self.sent.lock().clone()
    }

    /// The pods attempts went to, in order.
    pub fn pods(&self) -> Vec<String> {
        self.sent
            .lock()
            .iter()
            .map(|sent| sent.pod.clone())
            .collect()
    }
}

impl Upstream for ScriptedUpstream {
    type Body = ScriptedBody;

    async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<ScriptedBody>, UpstreamError> {
        let host = request
            .uri()
            .host()
            .and_then(|host| host.parse::<std::net::Ipv4Addr>().ok())
            .expect("a test pod address");
        self.answer(format!("p{}", host.octets()[3] - 1), request)
            .await
    }

    async fn send_to_provider(
        &self,
        provider: &crate::providers::Provider,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<ScriptedBody>, UpstreamError> {
        self.answer(provider.key.clone(), request).await
    }
}

impl ScriptedUpstream {
    /// Records the request as sent to `pod` and plays its next script.
    async fn answer(
        &self,
        pod: String,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<ScriptedBody>, UpstreamError> {
        let (head, body) = request.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let script = match self.pod_scripts.lock().get_mut(&pod) {
            Some(scripts) => scripts.pop_front(),
            None => self.scripts.lock().pop_front(),
        };
        self.sent.lock().push(SentRequest {
            pod: pod.clone(),
            uri: head.uri.to_string(),
            headers: head.headers,
            body,
        });
        let watch = CancelWatch {
            pod,
            cancelled: self.cancelled.clone(),
            armed: true,
        };
        let mut script = script.expect("an attempt the test did not script");
        while let Script::Delayed(delay, then) = script {
            tokio::time::sleep(delay).await;
            script = *then;
        }
        let answer = match script {
            Script::Refuse => Err(UpstreamError::Connect("connection refused".into())),
            Script::Reset => Err(UpstreamError::BeforeHeaders(
                "connection reset by peer".into(),
            )),
            Script::SlowHeaders(delay) => {
                tokio::time::sleep(delay).await;
                Ok(scripted_response(
                    StatusCode::OK,
                    "application/json",
                    Vec::new(),
                ))
            }
            Script::Respond {
                status,
                content_type,
                frames,
            } => Ok(scripted_response(status, content_type, frames)),
            Script::TooManyRequests { retry_after } => {
                let mut response = scripted_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "application/json",
                    vec![Ok(Bytes::from_static(
                        br#"{"error":{"type":"rate_limit_error"}}"#,
                    ))],
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static(retry_after));
                Ok(response)
            }
            Script::Delayed(..) => unreachable!("delays are waited for above"),
        };
        watch.disarm();
        answer
    }
}

/// Notes a request as cancelled when dropped while still armed.
struct CancelWatch {
    pod: String,
    cancelled: Arc<Mutex<Vec<String>>>,
    armed: bool,
}

impl CancelWatch {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        if self.armed {
            self.cancelled.lock().push(std::mem::take(&mut self.pod));
        }
    }
}

fn scripted_response(
    status: StatusCode,
    content_type: &'static str,
    frames: Vec<Result<Bytes, StreamCut>>,
) -> Response<ScriptedBody> {
    let mut response = Response::new(ScriptedBody {
        frames: frames.into(),
    });
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A scripted response body: its frames, then the end (or a cut).
#[derive(Debug)]
pub struct ScriptedBody {
    frames: VecDeque<Result<Bytes, StreamCut>>,
}

impl Body for ScriptedBody {
    type Data = Bytes;
    type Error = StreamCut;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamCut>>> {
        Poll::Ready(
            self.get_mut()
                .frames
                .pop_front()
                .map(|frame| frame.map(Frame::data)),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }
}
