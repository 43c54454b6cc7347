//! Prometheus metrics of the snapshot stream server.

use std::sync::Arc;

use parking_lot::Mutex;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use super::registry::DataplaneStatus;
use super::{PublishedResource, ResourceType};
use crate::metrics::registered;

/// Push latency buckets (seconds): a healthy push reaches every dataplane in
/// milliseconds; seconds mean a slow or stuck dataplane.
pub const PUSH_LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Metric handles shared by the publisher and every stream (cheap to clone).
#[derive(Clone, Debug)]
pub struct XdsMetrics {
    pub(crate) connected_dataplanes: IntGauge,
    pub(crate) pushes: IntCounterVec,
    pub(crate) incremental_pushes: IntCounterVec,
    pub(crate) acks: IntCounterVec,
    pub(crate) nacks: IntCounterVec,
    pub(crate) send_timeouts: IntCounterVec,
    version_info: IntGaugeVec,
    generated_at_seconds: IntGaugeVec,
    push_latency: HistogramVec,
    /// Per resource type, the last version whose push latency was observed,
    /// so each version is observed once.
    push_observed: Arc<Mutex<[Option<String>; ResourceType::ALL.len()]>>,
}

impl XdsMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let connected_dataplanes = registered(
            registry,
            IntGauge::with_opts(Opts::new(
                "switchyard_controller_connected_dataplanes",
                "Dataplane snapshot streams currently open.",
            ))?,
        )?;
        let per_type =
            |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["type"]);
        let pushes = registered(
            registry,
            per_type(
                "switchyard_controller_snapshot_pushes_total",
                "Snapshot responses sent to dataplanes, by resource type.",
            )?,
        )?;
        let incremental_pushes = registered(
            registry,
            per_type(
                "switchyard_controller_snapshot_incremental_pushes_total",
                "Snapshot responses sent as an incremental update from the version the dataplane had (a part of the pushes), by resource type.",
            )?,
        )?;
        let acks = registered(
            registry,
            per_type(
                "switchyard_controller_snapshot_acks_total",
                "Snapshot responses dataplanes applied (ACK), by resource type.",
            )?,
        )?;
        let nacks = registered(
            registry,
            per_type(
                "switchyard_controller_snapshot_nacks_total",
                "Snapshot responses dataplanes rejected (NACK), by resource type.",
            )?,
        )?;
        let send_timeouts = registered(
            registry,
            per_type(
                "switchyard_controller_stream_send_timeouts_total",
                "Streams closed because the dataplane did not read a response in time, by resource type.",
            )?,
        )?;
        let version_info = registered(
            registry,
            IntGaugeVec::new(
                Opts::new(
                    "switchyard_controller_snapshot_version_info",
                    "Always 1; labels name the currently published version of each resource type.",
                ),
                &["type", "version"],
            )?,
        )?;
        let generated_at_seconds = registered(
            registry,
            IntGaugeVec::new(
                Opts::new(
                    "switchyard_controller_snapshot_generated_at_seconds",
                    "Unix time the currently published resource of each type was compiled.",
                ),
                &["type"],
            )?,
        )?;
        let push_latency = registered(registry, HistogramVec::new(
            HistogramOpts::new(
                "switchyard_controller_push_latency_seconds",
                "Time from publishing a new version (right after compiling it) until every connected dataplane ACKed it, by resource type.",
            )
            .buckets(PUSH_LATENCY_BUCKETS.to_vec()),
            &["type"],
        )?)?;
        Ok(Self {
            connected_dataplanes,
            pushes,
            incremental_pushes,
            acks,
            nacks,
            send_timeouts,
            version_info,
            generated_at_seconds,
            push_latency,
            push_observed: Arc::default(),
        })
    }

    /// Called after an ACK of `latest`: once every subscribed stream has
    /// applied it, observes its push latency (once per version).
    pub(crate) fn record_ack(
        &self,
        resource: ResourceType,
        latest: &PublishedResource,
        streams: &[DataplaneStatus],
        now_unix_ms: i64,
    ) {
        let all_acked = streams
            .iter()
            .map(|stream| stream.resource(resource))
            .filter(|sync| sync.subscribed)
            .all(|sync| sync.acked_version.as_deref() == Some(latest.version.as_str()));
        if !all_acked {
            return;
        }
        let slot = resource.index();
        let mut observed = self.push_observed.lock();
        if observed[slot].as_deref() == Some(latest.version.as_str()) {
            return;
        }
        observed[slot] = Some(latest.version.clone());
        let elapsed_ms = now_unix_ms
            .saturating_sub(latest.generated_at_unix_ms)
            .max(0);
        self.push_latency
            .with_label_values(&[resource.label()])
            .observe(elapsed_ms as f64 / 1000.0);
    }

    pub(crate) fn record_published(
        &self,
        resource: ResourceType,
        previous_version: Option<&str>,
        version: &str,
        generated_at_unix_ms: i64,
    ) {
        let label = resource.label();
        if let Some(previous) = previous_version {
            // Only the current version keeps a series; old ones would pile up forever.
            let _ = self.version_info.remove_label_values(&[label, previous]);
        }
        self.version_info
            .with_label_values(&[label, version])
            .set(1);
        self.generated_at_seconds
            .with_label_values(&[label])
            .set(generated_at_unix_ms / 1000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::TypeSyncStatus;

    fn stream(acked: Option<&str>) -> DataplaneStatus {
        let route_config = TypeSyncStatus {
            subscribed: true,
            acked_version: acked.map(str::to_owned),
            ..TypeSyncStatus::default()
        };
        DataplaneStatus {
            stream_id: 1,
            route_config,
            ..DataplaneStatus::default()
        }
    }

    fn observed(registry: &Registry) -> (u64, f64) {
        // A vector without series is left out of `gather`.
        registry
            .gather()
            .into_iter()
            .find(|family| family.name() == "switchyard_controller_push_latency_seconds")
            .and_then(|family| {
                family.get_metric().first().map(|metric| {
                    let histogram = metric.get_histogram();
                    (histogram.get_sample_count(), histogram.get_sample_sum())
                })
            })
            .unwrap_or((0, 0.0))
    }

    #[test]
    fn push_latency_is_observed_once_when_every_dataplane_acked() {
        let registry = Registry::new();
        let metrics = XdsMetrics::register(&registry).expect("register");
        let latest = PublishedResource {
            version: "rc-1".into(),
            generated_at_unix_ms: 10_000,
            response: Default::default(),
            encoded: Default::default(),
            update: None,
        };
        let waiting = [stream(Some("rc-1")), stream(Some("rc-0"))];
        metrics.record_ack(ResourceType::RouteConfig, &latest, &waiting, 10_250);
        assert_eq!(observed(&registry).0, 0, "one dataplane has not ACKed yet");
        let done = [stream(Some("rc-1")), stream(Some("rc-1"))];
        metrics.record_ack(ResourceType::RouteConfig, &latest, &done, 10_500);
        metrics.record_ack(ResourceType::RouteConfig, &latest, &done, 10_900);
        assert_eq!(observed(&registry), (1, 0.5));
    }
}
