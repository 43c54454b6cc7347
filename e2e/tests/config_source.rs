//! A broken config source never takes a serving fleet down, end to end in
//! local mode: a controller restarted on an empty directory holds its first
//! snapshot (the dataplanes keep serving) until the directory has routes or
//! the grace period passed, and then says so; a file rewritten slowly, in
//! two halves with a pause, is never read half-way.

use std::io::Write;
use std::time::Duration;

use http::StatusCode;
use serde_json::Value;
use switchyard_e2e::harness::{
    Stack, TestPod, model_server_yaml, simple_route_yaml, wait_for, yaml_documents,
};
use switchyard_runtime::clock;

/// A request for `model` through dataplane 0: its status.
async fn status_of(stack: &Stack, model: &str) -> StatusCode {
    let body = format!(r#"{{"model":"{model}","prompt":"hi"}}"#);
    stack.post("/v1/completions", &[], &body).await.status
}

async fn get_json(stack: &Stack, url: &str) -> (StatusCode, Value) {
    let response = stack.http.get(url).await.expect("answers");
    let json = serde_json::from_str(&response.text()).unwrap_or(Value::Null);
    (response.status, json)
}

/// `chat` → ModelServer `chat-server` with one mock engine.
async fn serving_stack() -> Stack {
    let mut stack = Stack::new(&[
        ("servers.yaml", model_server_yaml("chat-server", "")),
        (
            "routes.yaml",
            simple_route_yaml("chat", "chat", "chat-server"),
        ),
    ]);
    stack
        .start_pods(&[TestPod::serving("chat-0", 11, "chat-server", "chat", &[])])
        .await;
    stack.start_controller().await;
    stack.start_dataplane().await;
    assert_eq!(status_of(&stack, "chat").await, StatusCode::OK);
    stack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restarted_on_an_empty_directory_does_not_wipe_the_dataplanes() {
    let mut stack = serving_stack().await;
    let config_files = ["servers.yaml", "routes.yaml", "pods.yaml"];
    let saved: Vec<(String, String)> = config_files
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(stack.config_dir.join(name)).expect("read");
            std::fs::remove_file(stack.config_dir.join(name)).expect("remove");
            ((*name).to_owned(), text)
        })
        .collect();

    // Restarted on the empty directory, with a grace period longer than the test.
    stack.spawn_controller_with(&["--empty-source-grace-period", "1h"]);
    let readyz = format!("http://{}/readyz", stack.controller_admin);
    let held = wait_for("the controller to hold the empty directory", || async {
        let (status, body) = stack
            .http
            .get(&readyz)
            .await
            .ok()
            .map(|response| (response.status, response.text()))?;
        body.contains("holds no ModelRoute").then_some(status)
    })
    .await;
    assert_eq!(held, StatusCode::SERVICE_UNAVAILABLE);
    let objects_url = format!("http://{}/debug/objects", stack.controller_debug);
    let (_, objects) = get_json(&stack, &objects_url).await;
    assert_eq!(objects["source"]["state"], "holding");
    let controller_metrics = stack.controller_admin_get("/metrics").await.text();
    assert!(
        controller_metrics.contains("switchyard_controller_source_held 1"),
        "{controller_metrics}"
    );
    // Meanwhile the dataplane keeps its routes and serves them.
    for _ in 0..20 {
        assert_eq!(status_of(&stack, "chat").await, StatusCode::OK);
    }
    let (ready, body) = get_json(&stack, &stack.dataplanes[0].url("/readyz")).await;
    assert_eq!((ready, body["routes"].as_u64()), (StatusCode::OK, Some(1)));

    // The files come back: the controller serves them, the dataplane never lost them.
    for (name, text) in &saved {
        stack.write_config(name, text);
    }
    stack.http.wait_ok(&readyz).await;
    assert_eq!(status_of(&stack, "chat").await, StatusCode::OK);

    // Restarted on the empty directory with a short grace period: it then
    // publishes the empty snapshot, says so, and the dataplane reports 0 routes.
    for (name, _) in &saved {
        std::fs::remove_file(stack.config_dir.join(name)).expect("remove");
    }
    stack.spawn_controller_with(&["--empty-source-grace-period", "1s"]);
    stack.http.wait_ok(&readyz).await;
    // The source's state is reported apart from readiness, and may follow it
    // by a moment.
    let objects = wait_for("the source to say the grace period ended", || async {
        let (_, objects) = get_json(&stack, &objects_url).await;
        (objects["source"]["empty_after_grace"] == true).then_some(objects)
    })
    .await;
    assert!(
        objects["source"]["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("published an empty routing snapshot")),
        "{objects}"
    );
    wait_for("the dataplane to hold no route", || async {
        let (_, body) = get_json(&stack, &stack.dataplanes[0].url("/readyz")).await;
        (body["routes"].as_u64() == Some(0)).then_some(())
    })
    .await;
    let metrics = stack
        .http
        .get(&format!("http://{}/metrics", stack.dataplanes[0].metrics))
        .await
        .expect("metrics")
        .text();
    assert!(
        metrics.lines().any(|line| line == "kthena_router_routes 0"),
        "{metrics}"
    );
    assert_eq!(status_of(&stack, "chat").await, StatusCode::NOT_FOUND);
}

/// The writer pauses 250 ms after the first half, which alone is a valid
/// file holding only a new route: read then, it would drop `chat`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_in_two_halves_with_a_pause_never_turns_requests_into_404() {
    let stack = serving_stack().await;
    let first_half = simple_route_yaml("added", "added", "chat-server");
    let rewritten = yaml_documents(&[
        first_half.clone(),
        simple_route_yaml("chat", "chat", "chat-server"),
    ]);
    let path = stack.config_dir.join("routes.yaml");

    let mut statuses = Vec::new();
    let writer = tokio::spawn(async move {
        // Small synchronous writes: the pause between them is the point.
        let mut file = std::fs::File::create(&path).expect("truncate");
        file.write_all(first_half.as_bytes()).expect("first half");
        file.flush().expect("flush");
        clock::sleep(Duration::from_millis(250)).await;
        file.write_all(&rewritten.as_bytes()[first_half.len()..])
            .expect("second half");
    });
    // Requests all along, until the dataplane holds the new route and a while after.
    let started = clock::now();
    let mut added_served_at = None;
    while added_served_at.is_none_or(|at| clock::now() - at < Duration::from_secs(1)) {
        statuses.push(status_of(&stack, "chat").await);
        if added_served_at.is_none() {
            let (_, ready) = get_json(&stack, &stack.dataplanes[0].url("/readyz")).await;
            if ready["routes"].as_u64() == Some(2) {
                added_served_at = Some(clock::now());
            }
        }
        assert!(
            clock::now() - started < Duration::from_secs(30),
            "the rewrite was never applied"
        );
    }
    writer.await.expect("writer");
    let failed = statuses
        .iter()
        .filter(|status| **status != StatusCode::OK)
        .count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed: {statuses:?}",
        statuses.len()
    );
    if let Some(applied_at) = added_served_at {
        // The README's figures (`--nocapture`).
        eprintln!(
            "{} requests during the rewrite, 0 failed; the new route was held {:?} after the write began",
            statuses.len(),
            applied_at - started
        );
    }
    assert!(
        statuses.len() >= 10,
        "requests throughout: {}",
        statuses.len()
    );
}
