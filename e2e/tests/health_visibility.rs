//! Health made visible, end to end: after real traffic, a dataplane's
//! model-server and load-balancing metrics and its health debug endpoints
//! show real values (which pods answered, the engine's own waiting count,
//! a pod whose engine is gone, open connections), as Kthena's older router
//! observability guide names them.

use std::collections::BTreeMap;

use http::StatusCode;
use serde_json::Value;
use switchyard_e2e::harness::{ENGINE_PORT, Stack, TestPod, route_per_server_files, wait_for};

const OBS_REQUESTS: usize = 4;
/// The default scheduler's score plugins, as the `algorithm` label names them.
const DEFAULT_ALGORITHM: &str = "least-request+gpu-usage+least-latency+prefix-cache";

/// `name{labels} value` of an exposition, labels in their printed order.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (family, label_text) = series.split_once('{').unwrap_or((series, ""));
        let matches = family == name
            && labels
                .iter()
                .all(|(key, value)| label_text.contains(&format!("{key}=\"{value}\"")));
        matches.then(|| value.parse().ok()).flatten()
    })
}

async fn get(stack: &Stack, url: &str) -> (StatusCode, Value) {
    let response = stack.http.get(url).await.expect("answers");
    let json = serde_json::from_str(&response.text()).unwrap_or(Value::Null);
    (response.status, json)
}

fn named<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_array()
        .into_iter()
        .flatten()
        .find(|element| element[key] == value)
        .unwrap_or_else(|| panic!("no {key}={value} in {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_server_and_load_balancing_health_show_real_values() {
    let mut stack = Stack::new(&route_per_server_files(&[
        ("obs-route", "obs-model", "obs-server"),
        ("busy-route", "busy-model", "busy-server"),
        ("dead-route", "dead-model", "dead"),
    ]));
    // One sequence at a time, each streaming for a minute: a second request waits.
    let busy: &[&str] = &[
        "--mode",
        "sim",
        "--max-num-seqs",
        "1",
        "--output-tokens",
        "600",
        "--itl-ms",
        "100",
    ];
    let pods = [
        TestPod::serving("obs-0", 11, "obs-server", "obs-model", &[]),
        TestPod::serving("obs-1", 12, "obs-server", "obs-model", &[]),
        TestPod::serving("busy-0", 14, "busy-server", "busy-model", busy),
        TestPod::without_engine("dead-0", 13, "dead"),
    ];
    stack.start_pods(&pods).await;
    stack.start_controller().await;
    stack.start_dataplane().await;

    let mut answered: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..OBS_REQUESTS {
        let response = stack
            .post(
                "/v1/completions",
                &[],
                r#"{"model":"obs-model","prompt":"hi"}"#,
            )
            .await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        *answered.entry(response.mock_pod()).or_default() += 1;
    }
    // Two streams straight to the busy engine: one runs, one waits.
    let busy_url = format!("http://{}:{ENGINE_PORT}/v1/completions", stack.ip(14));
    let body = r#"{"model":"busy-model","prompt":"hi","stream":true}"#;
    let mut streams = Vec::new();
    for _ in 0..2 {
        streams.push(
            stack
                .http
                .post_json_streaming(&busy_url, &[], body)
                .await
                .expect("the busy engine answers"),
        );
    }

    let dataplane = &stack.dataplanes[0];
    let metrics_url = format!("http://{}/metrics", dataplane.metrics);
    let busy_depth = [
        ("model_server", "default/busy-server"),
        ("model", "busy-model"),
    ];
    let text = wait_for(
        "the busy engine's waiting request in the queue depth",
        || async {
            let text = stack.http.get(&metrics_url).await.ok()?.text();
            (sample(&text, "kthena_model_server_queue_depth", &busy_depth) == Some(1.0))
                .then_some(text)
        },
    )
    .await;

    for (pod, count) in &answered {
        let target = format!("default/{pod}");
        let labels = [
            ("algorithm", DEFAULT_ALGORITHM),
            ("model", "obs-model"),
            ("target", target.as_str()),
        ];
        assert_eq!(
            sample(&text, "kthena_lb_decisions_total", &labels),
            Some(*count as f64),
            "{pod}: {text}"
        );
    }
    let expected = [
        ("kthena_router_routes", vec![], 3.0),
        (
            "kthena_model_server_health_status",
            vec![
                ("model_server", "default/obs-server"),
                ("namespace", "default"),
            ],
            1.0,
        ),
        (
            "kthena_model_server_health_status",
            vec![("model_server", "default/dead"), ("namespace", "default")],
            0.0,
        ),
        (
            "kthena_model_server_queue_depth",
            vec![
                ("model_server", "default/obs-server"),
                ("model", "obs-model"),
            ],
            0.0,
        ),
        (
            "kthena_lb_target_health",
            vec![("target", "default/obs-0"), ("model", "obs-model")],
            1.0,
        ),
        (
            "kthena_lb_target_health",
            vec![("target", "default/dead-0"), ("model", "dead-model")],
            0.0,
        ),
        (
            "kthena_lb_connection_pool_size",
            vec![("target", "default/dead-0")],
            0.0,
        ),
    ];
    for (name, labels, value) in &expected {
        assert_eq!(
            sample(&text, name, labels),
            Some(*value),
            "{name} {labels:?}"
        );
    }
    // Connections to the pods that answered stay pooled.
    let pooled: f64 = ["default/obs-0", "default/obs-1"]
        .iter()
        .filter_map(|target| {
            sample(
                &text,
                "kthena_lb_connection_pool_size",
                &[("target", target)],
            )
        })
        .sum();
    assert!(pooled >= 1.0, "{text}");

    // The debug views, from the same state.
    let debug = |path: &str| format!("http://{}{path}", dataplane.debug);
    let (status, servers) = get(&stack, &debug("/debug/model-servers")).await;
    assert_eq!(status, StatusCode::OK);
    let list = &servers["modelServers"];
    let obs = named(list, "modelServer", "default/obs-server");
    assert_eq!(obs["healthy"], true);
    assert_eq!(obs["pods"]["healthy"], 2);
    assert_eq!(obs["model"], "obs-model");
    let dead = named(list, "modelServer", "default/dead");
    assert_eq!(dead["healthy"], false);
    assert_eq!(dead["pods"]["noLoad"], 1);
    assert_eq!(
        named(list, "modelServer", "default/busy-server")["queueDepth"],
        1.0
    );

    let (_, status) = get(&stack, &debug("/debug/model-servers/dead/status")).await;
    assert_eq!(status["healthStatus"], 0);
    assert_eq!(status["pods"][0]["condition"], "no_load");
    let (_, engine) = get(&stack, &debug("/debug/model-servers/busy-server/metrics")).await;
    assert_eq!(engine["pods"][0]["requestsWaiting"], 1.0);
    assert_eq!(engine["pods"][0]["requestsRunning"], 1.0);
    assert!(
        engine["notAvailable"]["gpuUtilization"].is_string(),
        "{engine}"
    );
    let (missing, _) = get(&stack, &debug("/debug/model-servers/nope/status")).await;
    assert_eq!(missing, StatusCode::NOT_FOUND);

    let (_, backends) = get(&stack, &debug("/debug/routing/backends")).await;
    assert_eq!(backends["algorithm"], DEFAULT_ALGORITHM);
    let obs = named(&backends["backends"], "modelServer", "default/obs-server");
    assert_eq!(obs["routes"][0]["route"], "default/obs-route");
    assert_eq!(obs["routes"][0]["weight"], 100);
    let decisions: u64 = obs["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter_map(|target| target["decisions"].as_u64())
        .sum();
    assert_eq!(decisions, OBS_REQUESTS as u64);

    // Pod dumps carry the pod's labels; the router state names both versions.
    let (_, pod) = get(
        &stack,
        &debug("/debug/config_dump/namespaces/default/pods/obs-0"),
    )
    .await;
    assert_eq!(pod["podInfo"]["labels"]["app"], "obs-server");
    let (_, state) = get(&stack, &debug("/debug/router/state")).await;
    assert!(
        state["snapshot"]["routeConfigVersion"].is_string(),
        "{state}"
    );
    assert!(
        state["snapshot"]["endpointLoadsVersion"].is_string(),
        "{state}"
    );
    drop(streams);
}
