//! The snapshot stream server: `RoutingDiscovery.StreamSnapshots` over tonic.
//!
//! Shaped like Envoy's state-of-the-world xDS (the protocol: `docs/protocol.md`):
//! per stream and per resource type the server tracks what the dataplane
//! applied (ACK), rejected (NACK) and has not answered yet, and sends the
//! latest version only when nothing is pending, so a slow dataplane skips
//! intermediate versions instead of queueing them.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

mod grpc;
mod metrics;
mod publisher;
mod registry;
mod security;
mod service;
mod wire;

pub use metrics::XdsMetrics;
pub use publisher::{PublishResult, PublishedResource, ResourceReceiver, SnapshotPublisher};
pub use registry::{DataplaneRegistry, DataplaneStatus, TypeSyncStatus};
pub use security::{StreamSecurity, StreamSecurityError, StreamSecurityFiles};
pub use service::{
    RoutingDiscoveryService, STREAM_CHANNEL_CAPACITY, STREAM_SEND_TIMEOUT, StreamSettings,
};
/// The resource types, shared with the dataplane.
pub use switchyard_snapshot::ResourceType;

/// HTTP/2 PING period: finds dataplanes whose connection died without a FIN
/// (node crash, network partition) so their streams and gauges go away.
pub const XDS_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a PING may stay unanswered before the connection is dropped.
pub const XDS_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `service` on `listener` (over TLS, with client authentication, as
/// `security` says) until `shutdown` completes, then ends every open stream
/// and returns once the connections are closed.
pub async fn serve(
    listener: TcpListener,
    service: RoutingDiscoveryService,
    security: StreamSecurity,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let closer = service.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = security.tls.clone() {
        builder = builder.tls_config(tls)?;
    }
    builder
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(XDS_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(XDS_KEEPALIVE_TIMEOUT))
        .add_service(grpc::RoutingDiscoveryServer::new(service, security))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.await;
            closer.close_streams();
        })
        .await
}
