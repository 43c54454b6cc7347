//! Wires the dataplane together: snapshot store, controller stream, the
//! traffic workers, the Gateway listener ports, the metrics and debug servers
//! and the endpoint picker, all supervised by one task set. This runs on the
//! control thread; the traffic workers, which serve the traffic port and the
//! Gateway listener ports, run on their own threads (see [`workers`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use switchyard_runtime::{BindError, CancellationToken, TaskError, TaskSet, bind};
use tokio::net::TcpListener;

use crate::admin::Admin;
use crate::cli::Args;
use crate::config_file::ConfigFile;
use crate::endpoint_picker::{EndpointPicker, serve_endpoint_picker};
use crate::fairness::{Fairness, FairnessMetrics};
use crate::limits::{ADMIN_MAX_CONNECTIONS, BodyBudget, BodyDeadline, ConnectionLimit};
use crate::listener_ports::{PortSettings, PortStates, open_listener_ports};
use crate::metrics::RouterMetrics;
use crate::per_worker;
use crate::providers::ProviderClients;
use crate::proxy::forward::Http1Upstream;
use crate::proxy::log::Observer;
use crate::proxy::log::access_log::{AccessLogConfig, AccessLogWriter};
use crate::proxy::{BodyLimits, Proxy, ProxyBody, ProxyConfig};
use crate::rate_limit::RateLimiting;
use crate::scheduling::SchedulingShared;
use crate::scheduling::metrics::PluginMetrics;
use crate::server::{ConnectionSettings, DRAIN_TIMEOUT, bind_worker_listeners, serve};
use crate::snapshot::SnapshotStore;
use crate::workers::{self, TrafficWorker};
use crate::xds_client::{self, ControllerStatus, XdsClientConfig};

/// How long shutdown waits for every task: the servers give up draining
/// after [`DRAIN_TIMEOUT`] themselves, so this only bounds a task stuck past it.
pub const SHUTDOWN_GRACE_PERIOD: Duration = DRAIN_TIMEOUT.saturating_add(Duration::from_secs(2));

/// Answers a request on one of the admin ports.
type AdminHandler = fn(&Admin, &Request<Incoming>) -> Response<ProxyBody>;

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

/// The TLS settings and token of the controller stream, from the flags.
fn stream_credentials(
    args: &Args,
    controller: &http::Uri,
) -> Result<xds_client::StreamCredentials, AppError> {
    let read = |path: &std::path::Path, flag: &str| {
        std::fs::read(path)
            .map_err(|error| AppError::Config(format!("{flag} {}: {error}", path.display())))
    };
    let https = controller.scheme_str() == Some("https");
    let mut credentials = xds_client::StreamCredentials::default();
    if https {
        // The stream's certificate comes from the cluster's own CA, never a public one.
        let ca = args.controller_ca.as_deref().ok_or_else(|| {
            AppError::Config(
                "an https:// --controller needs --controller-ca (the CA that signed the controller's certificate)".to_owned(),
            )
        })?;
        let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(read(ca, "--controller-ca")?),
        );
        match (&args.controller_cert, &args.controller_key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read(cert, "--controller-cert")?,
                    read(key, "--controller-key")?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(AppError::Config(
                    "--controller-cert and --controller-key go together".to_owned(),
                ));
            }
        }
        credentials.tls = Some(tls);
    } else if args.controller_ca.is_some()
        || args.controller_cert.is_some()
        || args.controller_token_file.is_some()
    {
        return Err(AppError::Config(
            "--controller-ca, --controller-cert and --controller-token-file need an https:// --controller (the token would travel in clear)".to_owned(),
        ));
    }
    if let Some(path) = &args.controller_token_file {
        let token = read(path, "--controller-token-file")?;
        let token = String::from_utf8_lossy(&token).trim().to_owned();
        let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {token}").parse().map_err(|_| {
                AppError::Config(format!(
                    "--controller-token-file {}: not a valid header value",
                    path.display()
                ))
            })?;
        value.set_sensitive(true);
        credentials.authorization = Some(value);
    }
    Ok(credentials)
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
            .with_rate_limiting(rate_limiting)
            .with_fairness(Arc::new(Fairness::new(FairnessMetrics {
                queue_size: metrics.fairness_queue_size.clone(),
                queue_duration: metrics.fairness_queue_duration_seconds.clone(),
            })))
            .with_table_observer(metrics.clone()),
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
        listener_ports: Arc::new(PortStates::default()),
    });
    let provider_clients = ProviderClients::new(args.provider_ca_bundle.as_deref())
        .map_err(|error| AppError::Config(error.to_string()))?;

    let traffic = bind_worker_listeners("traffic", traffic_addr, worker_count)?;
    let (metrics_listener, _) = bind("metrics", metrics_addr).await?;
    let (debug_listener, _) = bind("debug", debug_addr).await?;
    tracing::info!(traffic = %traffic_addr, workers = worker_count, metrics = %metrics_addr, debug = %debug_addr, "switchyard-dataplane listening");

    let mut tasks = TaskSet::new(shutdown);
    let unknown_keys = store.unknown_keys().clone();
    let sink = store.clone();
    let xds_config = XdsClientConfig {
        security: stream_credentials(&args, &controller)?,
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
        traffic_port: args.port,
    };
    let settings = |max_connections| ConnectionSettings {
        idle_timeout: args.idle_timeout,
        limit: ConnectionLimit::new(max_connections),
    };
    // One limit for all workers and all their ports (the traffic port and
    // every Gateway listener port): it is taken per connection, not per request.
    let traffic_settings = settings(args.max_connections);
    let metrics_on_traffic_port = args.expose_metrics_on_router_port.then(|| admin.clone());
    // Each proxy has its own pools: pods over the HTTP/1.1 client, providers
    // over HTTPS clients built from the one trust configuration.
    let proxy = |access_log| {
        let observer = Arc::new(Observer {
            metrics: metrics.clone(),
            access_log,
        });
        let upstream = Http1Upstream::new(metrics.health.connections.clone())
            .with_providers(provider_clients.with_own_pools());
        Proxy::with_upstream(store.clone(), proxy_config.clone(), observer, upstream)
    };
    let mut listener_port_senders = Vec::with_capacity(worker_count);
    for (index, listener) in traffic.into_iter().enumerate() {
        let (sender, listener_ports) = tokio::sync::mpsc::unbounded_channel();
        listener_port_senders.push(sender);
        let worker = TrafficWorker {
            index,
            listener,
            listener_ports,
            // Its own observer: what requests count on is the worker's alone.
            proxy: proxy(access_log.worker_log()),
            metrics_on_traffic_port: metrics_on_traffic_port.clone(),
            settings: traffic_settings.clone(),
        };
        tasks.spawn_graceful("traffic worker", |stop| workers::run(worker, stop));
    }
    // The workers run: from here on this thread (and what it starts) yields to them.
    per_worker::run_below_traffic_workers();
    // Gateway listener ports come and go with snapshots: opened here, one
    // listener per worker, and served by the workers.
    let port_settings = PortSettings {
        host: args.host,
        reserved: [args.port, args.metrics_port, args.debug_port].into(),
    };
    let listener_ports = store.listener_ports();
    let port_states = admin.listener_ports.clone();
    tasks.spawn_graceful("Gateway listener ports", |stop| {
        open_listener_ports(
            listener_ports,
            port_settings,
            port_states,
            listener_port_senders,
            stop,
        )
    });
    // The two admin ports serve their own views of the same state.
    let admin_ports: [(&'static str, TcpListener, AdminHandler); 2] = [
        (
            "metrics server",
            metrics_listener,
            Admin::handle_metrics_port,
        ),
        ("debug server", debug_listener, Admin::handle_debug_port),
    ];
    for (name, listener, handle) in admin_ports {
        let admin = admin.clone();
        tasks.spawn_graceful(name, |stop| {
            serve(
                listener,
                settings(ADMIN_MAX_CONNECTIONS),
                stop,
                move |request| {
                    let admin = admin.clone();
                    async move { handle(&admin, &request) }
                },
            )
        });
    }
    if let (Some(port), Some(pool)) = (args.endpoint_picker_port, args.endpoint_picker_pool) {
        let (listener, addr) = bind("endpoint picker", SocketAddr::new(args.host, port)).await?;
        tracing::info!(%addr, %pool, "endpoint picker (ext_proc) listening");
        let picker = EndpointPicker::new(store.clone(), pool, args.max_body_bytes);
        tasks.spawn_graceful("endpoint picker", |stop| {
            serve_endpoint_picker(listener, picker, stop)
        });
    }
    tasks.spawn_graceful("shutdown notice", |stop| async move {
        stop.cancelled().await;
        tracing::info!("shutting down: draining in-flight requests");
    });
    let stopped = tasks.run(SHUTDOWN_GRACE_PERIOD).await;
    // The workers are done: write the lines they handed over.
    access_log.close();
    Ok(stopped?)
}
