//! The controller's HTTP endpoints, on two listeners.
//!
//! The admin listener (`--metrics-addr`), for probes and scrapers:
//! - `GET /healthz`: 200 while the process serves HTTP;
//! - `GET /readyz`: 200 once a RouteConfig has been published, else 503 with
//!   the reason (e.g. a source with no ModelRoute being held);
//! - `GET /metrics`: Prometheus text exposition of the controller's registry.
//!
//! The debug listener (`--debug-addr:--debug-port`, loopback by default:
//! the views show every pod IP and object, for operators on the node):
//! - `GET /debug/dataplanes`: every connected dataplane's sync state;
//! - `GET /debug/snapshot`: the published RouteConfig and EndpointLoads;
//! - `GET /debug/objects`: why each object was (not) accepted (the Gateway
//!   API kinds under `gateway_api`), the files or documents that could
//!   not be loaded, and the source's state;
//! - `GET /debug/config_dump/...`: the published snapshot in the dataplane's
//!   config dump shapes (see `switchyard_snapshot::config_dump`);
//! - `GET /debug/fairness`: the fleet-wide fairness counters, each user's
//!   total with every reporting dataplane's part, and the reports read.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use serde_json::{Value, json};
use switchyard_snapshot::{config_dump, pb};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::compile::{GatewayApiReports, LoadProblem, ObjectReport, ProviderReport};
use crate::fleet_fairness::FairnessBoard;
use crate::xds::{DataplaneRegistry, PublishedResource, SnapshotPublisher};

/// A client that has not sent its request headers by then is dropped, so idle
/// or malicious connections cannot pile up on the admin port.
pub const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop
/// does not spin at 100% CPU while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// What `/debug/objects` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ObjectsView {
    pub reports: Vec<ObjectReport>,
    /// ExternalModelProviders (credentials are never part of a report).
    pub providers: Vec<ProviderReport>,
    pub gateway_api: GatewayApiReports,
    pub load_problems: Vec<LoadProblem>,
    /// Whether the source is read and served, or held (see `crate::core::source_hold`).
    pub source: SourceStatus,
}

/// The source's state as `/debug/objects` and `/readyz` show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SourceStatus {
    /// `holding` while the first snapshot is held back, then `serving`.
    pub state: SourceState,
    /// Set when the first snapshot was published empty after the grace period.
    pub empty_after_grace: bool,
    /// Why the source cannot be read right now (the objects are the last read).
    pub error: Option<String>,
    /// One sentence for humans.
    pub message: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    #[default]
    Holding,
    Serving,
}

/// Everything the admin endpoints read.
#[derive(Clone, Debug)]
pub struct AdminState {
    pub metrics_registry: prometheus::Registry,
    pub publisher: Arc<SnapshotPublisher>,
    pub dataplanes: DataplaneRegistry,
    pub objects: watch::Receiver<Arc<ObjectsView>>,
    /// The fleet-wide fairness counters, for `/debug/fairness`.
    pub fairness: Arc<FairnessBoard>,
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// `/healthz`, `/readyz`, `/metrics`.
    Admin,
    /// `/debug/*`.
    Debug,
}

/// Serves `endpoints` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    endpoints: Endpoints,
    shutdown: impl Future<Output = ()>,
) {
    let state = Arc::new(state);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "admin server cannot accept a connection");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                };
                let state = state.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                        let response =
                            handle(&state, endpoints, request.method(), request.uri().path());
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let served = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(ADMIN_HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(error) = served {
                        tracing::debug!(%error, "admin connection ended with an error");
                    }
                });
            }
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Admin requests are short; cutting the ones in flight at shutdown is fine.
    connections.shutdown().await;
}

/// Answers one request to a listener serving `endpoints`.
pub fn handle(
    state: &AdminState,
    endpoints: Endpoints,
    method: &Method,
    path: &str,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        let mut response = json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "only GET is supported"}),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match endpoints {
        Endpoints::Admin => admin_endpoint(state, path),
        Endpoints::Debug => debug_endpoint(state, path),
    }
}

fn admin_endpoint(state: &AdminState, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/healthz" => json_response(StatusCode::OK, &json!({"status": "ok"})),
        "/readyz" => match state.publisher.route_config() {
            Some(published) => json_response(
                StatusCode::OK,
                &json!({"status": "ready", "route_config_version": published.version}),
            ),
            None => {
                let held = state.objects.borrow().source.message.clone();
                let reason = if held.is_empty() {
                    "no routing snapshot compiled yet".to_owned()
                } else {
                    held
                };
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "not ready", "reason": reason}),
                )
            }
        },
        "/metrics" => metrics_response(&state.metrics_registry),
        _ if path.starts_with("/debug/") => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "debug endpoints are served on the debug listener (--debug-addr, --debug-port)"}),
        ),
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
    }
}

fn debug_endpoint(state: &AdminState, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/debug/dataplanes" => json_response(
            StatusCode::OK,
            &json!({"dataplanes": state.dataplanes.list()}),
        ),
        "/debug/snapshot" => json_response(
            StatusCode::OK,
            &json!({
                "control_plane_id": state.publisher.control_plane_id(),
                "route_config": state.publisher.route_config().map(|published| published_json(&published)),
                "endpoint_loads": state.publisher.endpoint_loads().map(|published| published_json(&published)),
            }),
        ),
        "/debug/objects" => {
            let objects = state.objects.borrow().clone();
            json_response(StatusCode::OK, &*objects)
        }
        "/debug/fairness" => json_response(StatusCode::OK, &state.fairness.view()),
        _ => match path.strip_prefix("/debug/config_dump/") {
            Some(rest) => config_dump(state, rest),
            None => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
        },
    }
}

/// `/debug/config_dump/...`: the published snapshot in the same shapes as the
/// dataplane's dumps.
fn config_dump(state: &AdminState, rest: &str) -> Response<Full<Bytes>> {
    use switchyard_snapshot::config_dump;
    let Some(published) = state.publisher.route_config() else {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "no routing snapshot compiled yet"}),
        );
    };
    let Some(pb::snapshot_response::Resource::RouteConfig(config)) = &published.response.resource
    else {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "no routing snapshot compiled yet"}),
        );
    };
    let loads = state.publisher.endpoint_loads();
    let load_of = |namespace: &str, name: &str| -> Option<&pb::EndpointLoad> {
        match loads
            .as_deref()
            .and_then(|published| published.response.resource.as_ref())
        {
            Some(pb::snapshot_response::Resource::EndpointLoads(loads)) => loads
                .loads
                .iter()
                .find(|load| load.namespace == namespace && load.pod == name),
            _ => None,
        }
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let found = match segments.as_slice() {
        ["modelroutes"] => Some(config_dump::modelroutes(config)),
        ["modelservers"] => Some(config_dump::modelservers(config)),
        ["externalmodelproviders"] => Some(config_dump::externalmodelproviders(config)),
        ["pods"] => Some(config_dump::pods(config, load_of)),
        ["namespaces", namespace, "modelroutes", name] => {
            config_dump::find_modelroute(config, namespace, name)
        }
        ["namespaces", namespace, "modelservers", name] => {
            config_dump::find_modelserver(config, namespace, name)
        }
        ["namespaces", namespace, "pods", name] => {
            config_dump::pod(config, namespace, name, load_of(namespace, name))
        }
        _ => None,
    };
    match found {
        Some(value) => json_response(StatusCode::OK, &value),
        None => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("no object at /debug/config_dump/{rest} in the published snapshot")}),
        ),
    }
}

fn json_response<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let (status, body) = match serde_json::to_vec_pretty(body) {
        Ok(body) => (status, body),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{{\"error\":{:?}}}", error.to_string()).into_bytes(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn metrics_response(registry: &prometheus::Registry) -> Response<Full<Bytes>> {
    let encoder = prometheus::TextEncoder::new();
    match encoder.encode_to_string(&registry.gather()) {
        Ok(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            if let Ok(content_type) = header::HeaderValue::from_str(prometheus::TEXT_FORMAT) {
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, content_type);
            }
            response
        }
        Err(error) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"error": format!("encoding metrics failed: {error}")}),
        ),
    }
}

// prost types do not implement Serialize; these views are the debug JSON shape.

/// A published resource: its version, when it was generated, and its content.
fn published_json(published: &PublishedResource) -> Value {
    let mut view = match &published.response.resource {
        Some(pb::snapshot_response::Resource::RouteConfig(config)) => route_config_json(config),
        Some(pb::snapshot_response::Resource::EndpointLoads(loads)) => endpoint_loads_json(loads),
        None => return Value::Null,
    };
    view["version"] = json!(published.version);
    view["generated_at_unix_ms"] = json!(published.generated_at_unix_ms);
    view
}

fn route_config_json(config: &pb::RouteConfig) -> Value {
    json!({
        "routes": config.routes.iter().map(route_json).collect::<Vec<_>>(),
        "servers": config.servers.iter().map(server_json).collect::<Vec<_>>(),
        "external_providers": config.external_providers.iter().map(config_dump::external_provider).collect::<Vec<_>>(),
        "auth": config.auth.as_ref().map(auth_json),
        "tier_rate_limits": config.tier_rate_limits.iter().map(|tier| json!({
            "tier": tier.tier,
            "limit": tier.limit.as_ref().map(config_dump::rate_limit),
        })).collect::<Vec<_>>(),
        "fairness": config.fairness.as_ref().map(config_dump::fairness),
    })
}

/// What authentication is configured, kept minimal: how many API keys (no
/// digests), and the JWT settings with the issuer's key ids.
fn auth_json(auth: &pb::AuthConfig) -> Value {
    json!({
        "api_keys": auth.api_keys.len(),
        "jwt": auth.jwt.as_ref().map(|jwt| json!({
            "issuer": jwt.issuer,
            "audiences": jwt.audiences,
            "tier_claim": jwt.tier_claim,
            "key_ids": jwt.jwks_keys.iter().filter_map(|key| {
                serde_json::from_str::<Value>(key).ok()?.get("kid")?.as_str().map(str::to_owned)
            }).collect::<Vec<_>>(),
        })),
    })
}

fn route_json(route: &pb::ModelRoute) -> Value {
    json!({
        "namespace": route.namespace,
        "name": route.name,
        "model_name": route.model_name,
        "lora_adapters": route.lora_adapters,
        "creation_timestamp_unix_ms": route.creation_timestamp_unix_ms,
        "generation": route.generation,
        "rules": route.rules.iter().map(|rule| json!({
            "name": rule.name,
            "match": rule.r#match.as_ref().map(|model_match| json!({
                "headers": model_match.headers.iter().map(|header| json!({
                    "name": header.name,
                    "value": config_dump::string_match(header.value.as_ref()),
                })).collect::<Vec<_>>(),
                "uri": config_dump::string_match(model_match.uri.as_ref()),
                "body_model": config_dump::string_match(model_match.body_model.as_ref()),
            })),
            "targets": rule.targets.iter().map(|target| json!({
                "model_server": target.model_server,
                "weight": target.weight,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "rate_limit": route.rate_limit.as_ref().map(config_dump::rate_limit),
    })
}

fn server_json(server: &pb::ModelServer) -> Value {
    json!({
        "namespace": server.namespace,
        "name": server.name,
        "model": server.model,
        "inference_engine": server.inference_engine,
        "port": server.port,
        "generation": server.generation,
        "traffic_policy": server.traffic_policy.as_ref().map(|policy| json!({
            "timeout_ms": policy.timeout_ms,
            "retry_attempts": policy.retry_attempts,
            "retry_interval_ms": policy.retry_interval_ms,
        })),
        "endpoints": server.endpoints.iter().map(|endpoint| {
            let mut value = json!({"name": endpoint.name, "ip": endpoint.ip});
            if endpoint.bootstrap_port != 0 {
                value["bootstrap_port"] = endpoint.bootstrap_port.into();
            }
            value
        }).collect::<Vec<_>>(),
        "prefill_decode": server.prefill_decode.as_ref().map(|pd| json!({
            "kv_connector": pd.kv_connector().as_str_name(),
            "group_label": pd.group_label,
            "groups": pd.groups.iter().map(|group| json!({
                "name": group.name,
                "prefill": group.prefill,
                "decode": group.decode,
            })).collect::<Vec<_>>(),
        })),
    })
}

fn endpoint_loads_json(loads: &pb::EndpointLoads) -> Value {
    json!({
        "loads": loads.loads.iter().map(|load| json!({
            "namespace": load.namespace,
            "pod": load.pod,
            "requests_waiting": load.requests_waiting,
            "requests_running": load.requests_running,
            "kv_cache_usage": load.kv_cache_usage,
            "kv_cache_capacity_tokens": load.kv_cache_capacity_tokens,
            "ttft_seconds": load.ttft_seconds,
            "tpot_seconds": load.tpot_seconds,
            "models": load.models,
            "observed_at_unix_ms": load.observed_at_unix_ms,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::{PublishResult, XdsMetrics};
    use http_body_util::BodyExt;
    use switchyard_snapshot::test_builders as builders;

    fn state() -> (AdminState, watch::Sender<Arc<ObjectsView>>) {
        let registry = prometheus::Registry::new();
        let metrics = XdsMetrics::register(&registry).expect("metrics register");
        let (objects_sender, objects) = watch::channel(Arc::new(ObjectsView::default()));
        let state = AdminState {
            metrics_registry: registry,
            publisher: Arc::new(SnapshotPublisher::new("test-controller", metrics)),
            dataplanes: DataplaneRegistry::new(),
            objects,
            fairness: Arc::default(),
        };
        (state, objects_sender)
    }

    /// Publishes an empty RouteConfig generated at `generated_at_unix_ms`.
    fn publish_empty(state: &AdminState, generated_at_unix_ms: i64) -> PublishResult {
        let empty = pb::RouteConfig::default();
        state
            .publisher
            .publish_route_config(empty, generated_at_unix_ms)
    }

    /// `GET path` on the listener serving it.
    fn get(state: &AdminState, path: &str) -> Response<Full<Bytes>> {
        let endpoints = if path.starts_with("/debug/") {
            Endpoints::Debug
        } else {
            Endpoints::Admin
        };
        handle(state, endpoints, &Method::GET, path)
    }

    async fn body_bytes(response: Response<Full<Bytes>>) -> Bytes {
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
    }

    async fn body_json(response: Response<Full<Bytes>>) -> Value {
        serde_json::from_slice(&body_bytes(response).await).expect("JSON body")
    }

    #[tokio::test]
    async fn readiness_follows_the_first_publish() {
        let (state, objects) = state();
        assert_eq!(get(&state, "/healthz").status(), StatusCode::OK);
        let not_ready = get(&state, "/readyz");
        assert_eq!(not_ready.status(), StatusCode::SERVICE_UNAVAILABLE);

        assert_eq!(
            body_json(not_ready).await["reason"],
            "no routing snapshot compiled yet"
        );
        objects.send_replace(Arc::new(ObjectsView {
            source: SourceStatus {
                message: "the source holds no ModelRoute; ...".into(),
                ..SourceStatus::default()
            },
            ..ObjectsView::default()
        }));
        let held = body_json(get(&state, "/readyz")).await;
        assert_eq!(held["reason"], "the source holds no ModelRoute; ...");

        let published = publish_empty(&state, 1);
        let ready = get(&state, "/readyz");
        assert_eq!(ready.status(), StatusCode::OK);
        assert_eq!(
            body_json(ready).await["route_config_version"],
            published.version
        );
    }

    #[tokio::test]
    async fn snapshot_view_shows_routes_and_servers() {
        let (state, _objects) = state();
        let gold_prefix = pb::ModelMatch {
            headers: vec![pb::HeaderMatch {
                name: "x-tier".into(),
                value: Some(pb::StringMatch {
                    kind: Some(pb::string_match::Kind::Prefix("gold".into())),
                }),
            }],
            ..Default::default()
        };
        let config = builders::route_config(
            vec![builders::route_with_rules(
                "r",
                "m",
                vec![builders::rule(
                    "rule",
                    Some(gold_prefix),
                    &[("default/s", 100)],
                )],
            )],
            vec![builders::server("s", &[("p", "10.0.0.1")])],
        );
        let version = state.publisher.publish_route_config(config, 1234).version;
        let body = body_json(get(&state, "/debug/snapshot")).await;
        assert_eq!(body["control_plane_id"], "test-controller");
        assert_eq!(body["route_config"]["version"], version);
        assert_eq!(body["route_config"]["generated_at_unix_ms"], 1234);
        let rule = &body["route_config"]["routes"][0]["rules"][0];
        assert_eq!(
            rule["match"]["headers"][0],
            json!({"name": "x-tier", "value": {"prefix": "gold"}})
        );
        assert_eq!(
            rule["targets"][0],
            json!({"model_server": "default/s", "weight": 100})
        );
        assert_eq!(
            body["route_config"]["servers"][0]["endpoints"],
            json!([{"name": "p", "ip": "10.0.0.1"}])
        );
        assert_eq!(body["endpoint_loads"], Value::Null);
    }

    #[tokio::test]
    async fn snapshot_view_summarises_auth_without_key_digests() {
        let (state, _objects) = state();
        let digest = vec![0xab; 32];
        let config = pb::RouteConfig {
            auth: Some(pb::AuthConfig {
                api_keys: vec![pb::ApiKey {
                    key_sha256: digest.clone(),
                    user_id: "alice".into(),
                    tier: "gold".into(),
                }],
                jwt: Some(pb::JwtConfig {
                    issuer: "https://issuer".into(),
                    jwks_keys: vec![r#"{"kid":"k1","kty":"RSA","n":"AQAB","e":"AQAB"}"#.into()],
                    ..Default::default()
                }),
            }),
            tier_rate_limits: vec![pb::TierRateLimit {
                tier: "gold".into(),
                limit: Some(pb::RateLimit {
                    input_tokens_per_unit: 100,
                    unit: "minute".into(),
                    global_redis_address: "redis:6379".into(),
                    ..Default::default()
                }),
            }],
            ..Default::default()
        };
        state.publisher.publish_route_config(config, 1);
        let body = body_json(handle(
            &state,
            Endpoints::Debug,
            &Method::GET,
            "/debug/snapshot",
        ))
        .await;
        let auth = &body["route_config"]["auth"];
        assert_eq!(auth["api_keys"], 1);
        assert_eq!(auth["jwt"]["key_ids"], json!(["k1"]));
        assert_eq!(
            body["route_config"]["tier_rate_limits"][0]["limit"],
            json!({"inputTokensPerUnit": 100, "unit": "minute",
                   "global": {"redis": {"address": "redis:6379"}, "failureMode": "FailOpen"}})
        );
        let text = body.to_string();
        assert!(!text.contains("alice") && !text.contains("abab"), "{text}");
    }

    #[tokio::test]
    async fn config_dumps_show_the_published_snapshot() {
        let (state, _objects) = state();
        assert_eq!(
            get(&state, "/debug/config_dump/modelroutes").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let config = builders::route_config(
            vec![builders::route_with_rules("r", "m", Vec::new())],
            vec![builders::server("s", &[("p", "10.0.0.1")])],
        );
        state.publisher.publish_route_config(config, 1);
        let routes = body_json(get(&state, "/debug/config_dump/modelroutes")).await;
        assert_eq!(routes["modelroutes"][0]["spec"]["modelName"], "m");
        let servers = body_json(get(&state, "/debug/config_dump/modelservers")).await;
        assert_eq!(servers["modelservers"][0]["name"], "s");
        let pod = body_json(get(&state, "/debug/config_dump/namespaces/default/pods/p")).await;
        assert_eq!(pod["podInfo"]["podIP"], "10.0.0.1");
        assert_eq!(pod["modelServers"], json!(["default/s"]));
        assert_eq!(pod["metrics"], Value::Null);
        let missing = get(
            &state,
            "/debug/config_dump/namespaces/default/modelroutes/nope",
        );
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert!(body_json(missing).await["error"].is_string());
    }

    #[tokio::test]
    async fn objects_view_shows_the_latest_reports() {
        let (state, objects) = state();
        objects.send_replace(Arc::new(ObjectsView {
            reports: vec![],
            providers: vec![],
            gateway_api: GatewayApiReports::default(),
            load_problems: vec![LoadProblem {
                file: "routes.yaml".into(),
                document_index: Some(2),
                kind: Some("ModelRoute".into()),
                name: Some("r".into()),
                error: "spec: missing field `rules`".into(),
            }],
            ..ObjectsView::default()
        }));
        let body = body_json(get(&state, "/debug/objects")).await;
        assert_eq!(body["load_problems"][0]["file"], "routes.yaml");
        assert_eq!(body["load_problems"][0]["document_index"], 2);
        assert_eq!(body["reports"], json!([]));
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text() {
        let (state, _objects) = state();
        publish_empty(&state, 5_000);
        let response = get(&state, "/metrics");
        assert_eq!(response.status(), StatusCode::OK);
        let text = String::from_utf8(body_bytes(response).await.to_vec()).expect("UTF-8");
        assert!(
            text.contains("switchyard_controller_connected_dataplanes 0"),
            "{text}"
        );
        assert!(
            text.contains(
                "switchyard_controller_snapshot_generated_at_seconds{type=\"route_config\"} 5"
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_are_refused() {
        let (state, _objects) = state();
        assert_eq!(get(&state, "/nope").status(), StatusCode::NOT_FOUND);
        let post = handle(&state, Endpoints::Admin, &Method::POST, "/healthz");
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
    }

    #[tokio::test]
    async fn debug_views_are_only_on_the_debug_listener() {
        let (state, _objects) = state();
        publish_empty(&state, 1);
        for path in [
            "/debug/objects",
            "/debug/snapshot",
            "/debug/dataplanes",
            "/debug/fairness",
        ] {
            let on_admin = handle(&state, Endpoints::Admin, &Method::GET, path);
            assert_eq!(on_admin.status(), StatusCode::NOT_FOUND, "{path}");
            assert!(
                body_json(on_admin).await["error"]
                    .as_str()
                    .is_some_and(|error| error.contains("--debug-addr")),
                "{path}: says where they are"
            );
            let on_debug = handle(&state, Endpoints::Debug, &Method::GET, path);
            assert_eq!(on_debug.status(), StatusCode::OK, "{path}");
        }
        for path in ["/metrics", "/healthz", "/readyz"] {
            let on_debug = handle(&state, Endpoints::Debug, &Method::GET, path);
            assert_eq!(on_debug.status(), StatusCode::NOT_FOUND, "{path}");
            let on_admin = handle(&state, Endpoints::Admin, &Method::GET, path);
            assert_eq!(on_admin.status(), StatusCode::OK, "{path}");
        }
    }
}
