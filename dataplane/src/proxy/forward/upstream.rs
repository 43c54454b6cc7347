//! The seam between the attempt policy and the network: one request to one
//! pod, answered by a response head (and its body) or by a classified
//! failure. Production sends with the worker's pooled HTTP/1.1 client
//! ([`Http1Upstream`](super::http1::Http1Upstream)); tests script engine
//! behaviour with a fake.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;

use crate::error::BodyError;
use crate::providers::Provider;

/// Idle upstream connections are kept this long: engines keep connections
/// open much longer, and reconnecting costs a handshake on the request path.
pub const UPSTREAM_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Bounds connection setup to a pod when the ModelServer sets no timeout: a
/// pod that does not accept within this is as good as gone.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an attempt got no response head; the attempt policy branches on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The pod did not accept the connection (refused, unreachable, or no
    /// answer within [`UPSTREAM_CONNECT_TIMEOUT`]): nothing was sent.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The connection broke after the request was sent, before response headers.
    #[error("connection failed before response headers: {0}")]
    BeforeHeaders(String),
    /// A response the router must read whole (a prefill leg's) broke off.
    #[error("the response broke off before it was complete: {0}")]
    Incomplete(String),
    /// No response (headers; all of it for a prefill leg) within the ModelServer's timeout.
    #[error("no response within {0:?}")]
    Timeout(Duration),
}

/// Sends one request to the pod named by its URI's authority.
pub trait Upstream: Send + Sync + 'static {
    /// The engine's response body, streamed to the client frame by frame.
    type Body: Body<Data = Bytes, Error: Into<BodyError>> + Send + Unpin + 'static;

    /// Resolves when the response head has arrived, or with why it cannot.
    /// Never [`UpstreamError::Timeout`]: the caller bounds the wait.
    fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> impl Future<Output = Result<Response<Self::Body>, UpstreamError>> + Send;

    /// Sends one request to an external provider (an `https://` URI).
    /// Never [`UpstreamError::Timeout`].
    fn send_to_provider(
        &self,
        provider: &Provider,
        request: Request<Full<Bytes>>,
    ) -> impl Future<Output = Result<Response<Self::Body>, UpstreamError>> + Send;
}
