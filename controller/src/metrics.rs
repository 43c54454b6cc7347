//! Controller-wide metrics that are not about the snapshot stream
//! ([`crate::xds::XdsMetrics`]) or scraping ([`crate::scrape`]): status
//! writes, Events and leadership. The handles are cheap to clone.

use prometheus::core::Collector;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

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
    /// 1 while a starting controller holds its first snapshot because the
    /// source has no ModelRoute (see `core::source_hold`).
    pub source_held: IntGauge,
    /// Objects the source holds, by kind (`ModelRoute`, `ModelServer`, `Pod`).
    pub source_objects: IntGaugeVec,
    /// Files or documents the source could not load.
    pub source_load_problems: IntGauge,
}

/// `collector`, registered in `registry`: a metric is created and registered
/// in one statement, so none is left out of `/metrics`.
pub(crate) fn registered<C: Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> Result<C, prometheus::Error> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

impl ControllerMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let leader = registered(
            registry,
            IntGauge::new(
                "switchyard_controller_leader",
                "1 while this controller replica holds the leader Lease and writes status.",
            )?,
        )?;
        let status_writes = registered(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "switchyard_controller_status_writes_total",
                    "Status patches (server-side apply) by object kind and result.",
                ),
                &["kind", "result"],
            )?,
        )?;
        let events = registered(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "switchyard_controller_events_total",
                    "Kubernetes Events published for rejected objects, by result.",
                ),
                &["result"],
            )?,
        )?;
        let source_held = registered(
            registry,
            IntGauge::new(
                "switchyard_controller_source_held",
                "1 while a starting controller holds back its first routing snapshot because its source has no ModelRoute.",
            )?,
        )?;
        let source_objects = registered(
            registry,
            IntGaugeVec::new(
                Opts::new(
                    "switchyard_controller_source_objects",
                    "Objects the source (config directory or Kubernetes caches) holds, by kind.",
                ),
                &["kind"],
            )?,
        )?;
        let source_load_problems = registered(
            registry,
            IntGauge::new(
                "switchyard_controller_source_load_problems",
                "Config files or documents the source could not load (local mode).",
            )?,
        )?;
        Ok(Self {
            leader,
            status_writes,
            events,
            source_held,
            source_objects,
            source_load_problems,
        })
    }
}
