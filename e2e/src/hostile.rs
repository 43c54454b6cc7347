//! Tools for the hostile-client tests: raw HTTP/1.1 and HTTP/2 bytes on a
//! socket (what a well-behaved client library would never send), and the
//! memory and descriptors of a process as the kernel reports them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use parking_lot::Mutex;
use switchyard_runtime::clock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{
    ENGINE_PORT, Stack, TestPod, WAIT_DEADLINE, model_server_yaml, read_request, simple_route_yaml,
    yaml_documents,
};

/// A controller and a dataplane routing model `m` to a mock engine and
/// `cap` to a [`CaptureEngine`], for the hostile-client tests.
pub struct HostileStack {
    pub stack: Stack,
    pub capture: CaptureEngine,
}

impl HostileStack {
    pub async fn start(dataplane_args: &[&str]) -> Self {
        let objects = yaml_documents(&[
            model_server_yaml("mock", ""),
            simple_route_yaml("m", "m", "mock"),
            model_server_yaml("cap", ""),
            simple_route_yaml("cap", "cap", "cap"),
        ]);
        let mut stack = Stack::new(&[("objects.yaml", objects)]);
        let capture = CaptureEngine::start(SocketAddr::from((stack.ip(12), ENGINE_PORT))).await;
        stack
            .start_pods(&[
                TestPod::serving("mock-0", 11, "mock", "m", &[]),
                TestPod::without_engine("cap-0", 12, "cap"),
            ])
            .await;
        stack.start_controller().await;
        let index = stack.spawn_dataplane_with(dataplane_args);
        stack.wait_dataplane_ready(index).await;
        Self { stack, capture }
    }

    pub fn traffic(&self) -> SocketAddr {
        self.stack.dataplanes[0].traffic
    }

    pub fn pid(&self) -> u32 {
        self.stack.dataplanes[0]
            .process
            .pid()
            .expect("dataplane runs")
    }

    /// Inference requests the capture engine received (not the controller's scrapes).
    pub fn forwarded(&self) -> Vec<Captured> {
        self.capture
            .requests()
            .into_iter()
            .filter(|request| {
                request.path.starts_with("/v1/chat") || request.path == "/v1/completions"
            })
            .collect()
    }

    /// A chat request to the mock engine still gets its 200.
    pub async fn still_serves(&self) {
        let response = self
            .stack
            .post(
                "/v1/chat/completions",
                &[],
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            )
            .await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    }

    /// The dataplane's access log lines (JSON) so far.
    pub fn access_log_lines(&self) -> Vec<serde_json::Value> {
        self.stack.dataplanes[0]
            .process
            .log_text()
            .lines()
            .filter(|line| line.starts_with('{'))
            .map(|line| serde_json::from_str(line).expect("an access log line is JSON"))
            .collect()
    }

    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.stack.dataplanes[0].metrics);
        self.stack.http.get(&url).await.expect("metrics").text()
    }
}

/// What [`CaptureEngine`] received: one entry per request.
#[derive(Debug, Clone)]
pub struct Captured {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An engine that records every request it gets (head and body) and
/// answers each with a small chat completion: to see exactly what the
/// router forwards.
pub struct CaptureEngine {
    pub received: Arc<Mutex<Vec<Captured>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The answer of a [`CaptureEngine`].
pub const CAPTURE_ANSWER: &str = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

impl CaptureEngine {
    /// Listens on `addr` until dropped.
    pub async fn start(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("capture engine binds");
        let received: Arc<Mutex<Vec<Captured>>> = Arc::default();
        let log = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            let log = log.clone();
                            async move {
                                let (head, body) = read_request(request).await;
                                log.lock().push(Captured {
                                    path: head.uri.path().to_owned(),
                                    headers: head.headers,
                                    body,
                                });
                                let mut response = Response::new(Full::new(Bytes::from_static(
                                    CAPTURE_ANSWER.as_bytes(),
                                )));
                                response.headers_mut().insert(
                                    http::header::CONTENT_TYPE,
                                    http::HeaderValue::from_static("application/json"),
                                );
                                Ok::<_, Infallible>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { received, task }
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<Captured> {
        self.received.lock().clone()
    }
}

impl Drop for CaptureEngine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the server did with some raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawOutcome {
    /// The status of every response head received, in order.
    pub statuses: Vec<u16>,
    /// Everything received.
    pub bytes: Vec<u8>,
    /// The server closed (or reset) the connection.
    pub closed: bool,
}

impl RawOutcome {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The first response's status.
    pub fn status(&self) -> Option<u16> {
        self.statuses.first().copied()
    }
}

/// Sends `bytes` on a fresh connection to `addr`, then reads until the
/// server closes it or nothing more arrives for `quiet`.
pub async fn exchange(addr: SocketAddr, bytes: &[u8], quiet: Duration) -> RawOutcome {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // A server that answers before reading everything may reset the rest.
    let _ = stream.write_all(bytes).await;
    read_outcome(&mut stream, quiet).await
}

/// Reads from `stream` until it closes or stays silent for `quiet`.
pub async fn read_outcome(stream: &mut TcpStream, quiet: Duration) -> RawOutcome {
    read_until(stream, 64 * 1024, || clock::now() + quiet, |_| false).await
}

/// Reads until the server closes `stream` or `limit` passes.
pub async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> RawOutcome {
    let deadline = clock::now() + limit;
    read_until(stream, 16 * 1024, || deadline, |_| false).await
}

/// Reads one whole response with a `Content-Length` body (the connection
/// stays open), or until the server closes `stream` or `limit` passes.
pub async fn read_response(stream: &mut TcpStream, limit: Duration) -> RawOutcome {
    let deadline = clock::now() + limit;
    read_until(stream, 16 * 1024, || deadline, response_is_complete).await
}

/// `bytes` hold a response head and as many body bytes as its `Content-Length`.
fn response_is_complete(bytes: &[u8]) -> bool {
    let Some(head_end) = bytes.windows(4).position(|window| window == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    let length = head
        .split("\r\n")
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse::<usize>().ok());
    length.is_some_and(|length| bytes.len() >= head_end + 4 + length)
}

/// An idle-connection flood: `answered` keep-alive connections that each got
/// one `/v1/models` answer (asserted 200 and kept open), then `silent` ones
/// that never send a byte. Both are returned so the caller holds them open.
pub async fn open_idle_flood(
    addr: SocketAddr,
    answered: usize,
    silent: usize,
) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let mut idle = Vec::with_capacity(answered);
    for _ in 0..answered {
        idle.push(connect_and_send(addr, b"GET /v1/models HTTP/1.1\r\nHost: router\r\n\r\n").await);
    }
    for stream in &mut idle {
        let outcome = read_response(stream, WAIT_DEADLINE).await;
        assert_eq!(outcome.status(), Some(200), "{}", outcome.text());
        assert!(!outcome.closed, "kept alive after its answer");
    }
    let mut quiet = Vec::with_capacity(silent);
    for _ in 0..silent {
        quiet.push(TcpStream::connect(addr).await.expect("connect"));
    }
    (idle, quiet)
}

/// Slowloris, first step: `count` connections that each sent a request line
/// and nothing more.
pub async fn open_slowloris(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        streams.push(connect_and_send(addr, b"POST /v1/chat/completions HTTP/1.1\r\n").await);
    }
    streams
}

/// A connection to `addr` that has sent `bytes`.
async fn connect_and_send(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("send");
    stream
}

/// Slowloris: sends one more header byte on every open stream each `pace`
/// until the server has closed them all or `limit` passes; calls `each_round`
/// after every round. Returns how many are still open.
pub async fn trickle_until_closed(
    streams: &mut [TcpStream],
    pace: Duration,
    limit: Duration,
    mut each_round: impl FnMut(),
) -> usize {
    let deadline = clock::now() + limit;
    loop {
        let mut open = 0;
        for stream in streams.iter_mut() {
            if stream.write_all(b"X").await.is_ok()
                && !read_outcome(stream, Duration::from_millis(1)).await.closed
            {
                open += 1;
            }
        }
        each_round();
        if open == 0 || clock::now() >= deadline {
            return open;
        }
        // Pacing, not waiting for a condition: this is how the client is slow.
        clock::sleep(pace).await;
    }
}

/// A slow client's body: sends `body` in pieces of `piece` bytes, each
/// followed by a read of up to `pace` (the pacing), until the server answers
/// or closes; calls `each_piece` after every piece left unanswered. None when
/// a write failed or the whole body went out unanswered.
pub async fn trickle_body(
    stream: &mut TcpStream,
    body: &[u8],
    piece: usize,
    pace: Duration,
    mut each_piece: impl FnMut(),
) -> Option<RawOutcome> {
    for piece in body.chunks(piece) {
        if stream.write_all(piece).await.is_err() {
            return None;
        }
        let outcome = read_outcome(stream, pace).await;
        if !outcome.bytes.is_empty() || outcome.closed {
            return Some(outcome);
        }
        each_piece();
    }
    None
}

/// Reads until `stream` closes, what was received is `complete`, or a read
/// finds nothing by the deadline `next_deadline` gives for it.
async fn read_until(
    stream: &mut TcpStream,
    buffer_len: usize,
    next_deadline: impl Fn() -> clock::Instant,
    complete: impl Fn(&[u8]) -> bool,
) -> RawOutcome {
    let mut received = Vec::new();
    let mut buffer = vec![0u8; buffer_len];
    let closed = loop {
        if complete(&received) {
            break false;
        }
        match clock::timeout_at(next_deadline(), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
            Err(_) => break false,
        }
    };
    RawOutcome {
        statuses: statuses(&received),
        bytes: received,
        closed,
    }
}

/// Statuses of the HTTP/1.1 response heads in `bytes` (lines starting a
/// response: `HTTP/1.x NNN`).
fn statuses(bytes: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(bytes);
    text.split("\r\n")
        .filter_map(|line| line.strip_prefix("HTTP/1."))
        .filter_map(|rest| rest.get(2..5))
        .filter_map(|code| code.parse().ok())
        .collect()
}

/// A POST of `body` to `path` with `Content-Length`, plus `extra` header lines.
pub fn post(path: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// `request` with one more header line (bytes as given, `\r\n` added)
/// at the end of its head.
pub fn with_header_line(mut request: Vec<u8>, line: &[u8]) -> Vec<u8> {
    let end = request
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map_or(request.len(), |at| at + 2);
    let mut inserted = line.to_vec();
    inserted.extend_from_slice(b"\r\n");
    request.splice(end..end, inserted);
    request
}

/// A process's resident memory in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_field(pid, "VmRSS:")
}

fn proc_status_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("no {field} for process {pid}"))
}

/// A process's open file descriptors.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// A process's open descriptors counted by kind, to say which kind grew:
/// TCP sockets by state and by the port that names their role (`ports`
/// names local listening ports and peer ports, e.g. the traffic port and the
/// engines' port), eventfds, epoll instances, pipes, files by path.
pub fn fd_census(pid: u32, ports: &[(u16, &str)]) -> std::collections::BTreeMap<String, usize> {
    // The sockets are read before and after the descriptors: one opened or
    // closed in between is in one of the two reads.
    let mut sockets = tcp_sockets(pid);
    let targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .collect();
    sockets.extend(tcp_sockets(pid));
    // Columns of /proc/PID/net/unix: Num RefCount Protocol Flags Type St Inode Path
    let unix_sockets: std::collections::HashSet<String> =
        std::fs::read_to_string(format!("/proc/{pid}/net/unix"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|line| line.split_whitespace().nth(6))
            .map(|inode| format!("socket:[{inode}]"))
            .collect();
    let own_socket = |target: &str| {
        target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|inode| sockets.get(inode))
    };
    // This process's listening ports: a socket on one of them was accepted.
    let listening: Vec<u16> = targets
        .iter()
        .filter_map(|target| own_socket(target))
        .filter(|socket| socket.state == "LISTEN")
        .map(|socket| socket.local_port)
        .collect();
    let name = |port: u16| {
        ports
            .iter()
            .find(|(known, _)| *known == port)
            .map_or_else(|| format!(":{port}"), |(_, name)| (*name).to_owned())
    };
    let mut census = std::collections::BTreeMap::new();
    for target in &targets {
        let kind = if target.starts_with("socket:") {
            match own_socket(target) {
                Some(socket) if socket.state == "LISTEN" => {
                    format!("tcp listening on {}", name(socket.local_port))
                }
                Some(socket) if listening.contains(&socket.local_port) => format!(
                    "tcp accepted on {} {}",
                    name(socket.local_port),
                    socket.state
                ),
                Some(socket) => format!(
                    "tcp connected to {} {}",
                    name(socket.remote_port),
                    socket.state
                ),
                None if unix_sockets.contains(target.as_str()) => "unix socket".to_owned(),
                // A TCP socket is listed only once it binds or connects.
                None => "socket not yet connected, or not TCP".to_owned(),
            }
        } else if let Some(anon) = target.strip_prefix("anon_inode:") {
            anon.trim_matches(|c| c == '[' || c == ']').to_owned()
        } else if target.starts_with("pipe:") {
            "pipe".to_owned()
        } else {
            format!("file {target}")
        };
        *census.entry(kind).or_default() += 1;
    }
    census
}

struct TcpSocket {
    state: &'static str,
    local_port: u16,
    remote_port: u16,
    /// Bytes received and not yet read by the process.
    unread: u64,
}

/// Connections a process accepted on one of its ports, as the kernel sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Open descriptors of connections accepted on the port.
    pub connections: usize,
    /// Bytes those connections received that the process has not read yet.
    pub unread_bytes: u64,
}

/// The connections `pid` holds that were accepted on `port` (the local port
/// of a socket of its own that is not the listener).
pub fn accepted_on(pid: u32, port: u16) -> Accepted {
    let sockets = tcp_sockets(pid);
    let mut accepted = Accepted::default();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return accepted;
    };
    for entry in dir.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let socket = target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|inode| sockets.get(inode));
        if let Some(socket) = socket
            && socket.local_port == port
            && socket.state != "LISTEN"
        {
            accepted.connections += 1;
            accepted.unread_bytes += socket.unread;
        }
    }
    accepted
}

/// The TCP sockets of `pid`'s network namespace by inode
/// (`/proc/PID/net/tcp` and `tcp6`).
fn tcp_sockets(pid: u32) -> std::collections::HashMap<String, TcpSocket> {
    const STATES: [&str; 12] = [
        "?",
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
    ];
    let port = |address: &str| {
        address
            .rsplit(':')
            .next()
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())
            .unwrap_or_default()
    };
    let mut sockets = std::collections::HashMap::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        // Columns: sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
        for line in text.lines().skip(1) {
            let columns: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state), Some(queues), Some(inode)) = (
                columns.get(1),
                columns.get(2),
                columns.get(3),
                columns.get(4),
                columns.get(9),
            ) else {
                continue;
            };
            let unread = queues
                .split_once(':')
                .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
                .unwrap_or_default();
            let state = usize::from_str_radix(state, 16)
                .ok()
                .and_then(|index| STATES.get(index))
                .copied()
                .unwrap_or("?");
            sockets.insert(
                (*inode).to_owned(),
                TcpSocket {
                    state,
                    local_port: port(local),
                    remote_port: port(remote),
                    unread,
                },
            );
        }
    }
    sockets
}

/// How long a process's RSS must go without falling by 1 MiB
/// to count as settled: longer than the dataplane's allocator takes to give
/// freed memory back (jemalloc, with background threads, purges freed pages
/// over its `dirty_decay_ms`, 1 s as `.cargo/config.toml` builds it), so what
/// is still resident then is held.
pub const SETTLE_QUIET: Duration = Duration::from_secs(12);
/// A fall in RSS this large means the allocator is still returning memory.
const SETTLE_STEP_KIB: u64 = 1024;
/// How often RSS is sampled while it settles.
const SETTLE_POLL: Duration = Duration::from_millis(250);

/// `pid`'s RSS once it has settled (see [`SETTLE_QUIET`]), or the last
/// value seen after `limit` (the caller asserts).
pub async fn rss_settled(pid: u32, limit: Duration) -> u64 {
    let deadline = clock::now() + limit;
    let mut low = rss_kib(pid);
    let mut last_fall = clock::now();
    loop {
        clock::sleep(SETTLE_POLL).await;
        let rss = rss_kib(pid);
        if rss + SETTLE_STEP_KIB <= low {
            low = rss;
            last_fall = clock::now();
        }
        if last_fall.elapsed() >= SETTLE_QUIET || clock::now() >= deadline {
            return rss;
        }
    }
}

/// Set (by `make test-faults`) when the figures are collected: the fast
/// probes then report settled memory too.
pub const FIGURES_ENV: &str = "SWITCHYARD_FIGURES";

/// The *after* memory of a probe's figure: settled ([`rss_settled`]) when
/// [`FIGURES_ENV`] is set, else the reading now (`make test` prints no
/// figures, so it does not wait [`SETTLE_QUIET`] per probe for one).
pub async fn rss_after(pid: u32) -> u64 {
    if std::env::var_os(FIGURES_ENV).is_some() {
        rss_settled(pid, Duration::from_secs(60)).await
    } else {
        rss_kib(pid)
    }
}

/// One line of the measured figures (`make test-faults` prints them for
/// the README's table): probe, outcome, RSS before, at the peak (when
/// sampled), after.
pub fn report_figure(
    probe: &str,
    outcome: &str,
    before_kib: u64,
    peak_kib: Option<u64>,
    after_kib: u64,
) {
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    println!(
        "FIGURE | {probe} | {outcome} | {} | {} | {} |",
        mib(before_kib),
        peak_kib.map_or_else(|| "—".to_owned(), mib),
        mib(after_kib)
    );
}

/// HTTP/2 frames written by hand: what an abusive client sends and a client
/// library refuses to.
pub mod h2 {
    /// The client connection preface and an empty SETTINGS frame.
    pub fn preface() -> Vec<u8> {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
        bytes
    }

    pub const FRAME_DATA: u8 = 0x0;
    pub const FRAME_HEADERS: u8 = 0x1;
    pub const FRAME_RST_STREAM: u8 = 0x3;
    pub const FRAME_SETTINGS: u8 = 0x4;
    pub const FRAME_GOAWAY: u8 = 0x7;
    pub const FRAME_CONTINUATION: u8 = 0x9;
    pub const FLAG_END_STREAM: u8 = 0x1;
    pub const FLAG_END_HEADERS: u8 = 0x4;

    /// One frame.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let length = payload.len() as u32;
        let mut bytes = Vec::with_capacity(9 + payload.len());
        bytes.extend_from_slice(&length.to_be_bytes()[1..]);
        bytes.push(kind);
        bytes.push(flags);
        bytes.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    /// A rapid-reset burst: `streams` chat requests, each cancelled with
    /// RST_STREAM (CANCEL) right after its HEADERS.
    pub fn rapid_reset_burst(streams: u32) -> Vec<u8> {
        let mut burst = Vec::new();
        for i in 0..streams {
            let id = 2 * i + 1;
            burst.extend(frame(
                FRAME_HEADERS,
                FLAG_END_HEADERS,
                id,
                &post_chat_block(),
            ));
            burst.extend(frame(FRAME_RST_STREAM, 0, id, &8u32.to_be_bytes()));
        }
        burst
    }

    /// HPACK for `POST /v1/chat/completions` over http to `router`, with a
    /// JSON content type: static-table indexes and literals without indexing.
    pub fn post_chat_block() -> Vec<u8> {
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
        block.extend(literal(4, b"/v1/chat/completions")); // :path
        block.extend(literal(1, b"router")); // :authority
        block.extend(literal(31, b"application/json")); // content-type
        block
    }

    /// A literal header field without indexing, its name from the static
    /// table (a 4-bit prefixed index, then a 7-bit prefixed length).
    pub fn literal(name_index: u8, value: &[u8]) -> Vec<u8> {
        assert!(name_index < 15 + 127 && value.len() < 127);
        let mut bytes = if name_index < 15 {
            vec![name_index]
        } else {
            vec![0x0f, name_index - 15]
        };
        bytes.push(value.len() as u8);
        bytes.extend_from_slice(value);
        bytes
    }

    /// A literal header field without indexing with a new name.
    pub fn literal_new_name(name: &[u8], value: &[u8]) -> Vec<u8> {
        assert!(name.len() < 127 && value.len() < 127);
        let mut bytes = vec![0x00, name.len() as u8];
        bytes.extend_from_slice(name);
        bytes.push(value.len() as u8);
        bytes.extend_from_slice(value);
        bytes
    }

    /// The kinds of the frames in `bytes` (whole frames only).
    pub fn frame_kinds(bytes: &[u8]) -> Vec<u8> {
        let mut kinds = Vec::new();
        let mut at = 0;
        while at + 9 <= bytes.len() {
            let length = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
            kinds.push(bytes[at + 3]);
            at += 9 + length;
        }
        kinds
    }
}
