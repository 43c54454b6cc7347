//! Wires the dataplane together: snapshot store, controller stream, the
//! traffic, metrics and debug servers, all supervised by one task set.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_runtime::{BindError, CancellationToken, TaskError, TaskSet, bind};

use crate::admin::Admin;
use crate::cli::Args;
use crate::config_file::ConfigFile;
use crate::endpoint_picker::{EndpointPicker, serve_endpoint_picker};
use crate::fairness::{Fairness, FairnessMetrics};
use crate::gateway::Arrival;
use crate::limits::{ADMIN_MAX_CONNECTIONS, BodyDeadline, ConnectionLimit};
use crate::listener_ports::{PortSettings, PortStates, serve_listener_ports};
use crate::metrics::{ObservedStore, RouterMetrics};
use crate::providers::ProviderClients;
use crate::proxy::forward::HyperUpstream;
use crate::proxy::log::Observer;
use crate::proxy::log::access_log::{AccessLog, AccessLogConfig};
use crate::proxy::{BodyLimits, Proxy, ProxyConfig};
use crate::rate_limit::RateLimiting;
use crate::scheduling::SchedulingShared;
use crate::scheduling::metrics::PluginMetrics;
use crate::server::{ConnectionSettings, DRAIN_TIMEOUT, serve};
use crate::snapshot::SnapshotStore;
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

    let metrics = RouterMetrics::new()?;
    let plugin_metrics = PluginMetrics::register(metrics.registry())?;
    let rate_limiting = Arc::new(RateLimiting::new(Some(metrics.registry()))?);
    let store = Arc::new(
        SnapshotStore::with_scheduling(Arc::new(SchedulingShared::new(Some(plugin_metrics))))
            .with_rate_limiting(rate_limiting)
            .with_fairness(Arc::new(Fairness::new(FairnessMetrics {
                queue_size: metrics.fairness_queue_size.clone(),
                queue_duration: metrics.fairness_queue_duration_seconds.clone(),
            }))),
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
        listener_ports: Arc::new(PortStates::default()),
    });
    let provider_clients = ProviderClients::new(args.provider_ca_bundle.as_deref())
        .map_err(|error| AppError::Config(error.to_string()))?;
    let proxy = Arc::new(Proxy::with_upstream(
        store.clone(),
        ProxyConfig {
            body: BodyLimits {
                max_bytes: args.max_body_bytes,
                deadline: BodyDeadline {
                    grace: args.body_read_grace,
                    min_bytes_per_sec: args.min_body_rate,
                },
            },
            body_budget_bytes: args.body_budget_bytes,
        },
        Arc::new(Observer {
            metrics: metrics.clone(),
            access_log,
        }),
        HyperUpstream::with_providers(metrics.health.connections.clone(), Some(provider_clients)),
    ));
    let sink = Arc::new(ObservedStore {
        store: store.clone(),
        metrics,
    });

    let (traffic, _) = bind("traffic", traffic_addr).await?;
    let (metrics, _) = bind("metrics", metrics_addr).await?;
    let (debug, _) = bind("debug", debug_addr).await?;
    tracing::info!(traffic = %traffic_addr, metrics = %metrics_addr, debug = %debug_addr, "switchyard-dataplane listening");

    let mut tasks = TaskSet::new(shutdown);
    let unknown_keys = store.unknown_keys().clone();
    let xds_config = XdsClientConfig {
        security: stream_credentials(&args, &controller)?,
        controller,
        node_id: args.resolved_node_id(),
        ..XdsClientConfig::default()
    };
    tasks.spawn_graceful("controller stream client", |stop| {
        xds_client::run_on_own_thread(xds_config, sink, status, unknown_keys, stop)
    });

    let settings = |max_connections| ConnectionSettings {
        idle_timeout: args.idle_timeout,
        limit: ConnectionLimit::new(max_connections),
    };
    let traffic_settings = settings(args.max_connections);
    let (metrics_settings, debug_settings) = (
        settings(ADMIN_MAX_CONNECTIONS),
        settings(ADMIN_MAX_CONNECTIONS),
    );
    let expose_metrics = args.expose_metrics_on_router_port;
    let listener_proxy = proxy.clone();
    let settings = PortSettings {
        host: args.host,
        reserved: [args.port, args.metrics_port, args.debug_port].into(),
        // One connection budget for the traffic port and every Gateway port.
        connections: traffic_settings.clone(),
    };
    let listener_ports = store.listener_ports();
    let port_states = admin.listener_ports.clone();
    tasks.spawn_graceful("Gateway listener ports", |stop| {
        serve_listener_ports(
            listener_ports,
            settings,
            port_states,
            stop,
            move |request| {
                let proxy = listener_proxy.clone();
                async move { proxy.handle(request).await }
            },
        )
    });
    let traffic_admin = admin.clone();
    let traffic_port = args.port;
    tasks.spawn_graceful("traffic server", |stop| {
        serve(traffic, traffic_settings, stop, move |mut request| {
            let proxy = proxy.clone();
            let admin = traffic_admin.clone();
            request
                .extensions_mut()
                .insert(Arrival::TrafficPort(traffic_port));
            async move {
                if expose_metrics && request.uri().path() == "/metrics" {
                    return admin.handle_metrics_port(&request);
                }
                proxy.handle(request).await
            }
        })
    });
    let metrics_admin = admin.clone();
    tasks.spawn_graceful("metrics server", |stop| {
        serve(metrics, metrics_settings, stop, move |request| {
            let admin = metrics_admin.clone();
            async move { admin.handle_metrics_port(&request) }
        })
    });
    tasks.spawn_graceful("debug server", |stop| {
        serve(debug, debug_settings, stop, move |request| {
            let admin = admin.clone();
            async move { admin.handle_debug_port(&request) }
        })
    });
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
    Ok(tasks.run(SHUTDOWN_GRACE_PERIOD).await?)
}
