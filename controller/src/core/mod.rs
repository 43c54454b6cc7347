//! The controller's core, the same in both modes: it owns the metrics
//! registry, the snapshot publisher, the admin server, the engine scraper,
//! the compile loop and the snapshot stream server, all supervised by one
//! [`TaskSet`]. A mode is an [`ObjectSource`] feeding it object sets: the
//! config directory (local mode) or the Kubernetes watches, each with its
//! own tasks (the directory watcher; reflectors, leader election, status
//! writer, dataplane reports).
//!
//! Start-up order, in both modes: [`begin`] serves the admin endpoints at
//! once (`/readyz` answers 503) and loads the router configuration;
//! [`StartingController::start`] waits for the source's first complete
//! object set (Kubernetes: every cache listed), holds it while it has no
//! ModelRoute (see [`source_hold`]), publishes the first snapshot, and only
//! then binds the stream server, so a dataplane never receives a snapshot
//! built from a half-read cluster or an accidentally empty source (which
//! would drop routes and pods it is serving).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, Registry};
use switchyard_runtime::{CancellationToken, Debounce, TaskError, TaskSet, bind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::DropGuard;

use crate::admin::{self, AdminState, Endpoints, ObjectsView};
use crate::auth::jwks;
use crate::cli::Args;
use crate::compile::{Compiled, GatewayApiConfig, ObjectSet};
use crate::error::ControllerError;
use crate::fleet_fairness::FairnessBoard;
use crate::metrics::{ControllerMetrics, registered};
use crate::outlier::EjectionBoard;
use crate::router_config::{RouterConfig, watch_router_config};
use crate::scrape::{PodLoads, ScrapeConfig, Scraper};
use crate::xds::{
    self, DataplaneRegistry, RoutingDiscoveryService, SnapshotPublisher, StreamSecurity, XdsMetrics,
};

mod compile_loop;
pub mod source_hold;

use compile_loop::{CompileLoop, LoopIo};

/// How long shutdown waits for every task (servers closing their connections,
/// the lease being released, this replica's report being deleted) before
/// aborting them; well under Kubernetes' default 30 s termination grace.
pub const SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(5);

/// How every source turns a burst of changes (an editor's write-rename
/// dance, `kubectl cp` of several files, a rollout restarting pods, `kubectl
/// apply -f dir`) into one compile: once quiet for 100 ms, so the burst is
/// read whole, and at the latest after 1 s, so a source that never stops
/// changing still converges. Both stay well inside the 2 s a change may take
/// to reach the dataplanes.
pub const OBJECT_CHANGE_DEBOUNCE: Debounce = Debounce {
    quiet: Duration::from_millis(100),
    max_delay: Duration::from_secs(1),
};

/// Where the controller's objects come from.
pub trait ObjectSource: Send + 'static {
    /// Reads the first complete object set and starts, on `tasks`, whatever
    /// keeps it current (debounced with [`OBJECT_CHANGE_DEBOUNCE`]).
    fn start(
        self,
        tasks: &mut TaskSet,
    ) -> impl Future<Output = Result<SourceStarted, ControllerError>> + Send;
}

/// A source that has read its first object set.
pub struct SourceStarted {
    /// The current object set, replaced on every change.
    pub objects: watch::Receiver<Arc<ObjectSet>>,
    pub on_serving: OnServing,
}

/// Called once the first snapshot is served: starts what needs the running
/// core (Kubernetes: election, status writing, dataplane reports) and
/// announces the mode.
pub type OnServing = Box<dyn FnOnce(&Serving, &mut TaskSet) + Send>;

/// What a source's duties may use of the running core.
#[derive(Clone, Debug)]
pub struct Serving {
    pub controller_id: String,
    pub publisher: Arc<SnapshotPublisher>,
    pub dataplanes: DataplaneRegistry,
    /// Every compile's result, the first one included.
    pub compiled: watch::Receiver<Arc<Compiled>>,
    pub pod_loads: watch::Receiver<PodLoads>,
    pub metrics: ControllerMetrics,
}

/// Serves the admin endpoints (not ready yet) and loads the router
/// configuration; nothing is read from a source or served on the stream yet.
/// The controller stops when `shutdown` is cancelled.
pub async fn begin(
    args: &Args,
    shutdown: CancellationToken,
) -> Result<StartingController, ControllerError> {
    let stream_security = StreamSecurity::load(&args.stream_security_files())?;
    let mut tasks = TaskSet::new(shutdown);
    let (admin_listener, admin_addr) = bind("admin", args.metrics_addr).await?;
    let (debug_listener, debug_addr) = bind("debug", args.debug_socket_addr()).await?;
    let controller_id = args.effective_controller_id();
    let gateway_api = args.gateway_api().map_err(ControllerError::InvalidFlag)?;
    let registry = Registry::new();
    let xds_metrics = XdsMetrics::register(&registry)?;
    let compile_duration = register_compile_duration(&registry)?;
    let metrics = ControllerMetrics::register(&registry)?;
    let publisher = Arc::new(SnapshotPublisher::new(
        controller_id.clone(),
        xds_metrics.clone(),
    ));
    let dataplanes = DataplaneRegistry::new();
    let (objects_view, objects_view_receiver) = watch::channel(Arc::new(ObjectsView::default()));
    let fairness = Arc::new(FairnessBoard::default());
    let admin_state = AdminState {
        fairness: fairness.clone(),
        metrics_registry: registry.clone(),
        publisher: publisher.clone(),
        dataplanes: dataplanes.clone(),
        objects: objects_view_receiver,
    };
    let debug_state = admin_state.clone();
    tasks.spawn_graceful("admin server", |stop| {
        admin::serve(
            admin_listener,
            admin_state,
            Endpoints::Admin,
            stop.cancelled_owned(),
        )
    });
    tasks.spawn_graceful("debug server", |stop| {
        admin::serve(
            debug_listener,
            debug_state,
            Endpoints::Debug,
            stop.cancelled_owned(),
        )
    });
    tracing::info!(addr = %admin_addr, debug = %debug_addr, "admin listening on {admin_addr}, debug on {debug_addr}");

    let router = match &args.router_config {
        Some(path) => {
            let (router, watcher) = watch_router_config(path.clone()).await?;
            tasks.spawn("router configuration watcher", watcher);
            router
        }
        // No file: dataplanes use their defaults, and there is nothing to watch.
        None => watch::channel(RouterConfig::default()).1,
    };
    Ok(StartingController {
        admin_addr,
        debug_addr,
        publisher,
        tasks,
        controller_id,
        registry,
        xds_metrics,
        compile_duration,
        metrics,
        dataplanes,
        objects_view,
        router,
        fairness,
        gateway_api,
        xds_addr: args.xds_addr,
        stream_security,
        empty_source_grace_period: args.empty_source_grace_period,
        scrape_config: ScrapeConfig {
            interval: args.scrape_interval,
            timeout: args.effective_scrape_timeout(),
            ..ScrapeConfig::default()
        },
    })
}

/// A controller between [`begin`] and [`StartingController::start`]: admin
/// endpoints up, not ready, no stream server.
pub struct StartingController {
    /// Where the admin server listens.
    pub admin_addr: SocketAddr,
    /// Where the debug server listens.
    pub debug_addr: SocketAddr,
    /// Empty until the first compile.
    pub publisher: Arc<SnapshotPublisher>,
    tasks: TaskSet,
    controller_id: String,
    registry: Registry,
    xds_metrics: XdsMetrics,
    compile_duration: HistogramVec,
    metrics: ControllerMetrics,
    dataplanes: DataplaneRegistry,
    objects_view: watch::Sender<Arc<ObjectsView>>,
    router: watch::Receiver<RouterConfig>,
    /// The fleet-wide fairness counters (also on the debug listener).
    fairness: Arc<FairnessBoard>,
    gateway_api: GatewayApiConfig,
    xds_addr: SocketAddr,
    stream_security: StreamSecurity,
    empty_source_grace_period: Duration,
    scrape_config: ScrapeConfig,
}

impl StartingController {
    /// Starts `source`, waits for its first object set, publishes the first
    /// snapshot, binds and serves the stream, then starts the source's duties.
    pub async fn start(self, source: impl ObjectSource) -> Result<Controller, ControllerError> {
        let mut tasks = self.tasks;
        let SourceStarted {
            mut objects,
            on_serving,
        } = source.start(&mut tasks).await?;
        let source_status = source_hold::hold_while_empty(
            &mut objects,
            self.empty_source_grace_period,
            &self.objects_view,
            &self.metrics.source_held,
        )
        .await;

        let (targets, scrape_targets) = watch::channel(Vec::new());
        let (pod_loads, scrape_loop) =
            Scraper::prepare(self.scrape_config, scrape_targets, &self.registry)?;
        tasks.spawn("engine scraper", scrape_loop.run());
        // The JWT issuer's keys, refetched on a schedule and when a dataplane
        // reports a token signed by a key it lacks (over the stream).
        let (jwks_keys_sender, jwks_keys) = watch::channel(Vec::new());
        let (key_hints, key_hints_receiver) = mpsc::channel(jwks::HINT_QUEUE_CAPACITY);
        tasks.spawn(
            "JWKS refresher",
            jwks::refresh_keys(
                self.router.clone(),
                key_hints_receiver,
                jwks_keys_sender,
                jwks::network_fetch(),
            ),
        );
        let ejections = Arc::new(EjectionBoard::default());
        let fairness = self.fairness;
        tasks.spawn(
            "fairness counters",
            fairness.clone().run(self.router.clone()),
        );
        let (compile_loop, compiled) = CompileLoop::start(LoopIo {
            objects,
            router: self.router,
            gateway_api: self.gateway_api,
            jwks_keys,
            pod_loads: pod_loads.clone(),
            ejections: ejections.subscribe(),
            fairness_counters: fairness.subscribe(),
            publisher: self.publisher.clone(),
            targets,
            objects_view: self.objects_view,
            source_status,
            metrics: self.metrics.clone(),
            compile_duration: self.compile_duration,
            ship_credentials: self.stream_security.protects_credentials(),
        });
        tasks.spawn("compile loop", compile_loop.run());

        let (xds_listener, xds_addr) = bind("snapshot stream", self.xds_addr).await?;
        let service = RoutingDiscoveryService::new(
            self.publisher.clone(),
            self.dataplanes.clone(),
            self.xds_metrics,
        )
        .with_key_hints(key_hints)
        .with_outlier_reports(ejections)
        .with_fairness_reports(fairness.clone());
        tracing::info!(
            security = ?self.stream_security,
            ships_provider_credentials = self.stream_security.protects_credentials(),
            "snapshot stream security"
        );
        let security = self.stream_security;
        tasks.spawn_graceful("snapshot stream server", |stop| {
            xds::serve(xds_listener, service, security, stop.cancelled_owned())
        });
        tracing::info!(addr = %xds_addr, "xds listening on {xds_addr}");

        on_serving(
            &Serving {
                controller_id: self.controller_id,
                publisher: self.publisher.clone(),
                dataplanes: self.dataplanes.clone(),
                compiled,
                pod_loads,
                metrics: self.metrics,
            },
            &mut tasks,
        );
        let shutdown = tasks.shutdown_token().clone();
        let supervisor = tokio::spawn(async move {
            let outcome = tasks.run(SHUTDOWN_GRACE_PERIOD).await;
            tracing::info!("controller stopped");
            outcome
        });
        Ok(Controller {
            xds_addr,
            admin_addr: self.admin_addr,
            debug_addr: self.debug_addr,
            publisher: self.publisher,
            dataplanes: self.dataplanes,
            stop_when_dropped: shutdown.clone().drop_guard(),
            shutdown,
            supervisor,
        })
    }
}

/// A running controller; dropping it stops it.
#[derive(Debug)]
pub struct Controller {
    /// Where the snapshot stream server listens (useful with port 0).
    pub xds_addr: SocketAddr,
    /// Where the admin server listens.
    pub admin_addr: SocketAddr,
    /// Where the debug server listens.
    pub debug_addr: SocketAddr,
    pub publisher: Arc<SnapshotPublisher>,
    pub dataplanes: DataplaneRegistry,
    shutdown: CancellationToken,
    supervisor: JoinHandle<Result<(), TaskError>>,
    stop_when_dropped: DropGuard,
}

impl Controller {
    /// Runs until the shutdown token is cancelled (then stops gracefully) or
    /// a task fails (then stops the rest and returns its error).
    pub async fn wait(self) -> Result<(), ControllerError> {
        let outcome = match self.supervisor.await {
            Ok(outcome) => outcome,
            Err(error) => Err(TaskError::Panicked {
                task: "controller supervisor",
                message: error.to_string(),
            }),
        };
        drop(self.stop_when_dropped);
        Ok(outcome?)
    }

    /// Stops every task and waits for the servers to close.
    pub async fn shutdown(self) -> Result<(), ControllerError> {
        self.shutdown.cancel();
        self.wait().await
    }
}

fn register_compile_duration(registry: &Registry) -> Result<HistogramVec, prometheus::Error> {
    let histogram = HistogramVec::new(
        HistogramOpts::new(
            "switchyard_controller_compile_duration_seconds",
            "Time to compile a resource from the current objects and loads.",
        )
        // 100 µs .. ~1.6 s: loads compile in microseconds, big route sets in milliseconds.
        .buckets(prometheus::exponential_buckets(0.000_1, 4.0, 8)?),
        &["type"],
    )?;
    registered(registry, histogram)
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use tokio::sync::oneshot;

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(10);

    /// A source with no objects whose one task fails when told to.
    struct FailingSource {
        fail: oneshot::Receiver<()>,
    }

    impl ObjectSource for FailingSource {
        async fn start(self, tasks: &mut TaskSet) -> Result<SourceStarted, ControllerError> {
            let (sender, objects) = watch::channel(Arc::new(ObjectSet::default()));
            let fail = self.fail;
            tasks.spawn("test watcher", async move {
                let _keep_open = sender;
                let _ = fail.await;
                Err::<(), _>(std::io::Error::other("watch connection lost"))
            });
            Ok(SourceStarted {
                objects,
                on_serving: Box::new(|core: &Serving, _: &mut TaskSet| core.metrics.leader.set(1)),
            })
        }
    }

    fn args() -> Args {
        Args::try_parse_from([
            "switchyard-controller",
            "--xds-addr=127.0.0.1:0",
            "--metrics-addr=127.0.0.1:0",
            // The default debug port may be another process's on a shared machine.
            "--debug-port=0",
            "--controller-id=core-test",
            // The test source is empty: publish it at once.
            "--empty-source-grace-period=0s",
        ])
        .expect("valid flags")
    }

    #[tokio::test]
    async fn a_failing_source_task_stops_the_whole_controller_and_is_named() {
        let (fail, failing) = oneshot::channel();
        let starting = begin(&args(), CancellationToken::new())
            .await
            .expect("admin up");
        assert!(starting.publisher.route_config().is_none());
        let controller = starting
            .start(FailingSource { fail: failing })
            .await
            .expect("starts");
        assert!(
            controller.publisher.route_config().is_some(),
            "published before start returns"
        );
        let (admin_addr, xds_addr) = (controller.admin_addr, controller.xds_addr);
        tokio::net::TcpStream::connect(admin_addr)
            .await
            .expect("admin serves");

        let _ = fail.send(());
        let error = tokio::time::timeout(DEADLINE, controller.wait())
            .await
            .expect("stops in time")
            .expect_err("a task failure is the controller's failure");
        assert!(
            matches!(
                &error,
                ControllerError::Task(TaskError::Failed {
                    task: "test watcher",
                    ..
                })
            ),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            "the test watcher task failed: watch connection lost"
        );
        assert_eq!(error.exit_code(), crate::error::EXIT_FAILURE);
        // Every other task stopped with it: both servers are closed.
        for addr in [admin_addr, xds_addr] {
            assert!(
                tokio::net::TcpStream::connect(addr).await.is_err(),
                "{addr} still accepts connections"
            );
        }
    }

    #[tokio::test]
    async fn dropping_a_running_controller_stops_it() {
        let (_fail, failing) = oneshot::channel();
        let controller = begin(&args(), CancellationToken::new())
            .await
            .expect("admin up")
            .start(FailingSource { fail: failing })
            .await
            .expect("starts");
        let admin_addr = controller.admin_addr;
        drop(controller);
        tokio::time::timeout(DEADLINE, async {
            while tokio::net::TcpStream::connect(admin_addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the admin server closes");
    }
}
