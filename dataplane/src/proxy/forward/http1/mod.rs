//! The client engines are reached with: HTTP/1.1 over pooled keep-alive
//! connections, driven by the request's own task.
//!
//! Each traffic worker has its own [`Http1Upstream`], hence its own pool: a
//! connection is opened, used and reused on one thread only. Sending writes
//! the request head and body in one `writev` and reads the response head on
//! the request's task; the response body ([`PodBody`]) reads the socket
//! when the client's connection polls it for the next frame, and hands back
//! every chunk already read as one frame before it reads again, so a burst
//! of stream chunks reaches the client in one write (and costs the client's
//! side, the SSE observer included, one frame instead of one per chunk). No task is spawned per connection
//! and no channel sits between the socket and the client: a pooled
//! connection that is idle is just a socket in a list.
//!
//! A connection returns to the pool when its response body has been read to
//! the end and the engine keeps it alive; a body the client abandons closes
//! its connection. An idle connection the engine has closed (engines close
//! idle connections after a few seconds) is noticed when it is taken from the
//! pool; a reused connection that fails before any byte of the response
//! arrived is replaced once by a new one, as the engine closed it before it
//! could have read the request.
//!
//! External providers are reached over HTTPS (and HTTP/2 where offered)
//! with hyper's client instead ([`ProviderClients`], pools of this worker's
//! own); [`EngineBody`] is either kind of answer.

mod codec;
mod pool;

use std::future::poll_fn;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use switchyard_runtime::clock;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use self::codec::{BodyDecoder, Decoded, ProtocolError};
use self::pool::Pool;
use super::upstream::{UPSTREAM_CONNECT_TIMEOUT, Upstream, UpstreamError};
use crate::health::connections::{ConnectionCounts, OpenConnection};
use crate::providers::{Provider, ProviderClients};

/// Read buffer of a new connection: a response head and a few stream chunks.
const READ_BUFFER_BYTES: usize = 8 * 1024;
/// Free space a read asks for at least.
const MIN_READ_BYTES: usize = 4 * 1024;

/// The HTTP/1.1 client of one traffic worker, and its HTTPS clients for
/// external providers.
#[derive(Debug)]
pub struct Http1Upstream {
    pool: Arc<Pool>,
    /// Open connections per pod, shared by the workers (touched per
    /// connection opened or closed, never per request).
    connections: Arc<ConnectionCounts>,
    /// hyper's pooled HTTPS clients (providers speak TLS and often HTTP/2);
    /// None when none could be built (see the start-up log).
    providers: Option<ProviderClients>,
}

impl Http1Upstream {
    /// A client whose open connections per pod are counted in `connections`,
    /// without provider clients.
    pub fn new(connections: Arc<ConnectionCounts>) -> Self {
        Self {
            pool: Arc::default(),
            connections,
            providers: None,
        }
    }

    /// Sends to external providers with `providers`.
    pub fn with_providers(mut self, providers: ProviderClients) -> Self {
        self.providers = Some(providers);
        self
    }
}

/// One connection to an engine.
#[derive(Debug)]
struct Connection {
    stream: TcpStream,
    /// Bytes read and not yet handed on.
    read: BytesMut,
    /// The request head being written (kept for its capacity).
    head: Vec<u8>,
    /// Scratch of the response head parser (kept for its capacity).
    fields: Vec<codec::FieldSpan>,
    /// It carried a request before.
    reused: bool,
    _counted: OpenConnection,
}

impl Connection {
    async fn open(addr: SocketAddr, counts: &Arc<ConnectionCounts>) -> Result<Self, UpstreamError> {
        let stream = clock::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                UpstreamError::Connect(format!("no answer within {UPSTREAM_CONNECT_TIMEOUT:?}"))
            })?
            .map_err(|error| UpstreamError::Connect(error.to_string()))?;
        // Each request is written at once: no point waiting to fill a segment.
        let _ = stream.set_nodelay(true);
        Ok(Self {
            stream,
            read: BytesMut::with_capacity(READ_BUFFER_BYTES),
            head: Vec::new(),
            fields: Vec::new(),
            reused: false,
            _counted: counts.opened(addr),
        })
    }

    /// Reads what the socket has into `read`; 0 when the engine closed it.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.read.capacity() - self.read.len() < MIN_READ_BYTES {
            self.read.reserve(READ_BUFFER_BYTES);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read)
    }
}

/// Why an exchange on a connection failed before the response head.
struct Failed {
    error: String,
    /// No byte of a response arrived: a reused connection the engine had
    /// closed can be replaced.
    nothing_received: bool,
}

impl Upstream for Http1Upstream {
    type Body = EngineBody;

    async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<EngineBody>, UpstreamError> {
        let (parts, body) = request.into_parts();
        let body = full_bytes(body);
        let authority = parts
            .uri
            .authority()
            .ok_or_else(|| UpstreamError::Connect("no pod address in the request".into()))?;
        let addr: SocketAddr = authority.as_str().parse().map_err(|_| {
            UpstreamError::Connect(format!("{authority} is not an IP address and port"))
        })?;
        let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
        let mut connection = match self.pool.checkout(addr).await {
            Some(connection) => connection,
            None => Connection::open(addr, &self.connections).await?,
        };
        loop {
            connection.head.clear();
            codec::encode_request_head(
                &mut connection.head,
                &parts.method,
                path,
                authority.as_str(),
                &parts.headers,
                body.len(),
            );
            match exchange(&mut connection, &body).await {
                Ok(head) => {
                    let (response, ()) = head.response.into_parts();
                    let body = PodBody {
                        decoder: BodyDecoder::new(head.framing),
                        keep_alive: head.keep_alive,
                        connection: Some(connection),
                        pool: self.pool.clone(),
                        addr,
                    };
                    return Ok(Response::from_parts(response, EngineBody::Pod(body)));
                }
                Err(failed) if failed.nothing_received && connection.reused => {
                    tracing::debug!(pod = %addr, error = failed.error, "pooled connection was closed; reconnecting");
                    connection = Connection::open(addr, &self.connections).await?;
                }
                Err(failed) => return Err(UpstreamError::BeforeHeaders(failed.error)),
            }
        }
    }

    async fn send_to_provider(
        &self,
        provider: &Provider,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<EngineBody>, UpstreamError> {
        let Some(clients) = &self.providers else {
            return Err(UpstreamError::Connect(
                "no HTTPS client for external providers".to_owned(),
            ));
        };
        match clients.for_provider(provider).request(request).await {
            Ok(response) => Ok(response.map(EngineBody::Provider)),
            Err(error) if error.is_connect() => Err(UpstreamError::Connect(error.to_string())),
            Err(error) => Err(UpstreamError::BeforeHeaders(error.to_string())),
        }
    }
}

/// Writes the request and reads the response head.
async fn exchange(connection: &mut Connection, body: &Bytes) -> Result<codec::Head, Failed> {
    let sent = write_all(&mut connection.stream, &connection.head, body).await;
    if let Err(error) = sent {
        return Err(Failed {
            error: error.to_string(),
            nothing_received: true,
        });
    }
    loop {
        match codec::parse_response_head(&mut connection.read, &mut connection.fields) {
            Ok(Some(head)) => return Ok(head),
            Ok(None) => {}
            Err(error) => {
                return Err(Failed {
                    error: error.to_string(),
                    nothing_received: false,
                });
            }
        }
        let nothing_received = connection.read.is_empty();
        match poll_fn(|cx| connection.poll_read(cx)).await {
            Ok(0) => {
                return Err(Failed {
                    error: "connection closed before the response head".into(),
                    nothing_received,
                });
            }
            Ok(_) => {}
            Err(error) => {
                return Err(Failed {
                    error: error.to_string(),
                    nothing_received,
                });
            }
        }
    }
}

/// The head, then the body: one `writev` when the socket takes it all.
async fn write_all(stream: &mut TcpStream, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let mut slices = [IoSlice::new(head), IoSlice::new(body)];
    let mut remaining: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut remaining, 0);
    while !remaining.is_empty() {
        let written = stream.write_vectored(remaining).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut remaining, written);
    }
    Ok(())
}

/// The bytes of a request body built as one buffer.
fn full_bytes(body: Full<Bytes>) -> Bytes {
    let mut body = std::pin::pin!(body);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match body.as_mut().poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

/// Why an engine's response body broke off.
#[derive(Debug, thiserror::Error)]
pub enum EngineBodyError {
    #[error("reading the engine's response: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("reading the provider's response: {0}")]
    Provider(#[from] hyper::Error),
}

/// What polling an engine's response body gives.
type PolledFrame = Poll<Option<Result<Frame<Bytes>, EngineBodyError>>>;

/// The body of an answer: a pod's, read by this client, or an external
/// provider's, read by hyper.
#[derive(Debug)]
pub enum EngineBody {
    Pod(PodBody),
    Provider(Incoming),
}

impl Body for EngineBody {
    type Data = Bytes;
    type Error = EngineBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> PolledFrame {
        match self.get_mut() {
            Self::Pod(body) => Pin::new(body).poll_frame(cx),
            Self::Provider(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(EngineBodyError::Provider),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Pod(body) => body.is_end_stream(),
            Self::Provider(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Pod(body) => body.size_hint(),
            Self::Provider(body) => body.size_hint(),
        }
    }
}

/// A pod's response body, read from its connection as the client's side
/// asks for it.
#[derive(Debug)]
pub struct PodBody {
    decoder: BodyDecoder,
    keep_alive: bool,
    /// Until the body ends or fails.
    connection: Option<Connection>,
    pool: Arc<Pool>,
    addr: SocketAddr,
}

impl PodBody {
    /// The body is read to its end: its connection goes back to the pool
    /// when the engine keeps it alive and sent nothing more.
    fn release(&mut self) {
        if let Some(mut connection) = self.connection.take()
            && self.keep_alive
            && connection.read.is_empty()
        {
            connection.reused = true;
            self.pool.checkin(self.addr, connection);
        }
    }

    fn fail(&mut self, error: EngineBodyError) -> PolledFrame {
        self.connection = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for PodBody {
    type Data = Bytes;
    type Error = EngineBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> PolledFrame {
        let this = self.get_mut();
        loop {
            let Some(connection) = &mut this.connection else {
                return Poll::Ready(None);
            };
            match this.decoder.decode_available(&mut connection.read) {
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_done() {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(error) => return this.fail(error.into()),
            }
            match connection.poll_read(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    if let Err(error) = this.decoder.on_eof() {
                        return this.fail(error.into());
                    }
                    this.connection = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(error)) => return this.fail(error.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder
            .remaining()
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// Reads one byte without waiting: `false` when the engine closed the
/// connection or sent something unasked (it cannot carry a request then).
fn is_idle_and_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock)
}

/// Whether the socket has something to read (an unread close included),
/// without a system call unless the reactor saw it become readable.
async fn looks_readable(stream: &TcpStream) -> bool {
    poll_fn(|cx| Poll::Ready(stream.poll_read_ready(cx).is_ready())).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::StatusCode;
    use http::header::HeaderValue;
    use http_body_util::BodyExt;
    use parking_lot::Mutex;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// A fake engine on loopback: every accepted connection is handed to
    /// `serve`, with the connection's number (from 0).
    async fn engine<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream, usize) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let number = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, number));
            }
        });
        (addr, accepted)
    }

    /// Reads one request (head and `content-length` body) off `stream`.
    async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<String> {
        loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length: "))
                    .and_then(|value| value.trim().parse().ok())
                    .unwrap_or(0);
                if buffer.len() >= end + 4 + length {
                    let request: Vec<u8> = buffer.drain(..end + 4 + length).collect();
                    return Some(String::from_utf8_lossy(&request).into_owned());
                }
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
        }
    }

    /// Answers every request on the connection with `answer`.
    async fn answer_each(mut stream: TcpStream, answer: &'static str) {
        let mut buffer = Vec::new();
        while read_request(&mut stream, &mut buffer).await.is_some() {
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    fn request(addr: SocketAddr, body: &'static str) -> Request<Full<Bytes>> {
        Request::post(format!("http://{addr}/v1/completions?x=1"))
            .header("authorization", "Bearer k")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("request")
    }

    async fn text(response: Response<EngineBody>) -> String {
        let body = response.into_body().collect().await.expect("body");
        String::from_utf8(body.to_bytes().to_vec()).expect("UTF-8")
    }

    const JSON_ANSWER: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";

    #[tokio::test]
    async fn sends_head_and_body_and_reuses_the_connection() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let (addr, accepted) = engine(move |mut stream, _| {
            let log = log.clone();
            async move {
                let mut buffer = Vec::new();
                while let Some(request) = read_request(&mut stream, &mut buffer).await {
                    log.lock().push(request);
                    let _ = stream.write_all(JSON_ANSWER.as_bytes()).await;
                }
            }
        })
        .await;
        let counts = Arc::new(ConnectionCounts::default());
        let upstream = Http1Upstream::new(counts.clone());
        for _ in 0..3 {
            let response = upstream
                .send(request(addr, "{\"a\":1}"))
                .await
                .expect("answered");
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()["content-type"], "application/json");
            assert_eq!(response.body().size_hint().exact(), Some(11));
            assert_eq!(text(response).await, "{\"ok\":true}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused");
        assert_eq!(upstream.pool.idle_count(), 1);
        assert_eq!(counts.open_to(addr), 1, "the pooled connection is counted");
        let seen = seen.lock();
        assert_eq!(seen.len(), 3);
        assert_eq!(
            seen[0],
            format!(
                "POST /v1/completions?x=1 HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 7\r\n\
                 authorization: Bearer k\r\n\r\n{{\"a\":1}}"
            )
        );
    }

    #[tokio::test]
    async fn a_chunked_stream_comes_out_whole_and_keeps_its_connection() {
        let (addr, _) = engine(|stream, _| {
            answer_each(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
                 d\r\ndata: first\n\n\r\nd\r\ndata: again\n\n\r\n0\r\n\r\n",
            )
        })
        .await;
        let upstream = Http1Upstream::new(Arc::default());
        let response = upstream.send(request(addr, "{}")).await.expect("answered");
        assert_eq!(response.headers()["transfer-encoding"], "chunked");
        let mut body = response.into_body();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.expect("data").into_data().expect("data"));
        }
        // Chunks read together leave as one frame (`BodyDecoder::decode_available`).
        assert_eq!(frames.concat(), b"data: first\n\ndata: again\n\n");
        assert!(body.is_end_stream());
        assert_eq!(upstream.pool.idle_count(), 1, "kept alive");
    }

    #[tokio::test]
    async fn connection_close_and_abandoned_bodies_are_not_pooled() {
        let (addr, accepted) = engine(|stream, _| {
            answer_each(
                stream,
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            )
        })
        .await;
        let counts = Arc::new(ConnectionCounts::default());
        let upstream = Http1Upstream::new(counts.clone());
        let response = upstream.send(request(addr, "{}")).await.expect("answered");
        assert_eq!(text(response).await, "ok");
        assert_eq!(upstream.pool.idle_count(), 0);
        assert_eq!(counts.open_to(addr), 0, "closed, no longer counted");

        let (addr, _) = engine(|stream, _| answer_each(stream, JSON_ANSWER)).await;
        let response = upstream.send(request(addr, "{}")).await.expect("answered");
        drop(response);
        assert_eq!(upstream.pool.idle_count(), 0, "unread body: closed");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_idle_connection_the_engine_closed_is_replaced() {
        // Each connection answers one request, then closes (as an engine
        // whose keep-alive timeout passed).
        let (addr, accepted) = engine(|mut stream, _| async move {
            let mut buffer = Vec::new();
            if read_request(&mut stream, &mut buffer).await.is_some() {
                let _ = stream.write_all(JSON_ANSWER.as_bytes()).await;
            }
        })
        .await;
        let upstream = Http1Upstream::new(Arc::default());
        for round in 1..=3 {
            let response = upstream.send(request(addr, "{}")).await.expect("answered");
            assert_eq!(text(response).await, "{\"ok\":true}");
            assert_eq!(accepted.load(Ordering::SeqCst), round);
        }
    }

    #[tokio::test]
    async fn failures_are_classified() {
        // Nothing listens: refused.
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let refused = closed.local_addr().expect("addr");
        drop(closed);
        let upstream = Http1Upstream::new(Arc::default());
        let error = upstream
            .send(request(refused, "{}"))
            .await
            .expect_err("refused");
        assert!(matches!(error, UpstreamError::Connect(_)), "{error:?}");

        // Reads the request and hangs up on a new connection.
        let (addr, _) = engine(|mut stream, _| async move {
            let mut buffer = Vec::new();
            let _ = read_request(&mut stream, &mut buffer).await;
        })
        .await;
        let error = upstream.send(request(addr, "{}")).await.expect_err("cut");
        assert!(
            matches!(error, UpstreamError::BeforeHeaders(_)),
            "{error:?}"
        );

        // Not HTTP.
        let (addr, _) = engine(|stream, _| answer_each(stream, "SSH-2.0-OpenSSH\r\n\r\n")).await;
        let error = upstream
            .send(request(addr, "{}"))
            .await
            .expect_err("not HTTP");
        assert!(
            matches!(error, UpstreamError::BeforeHeaders(_)),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_body_cut_short_ends_in_an_error() {
        let (addr, _) = engine(|mut stream, _| async move {
            let mut buffer = Vec::new();
            if read_request(&mut stream, &mut buffer).await.is_some() {
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
                    )
                    .await;
            }
        })
        .await;
        let upstream = Http1Upstream::new(Arc::default());
        let mut body = upstream
            .send(request(addr, "{}"))
            .await
            .expect("answered")
            .into_body();
        let first = body.frame().await.expect("frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "hello");
        assert!(body.frame().await.expect("frame").is_err());
        assert_eq!(upstream.pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_large_body_is_written_whole() {
        let body: &'static str = Box::leak("x".repeat(3 << 20).into_boxed_str());
        let (addr, _) = engine(|mut stream, _| async move {
            let mut buffer = Vec::new();
            if let Some(request) = read_request(&mut stream, &mut buffer).await {
                let length = request.len() - request.find("\r\n\r\n").expect("head") - 4;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{length}",
                    length.to_string().len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        })
        .await;
        let upstream = Http1Upstream::new(Arc::default());
        let mut request = request(addr, body);
        request
            .headers_mut()
            .insert("x-big", HeaderValue::from_static("1"));
        let response = upstream.send(request).await.expect("answered");
        assert_eq!(text(response).await, (3 << 20).to_string());
    }
}
