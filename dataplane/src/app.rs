//! Wires the dataplane together: snapshot store, controller stream, the
//! traffic workers, the metrics and debug servers, all supervised by one task
//! set. This runs on the control thread; the traffic workers run on their own
//! threads (see [`workers`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_runtime::{BindError, CancellationToken, TaskError, TaskSet, bind};

use crate::admin::Admin;
use crate::cli::Args;
use crate::config_file::ConfigFile;
use crate::limits::{ADMIN_MAX_CONNECTIONS, BodyBudget, BodyDeadline, ConnectionLimit};
use crate::metrics::{ObservedStore, RouterMetrics};
use crate::per_worker;
use crate::proxy::log::Observer;
use crate::proxy::log::access_log::{AccessLogConfig, AccessLogWriter};
use crate::proxy::{BodyLimits, Proxy, ProxyConfig};
use crate::rate_limit::RateLimiting;
use crate::scheduling::SchedulingShared;
use crate::scheduling::metrics::PluginMetrics;
use crate::server::{ConnectionSettings, DRAIN_TIMEOUT, bind_traffic_listeners, serve};
use crate::snapshot::SnapshotStore;
use crate::workers::{self, TrafficWorker};
use crate::xds_client::{self, ControllerStatus, XdsClientConfig};

/// How long shutdown waits for every task: the servers give up draining
/// after [`DRAIN_TIMEOUT`] themselves, so this only bounds a task stuck past it.
pub const SHUTDOWN_GRACE_PERIOD: Duration = DRAIN_TIMEOUT.saturating_add(Duration::from_secs(2));

/// Why the dataplane could not run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error("cannot start the control thread's runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Builds the control thread's runtime and runs the dataplane on it until
/// SIGINT or SIGTERM, then drains.
pub fn main(args: Args) -> Result<(), AppError> {
    // One thread: the controller stream and the admin listeners are idle
    // almost always, and the traffic workers have their own threads.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AppError::Runtime)?;
    runtime.block_on(async {
        let shutdown = switchyard_runtime::cancel_on_signal();
        run(args, shutdown).await
    })
}

/// Runs the dataplane until `shutdown` is cancelled, then drains.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), AppError> {
    let controller: http::Uri = args.controller.parse().map_err(|error| {
        AppError::Config(format!("--controller {:?}: {error}", args.controller))
    })?;
    let traffic_addr = SocketAddr::new(args.host, args.port);
    let metrics_addr = SocketAddr::new(args.host, args.metrics_port);
    let debug_addr = SocketAddr::new(args.debug_addr, args.debug_port);

    let config_file = match &args.config {
        Some(path) => {
            ConfigFile::load(path).map_err(|error| AppError::Config(error.to_string()))?
        }
        None => ConfigFile::default(),
    };
    let access_log_config = AccessLogConfig::resolve(config_file.access_logger.as_ref(), |name| {
        std::env::var(name).ok()
    })
    .map_err(|error| AppError::Config(error.to_string()))?;

    // Fixed before any snapshot state exists: it sizes every per-worker slot set.
    let worker_count = args.resolved_workers();
    per_worker::set_count(worker_count);
    let metrics = RouterMetrics::new()?;
    let plugin_metrics = PluginMetrics::register(metrics.registry())?;
    let rate_limiting = Arc::new(RateLimiting::new(Some(metrics.registry()))?);
    let store = Arc::new(
        SnapshotStore::with_scheduling(Arc::new(SchedulingShared::new(Some(plugin_metrics))))
            .with_rate_limiting(rate_limiting),
    );
    let status = Arc::new(ControllerStatus::default());
    let access_log =
        AccessLogWriter::start(&access_log_config, metrics.access_log_dropped_total.clone())
            .map_err(|error| {
                AppError::Config(format!(
                    "cannot open the access log {:?}: {error}",
                    access_log_config.output
                ))
            })?;
    let admin = Arc::new(Admin {
        store: store.clone(),
        controller: status.clone(),
        metrics: metrics.clone(),
    });
    let sink = Arc::new(ObservedStore {
        store: store.clone(),
        metrics: metrics.clone(),
    });

    let traffic = bind_traffic_listeners(traffic_addr, worker_count)?;
    let (metrics_listener, _) = bind("metrics", metrics_addr).await?;
    let (debug_listener, _) = bind("debug", debug_addr).await?;
    tracing::info!(traffic = %traffic_addr, workers = worker_count, metrics = %metrics_addr, debug = %debug_addr, "switchyard-dataplane listening");

    let mut tasks = TaskSet::new(shutdown);
    let unknown_keys = store.unknown_keys().clone();
    let xds_config = XdsClientConfig {
        controller,
        node_id: args.resolved_node_id(),
        ..XdsClientConfig::default()
    };
    tasks.spawn_graceful("controller stream client", |stop| {
        xds_client::run_on_own_thread(xds_config, sink, status, unknown_keys, stop)
    });

    let proxy_config = ProxyConfig {
        body: BodyLimits {
            max_bytes: args.max_body_bytes,
            deadline: BodyDeadline {
                grace: args.body_read_grace,
                min_bytes_per_sec: args.min_body_rate,
            },
        },
        // One budget, split into a share per worker.
        body_budget: Arc::new(BodyBudget::new(
            args.body_budget_bytes,
            worker_count,
            args.max_body_bytes,
        )),
    };
    let settings = |max_connections| ConnectionSettings {
        idle_timeout: args.idle_timeout,
        limit: ConnectionLimit::new(max_connections),
    };
    // One limit for all workers: it is taken per connection, not per request.
    let traffic_settings = settings(args.max_connections);
    let metrics_on_traffic_port = args.expose_metrics_on_router_port.then(|| admin.clone());
    for (index, listener) in traffic.into_iter().enumerate() {
        let worker = TrafficWorker {
            index,
            listener,
            // Its own observer: what requests count on is the worker's alone.
            proxy: Proxy::new(
                store.clone(),
                proxy_config.clone(),
                Arc::new(Observer {
                    metrics: metrics.clone(),
                    access_log: access_log.worker_log(),
                }),
            ),
            metrics_on_traffic_port: metrics_on_traffic_port.clone(),
            settings: traffic_settings.clone(),
        };
        tasks.spawn_graceful("traffic worker", |stop| workers::run(worker, stop));
    }
    let metrics_admin = admin.clone();
    tasks.spawn_graceful("metrics server", |stop| {
        serve(
            metrics_listener,
            settings(ADMIN_MAX_CONNECTIONS),
            stop,
            move |request| {
                let admin = metrics_admin.clone();
                async move { admin.handle_metrics_port(&request) }
            },
        )
    });
    tasks.spawn_graceful("debug server", |stop| {
        serve(
            debug_listener,
            settings(ADMIN_MAX_CONNECTIONS),
            stop,
            move |request| {
                let admin = admin.clone();
                async move { admin.handle_debug_port(&request) }
            },
        )
    });
    tasks.spawn_graceful("shutdown notice", |stop| async move {
        stop.cancelled().await;
        tracing::info!("shutting down: draining in-flight requests");
    });
    let stopped = tasks.run(SHUTDOWN_GRACE_PERIOD).await;
    // The workers are done: write the lines they handed over.
    access_log.close();
    Ok(stopped?)
}
