//! Where a dataplane's memory goes with the 10,000-pod / 1,000-route
//! snapshot, and a guard on it: the heap bytes still held after each step of
//! applying the snapshot as the dataplane does (decode, build the routing
//! table, apply every pod's engine load), counted by a global allocator (no
//! timing, deterministic). Prints the breakdown; fails when the routing
//! state grows clearly past what it measured.
//!
//! One `#[test]`, so no other test thread allocates while a step is measured.

use std::alloc::System;

use prost::Message as _;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use switchyard_bench::scale;
use switchyard_controller::compile::{compile_endpoint_loads, compile_route_config};
use switchyard_dataplane::snapshot::SnapshotStore;
use switchyard_snapshot::pb;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Scrape time of the loads.
const OBSERVED_AT_UNIX_MS: i64 = 1_700_000_000_000;

/// Heap bytes the applied snapshot may hold at most: measured
/// PLACEHOLDER; a clear regression (a per-pod copy, a per-pod metric
/// series) exceeds it.
const MAX_HELD_BYTES: i64 = 64 * 1024 * 1024;

/// Heap bytes a step leaves allocated.
fn held(region: &Region<'_, System>) -> i64 {
    let change = region.change();
    change.bytes_allocated as i64 - change.bytes_deallocated as i64
        + change.bytes_reallocated as i64
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

    let region = Region::new(GLOBAL);
    let config = pb::RouteConfig::decode(config_wire.as_slice()).expect("decodes");
    let decoded = held(&region);
    let region = Region::new(GLOBAL);
    store.apply_route_config("v1", config).expect("valid");
    let table = held(&region);
    let region = Region::new(GLOBAL);
    let loads = pb::EndpointLoads::decode(loads_wire.as_slice()).expect("decodes");
    store.apply_endpoint_loads("l1", loads).expect("valid");
    let loads = held(&region);

    let total = decoded + table + loads;
    let per_pod = |bytes: i64| bytes / shape.pods as i64;
    println!(
        "{} pods / {} ModelServers / {} ModelRoutes: RouteConfig {} KiB and EndpointLoads {} KiB on the wire",
        shape.pods,
        shape.servers,
        shape.routes,
        config_wire.len() / 1024,
        loads_wire.len() / 1024
    );
    for (step, bytes) in [
        ("decoded RouteConfig (kept for debug dumps)", decoded),
        ("routing table built from it", table),
        ("engine loads applied", loads),
        ("total", total),
    ] {
        println!(
            "{step}: {:.1} MiB ({} B per pod)",
            mib(bytes),
            per_pod(bytes)
        );
    }
    assert!(
        total <= MAX_HELD_BYTES,
        "the snapshot holds {:.1} MiB, more than {:.1} MiB",
        mib(total),
        mib(MAX_HELD_BYTES)
    );
}
