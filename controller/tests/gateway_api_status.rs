//! Gateway API mode in Kubernetes mode against the fake API server: the
//! default GatewayClass and Gateway created when absent, and the status of
//! each kind (GatewayClass, Gateway with its listeners and addresses,
//! HTTPRoute parents, InferencePool parents, a ModelRoute bound by
//! parentRefs) written with server-side apply.

mod support;

use http::Method;
use serde_json::json;
use switchyard_controller::cli::Args;
use switchyard_snapshot::pb;

use support::dataplane::Dataplane;
use support::fake_api::{FakeApi, Recorded};
use support::kubernetes::{
    API_VERSION, condition, kubernetes_args, metadata, model_server, ready_pod, start, stop,
};

const GATEWAY_API: &str = "/apis/gateway.networking.k8s.io/v1";
const INFERENCE_API: &str = "/apis/inference.networking.k8s.io/v1";
const CRD_API: &str = "/apis/networking.serving.volcano.sh/v1alpha1";

fn args() -> Args {
    Args {
        enable_gateway_api: true,
        enable_gateway_api_inference_extension: true,
        lease_namespace: "kthena-system".into(),
        gateway_class_name: "kthena-router".into(),
        gateway_addresses: vec!["192.0.2.10".into(), "gw.example.com".into()],
        ..kubernetes_args()
    }
}

fn seeded() -> FakeApi {
    let fake = FakeApi::default();
    fake.seed("/api/v1/pods", ready_pod("llama-0", "llama", "127.0.0.1"));
    fake.seed("/api/v1/pods", ready_pod("pool-0", "pool", "127.0.0.2"));
    fake.seed(
        &format!("{CRD_API}/modelservers"),
        model_server("llama", "llama", "vLLM"),
    );
    fake.seed(
        &format!("{CRD_API}/modelroutes"),
        json!({
            "apiVersion": API_VERSION,
            "kind": "ModelRoute",
            "metadata": metadata("bound", 1),
            "spec": {
                "modelName": "bound",
                "parentRefs": [{"name": "default", "namespace": "kthena-system", "kind": "Gateway"}],
                "rules": [{"name": "default", "targetModels": [{"modelServerName": "llama"}]}],
            },
        }),
    );
    fake.seed(
        &format!("{INFERENCE_API}/inferencepools"),
        json!({
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": metadata("pool", 3),
            "spec": {
                "targetPorts": [{"number": 8000}, {"number": 8001}],
                "selector": {"matchLabels": {"app": "pool"}},
                "endpointPickerRef": {"name": "unused", "port": {"number": 9002}},
            },
        }),
    );
    fake.seed(
        &format!("{GATEWAY_API}/httproutes"),
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": metadata("to-pool", 2),
            "spec": {
                "parentRefs": [{"name": "default", "namespace": "kthena-system"}],
                "rules": [
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                     "backendRefs": [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "pool"}]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/mirror"}}],
                     "filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "elsewhere", "port": 80}}}],
                     "backendRefs": [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "pool"}]},
                ],
            },
        }),
    );
    fake
}

fn is_status_patch(request: &Recorded, path: &str) -> bool {
    request.method == Method::PATCH && request.path == format!("{path}/status")
}

#[tokio::test]
async fn gateway_api_kinds_get_their_default_objects_and_status() {
    let fake = seeded();
    let controller = start(&args(), &fake).await;

    // A dataplane that ACKs: listeners are Programmed once dataplanes serve them.
    // The snapshot ACKed once it holds the default Gateway the leader creates.
    let mut dataplane = Dataplane::connect(controller.xds_addr, "dataplane-0").await;
    let response = dataplane
        .next_matching(|response| {
            matches!(
                &response.resource,
                Some(pb::snapshot_response::Resource::RouteConfig(config))
                    if !config.default_gateway.is_empty()
            )
        })
        .await;
    let Some(pb::snapshot_response::Resource::RouteConfig(config)) = response.resource else {
        panic!("a RouteConfig");
    };

    // The leader creates the GatewayClass and the default Gateway the cluster lacks.
    let class = fake
        .wait_for("the GatewayClass created", |request| {
            request.method == Method::POST
                && request.path == format!("{GATEWAY_API}/gatewayclasses")
        })
        .await;
    assert_eq!(class.body["metadata"]["name"], "kthena-router");
    let gateway = fake
        .wait_for("the default Gateway created", |request| {
            request.method == Method::POST
                && request.path == format!("{GATEWAY_API}/namespaces/kthena-system/gateways")
        })
        .await;
    assert_eq!(gateway.body["metadata"]["name"], "default");

    let class = fake
        .wait_for("the GatewayClass status", |request| {
            is_status_patch(
                request,
                &format!("{GATEWAY_API}/gatewayclasses/kthena-router"),
            )
        })
        .await;
    assert_eq!(
        class.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(
        condition(&class.body["status"], "Accepted")["status"],
        "True"
    );

    let gateway = fake
        .wait_for("the Gateway's Programmed status", |request| {
            is_status_patch(
                request,
                &format!("{GATEWAY_API}/namespaces/kthena-system/gateways/default"),
            ) && condition(&request.body["status"], "Programmed")["status"] == "True"
        })
        .await;
    let status = &gateway.body["status"];
    assert_eq!(condition(status, "Accepted")["status"], "True", "{status}");
    assert_eq!(
        status["addresses"],
        json!([{"type": "IPAddress", "value": "192.0.2.10"}, {"type": "Hostname", "value": "gw.example.com"}])
    );
    let listener = &status["listeners"][0];
    assert_eq!(listener["name"], "default");
    assert_eq!(
        listener["attachedRoutes"], 2,
        "the HTTPRoute and the bound ModelRoute: {listener}"
    );
    for type_ in ["Accepted", "ResolvedRefs", "Programmed"] {
        assert_eq!(
            condition(listener, type_)["status"],
            "True",
            "{type_}: {listener}"
        );
    }
    assert_eq!(condition(listener, "Conflicted")["status"], "False");

    let route = fake
        .wait_for("the HTTPRoute status", |request| {
            is_status_patch(
                request,
                &format!("{GATEWAY_API}/namespaces/default/httproutes/to-pool"),
            )
        })
        .await;
    let parent = &route.body["status"]["parents"][0];
    assert_eq!(parent["parentRef"]["name"], "default");
    assert_eq!(
        parent["controllerName"],
        "switchyard.dev/gateway-controller"
    );
    assert_eq!(
        condition(parent, "Accepted")["status"],
        "True",
        "the supported rule serves: {parent}"
    );
    // The Gateway API's condition for dropped rules names the unsupported filter.
    let partially = condition(parent, "PartiallyInvalid");
    assert_eq!(partially["status"], "True", "{parent}");
    assert!(
        partially["message"]
            .as_str()
            .is_some_and(|message| message.contains("spec.rules[1].filters[0]")
                && message.contains("RequestMirror")),
        "{parent}"
    );
    assert_eq!(condition(parent, "ResolvedRefs")["status"], "True");

    let pool = fake
        .wait_for("the InferencePool status", |request| {
            is_status_patch(
                request,
                &format!("{INFERENCE_API}/namespaces/default/inferencepools/pool"),
            )
        })
        .await;
    let pool_parent = &pool.body["status"]["parents"][0];
    assert_eq!(pool_parent["parentRef"]["name"], "default", "{pool_parent}");
    assert_eq!(condition(pool_parent, "Accepted")["status"], "True");
    assert_eq!(condition(pool_parent, "ResolvedRefs")["status"], "True");

    // The bound ModelRoute: unresolved until the default Gateway exists, then serving on it.
    fake.wait_for("the bound ModelRoute resolved", |request| {
        is_status_patch(
            request,
            &format!("{CRD_API}/namespaces/default/modelroutes/bound"),
        ) && condition(&request.body["status"], "ResolvedRefs")["status"] == "True"
    })
    .await;

    assert_eq!(config.default_gateway, "kthena-system/default");
    assert_eq!(
        config.inference_pools[0].endpoints.len(),
        2,
        "one endpoint per target port"
    );
    assert_eq!(
        config.routes[0].listeners[0].gateway,
        "kthena-system/default"
    );
    stop(controller).await;
}
