//! The dataplane's HTTP servers (traffic, Gateway listener ports, metrics,
//! debug): HTTP/1.1 and HTTP/2 on one port, bounded idle connections, a
//! graceful drain on shutdown; and the listeners of the ports the traffic
//! workers serve, one per worker.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use switchyard_runtime::{BindError, CancellationToken, clock};
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
/// Connections the kernel queues per listener before they are accepted: as
/// Tokio's own `TcpListener::bind`.
const LISTEN_BACKLOG: i32 = 1024;
/// How an HTTP/2 connection with prior knowledge starts (RFC 9113 §3.4);
/// anything else is served as HTTP/1 without the version detection layer.
const HTTP2_PREFACE_START: [u8; 4] = *b"PRI ";

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
    let mut http1 = http1::Builder::new();
    // The read buffer bound alone lets a head that arrives in one last large
    // read through; the header size bound checks the parsed head itself.
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
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
        let http1 = http1.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            // Waits for the first bytes, which tell HTTP/1 from HTTP/2, with
            // the idle timeout: a client that connects and sends nothing is
            // bounded here; hyper's header timeout covers the rest.
            let mut first = [0u8; HTTP2_PREFACE_START.len()];
            let read = match clock::timeout(idle_timeout, stream.peek(&mut first)).await {
                Ok(Ok(read)) if read > 0 => read,
                _ => return,
            };
            let io = TokioIo::new(stream);
            let ended = if read == first.len() && first != HTTP2_PREFACE_START {
                // HTTP/1 fast path: no version detection layer under every read.
                let connection = http1.serve_connection(io, service);
                watcher.watch(connection).await.map_err(Into::into)
            } else {
                let connection = builder.serve_connection(io, service).into_owned();
                watcher.watch(connection).await
            };
            if let Err(error) = ended {
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

/// Binds `count` listeners to `addr` for the `listener` server (the traffic
/// port, a Gateway listener port), one per traffic worker, with
/// `SO_REUSEPORT` when there are several: the kernel then spreads incoming
/// connections over them (by a hash of the connection's addresses), so each
/// worker accepts its own connections without sharing an accept queue.
///
/// `SO_REUSEPORT` would also let this process join a group another process
/// already listens with, and silently share its traffic. So `addr` is first
/// bound alone, without the option: that fails as a plain bind does when the
/// port is in use, and fixes the port when `addr` asks for port 0.
pub fn bind_worker_listeners(
    listener: &'static str,
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, BindError> {
    let error = |source| BindError {
        listener,
        addr,
        source,
    };
    let port = {
        let probe = new_socket(addr, false).map_err(error)?;
        probe.bind(&addr.into()).map_err(error)?;
        probe
            .local_addr()
            .ok()
            .and_then(|local| local.as_socket())
            .map_or(addr.port(), |local| local.port())
    };
    let addr = SocketAddr::new(addr.ip(), port);
    (0..count.max(1))
        .map(|_| {
            let socket = new_socket(addr, count > 1)?;
            socket.bind(&addr.into())?;
            socket.listen(LISTEN_BACKLOG)?;
            Ok(socket.into())
        })
        .collect::<std::io::Result<_>>()
        .map_err(error)
}

/// A non-blocking TCP socket for `addr`, with `SO_REUSEADDR` as Tokio sets
/// it (a restart need not wait for the old connections' TIME_WAIT).
fn new_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn loopback(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn worker_listeners_share_one_port_and_each_accepts() {
        let listeners = bind_worker_listeners("traffic", loopback(0), 3).expect("bound");
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr").port())
            .collect();
        assert!(ports.iter().all(|port| *port == ports[0] && *port != 0));
        // Every connection lands on exactly one of them (they do not block:
        // a listener without it answers WouldBlock).
        let mut accepted = 0;
        for _ in 0..8 {
            let mut client = std::net::TcpStream::connect(loopback(ports[0])).expect("connect");
            client.write_all(b"x").expect("write");
            for listener in &listeners {
                if let Ok((mut server, _)) = listener.accept() {
                    let mut byte = [0u8; 1];
                    server.read_exact(&mut byte).expect("read");
                    accepted += 1;
                }
            }
        }
        assert_eq!(accepted, 8);
    }

    #[test]
    fn a_port_another_listener_holds_is_refused_even_with_reuse_port() {
        let taken = bind_worker_listeners("traffic", loopback(0), 2).expect("bound");
        let port = taken[0].local_addr().expect("addr").port();
        let error = bind_worker_listeners("traffic", loopback(port), 2).expect_err("in use");
        assert_eq!(error.listener, "traffic");
        assert_eq!(error.source.kind(), std::io::ErrorKind::AddrInUse);
        let plain = std::net::TcpListener::bind(loopback(0)).expect("bound");
        let port = plain.local_addr().expect("addr").port();
        assert!(bind_worker_listeners("traffic", loopback(port), 2).is_err());
    }

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
