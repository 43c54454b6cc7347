//! Kubernetes mode against an in-process fake API server (no cluster, no
//! socket to it): the exact list/watch requests, the pod label selector, the
//! leader Lease, the server-side-apply status patches, the Events for a
//! rejected object, the snapshot a dataplane receives, and a watch event
//! reaching status.

mod support;

use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use switchyard_controller::cli::Args;
use switchyard_controller::core::{self, Controller};
use switchyard_controller::kubernetes::KubernetesSource;
use switchyard_runtime::CancellationToken;
use switchyard_runtime::clock::unix_ms_now;
use switchyard_snapshot::pb;

use support::dataplane::Dataplane;
use support::fake_api::{DEADLINE, FakeApi, Recorded};
use support::kubernetes::{
    API_VERSION, condition, kubernetes_args, metadata, model_server, ready_pod, start, stop,
};
use support::{GPU_USAGE_ROUTER_CONFIG, assert_gpu_usage_scheduler_shipped, shipped_scheduler};

const ROUTES: &str = "/apis/networking.serving.volcano.sh/v1alpha1/modelroutes";
const SERVERS: &str = "/apis/networking.serving.volcano.sh/v1alpha1/modelservers";
const PODS: &str = "/api/v1/pods";
/// Stands in for every `lastTransitionTime` in the README's rendering (the real ones are "now").
const README_TIME: &str = "2026-12-01T17:00:05Z";

fn args() -> Args {
    Args {
        controller_id: Some("switchyard-controller-7d9f-abcde".into()),
        ..kubernetes_args()
    }
}

fn route(name: &str, generation: i64, server: &str) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "ModelRoute",
        "metadata": metadata(name, generation),
        "spec": {
            "modelName": name,
            "rules": [{"name": "default", "targetModels": [{"modelServerName": server}]}],
        },
    })
}

fn seeded() -> FakeApi {
    let fake = FakeApi::default();
    fake.seed(SERVERS, model_server("llama", "llama", "vLLM"));
    fake.seed(PODS, ready_pod("llama-0", "llama", "127.0.0.1"));
    fake.seed(ROUTES, route("chat", 2, "llama"));
    fake.seed(ROUTES, route("broken", 1, "gone"));
    fake
}

/// Polls `condition` until it holds; panics with `what` after [`DEADLINE`].
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    tokio::time::timeout(DEADLINE, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect(what);
}

/// The model names of `route_config`'s routes, in order.
fn model_names(route_config: &pb::RouteConfig) -> Vec<&str> {
    route_config
        .routes
        .iter()
        .map(|route| route.model_name.as_str())
        .collect()
}

fn is_event_post(request: &Recorded) -> bool {
    request.method == Method::POST
        && request.path == "/apis/events.k8s.io/v1/namespaces/default/events"
}

/// The first status patch of `plural`/`name` (waits for it).
async fn status_patch(fake: &FakeApi, plural: &str, name: &str) -> Recorded {
    fake.wait_for(&format!("{plural}/{name} status"), |request| {
        is_status_patch(request, plural, name)
    })
    .await
}

fn is_status_patch(request: &Recorded, plural: &str, name: &str) -> bool {
    request.method == Method::PATCH
        && request.path
            == format!(
                "/apis/networking.serving.volcano.sh/v1alpha1/namespaces/default/{plural}/{name}/status"
            )
}

#[tokio::test]
async fn kubernetes_mode_watches_compiles_serves_and_writes_status() {
    let fake = seeded();
    let controller = start(&args(), &fake).await;

    // List then watch, cluster-wide, for each kind; pods only with the label the ModelServers select on.
    for collection in [ROUTES, SERVERS] {
        let list = fake
            .wait_for("a list", |request| {
                request.path == collection && !request.params().contains_key("watch")
            })
            .await;
        assert_eq!(list.method, Method::GET);
        fake.wait_for("a watch", |request| {
            request.path == collection
                && request.params().get("watch").map(String::as_str) == Some("true")
        })
        .await;
    }
    let pod_list = fake
        .wait_for("the pod list", |request| request.path == PODS)
        .await;
    assert_eq!(
        pod_list.params().get("labelSelector").map(String::as_str),
        Some("app in (llama)"),
        "{pod_list:?}"
    );

    // The stream serves the compiled cluster state.
    let mut dataplane = Dataplane::connect(controller.xds_addr, "dataplane-0").await;
    let route_config = dataplane.next_route_config().await;
    assert_eq!(
        model_names(&route_config),
        ["chat"],
        "the broken route is left out"
    );
    assert_eq!(route_config.servers.len(), 1);
    assert_eq!(route_config.servers[0].endpoints[0].name, "llama-0");
    assert_eq!(route_config.servers[0].endpoints[0].ip, "127.0.0.1");

    // This replica wins the election: its identity holds the Lease.
    let lease = fake
        .wait_for("the lease taken", |request| {
            request.method == Method::PATCH
                && request.path == "/apis/coordination.k8s.io/v1/namespaces/switchyard-system/leases/switchyard-controller"
                && request.body["spec"]["holderIdentity"] == "switchyard-controller-7d9f-abcde"
        })
        .await;
    assert_eq!(lease.body["spec"]["leaseDurationSeconds"], 15);

    // Status: server-side apply on the status subresource, forced, as switchyard-controller,
    // and Programmed once the dataplane ACKed.
    let patch = fake
        .wait_for("chat programmed", |request| {
            is_status_patch(request, "modelroutes", "chat")
                && condition(&request.body["status"], "Programmed")["status"] == "True"
        })
        .await;
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    let params = patch.params();
    assert_eq!(
        params.get("fieldManager").map(String::as_str),
        Some("switchyard-controller")
    );
    assert_eq!(params.get("force").map(String::as_str), Some("true"));
    assert_eq!(patch.body["apiVersion"], API_VERSION);
    assert_eq!(patch.body["kind"], "ModelRoute");
    let status = &patch.body["status"];
    assert_eq!(status["observedGeneration"], 2);
    let version = &route_config_version(&controller);
    assert_eq!(
        condition(status, "Programmed")["message"],
        format!("1/1 dataplanes at version {version}")
    );
    for type_ in ["Accepted", "ResolvedRefs", "Programmed"] {
        assert_eq!(
            condition(status, type_)["status"],
            "True",
            "{type_}: {status}"
        );
        assert_eq!(condition(status, type_)["observedGeneration"], 2);
    }

    // Only the leader writes status: no status patch came before the lease was taken.
    let requests = fake.requests();
    let lease_taken = requests
        .iter()
        .position(|request| {
            request.method == Method::PATCH
                && request.body["spec"]["holderIdentity"] == "switchyard-controller-7d9f-abcde"
        })
        .expect("lease taken");
    let first_status = requests
        .iter()
        .position(|request| request.method == Method::PATCH && request.path.ends_with("/status"))
        .expect("a status patch");
    assert!(
        lease_taken < first_status,
        "status was written before leading"
    );

    let metrics = admin_get(controller.admin_addr, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|line| line == "switchyard_controller_leader 1"),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|line| line.starts_with(
            "switchyard_controller_status_writes_total{kind=\"ModelRoute\",result=\"applied\"}"
        )),
        "{metrics}"
    );

    // The broken route: accepted, its backend named as missing, and a Warning Event.
    let broken = status_patch(&fake, "modelroutes", "broken").await;
    let resolved = condition(&broken.body["status"], "ResolvedRefs");
    assert_eq!(resolved["status"], "False");
    assert_eq!(resolved["reason"], "BackendNotFound");
    assert!(
        resolved["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with(
                "spec.rules[0].targetModels[0].modelServerName: ModelServer default/gone not found"
            ),
        "{resolved}"
    );
    assert_eq!(
        condition(&broken.body["status"], "Programmed")["reason"],
        "NotInSnapshot"
    );
    let event = fake.wait_for("an event for broken", is_event_post).await;
    assert_eq!(event.body["type"], "Warning");
    assert_eq!(event.body["reason"], "BackendNotFound");
    assert_eq!(event.body["regarding"]["kind"], "ModelRoute");
    assert_eq!(event.body["regarding"]["name"], "broken");
    assert_eq!(event.body["regarding"]["uid"], "uid-broken");
    assert_eq!(event.body["reportingController"], "switchyard-controller");

    // The ModelServer: pod counts.
    let server = status_patch(&fake, "modelservers", "llama").await;
    assert_eq!(server.body["kind"], "ModelServer");
    assert_eq!(server.body["status"]["readyPods"], 1);
    assert_eq!(server.body["status"]["totalPods"], 1);
    assert_eq!(server.body["status"]["observedGeneration"], 1);

    // A watch event: the broken route now targets llama; its status follows.
    fake.push_event(ROUTES, "MODIFIED", route("broken", 2, "llama"))
        .await;
    let fixed = fake
        .wait_for("broken fixed", |request| {
            is_status_patch(request, "modelroutes", "broken")
                && request.body["status"]["observedGeneration"] == 2
        })
        .await;
    assert_eq!(
        condition(&fixed.body["status"], "ResolvedRefs")["status"],
        "True"
    );
    assert_eq!(
        condition(&fixed.body["status"], "Accepted")["status"],
        "True"
    );

    // A new ModelServer selecting another app: the pod watch restarts with both values.
    fake.push_event(SERVERS, "ADDED", model_server("qwen", "qwen", "SGLang"))
        .await;
    fake.wait_for("the pod list with the new selector", |request| {
        request.path == PODS
            && request.params().get("labelSelector").map(String::as_str)
                == Some("app in (llama,qwen)")
    })
    .await;
    let qwen = status_patch(&fake, "modelservers", "qwen").await;
    assert_eq!(
        condition(&qwen.body["status"], "ResolvedRefs")["reason"],
        "NoMatchingPods"
    );

    // The README shows this very object, as `kubectl get modelroute chat -o yaml` would.
    let rendered = readme_rendering(&route("chat", 2, "llama"), status);
    println!("{rendered}");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    assert!(
        readme.contains(&rendered),
        "README's `kubectl get modelroute chat -o yaml` block is out of date; replace it with:\n{rendered}"
    );

    stop(controller).await;
    // Shutting down hands the lease over: its holder is cleared.
    fake.wait_for("the lease released", |request| {
        request.method == Method::PATCH
            && request.path.ends_with("/leases/switchyard-controller")
            && request.body["spec"].get("holderIdentity") == Some(&Value::Null)
    })
    .await;
}

fn route_config_version(controller: &Controller) -> String {
    controller
        .publisher
        .route_config()
        .map(|published| published.version.clone())
        .unwrap_or_default()
}

/// The object with the applied status, its transition times pinned, as YAML.
fn readme_rendering(object: &Value, status: &Value) -> String {
    let mut object = object.clone();
    let mut status = status.clone();
    if let Some(conditions) = status["conditions"].as_array_mut() {
        for condition in conditions {
            condition["lastTransitionTime"] = json!(README_TIME);
        }
    }
    object["status"] = status;
    serde_yaml::to_string(&object).expect("YAML")
}

#[tokio::test]
async fn an_expired_lease_of_another_replica_is_taken_over() {
    let fake = seeded();
    fake.seed_lease(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "switchyard-controller", "namespace": "switchyard-system", "resourceVersion": "7"},
        "spec": {
            "holderIdentity": "switchyard-controller-old",
            "leaseDurationSeconds": 15,
            "acquireTime": "2026-12-01T16:00:00.000000Z",
            "renewTime": "2026-12-01T16:00:00.000000Z",
        },
    }));
    let controller = start(&args(), &fake).await;
    fake.wait_for("the lease taken over", |request| {
        request.method == Method::PATCH
            && request.path.ends_with("/leases/switchyard-controller")
            && request.body["spec"]["holderIdentity"] == "switchyard-controller-7d9f-abcde"
    })
    .await;
    // And then this replica writes status.
    fake.wait_for("a status patch", |request| {
        is_status_patch(request, "modelroutes", "chat")
    })
    .await;
    stop(controller).await;
}

/// GET on the admin server; the body of a 200.
async fn admin_get(addr: std::net::SocketAddr, path: &str) -> String {
    let (status, body) = admin_request(addr, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// GET on the admin server; the status code and body.
async fn admin_request(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect admin");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut response))
        .await
        .expect("admin answers in time")
        .expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// No snapshot is served before every cache has listed the cluster
/// and the first compile is published. The fake holds the ModelRoute list
/// back (and says when it arrived), so the "before" state is certain, not timed.
#[tokio::test]
async fn the_stream_is_served_only_after_the_caches_synced_and_the_first_compile() {
    let fake = seeded();
    let hold = fake.hold_lists(ROUTES);
    let starting = tokio::time::timeout(DEADLINE, core::begin(&args(), CancellationToken::new()))
        .await
        .expect("admin up in time")
        .expect("begins");
    let admin_addr = starting.admin_addr;
    let publisher = starting.publisher.clone();
    let ready = tokio::spawn(
        starting.start(KubernetesSource::new(&args(), fake.client()).expect("valid flags")),
    );
    fake.wait_for("the held ModelRoute list", |request| {
        request.path == ROUTES && !request.params().contains_key("watch")
    })
    .await;

    // Held: not ready, nothing compiled or published, and no stream server
    // (its address exists only once `start` returns).
    let (status, body) = admin_request(admin_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(publisher.route_config().is_none());
    assert!(publisher.endpoint_loads().is_none());
    assert!(
        !ready.is_finished(),
        "ready before the ModelRoute list was answered"
    );
    assert!(
        !fake
            .requests()
            .iter()
            .any(|request| request.path.contains("/leases")),
        "no election before the caches synced"
    );

    hold.release();
    let controller = tokio::time::timeout(DEADLINE, ready)
        .await
        .expect("ready in time")
        .expect("start task")
        .expect("starts once the list is answered");
    let body = admin_get(admin_addr, "/readyz").await;
    let version = route_config_version(&controller);
    assert!(body.contains(&version), "{body}");
    // The very first snapshot a dataplane sees already holds the route that was held back.
    let mut dataplane = Dataplane::connect(controller.xds_addr, "dataplane-0").await;
    let route_config = dataplane.next_route_config().await;
    assert_eq!(model_names(&route_config), ["chat"]);
    stop(controller).await;
}

/// A successful but empty ModelRoute list at start holds the first snapshot
/// (and the stream server) instead of wiping the dataplanes that would
/// reconnect to this replica; the first ModelRoute ends the hold at once.
/// (The grace period's expiry is tested on paused time in `core::source_hold`.)
#[tokio::test]
async fn an_empty_route_list_at_start_holds_the_first_snapshot_until_a_route_appears() {
    let fake = FakeApi::default();
    let starting = tokio::time::timeout(DEADLINE, core::begin(&args(), CancellationToken::new()))
        .await
        .expect("admin up in time")
        .expect("begins");
    let admin_addr = starting.admin_addr;
    let debug_addr = starting.debug_addr;
    let publisher = starting.publisher.clone();
    let ready = tokio::spawn(
        starting.start(KubernetesSource::new(&args(), fake.client()).expect("valid flags")),
    );
    let held = tokio::time::timeout(DEADLINE, async {
        loop {
            let (status, body) = admin_request(admin_addr, "/readyz").await;
            if body.contains("holds no ModelRoute") {
                return (status, body);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the hold shows in /readyz");
    assert_eq!(held.0, 503, "{}", held.1);
    let objects: Value =
        serde_json::from_str(&admin_get(debug_addr, "/debug/objects").await).expect("JSON");
    assert_eq!(objects["source"]["state"], "holding");
    let metrics = admin_get(admin_addr, "/metrics").await;
    assert!(
        metrics.contains("switchyard_controller_source_held 1"),
        "{metrics}"
    );
    assert!(publisher.route_config().is_none(), "nothing published");
    assert!(!ready.is_finished(), "no stream server while holding");

    fake.push_event(ROUTES, "ADDED", route("chat", 1, "llama"))
        .await;
    let controller = tokio::time::timeout(DEADLINE, ready)
        .await
        .expect("ready in time")
        .expect("start task")
        .expect("starts once a route appears");
    assert!(controller.publisher.route_config().is_some(), "published");
    let objects: Value =
        serde_json::from_str(&admin_get(debug_addr, "/debug/objects").await).expect("JSON");
    assert_eq!(objects["reports"][0]["name"], "chat");
    assert_eq!(objects["source"]["state"], "serving");
    assert_eq!(objects["source"]["empty_after_grace"], false);
    assert!(
        admin_get(admin_addr, "/metrics")
            .await
            .contains("switchyard_controller_source_held 0")
    );
    stop(controller).await;
}

#[tokio::test]
async fn namespaces_limit_the_watches_to_those_namespaces() {
    let fake = FakeApi::default();
    let args = Args {
        namespaces: vec!["team-b".into(), "team-a".into()],
        // An empty cluster: no hold (the hold has its own test).
        empty_source_grace_period: Duration::ZERO,
        ..args()
    };
    let controller = start(&args, &fake).await;
    for namespace in ["team-a", "team-b"] {
        for plural in ["modelroutes", "modelservers"] {
            let path = format!(
                "/apis/networking.serving.volcano.sh/v1alpha1/namespaces/{namespace}/{plural}"
            );
            fake.wait_for(&path, |request| request.path == path).await;
        }
    }
    assert!(
        fake.requests()
            .iter()
            .all(|request| request.path != ROUTES && request.path != SERVERS),
        "no cluster-wide watch"
    );
    // An empty cluster still compiles (an empty snapshot) and serves, and says so.
    assert!(controller.publisher.route_config().is_some());
    let objects: Value =
        serde_json::from_str(&admin_get(controller.debug_addr, "/debug/objects").await)
            .expect("JSON");
    assert_eq!(objects["source"]["state"], "serving");
    assert_eq!(objects["source"]["empty_after_grace"], true);
    stop(controller).await;
}

/// `--router-config` (in a cluster: the mounted ConfigMap) reaches the
/// snapshot in Kubernetes mode too, and an edit follows without a restart.
#[tokio::test]
async fn the_router_configuration_is_shipped_in_kubernetes_mode() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("routerConfiguration.yaml");
    std::fs::write(&path, GPU_USAGE_ROUTER_CONFIG).expect("write");
    let fake = FakeApi::default();
    let args = Args {
        router_config: Some(path.clone()),
        empty_source_grace_period: Duration::ZERO,
        ..args()
    };
    let controller = start(&args, &fake).await;
    assert_gpu_usage_scheduler_shipped(&controller.publisher);

    std::fs::write(
        &path,
        "scheduler:\n  topN: 2\n  plugins:\n    Score: {enabled: [{name: least-request, weight: 1}]}\n",
    )
    .expect("edit");
    wait_until("the edit is shipped", || {
        shipped_scheduler(&controller.publisher).map(|s| s.top_n) == Some(2)
    })
    .await;
    stop(controller).await;
}

const SECRETS: &str = "/api/v1/secrets";

fn secret(name: &str, labelled: bool, string_data: Value) -> Value {
    let labels = if labelled {
        json!({"switchyard.dev/api-key": "true"})
    } else {
        json!({})
    };
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": "switchyard-system",
            "labels": labels,
            "resourceVersion": "1",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": string_data.to_string()},
        },
        "data": string_data.as_object().map(|fields| fields.iter().map(|(name, value)| {
            use base64::Engine as _;
            let bytes = value.as_str().unwrap_or_default().as_bytes();
            (name.clone(), json!(base64::engine::general_purpose::STANDARD.encode(bytes)))
        }).collect::<serde_json::Map<_, _>>()),
    })
}

/// API keys are the labelled Secrets of the controller's namespace, watched
/// with the label selector; only their digests reach the snapshot, and a new
/// key arrives with a watch event.
#[tokio::test]
async fn api_key_secrets_of_the_controller_namespace_reach_the_snapshot_as_digests() {
    let fake = seeded();
    fake.seed(
        SECRETS,
        secret(
            "alice",
            true,
            json!({"key": "sk-alice", "user": "alice", "tier": "gold"}),
        ),
    );
    fake.seed(
        SECRETS,
        secret("db-password", false, json!({"password": "hunter2"})),
    );
    fake.seed(SECRETS, secret("broken", true, json!({"user": "nobody"})));
    let controller = start(&args(), &fake).await;
    let watch = fake
        .requests()
        .into_iter()
        .find(|request| {
            request.path.ends_with("/secrets") && request.params().contains_key("watch")
        })
        .expect("a Secret watch");
    assert_eq!(watch.path, "/api/v1/namespaces/switchyard-system/secrets");
    assert_eq!(
        watch.params().get("labelSelector").map(String::as_str),
        Some("switchyard.dev/api-key=true")
    );
    let keys = || match controller
        .publisher
        .route_config()
        .and_then(|published| published.response.resource.clone())
    {
        Some(pb::snapshot_response::Resource::RouteConfig(config)) => {
            config.auth.map(|auth| auth.api_keys).unwrap_or_default()
        }
        _ => Vec::new(),
    };
    let shipped = keys();
    assert_eq!(shipped.len(), 1, "{shipped:?}");
    assert_eq!(
        (shipped[0].user_id.as_str(), shipped[0].tier.as_str()),
        ("alice", "gold")
    );
    use sha2::Digest;
    assert_eq!(
        shipped[0].key_sha256,
        sha2::Sha256::digest(b"sk-alice").to_vec()
    );

    fake.push_event(
        SECRETS,
        "ADDED",
        secret("bob", true, json!({"key": "sk-bob", "user": "bob"})),
    )
    .await;
    wait_until("the new key is shipped", || keys().len() == 2).await;
    stop(controller).await;
}

const CONFIGMAPS: &str = "/api/v1/configmaps";
const OWN_REPORT: &str = "/api/v1/namespaces/switchyard-system/configmaps/switchyard-dataplanes-switchyard-controller-7d9f-abcde";

/// Another replica's dataplane report, as that replica would apply it.
fn peer_report(replica: &str, renewed_at_unix_ms: i64, dataplanes: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": format!("switchyard-dataplanes-{replica}"),
            "namespace": "switchyard-system",
            "labels": {"app.kubernetes.io/component": "dataplane-report"},
        },
        "data": {"report.json": json!({
            "replica": replica,
            "renewedAtUnixMs": renewed_at_unix_ms,
            "dataplanes": dataplanes,
        }).to_string()},
    })
}

fn reported(node: &str, acked: &str, nacked: Option<(&str, &str)>) -> Value {
    let mut route_config = json!({"subscribed": true, "ackedVersion": acked});
    if let Some((version, error)) = nacked {
        route_config["nackedVersion"] = json!(version);
        route_config["lastNackError"] = json!(error);
    }
    json!({"nodeId": node, "routeConfig": route_config, "endpointLoads": {"subscribed": true}})
}

/// `Programmed` counts the dataplanes of every controller replica.
/// This replica reports its own dataplanes in a ConfigMap; as leader it reads
/// the other replicas' reports, skips expired ones, and counts the rest.
#[tokio::test]
async fn programmed_counts_the_dataplanes_connected_to_every_replica() {
    let fake = seeded();
    let controller = start(&args(), &fake).await;
    let mut dataplane = Dataplane::connect(controller.xds_addr, "dataplane-0").await;
    dataplane.next_route_config().await;
    let version = route_config_version(&controller);

    // Its own report: server-side apply, labelled, with the ACK of its dataplane.
    let report = fake
        .wait_for("this replica's report with its dataplane", |request| {
            request.method == Method::PATCH
                && request.path == OWN_REPORT
                && request.body["data"]["report.json"]
                    .as_str()
                    .is_some_and(|text| text.contains(&version))
        })
        .await;
    assert_eq!(
        report.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(
        report.params().get("fieldManager").map(String::as_str),
        Some("switchyard-controller")
    );
    assert_eq!(
        report.body["metadata"]["labels"]["app.kubernetes.io/component"],
        "dataplane-report"
    );
    let own: Value = serde_json::from_str(
        report.body["data"]["report.json"]
            .as_str()
            .unwrap_or_default(),
    )
    .expect("report JSON");
    assert_eq!(own["replica"], "switchyard-controller-7d9f-abcde");
    assert_eq!(own["dataplanes"][0]["nodeId"], "dataplane-0");
    assert_eq!(
        own["dataplanes"][0]["routeConfig"]["ackedVersion"],
        version.as_str()
    );

    // Alone, it counts its one dataplane.
    fake.wait_for("chat programmed by one dataplane", |request| {
        is_status_patch(request, "modelroutes", "chat")
            && condition(&request.body["status"], "Programmed")["message"]
                == format!("1/1 dataplanes at version {version}")
    })
    .await;

    // Another replica serves two more dataplanes; a third replica died long ago.
    fake.push_event(
        CONFIGMAPS,
        "ADDED",
        peer_report(
            "switchyard-controller-7d9f-fghij",
            unix_ms_now(),
            json!([
                reported("dataplane-1", &version, None),
                reported("dataplane-2", &version, None)
            ]),
        ),
    )
    .await;
    fake.push_event(
        CONFIGMAPS,
        "ADDED",
        peer_report(
            "switchyard-controller-dead",
            unix_ms_now() - 10 * 60 * 1000,
            json!([reported("dataplane-9", "rc-old", None)]),
        ),
    )
    .await;
    let merged = fake
        .wait_for("chat programmed by three dataplanes", |request| {
            is_status_patch(request, "modelroutes", "chat")
                && condition(&request.body["status"], "Programmed")["message"]
                    == format!("3/3 dataplanes at version {version}")
        })
        .await;
    assert_eq!(
        condition(&merged.body["status"], "Programmed")["status"],
        "True"
    );
    let list = fake
        .wait_for("the report list", |request| {
            request.method == Method::GET
                && request.path == "/api/v1/namespaces/switchyard-system/configmaps"
        })
        .await;
    assert_eq!(
        list.params().get("labelSelector").map(String::as_str),
        Some("app.kubernetes.io/component=dataplane-report")
    );

    // A NACK from a dataplane on the other replica shows in the condition.
    fake.push_event(
        CONFIGMAPS,
        "MODIFIED",
        peer_report(
            "switchyard-controller-7d9f-fghij",
            unix_ms_now(),
            json!([
                reported("dataplane-1", &version, None),
                reported(
                    "dataplane-2",
                    "rc-old",
                    Some((&version, "scheduler: unknown plugin"))
                ),
            ]),
        ),
    )
    .await;
    let rejected = fake
        .wait_for("chat rejected on the other replica", |request| {
            is_status_patch(request, "modelroutes", "chat")
                && condition(&request.body["status"], "Programmed")["reason"]
                    == "RejectedByDataplane"
        })
        .await;
    assert_eq!(
        condition(&rejected.body["status"], "Programmed")["message"],
        format!(
            "2/3 dataplanes at version {version}; rejected by dataplane-2: scheduler: unknown plugin"
        )
    );
    assert_eq!(
        condition(&rejected.body["status"], "Programmed")["status"],
        "False"
    );

    stop(controller).await;
    // Stopping withdraws its report, so the next leader does not wait for it to expire.
    fake.wait_for("the report deleted", |request| {
        request.method == Method::DELETE && request.path == OWN_REPORT
    })
    .await;
}

/// Fields the router does not act on yet: a condition on the object and one
/// Warning Event each, as a `kubectl describe` would show them.
#[tokio::test]
async fn fields_set_but_not_acted_on_get_a_condition_and_a_warning_event() {
    let fake = seeded();
    let mut gateway_route = route("gateway-bound", 1, "llama");
    gateway_route["spec"]["rules"][0]["modelMatch"] = json!({"uri": {}});
    fake.seed(ROUTES, gateway_route);
    let controller = start(&args(), &fake).await;
    let patch = status_patch(&fake, "modelroutes", "gateway-bound").await;
    let ignored = condition(&patch.body["status"], "IgnoredFields");
    assert_eq!(ignored["status"], "True");
    assert_eq!(ignored["reason"], "NotImplemented");
    assert!(
        ignored["message"].as_str().is_some_and(|message| message
            .contains("spec.rules[0].modelMatch.uri: sets none of exact, prefix or regex")),
        "{ignored}"
    );
    assert_eq!(
        condition(&patch.body["status"], "Accepted")["status"],
        "True"
    );
    let event = fake
        .wait_for("the IgnoredFields event", |request| {
            is_event_post(request) && request.body["regarding"]["name"] == "gateway-bound"
        })
        .await;
    assert_eq!(event.body["type"], "Warning");
    assert_eq!(event.body["reason"], "IgnoredFields");
    assert_eq!(event.body["note"], ignored["message"]);
    // A route without such fields carries no IgnoredFields condition.
    let chat = status_patch(&fake, "modelroutes", "chat").await;
    assert_eq!(
        condition(&chat.body["status"], "IgnoredFields"),
        &Value::Null
    );
    stop(controller).await;
}

const PROVIDERS: &str = "/apis/networking.serving.volcano.sh/v1alpha1/externalmodelproviders";

fn provider(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "ExternalModelProvider",
        "metadata": metadata(name, 3),
        "spec": spec,
    })
}

/// ExternalModelProviders are watched cluster-wide and their credential
/// Secrets by label; each gets `Ready` and `CredentialsResolved` written by
/// the leader. Without TLS on the stream a provider with a credential is not
/// Ready (the credential is never shipped); one without needs none.
#[tokio::test]
async fn providers_get_ready_and_credentials_resolved_conditions() {
    let fake = seeded();
    fake.seed(
        SECRETS,
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "openai-credentials",
                "namespace": "default",
                "labels": {"networking.serving.volcano.sh/external-model-provider-credential": "true"},
                "resourceVersion": "1",
            },
            "data": {"api-key": "c2stazhzLXNlY3JldA=="},
        }),
    );
    let with_key = |key: &str| {
        json!({
            "baseURL": "https://api.openai.com/v1",
            "auth": {"secretRef": {"name": "openai-credentials", "key": key}},
        })
    };
    fake.seed(PROVIDERS, provider("openai", with_key("api-key")));
    fake.seed(PROVIDERS, provider("no-key", with_key("other")));
    fake.seed(
        PROVIDERS,
        provider(
            "keyless",
            json!({"baseURL": "https://llm.internal", "providerType": "Anthropic"}),
        ),
    );
    let controller = start(&args(), &fake).await;
    let watch = fake
        .wait_for("a credential Secret watch", |request| {
            request.path == SECRETS && request.params().contains_key("watch")
        })
        .await;
    assert_eq!(
        watch.params().get("labelSelector").map(String::as_str),
        Some("networking.serving.volcano.sh/external-model-provider-credential=true")
    );
    let status_of = |name: &'static str| {
        let fake = fake.clone();
        async move {
            fake.wait_for(name, |request| {
                is_status_patch(request, "externalmodelproviders", name)
            })
            .await
            .body["status"]
                .clone()
        }
    };
    let reasons = |status: &Value| {
        (
            condition(status, "Ready")["status"]
                .as_str()
                .map(str::to_owned),
            condition(status, "Ready")["reason"]
                .as_str()
                .map(str::to_owned),
            condition(status, "CredentialsResolved")["reason"]
                .as_str()
                .map(str::to_owned),
        )
    };
    let openai = status_of("openai").await;
    assert_eq!(openai["observedGeneration"], 3);
    assert_eq!(
        reasons(&openai),
        (
            Some("False".into()),
            Some("InsecureSnapshotStream".into()),
            Some("CredentialResolved".into())
        )
    );
    assert_eq!(
        reasons(&status_of("no-key").await),
        (
            Some("False".into()),
            Some("CredentialKeyNotFound".into()),
            Some("CredentialKeyNotFound".into())
        )
    );
    assert_eq!(
        reasons(&status_of("keyless").await),
        (
            Some("True".into()),
            Some("Ready".into()),
            Some("CredentialNotRequired".into())
        )
    );
    // A Warning Event says why a provider is not Ready.
    fake.wait_for("an Event for openai", |request| {
        request.method == Method::POST
            && request.path.ends_with("/events")
            && request.body["reason"] == "InsecureSnapshotStream"
    })
    .await;
    for request in fake.requests() {
        assert!(
            !request.body.to_string().contains("sk-k8s-secret"),
            "a credential was sent to the API server: {request:?}"
        );
    }
    stop(controller).await;
}
