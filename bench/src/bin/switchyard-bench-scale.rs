//! `switchyard-bench-scale`: the control plane at scale, in one process on
//! loopback.
//!
//! Builds `--pods` pods across `--servers` ModelServers and `--routes`
//! ModelRoutes (as local-mode YAML, parsed the way the controller parses it),
//! then measures: compile time, snapshot size on the wire, and the time from a
//! change (one route's weights, one pod's load) to every one of `--streams`
//! simulated dataplanes having ACKed it, as the controller's own stream
//! registry sees the ACKs. With `--dataplane-bin` a real dataplane process is
//! connected too and its memory with the full snapshot is read from /proc.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use clap::Parser;
use prost::Message as _;
use switchyard_bench::route_churn;
use switchyard_bench::scale;
use switchyard_controller::compile::{compile_endpoint_loads, compile_route_config};
use switchyard_controller::xds::{
    DataplaneRegistry, DataplaneStatus, ResourceType, RoutingDiscoveryService, SnapshotPublisher,
    XdsMetrics,
};
use switchyard_runtime::clock;
use switchyard_snapshot::{ENDPOINT_LOADS_TYPE_URL, ROUTE_CONFIG_TYPE_URL, pb};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

/// How long one change may take to reach every stream before the bench gives
/// up on it: far above the 250 ms target, so only a hang trips it.
const ACK_DEADLINE: Duration = Duration::from_secs(60);

/// Time of the first scrape pass; later passes follow a second apart.
const FIRST_PASS_UNIX_MS: i64 = 1_700_000_000_000;

/// Snapshots above tonic's 4 MiB default must still reach the simulated dataplanes.
const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, Parser)]
#[command(name = "switchyard-bench-scale")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 500)]
    servers: usize,
    #[arg(long, default_value_t = 1_000)]
    routes: usize,
    /// Simulated dataplane streams.
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// Changes of each kind, for the ACK-time percentiles.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Compiles timed, for the compile-time percentiles.
    #[arg(long, default_value_t = 10)]
    compiles: usize,
    /// A real `switchyard-dataplane` binary to connect as well, for its memory.
    #[arg(long)]
    dataplane_bin: Option<PathBuf>,
    /// Also write the table to this file.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Routes of the route-churn run (needs `--dataplane-bin`; 0 skips it):
    /// all but one removed and added back while `/healthz` is probed.
    #[arg(long, default_value_t = 20_000)]
    churn_routes: usize,
    /// Removals and re-additions of the route-churn run.
    #[arg(long, default_value_t = 3)]
    churn_rounds: usize,
}

impl Args {
    fn shape(&self) -> scale::Shape {
        scale::Shape {
            pods: self.pods,
            servers: self.servers,
            routes: self.routes,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench-scale failed: {error}");
            ExitCode::FAILURE
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn sorted_ms(durations: &[Duration]) -> Vec<f64> {
    let mut ms: Vec<f64> = durations.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    ms
}

/// `VmHWM` and `VmRSS` of a process, in KiB.
fn memory_kib(pid: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// The fields of a `SnapshotResponse` a dataplane needs to ACK it; decoding
/// only these skips the resource (one length-delimited field) in O(1).
#[derive(Clone, PartialEq, prost::Message)]
struct Envelope {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(string, tag = "2")]
    version_info: String,
    #[prost(string, tag = "3")]
    nonce: String,
}

/// Requests encoded by prost; responses handed over as their raw bytes.
#[derive(Debug, Default)]
struct RawResponseCodec;

struct RawDecoder;

impl tonic::codec::Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

impl tonic::codec::Codec for RawResponseCodec {
    type Encode = pb::SnapshotRequest;
    type Decode = Bytes;
    type Encoder = tonic_prost::ProstEncoder<pb::SnapshotRequest>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<pb::SnapshotRequest, pb::SnapshotResponse>::raw_encoder(
            tonic::codec::BufferSettings::default(),
        )
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

/// One simulated dataplane: asks for both types and ACKs every response,
/// after decoding it whole while `decode_resources` is set (as a dataplane
/// does), or only its envelope otherwise (the controller's fan-out alone: a
/// real fleet decodes on its own machines, not on the controller's cores).
async fn simulated_dataplane(
    endpoint: String,
    id: usize,
    decode_resources: Arc<AtomicBool>,
) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint)
        .map_err(|e| format!("dataplane {id}: endpoint: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("dataplane {id}: connect: {e}"))?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let (requests, receiver) = mpsc::channel(8);
    for (i, type_url) in [ROUTE_CONFIG_TYPE_URL, ENDPOINT_LOADS_TYPE_URL]
        .into_iter()
        .enumerate()
    {
        let node = (i == 0).then(|| pb::Node {
            id: format!("sim-{id}"),
            build_version: "bench".into(),
        });
        let _ = requests
            .send(pb::SnapshotRequest {
                node,
                type_url: type_url.into(),
                ..Default::default()
            })
            .await;
    }
    grpc.ready()
        .await
        .map_err(|e| format!("dataplane {id}: not ready: {e}"))?;
    let mut responses = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(receiver)),
            http::uri::PathAndQuery::from_static(
                "/switchyard.routing.v1.RoutingDiscovery/StreamSnapshots",
            ),
            RawResponseCodec,
        )
        .await
        .map_err(|e| format!("dataplane {id}: stream: {e}"))?
        .into_inner();
    while let Some(response) = responses.next().await {
        let Ok(bytes) = response else { break };
        if decode_resources.load(Ordering::Relaxed) {
            pb::SnapshotResponse::decode(bytes.clone())
                .map_err(|e| format!("dataplane {id}: decode: {e}"))?;
        }
        let envelope =
            Envelope::decode(bytes).map_err(|e| format!("dataplane {id}: decode: {e}"))?;
        let ack = pb::SnapshotRequest {
            node: None,
            type_url: envelope.type_url,
            version_info: envelope.version_info,
            response_nonce: envelope.nonce,
            error_detail: None,
            ..Default::default()
        };
        if requests.send(ack).await.is_err() {
            break;
        }
    }
    Ok(())
}

fn all_acked(
    statuses: &[DataplaneStatus],
    resource: ResourceType,
    version: &str,
    n: usize,
) -> bool {
    statuses
        .iter()
        .filter(|s| s.resource(resource).acked_version.as_deref() == Some(version))
        .count()
        >= n
}

async fn wait_all_acked(
    registry: &DataplaneRegistry,
    resource: ResourceType,
    version: &str,
    n: usize,
) -> Result<(), String> {
    tokio::time::timeout(
        ACK_DEADLINE,
        registry.wait_until(|statuses| all_acked(statuses, resource, version, n)),
    )
    .await
    .map_err(|_| {
        format!(
            "{} {version} not ACKed by {n} streams within {ACK_DEADLINE:?}",
            resource.label()
        )
    })
}

/// Waits until `n` streams ACKed both the RouteConfig and the EndpointLoads versions.
async fn wait_both_acked(
    registry: &DataplaneRegistry,
    route_config: &str,
    endpoint_loads: &str,
    n: usize,
) -> Result<(), String> {
    wait_all_acked(registry, ResourceType::RouteConfig, route_config, n).await?;
    wait_all_acked(registry, ResourceType::EndpointLoads, endpoint_loads, n).await
}

/// Route change number `change` (the first route's weight changes): compiled
/// and published; the time until `n` streams ACKed it, or `None` when it
/// changed nothing.
async fn time_route_change(
    args: &Args,
    publisher: &SnapshotPublisher,
    registry: &DataplaneRegistry,
    change: usize,
    n: usize,
) -> Result<Option<Duration>, String> {
    let weight = 10 + (change as u32 % 80);
    let changed = scale::objects(&scale::yaml(&args.shape(), weight))?;
    let started = clock::now();
    let routes = compile_route_config(&changed.routes, &changed.servers, &changed.pods);
    let published = publisher.publish_route_config(routes.route_config, 2 + change as i64);
    if !published.changed {
        return Ok(None);
    }
    wait_all_acked(registry, ResourceType::RouteConfig, &published.version, n).await?;
    Ok(Some(started.elapsed()))
}

async fn run(args: Args) -> Result<(), String> {
    if args.servers == 0 || args.pods == 0 || args.routes == 0 {
        return Err("--servers, --pods and --routes must be positive".into());
    }
    // Inputs.
    let yaml = scale::yaml(&args.shape(), 90);
    let objects = scale::objects(&yaml)?;
    let pod_loads = scale::loads(&objects, 1.0, FIRST_PASS_UNIX_MS);

    // Compile time.
    let mut compile_times = Vec::new();
    let mut compiled = None;
    for _ in 0..args.compiles.max(1) {
        let started = clock::now();
        let routes = compile_route_config(&objects.routes, &objects.servers, &objects.pods);
        compile_times.push(started.elapsed());
        compiled = Some(routes);
    }
    let compiled = compiled.ok_or("no compile ran")?;
    let accepted_routes = compiled.route_config.routes.len();
    let endpoints: usize = compiled
        .route_config
        .servers
        .iter()
        .map(|s| s.endpoints.len())
        .sum();
    if accepted_routes != args.routes || compiled.route_config.servers.len() != args.servers {
        return Err(format!(
            "compile accepted {accepted_routes} routes and {} servers, expected {} and {}",
            compiled.route_config.servers.len(),
            args.routes,
            args.servers
        ));
    }
    let mut load_times = Vec::new();
    let mut endpoint_loads = None;
    for _ in 0..args.compiles.max(1) {
        let started = clock::now();
        let loads = compile_endpoint_loads(&compiled.route_config, &pod_loads);
        load_times.push(started.elapsed());
        endpoint_loads = Some(loads);
    }
    let endpoint_loads = endpoint_loads.ok_or("no load compile ran")?;
    let route_config_bytes = compiled.route_config.encoded_len();
    let endpoint_loads_bytes = endpoint_loads.encoded_len();

    // The stream server, in this process.
    let prometheus = prometheus::Registry::new();
    let metrics = XdsMetrics::register(&prometheus).map_err(|e| e.to_string())?;
    let publisher = Arc::new(SnapshotPublisher::new("bench-controller", metrics.clone()));
    let registry = DataplaneRegistry::new();
    let service = RoutingDiscoveryService::new(Arc::clone(&publisher), registry.clone(), metrics);
    let first_rc = publisher.publish_route_config(compiled.route_config.clone(), 1);
    let first_el = publisher.publish_endpoint_loads(endpoint_loads.clone(), 1);
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let xds_addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    let server = tokio::spawn(switchyard_controller::xds::serve(
        listener,
        service,
        Default::default(),
        std::future::pending(),
    ));
    let memory_before_streams = memory_kib("self");

    let endpoint = format!("http://{xds_addr}");
    let started = clock::now();
    let mut clients = Vec::new();
    let decode_resources = Arc::new(AtomicBool::new(true));
    for id in 0..args.streams {
        clients.push(tokio::spawn(simulated_dataplane(
            endpoint.clone(),
            id,
            decode_resources.clone(),
        )));
    }
    wait_both_acked(
        &registry,
        &first_rc.version,
        &first_el.version,
        args.streams,
    )
    .await?;
    let initial_sync = started.elapsed();

    // A real dataplane for its memory with the whole snapshot.
    let mut real = None;
    if let Some(binary) = &args.dataplane_bin {
        let child = tokio::process::Command::new(binary)
            .args([
                "--controller",
                &endpoint,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--debug-port",
                "0",
                "--node-id",
                "real-dataplane",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let streams = args.streams + 1;
        wait_both_acked(&registry, &first_rc.version, &first_el.version, streams).await?;
        real = Some(child);
    }
    let total_streams = args.streams + usize::from(real.is_some());

    // Changes: one route's weights, then one pod's load; each must reach every stream.
    let mut route_changes = Vec::new();
    let mut load_changes = Vec::new();
    let mut load_update_bytes = 0;
    for change in 0..args.changes {
        let timed = time_route_change(&args, &publisher, &registry, change, total_streams);
        route_changes.extend(timed.await?);

        // The next scrape pass: every pod scraped again, one pod's load changed.
        let pass_unix_ms = FIRST_PASS_UNIX_MS + 1_000 * (change as i64 + 1);
        let changed_loads = scale::loads(&objects, 100.0 + change as f64, pass_unix_ms);
        let started = clock::now();
        let loads = compile_endpoint_loads(&compiled.route_config, &changed_loads);
        let published = publisher.publish_endpoint_loads(loads, 2 + change as i64);
        if let Some(update) = publisher
            .endpoint_loads()
            .and_then(|latest| latest.update.clone())
        {
            load_update_bytes = load_update_bytes.max(update.response.encoded_len());
        }
        if published.changed {
            wait_all_acked(
                &registry,
                ResourceType::EndpointLoads,
                &published.version,
                total_streams,
            )
            .await?;
            load_changes.push(started.elapsed());
        }
    }

    // The same route changes with the simulated dataplanes reading only the
    // envelope: what the controller's fan-out costs when, as in a real fleet,
    // the decoding happens elsewhere (the real dataplane still decodes and applies).
    decode_resources.store(false, Ordering::Relaxed);
    let mut route_changes_fan_out = Vec::new();
    for change in args.changes..2 * args.changes {
        let timed = time_route_change(&args, &publisher, &registry, change, total_streams);
        route_changes_fan_out.extend(timed.await?);
    }

    let controller_memory = memory_kib("self");
    let dataplane_memory = match &real {
        Some(child) => child.id().and_then(|pid| memory_kib(&pid.to_string())),
        None => None,
    };

    let compile_ms = sorted_ms(&compile_times);
    let load_ms = sorted_ms(&load_times);
    let route_ms = sorted_ms(&route_changes);
    let route_fan_out_ms = sorted_ms(&route_changes_fan_out);
    let load_change_ms = sorted_ms(&load_changes);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut table = String::new();
    let _ = writeln!(
        table,
        "Control-plane scale: {} pods ({endpoints} endpoints) / {} ModelServers / {} ModelRoutes, {} simulated dataplane streams{}\n",
        args.pods,
        args.servers,
        args.routes,
        args.streams,
        if real.is_some() {
            " + 1 real dataplane"
        } else {
            ""
        }
    );
    let _ = writeln!(table, "| Measure | Value | Target |");
    let _ = writeln!(table, "|---|---|---|");
    let _ = writeln!(
        table,
        "| RouteConfig compile (p50 / max of {}) | {:.1} ms / {:.1} ms | < 100 ms |",
        compile_ms.len(),
        percentile(&compile_ms, 50.0),
        percentile(&compile_ms, 100.0)
    );
    let _ = writeln!(
        table,
        "| EndpointLoads compile (p50 / max) | {:.1} ms / {:.1} ms | |",
        percentile(&load_ms, 50.0),
        percentile(&load_ms, 100.0)
    );
    let _ = writeln!(
        table,
        "| RouteConfig on the wire | {:.1} KiB | |",
        route_config_bytes as f64 / 1024.0
    );
    let _ = writeln!(
        table,
        "| EndpointLoads on the wire: whole set / update for one pod's change | {:.1} KiB / {} bytes | |",
        endpoint_loads_bytes as f64 / 1024.0,
        load_update_bytes
    );
    let _ = writeln!(
        table,
        "| Initial sync of all streams (both types) | {:.0} ms | |",
        initial_sync.as_secs_f64() * 1e3
    );
    let route_change = format!("Route change -> all {total_streams} ACKed");
    let measures = [
        (
            format!(
                "{route_change}, incl. compile, every simulated dataplane decoding the whole RouteConfig on this machine"
            ),
            &route_ms,
        ),
        (
            format!("{route_change}, simulated dataplanes decoding only the envelope"),
            &route_fan_out_ms,
        ),
        (
            format!("Scrape pass with one pod's load changed -> all {total_streams} ACKed"),
            &load_change_ms,
        ),
    ];
    for (measure, samples) in measures {
        let _ = writeln!(
            table,
            "| {measure} (p50 / p99 of {}) | {:.1} ms / {:.1} ms | p99 < 250 ms |",
            samples.len(),
            percentile(samples, 50.0),
            percentile(samples, 99.0)
        );
    }
    if let Some((hwm, _)) = memory_before_streams {
        let _ = writeln!(
            table,
            "| Controller peak RSS before streams (objects + compiled snapshot) | {:.1} MiB | |",
            mib(hwm)
        );
    }
    if let Some((hwm, rss)) = controller_memory {
        let _ = writeln!(
            table,
            "| Bench process peak / current RSS (controller + {} simulated streams) | {:.1} / {:.1} MiB | |",
            args.streams,
            mib(hwm),
            mib(rss)
        );
    }
    match dataplane_memory {
        Some((hwm, rss)) => {
            let _ = writeln!(
                table,
                "| Real dataplane peak / current RSS with the snapshot | {:.1} / {:.1} MiB | < 100 MiB |",
                mib(hwm),
                mib(rss)
            );
        }
        None => {
            let _ = writeln!(
                table,
                "| Real dataplane RSS | not measured (no --dataplane-bin) | < 100 MiB |"
            );
        }
    }
    drop(real);
    for client in clients {
        client.abort();
    }
    server.abort();

    // Route churn, on a quiet process: the streams above are gone.
    let mut missed = None;
    if let Some(binary) = args
        .dataplane_bin
        .as_deref()
        .filter(|_| args.churn_routes > 0)
    {
        let churn = route_churn::run(args.churn_routes, args.churn_rounds, binary).await?;
        table.push_str(&churn.rows());
        missed = churn.miss();
    }
    print!("{table}");
    if let Some(path) = &args.output {
        std::fs::write(path, &table)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    missed.map_or(Ok(()), Err)
}
