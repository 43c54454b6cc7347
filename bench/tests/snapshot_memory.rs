//! Where a dataplane's memory goes with the 10,000-pod / 1,000-route
//! snapshot, and a guard on it: the heap bytes held after each step of
//! applying the snapshot as the dataplane does (decode, build the routing
//! table, apply every pod's engine load), counted by a global allocator (no
//! timing, deterministic). Prints the breakdown
//! (`cargo test -p switchyard-bench --test snapshot_memory -- --nocapture`);
//! fails when the state held grows clearly past what it measured.
//!
//! One `#[test]`, so no other test thread allocates while a step is measured.

use std::alloc::System;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use switchyard_bench::scale;
use switchyard_controller::compile::{compile_endpoint_loads, compile_route_config};
use switchyard_dataplane::pod::PodState;
use switchyard_dataplane::snapshot::SnapshotStore;
use switchyard_snapshot::{pb, wire};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Scrape time of the loads.
const OBSERVED_AT_UNIX_MS: i64 = 1_700_000_000_000;

/// Heap bytes the applied snapshot may hold at most (requested sizes, not
/// counting the allocator's own overhead): measured 9.3 MiB, 6.3 MiB of
/// routing table and 3.0 MiB of engine loads. Keeping the decoded
/// RouteConfig again (8.8 MiB) or another per-pod copy of anything exceeds it.
const MAX_HELD_BYTES: i64 = 11 * 1024 * 1024;

/// Heap bytes a route change may leave held beyond what the table it
/// replaced held: the replaced table and the decoded config are freed.
const MAX_REAPPLIED_BYTES: i64 = 512 * 1024;

/// Heap bytes a step leaves allocated. (`stats_alloc` already counts a
/// reallocation's growth in `bytes_allocated` and its shrinking in
/// `bytes_deallocated`; adding `bytes_reallocated` counted growth twice.)
fn held(region: &Region<'_, System>) -> i64 {
    let change = region.change();
    change.bytes_allocated as i64 - change.bytes_deallocated as i64
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[test]
fn the_ten_thousand_pod_snapshot_fits_its_memory_budget() {
    let shape = scale::TEN_THOUSAND_PODS;
    let objects = scale::objects(&scale::yaml(&shape, 90)).expect("valid objects");
    let compiled = compile_route_config(&objects.routes, &objects.servers, &objects.pods);
    let pod_loads = scale::loads(&objects, 1.0, OBSERVED_AT_UNIX_MS);
    let loads_wire = compile_endpoint_loads(&compiled.route_config, &pod_loads).encode_to_vec();
    let config_wire = compiled.route_config.encode_to_vec();
    drop((objects, compiled, pod_loads));
    let store = SnapshotStore::new();

    // The RouteConfig decoded whole, as the dataplane no longer holds it:
    // it decodes the ModelServers (their endpoints) one at a time.
    let region = Region::new(GLOBAL);
    let mut config = pb::RouteConfig::decode(config_wire.as_slice()).expect("decodes");
    let decoded = held(&region);
    let encoded_servers = wire::split_fields(&Bytes::from(config_wire.clone()), &[2])
        .expect("well formed")
        .taken;
    let largest_server = encoded_servers
        .iter()
        .map(|(_, encoded)| {
            let one = Region::new(GLOBAL);
            let server = pb::ModelServer::decode(encoded.clone()).expect("decodes");
            let bytes = held(&one);
            drop(server);
            bytes
        })
        .max()
        .unwrap_or_default();
    drop(encoded_servers);
    let servers = Region::new(GLOBAL);
    config.servers = Vec::new();
    let decoded_servers = -held(&servers);
    drop(config);

    // Applied as the dataplane applies it: the message as it came off the
    // wire (counted: the table keeps it for debug dumps).
    let region = Region::new(GLOBAL);
    store
        .apply_encoded_route_config("v1", Bytes::copy_from_slice(&config_wire))
        .expect("valid");
    let table = held(&region);
    let region = Region::new(GLOBAL);
    store
        .apply_encoded_endpoint_loads("l1", Bytes::copy_from_slice(&loads_wire))
        .expect("valid");
    let loads = held(&region);

    // A route change: the whole RouteConfig again. The replaced table is
    // freed (no request holds it), its pods are carried over.
    let region = Region::new(GLOBAL);
    store
        .apply_encoded_route_config("v2", Bytes::copy_from_slice(&config_wire))
        .expect("valid");
    let reapplied = held(&region);

    // The pods' own state, as the table builds it (one `PodState` each).
    let region = Region::new(GLOBAL);
    let pods: Vec<Arc<PodState>> = (0..shape.pods)
        .map(|i| {
            let key = format!("bench/pod-{i}");
            let address = SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8000));
            Arc::new(PodState::new(key, format!("pod-{i}"), address).expect("valid"))
        })
        .collect();
    let pod_states = held(&region);
    drop(pods);

    let total = table + loads;
    println!(
        "{} pods / {} ModelServers / {} ModelRoutes: RouteConfig {} KiB and EndpointLoads {} KiB on the wire",
        shape.pods,
        shape.servers,
        shape.routes,
        config_wire.len() / 1024,
        loads_wire.len() / 1024
    );
    for (what, bytes) in [
        (
            "the RouteConfig decoded whole (never, while applied)",
            decoded,
        ),
        (
            "  of which ModelServers, decoded one at a time instead",
            decoded_servers,
        ),
        ("routing table (pods, servers, routes, scheduler)", table),
        ("  of which the pods' own state (PodState)", pod_states),
        ("engine loads", loads),
        ("held", total),
    ] {
        println!(
            "{what}: {:.1} MiB ({} B per pod)",
            mib(bytes),
            bytes / shape.pods as i64
        );
    }
    println!(
        "  the largest ModelServer decoded, the most of them held at once: {:.1} KiB",
        largest_server as f64 / 1024.0
    );
    println!("a route change then holds {:+.2} MiB", mib(reapplied));
    assert!(
        reapplied.abs() <= MAX_REAPPLIED_BYTES,
        "a route change left {:+.1} MiB more held",
        mib(reapplied)
    );
    assert!(
        total <= MAX_HELD_BYTES,
        "the snapshot holds {:.1} MiB, more than {:.1} MiB",
        mib(total),
        mib(MAX_HELD_BYTES)
    );
}
