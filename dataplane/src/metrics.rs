//! Prometheus metrics of the request path, with the Kthena router's names,
//! labels and buckets so existing dashboards and alerts work unchanged.
//!
//! Cardinality is bounded: `model` is a model name of the snapshot or
//! `unknown`, `path` one of [`PathLabel`], `error_type` one of the fixed error
//! codes. The handles the success path needs are resolved once per snapshot
//! ([`ModelMetrics`]); series of models, routes and servers that leave the
//! snapshot are removed.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// End-to-end, prefill and decode latency buckets (seconds), as documented for the router.
pub const REQUEST_DURATION_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Scheduler plugin buckets (seconds), as documented for the router.
pub const PLUGIN_DURATION_BUCKETS: [f64; 6] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5];
/// Fairness queue wait buckets (seconds), as documented for the router.
pub const QUEUE_DURATION_BUCKETS: [f64; 11] =
    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Time per output token buckets (seconds): engines produce tokens every few
/// milliseconds to a few hundred.
pub const TPOT_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0,
];

/// The `model` label of a request whose model no route serves.
pub const UNKNOWN_MODEL: &str = "unknown";
/// The `error_type` of a request that succeeded.
pub const SUCCESS: &str = "successful_request";

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

/// Every metric family of the request path.
#[derive(Debug)]
pub struct RouterMetrics {
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub request_prefill_duration_seconds: HistogramVec,
    pub request_decode_duration_seconds: HistogramVec,
    pub active_downstream_requests: IntGaugeVec,
    pub active_upstream_requests: IntGaugeVec,
    pub tokens_total: IntCounterVec,
    pub scheduler_plugin_duration_seconds: HistogramVec,
    pub fairness_queue_size: IntGaugeVec,
    pub fairness_queue_duration_seconds: HistogramVec,
    pub rate_limit_exceeded_total: IntCounterVec,
    pub time_to_first_token_seconds: HistogramVec,
    pub time_per_output_token_seconds: HistogramVec,
    pub upstream_connect_errors_total: IntCounterVec,
    /// Label sets created outside of snapshot application (error series),
    /// remembered so they can be removed with their model.
    lazily_created: Mutex<HashSet<Vec<String>>>,
    /// Models and (route, server) pairs the current snapshot has series for.
    resolved: Mutex<Resolved>,
}

#[derive(Debug, Default)]
struct Resolved {
    models: HashSet<String>,
    upstream_pairs: HashSet<(String, String)>,
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> prometheus::Result<HistogramVec> {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
}

impl RouterMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Arc<Self>> {
        let request_labels = ["model", "path", "status_code"];
        let metrics = Self {
            requests_total: IntCounterVec::new(
                Opts::new("kthena_router_requests_total", "Total requests processed"),
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
                "Prefill phase duration: request received to first response byte",
                &request_labels,
                &REQUEST_DURATION_BUCKETS,
            )?,
            request_decode_duration_seconds: histogram(
                "kthena_router_request_decode_duration_seconds",
                "Decode phase duration: first response byte to the end of the response",
                &request_labels,
                &REQUEST_DURATION_BUCKETS,
            )?,
            active_downstream_requests: IntGaugeVec::new(
                Opts::new("kthena_router_active_downstream_requests", "Currently active client requests"),
                &["model"],
            )?,
            active_upstream_requests: IntGaugeVec::new(
                Opts::new("kthena_router_active_upstream_requests", "Currently active requests to inference pods"),
                &["model_route", "model_server"],
            )?,
            tokens_total: IntCounterVec::new(
                Opts::new("kthena_router_tokens_total", "Total tokens processed (input + output)"),
                &["model", "path", "token_type"],
            )?,
            scheduler_plugin_duration_seconds: histogram(
                "kthena_router_scheduler_plugin_duration_seconds",
                "Execution time per scheduler plugin",
                &["model", "plugin", "type"],
                &PLUGIN_DURATION_BUCKETS,
            )?,
            fairness_queue_size: IntGaugeVec::new(
                Opts::new("kthena_router_fairness_queue_size", "Current queued requests per model/user"),
                &["model", "user_id"],
            )?,
            fairness_queue_duration_seconds: histogram(
                "kthena_router_fairness_queue_duration_seconds",
                "Time spent waiting in fairness/priority queue",
                &["model", "user_id"],
                &QUEUE_DURATION_BUCKETS,
            )?,
            rate_limit_exceeded_total: IntCounterVec::new(
                Opts::new("kthena_router_rate_limit_exceeded_total", "Requests rejected due to rate limiting"),
                &["model", "limit_type", "path"],
            )?,
            time_to_first_token_seconds: histogram(
                "kthena_router_time_to_first_token_seconds",
                "Router-measured time from request received to the first streamed token",
                &["model"],
                &REQUEST_DURATION_BUCKETS,
            )?,
            time_per_output_token_seconds: histogram(
                "kthena_router_time_per_output_token_seconds",
                "Router-measured mean time between output tokens of a streamed response",
                &["model"],
                &TPOT_BUCKETS,
            )?,
            upstream_connect_errors_total: IntCounterVec::new(
                Opts::new(
                    "kthena_router_upstream_connect_errors_total",
                    "Connections to inference pods that failed",
                ),
                &["model_server"],
            )?,
            lazily_created: Mutex::new(HashSet::new()),
            resolved: Mutex::new(Resolved::default()),
        };
        registry.register(Box::new(metrics.requests_total.clone()))?;
        registry.register(Box::new(metrics.request_duration_seconds.clone()))?;
        registry.register(Box::new(metrics.request_prefill_duration_seconds.clone()))?;
        registry.register(Box::new(metrics.request_decode_duration_seconds.clone()))?;
        registry.register(Box::new(metrics.active_downstream_requests.clone()))?;
        registry.register(Box::new(metrics.active_upstream_requests.clone()))?;
        registry.register(Box::new(metrics.tokens_total.clone()))?;
        registry.register(Box::new(metrics.scheduler_plugin_duration_seconds.clone()))?;
        registry.register(Box::new(metrics.fairness_queue_size.clone()))?;
        registry.register(Box::new(metrics.fairness_queue_duration_seconds.clone()))?;
        registry.register(Box::new(metrics.rate_limit_exceeded_total.clone()))?;
        registry.register(Box::new(metrics.time_to_first_token_seconds.clone()))?;
        registry.register(Box::new(metrics.time_per_output_token_seconds.clone()))?;
        registry.register(Box::new(metrics.upstream_connect_errors_total.clone()))?;
        Ok(Arc::new(metrics))
    }

    /// Resolves the handles of one model (the success path's series).
    pub fn model(&self, model: &str) -> ModelMetrics {
        let per_path = |f: &dyn Fn(PathLabel) -> IntCounter| PathLabel::ALL.map(f);
        ModelMetrics {
            name: model.to_owned(),
            ok_requests: per_path(&|path| {
                self.requests_total
                    .with_label_values(&[model, path.as_str(), "200", SUCCESS])
            }),
            ok_duration: PathLabel::ALL.map(|path| {
                self.request_duration_seconds
                    .with_label_values(&[model, path.as_str(), "200"])
            }),
            ok_prefill: PathLabel::ALL.map(|path| {
                self.request_prefill_duration_seconds
                    .with_label_values(&[model, path.as_str(), "200"])
            }),
            ok_decode: PathLabel::ALL.map(|path| {
                self.request_decode_duration_seconds
                    .with_label_values(&[model, path.as_str(), "200"])
            }),
            input_tokens: per_path(&|path| {
                self.tokens_total
                    .with_label_values(&[model, path.as_str(), "input"])
            }),
            output_tokens: per_path(&|path| {
                self.tokens_total
                    .with_label_values(&[model, path.as_str(), "output"])
            }),
            active_downstream: self.active_downstream_requests.with_label_values(&[model]),
            ttft: self.time_to_first_token_seconds.with_label_values(&[model]),
            tpot: self.time_per_output_token_seconds.with_label_values(&[model]),
        }
    }

    /// The `active_upstream_requests` gauge of one (route, server) pair.
    pub fn upstream_gauge(&self, route: &str, server: &str) -> IntGauge {
        self.active_upstream_requests.with_label_values(&[route, server])
    }

    /// Counts a request that did not end in the success series.
    pub fn observe_other(&self, model: &str, path: PathLabel, status: u16, error_type: &str, seconds: f64) {
        let status = status.to_string();
        let labels = [model, path.as_str(), status.as_str(), error_type];
        self.requests_total.with_label_values(&labels).inc();
        self.request_duration_seconds
            .with_label_values(&labels[..3])
            .observe(seconds);
        let key: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        let mut created = self.lazily_created.lock();
        if !created.contains(&key) {
            created.insert(key);
        }
    }

    /// Called when a snapshot is applied: removes the series of models and
    /// (route, server) pairs that are gone.
    pub fn retain(&self, models: HashSet<String>, upstream_pairs: HashSet<(String, String)>) {
        let mut resolved = self.resolved.lock();
        for gone in resolved.models.difference(&models) {
            if gone == UNKNOWN_MODEL {
                continue;
            }
            self.remove_model(gone);
        }
        for (route, server) in resolved.upstream_pairs.difference(&upstream_pairs) {
            let _ = self.active_upstream_requests.remove_label_values(&[route, server]);
        }
        *resolved = Resolved {
            models,
            upstream_pairs,
        };
    }

    fn remove_model(&self, model: &str) {
        for path in PathLabel::ALL {
            let p = path.as_str();
            let _ = self.requests_total.remove_label_values(&[model, p, "200", SUCCESS]);
            let _ = self.request_duration_seconds.remove_label_values(&[model, p, "200"]);
            let _ = self.request_prefill_duration_seconds.remove_label_values(&[model, p, "200"]);
            let _ = self.request_decode_duration_seconds.remove_label_values(&[model, p, "200"]);
            let _ = self.tokens_total.remove_label_values(&[model, p, "input"]);
            let _ = self.tokens_total.remove_label_values(&[model, p, "output"]);
        }
        let _ = self.active_downstream_requests.remove_label_values(&[model]);
        let _ = self.time_to_first_token_seconds.remove_label_values(&[model]);
        let _ = self.time_per_output_token_seconds.remove_label_values(&[model]);
        let mut created = self.lazily_created.lock();
        created.retain(|labels| {
            if labels[0] != model {
                return true;
            }
            let _ = self.requests_total.remove_label_values(
                &labels.iter().map(String::as_str).collect::<Vec<_>>(),
            );
            let _ = self
                .request_duration_seconds
                .remove_label_values(&[&labels[0], &labels[1], &labels[2]]);
            false
        });
    }
}

/// Handles of one model's success-path series, resolved when a snapshot is applied.
#[derive(Debug, Clone)]
pub struct ModelMetrics {
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
    pub fn observe_success(&self, path: PathLabel, total: f64, prefill: Option<f64>, decode: Option<f64>) {
        let i = path as usize;
        self.ok_requests[i].inc();
        self.ok_duration[i].observe(total);
        if let Some(prefill) = prefill {
            self.ok_prefill[i].observe(prefill);
        }
        if let Some(decode) = decode {
            self.ok_decode[i].observe(decode);
        }
    }

    pub fn add_tokens(&self, path: PathLabel, input: u64, output: u64) {
        let i = path as usize;
        self.input_tokens[i].inc_by(input);
        self.output_tokens[i].inc_by(output);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        registry.gather().into_iter().find(|f| f.name() == name).and_then(|family| {
            family.get_metric().iter().find_map(|m| {
                let matches = labels.iter().all(|(k, v)| {
                    m.get_label().iter().any(|l| l.name() == *k && l.value() == *v)
                });
                matches.then(|| {
                    if m.get_counter().has_value() {
                        m.get_counter().value()
                    } else if m.get_gauge().has_value() {
                        m.get_gauge().value()
                    } else {
                        m.get_histogram().get_sample_count() as f64
                    }
                })
            })
        })
    }

    #[test]
    fn success_series_and_removal() {
        let registry = Registry::new();
        let metrics = RouterMetrics::new(&registry).expect("metrics");
        let model = metrics.model("m");
        model.observe_success(PathLabel::Completions, 0.2, Some(0.1), Some(0.1));
        model.add_tokens(PathLabel::Completions, 3, 5);
        metrics.observe_other("m", PathLabel::Completions, 503, "no_ready_pod", 0.01);
        metrics.retain(HashSet::from(["m".to_owned()]), HashSet::new());
        let labels = [("model", "m"), ("path", "/v1/completions"), ("status_code", "200")];
        assert_eq!(value(&registry, "kthena_router_requests_total", &labels), Some(1.0));
        assert_eq!(
            value(&registry, "kthena_router_tokens_total", &[("model", "m"), ("token_type", "output")]),
            Some(5.0)
        );
        assert_eq!(
            value(&registry, "kthena_router_requests_total", &[("error_type", "no_ready_pod")]),
            Some(1.0)
        );
        metrics.retain(HashSet::new(), HashSet::new());
        assert_eq!(value(&registry, "kthena_router_requests_total", &[("model", "m")]), None);
        assert_eq!(value(&registry, "kthena_router_tokens_total", &[("model", "m")]), None);
    }

    #[test]
    fn path_labels_are_bounded() {
        assert_eq!(PathLabel::of("/v1/chat/completions").as_str(), "/v1/chat/completions");
        assert_eq!(PathLabel::of("/v1/anything?x").as_str(), "other");
        assert_eq!(PathLabel::of("/admin").as_str(), "other");
    }
}
