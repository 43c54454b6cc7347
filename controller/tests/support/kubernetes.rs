//! Kubernetes mode against the [`FakeApi`]: starting and stopping the
//! controller, the objects tests seed, and reading the conditions of what
//! the controller writes back.

use std::time::Duration;

use serde_json::{Value, json};
use switchyard_controller::app::start_kubernetes;
use switchyard_controller::cli::Args;
use switchyard_controller::core::Controller;

use super::fake_api::{DEADLINE, FakeApi};

/// API version of the Kthena kinds.
pub const API_VERSION: &str = "networking.serving.volcano.sh/v1alpha1";

/// Test arguments for Kubernetes mode: engines scraped every 200 ms, so
/// loads reach snapshots quickly.
pub fn kubernetes_args() -> Args {
    Args {
        scrape_interval: Duration::from_millis(200),
        ..Args::for_test()
    }
}

/// The controller in Kubernetes mode against `fake`, started within [`DEADLINE`].
pub async fn start(args: &Args, fake: &FakeApi) -> Controller {
    tokio::time::timeout(DEADLINE, start_kubernetes(args, fake.client()))
        .await
        .expect("started in time")
        .expect("starts against the fake API")
}

/// Stops `controller`, cleanly and within [`DEADLINE`].
pub async fn stop(controller: Controller) {
    tokio::time::timeout(DEADLINE, controller.shutdown())
        .await
        .expect("stops in time")
        .expect("stops cleanly");
}

/// `metadata` of an object `name` in `default` at `generation`.
pub fn metadata(name: &str, generation: i64) -> Value {
    json!({
        "name": name,
        "namespace": "default",
        "uid": format!("uid-{name}"),
        "generation": generation,
        "resourceVersion": "1",
        "creationTimestamp": "2026-12-01T17:00:00Z",
    })
}

/// A ModelServer `name` (generation 1) of `engine` pods labelled `app: <app>`, port 8000.
pub fn model_server(name: &str, app: &str, engine: &str) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "ModelServer",
        "metadata": metadata(name, 1),
        "spec": {
            "workloadSelector": {"matchLabels": {"app": app}},
            "workloadPort": {"port": 8000},
            "inferenceEngine": engine,
        },
    })
}

/// A running, ready pod `name` in `default`, labelled `app: <app>`, at `ip`.
pub fn ready_pod(name: &str, app: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    })
}

/// The condition of type `type_` in `object["conditions"]` (a status, a
/// listener, a parent entry), or `null`.
pub fn condition<'a>(object: &'a Value, type_: &str) -> &'a Value {
    object["conditions"]
        .as_array()
        .and_then(|conditions| {
            conditions
                .iter()
                .find(|condition| condition["type"] == type_)
        })
        .unwrap_or(&Value::Null)
}
