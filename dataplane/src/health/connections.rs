//! Open upstream connections per pod: what `kthena_lb_connection_pool_size`
//! reports. The connector hyper's pooled client uses is wrapped so every
//! connection it opens is counted until hyper drops it (idle in the pool or
//! carrying a request); nothing is done per request, only per connection.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use parking_lot::Mutex;
use tower_service::Service;

/// Open connections by pod address.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    open: Mutex<HashMap<SocketAddr, u64>>,
}

impl ConnectionCounts {
    /// Connections open to `addr` now.
    pub fn open_to(&self, addr: SocketAddr) -> u64 {
        self.open.lock().get(&addr).copied().unwrap_or(0)
    }

    fn opened(self: &Arc<Self>, addr: SocketAddr) -> OpenConnection {
        *self.open.lock().entry(addr).or_default() += 1;
        OpenConnection {
            counts: self.clone(),
            addr,
        }
    }
}

/// Counts one connection while alive.
#[derive(Debug)]
struct OpenConnection {
    counts: Arc<ConnectionCounts>,
    addr: SocketAddr,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock();
        if let Some(count) = open.get_mut(&self.addr) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.addr);
            }
        }
    }
}

/// An [`HttpConnector`] whose connections are counted in [`ConnectionCounts`].
#[derive(Debug, Clone)]
pub struct CountingConnector {
    inner: HttpConnector,
    counts: Arc<ConnectionCounts>,
}

impl CountingConnector {
    pub fn new(inner: HttpConnector, counts: Arc<ConnectionCounts>) -> Self {
        Self { inner, counts }
    }
}

type Stream = <HttpConnector as Service<Uri>>::Response;
type ConnectError = <HttpConnector as Service<Uri>>::Error;

impl Service<Uri> for CountingConnector {
    type Response = Counted<Stream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // Upstream URIs carry the pod's `ip:port`, never a name.
        let addr = uri
            .authority()
            .and_then(|authority| authority.as_str().parse::<SocketAddr>().ok());
        let connecting = self.inner.call(uri);
        let counts = self.counts.clone();
        Box::pin(async move {
            let stream = connecting.await?;
            Ok(Counted {
                _open: addr.map(|addr| counts.opened(addr)),
                inner: stream,
            })
        })
    }
}

/// A connection that is counted until dropped.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    _open: Option<OpenConnection>,
}

impl<S: Read + Unpin> Read for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: Write + Unpin> Write for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

impl<S: Connection> Connection for Counted<S> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_are_counted_while_open() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepting = tokio::spawn(async move {
            let mut accepted = Vec::new();
            for _ in 0..2 {
                accepted.push(listener.accept().await.expect("accept"));
            }
            accepted
        });
        let counts = Arc::new(ConnectionCounts::default());
        let mut connector = CountingConnector::new(HttpConnector::new(), counts.clone());
        let uri: Uri = format!("http://{addr}/").parse().expect("uri");
        let first = connector.call(uri.clone()).await.expect("connects");
        let second = connector.call(uri).await.expect("connects");
        assert_eq!(counts.open_to(addr), 2);
        drop(first);
        assert_eq!(counts.open_to(addr), 1);
        drop(second);
        assert_eq!(counts.open_to(addr), 0);
        assert!(
            counts.open.lock().is_empty(),
            "no entry left for a closed pod"
        );
        drop(accepting.await.expect("accepted"));
    }
}
