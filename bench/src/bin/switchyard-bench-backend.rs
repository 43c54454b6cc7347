//! `switchyard-bench-backend`: a fake inference engine that answers at once, so
//! a benchmark measures the proxy in front of it and not the engine.
//!
//! It reads each request body to the end (the proxy must send all of it) and
//! answers with a fixed OpenAI chat completion, or with an SSE stream of
//! `--stream-chunks` chunks when the body asks for `"stream": true`: all at
//! once by default, or [`CHUNK_INTERVAL_HEADER`] microseconds apart, as a real
//! engine emits tokens (so no proxy can coalesce chunks). It also
//! answers the controller's `/metrics` and `/v1/models` scrapes, and the
//! `/health` checks the peer routers `make bench` runs wait on. It listens on
//! every `--listen` address (one per fake pod) with the same port.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A chat completion of about the size a short real answer has.
const CHAT_RESPONSE: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox jumps over the lazy dog."},"finish_reason":"stop"}],"usage":{"prompt_tokens":250,"completion_tokens":12,"total_tokens":262}}"#;

/// One token delta, as vLLM streams it.
const STREAM_CHUNK: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" token\"},\"finish_reason\":null}]}\n\n";

/// The usage-only chunk an engine sends when `include_usage` is set, then the end marker.
const STREAM_TAIL: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench-model\",\"choices\":[],\"usage\":{\"prompt_tokens\":250,\"completion_tokens\":64,\"total_tokens\":314}}\n\ndata: [DONE]\n\n";

/// Minimal vLLM metrics, so the controller's scrape succeeds.
const METRICS: &str = "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"bench-model\"} 0\n# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"bench-model\"} 0\n# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name=\"bench-model\"} 0.1\n";

const MODELS: &str =
    r#"{"object":"list","data":[{"id":"bench-model","object":"model","owned_by":"bench"}]}"#;

/// Request header asking for this many microseconds between stream chunks
/// (tokio's timer rounds up to whole milliseconds).
const CHUNK_INTERVAL_HEADER: &str = "x-bench-chunk-interval-us";

/// Token chunks per streamed answer by default: a short answer.
const DEFAULT_STREAM_CHUNKS: usize = 64;

/// Runtime worker threads by default: the bench pins the backend to one core.
const DEFAULT_WORKERS: usize = 1;

#[derive(Debug, Parser)]
#[command(name = "switchyard-bench-backend")]
struct Args {
    /// Loopback IPs to listen on (one per fake pod), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    listen: Vec<IpAddr>,
    /// Listen on this many consecutive addresses from 127.0.10.1 on (in
    /// addition to `--listen`): 250 per third octet, for many fake pods.
    #[arg(long, default_value_t = 0)]
    loopback_pods: usize,
    #[arg(long, default_value_t = 18000)]
    port: u16,
    #[arg(long, default_value_t = DEFAULT_STREAM_CHUNKS)]
    stream_chunks: usize,
    #[arg(long, default_value_t = DEFAULT_WORKERS)]
    workers: usize,
}

/// The address of fake pod `index` (0-based) of `--loopback-pods`.
fn loopback_pod_ip(index: usize) -> IpAddr {
    let third = 10 + index / 250;
    let fourth = 1 + index % 250;
    IpAddr::V4(std::net::Ipv4Addr::new(127, 0, third as u8, fourth as u8))
}

struct Answers {
    chat: Bytes,
    chunk: Bytes,
    tail: Bytes,
    chunks: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let answers = Arc::new(Answers {
        chat: Bytes::from_static(CHAT_RESPONSE.as_bytes()),
        chunk: Bytes::from_static(STREAM_CHUNK.as_bytes()),
        tail: Bytes::from_static(STREAM_TAIL.as_bytes()),
        chunks: args.stream_chunks,
    });
    let mut ips = args.listen.clone();
    ips.extend((0..args.loopback_pods).map(loopback_pod_ip));
    for ip in &ips {
        if !ip.is_loopback() {
            eprintln!("{ip} is not a loopback address: the bench only listens on loopback");
            return ExitCode::from(2);
        }
        let addr = SocketAddr::new(*ip, args.port);
        let listener = match TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("cannot listen on {addr}: {error}");
                return ExitCode::FAILURE;
            }
        };
        tokio::spawn(accept_loop(listener, Arc::clone(&answers)));
    }
    println!("listening on {} addresses, port {}", ips.len(), args.port);
    match tokio::signal::ctrl_c().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cannot wait for a signal: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn accept_loop(listener: TcpListener, answers: Arc<Answers>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let answers = Arc::clone(&answers);
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, Arc::clone(&answers)));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type AnswerBody = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<AnswerBody> {
    let mut response = Response::new(Full::new(body).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

async fn answer(
    request: Request<Incoming>,
    answers: Arc<Answers>,
) -> Result<Response<AnswerBody>, Infallible> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => Ok(full(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            Bytes::from_static(METRICS.as_bytes()),
        )),
        (&Method::GET, "/health") => Ok(full(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(b"{}"),
        )),
        (&Method::GET, "/v1/models") => Ok(full(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(MODELS.as_bytes()),
        )),
        (&Method::POST, _) => {
            let interval = request
                .headers()
                .get(CHUNK_INTERVAL_HEADER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<u64>().ok())
                .map(std::time::Duration::from_micros)
                .filter(|interval| !interval.is_zero());
            let body = match request.into_body().collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => {
                    return Ok(full(
                        StatusCode::BAD_REQUEST,
                        "application/json",
                        Bytes::from_static(br#"{"error":{"message":"body read failed"}}"#),
                    ));
                }
            };
            if asks_for_stream(&body) {
                Ok(stream(&answers, interval))
            } else {
                Ok(full(
                    StatusCode::OK,
                    "application/json",
                    answers.chat.clone(),
                ))
            }
        }
        _ => Ok(full(
            StatusCode::NOT_FOUND,
            "application/json",
            Bytes::from_static(br#"{"error":{"message":"not found"}}"#),
        )),
    }
}

/// Good enough for bench bodies, which the bench itself writes.
fn asks_for_stream(body: &[u8]) -> bool {
    memchr::memmem::find(body, b"\"stream\":true").is_some()
        || memchr::memmem::find(body, b"\"stream\": true").is_some()
}

fn stream(answers: &Answers, interval: Option<std::time::Duration>) -> Response<AnswerBody> {
    let frames = std::iter::repeat_n(answers.chunk.clone(), answers.chunks)
        .chain(std::iter::once(answers.tail.clone()))
        .map(|data| Ok::<_, Infallible>(Frame::data(data)));
    let body = match interval {
        None => StreamBody::new(futures::stream::iter(frames)).boxed(),
        Some(interval) => {
            let paced =
                futures::StreamExt::then(futures::stream::iter(frames), move |frame| async move {
                    tokio::time::sleep(interval).await;
                    frame
                });
            StreamBody::new(paced).boxed()
        }
    };
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    response
}
