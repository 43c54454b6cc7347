//! Route churn at scale: a real dataplane holding `routes` routes has all but
//! one removed, then gets them back, while a prober sends `GET /healthz` to
//! its traffic port back to back. Measures each side's share of a change
//! (the controller's parse, compile and encode, the dataplane's decode and
//! apply) and what the probes saw.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prost::Message as _;
use switchyard_controller::compile::compile_route_config;
use switchyard_controller::local::{LocalObjects, parse_documents};
use switchyard_controller::xds::{
    DataplaneRegistry, ResourceType, RoutingDiscoveryService, SnapshotPublisher, XdsMetrics,
};
use switchyard_dataplane::metrics::RouterMetrics;
use switchyard_dataplane::snapshot::SnapshotStore;
use switchyard_runtime::clock::{self, Instant};
use switchyard_snapshot::pb;

/// A probe slower than this is late: the bound a dataplane applying a
/// snapshot must keep `/healthz` within.
pub const LATE_PROBE: Duration = Duration::from_millis(10);

/// How long the prober waits for an answer before counting the probe failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The pause between probes: about 300 probes a second, so a stall of a few
/// milliseconds anywhere in a change is seen.
const PROBE_INTERVAL: Duration = Duration::from_millis(2);

/// How long one change may take to be ACKed before the bench gives up: far
/// above what a change costs, so only a hang trips it.
const ACK_DEADLINE: Duration = Duration::from_secs(120);

/// The one answer `/healthz` gives.
const HEALTHY_BODY: &[u8] = br#"{"message":"ok"}"#;

/// What the probes saw during the churn.
#[derive(Debug, Default, Clone)]
pub struct Probes {
    pub sent: usize,
    pub failed: usize,
    pub late: usize,
    pub slowest: Duration,
}

/// The figures of one churn run.
#[derive(Debug)]
pub struct ChurnFigures {
    pub routes: usize,
    /// Local-mode YAML of every route, parsed as the controller parses it.
    pub parse: Duration,
    pub compile_all: Duration,
    pub compile_one: Duration,
    pub encoded_bytes: usize,
    pub encode: Duration,
    pub decode: Duration,
    /// The dataplane's apply (table, swap, metric slots), in this process:
    /// every route onto one, and one onto every route.
    pub apply_add: Duration,
    pub apply_remove: Duration,
    /// Publish to the real dataplane's ACK, per round.
    pub removals: Vec<Duration>,
    pub additions: Vec<Duration>,
    pub probes: Probes,
}

impl ChurnFigures {
    /// Markdown rows for the bench table.
    pub fn rows(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let spread = |samples: &[Duration]| {
            let min = samples.iter().min().copied().unwrap_or_default();
            let max = samples.iter().max().copied().unwrap_or_default();
            format!("{:.0} / {:.0} ms", ms(min), ms(max))
        };
        let n = self.routes;
        let mut rows = String::new();
        let _ = writeln!(
            rows,
            "| Route churn, {n} routes: controller parse of the YAML (local mode) | {:.0} ms | |",
            ms(self.parse)
        );
        let _ = writeln!(
            rows,
            "| Route churn: RouteConfig compile, {n} routes / 1 route | {:.1} / {:.2} ms | |",
            ms(self.compile_all),
            ms(self.compile_one)
        );
        let _ = writeln!(
            rows,
            "| Route churn: RouteConfig of {n} routes encoded / decoded | {:.1} KiB in {:.1} ms / {:.1} ms | |",
            self.encoded_bytes as f64 / 1024.0,
            ms(self.encode),
            ms(self.decode)
        );
        let _ = writeln!(
            rows,
            "| Route churn: dataplane apply (table, swap, metric slots, old table freed), 1 -> {n} / {n} -> 1 | {:.1} / {:.1} ms | |",
            ms(self.apply_add),
            ms(self.apply_remove)
        );
        let _ = writeln!(
            rows,
            "| Route churn: {} of {n} routes removed, compile -> real dataplane ACK (min / max of {}) | {} | |",
            n - 1,
            self.removals.len(),
            spread(&self.removals)
        );
        let _ = writeln!(
            rows,
            "| Route churn: added back, compile -> real dataplane ACK (min / max of {}) | {} | |",
            self.additions.len(),
            spread(&self.additions)
        );
        let probes = &self.probes;
        let _ = writeln!(
            rows,
            "| Route churn: `/healthz` probes throughout: sent / failed / over {} ms / slowest | {} / {} / {} / {:.1} ms | 0 failed, 0 over {} ms |",
            LATE_PROBE.as_millis(),
            probes.sent,
            probes.failed,
            probes.late,
            ms(probes.slowest),
            LATE_PROBE.as_millis()
        );
        rows
    }

    /// Why the run misses its target, if it does.
    pub fn miss(&self) -> Option<String> {
        let probes = &self.probes;
        (probes.failed > 0 || probes.late > 0).then(|| {
            format!(
                "route churn: {} of {} probes failed and {} took over {LATE_PROBE:?} (slowest {:?})",
                probes.failed, probes.sent, probes.late, probes.slowest
            )
        })
    }
}

/// Local-mode YAML: ModelServer `churn` with one pod, and `routes` routes
/// sending model `model-<i>` to it.
fn churn_yaml(routes: usize) -> String {
    let mut yaml = String::from(
        "apiVersion: networking.serving.volcano.sh/v1alpha1\nkind: ModelServer\nmetadata:\n  name: churn\n  namespace: bench\nspec:\n  workloadSelector:\n    matchLabels:\n      app: churn\n  workloadPort:\n    port: 8000\n  inferenceEngine: vLLM\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: churn-0\n  namespace: bench\n  labels:\n    app: churn\nstatus:\n  phase: Running\n  podIP: 127.0.0.11\n  conditions:\n  - type: Ready\n    status: \"True\"\n",
    );
    for r in 0..routes {
        let _ = write!(
            yaml,
            "---\napiVersion: networking.serving.volcano.sh/v1alpha1\nkind: ModelRoute\nmetadata:\n  name: route-{r}\n  namespace: bench\nspec:\n  modelName: model-{r}\n  rules:\n  - targetModels:\n    - modelServerName: churn\n"
        );
    }
    yaml
}

fn parse(yaml: &str) -> Result<LocalObjects, String> {
    let mut objects = LocalObjects::default();
    parse_documents("churn.yaml", yaml, &mut objects);
    match objects.problems.first() {
        Some(problem) => Err(format!("generated YAML rejected: {problem:?}")),
        None => Ok(objects),
    }
}

fn compile(objects: &LocalObjects) -> (pb::RouteConfig, Duration) {
    let started = clock::now();
    let compiled = compile_route_config(&objects.routes, &objects.servers, &objects.pods);
    (compiled.route_config, started.elapsed())
}

/// The dataplane's apply of `config` onto `store` (decoding included, as
/// from the wire), timed.
fn apply(
    store: &SnapshotStore,
    version: &str,
    config: pb::RouteConfig,
) -> Result<Duration, String> {
    let encoded = config.encode_to_vec().into();
    let started = clock::now();
    store
        .apply_encoded_route_config(version, encoded)
        .map_err(|error| format!("in-process apply of {version} rejected: {error}"))?;
    store.reclaim();
    Ok(started.elapsed())
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Waits until the dataplane stream ACKed RouteConfig `version`.
async fn wait_acked(registry: &DataplaneRegistry, version: &str) -> Result<(), String> {
    tokio::time::timeout(
        ACK_DEADLINE,
        registry.wait_until(|statuses| {
            statuses.iter().any(|status| {
                status
                    .resource(ResourceType::RouteConfig)
                    .acked_version
                    .as_deref()
                    == Some(version)
            })
        }),
    )
    .await
    .map_err(|_| format!("RouteConfig {version} not ACKed within {ACK_DEADLINE:?}"))
}

/// Publishes `config` and waits for the dataplane's ACK; the time from
/// `started` (before the compile) to the ACK.
async fn push(
    publisher: &SnapshotPublisher,
    registry: &DataplaneRegistry,
    config: pb::RouteConfig,
    generation: i64,
    started: Instant,
) -> Result<Duration, String> {
    let published = publisher.publish_route_config(config, generation);
    wait_acked(registry, &published.version).await?;
    Ok(started.elapsed())
}

/// One probe on `connection` (opened first if needed): true on a 200 with
/// the healthy body. The connection is dropped after a failure.
fn probe(connection: &mut Option<TcpStream>, addr: SocketAddr) -> bool {
    let answered = (|| -> std::io::Result<bool> {
        let stream = match connection {
            Some(stream) => stream,
            None => {
                let stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
                stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
                stream.set_nodelay(true)?;
                connection.insert(stream)
            }
        };
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: dataplane\r\n\r\n")?;
        let mut answer = Vec::with_capacity(256);
        let mut buffer = [0u8; 256];
        while !answer.ends_with(HEALTHY_BODY) {
            let read = stream.read(&mut buffer)?;
            if read == 0 {
                return Ok(false);
            }
            answer.extend_from_slice(&buffer[..read]);
        }
        Ok(answer.starts_with(b"HTTP/1.1 200 "))
    })();
    let healthy = answered.unwrap_or(false);
    if !healthy {
        *connection = None;
    }
    healthy
}

/// Probes `addr` back to back until `stop` is set.
fn probe_until(addr: SocketAddr, stop: &AtomicBool) -> Probes {
    let mut probes = Probes::default();
    let mut connection = None;
    while !stop.load(Ordering::Relaxed) {
        let started = clock::now();
        let healthy = probe(&mut connection, addr);
        let took = started.elapsed();
        probes.sent += 1;
        probes.failed += usize::from(!healthy);
        probes.late += usize::from(took > LATE_PROBE);
        probes.slowest = probes.slowest.max(took);
        // A plain thread of its own, not a runtime thread: it may block.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(PROBE_INTERVAL);
    }
    probes
}

/// Runs the churn: `rounds` times, every route but one removed and added
/// back, on a real `dataplane_bin` connected to a stream server in this process.
pub async fn run(
    routes: usize,
    rounds: usize,
    dataplane_bin: &Path,
) -> Result<ChurnFigures, String> {
    if routes < 2 || rounds == 0 {
        return Err("route churn needs at least 2 routes and 1 round".into());
    }
    // Each side's share, measured alone.
    let yaml = churn_yaml(routes);
    let started = clock::now();
    let all = parse(&yaml)?;
    let parse_time = started.elapsed();
    let one = parse(&churn_yaml(1))?;
    let (config_all, compile_all) = compile(&all);
    let (config_one, compile_one) = compile(&one);
    if config_all.routes.len() != routes {
        return Err(format!(
            "compile accepted {} of {routes} routes",
            config_all.routes.len()
        ));
    }
    let started = clock::now();
    let encoded = config_all.encode_to_vec();
    let encode = started.elapsed();
    let started = clock::now();
    let decoded = pb::RouteConfig::decode(encoded.as_slice()).map_err(|e| e.to_string())?;
    let decode = started.elapsed();
    let store =
        SnapshotStore::new().with_table_observer(RouterMetrics::new().map_err(|e| e.to_string())?);
    apply(&store, "one", config_one.clone())?;
    let apply_add = apply(&store, "all", decoded)?;
    let apply_remove = apply(&store, "one-again", config_one.clone())?;
    drop(store);

    // The real thing: a stream server here, a dataplane process, a prober.
    let prometheus = prometheus::Registry::new();
    let metrics = XdsMetrics::register(&prometheus).map_err(|e| e.to_string())?;
    let publisher = Arc::new(SnapshotPublisher::new("churn-controller", metrics.clone()));
    let registry = DataplaneRegistry::new();
    let service = RoutingDiscoveryService::new(Arc::clone(&publisher), registry.clone(), metrics);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let xds_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let server = tokio::spawn(switchyard_controller::xds::serve(
        listener,
        service,
        Default::default(),
        std::future::pending(),
    ));
    let mut generation = 1;
    let first = publisher.publish_route_config(config_all.clone(), generation);
    let traffic = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let (metrics_port, debug_port) = (free_port()?, free_port()?);
    let _dataplane = tokio::process::Command::new(dataplane_bin)
        .args([
            "--controller",
            &format!("http://{xds_addr}"),
            "--host",
            "127.0.0.1",
            "--port",
            &traffic.port().to_string(),
            "--metrics-port",
            &metrics_port.to_string(),
            "--debug-port",
            &debug_port.to_string(),
            "--node-id",
            "churn-dataplane",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", dataplane_bin.display()))?;
    wait_acked(&registry, &first.version).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || probe_until(traffic, &stop))
    };
    let mut removals = Vec::new();
    let mut additions = Vec::new();
    for _ in 0..rounds {
        for (objects, times) in [(&one, &mut removals), (&all, &mut additions)] {
            let started = clock::now();
            let (config, _) = compile(objects);
            generation += 1;
            times.push(push(&publisher, &registry, config, generation, started).await?);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let probes = prober
        .join()
        .map_err(|_| "the prober panicked".to_owned())?;
    server.abort();
    Ok(ChurnFigures {
        routes,
        parse: parse_time,
        compile_all,
        compile_one,
        encoded_bytes: encoded.len(),
        encode,
        decode,
        apply_add,
        apply_remove,
        removals,
        additions,
        probes,
    })
}
