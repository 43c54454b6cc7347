//! Routing quality end to end: real controller and dataplanes, simulated
//! engines, one scheduler configuration per test (shipped by the controller
//! from `--router-config`), and the share of requests each plugin sends where
//! it should. The thresholds are those the README's "Scheduling quality"
//! section states; each test stays within seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::StatusCode;
use serde_json::{Value, json};
use switchyard_e2e::harness::{Process, wait_for};
use switchyard_e2e::prefix_workload::{PrefixWorkload, QualityRow};
use switchyard_e2e::sim_stack::{SimStack, SimStackOptions, counts, words};

/// Fast enough that tests waiting on engine load are quick, slow enough for a busy 2-core machine.
const SCRAPE_INTERVAL: &str = "250ms";

/// `engines` simulated engines (`pod-0`..), a controller with `router_config`
/// and `dataplanes` dataplanes, each seeing every pod.
async fn start_bench(
    engines: usize,
    engine_args: impl Fn(usize) -> Vec<String>,
    router_config: &str,
    lora_adapters: &[&str],
    dataplanes: usize,
) -> SimStack {
    SimStack::start(SimStackOptions {
        engines,
        engine_args: &engine_args,
        router_config,
        lora_adapters,
        dataplanes,
        scrape_interval: SCRAPE_INTERVAL,
    })
    .await
}

/// Sends `count` direct requests to an engine in the background, to load it.
fn load_engine(
    bench: &SimStack,
    pod: usize,
    count: usize,
    body: Value,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..count)
        .map(|_| {
            let http = bench.http().clone();
            let url = bench.engine_url(pod, "/v1/completions");
            let body = body.to_string();
            tokio::spawn(async move {
                let _ = http.post_json(&url, &[], &body).await;
            })
        })
        .collect()
}

/// The pods that answer six one-token completions `{prefix}0`.. of the
/// conversation `session`, sent through dataplanes 0 and 1 in turn.
async fn session_pods(bench: &SimStack, session: &str, prefix: &str) -> Vec<String> {
    let mut pods = Vec::new();
    for i in 0..6 {
        let body = completion(&format!("{prefix}{i}"), 1);
        let headers = [("x-conversation", session)];
        let (status, pod, _) = bench.complete(i % 2, &body, &headers).await;
        assert_eq!(status, StatusCode::OK);
        pods.push(pod);
    }
    pods
}

/// Command-line flags written as one line.
fn flags(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_owned).collect()
}

/// Sends pods 0 and 1 `requests` copies of `body` each, in the background,
/// until dataplane 0 sees both in a state whose `load` meets `loaded`; then
/// asserts that at least 18 of twenty queries go to pods 2 and 3.
async fn assert_queries_avoid_loaded_pods_0_and_1(
    bench: &SimStack,
    (requests, body): (usize, Value),
    state: &str,
    loaded: impl Fn(&Value) -> bool,
) {
    let mut background = load_engine(bench, 0, requests, body.clone());
    background.extend(load_engine(bench, 1, requests, body));
    bench
        .wait_state(0, state, |pods| {
            let pod_loaded = |name: &str| pods.get(name).is_some_and(|pod| loaded(&pod["load"]));
            pod_loaded("pod-0") && pod_loaded("pod-1")
        })
        .await;
    let counts = route_twenty_queries(bench).await;
    let away = counts.get("pod-2").unwrap_or(&0) + counts.get("pod-3").unwrap_or(&0);
    assert!(away >= 18, "{counts:?}");
    for task in background {
        task.abort();
    }
}

/// Sends 20 distinct one-token completions through dataplane 0, one after the
/// other; asserts each succeeds and returns how many each pod answered.
async fn route_twenty_queries(bench: &SimStack) -> BTreeMap<String, usize> {
    let mut pods = Vec::new();
    for i in 0..20 {
        let (status, pod, _) = bench
            .complete(0, &completion(&format!("q{i}"), 1), &[])
            .await;
        assert_eq!(status, StatusCode::OK);
        pods.push(pod);
    }
    counts(&pods)
}

fn completion(prompt: &str, max_tokens: u32) -> Value {
    json!({"model": "base", "prompt": prompt, "max_tokens": max_tokens})
}

fn config(filters: &[&str], scores: &[&str], plugin_config: &str) -> String {
    let scores: Vec<String> = scores
        .iter()
        .map(|s| format!("{{name: {s}, weight: 1}}"))
        .collect();
    format!(
        "scheduler:\n  pluginConfig:\n{plugin_config}  plugins:\n    Filter: {{enabled: {filters:?}}}\n    Score: {{enabled: [{}]}}\n",
        scores.join(", ")
    )
    .replace("pluginConfig:\n  plugins", "pluginConfig: []\n  plugins")
}

fn simple() -> impl Fn(usize) -> Vec<String> {
    |_| Vec::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_cache_alone_keeps_repeated_prompts_on_one_pod() {
    let bench = start_bench(4, simple(), &config(&[], &["prefix-cache"], ""), &[], 1).await;
    let mut all = Vec::new();
    for group in 0..5 {
        let body = completion(&words(&format!("g{group}w"), 300), 1);
        let mut pods = Vec::new();
        for _ in 0..10 {
            let (status, pod, _) = bench.complete(0, &body, &[]).await;
            assert_eq!(status, StatusCode::OK);
            pods.push(pod);
        }
        let counts = counts(&pods);
        let top = counts.values().max().copied().unwrap_or(0);
        assert!(top >= 9, "group {group}: {counts:?}");
        all.extend(pods);
    }
    assert!(
        counts(&all).len() >= 2,
        "different prefixes use different pods: {:?}",
        counts(&all)
    );

    // The decision log shows the plugin's scores, the metric its timings.
    let decisions = bench.debug(0, "/debug/routing/decisions?limit=3").await;
    assert_eq!(decisions["scheduler"]["scores"][0]["name"], "prefix-cache");
    assert_eq!(decisions["scheduler"]["fromSnapshot"], true);
    let latest = &decisions["decisions"][0];
    assert_eq!(decisions["decisions"].as_array().map(Vec::len), Some(3));
    assert_eq!(latest["model"], "base");
    assert_eq!(
        latest["ranked"][0]["scores"]["prefix-cache"], 100,
        "{latest}"
    );
    let metrics_url = format!("http://{}/metrics", bench.stack.dataplanes[0].metrics);
    let metrics = bench
        .http()
        .get(&metrics_url)
        .await
        .expect("metrics")
        .text();
    assert!(
        metrics.contains(
            r#"kthena_router_scheduler_plugin_duration_seconds_count{model="base",plugin="prefix-cache",type="score"} 50"#
        ),
        "{metrics}"
    );

    // Clients that go away mid-stream, and requests that finish: the ledger returns to zero.
    for _ in 0..4 {
        let url = bench.stack.dataplanes[0].url("/v1/completions");
        let body = json!({"model": "base", "prompt": "bye", "max_tokens": 500, "stream": true})
            .to_string();
        let response = bench
            .http()
            .post_json_streaming(&url, &[], &body)
            .await
            .expect("headers");
        drop(response);
    }
    bench
        .wait_state(0, "in-flight back to zero", |pods| {
            pods.values().all(|pod| pod["inFlight"] == 0)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_sends_requests_away_from_saturated_pods() {
    let bench = start_bench(
        4,
        |_| flags("--mode sim --max-num-seqs 2 --itl-ms 40 --output-tokens 1000"),
        &config(
            &["least-request"],
            &["least-request"],
            "  - name: least-request\n    args: {maxWaitingRequests: 3}\n",
        ),
        &[],
        1,
    )
    .await;
    let saturated = |load: &Value| load["requestsWaiting"].as_f64().is_some_and(|n| n >= 5.0);
    let busy = (10, completion("busy", 400));
    assert_queries_avoid_loaded_pods_0_and_1(&bench, busy, "pods 0 and 1 saturated", saturated)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_usage_avoids_pods_with_hot_kv_cache() {
    let bench = start_bench(
        4,
        |_| flags("--mode sim --kv-blocks 64 --block-size 16 --itl-ms 40 --output-tokens 1000"),
        &config(&[], &["gpu-usage"], ""),
        &[],
        1,
    )
    .await;
    let hot = |load: &Value| {
        load["kvCacheUsage"]
            .as_f64()
            .is_some_and(|usage| usage >= 0.5)
    };
    let long_prompt = (1, completion(&words("h", 600), 150));
    let state = "pods 0 and 1 with a hot KV cache";
    assert_queries_avoid_loaded_pods_0_and_1(&bench, long_prompt, state, hot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_latency_prefers_fast_pods() {
    let bench = start_bench(
        4,
        |i| {
            let (ttft, itl) = if i < 2 { ("120", "25") } else { ("5", "2") };
            vec![
                "--ttft-ms".into(),
                ttft.into(),
                "--itl-ms".into(),
                itl.into(),
            ]
        },
        &config(&[], &["least-latency"], ""),
        &[],
        1,
    )
    .await;
    // Engines report TTFT / TPOT means over each scrape interval: keep traffic on every pod.
    let running = Arc::new(AtomicBool::new(true));
    let warmers: Vec<_> = (0..4)
        .map(|pod| {
            let http = bench.http().clone();
            let url = bench.engine_url(pod, "/v1/completions");
            let running = running.clone();
            tokio::spawn(async move {
                let body = completion("warm", 3).to_string();
                while running.load(Ordering::Relaxed) {
                    let _ = http.post_json(&url, &[], &body).await;
                }
            })
        })
        .collect();
    bench
        .wait_state(0, "latency data for every pod", |pods| {
            pods.len() == 4
                && pods.values().all(|pod| {
                    pod["load"]["ttftSeconds"].as_f64().is_some_and(|v| v > 0.0)
                        && pod["load"]["tpotSeconds"].as_f64().is_some_and(|v| v > 0.0)
                })
        })
        .await;
    let counts = route_twenty_queries(&bench).await;
    running.store(false, Ordering::Relaxed);
    for warmer in warmers {
        let _ = warmer.await;
    }
    let fast = counts.get("pod-2").unwrap_or(&0) + counts.get("pod-3").unwrap_or(&0);
    assert!(fast >= 18, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_affinity_never_sends_to_pods_without_the_adapter() {
    let bench = start_bench(
        4,
        |i| {
            if i < 2 {
                vec!["--lora".into(), "lora-a".into()]
            } else {
                Vec::new()
            }
        },
        &config(&["lora-affinity"], &["random"], ""),
        &["lora-a", "lora-b"],
        1,
    )
    .await;
    bench
        .wait_state(0, "model lists of every pod", |pods| {
            pods.len() == 4
                && pods.values().all(|pod| {
                    pod["load"]["models"]
                        .as_array()
                        .is_some_and(|m| !m.is_empty())
                })
        })
        .await;
    let mut pods = Vec::new();
    for i in 0..40 {
        let body = json!({"model": "lora-a", "prompt": format!("q{i}"), "max_tokens": 1});
        let (status, pod, _) = bench.complete(0, &body, &[]).await;
        assert_eq!(status, StatusCode::OK);
        pods.push(pod);
    }
    let counts = counts(&pods);
    assert_eq!(
        counts.get("pod-2").copied().unwrap_or(0) + counts.get("pod-3").copied().unwrap_or(0),
        0,
        "{counts:?}"
    );
    assert_eq!(counts.len(), 2, "both adapter pods serve: {counts:?}");

    let body = json!({"model": "lora-b", "prompt": "q", "max_tokens": 1});
    let (status, _, error) = bench.complete(0, &body, &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error["error"]["code"], "no_ready_pod");
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(r#"no pod has model "lora-b" loaded"#),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_spreads_evenly() {
    let bench = start_bench(2, simple(), &config(&[], &["random"], ""), &[], 1).await;
    const REQUESTS: usize = 2500;
    const CONCURRENCY: usize = 16;
    let bench = Arc::new(bench);
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|worker| {
            let bench = bench.clone();
            tokio::spawn(async move {
                let mut pods = Vec::new();
                for i in (worker..REQUESTS).step_by(CONCURRENCY) {
                    let (status, pod, _) = bench
                        .complete(0, &completion(&format!("q{i}"), 1), &[])
                        .await;
                    assert_eq!(status, StatusCode::OK);
                    pods.push(pod);
                }
                pods
            })
        })
        .collect();
    let mut pods = Vec::new();
    for task in tasks {
        pods.extend(task.await.expect("worker"));
    }
    let counts = counts(&pods);
    let expected = REQUESTS / 2;
    // ±10% of the fair share; 2500 requests make that five standard deviations.
    for (pod, count) in &counts {
        assert!(
            count.abs_diff(expected) <= expected / 10,
            "{pod}: {counts:?}"
        );
    }
    assert_eq!(counts.len(), 2, "{counts:?}");
}

/// Simulated engines, groups of requests sharing a long system prompt, a
/// round-robin client: the prefix-cache hit rate the engines measure with
/// three dataplanes is at least 95% of the one-dataplane rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_dataplanes_keep_the_one_dataplane_prefix_hit_rate() {
    let bench = start_bench(
        4,
        |_| flags("--mode sim --time-scale 0.2"),
        // No scheduler section: the default plugin mix.
        "auth: {}\n",
        &[],
        3,
    )
    .await;
    let mut rates = Vec::new();
    for (phase, dataplanes) in [("a", 1usize), ("b", 3)] {
        let before = bench.prefix_cache_totals().await;
        run_shared_prefix_workload(&bench, phase, dataplanes).await;
        let after = bench.prefix_cache_totals().await;
        let rate = (after.0 - before.0) / (after.1 - before.1);
        rates.push(rate);
    }
    eprintln!("prefix-cache hit rate, one dataplane vs three: {rates:?}");
    assert!(rates[0] > 0.5, "the workload is cache-friendly: {rates:?}");
    assert!(
        rates[1] >= 0.95 * rates[0],
        "three dataplanes vs one: {rates:?}"
    );
}

/// 8 system prompts x 16 requests each, 4 clients, round-robin over `dataplanes`.
async fn run_shared_prefix_workload(bench: &SimStack, phase: &str, dataplanes: usize) {
    const GROUPS: usize = 8;
    const PER_GROUP: usize = 16;
    const CLIENTS: usize = 4;
    let requests: Vec<(usize, Value)> = (0..GROUPS * PER_GROUP)
        .map(|i| {
            let group = i % GROUPS;
            let system = words(&format!("{phase}{group}s"), 300);
            let question = words(&format!("{phase}q{i}x"), 12);
            (
                i % dataplanes,
                completion(&format!("{system} {question}"), 4),
            )
        })
        .collect();
    let requests = Arc::new(requests);
    let mut workers = Vec::new();
    for client in 0..CLIENTS {
        let requests = requests.clone();
        let urls: Vec<String> = (0..dataplanes)
            .map(|d| bench.stack.dataplanes[d].url("/v1/completions"))
            .collect();
        let http = bench.http().clone();
        workers.push(tokio::spawn(async move {
            for (dataplane, body) in requests.iter().skip(client).step_by(CLIENTS) {
                let response = http
                    .post_json(&urls[*dataplane], &[], &body.to_string())
                    .await
                    .expect("dataplane answers");
                assert_eq!(response.status, StatusCode::OK, "{}", response.text());
            }
        }));
    }
    for worker in workers {
        worker.await.expect("client");
    }
}

/// The router configuration reaches running dataplanes without a restart; an
/// invalid edit is rejected (the controller logs why) and the previous one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_config_changes_reach_dataplanes_and_invalid_ones_are_rejected() {
    let bench = start_bench(2, simple(), &config(&[], &["random"], ""), &[], 2).await;
    let scores_of = |decisions: &Value| decisions["scheduler"]["scores"].clone();
    for dataplane in 0..2 {
        let view = bench.debug(dataplane, "/debug/routing/decisions").await;
        assert_eq!(scores_of(&view), json!([{"name": "random", "weight": 1}]));
    }
    let write = |text: &str| {
        let tmp = bench.router_config.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, &bench.router_config).expect("rename");
    };
    write("scheduler:\n  plugins:\n    Score: {enabled: [{name: fastest-pod}]}\n");
    wait_for("the controller to reject the edit", || async {
        let log = bench
            .stack
            .controller
            .as_ref()
            .map(Process::log_text)
            .unwrap_or_default();
        (log.contains("router configuration rejected") && log.contains("fastest-pod")).then_some(())
    })
    .await;
    let (status, _, _) = bench.complete(0, &completion("still served", 1), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        scores_of(&bench.debug(1, "/debug/routing/decisions").await),
        json!([{"name": "random", "weight": 1}]),
        "the previous configuration stays"
    );

    write(
        "scheduler:\n  topN: 2\n  plugins:\n    Score: {enabled: [{name: least-request, weight: 3}]}\n",
    );
    for dataplane in 0..2 {
        wait_for("the new configuration on every dataplane", || async {
            let view = bench.debug(dataplane, "/debug/routing/decisions").await;
            (scores_of(&view) == json!([{"name": "least-request", "weight": 3}])
                && view["scheduler"]["topN"] == 2)
                .then_some(())
        })
        .await;
    }
    let (status, _, _) = bench.complete(1, &completion("after reload", 1), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let latest = &bench.debug(1, "/debug/routing/decisions?limit=1").await["decisions"][0];
    assert_eq!(
        latest["plugins"],
        json!([{"name": "least-request", "weight": 3}])
    );
    assert!(
        latest["ranked"][0]["scores"]["least-request"].is_u64(),
        "{latest}"
    );
}

/// session-affinity: one session, one pod, on every dataplane; when that pod
/// dies the session moves to another pod and stays there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_affinity_is_sticky_across_dataplanes_and_falls_back() {
    let mut bench = start_bench(
        4,
        simple(),
        &config(
            &[],
            &["session-affinity"],
            "  - name: session-affinity\n    args: {header: x-conversation}\n",
        ),
        &[],
        2,
    )
    .await;
    let mut homes = BTreeMap::new();
    for session in ["alpha", "beta", "gamma", "delta", "epsilon"] {
        let pods = session_pods(&bench, session, "q").await;
        let counts = counts(&pods);
        assert_eq!(
            counts.len(),
            1,
            "session {session} on both dataplanes: {counts:?}"
        );
        homes.insert(session, pods[0].clone());
    }
    assert!(
        homes
            .values()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            >= 2,
        "sessions spread over pods: {homes:?}"
    );
    let home = homes["alpha"].clone();
    bench.stack.kill_engine(&home);
    // The first request on each dataplane finds the pod gone (connect
    // failure) and is answered by its next candidate; the pod is then ejected.
    for dataplane in 0..2 {
        let (status, _, _) = bench
            .complete(
                dataplane,
                &completion("retry", 1),
                &[("x-conversation", "alpha")],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "the next candidate answers");
    }
    let pods = session_pods(&bench, "alpha", "r").await;
    let counts = counts(&pods);
    assert_eq!(counts.len(), 1, "one new home: {counts:?}");
    assert!(!counts.contains_key(&home), "{counts:?}");
}

/// The cache-bound workload of `make e2e-vllm-quality` (16 system prompts
/// that together need 1.1 engines' KV caches) on two simulated engines shaped
/// like its real ones, default plugin mix: prefix groups stay on their pods
/// (the engines' hit rate is at least 80%; round robin gets about 45%) and
/// are spread evenly (hashing alone splits these 16 groups 11/5; the group
/// share makes it 8/8), with one dataplane and with three: no engine serves
/// more than 60% of the requests (the targets of `make e2e-vllm-quality`,
/// `QualityRow::target_verdicts`). With three dataplanes each places the
/// first requests before it has seen every group, which costs a few hits and
/// a few requests of balance. The engines' KV-cache size reaches the
/// dataplanes from their `vllm:cache_config_info`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_mix_keeps_prefix_groups_home_and_engines_even_when_caches_are_tight() {
    for dataplanes in [1, 3] {
        let bench = start_bench(
            2,
            |_| {
                flags("--mode sim --max-num-seqs 8 --kv-blocks 128 --block-size 32 --prefill-ms-per-token 0.1 --itl-ms 3 --itl-ms-per-seq 0.5")
            },
            "auth: {}\n",
            &[],
            dataplanes,
        )
        .await;
        bench
            .wait_state(0, "both engines' KV-cache size", |pods| {
                pods.len() == 2
                    && pods
                        .values()
                        .all(|pod| pod["load"]["kvCacheCapacityTokens"] == 128 * 32)
            })
            .await;
        let (run, engines) = bench
            .run_workload(&PrefixWorkload::two_engines("base"), 2)
            .await;
        let row = QualityRow {
            strategy: "default mix".into(),
            dataplanes,
            engines,
            run,
        };
        eprint!("{}", row.markdown());
        let (met, verdicts) = row.target_verdicts();
        assert!(met, "{}{}", row.markdown(), verdicts.join("\n"));
    }
}
