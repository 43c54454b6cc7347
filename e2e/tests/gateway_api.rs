//! Gateway API mode end to end in local mode: Kthena's Gateway API examples
//! as published, a ModelRoute bound to one Gateway and not another (two
//! listeners on two ports, one model name answered by different servers),
//! an HTTPRoute's precedence and filters, an InferencePool with two target
//! ports, and a listener port that closes and opens again as its Gateway
//! goes and comes back.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, processing_request, processing_response,
};
use http::StatusCode;
use switchyard_e2e::harness::{
    ENGINE_PORT, EngineSpec, Stack, TestPod, free_port, kthena_example, wait_for,
};

const MODEL_1_5B: &str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B";
const MODEL_7B: &str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B";
/// The model the two-port pod's engines serve.
const MULTI_MODEL: &str = "multi";
/// The controller in Gateway API mode, its default Gateway where Kthena's
/// examples look for it.
const GATEWAY_API_MODE: [&str; 4] = [
    "--enable-gateway-api",
    "--enable-gateway-api-inference-extension",
    "--lease-namespace",
    "kthena-system",
];
/// The second target port of the `multi` InferencePool.
const SECOND_TARGET_PORT: u16 = 8001;

/// A second Gateway of Switchyard's class on `port`, the ModelRoute of
/// Kthena's binding example's model bound to it (to the 7B server), and
/// an HTTPRoute on it with filters, a header match and a two-port pool.
fn second_gateway(port: u16) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{ name: second, namespace: kthena-system }}
spec:
  gatewayClassName: kthena-router
  listeners:
  - name: http
    port: {port}
    protocol: HTTP
    allowedRoutes: {{ namespaces: {{ from: All }} }}
"
    )
}

const SECOND_ROUTES: &str = "apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: { name: binding-second, namespace: default }
spec:
  modelName: deepseek-binding-gateway
  parentRefs: [{ name: second, namespace: kthena-system, kind: Gateway }]
  rules:
  - name: default
    targetModels: [{ modelServerName: deepseek-r1-7b }]
---
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: { name: multi, namespace: default }
spec:
  targetPorts: [{ number: 8000 }, { number: 8001 }]
  selector: { matchLabels: { app: multi } }
  endpointPickerRef: { name: unused, port: { number: 9002 } }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: filtered, namespace: default }
spec:
  parentRefs: [{ name: second, namespace: kthena-system }]
  rules:
  - matches: [{ path: { type: Exact, value: /v1/completions } }]
    filters:
    - type: URLRewrite
      urlRewrite: { path: { type: ReplaceFullPath, replaceFullPath: /v1/chat/completions } }
    backendRefs: [{ group: inference.networking.k8s.io, kind: InferencePool, name: multi }]
  - matches: [{ path: { type: PathPrefix, value: /v1 }, headers: [{ name: x-tier, value: gold }] }]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: { set: [{ name: x-mock-status, value: \"418\" }] }
    backendRefs: [{ group: inference.networking.k8s.io, kind: InferencePool, name: deepseek-r1-1-5b }]
  - matches: [{ path: { type: PathPrefix, value: /v1/embeddings } }]
    filters:
    - type: RequestMirror
      requestMirror: { backendRef: { name: elsewhere, port: 80 } }
    backendRefs: [{ group: inference.networking.k8s.io, kind: InferencePool, name: multi }]
";

fn chat(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello"}}]}}"#)
}

async fn post_to(
    stack: &Stack,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<switchyard_e2e::harness::HttpResponse> {
    let url = format!("http://127.0.0.1:{port}{path}");
    stack.http.post_json(&url, headers, body).await.ok()
}

#[tokio::test]
async fn gateways_listeners_http_routes_and_inference_pools_in_local_mode() {
    let second_port = free_port(std::net::Ipv4Addr::LOCALHOST);
    let mut stack = Stack::new(&[
        ("Gateway.yaml", kthena_example("Gateway.yaml")),
        ("HTTPRoute.yaml", kthena_example("HTTPRoute.yaml")),
        ("InferencePool.yaml", kthena_example("InferencePool.yaml")),
        (
            "ModelRoute-binding-gateway.yaml",
            kthena_example("ModelRoute-binding-gateway.yaml"),
        ),
        (
            "ModelServer-ds1.5b.yaml",
            kthena_example("ModelServer-ds1.5b.yaml"),
        ),
        (
            "ModelServer-ds7b.yaml",
            kthena_example("ModelServer-ds7b.yaml"),
        ),
        ("second-gateway.yaml", second_gateway(second_port)),
        ("second-routes.yaml", SECOND_ROUTES.to_owned()),
    ]);
    stack
        .start_pods(&[
            TestPod::serving(
                "deepseek-r1-1-5b-0",
                11,
                "deepseek-r1-1-5b",
                MODEL_1_5B,
                &[],
            ),
            TestPod::serving("deepseek-r1-7b-0", 13, "deepseek-r1-7b", MODEL_7B, &[]),
            TestPod::serving("multi-0", 20, "multi", MULTI_MODEL, &[]),
        ])
        .await;
    // The two-port pod's second engine, named for the port it serves.
    let multi_ip = stack.ip(20);
    stack
        .start_engines(&[EngineSpec {
            name: format!("multi-0-{SECOND_TARGET_PORT}"),
            ip: multi_ip,
            port: SECOND_TARGET_PORT,
            model: MULTI_MODEL.to_owned(),
            extra_args: Vec::new(),
        }])
        .await;
    stack.start_controller_with(&GATEWAY_API_MODE).await;
    // Two traffic workers: every Gateway port is served by both.
    let dataplane = stack.spawn_dataplane_with(&["--workers", "2"]);
    stack.wait_dataplane_ready(dataplane).await;
    let dataplane_debug = stack.dataplanes[dataplane].debug;

    // The controller accepted every example as published.
    let objects = stack.controller_debug_get("/debug/objects").await.json();
    let gateway_api = &objects["gateway_api"];
    let accepted = |kind: &str, name: &str| {
        gateway_api[kind]
            .as_array()
            .and_then(|reports| reports.iter().find(|report| report["name"] == name))
            .map(|report| report["accepted"]["status"].clone())
    };
    assert_eq!(
        accepted("gatewayClasses", "kthena-router"),
        Some(true.into()),
        "{gateway_api}"
    );
    assert_eq!(
        accepted("gateways", "kthena-gateway"),
        Some(true.into()),
        "{gateway_api}"
    );
    assert_eq!(
        accepted("gateways", "default"),
        Some(true.into()),
        "{gateway_api}"
    );
    // The unsupported filter drops its rule and says so in the route's status.
    let filtered = gateway_api["httpRoutes"]
        .as_array()
        .and_then(|routes| routes.iter().find(|route| route["name"] == "filtered"))
        .expect("filtered reported")
        .to_string();
    assert!(filtered.contains("RequestMirror"), "{filtered}");

    // One model name, two Gateways: the traffic port (the default Gateway)
    // answers from the 1.5B server, the second Gateway's port from the 7B.
    let body = chat("deepseek-binding-gateway");
    let on_traffic = stack.post("/v1/chat/completions", &[], &body).await;
    assert_eq!(on_traffic.status, StatusCode::OK, "{}", on_traffic.text());
    assert_eq!(on_traffic.header("x-mock-pod"), Some("deepseek-r1-1-5b-0"));
    let on_second = wait_for("the second Gateway's port", || {
        post_to(&stack, second_port, "/v1/chat/completions", &[], &body)
    })
    .await;
    assert_eq!(on_second.status, StatusCode::OK, "{}", on_second.text());
    assert_eq!(on_second.header("x-mock-pod"), Some("deepseek-r1-7b-0"));
    let gateways = stack
        .http
        .get(&format!("http://{dataplane_debug}/debug/gateways"))
        .await
        .expect("debug answers")
        .json();
    let second_port_state = gateways["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|port| port["port"] == second_port))
        .cloned();
    assert_eq!(
        second_port_state,
        Some(serde_json::json!({"port": second_port, "open": true, "workers": 2, "error": null})),
        "{gateways}"
    );

    // Kthena's HTTPRoute: everything on the default Gateway to its pool.
    let pooled = stack
        .post("/v1/chat/completions", &[], &chat(MODEL_1_5B))
        .await;
    assert_eq!(pooled.status, StatusCode::OK, "{}", pooled.text());
    assert_eq!(pooled.header("x-mock-pod"), Some("deepseek-r1-1-5b-0"));
    // ...and not on the second Gateway, where no rule matches it.
    let unmatched = post_to(
        &stack,
        second_port,
        "/v1/chat/completions",
        &[],
        &chat(MODEL_1_5B),
    )
    .await
    .expect("answers");
    assert_eq!(
        unmatched.status,
        StatusCode::NOT_FOUND,
        "{}",
        unmatched.text()
    );

    // The header match wins over no match; its filter sets a header the engine obeys.
    let gold = post_to(
        &stack,
        second_port,
        "/v1/chat/completions",
        &[("x-tier", "gold")],
        &chat(MODEL_1_5B),
    )
    .await
    .expect("answers");
    assert_eq!(gold.status.as_u16(), 418, "{}", gold.text());
    assert_eq!(gold.header("x-mock-pod"), Some("deepseek-r1-1-5b-0"));

    // Exact /v1/completions, rewritten to chat completions, over both target ports.
    let mut answered = BTreeSet::new();
    for attempt in 0..200 {
        let body = format!(
            r#"{{"model":"{MULTI_MODEL}","prompt":"p{attempt}","messages":[{{"role":"user","content":"m{attempt}"}}]}}"#
        );
        let response = post_to(&stack, second_port, "/v1/completions", &[], &body)
            .await
            .expect("answers");
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        assert_eq!(
            response.json()["object"],
            "chat.completion",
            "the path was rewritten"
        );
        answered.insert(response.header("x-mock-pod").unwrap_or_default().to_owned());
        if answered.len() == 2 {
            break;
        }
    }
    assert_eq!(
        answered,
        BTreeSet::from([
            "multi-0".to_owned(),
            format!("multi-0-{SECOND_TARGET_PORT}")
        ]),
        "one endpoint per target port"
    );
    let endpoints = stack
        .http
        .get(&format!(
            "http://{dataplane_debug}/debug/inference-extension/pools/multi/endpoints"
        ))
        .await
        .expect("debug answers")
        .json();
    let addresses: BTreeSet<String> = endpoints["pools"][0]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|endpoint| endpoint["address"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        addresses,
        BTreeSet::from([
            format!("{multi_ip}:{ENGINE_PORT}"),
            format!("{multi_ip}:{SECOND_TARGET_PORT}")
        ])
    );
    let decisions = stack
        .http
        .get(&format!(
            "http://{dataplane_debug}/debug/inference-extension/decisions"
        ))
        .await
        .expect("debug answers")
        .json();
    assert!(
        decisions["decisions"]
            .as_array()
            .is_some_and(|decisions| decisions
                .iter()
                .any(|d| d["inferencePool"] == "default/multi")),
        "{decisions}"
    );

    // The second Gateway goes: its port closes. It comes back: it opens again.
    std::fs::remove_file(stack.config_dir.join("second-gateway.yaml")).expect("remove");
    wait_for("the second Gateway's port to close", || async {
        post_to(&stack, second_port, "/v1/chat/completions", &[], &body)
            .await
            .is_none()
            .then_some(())
    })
    .await;
    let bound_nowhere = stack.post("/v1/chat/completions", &[], &body).await;
    assert_eq!(
        bound_nowhere.header("x-mock-pod"),
        Some("deepseek-r1-1-5b-0"),
        "the default Gateway still serves"
    );
    stack.write_config("second-gateway.yaml", &second_gateway(second_port));
    let back = wait_for("the second Gateway's port to open again", || async {
        post_to(&stack, second_port, "/v1/chat/completions", &[], &body)
            .await
            .filter(|response| response.status == StatusCode::OK)
    })
    .await;
    assert_eq!(back.header("x-mock-pod"), Some("deepseek-r1-7b-0"));
}

/// Asks the endpoint picker at `port` for an endpoint for a chat request,
/// as a gateway's ext_proc filter does (headers, then the body in one chunk).
async fn pick(port: u16) -> Option<String> {
    let mut client = ExternalProcessorClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .ok()?;
    let requests = [
        processing_request::Request::RequestHeaders(HttpHeaders::default()),
        processing_request::Request::RequestBody(HttpBody {
            body: chat(MULTI_MODEL).into_bytes(),
            end_of_stream: true,
            ..HttpBody::default()
        }),
    ]
    .map(|request| ProcessingRequest {
        request: Some(request),
        ..ProcessingRequest::default()
    });
    let mut responses = client
        .process(tokio_stream::iter(requests))
        .await
        .ok()?
        .into_inner();
    let response = responses.message().await.ok()??;
    let Some(processing_response::Response::RequestHeaders(headers)) = response.response else {
        return None;
    };
    let header = headers
        .response?
        .header_mutation?
        .set_headers
        .into_iter()
        .next()?
        .header?;
    (header.key == "x-gateway-destination-endpoint")
        .then(|| String::from_utf8_lossy(&header.raw_value).into_owned())
}

/// The endpoint picker of a real dataplane: an InferencePool with two
/// target ports, picked over ext_proc.
#[tokio::test]
async fn a_dataplane_serves_the_endpoint_picker_of_its_pool() {
    let mut stack = Stack::new(&[("pool.yaml", SECOND_ROUTES.to_owned())]);
    stack
        .start_pods(&[TestPod::serving("multi-0", 20, "multi", MULTI_MODEL, &[])])
        .await;
    stack.start_controller_with(&GATEWAY_API_MODE).await;
    let picker_port = free_port(std::net::Ipv4Addr::LOCALHOST);
    let index = stack.spawn_dataplane_with(&[
        "--endpoint-picker-port",
        &picker_port.to_string(),
        "--endpoint-picker-pool",
        "default/multi",
    ]);
    stack.wait_dataplane_ready(index).await;
    let multi_ip = stack.ip(20);
    let picked = wait_for("the endpoint picker", || pick(picker_port)).await;
    assert!(
        [
            format!("{multi_ip}:{ENGINE_PORT}"),
            format!("{multi_ip}:{SECOND_TARGET_PORT}")
        ]
        .contains(&picked),
        "{picked}"
    );
}
