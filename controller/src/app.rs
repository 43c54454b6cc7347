//! Wires local mode together: config directory watcher -> compile -> publish
//! -> snapshot stream server, plus the engine scraper and the admin server.
//! Kubernetes mode (no `--config-dir`) lives in [`crate::kubernetes`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{HistogramOpts, HistogramVec, Registry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState, ObjectsView};
use crate::cli::{Args, EXIT_USAGE, LogFormat};
use crate::compile_loop::{CompileInputs, CompileLoop};
use crate::local::{self, LocalError, WatchSettings};
use crate::metrics::ControllerMetrics;
use crate::router_config::{RouterConfigError, watch_optional_router_config};
use crate::scrape::{ScrapeConfig, Scraper, ScraperError};
use crate::xds::{self, DataplaneRegistry, RoutingDiscoveryService, SnapshotPublisher, XdsMetrics};

/// How long shutdown waits for the servers to close their connections before
/// giving up on them; well under Kubernetes' default 30 s termination grace.
pub const SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(5);
/// Exit code when the config directory cannot be read (BSD `EX_NOINPUT`).
pub const EXIT_NO_INPUT: i32 = 66;
/// Exit code when Kubernetes mode finds no cluster credentials (BSD `EX_CONFIG`).
pub const EXIT_CONFIG: i32 = 78;
/// Exit code of every other failure.
pub const EXIT_FAILURE: i32 = 1;
/// Log filter when `RUST_LOG` is unset.
const DEFAULT_LOG_FILTER: &str = "info";

/// Why the controller could not start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("local mode needs --config-dir DIR (or SWITCHYARD_CONFIG_DIR)")]
    KubernetesModeUnavailable,
    #[error(transparent)]
    Kubernetes(#[from] crate::kubernetes::KubernetesError),
    #[error("cannot listen on {addr} for the {server} server: {source}")]
    Bind {
        server: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] LocalError),
    #[error("registering metrics failed: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("starting the engine scraper failed: {0}")]
    Scraper(#[from] ScraperError),
    #[error("the snapshot stream server failed: {0}")]
    Xds(#[from] tonic::transport::Error),
    #[error("the {0} task ended unexpectedly")]
    TaskEnded(&'static str),
    #[error(transparent)]
    RouterConfig(#[from] RouterConfigError),
}

impl AppError {
    /// Process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::KubernetesModeUnavailable | Self::Scraper(ScraperError::InvalidConfig(_)) => {
                EXIT_USAGE
            }
            Self::Config(_) | Self::RouterConfig(RouterConfigError::Read { .. }) => EXIT_NO_INPUT,
            Self::Kubernetes(_) => EXIT_CONFIG,
            Self::RouterConfig(_) => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }
}

/// Installs the global `tracing` subscriber (logs go to stderr; `RUST_LOG` filters).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init` fails only when a subscriber is already set (tests): keep that one.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!(signal = "SIGINT", "shutting down"),
        () = terminate => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
}

/// Runs the controller in the mode `args` select until `shutdown` completes.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    if args.config_dir.is_none() {
        return crate::kubernetes::run(args, shutdown).await;
    }
    run_local(args, shutdown).await
}

/// Local mode: objects from `--config-dir`, until `shutdown` completes.
pub async fn run_local(args: Args, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    start_local(&args).await?.run_until(shutdown).await
}

/// A running local-mode controller.
#[derive(Debug)]
pub struct LocalController {
    /// Where the snapshot stream server listens (useful with port 0).
    pub xds_addr: SocketAddr,
    /// Where the admin server listens.
    pub admin_addr: SocketAddr,
    pub publisher: Arc<SnapshotPublisher>,
    pub dataplanes: DataplaneRegistry,
    /// Status-write and leader metrics, for whoever writes status.
    pub metrics: ControllerMetrics,
    stop: Arc<watch::Sender<bool>>,
    task: JoinHandle<Result<(), AppError>>,
}

impl LocalController {
    /// Runs until `shutdown` completes (then stops gracefully) or a part fails.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
        tokio::select! {
            () = shutdown => self.shutdown().await,
            joined = &mut self.task => joined.unwrap_or(Err(AppError::TaskEnded("controller"))),
        }
    }

    /// Stops every part and waits for the servers to close.
    pub async fn shutdown(self) -> Result<(), AppError> {
        self.stop.send_replace(true);
        self.task
            .await
            .unwrap_or(Err(AppError::TaskEnded("controller")))
    }
}

/// Starts local mode: binds both servers, loads the directory, publishes the
/// first snapshot (so the controller is ready when this returns) and starts
/// the watcher, scraper and servers in the background.
pub async fn start_local(args: &Args) -> Result<LocalController, AppError> {
    let Some(config_dir) = args.config_dir.as_deref() else {
        return Err(AppError::KubernetesModeUnavailable);
    };
    let controller_id = args.effective_controller_id();
    let xds_listener = bind("snapshot stream", args.xds_addr).await?;
    let admin_listener = bind("admin", args.metrics_addr).await?;
    let xds_addr = local_addr(&xds_listener, "snapshot stream", args.xds_addr)?;
    let admin_addr = local_addr(&admin_listener, "admin", args.metrics_addr)?;

    let registry = Registry::new();
    let xds_metrics = XdsMetrics::register(&registry)?;
    let compile_duration = register_compile_duration(&registry)?;
    let controller_metrics = ControllerMetrics::register(&registry)?;
    // Local mode runs one controller: it is the leader.
    controller_metrics.leader.set(1);
    let publisher = Arc::new(SnapshotPublisher::new(
        controller_id.clone(),
        xds_metrics.clone(),
    ));
    let dataplanes = DataplaneRegistry::new();

    let (scheduler, router_config_watcher) =
        watch_optional_router_config(args.router_config.as_deref()).await?;
    let (objects, watcher) =
        match local::watch_dir(config_dir.to_owned(), WatchSettings::default()).await {
            Ok(watching) => watching,
            Err(error) => {
                if let Some(task) = &router_config_watcher {
                    task.abort();
                }
                return Err(error.into());
            }
        };
    let (targets_sender, targets) = watch::channel(Vec::new());
    let scrape_config = ScrapeConfig {
        interval: args.scrape_interval,
        timeout: args.effective_scrape_timeout(),
        ..ScrapeConfig::default()
    };
    let scraper = match Scraper::spawn(scrape_config, targets, &registry) {
        Ok(scraper) => scraper,
        Err(error) => {
            watcher.abort();
            if let Some(task) = &router_config_watcher {
                task.abort();
            }
            return Err(error.into());
        }
    };

    let (objects_view_sender, objects_view) = watch::channel(Arc::new(ObjectsView::default()));
    let mut compile_loop = CompileLoop::new(CompileInputs {
        source: "config directory watcher",
        objects,
        publisher: publisher.clone(),
        targets: targets_sender,
        objects_view: objects_view_sender,
        compiled_out: watch::channel(None).0,
        compile_duration,
        pod_loads: scraper.loads.clone(),
        scheduler,
    });
    compile_loop.on_objects_changed();

    let (stop_sender, stop) = watch::channel(false);
    let stop_sender = Arc::new(stop_sender);
    let service = RoutingDiscoveryService::new(publisher.clone(), dataplanes.clone(), xds_metrics);
    let xds_task = tokio::spawn(xds::serve(xds_listener, service, stopped(stop.clone())));
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        AdminState {
            metrics_registry: registry,
            publisher: publisher.clone(),
            dataplanes: dataplanes.clone(),
            objects: objects_view,
        },
        stopped(stop.clone()),
    ));
    tracing::info!(addr = %xds_addr, "xds listening on {xds_addr}");
    tracing::info!(addr = %admin_addr, "admin listening on {admin_addr}");
    tracing::info!(controller_id = %controller_id, config_dir = %config_dir.display(), "controller started in local mode");

    let task = tokio::spawn(supervise(Parts {
        compile_loop,
        stop_sender: stop_sender.clone(),
        stop,
        xds_task,
        admin_task,
        scraper,
        watcher,
        router_config_watcher,
    }));
    Ok(LocalController {
        xds_addr,
        admin_addr,
        publisher,
        dataplanes,
        metrics: controller_metrics,
        stop: stop_sender,
        task,
    })
}

/// Binds a listener for `server`, naming it in the error.
pub(crate) async fn bind(server: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind {
            server,
            addr,
            source,
        })
}

pub(crate) fn local_addr(
    listener: &TcpListener,
    server: &'static str,
    addr: SocketAddr,
) -> Result<SocketAddr, AppError> {
    listener.local_addr().map_err(|source| AppError::Bind {
        server,
        addr,
        source,
    })
}

pub(crate) fn register_compile_duration(
    registry: &Registry,
) -> Result<HistogramVec, prometheus::Error> {
    let histogram = HistogramVec::new(
        HistogramOpts::new(
            "switchyard_controller_compile_duration_seconds",
            "Time to compile a resource from the current objects and loads.",
        )
        // 100 µs .. ~1.6 s: loads compile in microseconds, big route sets in milliseconds.
        .buckets(prometheus::exponential_buckets(0.000_1, 4.0, 8)?),
        &["type"],
    )?;
    registry.register(Box::new(histogram.clone()))?;
    Ok(histogram)
}

/// Completes once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

struct Parts {
    compile_loop: CompileLoop,
    stop_sender: Arc<watch::Sender<bool>>,
    stop: watch::Receiver<bool>,
    xds_task: JoinHandle<Result<(), tonic::transport::Error>>,
    admin_task: JoinHandle<()>,
    scraper: Scraper,
    watcher: JoinHandle<()>,
    router_config_watcher: Option<JoinHandle<()>>,
}

/// Runs the compile loop until stopped or until the stream server dies, then stops the rest.
async fn supervise(parts: Parts) -> Result<(), AppError> {
    let Parts {
        compile_loop,
        stop_sender,
        stop,
        mut xds_task,
        admin_task,
        scraper,
        watcher,
        router_config_watcher,
    } = parts;
    let outcome = tokio::select! {
        // On shutdown both branches complete; the stop is what happened, not a server failure.
        biased;
        () = compile_loop.run(stop) => Ok(()),
        joined = &mut xds_task => Err(match joined {
            Ok(Err(error)) => AppError::Xds(error),
            _ => AppError::TaskEnded("snapshot stream server"),
        }),
    };
    if let Err(error) = &outcome {
        tracing::error!(%error, "stopping the controller");
    }
    stop_sender.send_replace(true);
    scraper.task.abort();
    watcher.abort();
    if let Some(task) = router_config_watcher {
        task.abort();
    }
    let servers = async {
        if !xds_task.is_finished()
            && let Ok(Err(error)) = (&mut xds_task).await
        {
            tracing::warn!(%error, "snapshot stream server failed while shutting down");
        }
        let _ = admin_task.await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE_PERIOD, servers)
        .await
        .is_err()
    {
        tracing::warn!(grace_period = ?SHUTDOWN_GRACE_PERIOD, "servers did not close in time; dropping their connections");
        xds_task.abort();
    }
    tracing::info!("controller stopped");
    outcome
}

pub(crate) fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}
