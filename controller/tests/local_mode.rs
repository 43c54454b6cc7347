//! Local mode end to end: YAML files -> compile -> snapshot stream, with a fake
//! engine to scrape, the admin endpoints, and a file edit reaching the client.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use switchyard_controller::app;
use switchyard_controller::cli::Args;
use switchyard_controller::error::{ControllerError, EXIT_NO_INPUT};
use switchyard_snapshot::{ROUTE_CONFIG_TYPE_URL, pb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use support::dataplane::Dataplane;
use support::fake_api::DEADLINE;
use support::{GPU_USAGE_ROUTER_CONFIG, assert_gpu_usage_scheduler_shipped};

const METRICS_PAGE: &str = "\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 5.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25
";

const MODELS: &str =
    r#"{"object":"list","data":[{"id":"m","object":"model"},{"id":"lora-a","object":"model"}]}"#;

/// Serves a fixed vLLM `/metrics` page and `/v1/models` list on loopback.
struct FakeEngine {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl FakeEngine {
    async fn start() -> Self {
        let (listener, addr) = support::loopback_listener().await;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = service_fn(
                        |request: hyper::Request<hyper::body::Incoming>| async move {
                            let body = match request.uri().path() {
                                "/metrics" => METRICS_PAGE,
                                "/v1/models" => MODELS,
                                _ => "",
                            };
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(body.as_bytes()),
                            )))
                        },
                    );
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn args(config_dir: &Path) -> Args {
    Args {
        config_dir: Some(config_dir.to_owned()),
        ..Args::for_test()
    }
}

/// Writes the ModelServer `s1` and its pod `fake-0`, an engine on
/// `engine_port`, and the routes of [`write_routes`].
fn write_config(dir: &Path, engine_port: u16, model: &str) {
    let servers = include_str!("config/local_mode_servers.yaml");
    let servers = servers.replace("ENGINE_PORT", &engine_port.to_string());
    std::fs::write(dir.join("10-servers.yaml"), servers).expect("write servers");
    write_routes(dir, model);
}

/// Writes the route `main` for `model` to `s1`, and a route with an invalid regex.
fn write_routes(dir: &Path, model: &str) {
    let routes = include_str!("config/local_mode_routes.yaml").replace("MODEL", model);
    std::fs::write(dir.join("20-routes.yaml"), routes).expect("write routes");
}

/// A bare HTTP/1.1 GET; returns the status code and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect admin");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut response = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .expect("read response");
    let response = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    (status, body.to_owned())
}

async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = http_get(addr, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("JSON body")
}

fn route_models(response: &pb::SnapshotResponse) -> Option<Vec<String>> {
    match &response.resource {
        Some(pb::snapshot_response::Resource::RouteConfig(config)) => Some(
            config
                .routes
                .iter()
                .map(|route| route.model_name.clone())
                .collect(),
        ),
        _ => None,
    }
}

#[tokio::test]
async fn local_mode_serves_files_loads_and_edits() {
    let engine = FakeEngine::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    write_config(dir.path(), engine.addr.port(), "m1");
    let controller = app::start_local(&args(dir.path()))
        .await
        .expect("controller starts");

    // Ready at once: the first snapshot is published before start_local returns.
    let ready = get_json(controller.admin_addr, "/readyz").await;
    assert_eq!(ready["status"], "ready");
    let objects = get_json(controller.debug_addr, "/debug/objects").await;
    let broken = objects["reports"]
        .as_array()
        .expect("reports")
        .iter()
        .find(|report| report["name"] == "broken")
        .expect("report for the broken route");
    assert_eq!(broken["accepted"]["status"], false);
    assert_eq!(broken["accepted"]["reason"], "InvalidRegex");
    assert!(
        broken["accepted"]["message"].as_str().is_some_and(
            |message| message.starts_with("spec.rules[0].modelMatch.uri.regex: invalid regex")
        ),
        "{broken}"
    );

    let mut dataplane = Dataplane::connect(controller.xds_addr, "dataplane-under-test").await;
    let routes = dataplane
        .next_matching(|response| route_models(response).is_some())
        .await;
    assert_eq!(
        route_models(&routes),
        Some(vec!["m1".to_owned()]),
        "the broken route is left out"
    );
    assert_eq!(routes.control_plane_id, "test-controller");

    // The scraper finds the fake engine through the Pod file and its load reaches the stream.
    let loads = dataplane
        .next_matching(|response| match &response.resource {
            Some(pb::snapshot_response::Resource::EndpointLoads(loads)) => !loads.loads.is_empty(),
            _ => false,
        })
        .await;
    let Some(pb::snapshot_response::Resource::EndpointLoads(loads)) = loads.resource else {
        panic!("EndpointLoads expected");
    };
    let load = &loads.loads[0];
    assert_eq!(
        (load.namespace.as_str(), load.pod.as_str()),
        ("default", "fake-0")
    );
    assert_eq!(load.requests_waiting, 3.0);
    assert_eq!(load.requests_running, 5.0);
    assert_eq!(load.kv_cache_usage, 0.25);
    // Scraped in the latest pass: dated by the set, not the entry.
    assert_eq!(load.observed_at_unix_ms, 0);
    assert!(loads.observed_at_unix_ms > 0);

    // Editing a file reroutes the dataplane.
    write_routes(dir.path(), "m2");
    let rerouted = dataplane
        .next_matching(|response| route_models(response).is_some_and(|models| models == ["m2"]))
        .await;
    assert_eq!(rerouted.type_url, ROUTE_CONFIG_TYPE_URL);
    assert_ne!(rerouted.version_info, routes.version_info);

    let dataplanes = get_json(controller.debug_addr, "/debug/dataplanes").await;
    assert_eq!(
        dataplanes["dataplanes"][0]["node_id"],
        "dataplane-under-test"
    );
    let snapshot = get_json(controller.debug_addr, "/debug/snapshot").await;
    assert_eq!(snapshot["route_config"]["routes"][0]["model_name"], "m2");
    let (status, metrics) = http_get(controller.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("switchyard_controller_connected_dataplanes 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "switchyard_controller_compile_duration_seconds_count{type=\"route_config\"}"
        ),
        "{metrics}"
    );

    controller.shutdown().await.expect("clean shutdown");
    // Responses queued before the shutdown may still arrive; then the stream ends cleanly.
    let drained = async {
        loop {
            match dataplane.responses.message().await {
                Ok(Some(_)) => continue,
                end => return end,
            }
        }
    };
    let end = tokio::time::timeout(DEADLINE, drained)
        .await
        .expect("stream ends with the controller");
    assert!(matches!(end, Ok(None)), "clean end of stream, got {end:?}");
}

#[tokio::test]
async fn a_missing_config_dir_is_a_startup_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let error = app::start_local(&args(&dir.path().join("missing")))
        .await
        .expect_err("cannot start without the directory");
    assert!(matches!(error, ControllerError::Config(_)), "{error}");
    assert_eq!(error.exit_code(), EXIT_NO_INPUT);
}

#[test]
fn without_config_dir_and_without_cluster_credentials_the_binary_exits_78() {
    let home = tempfile::tempdir().expect("tempdir");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard-controller"))
        .env_remove("SWITCHYARD_CONFIG_DIR")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("HOME", home.path())
        .env("KUBECONFIG", home.path().join("no-such-kubeconfig"))
        .env("SWITCHYARD_XDS_ADDR", "127.0.0.1:0")
        .env("SWITCHYARD_METRICS_ADDR", "127.0.0.1:0")
        .output()
        .expect("run the binary");
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no Kubernetes credentials"), "{stderr}");
    assert!(stderr.contains("--config-dir"), "{stderr}");
}

#[tokio::test]
async fn router_config_is_shipped_in_the_route_config_and_invalid_files_stop_startup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = dir.path().join("objects");
    std::fs::create_dir(&objects).expect("objects dir");
    write_config(&objects, 9, "m");
    let router_config = dir.path().join("router.yaml");

    std::fs::write(
        &router_config,
        "scheduler:\n  plugins:\n    Score: {enabled: [{name: fastest}]}\n",
    )
    .expect("write");
    let with_file = Args {
        router_config: Some(router_config.clone()),
        ..args(&objects)
    };
    let error = app::start_local(&with_file)
        .await
        .expect_err("an invalid router configuration stops startup");
    assert!(
        error
            .to_string()
            .contains("unknown score plugin \"fastest\""),
        "{error}"
    );
    assert_eq!(error.exit_code(), 64);

    std::fs::write(&router_config, GPU_USAGE_ROUTER_CONFIG).expect("write");
    let controller = app::start_local(&with_file).await.expect("starts");
    assert_gpu_usage_scheduler_shipped(&controller.publisher);
    controller.shutdown().await.expect("clean shutdown");
}

/// What local mode cannot use is said in `/debug/objects`: fields set but
/// not acted on (in the object's report), a dangling symbolic link and a Pod
/// defined twice (in the load problems), a pod with an unusable address (in
/// its ModelServer's report).
#[tokio::test]
async fn debug_objects_report_ignored_fields_dangling_links_duplicate_pods_and_bad_ips() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_config(dir.path(), 9, "m");
    std::fs::write(
        dir.path().join("30-gateway.yaml"),
        "apiVersion: networking.serving.volcano.sh/v1alpha1\nkind: ModelRoute\n\
         metadata: { name: gateway-bound }\n\
         spec:\n  modelName: g\n\
         \x20 rules: [{ name: default, modelMatch: { uri: {} }, targetModels: [{ modelServerName: s1 }] }]\n",
    )
    .expect("write");
    std::os::unix::fs::symlink("..data/pods.yaml", dir.path().join("40-pods.yaml"))
        .expect("symlink");
    std::fs::write(
        dir.path().join("50-more-pods.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: { name: fake-0, labels: { app: fake } }\n\
         status: { phase: Running, podIP: 127.0.0.9, conditions: [{ type: Ready, status: \"True\" }] }\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: { name: fake-zero, labels: { app: fake } }\n\
         status: { phase: Running, podIP: 0.0.0.0, conditions: [{ type: Ready, status: \"True\" }] }\n",
    )
    .expect("write");
    let controller = app::start_local(&args(dir.path()))
        .await
        .expect("controller starts");
    let objects = get_json(controller.debug_addr, "/debug/objects").await;
    let reports = objects["reports"].as_array().expect("reports");
    let gateway = reports
        .iter()
        .find(|report| report["name"] == "gateway-bound")
        .expect("report");
    assert_eq!(gateway["accepted"]["status"], true);
    let paths: Vec<&str> = gateway["ignored_fields"]
        .as_array()
        .expect("ignored fields")
        .iter()
        .filter_map(|field| field["path"].as_str())
        .collect();
    assert_eq!(
        paths,
        ["spec.rules[0].modelMatch.uri"],
        "parentRefs and rateLimit are acted on"
    );
    let problems: Vec<(&str, &str)> = objects["load_problems"]
        .as_array()
        .expect("load problems")
        .iter()
        .map(|problem| {
            (
                problem["file"].as_str().unwrap_or_default(),
                problem["error"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        problems,
        [
            ("40-pods.yaml", "dangling symbolic link to ..data/pods.yaml"),
            (
                "50-more-pods.yaml",
                "duplicate Pod default/fake-0: 10-servers.yaml already defines it (files are read in name order); this one is ignored"
            ),
        ]
    );
    let server = reports
        .iter()
        .find(|report| report["name"] == "s1")
        .expect("report");
    assert_eq!(server["resolved_refs"]["reason"], "InvalidPodIP");
    assert!(
        server["resolved_refs"]["message"]
            .as_str()
            .is_some_and(|message| message
                .ends_with("fake-zero: status.podIP \"0.0.0.0\" is the unspecified address")),
        "{server}"
    );
    assert_eq!(objects["source"]["state"], "serving");
    controller.shutdown().await.expect("clean shutdown");
}
