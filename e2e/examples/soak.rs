//! Soak test (`make soak`; not part of `make test`): 200,000 mixed requests
//! through one dataplane (release build) to two mock engines — chat, streams
//! read to the end, streams abandoned after their first chunk, router errors,
//! engine errors, `/v1/models` — 32 at a time. Every 20,000 requests it
//! prints the dataplane's RSS, open descriptors, metric series and in-flight
//! counts; at the end it asserts that none of them grew past warm-up.
//!
//! Tunables (environment): `SOAK_REQUESTS` (200000), `SOAK_CONCURRENCY` (32).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use parking_lot::Mutex;
use switchyard_e2e::harness::{
    ENGINE_PORT, HttpClient, Stack, TestPod, model_server_yaml, simple_route_yaml, yaml_documents,
};
use switchyard_e2e::hostile::{fd_census, rss_kib};
use switchyard_runtime::clock;

/// Requests between two reports.
const REPORT_EVERY: u64 = 20_000;

/// RSS growth allowed after the first report (warm-up: pools, caches,
/// every label combination seen once).
const RSS_GROWTH_KIB: u64 = 32 * 1024;

/// The mock engines the requests are spread over.
const PODS: usize = 2;

/// Series the mix may add after the first report, each for a reason, so
/// any other new series is growth. Engine errors (one request in ten is
/// answered 500) tip a pod's ejection when five land on it in a row (the
/// dataplane's default consecutive-failure threshold): that happens at
/// random, not necessarily in the first 20,000 requests (one run saw it at
/// 140,000), and adds the ejection counter's one series.
const LATE_SERIES: &[&str] =
    &[r#"kthena_router_pod_ejections_total{model_server="default/mock",reason="5xx"}"#];

/// A series by what it counts: `kthena_router_snapshot_info` is one series
/// whose labels name the snapshot versions held, and those change with
/// every load scrape the controller pushes.
fn identity(series: &str) -> &str {
    const SNAPSHOT_INFO: &str = "kthena_router_snapshot_info";
    if series.starts_with(SNAPSHOT_INFO) {
        SNAPSHOT_INFO
    } else {
        series
    }
}

/// What the dataplane's descriptors are bounded by, from the run's
/// configuration. Connections follow load, not time: each kind has a
/// ceiling the run can reach at any point; every other descriptor (runtime
/// eventfds and epolls, listeners, the controller stream, log files) must
/// not grow at all after the first report.
struct FdBounds {
    /// Connections accepted on the traffic port: one in use per client
    /// task, and at most `concurrency` idle in the client's pool
    /// ([`HttpClient::with_max_idle`]).
    clients: usize,
    /// Connections to the engines: each is in use by a request or idle in
    /// one traffic worker's pool for one pod, and a worker's pool for a pod
    /// never holds more than that worker ever had requests to that pod at
    /// once, at most the client concurrency.
    engines: usize,
}

impl FdBounds {
    fn new(concurrency: usize, workers: usize) -> Self {
        Self {
            clients: 2 * concurrency,
            engines: workers * PODS * concurrency,
        }
    }
}

const CLIENT_CONNECTIONS: &str = "tcp accepted on traffic port";
const ENGINE_CONNECTIONS: &str = "tcp connected to engines";
/// A connection to an engine in its first instant: created, not yet
/// connecting, so not yet in the kernel's TCP table (the dataplane opens
/// no other sockets while it serves).
const OPENING: &str = "socket not yet connected";

/// Descriptors of the kinds starting with `prefix`.
fn fds_of(sample: &Sample, prefix: &str) -> usize {
    sample
        .fds_by_kind
        .iter()
        .filter(|(kind, _)| kind.starts_with(prefix))
        .map(|(_, count)| count)
        .sum()
}

/// Why `sample`'s descriptors break `bounds` (or grew past `warm`'s).
fn fd_violations(sample: &Sample, warm: &Sample, bounds: &FdBounds) -> Vec<String> {
    let mut violations = Vec::new();
    let clients = fds_of(sample, CLIENT_CONNECTIONS);
    if clients > bounds.clients {
        violations.push(format!(
            "{clients} client connections after {} requests (bound {})",
            sample.done, bounds.clients
        ));
    }
    let engines = fds_of(sample, ENGINE_CONNECTIONS) + fds_of(sample, OPENING);
    if engines > bounds.engines {
        violations.push(format!(
            "{engines} engine connections after {} requests (bound {})",
            sample.done, bounds.engines
        ));
    }
    for (kind, count) in &sample.fds_by_kind {
        let warm_count = warm.fds_by_kind.get(kind).copied().unwrap_or_default();
        let follows_load = [CLIENT_CONNECTIONS, ENGINE_CONNECTIONS, OPENING]
            .iter()
            .any(|prefix| kind.starts_with(prefix));
        if !follows_load && *count > warm_count {
            violations.push(format!(
                "{kind}: {warm_count} -> {count} after {} requests",
                sample.done
            ));
        }
    }
    violations
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

const CHAT: &str =
    r#"{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":8}"#;
const STREAM: &str = r#"{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":8,"stream":true}"#;

/// One request of the mix, by its number; returns its status.
async fn one(stack: &Stack, http: &HttpClient, n: u64) -> u16 {
    let url = |path: &str| stack.dataplanes[0].url(path);
    let status = match n % 10 {
        0..=3 => http
            .post_json(&url("/v1/chat/completions"), &[], CHAT)
            .await
            .map(|r| r.status),
        4 | 5 => match http
            .post_json_streaming(&url("/v1/chat/completions"), &[], STREAM)
            .await
        {
            Ok(response) => {
                let status = response.status();
                let _ = response.into_body().collect().await;
                Ok(status)
            }
            Err(error) => Err(error.to_string()),
        },
        6 => match http
            .post_json_streaming(&url("/v1/chat/completions"), &[], STREAM)
            .await
        {
            // Abandoned after the first chunk: the client goes away mid-stream.
            Ok(response) => {
                let status = response.status();
                let mut body = response.into_body();
                let _ = body.frame().await;
                Ok(status)
            }
            Err(error) => Err(error.to_string()),
        },
        7 if n % 20 == 7 => http
            .post_json(&url("/v1/chat/completions"), &[], r#"{"model":"nope"}"#)
            .await
            .map(|r| r.status),
        7 => http
            .post_json(&url("/v1/chat/completions"), &[], r#"{"model":"m""#)
            .await
            .map(|r| r.status),
        8 => http
            .post_json(
                &url("/v1/chat/completions"),
                &[("x-mock-status", "500")],
                CHAT,
            )
            .await
            .map(|r| r.status),
        _ => http.get(&url("/v1/models")).await.map(|r| r.status),
    };
    status.map_or(0, |status| status.as_u16())
}

/// The statuses each kind of request must get.
fn expected(n: u64) -> u16 {
    match n % 10 {
        0..=6 | 9 => 200,
        7 if n % 20 == 7 => 404,
        7 => 400,
        _ => 500,
    }
}

struct Sample {
    done: u64,
    rss_kib: u64,
    fds: usize,
    /// Descriptors by kind (see [`fd_census`]), to name what grew.
    fds_by_kind: BTreeMap<String, usize>,
    /// Every series on `/metrics` (name and labels).
    series: BTreeSet<String>,
    in_flight: f64,
}

async fn sample(stack: &Stack, pid: u32, done: u64) -> Sample {
    let metrics_url = format!("http://{}/metrics", stack.dataplanes[0].metrics);
    let page = stack
        .http
        .get(&metrics_url)
        .await
        .map(|r| r.text())
        .unwrap_or_default();
    let series = page
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.rsplit_once(' ').map(|(series, _)| series.to_owned()))
        .collect();
    let in_flight = page
        .lines()
        .filter(|line| {
            line.starts_with("kthena_router_active_downstream_requests")
                || line.starts_with("kthena_router_active_upstream_requests")
                || line.starts_with("kthena_router_pod_active_requests")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let dataplane = &stack.dataplanes[0];
    let fds_by_kind = fd_census(
        pid,
        &[
            (dataplane.traffic.port(), "traffic port"),
            (dataplane.metrics.port(), "metrics port"),
            (dataplane.debug.port(), "debug port"),
            (ENGINE_PORT, "engines"),
            (stack.xds_addr.port(), "controller"),
        ],
    );
    Sample {
        done,
        rss_kib: rss_kib(pid),
        fds: fds_by_kind.values().sum(),
        fds_by_kind,
        series,
        in_flight,
    }
}

/// What changed between two samples: descriptor kinds whose count changed,
/// series that appeared or went.
fn changes(from: &Sample, to: &Sample) -> Vec<String> {
    let kinds: BTreeSet<&String> = from
        .fds_by_kind
        .keys()
        .chain(to.fds_by_kind.keys())
        .collect();
    let mut changes: Vec<String> = kinds
        .into_iter()
        .filter_map(|kind| {
            let before = from.fds_by_kind.get(kind).copied().unwrap_or_default();
            let after = to.fds_by_kind.get(kind).copied().unwrap_or_default();
            (before != after).then(|| format!("fds {kind}: {before} -> {after}"))
        })
        .collect();
    changes.extend(
        to.series
            .difference(&from.series)
            .map(|series| format!("new series {series}")),
    );
    changes.extend(
        from.series
            .difference(&to.series)
            .map(|series| format!("gone series {series}")),
    );
    changes
}

fn print(sample: &Sample, elapsed: Duration) {
    println!(
        "| {:>7} | {:>8.1} | {:>8.1} MiB | {:>4} | {:>6} | {:>9} |",
        sample.done,
        elapsed.as_secs_f64(),
        sample.rss_kib as f64 / 1024.0,
        sample.fds,
        sample.series.len(),
        sample.in_flight
    );
}

#[tokio::main]
async fn main() {
    let requests = env("SOAK_REQUESTS", 200_000);
    let concurrency = env("SOAK_CONCURRENCY", 32);
    let objects = yaml_documents(&[
        model_server_yaml("mock", ""),
        simple_route_yaml("m", "m", "mock"),
    ]);
    let mut stack = Stack::new(&[("objects.yaml", objects)]);
    stack
        .start_pods(&[
            TestPod::serving("mock-0", 11, "mock", "m", &[]),
            TestPod::serving("mock-1", 12, "mock", "m", &[]),
        ])
        .await;
    stack.start_controller().await;
    // The workers are named so the descriptor bounds can use their number.
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    // Its access log (stdout) goes to a file, as a pod's would be collected.
    let index = stack.spawn_dataplane_with(&["--workers", &workers.to_string()]);
    stack.wait_dataplane_ready(index).await;
    let pid = stack.dataplanes[0].process.pid().expect("dataplane runs");
    let stack = Arc::new(stack);
    let _logs = stack.logs_on_failure();

    let http = Arc::new(HttpClient::with_max_idle(concurrency as usize));
    let bounds = FdBounds::new(concurrency as usize, workers);
    // The binaries run are those of the example's own profile.
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "Soak: {requests} requests, {concurrency} at a time, one dataplane ({profile} build, {workers} workers), {PODS} mock engines"
    );
    println!(
        "Bounds: RSS +{} MiB after the first report; client connections <= {}, engine connections <= {}, other descriptors no growth; series: none new but {LATE_SERIES:?}",
        RSS_GROWTH_KIB / 1024,
        bounds.clients,
        bounds.engines
    );
    println!("| requests | seconds | dataplane RSS | fds | metric series | in flight |");
    println!("|---|---|---|---|---|---|");
    let started = clock::now();
    let first = sample(&stack, pid, 0).await;
    print(&first, Duration::ZERO);
    let next = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let wrong: Arc<Mutex<Vec<(u64, u16)>>> = Arc::default();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (stack, http, next, finished, wrong, samples) = (
            stack.clone(),
            http.clone(),
            next.clone(),
            finished.clone(),
            wrong.clone(),
            samples.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= requests {
                    return;
                }
                let status = one(&stack, &http, n).await;
                if status != expected(n) {
                    wrong.lock().push((n, status));
                }
                let done = finished.fetch_add(1, Ordering::Relaxed) + 1;
                if done % REPORT_EVERY == 0 {
                    let sample = sample(&stack, pid, done).await;
                    print(&sample, started.elapsed());
                    samples.lock().push(sample);
                }
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    let elapsed = started.elapsed();
    // In-flight gauges drain once the last abandoned stream is noticed.
    let mut last = sample(&stack, pid, requests).await;
    let deadline = clock::now() + Duration::from_secs(30);
    while last.in_flight != 0.0 && clock::now() < deadline {
        clock::sleep(Duration::from_millis(200)).await;
        last = sample(&stack, pid, requests).await;
    }
    print(&last, started.elapsed());
    println!(
        "{requests} requests in {:.1} s ({:.0} req/s)",
        elapsed.as_secs_f64(),
        requests as f64 / elapsed.as_secs_f64()
    );
    let wrong = wrong.lock().clone();
    let mut samples = samples.lock();
    samples.sort_by_key(|sample| sample.done);
    let warm = samples.first().unwrap_or(&last);
    for (from, to) in samples.iter().zip(samples.iter().skip(1).chain([&last])) {
        for change in changes(from, to) {
            println!("  {} -> {}: {change}", from.done, to.done);
        }
    }
    let mut failures = Vec::new();
    if !wrong.is_empty() {
        failures.push(format!(
            "{} requests got an unexpected status, first: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        ));
    }
    if last.in_flight != 0.0 {
        failures.push(format!(
            "{} requests still counted in flight",
            last.in_flight
        ));
    }
    let peak_rss = samples
        .iter()
        .map(|s| s.rss_kib)
        .max()
        .unwrap_or(last.rss_kib);
    if peak_rss > warm.rss_kib + RSS_GROWTH_KIB {
        failures.push(format!(
            "RSS grew from {} KiB (after {}) to {peak_rss} KiB",
            warm.rss_kib, warm.done
        ));
    }
    for sample in samples.iter().chain([&last]) {
        failures.extend(fd_violations(sample, warm, &bounds));
    }
    let warm_series: BTreeSet<&str> = warm.series.iter().map(|s| identity(s)).collect();
    let new_series: Vec<&str> = last
        .series
        .iter()
        .map(|s| identity(s))
        .filter(|series| !warm_series.contains(series) && !LATE_SERIES.contains(series))
        .collect();
    if !new_series.is_empty() {
        failures.push(format!("new metric series: {new_series:?}"));
    }
    if failures.is_empty() {
        println!(
            "soak: passed (RSS {:.1} -> {:.1} MiB after warm-up, fds {} -> {}, series {} -> {}, 0 in flight)",
            warm.rss_kib as f64 / 1024.0,
            last.rss_kib as f64 / 1024.0,
            warm.fds,
            last.fds,
            warm.series.len(),
            last.series.len()
        );
    } else {
        for failure in &failures {
            println!("soak: FAILED: {failure}");
        }
        std::process::exit(1);
    }
}
