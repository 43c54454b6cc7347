//! Failure behaviour end to end, with the real binaries on loopback: a big
//! configuration change never stalls the dataplane, a bad pod is ejected, a
//! target without usable pods fails over to the rule's other targets, and a
//! hung engine is bounded.
//!
//! Timings are measured and printed, never asserted tightly: the bounds
//! below are ceilings a busy 2-core machine stays far under.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::Value;
use switchyard_e2e::harness::{
    HttpClient, Stack, TestPod, model_server_yaml, simple_route_yaml, wait_for, yaml_documents,
};
use switchyard_runtime::clock;

/// Clients sending at once in the fault tests: enough that the healthy
/// pods always have requests in flight, as under real load.
const CONCURRENCY: usize = 8;

/// Failures in a row that eject a pod, set in the router configuration.
const CONSECUTIVE_FAILURES: usize = 2;

/// Failures a bad pod may cause on one dataplane before it is ejected: the
/// failures in a row that eject it, plus requests already on their way to it
/// from the other clients.
const MAX_FAILURES_BEFORE_EJECTION: usize = CONSECUTIVE_FAILURES + CONCURRENCY - 1;

/// How a batch of requests went.
#[derive(Debug, Default)]
struct Outcomes {
    ok: usize,
    /// Status (or `cut`, `error`) of every request that did not succeed.
    failed: BTreeMap<String, usize>,
    /// `x-mock-pod` of every answer, failed or not.
    by_pod: BTreeMap<String, usize>,
}

impl Outcomes {
    fn failures(&self) -> usize {
        self.failed.values().sum()
    }

    fn merge(&mut self, other: Outcomes) {
        self.ok += other.ok;
        for (key, count) in other.failed {
            *self.failed.entry(key).or_default() += count;
        }
        for (key, count) in other.by_pod {
            *self.by_pod.entry(key).or_default() += count;
        }
    }
}

/// `total` POSTs of `body` to `path` of dataplane `index` from
/// [`CONCURRENCY`] clients, each body read to its end; prints how they went
/// under `label`.
async fn send_load(
    stack: &Stack,
    index: usize,
    (path, body): (&str, &str),
    total: usize,
    label: &str,
) -> Outcomes {
    let url = stack.dataplanes[index].url(path);
    let per_client = total / CONCURRENCY;
    let clients = (0..CONCURRENCY).map(|_| {
        let (http, url, body) = (stack.http.clone(), url.clone(), body.to_owned());
        tokio::spawn(async move {
            let mut outcomes = Outcomes::default();
            for _ in 0..per_client {
                let failure = match http.post_json_streaming(&url, &[], &body).await {
                    Ok(response) => {
                        let status = response.status();
                        let pod = response
                            .headers()
                            .get("x-mock-pod")
                            .and_then(|pod| pod.to_str().ok())
                            .unwrap_or("router")
                            .to_owned();
                        *outcomes.by_pod.entry(pod).or_default() += 1;
                        match response.into_body().collect().await {
                            Ok(_) if status == 200 => None,
                            Ok(_) => Some(status.as_u16().to_string()),
                            Err(_) => Some("cut".to_owned()),
                        }
                    }
                    Err(_) => Some("error".to_owned()),
                };
                match failure {
                    None => outcomes.ok += 1,
                    Some(kind) => *outcomes.failed.entry(kind).or_default() += 1,
                }
            }
            outcomes
        })
    });
    let mut outcomes = Outcomes::default();
    for client in futures::future::join_all(clients).await {
        outcomes.merge(client.expect("client task"));
    }
    eprintln!("{label}: {outcomes:?}");
    outcomes
}

/// Dataplane `index`'s `/debug/router/state` entry of pod `name`.
async fn pod_state(stack: &Stack, index: usize, name: &str) -> Value {
    let url = format!(
        "http://{}/debug/router/state",
        stack.dataplanes[index].debug
    );
    let state = stack.http.get(&url).await.expect("debug state").json();
    state["pods"]
        .as_array()
        .and_then(|pods| {
            pods.iter()
                .find(|pod| pod["pod"] == format!("default/{name}"))
                .cloned()
        })
        .unwrap_or_else(|| panic!("no pod {name} in {state}"))
}

/// Dataplane `index`'s `/metrics` text.
async fn dataplane_metrics(stack: &Stack, index: usize) -> String {
    let url = format!("http://{}/metrics", stack.dataplanes[index].metrics);
    stack.http.get(&url).await.expect("metrics").text()
}

/// A sample of dataplane `index`'s `/metrics` (0 when absent).
async fn dataplane_metric(stack: &Stack, index: usize, series: &str) -> f64 {
    dataplane_metrics(stack, index)
        .await
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Three pods of ModelServer `pool` (`spec` adds to it) serving `m`: two
/// healthy ones answering after 50 ms, and `bad-0` started with `bad_args`;
/// a controller; `dataplanes` dataplanes.
async fn pool_with_a_bad_pod(spec: &str, bad_args: &[&str], dataplanes: usize) -> Stack {
    let mut stack = Stack::new(&[
        ("servers.yaml", model_server_yaml("pool", spec)),
        ("routes.yaml", simple_route_yaml("m", "m", "pool")),
    ]);
    let healthy = ["--ttft-ms", "50", "--itl-ms", "5", "--output-tokens", "8"];
    stack
        .start_pods(&[
            TestPod::serving("good-0", 11, "pool", "m", &healthy),
            TestPod::serving("good-1", 12, "pool", "m", &healthy),
            TestPod::serving("bad-0", 13, "pool", "m", bad_args),
        ])
        .await;
    // Failed attempts count as load, so a pod a few failures in may stop
    // being chosen before it is ejected, depending on how busy the others
    // are; at 2 in a row the ejection comes first on any machine.
    let router_config = stack.dir.path().join("router-config.yaml");
    std::fs::write(
        &router_config,
        format!("outlierDetection:\n  consecutiveFailures: {CONSECUTIVE_FAILURES}\n"),
    )
    .expect("write the router configuration");
    let router_config = router_config.display().to_string();
    stack
        .start_controller_with(&["--router-config", &router_config])
        .await;
    for _ in 0..dataplanes {
        stack.start_dataplane().await;
    }
    stack
}

/// A completion for `m`: path and body.
const COMPLETION: (&str, &str) = ("/v1/completions", r#"{"model":"m","prompt":"hi"}"#);
/// A streamed chat completion for `m`: path and body.
const STREAMED_CHAT: (&str, &str) = (
    "/v1/chat/completions",
    r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_answering_503_at_once_is_ejected_by_every_dataplane() {
    let stack = pool_with_a_bad_pod("", &["--fail-status", "503"], 2).await;
    let _logs = stack.logs_on_failure();
    let outcomes = send_load(&stack, 0, COMPLETION, 240, "503 pod, dataplane 0").await;
    // Without ejection, least-request sent nearly everything to the pod
    // that fails at once (it never has anything in flight).
    assert!(
        outcomes.failures() <= MAX_FAILURES_BEFORE_EJECTION,
        "at most a handful before the ejection: {outcomes:?}"
    );
    let ejected = pod_state(&stack, 0, "bad-0").await;
    assert_eq!(ejected["ejected"], true, "{ejected}");
    assert_eq!(ejected["ejection"]["byThisDataplane"], true, "{ejected}");
    assert_eq!(ejected["ejection"]["reason"], "5xx", "{ejected}");
    assert_eq!(
        dataplane_metric(
            &stack,
            0,
            r#"kthena_router_pod_ejections_total{model_server="default/pool",reason="5xx"}"#
        )
        .await,
        1.0
    );
    // Dataplane 1 never sent the pod anything: the controller told it.
    let told = wait_for("dataplane 1 ejects bad-0", || async {
        let state = pod_state(&stack, 1, "bad-0").await;
        (state["ejected"] == true).then_some(state)
    })
    .await;
    assert_eq!(told["ejection"]["byThisDataplane"], false, "{told}");
    let outcomes = send_load(
        &stack,
        1,
        COMPLETION,
        80,
        "503 pod, dataplane 1 after the push",
    )
    .await;
    assert_eq!(outcomes.failures(), 0, "{outcomes:?}");
    assert_eq!(outcomes.by_pod.get("bad-0"), None, "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_cuts_streams_is_ejected() {
    let stack = pool_with_a_bad_pod("", &["--cut-stream-after", "3"], 1).await;
    let _logs = stack.logs_on_failure();
    let outcomes = send_load(&stack, 0, STREAMED_CHAT, 240, "stream-cutting pod").await;
    let cut = outcomes.by_pod.get("bad-0").copied().unwrap_or(0);
    // Its cut streams end sooner than the others' whole ones, so without
    // ejection least-request favoured it (47 % instead of 33 %).
    assert!(
        cut <= MAX_FAILURES_BEFORE_EJECTION,
        "the cutting pod got {cut} of 240: {outcomes:?}"
    );
    assert_eq!(
        outcomes.failures(),
        cut,
        "each of its streams was cut: {outcomes:?}"
    );
    let state = pod_state(&stack, 0, "bad-0").await;
    assert_eq!(state["ejection"]["reason"], "stream_cut", "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_pod_times_out_is_retried_elsewhere_and_ejected() {
    let policy = "trafficPolicy: {timeout: 1s, retry: {attempts: 1}}";
    let stack = pool_with_a_bad_pod(policy, &["--hang"], 1).await;
    let _logs = stack.logs_on_failure();
    let outcomes = send_load(&stack, 0, COMPLETION, 160, "hanging pod").await;
    assert_eq!(
        outcomes.failures(),
        0,
        "every timed-out attempt was retried on another pod: {outcomes:?}"
    );
    assert_eq!(outcomes.by_pod.get("bad-0"), None, "{outcomes:?}");
    // Hung attempts count as load while they last and as failures after,
    // so few requests reach it; enough of them in a row eject it.
    let state = pod_state(&stack, 0, "bad-0").await;
    eprintln!("hanging pod, its state afterwards: {state}");
    let failures = state["consecutiveFailures"].as_u64().unwrap_or(0);
    assert!(
        failures > 0 || state["ejection"]["reason"] == "timeout",
        "the timeouts count against the pod: {state}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_target_without_a_usable_pod_fails_over_to_the_others() {
    let targets: Vec<String> = ["a", "b", "c", "dead"]
        .iter()
        .map(|server| format!("{{modelServerName: {server}, weight: 25}}"))
        .collect();
    let route = format!(
        "apiVersion: networking.serving.volcano.sh/v1alpha1\nkind: ModelRoute\n\
         metadata: {{name: m, namespace: default}}\n\
         spec: {{modelName: m, rules: [{{targetModels: [{}]}}]}}\n",
        targets.join(", ")
    );
    let servers: Vec<String> = ["a", "b", "c", "dead"]
        .iter()
        .map(|server| model_server_yaml(server, "model: m"))
        .collect();
    let mut stack = Stack::new(&[
        ("servers.yaml", yaml_documents(&servers)),
        ("routes.yaml", route),
    ]);
    let engine = ["--ttft-ms", "20"];
    stack
        .start_pods(&[
            TestPod::serving("a-0", 11, "a", "m", &engine),
            TestPod::serving("b-0", 12, "b", "m", &engine),
            TestPod::serving("c-0", 13, "c", "m", &engine),
            // Nothing listens: every connection is refused.
            TestPod::without_engine("dead-0", 14, "dead"),
        ])
        .await;
    stack.start_controller().await;
    stack.start_dataplane().await;
    let _logs = stack.logs_on_failure();
    let outcomes = send_load(&stack, 0, COMPLETION, 240, "dead weighted target").await;
    // Before: a quarter of the requests failed for as long as it was down.
    // Now only requests sent to it before its refusal ejected it fail.
    assert!(
        outcomes.failures() <= CONCURRENCY,
        "only the first ones, sent before it was ejected: {outcomes:?}"
    );
    for live in ["a-0", "b-0", "c-0"] {
        let share = outcomes.by_pod.get(live).copied().unwrap_or(0);
        assert!(
            (60..=100).contains(&share),
            "{live} takes a third of the dead target's share on top of its own: {outcomes:?}"
        );
    }
    let failovers = dataplane_metric(
        &stack,
        0,
        r#"kthena_router_target_failovers_total{model_route="default/m",model_server="default/dead"}"#,
    )
    .await;
    eprintln!("dead weighted target: {failovers} failovers counted");
    assert!(
        (40.0..=80.0).contains(&failovers),
        "about a quarter of 240 left the dead target: {failovers}"
    );
    // Access-log lines are written in batches, a few milliseconds after the request.
    wait_for("each failover to show in the access log", || async {
        let failed_over_lines = stack.dataplanes[0]
            .process
            .log_text()
            .lines()
            .filter(|line| line.contains(r#""failed_over_from":"default/dead""#))
            .count();
        (failed_over_lines as f64 == failovers).then_some(())
    })
    .await;
}

/// Routes added and removed at once by the scale test: enough that a cost
/// per removed route times every series (what removal used to cost) takes
/// minutes, while applying them takes well under a second.
const ROUTES_AT_SCALE: usize = 5_000;

/// A probe slower than this counts as late: far above a healthy dataplane's
/// sub-millisecond answer, far below the multi-second stalls of a dataplane
/// busy applying a snapshot on its serving threads.
const LATE_PROBE: Duration = Duration::from_millis(250);

/// What a probe loop saw.
#[derive(Debug, Default)]
struct Probes {
    sent: usize,
    late: usize,
    over_10ms: usize,
    failed: usize,
    slowest: Duration,
}

/// Sends `GET url` back to back until `stop` is set.
async fn probe_until(http: HttpClient, url: String, stop: Arc<AtomicBool>) -> Probes {
    let mut probes = Probes::default();
    while !stop.load(Ordering::Relaxed) {
        let started = clock::now();
        let answered = tokio::time::timeout(Duration::from_secs(10), http.get(&url)).await;
        let took = started.elapsed();
        probes.sent += 1;
        match answered {
            Ok(Ok(response)) if response.status == 200 => {}
            _ => probes.failed += 1,
        }
        probes.slowest = probes.slowest.max(took);
        probes.late += usize::from(took > LATE_PROBE);
        probes.over_10ms += usize::from(took > Duration::from_millis(10));
        // Pacing, not waiting: probes a few milliseconds apart sample the
        // latency all along without becoming a load of their own.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    probes
}

fn scale_routes(count: usize) -> String {
    let routes: Vec<String> = (0..count)
        .map(|i| simple_route_yaml(&format!("route-{i}"), &format!("model-{i}"), "scale"))
        .collect();
    yaml_documents(&routes)
}

/// The number of routes the dataplane holds, from `/readyz` (cheap to
/// read, unlike the model list of thousands of routes).
async fn routes_held(stack: &Stack) -> u64 {
    let response = stack
        .http
        .get(&stack.dataplanes[0].url("/readyz"))
        .await
        .expect("dataplane answers");
    response.json()["routes"].as_u64().unwrap_or(0)
}

/// Waits until the dataplane holds `count` routes; the time that took.
async fn wait_routes(stack: &Stack, count: usize) -> Duration {
    let started = clock::now();
    wait_for(&format!("{count} routes held"), || async {
        (routes_held(stack).await == count as u64).then_some(())
    })
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_and_adding_thousands_of_routes_never_stalls_probes() {
    let mut stack = Stack::new(&[
        ("servers.yaml", model_server_yaml("scale", "model: m")),
        ("routes.yaml", scale_routes(ROUTES_AT_SCALE)),
    ]);
    stack
        .start_pods(&[TestPod::serving("scale-0", 11, "scale", "m", &[])])
        .await;
    stack.start_controller().await;
    stack.start_dataplane().await;
    let _logs = stack.logs_on_failure();
    wait_routes(&stack, ROUTES_AT_SCALE).await;
    // One route used, so the removal also has series to remove.
    let answer = stack
        .post(
            "/v1/completions",
            &[],
            r#"{"model":"model-1","prompt":"hi"}"#,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    let stop = Arc::new(AtomicBool::new(false));
    let probing = tokio::spawn(probe_until(
        stack.http.clone(),
        stack.dataplanes[0].url("/healthz"),
        stop.clone(),
    ));
    stack.write_config("routes.yaml", &scale_routes(1));
    let removal = wait_routes(&stack, 1).await;
    stack.write_config("routes.yaml", &scale_routes(ROUTES_AT_SCALE));
    let addition = wait_routes(&stack, ROUTES_AT_SCALE).await;
    stop.store(true, Ordering::Relaxed);
    let probes = probing.await.expect("probe loop");
    eprintln!(
        "{ROUTES_AT_SCALE} routes removed in {removal:?}, added back in {addition:?} \
         (file write to the dataplane's route count); probes: {probes:?}"
    );
    assert!(probes.sent > 10, "{probes:?}");
    assert_eq!(probes.failed, 0, "{probes:?}");
    assert_eq!(
        probes.late, 0,
        "no probe took over {LATE_PROBE:?}: {probes:?}"
    );
    let text = dataplane_metrics(&stack, 0).await;
    assert!(
        !text.contains(r#"model="model-1""#),
        "the removed model's series are gone"
    );
    let per_route = text.lines().filter(|line| line.contains("model-4")).count();
    assert_eq!(per_route, 0, "an idle route adds no series");
}
