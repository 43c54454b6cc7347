//! `kthena_router_scheduler_plugin_duration_seconds`: each plugin's time per
//! request, with Kthena's labels (model, plugin, type) and buckets.
//! A model's series are created by its first scheduled request, not when a
//! snapshot is applied, and removed when the model or plugin leaves the
//! snapshot.

use std::collections::HashSet;

use parking_lot::Mutex;
use prometheus::{Histogram, HistogramOpts, HistogramVec, Registry};

/// The Kthena router's buckets for this metric (seconds).
pub const PLUGIN_DURATION_BUCKETS: [f64; 6] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5];

/// The metric's name, as the Kthena router exports it.
pub const PLUGIN_DURATION_METRIC: &str = "kthena_router_scheduler_plugin_duration_seconds";

/// A plugin's `plugin` and `type` (`filter` or `score`) labels.
pub(super) type PluginLabels = (&'static str, &'static str);

#[derive(Debug)]
pub struct PluginMetrics {
    durations: HistogramVec,
    series: Mutex<Series>,
}

/// What may have series, and what has.
#[derive(Debug, Default)]
struct Series {
    /// Models and plugins of the latest snapshot: only they get series.
    models: HashSet<String>,
    plugins: HashSet<PluginLabels>,
    /// Label sets with a series, so the ones a new snapshot drops are removed.
    live: HashSet<(String, PluginLabels)>,
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
            series: Mutex::new(Series::default()),
        })
    }

    /// A new snapshot serves `models` with `plugins`: removes the series of
    /// any other model or plugin. Costs the snapshot's models plus the live
    /// series, never models x series.
    pub(super) fn begin_snapshot(&self, models: &[&str], plugins: &[PluginLabels]) {
        let mut series = self.series.lock();
        series.models = models.iter().map(|model| (*model).to_owned()).collect();
        series.plugins = plugins.iter().copied().collect();
        let Series {
            models,
            plugins,
            live,
        } = &mut *series;
        live.retain(|(model, (plugin, kind))| {
            let keep = models.contains(model) && plugins.contains(&(*plugin, *kind));
            if !keep {
                let _ = self
                    .durations
                    .remove_label_values(&[model.as_str(), plugin, kind]);
            }
            keep
        });
    }

    /// The histograms of `model`'s `plugins`, created now; `None` when the
    /// model or a plugin is no longer in the latest snapshot (a request of
    /// the previous one), so no series outlives its model.
    pub(super) fn create(&self, model: &str, plugins: &[PluginLabels]) -> Option<Vec<Histogram>> {
        let mut series = self.series.lock();
        let known = series.models.contains(model)
            && plugins.iter().all(|labels| series.plugins.contains(labels));
        if !known {
            return None;
        }
        Some(
            plugins
                .iter()
                .map(|&(plugin, kind)| {
                    series.live.insert((model.to_owned(), (plugin, kind)));
                    self.durations.with_label_values(&[model, plugin, kind])
                })
                .collect(),
        )
    }
}
