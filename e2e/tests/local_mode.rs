//! End to end in local mode: real controller, dataplane and mock-engine
//! processes on loopback, configured with the demo's YAML (the routing guide's
//! scenarios, verbatim).

use std::collections::BTreeMap;

use http::StatusCode;
use http_body_util::BodyExt;
use switchyard_e2e::harness::{ENGINE_PORT, Stack, TestPod, wait_for};
use switchyard_runtime::clock;

const MODEL_1_5B: &str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B";
const MODEL_7B: &str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B";
fn demo_file(name: &str) -> String {
    let path = format!("{}/../config/demo/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The pods of config/demo/pods.yaml, on this test's own loopback subnet.
fn demo_pods(engine_args: &[&str]) -> [TestPod; 5] {
    let lora: Vec<&str> = ["--lora", "lora-A,lora-B"]
        .iter()
        .chain(engine_args)
        .copied()
        .collect();
    let model_1_5b_v1 = format!("{MODEL_1_5B}-v1");
    let model_1_5b_v2 = format!("{MODEL_1_5B}-v2");
    let canary = "deepseek-r1-1-5b-canary";
    [
        TestPod::serving(
            "deepseek-r1-1-5b-0",
            11,
            "deepseek-r1-1-5b",
            MODEL_1_5B,
            &lora,
        ),
        TestPod::serving(
            "deepseek-r1-1-5b-1",
            12,
            "deepseek-r1-1-5b",
            MODEL_1_5B,
            &lora,
        ),
        TestPod::serving(
            "deepseek-r1-7b-0",
            13,
            "deepseek-r1-7b",
            MODEL_7B,
            engine_args,
        ),
        TestPod::serving(
            "deepseek-r1-1-5b-v1-0",
            14,
            canary,
            &model_1_5b_v1,
            engine_args,
        )
        .labelled("version", "v1"),
        TestPod::serving(
            "deepseek-r1-1-5b-v2-0",
            15,
            canary,
            &model_1_5b_v2,
            engine_args,
        )
        .labelled("version", "v2"),
    ]
}

/// The demo stack, controller running.
async fn demo_stack(dataplanes: usize, engine_args: &[&str]) -> Stack {
    let mut stack = Stack::new(&[
        ("routes.yaml", demo_file("routes.yaml")),
        ("more-routes.yaml", demo_file("more-routes.yaml")),
        ("modelservers.yaml", demo_file("modelservers.yaml")),
    ]);
    stack.start_pods(&demo_pods(engine_args)).await;
    stack.start_controller().await;
    for _ in 0..dataplanes {
        stack.start_dataplane().await;
    }
    stack
}

fn completion(model: &str) -> String {
    format!(r#"{{"model": "{model}", "prompt": "San Francisco is a", "temperature": 0}}"#)
}

/// Sends a completion through dataplane `index`; returns (status, answering pod, response).
async fn ask(
    stack: &Stack,
    index: usize,
    model: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String, switchyard_e2e::harness::HttpResponse) {
    let response = stack
        .http
        .post_json(
            &stack.dataplanes[index].url("/v1/completions"),
            headers,
            &completion(model),
        )
        .await
        .expect("dataplane answers");
    let pod = response.header("x-mock-pod").unwrap_or("").to_owned();
    (response.status, pod, response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenarios_reach_the_right_pods() {
    let stack = demo_stack(1, &[]).await;

    // 1. Simple: deepseek-simple -> deepseek-r1-1-5b, model rewritten.
    let (status, pod, response) = ask(&stack, 0, "deepseek-simple", &[]).await;
    assert_eq!(status, StatusCode::OK, "{}", response.text());
    assert!(
        pod.starts_with("deepseek-r1-1-5b-") && !pod.contains("-v"),
        "{pod}"
    );
    assert_eq!(response.header("x-mock-received-model"), Some(MODEL_1_5B));
    assert_eq!(response.json()["model"], MODEL_1_5B);
    assert!(
        response.json()["usage"]["completion_tokens"]
            .as_u64()
            .is_some()
    );

    // 2. LoRA: lora-A -> deepseek-r1-1-5b, model NOT rewritten.
    let (status, pod, response) = ask(&stack, 0, "lora-A", &[]).await;
    assert_eq!(status, StatusCode::OK, "{}", response.text());
    assert!(
        pod.starts_with("deepseek-r1-1-5b-") && !pod.contains("-v"),
        "{pod}"
    );
    assert_eq!(response.header("x-mock-received-model"), Some("lora-A"));

    // 4. Header-based: premium -> 7b, anyone else -> 1.5b.
    let (status, pod, _) = ask(
        &stack,
        0,
        "deepseek-multi-models",
        &[("user-type", "premium")],
    )
    .await;
    assert_eq!((status, pod.as_str()), (StatusCode::OK, "deepseek-r1-7b-0"));
    let (status, pod, _) = ask(
        &stack,
        0,
        "deepseek-multi-models",
        &[("user-type", "basic")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        pod.starts_with("deepseek-r1-1-5b-") && !pod.contains("-v"),
        "{pod}"
    );

    // 3. Weighted 70/30 through one dataplane: exactly 70/30 per 100.
    let mut counts = BTreeMap::new();
    for _ in 0..100 {
        let (status, pod, _) = ask(&stack, 0, "deepseek-subset", &[]).await;
        assert_eq!(status, StatusCode::OK);
        *counts.entry(pod).or_insert(0) += 1;
    }
    assert_eq!(counts.get("deepseek-r1-1-5b-v1-0"), Some(&70), "{counts:?}");
    assert_eq!(counts.get("deepseek-r1-1-5b-v2-0"), Some(&30), "{counts:?}");

    // Pods of one ModelServer share the load. Which pod the scheduler prefers
    // for a single request follows the scraped engine load (and so timing on a
    // busy machine); over many requests both must answer.
    let mut pods = BTreeMap::new();
    for _ in 0..100 {
        let (_, pod, _) = ask(&stack, 0, "deepseek-simple", &[]).await;
        *pods.entry(pod).or_insert(0) += 1;
        if pods.len() == 2 {
            break;
        }
    }
    assert_eq!(pods.len(), 2, "{pods:?}");

    // Request ids: echoed when given, generated otherwise, and forwarded.
    let (_, _, response) = ask(&stack, 0, "deepseek-simple", &[("x-request-id", "req-123")]).await;
    assert_eq!(response.header("x-request-id"), Some("req-123"));
    assert_eq!(response.header("x-mock-request-id"), Some("req-123"));
    let (_, _, response) = ask(&stack, 0, "deepseek-simple", &[]).await;
    let generated = response.header("x-request-id").expect("generated id");
    assert_eq!(generated.len(), 36, "{generated}");
    assert_eq!(response.header("x-mock-request-id"), Some(generated));

    // Unknown model and bad input: OpenAI-style errors.
    let (status, _, response) = ask(&stack, 0, "no-such-model", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let error = &response.json()["error"];
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("route not found")
    );
    assert_eq!(error["code"], "route_not_found");
    let url = stack.dataplanes[0].url("/v1/completions");
    let bad = stack
        .http
        .post_json(&url, &[], "{not json")
        .await
        .expect("answer");
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.json()["error"]["code"], "invalid_request_body");
    let bad = stack
        .http
        .post_json(&url, &[], r#"{"prompt":"x"}"#)
        .await
        .expect("answer");
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bad.json()["error"]["message"]
            .as_str()
            .expect("message")
            .contains("model")
    );

    // /v1/models: every route model name and LoRA adapter.
    let models = stack
        .http
        .get(&stack.dataplanes[0].url("/v1/models"))
        .await
        .expect("models");
    assert_eq!(models.status, StatusCode::OK);
    let ids: Vec<String> = models.json()["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(
        ids,
        [
            "deepseek-by-path",
            "deepseek-multi-models",
            "deepseek-simple",
            "deepseek-subset",
            "deepseek-tiered",
            "lora-A",
            "lora-B"
        ]
    );
}

/// The README's "Routing" examples beyond the guide (config/demo/more-routes.yaml).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_uri_match_and_route_fall_through() {
    let stack = demo_stack(1, &[]).await;
    let is_1_5b = |pod: &str| pod.starts_with("deepseek-r1-1-5b-") && !pod.contains("-v");

    // URI prefix: chat goes to the 7B server, completions to 1.5B.
    let chat = stack
        .http
        .post_json(
            &stack.dataplanes[0].url("/v1/chat/completions"),
            &[],
            r#"{"model": "deepseek-by-path", "messages": [{"role": "user", "content": "hi"}]}"#,
        )
        .await
        .expect("dataplane answers");
    assert_eq!(chat.status, StatusCode::OK, "{}", chat.text());
    assert_eq!(chat.header("x-mock-pod"), Some("deepseek-r1-7b-0"));
    let (status, pod, _) = ask(&stack, 0, "deepseek-by-path", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(is_1_5b(&pod), "{pod}");

    // The older route's only rule matches gold tiers (regex); everything else
    // falls through to the newer route of the same model name.
    let (status, pod, _) = ask(&stack, 0, "deepseek-tiered", &[("x-tier", "gold-eu")]).await;
    assert_eq!((status, pod.as_str()), (StatusCode::OK, "deepseek-r1-7b-0"));
    let (status, pod, _) = ask(&stack, 0, "deepseek-tiered", &[("x-tier", "silver")]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(is_1_5b(&pod), "{pod}");
    let (status, pod, _) = ask(&stack, 0, "deepseek-tiered", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(is_1_5b(&pod), "{pod}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_arrives_chunk_by_chunk() {
    let stack = demo_stack(1, &["--itl-ms", "300", "--output-tokens", "5"]).await;
    let body = r#"{"model": "deepseek-multi-models", "stream": true, "messages": [{"role": "user", "content": "hi"}]}"#;
    let response = stack
        .post_streaming("/v1/chat/completions", &[("user-type", "premium")], body)
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-mock-pod"], "deepseek-r1-7b-0");
    let mut body = response.into_body();
    let first = loop {
        let frame = body.frame().await.expect("a frame").expect("no error");
        if let Ok(data) = frame.into_data() {
            break data;
        }
    };
    assert!(
        String::from_utf8_lossy(&first).starts_with("data: "),
        "{first:?}"
    );
    // The engine is still generating while the client already holds the first chunk.
    let engine_metrics = stack
        .http
        .get(&format!("http://{}:{ENGINE_PORT}/metrics", stack.ip(13)))
        .await
        .expect("engine metrics");
    let running = engine_metrics
        .text()
        .lines()
        .find(|l| l.starts_with("vllm:num_requests_running"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .expect("running gauge");
    assert_eq!(running, 1.0, "engine must still be running the request");
    let mut rest = Vec::from(first);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("no error").into_data() {
            rest.extend_from_slice(&data);
        }
    }
    let text = String::from_utf8(rest).expect("utf-8");
    assert_eq!(
        text.matches("data: ").count(),
        5 + 2,
        "5 tokens + final chunk + [DONE]: {text}"
    );
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}

/// Routes deepseek-simple to the 7b ModelServer instead.
fn retarget_simple_route(stack: &Stack) {
    let routes = demo_file("routes.yaml");
    let edited = routes.replacen(
        "modelName: \"deepseek-simple\"\n  rules:\n  - name: \"default\"\n    targetModels:\n    - modelServerName: \"deepseek-r1-1-5b\"",
        "modelName: \"deepseek-simple\"\n  rules:\n  - name: \"default\"\n    targetModels:\n    - modelServerName: \"deepseek-r1-7b\"",
        1,
    );
    assert_ne!(routes, edited, "the edit must apply");
    stack.write_config("routes.yaml", &edited);
}

async fn wait_until_simple_goes_to_7b(stack: &Stack, index: usize) {
    wait_for("deepseek-simple to reach the 7b pod", || async {
        let (status, pod, _) = ask(stack, index, "deepseek-simple", &[]).await;
        (status == StatusCode::OK && pod == "deepseek-r1-7b-0").then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_edit_reroutes_both_dataplanes_within_two_seconds() {
    let stack = demo_stack(2, &[]).await;
    for index in 0..2 {
        let (_, pod, _) = ask(&stack, index, "deepseek-simple", &[]).await;
        assert!(pod.starts_with("deepseek-r1-1-5b-"), "{pod}");
    }
    let edited_at = clock::now();
    retarget_simple_route(&stack);
    for index in 0..2 {
        wait_until_simple_goes_to_7b(&stack, index).await;
    }
    let elapsed = edited_at.elapsed();
    assert!(
        elapsed.as_secs_f64() < 2.0,
        "routing changed on both dataplanes only after {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataplanes_keep_serving_without_controller_and_resync_on_restart() {
    let mut stack = demo_stack(2, &[]).await;
    stack.stop_controller();
    for index in 0..2 {
        for _ in 0..5 {
            let (status, pod, response) = ask(&stack, index, "deepseek-simple", &[]).await;
            assert_eq!(status, StatusCode::OK, "{}", response.text());
            assert!(pod.starts_with("deepseek-r1-1-5b-"), "{pod}");
        }
        let ready = stack
            .http
            .get(&stack.dataplanes[index].url("/readyz"))
            .await
            .expect("readyz");
        assert_eq!(
            ready.status,
            StatusCode::OK,
            "still ready on the last snapshot"
        );
    }
    // Edited while the controller is down; the restarted controller resyncs both.
    retarget_simple_route(&stack);
    stack.start_controller().await;
    for index in 0..2 {
        wait_until_simple_goes_to_7b(&stack, index).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataplane_started_before_controller_becomes_ready_when_it_comes_up() {
    let mut stack = demo_stack(0, &[]).await;
    stack.stop_controller();
    let index = stack.spawn_dataplane();
    let readyz = stack.dataplanes[index].url("/readyz");
    let not_ready = wait_for("the dataplane to listen", || async {
        stack.http.get(&readyz).await.ok()
    })
    .await;
    assert_eq!(not_ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, response) = ask(&stack, index, "deepseek-simple", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.json()["error"]["code"], "router_not_ready");

    stack.start_controller().await;
    stack.wait_dataplane_ready(index).await;
    let (status, pod, _) = ask(&stack, index, "deepseek-simple", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(pod.starts_with("deepseek-r1-1-5b-"), "{pod}");
}

/// Each thread of process `pid`: (name, nice value), from `/proc`.
fn thread_nice_values(pid: u32) -> Vec<(String, i32)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
            let (head, tail) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_owned();
            // Fields after the name start at the third (state); nice is the 19th.
            let nice = tail.split_whitespace().nth(19 - 3)?.parse().ok()?;
            Some((name, nice))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_workers_keep_the_process_priority_and_other_threads_run_below_it() {
    let mut stack = Stack::new(&[]);
    let index = stack.spawn_dataplane_with(&["--workers", "2"]);
    let pid = stack.dataplanes[index].process.pid().expect("running");
    // The dataplane starts at the nice value this test runs at.
    let base = thread_nice_values(std::process::id())
        .first()
        .map(|(_, nice)| *nice)
        .expect("own nice value");
    let lowered = (base + 10).min(19);
    let threads = wait_for("the dataplane's threads to take their priorities", || {
        let threads = thread_nice_values(pid);
        let nice_of = |name: &str| threads.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        // The main thread (the control thread) lowers itself once both workers run.
        let settled = nice_of("switchyard-data") == Some(lowered)
            && nice_of("access-log") == Some(lowered)
            && nice_of("controller-stre") == Some(lowered)
            // A thread takes its name just after it starts: wait for both.
            && nice_of("traffic-0").is_some()
            && nice_of("traffic-1").is_some();
        async move { settled.then_some(threads) }
    })
    .await;
    let workers: Vec<i32> = threads
        .iter()
        .filter(|(name, _)| name.starts_with("traffic-"))
        .map(|(_, nice)| *nice)
        .collect();
    assert_eq!(workers, [base, base], "{threads:?}");
}
