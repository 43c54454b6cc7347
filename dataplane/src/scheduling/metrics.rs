//! `kthena_router_scheduler_plugin_duration_seconds`: each plugin's time per
//! request, with Kthena's labels (model, plugin, type) and buckets.
//! Handles are resolved when a snapshot is applied; series of models that
//! left the snapshot are removed.

use std::collections::HashSet;

use parking_lot::Mutex;
use prometheus::{Histogram, HistogramOpts, HistogramVec, Registry};

/// The Kthena router's buckets for this metric (seconds).
pub const PLUGIN_DURATION_BUCKETS: [f64; 6] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5];

/// The metric's name, as the Kthena router exports it.
pub const PLUGIN_DURATION_METRIC: &str = "kthena_router_scheduler_plugin_duration_seconds";

type LabelSet = (String, &'static str, &'static str);

#[derive(Debug)]
pub struct PluginMetrics {
    durations: HistogramVec,
    /// Label sets with a series, so the ones a new snapshot drops are removed.
    live: Mutex<HashSet<LabelSet>>,
}

impl PluginMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let durations = HistogramVec::new(
            HistogramOpts::new(
                PLUGIN_DURATION_METRIC,
                "Execution time per scheduler plugin",
            )
            .buckets(PLUGIN_DURATION_BUCKETS.to_vec()),
            &["model", "plugin", "type"],
        )?;
        registry.register(Box::new(durations.clone()))?;
        Ok(Self {
            durations,
            live: Mutex::new(HashSet::new()),
        })
    }

    pub(super) fn handle(
        &self,
        model: &str,
        plugin: &'static str,
        kind: &'static str,
        live: &mut HashSet<LabelSet>,
    ) -> Histogram {
        live.insert((model.to_owned(), plugin, kind));
        self.durations.with_label_values(&[model, plugin, kind])
    }

    /// Removes every series not in `live` (models or plugins gone from the snapshot).
    pub(super) fn retain_only(&self, live: HashSet<LabelSet>) {
        let mut current = self.live.lock();
        for (model, plugin, kind) in current.difference(&live) {
            let _ = self
                .durations
                .remove_label_values(&[model.as_str(), plugin, kind]);
        }
        *current = live;
    }
}
