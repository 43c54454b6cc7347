//! The metrics listener (`/metrics`, `/healthz`, `/readyz`) and the loopback
//! debug listener (`/debug/...`): read-only views of the dataplane's state.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use prometheus::{Encoder, IntGauge, Registry, TextEncoder};
use serde_json::json;

use crate::proxy::{ProxyBody, readiness_response};
use crate::snapshot::SnapshotStore;
use crate::xds_client::ControllerStatus;

/// Dataplane-level gauges, refreshed when scraped.
#[derive(Debug, Clone)]
pub struct AdminMetrics {
    registry: Registry,
    controller_connected: IntGauge,
    snapshot_age_seconds: IntGauge,
    snapshot_pods: IntGauge,
}

impl AdminMetrics {
    pub fn new(registry: Registry) -> Result<Self, prometheus::Error> {
        let controller_connected = IntGauge::new(
            "kthena_router_controller_connected",
            "1 when the snapshot stream to the controller is up",
        )?;
        let snapshot_age_seconds = IntGauge::new(
            "kthena_router_snapshot_age_seconds",
            "Seconds since the routing snapshot in use was applied",
        )?;
        let snapshot_pods = IntGauge::new(
            "kthena_router_snapshot_pods",
            "Ready pods in the routing snapshot in use",
        )?;
        registry.register(Box::new(controller_connected.clone()))?;
        registry.register(Box::new(snapshot_age_seconds.clone()))?;
        registry.register(Box::new(snapshot_pods.clone()))?;
        Ok(Self {
            registry,
            controller_connected,
            snapshot_age_seconds,
            snapshot_pods,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Shared state of both admin listeners.
#[derive(Debug, Clone)]
pub struct Admin {
    pub store: Arc<SnapshotStore>,
    pub controller: Arc<ControllerStatus>,
    pub metrics: AdminMetrics,
}

impl Admin {
    /// The metrics port.
    pub fn handle_metrics_port(&self, request: &Request<Incoming>) -> Response<ProxyBody> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/metrics") => self.render_metrics(),
            (&Method::GET, "/healthz") => json(StatusCode::OK, &json!({"message": "ok"})),
            (&Method::GET, "/readyz") => readiness_response(&self.store),
            _ => not_found(),
        }
    }

    /// The debug port.
    pub fn handle_debug_port(&self, request: &Request<Incoming>) -> Response<ProxyBody> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/debug/router/state") => json(StatusCode::OK, &self.router_state()),
            (&Method::GET, "/debug/routing/table") => json(StatusCode::OK, &self.routing_table()),
            (&Method::GET, "/debug/routing/decisions") => json(
                StatusCode::OK,
                &crate::scheduling::decisions::decisions_view(&self.store, request.uri().query()),
            ),
            _ => not_found(),
        }
    }

    fn render_metrics(&self) -> Response<ProxyBody> {
        let table = self.store.table();
        self.metrics
            .controller_connected
            .set(i64::from(self.controller.connected()));
        self.metrics.snapshot_age_seconds.set(
            table
                .as_ref()
                .and_then(|t| SystemTime::now().duration_since(t.applied_at).ok())
                .map_or(0, |age| age.as_secs() as i64),
        );
        self.metrics
            .snapshot_pods
            .set(table.as_ref().map_or(0, |t| t.pods.len() as i64));
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(error) = encoder.encode(&self.metrics.registry.gather(), &mut buffer) {
            return json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"message": format!("failed to encode metrics: {error}")}),
            );
        }
        let mut response = Response::new(ProxyBody::from(Bytes::from(buffer)));
        if let Ok(value) = encoder.format_type().parse() {
            response.headers_mut().insert(header::CONTENT_TYPE, value);
        }
        response
    }

    fn router_state(&self) -> serde_json::Value {
        let table = self.store.table();
        let mut pods: Vec<_> = table
            .iter()
            .flat_map(|t| t.pods.values())
            .map(|pod| {
                json!({
                    "pod": pod.key,
                    "address": pod.addr.to_string(),
                    "inFlight": pod.in_flight(),
                    "ejected": pod.is_ejected(std::time::Instant::now()),
                    "load": pod.load().map(|load| json!({
                        "requestsWaiting": load.requests_waiting,
                        "requestsRunning": load.requests_running,
                        "kvCacheUsage": load.kv_cache_usage,
                        "ttftSeconds": load.ttft_seconds,
                        "tpotSeconds": load.tpot_seconds,
                        "models": load.models,
                        "observedAtUnixMs": load.observed_at_unix_ms,
                    })),
                })
            })
            .collect();
        pods.sort_by(|a, b| a["pod"].as_str().cmp(&b["pod"].as_str()));
        json!({
            "controller": {
                "connected": self.controller.connected(),
                "lastError": self.controller.last_error(),
            },
            "snapshot": {
                "routeConfigVersion": table.as_ref().map(|t| t.version.clone()),
                "endpointLoadsVersion": self.store.loads_version(),
                "ageSeconds": table
                    .as_ref()
                    .and_then(|t| SystemTime::now().duration_since(t.applied_at).ok())
                    .map(|age| age.as_secs_f64()),
            },
            "pods": pods,
        })
    }

    fn routing_table(&self) -> serde_json::Value {
        let Some(table) = self.store.table() else {
            return json!({"version": null, "routes": []});
        };
        let routes: Vec<_> = table
            .routes
            .iter()
            .map(|route| {
                json!({
                    "route": route.key,
                    "modelName": route.model_name,
                    "loraAdapters": route.lora_adapters,
                    "rules": route.rules.iter().map(|rule| json!({
                        "name": rule.name,
                        "hasMatch": rule.matcher.is_some(),
                        "targets": rule.targets.servers().iter().map(|s| s.key.clone()).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let servers: Vec<_> = table
            .servers
            .iter()
            .map(|server| {
                json!({
                    "modelServer": server.key,
                    "model": server.model_rewrite,
                    "timeoutMs": server.timeout.map(|t| t.as_millis() as u64),
                    "pods": server.pods.iter().map(|p| json!({"pod": p.key, "address": p.addr.to_string()})).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({"version": table.version, "routes": routes, "modelServers": servers})
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::from(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn not_found() -> Response<ProxyBody> {
    json(StatusCode::NOT_FOUND, &json!({"message": "not found"}))
}
