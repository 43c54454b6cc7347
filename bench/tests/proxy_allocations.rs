//! Regression guard for the whole proxied request, without timing: counts
//! heap allocations per request of a client, the real proxy (`Proxy::handle`
//! behind the dataplane's `serve`) and a fake engine, all in one
//! current-thread runtime on loopback, with a counting global allocator.
//!
//! `hot_path_allocations.rs` guards the library steps (parse, route, pick,
//! observe); this one sees what they cannot: request ids, header maps, the
//! upstream request, the response body wrapper, metrics and the per-chunk
//! forwarding of a stream. The client and the fake engine allocate the same
//! amount every request, so a change in the count is the proxy's.
//!
//! One `#[test]` in its own binary, so no other test allocates meanwhile.

use std::alloc::System;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use switchyard_bench::{CHAT_RESPONSE, NAMESPACE, STREAM_CHUNK, STREAM_TAIL, chat_body, server};
use switchyard_dataplane::limits::{ConnectionLimit, DEFAULT_MAX_CONNECTIONS};
use switchyard_dataplane::metrics::RouterMetrics;
use switchyard_dataplane::proxy::log::Observer;
use switchyard_dataplane::proxy::{Proxy, ProxyConfig};
use switchyard_dataplane::server::{ConnectionSettings, serve};
use switchyard_dataplane::snapshot::SnapshotStore;
use switchyard_runtime::CancellationToken;
use switchyard_snapshot::pb;
use switchyard_snapshot::test_builders as builders;
use tokio::net::{TcpListener, TcpStream};

/// Requests per measurement (after a warm-up): one-off allocations (pools,
/// lazy statics, buffer growth) vanish in the average.
const REQUESTS: u64 = 300;
const WARMUP_REQUESTS: u64 = 30;

/// Chunks per streamed answer, as in `make bench`.
const STREAM_CHUNKS: usize = 64;

/// Client + proxy + engine together, in one current-thread runtime: measured
/// 41.0 per request (2026-12-06); the bound leaves room for small changes in
/// hyper or tokio, while a copied header map or body per request exceeds it.
const MAX_ALLOCATIONS_PER_CHAT_REQUEST: f64 = 45.0;

/// Frames pass from the engine's connection to the client's as the same
/// `Bytes`, so well under one allocation per chunk (measured 0.12); a copy or a boxed frame per
/// chunk exceeds it.
const MAX_ALLOCATIONS_PER_STREAM_CHUNK: f64 = 0.25;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

type EngineBody = BoxBody<Bytes, Infallible>;

async fn engine(request: Request<Incoming>) -> Result<Response<EngineBody>, Infallible> {
    let body = request
        .into_body()
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    let streamed = memchr::memmem::find(&body, br#""stream":true"#).is_some();
    let (content_type, body) = if streamed {
        let frames =
            std::iter::repeat_n(Bytes::from_static(STREAM_CHUNK.as_bytes()), STREAM_CHUNKS)
                .chain(std::iter::once(Bytes::from_static(STREAM_TAIL.as_bytes())))
                .map(|data| Ok::<_, Infallible>(Frame::data(data)));
        (
            "text/event-stream",
            StreamBody::new(futures::stream::iter(frames)).boxed(),
        )
    } else {
        (
            "application/json",
            Full::new(Bytes::from_static(CHAT_RESPONSE.as_bytes())).boxed(),
        )
    };
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    Ok(response)
}

async fn start_engine() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind engine");
    let addr = listener.local_addr().expect("engine addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(engine)),
            );
        }
    });
    addr
}

fn route_config(engine: SocketAddr) -> pb::RouteConfig {
    let mut engine_server = server("engine", 1, 0x7f00_0001);
    engine_server.port = u32::from(engine.port());
    builders::route_config(
        vec![builders::route_in(
            NAMESPACE,
            "chat",
            "bench-model",
            "engine",
        )],
        vec![engine_server],
    )
}

async fn start_proxy(engine: SocketAddr) -> (SocketAddr, CancellationToken) {
    let metrics = RouterMetrics::new().expect("metrics");
    let store = Arc::new(SnapshotStore::new());
    store
        .apply_route_config("v1", route_config(engine))
        .expect("valid snapshot");
    if let Some(table) = store.table() {
        metrics.resolve(&table);
    }
    let observer = Arc::new(Observer::without_access_log(metrics));
    let proxy = Arc::new(Proxy::new(store, ProxyConfig::default(), observer));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    let stop = CancellationToken::new();
    tokio::spawn(serve(
        listener,
        ConnectionSettings {
            idle_timeout: Duration::from_secs(60),
            limit: ConnectionLimit::new(DEFAULT_MAX_CONNECTIONS),
        },
        stop.clone(),
        move |request| {
            let proxy = proxy.clone();
            async move { proxy.handle(request).await }
        },
    ));
    (addr, stop)
}

struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the proxy");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        Self { sender, addr }
    }

    /// One request; returns the response body's length.
    async fn ask(&mut self, body: &Bytes) -> usize {
        let request = Request::post(format!("http://{}/v1/chat/completions", self.addr))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))
            .expect("request");
        let response = self.sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("x-request-id"));
        let body = response.into_body().collect().await.expect("body");
        body.to_bytes().len()
    }
}

async fn allocations_per_request(client: &mut Client, body: &Bytes, check: impl Fn(usize)) -> f64 {
    for _ in 0..WARMUP_REQUESTS {
        check(client.ask(body).await);
    }
    let region = Region::new(GLOBAL);
    for _ in 0..REQUESTS {
        check(client.ask(body).await);
    }
    let change = region.change();
    (change.allocations + change.reallocations) as f64 / REQUESTS as f64
}

#[test]
fn proxied_request_allocations_stay_within_bounds() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let engine = start_engine().await;
        let (proxy, stop) = start_proxy(engine).await;
        let mut client = Client::connect(proxy).await;

        let chat = allocations_per_request(&mut client, &chat_body(800, false), |len| {
            assert_eq!(len, CHAT_RESPONSE.len());
        })
        .await;
        eprintln!("~1 KB chat through the proxy: {chat:.2} allocations per request (client + proxy + engine)");

        // The router adds include_usage and hides the usage-only chunk again.
        let streamed_len = STREAM_CHUNK.len() * STREAM_CHUNKS + "data: [DONE]\n\n".len();
        let stream = allocations_per_request(&mut client, &chat_body(800, true), |len| {
            assert_eq!(len, streamed_len);
        })
        .await;
        let per_chunk = (stream - chat) / (STREAM_CHUNKS + 1) as f64;
        eprintln!(
            "streamed request: {stream:.2} allocations, {per_chunk:.3} per forwarded chunk"
        );
        stop.cancel();

        assert!(
            chat <= MAX_ALLOCATIONS_PER_CHAT_REQUEST,
            "a proxied chat request allocates {chat:.2} times (bound {MAX_ALLOCATIONS_PER_CHAT_REQUEST})"
        );
        assert!(
            per_chunk <= MAX_ALLOCATIONS_PER_STREAM_CHUNK,
            "forwarding a stream allocates {per_chunk:.3} times per chunk (bound {MAX_ALLOCATIONS_PER_STREAM_CHUNK})"
        );
    });
}
