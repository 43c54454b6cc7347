//! Kubernetes mode: reflectors over ModelRoutes, ModelServers and Pods feed
//! the same pure compile as local mode; the elected leader writes status
//! conditions and Events; every replica serves the snapshot stream.
//!
//! Start-up order matters: the stream server is bound only once every cache
//! has listed its objects and the first compile is published, so a dataplane
//! never receives a snapshot built from a half-read cluster (which would drop
//! routes and pods it is serving).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::Client;
use prometheus::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState, ObjectsView};
use crate::app::{self, AppError};
use crate::cli::Args;
use crate::compile::CompiledRoutes;
use crate::compile_loop::{CompileInputs, CompileLoop, ObjectSet};
use crate::router_config::watch_optional_router_config;
use crate::scrape::{PodLoads, ScrapeConfig, Scraper};
use crate::status::{self, AckSummary, DataplaneReport};
use crate::xds::{self, DataplaneRegistry, RoutingDiscoveryService, SnapshotPublisher, XdsMetrics};

pub mod caches;
pub mod dataplane_reports;
pub mod leader;
pub mod pod_selector;
pub mod status_writer;

pub use self::caches::{Caches, Scope};
use dataplane_reports::{PEER_REPORTS_POLL_INTERVAL, PeerReports, REPORT_TTL};
use pod_selector::PodWatch;
use status_writer::{PlanInput, StatusWriter};

/// A burst of watch events (a rollout restarting pods, `kubectl apply -f dir`)
/// is compiled once it has been quiet for this long...
pub const CHANGE_DEBOUNCE_QUIET: Duration = Duration::from_millis(100);
/// ...or at the latest after this long, so a constantly changing cluster still converges.
pub const CHANGE_DEBOUNCE_MAX: Duration = Duration::from_secs(1);
/// Status is written this long after its inputs changed, so a compile and the
/// ACKs that follow it within a moment are written as one patch per object.
pub const STATUS_DEBOUNCE: Duration = Duration::from_millis(250);
/// Status is re-checked at least this often without a trigger: retries failed
/// patches and refreshes `lastScrapeTime`.
pub const STATUS_RESYNC_INTERVAL: Duration = Duration::from_secs(10);
/// How long shutdown waits for the lease to be released, so the next leader
/// takes over at once instead of after the lease expires.
pub const LEASE_RELEASE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why Kubernetes mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error(
        "no Kubernetes credentials: not running in a cluster and no usable kubeconfig ({0}); pass --config-dir DIR to run in local mode"
    )]
    NoCredentials(#[source] kube::config::InferConfigError),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Kubernetes mode with the in-cluster or kubeconfig credentials, until `shutdown` completes.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    let config = kube::Config::infer()
        .await
        .map_err(KubernetesError::NoCredentials)?;
    let client = Client::try_from(config).map_err(KubernetesError::Client)?;
    tokio::pin!(shutdown);
    let controller = tokio::select! {
        started = start(&args, client) => started?,
        () = &mut shutdown => return Ok(()),
    };
    controller.run_until(shutdown).await
}

/// A running Kubernetes-mode controller.
#[derive(Debug)]
pub struct KubernetesController {
    /// Where the snapshot stream server listens (useful with port 0).
    pub xds_addr: SocketAddr,
    /// Where the admin server listens.
    pub admin_addr: SocketAddr,
    pub publisher: Arc<SnapshotPublisher>,
    pub dataplanes: DataplaneRegistry,
    /// Whether this replica currently leads (writes status).
    pub leading: watch::Receiver<bool>,
    stop: Arc<watch::Sender<bool>>,
    task: JoinHandle<Result<(), AppError>>,
}

impl KubernetesController {
    /// Runs until `shutdown` completes (then stops gracefully) or a part fails.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
        tokio::select! {
            () = shutdown => self.shutdown().await,
            joined = &mut self.task => joined.unwrap_or(Err(AppError::TaskEnded("controller"))),
        }
    }

    /// Stops every part, releases the lease and waits for the servers to close.
    pub async fn shutdown(self) -> Result<(), AppError> {
        self.stop.send_replace(true);
        self.task
            .await
            .unwrap_or(Err(AppError::TaskEnded("controller")))
    }
}

/// Starts Kubernetes mode on `client`: serves the admin endpoints at once,
/// waits for the caches to sync, publishes the first snapshot, then binds the
/// stream server and starts the scraper, the election and the status writer.
pub async fn start(args: &Args, client: Client) -> Result<KubernetesController, AppError> {
    begin(args, client).await?.until_ready().await
}

/// The first half of [`start`]: binds and serves the admin endpoints
/// (`/readyz` answers 503 until the first snapshot is published) and watches
/// the router configuration. Nothing is listed or served on the stream yet.
pub async fn begin(args: &Args, client: Client) -> Result<StartingController, AppError> {
    let controller_id = args.effective_controller_id();
    let admin_listener = app::bind("admin", args.metrics_addr).await?;
    let admin_addr = app::local_addr(&admin_listener, "admin", args.metrics_addr)?;

    let registry = Registry::new();
    let xds_metrics = XdsMetrics::register(&registry)?;
    let compile_duration = app::register_compile_duration(&registry)?;
    let controller_metrics = crate::metrics::ControllerMetrics::register(&registry)?;
    let publisher = Arc::new(SnapshotPublisher::new(
        controller_id.clone(),
        xds_metrics.clone(),
    ));
    let dataplanes = DataplaneRegistry::new();
    let (objects_view_sender, objects_view) = watch::channel(Arc::new(ObjectsView::default()));
    let (stop_sender, stop) = watch::channel(false);
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        AdminState {
            metrics_registry: registry.clone(),
            publisher: publisher.clone(),
            dataplanes: dataplanes.clone(),
            objects: objects_view,
        },
        app::stopped(stop.clone()),
    ));
    tracing::info!(addr = %admin_addr, "admin listening on {admin_addr}");

    let (scheduler, router_config_watcher) =
        match watch_optional_router_config(args.router_config.as_deref()).await {
            Ok(watching) => watching,
            Err(error) => {
                admin_task.abort();
                return Err(error.into());
            }
        };
    Ok(StartingController {
        admin_addr,
        publisher,
        args: args.clone(),
        client,
        controller_id,
        registry,
        xds_metrics,
        compile_duration,
        controller_metrics,
        dataplanes,
        objects_view: objects_view_sender,
        stop_sender: Arc::new(stop_sender),
        stop,
        admin_task,
        scheduler,
        router_config_watcher,
    })
}

/// A controller between [`begin`] and [`StartingController::until_ready`]:
/// admin endpoints up, not ready, no stream server.
pub struct StartingController {
    /// Where the admin server listens.
    pub admin_addr: SocketAddr,
    /// Empty until the first compile after the caches synced.
    pub publisher: Arc<SnapshotPublisher>,
    args: Args,
    client: Client,
    controller_id: String,
    registry: Registry,
    xds_metrics: XdsMetrics,
    compile_duration: prometheus::HistogramVec,
    controller_metrics: crate::metrics::ControllerMetrics,
    dataplanes: DataplaneRegistry,
    objects_view: watch::Sender<Arc<ObjectsView>>,
    stop_sender: Arc<watch::Sender<bool>>,
    stop: watch::Receiver<bool>,
    admin_task: JoinHandle<()>,
    scheduler: watch::Receiver<Option<switchyard_snapshot::pb::SchedulerConfig>>,
    router_config_watcher: Option<JoinHandle<()>>,
}

impl StartingController {
    /// The second half of [`start`]: lists and watches the cluster, waits
    /// for every cache to sync, publishes the first snapshot, and only then
    /// binds the stream server and starts the election and status writing.
    pub async fn until_ready(self) -> Result<KubernetesController, AppError> {
        let Self {
            admin_addr,
            publisher,
            args,
            client,
            controller_id,
            registry,
            xds_metrics,
            compile_duration,
            controller_metrics,
            dataplanes,
            objects_view: objects_view_sender,
            stop_sender,
            stop,
            admin_task,
            scheduler,
            router_config_watcher,
        } = self;
        let abort_early = |admin_task: &JoinHandle<()>, watcher: &Option<JoinHandle<()>>| {
            admin_task.abort();
            if let Some(task) = watcher {
                task.abort();
            }
        };
        let scope = Scope::from_namespaces(&args.namespaces);
        tracing::info!(scope = ?scope, "starting the Kubernetes watches");
        let reflectors = caches::start(&client, &scope).await;
        let mut caches = reflectors.caches.clone();
        caches.wait_synced().await;
        tracing::info!("Kubernetes caches synced");

        let (targets_sender, targets) = watch::channel(Vec::new());
        let scrape_config = ScrapeConfig {
            interval: args.scrape_interval,
            timeout: args.effective_scrape_timeout(),
            ..ScrapeConfig::default()
        };
        let scraper = match Scraper::spawn(scrape_config, targets, &registry) {
            Ok(scraper) => scraper,
            Err(error) => {
                reflectors.abort();
                abort_early(&admin_task, &router_config_watcher);
                return Err(error.into());
            }
        };
        let (compiled_sender, compiled) = watch::channel(None);
        let (objects_sender, objects) = watch::channel(object_set(&caches, &reflectors.pod_watch));
        let mut compile_loop = CompileLoop::new(CompileInputs {
            source: "every Kubernetes watch",
            objects,
            publisher: publisher.clone(),
            targets: targets_sender,
            objects_view: objects_view_sender,
            compiled_out: compiled_sender,
            compile_duration,
            pod_loads: scraper.loads.clone(),
            scheduler,
        });
        compile_loop.on_objects_changed();

        let xds_listener = match app::bind("snapshot stream", args.xds_addr).await {
            Ok(listener) => listener,
            Err(error) => {
                reflectors.abort();
                scraper.task.abort();
                abort_early(&admin_task, &router_config_watcher);
                return Err(error);
            }
        };
        let xds_addr = app::local_addr(&xds_listener, "snapshot stream", args.xds_addr)?;
        let feeder_task = tokio::spawn(feed_objects(
            caches.clone(),
            reflectors.pod_watch.clone(),
            objects_sender,
        ));
        let service =
            RoutingDiscoveryService::new(publisher.clone(), dataplanes.clone(), xds_metrics);
        let xds_task = tokio::spawn(xds::serve(
            xds_listener,
            service,
            app::stopped(stop.clone()),
        ));
        tracing::info!(addr = %xds_addr, "xds listening on {xds_addr}");

        let (leading, leader_task) = leader::spawn(
            client.clone(),
            leader::LeaseSettings {
                namespace: args.lease_namespace.clone(),
                name: args.lease_name.clone(),
                identity: controller_id.clone(),
            },
        );
        let report_task = tokio::spawn(dataplane_reports::publish(
            client.clone(),
            args.lease_namespace.clone(),
            controller_id.clone(),
            dataplanes.clone(),
            stop.clone(),
        ));
        let status_task = tokio::spawn(
            StatusLoop {
                peers: PeerReports::new(
                    client.clone(),
                    &args.lease_namespace,
                    controller_id.clone(),
                ),
                identity: controller_id.clone(),
                writer: StatusWriter::new(
                    client,
                    controller_id.clone(),
                    controller_metrics.clone(),
                ),
                leader_gauge: controller_metrics.leader.clone(),
                leading: leading.clone(),
                compiled,
                caches,
                publisher: publisher.clone(),
                dataplanes: dataplanes.clone(),
                pod_loads: scraper.loads.clone(),
            }
            .run(stop.clone()),
        );
        tracing::info!(controller_id = %controller_id, "controller started in Kubernetes mode");

        let task = tokio::spawn(supervise(Parts {
            compile_loop,
            feeder_task,
            reflectors,
            stop_sender: stop_sender.clone(),
            stop,
            xds_task,
            admin_task,
            scraper,
            status_task,
            report_task,
            leader_task,
            router_config_watcher,
        }));
        Ok(KubernetesController {
            xds_addr,
            admin_addr,
            publisher,
            dataplanes,
            leading,
            stop: stop_sender,
            task,
        })
    }
}

struct Parts {
    compile_loop: CompileLoop,
    feeder_task: JoinHandle<()>,
    reflectors: caches::Reflectors,
    stop_sender: Arc<watch::Sender<bool>>,
    stop: watch::Receiver<bool>,
    xds_task: JoinHandle<Result<(), tonic::transport::Error>>,
    admin_task: JoinHandle<()>,
    scraper: Scraper,
    status_task: JoinHandle<()>,
    report_task: JoinHandle<()>,
    leader_task: JoinHandle<()>,
    router_config_watcher: Option<JoinHandle<()>>,
}

async fn supervise(parts: Parts) -> Result<(), AppError> {
    let Parts {
        compile_loop,
        feeder_task,
        reflectors,
        stop_sender,
        stop,
        mut xds_task,
        admin_task,
        scraper,
        status_task,
        report_task,
        leader_task,
        router_config_watcher,
    } = parts;
    let stopping = stop.clone();
    let outcome = tokio::select! {
        () = compile_loop.run(stop) => Ok(()),
        joined = &mut xds_task => match joined {
            // Asked to stop: the server may finish closing before the compile loop notices.
            Ok(Ok(())) if *stopping.borrow() => Ok(()),
            Ok(Err(error)) => Err(AppError::Xds(error)),
            _ => Err(AppError::TaskEnded("snapshot stream server")),
        },
    };
    if let Err(error) = &outcome {
        tracing::error!(%error, "stopping the controller");
    }
    stop_sender.send_replace(true);
    scraper.task.abort();
    feeder_task.abort();
    reflectors.abort();
    if let Some(task) = router_config_watcher {
        task.abort();
    }
    // The status loop ends on `stop` and drops the last leadership receiver:
    // the leader task then releases the lease.
    let _ = status_task.await;
    // The report task deletes this replica's report on `stop` (bounded by its own timeout).
    let _ = report_task.await;
    if tokio::time::timeout(LEASE_RELEASE_TIMEOUT, leader_task)
        .await
        .is_err()
    {
        tracing::warn!("the leader lease was not released in time; it will expire");
    }
    let servers = async {
        if !xds_task.is_finished()
            && let Ok(Err(error)) = (&mut xds_task).await
        {
            tracing::warn!(%error, "snapshot stream server failed while shutting down");
        }
        let _ = admin_task.await;
    };
    if tokio::time::timeout(app::SHUTDOWN_GRACE_PERIOD, servers)
        .await
        .is_err()
    {
        tracing::warn!(grace_period = ?app::SHUTDOWN_GRACE_PERIOD, "servers did not close in time; dropping their connections");
        xds_task.abort();
    }
    tracing::info!("controller stopped");
    outcome
}

/// Keeps the compile loop's objects current: a consistent copy of the caches
/// after each debounced burst of watch events. Ends when every watch stopped
/// (the loop then says so) or the loop is gone.
async fn feed_objects(
    caches: Caches,
    pod_watch: watch::Sender<PodWatch>,
    objects: watch::Sender<Arc<ObjectSet>>,
) {
    let mut changes = caches.changes.clone();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = objects.closed() => return,
        }
        debounce(&mut changes).await;
        objects.send_replace(object_set(&caches, &pod_watch));
    }
}

/// The caches' objects; on the way, points the pod watch at what the ModelServers select.
fn object_set(caches: &Caches, pod_watch: &watch::Sender<PodWatch>) -> Arc<ObjectSet> {
    let (routes, servers, pods) = caches.snapshot();
    pod_watch
        .send_if_modified(|current| replace_if_changed(current, pod_selector::pod_watch(&servers)));
    Arc::new(ObjectSet {
        routes,
        servers,
        pods,
        api_keys: Vec::new(),
        problems: Vec::new(),
    })
}

fn replace_if_changed<T: PartialEq>(current: &mut T, new: T) -> bool {
    if *current == new {
        return false;
    }
    *current = new;
    true
}

/// Returns once `changes` has been quiet for [`CHANGE_DEBOUNCE_QUIET`], or
/// [`CHANGE_DEBOUNCE_MAX`] after the call.
async fn debounce(changes: &mut watch::Receiver<u64>) {
    let deadline = tokio::time::Instant::now() + CHANGE_DEBOUNCE_MAX;
    loop {
        tokio::select! {
            () = tokio::time::sleep(CHANGE_DEBOUNCE_QUIET) => return,
            () = tokio::time::sleep_until(deadline) => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// Writes status while this replica leads.
struct StatusLoop {
    /// The other replicas' dataplanes, merged into `Programmed`.
    peers: PeerReports,
    identity: String,
    writer: StatusWriter,
    leader_gauge: prometheus::IntGauge,
    leading: watch::Receiver<bool>,
    compiled: watch::Receiver<Option<Arc<CompiledRoutes>>>,
    caches: Caches,
    publisher: Arc<SnapshotPublisher>,
    dataplanes: DataplaneRegistry,
    pod_loads: watch::Receiver<PodLoads>,
}

impl StatusLoop {
    async fn run(mut self, stop: watch::Receiver<bool>) {
        let stopped = app::stopped(stop);
        tokio::pin!(stopped);
        let mut leader_alive = true;
        let mut compile_alive = true;
        loop {
            let acks = self.own_acks();
            let version = acks.version.clone();
            let leading = *self.leading.borrow();
            tokio::select! {
                () = &mut stopped => return,
                changed = self.leading.changed(), if leader_alive => {
                    if changed.is_err() {
                        leader_alive = false;
                    }
                }
                changed = self.compiled.changed(), if compile_alive => {
                    if changed.is_err() {
                        compile_alive = false;
                    }
                }
                () = self.dataplanes.wait_until(|list| AckSummary::from_dataplanes(version.as_deref(), list) != acks) => {}
                () = tokio::time::sleep(STATUS_RESYNC_INTERVAL) => {}
                // The other replicas' dataplanes change without telling this one.
                () = tokio::time::sleep(PEER_REPORTS_POLL_INTERVAL), if leading => {}
            }
            tokio::select! {
                () = &mut stopped => return,
                () = tokio::time::sleep(STATUS_DEBOUNCE) => {}
            }
            let leading = *self.leading.borrow_and_update();
            self.leader_gauge.set(i64::from(leading));
            if !leading {
                self.writer.forget();
                continue;
            }
            let Some(compiled) = self.compiled.borrow_and_update().clone() else {
                continue;
            };
            let observed: BTreeMap<String, i64> = self
                .pod_loads
                .borrow()
                .iter()
                .map(|(pod, load)| (pod.clone(), load.observed_at_unix_ms))
                .collect();
            let last_scrape =
                status::last_scrape_by_server(&compiled.route_config.servers, &observed);
            let acks = tokio::select! {
                () = &mut stopped => return,
                acks = self.acks_across_replicas() => acks,
            };
            let updates = status_writer::plan(&PlanInput {
                reports: &compiled.reports,
                caches: &self.caches,
                acks: &acks,
                last_scrape: &last_scrape,
                now: Timestamp::now(),
            });
            tokio::select! {
                () = &mut stopped => return,
                () = self.writer.sync(updates) => {}
            }
        }
    }

    fn published_version(&self) -> Option<String> {
        self.publisher
            .route_config()
            .map(|published| published.version.clone())
    }

    /// This replica's dataplanes only: what wakes the loop.
    fn own_acks(&self) -> AckSummary {
        AckSummary::from_dataplanes(self.published_version().as_deref(), &self.dataplanes.list())
    }

    /// Every replica's dataplanes: what `Programmed` says.
    async fn acks_across_replicas(&mut self) -> AckSummary {
        let now = app::unix_ms_now();
        let own = DataplaneReport::from_dataplanes(&self.identity, &self.dataplanes.list(), now);
        let version = self.published_version();
        let others = self.peers.refresh().await;
        AckSummary::across_replicas(version.as_deref(), &own, others, now, REPORT_TTL)
    }
}
