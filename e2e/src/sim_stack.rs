//! A scheduling stack for quality tests and benchmarks: `N` simulated engines
//! (`pod-0`..) behind one ModelServer/ModelRoute (`base`), a controller shipping
//! a router configuration file, and dataplanes that all see every pod before
//! [`SimStack::start`] returns. Shared by `tests/scheduling_quality.rs` and
//! `examples/bench_quality.rs`, so both measure the same setup.

use std::collections::BTreeMap;
use std::path::PathBuf;

use http::StatusCode;
use serde_json::Value;

use crate::harness::{ENGINE_PORT, EngineSpec, HttpClient, Stack, TestPod, wait_for};
use crate::prefix_workload::{EngineCounters, PrefixWorkload, Run};

/// The model every simulated engine serves and the route matches.
pub const SIM_MODEL: &str = "base";

/// What to start.
pub struct SimStackOptions<'a> {
    pub engines: usize,
    /// Extra mock-engine flags for engine `i`.
    pub engine_args: &'a dyn Fn(usize) -> Vec<String>,
    /// Contents of the `--router-config` file.
    pub router_config: &'a str,
    /// `loraAdapters` of the `base` route.
    pub lora_adapters: &'a [&'a str],
    pub dataplanes: usize,
    /// The controller's `--scrape-interval`.
    pub scrape_interval: &'a str,
}

/// A running [`SimStack::start`] stack.
pub struct SimStack {
    pub stack: Stack,
    pub engines: Vec<EngineSpec>,
    /// The router configuration file the controller watches (tests edit it).
    pub router_config: PathBuf,
}

fn objects(lora_adapters: &[&str]) -> String {
    format!(
        r#"
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelServer
metadata: {{name: sim, namespace: default}}
spec:
  workloadSelector: {{matchLabels: {{app: sim}}}}
  workloadPort: {{port: {ENGINE_PORT}}}
  inferenceEngine: vLLM
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: {{name: {SIM_MODEL}, namespace: default}}
spec:
  modelName: {SIM_MODEL}
  loraAdapters: {lora_adapters:?}
  rules:
  - targetModels: [{{modelServerName: sim}}]
"#
    )
}

impl SimStack {
    /// Starts engines, the controller and dataplanes; returns once every
    /// dataplane's `/debug/router/state` lists every engine.
    pub async fn start(options: SimStackOptions<'_>) -> Self {
        let mut stack = Stack::new(&[("objects.yaml", objects(options.lora_adapters))]);
        let pods: Vec<TestPod> = (0..options.engines)
            .map(|i| {
                let args = (options.engine_args)(i);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let name = format!("pod-{i}");
                TestPod::serving(&name, 10 + i as u8, "sim", SIM_MODEL, &args)
            })
            .collect();
        let specs = stack.start_pods(&pods).await;
        let router_config = stack.dir.path().join("router-config.yaml");
        std::fs::write(&router_config, options.router_config).expect("write router config");
        let router_config_arg = router_config.display().to_string();
        stack
            .start_controller_with(&[
                "--router-config",
                &router_config_arg,
                "--scrape-interval",
                options.scrape_interval,
            ])
            .await;
        for _ in 0..options.dataplanes {
            stack.start_dataplane().await;
        }
        let sim = Self {
            stack,
            engines: specs,
            router_config,
        };
        for index in 0..options.dataplanes {
            sim.wait_state(index, "every pod in the snapshot", |pods| {
                pods.len() == options.engines
            })
            .await;
        }
        sim
    }

    pub fn http(&self) -> &HttpClient {
        &self.stack.http
    }

    /// URL of `path` on engine `pod` directly (bypassing the dataplanes).
    pub fn engine_url(&self, pod: usize, path: &str) -> String {
        format!("http://{}:{ENGINE_PORT}{path}", self.engines[pod].ip)
    }

    /// Runs `workload` through every dataplane; returns the run and what each
    /// of the first `engines` engines counted meanwhile.
    pub async fn run_workload(
        &self,
        workload: &PrefixWorkload,
        engines: usize,
    ) -> (Run, Vec<EngineCounters>) {
        let metrics: Vec<String> = (0..engines)
            .map(|pod| self.engine_url(pod, "/metrics"))
            .collect();
        let mut before = Vec::new();
        for url in &metrics {
            before.push(self.engine_counters(url).await);
        }
        let urls: Vec<String> = self.stack.dataplanes.iter().map(|d| d.url("")).collect();
        let run = workload.run(self.http(), &urls).await;
        let mut counted = Vec::new();
        for (url, before) in metrics.iter().zip(&before) {
            counted.push(self.engine_counters(url).await.since(before));
        }
        (run, counted)
    }

    async fn engine_counters(&self, metrics_url: &str) -> EngineCounters {
        EngineCounters::read(self.http(), metrics_url)
            .await
            .expect("engine metrics")
    }

    /// Posts a completion through dataplane `dataplane`; returns (status, pod that answered, body).
    pub async fn complete(
        &self,
        dataplane: usize,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, String, Value) {
        let response = self
            .http()
            .post_json(
                &self.stack.dataplanes[dataplane].url("/v1/completions"),
                headers,
                &body.to_string(),
            )
            .await
            .expect("dataplane answers");
        let pod = response.header("x-mock-pod").unwrap_or_default().to_owned();
        let value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        (response.status, pod, value)
    }

    /// A JSON document from dataplane `dataplane`'s debug port.
    pub async fn debug(&self, dataplane: usize, path: &str) -> Value {
        let url = format!("http://{}{path}", self.stack.dataplanes[dataplane].debug);
        self.http().get(&url).await.expect("debug port").json()
    }

    /// Waits until dataplane `dataplane`'s view of the pods (from
    /// `/debug/router/state`, by pod name) satisfies `check`.
    pub async fn wait_state(
        &self,
        dataplane: usize,
        what: &str,
        check: impl Fn(&BTreeMap<String, Value>) -> bool,
    ) {
        wait_for(what, || async {
            let state = self.debug(dataplane, "/debug/router/state").await;
            let pods: BTreeMap<String, Value> = state["pods"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|pod| {
                    let key = pod["pod"].as_str().unwrap_or_default();
                    (key.trim_start_matches("default/").to_owned(), pod.clone())
                })
                .collect();
            check(&pods).then_some(())
        })
        .await;
    }

    /// Sum over label sets of the engine's own counter or gauge `name`.
    pub async fn engine_counter(&self, pod: usize, name: &str) -> f64 {
        let text = self
            .http()
            .get(&self.engine_url(pod, "/metrics"))
            .await
            .expect("engine metrics")
            .text();
        text.lines()
            .filter(|line| line.starts_with(name) && !line.starts_with('#'))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// (prefix-cache hits, prefix-cache queries) summed over every engine, in
    /// tokens, as the engines themselves count them.
    pub async fn prefix_cache_totals(&self) -> (f64, f64) {
        let mut totals = (0.0, 0.0);
        for pod in 0..self.engines.len() {
            totals.0 += self.engine_counter(pod, "vllm:prefix_cache_hits").await;
            totals.1 += self.engine_counter(pod, "vllm:prefix_cache_queries").await;
        }
        totals
    }
}

/// `count` one-token words starting with `topic` (the simulator's tokenizer
/// counts one token per word), so prompts share exactly the prefix intended.
pub fn words(topic: &str, count: usize) -> String {
    (0..count)
        .map(|i| format!("{topic}{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// How many requests each pod answered.
pub fn counts(pods: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for pod in pods {
        *counts.entry(pod.clone()).or_insert(0) += 1;
    }
    counts
}
