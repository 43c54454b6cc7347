//! Prometheus metrics of the request path, with the Kthena router's names,
//! labels and buckets so existing dashboards and alerts work unchanged.
//!
//! Cardinality is bounded: `model` is a model name of the snapshot or
//! `unknown`, `path` one of [`PathLabel`], `error_type` one of the fixed
//! [`crate::error::ErrorKind`] codes or [`OutcomeLabel`]s, `status_code` an
//! HTTP status. The handles the success path needs are resolved once per
//! snapshot ([`RouterMetrics::resolve`]); series of models, routes, servers
//! and pods that leave the snapshot are removed.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};
use switchyard_runtime::clock;
use switchyard_snapshot::{Nack, pb};

use crate::health::HealthMetrics;
use crate::snapshot::{RoutingTable, SnapshotStore};
use crate::xds_client::{ControllerStatus, SnapshotSink};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathLabel {
    ChatCompletions = 0,
    Completions = 1,
    Embeddings = 2,
    Responses = 3,
    Models = 4,
    Other = 5,
}

impl PathLabel {
    pub const ALL: [PathLabel; 6] = [
        Self::ChatCompletions,
        Self::Completions,
        Self::Embeddings,
        Self::Responses,
        Self::Models,
        Self::Other,
    ];

    pub fn of(path: &str) -> Self {
        match path {
            "/v1/chat/completions" => Self::ChatCompletions,
            "/v1/completions" => Self::Completions,
            "/v1/embeddings" => Self::Embeddings,
            "/v1/responses" => Self::Responses,
            "/v1/models" => Self::Models,
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
    /// Handles of the current snapshot, read lock-free by requests.
    resolved: ArcSwap<Resolved>,
    /// Serialises snapshot applications (never taken by requests).
    resolve_lock: Mutex<()>,
    /// (name, help, type) of every family, so `/metrics` lists families that
    /// have no series yet (the Prometheus crate leaves them out).
    declared: Vec<(String, String, &'static str)>,
}

/// The handles of one snapshot.
#[derive(Debug, Default)]
pub struct Resolved {
    models: HashMap<String, Arc<ModelMetrics>>,
    /// route key -> server key -> `active_upstream_requests` gauge.
    upstream: HashMap<String, HashMap<String, IntGauge>>,
    /// server key -> `upstream_connect_errors_total` counter.
    connect_errors: HashMap<String, IntCounter>,
    /// server key -> the handles of a prefill/decode ModelServer.
    prefill_decode: HashMap<String, PdServerHandles>,
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
    pub requests: HashMap<String, [IntCounter; 2]>,
}

/// Label values of the PD series of one snapshot.
#[derive(Debug, Default)]
struct PdSeries {
    /// (group_key, role, model).
    requests: std::collections::HashSet<[String; 3]>,
    /// group_key.
    decisions: std::collections::HashSet<String>,
    /// model_server.
    kv_transfer_params: std::collections::HashSet<String>,
}

impl Resolved {
    pub fn model(&self, model: &str) -> Option<&Arc<ModelMetrics>> {
        self.models.get(model)
    }

    pub fn upstream_gauge(&self, route: &str, server: &str) -> Option<&IntGauge> {
        self.upstream
            .get(route)
            .and_then(|servers| servers.get(server))
    }

    pub fn connect_errors(&self, server: &str) -> Option<&IntCounter> {
        self.connect_errors.get(server)
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

/// Removes every series of `vec` whose `label` is `value`.
fn remove_where<T: MetricVecBuilder>(vec: &MetricVec<T>, label: &str, value: &str) {
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|pair| (pair.name(), pair.value()))
                .collect();
            if labels.get(label) == Some(&value) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

impl RouterMetrics {
    /// Creates every family and registers it in a new registry.
    pub fn new() -> prometheus::Result<Arc<Self>> {
        let registry = Registry::new();
        let request_labels = ["model", "path", "status_code"];
        let mut metrics = Self {
            requests_total: counter(
                "kthena_router_requests_total",
                "Total requests processed",
                &["model", "path", "status_code", "error_type"],
            )?,
            request_duration_seconds: histogram(
                "kthena_router_request_duration_seconds",
                "End-to-end latency (client -> response)",
                &request_labels,
                &REQUEST_DURATION_BUCKETS,
            )?,
            request_prefill_duration_seconds: histogram(
                "kthena_router_request_prefill_duration_seconds",
                "Prefill phase: the prefill leg of prefill/decode requests; request received to the first chunk of other streamed responses",
                &request_labels,
                &REQUEST_DURATION_BUCKETS,
            )?,
            request_decode_duration_seconds: histogram(
                "kthena_router_request_decode_duration_seconds",
                "Decode phase: the decode leg of prefill/decode requests; first chunk to the end of other streamed responses",
                &request_labels,
                &REQUEST_DURATION_BUCKETS,
            )?,
            active_downstream_requests: gauge(
                "kthena_router_active_downstream_requests",
                "Currently active client requests",
                &["model"],
            )?,
            active_upstream_requests: gauge(
                "kthena_router_active_upstream_requests",
                "Currently active requests to inference pods",
                &["model_route", "model_server"],
            )?,
            tokens_total: counter(
                "kthena_router_tokens_total",
                "Total tokens processed (input + output)",
                &["model", "path", "token_type"],
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
            time_to_first_token_seconds: histogram(
                "kthena_router_time_to_first_token_seconds",
                "Router-measured time from request received to the first chunk of a streamed response",
                &["model"],
                &REQUEST_DURATION_BUCKETS,
            )?,
            time_per_output_token_seconds: histogram(
                "kthena_router_time_per_output_token_seconds",
                "Router-measured mean time between output tokens of a streamed response",
                &["model"],
                &TPOT_BUCKETS,
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
            health: HealthMetrics::register(&registry)?,
            resolved: ArcSwap::from_pointee(Resolved::default()),
            resolve_lock: Mutex::new(()),
            declared: Vec::new(),
            registry,
        };
        metrics.declared = metrics.health.declared();
        let (counter, gauge, histogram) = ("counter", "gauge", "histogram");
        let collectors: Vec<(Box<dyn Collector>, &'static str)> = vec![
            (Box::new(metrics.requests_total.clone()), counter),
            (
                Box::new(metrics.request_duration_seconds.clone()),
                histogram,
            ),
            (
                Box::new(metrics.request_prefill_duration_seconds.clone()),
                histogram,
            ),
            (
                Box::new(metrics.request_decode_duration_seconds.clone()),
                histogram,
            ),
            (Box::new(metrics.active_downstream_requests.clone()), gauge),
            (Box::new(metrics.active_upstream_requests.clone()), gauge),
            (Box::new(metrics.tokens_total.clone()), counter),
            (Box::new(metrics.fairness_queue_size.clone()), gauge),
            (
                Box::new(metrics.fairness_queue_duration_seconds.clone()),
                histogram,
            ),
            (Box::new(metrics.rate_limit_exceeded_total.clone()), counter),
            (
                Box::new(metrics.time_to_first_token_seconds.clone()),
                histogram,
            ),
            (
                Box::new(metrics.time_per_output_token_seconds.clone()),
                histogram,
            ),
            (
                Box::new(metrics.upstream_connect_errors_total.clone()),
                counter,
            ),
            (Box::new(metrics.pd_group_requests_total.clone()), counter),
            (
                Box::new(metrics.pd_group_routing_decisions.clone()),
                counter,
            ),
            (
                Box::new(metrics.pd_kv_transfer_params_total.clone()),
                counter,
            ),
            (Box::new(metrics.access_log_dropped_total.clone()), counter),
            (Box::new(metrics.controller_connected.clone()), gauge),
            (Box::new(metrics.snapshot_age_seconds.clone()), gauge),
            (Box::new(metrics.snapshot_info.clone()), gauge),
            (Box::new(metrics.pod_active_requests.clone()), gauge),
            (Box::new(metrics.pod_requests_waiting.clone()), gauge),
            (Box::new(metrics.pod_requests_running.clone()), gauge),
            (Box::new(metrics.pod_kv_cache_usage.clone()), gauge),
        ];
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

    /// Resolves the handles of `table` and removes the series of models,
    /// (route, server) pairs and servers that are no longer in it. Called
    /// after every applied RouteConfig, never by requests.
    pub fn resolve(&self, table: &RoutingTable) {
        let _writer = self.resolve_lock.lock();
        let previous = self.resolved.load_full();
        let mut next = Resolved::default();
        for name in table.index.model_names() {
            let handles = previous
                .models
                .get(name)
                .cloned()
                .unwrap_or_else(|| Arc::new(self.model(name)));
            next.models.insert(name.to_owned(), handles);
        }
        for route in &table.routes {
            let servers = next.upstream.entry(route.key.clone()).or_default();
            for rule in &route.rules {
                for server in rule.targets.servers() {
                    servers.entry(server.key.clone()).or_insert_with(|| {
                        self.active_upstream_requests
                            .with_label_values(&[&route.key, &server.key])
                    });
                }
            }
        }
        for server in &table.servers {
            next.connect_errors.insert(
                server.key.clone(),
                self.upstream_connect_errors_total
                    .with_label_values(&[&server.key]),
            );
        }
        self.resolve_prefill_decode(table, &previous.pd_series, &mut next);
        for gone in previous
            .models
            .keys()
            .filter(|m| !next.models.contains_key(*m))
        {
            self.remove_model(gone);
        }
        for (route, servers) in &previous.upstream {
            for server in servers.keys() {
                if next.upstream_gauge(route, server).is_none() {
                    let _ = self
                        .active_upstream_requests
                        .remove_label_values(&[route, server]);
                }
            }
        }
        for server in previous.connect_errors.keys() {
            if !next.connect_errors.contains_key(server) {
                let _ = self
                    .upstream_connect_errors_total
                    .remove_label_values(&[server]);
            }
        }
        self.resolved.store(Arc::new(next));
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

    /// Resolves the success-path handles of one model.
    fn model(&self, model: &str) -> ModelMetrics {
        let ok = |vec: &HistogramVec| {
            PathLabel::ALL.map(|path| vec.with_label_values(&[model, path.as_str(), "200"]))
        };
        let tokens = |kind: &str| {
            PathLabel::ALL.map(|path| {
                self.tokens_total
                    .with_label_values(&[model, path.as_str(), kind])
            })
        };
        ModelMetrics {
            name: model.to_owned(),
            ok_requests: PathLabel::ALL.map(|path| {
                self.requests_total.with_label_values(&[
                    model,
                    path.as_str(),
                    "200",
                    OutcomeLabel::Success.as_str(),
                ])
            }),
            ok_duration: ok(&self.request_duration_seconds),
            ok_prefill: ok(&self.request_prefill_duration_seconds),
            ok_decode: ok(&self.request_decode_duration_seconds),
            input_tokens: tokens("input"),
            output_tokens: tokens("output"),
            active_downstream: self.active_downstream_requests.with_label_values(&[model]),
            ttft: self.time_to_first_token_seconds.with_label_values(&[model]),
            tpot: self
                .time_per_output_token_seconds
                .with_label_values(&[model]),
        }
    }

    fn remove_model(&self, model: &str) {
        remove_where(&self.requests_total, "model", model);
        remove_where(&self.request_duration_seconds, "model", model);
        remove_where(&self.request_prefill_duration_seconds, "model", model);
        remove_where(&self.request_decode_duration_seconds, "model", model);
        remove_where(&self.tokens_total, "model", model);
        remove_where(&self.rate_limit_exceeded_total, "model", model);
        let _ = self
            .active_downstream_requests
            .remove_label_values(&[model]);
        let _ = self
            .time_to_first_token_seconds
            .remove_label_values(&[model]);
        let _ = self
            .time_per_output_token_seconds
            .remove_label_values(&[model]);
    }

    /// Counts a finished request outside the pre-resolved success series
    /// (errors, non-200 statuses, unknown models). Rare by construction, so
    /// the label lookup is acceptable here.
    pub fn observe_other(&self, request: &Observation<'_>) {
        let status = request.status.to_string();
        let labels = [request.model, request.path.as_str(), status.as_str()];
        self.requests_total
            .with_label_values(&[labels[0], labels[1], labels[2], request.error_type])
            .inc();
        self.request_duration_seconds
            .with_label_values(&labels)
            .observe(request.total_seconds);
        if let Some(prefill) = request.phases.prefill {
            self.request_prefill_duration_seconds
                .with_label_values(&labels)
                .observe(prefill);
        }
        if let Some(decode) = request.phases.decode {
            self.request_decode_duration_seconds
                .with_label_values(&labels)
                .observe(decode);
        }
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

/// What a finished request looked like, for [`RouterMetrics::observe_other`].
#[derive(Debug)]
pub struct Observation<'a> {
    pub model: &'a str,
    pub path: PathLabel,
    pub status: u16,
    pub error_type: &'a str,
    pub total_seconds: f64,
    pub phases: Phases,
}

/// Handles of one model's success-path series, resolved when a snapshot is applied.
#[derive(Debug)]
pub struct ModelMetrics {
    /// The `model` label value.
    pub name: String,
    ok_requests: [IntCounter; PATHS],
    ok_duration: [Histogram; PATHS],
    ok_prefill: [Histogram; PATHS],
    ok_decode: [Histogram; PATHS],
    input_tokens: [IntCounter; PATHS],
    output_tokens: [IntCounter; PATHS],
    pub active_downstream: IntGauge,
    pub ttft: Histogram,
    pub tpot: Histogram,
}

impl ModelMetrics {
    /// A 200 response delivered in full.
    pub fn observe_success(&self, path: PathLabel, total: f64, phases: Phases) {
        let i = path as usize;
        self.ok_requests[i].inc();
        self.ok_duration[i].observe(total);
        if let Some(prefill) = phases.prefill {
            self.ok_prefill[i].observe(prefill);
        }
        if let Some(decode) = phases.decode {
            self.ok_decode[i].observe(decode);
        }
    }

    pub fn add_tokens(&self, path: PathLabel, input: u64, output: u64) {
        let i = path as usize;
        self.input_tokens[i].inc_by(input);
        self.output_tokens[i].inc_by(output);
    }
}

/// A [`SnapshotSink`] that resolves the metric handles of every applied
/// RouteConfig, so requests never look labels up.
#[derive(Debug)]
pub struct ObservedStore {
    pub store: Arc<SnapshotStore>,
    pub metrics: Arc<RouterMetrics>,
}

impl SnapshotSink for ObservedStore {
    fn apply_route_config(&self, version: &str, config: pb::RouteConfig) -> Result<(), Nack> {
        SnapshotSink::apply_route_config(&*self.store, version, config)?;
        if let Some(table) = self.store.table() {
            self.metrics.resolve(&table);
            self.metrics.health.resolve(&table);
        }
        Ok(())
    }

    fn apply_endpoint_loads(&self, version: &str, loads: pb::EndpointLoads) -> Result<(), Nack> {
        SnapshotSink::apply_endpoint_loads(&*self.store, version, loads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let config = route_config(
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
        );
        RoutingTable::build(
            "v",
            config,
            &HashMap::new(),
            &Arc::default(),
            &Default::default(),
            &Default::default(),
        )
        .expect("valid table")
    }

    #[test]
    fn success_series_resolved_per_snapshot_and_removed_with_their_model() {
        let metrics = RouterMetrics::new().expect("metrics");
        metrics.resolve(&table(&["m", "keep"]));
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
        resolved
            .upstream_gauge("default/m-route", "default/m-server")
            .expect("upstream gauge")
            .inc();
        metrics.observe_other(&Observation {
            model: "m",
            path: PathLabel::Completions,
            status: 503,
            error_type: "no_ready_pod",
            total_seconds: 0.01,
            phases: Phases::default(),
        });
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

        metrics.resolve(&table(&["keep"]));
        for family in [
            "kthena_router_requests_total",
            "kthena_router_tokens_total",
            "kthena_router_request_duration_seconds",
            "kthena_router_active_downstream_requests",
        ] {
            assert_eq!(value(&metrics, family, &[("model", "m")]), None, "{family}");
            assert!(
                value(&metrics, family, &[("model", "keep")]).is_some(),
                "{family}"
            );
        }
        assert_eq!(
            value(
                &metrics,
                "kthena_router_active_upstream_requests",
                &[("model_route", "default/m-route")]
            ),
            None
        );
        assert_eq!(
            value(
                &metrics,
                "kthena_router_upstream_connect_errors_total",
                &[("model_server", "default/m-server")]
            ),
            None
        );
        assert!(metrics.resolved().model("m").is_none());
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
