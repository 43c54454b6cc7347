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
//!   processing's span, reported apart and not counted in it).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use switchyard_runtime::clock::{self, Instant};

use http::{HeaderValue, Method, Request, Uri, Version};
use prometheus::IntGauge;

use super::Observer;
use super::access_log::AccessLogEntry;
use crate::auth::User;
use crate::error::ApiError;
use crate::fairness::Slot;
use crate::metrics::{ModelMetrics, Observation, OutcomeLabel, PathLabel, UNKNOWN_MODEL};
use crate::pod::PodState;
use crate::proxy::authenticate::Identity;
use crate::rate_limit::{Admission, LimitStatus, LimitType, Settlement};
use crate::request_id::REQUEST_ID_HEADER;
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
    queue_wait: Duration,
    /// An engine sent the response (the request was delivered).
    delivered: bool,
    /// Attempts that could not connect (their request reached no engine).
    connect_failures: u32,
    /// Output chunks that reached the client, the charge of a stream cut
    /// short before its usage arrived.
    produced_output: u64,
    finished: bool,
}

impl RequestRecord {
    pub fn start<B>(observer: &Arc<Observer>, request: &Request<B>) -> Self {
        Self {
            observer: observer.clone(),
            started: clock::now(),
            started_at: clock::wall_now(),
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            path: PathLabel::of(request.uri().path()),
            // The client's id, if any; the proxy sets the one it forwards.
            request_id: request
                .headers()
                .get(REQUEST_ID_HEADER)
                .filter(|id| !id.is_empty())
                .cloned(),
            model_name: None,
            model: None,
            route: None,
            server: None,
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
            queue_wait: Duration::ZERO,
            delivered: false,
            connect_failures: 0,
            produced_output: 0,
            finished: false,
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

    /// How long the request waited in the fairness queue.
    pub fn set_queue_wait(&mut self, waited: Duration) {
        self.queue_wait = waited;
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
            handles.active_downstream.inc();
            self.model = Some(handles.clone());
        }
        self.route = Some(decision.route.clone());
        self.server = Some(decision.server.clone());
    }

    pub fn set_request_id(&mut self, request_id: &HeaderValue) {
        self.request_id = Some(request_id.clone());
    }

    /// An attempt to `pod` starts.
    pub fn begin_attempt(&mut self, pod: &Arc<PodState>) {
        self.attempts += 1;
        self.pod = Some(pod.clone());
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
        let phases = match (self.is_stream, self.first_chunk) {
            (true, Some(first)) => Some((
                first.duration_since(self.started).as_secs_f64(),
                ended.duration_since(first).as_secs_f64(),
            )),
            _ => None,
        };
        let usage = usage.unwrap_or_default();
        let metrics = &self.observer.metrics;
        match &self.model {
            Some(model) => {
                if self.status == 200 && error_type == OutcomeLabel::Success.as_str() {
                    model.observe_success(self.path, total.as_secs_f64(), phases);
                } else {
                    metrics.observe_other(&Observation {
                        model: &model.name,
                        path: self.path,
                        status: self.status,
                        error_type,
                        total_seconds: total.as_secs_f64(),
                        phases,
                    });
                }
                model.add_tokens(self.path, usage.prompt_tokens, usage.completion_tokens);
                if let Some((prefill, decode)) = phases {
                    model.ttft.observe(prefill);
                    if usage.completion_tokens > 1 {
                        model
                            .tpot
                            .observe(decode / (usage.completion_tokens - 1) as f64);
                    }
                }
                model.active_downstream.dec();
            }
            None => metrics.observe_other(&Observation {
                model: UNKNOWN_MODEL,
                path: self.path,
                status: self.status,
                error_type,
                total_seconds: total.as_secs_f64(),
                phases,
            }),
        }
        if let Some(gauge) = self.upstream_gauge.take() {
            gauge.dec();
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
            uri: self.uri.clone(),
            version: self.version,
            status: self.status,
            model_name: self.model_name.take(),
            route: self.route.take(),
            server: self.server.take(),
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
        });
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
