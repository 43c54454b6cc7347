//! Controller-wide metrics that are not about the snapshot stream
//! ([`crate::xds::XdsMetrics`]) or scraping ([`crate::scrape`]): status
//! writes and leadership. The handles are cheap to clone; whoever writes
//! status conditions or runs leader election increments them.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// Handles of the controller-wide metrics.
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    /// `switchyard_controller_status_writes_total{kind}`: status updates written.
    pub status_writes: IntCounterVec,
    /// `switchyard_controller_status_write_errors_total{kind}`: status updates
    /// the API server refused or that failed.
    pub status_write_errors: IntCounterVec,
    /// `switchyard_controller_leader`: 1 while this replica is the one that
    /// writes status; local mode has a single controller, always 1.
    pub leader: IntGauge,
}

impl ControllerMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let status_writes = IntCounterVec::new(
            Opts::new(
                "switchyard_controller_status_writes_total",
                "Status condition updates written, by object kind.",
            ),
            &["kind"],
        )?;
        let status_write_errors = IntCounterVec::new(
            Opts::new(
                "switchyard_controller_status_write_errors_total",
                "Status condition updates that failed, by object kind.",
            ),
            &["kind"],
        )?;
        let leader = IntGauge::new(
            "switchyard_controller_leader",
            "1 while this controller replica is the leader (writes status), else 0.",
        )?;
        registry.register(Box::new(status_writes.clone()))?;
        registry.register(Box::new(status_write_errors.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Self {
            status_writes,
            status_write_errors,
            leader,
        })
    }
}
