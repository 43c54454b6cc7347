//! Command line (every flag can also come from a `SWITCHYARD_*` environment variable).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Where dataplanes connect by default: Istio's xDS port, familiar to operators.
pub const DEFAULT_XDS_ADDR: &str = "0.0.0.0:15010";
/// Conventional Prometheus exporter port, also serving health and readiness.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9090";
/// The debug listener's address: loopback, as the dataplane's, because the
/// debug views show every pod IP and object to whoever reaches them.
pub const DEFAULT_DEBUG_ADDR: &str = "127.0.0.1";
/// The debug listener's port, as the dataplane's (each runs in its own pod).
pub const DEFAULT_DEBUG_PORT: u16 = 15000;
/// Kthena's metrics scrape interval: fresh enough for load-aware routing.
pub const DEFAULT_SCRAPE_INTERVAL: &str = "1s";
/// Default scrape timeout as a share of the interval, so a pass with a dead
/// pod still ends before the next one starts (1 s interval -> 750 ms).
pub const DEFAULT_SCRAPE_TIMEOUT_PERCENT_OF_INTERVAL: u32 = 75;

/// How long a source with no ModelRoute must read the same way before a
/// starting controller publishes an empty RouteConfig: longer than a config
/// sidecar (git-sync, a late ConfigMap projection) or a restarting API
/// server usually takes to fill the source, short enough that a deployment
/// that is meant to be empty becomes ready within a minute.
pub const EMPTY_SOURCE_GRACE_PERIOD: Duration = Duration::from_secs(30);
/// [`EMPTY_SOURCE_GRACE_PERIOD`] as `--empty-source-grace-period` spells its
/// default (a test keeps the two equal).
pub const DEFAULT_EMPTY_SOURCE_GRACE_PERIOD: &str = "30s";

/// Lease that elects the replica writing status (Kubernetes mode); replicas share it by name.
pub const DEFAULT_LEASE_NAME: &str = "switchyard-controller";
/// Namespace of the Lease when `POD_NAMESPACE` (downward API) is unset: the
/// namespace the manifests install the controller into.
pub const DEFAULT_LEASE_NAMESPACE: &str = "switchyard-system";

/// GatewayClass the controller creates in Gateway API mode: Kthena's, so
/// Gateways written for the Kthena router are served as they are.
pub const DEFAULT_GATEWAY_CLASS_NAME: &str = "kthena-router";
/// Name of the default Gateway, in the controller's namespace (Kthena's).
pub const DEFAULT_GATEWAY_NAME: &str = "default";
/// Port written into the default Gateway's listener: the dataplanes'
/// default traffic port (the listener is served on their traffic port, whatever it is).
pub const DEFAULT_GATEWAY_PORT: u16 = 8080;

/// Exit code when the command line is unusable (BSD `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;

pub use switchyard_runtime::LogFormat;

/// Switchyard controller: compiles ModelRoute / ModelServer / Pod objects and
/// engine load into routing snapshots and streams them to dataplanes.
#[derive(Clone, Debug, Parser)]
#[command(name = "switchyard-controller", version, about)]
pub struct Args {
    /// Local mode: read ModelRoute, ModelServer and Pod objects from the YAML
    /// files in this directory (reloaded on change) instead of Kubernetes.
    #[arg(long, env = "SWITCHYARD_CONFIG_DIR", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,

    /// Router configuration file in the Kthena router's format; its
    /// `scheduler` section is shipped to every dataplane (reloaded on change).
    #[arg(long, env = "SWITCHYARD_ROUTER_CONFIG", value_name = "FILE")]
    pub router_config: Option<PathBuf>,

    /// Address of the snapshot stream (gRPC) server dataplanes connect to.
    #[arg(long, env = "SWITCHYARD_XDS_ADDR", default_value = DEFAULT_XDS_ADDR, value_name = "ADDR")]
    pub xds_addr: SocketAddr,

    /// PEM certificate (chain) of the snapshot stream server: with
    /// --stream-tls-key, the stream is served over TLS.
    #[arg(long, env = "SWITCHYARD_STREAM_TLS_CERT", value_name = "FILE")]
    pub stream_tls_cert: Option<PathBuf>,

    /// PEM private key of --stream-tls-cert.
    #[arg(long, env = "SWITCHYARD_STREAM_TLS_KEY", value_name = "FILE")]
    pub stream_tls_key: Option<PathBuf>,

    /// PEM CA bundle: dataplanes must present a client certificate it signed (mutual TLS).
    #[arg(long, env = "SWITCHYARD_STREAM_CLIENT_CA", value_name = "FILE")]
    pub stream_client_ca: Option<PathBuf>,

    /// File holding a token dataplanes must send (`authorization: Bearer <token>`).
    /// Provider credentials are only shipped over TLS with mutual TLS or a token.
    #[arg(long, env = "SWITCHYARD_STREAM_TOKEN_FILE", value_name = "FILE")]
    pub stream_token_file: Option<PathBuf>,

    /// Address of the admin server: /metrics, /healthz, /readyz.
    #[arg(long, env = "SWITCHYARD_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR, value_name = "ADDR")]
    pub metrics_addr: SocketAddr,

    /// Address of the debug listener (/debug/*); loopback by default because
    /// its views show every pod and object.
    #[arg(long, env = "SWITCHYARD_DEBUG_ADDR", default_value = DEFAULT_DEBUG_ADDR, value_name = "IP")]
    pub debug_addr: IpAddr,

    /// Port of the debug listener.
    #[arg(long, env = "SWITCHYARD_DEBUG_PORT", default_value_t = DEFAULT_DEBUG_PORT, value_name = "PORT")]
    pub debug_port: u16,

    /// Time between two scrapes of a pod's engine metrics (Go duration: 1s, 500ms).
    #[arg(long, env = "SWITCHYARD_SCRAPE_INTERVAL", default_value = DEFAULT_SCRAPE_INTERVAL, value_parser = parse_positive_duration, value_name = "DURATION")]
    pub scrape_interval: Duration,

    /// Bound on one scrape request [default: 75% of --scrape-interval].
    #[arg(long, env = "SWITCHYARD_SCRAPE_TIMEOUT", value_parser = parse_positive_duration, value_name = "DURATION")]
    pub scrape_timeout: Option<Duration>,

    /// Kubernetes mode: watch ModelRoutes, ModelServers and Pods only in these
    /// namespaces (comma-separated) [default: all namespaces].
    #[arg(
        long,
        env = "SWITCHYARD_NAMESPACES",
        value_delimiter = ',',
        value_name = "NS,..."
    )]
    pub namespaces: Vec<String>,

    /// Kubernetes mode: name of the Lease used to elect the replica that writes status.
    #[arg(long, env = "SWITCHYARD_LEASE_NAME", default_value = DEFAULT_LEASE_NAME, value_name = "NAME")]
    pub lease_name: String,

    /// Kubernetes mode: namespace of that Lease (the controller's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_LEASE_NAMESPACE, value_name = "NS")]
    pub lease_namespace: String,

    /// Log line format.
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// A starting controller whose source has no ModelRoute (empty or
    /// unreadable) publishes its first, empty, snapshot only after the source
    /// has read so for this long (Go duration; 0s publishes at once).
    #[arg(long, env = "SWITCHYARD_EMPTY_SOURCE_GRACE_PERIOD", default_value = DEFAULT_EMPTY_SOURCE_GRACE_PERIOD, value_parser = parse_duration, value_name = "DURATION")]
    pub empty_source_grace_period: Duration,

    /// Identity sent to dataplanes in every snapshot [default: $HOSTNAME, else a random id].
    #[arg(long, env = "SWITCHYARD_CONTROLLER_ID", value_name = "ID")]
    pub controller_id: Option<String>,

    /// Gateway API mode: serve the Gateways of Switchyard's GatewayClasses
    /// (their HTTP listeners open on every dataplane), bind ModelRoutes to
    /// them by parentRefs, and route HTTPRoutes.
    #[arg(long, env = "SWITCHYARD_ENABLE_GATEWAY_API")]
    pub enable_gateway_api: bool,

    /// Gateway API Inference Extension: compile InferencePools (HTTPRoute
    /// backends, and the pools the dataplanes' endpoint picker serves).
    #[arg(long, env = "SWITCHYARD_ENABLE_GATEWAY_API_INFERENCE_EXTENSION")]
    pub enable_gateway_api_inference_extension: bool,

    /// Gateway API mode: the `controllerName` of the GatewayClasses Switchyard implements.
    #[arg(long, env = "SWITCHYARD_GATEWAY_CONTROLLER_NAME", default_value = crate::compile::gateway_api::DEFAULT_CONTROLLER_NAME, value_name = "NAME")]
    pub gateway_controller_name: String,

    /// Gateway API mode: the GatewayClass created (when absent) for Switchyard.
    #[arg(long, env = "SWITCHYARD_GATEWAY_CLASS_NAME", default_value = DEFAULT_GATEWAY_CLASS_NAME, value_name = "NAME")]
    pub gateway_class_name: String,

    /// Gateway API mode: the default Gateway (created when absent), whose
    /// listeners are the dataplanes' traffic port [default: <--lease-namespace>/default].
    #[arg(long, env = "SWITCHYARD_DEFAULT_GATEWAY", value_name = "NS/NAME")]
    pub default_gateway: Option<String>,

    /// Gateway API mode: the port written into the default Gateway's listener.
    #[arg(long, env = "SWITCHYARD_DEFAULT_GATEWAY_PORT", default_value_t = DEFAULT_GATEWAY_PORT, value_name = "PORT")]
    pub default_gateway_port: u16,

    /// Gateway API mode: the addresses the Gateways report in their status
    /// (the dataplanes' Service addresses, comma-separated IPs or host names).
    #[arg(
        long,
        env = "SWITCHYARD_GATEWAY_ADDRESSES",
        value_delimiter = ',',
        value_name = "ADDR,..."
    )]
    pub gateway_addresses: Vec<String>,
}

/// Scrape interval of [`Args::for_test`]: a test sees engine load within a
/// fraction of a second.
pub const TEST_SCRAPE_INTERVAL: Duration = Duration::from_millis(100);

impl Args {
    /// A controller started inside a test: admin and stream servers on loopback
    /// ports the OS picks, [`TEST_SCRAPE_INTERVAL`], the id `test-controller`,
    /// every other flag at its default. Tests set the fields they need:
    /// `Args { config_dir: Some(dir), ..Args::for_test() }`.
    pub fn for_test() -> Self {
        let any_loopback_port = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
        Self {
            config_dir: None,
            router_config: None,
            xds_addr: any_loopback_port,
            stream_tls_cert: None,
            stream_tls_key: None,
            stream_client_ca: None,
            stream_token_file: None,
            metrics_addr: any_loopback_port,
            debug_addr: any_loopback_port.ip(),
            debug_port: 0,
            scrape_interval: TEST_SCRAPE_INTERVAL,
            scrape_timeout: None,
            namespaces: Vec::new(),
            lease_name: DEFAULT_LEASE_NAME.to_owned(),
            lease_namespace: DEFAULT_LEASE_NAMESPACE.to_owned(),
            log_format: LogFormat::Text,
            empty_source_grace_period: EMPTY_SOURCE_GRACE_PERIOD,
            controller_id: Some("test-controller".to_owned()),
            enable_gateway_api: false,
            enable_gateway_api_inference_extension: false,
            gateway_controller_name: crate::compile::gateway_api::DEFAULT_CONTROLLER_NAME
                .to_owned(),
            gateway_class_name: DEFAULT_GATEWAY_CLASS_NAME.to_owned(),
            default_gateway: None,
            default_gateway_port: DEFAULT_GATEWAY_PORT,
            gateway_addresses: Vec::new(),
        }
    }

    /// `(namespace, name)` of the default Gateway: `--default-gateway`, else
    /// `default` in the controller's namespace.
    pub fn effective_default_gateway(&self) -> Result<(String, String), String> {
        match self.default_gateway.as_deref().map(str::trim) {
            None | Some("") => Ok((
                self.lease_namespace.clone(),
                DEFAULT_GATEWAY_NAME.to_owned(),
            )),
            Some(text) => match text.split_once('/') {
                Some((namespace, name))
                    if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
                {
                    Ok((namespace.to_owned(), name.to_owned()))
                }
                _ => Err(format!(
                    "--default-gateway {text:?}: expected NAMESPACE/NAME"
                )),
            },
        }
    }

    /// The GatewayClass and default Gateway Gateway API mode starts with
    /// (`None` when the mode is off).
    pub fn gateway_defaults(
        &self,
    ) -> Result<Option<crate::compile::gateway_api::GatewayDefaults>, String> {
        if !self.enable_gateway_api {
            return Ok(None);
        }
        let (namespace, name) = self.effective_default_gateway()?;
        Ok(Some(crate::compile::gateway_api::GatewayDefaults::new(
            &self.gateway_class_name,
            &self.gateway_controller_name,
            (&namespace, &name),
            self.default_gateway_port,
        )))
    }

    /// How the compile treats the Gateway API kinds.
    pub fn gateway_api(&self) -> Result<crate::compile::GatewayApiConfig, String> {
        Ok(crate::compile::GatewayApiConfig {
            enabled: self.enable_gateway_api,
            inference_extension: self.enable_gateway_api_inference_extension,
            controller_name: self.gateway_controller_name.clone(),
            default_gateway: if self.enable_gateway_api {
                Some(self.effective_default_gateway()?)
            } else {
                None
            },
        })
    }

    /// Where the debug listener binds.
    pub fn debug_socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.debug_addr, self.debug_port)
    }

    /// The stream security flags.
    pub fn stream_security_files(&self) -> crate::xds::StreamSecurityFiles {
        crate::xds::StreamSecurityFiles {
            tls_cert: self.stream_tls_cert.clone(),
            tls_key: self.stream_tls_key.clone(),
            client_ca: self.stream_client_ca.clone(),
            token_file: self.stream_token_file.clone(),
        }
    }

    /// `--scrape-timeout`, or the default share of the interval.
    pub fn effective_scrape_timeout(&self) -> Duration {
        self.scrape_timeout.unwrap_or_else(|| {
            self.scrape_interval * DEFAULT_SCRAPE_TIMEOUT_PERCENT_OF_INTERVAL / 100
        })
    }

    /// `--controller-id`, else the host name (the pod name in Kubernetes), else a random id.
    pub fn effective_controller_id(&self) -> String {
        if let Some(id) = self.controller_id.as_deref().filter(|id| !id.is_empty()) {
            return id.to_owned();
        }
        match std::env::var("HOSTNAME") {
            Ok(hostname) if !hostname.is_empty() => hostname,
            _ => format!("switchyard-controller-{}", uuid::Uuid::new_v4().simple()),
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    switchyard_crd::parse_go_duration(text).map_err(|error| error.to_string())
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("switchyard-controller").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let args = parse(&["--config-dir", "/etc/switchyard"]).expect("parses");
        assert_eq!(args.config_dir, Some(PathBuf::from("/etc/switchyard")));
        assert_eq!(args.xds_addr, "0.0.0.0:15010".parse().expect("addr"));
        assert_eq!(args.metrics_addr, "0.0.0.0:9090".parse().expect("addr"));
        assert_eq!(
            args.debug_socket_addr(),
            "127.0.0.1:15000".parse().expect("addr"),
            "debug views stay on loopback unless asked"
        );
        assert_eq!(args.scrape_interval, Duration::from_secs(1));
        assert_eq!(args.effective_scrape_timeout(), Duration::from_millis(750));
        assert_eq!(args.log_format, LogFormat::Text);
        assert!(args.namespaces.is_empty());
        assert_eq!(args.lease_name, "switchyard-controller");
        assert_eq!(args.empty_source_grace_period, EMPTY_SOURCE_GRACE_PERIOD);
        let zero = parse(&["--empty-source-grace-period", "0s"]).expect("parses");
        assert_eq!(zero.empty_source_grace_period, Duration::ZERO);
    }

    #[test]
    fn namespaces_are_comma_separated() {
        let args =
            parse(&["--namespaces", "team-a,team-b", "--lease-namespace", "ops"]).expect("parses");
        assert_eq!(args.namespaces, ["team-a", "team-b"]);
        assert_eq!(args.lease_namespace, "ops");
    }

    #[test]
    fn durations_use_go_syntax_and_must_be_positive() {
        let args =
            parse(&["--scrape-interval", "500ms", "--scrape-timeout", "2s"]).expect("parses");
        assert_eq!(args.scrape_interval, Duration::from_millis(500));
        assert_eq!(args.effective_scrape_timeout(), Duration::from_secs(2));
        assert!(parse(&["--scrape-interval", "0s"]).is_err());
        assert!(parse(&["--scrape-interval", "soon"]).is_err());
    }

    #[test]
    fn gateway_api_flags() {
        let config = parse(&[]).expect("parses").gateway_api().expect("valid");
        assert!(!config.enabled && !config.inference_extension);
        assert_eq!(config.default_gateway, None);
        assert_eq!(
            config.controller_name,
            crate::compile::gateway_api::DEFAULT_CONTROLLER_NAME
        );
        let args = parse(&[
            "--enable-gateway-api",
            "--enable-gateway-api-inference-extension",
            "--lease-namespace",
            "kthena-system",
        ])
        .expect("parses");
        let config = args.gateway_api().expect("valid");
        assert!(config.enabled && config.inference_extension);
        assert_eq!(
            config.default_gateway,
            Some(("kthena-system".to_owned(), "default".to_owned()))
        );
        let args =
            parse(&["--enable-gateway-api", "--default-gateway", "edge/public"]).expect("parses");
        assert_eq!(
            args.gateway_api().expect("valid").default_gateway,
            Some(("edge".to_owned(), "public".to_owned()))
        );
        let args = parse(&["--enable-gateway-api", "--default-gateway", "public"]).expect("parses");
        assert!(args.gateway_api().is_err());
        let args = parse(&["--gateway-addresses", "192.0.2.10,gw.example.com"]).expect("parses");
        assert_eq!(args.gateway_addresses, ["192.0.2.10", "gw.example.com"]);
    }

    #[test]
    fn explicit_controller_id_wins() {
        let args =
            parse(&["--controller-id", "replica-a", "--log-format", "json"]).expect("parses");
        assert_eq!(args.effective_controller_id(), "replica-a");
        assert_eq!(args.log_format, LogFormat::Json);
    }
}
