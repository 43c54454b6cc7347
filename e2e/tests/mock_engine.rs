//! The mock engine over real HTTP on loopback: response shapes, streaming, load metrics and the
//! test hooks other end-to-end tests rely on.

use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use switchyard_e2e::harness::{HttpClient, HttpResponse, MockEngineBinary, sample_value};
use switchyard_e2e::mock_engine::{EngineFlavor, Fault, MockEngineConfig, RunningMockEngine};

/// Label fragments of `vllm:request_success_total` and of SGLang's per-request series.
const ABORTED: &[&str] = &["finished_reason=\"abort\""];
const CUT_AT_LENGTH: &[&str] = &["finished_reason=\"length\""];
const STOPPED: &[&str] = &["finished_reason=\"stop\""];
const NOT_STREAMED: &[&str] = &["is_streaming=\"false\""];

/// Upper bound for a condition the engine reaches on its own (a gauge settling after a
/// disconnect); generous because CI machines can be slow, and only reached on failure.
const CONDITION_DEADLINE: Duration = Duration::from_secs(10);

fn config(model: &str, pod: &str) -> MockEngineConfig {
    MockEngineConfig::new(model, pod)
}

async fn start(config: MockEngineConfig) -> RunningMockEngine {
    RunningMockEngine::start(config, "127.0.0.1:0")
        .await
        .expect("engine starts on loopback")
}

fn url(engine: &RunningMockEngine, path: &str) -> String {
    format!("http://{}{path}", engine.addr())
}

async fn send(
    engine: &RunningMockEngine,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    HttpClient::default()
        .call(method, &url(engine, path), headers, body.to_owned())
        .await
        .expect("the engine answers")
}

async fn post(
    engine: &RunningMockEngine,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> HttpResponse {
    send(engine, Method::POST, path, headers, &body.to_string()).await
}

/// Value of the sample `name` whose labels contain every fragment in `labels`.
async fn metric(engine: &RunningMockEngine, name: &str, labels: &[&str]) -> f64 {
    let page = send(engine, Method::GET, "/metrics", &[], "").await;
    assert_eq!(page.status, StatusCode::OK);
    sample_value(&page.text(), name, labels)
}

/// Asserts each `(sample, label fragments, value)` of one `/metrics` page.
async fn assert_metrics(engine: &RunningMockEngine, expected: &[(&str, &[&str], f64)]) {
    let page = send(engine, Method::GET, "/metrics", &[], "").await.text();
    for (name, labels, value) in expected {
        assert_eq!(
            sample_value(&page, name, labels),
            *value,
            "{name} {labels:?}"
        );
    }
}

async fn wait_for_metric(engine: &RunningMockEngine, name: &str, labels: &[&str], expected: f64) {
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    loop {
        let value = metric(engine, name, labels).await;
        if value == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} {labels:?} stayed at {value}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Payloads of the `data:` events of an SSE body, in order.
fn sse_payloads(body: &str) -> Vec<&str> {
    body.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"))
        })
        .collect()
}

fn parse(payload: &str) -> Value {
    serde_json::from_str(payload).unwrap_or_else(|error| panic!("{error}: {payload}"))
}

#[tokio::test]
async fn chat_completion_has_vllm_shape_names_pod_and_counts_usage() {
    let engine = start(config("base", "pod-a")).await;
    let reply = post(
        &engine,
        "/v1/chat/completions",
        &[("x-request-id", "req-1")],
        json!({
            "model": "base",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hello."}
            ]
        }),
    )
    .await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("x-mock-pod"), Some("pod-a"));
    assert_eq!(reply.header("x-mock-received-model"), Some("base"));
    assert_eq!(reply.header("x-mock-request-id"), Some("req-1"));
    let body = reply.json();
    assert_eq!(body["id"], "chatcmpl-req-1");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "base");
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    // 16 default tokens = the 8-word sentence twice; no max_tokens, so the model "stopped".
    assert_eq!(
        choice["message"]["content"],
        "This is simulated message from base on pod-a! This is simulated message from base on pod-a!"
    );
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 5, "total_tokens": 21, "completion_tokens": 16, "prompt_tokens_details": null})
    );
    engine.stop().await.expect("clean stop");
}

#[tokio::test]
async fn completion_for_a_lora_adapter_is_capped_by_max_tokens() {
    let engine = start(MockEngineConfig {
        lora_adapters: vec!["lora-a".into()],
        ..config("base", "pod-b")
    })
    .await;
    let reply = post(
        &engine,
        "/v1/completions",
        &[],
        json!({"model": "lora-a", "prompt": "The license grants", "max_tokens": 4}),
    )
    .await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-mock-pod"), Some("pod-b"));
    assert_eq!(reply.header("x-mock-received-model"), Some("lora-a"));
    assert_eq!(reply.header("x-mock-request-id"), Some(""));
    let body = reply.json();
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("cmpl-"))
    );
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], "lora-a");
    assert_eq!(body["choices"][0]["text"], "This is simulated message");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert_eq!(body["usage"]["total_tokens"], 7);

    assert_metrics(
        &engine,
        &[
            ("vllm:prompt_tokens_total", &[], 3.0),
            ("vllm:generation_tokens_total", &[], 4.0),
            ("vllm:request_success_total", CUT_AT_LENGTH, 1.0),
        ],
    )
    .await;
    engine.stop().await.expect("clean stop");
}

#[tokio::test]
async fn streamed_chat_sends_role_one_chunk_per_token_usage_when_asked_and_done() {
    let engine = start(MockEngineConfig {
        output_tokens: 3,
        ..config("base", "pod-a")
    })
    .await;
    let request = |include_usage: bool| {
        json!({
            "model": "base",
            "messages": [{"role": "user", "content": "Say hello."}],
            "stream": true,
            "stream_options": {"include_usage": include_usage}
        })
    };

    let reply = post(
        &engine,
        "/v1/chat/completions",
        &[("x-request-id", "s-1")],
        request(true),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(reply.header("x-mock-pod"), Some("pod-a"));
    assert_eq!(reply.header("x-mock-request-id"), Some("s-1"));
    let body = reply.text();
    let payloads = sse_payloads(&body);
    assert_eq!(
        payloads.len(),
        1 + 3 + 1 + 1,
        "role, 3 tokens, usage, [DONE]: {payloads:?}"
    );
    let events: Vec<Value> = payloads[..5].iter().map(|payload| parse(payload)).collect();
    for event in &events {
        assert_eq!(event["id"], "chatcmpl-s-1");
        assert_eq!(event["object"], "chat.completion.chunk");
        assert_eq!(event["model"], "base");
    }
    assert_eq!(
        events[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = events[1..4]
        .iter()
        .map(|event| {
            event["choices"][0]["delta"]["content"]
                .as_str()
                .expect("content delta")
        })
        .collect();
    assert_eq!(text, "This is simulated");
    assert_eq!(events[1]["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(events[2]["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(events[3]["choices"][0]["finish_reason"], "stop");
    assert_eq!(events[4]["choices"], json!([]));
    assert_eq!(events[4]["usage"]["prompt_tokens"], 2);
    assert_eq!(events[4]["usage"]["completion_tokens"], 3);
    assert_eq!(events[4]["usage"]["total_tokens"], 5);
    assert_eq!(payloads[5], "[DONE]");

    let reply = post(&engine, "/v1/chat/completions", &[], request(false)).await;
    let body = reply.text();
    let payloads = sse_payloads(&body);
    assert_eq!(
        payloads.len(),
        1 + 3 + 1,
        "role, 3 tokens, [DONE]: {payloads:?}"
    );
    assert!(payloads.iter().all(|payload| !payload.contains("usage")));
    assert_eq!(payloads[4], "[DONE]");
    engine.stop().await.expect("clean stop");
}

#[tokio::test]
async fn streamed_completion_sends_text_chunks_and_the_finish_reason_last() {
    let engine = start(config("base", "pod-a")).await;
    let reply = post(
        &engine,
        "/v1/completions",
        &[],
        json!({"model": "base", "prompt": "hi", "max_tokens": 2, "stream": true}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.text();
    let payloads = sse_payloads(&body);
    assert_eq!(payloads.len(), 2 + 1, "2 tokens, [DONE]: {payloads:?}");
    let first = parse(payloads[0]);
    let last = parse(payloads[1]);
    assert_eq!(first["object"], "text_completion");
    assert_eq!(first["choices"][0]["text"], "This");
    assert_eq!(first["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(last["choices"][0]["text"], " is");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(payloads[2], "[DONE]");
    engine.stop().await.expect("clean stop");
}

#[tokio::test]
async fn first_chunk_arrives_while_the_request_runs_and_a_disconnect_ends_it() {
    // The second token is an hour away: whatever the machine's speed, the request is still
    // generating while the client inspects the first chunk.
    let engine = start(MockEngineConfig {
        inter_token_latency: Duration::from_secs(3600),
        output_tokens: 5,
        ..config("base", "pod-a")
    })
    .await;
    assert_metrics(
        &engine,
        &[
            ("vllm:num_requests_running", &[], 0.0),
            ("vllm:kv_cache_usage_perc", &[], 0.0),
        ],
    )
    .await;

    let http = HttpClient::default();
    let body = json!({"model": "base", "messages": [{"role": "user", "content": "one two"}], "stream": true});
    let mut response = http
        .post_json_streaming(
            &url(&engine, "/v1/chat/completions"),
            &[],
            &body.to_string(),
        )
        .await
        .expect("the engine answers");
    assert_eq!(response.status(), StatusCode::OK);
    // The role event and the first token; TCP may split them over several frames.
    let mut first = String::new();
    while !(first.ends_with("\n\n") && first.matches("data: ").count() == 2) {
        let frame = response
            .body_mut()
            .frame()
            .await
            .expect("the stream is still open")
            .expect("frame without error");
        if let Ok(data) = frame.into_data() {
            first.push_str(std::str::from_utf8(&data).expect("UTF-8 frame"));
        }
    }
    let payloads = sse_payloads(&first);
    assert_eq!(payloads.len(), 2, "role and first token: {first:?}");
    assert_eq!(parse(payloads[1])["choices"][0]["delta"]["content"], "This");

    assert_metrics(
        &engine,
        &[
            ("vllm:num_requests_running", &[], 1.0),
            ("vllm:num_requests_waiting", &[], 0.0),
            // Two prompt words and one generated token are held in the 4096-token cache.
            ("vllm:kv_cache_usage_perc", &[], 3.0 / 4096.0),
            ("vllm:time_to_first_token_seconds_count", &[], 1.0),
        ],
    )
    .await;

    // The client goes away: a body dropped before its end closes the connection.
    drop(response);
    drop(http);
    wait_for_metric(&engine, "vllm:num_requests_running", &[], 0.0).await;
    assert_metrics(
        &engine,
        &[
            ("vllm:kv_cache_usage_perc", &[], 0.0),
            ("vllm:request_success_total", ABORTED, 1.0),
        ],
    )
    .await;
    engine.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_paced_stream_that_completes_is_counted_and_leaves_the_engine_idle() {
    let engine = start(MockEngineConfig {
        time_to_first_token: Duration::from_millis(20),
        inter_token_latency: Duration::from_millis(10),
        output_tokens: 4,
        ..config("base", "pod-a")
    })
    .await;
    let reply = post(
        &engine,
        "/v1/chat/completions",
        &[],
        json!({"model": "base", "messages": [{"role": "user", "content": "hi"}], "stream": true}),
    )
    .await;
    assert_eq!(sse_payloads(&reply.text()).len(), 1 + 4 + 1);

    // The engine finished the request before writing `[DONE]`, so no waiting is needed.
    assert_metrics(
        &engine,
        &[
            ("vllm:num_requests_running", &[], 0.0),
            ("vllm:kv_cache_usage_perc", &[], 0.0),
            ("vllm:generation_tokens_total", &[], 4.0),
            ("vllm:time_to_first_token_seconds_count", &[], 1.0),
            ("vllm:inter_token_latency_seconds_count", &[], 3.0),
            ("vllm:request_success_total", STOPPED, 1.0),
            ("vllm:request_success_total", ABORTED, 0.0),
        ],
    )
    .await;
    engine.stop().await.expect("clean stop");
}

#[tokio::test]
async fn unknown_model_is_a_vllm_404() {
    let engine = start(config("base", "pod-a")).await;
    let reply = post(
        &engine,
        "/v1/completions",
        &[],
        json!({"model": "no-such-model", "prompt": "hi", "max_tokens": 4}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.header("x-mock-pod"), Some("pod-a"));
    assert_eq!(reply.header("x-mock-received-model"), Some("no-such-model"));
    assert_eq!(
        reply.json(),
        json!({"error": {
            "message": "The model `no-such-model` does not exist. Valid aliases: base.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404
        }})
    );
    assert_eq!(metric(&engine, "vllm:num_requests_running", &[]).await, 0.0);
    engine.stop().await.expect("clean stop");
}

#[tokio::test]
async fn models_lists_the_base_model_and_its_lora_adapters() {
    let engine = start(MockEngineConfig {
        lora_adapters: vec!["lora-a".into(), "lora-b".into()],
        ..config("base", "pod-a")
    })
    .await;
    let reply = send(&engine, Method::GET, "/v1/models", &[], "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-mock-pod"), Some("pod-a"));
    let body = reply.json();
    assert_eq!(body["object"], "list");
    let models: Vec<(&str, &str, Value)> = body["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|card| {
            (
                card["id"].as_str().expect("id"),
                card["owned_by"].as_str().expect("owned_by"),
                card["parent"].clone(),
            )
        })
        .collect();
    assert_eq!(
        models,
        vec![
            ("base", "vllm", Value::Null),
            ("lora-a", "vllm", json!("base")),
            ("lora-b", "vllm", json!("base")),
        ]
    );
    engine.stop().await.expect("clean stop");
}

#[tokio::test]
async fn lora_adapters_can_be_loaded_and_unloaded_at_runtime() {
    let engine = start(config("base", "pod-a")).await;
    let ask = json!({"model": "lora-new", "prompt": "hi", "max_tokens": 1});
    let load = json!({"lora_name": "lora-new", "lora_path": "/adapters/new"});
    let name_only = json!({"lora_name": "lora-new"});
    let loaded = Some("Success: LoRA adapter 'lora-new' added successfully.");
    // Each step in order: what is sent, the status it gets and, where
    // checked, the body.
    let steps = [
        ("/v1/completions", &ask, StatusCode::NOT_FOUND, None),
        ("/v1/load_lora_adapter", &load, StatusCode::OK, loaded),
        ("/v1/completions", &ask, StatusCode::OK, None),
        // Loading it again is refused.
        (
            "/v1/load_lora_adapter",
            &name_only,
            StatusCode::BAD_REQUEST,
            None,
        ),
        ("/v1/unload_lora_adapter", &name_only, StatusCode::OK, None),
        ("/v1/completions", &ask, StatusCode::NOT_FOUND, None),
        // Unloading what is not loaded is refused.
        (
            "/v1/unload_lora_adapter",
            &name_only,
            StatusCode::NOT_FOUND,
            None,
        ),
    ];
    for (step, (path, body, status, text)) in steps.into_iter().enumerate() {
        let reply = post(&engine, path, &[], body.clone()).await;
        assert_eq!(reply.status, status, "step {step}: {path} {body}");
        if let Some(text) = text {
            assert_eq!(reply.text(), text, "step {step}");
        }
    }
    engine.stop().await.expect("clean stop");
}

#[tokio::test]
async fn x_mock_status_fails_the_request_with_that_status() {
    let engine = start(config("base", "pod-a")).await;
    let reply = post(
        &engine,
        "/v1/chat/completions",
        &[("x-mock-status", "503"), ("x-request-id", "r-9")],
        json!({"model": "base", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("x-mock-pod"), Some("pod-a"));
    assert_eq!(reply.header("x-mock-received-model"), Some("base"));
    assert_eq!(reply.header("x-mock-request-id"), Some("r-9"));
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "ServiceUnavailableError");
    assert_eq!(error["code"], 503);

    let bad_request = post(
        &engine,
        "/v1/completions",
        &[("x-mock-status", "400")],
        json!({"model": "base", "prompt": "hi"}),
    )
    .await;
    assert_eq!(bad_request.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_request.json()["error"]["type"], "BadRequestError");

    let nonsense = post(
        &engine,
        "/v1/completions",
        &[("x-mock-status", "200")],
        json!({"model": "base", "prompt": "hi"}),
    )
    .await;
    assert_eq!(nonsense.status, StatusCode::BAD_REQUEST);

    // Forced failures never reach the engine.
    assert_eq!(
        metric(&engine, "vllm:generation_tokens_total", &[]).await,
        0.0
    );
    engine.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_broken_engine_fails_every_inference_request_as_configured() {
    let broken = |fault| MockEngineConfig {
        fault: Some(fault),
        ..config("base", "pod-a")
    };
    let chat =
        json!({"model": "base", "stream": true, "messages": [{"role": "user", "content": "hi"}]});

    let failing = start(broken(Fault::Status(503))).await;
    let reply = post(&failing, "/v1/chat/completions", &[], chat.clone()).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"]["code"], 503);
    let health = send(&failing, Method::GET, "/health", &[], "").await;
    assert_eq!(health.status, StatusCode::OK, "only inference is broken");
    failing.stop().await.expect("clean stop");

    let cutting = start(broken(Fault::CutStreamAfter(2))).await;
    let response = HttpClient::default()
        .post_json_streaming(
            &url(&cutting, "/v1/chat/completions"),
            &[],
            &chat.to_string(),
        )
        .await
        .expect("a response head");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut events = 0;
    let ended = loop {
        match body.frame().await {
            Some(Ok(_)) => events += 1,
            Some(Err(_)) => break "cut",
            None => break "ended",
        }
    };
    assert_eq!((events, ended), (2, "cut"));
    cutting.stop().await.expect("clean stop");

    let hanging = start(broken(Fault::Hang)).await;
    let unanswered = tokio::time::timeout(
        Duration::from_millis(300),
        post(
            &hanging,
            "/v1/completions",
            &[],
            json!({"model": "base", "prompt": "hi"}),
        ),
    )
    .await;
    assert!(unanswered.is_err(), "no answer");
    let models = send(&hanging, Method::GET, "/v1/models", &[], "").await;
    assert_eq!(models.status, StatusCode::OK);
    hanging.stop().await.expect("clean stop");
}

#[tokio::test]
async fn malformed_json_is_a_400_error() {
    let engine = start(config("base", "pod-a")).await;
    let reply = send(
        &engine,
        Method::POST,
        "/v1/chat/completions",
        &[],
        "{\"model\": \"base\", ",
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.header("x-mock-pod"), Some("pod-a"));
    assert_eq!(reply.header("x-mock-received-model"), Some(""));
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "BadRequestError");
    assert_eq!(error["code"], 400);
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("Invalid JSON body")),
        "{error}"
    );

    let not_a_request = post(
        &engine,
        "/v1/chat/completions",
        &[],
        json!({"model": "base"}),
    )
    .await;
    assert_eq!(not_a_request.status, StatusCode::BAD_REQUEST);
    assert_eq!(not_a_request.header("x-mock-received-model"), Some("base"));
    engine.stop().await.expect("clean stop");
}

#[tokio::test]
async fn health_and_unknown_routes() {
    let engine = start(config("base", "pod-a")).await;
    let health = send(&engine, Method::GET, "/health", &[], "").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.header("x-mock-pod"), Some("pod-a"));
    let missing = send(&engine, Method::GET, "/v2/nothing", &[], "").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.json(), json!({"detail": "Not Found"}));
    let wrong_method = send(&engine, Method::GET, "/v1/completions", &[], "").await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    engine.stop().await.expect("clean stop");
}

#[tokio::test]
async fn sglang_flavour_exposes_sglang_metric_names() {
    let engine = start(MockEngineConfig {
        engine: EngineFlavor::Sglang,
        ..config("qwen", "sglang-0")
    })
    .await;
    let reply = post(
        &engine,
        "/v1/completions",
        &[],
        json!({"model": "qwen", "prompt": "a b c"}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_metrics(
        &engine,
        &[
            ("sglang:num_running_reqs", &[], 0.0),
            ("sglang:num_queue_reqs", &[], 0.0),
            ("sglang:token_usage", &[], 0.0),
            ("sglang:prompt_tokens_total", NOT_STREAMED, 3.0),
            (
                "sglang:time_to_first_token_seconds_count",
                NOT_STREAMED,
                1.0,
            ),
            ("sglang:inter_token_latency_seconds_count", &[], 15.0),
        ],
    )
    .await;
    let page = send(&engine, Method::GET, "/metrics", &[], "").await;
    assert!(!page.text().contains("vllm:"));
    let models = send(&engine, Method::GET, "/v1/models", &[], "").await;
    assert_eq!(models.json()["data"][0]["owned_by"], "sglang");
    engine.stop().await.expect("clean stop");
}

#[cfg(unix)]
#[tokio::test]
async fn binary_announces_its_address_and_exits_cleanly_on_sigterm() {
    let engine =
        MockEngineBinary::start(&["--host", "127.0.0.1", "--model", "base", "--lora", "a,b"]).await;
    let response = engine.get("/v1/models").await;
    assert_eq!(response.status, StatusCode::OK);
    let expected_pod = format!("mock-{}", engine.addr.port());
    assert_eq!(response.header("x-mock-pod"), Some(expected_pod.as_str()));
    assert_eq!(response.json()["data"].as_array().map(Vec::len), Some(3));

    let status = engine.terminate().await;
    assert!(status.success(), "{status}");
}
