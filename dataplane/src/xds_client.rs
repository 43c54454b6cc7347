//! The controller stream client.
//!
//! Subscribes to RouteConfig and EndpointLoads on one `StreamSnapshots` stream,
//! hands every response to a [`SnapshotSink`], answers it with an ACK or a NACK,
//! and reconnects with jittered exponential backoff. The dataplane keeps serving
//! its last applied snapshot while the controller is unreachable; on reconnect
//! the subscriptions carry the applied versions, so the controller sends only
//! what changed meanwhile. The protocol, and what the dataplane does with each
//! response: `docs/protocol.md`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::Uri;

use bytes::{Buf as _, Bytes};
use parking_lot::Mutex;
use prost::Message as _;
use rand::Rng;
use switchyard_runtime::clock;
use switchyard_snapshot::{
    ENDPOINT_LOADS_TYPE_URL, Nack, ROUTE_CONFIG_TYPE_URL, ResourceType, pb, wire,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::auth::UnknownKeyIds;

/// First reconnect delay: a controller restart costs the fleet almost nothing,
/// yet a refused port is not hammered in a tight loop.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Reconnect delay cap: a fleet retrying a controller that is down for long stays
/// cheap for it, and recovery is still noticed within ~15 s (Envoy, ztunnel use 15 s too).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(15);
/// TCP connect bound: an address that silently drops SYNs (controller node gone)
/// fails the attempt in 5 s instead of the kernel's ~2 min, so the retry loop moves on.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Where a dataplane started without `--controller` looks: a controller on the same
/// host in local mode (15010 is the conventional plaintext xDS port).
pub const DEFAULT_CONTROLLER_URI: &str = "http://127.0.0.1:15010";
/// Node id when the caller gives none; real deployments pass the pod name.
pub const DEFAULT_NODE_ID: &str = "switchyard-dataplane";
/// HTTP/2 PING interval on the controller connection: the stream sits idle while
/// nothing changes, and without pings a controller whose node vanished (no FIN,
/// no RST) would go unnoticed until the next write, possibly forever.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may stay unanswered before the connection is declared dead:
/// with [`KEEPALIVE_INTERVAL`] a silent controller is noticed within ~15 s.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Relative jitter on every backoff delay (±20 %): dataplanes that lost the
/// controller together do not retry in lockstep.
pub const BACKOFF_JITTER: f64 = 0.2;
/// Upper bound of the random pause before reconnecting after the controller closed
/// the stream cleanly (rollout, max connection age): spreads the fleet's reconnects
/// without noticeably delaying fresh state.
pub const CLEAN_CLOSE_RECONNECT_JITTER: Duration = Duration::from_millis(50);
/// Largest response accepted from the controller: a RouteConfig carries every pod
/// of every ModelServer, which can outgrow tonic's 4 MiB default in a large
/// cluster; refusing it would leave the dataplane in a reconnect loop.
pub const MAX_SNAPSHOT_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Smallest backoff delay: a zero `initial_backoff` would otherwise never grow and
/// retry a refused connection in a busy loop.
const MIN_BACKOFF: Duration = Duration::from_millis(1);
/// How often the stream looks whether the fleet-wide fairness order was
/// turned on while it is off.
const FAIRNESS_IDLE_CHECK: Duration = Duration::from_millis(500);
/// Requests queued towards the controller: two subscriptions plus one ACK/NACK per
/// response, and at most one response per type is un-ACKed, so a few slots suffice.
const REQUEST_QUEUE_CAPACITY: usize = 8;

/// The gRPC method the client calls.
const STREAM_SNAPSHOTS_PATH: &str = "/switchyard.routing.v1.RoutingDiscovery/StreamSnapshots";
/// Field numbers of `SnapshotResponse.resource`'s cases, kept encoded (see
/// [`ReceivedResponse`]).
const ROUTE_CONFIG_FIELD: u32 = 10;
const ENDPOINT_LOADS_FIELD: u32 = 11;

/// Where validated resources go. Implemented by the dataplane's snapshot store.
pub trait SnapshotSink: Send + Sync + 'static {
    /// Decode, validate and apply the encoded RouteConfig atomically; `Err`
    /// is sent as the NACK, previous state kept.
    fn apply_route_config(&self, version: &str, config: Bytes) -> Result<(), Nack>;
    /// Decode, validate and apply the encoded EndpointLoads atomically;
    /// `Err` is sent as the NACK, previous state kept.
    fn apply_endpoint_loads(&self, version: &str, loads: Bytes) -> Result<(), Nack>;
    /// Frees what replaced snapshots still hold once no request uses them;
    /// called every [`RECLAIM_INTERVAL`] by [`run_on_own_thread`].
    fn reclaim(&self) {}

    /// Changes whenever this dataplane ejects a pod on its own evidence
    /// (outlier detection); `None` when it never does.
    fn ejections(&self) -> Option<watch::Receiver<u64>> {
        None
    }

    /// The pods this dataplane ejects on its own evidence right now, for
    /// the controller to pass on to every dataplane.
    fn outlier_report(&self) -> pb::OutlierReport {
        pb::OutlierReport::default()
    }

    /// How often to report fairness usage; None while the fleet-wide
    /// order is off.
    fn fairness_report_interval(&self) -> Option<Duration> {
        None
    }

    /// What this dataplane served each user since its last report (all of
    /// it with `everything`); None when there is nothing to send now.
    fn fairness_usage_report(&self, _everything: bool) -> Option<pb::FairnessUsageReport> {
        None
    }
}

/// A `SnapshotResponse` as it came off the stream: the envelope decoded,
/// the resource still encoded. The sink decodes a resource a part at a time
/// (a big RouteConfig's ModelServers one by one while it builds the table,
/// so the whole decoded config is never in memory), and a resource of the
/// version already applied is never decoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReceivedResponse {
    /// Every field but `resource` (None here).
    pub envelope: pb::SnapshotResponse,
    pub resource: Option<EncodedResource>,
}

/// `SnapshotResponse.resource`, encoded.
#[derive(Debug, Clone, PartialEq)]
pub enum EncodedResource {
    RouteConfig(Bytes),
    EndpointLoads(Bytes),
}

impl EncodedResource {
    fn kind(&self) -> ResourceType {
        match self {
            Self::RouteConfig(_) => ResourceType::RouteConfig,
            Self::EndpointLoads(_) => ResourceType::EndpointLoads,
        }
    }
}

impl ReceivedResponse {
    /// Decodes an encoded `SnapshotResponse` but its resource.
    pub fn decode(message: &Bytes) -> Result<Self, prost::DecodeError> {
        let split = wire::split_fields(message, &[ROUTE_CONFIG_FIELD, ENDPOINT_LOADS_FIELD])?;
        let envelope = pb::SnapshotResponse::decode(split.rest)?;
        // A oneof: the case last on the wire is the one set.
        let resource = split
            .taken
            .into_iter()
            .next_back()
            .map(|(field, encoded)| match field {
                ROUTE_CONFIG_FIELD => EncodedResource::RouteConfig(encoded),
                _ => EncodedResource::EndpointLoads(encoded),
            });
        Ok(Self { envelope, resource })
    }
}

/// The controller stream's codec: requests encoded by prost, responses
/// decoded as [`ReceivedResponse`].
#[derive(Debug, Default)]
struct SnapshotCodec;

struct ReceivedDecoder;

impl tonic::codec::Decoder for ReceivedDecoder {
    type Item = ReceivedResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<ReceivedResponse>, tonic::Status> {
        // Copied out: the applied RouteConfig is kept encoded (debug dumps)
        // in an allocation of its own size, not in the stream's read buffer.
        let mut message = vec![0; buf.remaining()];
        buf.copy_to_slice(&mut message);
        ReceivedResponse::decode(&Bytes::from(message))
            .map(Some)
            .map_err(|error| tonic::Status::internal(error.to_string()))
    }
}

impl tonic::codec::Codec for SnapshotCodec {
    type Encode = pb::SnapshotRequest;
    type Decode = ReceivedResponse;
    type Encoder = tonic_prost::ProstEncoder<pb::SnapshotRequest>;
    type Decoder = ReceivedDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<pb::SnapshotRequest, pb::SnapshotResponse>::raw_encoder(
            tonic::codec::BufferSettings::default(),
        )
    }

    fn decoder(&mut self) -> Self::Decoder {
        ReceivedDecoder
    }
}

/// How often a client on its own thread frees replaced snapshots that
/// requests were still using when they were replaced: requests hold a
/// snapshot only until their response head arrives.
pub const RECLAIM_INTERVAL: Duration = Duration::from_secs(1);

/// Why the client's own thread could not run or stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ClientThreadError {
    #[error("cannot start the controller stream thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the controller stream thread stopped unexpectedly (panicked)")]
    Stopped,
}

/// [`run`] on a thread of its own with a single-threaded runtime, until
/// `stop` is cancelled. Decoding a RouteConfig, validating it, building its
/// table, cleaning up the metrics of what left and freeing the table it
/// replaces take time proportional to the snapshot (thousands of routes:
/// tens of milliseconds or more); none of it runs on the threads that serve
/// requests and probes, which only ever swap an `Arc`.
pub fn run_on_own_thread<S>(
    config: XdsClientConfig,
    sink: Arc<S>,
    status: Arc<ControllerStatus>,
    unknown_keys: Arc<UnknownKeyIds>,
    stop: switchyard_runtime::CancellationToken,
) -> impl Future<Output = Result<(), ClientThreadError>> + Send + 'static
where
    S: SnapshotSink + ?Sized,
{
    let (done, finished) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("controller-stream".to_owned())
        .spawn(move || {
            crate::per_worker::run_below_traffic_workers();
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = done.send(Err(ClientThreadError::Spawn(error)));
                    return;
                }
            };
            runtime.block_on(async move {
                let reclaimer = sink.clone();
                tokio::spawn(async move {
                    let mut every = tokio::time::interval(RECLAIM_INTERVAL);
                    loop {
                        every.tick().await;
                        reclaimer.reclaim();
                    }
                });
                run(config, sink, status, unknown_keys, stop.cancelled_owned()).await;
            });
            let _ = done.send(Ok(()));
        });
    async move {
        spawned.map_err(ClientThreadError::Spawn)?;
        finished.await.unwrap_or(Err(ClientThreadError::Stopped))
    }
}

/// How to reach the controller and how to retry.
#[derive(Debug, Clone)]
pub struct XdsClientConfig {
    /// `http://host:port` of the controller's gRPC listener.
    pub controller: Uri,
    /// Sent in the first request of every stream; the controller's sync registry key.
    pub node_id: String,
    /// Sent next to `node_id`, so the controller can tell dataplane builds apart.
    pub build_version: String,
    /// First delay after a failed attempt; doubles per failure up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Cap of the doubling (each delay is jittered ±[`BACKOFF_JITTER`] around it).
    pub max_backoff: Duration,
    /// Bound on establishing the TCP connection of one attempt.
    pub connect_timeout: Duration,
    /// How the stream is secured (an `https://` controller).
    pub security: StreamCredentials,
}

/// TLS settings and the token of the stream to the controller.
#[derive(Clone, Default)]
pub struct StreamCredentials {
    /// Set for an `https://` controller: the CA to trust and the client certificate, if any.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// `Bearer <token>`, sent as `authorization` on every stream (marked sensitive).
    pub authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for StreamCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCredentials")
            .field("tls", &self.tls.is_some())
            .field("token", &self.authorization.is_some())
            .finish()
    }
}

impl XdsClientConfig {
    /// Defaults for everything but where the controller is and who we are.
    pub fn new(controller: Uri, node_id: impl Into<String>) -> Self {
        Self {
            controller,
            node_id: node_id.into(),
            ..Self::default()
        }
    }
}

impl Default for XdsClientConfig {
    fn default() -> Self {
        Self {
            controller: Uri::from_static(DEFAULT_CONTROLLER_URI),
            node_id: DEFAULT_NODE_ID.to_owned(),
            build_version: env!("CARGO_PKG_VERSION").to_owned(),
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            security: StreamCredentials::default(),
        }
    }
}

/// Per-type sync state, as shown on /debug.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceStatus {
    /// Version of the last resource of this type applied ("snapshot in use").
    pub applied_version: Option<String>,
    /// When that version was applied (source of the "snapshot age" metric).
    pub applied_at: Option<SystemTime>,
    /// Version of the last response of this type the dataplane rejected.
    pub rejected_version: Option<String>,
    /// Responses of this type answered with an ACK (including unchanged re-sends).
    pub acks: u64,
    /// Responses of this type answered with a NACK.
    pub nacks: u64,
}

/// A consistent copy of everything [`ControllerStatus`] knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControllerStatusView {
    /// A stream to the controller is open right now.
    pub connected: bool,
    /// When the current stream opened (`None` while disconnected).
    pub connected_since: Option<SystemTime>,
    /// `control_plane_id` of the last response (which controller replica we follow).
    pub control_plane_id: Option<String>,
    pub route_config: ResourceStatus,
    pub endpoint_loads: ResourceStatus,
    /// Most recent failure (connect error, broken stream, NACK reason). Kept after
    /// recovery so /debug can still show why the last reconnect happened.
    pub last_error: Option<String>,
    /// Streams opened since start.
    pub connect_count: u64,
    /// Attempts that failed to open and streams that broke (clean closes after a
    /// delivered snapshot are not failures).
    pub stream_failures: u64,
}

/// Shared, cheap-to-read view of the controller connection for /readyz, /debug
/// and metrics. Written only by the client task.
#[derive(Debug)]
pub struct ControllerStatus {
    state: Mutex<ControllerStatusView>,
    /// Flips to true once, when the first RouteConfig is applied.
    ready: watch::Sender<bool>,
}

impl Default for ControllerStatus {
    fn default() -> Self {
        Self::new()
    }
}

impl ControllerStatus {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(ControllerStatusView::default()),
            ready: watch::Sender::new(false),
        }
    }

    pub fn connected(&self) -> bool {
        self.state.lock().connected
    }

    /// A RouteConfig has been applied at least once (it stays applied while the
    /// controller is down, so readiness never flips back).
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Resolves once the first RouteConfig has been applied (at once if it has).
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        // The sender lives in `self`, which outlives this borrow, so the channel
        // cannot close while waiting; an error here is unreachable.
        let _ = ready.wait_for(|ready| *ready).await;
    }

    pub fn route_config_version(&self) -> Option<String> {
        self.state.lock().route_config.applied_version.clone()
    }

    pub fn endpoint_loads_version(&self) -> Option<String> {
        self.state.lock().endpoint_loads.applied_version.clone()
    }

    /// When the applied resource of `kind` was applied; `now - this` is its age.
    pub fn last_applied_at(&self, kind: ResourceType) -> Option<SystemTime> {
        self.resource(kind).applied_at
    }

    pub fn resource(&self, kind: ResourceType) -> ResourceStatus {
        let state = self.state.lock();
        resource_of(&state, kind).clone()
    }

    pub fn last_error(&self) -> Option<String> {
        self.state.lock().last_error.clone()
    }

    pub fn connect_count(&self) -> u64 {
        self.state.lock().connect_count
    }

    pub fn stream_failures(&self) -> u64 {
        self.state.lock().stream_failures
    }

    pub fn ack_count(&self, kind: ResourceType) -> u64 {
        resource_of(&self.state.lock(), kind).acks
    }

    pub fn nack_count(&self, kind: ResourceType) -> u64 {
        resource_of(&self.state.lock(), kind).nacks
    }

    /// Everything at once, consistent with itself (for /debug).
    pub fn view(&self) -> ControllerStatusView {
        self.state.lock().clone()
    }

    fn record_connected(&self) {
        let mut state = self.state.lock();
        state.connected = true;
        state.connected_since = Some(clock::wall_now());
        state.connect_count += 1;
    }

    /// `failure` is `None` when the stream ended in an orderly way (clean close
    /// after a snapshot, shutdown).
    fn record_disconnected(&self, failure: Option<String>) {
        let mut state = self.state.lock();
        state.connected = false;
        state.connected_since = None;
        if let Some(failure) = failure {
            state.stream_failures += 1;
            state.last_error = Some(failure);
        }
    }

    fn record_control_plane(&self, control_plane_id: &str) {
        let mut state = self.state.lock();
        // Compared first: it is the same id on every response, no need to reallocate.
        if state.control_plane_id.as_deref() != Some(control_plane_id) {
            state.control_plane_id = Some(control_plane_id.to_owned());
        }
    }

    fn record_ack(&self, kind: ResourceType, newly_applied: Option<&str>) {
        {
            let mut state = self.state.lock();
            let resource = resource_of_mut(&mut state, kind);
            resource.acks += 1;
            if let Some(version) = newly_applied {
                resource.applied_version = Some(version.to_owned());
                resource.applied_at = Some(clock::wall_now());
            }
        }
        if kind == ResourceType::RouteConfig && newly_applied.is_some() {
            self.ready
                .send_if_modified(|ready| !std::mem::replace(ready, true));
        }
    }

    fn record_nack(&self, kind: Option<ResourceType>, rejected_version: &str, message: &str) {
        let mut state = self.state.lock();
        if let Some(kind) = kind {
            let resource = resource_of_mut(&mut state, kind);
            resource.nacks += 1;
            resource.rejected_version = Some(rejected_version.to_owned());
        }
        state.last_error = Some(message.to_owned());
    }
}

fn resource_of(state: &ControllerStatusView, kind: ResourceType) -> &ResourceStatus {
    match kind {
        ResourceType::RouteConfig => &state.route_config,
        ResourceType::EndpointLoads => &state.endpoint_loads,
    }
}

fn resource_of_mut(state: &mut ControllerStatusView, kind: ResourceType) -> &mut ResourceStatus {
    match kind {
        ResourceType::RouteConfig => &mut state.route_config,
        ResourceType::EndpointLoads => &mut state.endpoint_loads,
    }
}

/// Jittered exponential backoff: each delay is the current base ±[`BACKOFF_JITTER`],
/// the base doubling from `initial` up to `max`, so a delay never exceeds
/// `max * (1 + BACKOFF_JITTER)`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next_base: Duration,
}

impl Backoff {
    /// `initial` below 1 ms is raised to 1 ms; `max` below `initial` is raised to it.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(MIN_BACKOFF);
        Self {
            initial,
            max: max.max(initial),
            next_base: initial,
        }
    }

    /// The delay to wait now; the following one will be about twice as long.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next_base;
        self.next_base = base.saturating_mul(2).min(self.max);
        jittered(base, BACKOFF_JITTER)
    }

    /// Back to `initial`, after a connection that worked.
    pub fn reset(&mut self) {
        self.next_base = self.initial;
    }
}

/// `base` scaled by a random factor in `[1 - fraction, 1 + fraction]`.
fn jittered(base: Duration, fraction: f64) -> Duration {
    let factor = rand::rng().random_range((1.0 - fraction)..=(1.0 + fraction));
    // Only an absurd `max_backoff` can overflow; then the unjittered base will do.
    Duration::try_from_secs_f64(base.as_secs_f64() * factor).unwrap_or(base)
}

/// [`run`] on the current Tokio runtime.
///
/// Besides ACKs and NACKs it sends `unknown_keys`' batches: key ids of JWTs
/// this dataplane could not verify, so the controller refetches the keys.
pub fn spawn<S>(
    config: XdsClientConfig,
    sink: Arc<S>,
    status: Arc<ControllerStatus>,
    unknown_keys: Arc<UnknownKeyIds>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<()>
where
    S: SnapshotSink + ?Sized,
{
    tokio::spawn(run(config, sink, status, unknown_keys, shutdown))
}

/// Runs the client until `shutdown` resolves; the sink and `status` keep the
/// last applied state afterwards.
pub async fn run<S>(
    config: XdsClientConfig,
    sink: Arc<S>,
    status: Arc<ControllerStatus>,
    unknown_keys: Arc<UnknownKeyIds>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    S: SnapshotSink + ?Sized,
{
    tokio::pin!(shutdown);
    let mut applied = AppliedVersions::default();
    let mut backoff = Backoff::new(config.initial_backoff, config.max_backoff);
    tracing::info!(
        controller = %config.controller,
        node = %config.node_id,
        "starting controller stream client"
    );
    loop {
        let mut session = Session {
            config: &config,
            sink: &*sink,
            status: &status,
            unknown_keys: &unknown_keys,
            applied: &mut applied,
            responses_received: 0,
        };
        let end = tokio::select! {
            () = &mut shutdown => break,
            end = session.run() => end,
        };
        let delivered = session.responses_received > 0;
        if delivered {
            // The controller was healthy enough to serve us: whatever went wrong
            // now is a fresh problem, not the continuation of an outage.
            backoff.reset();
        }
        let delay = if matches!(end, StreamEnd::ClosedByController) {
            status.record_disconnected(None);
            tracing::info!(
                controller = %config.controller,
                node = %config.node_id,
                "controller closed the stream; reconnecting"
            );
            jittered_pause(CLEAN_CLOSE_RECONNECT_JITTER)
        } else {
            let error = end.to_string();
            status.record_disconnected(Some(error.clone()));
            let delay = backoff.next_delay();
            tracing::warn!(
                controller = %config.controller,
                node = %config.node_id,
                error = %error,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                route_config_version = applied.get(ResourceType::RouteConfig),
                "controller stream down; serving the last applied snapshot"
            );
            delay
        };
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    status.record_disconnected(None);
    tracing::info!(node = %config.node_id, "controller stream client stopped");
}

/// A uniformly random pause in `[0, max]`.
fn jittered_pause(max: Duration) -> Duration {
    max.mul_f64(rand::rng().random_range(0.0..=1.0))
}

/// Version last applied per type; survives reconnects (it is what we serve with).
#[derive(Debug, Default)]
struct AppliedVersions([Option<String>; ResourceType::ALL.len()]);

impl AppliedVersions {
    fn get(&self, kind: ResourceType) -> &str {
        self.0[kind.index()].as_deref().unwrap_or("")
    }

    fn set(&mut self, kind: ResourceType, version: &str) {
        self.0[kind.index()] = Some(version.to_owned());
    }
}

/// Why one stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error("cannot open the stream: {}", describe_status(.0))]
    OpenFailed(tonic::Status),
    #[error("stream broke: {}", describe_status(.0))]
    Broken(tonic::Status),
    /// Orderly end (rollout, max connection age) of a stream that delivered.
    #[error("controller closed the stream")]
    ClosedByController,
    /// Orderly end of a stream that delivered nothing: retried with backoff, so
    /// a controller that keeps doing this is not hammered.
    #[error("controller closed the stream before sending a snapshot")]
    ClosedBeforeSnapshot,
    #[error("request stream to the controller closed")]
    RequestStreamClosed,
}

/// Code, message and cause chain of a status (tonic's own Display is noisy and
/// a transport error's message alone is just "transport error").
fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("{:?}", status.code());
    if !status.message().is_empty() {
        text.push_str(": ");
        text.push_str(status.message());
    }
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// One stream to the controller, from subscribing until it ends.
struct Session<'a, S: ?Sized> {
    config: &'a XdsClientConfig,
    sink: &'a S,
    status: &'a ControllerStatus,
    unknown_keys: &'a UnknownKeyIds,
    applied: &'a mut AppliedVersions,
    responses_received: u64,
}

impl<S: SnapshotSink + ?Sized> Session<'_, S> {
    async fn run(&mut self) -> StreamEnd {
        let (requests, outgoing) = mpsc::channel(REQUEST_QUEUE_CAPACITY);
        for (position, kind) in ResourceType::ALL.into_iter().enumerate() {
            let subscription = pb::SnapshotRequest {
                node: (position == 0).then(|| pb::Node {
                    id: self.config.node_id.clone(),
                    build_version: self.config.build_version.clone(),
                }),
                type_url: kind.type_url().to_owned(),
                version_info: self.applied.get(kind).to_owned(),
                response_nonce: String::new(),
                error_detail: None,
                unknown_jwt_key_ids: Vec::new(),
                outlier_report: None,
                fairness_usage: None,
            };
            if requests.send(subscription).await.is_err() {
                return StreamEnd::RequestStreamClosed;
            }
        }

        // A fresh channel per attempt: every attempt starts from a new connection
        // (and a new DNS lookup), never from a half-dead one the last stream left.
        let mut endpoint = Endpoint::from(self.config.controller.clone())
            .connect_timeout(self.config.connect_timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        if let Some(tls) = &self.config.security.tls {
            endpoint = match endpoint.tls_config(tls.clone()) {
                Ok(endpoint) => endpoint,
                Err(error) => {
                    return StreamEnd::OpenFailed(tonic::Status::unavailable(format!(
                        "TLS setup: {error}"
                    )));
                }
            };
        }
        let channel = endpoint.connect_lazy();
        let mut client =
            tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_SNAPSHOT_MESSAGE_BYTES);
        let mut request = tonic::Request::new(ReceiverStream::new(outgoing));
        if let Some(authorization) = &self.config.security.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        if let Err(error) = client.ready().await {
            return StreamEnd::OpenFailed(tonic::Status::unavailable(format!(
                "controller not ready: {error}"
            )));
        }
        let path = http::uri::PathAndQuery::from_static(STREAM_SNAPSHOTS_PATH);
        let mut responses = match client.streaming(request, path, SnapshotCodec).await {
            Ok(response) => response.into_inner(),
            Err(status) => return StreamEnd::OpenFailed(status),
        };
        self.status.record_connected();
        tracing::info!(
            controller = %self.config.controller,
            node = %self.config.node_id,
            route_config_version = self.applied.get(ResourceType::RouteConfig),
            endpoint_loads_version = self.applied.get(ResourceType::EndpointLoads),
            "connected to controller"
        );

        // What this dataplane ejects goes out on every new stream, then
        // again with every new ejection.
        let mut ejections = self.sink.ejections();
        if let Some(ejections) = &mut ejections {
            ejections.borrow_and_update();
        }
        if !self.report_ejections(&requests).await {
            return StreamEnd::RequestStreamClosed;
        }
        // Fairness usage: everything served on a new stream, then what
        // changed, once per interval.
        let mut report_everything = true;
        let mut next_usage_report = clock::now();
        loop {
            let message = tokio::select! {
                message = responses.message() => message,
                key_ids = self.unknown_keys.next_batch() => {
                    tracing::info!(node = %self.config.node_id, ?key_ids, "asking the controller to refetch the JWT keys");
                    let hint = pb::SnapshotRequest {
                        unknown_jwt_key_ids: key_ids,
                        ..Default::default()
                    };
                    if requests.send(hint).await.is_err() {
                        return StreamEnd::RequestStreamClosed;
                    }
                    continue;
                }
                Some(()) = ejected(&mut ejections) => {
                    if !self.report_ejections(&requests).await {
                        return StreamEnd::RequestStreamClosed;
                    }
                    continue;
                }
                () = clock::sleep_until(next_usage_report) => {
                    let interval = self.sink.fairness_report_interval();
                    next_usage_report = clock::now() + interval.unwrap_or(FAIRNESS_IDLE_CHECK);
                    if let Some(report) = interval.and_then(|_| self.sink.fairness_usage_report(report_everything)) {
                        report_everything = false;
                        let request = pb::SnapshotRequest {
                            fairness_usage: Some(report),
                            ..Default::default()
                        };
                        if requests.send(request).await.is_err() {
                            return StreamEnd::RequestStreamClosed;
                        }
                    }
                    continue;
                }
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) if self.responses_received > 0 => return StreamEnd::ClosedByController,
                Ok(None) => return StreamEnd::ClosedBeforeSnapshot,
                Err(status) => return StreamEnd::Broken(status),
            };
            self.responses_received += 1;
            let answer = self.answer(response);
            if requests.send(answer).await.is_err() {
                return StreamEnd::RequestStreamClosed;
            }
        }
    }

    /// Sends the sink's outlier report unless it is empty; false when the
    /// request stream is closed.
    async fn report_ejections(&self, requests: &mpsc::Sender<pb::SnapshotRequest>) -> bool {
        let report = self.sink.outlier_report();
        if report.ejections.is_empty() {
            return true;
        }
        tracing::info!(
            node = %self.config.node_id,
            pods = report.ejections.len(),
            "reporting ejected pods to the controller"
        );
        let request = pb::SnapshotRequest {
            outlier_report: Some(report),
            ..Default::default()
        };
        requests.send(request).await.is_ok()
    }

    /// Applies one response and builds its ACK or NACK, recording the outcome.
    fn answer(&mut self, response: ReceivedResponse) -> pb::SnapshotRequest {
        let type_url = response.envelope.type_url.clone();
        let version = response.envelope.version_info.clone();
        let nonce = response.envelope.nonce.clone();
        if !response.envelope.control_plane_id.is_empty() {
            self.status
                .record_control_plane(&response.envelope.control_plane_id);
        }
        let kind = ResourceType::from_type_url(&type_url);
        match apply_response(self.sink, self.applied, response) {
            Ok(applied) => {
                let kind = applied.kind;
                self.status
                    .record_ack(kind, applied.changed.then_some(version.as_str()));
                if applied.changed {
                    self.log_applied(kind, &version, &nonce);
                } else {
                    tracing::debug!(
                        node = %self.config.node_id,
                        resource = kind.label(),
                        version = %version,
                        nonce = %nonce,
                        "controller re-sent the applied version; acknowledged without applying"
                    );
                }
                pb::SnapshotRequest {
                    node: None,
                    type_url,
                    version_info: version,
                    response_nonce: nonce,
                    error_detail: None,
                    unknown_jwt_key_ids: Vec::new(),
                    outlier_report: None,
                    fairness_usage: None,
                }
            }
            Err(nack) => {
                let kept_version = kind
                    .map(|kind| self.applied.get(kind).to_owned())
                    .unwrap_or_default();
                self.status.record_nack(kind, &version, &nack.message);
                tracing::warn!(
                    node = %self.config.node_id,
                    type_url = %type_url,
                    version = %version,
                    nonce = %nonce,
                    kept_version = %kept_version,
                    reason = nack.reason.as_str_name(),
                    error = %nack.message,
                    "rejected snapshot from controller (NACK); keeping the previous one"
                );
                pb::SnapshotRequest {
                    node: None,
                    type_url,
                    version_info: kept_version,
                    response_nonce: nonce,
                    error_detail: Some(nack.into_error_detail()),
                    unknown_jwt_key_ids: Vec::new(),
                    outlier_report: None,
                    fairness_usage: None,
                }
            }
        }
    }

    fn log_applied(&self, kind: ResourceType, version: &str, nonce: &str) {
        // EndpointLoads changes every scrape interval; at info it would drown the log.
        match kind {
            ResourceType::RouteConfig => tracing::info!(
                node = %self.config.node_id,
                resource = kind.label(),
                version = %version,
                nonce = %nonce,
                "applied snapshot from controller"
            ),
            ResourceType::EndpointLoads => tracing::debug!(
                node = %self.config.node_id,
                resource = kind.label(),
                version = %version,
                nonce = %nonce,
                "applied snapshot from controller"
            ),
        }
    }
}

/// Resolves when `ejections` changes; never without one, and `None` once
/// its sender is gone.
async fn ejected(ejections: &mut Option<watch::Receiver<u64>>) -> Option<()> {
    match ejections {
        Some(ejections) => ejections.changed().await.ok(),
        None => std::future::pending().await,
    }
}

/// A response that was accepted.
#[derive(Debug, PartialEq, Eq)]
struct Accepted {
    kind: ResourceType,
    /// False when the response carried the version already applied (content
    /// versions are hashes, so there was nothing to do).
    changed: bool,
}

/// Checks that `response` is well formed and hands its resource to `sink`;
/// `Err` is the NACK. `applied` is updated only on success.
fn apply_response<S: SnapshotSink + ?Sized>(
    sink: &S,
    applied: &mut AppliedVersions,
    response: ReceivedResponse,
) -> Result<Accepted, Nack> {
    let malformed = |message: String| Nack::new(pb::NackReason::MalformedResponse, message);
    let type_url = response.envelope.type_url;
    let kind = ResourceType::from_type_url(&type_url).ok_or_else(|| {
        Nack::new(
            pb::NackReason::UnknownType,
            format!(
                "unknown type_url {type_url:?}; this dataplane understands \
                 {ROUTE_CONFIG_TYPE_URL:?} and {ENDPOINT_LOADS_TYPE_URL:?}"
            ),
        )
    })?;
    let version = response.envelope.version_info;
    if version.is_empty() {
        return Err(malformed(format!(
            "response for {type_url:?} has an empty version_info"
        )));
    }
    let resource = response
        .resource
        .ok_or_else(|| malformed(format!("response for {type_url:?} carries no resource")))?;
    if applied.get(kind) == version {
        return Ok(Accepted {
            kind,
            changed: false,
        });
    }
    match (kind, resource) {
        (ResourceType::RouteConfig, EncodedResource::RouteConfig(config)) => {
            sink.apply_route_config(&version, config)?;
        }
        (ResourceType::EndpointLoads, EncodedResource::EndpointLoads(loads)) => {
            sink.apply_endpoint_loads(&version, loads)?;
        }
        (_, other) => {
            let carried = match other.kind() {
                ResourceType::RouteConfig => "a RouteConfig",
                ResourceType::EndpointLoads => "an EndpointLoads",
            };
            return Err(malformed(format!(
                "response for {type_url:?} carries {carried} resource"
            )));
        }
    }
    applied.set(kind, &version);
    Ok(Accepted {
        kind,
        changed: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_snapshot::pb::snapshot_response::Resource;

    const SAMPLES: usize = 2_000;

    fn within(delay: Duration, base: Duration) -> bool {
        delay >= base.mul_f64(1.0 - BACKOFF_JITTER) && delay <= base.mul_f64(1.0 + BACKOFF_JITTER)
    }

    #[test]
    fn backoff_doubles_from_initial() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(15));
        for step in 0..7u32 {
            let base = Duration::from_millis(100) * 2u32.pow(step);
            let delay = backoff.next_delay();
            assert!(
                within(delay, base),
                "step {step}: {delay:?} not within ±20% of {base:?}"
            );
        }
    }

    #[test]
    fn backoff_caps_at_max() {
        let max = Duration::from_secs(15);
        let mut backoff = Backoff::new(Duration::from_millis(100), max);
        for _ in 0..10 {
            backoff.next_delay();
        }
        for _ in 0..100 {
            let delay = backoff.next_delay();
            assert!(within(delay, max), "{delay:?} not within ±20% of the cap");
        }
    }

    #[test]
    fn backoff_jitter_stays_within_bounds_and_varies() {
        let initial = Duration::from_millis(100);
        let delays: Vec<Duration> = (0..SAMPLES)
            .map(|_| Backoff::new(initial, Duration::from_secs(15)).next_delay())
            .collect();
        assert!(delays.iter().all(|delay| within(*delay, initial)));
        let lowest = delays.iter().min().copied().unwrap_or_default();
        let highest = delays.iter().max().copied().unwrap_or_default();
        // With 2000 uniform samples over ±20 ms, both ends of the range are reached
        // to within a few ms (missing a 5 ms band has probability ~(0.975)^2000).
        assert!(lowest < Duration::from_millis(85), "lowest {lowest:?}");
        assert!(highest > Duration::from_millis(115), "highest {highest:?}");
    }

    #[test]
    fn backoff_reset_starts_over() {
        let initial = Duration::from_millis(100);
        let mut backoff = Backoff::new(initial, Duration::from_secs(15));
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.reset();
        let delay = backoff.next_delay();
        assert!(within(delay, initial), "{delay:?} after reset");
    }

    #[test]
    fn backoff_never_spins_on_zero_initial() {
        let mut backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(backoff.next_delay() >= MIN_BACKOFF.mul_f64(1.0 - BACKOFF_JITTER));
    }

    #[test]
    fn backoff_survives_huge_max() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::MAX);
        for _ in 0..80 {
            backoff.next_delay();
        }
    }

    #[derive(Default)]
    struct RecordingSink {
        applied: Mutex<Vec<(ResourceType, String)>>,
        reject_with: Option<String>,
    }

    impl SnapshotSink for RecordingSink {
        fn apply_route_config(&self, version: &str, _: Bytes) -> Result<(), Nack> {
            if let Some(reason) = &self.reject_with {
                return Err(Nack::invalid_resource(reason.clone()));
            }
            self.applied
                .lock()
                .push((ResourceType::RouteConfig, version.to_owned()));
            Ok(())
        }

        fn apply_endpoint_loads(&self, version: &str, _: Bytes) -> Result<(), Nack> {
            self.applied
                .lock()
                .push((ResourceType::EndpointLoads, version.to_owned()));
            Ok(())
        }
    }

    /// A response as the stream hands it over.
    fn response(type_url: &str, version: &str, resource: Option<Resource>) -> ReceivedResponse {
        let response = pb::SnapshotResponse {
            type_url: type_url.to_owned(),
            version_info: version.to_owned(),
            nonce: "n".to_owned(),
            resource,
            ..Default::default()
        };
        ReceivedResponse::decode(&Bytes::from(response.encode_to_vec())).expect("decodes")
    }

    #[test]
    fn a_received_response_keeps_its_resource_encoded() {
        let config = pb::RouteConfig {
            default_gateway: "default/gw".to_owned(),
            ..Default::default()
        };
        let loads = pb::EndpointLoads {
            base_version: "el-1".to_owned(),
            ..Default::default()
        };
        for (resource, expected) in [
            (
                Resource::RouteConfig(config.clone()),
                EncodedResource::RouteConfig(config.encode_to_vec().into()),
            ),
            (
                Resource::EndpointLoads(loads.clone()),
                EncodedResource::EndpointLoads(loads.encode_to_vec().into()),
            ),
        ] {
            let received = response(ROUTE_CONFIG_TYPE_URL, "v-1", Some(resource));
            assert_eq!(received.resource, Some(expected));
            assert_eq!(
                received.envelope,
                pb::SnapshotResponse {
                    type_url: ROUTE_CONFIG_TYPE_URL.to_owned(),
                    version_info: "v-1".to_owned(),
                    nonce: "n".to_owned(),
                    ..Default::default()
                }
            );
        }
        assert_eq!(response(ROUTE_CONFIG_TYPE_URL, "v-1", None).resource, None);
    }

    fn route_config() -> Option<Resource> {
        Some(Resource::RouteConfig(pb::RouteConfig::default()))
    }

    fn endpoint_loads() -> Option<Resource> {
        Some(Resource::EndpointLoads(pb::EndpointLoads::default()))
    }

    fn acceptance(kind: ResourceType, changed: bool) -> Result<Accepted, Nack> {
        Ok(Accepted { kind, changed })
    }

    /// Applied versions holding `version` of the RouteConfig only.
    fn holding_route_config(version: &str) -> AppliedVersions {
        let mut applied = AppliedVersions::default();
        applied.set(ResourceType::RouteConfig, version);
        applied
    }

    #[test]
    fn applies_each_type_through_its_sink_method() {
        let sink = RecordingSink::default();
        let mut applied = AppliedVersions::default();
        let accepted = apply_response(
            &sink,
            &mut applied,
            response(ROUTE_CONFIG_TYPE_URL, "rc-1", route_config()),
        );
        assert_eq!(accepted, acceptance(ResourceType::RouteConfig, true));
        let accepted = apply_response(
            &sink,
            &mut applied,
            response(ENDPOINT_LOADS_TYPE_URL, "el-1", endpoint_loads()),
        );
        assert_eq!(accepted, acceptance(ResourceType::EndpointLoads, true));
        assert_eq!(
            *sink.applied.lock(),
            vec![
                (ResourceType::RouteConfig, "rc-1".to_owned()),
                (ResourceType::EndpointLoads, "el-1".to_owned())
            ]
        );
        assert_eq!(applied.get(ResourceType::RouteConfig), "rc-1");
        assert_eq!(applied.get(ResourceType::EndpointLoads), "el-1");
    }

    #[test]
    fn same_version_is_acknowledged_without_reapplying() {
        let sink = RecordingSink::default();
        let mut applied = holding_route_config("rc-1");
        let accepted = apply_response(
            &sink,
            &mut applied,
            response(ROUTE_CONFIG_TYPE_URL, "rc-1", route_config()),
        );
        assert_eq!(accepted, acceptance(ResourceType::RouteConfig, false));
        assert!(sink.applied.lock().is_empty());
    }

    #[test]
    fn rejects_malformed_responses_without_touching_state() {
        let sink = RecordingSink::default();
        let mut applied = holding_route_config("rc-1");
        let malformed = pb::NackReason::MalformedResponse;
        let cases = [
            (
                response("type.example/Other", "x-1", route_config()),
                "unknown type_url",
                pb::NackReason::UnknownType,
            ),
            (
                response(ROUTE_CONFIG_TYPE_URL, "rc-2", None),
                "carries no resource",
                malformed,
            ),
            (
                response(ROUTE_CONFIG_TYPE_URL, "rc-2", endpoint_loads()),
                "carries an EndpointLoads resource",
                malformed,
            ),
            (
                response(ENDPOINT_LOADS_TYPE_URL, "el-2", route_config()),
                "carries a RouteConfig resource",
                malformed,
            ),
            (
                response(ROUTE_CONFIG_TYPE_URL, "", route_config()),
                "empty version_info",
                malformed,
            ),
        ];
        for (bad, expected, reason) in cases {
            let error = apply_response(&sink, &mut applied, bad).expect_err(expected);
            assert!(
                error.message.contains(expected),
                "{error:?} should mention {expected:?}"
            );
            assert_eq!(error.reason, reason, "{expected}");
        }
        assert!(sink.applied.lock().is_empty());
        assert_eq!(applied.get(ResourceType::RouteConfig), "rc-1");
        assert_eq!(applied.get(ResourceType::EndpointLoads), "");
    }

    #[test]
    fn sink_rejection_keeps_the_applied_version() {
        let sink = RecordingSink {
            reject_with: Some("duplicate ModelServer default/s".to_owned()),
            ..Default::default()
        };
        let mut applied = holding_route_config("rc-1");
        let error = apply_response(
            &sink,
            &mut applied,
            response(ROUTE_CONFIG_TYPE_URL, "rc-2", route_config()),
        );
        assert_eq!(
            error,
            Err(Nack::invalid_resource("duplicate ModelServer default/s"))
        );
        assert_eq!(applied.get(ResourceType::RouteConfig), "rc-1");
    }

    #[tokio::test]
    async fn ready_flips_once_on_first_route_config() {
        let status = ControllerStatus::new();
        assert!(!status.is_ready());
        status.record_ack(ResourceType::EndpointLoads, Some("el-1"));
        assert!(
            !status.is_ready(),
            "EndpointLoads alone does not make a dataplane ready"
        );
        status.record_ack(ResourceType::RouteConfig, Some("rc-1"));
        assert!(status.is_ready());
        // Resolves at once: readiness was reached before anyone waited.
        status.wait_ready().await;
        status.record_disconnected(Some("boom".to_owned()));
        assert!(
            status.is_ready(),
            "readiness survives losing the controller"
        );
        assert_eq!(status.route_config_version().as_deref(), Some("rc-1"));
        assert_eq!(status.last_error().as_deref(), Some("boom"));
        assert_eq!(status.stream_failures(), 1);
    }
}
