//! `--mode sim`: the engine simulator behind the real HTTP layer.
//!
//! Most tests drive `EngineState::handle` in-process under paused tokio time, so every latency
//! is simulated time and every run repeats exactly; one test goes over loopback TCP and one runs
//! the binary with the sim flags.
//!
//! Prompts are built from words of at most four characters, one token each for the simulator's
//! tokenizer, plus the BOS token: `prompt("a", 99)` is exactly 100 tokens.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use switchyard_e2e::harness::{HttpClient, MockEngineBinary, sample_value};
use switchyard_e2e::mock_engine::http::{EngineState, ResponseBody};
use switchyard_e2e::mock_engine::{
    EngineFlavor, EngineMode, MockEngineConfig, RunningMockEngine, SimConfig, SimState,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Upper bound for a condition the engine reaches on its own; simulated time in the paused
/// tests, and only reached on failure.
const CONDITION_DEADLINE: Duration = Duration::from_secs(10);

/// Latencies with round numbers: a step costs 10 ms, plus 1 ms per running sequence, plus 1 ms
/// per prefilled prompt token.
fn round_latencies() -> SimConfig {
    SimConfig {
        prefill_ms_per_token: 1.0,
        itl_ms: 10.0,
        itl_ms_per_seq: 1.0,
        ..SimConfig::default()
    }
}

/// Every test sets `max_tokens`, so the natural completion length is set far above them.
fn sim_engine_config(sim: SimConfig) -> MockEngineConfig {
    MockEngineConfig {
        mode: EngineMode::Sim(sim),
        output_tokens: 1000,
        ..MockEngineConfig::new("base", "sim-pod")
    }
}

/// `words` one-token words starting with `topic`: prompts with different topics share no
/// tokens, prompts with the same topic share their first `min(words)` tokens.
fn prompt(topic: &str, words: usize) -> String {
    (0..words)
        .map(|index| format!("{topic}{index}"))
        .collect::<Vec<_>>()
        .join(" ")
}

struct Reply {
    status: StatusCode,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|error| panic!("{error}: {}", self.body))
    }

    /// Token events of an SSE completion body.
    fn token_events(&self) -> usize {
        self.body
            .split("\n\n")
            .filter(|event| event.starts_with("data: {") && event.contains("\"text\""))
            .count()
    }
}

async fn into_reply(response: Response<ResponseBody>) -> Reply {
    let (head, body) = response.into_parts();
    let collected = body.collect().await.expect("bodies are infallible");
    let body = String::from_utf8(collected.to_bytes().to_vec()).expect("UTF-8 body");
    Reply {
        status: head.status,
        body,
    }
}

fn completion_body(prompt: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"model": "base", "prompt": prompt, "max_tokens": max_tokens, "stream": stream})
}

/// A sim engine served in-process, without sockets, so paused time covers all of it.
struct Engine(Arc<EngineState>);

impl Engine {
    fn start(config: MockEngineConfig) -> Self {
        config.validate().expect("valid configuration");
        Self(Arc::new(EngineState::new(config)))
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Response<ResponseBody> {
        call(&self.0, method, path, body).await
    }

    async fn text(&self, path: &str) -> String {
        let reply = into_reply(self.call(Method::GET, path, None).await).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.body);
        reply.body
    }

    async fn state(&self) -> SimState {
        serde_json::from_str(&self.text("/sim/state").await).expect("/sim/state is a SimState")
    }

    /// Value of the first sample of `name`.
    async fn metric(&self, name: &str) -> f64 {
        sample(&self.text("/metrics").await, name)
    }

    /// Sends a completion on its own task, which reads the whole response as it comes.
    fn spawn_completion(&self, prompt: &str, max_tokens: u32, stream: bool) -> JoinHandle<Reply> {
        let state = Arc::clone(&self.0);
        let body = completion_body(prompt, max_tokens, stream);
        tokio::spawn(async move {
            into_reply(call(&state, Method::POST, "/v1/completions", Some(body)).await).await
        })
    }

    async fn completion(&self, prompt: &str, max_tokens: u32) -> Reply {
        self.spawn_completion(prompt, max_tokens, false)
            .await
            .expect("completion task")
    }

    /// Time until the first streamed token of a completion, then the rest of the stream.
    async fn time_to_first_token(&self, prompt: &str, max_tokens: u32) -> Duration {
        let started = Instant::now();
        let response = self
            .call(
                Method::POST,
                "/v1/completions",
                Some(completion_body(prompt, max_tokens, true)),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        body.frame().await.expect("a first token").expect("frame");
        let time_to_first_token = started.elapsed();
        while body.frame().await.is_some() {}
        time_to_first_token
    }

    async fn wait_for(&self, what: &str, condition: impl Fn(&SimState) -> bool) -> SimState {
        let deadline = Instant::now() + CONDITION_DEADLINE;
        loop {
            let state = self.state().await;
            if condition(&state) {
                return state;
            }
            assert!(Instant::now() < deadline, "never {what}: {state:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

async fn call(
    state: &EngineState,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Response<ResponseBody> {
    let body = body.map(|body| body.to_string()).unwrap_or_default();
    let request = Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(Bytes::from(body)))
        .expect("valid request");
    state.handle(request).await
}

fn sample(page: &str, name: &str) -> f64 {
    sample_value(page, name, &[])
}

fn assert_close(actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() < 1e-9,
        "{actual} is not {expected}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_repeated_long_prompt_hits_the_prefix_cache_and_starts_sooner() {
    let engine = Engine::start(sim_engine_config(round_latencies()));
    let long_prompt = prompt("a", 199);

    let cold = engine.time_to_first_token(&long_prompt, 4).await;
    assert_eq!(
        engine.metric("vllm:prefix_cache_queries_total").await,
        200.0
    );
    assert_eq!(engine.metric("vllm:prefix_cache_hits_total").await, 0.0);

    let warm = engine.time_to_first_token(&long_prompt, 4).await;
    // 12 full 16-token blocks are reused; only the last 8 tokens are prefilled.
    assert_eq!(
        engine.metric("vllm:prefix_cache_queries_total").await,
        400.0
    );
    assert_eq!(engine.metric("vllm:prefix_cache_hits_total").await, 192.0);
    assert!(
        warm < cold,
        "warm {warm:?} is not faster than cold {cold:?}"
    );
    assert_eq!(cold, Duration::from_millis(10 + 1 + 200));
    assert_eq!(warm, Duration::from_millis(10 + 1 + 8));

    // Usage and the token counters use the simulator's token count.
    assert_eq!(engine.metric("vllm:prompt_tokens_total").await, 400.0);
    assert_eq!(engine.metric("vllm:generation_tokens_total").await, 8.0);
    assert_eq!(
        engine
            .metric("vllm:time_to_first_token_seconds_count")
            .await,
        2.0
    );
    assert_close(
        engine.metric("vllm:time_to_first_token_seconds_sum").await,
        0.211 + 0.019,
    );
    let reply = engine.completion(&long_prompt, 2).await;
    assert_eq!(reply.json()["usage"]["prompt_tokens"], 200);

    let state = engine.state().await;
    assert_eq!(state.prefix_cache_hit_tokens, 384);
    assert_eq!(state.prefix_cache_queried_tokens, 600);
    assert_close(state.prefix_cache_hit_rate, 384.0 / 600.0);
    assert_eq!(state.kv_blocks_used, 0);
    assert_eq!(state.kv_blocks_cached, 12);
    assert_eq!(state.finished, 3);
}

#[tokio::test(start_paused = true)]
async fn requests_beyond_max_num_seqs_wait_and_metrics_report_it() {
    let engine = Engine::start(sim_engine_config(SimConfig {
        max_num_seqs: 2,
        ..round_latencies()
    }));
    let clients: Vec<_> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|topic| engine.spawn_completion(&prompt(topic, 20), 20, true))
        .collect();

    let state = engine
        .wait_for("2 running and 3 waiting", |state| {
            state.running == 2 && state.waiting == 3
        })
        .await;
    assert_eq!(state.max_num_seqs, 2);
    let page = engine.text("/metrics").await;
    assert_eq!(sample(&page, "vllm:num_requests_running"), 2.0);
    assert_eq!(sample(&page, "vllm:num_requests_waiting"), 3.0);

    for client in clients {
        let reply = client.await.expect("client task");
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.token_events(), 20);
    }
    let state = engine.state().await;
    assert_eq!((state.running, state.waiting, state.finished), (0, 0, 5));
    assert_eq!(engine.metric("vllm:num_requests_waiting").await, 0.0);
}

#[tokio::test(start_paused = true)]
async fn kv_usage_follows_concurrent_long_prompts() {
    // 16 blocks of 16 tokens.
    let engine = Engine::start(sim_engine_config(SimConfig {
        kv_blocks: 16,
        ..round_latencies()
    }));
    assert_eq!(engine.metric("vllm:kv_cache_usage_perc").await, 0.0);
    let clients = [
        engine.spawn_completion(&prompt("b", 99), 10, true),
        engine.spawn_completion(&prompt("c", 99), 10, true),
    ];
    engine
        .wait_for("both running", |state| state.running == 2)
        .await;
    // Two 100-token prompts hold 7 blocks each.
    assert_eq!(engine.metric("vllm:kv_cache_usage_perc").await, 14.0 / 16.0);
    let state = engine.state().await;
    assert_eq!((state.kv_blocks_used, state.kv_blocks_total), (14, 16));
    for client in clients {
        assert_eq!(client.await.expect("client task").status, StatusCode::OK);
    }
    // Finished requests hold no blocks, but their full prompt blocks stay cached.
    assert_eq!(engine.metric("vllm:kv_cache_usage_perc").await, 0.0);
    assert_eq!(engine.state().await.kv_blocks_cached, 12);
}

#[tokio::test(start_paused = true)]
async fn lru_eviction_drops_the_oldest_prefixes_from_the_cache() {
    let engine = Engine::start(sim_engine_config(SimConfig {
        kv_blocks: 16,
        ..round_latencies()
    }));
    let hits = async || engine.state().await.prefix_cache_hit_tokens;
    let prompt_a = prompt("a", 99);

    engine.completion(&prompt_a, 1).await;
    let before = hits().await;
    engine.completion(&prompt_a, 1).await;
    assert_eq!(hits().await - before, 96, "6 full blocks reused");

    // Three other 7-block prompts push A's blocks out, least recently used first.
    for topic in ["b", "c", "d"] {
        engine.completion(&prompt(topic, 99), 1).await;
    }
    let state = engine.state().await;
    assert_eq!(state.evicted_blocks, 9);
    assert_eq!(state.kv_blocks_cached, 15);

    let before = hits().await;
    engine.completion(&prompt_a, 1).await;
    assert_eq!(hits().await - before, 0, "A was evicted");
    // D, the most recent prompt, is still cached.
    let before = hits().await;
    engine.completion(&prompt("d", 99), 1).await;
    assert_eq!(hits().await - before, 96);
}

#[tokio::test(start_paused = true)]
async fn inter_token_latency_grows_with_the_batch() {
    async fn mean_inter_token_latency(concurrent_requests: usize) -> f64 {
        let engine = Engine::start(sim_engine_config(round_latencies()));
        let topics = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let clients: Vec<_> = topics[..concurrent_requests]
            .iter()
            .map(|topic| engine.spawn_completion(&prompt(topic, 3), 21, true))
            .collect();
        for client in clients {
            assert_eq!(client.await.expect("client task").token_events(), 21);
        }
        let page = engine.text("/metrics").await;
        let count = sample(&page, "vllm:inter_token_latency_seconds_count");
        assert_eq!(count, 20.0 * concurrent_requests as f64);
        sample(&page, "vllm:inter_token_latency_seconds_sum") / count
    }

    let alone = mean_inter_token_latency(1).await;
    let batched = mean_inter_token_latency(4).await;
    assert!(batched > alone, "{batched} <= {alone}");
    assert_close(alone, 0.011);
    assert_close(batched, 0.014);
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_and_requests_give_the_same_metrics() {
    /// `/sim/state` and `/metrics` (without wall-clock timestamps) after a fixed workload:
    /// concurrent requests sharing a system prompt, more of them than can run at once.
    async fn run(seed: u64) -> (SimState, Vec<String>) {
        let engine = Engine::start(sim_engine_config(SimConfig {
            max_num_seqs: 3,
            kv_blocks: 40,
            seed,
            latency_jitter: 0.3,
            ..round_latencies()
        }));
        let system = prompt("s", 40);
        let clients: Vec<_> = (0..7)
            .map(|index| {
                let text = format!("{system} {}", prompt(&format!("q{index}"), 5 + index));
                engine.spawn_completion(&text, 6 + index as u32, index % 2 == 0)
            })
            .collect();
        for client in clients {
            assert_eq!(client.await.expect("client task").status, StatusCode::OK);
        }
        engine.completion(&system, 3).await;
        let metrics = engine
            .text("/metrics")
            .await
            .lines()
            .filter(|line| !line.contains("_created"))
            .map(str::to_string)
            .collect();
        (engine.state().await, metrics)
    }

    let (state, metrics) = run(7).await;
    assert!(state.prefix_cache_hit_tokens > 0);
    assert!(state.waiting == 0 && state.finished == 8);
    let (state_again, metrics_again) = run(7).await;
    assert_eq!(state_again, state);
    assert_eq!(metrics_again, metrics);
    // The seed drives the jitter, so another seed gives other latencies.
    let (_, other_seed_metrics) = run(8).await;
    let ttft_sum =
        |lines: &[String]| sample(&lines.join("\n"), "vllm:time_to_first_token_seconds_sum");
    assert_ne!(ttft_sum(&other_seed_metrics), ttft_sum(&metrics));
}

#[tokio::test(start_paused = true)]
async fn a_client_disconnect_frees_the_sequence_for_the_next_request() {
    let engine = Engine::start(sim_engine_config(SimConfig {
        max_num_seqs: 1,
        ..round_latencies()
    }));
    let response = engine
        .call(
            Method::POST,
            "/v1/completions",
            Some(completion_body(&prompt("a", 40), 200, true)),
        )
        .await;
    let queued = engine.spawn_completion(&prompt("b", 40), 3, true);
    let mut body = response.into_body();
    body.frame().await.expect("a first token").expect("frame");
    let state = engine
        .wait_for("the second request queued", |state| state.waiting == 1)
        .await;
    assert_eq!(state.running, 1);
    assert!(state.kv_blocks_used >= 3);

    drop(body);
    let state = engine.state().await;
    assert_eq!((state.running, state.aborted), (0, 1));
    assert_eq!(state.kv_blocks_used, 0);

    let reply = queued.await.expect("client task");
    assert_eq!(reply.token_events(), 3);
    let page = engine.text("/metrics").await;
    assert_eq!(
        sample_value(
            &page,
            "vllm:request_success_total",
            &["finished_reason=\"abort\""]
        ),
        1.0
    );
    assert_eq!(
        sample_value(
            &page,
            "vllm:request_success_total",
            &["finished_reason=\"length\""]
        ),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn prompts_are_bounded_by_the_kv_cache() {
    // 4 blocks of 16: a 64-token context.
    let engine = Engine::start(sim_engine_config(SimConfig {
        kv_blocks: 4,
        ..round_latencies()
    }));
    let too_long = engine.completion(&prompt("a", 70), 1).await;
    assert_eq!(too_long.status, StatusCode::BAD_REQUEST);
    let error = &too_long.json()["error"];
    assert_eq!(error["param"], "input_tokens");
    assert_eq!(error["type"], "BadRequestError");
    let message = error["message"].as_str().expect("message");
    assert!(
        message.contains("maximum context length is 64 tokens"),
        "{message}"
    );
    assert!(message.contains("71 input tokens"), "{message}");
    let models = into_reply(engine.call(Method::GET, "/v1/models", None).await).await;
    assert_eq!(models.json()["data"][0]["max_model_len"], 64);

    // 61 prompt tokens leave room for 3 output tokens.
    let clamped = engine.completion(&prompt("a", 60), 10).await;
    assert_eq!(clamped.status, StatusCode::OK);
    let body = clamped.json();
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(engine.state().await.admitted, 1);
}

#[tokio::test(start_paused = true)]
async fn chat_prompts_share_blocks_when_their_leading_messages_match() {
    // Two conversations with the same 30-word system message.
    let chat = |question: &str| {
        json!({"model": "base", "max_tokens": 1, "messages": [
            {"role": "system", "content": prompt("s", 30)},
            {"role": "user", "content": question},
        ]})
    };
    let engine = Engine::start(sim_engine_config(SimConfig {
        block_size: 4,
        ..round_latencies()
    }));
    for question in ["what is up", "how are you"] {
        let reply = into_reply(
            engine
                .call(Method::POST, "/v1/chat/completions", Some(chat(question)))
                .await,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        // BOS, "syst" "em:", 30 words, "user" ":", 3 words.
        assert_eq!(reply.json()["usage"]["prompt_tokens"], 38);
    }
    // The conversations share their first 35 tokens, so the second one reuses 8 full blocks.
    assert_eq!(engine.state().await.prefix_cache_hit_tokens, 32);
}

async fn http_get(engine: &RunningMockEngine, method: Method, path: &str, body: &str) -> Reply {
    let url = format!("http://{}{path}", engine.addr());
    let response = HttpClient::default()
        .call(method, &url, &[], body.to_owned())
        .await
        .expect("the engine answers");
    Reply {
        status: response.status,
        body: response.text(),
    }
}

#[tokio::test]
async fn over_loopback_sim_state_and_sglang_metrics_report_the_cache() {
    let engine = RunningMockEngine::start(
        MockEngineConfig {
            engine: EngineFlavor::Sglang,
            ..sim_engine_config(SimConfig {
                // Real time here: run a hundred times faster than modelled.
                time_scale: 0.01,
                ..round_latencies()
            })
        },
        "127.0.0.1:0",
    )
    .await
    .expect("engine starts on loopback");
    let body = completion_body(&prompt("a", 99), 2, false).to_string();
    for _ in 0..2 {
        let reply = http_get(&engine, Method::POST, "/v1/completions", &body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }

    let reply = http_get(&engine, Method::GET, "/sim/state", "").await;
    assert_eq!(reply.status, StatusCode::OK);
    let state = reply.json();
    assert_eq!(state["prefix_cache_queried_tokens"], 200);
    assert_eq!(state["prefix_cache_hit_tokens"], 96);
    assert_eq!(state["running"], 0);
    assert_eq!(state["kv_blocks_total"], 512);
    let page = http_get(&engine, Method::GET, "/metrics", "").await.body;
    assert_eq!(
        sample_value(
            &page,
            "sglang:cached_tokens_total",
            &["cache_source=\"device\""]
        ),
        96.0
    );
    assert_close(sample(&page, "sglang:cache_hit_rate"), 0.96);
    assert_eq!(sample(&page, "sglang:num_running_reqs"), 0.0);
    assert!(!page.contains("vllm:"));
    let post = http_get(&engine, Method::POST, "/sim/state", "").await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    engine.stop().await.expect("clean stop");

    let simple = RunningMockEngine::start(MockEngineConfig::new("base", "plain"), "127.0.0.1:0")
        .await
        .expect("engine starts on loopback");
    let reply = http_get(&simple, Method::GET, "/sim/state", "").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let page = http_get(&simple, Method::GET, "/metrics", "").await.body;
    assert!(!page.contains("prefix_cache"));
    simple.stop().await.expect("clean stop");
}

#[cfg(unix)]
#[tokio::test]
async fn the_binary_takes_the_sim_flags() {
    let binary = env!("CARGO_BIN_EXE_switchyard-mock-engine");
    let refused = tokio::process::Command::new(binary)
        .args([
            "--port",
            "0",
            "--model",
            "m",
            "--mode",
            "sim",
            "--ttft-ms",
            "5",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .expect("mock engine binary runs");
    assert_eq!(refused.code(), Some(2));

    let engine = MockEngineBinary::start(&[
        "--model",
        "m",
        "--mode",
        "sim",
        "--max-num-seqs",
        "3",
        "--kv-blocks",
        "32",
        "--block-size",
        "8",
        "--time-scale",
        "0.01",
    ])
    .await;
    let response = engine.get("/sim/state").await;
    assert_eq!(response.status, StatusCode::OK);
    let state: SimState = serde_json::from_slice(&response.body).expect("a SimState");
    assert_eq!(
        (state.max_num_seqs, state.kv_blocks_total, state.block_size),
        (3, 32, 8)
    );

    let status = engine.terminate().await;
    assert!(status.success(), "{status}");
}
