//! Failure behaviour end to end, with the real binaries on loopback: a big
//! configuration change never stalls the dataplane, a bad pod is ejected, a
//! target without usable pods fails over to the rule's other targets, and a
//! hung engine is bounded.
//!
//! Timings are measured and printed, never asserted tightly: the bounds
//! below are ceilings a busy 2-core machine stays far under.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use switchyard_e2e::harness::{
    HttpClient, Stack, TestPod, model_server_yaml, simple_route_yaml, wait_for, yaml_documents,
};
use switchyard_runtime::clock;

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

/// The number of models the dataplane lists.
async fn models_listed(stack: &Stack) -> usize {
    let response = stack
        .http
        .get(&stack.dataplanes[0].url("/v1/models"))
        .await
        .expect("dataplane answers");
    response.json()["data"].as_array().map_or(0, Vec::len)
}

async fn wait_models(stack: &Stack, count: usize) -> Duration {
    let started = clock::now();
    wait_for(&format!("{count} models listed"), || async {
        (models_listed(stack).await == count).then_some(())
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
    wait_models(&stack, ROUTES_AT_SCALE).await;
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
    let removal = wait_models(&stack, 1).await;
    stack.write_config("routes.yaml", &scale_routes(ROUTES_AT_SCALE));
    let addition = wait_models(&stack, ROUTES_AT_SCALE).await;
    stop.store(true, Ordering::Relaxed);
    let probes = probing.await.expect("probe loop");
    eprintln!(
        "{ROUTES_AT_SCALE} routes removed in {removal:?}, added back in {addition:?} \
         (file write to the dataplane's model list); probes: {probes:?}"
    );
    assert!(probes.sent > 10, "{probes:?}");
    assert_eq!(probes.failed, 0, "{probes:?}");
    assert_eq!(
        probes.late, 0,
        "no probe took over {LATE_PROBE:?}: {probes:?}"
    );
    let metrics = stack
        .http
        .get(&format!("http://{}/metrics", stack.dataplanes[0].metrics))
        .await
        .expect("metrics");
    let text = metrics.text();
    assert!(
        !text.contains(r#"model="model-1""#),
        "the removed model's series are gone"
    );
    let per_route = text.lines().filter(|line| line.contains("model-4")).count();
    assert_eq!(per_route, 0, "an idle route adds no series");
}
