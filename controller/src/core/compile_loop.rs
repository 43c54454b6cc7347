//! The one compile loop of both modes: whenever the objects (from the config
//! directory or from the Kubernetes caches), the router configuration or the
//! scraped engine load change, compile and publish the results.
//!
//! A source only has to keep a `watch` channel of [`ObjectSet`]s current
//! (debounced); everything after that is shared, so local mode and
//! Kubernetes mode publish, log and expose exactly the same way.

use std::sync::Arc;

use prometheus::HistogramVec;
use switchyard_runtime::clock::{self, Instant};
use switchyard_snapshot::pb;
use tokio::sync::watch;

use crate::admin::{ObjectsView, SourceStatus};
use crate::compile::{
    CompileInput, Compiled, GatewayApiConfig, ObjectReport, ObjectSet, ProviderReport, compile,
    compile_ejections, compile_endpoint_loads,
};
use crate::fleet_fairness::CountersReceiver;
use crate::metrics::ControllerMetrics;
use crate::outlier::ReportedEjections;
use crate::router_config::RouterConfig;
use crate::scrape::{PodLoads, ScrapeTarget};
use crate::xds::SnapshotPublisher;

/// What a [`CompileLoop`] reads from and writes to.
pub(super) struct LoopIo {
    pub objects: watch::Receiver<Arc<ObjectSet>>,
    /// The router configuration: its scheduler section, JWT settings, tiers
    /// and outlier detection are shipped inside the RouteConfig.
    pub router: watch::Receiver<RouterConfig>,
    /// Gateway API mode, from the flags.
    pub gateway_api: GatewayApiConfig,
    /// The JWT issuer's keys, refetched by [`crate::auth::jwks::refresh_keys`].
    pub jwks_keys: watch::Receiver<Vec<String>>,
    pub pod_loads: watch::Receiver<PodLoads>,
    /// Pods the dataplanes reported ejecting, shipped inside EndpointLoads.
    pub ejections: watch::Receiver<Arc<ReportedEjections>>,
    /// The fleet-wide fairness counters, shipped inside EndpointLoads.
    pub fairness_counters: CountersReceiver,
    pub publisher: Arc<SnapshotPublisher>,
    pub targets: watch::Sender<Vec<ScrapeTarget>>,
    pub objects_view: watch::Sender<Arc<ObjectsView>>,
    /// How the source was taken up at start; its current error is added per compile.
    pub source_status: SourceStatus,
    pub metrics: ControllerMetrics,
    pub compile_duration: HistogramVec,
    /// The stream is encrypted with authenticated clients: provider
    /// credentials may be shipped.
    pub ship_credentials: bool,
}

/// Recompiles on every change of its inputs and publishes the results.
pub(super) struct CompileLoop {
    io: LoopIo,
    compiled: watch::Sender<Arc<Compiled>>,
    /// Reports already logged, so an unchanged rejection is not logged again on every reload.
    reported: Logged,
}

/// What was logged last, so an unchanged problem is logged once.
#[derive(Default)]
struct Logged {
    reports: Vec<ObjectReport>,
    providers: Vec<ProviderReport>,
    auth_problems: Vec<String>,
}

impl CompileLoop {
    /// Compiles and publishes the current inputs (the controller is ready once
    /// this returns), and returns the loop and a receiver of every compile's result.
    pub fn start(mut io: LoopIo) -> (Self, watch::Receiver<Arc<Compiled>>) {
        let mut reported = Logged::default();
        let first = compile_and_publish(&mut io, &mut reported);
        let (compiled, receiver) = watch::channel(first);
        let compile_loop = Self {
            io,
            compiled,
            reported,
        };
        (compile_loop, receiver)
    }

    /// Runs until every input is gone (at shutdown the task set drops it first).
    pub async fn run(mut self) {
        let mut objects_alive = true;
        let mut router_alive = true;
        let mut keys_alive = true;
        let mut loads_alive = true;
        let mut ejections_alive = true;
        let mut counters_alive = true;
        loop {
            tokio::select! {
                changed = self.io.objects.changed(), if objects_alive => match changed {
                    Ok(()) => self.recompile(),
                    // The source's task ended: the supervisor reports it.
                    Err(_) => objects_alive = false,
                },
                changed = self.io.router.changed(), if router_alive => match changed {
                    Ok(()) => self.recompile(),
                    // No file (or its watcher stopped): the last configuration stays.
                    Err(_) => router_alive = false,
                },
                changed = self.io.jwks_keys.changed(), if keys_alive => match changed {
                    Ok(()) => self.recompile(),
                    Err(_) => keys_alive = false,
                },
                changed = self.io.pod_loads.changed(), if loads_alive => match changed {
                    Ok(()) => self.publish_endpoint_loads(),
                    Err(_) => loads_alive = false,
                },
                changed = self.io.ejections.changed(), if ejections_alive => match changed {
                    Ok(()) => self.publish_endpoint_loads(),
                    Err(_) => ejections_alive = false,
                },
                changed = self.io.fairness_counters.changed(), if counters_alive => match changed {
                    Ok(()) => self.publish_endpoint_loads(),
                    Err(_) => counters_alive = false,
                },
                else => return,
            }
        }
    }

    fn recompile(&mut self) {
        let compiled = compile_and_publish(&mut self.io, &mut self.reported);
        self.compiled.send_replace(compiled);
    }

    /// A scrape changed the loads, a dataplane reported ejections or the
    /// fairness counters changed: only the parts of [`compile`] that depend
    /// on them.
    fn publish_endpoint_loads(&mut self) {
        let pod_loads = self.io.pod_loads.borrow_and_update().clone();
        let ejections = self.io.ejections.borrow_and_update().clone();
        let compiled = self.compiled.borrow().clone();
        let now_unix_ms = clock::unix_ms_now();
        let started = clock::now();
        let mut loads = compile_endpoint_loads(&compiled.route_config, &pod_loads);
        loads.ejections = compile_ejections(&compiled.route_config, &ejections, now_unix_ms);
        observe(&self.io, "endpoint_loads", started);
        publish_loads(&mut self.io, loads, now_unix_ms);
    }
}

fn compile_and_publish(io: &mut LoopIo, reported: &mut Logged) -> Arc<Compiled> {
    let objects = io.objects.borrow_and_update().clone();
    let router = io.router.borrow_and_update().clone();
    let jwks_keys = io.jwks_keys.borrow_and_update().clone();
    let pod_loads = io.pod_loads.borrow_and_update().clone();
    let ejections = io.ejections.borrow_and_update().clone();
    let started = clock::now();
    let compiled = compile(&CompileInput {
        objects: &objects,
        gateway_api: &io.gateway_api,
        router: &router,
        jwks_keys: &jwks_keys,
        pod_loads: &pod_loads,
        ejections: &ejections,
        now_unix_ms: clock::unix_ms_now(),
        ship_credentials: io.ship_credentials,
    });
    observe(io, "route_config", started);

    let published = io
        .publisher
        .publish_route_config(compiled.route_config.clone(), compiled.generated_at_unix_ms);
    if published.changed {
        tracing::info!(
            version = %published.version,
            routes = compiled.route_config.routes.len(),
            servers = compiled.route_config.servers.len(),
            endpoints = compiled.scrape_targets.len(),
            "published route config"
        );
    }
    log_new_rejections(&mut reported.reports, &compiled.reports);
    log_unready_providers(&mut reported.providers, &compiled.provider_reports);
    if compiled.auth_problems != reported.auth_problems {
        for problem in &compiled.auth_problems {
            tracing::warn!(%problem, "API key left out");
        }
        reported.auth_problems.clone_from(&compiled.auth_problems);
    }
    io.targets.send_if_modified(|targets| {
        if *targets == compiled.scrape_targets {
            return false;
        }
        targets.clone_from(&compiled.scrape_targets);
        true
    });
    io.objects_view.send_replace(Arc::new(ObjectsView {
        reports: compiled.reports.clone(),
        providers: compiled.provider_reports.clone(),
        gateway_api: compiled.gateway_api.clone(),
        load_problems: objects.problems.clone(),
        source: SourceStatus {
            error: objects.source_error.clone(),
            ..io.source_status.clone()
        },
    }));
    let source_objects = &io.metrics.source_objects;
    for (kind, count) in [
        ("ModelRoute", objects.routes.len()),
        ("ModelServer", objects.servers.len()),
        ("Pod", objects.pods.len()),
    ] {
        source_objects
            .with_label_values(&[kind])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    io.metrics
        .source_load_problems
        .set(i64::try_from(objects.problems.len()).unwrap_or(i64::MAX));
    // Endpoints may have come or gone: their loads follow.
    publish_loads(
        io,
        compiled.endpoint_loads.clone(),
        compiled.generated_at_unix_ms,
    );
    Arc::new(compiled)
}

fn observe(io: &LoopIo, resource: &str, started: Instant) {
    io.compile_duration
        .with_label_values(&[resource])
        .observe(started.elapsed().as_secs_f64());
}

/// Publishes `loads` with the current fairness counters.
fn publish_loads(io: &mut LoopIo, mut loads: pb::EndpointLoads, now_unix_ms: i64) {
    loads.fairness_counters = io.fairness_counters.borrow_and_update().as_deref().cloned();
    let count = loads.loads.len();
    let published = io.publisher.publish_endpoint_loads(loads, now_unix_ms);
    if published.changed {
        tracing::debug!(version = %published.version, endpoints = count, "published endpoint loads");
    }
}

fn log_new_rejections(reported: &mut Vec<ObjectReport>, reports: &[ObjectReport]) {
    for report in reports {
        if reported.contains(report) {
            continue;
        }
        for field in &report.ignored_fields {
            tracing::warn!(
                kind = report.kind.as_str(),
                namespace = %report.namespace,
                name = %report.name,
                field = %field.path,
                detail = %field.message,
                "field set but not acted on by the router"
            );
        }
        if report.is_healthy() {
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
    *reported = reports.to_vec();
}

fn log_unready_providers(reported: &mut Vec<ProviderReport>, reports: &[ProviderReport]) {
    for report in reports {
        if report.ready.status || reported.contains(report) {
            continue;
        }
        tracing::warn!(
            kind = "ExternalModelProvider",
            namespace = %report.namespace,
            name = %report.name,
            reason = report.ready.reason.as_str(),
            detail = %report.ready.message,
            "provider not ready"
        );
    }
    *reported = reports.to_vec();
}
