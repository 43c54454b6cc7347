//! The mock engine's prefill and decode roles over real HTTP on loopback: what each KV
//! connector's engines answer, so router tests can check both legs at the engines.

use std::time::Duration;

use serde_json::{Value, json};
use switchyard_e2e::harness::{HttpClient, HttpResponse, ip_in, test_subnet, wait_for};
use switchyard_e2e::mock_engine::pd::{
    DECODE_STATUS_HEADER, DEFAULT_BOOTSTRAP_PORT, KV_SOURCE_HEADER, KV_TRANSFER_HEADER, PdConfig,
    PdRole,
};
use switchyard_e2e::mock_engine::{MockEngineConfig, RunningMockEngine};

/// How long a bootstrap pairing waits in these tests: short, so a lone side fails fast, and
/// still far above the time a loopback round trip takes.
const HANDSHAKE: Duration = Duration::from_millis(1500);

fn pd(role: PdRole, bootstrap_port: Option<u16>) -> Option<PdConfig> {
    Some(PdConfig {
        role,
        bootstrap_port,
        handshake_timeout: HANDSHAKE,
    })
}

async fn engine(pod: &str, addr: &str, role: Option<PdConfig>) -> RunningMockEngine {
    let config = MockEngineConfig {
        pd: role,
        ..MockEngineConfig::new("m", pod)
    };
    RunningMockEngine::start(config, addr)
        .await
        .expect("engine starts on loopback")
}

async fn post(engine: &RunningMockEngine, headers: &[(&str, &str)], body: Value) -> HttpResponse {
    HttpClient::default()
        .post_json(
            &format!("{}/v1/completions", engine.base_url()),
            headers,
            &body.to_string(),
        )
        .await
        .expect("the engine answers")
}

async fn logged(engine: &RunningMockEngine) -> Vec<Value> {
    let response = HttpClient::default()
        .get(&format!("{}/mock/requests", engine.base_url()))
        .await
        .expect("the engine answers");
    response.json()["requests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn nixl_prefill_answers_kv_transfer_params_and_decode_reports_them() {
    let prefill = engine("prefill-0", "127.0.0.1:0", pd(PdRole::Prefill, None)).await;
    let decode = engine("decode-0", "127.0.0.1:0", pd(PdRole::Decode, None)).await;
    let answer = post(
        &prefill,
        &[("x-request-id", "r-1")],
        json!({"model": "m", "prompt": "one two three", "max_tokens": 1,
               "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false}}),
    )
    .await;
    assert_eq!(answer.status, 200);
    let params = answer.json()["kv_transfer_params"].clone();
    assert_eq!(params["do_remote_prefill"], true);
    assert_eq!(params["remote_engine_id"], "prefill-0");
    assert_eq!(params["remote_request_id"], "r-1");
    assert_eq!(
        params["remote_port"],
        u64::from(prefill.addr().port()),
        "{params}"
    );

    let received = post(
        &decode,
        &[],
        json!({"model": "m", "prompt": "one two three", "kv_transfer_params": params}),
    )
    .await;
    assert_eq!(received.header(KV_TRANSFER_HEADER), Some("received"));
    assert_eq!(received.header(KV_SOURCE_HEADER), Some("prefill-0"));
    assert_eq!(
        received.json()["usage"]["prompt_tokens_details"],
        json!({"cached_tokens": 3})
    );

    let recomputed = post(
        &decode,
        &[],
        json!({"model": "m", "prompt": "one two three"}),
    )
    .await;
    assert_eq!(recomputed.header(KV_TRANSFER_HEADER), Some("none"));
    assert_eq!(recomputed.header(KV_SOURCE_HEADER), None);
    assert_eq!(
        recomputed.json()["usage"]["prompt_tokens_details"],
        json!({"cached_tokens": 0})
    );

    let plain = engine("plain-0", "127.0.0.1:0", None).await;
    let answer = post(
        &plain,
        &[],
        json!({"model": "m", "prompt": "x", "kv_transfer_params": {"do_remote_decode": true}}),
    )
    .await;
    assert!(answer.json().get("kv_transfer_params").is_none());
    assert_eq!(answer.header(KV_TRANSFER_HEADER), None);
    assert_eq!(answer.json()["usage"]["prompt_tokens_details"], Value::Null);
}

#[tokio::test]
async fn a_streamed_decode_reports_cached_tokens_in_its_usage_chunk() {
    let decode = engine("decode-0", "127.0.0.1:0", pd(PdRole::Decode, None)).await;
    let answer = post(
        &decode,
        &[],
        json!({"model": "m", "prompt": "a b", "stream": true, "stream_options": {"include_usage": true},
               "kv_transfer_params": {"do_remote_prefill": true, "remote_engine_id": "prefill-9"}}),
    )
    .await;
    assert_eq!(answer.header(KV_SOURCE_HEADER), Some("prefill-9"));
    let usage_chunk = answer
        .text()
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .find(|chunk| !chunk["usage"].is_null())
        .expect("a usage chunk");
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"],
        2
    );
}

#[tokio::test]
async fn sglang_prefill_and_decode_pair_up_through_a_room() {
    let prefill = engine("prefill-0", "127.0.0.1:0", pd(PdRole::Prefill, None)).await;
    let decode = engine("decode-0", "127.0.0.1:0", pd(PdRole::Decode, None)).await;
    let bootstrap = json!({"bootstrap_host": "127.0.0.1", "bootstrap_port": prefill.addr().port(), "bootstrap_room": 77});
    let with = |body: Value| {
        let mut body = body;
        for (key, value) in bootstrap.as_object().expect("object") {
            if body.get(key).is_none() {
                body[key] = value.clone();
            }
        }
        body
    };
    // Each side waits for the other: they only succeed when sent at the same time.
    let (prefilled, decoded) = tokio::join!(
        post(
            &prefill,
            &[],
            with(json!({"model": "m", "prompt": "p q r s", "max_tokens": 1}))
        ),
        post(
            &decode,
            &[],
            with(json!({"model": "m", "prompt": "p q r s"}))
        ),
    );
    assert_eq!(prefilled.status, 200, "{}", prefilled.text());
    assert_eq!(decoded.status, 200, "{}", decoded.text());
    assert_eq!(decoded.header(KV_TRANSFER_HEADER), Some("bootstrap"));
    assert_eq!(decoded.header(KV_SOURCE_HEADER), Some("prefill-0"));
    assert_eq!(
        decoded.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        4
    );

    // A decode whose prefill never comes fails, as SGLang's does.
    let in_room = |room: u64| with(json!({"model": "m", "prompt": "x", "bootstrap_room": room}));
    let alone = post(&decode, &[], in_room(78)).await;
    assert_eq!(alone.status, 500);
    assert!(
        alone.json()["error"]["message"]
            .as_str()
            .is_some_and(|message| message.starts_with(
                "KV bootstrap failed: no prefill engine registered bootstrap room 78"
            )),
        "{}",
        alone.text()
    );
    // And so does a prefill whose decode never comes.
    let alone = post(&prefill, &[], in_room(79)).await;
    alone.assert_says(500, "no decode engine joined bootstrap room 79");
}

#[tokio::test]
async fn a_prefill_serves_bootstrap_on_sglangs_default_port_when_asked() {
    let subnet = test_subnet();
    let host = ip_in(subnet, 1).to_string();
    let prefill = engine(
        "prefill-0",
        &format!("{host}:0"),
        pd(PdRole::Prefill, Some(DEFAULT_BOOTSTRAP_PORT)),
    )
    .await;
    let decode = engine("decode-0", "127.0.0.1:0", pd(PdRole::Decode, None)).await;
    let room = json!({"bootstrap_host": host, "bootstrap_room": 5});
    let (prefilled, decoded) = tokio::join!(
        post(
            &prefill,
            &[],
            json!({"model": "m", "prompt": "x", "bootstrap_host": room["bootstrap_host"], "bootstrap_room": 5})
        ),
        post(
            &decode,
            &[],
            json!({"model": "m", "prompt": "x", "bootstrap_host": room["bootstrap_host"], "bootstrap_room": 5})
        ),
    );
    assert_eq!(prefilled.status, 200, "{}", prefilled.text());
    assert_eq!(
        decoded.header(KV_SOURCE_HEADER),
        Some("prefill-0"),
        "{}",
        decoded.text()
    );
}

#[tokio::test]
async fn the_request_log_shows_bodies_and_cancelled_requests() {
    let prefill = engine("prefill-0", "127.0.0.1:0", pd(PdRole::Prefill, None)).await;
    let decode = engine("decode-0", "127.0.0.1:0", pd(PdRole::Decode, None)).await;
    // Paired, then the decode fails (its prefill has what it needs and answers).
    let body = json!({"model": "m", "prompt": "x", "bootstrap_host": "127.0.0.1",
                      "bootstrap_port": prefill.addr().port(), "bootstrap_room": 9});
    let (prefilled, decoded) = tokio::join!(
        post(&prefill, &[("x-request-id", "same")], body.clone()),
        post(
            &decode,
            &[("x-request-id", "same"), (DECODE_STATUS_HEADER, "503")],
            body.clone()
        ),
    );
    assert_eq!(prefilled.status, 200);
    assert_eq!(decoded.status, 503, "decode engines fail once paired");
    let plain = post(
        &prefill,
        &[(DECODE_STATUS_HEADER, "503")],
        json!({"model": "m", "prompt": "y"}),
    )
    .await;
    assert_eq!(
        plain.status, 200,
        "the decode status header is for decode engines only"
    );

    // A prefill left waiting for its decode, then given up by its sender.
    let waiting = tokio::time::timeout(
        Duration::from_millis(300),
        post(
            &prefill,
            &[("x-request-id", "gone")],
            json!({"model": "m", "prompt": "z", "bootstrap_room": 10}),
        ),
    )
    .await;
    assert!(waiting.is_err());
    let requests = wait_for("the cancelled request to be logged", || async {
        let requests = logged(&prefill).await;
        requests
            .iter()
            .any(|r| r["requestId"] == "gone" && r["outcome"] == "cancelled")
            .then_some(requests)
    })
    .await;
    assert_eq!(requests[0]["path"], "/v1/completions");
    assert_eq!(requests[0]["requestId"], "same");
    assert_eq!(requests[0]["body"], body);
    assert_eq!(requests[0]["outcome"], "answered");
    assert_eq!(logged(&decode).await[0]["outcome"], "answered");
}
