//! The seam between the attempt policy and the network: one request to one
//! pod, answered by a response head (and its body) or by a classified
//! failure. Production sends with hyper's pooled client; tests script engine
//! behaviour with a fake.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::error::BodyError;
use crate::health::connections::{ConnectionCounts, CountingConnector};
use crate::providers::{Provider, ProviderClients};

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

/// hyper's pooled HTTP/1.1 client for pods, and the HTTPS clients of the
/// external providers.
#[derive(Debug, Clone)]
pub struct HyperUpstream {
    client: Client<CountingConnector, Full<Bytes>>,
    /// None when no TLS client could be built (see the start-up log).
    providers: Option<ProviderClients>,
}

impl HyperUpstream {
    /// A client whose open connections per pod are counted in
    /// `connections`; providers' certificates are checked against the
    /// system roots only.
    pub fn new(connections: Arc<ConnectionCounts>) -> Self {
        let providers = ProviderClients::new(None)
            .inspect_err(|error| tracing::error!(%error, "no HTTPS client for external providers"))
            .ok();
        Self::with_providers(connections, providers)
    }

    /// With the given provider clients (e.g. trusting a CA bundle).
    pub fn with_providers(
        connections: Arc<ConnectionCounts>,
        providers: Option<ProviderClients>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(UPSTREAM_CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(UPSTREAM_POOL_IDLE_TIMEOUT)
            .build(CountingConnector::new(connector, connections));
        Self { client, providers }
    }
}

impl Upstream for HyperUpstream {
    type Body = Incoming;

    fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> impl Future<Output = Result<Response<Incoming>, UpstreamError>> + Send {
        let pending = self.client.request(request);
        async move { pending.await.map_err(classify) }
    }

    fn send_to_provider(
        &self,
        provider: &Provider,
        request: Request<Full<Bytes>>,
    ) -> impl Future<Output = Result<Response<Incoming>, UpstreamError>> + Send {
        let pending = self
            .providers
            .as_ref()
            .map(|clients| clients.for_provider(provider).request(request));
        async move {
            match pending {
                Some(pending) => pending.await.map_err(classify),
                None => Err(UpstreamError::Connect(
                    "no HTTPS client for external providers".to_owned(),
                )),
            }
        }
    }
}

fn classify(error: hyper_util::client::legacy::Error) -> UpstreamError {
    if error.is_connect() {
        UpstreamError::Connect(error.to_string())
    } else {
        UpstreamError::BeforeHeaders(error.to_string())
    }
}
