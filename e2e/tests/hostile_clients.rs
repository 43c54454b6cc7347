//! Hostile clients against the real dataplane on loopback, the fast probes
//! (`make test`; the slow ones are in `faults.rs`, `make test-faults`): each
//! asserts what the router does (status, connection closed, what reaches the
//! engine, memory) and that it keeps serving afterwards.

use std::time::Duration;

use http::StatusCode;
use switchyard_e2e::harness::{ENGINE_PORT, WAIT_DEADLINE, wait_for};
use switchyard_e2e::hostile::{
    HostileStack, RawOutcome, accepted_on, exchange, h2, open_fds, open_idle_flood, open_slowloris,
    post, read_outcome, read_until_closed, report_figure, rss_after, rss_kib, trickle_body,
    trickle_until_closed, with_header_line,
};
use switchyard_runtime::clock;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long a probe waits for more bytes once the server has gone quiet.
const QUIET: Duration = Duration::from_millis(500);

const CHAT_CAP: &[u8] = br#"{"model":"cap","messages":[]}"#;

/// A raw probe and what it must get.
struct Probe {
    name: &'static str,
    bytes: Vec<u8>,
    status: u16,
    closes: bool,
}

fn probe(name: &'static str, bytes: impl Into<Vec<u8>>, status: u16, closes: bool) -> Probe {
    Probe {
        name,
        bytes: bytes.into(),
        status,
        closes,
    }
}

async fn run_probes(hostile: &HostileStack, probes: Vec<Probe>) {
    for probe in probes {
        let outcome = exchange(hostile.traffic(), &probe.bytes, QUIET).await;
        assert_eq!(
            outcome.statuses,
            [probe.status],
            "{}: exactly one response: {}",
            probe.name,
            outcome.text()
        );
        if probe.closes {
            assert!(outcome.closed, "{}: the connection is closed", probe.name);
        }
    }
}

fn head(request_line: &str, headers: &str) -> String {
    format!("{request_line}\r\nHost: router\r\n{headers}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_variants_are_refused_and_nothing_is_smuggled() {
    let hostile = HostileStack::start(&[]).await;
    let before = rss_kib(hostile.pid());
    let post_line = "POST /v1/chat/completions HTTP/1.1";
    let smuggled = "GET /v1/models HTTP/1.1\r\nHost: router\r\n\r\n";
    let chunked_body = format!(
        "{:x}\r\n{}\r\n0\r\n\r\n",
        CHAT_CAP.len(),
        std::str::from_utf8(CHAT_CAP).expect("ASCII")
    );
    let with_body = |headers: &str, body: &str| format!("{}{body}", head(post_line, headers));
    let probes = vec![
        // Transfer-Encoding wins over Content-Length, and the connection is
        // closed after the response, so the bytes past the chunked body are
        // never read as a second request.
        probe(
            "Content-Length with Transfer-Encoding",
            with_body(
                "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                &format!("{chunked_body}{smuggled}"),
            ),
            200,
            true,
        ),
        probe(
            "two different Content-Lengths",
            with_body("Content-Length: 29\r\nContent-Length: 30\r\n", "{}"),
            400,
            true,
        ),
        probe(
            "a Content-Length list",
            with_body("Content-Length: 29, 30\r\n", "{}"),
            400,
            true,
        ),
        probe(
            "a negative Content-Length",
            with_body("Content-Length: -1\r\n", "{}"),
            400,
            true,
        ),
        probe(
            "a signed Content-Length",
            with_body("Content-Length: +29\r\n", "{}"),
            400,
            true,
        ),
        probe(
            "a hex Content-Length",
            with_body("Content-Length: 0x1d\r\n", "{}"),
            400,
            true,
        ),
        probe(
            "Transfer-Encoding: xchunked",
            with_body("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"),
            400,
            true,
        ),
        probe(
            "Transfer-Encoding: chunked, identity",
            with_body("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"),
            400,
            true,
        ),
        probe(
            "two Transfer-Encodings",
            with_body(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
                "0\r\n\r\n",
            ),
            400,
            true,
        ),
        probe(
            "a space before the colon",
            with_body("Transfer-Encoding : chunked\r\n", "0\r\n\r\n"),
            400,
            true,
        ),
        probe(
            "Transfer-Encoding on HTTP/1.0",
            format!(
                "{}0\r\n\r\n",
                head(
                    "POST /v1/chat/completions HTTP/1.0",
                    "Transfer-Encoding: chunked\r\n"
                )
            ),
            400,
            true,
        ),
        probe(
            "an obs-fold continuation line",
            with_body("X-A: a\r\n b\r\nContent-Length: 2\r\n", "{}"),
            400,
            true,
        ),
        probe(
            "NUL in a header value",
            with_body("X-A: a\0b\r\nContent-Length: 2\r\n", "{}"),
            400,
            true,
        ),
        probe(
            "NUL in a header name",
            with_body("X-\0A: b\r\nContent-Length: 2\r\n", "{}"),
            400,
            true,
        ),
        probe(
            "an overflowing chunk size",
            with_body(
                "Transfer-Encoding: chunked\r\n",
                "ffffffffffffffffffff\r\n{}\r\n0\r\n\r\n",
            ),
            400,
            true,
        ),
    ];
    run_probes(&hostile, probes).await;
    let forwarded = hostile.forwarded();
    assert_eq!(
        forwarded.len(),
        1,
        "only the chunked request reached the engine"
    );
    assert_eq!(forwarded[0].body, CHAT_CAP);
    hostile.still_serves().await;
    report_figure(
        "smuggling: CL+TE, duplicate/list/signed/hex Content-Length, obfuscated Transfer-Encoding, obs-fold, NUL, chunk-size overflow",
        "400 and closed (CL+TE: chunked wins, then closed; nothing smuggled)",
        before,
        None,
        rss_after(hostile.pid()).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_and_odd_request_targets() {
    let hostile = HostileStack::start(&[]).await;
    let before = rss_kib(hostile.pid());
    let mut name_not_utf8 =
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nX-\xc3\xa9: a\r\n".to_vec();
    name_not_utf8.extend(b"Content-Length: 2\r\n\r\n{}");
    let path_not_utf8 =
        b"POST /v1/\xff\xfe HTTP/1.1\r\nHost: router\r\nContent-Length: 2\r\n\r\n{}".to_vec();
    run_probes(
        &hostile,
        vec![
            probe("a non-ASCII header name", name_not_utf8, 400, true),
            probe("a path that is not UTF-8", path_not_utf8, 400, true),
            // No tunnel: CONNECT and OPTIONS * are requests for unknown paths.
            probe(
                "CONNECT",
                head("CONNECT evil.example:443 HTTP/1.1", ""),
                404,
                false,
            ),
            probe("OPTIONS *", head("OPTIONS * HTTP/1.1", ""), 404, false),
        ],
    )
    .await;
    // A header value that is not UTF-8 (obs-text) is legal HTTP and passes
    // to the engine byte for byte.
    let obs_text_bytes = with_header_line(
        post("/v1/chat/completions", "", CHAT_CAP),
        b"X-Note: caf\xe9",
    );
    let outcome = exchange(hostile.traffic(), &obs_text_bytes, QUIET).await;
    assert_eq!(outcome.status(), Some(200), "{}", outcome.text());
    // Absolute form: routed by its path to the chosen pod, with the pod's
    // own Host; never sent to the authority the client named.
    let absolute = post("http://evil.example/v1/chat/completions", "", CHAT_CAP);
    let outcome = exchange(hostile.traffic(), &absolute, QUIET).await;
    assert_eq!(outcome.status(), Some(200), "{}", outcome.text());
    // CONNECT opens no tunnel: what follows it on the connection is read
    // as HTTP again (and routed), never relayed to the named authority.
    let mut stream = TcpStream::connect(hostile.traffic())
        .await
        .expect("connect");
    let mut pipelined = head("CONNECT evil.example:443 HTTP/1.1", "").into_bytes();
    pipelined.extend(post("/v1/chat/completions", "", CHAT_CAP));
    stream.write_all(&pipelined).await.expect("write");
    let outcome = read_outcome(&mut stream, QUIET).await;
    assert_eq!(outcome.status(), Some(404), "{}", outcome.text());
    let forwarded = hostile.forwarded();
    assert!(forwarded.len() >= 2, "obs-text and absolute form");
    for request in &forwarded {
        assert_eq!(request.path, "/v1/chat/completions");
        assert_eq!(request.body, CHAT_CAP, "whole requests, no tunnelled bytes");
    }
    assert_eq!(forwarded[0].headers["x-note"].as_bytes(), b"caf\xe9");
    let pod = format!("{}:{ENGINE_PORT}", hostile.stack.ip(12));
    for request in &forwarded[1..] {
        assert_eq!(
            request.headers["host"],
            pod.as_str(),
            "the pod's authority, not evil.example"
        );
    }
    hostile.still_serves().await;
    report_figure(
        "non-UTF-8 header name / path; obs-text value; absolute-form; CONNECT; OPTIONS *",
        "400 + closed / forwarded byte for byte / routed to the pod with its Host / 404, no tunnel",
        before,
        None,
        rss_after(hostile.pid()).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_numerous_headers_get_431() {
    let hostile = HostileStack::start(&[]).await;
    let before = rss_kib(hostile.pid());
    let huge = format!("X-Big: {}\r\n", "a".repeat(100_000));
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let large_but_fine = format!("X-Big: {}\r\n", "a".repeat(48_000));
    run_probes(
        &hostile,
        vec![
            probe(
                "a 100 KB header",
                post("/v1/chat/completions", &huge, CHAT_CAP),
                431,
                true,
            ),
            probe(
                "200 headers",
                post("/v1/chat/completions", &many, CHAT_CAP),
                431,
                true,
            ),
            probe(
                "a 48 KB header",
                post("/v1/chat/completions", &large_but_fine, CHAT_CAP),
                200,
                false,
            ),
        ],
    )
    .await;
    hostile.still_serves().await;
    report_figure(
        "a 100 KB header; 200 headers",
        "431 and closed (64 KiB head, 100 headers)",
        before,
        None,
        rss_after(hostile.pid()).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_credentials_are_consumed_and_engine_credentials_pass_without_authentication() {
    let hostile = HostileStack::start(&[]).await;
    let headers = [
        ("authorization", "Bearer engine-key"),
        ("cookie", "session=s"),
        ("x-api-key", "key-1"),
        ("proxy-authorization", "Basic cHJveHk6c2VjcmV0"),
    ];
    let response = hostile
        .stack
        .post(
            "/v1/chat/completions",
            &headers,
            std::str::from_utf8(CHAT_CAP).expect("ASCII"),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    let forwarded = hostile.forwarded();
    let sent = &forwarded[0].headers;
    assert!(
        !sent.contains_key("proxy-authorization"),
        "addressed to the router: consumed"
    );
    assert_eq!(sent["authorization"], "Bearer engine-key");
    assert_eq!(sent["cookie"], "session=s");
    assert_eq!(sent["x-api-key"], "key-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_model_values_are_refused_or_quoted_within_bounds() {
    let hostile = HostileStack::start(&[]).await;
    let before = rss_kib(hostile.pid());
    // Series appear on first use: one success and one refusal of each kind
    // first, so what follows may add none per model.
    hostile.still_serves().await;
    for (body, status) in [
        (r#"{"model":"warm-up"}"#, StatusCode::NOT_FOUND),
        (r#"{"model":1}"#, StatusCode::BAD_REQUEST),
    ] {
        let response = hostile.stack.post("/v1/chat/completions", &[], body).await;
        assert_eq!(response.status, status, "{body}");
    }
    let metrics_before = hostile.metrics().await;
    let long = "x".repeat(2 << 20);
    let response = hostile
        .stack
        .post(
            "/v1/chat/completions",
            &[],
            &format!(r#"{{"model":"{long}"}}"#),
        )
        .await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert_eq!(response.json()["error"]["code"], "invalid_model");
    assert!(
        response.body.len() < 1024,
        "not echoed: {} bytes",
        response.body.len()
    );
    // A long name within the limit, with controls and quotes: escaped and cut.
    let nasty = format!("{}\n\"}}\u{1b}[31m", "y".repeat(1000));
    let body = serde_json::json!({ "model": nasty }).to_string();
    let response = hostile.stack.post("/v1/chat/completions", &[], &body).await;
    assert_eq!(response.status, StatusCode::NOT_FOUND);
    let message = response.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("route not found") && message.len() < 300,
        "{message}"
    );
    assert!(
        !message.contains('\n') && !message.contains('\u{1b}'),
        "{message}"
    );
    for model in [r#"{"a":1}"#, "[1,2]", "1e999", "true"] {
        let response = hostile
            .stack
            .post(
                "/v1/chat/completions",
                &[],
                &format!(r#"{{"model":{model}}}"#),
            )
            .await;
        assert_eq!(response.status, StatusCode::BAD_REQUEST, "{model}");
    }
    hostile.still_serves().await;
    // Neither metrics nor the access log keep the client's bytes.
    let metrics = hostile.metrics().await;
    assert!(!metrics.contains("yyyy") && !metrics.contains("xxxx"));
    let new_series: Vec<&str> = metrics
        .lines()
        .filter(|line| {
            !line.starts_with('#')
                && !metrics_before.contains(line.split(' ').next().unwrap_or(line))
        })
        .collect();
    assert!(
        new_series.len() <= 40,
        "no series per hostile model: {new_series:#?}"
    );
    let lines = wait_for_access_lines(&hostile, 9).await;
    for line in &lines {
        assert!(
            line.to_string().len() < 4096,
            "bounded line: {} bytes",
            line.to_string().len()
        );
    }
    report_figure(
        "a 2 MiB `model`; control characters and quotes in `model`; non-string `model`",
        "400 without echo / 404 quoting an escaped 128-byte prefix / 400; no metric series",
        before,
        None,
        rss_after(hostile.pid()).await,
    );
}

async fn wait_for_access_lines(hostile: &HostileStack, count: usize) -> Vec<serde_json::Value> {
    wait_for("access log lines", || async {
        let lines = hostile.access_log_lines();
        (lines.len() >= count).then_some(lines)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_and_binary_request_ids_are_replaced_by_generated_ones() {
    let hostile = HostileStack::start(&[]).await;
    let before = rss_kib(hostile.pid());
    let long = "r".repeat(60_000);
    let cases: [(&str, Vec<u8>, bool); 4] = [
        ("kept", b"client-id-1".to_vec(), true),
        ("60 KB", long.into_bytes(), false),
        ("with a space", b"id with space".to_vec(), false),
        ("Latin-1", b"caf\xe9".to_vec(), false),
    ];
    for (name, id, kept) in cases {
        let mut line = b"X-Request-Id: ".to_vec();
        line.extend_from_slice(&id);
        let request = with_header_line(post("/v1/chat/completions", "", CHAT_CAP), &line);
        let outcome: RawOutcome = exchange(hostile.traffic(), &request, QUIET).await;
        assert_eq!(outcome.status(), Some(200), "{name}");
        let text = outcome.text();
        let echoed = text
            .lines()
            .find_map(|line| line.strip_prefix("x-request-id: "))
            .unwrap_or_default()
            .trim()
            .to_owned();
        if kept {
            assert_eq!(echoed.as_bytes(), id.as_slice(), "{name}");
        } else {
            assert_eq!(echoed.len(), 36, "{name}: a generated id: {echoed}");
        }
        let sent = hostile.forwarded().pop().expect("forwarded");
        assert_eq!(
            sent.headers["x-request-id"],
            echoed.as_str(),
            "{name}: the engine got the same id"
        );
    }
    let decisions_url = format!(
        "http://{}/debug/routing/decisions",
        hostile.stack.dataplanes[0].debug
    );
    let decisions = hostile
        .stack
        .http
        .get(&decisions_url)
        .await
        .expect("decisions")
        .json();
    let decisions = decisions["decisions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!decisions.is_empty());
    for decision in decisions {
        let id = decision["requestId"].as_str().unwrap_or_default();
        assert!(id.len() <= 128, "the decision ring keeps bounded ids");
    }
    assert!(
        hostile.stack.dataplanes[0]
            .process
            .log_text()
            .contains("x-request-id replaced"),
        "a replacement is logged"
    );
    report_figure(
        "x-request-id of 60 KB, with spaces, Latin-1",
        "replaced by a generated id, logged; ids in the decision ring ≤ 128 bytes",
        before,
        None,
        rss_after(hostile.pid()).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_and_wide_json_bodies_are_handled_without_harm() {
    let hostile = HostileStack::start(&[]).await;
    let before = rss_kib(hostile.pid());
    // The router reads `model` and skips the rest without recursing: a body
    // nested 200,000 deep is valid JSON and reaches the engine, which judges
    // it (vLLM refuses it with 400).
    let nesting = "[".repeat(200_000) + &"]".repeat(200_000);
    let deep = format!(r#"{{"model":"cap","x":{nesting}}}"#);
    let response = hostile.stack.post("/v1/chat/completions", &[], &deep).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let nested_model = format!(r#"{{"model":{nesting}}}"#);
    let response = hostile
        .stack
        .post("/v1/chat/completions", &[], &nested_model)
        .await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert_eq!(response.json()["error"]["code"], "invalid_model");
    let fields: Vec<String> = (0..200_000).map(|i| format!(r#""k{i}":{i}"#)).collect();
    let wide = format!(r#"{{"model":"cap",{}}}"#, fields.join(","));
    let response = hostile.stack.post("/v1/chat/completions", &[], &wide).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let forwarded = hostile.forwarded();
    assert_eq!(forwarded.len(), 2);
    assert_eq!(forwarded[0].body.len(), deep.len(), "forwarded as sent");
    assert_eq!(forwarded[1].body.len(), wide.len(), "forwarded as sent");
    hostile.still_serves().await;
    report_figure(
        "JSON nested 200,000 deep; an object of 200,000 fields",
        "skipped without recursion and forwarded (the engine judges); nested `model`: 400",
        before,
        None,
        rss_after(hostile.pid()).await,
    );
}

/// The idle flood of `faults.rs`, shrunk: idle keep-alive and silent
/// connections are held while the router serves, then closed by the
/// server at the idle timeout, leaving no descriptor behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_flood_is_held_then_closed_at_the_idle_timeout() {
    let hostile = HostileStack::start(&["--idle-timeout", "2s"]).await;
    let (pid, port) = (hostile.pid(), hostile.traffic().port());
    let before = rss_kib(pid);
    let (mut idle, mut silent) = open_idle_flood(hostile.traffic(), 200, 50).await;
    wait_for("the dataplane to accept all 250 connections", || async {
        (accepted_on(pid, port).connections >= 250).then_some(())
    })
    .await;
    let peak = rss_kib(pid);
    hostile.still_serves().await;
    for stream in idle.iter_mut().chain(&mut silent) {
        let outcome = read_until_closed(stream, WAIT_DEADLINE).await;
        assert!(outcome.closed, "closed at the idle timeout");
        assert!(outcome.bytes.is_empty(), "{}", outcome.text());
    }
    wait_for(
        "every accepted connection's descriptor to close",
        || async { (accepted_on(pid, port).connections == 0).then_some(()) },
    )
    .await;
    hostile.still_serves().await;
    report_figure(
        "200 idle keep-alive + 50 silent connections, --idle-timeout 2s",
        "held while the router serves; all closed at the idle timeout",
        before,
        Some(peak),
        rss_after(pid).await,
    );
}

/// The slowloris probe of `faults.rs`, shrunk: connections sending their
/// head a byte at a time, faster than any per-read timeout, are all closed
/// by the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_are_cut_at_the_idle_timeout() {
    let hostile = HostileStack::start(&["--idle-timeout", "1s"]).await;
    let before = rss_kib(hostile.pid());
    let mut streams = open_slowloris(hostile.traffic(), 20).await;
    let open = trickle_until_closed(
        &mut streams,
        Duration::from_millis(200),
        WAIT_DEADLINE,
        || {},
    )
    .await;
    assert_eq!(open, 0, "every slowloris connection is closed");
    hostile.still_serves().await;
    report_figure(
        "20 slowloris connections (a header byte every 0.2 s), --idle-timeout 1s",
        "all closed by the header timeout",
        before,
        None,
        rss_after(hostile.pid()).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_get_503_and_are_closed() {
    let hostile = HostileStack::start(&["--max-connections", "20"]).await;
    let before = rss_kib(hostile.pid());
    // The harness's own client may hold pooled connections; wait them out by
    // filling every slot with ours.
    let mut held = Vec::new();
    let mut refused = 0;
    while held.len() < 20 && refused == 0 {
        let mut stream = TcpStream::connect(hostile.traffic())
            .await
            .expect("connect");
        let outcome = read_outcome(&mut stream, Duration::from_millis(200)).await;
        if outcome.closed {
            refused += 1;
            assert_eq!(outcome.statuses, [503], "{}", outcome.text());
            assert!(outcome.text().contains("too_many_connections"));
        } else {
            held.push(stream);
        }
    }
    assert!(held.len() <= 20);
    let mut extra = TcpStream::connect(hostile.traffic())
        .await
        .expect("connect");
    let outcome = read_until_closed(&mut extra, WAIT_DEADLINE).await;
    assert!(outcome.closed, "over the limit: closed");
    assert_eq!(outcome.statuses, [503]);
    assert!(outcome.text().contains("retry-after: 1"));
    drop(held);
    hostile.still_serves().await;
    report_figure(
        "connections over --max-connections",
        "503 too_many_connections + Retry-After, closed",
        before,
        None,
        rss_after(hostile.pid()).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_beyond_the_budget_get_503_with_retry_after() {
    // The parked body must outlive a slow machine's retries: no read deadline.
    let hostile = HostileStack::start(&[
        "--body-budget-bytes",
        "1000000",
        "--max-body-bytes",
        "600000",
        "--body-read-grace",
        "60m",
    ])
    .await;
    let before = rss_kib(hostile.pid());
    // A parked body holds 600 KB of the budget.
    let mut parked = TcpStream::connect(hostile.traffic())
        .await
        .expect("connect");
    let mut head_only = post("/v1/chat/completions", "", &[]);
    head_only = String::from_utf8(head_only)
        .expect("ASCII")
        .replace("Content-Length: 0", "Content-Length: 600000")
        .into_bytes();
    head_only.extend(br#"{"model":"cap","pad":""#);
    parked.write_all(&head_only).await.expect("write");
    let pad = "p".repeat(500_000 - 40);
    let body = format!(r#"{{"model":"cap","pad":"{pad}"}}"#);
    let refused = wait_for("the budget to be held", || async {
        let outcome = exchange(
            hostile.traffic(),
            &post("/v1/chat/completions", "", body.as_bytes()),
            QUIET,
        )
        .await;
        (outcome.status() == Some(503)).then_some(outcome)
    })
    .await;
    let text = refused.text();
    assert!(
        text.contains("retry-after: 1") && text.contains("router_overloaded"),
        "{text}"
    );
    assert!(refused.closed, "the unread body is not kept");
    drop(parked);
    let accepted = wait_for("the budget to free up", || async {
        let outcome = exchange(
            hostile.traffic(),
            &post("/v1/chat/completions", "", body.as_bytes()),
            QUIET,
        )
        .await;
        (outcome.status() == Some(200)).then_some(())
    })
    .await;
    let () = accepted;
    let metrics = hostile.metrics().await;
    assert!(
        metrics.contains(r#"error_type="router_overloaded""#),
        "counted"
    );
    report_figure(
        "a body that does not fit the body budget",
        "503 router_overloaded + Retry-After, closed",
        before,
        None,
        rss_after(hostile.pid()).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_slower_than_the_minimum_rate_gets_408() {
    let hostile =
        HostileStack::start(&["--body-read-grace", "1s", "--min-body-rate", "2000"]).await;
    let before = rss_kib(hostile.pid());
    let body = format!(r#"{{"model":"cap","pad":"{}"}}"#, "p".repeat(3000));
    let request = post("/v1/chat/completions", "", body.as_bytes());
    let split = request.len() - body.len();
    // 4000 bytes/s keeps up with 2000 bytes/s.
    let mut fast = TcpStream::connect(hostile.traffic())
        .await
        .expect("connect");
    fast.write_all(&request[..split]).await.expect("head");
    for chunk in request[split..].chunks(400) {
        fast.write_all(chunk).await.expect("chunk");
        // Pacing: this client sends at 4000 bytes/s.
        clock::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(read_outcome(&mut fast, QUIET).await.status(), Some(200));
    // 200 bytes/s falls behind and is cut.
    let mut slow = TcpStream::connect(hostile.traffic())
        .await
        .expect("connect");
    slow.write_all(&request[..split]).await.expect("head");
    let started = clock::now();
    let outcome = trickle_body(
        &mut slow,
        &request[split..],
        100,
        Duration::from_millis(500),
        || {},
    )
    .await;
    let outcome = outcome.expect("the server answered before the body ended");
    assert_eq!(outcome.status(), Some(408), "{}", outcome.text());
    assert!(outcome.text().contains("request_timeout"));
    assert!(started.elapsed() < Duration::from_secs(10));
    hostile.still_serves().await;
    report_figure(
        "a body slower than --min-body-rate after --body-read-grace",
        "408 request_timeout, closed",
        before,
        None,
        rss_after(hostile.pid()).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_continuation_floods_and_rapid_resets_end_the_connection() {
    let hostile = HostileStack::start(&[]).await;
    let pid = hostile.pid();
    let before = rss_kib(pid);
    // CONTINUATION flood: a header block that never ends, 1.5 MB of it.
    let mut stream = TcpStream::connect(hostile.traffic())
        .await
        .expect("connect");
    stream.write_all(&h2::preface()).await.expect("preface");
    stream
        .write_all(&h2::frame(h2::FRAME_HEADERS, 0, 1, &h2::post_chat_block()))
        .await
        .expect("headers");
    let value = [b'v'; 100];
    for i in 0..15_000u32 {
        let name = format!("x-flood-{}", i % 1000);
        let frame = h2::frame(
            h2::FRAME_CONTINUATION,
            0,
            1,
            &h2::literal_new_name(name.as_bytes(), &value),
        );
        if stream.write_all(&frame).await.is_err() {
            break;
        }
    }
    let outcome = read_until_closed(&mut stream, WAIT_DEADLINE).await;
    assert!(outcome.closed, "the flood ends the connection");
    assert!(h2::frame_kinds(&outcome.bytes).contains(&h2::FRAME_GOAWAY));
    // Rapid reset: open and cancel streams as fast as possible.
    let mut stream = TcpStream::connect(hostile.traffic())
        .await
        .expect("connect");
    stream.write_all(&h2::preface()).await.expect("preface");
    let _ = stream.write_all(&h2::rapid_reset_burst(10_000)).await;
    let outcome = read_until_closed(&mut stream, WAIT_DEADLINE).await;
    assert!(outcome.closed, "rapid resets end the connection");
    assert!(h2::frame_kinds(&outcome.bytes).contains(&h2::FRAME_GOAWAY));
    let after = rss_kib(pid);
    assert!(
        after < before + 64 * 1024,
        "RSS {before} KiB -> {after} KiB"
    );
    assert!(open_fds(pid) < 64, "no connection left behind");
    hostile.still_serves().await;
    report_figure(
        "HTTP/2 CONTINUATION flood (1.5 MB header block); rapid reset (10,000 streams)",
        "GOAWAY ENHANCE_YOUR_CALM, connection closed",
        before,
        None,
        rss_after(hostile.pid()).await,
    );
}
