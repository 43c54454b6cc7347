//! Controller-wide metrics that are not about the snapshot stream
//! ([`crate::xds::XdsMetrics`]) or scraping ([`crate::scrape`]): status
//! writes, Events and leadership. The handles are cheap to clone.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// Handles of the controller-wide metrics, resolved once at start-up.
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    /// 1 while this replica holds the leader Lease and writes status; local
    /// mode has a single controller, always 1.
    pub leader: IntGauge,
    /// Status patches by kind and result (`applied`, `failed`).
    pub status_writes: IntCounterVec,
    /// Events for rejected objects by result (`published`, `failed`).
    pub events: IntCounterVec,
}

impl ControllerMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let leader = IntGauge::new(
            "switchyard_controller_leader",
            "1 while this controller replica holds the leader Lease and writes status.",
        )?;
        let status_writes = IntCounterVec::new(
            Opts::new(
                "switchyard_controller_status_writes_total",
                "Status patches (server-side apply) by object kind and result.",
            ),
            &["kind", "result"],
        )?;
        let events = IntCounterVec::new(
            Opts::new(
                "switchyard_controller_events_total",
                "Kubernetes Events published for rejected objects, by result.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(status_writes.clone()))?;
        registry.register(Box::new(events.clone()))?;
        Ok(Self {
            leader,
            status_writes,
            events,
        })
    }
}
