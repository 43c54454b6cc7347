//! `RoutingDiscovery.StreamSnapshots` served by hand instead of by the
//! generated server, so its responses are [`EncodedResponse`]s: bytes encoded
//! once per published version and shared by every stream (see `super::wire`).

use std::convert::Infallible;
use std::task::{Context, Poll};

use switchyard_snapshot::pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic_prost::ProstCodec;

use super::security::StreamSecurity;
use super::service::RoutingDiscoveryService;
use super::wire::EncodedResponse;

/// gRPC path of `RoutingDiscovery.StreamSnapshots`.
const STREAM_SNAPSHOTS_PATH: &str = "/switchyard.routing.v1.RoutingDiscovery/StreamSnapshots";

/// The `RoutingDiscovery` gRPC service, answering with [`EncodedResponse`]s.
#[derive(Clone, Debug)]
pub struct RoutingDiscoveryServer {
    service: RoutingDiscoveryService,
    security: std::sync::Arc<StreamSecurity>,
}

impl RoutingDiscoveryServer {
    pub fn new(service: RoutingDiscoveryService, security: StreamSecurity) -> Self {
        Self {
            service,
            security: std::sync::Arc::new(security),
        }
    }
}

impl NamedService for RoutingDiscoveryServer {
    const NAME: &'static str = pb::routing_discovery_server::SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for RoutingDiscoveryServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != STREAM_SNAPSHOTS_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let authorization = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(http::HeaderValue::as_bytes);
        if !self.security.admits(authorization) {
            return Box::pin(async {
                Ok(Status::unauthenticated("a valid stream token is required").into_http())
            });
        }
        let method = StreamSnapshots(self.service.clone());
        Box::pin(async move {
            let mut grpc = Grpc::new(ProstCodec::<EncodedResponse, pb::SnapshotRequest>::default());
            Ok(grpc.streaming(method, request).await)
        })
    }
}

struct StreamSnapshots(RoutingDiscoveryService);

impl StreamingService<pb::SnapshotRequest> for StreamSnapshots {
    type Response = EncodedResponse;
    type ResponseStream = ReceiverStream<Result<EncodedResponse, Status>>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(
        &mut self,
        request: tonic::Request<tonic::Streaming<pb::SnapshotRequest>>,
    ) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.open_stream(request).await })
    }
}
