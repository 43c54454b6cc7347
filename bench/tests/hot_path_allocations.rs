//! Regression guard for the request hot path, without timing: counts heap
//! allocations (and bytes) per request through parse -> route -> pick pod ->
//! response observing, at library level (no network), with a counting global
//! allocator. A clear regression (a per-request `String`, a body copy, a JSON
//! tree, an O(pods) allocation) fails it deterministically.
//!
//! Everything runs in one `#[test]` so no other test thread allocates while a
//! region is being measured.

use std::alloc::System;

use bytes::Bytes;
use http::HeaderMap;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use switchyard_bench::{CHAT_RESPONSE, STREAM_CHUNK, STREAM_TAIL, chat_body, snapshot};
use switchyard_dataplane::request::parse_body;
use switchyard_dataplane::response::ResponseObserver;
use switchyard_dataplane::routing::{ArrivalFacts, RequestFacts};
use switchyard_dataplane::scheduling::ScheduleRequest;
use switchyard_dataplane::snapshot::RoutingTable;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Requests per measurement: enough that one-off allocations (lazy statics)
/// vanish in the per-request average.
const REQUESTS: u64 = 2_000;

/// Measured 3.8 allocations (~270 bytes) per request for parse + route +
/// schedule with the default plugin mix (2026-12-06): the decoded `model`
/// string, the prefix-cache plugin's prompt hash vector and the scheduler's
/// per-request ranking (the body is scanned in place, chat messages are read
/// in one pass without a list, the partial hash block is a per-thread buffer). 5 leaves room for one more
/// small allocation; anything above is a regression.
const MAX_ALLOCATIONS_PER_ROUTED_REQUEST: f64 = 5.0;

/// Measured ~1.3 KB per request for the 400 KB body (the prompt hashes are
/// bounded by `maxBlocksToMatch`, nothing scales with the body); a copy of
/// the body or of its prompt, or a JSON tree of it, would cost hundreds of KiB.
const MAX_BYTES_PER_LARGE_REQUEST: f64 = 4096.0;

/// Measured 0 allocations per forwarded SSE chunk when nothing is hidden
/// (frames pass through as the same `Bytes`).
const MAX_ALLOCATIONS_PER_STREAM_CHUNK: f64 = 0.05;

/// Measured 1 per JSON response (serde_json's nesting stack while it skips
/// `choices`; it was 2 before `choices` stopped being collected into a Vec);
/// 2 leaves room, a per-field or per-frame allocation would exceed it.
const MAX_ALLOCATIONS_PER_JSON_RESPONSE: f64 = 2.0;

/// Pods of the routed ModelServer.
const CANDIDATE_PODS: usize = 1000;

fn table() -> RoutingTable {
    RoutingTable::standalone("v1", snapshot(CANDIDATE_PODS, true))
        .expect("the bench snapshot is valid")
}

/// One request's routing work, as the proxy does it before the upstream call.
fn route_one(table: &RoutingTable, body: &Bytes, headers: &HeaderMap) -> usize {
    let parsed = parse_body(body).expect("valid body");
    let decision = table
        .index
        .lookup(&RequestFacts {
            model: &parsed.model,
            path: "/v1/chat/completions",
            headers,
            arrival: ArrivalFacts::default(),
        })
        .expect("routed");
    let prompt_hashes =
        table
            .scheduler
            .prompt_hashes(&parsed.model, body, parsed.prompt_span.as_ref());
    let ranking = table
        .scheduler
        .schedule(
            &decision.server,
            &ScheduleRequest {
                model: &parsed.model,
                served_model: &parsed.model,
                headers,
                prompt_hashes: &prompt_hashes,
                request_id: "bench",
            },
        )
        .expect("ranked");
    let pod = &decision.server.pods[ranking.get(0).expect("a pod")];
    let guard = pod.begin_request();
    let port = guard.pod().addr.port() as usize;
    drop(guard);
    port + parsed.model_span.len()
}

struct PerRequest {
    allocations: f64,
    bytes: f64,
}

fn measure(requests: u64, mut work: impl FnMut()) -> PerRequest {
    // Warm up: lazy statics, thread-locals, first-use caches.
    for _ in 0..16 {
        work();
    }
    let region = Region::new(GLOBAL);
    for _ in 0..requests {
        work();
    }
    let change = region.change();
    PerRequest {
        allocations: (change.allocations + change.reallocations) as f64 / requests as f64,
        bytes: (change.bytes_allocated + change.bytes_reallocated.max(0) as usize) as f64
            / requests as f64,
    }
}

#[test]
fn hot_path_allocations_stay_within_bounds() {
    let table = table();
    let headers = HeaderMap::new();
    let small = chat_body(1000, false);
    let large = chat_body(400 * 1024, false);
    let mut sink = 0usize;

    let routed = measure(REQUESTS, || sink += route_one(&table, &small, &headers));
    eprintln!(
        "~1 KB chat, {CANDIDATE_PODS} candidate pods: {:.2} allocations, {:.0} bytes per request",
        routed.allocations, routed.bytes
    );
    assert!(
        routed.allocations <= MAX_ALLOCATIONS_PER_ROUTED_REQUEST,
        "parse + route + pick allocates {:.2} times per request (bound {MAX_ALLOCATIONS_PER_ROUTED_REQUEST})",
        routed.allocations
    );

    let large_routed = measure(REQUESTS / 40, || {
        sink += route_one(&table, &large, &headers)
    });
    eprintln!(
        "400 KB chat: {:.2} allocations, {:.0} bytes per request",
        large_routed.allocations, large_routed.bytes
    );
    assert!(
        large_routed.bytes <= MAX_BYTES_PER_LARGE_REQUEST,
        "a 400 KB request allocates {:.0} bytes (bound {MAX_BYTES_PER_LARGE_REQUEST}): the body is copied or parsed into a tree",
        large_routed.bytes
    );

    let chunk = Bytes::from_static(STREAM_CHUNK.as_bytes());
    let tail = Bytes::from_static(STREAM_TAIL.as_bytes());
    let mut observer = ResponseObserver::new(true, false);
    let chunks = 64 * REQUESTS;
    let streamed = measure(chunks, || {
        sink += observer.on_data(chunk.clone()).map_or(0, |b| b.len());
    });
    sink += observer.on_data(tail.clone()).map_or(0, |b| b.len());
    assert!(observer.usage().is_some(), "usage read from the stream");
    eprintln!(
        "SSE: {:.3} allocations per forwarded chunk",
        streamed.allocations
    );
    assert!(
        streamed.allocations <= MAX_ALLOCATIONS_PER_STREAM_CHUNK,
        "forwarding an SSE chunk allocates {:.3} times (bound {MAX_ALLOCATIONS_PER_STREAM_CHUNK})",
        streamed.allocations
    );

    let body = Bytes::from_static(CHAT_RESPONSE.as_bytes());
    let json = measure(REQUESTS, || {
        let mut observer = ResponseObserver::new(false, false);
        sink += observer.on_data(body.clone()).map_or(0, |b| b.len());
        sink += observer.finish().map_or(0, |b| b.len());
        sink += observer.usage().map_or(0, |u| u.completion_tokens as usize);
    });
    eprintln!(
        "JSON response: {:.2} allocations per response",
        json.allocations
    );
    assert!(
        json.allocations <= MAX_ALLOCATIONS_PER_JSON_RESPONSE,
        "observing a JSON response allocates {:.2} times (bound {MAX_ALLOCATIONS_PER_JSON_RESPONSE})",
        json.allocations
    );
    assert!(sink > 0);
}
