//! The one compile loop of both modes: whenever the objects (from the config
//! directory or from the Kubernetes caches), the router configuration or the
//! scraped engine load change, compile and publish the results.
//!
//! A source only has to keep a `watch` channel of [`ObjectSet`]s current
//! (debounced as it sees fit); everything after that is shared, so local mode
//! and Kubernetes mode publish, log and expose exactly the same way.

use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use prometheus::HistogramVec;
use switchyard_crd::{ModelRoute, ModelServer};
use switchyard_snapshot::pb;
use tokio::sync::watch;

use crate::admin::ObjectsView;
use crate::app;
use crate::compile::{CompiledRoutes, ObjectReport, compile_endpoint_loads, compile_route_config};
use crate::local::LoadProblem;
use crate::scrape::{PodLoads, ScrapeTarget};
use crate::xds::SnapshotPublisher;

/// One consistent set of objects to compile, whichever source read it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObjectSet {
    pub routes: Vec<ModelRoute>,
    pub servers: Vec<ModelServer>,
    pub pods: Vec<Pod>,
    /// API keys from `Secret`s labelled as such (digests only).
    pub api_keys: Vec<crate::auth::ApiKeySecret>,
    /// Documents or files that were skipped, in file then document order
    /// (local mode; the Kubernetes API only hands out well-formed objects).
    pub problems: Vec<LoadProblem>,
}

/// Recompiles on every change of its inputs and publishes the results.
pub(crate) struct CompileLoop {
    io: CompileInputs,
    compiled: Option<Arc<CompiledRoutes>>,
    /// Reports already logged, so an unchanged rejection is not logged again on every reload.
    reported: Vec<ObjectReport>,
}

impl CompileLoop {
    /// A loop that has compiled nothing yet; call [`Self::on_objects_changed`]
    /// for the first snapshot before serving it.
    pub fn new(io: CompileInputs) -> Self {
        Self {
            io,
            compiled: None,
            reported: Vec::new(),
        }
    }

    pub async fn run(mut self, stop: watch::Receiver<bool>) {
        let stopped = app::stopped(stop);
        tokio::pin!(stopped);
        let mut source_alive = true;
        let mut scraper_alive = true;
        let mut scheduler_alive = true;
        loop {
            tokio::select! {
                () = &mut stopped => return,
                changed = self.io.objects.changed(), if source_alive => match changed {
                    Ok(()) => self.on_objects_changed(),
                    Err(_) => {
                        source_alive = false;
                        tracing::error!(source = self.io.source, "{} stopped; serving the last compiled snapshot", self.io.source);
                    }
                },
                changed = self.io.scheduler.changed(), if scheduler_alive => match changed {
                    Ok(()) => self.on_objects_changed(),
                    // No file (or its watcher stopped): the last configuration stays.
                    Err(_) => scheduler_alive = false,
                },
                changed = self.io.pod_loads.changed(), if scraper_alive => match changed {
                    Ok(()) => self.publish_endpoint_loads(),
                    Err(_) => {
                        scraper_alive = false;
                        tracing::error!("engine scraper stopped; endpoint loads are no longer updated");
                    }
                },
            }
        }
    }

    pub fn on_objects_changed(&mut self) {
        let objects = self.io.objects.borrow_and_update().clone();
        let started = Instant::now();
        let mut compiled = compile_route_config(&objects.routes, &objects.servers, &objects.pods);
        compiled.route_config.scheduler = self.io.scheduler.borrow_and_update().clone();
        self.io
            .compile_duration
            .with_label_values(&["route_config"])
            .observe(started.elapsed().as_secs_f64());

        let published = self
            .io
            .publisher
            .publish_route_config(compiled.route_config.clone(), app::unix_ms_now());
        if published.changed {
            tracing::info!(
                version = %published.version,
                routes = compiled.route_config.routes.len(),
                servers = compiled.route_config.servers.len(),
                endpoints = compiled.scrape_targets.len(),
                "published route config"
            );
        }
        self.log_new_rejections(&compiled.reports);
        self.io.targets.send_if_modified(|targets| {
            if *targets == compiled.scrape_targets {
                return false;
            }
            targets.clone_from(&compiled.scrape_targets);
            true
        });
        self.io.objects_view.send_replace(Arc::new(ObjectsView {
            reports: compiled.reports.clone(),
            load_problems: objects.problems.clone(),
        }));
        let compiled = Arc::new(compiled);
        self.compiled = Some(compiled.clone());
        self.io.compiled_out.send_replace(Some(compiled));
        // Endpoints may have come or gone: their loads follow.
        self.publish_endpoint_loads();
    }

    fn publish_endpoint_loads(&mut self) {
        let Some(compiled) = &self.compiled else {
            return;
        };
        let pod_loads = self.io.pod_loads.borrow_and_update().clone();
        let started = Instant::now();
        let loads = compile_endpoint_loads(&compiled.route_config, &pod_loads);
        self.io
            .compile_duration
            .with_label_values(&["endpoint_loads"])
            .observe(started.elapsed().as_secs_f64());
        let count = loads.loads.len();
        let published = self
            .io
            .publisher
            .publish_endpoint_loads(loads, app::unix_ms_now());
        if published.changed {
            tracing::debug!(version = %published.version, endpoints = count, "published endpoint loads");
        }
    }

    fn log_new_rejections(&mut self, reports: &[ObjectReport]) {
        for report in reports {
            if report.is_healthy() || self.reported.contains(report) {
                continue;
            }
            let failed = if report.accepted.status {
                &report.resolved_refs
            } else {
                &report.accepted
            };
            tracing::warn!(
                kind = report.kind.as_str(),
                namespace = %report.namespace,
                name = %report.name,
                condition = if report.accepted.status { "ResolvedRefs" } else { "Accepted" },
                reason = failed.reason.as_str(),
                in_snapshot = report.in_snapshot,
                detail = %failed.message,
                "object not fully programmed"
            );
        }
        self.reported = reports.to_vec();
    }
}

/// What a [`CompileLoop`] reads from and writes to.
pub(crate) struct CompileInputs {
    /// Names the object source in logs ("config directory watcher", "Kubernetes watches").
    pub source: &'static str,
    pub objects: watch::Receiver<Arc<ObjectSet>>,
    pub publisher: Arc<SnapshotPublisher>,
    pub targets: watch::Sender<Vec<ScrapeTarget>>,
    pub objects_view: watch::Sender<Arc<ObjectsView>>,
    /// Every compile's result, for whoever writes status (nobody in local mode).
    pub compiled_out: watch::Sender<Option<Arc<CompiledRoutes>>>,
    pub compile_duration: HistogramVec,
    pub pod_loads: watch::Receiver<PodLoads>,
    /// The router configuration's scheduler section, shipped inside the RouteConfig.
    pub scheduler: watch::Receiver<Option<pb::SchedulerConfig>>,
}
