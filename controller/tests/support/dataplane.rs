//! A dataplane on the snapshot stream, as the tests need it: subscribes to
//! both resource types and ACKs whatever it receives.

use std::net::SocketAddr;

use switchyard_snapshot::pb::routing_discovery_client::RoutingDiscoveryClient;
use switchyard_snapshot::{ENDPOINT_LOADS_TYPE_URL, ROUTE_CONFIG_TYPE_URL, pb};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::fake_api::DEADLINE;

pub struct Dataplane {
    pub requests: mpsc::Sender<pb::SnapshotRequest>,
    pub responses: Streaming<pb::SnapshotResponse>,
}

impl Dataplane {
    /// Opens a stream as `node_id` and subscribes to RouteConfig and EndpointLoads.
    pub async fn connect(addr: SocketAddr, node_id: &str) -> Self {
        let client = RoutingDiscoveryClient::connect(format!("http://{addr}"))
            .await
            .expect("connect to the stream");
        Self::subscribe(client, node_id)
            .await
            .expect("stream opens")
    }

    /// Subscribes on an open connection; the stream's status when the server refuses it.
    pub async fn subscribe(
        client: RoutingDiscoveryClient<tonic::transport::Channel>,
        node_id: &str,
    ) -> Result<Self, tonic::Status> {
        let subscriptions =
            [ROUTE_CONFIG_TYPE_URL, ENDPOINT_LOADS_TYPE_URL].map(|type_url| pb::SnapshotRequest {
                type_url: type_url.into(),
                ..Default::default()
            });
        Self::open(client, node_id, subscriptions.into()).await
    }

    /// Opens a stream on `client` whose first requests are `subscriptions`,
    /// the first of them naming the node `node_id`.
    pub async fn open(
        mut client: RoutingDiscoveryClient<tonic::transport::Channel>,
        node_id: &str,
        subscriptions: Vec<pb::SnapshotRequest>,
    ) -> Result<Self, tonic::Status> {
        let (requests, receiver) = mpsc::channel(16);
        for (index, mut request) in subscriptions.into_iter().enumerate() {
            if index == 0 {
                request.node = Some(pb::Node {
                    id: node_id.into(),
                    build_version: "test".into(),
                });
            }
            requests.send(request).await.expect("queue request");
        }
        let responses = client
            .stream_snapshots(ReceiverStream::new(receiver))
            .await?
            .into_inner();
        Ok(Self {
            requests,
            responses,
        })
    }

    /// ACKs every response until one satisfies `wanted`, and returns it.
    pub async fn next_matching(
        &mut self,
        mut wanted: impl FnMut(&pb::SnapshotResponse) -> bool,
    ) -> pb::SnapshotResponse {
        let wait = async {
            loop {
                let response = self
                    .responses
                    .message()
                    .await
                    .expect("stream healthy")
                    .expect("stream open");
                self.requests
                    .send(pb::SnapshotRequest {
                        type_url: response.type_url.clone(),
                        version_info: response.version_info.clone(),
                        response_nonce: response.nonce.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("ACK");
                if wanted(&response) {
                    return response;
                }
            }
        };
        tokio::time::timeout(DEADLINE, wait)
            .await
            .expect("wanted response in time")
    }

    /// ACKs responses until a RouteConfig arrives, and returns it.
    pub async fn next_route_config(&mut self) -> pb::RouteConfig {
        let response = self
            .next_matching(|response| {
                matches!(
                    response.resource,
                    Some(pb::snapshot_response::Resource::RouteConfig(_))
                )
            })
            .await;
        match response.resource {
            Some(pb::snapshot_response::Resource::RouteConfig(config)) => config,
            _ => unreachable!("matched a RouteConfig"),
        }
    }
}
