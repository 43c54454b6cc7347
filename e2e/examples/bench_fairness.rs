//! Fairness benchmark (`make bench-fairness`; not part of `make test`).
//!
//! Two users share mock engines kept at capacity: `heavy` runs ten times as
//! many closed loops as `light`. The same admission gate (each pod takes
//! `maxConcurrent` requests) orders its queue first-come-first-served (no
//! user header: every request is the one anonymous user) or by Virtual
//! Token Counter per user, with one dataplane and with three. With three
//! the spread is skewed: four fifths of the heavy user's loops go through
//! dataplanes 1 and 2, the rest and all of the light user's through
//! dataplane 3, where the heavy user looks light by that dataplane's own
//! counters; VTC runs with per-dataplane counters (`globalCounters: false`)
//! and with the fleet-wide ones. Reports each user's share of the requests
//! served, client-measured TTFT p50/p90 and Jain's fairness index of the
//! users' throughput, as a Markdown table.
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

/// How the queue orders waiting requests.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    Fifo,
    /// VTC on each dataplane's own counters.
    LocalVtc,
    /// VTC on the fleet-wide counters.
    FleetVtc,
}

impl Order {
    fn label(self, dataplanes: usize) -> &'static str {
        match self {
            Self::Fifo => "FIFO",
            Self::FleetVtc if dataplanes == 1 => "VTC",
            Self::LocalVtc => "VTC, per-dataplane counters",
            Self::FleetVtc => "VTC, fleet-wide counters",
        }
    }

    fn router_config(self) -> String {
        let users = match self {
            Self::Fifo => "",
            Self::LocalVtc => "  userHeader: x-user-id\n  globalCounters: false\n",
            Self::FleetVtc => "  userHeader: x-user-id\n",
        };
        format!("fairness:\n  maxConcurrent: {PER_POD}\n  queueTimeout: 120s\n{users}")
    }
}

/// The dataplane loop `index` of `user` goes through: with three, the
/// light user and every fifth heavy loop share the last one, the other
/// heavy loops alternate over the first two.
fn dataplane_of(dataplanes: usize, user: &str, index: usize) -> usize {
    match (dataplanes, user) {
        (1, _) => 0,
        (_, "light") => dataplanes - 1,
        _ if index % 5 == 4 => dataplanes - 1,
        _ => index % 2,
    }
}

/// Time to first token of each request a user completed.
#[derive(Default)]
struct UserRun {
    ttft_ms: Vec<f64>,
}

async fn closed_loop(sim: &SimStack, user: &str, index: usize, stop: &AtomicBool) -> UserRun {
    let body =
        serde_json::json!({"model": SIM_MODEL, "prompt": "fair share", "stream": true}).to_string();
    let dataplane = dataplane_of(sim.stack.dataplanes.len(), user, index);
    let url = sim.stack.dataplanes[dataplane].url("/v1/completions");
    let mut run = UserRun::default();
    while !stop.load(Ordering::Relaxed) {
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
    let runs = [
        (1, Order::Fifo),
        (1, Order::FleetVtc),
        (3, Order::Fifo),
        (3, Order::LocalVtc),
        (3, Order::FleetVtc),
    ];
    for (dataplanes, order) in runs {
        let config = order.router_config();
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
        let queue = order.label(dataplanes);
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
