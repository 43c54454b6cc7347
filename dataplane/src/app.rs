//! Wires the dataplane together: snapshot store, controller stream, listeners.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::Admin;
use crate::cli::{Args, LogFormat};
use crate::config_file::ConfigFile;
use crate::metrics::{ObservedStore, RouterMetrics};
use crate::proxy::log::Observer;
use crate::proxy::log::access_log::{AccessLog, AccessLogConfig};
use crate::proxy::{Proxy, ProxyBody, ProxyConfig};
use crate::rate_limit::RateLimiting;
use crate::scheduling::SchedulingShared;
use crate::scheduling::metrics::PluginMetrics;
use crate::snapshot::SnapshotStore;
use crate::xds_client::{self, ControllerStatus, XdsClientConfig};

/// On SIGTERM, in-flight requests (long SSE streams included) get this long to
/// finish; matches a typical terminationGracePeriodSeconds minus headroom.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);

/// Why the dataplane could not run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Logs to stderr, so stdout stays free for access logs (and `--log-format
/// json` makes every line JSON, for collectors that read both streams).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Runs the dataplane until `shutdown` resolves, then drains.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
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

    let metrics = RouterMetrics::new()?;
    let plugin_metrics = PluginMetrics::register(metrics.registry())?;
    let rate_limiting = Arc::new(RateLimiting::new(Some(metrics.registry()))?);
    let store = Arc::new(
        SnapshotStore::with_scheduling(Arc::new(SchedulingShared::new(Some(plugin_metrics))))
            .with_rate_limiting(rate_limiting),
    );
    let status = Arc::new(ControllerStatus::default());
    let access_log = AccessLog::start(&access_log_config, metrics.access_log_dropped_total.clone())
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
    let proxy = Arc::new(Proxy::new(
        store.clone(),
        ProxyConfig {
            max_body_bytes: args.max_body_bytes,
        },
        Arc::new(Observer {
            metrics: metrics.clone(),
            access_log,
        }),
    ));
    let sink = Arc::new(ObservedStore {
        store: store.clone(),
        metrics,
    });

    let traffic = bind(traffic_addr).await?;
    let metrics = bind(metrics_addr).await?;
    let debug = bind(debug_addr).await?;
    tracing::info!(traffic = %traffic_addr, metrics = %metrics_addr, debug = %debug_addr, "switchyard-dataplane listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    let xds = xds_client::spawn(
        XdsClientConfig {
            controller,
            node_id: args.resolved_node_id(),
            ..XdsClientConfig::default()
        },
        sink,
        status.clone(),
        store.unknown_keys().clone(),
        wait_for_stop(stop_rx.clone()),
    );

    let idle_timeout = args.idle_timeout;
    let expose_metrics = args.expose_metrics_on_router_port;
    let traffic_admin = admin.clone();
    let traffic_server = tokio::spawn(serve(
        traffic,
        idle_timeout,
        stop_rx.clone(),
        move |request| {
            let proxy = proxy.clone();
            let admin = traffic_admin.clone();
            async move {
                if expose_metrics && request.uri().path() == "/metrics" {
                    return admin.handle_metrics_port(&request);
                }
                proxy.handle(request).await
            }
        },
    ));
    let metrics_admin = admin.clone();
    let metrics_server = tokio::spawn(serve(
        metrics,
        idle_timeout,
        stop_rx.clone(),
        move |request| {
            let admin = metrics_admin.clone();
            async move { admin.handle_metrics_port(&request) }
        },
    ));
    let debug_server = tokio::spawn(serve(debug, idle_timeout, stop_rx, move |request| {
        let admin = admin.clone();
        async move { admin.handle_debug_port(&request) }
    }));

    shutdown.await;
    tracing::info!("shutting down: draining in-flight requests");
    let _ = stop_tx.send(true);
    let _ = tokio::join!(traffic_server, metrics_server, debug_server, xds);
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { addr, source })
}

async fn wait_for_stop(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Accepts HTTP/1.1 and HTTP/2 connections until `stop`, then waits up to
/// [`DRAIN_TIMEOUT`] for open connections to finish.
///
/// `idle_timeout` bounds both the wait for a request's headers and the idle
/// time of a keep-alive connection (hyper starts the same timer whenever it
/// waits for the next request head), so slow or idle clients cannot hold
/// connections forever.
pub async fn serve<H, F>(
    listener: TcpListener,
    idle_timeout: Duration,
    stop: watch::Receiver<bool>,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(idle_timeout / 2))
        .keep_alive_timeout(idle_timeout / 2);
    let graceful = GracefulShutdown::new();
    let stopped = wait_for_stop(stop);
    tokio::pin!(stopped);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(error = %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stopped => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |request| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(request).await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // HTTP version detection waits for the first bytes without a
            // timeout of its own, so a client that connects and sends nothing
            // is bounded here; hyper's header timeout covers the rest.
            let mut first = [0u8; 1];
            match tokio::time::timeout(idle_timeout, stream.peek(&mut first)).await {
                Ok(Ok(read)) if read > 0 => {}
                _ => return,
            }
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(peer = %peer, error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
}
