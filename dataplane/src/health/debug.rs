//! The debug port's health views, from the snapshot in use and this
//! dataplane's own view of each pod (in flight, ejection, connections,
//! decisions):
//!
//! - `GET /debug/model-servers`: every ModelServer with its health, pod
//!   counts by condition, queue depth and requests in flight;
//! - `GET /debug/model-servers/{name}/status`: one ModelServer's pods and
//!   why each is (not) healthy;
//! - `GET /debug/model-servers/{name}/metrics`: its pods' engine metrics as
//!   last scraped by the controller (GPU utilisation and memory are listed
//!   as not available: the engines do not export them);
//! - `GET /debug/routing/backends`: each ModelServer as the load balancer
//!   sees it: the routes and weights that reach it, and every target pod.
//!
//! `{name}` is a ModelServer name; `?namespace=NS` picks one when several
//! namespaces have it.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use switchyard_snapshot::pb;

use super::{HealthJudge, HealthMetrics, PodCondition, algorithm, server_models};
use crate::pod::PodState;
use crate::routing::Server;
use crate::snapshot::{RoutingTable, SnapshotStore};

/// What the engines do not export, and so is not shown as a number.
const NOT_AVAILABLE: [(&str, &str); 2] = [
    (
        "gpuUtilization",
        "vLLM and SGLang do not export GPU utilisation on /metrics; use a GPU exporter (DCGM)",
    ),
    (
        "gpuMemoryBytes",
        "vLLM and SGLang do not export GPU memory on /metrics; kvCacheUsage is the share of the KV cache in use",
    ),
];

/// Why a view could not be given.
#[derive(Debug, PartialEq, Eq)]
pub enum LookupError {
    /// No snapshot yet.
    NotReady,
    /// No ModelServer of that name (in that namespace).
    NotFound(String),
    /// Several namespaces have a ModelServer of that name.
    Ambiguous(String),
}

/// `/debug/model-servers`.
pub fn model_servers(store: &SnapshotStore) -> Result<Value, LookupError> {
    let table = store.table().ok_or(LookupError::NotReady)?;
    let judge = HealthJudge::new(store, &table);
    let models = server_models(&table);
    let config = table.source.decode();
    let servers: Vec<Value> = table
        .servers
        .iter()
        .map(|server| {
            let mut by_condition: BTreeMap<&str, usize> = BTreeMap::new();
            for pod in &server.pods {
                *by_condition
                    .entry(condition_name(judge.pod(pod).condition))
                    .or_default() += 1;
            }
            let source = source_server(&config, &server.key);
            json!({
                "modelServer": server.key,
                "name": source.map(|s| s.name.as_str()),
                "namespace": source.map(|s| s.namespace.as_str()),
                "model": models.get(server.key.as_str()),
                "engine": source.map(|s| s.inference_engine.as_str()),
                "healthy": judge.healthy_pods(server) > 0,
                "pods": {
                    "total": server.pods.len(),
                    "healthy": by_condition.get("healthy").copied().unwrap_or(0),
                    "ejected": by_condition.get("ejected").copied().unwrap_or(0),
                    "staleLoad": by_condition.get("stale_load").copied().unwrap_or(0),
                    "noLoad": by_condition.get("no_load").copied().unwrap_or(0),
                },
                "queueDepth": queue_depth(server),
                "inFlight": server.pods.iter().map(|pod| pod.in_flight()).sum::<u64>(),
            })
        })
        .collect();
    Ok(json!({"version": table.version, "modelServers": servers}))
}

/// `/debug/model-servers/{name}/status`.
pub fn status(
    store: &SnapshotStore,
    metrics: &HealthMetrics,
    name: &str,
    namespace: Option<&str>,
) -> Result<Value, LookupError> {
    server_view(store, name, namespace, |table, server, judge| {
        let healthy = judge.healthy_pods(server);
        let pods: Vec<Value> = server
            .pods
            .iter()
            .map(|pod| {
                let health = judge.pod(pod);
                json!({
                    "pod": pod.name,
                    "address": pod.addr.to_string(),
                    "condition": health.condition,
                    "ready": true,
                    "ejected": health.condition == PodCondition::Ejected,
                    "loadAgeMs": health.load_age_ms,
                    "inFlight": pod.in_flight(),
                    "connections": metrics.connections.open_to(pod.addr),
                })
            })
            .collect();
        json!({
            "modelServer": server.key,
            "healthy": healthy > 0,
            "healthStatus": u8::from(healthy > 0),
            "reason": format!(
                "{healthy} of {} pods healthy (ready in the snapshot, not ejected, engine load fresher than {} ms)",
                server.pods.len(),
                table.scheduler.effective.max_load_age_ms
            ),
            "pods": pods,
        })
    })
}

/// `/debug/model-servers/{name}/metrics`.
pub fn engine_metrics(
    store: &SnapshotStore,
    name: &str,
    namespace: Option<&str>,
) -> Result<Value, LookupError> {
    server_view(store, name, namespace, |_, server, judge| {
        let pods: Vec<Value> = server
            .pods
            .iter()
            .map(|pod| {
                let Some(load) = pod.load() else {
                    return json!({"pod": pod.name, "scraped": false});
                };
                json!({
                    "pod": pod.name,
                    "scraped": true,
                    "requestsWaiting": load.requests_waiting,
                    "requestsRunning": load.requests_running,
                    "kvCacheUsage": load.kv_cache_usage,
                    "ttftSeconds": load.ttft_seconds,
                    "tpotSeconds": load.tpot_seconds,
                    "models": load.models,
                    "observedAtUnixMs": store.scheduling().observed_at(&load),
                    "loadAgeMs": judge.pod(pod).load_age_ms,
                })
            })
            .collect();
        let not_available: serde_json::Map<String, Value> = NOT_AVAILABLE
            .iter()
            .map(|(field, why)| ((*field).to_owned(), Value::from(*why)))
            .collect();
        json!({
            "modelServer": server.key,
            "queueDepth": queue_depth(server),
            "requestsRunning": server.pods.iter().filter_map(|pod| pod.load()).map(|load| load.requests_running).sum::<f64>(),
            "pods": pods,
            "notAvailable": not_available,
        })
    })
}

/// `/debug/routing/backends`.
pub fn backends(store: &SnapshotStore, metrics: &HealthMetrics) -> Result<Value, LookupError> {
    let table = store.table().ok_or(LookupError::NotReady)?;
    let judge = HealthJudge::new(store, &table);
    let models = server_models(&table);
    let mut routed: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    let config = table.source.decode();
    for route in &config.routes {
        let route_key = switchyard_snapshot::object_key(&route.namespace, &route.name);
        for rule in &route.rules {
            for target in &rule.targets {
                routed
                    .entry(target.model_server.as_str())
                    .or_default()
                    .push(json!({"route": route_key, "rule": rule.name, "weight": target.weight}));
            }
        }
    }
    let backends: Vec<Value> = table
        .servers
        .iter()
        .map(|server| {
            let targets: Vec<Value> = server
                .pods
                .iter()
                .map(|pod| target(&judge, metrics, pod))
                .collect();
            json!({
                "modelServer": server.key,
                "model": models.get(server.key.as_str()),
                "healthy": judge.healthy_pods(server) > 0,
                "routes": routed.remove(server.key.as_str()).unwrap_or_default(),
                "targets": targets,
            })
        })
        .collect();
    Ok(json!({
        "version": table.version,
        "algorithm": algorithm(&table),
        "backends": backends,
    }))
}

fn target(judge: &HealthJudge<'_>, metrics: &HealthMetrics, pod: &PodState) -> Value {
    let health = judge.pod(pod);
    json!({
        "target": pod.key,
        "address": pod.addr.to_string(),
        "condition": health.condition,
        "healthy": health.condition == PodCondition::Healthy,
        "inFlight": pod.in_flight(),
        "connections": metrics.connections.open_to(pod.addr),
        "decisions": metrics.decisions_for(pod),
    })
}

fn condition_name(condition: PodCondition) -> &'static str {
    match condition {
        PodCondition::Healthy => "healthy",
        PodCondition::Ejected => "ejected",
        PodCondition::StaleLoad => "stale_load",
        PodCondition::NoLoad => "no_load",
    }
}

fn queue_depth(server: &Server) -> f64 {
    server
        .pods
        .iter()
        .filter_map(|pod| pod.load())
        .map(|load| load.requests_waiting)
        .sum()
}

fn source_server<'a>(config: &'a pb::RouteConfig, key: &str) -> Option<&'a pb::ModelServer> {
    config
        .servers
        .iter()
        .find(|server| switchyard_snapshot::object_key(&server.namespace, &server.name) == key)
}

/// `view` of the ModelServer `name` (of `namespace`, when given) in the
/// current snapshot, judged as of now.
fn server_view(
    store: &SnapshotStore,
    name: &str,
    namespace: Option<&str>,
    view: impl FnOnce(&RoutingTable, &Server, &HealthJudge<'_>) -> Value,
) -> Result<Value, LookupError> {
    let table = store.table().ok_or(LookupError::NotReady)?;
    let server = find_server(&table, name, namespace)?;
    Ok(view(&table, server, &HealthJudge::new(store, &table)))
}

fn find_server<'a>(
    table: &'a RoutingTable,
    name: &str,
    namespace: Option<&str>,
) -> Result<&'a Server, LookupError> {
    let matching: Vec<&Server> = table
        .servers
        .iter()
        .map(|server| &**server)
        .filter(|server| {
            let (server_namespace, server_name) =
                server.key.split_once('/').unwrap_or(("", &server.key));
            server_name == name && namespace.is_none_or(|wanted| wanted == server_namespace)
        })
        .collect();
    match matching.as_slice() {
        [server] => Ok(server),
        [] => Err(LookupError::NotFound(match namespace {
            Some(namespace) => format!("no ModelServer {namespace}/{name} in the routing snapshot"),
            None => format!("no ModelServer named {name:?} in the routing snapshot"),
        })),
        several => Err(LookupError::Ambiguous(format!(
            "several ModelServers are named {name:?} ({}): add ?namespace=NS",
            several
                .iter()
                .map(|server| server.key.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
