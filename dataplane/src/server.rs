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

use crate::limits::{
    ConnectionLimit, MAX_CONCURRENT_STREAMS, MAX_HEADER_BYTES, MAX_HEADERS,
    MAX_PENDING_RESET_STREAMS,
};
use crate::proxy::ProxyBody;

/// On SIGTERM, in-flight requests (long SSE streams included) get this long to
/// finish; matches a typical terminationGracePeriodSeconds minus headroom.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);
/// Pause after a failed `accept` (out of file descriptors and the like), so
/// the loop backs off instead of spinning while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// What one listener's clients may hold.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// Bounds both the wait for a request's headers and the idle time of a
    /// keep-alive connection (hyper starts the same timer whenever it waits
    /// for the next request head), so slow or idle clients cannot hold
    /// connections forever.
    pub idle_timeout: Duration,
    /// Connections served at once; one more is answered 503 and closed.
    pub limit: ConnectionLimit,
}

/// What a connection over the limit gets, written without reading its
/// request: a client (or a load balancer) sees why and retries elsewhere.
const OVER_CAPACITY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 103\r\n\r\n\
{\"error\":{\"message\":\"too many client connections\",\"type\":\"server_error\",\"code\":\"too_many_connections\"}}";

/// Accepts HTTP/1.1 and HTTP/2 connections until `stop` is cancelled, then
/// waits up to [`DRAIN_TIMEOUT`] for open connections to finish. Per
/// connection, hyper's buffers are bounded by the limits of
/// [`crate::limits`].
pub async fn serve<H, F>(
    listener: TcpListener,
    settings: ConnectionSettings,
    stop: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let ConnectionSettings {
        idle_timeout,
        limit,
    } = settings;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(idle_timeout / 2))
        .keep_alive_timeout(idle_timeout / 2)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(MAX_PENDING_RESET_STREAMS);
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
        let Some(permit) = limit.try_acquire() else {
            // Best effort and never waited on: the client may be the flood.
            let _ = stream.try_write(OVER_CAPACITY_RESPONSE);
            tracing::debug!(peer = %peer, max = limit.max(), "connection refused: too many client connections");
            continue;
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
            let _permit = permit;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_over_capacity_answer_is_a_whole_json_response() {
        let text = std::str::from_utf8(OVER_CAPACITY_RESPONSE).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(json["error"]["code"], "too_many_connections");
    }
}
