//! Scheduling quality benchmark (`make bench-quality`; not part of `make test`).
//!
//! Two workloads against simulated engines, for several scheduler
//! configurations, with one and with three dataplanes behind a round-robin
//! client, each run on freshly started engines; Markdown tables.
//!
//! 1. Shared prefixes under open load: groups of requests sharing a long
//!    system prompt, Poisson arrivals, seeded, on 4 engines with room for
//!    every prompt. Client-measured TTFT p50/p90/p99, throughput and the
//!    prefix-cache hit rate the engines measured. Tunables (environment):
//!    `BENCH_ENGINES` (4), `BENCH_REQUESTS` (240), `BENCH_RATE` (requests/s,
//!    16), `BENCH_GROUPS` (16), `BENCH_SEED` (1).
//! 2. A cache-bound workload ([`PrefixWorkload::two_engines`]) on two engines
//!    shaped like the real-engine setup of `make e2e-vllm-quality`: their
//!    caches together hold every prompt once, one alone does not. Hit rate,
//!    requests per engine, latency, errors. `BENCH_SEEDS` (1) runs it for
//!    seeds 1..=N (different prompts, so different rendezvous homes).
//!
//! `BENCH_WORKLOAD=open` or `=cache-bound` runs only that one;
//! `BENCH_CONFIG` (a router configuration's text) runs only that
//! configuration, as strategy "custom".

use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use switchyard_e2e::prefix_workload::{self, PrefixWorkload, QualityRow};
use switchyard_e2e::sim_stack::{SIM_MODEL, SimStack, SimStackOptions, words};
use switchyard_runtime::clock;

/// Slower than the tests' interval: the benchmark measures routing, and a
/// 500 ms scrape is still several samples per strategy run.
const SCRAPE_INTERVAL: &str = "500ms";

/// The strategies compared, as router configuration files.
const STRATEGIES: [(&str, &str); 4] = [
    (
        "random",
        "scheduler:\n  plugins:\n    Filter: {enabled: []}\n    Score: {enabled: [{name: random}]}\n",
    ),
    // Every pod scores 0: ties rotate, which is round-robin.
    (
        "round-robin",
        "scheduler:\n  plugins:\n    Filter: {enabled: []}\n    Score: {enabled: [{name: least-request, weight: 0}]}\n",
    ),
    (
        "least-request",
        "scheduler:\n  plugins:\n    Filter: {enabled: [least-request]}\n    Score: {enabled: [{name: least-request}]}\n",
    ),
    ("default mix", "auth: {}\n"),
];

/// `compared`, or only `custom` (a router configuration) when given.
fn strategies<'a>(
    compared: &[(&'a str, &'a str)],
    custom: Option<&'a str>,
) -> Vec<(&'a str, &'a str)> {
    match custom {
        Some(config) => vec![("custom", config)],
        None => compared.to_vec(),
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Engines as a mid-size GPU might behave: prefill dominates uncached prompts.
fn engine_args() -> Vec<String> {
    [
        "--mode",
        "sim",
        "--max-num-seqs",
        "8",
        "--kv-blocks",
        "512",
        "--block-size",
        "16",
        "--prefill-ms-per-token",
        "0.3",
        "--itl-ms",
        "10",
        "--itl-ms-per-seq",
        "0.5",
        "--output-tokens",
        "1000",
        "--seed",
        "7",
    ]
    .map(String::from)
    .to_vec()
}

struct Outcome {
    ttft: Vec<Duration>,
    elapsed: Duration,
    completed: usize,
    hit_rate: f64,
}

/// A simulated stack of `engines` engines, each started with `engine_args`.
async fn start_sim(
    engines: usize,
    engine_args: fn() -> Vec<String>,
    router_config: &str,
    dataplanes: usize,
) -> SimStack {
    SimStack::start(SimStackOptions {
        engines,
        engine_args: &|_| engine_args(),
        router_config,
        lora_adapters: &[],
        dataplanes,
        scrape_interval: SCRAPE_INTERVAL,
    })
    .await
}

async fn run(router_config: &str, dataplanes: usize) -> Outcome {
    let engines = env("BENCH_ENGINES", 4);
    let requests = env("BENCH_REQUESTS", 240);
    let rate = env("BENCH_RATE", 16) as f64;
    let groups = env("BENCH_GROUPS", 16);
    let seed = env("BENCH_SEED", 1) as u64;

    let sim = start_sim(engines, engine_args, router_config, dataplanes).await;
    let (hits_before, queries_before) = sim.prefix_cache_totals().await;

    let mut rng = StdRng::seed_from_u64(seed);
    let systems: Vec<String> = (0..groups).map(|g| words(&format!("s{g}w"), 600)).collect();
    let started = clock::now();
    let mut at = Duration::ZERO;
    let mut tasks = Vec::with_capacity(requests);
    for i in 0..requests {
        // Poisson arrivals: exponential gaps.
        let gap = -(1.0 - rng.random::<f64>()).ln() / rate;
        at += Duration::from_secs_f64(gap);
        let group = rng.random_range(0..groups);
        let body = json!({
            "model": SIM_MODEL,
            "prompt": format!("{} {}", systems[group], words(&format!("q{i}x"), 20)),
            "max_tokens": 32,
            "stream": true,
        })
        .to_string();
        let url = sim.stack.dataplanes[i % dataplanes].url("/v1/completions");
        let http = sim.http().clone();
        tasks.push(tokio::spawn(async move {
            clock::sleep_until(started + at).await;
            let sent = clock::now();
            let response = http.post_json_streaming(&url, &[], &body).await.ok()?;
            if response.status() != StatusCode::OK {
                return None;
            }
            let mut body = response.into_body();
            let mut ttft = None;
            while let Some(frame) = body.frame().await {
                let frame = frame.ok()?;
                if ttft.is_none() && frame.data_ref().is_some_and(|d| !d.is_empty()) {
                    ttft = Some(sent.elapsed());
                }
            }
            ttft
        }));
    }
    let mut ttft = Vec::new();
    for task in tasks {
        if let Ok(Some(t)) = task.await {
            ttft.push(t);
        }
    }
    let elapsed = started.elapsed();
    let (hits, queries) = sim.prefix_cache_totals().await;
    ttft.sort();
    Outcome {
        completed: ttft.len(),
        ttft,
        elapsed,
        hit_rate: (hits - hits_before) / (queries - queries_before).max(1.0),
    }
}

/// Engines like the real-engine setup's vLLM: 8 sequences, 128 KV blocks of 32
/// tokens, and the tiny CPU model's speed (about 0.1 ms per prefilled token,
/// 3 ms + 0.5 ms per sequence per decode step).
fn two_engine_args() -> Vec<String> {
    "--mode sim --max-num-seqs 8 --kv-blocks 128 --block-size 32 --prefill-ms-per-token 0.1 --itl-ms 3 --itl-ms-per-seq 0.5 --seed 7"
        .split(' ')
        .map(String::from)
        .collect()
}

/// The cache-bound workload with `seed` on two fresh engines.
async fn run_two_engines(
    strategy: &str,
    router_config: &str,
    dataplanes: usize,
    seed: u64,
) -> QualityRow {
    let sim = start_sim(2, two_engine_args, router_config, dataplanes).await;
    let workload = PrefixWorkload {
        seed,
        ..PrefixWorkload::two_engines(SIM_MODEL)
    };
    let (run, engines) = sim.run_workload(&workload, 2).await;
    QualityRow {
        strategy: strategy.to_owned(),
        dataplanes,
        engines,
        run,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

/// Run with `make bench-quality` (after `cargo build --workspace --bins`).
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let only = std::env::var("BENCH_WORKLOAD").unwrap_or_default();
    if only != "cache-bound" {
        open_load_table().await;
    }
    if only != "open" {
        cache_bound_table().await;
    }
}

async fn open_load_table() {
    let mut table = String::from(
        "| strategy | dataplanes | TTFT p50 (ms) | TTFT p90 (ms) | TTFT p99 (ms) | throughput (req/s) | prefix hit rate |\n|---|---|---|---|---|---|---|\n",
    );
    let custom = std::env::var("BENCH_CONFIG").ok();
    for (name, config) in strategies(&STRATEGIES, custom.as_deref()) {
        for dataplanes in [1, 3] {
            let outcome = run(config, dataplanes).await;
            let row = format!(
                "| {name} | {dataplanes} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1}% |\n",
                percentile(&outcome.ttft, 0.5),
                percentile(&outcome.ttft, 0.9),
                percentile(&outcome.ttft, 0.99),
                outcome.completed as f64 / outcome.elapsed.as_secs_f64(),
                outcome.hit_rate * 100.0,
            );
            eprint!("{row}");
            table.push_str(&row);
        }
    }
    println!("\n{table}");
}

async fn cache_bound_table() {
    let seeds = env("BENCH_SEEDS", 1) as u64;
    let mut table = String::from(prefix_workload::QualityRow::HEADER);
    for seed in 1..=seeds {
        let custom = std::env::var("BENCH_CONFIG").ok();
        for (name, config) in strategies(&prefix_workload::STRATEGIES, custom.as_deref()) {
            for dataplanes in [1, 3] {
                let strategy = if seeds > 1 {
                    format!("{name} (seed {seed})")
                } else {
                    name.to_owned()
                };
                let row = run_two_engines(&strategy, config, dataplanes, seed)
                    .await
                    .markdown();
                eprint!("{row}");
                table.push_str(&row);
            }
        }
    }
    println!("\n{table}");
}
