//! Routing semantics end to end: rule matching, route precedence, retries,
//! timeouts, pass-through of engine errors, and bad input.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use switchyard_e2e::harness::{
    EngineSpec, HttpResponse, Stack, WAIT_DEADLINE, ip_in, ready_pod_yaml, test_subnet,
};

const PORT: u16 = 8000;

const SERVERS: &str = r#"
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelServer
metadata: {name: alpha, namespace: default}
spec:
  workloadSelector: {matchLabels: {app: alpha}}
  workloadPort: {port: 8000}
  model: "org/alpha"
  inferenceEngine: vLLM
  trafficPolicy:
    retry: {attempts: 2, retryInterval: 10ms}
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelServer
metadata: {name: beta, namespace: default}
spec:
  workloadSelector: {matchLabels: {app: beta}}
  workloadPort: {port: 8000}
  inferenceEngine: vLLM
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelServer
metadata: {name: slow, namespace: default}
spec:
  workloadSelector: {matchLabels: {app: slow}}
  workloadPort: {port: 8000}
  inferenceEngine: vLLM
  trafficPolicy: {timeout: 300ms}
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelServer
metadata: {name: flaky, namespace: default}
spec:
  workloadSelector: {matchLabels: {app: flaky}}
  workloadPort: {port: 8000}
  inferenceEngine: vLLM
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelServer
metadata: {name: streamer, namespace: default}
spec:
  workloadSelector: {matchLabels: {app: streamer}}
  workloadPort: {port: 8000}
  inferenceEngine: vLLM
  trafficPolicy:
    retry: {attempts: 3}
"#;

const ROUTES: &str = r#"
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: {name: a-gold-only, namespace: default, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  modelName: shared
  rules:
  - name: gold
    modelMatch: {headers: {x-tier: {exact: gold}}}
    targetModels: [{modelServerName: beta}]
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: {name: b-catch-all, namespace: default, creationTimestamp: "2024-06-01T00:00:00Z"}
spec:
  modelName: shared
  rules:
  - targetModels: [{modelServerName: alpha}]
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: {name: newer, namespace: default, creationTimestamp: "2025-01-01T00:00:00Z"}
spec:
  modelName: dup
  rules:
  - targetModels: [{modelServerName: beta}]
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: {name: older, namespace: default, creationTimestamp: "2023-01-01T00:00:00Z"}
spec:
  modelName: dup
  rules:
  - targetModels: [{modelServerName: alpha}]
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: {name: by-path, namespace: default}
spec:
  modelName: by-path
  rules:
  - name: chat
    modelMatch: {uri: {prefix: /v1/chat}}
    targetModels: [{modelServerName: beta}]
  - name: completions
    modelMatch: {uri: {regex: "^/v1/comp.*ions$"}}
    targetModels: [{modelServerName: alpha}]
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: {name: adapters, namespace: default}
spec:
  loraAdapters: [ad-1, ad-2]
  rules:
  - name: second-adapter
    modelMatch: {body: {model: ad-2}}
    targetModels: [{modelServerName: beta}]
  - targetModels: [{modelServerName: alpha}]
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: {name: broken, namespace: default}
spec:
  modelName: broken
  rules:
  - modelMatch: {uri: {regex: "("}}
    targetModels: [{modelServerName: alpha}]
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: {name: slow, namespace: default}
spec:
  modelName: slow
  rules: [{targetModels: [{modelServerName: slow}]}]
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: {name: flaky, namespace: default}
spec:
  modelName: flaky
  rules: [{targetModels: [{modelServerName: flaky}]}]
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: {name: stream, namespace: default}
spec:
  modelName: stream
  rules: [{targetModels: [{modelServerName: streamer}]}]
"#;

/// (pod, host octet, app label, served model, engine args; None = no engine: refuses connections)
type TestPod = (
    &'static str,
    u8,
    &'static str,
    &'static str,
    Option<Vec<&'static str>>,
);

/// (case, method, path, headers, body, expected status)
type BadInput<'a> = (
    &'a str,
    Method,
    &'a str,
    Vec<(&'a str, &'a str)>,
    Vec<u8>,
    StatusCode,
);

fn pods() -> Vec<TestPod> {
    let adapters = vec!["--lora", "ad-1,ad-2"];
    vec![
        ("alpha-0", 11, "alpha", "org/alpha", Some(adapters.clone())),
        ("alpha-1", 12, "alpha", "org/alpha", Some(adapters.clone())),
        (
            "beta-0",
            13,
            "beta",
            "shared",
            Some(vec!["--lora", "dup,by-path,ad-1,ad-2"]),
        ),
        (
            "slow-0",
            14,
            "slow",
            "slow",
            Some(vec!["--ttft-ms", "5000"]),
        ),
        ("flaky-dead", 15, "flaky", "flaky", None),
        ("flaky-live", 16, "flaky", "flaky", Some(vec![])),
        (
            "streamer-0",
            17,
            "streamer",
            "stream",
            Some(vec!["--itl-ms", "200", "--output-tokens", "20"]),
        ),
        (
            "streamer-1",
            18,
            "streamer",
            "stream",
            Some(vec!["--itl-ms", "200", "--output-tokens", "20"]),
        ),
    ]
}

async fn stack_with(dataplane_args: &[&str]) -> Stack {
    let subnet = test_subnet();
    let pod_yaml: Vec<String> = pods()
        .iter()
        .map(|(name, host, app, _, _)| ready_pod_yaml(name, ip_in(subnet, *host), &[("app", app)]))
        .collect();
    let mut stack = Stack::new(&[
        ("servers.yaml", SERVERS.to_owned()),
        ("routes.yaml", ROUTES.to_owned()),
        ("pods.yaml", pod_yaml.join("---\n")),
    ]);
    let engines: Vec<EngineSpec> = pods()
        .into_iter()
        .filter_map(|(name, host, _, model, args)| {
            args.map(|args| EngineSpec {
                name: name.to_owned(),
                ip: ip_in(subnet, host),
                port: PORT,
                model: model.to_owned(),
                extra_args: args.into_iter().map(str::to_owned).collect(),
            })
        })
        .collect();
    stack.start_engines(&engines).await;
    stack.start_controller().await;
    let index = stack.spawn_dataplane_with(dataplane_args);
    stack.wait_dataplane_ready(index).await;
    stack
}

async fn post(stack: &Stack, path: &str, headers: &[(&str, &str)], body: &str) -> HttpResponse {
    stack
        .http
        .post_json(&stack.dataplanes[0].url(path), headers, body)
        .await
        .expect("dataplane answers")
}

async fn pod_for(stack: &Stack, path: &str, model: &str, headers: &[(&str, &str)]) -> String {
    let body = if path.contains("chat") {
        format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
    } else {
        format!(r#"{{"model":"{model}","prompt":"hi"}}"#)
    };
    let response = post(stack, path, headers, &body).await;
    assert_eq!(
        response.status,
        StatusCode::OK,
        "{model} {path}: {}",
        response.text()
    );
    response
        .header("x-mock-pod")
        .expect("x-mock-pod")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_routes_and_matches() {
    let stack = stack_with(&[]).await;
    let c = "/v1/completions";
    // A route none of whose rules match falls through to the next route.
    assert!(
        pod_for(&stack, c, "shared", &[])
            .await
            .starts_with("alpha-")
    );
    assert_eq!(
        pod_for(&stack, c, "shared", &[("x-tier", "gold")]).await,
        "beta-0"
    );
    // Several routes with one model name: the oldest wins, whatever the names.
    assert!(pod_for(&stack, c, "dup", &[]).await.starts_with("alpha-"));
    // URI prefix and regex.
    assert_eq!(
        pod_for(&stack, "/v1/chat/completions", "by-path", &[]).await,
        "beta-0"
    );
    assert!(
        pod_for(&stack, c, "by-path", &[])
            .await
            .starts_with("alpha-")
    );
    // body.model on a LoRA route; LoRA names are never rewritten.
    assert_eq!(pod_for(&stack, c, "ad-2", &[]).await, "beta-0");
    let response = post(&stack, c, &[], r#"{"model":"ad-1","prompt":"hi"}"#).await;
    assert!(
        response
            .header("x-mock-pod")
            .expect("pod")
            .starts_with("alpha-")
    );
    assert_eq!(response.header("x-mock-received-model"), Some("ad-1"));
    // A ModelServer's spec.model is what the engine receives.
    let response = post(&stack, c, &[], r#"{"prompt":"hi","model":"shared","n":1}"#).await;
    assert_eq!(response.header("x-mock-received-model"), Some("org/alpha"));
    // The route with an invalid regex is rejected, visibly, and the rest works.
    let response = post(&stack, c, &[], r#"{"model":"broken","prompt":"hi"}"#).await;
    assert_eq!(response.status, StatusCode::NOT_FOUND);
    assert!(
        response.text().contains("route not found"),
        "{}",
        response.text()
    );
    let objects = stack
        .http
        .get(&format!("http://{}/debug/objects", stack.controller_admin))
        .await
        .expect("objects")
        .text();
    assert!(objects.contains("InvalidRegex"), "{objects}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_errors_pass_through_and_retries_follow_policy() {
    let stack = stack_with(&[]).await;
    let c = "/v1/completions";
    let body = r#"{"model":"shared","prompt":"hi"}"#;
    // A 4xx from the engine reaches the client unchanged, and is not retried.
    let response = post(&stack, c, &[("x-mock-status", "400")], body).await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    let error = response.json();
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("Simulated failure"),
        "the engine's own body: {error}"
    );
    assert!(response.header("x-mock-pod").is_some());
    // A 503 on every pod: retried (alpha allows 2 retries over 2 pods), then passed through.
    let response = post(&stack, c, &[("x-mock-status", "503")], body).await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    let message = response.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.starts_with("Simulated failure"), "{message}");

    // A pod that refuses connections: every request still succeeds on the other pod.
    let mut pods = BTreeMap::new();
    for _ in 0..10 {
        let pod = pod_for(&stack, c, "flaky", &[]).await;
        *pods.entry(pod).or_insert(0) += 1;
    }
    assert_eq!(pods.get("flaky-live"), Some(&10), "{pods:?}");

    // No response headers within trafficPolicy.timeout: 504.
    let response = post(&stack, c, &[], r#"{"model":"slow","prompt":"hi"}"#).await;
    assert_eq!(
        response.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        response.text()
    );
    assert_eq!(response.json()["error"]["code"], "upstream_timeout");
}

fn success_count(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("vllm:request_success_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_retry_once_the_stream_has_started() {
    let mut stack = stack_with(&[]).await;
    let response = stack
        .http
        .send(
            Method::POST,
            &stack.dataplanes[0].url("/v1/completions"),
            &[("content-type", "application/json")],
            r#"{"model":"stream","prompt":"hi","stream":true}"#.to_owned(),
        )
        .await
        .expect("stream starts");
    assert_eq!(response.status(), StatusCode::OK);
    let pod = response.headers()["x-mock-pod"]
        .to_str()
        .expect("pod")
        .to_owned();
    let other = if pod == "streamer-0" {
        "streamer-1"
    } else {
        "streamer-0"
    };
    let mut body = response.into_body();
    let first = body.frame().await.expect("first frame").expect("ok");
    assert!(first.is_data());
    stack.kill_engine(&pod);
    let mut received = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => received.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&received);
    assert!(
        !text.contains("[DONE]"),
        "the broken stream must not be completed by another pod: {text}"
    );
    let other_ip = if other == "streamer-0" { 17 } else { 18 };
    let metrics_url = format!("http://{}:{PORT}/metrics", engine_ip(&stack, other_ip));
    let metrics = stack.http.get(&metrics_url).await.expect("metrics").text();
    assert_eq!(
        success_count(&metrics),
        0.0,
        "{other} must not have served a retry"
    );
    assert!(
        metrics.contains("vllm:num_requests_running{")
            && !metrics
                .lines()
                .any(|l| l.starts_with("vllm:num_requests_running{") && !l.ends_with(" 0.0"))
    );
}

fn engine_ip(stack: &Stack, host: u8) -> Ipv4Addr {
    let pods = std::fs::read_to_string(stack.config_dir.join("pods.yaml")).expect("pods");
    let ip: Ipv4Addr = pods
        .lines()
        .find_map(|l| l.trim().strip_prefix("podIP: "))
        .and_then(|ip| ip.parse().ok())
        .expect("an ip");
    let o = ip.octets();
    Ipv4Addr::new(o[0], o[1], o[2], host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_specific_errors_and_the_router_keeps_serving() {
    let stack = stack_with(&["--max-body-bytes", "4096"]).await;
    let url = |path: &str| stack.dataplanes[0].url(path);
    let deep = format!(
        r#"{{"model":"shared","x":{}{}}}"#,
        "[".repeat(1000),
        "]".repeat(1000)
    );
    let big = format!(r#"{{"model":"shared","prompt":"{}"}}"#, "a".repeat(5000));
    let json = ("content-type", "application/json");
    let cases: Vec<BadInput<'_>> = vec![
        (
            "truncated JSON",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"{\"model\":\"shared\"".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "not JSON",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"model=shared".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "empty body",
            Method::POST,
            "/v1/completions",
            vec![json],
            vec![],
            StatusCode::BAD_REQUEST,
        ),
        (
            "array",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"[{\"model\":\"shared\"}]".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "string",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"\"shared\"".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "null",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"null".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "trailing data",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"{\"model\":\"shared\"} x".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "invalid UTF-8",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"{\"model\":\"sh\xffred\"}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "invalid escape",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"{\"model\":\"\\x\"}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "missing model",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"{\"prompt\":\"hi\"}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "numeric model",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"{\"model\":7}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "null model",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"{\"model\":null}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "empty model",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"{\"model\":\"\"}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "array model",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"{\"model\":[\"shared\"]}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "duplicate model",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"{\"model\":\"shared\",\"model\":\"dup\"}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "deep nesting",
            Method::POST,
            "/v1/completions",
            vec![json],
            deep.into_bytes(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "text/plain",
            Method::POST,
            "/v1/completions",
            vec![("content-type", "text/plain")],
            b"{\"model\":\"shared\"}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "form content type",
            Method::POST,
            "/v1/chat/completions",
            vec![("content-type", "application/x-www-form-urlencoded")],
            b"{\"model\":\"shared\"}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "body over the limit",
            Method::POST,
            "/v1/completions",
            vec![json],
            big.into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "GET on a POST path",
            Method::GET,
            "/v1/chat/completions",
            vec![],
            vec![],
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "PUT on a POST path",
            Method::PUT,
            "/v1/completions",
            vec![json],
            b"{}".to_vec(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "POST on /v1/models",
            Method::POST,
            "/v1/models",
            vec![json],
            b"{}".to_vec(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "unknown /v1 path",
            Method::POST,
            "/v1/unknown",
            vec![json],
            b"{\"model\":\"shared\"}".to_vec(),
            StatusCode::NOT_FOUND,
        ),
        (
            "unknown model",
            Method::POST,
            "/v1/completions",
            vec![json],
            b"{\"model\":\"nope\"}".to_vec(),
            StatusCode::NOT_FOUND,
        ),
    ];
    assert!(cases.len() >= 20);
    for (name, method, path, headers, body, expected) in cases {
        let response = stack
            .http
            .call(method, &url(path), &headers, body)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(response.status, expected, "{name}: {}", response.text());
        let error = response.json();
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.is_empty(),
            "{name}: OpenAI-style error expected, got {error}"
        );
        if name.contains("model") && expected == StatusCode::BAD_REQUEST {
            assert!(
                message.contains("model"),
                "{name}: the message names the field: {message}"
            );
        }
    }
    // Still serving.
    assert!(
        pod_for(&stack, "/v1/completions", "shared", &[])
            .await
            .starts_with("alpha-")
    );
}

/// Reads until the server closes the connection; false if it never does.
fn server_closes(mut stream: TcpStream) -> bool {
    stream
        .set_read_timeout(Some(WAIT_DEADLINE))
        .expect("read timeout");
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error) => {
                return matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed() {
    let stack = stack_with(&["--idle-timeout", "300ms"]).await;
    let addr = stack.dataplanes[0].traffic;
    let (idle, slow) = tokio::task::spawn_blocking(move || {
        let idle = TcpStream::connect(addr).expect("connect");
        let mut slow = TcpStream::connect(addr).expect("connect");
        slow.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            .expect("partial headers");
        (server_closes(idle), server_closes(slow))
    })
    .await
    .expect("join");
    assert!(idle, "an idle connection must be closed");
    assert!(
        slow,
        "a connection that never finishes its headers must be closed"
    );
    assert!(
        pod_for(&stack, "/v1/completions", "shared", &[])
            .await
            .starts_with("alpha-")
    );
}
