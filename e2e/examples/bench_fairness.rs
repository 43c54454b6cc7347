//! Fairness benchmark (`make bench-fairness`; not part of `make test`).
//!
//! Two users share mock engines kept at capacity: `heavy` runs ten times as
//! many closed loops as `light`. The same admission gate (each pod takes
//! `maxConcurrent` requests) orders its queue first-come-first-served (no
//! user header: every request is the one anonymous user) or by Virtual
//! Token Counter per user, with one and with three dataplanes behind a
//! round-robin client. Reports each user's share of the requests served,
//! client-measured TTFT p50/p90 and Jain's fairness index of the users'
//! throughput, as a Markdown table.
//!
//! Tunables (environment): `BENCH_SECONDS` (per run, 12), `BENCH_LIGHT_LOOPS` (4: more than its fair share, so both users stay backlogged).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use switchyard_e2e::sim_stack::{SIM_MODEL, SimStack, SimStackOptions};
use switchyard_runtime::clock;

const ENGINES: usize = 2;
const PER_POD: usize = 2;
const TTFT_MS: &str = "200";
const ITL_MS: &str = "20";
const OUTPUT_TOKENS: &str = "10";
/// Engine load reaches the other dataplanes at this pace.
const SCRAPE_INTERVAL: &str = "200ms";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn router_config(fair: bool) -> String {
    let header = if fair {
        "  userHeader: x-user-id\n"
    } else {
        ""
    };
    format!("fairness:\n  maxConcurrent: {PER_POD}\n  queueTimeout: 120s\n{header}")
}

/// Time to first token of each request a user completed.
#[derive(Default)]
struct UserRun {
    ttft_ms: Vec<f64>,
}

async fn closed_loop(sim: &SimStack, user: &str, index: usize, stop: &AtomicBool) -> UserRun {
    let body =
        serde_json::json!({"model": SIM_MODEL, "prompt": "fair share", "stream": true}).to_string();
    let dataplanes = sim.stack.dataplanes.len();
    let mut run = UserRun::default();
    let mut sent = index;
    while !stop.load(Ordering::Relaxed) {
        let url = sim.stack.dataplanes[sent % dataplanes].url("/v1/completions");
        sent += 1;
        let started = clock::now();
        let response = sim
            .http()
            .post_json_streaming(&url, &[("x-user-id", user)], &body)
            .await
            .expect("dataplane answers");
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut first = None;
        while let Some(frame) = body.frame().await {
            frame.expect("stream");
            first.get_or_insert_with(|| started.elapsed());
        }
        // Requests still running when the run stops are not counted.
        if let (false, Some(first)) = (stop.load(Ordering::Relaxed), first) {
            run.ttft_ms.push(first.as_secs_f64() * 1000.0);
        }
    }
    run
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let index = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[index]
}

/// Jain's index of `throughputs`: 1 = equal, 1/n = one user has it all.
fn jain(throughputs: &[f64]) -> f64 {
    let sum: f64 = throughputs.iter().sum();
    let squares: f64 = throughputs.iter().map(|x| x * x).sum();
    sum * sum / (throughputs.len() as f64 * squares)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds = env("BENCH_SECONDS", 12) as u64;
    let light_loops = env("BENCH_LIGHT_LOOPS", 4);
    let users = [("heavy", 10 * light_loops), ("light", light_loops)];
    println!(
        "{ENGINES} engines x {PER_POD} requests each (TTFT {TTFT_MS} ms, {OUTPUT_TOKENS} tokens at {ITL_MS} ms); heavy: {} closed loops, light: {light_loops}; {seconds} s per run\n",
        users[0].1
    );
    println!(
        "| queue | dataplanes | user | share of requests | TTFT p50 (ms) | TTFT p90 (ms) | Jain's index |"
    );
    println!("|---|---|---|---|---|---|---|");
    for dataplanes in [1, 3] {
        for fair in [false, true] {
            let config = router_config(fair);
            let engine_args = |_: usize| {
                [
                    "--ttft-ms",
                    TTFT_MS,
                    "--itl-ms",
                    ITL_MS,
                    "--output-tokens",
                    OUTPUT_TOKENS,
                ]
                .map(str::to_owned)
                .to_vec()
            };
            let sim = SimStack::start(SimStackOptions {
                engines: ENGINES,
                engine_args: &engine_args,
                router_config: &config,
                lora_adapters: &[],
                dataplanes,
                scrape_interval: SCRAPE_INTERVAL,
            })
            .await;
            let stop = AtomicBool::new(false);
            let runs = futures::future::join_all(users.iter().map(|(user, loops)| {
                let sim = &sim;
                let stop = &stop;
                async move {
                    let loops = (0..*loops).map(|index| closed_loop(sim, user, index, stop));
                    futures::future::join_all(loops).await
                }
            }));
            let timer = async {
                tokio::time::sleep(Duration::from_secs(seconds)).await;
                stop.store(true, Ordering::Relaxed);
            };
            let (runs, ()) = tokio::join!(runs, timer);
            let mut ttfts: Vec<Vec<f64>> = runs
                .into_iter()
                .map(|loops| loops.into_iter().flat_map(|run| run.ttft_ms).collect())
                .collect();
            let served: Vec<f64> = ttfts.iter().map(|ttft| ttft.len() as f64).collect();
            let total: f64 = served.iter().sum();
            let index = jain(&served);
            let queue = if fair { "VTC" } else { "FIFO" };
            for ((user, _), (ttft, served)) in users.iter().zip(ttfts.iter_mut().zip(&served)) {
                println!(
                    "| {queue} | {dataplanes} | {user} | {:.0}% | {:.0} | {:.0} | {index:.2} |",
                    100.0 * served / total.max(1.0),
                    percentile(ttft, 0.5),
                    percentile(ttft, 0.9),
                );
            }
        }
    }
}
