//! Token rate limits end to end: Kthena's two rate-limit examples as they
//! are (local mode), output charged in full, three dataplanes sharing a
//! global budget in a real Redis, and Redis killed while they run.

use std::time::Duration;

use http::StatusCode;
use switchyard_e2e::harness::{
    HttpResponse, Stack, TestPod, kthena_example, sample_value, wait_for,
};
use switchyard_e2e::redis_server::RedisServer;
use switchyard_runtime::clock;

const MODEL_1_5B: &str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B";
const LOCAL_LIMITED: &str = "deepseek-r1-with-rate-limit";
const GLOBAL_LIMITED: &str = "deepseek-r1-with-global-rate-limit";
/// The Redis address the global example names, which only resolves in a cluster.
const EXAMPLE_REDIS: &str = "redis-server.kthena-system.svc.cluster.local:6379";

/// A chat of one user message "hello world": 10 tokens by Kthena's estimate.
fn hello_world(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello world"}}]}}"#)
}

/// Kthena's ModelServer for the examples' routes, its pod, and `routes`.
async fn stack(routes: &[(&str, String)], engine_args: &[&str], dataplanes: usize) -> Stack {
    let mut files = vec![("server.yaml", kthena_example("ModelServer-ds1.5b.yaml"))];
    files.extend(routes.iter().map(|(name, yaml)| (*name, yaml.clone())));
    let mut stack = Stack::new(&files);
    stack
        .start_pods(&[TestPod::serving(
            "deepseek-r1-1-5b-0",
            10,
            "deepseek-r1-1-5b",
            MODEL_1_5B,
            engine_args,
        )])
        .await;
    stack.start_controller().await;
    for _ in 0..dataplanes {
        stack.start_dataplane().await;
    }
    stack
}

async fn chat(stack: &Stack, dataplane: usize, model: &str) -> HttpResponse {
    stack
        .http
        .post_json(
            &stack.dataplanes[dataplane].url("/v1/chat/completions"),
            &[],
            &hello_world(model),
        )
        .await
        .expect("dataplane answers")
}

async fn metrics_page(stack: &Stack, dataplane: usize) -> String {
    let url = format!("http://{}/metrics", stack.dataplanes[dataplane].metrics);
    stack.http.get(&url).await.expect("metrics").text()
}

fn retry_after(response: &HttpResponse) -> u64 {
    response
        .header("retry-after")
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After in {:?}", response.headers))
}

#[tokio::test]
async fn kthena_rate_limit_example_admits_three_hello_worlds_a_minute() {
    let stack = stack(
        &[("route.yaml", kthena_example("ModelRouteWithRateLimit.yaml"))],
        &[],
        1,
    )
    .await;
    let _logs = stack.logs_on_failure();
    // 30 input tokens per minute: three chats of 10 tokens, as in Kthena.
    for remaining in ["20", "10", "0"] {
        let answer = chat(&stack, 0, LOCAL_LIMITED).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(answer.header("x-ratelimit-limit-tokens"), Some("30"));
        assert_eq!(
            answer.header("x-ratelimit-remaining-tokens"),
            Some(remaining)
        );
        assert!(answer.header("x-ratelimit-reset-tokens").is_some());
    }
    for _ in 0..2 {
        let refused = chat(&stack, 0, LOCAL_LIMITED).await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        let body = refused.json();
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains("rate limit"), "{message}");
        assert!(message.contains("30 input tokens per minute"), "{message}");
        // 10 tokens refill at half a token per second.
        let wait = retry_after(&refused);
        assert!((1..=20).contains(&wait), "Retry-After {wait}");
        assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("30"));
    }
    let page = metrics_page(&stack, 0).await;
    let labels = [
        "model=\"deepseek-r1-with-rate-limit\"",
        "limit_type=\"input_tokens\"",
        "path=\"/v1/chat/completions\"",
    ];
    assert_eq!(
        sample_value(&page, "kthena_router_rate_limit_exceeded_total", &labels),
        2.0
    );
}

#[tokio::test]
async fn output_tokens_are_charged_in_full_into_debt() {
    // The engine answers 150 tokens against 100 output tokens per minute:
    // the whole 150 is charged (Kthena would charge nothing), so the next
    // request waits until the debt of 50 and one more token have refilled.
    let stack = stack(
        &[("route.yaml", kthena_example("ModelRouteWithRateLimit.yaml"))],
        &["--output-tokens", "150"],
        1,
    )
    .await;
    let _logs = stack.logs_on_failure();
    let answer = chat(&stack, 0, LOCAL_LIMITED).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["usage"]["completion_tokens"], 150);
    // The charge lands when the response ends, just after the client has it.
    let refused = wait_for("the output charge", || async {
        let answer = chat(&stack, 0, LOCAL_LIMITED).await;
        (answer.status == StatusCode::TOO_MANY_REQUESTS).then_some(answer)
    })
    .await;
    let message = refused.json()["error"]["message"].clone();
    assert!(
        message
            .as_str()
            .is_some_and(|m| m.starts_with("output token rate limit exceeded")),
        "{message}"
    );
    // 51 tokens at 100 per minute: about 31 s.
    let wait = retry_after(&refused);
    assert!((25..=31).contains(&wait), "Retry-After {wait}");
}

/// The global example with its Redis address pointed at `redis`.
fn global_example(redis: &RedisServer) -> String {
    let text = kthena_example("ModelRouteWithGlobalRateLimit.yaml");
    assert!(text.contains(EXAMPLE_REDIS));
    text.replace(EXAMPLE_REDIS, &redis.address())
}

#[tokio::test]
async fn three_dataplanes_share_the_global_examples_budget_in_redis() {
    let redis = RedisServer::start().await;
    let stack = stack(&[("route.yaml", global_example(&redis))], &[], 3).await;
    let _logs = stack.logs_on_failure();
    // 10 input tokens per minute for all three: one hello world in all.
    assert_eq!(chat(&stack, 1, GLOBAL_LIMITED).await.status, StatusCode::OK);
    for dataplane in 0..3 {
        let refused = chat(&stack, dataplane, GLOBAL_LIMITED).await;
        assert_eq!(
            refused.status,
            StatusCode::TOO_MANY_REQUESTS,
            "dataplane {dataplane}: {}",
            refused.text()
        );
        let wait = retry_after(&refused);
        assert!((50..=60).contains(&wait), "Retry-After {wait}");
    }
    assert!(redis.command_calls("evalsha") >= 4);
}

/// Three dataplanes driven as fast as they answer for three seconds against
/// a shared budget of 300 tokens per second (the example's fields, its unit
/// scaled from a minute to a second so the run is short): together they
/// admit the ideal `C + r·T` within ±10%.
#[tokio::test]
async fn three_dataplanes_stay_within_the_bound_of_a_shared_budget() {
    let redis = RedisServer::start().await;
    let route = global_example(&redis)
        .replace("inputTokensPerUnit: 10", "inputTokensPerUnit: 300")
        .replace("unit: minute", "unit: second");
    let stack = stack(&[("route.yaml", route)], &[], 3).await;
    let _logs = stack.logs_on_failure();
    let run = Duration::from_secs(3);
    let started = clock::now();
    let clients = (0..3).map(|dataplane| {
        let http = stack.http.clone();
        let url = stack.dataplanes[dataplane].url("/v1/chat/completions");
        let body = hello_world(GLOBAL_LIMITED);
        tokio::spawn(async move {
            let (mut requests, mut admitted) = (0u64, 0u64);
            while started.elapsed() < run {
                let answer = http.post_json(&url, &[], &body).await.expect("answers");
                requests += 1;
                match answer.status {
                    StatusCode::OK => admitted += 10,
                    StatusCode::TOO_MANY_REQUESTS => {}
                    other => panic!("unexpected {other}: {}", answer.text()),
                }
            }
            (requests, admitted)
        })
    });
    let (mut requests, mut admitted) = (0u64, 0u64);
    for client in clients.collect::<Vec<_>>() {
        let (r, a) = client.await.expect("client");
        requests += r;
        admitted += a;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ideal = 300.0 * (1.0 + elapsed);
    let calls = redis.command_calls("evalsha");
    eprintln!(
        "{requests} requests in {elapsed:.2} s: {admitted} tokens admitted, ideal {ideal:.0}, {calls} Redis calls"
    );
    assert!(
        requests as f64 * 10.0 > 1.5 * ideal,
        "the load ({requests} requests) must exceed the budget"
    );
    let admitted = admitted as f64;
    assert!(
        (admitted - ideal).abs() <= 0.1 * ideal,
        "{admitted} tokens admitted, ideal {ideal:.0}"
    );
}

#[tokio::test]
async fn redis_killed_mid_run_fails_open_by_default_or_closed_by_choice() {
    let mut redis = RedisServer::start().await;
    let closed = global_example(&redis)
        .replace("deepseek-global-rate-limit", "closed")
        .replace(GLOBAL_LIMITED, "closed-model")
        .replace(
            &format!("address: \"{}\"", redis.address()),
            &format!(
                "address: \"{}\"\n      failureMode: FailClose",
                redis.address()
            ),
        );
    assert!(closed.contains("failureMode: FailClose"), "{closed}");
    let stack = stack(
        &[
            ("open.yaml", global_example(&redis)),
            ("closed.yaml", closed),
        ],
        &[],
        1,
    )
    .await;
    let _logs = stack.logs_on_failure();
    assert_eq!(chat(&stack, 0, GLOBAL_LIMITED).await.status, StatusCode::OK);
    assert_eq!(chat(&stack, 0, "closed-model").await.status, StatusCode::OK);
    redis.kill();
    // No request hangs: each is answered within Redis's exchange timeout.
    let started = clock::now();
    for _ in 0..5 {
        let open = chat(&stack, 0, GLOBAL_LIMITED).await;
        assert_eq!(open.status, StatusCode::OK, "fail open: {}", open.text());
        let refused = chat(&stack, 0, "closed-model").await;
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.json()["error"]["code"], "rate_limit_unavailable");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let page = metrics_page(&stack, 0).await;
    assert!(
        sample_value(
            &page,
            "switchyard_rate_limit_unmetered_total",
            &["model=\"deepseek-r1-with-global-rate-limit\""]
        ) >= 5.0
    );
    assert!(
        stack.dataplanes[0]
            .process
            .log_text()
            .contains("rate limit backend unreachable"),
        "a log line says why"
    );
    // Redis back (empty): the budget applies again.
    redis.restart().await;
    wait_for("the budget to apply again", || async {
        (chat(&stack, 0, GLOBAL_LIMITED).await.status == StatusCode::TOO_MANY_REQUESTS)
            .then_some(())
    })
    .await;
}
