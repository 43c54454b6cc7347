//! Command-line flags of `switchyard-dataplane`.

use std::net::IpAddr;

use clap::Parser;

/// Default traffic port, as the Kthena router's.
pub const DEFAULT_PORT: u16 = 8080;
/// Default Prometheus port, as the Kthena router's.
pub const DEFAULT_METRICS_PORT: u16 = 9090;
/// Default debug port, as the Kthena router's.
pub const DEFAULT_DEBUG_PORT: u16 = 15000;

/// Stateless OpenAI-compatible LLM router driven by switchyard-controller.
#[derive(Debug, Clone, Parser)]
#[command(name = "switchyard-dataplane", version)]
pub struct Args {
    /// Controller snapshot stream, e.g. http://switchyard-controller:15010.
    #[arg(long, env = "SWITCHYARD_CONTROLLER")]
    pub controller: String,
    /// PEM CA bundle that signed the controller's stream certificate
    /// (required with an `https://` --controller).
    #[arg(long, env = "SWITCHYARD_CONTROLLER_CA", value_name = "FILE")]
    pub controller_ca: Option<std::path::PathBuf>,
    /// PEM client certificate presented to the controller (mutual TLS), with --controller-key.
    #[arg(long, env = "SWITCHYARD_CONTROLLER_CERT", value_name = "FILE")]
    pub controller_cert: Option<std::path::PathBuf>,
    /// PEM private key of --controller-cert.
    #[arg(long, env = "SWITCHYARD_CONTROLLER_KEY", value_name = "FILE")]
    pub controller_key: Option<std::path::PathBuf>,
    /// File holding the token sent to the controller (`authorization: Bearer`); needs https.
    #[arg(long, env = "SWITCHYARD_CONTROLLER_TOKEN_FILE", value_name = "FILE")]
    pub controller_token_file: Option<std::path::PathBuf>,
    /// PEM CA bundle trusted for external model providers besides the system
    /// roots (private providers, test CAs).
    #[arg(long, env = "SWITCHYARD_PROVIDER_CA_BUNDLE", value_name = "FILE")]
    pub provider_ca_bundle: Option<std::path::PathBuf>,
    /// Address the traffic and metrics listeners bind to.
    #[arg(long, env = "SWITCHYARD_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Traffic port (OpenAI API, /healthz, /readyz).
    #[arg(long, env = "SWITCHYARD_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Prometheus /metrics port (also /healthz and /readyz).
    #[arg(long, env = "SWITCHYARD_METRICS_PORT", default_value_t = DEFAULT_METRICS_PORT)]
    pub metrics_port: u16,
    /// Debug endpoints port.
    #[arg(long, env = "SWITCHYARD_DEBUG_PORT", default_value_t = DEFAULT_DEBUG_PORT)]
    pub debug_port: u16,
    /// Address of the debug listener; loopback by default because debug dumps are for operators on the node.
    #[arg(long, env = "SWITCHYARD_DEBUG_ADDR", default_value = "127.0.0.1")]
    pub debug_addr: IpAddr,
    /// Request bodies larger than this are refused with 413.
    #[arg(long, env = "SWITCHYARD_MAX_BODY_BYTES", default_value_t = crate::proxy::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Bytes of request bodies held at once by all requests; a body that does
    /// not fit gets 503 with Retry-After.
    #[arg(long, env = "SWITCHYARD_BODY_BUDGET_BYTES", default_value_t = crate::limits::DEFAULT_BODY_BUDGET_BYTES)]
    pub body_budget_bytes: usize,
    /// Time a request body gets before --min-body-rate applies (e.g. 10s).
    #[arg(long, env = "SWITCHYARD_BODY_READ_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub body_read_grace: std::time::Duration,
    /// Slowest request body accepted after the grace, in bytes per second; slower gets 408.
    #[arg(long, env = "SWITCHYARD_MIN_BODY_RATE", default_value_t = crate::limits::DEFAULT_MIN_BODY_BYTES_PER_SEC, value_parser = clap::value_parser!(u64).range(1..))]
    pub min_body_rate: u64,
    /// Client connections served at once on the traffic port; one more gets
    /// 503 and is closed.
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTIONS", default_value_t = crate::limits::DEFAULT_MAX_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: usize,
    /// Closes client connections that send no complete request headers for this
    /// long, whether slow or idle between keep-alive requests (e.g. 60s, 500ms).
    #[arg(long, env = "SWITCHYARD_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: std::time::Duration,
    /// Identity reported to the controller (defaults to $POD_NAME, then $HOSTNAME, then a random id).
    #[arg(long, env = "SWITCHYARD_NODE_ID")]
    pub node_id: Option<String>,
    /// Also serve `/metrics` on the traffic port (for scrapers and the
    /// troubleshooting commands that expect it on the router port).
    #[arg(long, env = "SWITCHYARD_EXPOSE_METRICS_ON_ROUTER_PORT")]
    pub expose_metrics_on_router_port: bool,
    /// YAML configuration file (e.g. its `accessLogger:` block); the
    /// `ACCESS_LOG_*` environment variables override it.
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Traffic worker threads, each with its own listener on the traffic
    /// port and its own upstream connections. Default: the CPUs this process
    /// may use (its CPU affinity, bounded by a cgroup CPU quota).
    #[arg(long, env = "SWITCHYARD_WORKERS")]
    pub workers: Option<std::num::NonZeroUsize>,
    /// Application log format.
    #[arg(
        long,
        env = "SWITCHYARD_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Serve Envoy's ext_proc protocol on this port as the endpoint picker
    /// of `--endpoint-picker-pool` (Gateway API Inference Extension
    /// gateways call it); off when unset.
    #[arg(
        long,
        env = "SWITCHYARD_ENDPOINT_PICKER_PORT",
        requires = "endpoint_picker_pool"
    )]
    pub endpoint_picker_port: Option<u16>,
    /// The InferencePool (`NAMESPACE/NAME`) the endpoint picker picks endpoints of.
    #[arg(long, env = "SWITCHYARD_ENDPOINT_PICKER_POOL", value_name = "NAMESPACE/NAME", value_parser = parse_pool, requires = "endpoint_picker_port")]
    pub endpoint_picker_pool: Option<String>,
}

/// `namespace/name`, both non-empty.
fn parse_pool(text: &str) -> Result<String, String> {
    match text.split_once('/') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
        {
            Ok(text.to_owned())
        }
        _ => Err(format!("{text:?}: expected NAMESPACE/NAME")),
    }
}

/// Durations as `60s`, `500ms`, `2m`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |at| text.split_at(at));
    let value: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 60s or 500ms"))?;
    let duration = match unit {
        "ms" => std::time::Duration::from_millis(value),
        "s" => std::time::Duration::from_secs(value),
        "m" => std::time::Duration::from_secs(value * 60),
        _ => return Err(format!("invalid duration unit in {text:?}: use ms, s or m")),
    };
    if duration.is_zero() {
        return Err("duration must be positive".to_owned());
    }
    Ok(duration)
}

/// Application log format.
pub use switchyard_runtime::LogFormat;

impl Args {
    /// The traffic worker count: `--workers`, else the CPUs this process may use.
    pub fn resolved_workers(&self) -> usize {
        self.workers
            .map_or_else(crate::per_worker::available, std::num::NonZeroUsize::get)
    }

    /// The node id to report: flag, then pod/host name, then a random id.
    pub fn resolved_node_id(&self) -> String {
        self.node_id
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("dataplane-{}", uuid::Uuid::new_v4()))
    }
}
