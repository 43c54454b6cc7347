//! Prometheus metrics of the snapshot stream server.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::ResourceType;

/// Metric handles shared by the publisher and every stream (cheap to clone).
#[derive(Clone, Debug)]
pub struct XdsMetrics {
    pub(crate) connected_dataplanes: IntGauge,
    pub(crate) pushes: IntCounterVec,
    pub(crate) acks: IntCounterVec,
    pub(crate) nacks: IntCounterVec,
    pub(crate) send_timeouts: IntCounterVec,
    version_info: IntGaugeVec,
    generated_at_seconds: IntGaugeVec,
}

impl XdsMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let connected_dataplanes = IntGauge::with_opts(Opts::new(
            "switchyard_controller_connected_dataplanes",
            "Dataplane snapshot streams currently open.",
        ))?;
        let per_type =
            |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["type"]);
        let pushes = per_type(
            "switchyard_controller_snapshot_pushes_total",
            "Snapshot responses sent to dataplanes, by resource type.",
        )?;
        let acks = per_type(
            "switchyard_controller_snapshot_acks_total",
            "Snapshot responses dataplanes applied (ACK), by resource type.",
        )?;
        let nacks = per_type(
            "switchyard_controller_snapshot_nacks_total",
            "Snapshot responses dataplanes rejected (NACK), by resource type.",
        )?;
        let send_timeouts = per_type(
            "switchyard_controller_stream_send_timeouts_total",
            "Streams closed because the dataplane did not read a response in time, by resource type.",
        )?;
        let version_info = IntGaugeVec::new(
            Opts::new(
                "switchyard_controller_snapshot_version_info",
                "Always 1; labels name the currently published version of each resource type.",
            ),
            &["type", "version"],
        )?;
        let generated_at_seconds = IntGaugeVec::new(
            Opts::new(
                "switchyard_controller_snapshot_generated_at_seconds",
                "Unix time the currently published resource of each type was compiled.",
            ),
            &["type"],
        )?;
        registry.register(Box::new(connected_dataplanes.clone()))?;
        registry.register(Box::new(pushes.clone()))?;
        registry.register(Box::new(acks.clone()))?;
        registry.register(Box::new(nacks.clone()))?;
        registry.register(Box::new(send_timeouts.clone()))?;
        registry.register(Box::new(version_info.clone()))?;
        registry.register(Box::new(generated_at_seconds.clone()))?;
        Ok(Self {
            connected_dataplanes,
            pushes,
            acks,
            nacks,
            send_timeouts,
            version_info,
            generated_at_seconds,
        })
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
