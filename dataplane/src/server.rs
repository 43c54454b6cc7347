//! The dataplane's HTTP servers (traffic, metrics, debug): HTTP/1.1 and
//! HTTP/2 on one port, bounded idle connections, a graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use switchyard_runtime::{CancellationToken, clock};
use tokio::net::TcpListener;

use crate::proxy::ProxyBody;

/// On SIGTERM, in-flight requests (long SSE streams included) get this long to
/// finish; matches a typical terminationGracePeriodSeconds minus headroom.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);
/// Pause after a failed `accept` (out of file descriptors and the like), so
/// the loop backs off instead of spinning while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts HTTP/1.1 and HTTP/2 connections until `stop` is cancelled, then
/// waits up to [`DRAIN_TIMEOUT`] for open connections to finish.
///
/// `idle_timeout` bounds both the wait for a request's headers and the idle
/// time of a keep-alive connection (hyper starts the same timer whenever it
/// waits for the next request head), so slow or idle clients cannot hold
/// connections forever.
pub async fn serve<H, F>(
    listener: TcpListener,
    idle_timeout: Duration,
    stop: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(idle_timeout / 2))
        .keep_alive_timeout(idle_timeout / 2);
    let graceful = GracefulShutdown::new();
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(error = %error, "accept failed");
                    clock::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            () = &mut stopped => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |request| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(request).await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // HTTP version detection waits for the first bytes without a
            // timeout of its own, so a client that connects and sends nothing
            // is bounded here; hyper's header timeout covers the rest.
            let mut first = [0u8; 1];
            match clock::timeout(idle_timeout, stream.peek(&mut first)).await {
                Ok(Ok(read)) if read > 0 => {}
                _ => return,
            }
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(peer = %peer, error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if clock::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
}
