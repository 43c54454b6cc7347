//! Shared by the controller's integration test binaries; each uses a part of
//! it, so what one binary leaves unused is not dead code.
#![allow(dead_code)]

pub mod dataplane;
pub mod fake_api;
pub mod kubernetes;

use std::net::SocketAddr;

use switchyard_controller::xds::SnapshotPublisher;
use switchyard_snapshot::pb;
use tokio::net::TcpListener;

/// A router configuration file: the top 3 pods, scored by gpu-usage with weight 2.
pub const GPU_USAGE_ROUTER_CONFIG: &str =
    "scheduler:\n  topN: 3\n  plugins:\n    Score: {enabled: [{name: gpu-usage, weight: 2}]}\n";

/// The scheduler section of the RouteConfig `publisher` published last.
pub fn shipped_scheduler(publisher: &SnapshotPublisher) -> Option<pb::SchedulerConfig> {
    let published = publisher.route_config()?;
    match &published.response.resource {
        Some(pb::snapshot_response::Resource::RouteConfig(config)) => config.scheduler.clone(),
        _ => None,
    }
}

/// Asserts that `publisher` ships the scheduler of [`GPU_USAGE_ROUTER_CONFIG`].
pub fn assert_gpu_usage_scheduler_shipped(publisher: &SnapshotPublisher) {
    let scheduler = shipped_scheduler(publisher).expect("scheduler section shipped");
    assert_eq!(scheduler.top_n, 3);
    let gpu_usage = pb::ScorePlugin {
        name: "gpu-usage".into(),
        weight: 2,
    };
    assert_eq!(scheduler.scores, vec![gpu_usage]);
}

/// A listener on a loopback port the OS picks, and its address.
pub async fn loopback_listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    (listener, addr)
}
