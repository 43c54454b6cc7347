//! `switchyard-bench-hotpath`: nanoseconds per operation of the request hot
//! path at library level (no network): body parsing (1 KB and 400 KB),
//! route lookup + pod pick with 1000 candidate pods among 5000, and response
//! observing (SSE chunks, JSON bodies). Guides optimisations; `make bench`
//! prints it after the end-to-end table.
#![forbid(unsafe_code)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use switchyard_bench::{STREAM_CHUNK, chat_body, snapshot};
use switchyard_dataplane::request::parse_body;
use switchyard_dataplane::response::ResponseObserver;
use switchyard_dataplane::routing::{ArrivalFacts, RequestFacts};
use switchyard_dataplane::scheduling::ScheduleRequest;
use switchyard_dataplane::snapshot::RoutingTable;
use switchyard_runtime::clock::{self, unix_ms_now};
use switchyard_snapshot::pb;

/// Each measurement runs at least this long, so clock resolution does not matter.
const MIN_RUN: Duration = Duration::from_millis(300);

fn ns_per_op(mut op: impl FnMut()) -> f64 {
    for _ in 0..8 {
        op();
    }
    let mut iterations = 0u64;
    let started = clock::now();
    while started.elapsed() < MIN_RUN {
        for _ in 0..16 {
            op();
        }
        iterations += 16;
    }
    started.elapsed().as_nanos() as f64 / iterations as f64
}

fn table(candidates: usize) -> Option<RoutingTable> {
    RoutingTable::standalone("v1", snapshot(candidates, false)).ok()
}

fn main() {
    // `switchyard-bench-hotpath pick` runs only the operations whose name
    // contains "pick" (to profile one of them, e.g. under callgrind).
    let filter = std::env::args().nth(1).unwrap_or_default();
    let wanted = |name: &str| name.contains(filter.as_str());
    let small = chat_body(800, false);
    let large = chat_body(400 * 1024, false);
    let headers = HeaderMap::new();
    println!("Hot path at library level (one core, release build):\n");
    println!("| Operation | ns/op | throughput |");
    println!("|---|---|---|");
    if wanted("parse_body") {
        parse(&small, &large);
    }
    for candidates in [10, 1000] {
        if wanted(&format!("pick among {candidates}")) {
            pick(candidates, &headers, &small);
        }
    }
    if wanted("observed") {
        observe();
    }
}

fn parse(small: &Bytes, large: &Bytes) {
    let parse_small = ns_per_op(|| {
        black_box(parse_body(black_box(small)).map(|p| p.model.len()).ok());
    });
    println!(
        "| parse_body, {} B chat | {parse_small:.0} | {:.0} MB/s |",
        small.len(),
        small.len() as f64 / parse_small * 1e3
    );
    let parse_large = ns_per_op(|| {
        black_box(parse_body(black_box(large)).map(|p| p.model.len()).ok());
    });
    println!(
        "| parse_body, {} KB prompt | {parse_large:.0} | {:.0} MB/s |",
        large.len() / 1024,
        large.len() as f64 / parse_large * 1e3
    );
}

/// Route lookup and a pick for a ~1 KB chat request, its prompt hashed as
/// the proxy does (the prefix-cache scorer reads the hashes).
fn pick(candidates: usize, headers: &HeaderMap, body: &Bytes) {
    let Some(table) = table(candidates) else {
        eprintln!("the bench snapshot was rejected");
        return;
    };
    let Ok(parsed) = parse_body(body) else {
        eprintln!("the bench body does not parse");
        return;
    };
    let prompt_hashes =
        table
            .scheduler
            .prompt_hashes(&parsed.model, body, parsed.prompt_span.as_ref());
    let lookup = || {
        table.index.lookup(&RequestFacts {
            model: "bench-model",
            path: "/v1/chat/completions",
            headers,
            arrival: ArrivalFacts::default(),
        })
    };
    let pick_once = |record: bool| {
        if let Some(decision) = lookup() {
            let ranking = table.scheduler.schedule(
                &decision.server,
                &ScheduleRequest {
                    model: "bench-model",
                    served_model: "bench-model",
                    headers,
                    prompt_hashes: &prompt_hashes,
                    request_id: "bench",
                },
            );
            let pod = ranking
                .ok()
                .and_then(|ranking| ranking.get(0))
                .map(|index| &decision.server.pods[index]);
            if record && let Some(pod) = pod {
                table.scheduler.on_dispatched(pod.id, &prompt_hashes);
            }
            black_box(pod.map(|pod| pod.begin_request()));
        }
    };
    let pick = ns_per_op(|| pick_once(false));
    println!(
        "| route lookup + pick among {candidates} candidate pods (+4000 others) | {pick:.0} | |"
    );
    // As in `make bench`, where every request carries the same prompt: the
    // prefix index knows the pods that hold it, and the prefix-cache scorer
    // finds them among the candidates.
    let seen = ns_per_op(|| pick_once(true));
    println!("| the same, the prompt sent (and recorded) before | {seen:.0} | |");
    // As in `make bench`, where the controller scrapes every fake engine:
    // each candidate's engine load is read and scored.
    if let Some(decision) = lookup() {
        for pod in &decision.server.pods {
            pod.set_load(Some(Arc::new(pb::EndpointLoad {
                requests_running: 1.0,
                kv_cache_usage: 0.1,
                kv_cache_capacity_tokens: 100_000,
                // Fresh for the whole run (a few seconds).
                observed_at_unix_ms: unix_ms_now(),
                ..Default::default()
            })));
        }
    }
    let loaded = ns_per_op(|| pick_once(true));
    println!("| the same, every pod reporting an engine load | {loaded:.0} | |");
}

fn observe() {
    let chunk = Bytes::from_static(STREAM_CHUNK.as_bytes());
    let mut observer = ResponseObserver::new(true, true);
    let sse = ns_per_op(|| {
        black_box(observer.on_data(chunk.clone()));
    });
    println!("| SSE chunk observed ({} B) | {sse:.0} | |", chunk.len());
    let json = Bytes::from_static(br#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox."},"finish_reason":"stop"}],"usage":{"prompt_tokens":250,"completion_tokens":12,"total_tokens":262}}"#);
    let json_ns = ns_per_op(|| {
        let mut observer = ResponseObserver::new(false, false);
        black_box(observer.on_data(json.clone()));
        black_box(observer.finish());
        black_box(observer.usage());
    });
    println!(
        "| JSON response observed ({} B) | {json_ns:.0} | |",
        json.len()
    );
}
