//! Routing semantics end to end: rule matching, route precedence, retries,
//! timeouts, pass-through of engine errors, and bad input.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use switchyard_e2e::harness::{ENGINE_PORT, Stack, TestPod, WAIT_DEADLINE};

/// The engines of alpha serve the adapters ad-1 and ad-2; beta's take every
/// model its routes send; slow-0 answers after 5 s; flaky-dead has no engine;
/// the streamers stream 20 tokens 200 ms apart.
fn pods() -> [TestPod; 8] {
    let alpha = &["--lora", "ad-1,ad-2"];
    let beta = &["--lora", "dup,by-path,ad-1,ad-2"];
    let streamer = &["--itl-ms", "200", "--output-tokens", "20"];
    [
        TestPod::serving("alpha-0", 11, "alpha", "org/alpha", alpha),
        TestPod::serving("alpha-1", 12, "alpha", "org/alpha", alpha),
        TestPod::serving("beta-0", 13, "beta", "shared", beta),
        TestPod::serving("slow-0", 14, "slow", "slow", &["--ttft-ms", "5000"]),
        TestPod::without_engine("flaky-dead", 15, "flaky"),
        TestPod::serving("flaky-live", 16, "flaky", "flaky", &[]),
        TestPod::serving("streamer-0", 17, "streamer", "stream", streamer),
        TestPod::serving("streamer-1", 18, "streamer", "stream", streamer),
    ]
}

/// A request the router refuses, and how.
struct BadInput {
    name: &'static str,
    method: Method,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: StatusCode,
}

impl BadInput {
    /// A JSON POST of `body` to /v1/completions, refused with 400.
    fn body(name: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            name,
            method: Method::POST,
            path: "/v1/completions",
            content_type: Some("application/json"),
            body: body.into(),
            status: StatusCode::BAD_REQUEST,
        }
    }

    fn to(self, method: Method, path: &'static str) -> Self {
        Self {
            method,
            path,
            ..self
        }
    }

    fn content_type(self, content_type: Option<&'static str>) -> Self {
        Self {
            content_type,
            ..self
        }
    }

    fn refused_with(self, status: StatusCode) -> Self {
        Self { status, ..self }
    }
}

async fn stack_with(dataplane_args: &[&str]) -> Stack {
    let objects = include_str!("config/routing_semantics.yaml");
    let mut stack = Stack::new(&[("objects.yaml", objects.to_owned())]);
    stack.start_pods(&pods()).await;
    stack.start_controller().await;
    let index = stack.spawn_dataplane_with(dataplane_args);
    stack.wait_dataplane_ready(index).await;
    stack
}

async fn pod_for(stack: &Stack, path: &str, model: &str, headers: &[(&str, &str)]) -> String {
    let body = if path.contains("chat") {
        format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
    } else {
        format!(r#"{{"model":"{model}","prompt":"hi"}}"#)
    };
    let response = stack.post(path, headers, &body).await;
    assert_eq!(
        response.status,
        StatusCode::OK,
        "{model} {path}: {}",
        response.text()
    );
    response.mock_pod()
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
    let response = stack
        .post(c, &[], r#"{"model":"ad-1","prompt":"hi"}"#)
        .await;
    assert!(
        response
            .header("x-mock-pod")
            .expect("pod")
            .starts_with("alpha-")
    );
    assert_eq!(response.header("x-mock-received-model"), Some("ad-1"));
    // A ModelServer's spec.model is what the engine receives.
    let response = stack
        .post(c, &[], r#"{"prompt":"hi","model":"shared","n":1}"#)
        .await;
    assert_eq!(response.header("x-mock-received-model"), Some("org/alpha"));
    // The route with an invalid regex is rejected, visibly, and the rest works.
    let response = stack
        .post(c, &[], r#"{"model":"broken","prompt":"hi"}"#)
        .await;
    assert_eq!(response.status, StatusCode::NOT_FOUND);
    assert!(
        response.text().contains("route not found"),
        "{}",
        response.text()
    );
    let objects = stack.controller_debug_get("/debug/objects").await.text();
    assert!(objects.contains("InvalidRegex"), "{objects}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_errors_pass_through_and_retries_follow_policy() {
    let stack = stack_with(&[]).await;
    let c = "/v1/completions";
    let body = r#"{"model":"shared","prompt":"hi"}"#;
    // A 4xx from the engine reaches the client unchanged, and is not retried.
    let response = stack.post(c, &[("x-mock-status", "400")], body).await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    let error = response.json();
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("Simulated failure"),
        "the engine's own body: {error}"
    );
    assert!(response.header("x-mock-pod").is_some());
    // A 503 on every pod: retried (alpha allows 2 retries over 2 pods), then passed through.
    let response = stack.post(c, &[("x-mock-status", "503")], body).await;
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
    let response = stack
        .post(c, &[], r#"{"model":"slow","prompt":"hi"}"#)
        .await;
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
        .post_streaming(
            "/v1/completions",
            &[],
            r#"{"model":"stream","prompt":"hi","stream":true}"#,
        )
        .await;
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
    let metrics_url = format!("http://{}:{ENGINE_PORT}/metrics", stack.ip(other_ip));
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
    let shared = r#"{"model":"shared"}"#;
    let cases = [
        BadInput::body("truncated JSON", r#"{"model":"shared""#),
        BadInput::body("not JSON", "model=shared"),
        BadInput::body("empty body", ""),
        BadInput::body("array", r#"[{"model":"shared"}]"#),
        BadInput::body("string", r#""shared""#),
        BadInput::body("null", "null"),
        BadInput::body("trailing data", r#"{"model":"shared"} x"#),
        BadInput::body("invalid UTF-8", b"{\"model\":\"sh\xffred\"}"),
        BadInput::body("invalid escape", r#"{"model":"\x"}"#),
        BadInput::body("missing model", r#"{"prompt":"hi"}"#),
        BadInput::body("numeric model", r#"{"model":7}"#),
        BadInput::body("null model", r#"{"model":null}"#),
        BadInput::body("empty model", r#"{"model":""}"#),
        BadInput::body("array model", r#"{"model":["shared"]}"#),
        BadInput::body("duplicate model", r#"{"model":"shared","model":"dup"}"#),
        BadInput::body("deep nesting", deep),
        BadInput::body("text/plain", shared).content_type(Some("text/plain")),
        BadInput::body("form content type", shared)
            .to(Method::POST, "/v1/chat/completions")
            .content_type(Some("application/x-www-form-urlencoded")),
        BadInput::body("body over the limit", big).refused_with(StatusCode::PAYLOAD_TOO_LARGE),
        BadInput::body("GET on a POST path", "")
            .to(Method::GET, "/v1/chat/completions")
            .content_type(None)
            .refused_with(StatusCode::METHOD_NOT_ALLOWED),
        BadInput::body("PUT on a POST path", "{}")
            .to(Method::PUT, "/v1/completions")
            .refused_with(StatusCode::METHOD_NOT_ALLOWED),
        BadInput::body("POST on /v1/models", "{}")
            .to(Method::POST, "/v1/models")
            .refused_with(StatusCode::METHOD_NOT_ALLOWED),
        BadInput::body("unknown /v1 path", shared)
            .to(Method::POST, "/v1/unknown")
            .refused_with(StatusCode::NOT_FOUND),
        BadInput::body("unknown model", r#"{"model":"nope"}"#).refused_with(StatusCode::NOT_FOUND),
    ];
    assert!(cases.len() >= 20);
    for case in cases {
        let (name, expected) = (case.name, case.status);
        let headers: Vec<(&str, &str)> = case
            .content_type
            .map(|content_type| ("content-type", content_type))
            .into_iter()
            .collect();
        let response = stack
            .http
            .call(case.method, &url(case.path), &headers, case.body)
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
