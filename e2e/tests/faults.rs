//! Hostile clients at scale against the real dataplane on loopback: floods,
//! parked and slow bodies, slowloris, huge fields. Slow (seconds to a
//! minute each), so not part of `make test`: `make test-faults` runs them
//! one at a time (memory is measured) and prints a `FIGURE` line per probe,
//! the README's "Failure behaviour" table.
//!
//! Memory bounds are generous (a busy machine must not make them flake):
//! they catch growth by tens of megabytes per client, not noise.

use std::time::Duration;

use http::StatusCode;
use switchyard_e2e::harness::{WAIT_DEADLINE, wait_for};
use switchyard_e2e::hostile::{
    HostileStack, accepted_on, exchange, h2, open_idle_flood, open_slowloris, post, read_outcome,
    read_until_closed, report_figure, rss_kib, rss_settled, trickle_body, trickle_until_closed,
    with_header_line,
};
use switchyard_runtime::clock;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MIB: u64 = 1024;

/// How long memory may take to settle once a probe's clients are gone (the
/// allocator returns freed memory within its 10 s decay; see `rss_settled`).
const RETURN_DEADLINE: Duration = Duration::from_secs(60);

/// Memory a probe may leave behind once RSS has settled: what the allocator
/// and runtime keep for themselves (5.3 MiB after the 5,500-connection
/// flood, about 1 KiB per connection), never the clients' bytes (a 30 MiB
/// body is several times this).
const LEFT_BEHIND: u64 = 16 * MIB;

/// A hostile stack whose dataplane's memory was measured before the probe.
struct Probed {
    hostile: HostileStack,
    before: u64,
}

impl Probed {
    async fn start(dataplane_args: &[&str]) -> Self {
        let hostile = HostileStack::start(dataplane_args).await;
        let before = rss_kib(hostile.pid());
        Self { hostile, before }
    }

    /// The dataplane's resident memory now, in KiB.
    fn rss(&self) -> u64 {
        rss_kib(self.hostile.pid())
    }

    /// Asserts that memory returns once the probe's clients are gone (RSS
    /// settled: the allocator has given back what it will), prints
    /// the probe's figure and checks that the dataplane still serves.
    async fn finish(&self, probe: &str, outcome: &str, peak: u64) {
        let before = self.before;
        let after = rss_settled(self.hostile.pid(), RETURN_DEADLINE).await;
        assert!(
            after <= before + LEFT_BEHIND,
            "memory returns: {before} KiB before, {after} KiB after"
        );
        report_figure(probe, outcome, before, Some(peak), after);
        self.hostile.still_serves().await;
    }
}

impl std::ops::Deref for Probed {
    type Target = HostileStack;

    fn deref(&self) -> &HostileStack {
        &self.hostile
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: make test-faults"]
async fn an_idle_connection_flood_is_held_cheaply_and_returned() {
    let hostile = Probed::start(&[]).await;
    let (idle, silent) = open_idle_flood(hostile.traffic(), 5_000, 500).await;
    let pid = hostile.pid();
    let port = hostile.traffic().port();
    wait_for("the dataplane to accept all 5,500 connections", || async {
        (accepted_on(pid, port).connections >= 5_500).then_some(())
    })
    .await;
    let peak = hostile.rss();
    assert!(
        peak < hostile.before + 250 * MIB,
        "5,500 connections: {} -> {peak} KiB",
        hostile.before
    );
    hostile.still_serves().await;
    drop(idle);
    drop(silent);
    hostile
        .finish(
            "5,000 idle keep-alive + 500 silent connections",
            "held (idle timeout 60 s); memory returned after they close",
            peak,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: make test-faults"]
async fn connections_over_the_limit_are_refused_at_scale() {
    let hostile = Probed::start(&["--max-connections", "1000"]).await;
    let mut streams = Vec::new();
    for _ in 0..1_500 {
        streams.push(
            TcpStream::connect(hostile.traffic())
                .await
                .expect("connect"),
        );
    }
    let mut refused = 0;
    for stream in &mut streams {
        let outcome = read_outcome(stream, Duration::from_millis(20)).await;
        if outcome.closed {
            assert_eq!(outcome.statuses, [503], "{}", outcome.text());
            refused += 1;
        }
    }
    assert!(
        refused >= 500,
        "{refused} of 1,500 refused at a limit of 1,000"
    );
    let peak = hostile.rss();
    drop(streams);
    hostile
        .finish(
            "1,500 connections, --max-connections 1000",
            &format!("{refused} answered 503 too_many_connections and closed"),
            peak,
        )
        .await;
}

/// A request head declaring a `size`-byte chat body for `cap`, and the body.
fn declared_body(size: usize) -> (Vec<u8>, Vec<u8>) {
    let prefix = br#"{"model":"cap","pad":""#;
    let mut body = prefix.to_vec();
    body.resize(size - 2, b'p');
    body.extend_from_slice(br#""}"#);
    let request = post("/v1/chat/completions", "", &body);
    let head_len = request.len() - body.len();
    (request[..head_len].to_vec(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: make test-faults"]
async fn parked_bodies_hold_at_most_the_budget() {
    let hostile = Probed::start(&[]).await;
    let size = 31 << 20;
    let (head, body) = declared_body(size);
    let mut parked = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        let mut stream = TcpStream::connect(hostile.traffic())
            .await
            .expect("connect");
        stream.write_all(&head).await.expect("head");
        // A refusal comes right after the head: the declared length does not fit.
        let early = read_outcome(&mut stream, Duration::from_millis(300)).await;
        if early.status() == Some(503) {
            assert!(early.text().contains("retry-after: 1"), "{}", early.text());
            refused += 1;
            continue;
        }
        // All but the last byte, then silence.
        stream
            .write_all(&body[..size - 1])
            .await
            .expect("body accepted");
        parked.push(stream);
    }
    // Written is not read: wait until the dataplane has read every byte the
    // parked connections sent, so the peak counts them.
    let pid = hostile.pid();
    let port = hostile.traffic().port();
    wait_for("the dataplane to read the parked bodies", || async {
        let accepted = accepted_on(pid, port);
        (accepted.connections >= parked.len() && accepted.unread_bytes == 0).then_some(())
    })
    .await;
    let peak = hostile.rss();
    assert!(
        parked.len() <= 8,
        "a 256 MiB budget holds at most 8 bodies of 31 MiB, not {}",
        parked.len()
    );
    assert!(refused >= 12, "{refused} refused with 503");
    assert!(
        peak < hostile.before + 330 * MIB,
        "20 parked 31 MiB bodies: {} -> {peak} KiB",
        hostile.before
    );
    hostile.still_serves().await;
    drop(parked);
    hostile
        .finish(
            "20 bodies of 31 MiB, all but the last byte sent",
            &format!(
                "{} held within the 256 MiB budget, {refused} answered 503 + Retry-After",
                20 - refused
            ),
            peak,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: make test-faults"]
async fn a_slow_large_body_is_cut_at_the_minimum_rate() {
    let hostile = Probed::start(&[]).await;
    let size = 31 << 20;
    let (head, body) = declared_body(size);
    let mut stream = TcpStream::connect(hostile.traffic())
        .await
        .expect("connect");
    stream.write_all(&head).await.expect("head");
    let started = clock::now();
    // 10 KB/s: 1 KB every 100 ms, until the router answers.
    let answer = trickle_body(&mut stream, &body, 1000, Duration::from_millis(100), || {
        assert!(started.elapsed() < WAIT_DEADLINE, "never cut");
    })
    .await;
    let elapsed = started.elapsed();
    let answer = answer.expect("the router answered");
    assert_eq!(answer.status(), Some(408), "{}", answer.text());
    assert!(
        elapsed >= Duration::from_secs(10),
        "the grace is honoured: {elapsed:?}"
    );
    let peak = hostile.rss();
    hostile
        .finish(
            "a 31 MiB body sent at 10 KB/s",
            &format!("408 request_timeout after {:.1} s", elapsed.as_secs_f64()),
            peak,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: make test-faults"]
async fn slowloris_headers_are_cut_at_the_idle_timeout() {
    let hostile = Probed::start(&["--idle-timeout", "5s"]).await;
    let mut streams = open_slowloris(hostile.traffic(), 500).await;
    let started = clock::now();
    let mut peak = hostile.rss();
    let open = trickle_until_closed(
        &mut streams,
        Duration::from_millis(500),
        WAIT_DEADLINE,
        || peak = peak.max(hostile.rss()),
    )
    .await;
    assert_eq!(open, 0, "every slowloris connection is closed");
    let elapsed = started.elapsed();
    drop(streams);
    hostile
        .finish(
            "500 slowloris connections (a header byte every 0.5 s), --idle-timeout 5s",
            &format!("all closed within {:.1} s", elapsed.as_secs_f64()),
            peak,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: make test-faults"]
async fn a_30_mib_model_name_is_refused_without_an_echo() {
    let hostile = Probed::start(&[]).await;
    let body = format!(r#"{{"model":"{}"}}"#, "x".repeat(30 << 20));
    let outcome = exchange(
        hostile.traffic(),
        &post("/v1/chat/completions", "", body.as_bytes()),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(outcome.status(), Some(400), "{}", outcome.text());
    assert!(
        outcome.bytes.len() < 1024,
        "answer of {} bytes",
        outcome.bytes.len()
    );
    let peak = hostile.rss();
    let lines = wait_for("its access log line", || async {
        let lines = hostile.access_log_lines();
        (!lines.is_empty()).then_some(lines)
    })
    .await;
    let longest = lines.iter().map(|line| line.to_string().len()).max();
    assert!(longest < Some(4096), "access log line of {longest:?} bytes");
    hostile
        .finish(
            "a 30 MiB `model`",
            &format!(
                "400 invalid_model, {}-byte answer, {}-byte access log line",
                outcome.bytes.len(),
                longest.unwrap_or_default()
            ),
            peak,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: make test-faults"]
async fn long_request_ids_leave_nothing_behind() {
    let hostile = Probed::start(&[]).await;
    let mut line = b"X-Request-Id: ".to_vec();
    line.extend(std::iter::repeat_n(b'r', 60_000));
    let request = with_header_line(
        post(
            "/v1/chat/completions",
            "",
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        ),
        &line,
    );
    let mut peak = hostile.before;
    for _ in 0..300 {
        let outcome = exchange(hostile.traffic(), &request, Duration::from_millis(300)).await;
        assert_eq!(outcome.status(), Some(200), "{}", outcome.text());
        assert!(!outcome.text().contains("rrrrrrrr"), "never echoed");
        peak = peak.max(hostile.rss());
    }
    let mut too_long = b"X-Request-Id: ".to_vec();
    too_long.extend(std::iter::repeat_n(b'r', 200_000));
    let refused = exchange(
        hostile.traffic(),
        &with_header_line(post("/v1/chat/completions", "", b"{}"), &too_long),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(refused.status(), Some(431), "beyond the 64 KiB head limit");
    hostile
        .finish(
            "300 requests with a 60 KB x-request-id (200 KB: 431)",
            "each replaced by a generated id (logged); nothing retained",
            peak,
        )
        .await;
    let response = hostile
        .stack
        .post(
            "/v1/chat/completions",
            &[("x-request-id", "fine-1")],
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("x-request-id"), Some("fine-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: make test-faults"]
async fn the_fast_probes_leave_memory_where_it_was() {
    // The h2 floods and slow-body probes of `hostile_clients.rs` at ten times
    // the volume, for a memory figure.
    let hostile = Probed::start(&[]).await;
    let mut peak = hostile.before;
    for _ in 0..10 {
        let mut stream = TcpStream::connect(hostile.traffic())
            .await
            .expect("connect");
        let mut burst = h2::preface();
        burst.extend(h2::rapid_reset_burst(10_000));
        let _ = stream.write_all(&burst).await;
        assert!(read_until_closed(&mut stream, WAIT_DEADLINE).await.closed);
        peak = peak.max(hostile.rss());
    }
    hostile
        .finish(
            "10 HTTP/2 rapid-reset connections (10,000 streams each)",
            "GOAWAY ENHANCE_YOUR_CALM, connection closed",
            peak,
        )
        .await;
}
