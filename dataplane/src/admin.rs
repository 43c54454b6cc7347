//! The metrics listener (`/metrics`, `/healthz`, `/readyz`) and the loopback
//! debug listener (`/debug/...`): read-only views of the dataplane's state.
//!
//! Debug endpoints (GET only; JSON; unknown objects answer 404 JSON):
//! - `/debug/router/state`: snapshot versions and age, controller connection,
//!   in-flight requests and engine load per pod;
//! - `/debug/routing/table`: the routes, rules and ModelServers in use;
//! - `/debug/model-servers`, `/debug/model-servers/{name}/status`,
//!   `/debug/model-servers/{name}/metrics`, `/debug/routing/backends`:
//!   health as this dataplane sees it (see [`crate::health::debug`]);
//! - `/debug/config_dump/{modelroutes,modelservers,externalmodelproviders,pods}` and
//!   `/debug/config_dump/namespaces/{ns}/{modelroutes,modelservers,pods}/{name}`:
//!   the snapshot in the Kthena router's dump shapes;
//! - `/debug/pd-groups`: every prefill/decode ModelServer's groups and pods;
//!   `/debug/pd-groups/{group}/status`: one group (in every ModelServer
//!   that has it) with its pods' state and the requests sent to each role;
//! - `/debug/kv-cache/connectors`: the KV connectors in use, which
//!   ModelServers use them, how each shapes the two legs, and (NIXL,
//!   Mooncake) how many prefill answers' `kv_transfer_params` were relayed;
//! - Gateway API mode: `/debug/gateways` (listeners, their ports and
//!   whether each port is open); the Inference Extension's
//!   `/debug/inference-extension/pools`,
//!   `/debug/inference-extension/pools/{pool}/endpoints` (`?namespace=`)
//!   and `/debug/inference-extension/decisions` (`?limit=`): the
//!   InferencePools, their endpoints' state and the scheduler's recent
//!   choices among them.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use serde_json::json;
use switchyard_runtime::clock;
use switchyard_snapshot::{config_dump, pb};

use crate::gateway::Hostname;
use crate::health;
use crate::listener_ports::PortStates;
use crate::metrics::RouterMetrics;
use crate::pod::PodState;
use crate::proxy::{ProxyBody, readiness_response};
use crate::routing::{KvConnector, Server};
use crate::scheduling::decisions::DECISION_SLOTS;
use crate::snapshot::{RoutingTable, SnapshotStore};
use crate::xds_client::ControllerStatus;

/// Shared state of both admin listeners.
#[derive(Debug, Clone)]
pub struct Admin {
    pub store: Arc<SnapshotStore>,
    pub controller: Arc<ControllerStatus>,
    pub metrics: Arc<RouterMetrics>,
    /// Whether each Gateway listener port is open.
    pub listener_ports: Arc<PortStates>,
}

impl Admin {
    /// The metrics port (and `/metrics` on the traffic port when exposed there).
    pub fn handle_metrics_port<B>(&self, request: &Request<B>) -> Response<ProxyBody> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/metrics") => self.render_metrics(),
            (&Method::GET, "/healthz") => json(StatusCode::OK, &json!({"message": "ok"})),
            (&Method::GET, "/readyz") => readiness_response(&self.store),
            _ => not_found("not found"),
        }
    }

    /// The debug port.
    pub fn handle_debug_port<B>(&self, request: &Request<B>) -> Response<ProxyBody> {
        let path = request.uri().path();
        if request.method() != Method::GET {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "debug endpoints are read-only: use GET",
            );
        }
        match path {
            "/debug/router/state" => json(StatusCode::OK, &self.router_state()),
            "/debug/routing/table" => json(StatusCode::OK, &self.routing_table()),
            "/debug/routing/decisions" => json(
                StatusCode::OK,
                &decisions_view(&self.store, request.uri().query()),
            ),
            "/debug/model-servers" => health_view(health::debug::model_servers(&self.store)),
            "/debug/routing/backends" => {
                health_view(health::debug::backends(&self.store, &self.metrics.health))
            }
            "/debug/pd-groups" => json(StatusCode::OK, &self.pd_groups()),
            "/debug/kv-cache/connectors" => json(StatusCode::OK, &self.kv_connectors()),
            "/debug/gateways" => json(StatusCode::OK, &self.gateways()),
            "/debug/inference-extension/pools" => json(StatusCode::OK, &self.inference_pools()),
            "/debug/inference-extension/decisions" => {
                json(StatusCode::OK, &self.pool_decisions(request.uri().query()))
            }
            _ => {
                if let Some(pool) = path
                    .strip_prefix("/debug/inference-extension/pools/")
                    .and_then(|rest| rest.strip_suffix("/endpoints"))
                {
                    return self.pool_endpoints(pool, request.uri().query());
                }
                if let Some(rest) = path.strip_prefix("/debug/config_dump/") {
                    return self.config_dump(rest);
                }
                if let Some(rest) = path.strip_prefix("/debug/model-servers/") {
                    return self.model_server(rest, request.uri().query());
                }
                match path
                    .strip_prefix("/debug/pd-groups/")
                    .and_then(|rest| rest.strip_suffix("/status"))
                {
                    Some(group) => self.pd_group_status(group),
                    None => not_found(&format!("no debug endpoint {path}")),
                }
            }
        }
    }

    /// `/debug/model-servers/{name}/status` and `.../metrics`.
    fn model_server(&self, rest: &str, query: Option<&str>) -> Response<ProxyBody> {
        let namespace = query_param(query, "namespace");
        match rest.split_once('/') {
            Some((name, "status")) => health_view(health::debug::status(
                &self.store,
                &self.metrics.health,
                name,
                namespace,
            )),
            Some((name, "metrics")) => {
                health_view(health::debug::engine_metrics(&self.store, name, namespace))
            }
            _ => not_found(&format!(
                "no debug endpoint /debug/model-servers/{rest}: use /debug/model-servers/{{name}}/status or /metrics"
            )),
        }
    }

    /// `/debug/pd-groups`.
    fn pd_groups(&self) -> serde_json::Value {
        let table = self.store.table();
        let servers: Vec<_> = table
            .iter()
            .flat_map(|table| table.servers.iter())
            .filter_map(|server| {
                let pd = server.prefill_decode.as_ref()?;
                let names = |pods: &[usize]| {
                    pods.iter()
                        .filter_map(|index| server.pods.get(*index))
                        .map(|pod| pod.key.clone())
                        .collect::<Vec<_>>()
                };
                Some(json!({
                    "modelServer": server.key,
                    "kvConnector": pd.connector.as_str(),
                    "groupKey": pd.group_label,
                    "groups": pd.groups.iter().map(|group| json!({
                        "group": group.name,
                        "complete": group.is_complete(),
                        "prefillPods": names(&group.prefill),
                        "decodePods": names(&group.decode),
                    })).collect::<Vec<_>>(),
                }))
            })
            .collect();
        json!({"modelServers": servers})
    }

    /// `/debug/pd-groups/{group}/status`.
    fn pd_group_status(&self, group_name: &str) -> Response<ProxyBody> {
        let table = self.store.table();
        let resolved = self.metrics.resolved();
        let now = clock::now();
        let servers: Vec<_> = table
            .iter()
            .flat_map(|table| table.servers.iter())
            .filter_map(|server| {
                let pd = server.prefill_decode.as_ref()?;
                let (index, group) = pd
                    .groups
                    .iter()
                    .enumerate()
                    .find(|(_, group)| group.name == group_name)?;
                let handles = resolved
                    .prefill_decode(&server.key)
                    .and_then(|handles| handles.groups.get(index));
                let requests = |role: usize| {
                    handles.map_or(0, |handles| {
                        handles
                            .requests
                            .values()
                            .map(|roles| roles[role].get())
                            .sum::<u64>()
                    })
                };
                let pods = |pods: &[usize]| {
                    pods.iter()
                        .filter_map(|index| server.pods.get(*index))
                        .map(|pod| self.pod_json(pod, now))
                        .collect::<Vec<_>>()
                };
                Some(json!({
                    "modelServer": server.key,
                    "kvConnector": pd.connector.as_str(),
                    "groupKey": pd.group_label,
                    "complete": group.is_complete(),
                    "prefillPods": pods(&group.prefill),
                    "decodePods": pods(&group.decode),
                    "requests": {"prefill": requests(0), "decode": requests(1)},
                    "routingDecisions": handles
                        .and_then(|handles| handles.decisions.as_ref())
                        .map_or(0, |decisions| decisions.get()),
                }))
            })
            .collect();
        if servers.is_empty() {
            return not_found(&format!(
                "no prefill/decode ModelServer has a group {group_name:?}"
            ));
        }
        json(
            StatusCode::OK,
            &json!({"group": group_name, "modelServers": servers}),
        )
    }

    /// `/debug/kv-cache/connectors`.
    fn kv_connectors(&self) -> serde_json::Value {
        let table = self.store.table();
        let resolved = self.metrics.resolved();
        let mut by_connector: Vec<(KvConnector, Vec<&Arc<crate::routing::Server>>)> = Vec::new();
        for server in table.iter().flat_map(|table| table.servers.iter()) {
            let Some(pd) = &server.prefill_decode else {
                continue;
            };
            match by_connector.iter_mut().find(|(c, _)| *c == pd.connector) {
                Some((_, servers)) => servers.push(server),
                None => by_connector.push((pd.connector, vec![server])),
            }
        }
        let connectors: Vec<_> = by_connector
            .into_iter()
            .map(|(connector, servers)| {
                let mut view = json!({
                    "type": connector.as_str(),
                    "modelServers": servers.iter().map(|s| s.key.clone()).collect::<Vec<_>>(),
                    "legs": connector_legs(connector),
                });
                if connector.relays_kv_transfer_params() {
                    let count = |outcome: usize| {
                        servers
                            .iter()
                            .filter_map(|server| resolved.prefill_decode(&server.key))
                            .filter_map(|handles| handles.kv_transfer_params.as_ref())
                            .map(|counters| counters[outcome].get())
                            .sum::<u64>()
                    };
                    view["kvTransferParams"] = json!({"relayed": count(0), "missing": count(1)});
                }
                view
            })
            .collect();
        json!({"connectors": connectors})
    }

    fn gateways(&self) -> serde_json::Value {
        let table = self.store.table();
        let gateways = table.as_ref().map(|table| &table.gateways);
        let ports = self.listener_ports.snapshot();
        let listeners: Vec<_> = gateways
            .into_iter()
            .flat_map(|gateways| {
                gateways.listeners.iter().map(|listener| {
                    let is_default = listener.gateway == gateways.default_gateway;
                    json!({
                        "gateway": listener.gateway,
                        "listener": listener.name,
                        "port": listener.port,
                        "hostname": match &listener.hostname {
                            Hostname::Any => None,
                            Hostname::Exact(host) => Some(host.clone()),
                            Hostname::Wildcard(suffix) => Some(format!("*{suffix}")),
                        },
                        "servedOn": if is_default { "traffic port".to_owned() } else { format!("port {}", listener.port) },
                    })
                })
            })
            .collect();
        json!({
            "defaultGateway": gateways.map(|g| g.default_gateway.clone()).filter(|g| !g.is_empty()),
            "listeners": listeners,
            "ports": ports.iter().map(|(port, state)| match state {
                Ok(workers) => json!({"port": port, "open": true, "workers": workers, "error": null}),
                Err(error) => json!({"port": port, "open": false, "workers": 0, "error": error}),
            }).collect::<Vec<_>>(),
        })
    }

    /// The InferencePools of the snapshot in use.
    fn pools(&self) -> Vec<Arc<Server>> {
        let table = self.store.table();
        let pools = table.iter().flat_map(|table| table.gateways.pools.values());
        pools.cloned().collect()
    }

    fn inference_pools(&self) -> serde_json::Value {
        let now = clock::now();
        let mut pools: Vec<_> = self
            .pools()
            .iter()
            .map(|pool| {
                let (namespace, name) = pool.key.split_once('/').unwrap_or(("", &pool.key));
                json!({
                    "namespace": namespace,
                    "name": name,
                    "endpoints": pool.pods.len(),
                    "ejectedEndpoints": pool.pods.iter().filter(|pod| pod.is_ejected(now)).count(),
                    "inFlight": pool.pods.iter().map(|pod| pod.in_flight()).sum::<u64>(),
                })
            })
            .collect();
        pools.sort_by(|a, b| {
            (a["namespace"].as_str(), a["name"].as_str())
                .cmp(&(b["namespace"].as_str(), b["name"].as_str()))
        });
        json!({"pools": pools})
    }

    /// `/debug/inference-extension/pools/{pool}/endpoints`: every endpoint
    /// of the pools of that name (in `?namespace=` when given).
    fn pool_endpoints(&self, name: &str, query: Option<&str>) -> Response<ProxyBody> {
        let namespace = query_param(query, "namespace");
        let now = clock::now();
        let mut pools = self.pools();
        pools.retain(|pool| {
            pool.key.split_once('/').is_some_and(|(ns, pool_name)| {
                pool_name == name && namespace.is_none_or(|wanted| wanted == ns)
            })
        });
        if pools.is_empty() {
            return not_found(&format!("no InferencePool {name:?} in the snapshot"));
        }
        pools.sort_by(|a, b| a.key.cmp(&b.key));
        let pools: Vec<_> = pools
            .iter()
            .map(|pool| json!({
                "pool": pool.key,
                "endpoints": pool.pods.iter().map(|pod| self.pod_json(pod, now)).collect::<Vec<_>>(),
            }))
            .collect();
        json(StatusCode::OK, &json!({"pools": pools}))
    }

    /// The recent scheduling decisions among InferencePool endpoints.
    fn pool_decisions(&self, query: Option<&str>) -> serde_json::Value {
        let table = self.store.table();
        let pools = table.as_ref().map(|table| &table.gateways.pools);
        let mut view = decisions_view(&self.store, query);
        if let Some(decisions) = view["decisions"].as_array_mut() {
            decisions.retain(|decision| {
                decision["modelServer"]
                    .as_str()
                    .is_some_and(|server| pools.is_some_and(|pools| pools.contains_key(server)))
            });
            for decision in decisions.iter_mut() {
                if let Some(object) = decision.as_object_mut()
                    && let Some(pool) = object.remove("modelServer")
                {
                    object.insert("inferencePool".to_owned(), pool);
                }
            }
        }
        view
    }

    fn pod_json(&self, pod: &PodState, now: clock::Instant) -> serde_json::Value {
        let local = pod.health.local_ejection(now);
        json!({
            "pod": pod.key,
            "address": pod.addr.to_string(),
            "inFlight": pod.in_flight(),
            "ejected": pod.is_ejected(now),
            "consecutiveFailures": pod.health.failure_load(),
            "ejection": pod.health.ejection_remaining(now).map(|left| json!({
                "remainingMs": u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
                // Ejected on this dataplane's own evidence, else on another's
                // (through the controller).
                "byThisDataplane": local.is_some(),
                "reason": local.map(|(_, cause)| cause.as_str()),
            })),
            "load": pod.load().map(|load| json!({
                "requestsWaiting": load.requests_waiting,
                "requestsRunning": load.requests_running,
                "kvCacheUsage": load.kv_cache_usage,
                "kvCacheCapacityTokens": load.kv_cache_capacity_tokens,
                "ttftSeconds": load.ttft_seconds,
                "tpotSeconds": load.tpot_seconds,
                "models": load.models,
                "observedAtUnixMs": self.store.scheduling().observed_at(&load),
            })),
        })
    }

    fn config_dump(&self, rest: &str) -> Response<ProxyBody> {
        let Some(table) = self.store.table() else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "router_not_ready",
                "no routing snapshot received from the controller yet",
            );
        };
        let config = &table.source.decode();
        let segments: Vec<&str> = rest.split('/').collect();
        match segments.as_slice() {
            ["modelroutes"] => json(StatusCode::OK, &config_dump::modelroutes(config)),
            ["modelservers"] => json(StatusCode::OK, &config_dump::modelservers(config)),
            ["externalmodelproviders"] => {
                json(StatusCode::OK, &config_dump::externalmodelproviders(config))
            }
            ["pods"] => {
                let loads = pod_loads(&table);
                json(
                    StatusCode::OK,
                    &config_dump::pods(config, |namespace, name| {
                        loads
                            .get(&switchyard_snapshot::object_key(namespace, name))
                            .map(|load| &**load)
                    }),
                )
            }
            ["namespaces", namespace, kind, name] => {
                let found = match *kind {
                    "modelroutes" => config_dump::find_modelroute(config, namespace, name),
                    "modelservers" => config_dump::find_modelserver(config, namespace, name),
                    "pods" => {
                        let load = table
                            .pods
                            .get(&switchyard_snapshot::object_key(namespace, name))
                            .and_then(|pod| pod.load());
                        config_dump::pod(config, namespace, name, load.as_deref())
                    }
                    _ => {
                        return not_found(&format!(
                            "unknown object kind {kind:?}: use modelroutes, modelservers or pods"
                        ));
                    }
                };
                match found {
                    Some(value) => json(StatusCode::OK, &value),
                    None => not_found(&format!(
                        "{} {namespace}/{name} not found in the routing snapshot",
                        kind.trim_end_matches('s')
                    )),
                }
            }
            _ => not_found(&format!("no config dump /debug/config_dump/{rest}")),
        }
    }

    fn render_metrics(&self) -> Response<ProxyBody> {
        self.metrics.refresh_state(&self.store, &self.controller);
        self.metrics.health.refresh(&self.store);
        match self.metrics.render() {
            Ok(buffer) => {
                let mut response = Response::new(ProxyBody::from(Bytes::from(buffer)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static(prometheus::TEXT_FORMAT),
                );
                response
            }
            Err(encode_error) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics_encoding_failed",
                &format!("failed to encode metrics: {encode_error}"),
            ),
        }
    }

    fn router_state(&self) -> serde_json::Value {
        let table = self.store.table();
        let now = clock::now();
        let mut pods: Vec<_> = table
            .iter()
            .flat_map(|t| t.pods.values())
            .map(|pod| self.pod_json(pod, now))
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
                    .and_then(|t| clock::wall_now().duration_since(t.applied_at).ok())
                    .map(|age| age.as_secs_f64()),
            },
            "pods": pods,
            "fairness": {
                "config": table
                    .as_ref()
                    .and_then(|t| t.source.decode().fairness)
                    .as_ref()
                    .map(switchyard_snapshot::config_dump::fairness),
                "queues": self.store.fairness().views(),
            },
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
                    "timeoutMs": u64::try_from(server.timeout.as_millis()).unwrap_or(u64::MAX),
                    "outlierDetection": {
                        "consecutiveFailures": server.outlier.settings.consecutive_failures,
                        "baseEjectionTimeMs": u64::try_from(server.outlier.settings.base_ejection_time.as_millis()).unwrap_or(u64::MAX),
                        "maxEjectionTimeMs": u64::try_from(server.outlier.settings.max_ejection_time.as_millis()).unwrap_or(u64::MAX),
                        "maxEjectionPercent": server.outlier.settings.max_ejection_percent,
                    },
                    "pods": server.pods.iter().map(|p| json!({"pod": p.key, "address": p.addr.to_string()})).collect::<Vec<_>>(),
                })
            })
            .collect();
        // The Debug of a provider names it and its URL, never its headers (the credential).
        let providers: Vec<_> = table
            .providers
            .iter()
            .filter_map(|server| server.provider.as_ref().map(|provider| (server, provider)))
            .map(|(server, provider)| {
                json!({
                    "externalModelProvider": server.key,
                    "providerType": provider.kind.as_str(),
                    "model": server.model_rewrite,
                    "provider": format!("{provider:?}"),
                })
            })
            .collect();
        json!({
            "version": table.version,
            "routes": routes,
            "modelServers": servers,
            "externalModelProviders": providers,
        })
    }
}

fn health_view(view: Result<serde_json::Value, health::debug::LookupError>) -> Response<ProxyBody> {
    use health::debug::LookupError;
    match view {
        Ok(value) => json(StatusCode::OK, &value),
        Err(LookupError::NotReady) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "router_not_ready",
            "no routing snapshot received from the controller yet",
        ),
        Err(LookupError::NotFound(message)) => not_found(&message),
        Err(LookupError::Ambiguous(message)) => {
            error(StatusCode::CONFLICT, "ambiguous_name", &message)
        }
    }
}

/// How a connector shapes the two legs of a request, for humans.
fn connector_legs(connector: KvConnector) -> &'static str {
    match connector {
        KvConnector::Http | KvConnector::Lmcache => {
            "prefill (a one-token copy of the request) answered and discarded, then decode (the client's request)"
        }
        KvConnector::Nixl | KvConnector::Mooncake => {
            "prefill (a one-token copy with kv_transfer_params {do_remote_decode: true, do_remote_prefill: false}), then decode (the client's request with the prefill answer's kv_transfer_params)"
        }
        KvConnector::Sglang => {
            "prefill and decode at once, both with the prefill pod's bootstrap_host (and bootstrap_port when annotated) and one random bootstrap_room; a failed decode cancels the prefill"
        }
    }
}

fn pod_loads(table: &RoutingTable) -> HashMap<String, Arc<pb::EndpointLoad>> {
    table
        .pods
        .iter()
        .filter_map(|(key, pod)| pod.load().map(|load| (key.clone(), load)))
        .collect()
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

/// An OpenAI-style error body, as on the traffic port.
fn error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    json(
        status,
        &json!({"error": {"message": message, "type": "invalid_request_error", "code": code}}),
    )
}

fn not_found(message: &str) -> Response<ProxyBody> {
    error(StatusCode::NOT_FOUND, "not_found", message)
}

/// Decisions returned when the query does not say `?limit=N`.
const DEFAULT_DECISIONS_SHOWN: usize = 50;

/// The value of the query parameter `name`, as sent.
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        pair.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
    })
}

/// The `/debug/routing/decisions` body: the scheduler configuration in use
/// and the most recent decisions (`?limit=N`, newest first).
fn decisions_view(store: &SnapshotStore, query: Option<&str>) -> serde_json::Value {
    let limit = query_param(query, "limit")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(DEFAULT_DECISIONS_SHOWN)
        .min(DECISION_SLOTS);
    let scheduler = store.table().map(|table| {
        let effective = &table.scheduler.effective;
        json!({
            "filters": effective.filters,
            "scores": effective.scores.iter().map(|s| json!({"name": s.name, "weight": s.weight})).collect::<Vec<_>>(),
            "topN": effective.top_n,
            "fromSnapshot": table.scheduler.from_snapshot,
        })
    });
    json!({
        "scheduler": scheduler,
        "decisions": store.scheduling().decisions.recent(limit),
    })
}
