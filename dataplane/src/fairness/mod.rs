//! The fairness queue: when the pods serving a model are full, its requests
//! wait, and the order they go in is fair between users (VTC) or favours
//! live sessions (session boost). Queues and their counters outlive
//! snapshots; each routing table holds the queues of its models
//! ([`FairQueues`]), or none when the snapshot has no fairness block, so a
//! request then costs one `Option` check.
//!
//! Fleet-wide order: [`Fairness::usage_report`] gives what this dataplane
//! served each user (running totals, one report awaiting the controller's
//! echo at a time), the controller sums every dataplane's totals and
//! pushes them back inside EndpointLoads ([`Fairness::apply_counters`]),
//! and each queue orders by them (see `queue.rs`).

pub mod queue;
mod sessions;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use parking_lot::Mutex;
use prometheus::{HistogramOpts, HistogramVec, IntGaugeVec, Opts};
use switchyard_snapshot::pb;

use self::queue::{Echo, ModelQueue, QueueView};
use crate::pod::PodState;
use switchyard_runtime::clock::{self, Instant};

pub use self::queue::{Refusal, Slot, Ticket};

/// How long a report may await the controller's echo before everything is
/// reported again: the controller echoes within one push interval (at most
/// 500 ms); a report lost with a stream, or ignored by a controller that
/// just turned the fleet-wide order off, is not waited for forever.
pub const REPORT_ECHO_TIMEOUT: Duration = Duration::from_secs(2);

/// Who unauthenticated requests without the user header belong to.
pub const ANONYMOUS_USER: &str = "anonymous";
/// Longest user id taken from the user header; a longer value is treated as
/// absent, so a client cannot make the router keep kilobytes per user.
pub const MAX_USER_ID_BYTES: usize = 256;

/// Which waiting request goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Vtc,
    SessionBoost,
}

/// The snapshot's fairness block, checked.
#[derive(Debug, Clone)]
pub struct FairnessSettings {
    pub policy: Policy,
    pub window: Duration,
    pub input_token_weight: f64,
    pub output_token_weight: f64,
    pub max_concurrent_per_pod: u32,
    pub queue_timeout: Duration,
    pub max_queue_length: usize,
    pub max_user_queue_length: usize,
    pub user_header: Option<HeaderName>,
    pub max_metric_users: usize,
    tier_weights: HashMap<String, f64>,
    pub session_header: HeaderName,
    pub max_sessions: usize,
    /// Fleet-wide order: how often usage is reported; None = off.
    pub global_report_interval: Option<Duration>,
    /// Users per model read from the pushed counters.
    pub max_global_users: usize,
}

impl FairnessSettings {
    pub fn from_config(config: &pb::FairnessConfig) -> Result<Self, String> {
        let weight_ok = |weight: f64| weight.is_finite() && weight >= 0.0;
        if !weight_ok(config.input_token_weight) || !weight_ok(config.output_token_weight) {
            return Err("token weights must be numbers >= 0".to_owned());
        }
        if config.max_concurrent_per_pod == 0
            || config.queue_timeout_ms == 0
            || config.max_queue_length == 0
            || config.max_user_queue_length == 0
        {
            return Err(
                "max concurrency, queue timeout and queue lengths must be positive".to_owned(),
            );
        }
        let header = |name: &str| {
            HeaderName::try_from(name).map_err(|_| format!("invalid header name {name:?}"))
        };
        let mut tier_weights = HashMap::with_capacity(config.tier_weights.len());
        for tier in &config.tier_weights {
            if !(tier.weight.is_finite() && tier.weight > 0.0) {
                return Err(format!("tier {} weight must be > 0", tier.tier));
            }
            tier_weights.insert(tier.tier.clone(), tier.weight);
        }
        let policy = match pb::FairnessPolicy::try_from(config.policy) {
            Ok(pb::FairnessPolicy::Vtc) => Policy::Vtc,
            Ok(pb::FairnessPolicy::SessionBoost) => Policy::SessionBoost,
            Err(_) => return Err(format!("unknown policy {}", config.policy)),
        };
        let count = |value: u32| usize::try_from(value).unwrap_or(usize::MAX);
        Ok(Self {
            policy,
            window: Duration::from_millis(config.window_ms),
            input_token_weight: config.input_token_weight,
            output_token_weight: config.output_token_weight,
            max_concurrent_per_pod: config.max_concurrent_per_pod,
            queue_timeout: Duration::from_millis(config.queue_timeout_ms),
            max_queue_length: count(config.max_queue_length),
            max_user_queue_length: count(config.max_user_queue_length),
            user_header: (!config.user_header.is_empty())
                .then(|| header(&config.user_header))
                .transpose()?,
            max_metric_users: count(config.max_metric_users),
            tier_weights,
            session_header: header(&config.session_header)?,
            max_sessions: count(config.max_sessions).max(1),
            global_report_interval: (config.global_report_interval_ms > 0)
                .then(|| Duration::from_millis(config.global_report_interval_ms)),
            max_global_users: count(config.max_global_users),
        })
    }

    /// What one weighted token costs a user of `tier`.
    pub fn charge_per_token(&self, tier: Option<&str>) -> f64 {
        tier.and_then(|tier| self.tier_weights.get(tier))
            .map_or(1.0, |weight| 1.0 / weight)
    }
}

/// The fairness metric families.
#[derive(Debug, Clone)]
pub struct FairnessMetrics {
    pub queue_size: IntGaugeVec,
    pub queue_duration: HistogramVec,
}

impl FairnessMetrics {
    /// Families registered nowhere (tests, or a store without metrics):
    /// never exposed, so prometheus's default buckets do.
    pub fn unregistered() -> Self {
        let labels = ["model", "user_id"];
        Self {
            queue_size: IntGaugeVec::new(
                Opts::new("kthena_router_fairness_queue_size", "queued requests"),
                &labels,
            )
            .unwrap_or_else(|_| unreachable!("valid metric options")),
            queue_duration: HistogramVec::new(
                HistogramOpts::new(
                    "kthena_router_fairness_queue_duration_seconds",
                    "queue wait",
                ),
                &labels,
            )
            .unwrap_or_else(|_| unreachable!("valid metric options")),
        }
    }
}

/// Queues that outlive snapshots, one per model while fairness is on.
#[derive(Debug)]
pub struct Fairness {
    metrics: FairnessMetrics,
    queues: Mutex<HashMap<String, Arc<ModelQueue>>>,
    /// This process's id in usage reports.
    reporter: u64,
    reports: Mutex<Reports>,
}

#[derive(Debug, Default)]
struct Reports {
    /// The settings in force: reports and pushed counters only while on.
    interval: Option<Duration>,
    max_global_users: usize,
    next_sequence: u64,
    /// The report awaiting the controller's echo, and when it was made.
    awaiting: Option<(u64, Instant)>,
}

impl Default for Fairness {
    fn default() -> Self {
        Self::new(FairnessMetrics::unregistered())
    }
}

/// The queues of one routing table's models.
#[derive(Debug)]
pub struct FairQueues {
    pub settings: Arc<FairnessSettings>,
    by_model: HashMap<String, Arc<ModelQueue>>,
}

impl FairQueues {
    pub fn queue(&self, model: &str) -> Option<&Arc<ModelQueue>> {
        self.by_model.get(model)
    }
}

impl Fairness {
    pub fn new(metrics: FairnessMetrics) -> Self {
        Self {
            metrics,
            queues: Mutex::new(HashMap::new()),
            reporter: rand::random(),
            reports: Mutex::default(),
        }
    }

    /// How often to report usage; None while the fleet-wide order is off.
    pub fn report_interval(&self) -> Option<Duration> {
        self.reports.lock().interval
    }

    /// What this dataplane served each user since its last report (all of
    /// it with `everything`: a new stream); None when there is nothing to
    /// report, the fleet-wide order is off, or the last report awaits its
    /// echo (for less than [`REPORT_ECHO_TIMEOUT`]).
    pub fn usage_report(&self, everything: bool) -> Option<pb::FairnessUsageReport> {
        let mut reports = self.reports.lock();
        reports.interval?;
        let now = clock::now();
        let everything = match reports.awaiting {
            Some((_, made)) if !everything => {
                if now.duration_since(made) < REPORT_ECHO_TIMEOUT {
                    return None;
                }
                true
            }
            _ => everything,
        };
        reports.awaiting = None;
        let queues: Vec<Arc<ModelQueue>> = self.queues.lock().values().cloned().collect();
        let mut usage = Vec::new();
        for queue in queues {
            queue.report_usage(everything, &mut usage);
        }
        if usage.is_empty() {
            return None;
        }
        reports.next_sequence += 1;
        let sequence = reports.next_sequence;
        reports.awaiting = Some((sequence, now));
        Some(pb::FairnessUsageReport {
            reporter: self.reporter,
            sequence,
            usage,
        })
    }

    /// The controller's fleet-wide counters (`None`: there are none, each
    /// queue orders by its own counters).
    pub fn apply_counters(&self, counters: Option<&pb::FairnessCounters>) {
        let mut reports = self.reports.lock();
        let counters = counters.filter(|_| reports.interval.is_some());
        let echoed = counters
            .and_then(|counters| {
                counters
                    .reports
                    .iter()
                    .find(|seen| seen.reporter == self.reporter)
            })
            .map(|seen| seen.sequence);
        let echo = match (echoed, reports.awaiting) {
            (None, _) => Echo::Nothing,
            (Some(echoed), Some((awaited, _))) if echoed < awaited => Echo::Earlier,
            (Some(_), _) => {
                reports.awaiting = None;
                Echo::Latest
            }
        };
        let by_model: HashMap<&str, &[pb::UserServed]> = counters
            .map(|counters| {
                counters
                    .models
                    .iter()
                    .map(|model| (model.model.as_str(), model.users.as_slice()))
                    .collect()
            })
            .unwrap_or_default();
        let queues: Vec<Arc<ModelQueue>> = self.queues.lock().values().cloned().collect();
        for queue in queues {
            let users = counters.map(|_| {
                by_model
                    .get(queue.model.as_str())
                    .copied()
                    .unwrap_or_default()
            });
            queue.apply_fleet(users, echo, reports.max_global_users);
        }
    }

    /// A new table's queues: each model served (with the pods that serve
    /// it) gets its queue, kept from the previous table when it had one.
    /// Queues of models no longer served, or all of them when fairness is
    /// off, let their waiting requests go, and their metric series are
    /// removed.
    pub fn apply(
        &self,
        settings: Option<FairnessSettings>,
        models: HashMap<String, Vec<Arc<PodState>>>,
    ) -> Option<Arc<FairQueues>> {
        {
            let mut reports = self.reports.lock();
            reports.interval = settings.as_ref().and_then(|s| s.global_report_interval);
            reports.max_global_users = settings.as_ref().map_or(0, |s| s.max_global_users);
        }
        let mut queues = self.queues.lock();
        let Some(settings) = settings.map(Arc::new) else {
            for (_, queue) in queues.drain() {
                queue.open_gates();
                queue.retire_series();
            }
            return None;
        };
        let mut by_model = HashMap::with_capacity(models.len());
        for (model, pods) in models {
            let queue = queues
                .entry(model.clone())
                .or_insert_with(|| {
                    Arc::new(ModelQueue::new(
                        model.clone(),
                        settings.clone(),
                        self.metrics.clone(),
                    ))
                })
                .clone();
            queue.update(&settings, pods);
            by_model.insert(model, queue);
        }
        queues.retain(|model, queue| {
            let kept = by_model.contains_key(model);
            if !kept {
                queue.open_gates();
                queue.retire_series();
            }
            kept
        });
        Some(Arc::new(FairQueues { settings, by_model }))
    }

    /// Engine loads changed: room may have appeared anywhere.
    pub fn wake_all(&self) {
        let queues: Vec<Arc<ModelQueue>> = self.queues.lock().values().cloned().collect();
        for queue in queues {
            queue.wake();
        }
    }

    /// Every queue, by model, for `/debug/router/state`.
    pub fn views(&self) -> Vec<QueueView> {
        let queues: Vec<Arc<ModelQueue>> = self.queues.lock().values().cloned().collect();
        let mut views: Vec<QueueView> = queues.iter().map(|queue| queue.view()).collect();
        views.sort_by(|a, b| a.model.cmp(&b.model));
        views
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> pb::FairnessConfig {
        pb::FairnessConfig {
            window_ms: 60_000,
            input_token_weight: 1.0,
            output_token_weight: 2.0,
            max_concurrent_per_pod: 4,
            queue_timeout_ms: 1_000,
            max_queue_length: 10,
            max_user_queue_length: 5,
            session_header: "x-session-id".into(),
            max_sessions: 8,
            tier_weights: vec![pb::TierWeight {
                tier: "gold".into(),
                weight: 2.0,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_tiers_weight_divides_its_charge() {
        let settings = FairnessSettings::from_config(&config()).expect("valid");
        assert_eq!(settings.charge_per_token(Some("gold")), 0.5);
        assert_eq!(settings.charge_per_token(Some("free")), 1.0);
        assert_eq!(settings.charge_per_token(None), 1.0);
        assert!(settings.user_header.is_none(), "empty: no user header");
    }

    #[test]
    fn an_unusable_block_is_rejected() {
        let broken: [fn(&mut pb::FairnessConfig); 5] = [
            |c| c.max_concurrent_per_pod = 0,
            |c| c.queue_timeout_ms = 0,
            |c| c.output_token_weight = f64::NAN,
            |c| c.user_header = "bad header".into(),
            |c| c.policy = 7,
        ];
        for breaking in broken {
            let mut config = config();
            breaking(&mut config);
            assert!(
                FairnessSettings::from_config(&config).is_err(),
                "{config:?}"
            );
        }
    }

    #[test]
    fn queues_follow_the_served_models_and_open_when_fairness_goes_off() {
        let fairness = Fairness::default();
        let settings = || FairnessSettings::from_config(&config()).ok();
        let models = |names: &[&str]| names.iter().map(|n| (n.to_string(), vec![])).collect();
        let queues = fairness.apply(settings(), models(&["a", "b"])).expect("on");
        let a = queues.queue("a").expect("a").clone();
        let again = fairness.apply(settings(), models(&["a"])).expect("on");
        assert!(Arc::ptr_eq(&a, again.queue("a").expect("a")), "kept");
        assert!(again.queue("b").is_none());
        assert_eq!(fairness.views().len(), 1);
        let metrics = fairness.metrics.clone();
        futures::executor::block_on(again.queue("a").expect("a").admit(Ticket {
            user: Arc::from("u"),
            charge_per_token: 1.0,
            input_tokens: 1,
            session: None,
        }))
        .expect("no pods: no bound");
        let series = || {
            use prometheus::core::Collector;
            let families = metrics.queue_duration.collect();
            families
                .iter()
                .map(|family| family.get_metric().len())
                .sum::<usize>()
        };
        assert_eq!(series(), 1);
        assert!(fairness.apply(None, models(&["a"])).is_none());
        assert!(fairness.views().is_empty());
        assert_eq!(series(), 0, "retired with the queue");
    }
}
