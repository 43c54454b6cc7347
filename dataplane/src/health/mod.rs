//! Health as this dataplane sees it: each pod's condition (ready in the
//! snapshot, not ejected, engine load fresh), each ModelServer's, the routes
//! held, the load-balancing decisions made and the upstream connections
//! open; exported as the model-server and load-balancing metrics of Kthena's
//! router observability guide and shown by the debug endpoints of
//! [`debug`].
//!
//! Metrics (bounded: one series per ModelServer, per pod, or per (routed
//! model, pod) of the snapshot in use; `model_server` and `target` are
//! `namespace/name`, as in the router's other metrics):
//! - `kthena_router_routes`: ModelRoutes in the snapshot in use;
//! - `kthena_model_server_health_status{model_server,namespace}`: 1 when at
//!   least one of the ModelServer's pods is healthy, else 0;
//! - `kthena_model_server_queue_depth{model_server,model}`: requests waiting
//!   in its engines (sum of the pods' scraped waiting counts);
//! - `kthena_lb_target_health{target,model}`: 1 for a healthy pod, else 0;
//! - `kthena_lb_connection_pool_size{target}`: open connections to the pod;
//! - `kthena_lb_decisions_total{algorithm,model,target}`: requests the
//!   scheduler sent to the pod, counted when the pod accepted them.
//!
//! GPU utilisation and GPU memory (`kthena_model_server_gpu_utilization`,
//! `kthena_model_server_memory_usage_bytes` in the guide) are not exported:
//! neither vLLM nor SGLang exposes them on its `/metrics` (they export KV
//! cache usage, which is shown instead); a GPU exporter such as DCGM's
//! measures them.

pub mod connections;
pub mod debug;

use std::collections::{BTreeMap, HashMap};

use crate::fast_map::FastMap;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde::Serialize;
use switchyard_runtime::clock::{self, Instant};

use self::connections::ConnectionCounts;
use crate::pod::{PodState, is_fresh};
use crate::retired::Retired;
use crate::routing::Server;
use crate::snapshot::{RoutingTable, SnapshotStore};

/// The `algorithm` label when no score plugin has a weight: ties rotate.
pub const ROUND_ROBIN_ALGORITHM: &str = "round-robin";
/// The `model` label of a ModelServer no route names and that has no `spec.model`.
pub const UNKNOWN_MODEL: &str = "unknown";

/// A pod's condition, as this dataplane sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PodCondition {
    /// Ready in the snapshot, not ejected, engine load scraped recently.
    Healthy,
    /// Ejected by this dataplane after failures: skipped until it expires.
    Ejected,
    /// The controller's last successful scrape of its engine is older than
    /// the scheduler's `maxLoadAge`: the engine may be down or unreachable.
    StaleLoad,
    /// The controller has never scraped its engine successfully.
    NoLoad,
}

/// A pod's condition and how old its engine load is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodHealth {
    pub condition: PodCondition,
    /// Age of the engine load in milliseconds (`None` without a load).
    pub load_age_ms: Option<i64>,
}

/// Judges pods against one table at one instant.
pub struct HealthJudge<'a> {
    store: &'a SnapshotStore,
    max_load_age_ms: u64,
    now: Instant,
    now_unix_ms: i64,
}

impl<'a> HealthJudge<'a> {
    pub fn new(store: &'a SnapshotStore, table: &RoutingTable) -> Self {
        Self {
            store,
            max_load_age_ms: table.scheduler.effective.max_load_age_ms,
            now: clock::now(),
            now_unix_ms: clock::unix_ms_now(),
        }
    }

    pub fn pod(&self, pod: &PodState) -> PodHealth {
        let observed_at = pod
            .load()
            .map(|load| self.store.scheduling().observed_at(&load));
        let load_age_ms = observed_at
            .filter(|at| *at > 0)
            .map(|at| self.now_unix_ms.saturating_sub(at));
        let condition = if pod.is_ejected(self.now) {
            PodCondition::Ejected
        } else {
            match observed_at {
                None => PodCondition::NoLoad,
                Some(at) if is_fresh(at, self.now_unix_ms, self.max_load_age_ms) => {
                    PodCondition::Healthy
                }
                Some(_) => PodCondition::StaleLoad,
            }
        };
        PodHealth {
            condition,
            load_age_ms,
        }
    }

    /// Healthy pods of `server`.
    pub fn healthy_pods(&self, server: &Server) -> usize {
        server
            .pods
            .iter()
            .filter(|pod| self.pod(pod).condition == PodCondition::Healthy)
            .count()
    }
}

/// The model a ModelServer's engines are asked for, per ModelServer key: its
/// `spec.model`, else the model name of the oldest route that targets it.
pub fn server_models(table: &RoutingTable) -> HashMap<&str, &str> {
    let mut models: HashMap<&str, &str> = HashMap::new();
    for route in &table.routes {
        let name = if route.model_name.is_empty() {
            route.lora_adapters.first().map_or("", String::as_str)
        } else {
            route.model_name.as_str()
        };
        for rule in &route.rules {
            for server in rule.targets.servers() {
                models.entry(server.key.as_str()).or_insert(name);
            }
        }
    }
    for server in &table.servers {
        if let Some(model) = &server.model_rewrite {
            models.insert(server.key.as_str(), model.as_str());
        }
    }
    for server in &table.servers {
        models.entry(server.key.as_str()).or_insert(UNKNOWN_MODEL);
    }
    models
}

/// The `algorithm` label of a table's scheduler: its weighted score plugins,
/// in configuration order, joined by `+`.
pub fn algorithm(table: &RoutingTable) -> String {
    let scores: Vec<&str> = table
        .scheduler
        .effective
        .scores
        .iter()
        .filter(|score| score.weight > 0)
        .map(|score| score.name.as_str())
        .collect();
    if scores.is_empty() {
        ROUND_ROBIN_ALGORITHM.to_owned()
    } else {
        scores.join("+")
    }
}

/// The metric families of this module; see the module documentation.
#[derive(Debug)]
pub struct HealthMetrics {
    routes: IntGauge,
    server_health: GaugeVec,
    queue_depth: GaugeVec,
    target_health: GaugeVec,
    connection_pool_size: IntGaugeVec,
    decisions_total: IntCounterVec,
    /// Open upstream connections per pod, counted by the upstream client.
    pub connections: Arc<ConnectionCounts>,
    decisions: ArcSwap<DecisionHandles>,
    /// Serialises snapshot applications (never taken by requests).
    resolve_lock: Mutex<()>,
    /// Replaced decision slots a request still read when they were replaced.
    retired: Retired<DecisionHandles>,
}

/// The `kthena_lb_decisions_total` handles of one snapshot: a slot per
/// (routed model, pod id), its series created on first use.
#[derive(Debug, Default)]
struct DecisionHandles {
    algorithm: String,
    models: FastMap<Box<str>, FastMap<u64, DecisionSlot>>,
}

#[derive(Debug)]
struct DecisionSlot {
    /// `namespace/name` of the pod: the `target` label.
    target: Arc<str>,
    counter: OnceLock<IntCounter>,
}

impl HealthMetrics {
    /// Creates the families and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let gauge =
            |name: &str, help: &str, labels: &[&str]| GaugeVec::new(Opts::new(name, help), labels);
        let metrics = Self {
            routes: IntGauge::new(
                "kthena_router_routes",
                "ModelRoutes in the routing snapshot this dataplane serves (0: every request gets 404)",
            )?,
            server_health: gauge(
                "kthena_model_server_health_status",
                "1 when at least one pod of the ModelServer is healthy (ready, not ejected, engine load fresh), else 0",
                &["model_server", "namespace"],
            )?,
            queue_depth: gauge(
                "kthena_model_server_queue_depth",
                "Requests waiting in the ModelServer's engines, as last scraped by the controller",
                &["model_server", "model"],
            )?,
            target_health: gauge(
                "kthena_lb_target_health",
                "1 when the pod is healthy (ready, not ejected, engine load fresh), else 0",
                &["target", "model"],
            )?,
            connection_pool_size: IntGaugeVec::new(
                Opts::new(
                    "kthena_lb_connection_pool_size",
                    "Connections this dataplane holds open to the pod (idle in the pool or in use)",
                ),
                &["target"],
            )?,
            decisions_total: IntCounterVec::new(
                Opts::new(
                    "kthena_lb_decisions_total",
                    "Requests the scheduler sent to the pod and the pod accepted, by scheduler configuration and model",
                ),
                &["algorithm", "model", "target"],
            )?,
            connections: Arc::default(),
            decisions: ArcSwap::from_pointee(DecisionHandles::default()),
            resolve_lock: Mutex::new(()),
            retired: Retired::default(),
        };
        registry.register(Box::new(metrics.routes.clone()))?;
        registry.register(Box::new(metrics.server_health.clone()))?;
        registry.register(Box::new(metrics.queue_depth.clone()))?;
        registry.register(Box::new(metrics.target_health.clone()))?;
        registry.register(Box::new(metrics.connection_pool_size.clone()))?;
        registry.register(Box::new(metrics.decisions_total.clone()))?;
        Ok(metrics)
    }

    /// The families this module declares: (name, help, type), so `/metrics`
    /// lists them before they have series.
    pub fn declared(&self) -> Vec<(String, String, &'static str)> {
        use prometheus::core::Collector;
        let collectors: [(&dyn Collector, &'static str); 6] = [
            (&self.routes, "gauge"),
            (&self.server_health, "gauge"),
            (&self.queue_depth, "gauge"),
            (&self.target_health, "gauge"),
            (&self.connection_pool_size, "gauge"),
            (&self.decisions_total, "counter"),
        ];
        collectors
            .into_iter()
            .flat_map(|(collector, kind)| {
                collector
                    .desc()
                    .into_iter()
                    .map(move |desc| (desc.fq_name.clone(), desc.help.clone(), kind))
            })
            .collect()
    }

    /// Counts a request `pod` accepted for `model`. A lookup in the handles
    /// resolved when the snapshot was applied; the series is created on the
    /// first decision for the pair, never again.
    pub fn count_decision(&self, model: &str, pod: &PodState) {
        let handles = self.decisions.load();
        let Some(slot) = handles.models.get(model).and_then(|pods| pods.get(&pod.id)) else {
            return;
        };
        slot.counter
            .get_or_init(|| {
                self.decisions_total
                    .with_label_values(&[&handles.algorithm, model, &slot.target])
            })
            .inc();
    }

    /// The decisions counted for `pod` (all models), for the debug views.
    pub fn decisions_for(&self, pod: &PodState) -> u64 {
        let handles = self.decisions.load();
        handles
            .models
            .values()
            .filter_map(|pods| pods.get(&pod.id))
            .filter_map(|slot| slot.counter.get())
            .map(IntCounter::get)
            .sum()
    }

    /// Resolves the decision slots of `table`: one per (model a route
    /// serves, pod of a ModelServer it targets); counters of pairs still
    /// there carry over, series of pairs gone (or of another algorithm) are
    /// removed. Called after every applied RouteConfig, never by requests.
    pub fn resolve(&self, table: &RoutingTable) {
        let _writer = self.resolve_lock.lock();
        let previous = self.decisions.load_full();
        let algorithm = algorithm(table);
        let same_algorithm = previous.algorithm == algorithm;
        let mut next = DecisionHandles {
            algorithm,
            models: FastMap::default(),
        };
        for route in &table.routes {
            let names = std::iter::once(&route.model_name)
                .chain(&route.lora_adapters)
                .filter(|name| !name.is_empty());
            for name in names {
                let pods = next.models.entry(name.as_str().into()).or_default();
                for rule in &route.rules {
                    for server in rule.targets.servers() {
                        for pod in &server.pods {
                            pods.entry(pod.id).or_insert_with(|| {
                                let kept = same_algorithm
                                    .then(|| previous.models.get(name.as_str())?.get(&pod.id))
                                    .flatten()
                                    .filter(|slot| *slot.target == *pod.key)
                                    .and_then(|slot| slot.counter.get().cloned());
                                DecisionSlot {
                                    target: pod.key.as_str().into(),
                                    counter: kept.map(OnceLock::from).unwrap_or_default(),
                                }
                            });
                        }
                    }
                }
            }
        }
        for (model, pods) in &previous.models {
            for (id, slot) in pods {
                if slot.counter.get().is_none() {
                    continue;
                }
                let kept = same_algorithm
                    && next
                        .models
                        .get(model)
                        .and_then(|pods| pods.get(id))
                        .is_some_and(|now| now.target == slot.target);
                if !kept {
                    let _ = self.decisions_total.remove_label_values(&[
                        previous.algorithm.as_str(),
                        model,
                        &slot.target,
                    ]);
                }
            }
        }
        self.decisions.store(Arc::new(next));
        self.retired.retire(previous);
    }

    /// Frees replaced decision slots no request reads any more (on the
    /// calling thread: the one that applies snapshots).
    pub fn reclaim(&self) {
        self.retired.reclaim();
    }

    /// Sets the gauges from the table in use; called when `/metrics` is
    /// scraped, so series of gone routes, servers and pods disappear then.
    pub fn refresh(&self, store: &SnapshotStore) {
        self.server_health.reset();
        self.queue_depth.reset();
        self.target_health.reset();
        self.connection_pool_size.reset();
        let Some(table) = store.table() else {
            self.routes.set(0);
            return;
        };
        self.routes
            .set(i64::try_from(table.routes.len()).unwrap_or(i64::MAX));
        let judge = HealthJudge::new(store, &table);
        let models = server_models(&table);
        let mut targets: BTreeMap<(&str, &str), f64> = BTreeMap::new();
        for server in &table.servers {
            let model = models
                .get(server.key.as_str())
                .copied()
                .unwrap_or(UNKNOWN_MODEL);
            let namespace = server
                .key
                .split_once('/')
                .map_or("", |(namespace, _)| namespace);
            let mut healthy = 0;
            let mut waiting = 0.0;
            for pod in &server.pods {
                let is_healthy = judge.pod(pod).condition == PodCondition::Healthy;
                healthy += usize::from(is_healthy);
                waiting += pod.load().map_or(0.0, |load| load.requests_waiting);
                targets
                    .entry((pod.key.as_str(), model))
                    .or_insert(if is_healthy { 1.0 } else { 0.0 });
            }
            self.server_health
                .with_label_values(&[&server.key, namespace])
                .set(if healthy > 0 { 1.0 } else { 0.0 });
            self.queue_depth
                .with_label_values(&[&server.key, model])
                .set(waiting);
        }
        for ((target, model), value) in targets {
            self.target_health
                .with_label_values(&[target, model])
                .set(value);
        }
        for (key, pod) in &table.pods {
            let open = self.connections.open_to(pod.addr);
            self.connection_pool_size
                .with_label_values(&[key])
                .set(i64::try_from(open).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests;
