//! The fairness queue: when the pods serving a model are full, its requests
//! wait, and the order they go in is fair between users (VTC) or favours
//! live sessions (session boost). Queues and their counters outlive
//! snapshots; each routing table holds the queues of its models
//! ([`FairQueues`]), or none when the snapshot has no fairness block, so a
//! request then costs one `Option` check.

pub mod queue;
mod sessions;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use parking_lot::Mutex;
use prometheus::{HistogramOpts, HistogramVec, IntGaugeVec, Opts};
use switchyard_snapshot::pb;

use self::queue::{ModelQueue, QueueView};
use crate::pod::PodState;

pub use self::queue::{Refusal, Slot, Ticket};

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
