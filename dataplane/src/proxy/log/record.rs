//! One [`RequestRecord`] per request, filled in by the phases at a few fixed
//! points (model read, routed, named, attempt started, response head, first
//! chunk) and turned into metrics and an access log line when the response
//! body ends, fails, or the client goes away (on drop).
//!
//! Timings of a record (all from the moment the request arrived):
//! - request processing: reading and parsing the body and routing, up to the
//!   first upstream attempt (the whole request when none was made);
//! - upstream: first attempt sent to the end of the engine's body (retries
//!   and the engine's prefill and decode included);
//! - response processing: what is left after the upstream part;
//! - queue: the wait in the fairness queue (part of the request
//!   processing's span, reported apart and not counted in it);
//! - prefill/decode pairs: the delivered pair's prefill leg (sent to its
//!   answer read whole) and decode leg (sent to the end of its body).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use switchyard_runtime::clock::{self, Instant};

use http::{HeaderValue, Method, Request, Uri, Version};
use prometheus::{IntCounter, IntGauge};
use tokio::sync::oneshot;

use super::Observer;
use super::access_log::AccessLogEntry;
use crate::auth::User;
use crate::error::ApiError;
use crate::error::MAX_QUOTED_CLIENT_BYTES;
use crate::fairness::Slot;
use crate::metrics::{ModelMetrics, Observation, OutcomeLabel, PathLabel, Phases};
use crate::pod::PodState;
use crate::pod::outlier::Ejection;
use crate::proxy::authenticate::Identity;
use crate::rate_limit::{Admission, LimitStatus, LimitType, Settlement};
use crate::request_id::ClientRequestId;
use crate::response::Usage;
use crate::routing::{Route, RouteDecision, Server};

/// `status_code` of a request whose client went away before any response
/// head was sent (nginx's "client closed request"), so it is not counted as
/// a success or as a router error.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// One request, from arrival to the end of its response.
#[derive(Debug)]
pub struct RequestRecord {
    observer: Arc<Observer>,
    started: Instant,
    started_at: SystemTime,
    method: Method,
    uri: Uri,
    version: Version,
    path: PathLabel,
    /// Kept only for the access log.
    model_name: Option<String>,
    model: Option<Arc<ModelMetrics>>,
    route: Option<Arc<Route>>,
    server: Option<Arc<Server>>,
    /// The target the rule's weights picked, when `server` took over from it.
    failed_over_from: Option<Arc<Server>>,
    pod: Option<Arc<PodState>>,
    request_id: Option<HeaderValue>,
    upstream_gauge: Option<IntGauge>,
    attempts: u32,
    upstream_started: Option<Instant>,
    first_chunk: Option<Instant>,
    status: u16,
    is_stream: bool,
    error: Option<(&'static str, String)>,
    /// The authenticated caller, for the access log.
    user: Option<Arc<User>>,
    /// The request's token budget reservation, settled when it finishes.
    admission: Option<Admission>,
    /// The request's place in its model's room (fairness on), given back
    /// with the tokens served when it finishes.
    fair_slot: Option<Slot>,
    /// When the request joined the fairness queue, until it left.
    queue_entered: Option<Instant>,
    queue_wait: Duration,
    /// An engine sent the response (the request was delivered).
    delivered: bool,
    /// Attempts that could not connect (their request reached no engine).
    connect_failures: u32,
    /// Output chunks that reached the client, the charge of a stream cut
    /// short before its usage arrived.
    produced_output: u64,
    finished: bool,
    /// Prefill/decode requests: the prefill pod of the latest pair.
    prefill_pod: Option<Arc<PodState>>,
    prefill_leg: PrefillLeg,
    /// When the latest pair's decode request was sent.
    decode_started: Option<Instant>,
    /// `pd_group_requests_total` of the latest pair's group: prefill, decode.
    pd_requests: Option<[IntCounter; 2]>,
    /// `pd_kv_transfer_params_total` of the ModelServer: relayed, missing.
    kv_transfer_params: Option<[IntCounter; 2]>,
}

/// How long the prefill leg of the latest pair took.
#[derive(Debug, Default)]
enum PrefillLeg {
    #[default]
    Unknown,
    Done(Duration),
    /// Still running when the decode answered (SGLang's concurrent legs);
    /// the duration arrives when it ends.
    Running(oneshot::Receiver<Duration>),
}

impl PrefillLeg {
    fn duration(&mut self) -> Option<Duration> {
        match self {
            Self::Unknown => None,
            Self::Done(took) => Some(*took),
            Self::Running(receiver) => receiver.try_recv().ok(),
        }
    }
}

impl RequestRecord {
    pub fn start<B>(observer: &Arc<Observer>, request: &Request<B>) -> Self {
        Self {
            observer: observer.clone(),
            started: clock::now(),
            started_at: clock::wall_now(),
            method: bounded_method(request.method()),
            uri: request.uri().clone(),
            version: request.version(),
            path: PathLabel::of(request.uri().path()),
            // The client's id, if it is kept; the proxy sets the one it
            // forwards. A copy, so a queued access log line does not hold
            // on to the connection's read buffer.
            request_id: match ClientRequestId::of(request.headers()) {
                ClientRequestId::Kept(id) => HeaderValue::from_bytes(id.as_bytes()).ok(),
                _ => None,
            },
            model_name: None,
            model: None,
            route: None,
            server: None,
            failed_over_from: None,
            pod: None,
            upstream_gauge: None,
            attempts: 0,
            upstream_started: None,
            first_chunk: None,
            status: 0,
            is_stream: false,
            error: None,
            user: None,
            admission: None,
            fair_slot: None,
            queue_entered: None,
            queue_wait: Duration::ZERO,
            delivered: false,
            connect_failures: 0,
            produced_output: 0,
            finished: false,
            prefill_pod: None,
            prefill_leg: PrefillLeg::Unknown,
            decode_started: None,
            pd_requests: None,
            kv_transfer_params: None,
        }
    }

    /// Who sent the request (`user_id` and `tier` in the access log).
    pub fn set_identity(&mut self, identity: &Identity) {
        if let Identity::User(user) = identity {
            self.user = Some(user.clone());
        }
    }

    /// The request's token budgets: settled when it finishes.
    pub fn set_admission(&mut self, admission: Admission) {
        self.admission = Some(admission);
    }

    /// The request's turn in the fairness queue came: its slot.
    pub fn set_fair_slot(&mut self, slot: Slot) {
        self.fair_slot = Some(slot);
    }

    /// The request joins the fairness queue (its wait counts until it
    /// leaves, or until the record ends: a client that went away).
    pub fn queue_entered(&mut self) {
        self.queue_entered = Some(clock::now());
    }

    /// The request left the fairness queue (admitted or refused).
    pub fn queue_left(&mut self) {
        if let Some(entered) = self.queue_entered.take() {
            self.queue_wait = clock::now().duration_since(entered);
        }
    }

    /// The `x-ratelimit-*` values of a response of a limited request.
    pub fn rate_limit_status(&self) -> Option<LimitStatus> {
        self.admission.as_ref().and_then(Admission::status)
    }

    /// A budget refused the request for `model`.
    pub fn rate_limited(&self, model: &str, limit_type: LimitType) {
        self.observer
            .metrics
            .rate_limit_exceeded_total
            .with_label_values(&[model, limit_type.as_str(), self.path.as_str()])
            .inc();
    }

    /// The response comes from an engine.
    pub fn set_delivered(&mut self) {
        self.delivered = true;
    }

    /// Output chunks the client received so far.
    pub fn set_produced_output(&mut self, chunks: u64) {
        self.produced_output = chunks;
    }

    /// The body named `model`.
    pub fn set_model(&mut self, model: &str) {
        if self.observer.access_log.is_enabled() {
            self.model_name = Some(model.to_owned());
        }
    }

    /// The request was routed: its model is one the snapshot serves.
    pub fn set_route(&mut self, model: &str, decision: &RouteDecision) {
        let resolved = self.observer.metrics.resolved();
        if let Some(handles) = resolved.model(model) {
            if let Some(active) = handles.active_downstream() {
                active.inc();
            }
            self.model = Some(handles.clone());
        }
        if let Some(from) = &decision.failed_over_from {
            if let Some(counter) = resolved.failovers(&decision.route.key, &from.key) {
                counter.inc();
            }
            self.failed_over_from = Some(from.clone());
        }
        self.route = Some(decision.route.clone());
        self.server = Some(decision.server.clone());
    }

    /// The id the request was given: the client's (already kept) or a
    /// generated one.
    pub fn set_request_id(&mut self, request_id: &HeaderValue) {
        if self.request_id.is_none() {
            self.request_id = Some(request_id.clone());
        }
    }

    /// An attempt to `pod` starts.
    pub fn begin_attempt(&mut self, pod: &Arc<PodState>) {
        self.pod = Some(pod.clone());
        self.begin_upstream_attempt();
    }

    /// An attempt to the routed backend starts (an external provider has no pod).
    pub fn begin_upstream_attempt(&mut self) {
        self.attempts += 1;
        if self.upstream_started.is_none() {
            self.upstream_started = Some(clock::now());
            if let (Some(route), Some(server)) = (&self.route, &self.server) {
                let resolved = self.observer.metrics.resolved();
                if let Some(gauge) = resolved.upstream_gauge(&route.key, &server.key) {
                    gauge.inc();
                    self.upstream_gauge = Some(gauge.clone());
                }
            }
        }
    }

    /// An attempt to a prefill/decode pair of group `group` (an index into
    /// the ModelServer's groups) starts.
    pub fn begin_pair(&mut self, prefill: &Arc<PodState>, decode: &Arc<PodState>, group: usize) {
        self.begin_attempt(decode);
        self.prefill_pod = Some(prefill.clone());
        self.prefill_leg = PrefillLeg::Unknown;
        self.decode_started = None;
        let (Some(server), Some(model)) = (&self.server, &self.model) else {
            return;
        };
        let resolved = self.observer.metrics.resolved();
        let Some(handles) = resolved.prefill_decode(&server.key) else {
            return;
        };
        if self.kv_transfer_params.is_none() {
            self.kv_transfer_params
                .clone_from(&handles.kv_transfer_params);
        }
        let group = handles.groups.get(group);
        if let Some(decisions) = group.and_then(|group| group.decisions.as_ref()) {
            decisions.inc();
        }
        self.pd_requests = group.and_then(|group| group.requests.get(&model.name).cloned());
    }

    /// The prefill pod of the latest pair, for a prefill/decode request.
    pub fn prefill_pod(&self) -> Option<&Arc<PodState>> {
        self.prefill_pod.as_ref()
    }

    /// The prefill request of the latest pair is sent.
    pub fn prefill_sent(&self) {
        if let Some([prefill, _]) = &self.pd_requests {
            prefill.inc();
        }
    }

    /// The prefill leg of the latest pair ended (its answer read whole).
    pub fn prefill_finished(&mut self, took: Duration) {
        self.prefill_leg = PrefillLeg::Done(took);
    }

    /// The prefill leg of the latest pair still runs; `took` says how long
    /// it took when it ends.
    pub fn prefill_running(&mut self, took: oneshot::Receiver<Duration>) {
        self.prefill_leg = PrefillLeg::Running(took);
    }

    /// The decode request of the latest pair is sent.
    pub fn decode_sent(&mut self) {
        self.decode_started = Some(clock::now());
        if let Some([_, decode]) = &self.pd_requests {
            decode.inc();
        }
    }

    /// A prefill answer's `kv_transfer_params` went to the decode request
    /// (`relayed`), or the answer had none.
    pub fn kv_transfer_params(&self, relayed: bool) {
        if let Some([with, without]) = &self.kv_transfer_params {
            if relayed { with.inc() } else { without.inc() }
        }
    }

    /// Upstream attempts started so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The attempt could not connect to its pod.
    pub fn connect_failed(&mut self) {
        self.connect_failures += 1;
        if let Some(server) = &self.server {
            let resolved = self.observer.metrics.resolved();
            if let Some(counter) = resolved.connect_errors(&server.key) {
                counter.inc();
            }
        }
    }

    /// The ModelServer the request was routed to.
    pub fn server(&self) -> Option<&Arc<Server>> {
        self.server.as_ref()
    }

    /// An attempt of this request made outlier detection eject `pod` of `server`.
    pub fn pod_ejected(&self, server: &Server, pod: &PodState, ejection: &Ejection) {
        self.observer
            .metrics
            .pod_ejections_total
            .with_label_values(&[&server.key, ejection.cause.as_str()])
            .inc();
        tracing::warn!(
            pod = %pod.key,
            server = %server.key,
            reason = ejection.cause.as_str(),
            ejected_for_ms = u64::try_from(ejection.duration.as_millis()).unwrap_or(u64::MAX),
            times = ejection.times,
            "pod ejected"
        );
    }

    /// The response of `pod`, delivered to the client, ended: a success
    /// for the pod unless the engine answered 5xx (counted already).
    pub fn attempt_succeeded(&self, pod: &PodState) {
        if self.status < 500 {
            pod.health.record_success();
        }
    }

    /// The router answers with `error` itself: records it and renders it.
    pub fn failed<B: From<bytes::Bytes>>(&mut self, error: ApiError) -> http::Response<B> {
        self.fail(&error);
        error.into_response()
    }

    /// The router answers with `error` itself.
    pub fn fail(&mut self, error: &ApiError) {
        self.status = error.kind.status().as_u16();
        self.error = Some((error.kind.error_type(), error.message.clone()));
    }

    /// The response head going to the client.
    pub fn set_response(&mut self, status: u16, is_stream: bool) {
        self.status = status;
        self.is_stream = is_stream;
    }

    /// A chunk of the response body is about to reach the client.
    pub fn on_chunk(&mut self) {
        if self.first_chunk.is_none() {
            self.first_chunk = Some(clock::now());
        }
    }

    /// The response is over: metrics and the access log line.
    pub fn finish(&mut self, usage: Option<Usage>, outcome: Option<OutcomeLabel>) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.status == 0 {
            self.status = CLIENT_CLOSED_REQUEST;
        }
        if let Some(admission) = self.admission.take() {
            admission.settle(Settlement {
                // An attempt that connected sent the request to an engine.
                forwarded: self.delivered || self.attempts > self.connect_failures,
                prompt_tokens: usage.map(|usage| usage.prompt_tokens),
                output_tokens: usage.map_or(self.produced_output, |usage| usage.completion_tokens),
            });
        }
        self.queue_left();
        let ended = clock::now();
        let total = ended.duration_since(self.started);
        let error_type = match (&self.error, outcome) {
            (Some((kind, _)), _) => kind,
            (None, Some(outcome)) => outcome.as_str(),
            (None, None) if self.status >= 400 => OutcomeLabel::EngineError.as_str(),
            (None, None) => OutcomeLabel::Success.as_str(),
        };
        if let Some(slot) = self.fair_slot.take() {
            slot.finish(
                usage.map(|usage| usage.prompt_tokens),
                usage.map_or(self.produced_output, |usage| usage.completion_tokens),
                self.status == 200 && error_type == OutcomeLabel::Success.as_str(),
            );
        }
        // A stream's own split: arrival to the first chunk, then the rest.
        let stream_split = match (self.is_stream, self.first_chunk) {
            (true, Some(first)) => Some((
                first.duration_since(self.started).as_secs_f64(),
                ended.duration_since(first).as_secs_f64(),
            )),
            _ => None,
        };
        let prefill_leg = self.prefill_leg.duration();
        let decode_leg = self.decode_started.map(|at| ended.duration_since(at));
        let phases = match (&self.prefill_pod, stream_split) {
            (Some(_), _) => Phases {
                prefill: prefill_leg.map(|took| took.as_secs_f64()),
                decode: decode_leg.map(|took| took.as_secs_f64()),
            },
            (None, Some((prefill, decode))) => Phases {
                prefill: Some(prefill),
                decode: Some(decode),
            },
            (None, None) => Phases::default(),
        };
        let usage = usage.unwrap_or_default();
        let observation = Observation {
            path: self.path,
            status: self.status,
            error_type,
            total_seconds: total.as_secs_f64(),
            phases,
        };
        // The in-flight gauges first: a scrape that sees the request counted
        // sees it no longer in flight.
        if let Some(gauge) = self.upstream_gauge.take() {
            gauge.dec();
        }
        match &self.model {
            Some(model) => {
                if let Some(active) = model.active_downstream() {
                    active.dec();
                }
                if self.status == 200 && error_type == OutcomeLabel::Success.as_str() {
                    model.observe_success(self.path, observation.total_seconds, phases);
                } else {
                    model.observe_other(&observation);
                }
                model.add_tokens(self.path, usage.prompt_tokens, usage.completion_tokens);
                if let Some((prefill, decode)) = stream_split {
                    model.observe_stream(prefill, decode, usage.completion_tokens);
                }
            }
            None => self.observer.metrics.observe_unknown(&observation),
        }
        if !self.observer.access_log.is_enabled() {
            return;
        }
        let request_processing = self
            .upstream_started
            .map_or(total, |at| at.duration_since(self.started))
            .saturating_sub(self.queue_wait);
        let upstream = self
            .upstream_started
            .map_or(Duration::ZERO, |at| ended.duration_since(at));
        let ttft = match (self.is_stream, self.first_chunk) {
            (true, Some(first)) => Some(first.duration_since(self.started)),
            _ => None,
        };
        let error = self.error.take().or_else(|| match outcome {
            Some(OutcomeLabel::UpstreamStreamError) => Some((
                OutcomeLabel::UpstreamStreamError.as_str(),
                "the engine's connection broke while the response was streamed".to_owned(),
            )),
            Some(OutcomeLabel::ClientDisconnected) => Some((
                OutcomeLabel::ClientDisconnected.as_str(),
                "the client closed the connection before the response was complete".to_owned(),
            )),
            _ => None,
        });
        self.observer.access_log.log(AccessLogEntry {
            started_at: self.started_at,
            method: self.method.clone(),
            path: logged_path(self.path, &self.uri),
            version: self.version,
            status: self.status,
            model_name: self.model_name.take(),
            route: self.route.take(),
            server: self.server.take(),
            failed_over_from: self.failed_over_from.take(),
            pod: self.pod.take(),
            request_id: self.request_id.take(),
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            total,
            queue: self.queue_wait,
            request_processing,
            upstream,
            response_processing: total
                .saturating_sub(self.queue_wait + request_processing + upstream),
            ttft,
            upstream_attempts: self.attempts,
            error,
            user: self.user.take(),
            prefill_pod: self.prefill_pod.take(),
            prefill_leg,
            decode_leg,
        });
    }
}

/// The path for the access log: a served path as its static name, any
/// other cut to [`MAX_QUOTED_CLIENT_BYTES`], so a queued line holds neither
/// the request's buffer nor an unbounded copy of it.
fn logged_path(label: PathLabel, uri: &Uri) -> Cow<'static, str> {
    match label {
        PathLabel::Other => Cow::Owned(bounded_prefix(uri.path()).to_owned()),
        served => Cow::Borrowed(served.as_str()),
    }
}

/// The longest prefix of `text` within [`MAX_QUOTED_CLIENT_BYTES`], at a
/// character boundary.
fn bounded_prefix(text: &str) -> &str {
    let mut end = text.len().min(MAX_QUOTED_CLIENT_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Methods are client tokens of any length: a long extension method is cut.
fn bounded_method(method: &Method) -> Method {
    const MAX_METHOD_BYTES: usize = 16;
    let bytes = method.as_str().as_bytes();
    if bytes.len() <= MAX_METHOD_BYTES {
        method.clone()
    } else {
        Method::from_bytes(&bytes[..MAX_METHOD_BYTES]).unwrap_or(Method::GET)
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        // Still open: the client went away (or the handler was cancelled).
        self.finish(None, Some(OutcomeLabel::ClientDisconnected));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::proxy::testing::{metric, one_route_store, test_observer};
    use crate::routing::RequestFacts;

    fn started(observer: &Arc<Observer>, path: &str) -> RequestRecord {
        let request = Request::post(path).body(()).expect("request");
        RequestRecord::start(observer, &request)
    }

    #[test]
    fn a_client_gone_before_the_response_head_is_499() {
        let observer = test_observer();
        drop(started(&observer, "/v1/completions"));
        assert_eq!(
            metric(
                &observer.metrics,
                r#"kthena_router_requests_total{error_type="client_disconnected",model="unknown",path="/v1/completions",status_code="499"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn a_router_error_is_counted_with_its_code_once() {
        let observer = test_observer();
        let mut record = started(&observer, "/v1/chat/completions");
        let response: http::Response<bytes::Bytes> =
            record.failed(ApiError::new(ErrorKind::NotReady, "no snapshot"));
        assert_eq!(response.status(), 503);
        record.set_response(503, false);
        record.finish(None, None);
        drop(record);
        assert_eq!(
            metric(
                &observer.metrics,
                r#"kthena_router_requests_total{error_type="router_not_ready",model="unknown",path="/v1/chat/completions",status_code="503"}"#
            ),
            Some(1.0),
            "finished once, not again on drop"
        );
    }

    #[test]
    fn a_routed_stream_counts_tokens_ttft_and_releases_its_gauges() {
        let observer = test_observer();
        let store = one_route_store("m", &[], None, 1);
        let table = store.table().expect("snapshot");
        observer.metrics.resolve(&table);
        let mut record = started(&observer, "/v1/chat/completions");
        let headers = http::HeaderMap::new();
        let decision = table
            .index
            .lookup(&RequestFacts {
                model: "m",
                path: "/v1/chat/completions",
                headers: &headers,
                arrival: crate::routing::ArrivalFacts::default(),
            })
            .expect("routed");
        record.set_model("m");
        record.set_route("m", &decision);
        let active = r#"kthena_router_active_downstream_requests{model="m"}"#;
        assert_eq!(metric(&observer.metrics, active), Some(1.0));
        record.begin_attempt(&decision.server.pods[0]);
        record.set_response(200, true);
        record.on_chunk();
        record.finish(
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 3,
            }),
            None,
        );
        let m = &observer.metrics;
        assert_eq!(metric(m, active), Some(0.0));
        assert_eq!(
            metric(
                m,
                r#"kthena_router_active_upstream_requests{model_route="default/r",model_server="default/s"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            metric(
                m,
                r#"kthena_router_tokens_total{model="m",path="/v1/chat/completions",token_type="output"}"#
            ),
            Some(3.0)
        );
        assert_eq!(
            metric(
                m,
                r#"kthena_router_time_to_first_token_seconds_count{model="m"}"#
            ),
            Some(1.0)
        );
        assert_eq!(record.attempts(), 1);
    }
}
