//! Prometheus metrics of the request path, with the Kthena router's names,
//! labels and buckets so existing dashboards and alerts work unchanged.
//!
//! Cardinality is bounded: `model` is a model name of the snapshot or
//! `unknown`, `path` one of [`PathLabel`], `error_type` one of the fixed
//! [`crate::error::ErrorKind`] codes or [`OutcomeLabel`]s, `status_code` an
//! HTTP status.
//!
//! Per-model, per-route and per-server series are created on first use, not
//! when a snapshot is applied: a route that serves no traffic adds nothing
//! to `/metrics`. Applying a snapshot ([`RouterMetrics::resolve`]) only
//! places one empty [`LazySeries`] slot per model, (route, server) pair and server
//! (carried over for those that stay), so requests find their handles with
//! one map lookup and never look labels up once a series exists; the slots
//! of whatever left the snapshot are retired, removing exactly the series
//! they created. Applying costs what the snapshot holds, never "removed
//! objects x every series".

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use prometheus::core::Collector;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};
use switchyard_runtime::clock;

use crate::fast_map::FastMap;
use crate::health::HealthMetrics;
use crate::lazy_series::LazySeries;
use crate::pod::outlier::Failure;
use crate::rate_limit::LimitType;
use crate::retired::Retired;
use crate::snapshot::{RoutingTable, SnapshotStore, TableObserver};
use crate::xds_client::ControllerStatus;

/// End-to-end, prefill and decode latency buckets (seconds), as documented for the router.
pub const REQUEST_DURATION_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Fairness queue wait buckets (seconds), as documented for the router.
pub const QUEUE_DURATION_BUCKETS: [f64; 11] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Time per output token buckets (seconds): engines produce tokens every few
/// milliseconds to a few hundred.
pub const TPOT_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0,
];

/// The `model` label of a request whose model no route serves (or that names none).
pub const UNKNOWN_MODEL: &str = "unknown";

/// `error_type` values that are not router errors ([`crate::error::ErrorKind`] codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeLabel {
    /// The engine answered 1xx-3xx and the body was delivered.
    Success,
    /// The engine answered 4xx/5xx itself; its body was passed through.
    EngineError,
    /// The engine's connection broke while the body was streamed.
    UpstreamStreamError,
    /// The client went away before the body was delivered.
    ClientDisconnected,
}

impl OutcomeLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "successful_request",
            Self::EngineError => "engine_error",
            Self::UpstreamStreamError => "upstream_stream_error",
            Self::ClientDisconnected => "client_disconnected",
        }
    }
}

/// The `path` label: the served API paths, everything else is `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathLabel {
    ChatCompletions = 0,
    Completions = 1,
    Embeddings = 2,
    Responses = 3,
    Models = 4,
    Messages = 5,
    Other = 6,
}

impl PathLabel {
    pub const ALL: [PathLabel; 7] = [
        Self::ChatCompletions,
        Self::Completions,
        Self::Embeddings,
        Self::Responses,
        Self::Models,
        Self::Messages,
        Self::Other,
    ];

    pub fn of(path: &str) -> Self {
        match path {
            "/v1/chat/completions" => Self::ChatCompletions,
            "/v1/completions" => Self::Completions,
            "/v1/embeddings" => Self::Embeddings,
            "/v1/responses" => Self::Responses,
            "/v1/models" => Self::Models,
            "/v1/messages" => Self::Messages,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
            Self::Responses => "/v1/responses",
            Self::Models => "/v1/models",
            Self::Messages => "/v1/messages",
            Self::Other => "other",
        }
    }
}

const PATHS: usize = PathLabel::ALL.len();

/// Every metric family of the dataplane.
#[derive(Debug)]
pub struct RouterMetrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub request_prefill_duration_seconds: HistogramVec,
    pub request_decode_duration_seconds: HistogramVec,
    pub active_downstream_requests: IntGaugeVec,
    pub active_upstream_requests: IntGaugeVec,
    pub tokens_total: IntCounterVec,
    /// Waiting requests per model and user (at most `maxMetricUsers` user
    /// ids per model, the rest as `other`); handles are held by the
    /// queues' user entries (`fairness/queue.rs`).
    pub fairness_queue_size: IntGaugeVec,
    /// Waits of admitted requests, per model and user (0 for those admitted
    /// at once).
    pub fairness_queue_duration_seconds: HistogramVec,
    /// Requests a token budget refused, by the budget's direction.
    pub rate_limit_exceeded_total: IntCounterVec,
    pub time_to_first_token_seconds: HistogramVec,
    pub time_per_output_token_seconds: HistogramVec,
    pub upstream_connect_errors_total: IntCounterVec,
    /// Legs sent to each role of each prefill/decode group.
    pub pd_group_requests_total: IntCounterVec,
    /// Pairs chosen: a decode pod first, then a prefill pod of its group.
    pub pd_group_routing_decisions: IntCounterVec,
    /// Prefill answers whose `kv_transfer_params` reached the decode request
    /// (or were missing, so the decode recomputed the prompt).
    pub pd_kv_transfer_params_total: IntCounterVec,
    /// Pods this dataplane ejected, by the failure that tipped them.
    pub pod_ejections_total: IntCounterVec,
    /// Requests whose rule's weighted pick had no usable pod and went to
    /// another target, by the target they left.
    pub target_failovers_total: IntCounterVec,
    pub access_log_dropped_total: IntCounter,
    /// Model-server and load-balancing health ([`crate::health`]).
    pub health: HealthMetrics,
    controller_connected: IntGauge,
    snapshot_age_seconds: Gauge,
    snapshot_info: IntGaugeVec,
    pod_active_requests: IntGaugeVec,
    pod_requests_waiting: GaugeVec,
    pod_requests_running: GaugeVec,
    pod_kv_cache_usage: GaugeVec,
    /// The families above that have a `model` label, for [`ModelMetrics`].
    model_families: Arc<ModelFamilies>,
    /// Handles of the current snapshot, read lock-free by requests.
    resolved: ArcSwap<Resolved>,
    /// Serialises snapshot applications (never taken by requests).
    resolve_lock: Mutex<()>,
    /// Replaced handles a request still read when they were replaced.
    retired: Retired<Resolved>,
    /// (name, help, type) of every family, so `/metrics` lists families that
    /// have no series yet (the Prometheus crate leaves them out).
    declared: Vec<(String, String, &'static str)>,
}

/// The handle slots of one snapshot: one per model, (route, server) pair and
/// server it serves, each filled on first use.
#[derive(Debug, Default)]
pub struct Resolved {
    models: FastMap<String, Arc<ModelMetrics>>,
    /// route key -> server key -> the series of the pair.
    upstream: FastMap<String, FastMap<String, Arc<TargetSeries>>>,
    /// server key -> `upstream_connect_errors_total` counter.
    connect_errors: FastMap<String, Arc<LazySeries<IntCounter>>>,
    /// The families of the two maps above.
    upstream_family: Option<IntGaugeVec>,
    failovers_family: Option<IntCounterVec>,
    connect_errors_family: Option<IntCounterVec>,
    /// server key -> the handles of a prefill/decode ModelServer.
    prefill_decode: FastMap<String, PdServerHandles>,
    /// Label values of the PD series above, so a later snapshot removes
    /// the series it no longer has.
    pd_series: PdSeries,
}

/// The PD metric handles of one ModelServer.
#[derive(Debug, Default)]
pub struct PdServerHandles {
    /// Per group of the server (in the table's order).
    pub groups: Vec<PdGroupHandles>,
    /// `pd_kv_transfer_params_total` outcomes `relayed` and `missing`, for
    /// connectors that relay them.
    pub kv_transfer_params: Option<[IntCounter; 2]>,
}

/// The PD metric handles of one group.
#[derive(Debug, Default)]
pub struct PdGroupHandles {
    /// `pd_group_routing_decisions{source_role="decode",target_role="prefill"}`.
    pub decisions: Option<IntCounter>,
    /// model -> `pd_group_requests_total` of roles `prefill` and `decode`.
    pub requests: FastMap<String, [IntCounter; 2]>,
}

/// Label values of the PD series of one snapshot.
#[derive(Debug, Default)]
struct PdSeries {
    /// (group_key, role, model).
    requests: HashSet<[String; 3]>,
    /// group_key.
    decisions: HashSet<String>,
    /// model_server.
    kv_transfer_params: HashSet<String>,
}

/// The series of a rule target: a (route, ModelServer) pair.
#[derive(Debug, Default)]
struct TargetSeries {
    /// `active_upstream_requests`.
    active: LazySeries<IntGauge>,
    /// `target_failovers_total`, of requests that left this target.
    failovers: LazySeries<IntCounter>,
}

impl Resolved {
    pub fn model(&self, model: &str) -> Option<&Arc<ModelMetrics>> {
        self.models.get(model)
    }

    /// The `active_upstream_requests` gauge of `route` sending to `server`.
    pub fn upstream_gauge(&self, route: &str, server: &str) -> Option<&IntGauge> {
        let family = self.upstream_family.as_ref()?;
        self.target(route, server)?
            .active
            .get_or_create(|| family.with_label_values(&[route, server]))
    }

    /// The `target_failovers_total` counter of requests of `route` that
    /// left its target `server`.
    pub fn failovers(&self, route: &str, server: &str) -> Option<&IntCounter> {
        let family = self.failovers_family.as_ref()?;
        self.target(route, server)?
            .failovers
            .get_or_create(|| family.with_label_values(&[route, server]))
    }

    fn target(&self, route: &str, server: &str) -> Option<&Arc<TargetSeries>> {
        self.upstream.get(route)?.get(server)
    }

    /// The `upstream_connect_errors_total` counter of `server`.
    pub fn connect_errors(&self, server: &str) -> Option<&IntCounter> {
        let family = self.connect_errors_family.as_ref()?;
        self.connect_errors
            .get(server)?
            .get_or_create(|| family.with_label_values(&[server]))
    }

    pub fn prefill_decode(&self, server: &str) -> Option<&PdServerHandles> {
        self.prefill_decode.get(server)
    }
}

fn histogram(
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
}

fn counter(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    IntGaugeVec::new(Opts::new(name, help), labels)
}

impl RouterMetrics {
    /// Creates every family and registers it in a new registry.
    pub fn new() -> prometheus::Result<Arc<Self>> {
        let registry = Registry::new();
        let request_labels = ["model", "path", "status_code"];
        let requests_total = counter(
            "kthena_router_requests_total",
            "Total requests processed",
            &["model", "path", "status_code", "error_type"],
        )?;
        let request_duration_seconds = histogram(
            "kthena_router_request_duration_seconds",
            "End-to-end latency (client -> response)",
            &request_labels,
            &REQUEST_DURATION_BUCKETS,
        )?;
        let request_prefill_duration_seconds = histogram(
            "kthena_router_request_prefill_duration_seconds",
            "Prefill phase: the prefill leg of prefill/decode requests; request received to the first chunk of other streamed responses",
            &request_labels,
            &REQUEST_DURATION_BUCKETS,
        )?;
        let request_decode_duration_seconds = histogram(
            "kthena_router_request_decode_duration_seconds",
            "Decode phase: the decode leg of prefill/decode requests; first chunk to the end of other streamed responses",
            &request_labels,
            &REQUEST_DURATION_BUCKETS,
        )?;
        let tokens_total = counter(
            "kthena_router_tokens_total",
            "Total tokens processed (input + output)",
            &["model", "path", "token_type"],
        )?;
        let active_downstream_requests = gauge(
            "kthena_router_active_downstream_requests",
            "Currently active client requests",
            &["model"],
        )?;
        let time_to_first_token_seconds = histogram(
            "kthena_router_time_to_first_token_seconds",
            "Router-measured time from request received to the first chunk of a streamed response",
            &["model"],
            &REQUEST_DURATION_BUCKETS,
        )?;
        let time_per_output_token_seconds = histogram(
            "kthena_router_time_per_output_token_seconds",
            "Router-measured mean time between output tokens of a streamed response",
            &["model"],
            &TPOT_BUCKETS,
        )?;
        let mut metrics = Self {
            active_upstream_requests: gauge(
                "kthena_router_active_upstream_requests",
                "Currently active requests to inference pods",
                &["model_route", "model_server"],
            )?,
            fairness_queue_size: gauge(
                "kthena_router_fairness_queue_size",
                "Current queued requests per model/user",
                &["model", "user_id"],
            )?,
            fairness_queue_duration_seconds: histogram(
                "kthena_router_fairness_queue_duration_seconds",
                "Time spent waiting in fairness/priority queue",
                &["model", "user_id"],
                &QUEUE_DURATION_BUCKETS,
            )?,
            rate_limit_exceeded_total: counter(
                "kthena_router_rate_limit_exceeded_total",
                "Requests rejected due to rate limiting",
                &["model", "limit_type", "path"],
            )?,
            upstream_connect_errors_total: counter(
                "kthena_router_upstream_connect_errors_total",
                "Connection attempts to inference pods that failed",
                &["model_server"],
            )?,
            pd_group_requests_total: counter(
                "kthena_pd_group_requests_total",
                "Requests sent to each role of each prefill/decode group (one per leg and attempt)",
                &["group_key", "role", "model"],
            )?,
            pd_group_routing_decisions: counter(
                "kthena_pd_group_routing_decisions",
                "Prefill/decode pairs tried: a decode pod chosen first (source_role), then the best prefill pod of its group (target_role)",
                &["group_key", "source_role", "target_role"],
            )?,
            pd_kv_transfer_params_total: counter(
                "kthena_router_pd_kv_transfer_params_total",
                "Prefill answers of NIXL/Mooncake pairs whose kv_transfer_params were relayed to the decode request, or were missing (the decode recomputes the prompt)",
                &["model_server", "outcome"],
            )?,
            pod_ejections_total: counter(
                "kthena_router_pod_ejections_total",
                "Pods this dataplane ejected (outlier detection), by the failure that tipped the ejection",
                &["model_server", "reason"],
            )?,
            target_failovers_total: counter(
                "kthena_router_target_failovers_total",
                "Requests whose weighted target (model_server) had no usable pod and went to another target of the rule",
                &["model_route", "model_server"],
            )?,
            access_log_dropped_total: IntCounter::new(
                "kthena_router_access_log_dropped_total",
                "Access log lines dropped because the writer fell behind",
            )?,
            controller_connected: IntGauge::new(
                "kthena_router_controller_connected",
                "1 when the snapshot stream to the controller is up",
            )?,
            snapshot_age_seconds: Gauge::new(
                "kthena_router_snapshot_age_seconds",
                "Seconds since the routing snapshot in use was applied",
            )?,
            snapshot_info: gauge(
                "kthena_router_snapshot_info",
                "Always 1; labels name the snapshot versions in use",
                &["route_config_version", "endpoint_loads_version"],
            )?,
            pod_active_requests: gauge(
                "kthena_router_pod_active_requests",
                "Requests this dataplane has in flight to each pod",
                &["pod"],
            )?,
            pod_requests_waiting: GaugeVec::new(
                Opts::new(
                    "kthena_router_pod_requests_waiting",
                    "Requests waiting in the engine of each pod, as last scraped by the controller",
                ),
                &["pod"],
            )?,
            pod_requests_running: GaugeVec::new(
                Opts::new(
                    "kthena_router_pod_requests_running",
                    "Requests running in the engine of each pod, as last scraped by the controller",
                ),
                &["pod"],
            )?,
            pod_kv_cache_usage: GaugeVec::new(
                Opts::new(
                    "kthena_router_pod_kv_cache_usage",
                    "KV-cache usage (0..1) of each pod, as last scraped by the controller",
                ),
                &["pod"],
            )?,
            model_families: Arc::new(ModelFamilies {
                requests_total: requests_total.clone(),
                request_duration_seconds: request_duration_seconds.clone(),
                request_prefill_duration_seconds: request_prefill_duration_seconds.clone(),
                request_decode_duration_seconds: request_decode_duration_seconds.clone(),
                tokens_total: tokens_total.clone(),
                active_downstream_requests: active_downstream_requests.clone(),
                time_to_first_token_seconds: time_to_first_token_seconds.clone(),
                time_per_output_token_seconds: time_per_output_token_seconds.clone(),
            }),
            requests_total,
            request_duration_seconds,
            request_prefill_duration_seconds,
            request_decode_duration_seconds,
            tokens_total,
            active_downstream_requests,
            time_to_first_token_seconds,
            time_per_output_token_seconds,
            health: HealthMetrics::register(&registry)?,
            resolved: ArcSwap::from_pointee(Resolved::default()),
            resolve_lock: Mutex::new(()),
            retired: Retired::default(),
            declared: Vec::new(),
            registry,
        };
        metrics.declared = metrics.health.declared();
        // Each family and its type, registered and listed in `declared`.
        macro_rules! collectors {
            ($($field:ident: $kind:literal,)*) => {
                [$((Box::new(metrics.$field.clone()) as Box<dyn Collector>, $kind)),*]
            };
        }
        let collectors = collectors! {
            requests_total: "counter",
            request_duration_seconds: "histogram",
            request_prefill_duration_seconds: "histogram",
            request_decode_duration_seconds: "histogram",
            active_downstream_requests: "gauge",
            active_upstream_requests: "gauge",
            tokens_total: "counter",
            fairness_queue_size: "gauge",
            fairness_queue_duration_seconds: "histogram",
            rate_limit_exceeded_total: "counter",
            time_to_first_token_seconds: "histogram",
            time_per_output_token_seconds: "histogram",
            upstream_connect_errors_total: "counter",
            pd_group_requests_total: "counter",
            pd_group_routing_decisions: "counter",
            pd_kv_transfer_params_total: "counter",
            pod_ejections_total: "counter",
            target_failovers_total: "counter",
            access_log_dropped_total: "counter",
            controller_connected: "gauge",
            snapshot_age_seconds: "gauge",
            snapshot_info: "gauge",
            pod_active_requests: "gauge",
            pod_requests_waiting: "gauge",
            pod_requests_running: "gauge",
            pod_kv_cache_usage: "gauge",
        };
        for (collector, kind) in collectors {
            for desc in collector.desc() {
                metrics
                    .declared
                    .push((desc.fq_name.clone(), desc.help.clone(), kind));
            }
            metrics.registry.register(collector)?;
        }
        Ok(Arc::new(metrics))
    }

    /// The registry to add other modules' families to (e.g. the scheduler's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The handles of the current snapshot.
    pub fn resolved(&self) -> arc_swap::Guard<Arc<Resolved>> {
        self.resolved.load()
    }

    /// Places the handle slots of `table`, keeping the slots (and series)
    /// of what stays, and retires those of models, (route, server) pairs and
    /// servers that left: their series are removed. Called after every
    /// applied RouteConfig, never by requests; costs one map entry per
    /// object of the snapshot plus the series of what left.
    pub fn resolve(&self, table: &RoutingTable) {
        let _writer = self.resolve_lock.lock();
        let previous = self.resolved.load_full();
        let mut next = Resolved {
            upstream_family: Some(self.active_upstream_requests.clone()),
            failovers_family: Some(self.target_failovers_total.clone()),
            connect_errors_family: Some(self.upstream_connect_errors_total.clone()),
            ..Resolved::default()
        };
        for name in table.index.model_names() {
            let handles =
                previous.models.get(name).cloned().unwrap_or_else(|| {
                    Arc::new(ModelMetrics::new(name, self.model_families.clone()))
                });
            next.models.insert(name.to_owned(), handles);
        }
        for route in &table.routes {
            let previous_servers = previous.upstream.get(&route.key);
            let servers = next.upstream.entry(route.key.clone()).or_default();
            for rule in &route.rules {
                for server in rule.targets.servers() {
                    servers.entry(server.key.clone()).or_insert_with(|| {
                        previous_servers
                            .and_then(|slots| slots.get(&server.key))
                            .cloned()
                            .unwrap_or_default()
                    });
                }
            }
        }
        for server in &table.servers {
            let slot = previous
                .connect_errors
                .get(&server.key)
                .cloned()
                .unwrap_or_default();
            next.connect_errors.insert(server.key.clone(), slot);
        }
        self.resolve_prefill_decode(table, &previous.pd_series, &mut next);
        let next = Arc::new(next);
        self.resolved.store(next.clone());
        // Retired after the swap: a request that still reads the previous
        // slots creates nothing once its slot is retired.
        for (name, model) in &previous.models {
            if !next.models.contains_key(name) {
                model.retire();
                for path in PathLabel::ALL {
                    for limit in LimitType::ALL {
                        let _ = self.rate_limit_exceeded_total.remove_label_values(&[
                            name,
                            limit.as_str(),
                            path.as_str(),
                        ]);
                    }
                }
            }
        }
        for (route, servers) in &previous.upstream {
            for (server, slot) in servers {
                if next
                    .upstream
                    .get(route)
                    .is_some_and(|s| s.contains_key(server))
                {
                    continue;
                }
                if slot.active.retire().is_some() {
                    let _ = self
                        .active_upstream_requests
                        .remove_label_values(&[route, server]);
                }
                if slot.failovers.retire().is_some() {
                    let _ = self
                        .target_failovers_total
                        .remove_label_values(&[route, server]);
                }
            }
        }
        for (server, slot) in &previous.connect_errors {
            if next.connect_errors.contains_key(server) {
                continue;
            }
            if slot.retire().is_some() {
                let _ = self
                    .upstream_connect_errors_total
                    .remove_label_values(&[server]);
            }
            for failure in Failure::ALL {
                let _ = self
                    .pod_ejections_total
                    .remove_label_values(&[server, failure.as_str()]);
            }
        }
        self.retired.retire(previous);
    }

    /// The PD handles of `table`'s prefill/decode ModelServers, for the
    /// models of the routes that target them; removes the PD series of
    /// `previous` that are gone.
    fn resolve_prefill_decode(
        &self,
        table: &RoutingTable,
        previous: &PdSeries,
        next: &mut Resolved,
    ) {
        let mut models_of: HashMap<&str, Vec<&str>> = HashMap::new();
        for route in &table.routes {
            let models = std::iter::once(route.model_name.as_str())
                .filter(|name| !name.is_empty())
                .chain(route.lora_adapters.iter().map(String::as_str));
            for model in models {
                for rule in &route.rules {
                    for server in rule.targets.servers() {
                        models_of
                            .entry(server.key.as_str())
                            .or_default()
                            .push(model);
                    }
                }
            }
        }
        let series = &mut next.pd_series;
        for server in &table.servers {
            let Some(pd) = &server.prefill_decode else {
                continue;
            };
            let models = models_of
                .get(server.key.as_str())
                .map_or(&[][..], Vec::as_slice);
            let groups = pd
                .groups
                .iter()
                .map(|group| {
                    let requests = models
                        .iter()
                        .map(|model| {
                            let handles = ["prefill", "decode"].map(|role| {
                                series.requests.insert([
                                    group.name.clone(),
                                    role.to_owned(),
                                    (*model).to_owned(),
                                ]);
                                self.pd_group_requests_total.with_label_values(&[
                                    &group.name,
                                    role,
                                    model,
                                ])
                            });
                            ((*model).to_owned(), handles)
                        })
                        .collect();
                    series.decisions.insert(group.name.clone());
                    PdGroupHandles {
                        decisions: Some(self.pd_group_routing_decisions.with_label_values(&[
                            &group.name,
                            "decode",
                            "prefill",
                        ])),
                        requests,
                    }
                })
                .collect();
            let kv_transfer_params = pd.connector.relays_kv_transfer_params().then(|| {
                series.kv_transfer_params.insert(server.key.clone());
                ["relayed", "missing"].map(|outcome| {
                    self.pd_kv_transfer_params_total
                        .with_label_values(&[&server.key, outcome])
                })
            });
            next.prefill_decode.insert(
                server.key.clone(),
                PdServerHandles {
                    groups,
                    kv_transfer_params,
                },
            );
        }
        for gone in previous.requests.difference(&series.requests) {
            let [group, role, model] = gone;
            let _ = self
                .pd_group_requests_total
                .remove_label_values(&[group, role, model]);
        }
        for gone in previous.decisions.difference(&series.decisions) {
            let _ = self
                .pd_group_routing_decisions
                .remove_label_values(&[gone, "decode", "prefill"]);
        }
        for gone in previous
            .kv_transfer_params
            .difference(&series.kv_transfer_params)
        {
            for outcome in ["relayed", "missing"] {
                let _ = self
                    .pd_kv_transfer_params_total
                    .remove_label_values(&[gone, outcome]);
            }
        }
    }

    /// Counts a finished request of no known model (no route, no model in
    /// the body, or a non-model path). Rare by construction, so the label
    /// lookup is acceptable here; known models count through [`ModelMetrics`].
    pub fn observe_unknown(&self, request: &Observation) {
        observe_other(&self.model_families, UNKNOWN_MODEL, request);
    }

    /// Refreshes the gauges that describe the snapshot in use; called when
    /// `/metrics` is scraped, so gone pods disappear with the next scrape.
    pub fn refresh_state(&self, store: &SnapshotStore, controller: &ControllerStatus) {
        self.controller_connected
            .set(i64::from(controller.connected()));
        let table = store.table();
        self.snapshot_age_seconds.set(
            table
                .as_ref()
                .and_then(|t| clock::wall_now().duration_since(t.applied_at).ok())
                .map_or(0.0, |age| age.as_secs_f64()),
        );
        self.snapshot_info.reset();
        self.pod_active_requests.reset();
        self.pod_requests_waiting.reset();
        self.pod_requests_running.reset();
        self.pod_kv_cache_usage.reset();
        let Some(table) = table else {
            return;
        };
        let loads_version = store.loads_version().unwrap_or_default();
        self.snapshot_info
            .with_label_values(&[&table.version, &loads_version])
            .set(1);
        for (key, pod) in &table.pods {
            self.pod_active_requests
                .with_label_values(&[key])
                .set(i64::try_from(pod.in_flight()).unwrap_or(i64::MAX));
            if let Some(load) = pod.load() {
                self.pod_requests_waiting
                    .with_label_values(&[key])
                    .set(load.requests_waiting);
                self.pod_requests_running
                    .with_label_values(&[key])
                    .set(load.requests_running);
                self.pod_kv_cache_usage
                    .with_label_values(&[key])
                    .set(load.kv_cache_usage);
            }
        }
    }

    /// The text exposition of every family of the registry; families of
    /// this module without series yet are listed with `# HELP` and `# TYPE`
    /// only, so they can be discovered (and grepped for) before traffic.
    pub fn render(&self) -> Result<Vec<u8>, prometheus::Error> {
        use prometheus::Encoder;
        use std::io::Write as _;
        let families = self.registry.gather();
        let mut buffer = Vec::new();
        prometheus::TextEncoder::new().encode(&families, &mut buffer)?;
        for (name, help, kind) in &self.declared {
            if !families.iter().any(|family| family.name() == name) {
                let _ = writeln!(buffer, "# HELP {name} {help}\n# TYPE {name} {kind}");
            }
        }
        Ok(buffer)
    }
}

/// Seconds of a request's prefill and decode phases, when it has them: the
/// two legs of a prefill/decode pair, or a stream's arrival to its first
/// chunk and the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases {
    pub prefill: Option<f64>,
    pub decode: Option<f64>,
}

/// A finished request outside the success series: an error, a non-200
/// status, or a request of no known model.
#[derive(Debug)]
pub struct Observation {
    pub path: PathLabel,
    pub status: u16,
    pub error_type: &'static str,
    pub total_seconds: f64,
    pub phases: Phases,
}

/// The families that have a `model` label, shared by every model's handles.
#[derive(Debug)]
struct ModelFamilies {
    requests_total: IntCounterVec,
    request_duration_seconds: HistogramVec,
    request_prefill_duration_seconds: HistogramVec,
    request_decode_duration_seconds: HistogramVec,
    tokens_total: IntCounterVec,
    active_downstream_requests: IntGaugeVec,
    time_to_first_token_seconds: HistogramVec,
    time_per_output_token_seconds: HistogramVec,
}

/// Counts `request` of `model` with a label lookup per family.
fn observe_other(families: &ModelFamilies, model: &str, request: &Observation) {
    let status = request.status.to_string();
    let labels = [model, request.path.as_str(), status.as_str()];
    families
        .requests_total
        .with_label_values(&[labels[0], labels[1], labels[2], request.error_type])
        .inc();
    families
        .request_duration_seconds
        .with_label_values(&labels)
        .observe(request.total_seconds);
    if let Some(prefill) = request.phases.prefill {
        families
            .request_prefill_duration_seconds
            .with_label_values(&labels)
            .observe(prefill);
    }
    if let Some(decode) = request.phases.decode {
        families
            .request_decode_duration_seconds
            .with_label_values(&labels)
            .observe(decode);
    }
}

/// The success-path series of one model on one path.
#[derive(Debug)]
struct PathSeries {
    ok_requests: IntCounter,
    ok_duration: Histogram,
    input_tokens: IntCounter,
    output_tokens: IntCounter,
}

/// The streamed-response series of one model.
#[derive(Debug)]
struct StreamSeries {
    ttft: Histogram,
    tpot: Histogram,
}

/// The labels of a series counted by `observe_other`: (path, status, error_type).
type OtherSeries = (PathLabel, u16, &'static str);

/// One model's series, each group created on first use (a model served on
/// one path creates that path's series only; prefill, decode, TTFT and TPOT
/// only once it streams) and removed when the model leaves the snapshot.
#[derive(Debug)]
pub struct ModelMetrics {
    /// The `model` label value.
    pub name: String,
    families: Arc<ModelFamilies>,
    paths: [LazySeries<PathSeries>; PATHS],
    /// (prefill, decode) of 200 responses, per path.
    phases: [LazySeries<(Histogram, Histogram)>; PATHS],
    active_downstream: LazySeries<IntGauge>,
    streams: LazySeries<StreamSeries>,
    /// (path, status, error_type) of every series [`Self::observe_other`]
    /// created; `None` once retired.
    others: Mutex<Option<HashSet<OtherSeries>>>,
}

impl ModelMetrics {
    fn new(name: &str, families: Arc<ModelFamilies>) -> Self {
        Self {
            name: name.to_owned(),
            families,
            paths: Default::default(),
            phases: Default::default(),
            active_downstream: LazySeries::default(),
            streams: LazySeries::default(),
            others: Mutex::new(Some(HashSet::new())),
        }
    }

    fn path(&self, path: PathLabel) -> Option<&PathSeries> {
        self.paths[path as usize].get_or_create(|| {
            let f = &self.families;
            let (model, path) = (self.name.as_str(), path.as_str());
            PathSeries {
                ok_requests: f.requests_total.with_label_values(&[
                    model,
                    path,
                    "200",
                    OutcomeLabel::Success.as_str(),
                ]),
                ok_duration: f
                    .request_duration_seconds
                    .with_label_values(&[model, path, "200"]),
                input_tokens: f.tokens_total.with_label_values(&[model, path, "input"]),
                output_tokens: f.tokens_total.with_label_values(&[model, path, "output"]),
            }
        })
    }

    /// A 200 response delivered in full.
    pub fn observe_success(&self, path: PathLabel, total: f64, phases: Phases) {
        if let Some(series) = self.path(path) {
            series.ok_requests.inc();
            series.ok_duration.observe(total);
        }
        if phases == Phases::default() {
            return;
        }
        let created = self.phases[path as usize].get_or_create(|| {
            let labels = [self.name.as_str(), path.as_str(), "200"];
            (
                self.families
                    .request_prefill_duration_seconds
                    .with_label_values(&labels),
                self.families
                    .request_decode_duration_seconds
                    .with_label_values(&labels),
            )
        });
        if let Some((prefill_histogram, decode_histogram)) = created {
            if let Some(prefill) = phases.prefill {
                prefill_histogram.observe(prefill);
            }
            if let Some(decode) = phases.decode {
                decode_histogram.observe(decode);
            }
        }
    }

    /// A finished request outside the success series (an error, or a
    /// status other than 200). Rare by construction: the label lookup is
    /// acceptable here, and the label set is remembered for removal.
    pub fn observe_other(&self, request: &Observation) {
        {
            let mut others = self.others.lock();
            let Some(others) = others.as_mut() else {
                return;
            };
            others.insert((request.path, request.status, request.error_type));
        }
        observe_other(&self.families, &self.name, request);
    }

    pub fn add_tokens(&self, path: PathLabel, input: u64, output: u64) {
        if let Some(series) = self.path(path) {
            series.input_tokens.inc_by(input);
            series.output_tokens.inc_by(output);
        }
    }

    /// `kthena_router_active_downstream_requests` of the model.
    pub fn active_downstream(&self) -> Option<&IntGauge> {
        self.active_downstream.get_or_create(|| {
            self.families
                .active_downstream_requests
                .with_label_values(&[&self.name])
        })
    }

    /// Router-measured time to first token and, with `tokens` > 1, time per
    /// output token of a streamed response.
    pub fn observe_stream(&self, ttft: f64, decode: f64, tokens: u64) {
        let created = self.streams.get_or_create(|| StreamSeries {
            ttft: self
                .families
                .time_to_first_token_seconds
                .with_label_values(&[&self.name]),
            tpot: self
                .families
                .time_per_output_token_seconds
                .with_label_values(&[&self.name]),
        });
        if let Some(series) = created {
            series.ttft.observe(ttft);
            if tokens > 1 {
                series.tpot.observe(decode / (tokens - 1) as f64);
            }
        }
    }

    /// The model left the snapshot: removes every series it created (and
    /// only those), and creates none from now on.
    fn retire(&self) {
        let f = &self.families;
        let model = self.name.as_str();
        let remove_phases = |labels: &[&str; 3]| {
            let _ = f
                .request_prefill_duration_seconds
                .remove_label_values(labels);
            let _ = f
                .request_decode_duration_seconds
                .remove_label_values(labels);
        };
        for path in PathLabel::ALL {
            let p = path.as_str();
            if self.paths[path as usize].retire().is_some() {
                let _ = f.requests_total.remove_label_values(&[
                    model,
                    p,
                    "200",
                    OutcomeLabel::Success.as_str(),
                ]);
                let _ = f
                    .request_duration_seconds
                    .remove_label_values(&[model, p, "200"]);
                for kind in ["input", "output"] {
                    let _ = f.tokens_total.remove_label_values(&[model, p, kind]);
                }
            }
            if self.phases[path as usize].retire().is_some() {
                remove_phases(&[model, p, "200"]);
            }
        }
        let others = self.others.lock().take().unwrap_or_default();
        for (path, status, error_type) in others {
            let status = status.to_string();
            let labels = [model, path.as_str(), status.as_str()];
            let _ = f
                .requests_total
                .remove_label_values(&[labels[0], labels[1], labels[2], error_type]);
            let _ = f.request_duration_seconds.remove_label_values(&labels);
            remove_phases(&labels);
        }
        if self.active_downstream.retire().is_some() {
            let _ = f.active_downstream_requests.remove_label_values(&[model]);
        }
        if self.streams.retire().is_some() {
            let _ = f.time_to_first_token_seconds.remove_label_values(&[model]);
            let _ = f
                .time_per_output_token_seconds
                .remove_label_values(&[model]);
        }
    }
}

/// The store resolves the handles of every table it applies, so requests
/// never look labels up.
impl TableObserver for RouterMetrics {
    fn before_visible(&self, table: &RoutingTable) {
        self.resolve(table);
        self.health.resolve(table);
    }

    /// Frees replaced handles no request reads any more.
    fn reclaim(&self) {
        self.retired.reclaim();
        self.health.reclaim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_snapshot::pb;
    use switchyard_snapshot::test_builders::{route, route_config, server};

    fn value(metrics: &RouterMetrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metrics
            .registry()
            .gather()
            .into_iter()
            .find(|f| f.name() == name)
            .and_then(|family| {
                family.get_metric().iter().find_map(|m| {
                    let matches = labels.iter().all(|(k, v)| {
                        m.get_label()
                            .iter()
                            .any(|l| l.name() == *k && l.value() == *v)
                    });
                    matches.then(|| match family.get_field_type() {
                        prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
                        prometheus::proto::MetricType::GAUGE => m.get_gauge().get_value(),
                        _ => m.get_histogram().get_sample_count() as f64,
                    })
                })
            })
    }

    fn table(models: &[&str]) -> RoutingTable {
        RoutingTable::standalone("v", config(models)).expect("valid table")
    }

    fn config(models: &[&str]) -> pb::RouteConfig {
        route_config(
            models
                .iter()
                .map(|model| route(&format!("{model}-route"), model, &format!("{model}-server")))
                .collect(),
            models
                .iter()
                .map(|model| {
                    let pod = format!("{model}-pod");
                    server(&format!("{model}-server"), &[(&pod, "127.0.0.1")])
                })
                .collect(),
        )
    }

    /// Every series of `metrics` with `label` = `value`.
    fn series_with(metrics: &RouterMetrics, label: &str, value: &str) -> usize {
        metrics
            .registry()
            .gather()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == label && l.value() == value)
            })
            .count()
    }

    /// Series with labels (the unlabelled ones always exist).
    fn labelled_series(metrics: &RouterMetrics) -> usize {
        metrics
            .registry()
            .gather()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter(|m| !m.get_label().is_empty())
            .count()
    }

    #[test]
    fn series_are_created_on_first_use_and_removed_with_their_model() {
        let metrics = RouterMetrics::new().expect("metrics");
        metrics.resolve(&table(&["m", "keep", "idle"]));
        assert_eq!(
            labelled_series(&metrics),
            0,
            "applying a snapshot creates no series"
        );
        let resolved = metrics.resolved();
        let model = resolved.model("m").expect("model m resolved");
        model.observe_success(
            PathLabel::Completions,
            0.2,
            Phases {
                prefill: Some(0.1),
                decode: Some(0.1),
            },
        );
        model.add_tokens(PathLabel::Completions, 3, 5);
        model.observe_stream(0.1, 0.1, 5);
        model.active_downstream().expect("not retired").inc();
        resolved
            .upstream_gauge("default/m-route", "default/m-server")
            .expect("upstream gauge")
            .inc();
        resolved
            .connect_errors("default/m-server")
            .expect("connect errors")
            .inc();
        model.observe_other(&Observation {
            path: PathLabel::Completions,
            status: 503,
            error_type: "no_ready_pod",
            total_seconds: 0.01,
            phases: Phases::default(),
        });
        let keep = resolved.model("keep").expect("model keep resolved");
        keep.observe_success(PathLabel::ChatCompletions, 0.2, Phases::default());
        let labels = [
            ("model", "m"),
            ("path", "/v1/completions"),
            ("status_code", "200"),
        ];
        assert_eq!(
            value(&metrics, "kthena_router_requests_total", &labels),
            Some(1.0)
        );
        assert_eq!(
            value(
                &metrics,
                "kthena_router_tokens_total",
                &[
                    ("model", "m"),
                    ("path", "/v1/completions"),
                    ("token_type", "output")
                ]
            ),
            Some(5.0)
        );
        assert_eq!(
            value(
                &metrics,
                "kthena_router_requests_total",
                &[("error_type", "no_ready_pod")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &metrics,
                "kthena_router_active_upstream_requests",
                &[("model_route", "default/m-route")]
            ),
            Some(1.0)
        );
        assert_eq!(
            series_with(&metrics, "model", "idle"),
            0,
            "an idle model has no series"
        );
        assert_eq!(
            series_with(&metrics, "model", "keep"),
            4,
            "one path, not streamed: requests, duration, input and output tokens"
        );

        metrics.resolve(&table(&["keep"]));
        assert_eq!(
            series_with(&metrics, "model", "m"),
            0,
            "every series of m is gone"
        );
        assert_eq!(series_with(&metrics, "model_route", "default/m-route"), 0);
        assert_eq!(series_with(&metrics, "model_server", "default/m-server"), 0);
        assert_eq!(series_with(&metrics, "model", "keep"), 4, "keep's stay");
        assert!(metrics.resolved().model("m").is_none());
        // A request that still holds m's handles records nothing more.
        model.observe_success(PathLabel::Embeddings, 0.1, Phases::default());
        model.observe_other(&Observation {
            path: PathLabel::Embeddings,
            status: 502,
            error_type: "upstream_failed",
            total_seconds: 0.01,
            phases: Phases::default(),
        });
        // The request in flight releases the gauge it took, detached from /metrics.
        model
            .active_downstream()
            .expect("created before the model left")
            .dec();
        assert_eq!(
            series_with(&metrics, "model", "m"),
            0,
            "retired handles create nothing"
        );
    }

    #[test]
    fn the_store_resolves_handles_when_it_applies_a_table_and_reclaims_the_replaced() {
        let metrics = RouterMetrics::new().expect("metrics");
        let store = SnapshotStore::new().with_table_observer(metrics.clone());
        store
            .apply_route_config("v1", config(&["m"]))
            .expect("valid");
        // A request in flight holds the handles of v1 across the next apply.
        let held: Arc<Resolved> = Arc::clone(&metrics.resolved());
        assert!(
            held.model("m").is_some(),
            "resolved by the apply, not by a request"
        );
        let replaced = Arc::downgrade(&held);
        store
            .apply_route_config("v2", config(&["n"]))
            .expect("valid");
        assert!(metrics.resolved().model("n").is_some());
        drop(held);
        let kept_until_reclaim = replaced.upgrade().is_some();
        store.reclaim();
        assert!(
            kept_until_reclaim && replaced.upgrade().is_none(),
            "the replaced handles are kept until the store's reclaim frees them"
        );
    }

    #[test]
    fn removing_many_models_costs_their_own_series_only() {
        let metrics = RouterMetrics::new().expect("metrics");
        let names: Vec<String> = (0..2_000).map(|i| format!("model-{i}")).collect();
        let all: Vec<&str> = names.iter().map(String::as_str).collect();
        metrics.resolve(&table(&all));
        for name in &all[..10] {
            let model = metrics.resolved().model(name).cloned().expect("resolved");
            model.observe_success(PathLabel::ChatCompletions, 0.1, Phases::default());
        }
        metrics.resolve(&table(&all[..1]));
        assert_eq!(
            labelled_series(&metrics),
            series_with(&metrics, "model", "model-0"),
            "only the one model left has series"
        );
        assert_eq!(metrics.resolved().models.len(), 1);
    }

    #[test]
    fn path_labels_are_bounded() {
        assert_eq!(
            PathLabel::of("/v1/chat/completions").as_str(),
            "/v1/chat/completions"
        );
        assert_eq!(PathLabel::of("/v1/anything").as_str(), "other");
        assert_eq!(PathLabel::of("/admin").as_str(), "other");
    }
}
