//! The controller stream client against a mock controller whose streams the test
//! drives by hand: every stream the client opens is handed to the test, which
//! reads the client's requests and pushes responses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message as _;
use switchyard_dataplane::auth::UnknownKeyIds;
use switchyard_dataplane::xds_client::{self, ControllerStatus, SnapshotSink, XdsClientConfig};
use switchyard_snapshot::pb::routing_discovery_server::{RoutingDiscovery, RoutingDiscoveryServer};
use switchyard_snapshot::pb::snapshot_response::Resource;
use switchyard_snapshot::test_builders::{self, one_route};
use switchyard_snapshot::{
    ENDPOINT_LOADS_TYPE_URL, NACK_INVALID_ARGUMENT, Nack, ROUTE_CONFIG_TYPE_URL, ResourceType, pb,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// Upper bound for anything the tests wait on; generous for a busy 2-core machine.
const DEADLINE: Duration = Duration::from_secs(10);
/// How often a condition is re-checked while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
const NODE_ID: &str = "test-node";

// ---------------------------------------------------------------------------
// Mock controller
// ---------------------------------------------------------------------------

type ResponseSender = mpsc::UnboundedSender<Result<pb::SnapshotResponse, Status>>;

struct MockController {
    streams: mpsc::UnboundedSender<MockStream>,
}

#[tonic::async_trait]
impl RoutingDiscovery for MockController {
    type StreamSnapshotsStream = UnboundedReceiverStream<Result<pb::SnapshotResponse, Status>>;

    async fn stream_snapshots(
        &self,
        request: Request<Streaming<pb::SnapshotRequest>>,
    ) -> Result<Response<Self::StreamSnapshotsStream>, Status> {
        let (responses, outgoing) = mpsc::unbounded_channel();
        self.streams
            .send(MockStream {
                requests: request.into_inner(),
                responses,
                next_nonce: 0,
            })
            .map_err(|_| Status::unavailable("test is gone"))?;
        Ok(Response::new(UnboundedReceiverStream::new(outgoing)))
    }
}

/// One stream the client opened. Dropping it ends the stream cleanly (OK trailers).
struct MockStream {
    requests: Streaming<pb::SnapshotRequest>,
    responses: ResponseSender,
    next_nonce: u64,
}

impl MockStream {
    async fn next_request(&mut self) -> pb::SnapshotRequest {
        tokio::time::timeout(DEADLINE, self.requests.message())
            .await
            .expect("client sent a request in time")
            .expect("request stream is healthy")
            .expect("client kept the request stream open")
    }

    /// Sends `resource` under `version` and returns the nonce used.
    fn send(&mut self, type_url: &str, version: &str, resource: Option<Resource>) -> String {
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        self.responses
            .send(Ok(pb::SnapshotResponse {
                type_url: type_url.to_owned(),
                version_info: version.to_owned(),
                nonce: nonce.clone(),
                control_plane_id: "mock-controller".to_owned(),
                generated_at_unix_ms: 1,
                resource,
            }))
            .expect("server side of the stream is open");
        nonce
    }

    fn send_route_config(&mut self, version: &str) -> String {
        self.send(
            ROUTE_CONFIG_TYPE_URL,
            version,
            Some(Resource::RouteConfig(route_config())),
        )
    }

    fn send_endpoint_loads(&mut self, version: &str) -> String {
        self.send(
            ENDPOINT_LOADS_TYPE_URL,
            version,
            Some(Resource::EndpointLoads(endpoint_loads())),
        )
    }

    /// Sends a route config under `version` and expects the client to ACK it.
    async fn route_config_acked(&mut self, version: &str) {
        let nonce = self.send_route_config(version);
        self.expect_ack(ROUTE_CONFIG_TYPE_URL, version, &nonce)
            .await;
    }

    /// Sends endpoint loads under `version` and expects the client to ACK them.
    async fn endpoint_loads_acked(&mut self, version: &str) {
        let nonce = self.send_endpoint_loads(version);
        self.expect_ack(ENDPOINT_LOADS_TYPE_URL, version, &nonce)
            .await;
    }

    /// Reads the two subscriptions a new stream starts with.
    async fn expect_subscriptions(
        &mut self,
        route_config_version: &str,
        endpoint_loads_version: &str,
    ) {
        let first = self.next_request().await;
        assert_eq!(first.type_url, ROUTE_CONFIG_TYPE_URL);
        assert_eq!(first.version_info, route_config_version);
        assert_eq!(first.response_nonce, "");
        assert_eq!(first.error_detail, None);
        let node = first.node.expect("the first request carries the node");
        assert_eq!(node.id, NODE_ID);
        assert!(!node.build_version.is_empty());

        let second = self.next_request().await;
        assert_eq!(second.type_url, ENDPOINT_LOADS_TYPE_URL);
        assert_eq!(second.version_info, endpoint_loads_version);
        assert_eq!(second.response_nonce, "");
        assert_eq!(second.node, None, "only the first request carries the node");
        assert_eq!(second.error_detail, None);
    }

    async fn expect_ack(&mut self, type_url: &str, version: &str, nonce: &str) {
        let ack = self.next_request().await;
        assert_eq!(
            ack,
            pb::SnapshotRequest {
                node: None,
                type_url: type_url.to_owned(),
                version_info: version.to_owned(),
                response_nonce: nonce.to_owned(),
                error_detail: None,
                ..Default::default()
            }
        );
    }

    /// Returns the NACK's error message after checking its other fields.
    async fn expect_nack(
        &mut self,
        type_url: &str,
        kept_version: &str,
        nonce: &str,
        reason: pb::NackReason,
    ) -> String {
        let nack = self.next_request().await;
        assert_eq!(nack.node, None);
        assert_eq!(nack.type_url, type_url);
        assert_eq!(
            nack.version_info, kept_version,
            "a NACK carries the previous version"
        );
        assert_eq!(nack.response_nonce, nonce);
        let detail = nack.error_detail.expect("a NACK has error_detail");
        assert_eq!(detail.code, NACK_INVALID_ARGUMENT);
        assert_eq!(detail.reason(), reason, "{}", detail.message);
        detail.message
    }
}

struct MockServer {
    addr: SocketAddr,
    streams: mpsc::UnboundedReceiver<MockStream>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl MockServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        Self::serve(listener)
    }

    async fn start_on(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr)
            .await
            .expect("rebind the reserved port");
        Self::serve(listener)
    }

    fn serve(listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("bound address");
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let service = RoutingDiscoveryServer::new(MockController {
            streams: streams_tx,
        });
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = shutdown_rx.await;
                }),
        );
        Self {
            addr,
            streams,
            shutdown: Some(shutdown),
            task,
        }
    }

    fn uri(&self) -> http::Uri {
        format!("http://{}", self.addr).parse().expect("valid uri")
    }

    async fn next_stream(&mut self) -> MockStream {
        tokio::time::timeout(DEADLINE, self.streams.recv())
            .await
            .expect("client opened a stream in time")
            .expect("server is running")
    }

    /// Graceful shutdown; every stream must have been dropped by the caller first.
    async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("mock controller stopped in time")
            .expect("mock controller task did not panic")
            .expect("mock controller served without error");
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Fake sink and client harness
// ---------------------------------------------------------------------------

/// Records what was applied; rejects versions listed in `reject`; reports
/// `ejections` when told to.
#[derive(Default)]
struct RecordingSink {
    applied: Mutex<Vec<(ResourceType, String)>>,
    reject: Mutex<Vec<String>>,
    ejections: Mutex<pb::OutlierReport>,
    ejected: watch::Sender<u64>,
}

impl RecordingSink {
    fn check(&self, kind: ResourceType, version: &str) -> Result<(), Nack> {
        if self
            .reject
            .lock()
            .iter()
            .any(|rejected| rejected == version)
        {
            return Err(Nack::invalid_resource(format!(
                "invalid snapshot {version}"
            )));
        }
        self.applied.lock().push((kind, version.to_owned()));
        Ok(())
    }

    fn applied(&self) -> Vec<(ResourceType, String)> {
        self.applied.lock().clone()
    }

    /// Ejects `pod` and wakes the client.
    fn eject(&self, pod: &str) {
        self.ejections.lock().ejections.push(pb::PodEjection {
            remaining_ms: 10_000,
            ..test_builders::ejection(pod)
        });
        self.ejected.send_modify(|count| *count += 1);
    }
}

impl SnapshotSink for RecordingSink {
    fn apply_route_config(&self, version: &str, config: Bytes) -> Result<(), Nack> {
        assert_eq!(
            pb::RouteConfig::decode(config).expect("decodes"),
            route_config(),
            "the resource reaches the sink unchanged"
        );
        self.check(ResourceType::RouteConfig, version)
    }

    fn apply_endpoint_loads(&self, version: &str, loads: Bytes) -> Result<(), Nack> {
        assert_eq!(
            pb::EndpointLoads::decode(loads).expect("decodes"),
            endpoint_loads(),
            "the resource reaches the sink unchanged"
        );
        self.check(ResourceType::EndpointLoads, version)
    }

    fn ejections(&self) -> Option<watch::Receiver<u64>> {
        Some(self.ejected.subscribe())
    }

    fn outlier_report(&self) -> pb::OutlierReport {
        self.ejections.lock().clone()
    }
}

fn route_config() -> pb::RouteConfig {
    one_route("llama", "127.0.0.1")
}

fn endpoint_loads() -> pb::EndpointLoads {
    pb::EndpointLoads {
        loads: vec![pb::EndpointLoad {
            namespace: "default".into(),
            pod: "llama-0".into(),
            requests_waiting: 2.0,
            ..Default::default()
        }],
        ..Default::default()
    }
}

struct Client {
    sink: Arc<RecordingSink>,
    status: Arc<ControllerStatus>,
    unknown_keys: Arc<UnknownKeyIds>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Client {
    fn start(controller: http::Uri) -> Self {
        Self::start_with(controller, Arc::new(RecordingSink::default()))
    }

    fn start_with(controller: http::Uri, sink: Arc<RecordingSink>) -> Self {
        let config = XdsClientConfig {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(2),
            ..XdsClientConfig::new(controller, NODE_ID)
        };
        let status = Arc::new(ControllerStatus::new());
        let unknown_keys = Arc::new(UnknownKeyIds::default());
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let task = xds_client::spawn(
            config,
            sink.clone(),
            status.clone(),
            unknown_keys.clone(),
            async {
                let _ = shutdown_rx.await;
            },
        );
        Self {
            sink,
            status,
            unknown_keys,
            shutdown: Some(shutdown),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("client stopped in time")
            .expect("client task did not panic");
        assert!(
            !self.status.connected(),
            "a stopped client reports disconnected"
        );
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A mock controller, a client of it and the client's first stream, past its subscriptions.
async fn connected(sink: Arc<RecordingSink>) -> (MockServer, Client, MockStream) {
    let mut server = MockServer::start().await;
    let client = Client::start_with(server.uri(), sink);
    let mut stream = server.next_stream().await;
    stream.expect_subscriptions("", "").await;
    (server, client, stream)
}

/// Stops the client, ends its stream cleanly and stops the mock controller.
async fn shut_down(client: Client, stream: MockStream, server: MockServer) {
    client.stop().await;
    drop(stream);
    server.stop().await;
}

fn assert_route_config_version(client: &Client, version: &str) {
    assert_eq!(
        client.status.route_config_version().as_deref(),
        Some(version)
    );
}

fn assert_endpoint_loads_version(client: &Client, version: &str) {
    assert_eq!(
        client.status.endpoint_loads_version().as_deref(),
        Some(version)
    );
}

/// What a client applied after `rc-1` then `el-1`.
const FIRST_SNAPSHOT: [(ResourceType, &str); 2] = [
    (ResourceType::RouteConfig, "rc-1"),
    (ResourceType::EndpointLoads, "el-1"),
];

/// The resources the client applied, in order: (type, version).
fn assert_applied(client: &Client, expected: &[(ResourceType, &str)], why: &str) {
    let expected: Vec<(ResourceType, String)> = expected
        .iter()
        .map(|(resource, version)| (*resource, (*version).to_owned()))
        .collect();
    assert_eq!(client.sink.applied(), expected, "{why}");
}

async fn wait_ready(status: &ControllerStatus) {
    tokio::time::timeout(DEADLINE, status.wait_ready())
        .await
        .expect("client became ready in time");
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn applies_first_snapshot_and_acks() {
    let (server, client, mut stream) = connected(Arc::default()).await;
    assert!(!client.status.is_ready());

    stream.route_config_acked("rc-1").await;
    wait_ready(&client.status).await;
    assert!(client.status.is_ready());
    assert!(client.status.connected());
    assert_route_config_version(&client, "rc-1");
    assert_eq!(client.status.endpoint_loads_version(), None);
    assert!(
        client
            .status
            .last_applied_at(ResourceType::RouteConfig)
            .is_some()
    );

    stream.endpoint_loads_acked("el-1").await;
    assert_endpoint_loads_version(&client, "el-1");
    assert_applied(&client, &FIRST_SNAPSHOT, "in the order they came");
    let view = client.status.view();
    assert_eq!(view.connect_count, 1);
    assert_eq!(view.stream_failures, 0);
    assert_eq!(view.route_config.acks, 1);
    assert_eq!(view.endpoint_loads.acks, 1);
    assert_eq!(view.route_config.nacks, 0);
    assert_eq!(view.control_plane_id.as_deref(), Some("mock-controller"));
    assert_eq!(view.last_error, None);

    shut_down(client, stream, server).await;
}

#[tokio::test]
async fn reports_ejections_when_they_happen_and_on_every_new_stream() {
    let (mut server, client, mut stream) = connected(Arc::default()).await;
    client.sink.eject("llama-0");
    let report = stream.next_request().await;
    assert_eq!(report.type_url, "", "a request of its own");
    assert_eq!(report.response_nonce, "");
    let pods: Vec<String> = report
        .outlier_report
        .expect("an outlier report")
        .ejections
        .into_iter()
        .map(|ejection| ejection.pod)
        .collect();
    assert_eq!(pods, ["llama-0"]);

    drop(stream);
    let mut stream = server.next_stream().await;
    stream.expect_subscriptions("", "").await;
    let again = stream.next_request().await;
    assert_eq!(
        again.outlier_report.map(|report| report.ejections.len()),
        Some(1),
        "a new stream starts with what is ejected"
    );

    shut_down(client, stream, server).await;
}

#[tokio::test]
async fn nacks_invalid_snapshot_and_keeps_previous() {
    let sink = Arc::new(RecordingSink::default());
    sink.reject.lock().push("rc-bad".to_owned());
    let (server, client, mut stream) = connected(sink).await;

    stream.route_config_acked("rc-1").await;

    let nonce = stream.send_route_config("rc-bad");
    let message = stream
        .expect_nack(
            ROUTE_CONFIG_TYPE_URL,
            "rc-1",
            &nonce,
            pb::NackReason::InvalidResource,
        )
        .await;
    assert_eq!(message, "invalid snapshot rc-bad");

    assert_route_config_version(&client, "rc-1");
    assert_eq!(client.status.nack_count(ResourceType::RouteConfig), 1);
    assert_eq!(client.status.ack_count(ResourceType::RouteConfig), 1);
    let route_config = client.status.resource(ResourceType::RouteConfig);
    assert_eq!(route_config.rejected_version.as_deref(), Some("rc-bad"));
    assert_eq!(
        client.status.last_error().as_deref(),
        Some("invalid snapshot rc-bad")
    );
    assert!(client.status.is_ready());
    assert!(client.status.connected(), "a NACK does not drop the stream");

    // A later valid version is still applied on the same stream.
    stream.route_config_acked("rc-2").await;
    assert_applied(
        &client,
        &[
            (ResourceType::RouteConfig, "rc-1"),
            (ResourceType::RouteConfig, "rc-2"),
        ],
        "in the order they came",
    );

    shut_down(client, stream, server).await;
}

#[tokio::test]
async fn nacks_unknown_type_and_mismatched_resource() {
    let (server, client, mut stream) = connected(Arc::default()).await;

    let unknown = "type.switchyard.dev/switchyard.routing.v1.Secret";
    let nonce = stream.send(unknown, "s-1", Some(Resource::RouteConfig(route_config())));
    let message = stream
        .expect_nack(unknown, "", &nonce, pb::NackReason::UnknownType)
        .await;
    assert!(message.contains("unknown type_url"), "{message}");

    let nonce = stream.send(
        ROUTE_CONFIG_TYPE_URL,
        "rc-1",
        Some(Resource::EndpointLoads(endpoint_loads())),
    );
    let message = stream
        .expect_nack(
            ROUTE_CONFIG_TYPE_URL,
            "",
            &nonce,
            pb::NackReason::MalformedResponse,
        )
        .await;
    assert!(
        message.contains("carries an EndpointLoads resource"),
        "{message}"
    );

    let nonce = stream.send(ENDPOINT_LOADS_TYPE_URL, "el-1", None);
    let message = stream
        .expect_nack(
            ENDPOINT_LOADS_TYPE_URL,
            "",
            &nonce,
            pb::NackReason::MalformedResponse,
        )
        .await;
    assert!(message.contains("carries no resource"), "{message}");

    assert!(client.sink.applied().is_empty());
    assert!(!client.status.is_ready());
    assert_eq!(client.status.route_config_version(), None);
    assert_eq!(client.status.nack_count(ResourceType::RouteConfig), 1);
    assert_eq!(client.status.nack_count(ResourceType::EndpointLoads), 1);

    shut_down(client, stream, server).await;
}

#[tokio::test]
async fn reconnects_if_controller_stream_ends() {
    let (mut server, client, mut stream) = connected(Arc::default()).await;
    stream.route_config_acked("rc-1").await;
    stream.endpoint_loads_acked("el-1").await;

    // Ends the stream with OK trailers, as a controller rollout would.
    drop(stream);

    let mut stream = server.next_stream().await;
    stream.expect_subscriptions("rc-1", "el-1").await;
    eventually("the second stream is reported", || {
        client.status.connect_count() == 2 && client.status.connected()
    })
    .await;
    assert_eq!(
        client.status.stream_failures(),
        0,
        "a clean close is not a failure"
    );
    assert!(client.status.is_ready());

    // The new stream works like the first; nonces restart per stream.
    stream.route_config_acked("rc-2").await;
    assert_route_config_version(&client, "rc-2");

    shut_down(client, stream, server).await;
}

#[tokio::test]
async fn keeps_last_snapshot_when_controller_down() {
    let (server, client, mut stream) = connected(Arc::default()).await;
    stream.route_config_acked("rc-1").await;
    stream.endpoint_loads_acked("el-1").await;

    drop(stream);
    server.stop().await;

    eventually("a reconnect attempt failed", || {
        !client.status.connected() && client.status.stream_failures() >= 1
    })
    .await;
    assert!(client.status.last_error().is_some());
    assert!(
        client.status.is_ready(),
        "the last snapshot keeps the dataplane ready"
    );
    assert_route_config_version(&client, "rc-1");
    assert_endpoint_loads_version(&client, "el-1");
    assert_applied(
        &client,
        &FIRST_SNAPSHOT,
        "nothing is applied or cleared while the controller is down",
    );

    client.stop().await;
}

#[tokio::test]
async fn becomes_ready_when_controller_starts_later() {
    // Reserve a free port, then leave it closed until the client has tried it.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback")
        .local_addr()
        .expect("bound address");
    let uri: http::Uri = format!("http://{addr}").parse().expect("valid uri");
    let client = Client::start(uri);
    eventually("a connection attempt was refused", || {
        client.status.stream_failures() >= 1
    })
    .await;
    assert!(!client.status.connected());
    assert!(!client.status.is_ready());
    assert!(client.status.last_error().is_some());

    let mut server = MockServer::start_on(addr).await;
    let mut stream = server.next_stream().await;
    stream.expect_subscriptions("", "").await;
    stream.route_config_acked("rc-1").await;
    wait_ready(&client.status).await;
    assert!(client.status.connected());
    assert_route_config_version(&client, "rc-1");

    shut_down(client, stream, server).await;
}

#[tokio::test]
async fn reports_unknown_jwt_key_ids_in_a_request_of_their_own() {
    let (server, client, mut stream) = connected(Arc::default()).await;
    stream.route_config_acked("rc-1").await;
    client.unknown_keys.report("rotated-key");
    let hint = stream.next_request().await;
    assert_eq!(
        hint,
        pb::SnapshotRequest {
            unknown_jwt_key_ids: vec!["rotated-key".into()],
            ..Default::default()
        },
        "no type_url and no nonce: not an ACK or NACK"
    );
    shut_down(client, stream, server).await;
}
