//! The snapshot stream server against a real tonic client on loopback.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_controller::fleet_fairness::FairnessBoard;
use switchyard_controller::outlier::EjectionBoard;
use switchyard_controller::router_config::RouterConfig;
use switchyard_controller::xds::{
    self, DataplaneRegistry, DataplaneStatus, PublishResult, ResourceType, RoutingDiscoveryService,
    SnapshotPublisher, XdsMetrics,
};
use switchyard_snapshot::pb::routing_discovery_client::RoutingDiscoveryClient;
use switchyard_snapshot::test_builders as builders;
use switchyard_snapshot::{
    ENDPOINT_LOADS_TYPE_URL, NACK_INVALID_ARGUMENT, Nack, ROUTE_CONFIG_TYPE_URL, pb,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::Streaming;

use support::dataplane::Dataplane;

/// Generous bound for anything that should happen "at once": only a hung test waits this long.
const DEADLINE: Duration = Duration::from_secs(10);

struct Server {
    addr: SocketAddr,
    publisher: Arc<SnapshotPublisher>,
    /// Unknown JWT key ids the dataplanes reported.
    key_hints: tokio::sync::mpsc::Receiver<Vec<String>>,
    dataplanes: DataplaneRegistry,
    ejections: Arc<EjectionBoard>,
    fairness: Arc<FairnessBoard>,
    metrics_registry: prometheus::Registry,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Server {
    async fn start() -> Self {
        let (listener, addr) = support::loopback_listener().await;
        let metrics_registry = prometheus::Registry::new();
        let metrics = XdsMetrics::register(&metrics_registry).expect("metrics");
        let publisher = Arc::new(SnapshotPublisher::new("test-controller", metrics.clone()));
        let dataplanes = DataplaneRegistry::new();
        let (key_hints_sender, key_hints) = tokio::sync::mpsc::channel(4);
        let ejections = Arc::new(EjectionBoard::default());
        let fairness = Arc::new(FairnessBoard::default());
        let service = RoutingDiscoveryService::new(publisher.clone(), dataplanes.clone(), metrics)
            .with_key_hints(key_hints_sender)
            .with_outlier_reports(ejections.clone())
            .with_fairness_reports(fairness.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(xds::serve(listener, service, Default::default(), async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            publisher,
            key_hints,
            dataplanes,
            ejections,
            fairness,
            metrics_registry,
            stop,
            task,
        }
    }

    fn publish(&self, model: &str) -> String {
        let result = self
            .publisher
            .publish_route_config(route_config(model), 1_000);
        assert!(result.changed, "{model} is new content");
        result.version
    }

    async fn wait_for_dataplane(&self, condition: impl Fn(&DataplaneStatus) -> bool) {
        tokio::time::timeout(
            DEADLINE,
            self.dataplanes
                .wait_until(|dataplanes| dataplanes.len() == 1 && condition(&dataplanes[0])),
        )
        .await
        .unwrap_or_else(|_| panic!("dataplane state not reached: {:#?}", self.dataplanes.list()));
    }

    /// Waits until the one dataplane has ACKed `version` of `kind`.
    async fn wait_acked(&self, kind: ResourceType, version: &str) {
        self.wait_for_dataplane(|dataplane| {
            dataplane.resource(kind).acked_version.as_deref() == Some(version)
        })
        .await;
    }

    /// Waits until the one dataplane has been sent `version` of `kind`.
    async fn wait_sent(&self, kind: ResourceType, version: &str) {
        self.wait_for_dataplane(|dataplane| {
            dataplane.resource(kind).sent_version.as_deref() == Some(version)
        })
        .await;
    }

    /// A client subscribed to the RouteConfig alone, holding no version.
    async fn route_config_client(&self) -> Client {
        Client::connect(self.addr, vec![subscribe(ROUTE_CONFIG_TYPE_URL, "")])
            .await
            .expect("stream opens")
    }

    fn dataplane(&self) -> DataplaneStatus {
        let mut list = self.dataplanes.list();
        assert_eq!(list.len(), 1, "{list:#?}");
        list.remove(0)
    }

    fn metric_text(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.metrics_registry.gather())
            .expect("metrics encode")
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("server stops in time")
            .expect("server task did not panic")
            .expect("server ran without error");
    }
}

fn route_config(model: &str) -> pb::RouteConfig {
    builders::route_config(
        vec![builders::route(model, model, "s")],
        vec![builders::server("s", &[])],
    )
}

fn endpoint_loads(waiting: f64) -> pb::EndpointLoads {
    pb::EndpointLoads {
        loads: vec![pb::EndpointLoad {
            namespace: "default".into(),
            pod: "p".into(),
            requests_waiting: waiting,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn subscribe(type_url: &str, version_info: &str) -> pb::SnapshotRequest {
    pb::SnapshotRequest {
        node: None,
        type_url: type_url.into(),
        version_info: version_info.into(),
        response_nonce: String::new(),
        error_detail: None,
        ..Default::default()
    }
}

struct Client {
    requests: mpsc::Sender<pb::SnapshotRequest>,
    responses: Streaming<pb::SnapshotResponse>,
}

impl Client {
    /// Opens a stream whose first requests are `subscriptions` (the node is set on the first).
    async fn connect(
        addr: SocketAddr,
        subscriptions: Vec<pb::SnapshotRequest>,
    ) -> Result<Self, tonic::Status> {
        let client = RoutingDiscoveryClient::connect(format!("http://{addr}"))
            .await
            .expect("connect to loopback server");
        let Dataplane {
            requests,
            responses,
        } = Dataplane::open(client, "dataplane-1", subscriptions).await?;
        Ok(Self {
            requests,
            responses,
        })
    }

    async fn next(&mut self) -> pb::SnapshotResponse {
        tokio::time::timeout(DEADLINE, self.responses.message())
            .await
            .expect("a response in time")
            .expect("stream healthy")
            .expect("stream still open")
    }

    async fn send(&self, request: pb::SnapshotRequest) {
        self.requests.send(request).await.expect("stream open");
    }

    async fn ack(&self, response: &pb::SnapshotResponse) {
        self.send(pb::SnapshotRequest {
            node: None,
            type_url: response.type_url.clone(),
            version_info: response.version_info.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: None,
            ..Default::default()
        })
        .await;
    }

    async fn nack(&self, response: &pb::SnapshotResponse, applied_version: &str, message: &str) {
        self.nack_because(response, applied_version, Nack::invalid_resource(message))
            .await;
    }

    async fn nack_because(
        &self,
        response: &pb::SnapshotResponse,
        applied_version: &str,
        nack: Nack,
    ) {
        let error_detail = nack.into_error_detail();
        assert_eq!(error_detail.code, NACK_INVALID_ARGUMENT);
        self.send(pb::SnapshotRequest {
            node: None,
            type_url: response.type_url.clone(),
            version_info: applied_version.into(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(error_detail),
            ..Default::default()
        })
        .await;
    }
}

fn route_config_of(response: &pb::SnapshotResponse) -> &pb::RouteConfig {
    match &response.resource {
        Some(pb::snapshot_response::Resource::RouteConfig(config)) => config,
        other => panic!("expected a RouteConfig, got {other:?}"),
    }
}

#[tokio::test]
async fn an_outlier_report_reaches_the_board_and_answers_nothing() {
    let server = Server::start().await;
    server.publish("m1");
    let mut client = server.route_config_client().await;
    let response = client.next().await;
    let mut board = server.ejections.subscribe();
    client
        .send(pb::SnapshotRequest {
            outlier_report: Some(pb::OutlierReport {
                ejections: vec![pb::PodEjection {
                    remaining_ms: 30_000,
                    ..switchyard_snapshot::test_builders::ejection("p")
                }],
            }),
            ..Default::default()
        })
        .await;
    tokio::time::timeout(DEADLINE, board.changed())
        .await
        .expect("reported in time")
        .expect("board open");
    let reported = board.borrow().clone();
    assert_eq!(reported["default/p"].reason, "5xx");
    assert_eq!(
        server.dataplane().route_config.pending_nonce.as_deref(),
        Some(response.nonce.as_str()),
        "a report is no answer to the pending response"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_fairness_usage_report_reaches_the_counters_and_answers_nothing() {
    let server = Server::start().await;
    let (_router, router) = tokio::sync::watch::channel(RouterConfig {
        fairness: Some(pb::FairnessConfig {
            window_ms: 60_000,
            global_report_interval_ms: 10,
            max_global_users: 10,
            ..Default::default()
        }),
        ..Default::default()
    });
    let counting = tokio::spawn(server.fairness.clone().run(router));
    let mut counters = server.fairness.subscribe();
    tokio::time::timeout(DEADLINE, counters.wait_for(Option::is_some))
        .await
        .expect("on in time")
        .expect("board open");
    server.publish("m1");
    let mut client = server.route_config_client().await;
    let response = client.next().await;
    client
        .send(pb::SnapshotRequest {
            fairness_usage: Some(pb::FairnessUsageReport {
                reporter: 7,
                sequence: 1,
                usage: vec![pb::UserUsage {
                    model: "m1".into(),
                    user: "alice".into(),
                    served: 42.0,
                }],
            }),
            ..Default::default()
        })
        .await;
    let pushed = tokio::time::timeout(
        DEADLINE,
        counters.wait_for(|counters| counters.as_ref().is_some_and(|c| !c.reports.is_empty())),
    )
    .await
    .expect("pushed in time")
    .expect("board open")
    .clone()
    .expect("on");
    assert_eq!(pushed.models[0].users[0].served, 42.0);
    assert_eq!(
        (pushed.reports[0].reporter, pushed.reports[0].sequence),
        (7, 1)
    );
    assert_eq!(
        server.dataplane().route_config.pending_nonce.as_deref(),
        Some(response.nonce.as_str()),
        "a report is no answer to the pending response"
    );
    counting.abort();
    server.stop().await;
}

#[tokio::test]
async fn streams_are_refused_until_a_route_config_is_published() {
    let server = Server::start().await;
    let refused = Client::connect(server.addr, vec![subscribe(ROUTE_CONFIG_TYPE_URL, "")]).await;
    let status = refused.err().expect("no stream before the first snapshot");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(server.dataplanes.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn first_response_carries_the_published_config() {
    let server = Server::start().await;
    let version = server.publish("m1");
    let mut client = server.route_config_client().await;
    let response = client.next().await;
    assert_eq!(response.type_url, ROUTE_CONFIG_TYPE_URL);
    assert_eq!(response.version_info, version);
    assert!(!response.nonce.is_empty());
    assert_eq!(response.control_plane_id, "test-controller");
    assert_eq!(response.generated_at_unix_ms, 1_000);
    assert_eq!(route_config_of(&response), &route_config("m1"));

    server
        .wait_for_dataplane(|dataplane| dataplane.route_config.responses_sent == 1)
        .await;
    let dataplane = server.dataplane();
    assert_eq!(dataplane.node_id.as_deref(), Some("dataplane-1"));
    assert_eq!(dataplane.build_version.as_deref(), Some("test"));
    assert!(
        dataplane
            .peer
            .as_deref()
            .is_some_and(|peer| peer.starts_with("127.0.0.1:"))
    );
    assert_eq!(
        dataplane.route_config.pending_nonce.as_deref(),
        Some(response.nonce.as_str())
    );
    assert!(
        server
            .metric_text()
            .contains("switchyard_controller_connected_dataplanes 1")
    );

    drop(client);
    tokio::time::timeout(DEADLINE, server.dataplanes.wait_until(<[_]>::is_empty))
        .await
        .expect("a closed stream leaves the registry");
    assert!(
        server
            .metric_text()
            .contains("switchyard_controller_connected_dataplanes 0")
    );
    server.stop().await;
}

#[tokio::test]
async fn an_acked_client_receives_each_new_version_with_a_new_nonce() {
    let server = Server::start().await;
    server.publish("m1");
    let mut client = server.route_config_client().await;
    let first = client.next().await;
    client.ack(&first).await;
    server
        .wait_acked(ResourceType::RouteConfig, &first.version_info)
        .await;

    let second_version = server.publish("m2");
    let second = client.next().await;
    assert_eq!(second.version_info, second_version);
    assert_ne!(second.nonce, first.nonce);
    assert_eq!(route_config_of(&second), &route_config("m2"));
    assert!(
        server
            .metric_text()
            .contains("switchyard_controller_snapshot_acks_total{type=\"route_config\"} 1")
    );
    server.stop().await;
}

/// A hint (no type, no nonce) passes its key ids, bounded, to the JWKS
/// refresher and leaves the ACK state alone.
#[tokio::test]
async fn unknown_jwt_key_ids_reach_the_key_refresher_bounded() {
    let mut server = Server::start().await;
    server.publish("m1");
    let mut client = server.route_config_client().await;
    let first = client.next().await;
    let forged: Vec<String> = (0..10).map(|i| format!("{i}{}", "k".repeat(500))).collect();
    client
        .send(pb::SnapshotRequest {
            unknown_jwt_key_ids: forged,
            ..Default::default()
        })
        .await;
    let hint = tokio::time::timeout(DEADLINE, server.key_hints.recv())
        .await
        .expect("in time")
        .expect("a hint");
    assert_eq!(hint.len(), switchyard_snapshot::MAX_UNKNOWN_KEY_IDS);
    assert!(
        hint.iter()
            .all(|kid| kid.len() == switchyard_snapshot::MAX_KEY_ID_BYTES)
    );
    // The response still awaits its answer: the hint was not taken for one.
    client.ack(&first).await;
    server
        .wait_acked(ResourceType::RouteConfig, &first.version_info)
        .await;
    server.stop().await;
}

#[tokio::test]
async fn publishing_identical_content_sends_nothing() {
    let server = Server::start().await;
    let first_version = server.publish("m1");
    let mut client = server.route_config_client().await;
    let first = client.next().await;
    client.ack(&first).await;
    server
        .wait_acked(ResourceType::RouteConfig, &first_version)
        .await;

    // Same content, later compile time: same version, no wakeup.
    let again = server
        .publisher
        .publish_route_config(route_config("m1"), 2_000);
    assert!(!again.changed);
    assert_eq!(again.version, first_version);
    assert_eq!(server.dataplane().route_config.responses_sent, 1);

    // Responses arrive in order: had the identical publish sent anything, it would come first.
    let second_version = server.publish("m2");
    let second = client.next().await;
    assert_eq!(second.version_info, second_version);
    server
        .wait_for_dataplane(|dataplane| dataplane.route_config.responses_sent == 2)
        .await;
    server.stop().await;
}

#[tokio::test]
async fn a_nacked_version_is_never_resent_but_a_newer_one_is() {
    let server = Server::start().await;
    let bad_version = server.publish("bad");
    let mut client = server.route_config_client().await;
    let bad = client.next().await;
    client
        .nack(&bad, "", "route default/bad: unknown server")
        .await;
    server
        .wait_for_dataplane(|dataplane| {
            dataplane.route_config.nacked_version.as_deref() == Some(&bad_version)
        })
        .await;
    let dataplane = server.dataplane();
    assert_eq!(
        dataplane.route_config.last_nack_error.as_deref(),
        Some("route default/bad: unknown server")
    );
    assert_eq!(
        dataplane.route_config.last_nack_reason.as_deref(),
        Some("NACK_REASON_INVALID_RESOURCE")
    );
    assert_eq!(dataplane.route_config.pending_nonce, None);
    assert_eq!(dataplane.route_config.responses_sent, 1);
    assert!(
        server
            .metric_text()
            .contains("switchyard_controller_snapshot_nacks_total{type=\"route_config\"} 1")
    );

    let good_version = server.publish("good");
    let good = client.next().await;
    assert_eq!(good.version_info, good_version);
    client.ack(&good).await;
    server
        .wait_acked(ResourceType::RouteConfig, &good_version)
        .await;

    // Back to the rejected content: not sent again...
    assert!(
        server
            .publisher
            .publish_route_config(route_config("bad"), 3_000)
            .changed
    );
    // ...so the next response is the version after it.
    let newest_version = server.publish("newest");
    let newest = client.next().await;
    assert_eq!(newest.version_info, newest_version);
    server
        .wait_sent(ResourceType::RouteConfig, &newest_version)
        .await;
    assert_eq!(
        server.dataplane().route_config.responses_sent,
        3,
        "bad, good, newest"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_stale_nonce_is_ignored() {
    let server = Server::start().await;
    server.publish("m1");
    server
        .publisher
        .publish_endpoint_loads(endpoint_loads(1.0), 1_000);
    let mut client = server.route_config_client().await;
    let first = client.next().await;
    client
        .send(pb::SnapshotRequest {
            node: None,
            type_url: ROUTE_CONFIG_TYPE_URL.into(),
            version_info: first.version_info.clone(),
            response_nonce: "not-a-nonce-we-sent".into(),
            error_detail: None,
            ..Default::default()
        })
        .await;
    // Requests are handled in order: once the EndpointLoads answer arrives, the stale ACK was seen.
    client.send(subscribe(ENDPOINT_LOADS_TYPE_URL, "")).await;
    let loads = client.next().await;
    assert_eq!(loads.type_url, ENDPOINT_LOADS_TYPE_URL);
    let dataplane = server.dataplane();
    assert_eq!(dataplane.route_config.acked_version, None);
    assert_eq!(
        dataplane.route_config.pending_nonce.as_deref(),
        Some(first.nonce.as_str())
    );

    // Still pending, so a new version waits for the real answer.
    let second_version = server.publish("m2");
    client.ack(&first).await;
    let second = client.next().await;
    assert_eq!(second.version_info, second_version);
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_has_the_current_version_is_sent_nothing_for_it() {
    let server = Server::start().await;
    let current = server.publish("m1");
    let loads_version = server
        .publisher
        .publish_endpoint_loads(endpoint_loads(1.0), 1_000)
        .version;
    let mut client = Client::connect(
        server.addr,
        vec![
            subscribe(ROUTE_CONFIG_TYPE_URL, &current),
            subscribe(ENDPOINT_LOADS_TYPE_URL, ""),
        ],
    )
    .await
    .expect("stream opens");
    let first = client.next().await;
    assert_eq!(
        first.type_url, ENDPOINT_LOADS_TYPE_URL,
        "the RouteConfig it has is skipped"
    );
    assert_eq!(first.version_info, loads_version);
    let dataplane = server.dataplane();
    assert_eq!(
        dataplane.route_config.acked_version.as_deref(),
        Some(current.as_str())
    );
    assert_eq!(dataplane.route_config.responses_sent, 0);

    let next_version = server.publish("m2");
    let next = client.next().await;
    assert_eq!(next.type_url, ROUTE_CONFIG_TYPE_URL);
    assert_eq!(next.version_info, next_version);
    server.stop().await;
}

#[tokio::test]
async fn a_slow_client_gets_the_latest_version_not_every_intermediate_one() {
    let server = Server::start().await;
    server.publish("v1");
    let mut client = server.route_config_client().await;
    let first = client.next().await;
    server.publish("v2");
    let latest_version = server.publish("v3");
    client.ack(&first).await;
    let next = client.next().await;
    assert_eq!(next.version_info, latest_version);
    assert_eq!(route_config_of(&next), &route_config("v3"));
    server
        .wait_sent(ResourceType::RouteConfig, &latest_version)
        .await;
    let status = server.dataplane();
    assert_eq!(status.route_config.responses_sent, 2, "v2 was never sent");
    assert_eq!(
        status.route_config.acked_version.as_deref(),
        Some(first.version_info.as_str())
    );
    server.stop().await;
}

#[tokio::test]
async fn the_two_types_are_tracked_independently() {
    let server = Server::start().await;
    server.publish("m1");
    server
        .publisher
        .publish_endpoint_loads(endpoint_loads(1.0), 1_000);
    let mut client = Client::connect(
        server.addr,
        vec![
            subscribe(ROUTE_CONFIG_TYPE_URL, ""),
            subscribe(ENDPOINT_LOADS_TYPE_URL, ""),
        ],
    )
    .await
    .expect("stream opens");
    let mut first_two = [client.next().await, client.next().await];
    first_two.sort_by(|a, b| a.type_url.cmp(&b.type_url));
    let [loads, routes] = first_two;
    assert_eq!(loads.type_url, ENDPOINT_LOADS_TYPE_URL);
    assert_eq!(routes.type_url, ROUTE_CONFIG_TYPE_URL);

    // The RouteConfig stays un-ACKed; EndpointLoads still flow once ACKed.
    client.ack(&loads).await;
    server
        .wait_acked(ResourceType::EndpointLoads, &loads.version_info)
        .await;
    let newer = server
        .publisher
        .publish_endpoint_loads(endpoint_loads(2.0), 2_000);
    let next = client.next().await;
    assert_eq!(next.type_url, ENDPOINT_LOADS_TYPE_URL);
    assert_eq!(next.version_info, newer.version);
    assert_eq!(
        server
            .dataplane()
            .resource(ResourceType::RouteConfig)
            .pending_nonce
            .as_deref(),
        Some(routes.nonce.as_str())
    );
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_cleanly() {
    let server = Server::start().await;
    server.publish("m1");
    let mut client = server.route_config_client().await;
    client.next().await;
    let _ = server.stop.send(());
    let end = tokio::time::timeout(DEADLINE, client.responses.message())
        .await
        .expect("stream ends in time");
    assert!(matches!(end, Ok(None)), "clean end of stream, got {end:?}");
    tokio::time::timeout(DEADLINE, server.task)
        .await
        .expect("server stops in time")
        .expect("no panic")
        .expect("no error");
}

/// Loads of `pods` pods, all waiting 1 except `changed`, which waits `waiting`.
fn many_loads(pods: usize, changed: usize, waiting: f64) -> pb::EndpointLoads {
    pb::EndpointLoads {
        loads: (0..pods)
            .map(|index| pb::EndpointLoad {
                namespace: "default".into(),
                pod: format!("p{index:03}"),
                requests_waiting: if index == changed { waiting } else { 1.0 },
                ..Default::default()
            })
            .collect(),
        observed_at_unix_ms: 1_000,
        ..Default::default()
    }
}

fn endpoint_loads_of(response: &pb::SnapshotResponse) -> &pb::EndpointLoads {
    match &response.resource {
        Some(pb::snapshot_response::Resource::EndpointLoads(loads)) => loads,
        other => panic!("expected EndpointLoads, got {other:?}"),
    }
}

/// A client that applied a whole EndpointLoads set (`first`, 100 pods) and
/// has just been sent `update`: the incremental update to `second`, in which
/// one pod's load changed.
async fn client_sent_an_update(
    server: &Server,
) -> (Client, PublishResult, PublishResult, pb::SnapshotResponse) {
    server.publish("m1");
    let first = server
        .publisher
        .publish_endpoint_loads(many_loads(100, 7, 1.0), 1_000);
    let mut client = Client::connect(server.addr, vec![subscribe(ENDPOINT_LOADS_TYPE_URL, "")])
        .await
        .expect("stream opens");
    let whole = client.next().await;
    assert_eq!(whole.version_info, first.version);
    assert_eq!(endpoint_loads_of(&whole).loads.len(), 100);
    assert_eq!(endpoint_loads_of(&whole).base_version, "");
    client.ack(&whole).await;
    server
        .wait_acked(ResourceType::EndpointLoads, &first.version)
        .await;
    let second = server
        .publisher
        .publish_endpoint_loads(many_loads(100, 7, 5.0), 2_000);
    let update = client.next().await;
    (client, first, second, update)
}

#[tokio::test]
async fn a_dataplane_holding_the_previous_loads_gets_only_what_changed() {
    let server = Server::start().await;
    let (client, first, second, update) = client_sent_an_update(&server).await;

    // One pod's load changed: the update names that pod only.
    assert_eq!(update.version_info, second.version);
    let loads = endpoint_loads_of(&update);
    assert_eq!(loads.base_version, first.version);
    assert_eq!(loads.loads.len(), 1);
    assert_eq!(loads.loads[0].pod, "p007");
    assert_eq!(loads.loads[0].requests_waiting, 5.0);
    assert!(loads.removed.is_empty());
    assert!(
        server.metric_text().contains(
            "switchyard_controller_snapshot_incremental_pushes_total{type=\"endpoint_loads\"} 1"
        ),
        "{}",
        server.metric_text()
    );

    // A dataplane that reconnects holding a version the update does not apply to gets the whole set.
    let mut fresh = Client::connect(
        server.addr,
        vec![subscribe(ENDPOINT_LOADS_TYPE_URL, "el-unknown")],
    )
    .await
    .expect("second stream opens");
    let resync = fresh.next().await;
    assert_eq!(resync.version_info, second.version);
    assert_eq!(endpoint_loads_of(&resync).base_version, "");
    assert_eq!(endpoint_loads_of(&resync).loads.len(), 100);
    drop(fresh);
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn a_dataplane_that_cannot_apply_an_update_gets_the_whole_set_at_once() {
    let server = Server::start().await;
    let (mut client, first, second, update) = client_sent_an_update(&server).await;
    assert_eq!(endpoint_loads_of(&update).base_version, first.version);

    // The dataplane lost the base (say, its store was reset): it cannot apply the update.
    client
        .nack_because(
            &update,
            "",
            Nack::new(pb::NackReason::UnknownBaseVersion, "base not held"),
        )
        .await;
    let resync = client.next().await;
    assert_eq!(resync.version_info, second.version, "the same version...");
    assert_eq!(
        endpoint_loads_of(&resync).base_version,
        "",
        "...as the whole set"
    );
    assert_eq!(endpoint_loads_of(&resync).loads.len(), 100);
    client.ack(&resync).await;
    server
        .wait_acked(ResourceType::EndpointLoads, &second.version)
        .await;
    let dataplane = server.dataplane();
    assert_eq!(dataplane.endpoint_loads.nacks, 1);
    assert_eq!(dataplane.endpoint_loads.nacked_version, None);
    assert_eq!(
        dataplane.endpoint_loads.last_nack_reason.as_deref(),
        Some("NACK_REASON_UNKNOWN_BASE_VERSION")
    );
    drop(client);
    server.stop().await;
}
