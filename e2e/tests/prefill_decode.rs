//! Prefill/decode disaggregation end to end in local mode: the real controller and dataplane,
//! mock engines playing prefill and decode pods for every KV connector, and Kthena's PD example
//! manifests as published. What each leg sent is read back from the engines (`/mock/requests`).

use std::collections::BTreeSet;

use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use switchyard_e2e::harness::{
    HttpResponse, Stack, TestPod, kthena_example, wait_for, yaml_documents,
};

const DS_MODEL: &str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B";
const V2_MODEL: &str = "deepseek-ai/DeepSeekV2";
/// The group label of Kthena's examples.
const GROUP: &str = "modelserving.volcano.sh/group-name";

/// Flags of a mock engine playing `role` (`prefill` or `decode`).
fn role(role: &'static str) -> [&'static str; 2] {
    ["--pd-role", role]
}

/// A pod of the ds1.5b example's ModelServing: group `group`, role `P-instance`/`D-instance`.
fn ds_pod(name: &str, host: u8, group: &str, is_prefill: bool) -> TestPod {
    let (role_label, flags) = if is_prefill {
        ("P-instance", role("prefill"))
    } else {
        ("D-instance", role("decode"))
    };
    TestPod::serving(name, host, "deepseek-r1-1-5b", DS_MODEL, &flags)
        .labelled(GROUP, group)
        .labelled("modelserving.volcano.sh/rolename", role_label)
}

/// A pod of the deepseek-v2 example (namespace `dev`): group `g0`.
fn v2_pod(name: &str, host: u8, is_prefill: bool) -> TestPod {
    let (role_label, flags) = if is_prefill {
        ("prefill", role("prefill"))
    } else {
        ("decode", role("decode"))
    };
    TestPod::serving(name, host, "deepseek-v2", "deepseek-ai/DeepSeekV2", &flags)
        .in_namespace("dev")
        .labelled("modelserving.volcano.sh/name", "deepseek-v2-lite")
        .labelled(GROUP, "g0")
        .labelled("modelserving.volcano.sh/role", role_label)
}

/// YAML of a PD ModelServer `name` selecting `app: <name>`, grouped by `group`, roles by
/// `role: prefill|decode`, whose engines serve model `m`; `extra` adds spec fields (YAML,
/// indented two spaces).
fn pd_server_yaml(name: &str, engine: &str, extra: &str) -> String {
    format!(
        "apiVersion: networking.serving.volcano.sh/v1alpha1\nkind: ModelServer\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  workloadSelector:\n    matchLabels: {{app: {name}}}\n    pdGroup: {{groupKey: group, prefillLabels: {{role: prefill}}, decodeLabels: {{role: decode}}}}\n  workloadPort: {{port: 8000}}\n  model: m\n  inferenceEngine: {engine}\n{extra}"
    )
}

fn route_yaml(name: &str) -> String {
    format!(
        "apiVersion: networking.serving.volcano.sh/v1alpha1\nkind: ModelRoute\nmetadata: {{name: {name}, namespace: default}}\nspec: {{modelName: {name}, rules: [{{targetModels: [{{modelServerName: {name}}}]}}]}}\n"
    )
}

/// The controller's one config file: per `(name, engine, extra)` a [`pd_server_yaml`] server and
/// a ModelRoute of the same name to it.
fn pd_files(servers: &[(&str, &str, &str)]) -> [(&'static str, String); 1] {
    let documents: Vec<String> = servers
        .iter()
        .flat_map(|(name, engine, extra)| [pd_server_yaml(name, engine, extra), route_yaml(name)])
        .collect();
    [("servers.yaml", yaml_documents(&documents))]
}

/// A pod of a [`pd_server_yaml`] server: `app: <server>`, `group`, `role`; its engine plays the
/// role with `flags`.
fn pod(
    server: &str,
    name: &str,
    host: u8,
    group: &str,
    is_prefill: bool,
    flags: &[&str],
) -> TestPod {
    let role_name = if is_prefill { "prefill" } else { "decode" };
    let mut args = role(role_name).to_vec();
    args.extend_from_slice(flags);
    TestPod::serving(name, host, server, "m", &args)
        .labelled("group", group)
        .labelled("role", role_name)
}

/// The stack: controller (local mode, `files`), the engines of `pods`, one dataplane.
async fn stack(files: &[(&str, String)], pods: &[TestPod]) -> Stack {
    let mut stack = Stack::new(files);
    stack.start_pods(pods).await;
    stack.start_controller().await;
    stack.start_dataplane().await;
    stack
}

/// The inference requests engine `pod` received, oldest first.
async fn received(stack: &Stack, host: u8) -> Vec<Value> {
    let url = format!("http://{}:8000/mock/requests", stack.ip(host));
    let response = stack.http.get(&url).await.expect("the engine answers");
    response.json()["requests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The one request engine `host` received with `request_id`.
async fn received_by_id(stack: &Stack, host: u8, request_id: &str) -> Value {
    let requests = received(stack, host).await;
    let mut matching = requests
        .into_iter()
        .filter(|request| request["requestId"] == request_id);
    let request = matching
        .next()
        .unwrap_or_else(|| panic!("engine .{host} received no request {request_id}"));
    assert!(
        matching.next().is_none(),
        "one request {request_id} at .{host}"
    );
    request
}

async fn debug(stack: &Stack, path: &str) -> HttpResponse {
    let url = format!("http://{}{path}", stack.dataplanes[0].debug);
    stack.http.get(&url).await.expect("the debug port answers")
}

/// The string `field` of each element of the JSON array `list`.
fn strings_at<'a>(list: &'a Value, field: &str) -> BTreeSet<&'a str> {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .filter_map(|element| element[field].as_str())
        .collect()
}

async fn objects(stack: &Stack) -> Value {
    stack.controller_debug_get("/debug/objects").await.json()
}

fn server_report<'a>(objects: &'a Value, name: &str) -> &'a Value {
    objects["reports"]
        .as_array()
        .and_then(|reports| {
            reports
                .iter()
                .find(|report| report["kind"] == "ModelServer" && report["name"] == name)
        })
        .unwrap_or_else(|| panic!("no report for {name}: {objects}"))
}

/// The JSON access log line of `request_id` in the dataplane's log.
async fn access_log_line(stack: &Stack, request_id: &str) -> Value {
    let process = &stack.dataplanes[0].process;
    wait_for(&format!("the access log line of {request_id}"), || async {
        process.log_text().lines().find_map(|line| {
            let line: Value = serde_json::from_str(line).ok()?;
            (line["request_id"] == request_id).then_some(line)
        })
    })
    .await
}

/// A series of the dataplane's `/metrics`: its name, labels and value.
type Series<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// The value of the series `name{labels...}` in the dataplane's `/metrics`.
async fn metric(stack: &Stack, name: &str, labels: &[(&str, &str)]) -> f64 {
    let url = format!("http://{}/metrics", stack.dataplanes[0].metrics);
    let page = stack.http.get(&url).await.expect("metrics").text();
    page.lines()
        .filter(|line| {
            line.starts_with(name)
                && line[name.len()..].starts_with('{')
                && labels
                    .iter()
                    .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kthena_pd_examples_work_as_published() {
    let files = [
        (
            "ds.yaml",
            yaml_documents(&[
                kthena_example("ModelServer-ds1.5b-pd-disaggregation.yaml"),
                kthena_example("ModelRoute-ds1.5b-pd-disaggregation.yaml"),
            ]),
        ),
        (
            "v2.yaml",
            yaml_documents(&[
                kthena_example("ModelServer-prefill-decode-disaggregation.yaml"),
                kthena_example("ModelRoute-prefill-decode-disaggregation.yaml"),
            ]),
        ),
    ];
    // ds1.5b: group-0 = .11 prefill + .12 decode, group-1 = .13 prefill + .14 decode.
    let pods = [
        ds_pod("ds-p-0", 11, "group-0", true),
        ds_pod("ds-d-0", 12, "group-0", false),
        ds_pod("ds-p-1", 13, "group-1", true),
        ds_pod("ds-d-1", 14, "group-1", false),
        v2_pod("v2-prefill-0", 21, true),
        v2_pod("v2-decode-0", 22, false),
    ];
    let stack = stack(&files, &pods).await;
    let _logs = stack.logs_on_failure();

    // The http connector: a one-token prefill copy to the decode pod's group, then the
    // client's body to the decode pod.
    let body = r#"{"model":"deepseek-r1-1-5b-pd-disaggregation","prompt":"San Francisco is a","max_tokens":4,"n":1,"min_tokens":2}"#;
    let response = stack
        .post("/v1/completions", &[("x-request-id", "pd-1")], body)
        .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let decode_pod = response.mock_pod();
    let (prefill_host, decode_host, prefill_pod) = match decode_pod.as_str() {
        "ds-d-0" => (11, 12, "ds-p-0"),
        "ds-d-1" => (13, 14, "ds-p-1"),
        other => panic!("a decode pod answers, not {other}"),
    };
    assert_eq!(response.header("x-mock-received-model"), Some(DS_MODEL));
    assert_eq!(response.header("x-mock-request-id"), Some("pd-1"));
    let prefill = received_by_id(&stack, prefill_host, "pd-1").await;
    assert_eq!(
        prefill["body"],
        json!({"model": DS_MODEL, "prompt": "San Francisco is a", "max_tokens": 1, "n": 1}),
        "the prefill leg: a copy with one token and no min_tokens"
    );
    assert_eq!(prefill["outcome"], "answered");
    let decode = received_by_id(&stack, decode_host, "pd-1").await;
    assert_eq!(
        decode["body"],
        json!({"model": DS_MODEL, "prompt": "San Francisco is a", "max_tokens": 4, "n": 1, "min_tokens": 2}),
        "the decode leg: the client's request"
    );
    assert_eq!(
        response.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        0,
        "the http connector relays no KV parameters: the decode recomputes"
    );
    let line = access_log_line(&stack, "pd-1").await;
    assert_eq!(line["selected_pod"], decode_pod);
    assert_eq!(line["prefill_pod"], prefill_pod);
    assert!(
        line["duration_prefill_ms"].is_u64() && line["duration_decode_ms"].is_u64(),
        "{line}"
    );

    // Streamed: the prefill leg is not; the decode leg streams to the client.
    let stream = r#"{"model":"deepseek-r1-1-5b-pd-disaggregation","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let response = stack
        .post_streaming(
            "/v1/chat/completions",
            &[("x-request-id", "pd-stream")],
            stream,
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let decode_pod = response.headers()["x-mock-pod"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    let text = response
        .into_body()
        .collect()
        .await
        .expect("the stream")
        .to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        !text.contains("\"usage\""),
        "the usage chunk the router asked for is hidden: {text}"
    );
    let prefill_host = if decode_pod == "ds-d-0" { 11 } else { 13 };
    let prefill = received_by_id(&stack, prefill_host, "pd-stream").await;
    assert_eq!(prefill["body"].get("stream"), None);
    assert_eq!(prefill["body"].get("stream_options"), None);
    assert_eq!(prefill["body"]["max_tokens"], 1);

    // The nixl connector: the decode pod gets the prefill pod's KV transfer parameters.
    let response = stack
        .post(
            "/v1/completions",
            &[("x-request-id", "pd-nixl")],
            &format!(r#"{{"model":"{V2_MODEL}","prompt":"one two three"}}"#),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(response.header("x-mock-pod"), Some("v2-decode-0"));
    assert_eq!(response.header("x-mock-kv-transfer"), Some("received"));
    assert_eq!(response.header("x-mock-kv-source"), Some("v2-prefill-0"));
    assert_eq!(
        response.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        response.json()["usage"]["prompt_tokens"]
    );
    let prefill = received_by_id(&stack, 21, "pd-nixl").await;
    assert_eq!(
        prefill["body"]["kv_transfer_params"],
        json!({"do_remote_decode": true, "do_remote_prefill": false})
    );
    let decode = received_by_id(&stack, 22, "pd-nixl").await;
    assert_eq!(
        decode["body"]["kv_transfer_params"]["remote_engine_id"],
        "v2-prefill-0"
    );
    assert_eq!(
        decode["body"]["kv_transfer_params"]["remote_request_id"],
        "pd-nixl"
    );

    // Streamed, the same: the decode leg streams with the prefill's parameters.
    let response = stack
        .post(
            "/v1/chat/completions",
            &[("x-request-id", "pd-nixl-stream")],
            &format!(
                r#"{{"model":"{V2_MODEL}","stream":true,"messages":[{{"role":"user","content":"one two"}}]}}"#
            ),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("x-mock-kv-transfer"), Some("received"));
    assert!(
        response.text().ends_with("data: [DONE]\n\n"),
        "{}",
        response.text()
    );
    let decode = received_by_id(&stack, 22, "pd-nixl-stream").await;
    assert_eq!(decode["body"]["stream"], true);
    assert_eq!(
        decode["body"]["kv_transfer_params"]["remote_request_id"],
        "pd-nixl-stream"
    );
    assert_eq!(
        received_by_id(&stack, 21, "pd-nixl-stream").await["body"].get("stream"),
        None
    );

    // The status of both ModelServers, and what the dataplane shows.
    let objects = objects(&stack).await;
    for name in ["deepseek-r1-1-5b-pd-disaggregation", "deepseek-v2"] {
        let report = server_report(&objects, name);
        assert_eq!(report["resolved_refs"]["status"], true, "{report}");
        assert_eq!(
            report["complete_pd_groups"], report["pd_groups"],
            "{report}"
        );
    }
    assert_eq!(
        server_report(&objects, "deepseek-r1-1-5b-pd-disaggregation")["complete_pd_groups"],
        2
    );
    let groups = debug(&stack, "/debug/pd-groups").await.json();
    let servers = strings_at(&groups["modelServers"], "modelServer");
    assert_eq!(
        servers,
        BTreeSet::from([
            "default/deepseek-r1-1-5b-pd-disaggregation",
            "dev/deepseek-v2"
        ])
    );
    let status = debug(&stack, "/debug/pd-groups/g0/status").await.json();
    let v2 = &status["modelServers"][0];
    assert_eq!(v2["modelServer"], "dev/deepseek-v2");
    assert_eq!(v2["complete"], true);
    assert_eq!(v2["requests"], json!({"prefill": 2, "decode": 2}));
    assert_eq!(v2["prefillPods"][0]["pod"], "dev/v2-prefill-0");
    assert_eq!(
        debug(&stack, "/debug/pd-groups/nope/status").await.status,
        StatusCode::NOT_FOUND
    );
    let connectors = debug(&stack, "/debug/kv-cache/connectors").await.json();
    let nixl = connectors["connectors"]
        .as_array()
        .and_then(|list| list.iter().find(|c| c["type"] == "nixl"))
        .expect("the nixl connector")
        .clone();
    assert_eq!(nixl["modelServers"], json!(["dev/deepseek-v2"]));
    assert_eq!(
        nixl["kvTransferParams"],
        json!({"relayed": 2, "missing": 0})
    );
    let dump = debug(
        &stack,
        "/debug/config_dump/namespaces/dev/modelservers/deepseek-v2",
    )
    .await
    .json();
    assert_eq!(dump["prefillPods"], json!(["dev/v2-prefill-0"]));
    assert_eq!(dump["decodePods"], json!(["dev/v2-decode-0"]));

    // Metrics: both legs timed, requests counted per group and role.
    let v2_completions = [("model", V2_MODEL), ("path", "/v1/completions")];
    let expected: [Series<'_>; 5] = [
        (
            "kthena_router_request_prefill_duration_seconds_count",
            &v2_completions,
            1.0,
        ),
        (
            "kthena_router_request_decode_duration_seconds_count",
            &v2_completions,
            1.0,
        ),
        (
            "kthena_pd_group_requests_total",
            &[("group_key", "g0"), ("role", "decode"), ("model", V2_MODEL)],
            2.0,
        ),
        // One prefill leg per ds request.
        (
            "kthena_pd_group_requests_total",
            &[
                ("role", "prefill"),
                ("model", "deepseek-r1-1-5b-pd-disaggregation"),
            ],
            2.0,
        ),
        (
            "kthena_pd_group_routing_decisions",
            &[
                ("group_key", "g0"),
                ("source_role", "decode"),
                ("target_role", "prefill"),
            ],
            2.0,
        ),
    ];
    for (name, labels, value) in expected {
        assert_eq!(
            metric(&stack, name, labels).await,
            value,
            "{name}{labels:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mooncake_lmcache_and_sglang_shape_their_legs() {
    let files = pd_files(&[
        ("mooncake", "vLLM", "  kvConnector: {type: mooncake}\n"),
        ("lmcache", "vLLM", "  kvConnector: {type: lmcache}\n"),
        // SGLang without kvConnector: SGLang's bootstrap protocol.
        ("sglang", "SGLang", ""),
        ("sglang-default-port", "SGLang", ""),
    ]);
    let pods = [
        pod("mooncake", "mc-p", 11, "g", true, &[]),
        pod("mooncake", "mc-d", 12, "g", false, &[]),
        pod("lmcache", "lm-p", 13, "g", true, &[]),
        pod("lmcache", "lm-d", 14, "g", false, &[]),
        // The prefill pod's bootstrap server is its main port, as its annotation says.
        pod("sglang", "sg-p", 15, "g", true, &["--engine", "sglang"])
            .annotated("sglang.ai/bootstrap-port", "8000"),
        pod("sglang", "sg-d", 16, "g", false, &["--engine", "sglang"]),
        // No annotation: the decode pod looks on SGLang's default bootstrap port.
        pod(
            "sglang-default-port",
            "sgd-p",
            17,
            "g",
            true,
            &["--engine", "sglang", "--bootstrap-port", "8998"],
        ),
        pod(
            "sglang-default-port",
            "sgd-d",
            18,
            "g",
            false,
            &["--engine", "sglang"],
        ),
    ];
    let stack = stack(&files, &pods).await;
    let _logs = stack.logs_on_failure();
    let ask = |model: &'static str, id: &'static str, stream: bool| {
        let stack = &stack;
        async move {
            let body = json!({"model": model, "prompt": "a b c d", "stream": stream}).to_string();
            stack
                .post("/v1/completions", &[("x-request-id", id)], &body)
                .await
        }
    };

    let response = ask("mooncake", "mc-1", false).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(
        response.header("x-mock-kv-transfer"),
        Some("received"),
        "the same shape as nixl"
    );
    assert_eq!(response.header("x-mock-kv-source"), Some("mc-p"));
    let prefill = received_by_id(&stack, 11, "mc-1").await;
    assert_eq!(
        prefill["body"]["kv_transfer_params"]["do_remote_decode"],
        true
    );

    let response = ask("lmcache", "lm-1", true).await;
    assert_eq!(response.status, StatusCode::OK);
    assert!(response.text().ends_with("data: [DONE]\n\n"));
    assert_eq!(response.header("x-mock-kv-transfer"), Some("none"));
    let prefill = received_by_id(&stack, 13, "lm-1").await;
    assert_eq!(
        prefill["body"],
        json!({"model": "m", "prompt": "a b c d", "max_tokens": 1})
    );
    assert_eq!(
        received_by_id(&stack, 14, "lm-1").await["body"]["stream"],
        true
    );

    // SGLang: both legs at once (each engine waits for the other), one room, the prefill
    // pod's address; streamed and not.
    for (id, stream) in [("sg-1", false), ("sg-2", true)] {
        let response = ask("sglang", id, stream).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        assert_eq!(response.header("x-mock-pod"), Some("sg-d"));
        assert_eq!(response.header("x-mock-kv-transfer"), Some("bootstrap"));
        assert_eq!(response.header("x-mock-kv-source"), Some("sg-p"));
        let prefill = received_by_id(&stack, 15, id).await["body"].clone();
        let decode = received_by_id(&stack, 16, id).await["body"].clone();
        let prefill_ip = stack.ip(15).to_string();
        for body in [&prefill, &decode] {
            assert_eq!(body["bootstrap_host"], prefill_ip.as_str(), "{body}");
            assert_eq!(body["bootstrap_port"], 8000, "{body}");
            assert_eq!(body["bootstrap_room"], prefill["bootstrap_room"]);
            assert!(
                body["bootstrap_room"]
                    .as_u64()
                    .is_some_and(|room| room < 1 << 63)
            );
        }
        assert_eq!(decode["stream"], stream);
        assert_eq!(prefill.get("stream"), None);
    }
    let response = ask("sglang-default-port", "sgd-1", false).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(response.header("x-mock-kv-source"), Some("sgd-p"));
    assert_eq!(
        received_by_id(&stack, 18, "sgd-1").await["body"].get("bootstrap_port"),
        None
    );

    // A decode that fails once paired cancels its prefill; with no retry the engine's 503
    // reaches the client.
    let response = stack
        .post(
            "/v1/completions",
            &[("x-request-id", "sg-fail"), ("x-mock-decode-status", "503")],
            r#"{"model":"sglang","prompt":"x"}"#,
        )
        .await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.header("x-mock-pod"), Some("sg-d"));
    let connectors = debug(&stack, "/debug/kv-cache/connectors").await.json();
    let types = strings_at(&connectors["connectors"], "type");
    assert_eq!(types, BTreeSet::from(["lmcache", "mooncake", "sglang"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sglang_decode_cancels_a_prefill_still_running() {
    let files = pd_files(&[("slow-prefill", "SGLang", "")]);
    // The prefill takes 30 s once paired: only a cancellation ends it sooner.
    let pods = [
        pod(
            "slow-prefill",
            "p",
            11,
            "g",
            true,
            &["--engine", "sglang", "--ttft-ms", "30000"],
        )
        .annotated("sglang.ai/bootstrap-port", "8000"),
        pod("slow-prefill", "d", 12, "g", false, &["--engine", "sglang"]),
    ];
    let stack = stack(&files, &pods).await;
    let _logs = stack.logs_on_failure();
    let response = stack
        .post(
            "/v1/completions",
            &[
                ("x-request-id", "cancel-me"),
                ("x-mock-decode-status", "503"),
            ],
            r#"{"model":"slow-prefill","prompt":"x"}"#,
        )
        .await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    wait_for(
        "the prefill engine to see its request cancelled",
        || async {
            let prefill = received_by_id(&stack, 11, "cancel-me").await;
            (prefill["outcome"] == "cancelled").then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_groups_get_nothing_and_a_refusing_prefill_moves_to_the_next_pair() {
    let files = pd_files(&[
        ("mixed", "vLLM", "  trafficPolicy: {retry: {attempts: 0}}\n"),
        ("unpaired", "vLLM", ""),
    ]);
    let pods = [
        // Group a: its prefill pod refuses connections (nothing listens there).
        TestPod::without_engine("a-p", 11, "mixed")
            .labelled("group", "a")
            .labelled("role", "prefill"),
        pod("mixed", "a-d", 12, "a", false, &[]),
        pod("mixed", "b-p", 13, "b", true, &[]),
        pod("mixed", "b-d", 14, "b", false, &[]),
        // Group c has no prefill pod: never scheduled.
        pod("mixed", "c-d", 15, "c", false, &[]),
        // Only decode pods: no complete group at all.
        pod("unpaired", "u-d", 16, "u", false, &[]),
    ];
    let stack = stack(&files, &pods).await;
    let _logs = stack.logs_on_failure();
    for index in 0..6 {
        let id = format!("mixed-{index}");
        let response = stack
            .post(
                "/v1/completions",
                &[("x-request-id", &id)],
                r#"{"model":"mixed","prompt":"hi"}"#,
            )
            .await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        assert_eq!(
            response.header("x-mock-pod"),
            Some("b-d"),
            "request {index}"
        );
    }
    assert!(
        received(&stack, 12).await.is_empty(),
        "a-d never decodes without its prefill"
    );
    assert!(
        received(&stack, 15).await.is_empty(),
        "group c is incomplete"
    );

    let response = stack
        .post(
            "/v1/completions",
            &[],
            r#"{"model":"unpaired","prompt":"hi"}"#,
        )
        .await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.json()["error"]["code"], "no_ready_pod");
    assert!(received(&stack, 16).await.is_empty());

    let objects = objects(&stack).await;
    let mixed = server_report(&objects, "mixed");
    assert_eq!(
        (
            mixed["pd_groups"].as_u64(),
            mixed["complete_pd_groups"].as_u64()
        ),
        (Some(3), Some(2))
    );
    assert!(
        mixed["resolved_refs"]["message"].as_str().is_some_and(
            |message| message.contains("incomplete groups: 1 [c (no ready prefill pod)]")
        ),
        "{mixed}"
    );
    let unpaired = server_report(&objects, "unpaired");
    assert_eq!(unpaired["resolved_refs"]["status"], false);
    assert_eq!(unpaired["resolved_refs"]["reason"], "NoCompletePdGroup");
    let status = debug(&stack, "/debug/pd-groups/c/status").await.json();
    assert_eq!(status["modelServers"][0]["complete"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_bounds_each_leg() {
    let files = pd_files(&[
        // Each leg takes 0.9 s, the pair 1.8 s: within a 1.5 s timeout per leg.
        ("steady", "vLLM", "  trafficPolicy: {timeout: 1500ms}\n"),
        // A prefill leg that takes 30 s, against a 500 ms timeout.
        ("stuck", "vLLM", "  trafficPolicy: {timeout: 500ms}\n"),
    ]);
    let pods = [
        pod("steady", "s-p", 11, "g", true, &["--ttft-ms", "900"]),
        pod("steady", "s-d", 12, "g", false, &["--ttft-ms", "900"]),
        pod("stuck", "t-p", 13, "g", true, &["--ttft-ms", "30000"]),
        pod("stuck", "t-d", 14, "g", false, &[]),
    ];
    let stack = stack(&files, &pods).await;
    let _logs = stack.logs_on_failure();
    let response = stack
        .post(
            "/v1/completions",
            &[],
            r#"{"model":"steady","prompt":"hi","max_tokens":1}"#,
        )
        .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(response.header("x-mock-pod"), Some("s-d"));

    let response = stack
        .post("/v1/completions", &[], r#"{"model":"stuck","prompt":"hi"}"#)
        .await;
    assert_eq!(response.status, StatusCode::GATEWAY_TIMEOUT);
    let error = response.json();
    assert_eq!(error["error"]["code"], "upstream_timeout");
    assert_eq!(
        error["error"]["message"],
        "pod default/t-p of ModelServer default/stuck sent no response within 500ms"
    );
    assert!(
        received(&stack, 14).await.is_empty(),
        "no decode without a prefill"
    );
}
