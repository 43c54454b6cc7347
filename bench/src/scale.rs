//! The control-plane scale case (`switchyard-bench-scale`, the memory
//! guard): ModelServers, pods and ModelRoutes as local-mode YAML, and one
//! scrape pass of engine loads for every pod.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use switchyard_controller::local::{LocalObjects, parse_documents};
use switchyard_controller::scrape::PodLoad;
use switchyard_snapshot::object_key;

/// How many objects of each kind.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub pods: usize,
    pub servers: usize,
    pub routes: usize,
}

/// The case `make bench` measures the dataplane's memory with.
pub const TEN_THOUSAND_PODS: Shape = Shape {
    pods: 10_000,
    servers: 500,
    routes: 1_000,
};

/// Local-mode YAML for the scale case: server `s` selects pods labelled
/// `app: s-<s>`; route `r` targets server `r % servers` (and, for every
/// other route, a second server at 90/10), with a header rule first.
pub fn yaml(shape: &Shape, weight_of_route_0: u32) -> String {
    let mut yaml = String::with_capacity(shape.pods * 260 + shape.routes * 400);
    for s in 0..shape.servers {
        let _ = write!(
            yaml,
            "apiVersion: networking.serving.volcano.sh/v1alpha1\nkind: ModelServer\nmetadata:\n  name: s-{s}\n  namespace: bench\nspec:\n  workloadSelector:\n    matchLabels:\n      app: s-{s}\n  workloadPort:\n    port: 8000\n  model: model-{s}\n  inferenceEngine: vLLM\n  trafficPolicy:\n    timeout: 30s\n---\n"
        );
    }
    for p in 0..shape.pods {
        let server = p % shape.servers;
        let (a, b) = (p / 250, p % 250 + 1);
        let _ = write!(
            yaml,
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{p}\n  namespace: bench\n  labels:\n    app: s-{server}\nstatus:\n  phase: Running\n  podIP: 10.{}.{a}.{b}\n  conditions:\n  - type: Ready\n    status: \"True\"\n---\n",
            a / 250
        );
    }
    for r in 0..shape.routes {
        let first = r % shape.servers;
        let second = (r + 1) % shape.servers;
        let weight = if r == 0 { weight_of_route_0 } else { 90 };
        let _ = write!(
            yaml,
            "apiVersion: networking.serving.volcano.sh/v1alpha1\nkind: ModelRoute\nmetadata:\n  name: route-{r}\n  namespace: bench\nspec:\n  modelName: model-{r}\n  rules:\n  - name: premium\n    modelMatch:\n      headers:\n        user-type:\n          exact: premium\n    targetModels:\n    - modelServerName: s-{second}\n  - name: default\n    targetModels:\n    - modelServerName: s-{first}\n      weight: {weight}\n    - modelServerName: s-{second}\n      weight: {}\n---\n",
            100 - weight
        );
    }
    yaml
}

pub fn objects(yaml: &str) -> Result<LocalObjects, String> {
    let mut objects = LocalObjects::default();
    parse_documents("scale.yaml", yaml, &mut objects);
    if !objects.problems.is_empty() {
        return Err(format!(
            "generated YAML rejected: {:?}",
            objects.problems[0]
        ));
    }
    Ok(objects)
}

/// One scrape pass at `pass_unix_ms` in which every pod's load is the same as
/// in the other passes except pod 0's.
pub fn loads(
    objects: &LocalObjects,
    waiting_of_pod_0: f64,
    pass_unix_ms: i64,
) -> BTreeMap<String, PodLoad> {
    objects
        .pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let load = PodLoad {
                requests_waiting: if i == 0 { waiting_of_pod_0 } else { 1.0 },
                requests_running: 4.0,
                kv_cache_usage: 0.25,
                ttft_seconds: 0.05,
                tpot_seconds: 0.01,
                models: vec![format!("model-{}", i % objects.servers.len().max(1))],
                observed_at_unix_ms: pass_unix_ms,
                kv_cache_capacity_tokens: 65_536,
            };
            (object_key("bench", &name), load)
        })
        .collect()
}
