//! Phase `forward`: sends the request to the ranked candidates, one attempt
//! at a time, as the [`policy`] directs, through an [`Upstream`]. Ends with
//! the response head of the attempt that is delivered (its pod still counted
//! in flight) or with the error the client gets. A prefill/decode
//! ModelServer's candidates are pairs, each attempt two legs ([`pairs`]).

pub mod http1;
pub mod pairs;
pub mod policy;
pub mod upstream;

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use switchyard_runtime::clock;

pub use self::http1::{EngineBody, Http1Upstream};
use self::policy::{Attempt, AttemptPolicy, Candidates, Next, Verdict, failure_of};
pub use self::upstream::{Upstream, UpstreamError};
use super::log::RequestRecord;
use crate::error::{ApiError, ErrorKind};
use crate::pod::outlier::Failure;
use crate::pod::{InFlightGuard, PodState};
use crate::request_id::REQUEST_ID_HEADER;
use crate::rewrite::Rewrite;
use crate::routing::Server;
use crate::scheduling::Ranking;

/// Request headers that never reach an engine, in one list so that one
/// pass over a request's headers finds them all:
/// - the hop-by-hop ones (RFC 9110 §7.6.1), `Connection` first: they
///   describe one connection, not the message;
/// - `Proxy-Authorization`, addressed to the router itself: consumed here;
/// - those the upstream connection sets itself: the pod's authority, and the
///   length of the (possibly edited) body.
static NEVER_FORWARDED: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::HOST,
    header::CONTENT_LENGTH,
];

/// The hop-by-hop headers at the start of `NEVER_FORWARDED`: they never
/// cross the proxy in either direction.
pub static HOP_BY_HOP: &[HeaderName] = NEVER_FORWARDED.split_at(7).0;

/// The request as every attempt sends it.
#[derive(Debug)]
pub struct Outbound {
    path_and_query: PathAndQuery,
    /// Taken by the last attempt, copied by the others.
    headers: Option<HeaderMap>,
    body: Bytes,
}

impl Outbound {
    /// The client's request head becomes the upstream one in place, less the
    /// headers that must not cross, plus the request id.
    pub fn new(head: Parts, body: Bytes, request_id: &HeaderValue) -> Self {
        let (path_and_query, headers) = upstream_head(head, request_id);
        Self {
            path_and_query,
            headers: Some(headers),
            body,
        }
    }

    /// An HTTPRoute rule's filters, applied to every attempt.
    pub fn rewrite(&mut self, rewrite: &Rewrite) {
        if let Some(headers) = self.headers.as_mut() {
            rewrite.apply(&mut self.path_and_query, headers);
        }
    }

    fn request_to(
        &mut self,
        pod: &PodState,
        is_last: bool,
    ) -> Result<Request<Full<Bytes>>, ApiError> {
        // The client consumes what it sends, so only an attempt that may be
        // followed by another needs its own copy.
        let headers = if is_last {
            self.headers.take()
        } else {
            self.headers.clone()
        };
        upstream_request(
            pod,
            &self.path_and_query,
            headers.unwrap_or_default(),
            self.body.clone(),
        )
    }
}

/// The path and headers every upstream request of a client's request
/// carries: its headers less those that must not cross, plus the request id.
fn upstream_head(head: Parts, request_id: &HeaderValue) -> (PathAndQuery, HeaderMap) {
    let mut headers = head.headers;
    // One pass over the client's few headers finds which of the never
    // forwarded ones it sent (nearly always just host and content-length):
    // removing each listed name instead costs a hashed lookup per name,
    // present or not.
    let mut present = 0u16;
    for name in headers.keys() {
        for (index, never) in NEVER_FORWARDED.iter().enumerate() {
            if never == name {
                present |= 1 << index;
            }
        }
    }
    // Headers the client's `Connection` names are hop-by-hop too (RFC 9110
    // §7.6.1); `keep-alive` and `close`, the usual values, name nothing
    // more and allocate nothing.
    // Bit 0: `Connection`, the list's first.
    let named: Vec<HeaderName> = if present & 1 == 0 {
        Vec::new()
    } else {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .filter(|token| {
                !token.eq_ignore_ascii_case("keep-alive") && !token.eq_ignore_ascii_case("close")
            })
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect()
    };
    for (index, name) in NEVER_FORWARDED.iter().enumerate() {
        if present & (1 << index) != 0 {
            headers.remove(name);
        }
    }
    for name in &named {
        headers.remove(name);
    }
    headers.insert(REQUEST_ID_HEADER, request_id.clone());
    // Shares the bytes of the request line, no copy.
    let path_and_query = head
        .uri
        .into_parts()
        .path_and_query
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    (path_and_query, headers)
}

/// A `POST` of `body` to `pod`.
fn upstream_request(
    pod: &PodState,
    path_and_query: &PathAndQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, ApiError> {
    let uri = Uri::builder()
        .scheme("http")
        .authority(pod.authority.clone())
        .path_and_query(path_and_query.clone())
        .build()
        .map_err(|error| {
            ApiError::new(
                ErrorKind::InvalidBody,
                format!("invalid request path: {error}"),
            )
        })?;
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(request)
}

/// `sent`, bounded by the ModelServer's timeout. Not an `async fn`: its
/// state would hold `sent` twice (as the argument and inside the timeout),
/// and every request's future, moved as it goes, would carry both.
fn within<T>(
    limit: Duration,
    sent: impl Future<Output = Result<T, UpstreamError>>,
) -> impl Future<Output = Result<T, UpstreamError>> {
    tokio::time::timeout(limit, sent)
        .map(move |answered| answered.unwrap_or(Err(UpstreamError::Timeout(limit))))
}

/// Counts a failed attempt of `record`'s request against `pod` of
/// `server`, whose outlier detection may eject it.
pub fn count_failure(server: &Server, pod: &PodState, failure: Failure, record: &RequestRecord) {
    if let Some(ejection) = server
        .outlier
        .record_failure(&server.pods, pod, failure, clock::now())
    {
        record.pod_ejected(server, pod, &ejection);
    }
}

/// The response the client gets, and its pod's in-flight count, held until
/// the body ends.
#[derive(Debug)]
pub struct Delivered<B> {
    pub response: Response<B>,
    pub guard: InFlightGuard,
}

/// Runs the attempts of one request to `server`'s `ranking`.
pub async fn forward<U: Upstream>(
    upstream: &U,
    record: &mut RequestRecord,
    server: &Server,
    ranking: Ranking,
    mut outbound: Outbound,
) -> Result<Delivered<U::Body>, ApiError> {
    let mut attempts = Attempts::new(server, ranking);
    loop {
        let attempt = attempts.next().await?;
        let pod = attempt.target;
        // Dropped with the outcome when the attempt fails, so a failed
        // attempt never counts against the pod while the next one runs.
        let guard = pod.begin_request();
        record.begin_attempt(pod);
        let sent = upstream.send(outbound.request_to(pod, attempt.is_last)?);
        let outcome = match within(attempt.timeout, sent).await {
            Ok(response) => Outcome::Answer(Delivered { response, guard }),
            Err(error) => Outcome::Failed(pod, error),
        };
        if let Some(delivered) = attempts.judge(pod, outcome, record) {
            return Ok(delivered);
        }
    }
}

/// How one attempt ended.
pub enum Outcome<'s, A> {
    /// A response head arrived, its pod counted in flight.
    Answer(A),
    /// `pod` gave no usable answer.
    Failed(&'s Arc<PodState>, UpstreamError),
}

/// A response head one attempt got: it goes to the client, or it is
/// dropped for another attempt.
pub trait Answer {
    type Body;

    fn status(&self) -> StatusCode;

    /// The pod that answered.
    fn pod(&self) -> &Arc<PodState>;

    fn deliver(self) -> Delivered<Self::Body>;

    /// Dropped for another attempt.
    fn abandon(self);
}

impl<B> Answer for Delivered<B> {
    type Body = B;

    fn status(&self) -> StatusCode {
        self.response.status()
    }

    fn pod(&self) -> &Arc<PodState> {
        self.guard.pod()
    }

    fn deliver(self) -> Self {
        self
    }

    fn abandon(self) {}
}

/// The attempt loop of one request to a ModelServer, shared by pods and
/// prefill/decode pairs: [`next`](Self::next) says what to try once its
/// wait is over, the caller makes the attempt, [`judge`](Self::judge) takes
/// how it ended: failures count against the pod that failed, and the
/// [`policy`] decides between delivering, retrying and giving up.
pub struct Attempts<'s, C: Candidates> {
    server: &'s Server,
    policy: AttemptPolicy<'s, C>,
    next: Next<C::Target<'s>>,
}

impl<'s, C: Candidates> Attempts<'s, C>
where
    C::Target<'s>: Display,
{
    pub fn new(server: &'s Server, candidates: C) -> Self {
        let mut policy = AttemptPolicy::new(server, candidates);
        let next = policy.first();
        Self {
            server,
            policy,
            next,
        }
    }

    /// The attempt to make now (after waiting as the policy says), or the
    /// error the client gets when none is left.
    pub async fn next(&mut self) -> Result<Attempt<C::Target<'s>>, ApiError> {
        let attempt = match &self.next {
            Next::Try(attempt) => *attempt,
            Next::GiveUp(error) => return Err(error.clone()),
        };
        if !attempt.wait.is_zero() {
            tokio::time::sleep(attempt.wait).await;
        }
        Ok(attempt)
    }

    /// How the attempt to `target` ended: the response the client gets,
    /// or `None` when [`next`](Self::next) has more to say.
    pub fn judge<A: Answer>(
        &mut self,
        target: C::Target<'s>,
        outcome: Outcome<'s, A>,
        record: &mut RequestRecord,
    ) -> Option<Delivered<A::Body>> {
        let server = self.server;
        self.next = match outcome {
            Outcome::Answer(answer) => {
                let status = answer.status();
                if status.is_server_error() {
                    count_failure(server, answer.pod(), Failure::ServerError, record);
                }
                match self.policy.on_response(status) {
                    // A success counts for the pod once its body ends (respond).
                    Verdict::Deliver => return Some(answer.deliver()),
                    Verdict::Retry(retry) => {
                        tracing::warn!(attempt = %target, pod = %answer.pod().key, server = %server.key, %status, "upstream attempt failed");
                        answer.abandon();
                        Next::Try(retry)
                    }
                }
            }
            Outcome::Failed(pod, error) => {
                if matches!(error, UpstreamError::Connect(_)) {
                    record.connect_failed();
                }
                count_failure(server, pod, failure_of(&error), record);
                tracing::warn!(attempt = %target, pod = %pod.key, server = %server.key, failure = %error, "upstream attempt failed");
                self.policy.on_failure(error, pod)
            }
        };
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::StatusCode;
    use http_body_util::BodyExt;

    use super::*;
    use crate::proxy::testing::{Script, ScriptedUpstream, ranked, server_with_pods, test_record};

    fn outbound() -> Outbound {
        let (head, ()) = Request::post("/v1/completions?x=1")
            .header("authorization", "Bearer k")
            .header("cookie", "session=c")
            .header("x-api-key", "key")
            .header(header::PROXY_AUTHORIZATION, "Basic cHJveHk6c2VjcmV0")
            .header(header::CONNECTION, "keep-alive, x-hop")
            .header("x-hop", "for the router only")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header(header::TE, "trailers")
            .header(header::TRAILER, "x-checksum")
            .header(header::UPGRADE, "h2c")
            .header(header::TRANSFER_ENCODING, "identity")
            .header(header::HOST, "router")
            .header(header::CONTENT_LENGTH, "2")
            .body(())
            .expect("request")
            .into_parts();
        Outbound::new(
            head,
            Bytes::from_static(b"{}"),
            &HeaderValue::from_static("id-1"),
        )
    }

    async fn run(
        upstream: &ScriptedUpstream,
        server: &Server,
    ) -> (
        Result<Delivered<crate::proxy::testing::ScriptedBody>, ApiError>,
        RequestRecord,
    ) {
        let mut record = test_record();
        let result = forward(upstream, &mut record, server, ranked(server), outbound()).await;
        (result, record)
    }

    #[tokio::test(start_paused = true)]
    async fn sends_the_request_with_hop_by_hop_headers_removed() {
        let server = server_with_pods(1, 0, Duration::ZERO, None);
        let upstream = ScriptedUpstream::new([Script::status(200)]);
        let (result, _) = run(&upstream, &server).await;
        assert_eq!(result.expect("delivered").response.status(), StatusCode::OK);
        let sent = upstream.sent();
        let request = &sent[0];
        assert_eq!(request.uri, "http://127.0.0.1:8000/v1/completions?x=1");
        // Without authentication, the client's credentials for the engine pass.
        assert_eq!(request.headers["authorization"], "Bearer k");
        assert_eq!(request.headers["cookie"], "session=c");
        assert_eq!(request.headers["x-api-key"], "key");
        assert_eq!(request.headers["x-request-id"], "id-1");
        for gone in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "upgrade",
            "transfer-encoding",
            "host",
            "content-length",
            "proxy-authorization",
            "x-hop",
        ] {
            assert!(
                !request.headers.contains_key(gone),
                "{gone} is not forwarded"
            );
        }
        assert_eq!(request.body, "{}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_503_is_retried_on_the_next_pod_after_the_interval() {
        let server = server_with_pods(3, 2, Duration::from_millis(250), None);
        let upstream = ScriptedUpstream::new([Script::status(503), Script::status(200)]);
        let started = clock::now();
        let (result, _) = run(&upstream, &server).await;
        let delivered = result.expect("delivered");
        assert_eq!(delivered.response.status(), StatusCode::OK);
        assert_eq!(delivered.guard.pod().name, "p1");
        assert_eq!(upstream.pods(), ["p0", "p1"]);
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        assert_eq!(
            server.pods[0].in_flight(),
            0,
            "the failed attempt is not counted"
        );
        assert_eq!(server.pods[1].in_flight(), 1, "held until the body ends");
        drop(delivered);
        assert_eq!(server.pods[1].in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_before_headers_is_retried() {
        let server = server_with_pods(2, 1, Duration::ZERO, None);
        let upstream = ScriptedUpstream::new([Script::Reset, Script::status(200)]);
        let (result, record) = run(&upstream, &server).await;
        assert_eq!(result.expect("delivered").guard.pod().name, "p1");
        assert_eq!(record.attempts(), 2);
        assert!(
            !server.pods[0].is_ejected(clock::now()),
            "a reset is no reason to eject"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn client_errors_are_not_retried() {
        let server = server_with_pods(3, 2, Duration::ZERO, None);
        let upstream = ScriptedUpstream::new([Script::status(400), Script::status(200)]);
        let (result, _) = run(&upstream, &server).await;
        assert_eq!(
            result.expect("delivered").response.status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(upstream.pods(), ["p0"]);
    }

    #[tokio::test(start_paused = true)]
    async fn without_retries_left_the_engine_status_passes_through() {
        let server = server_with_pods(3, 1, Duration::ZERO, None);
        let upstream = ScriptedUpstream::new([
            Script::status(503),
            Script::status(504),
            Script::status(200),
        ]);
        let (result, _) = run(&upstream, &server).await;
        assert_eq!(
            result.expect("delivered").response.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(upstream.pods(), ["p0", "p1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_headers_time_out_as_504_when_no_retry_is_left() {
        let limit = Duration::from_millis(300);
        let server = server_with_pods(3, 0, Duration::ZERO, Some(limit));
        let upstream = ScriptedUpstream::new([
            Script::SlowHeaders(Duration::from_secs(5)),
            Script::status(200),
        ]);
        let started = clock::now();
        let (result, _) = run(&upstream, &server).await;
        let error = result.expect_err("timed out");
        assert_eq!(error.kind, ErrorKind::UpstreamTimeout);
        assert_eq!(error.kind.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(started.elapsed(), limit);
        assert_eq!(upstream.pods(), ["p0"]);
        assert_eq!(server.pods[0].in_flight(), 0);
        assert_eq!(
            server.pods[0].health.failure_load(),
            1,
            "the timeout counts against the pod"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_attempt_is_retried_on_the_next_pod() {
        let limit = Duration::from_millis(300);
        let server = server_with_pods(3, 1, Duration::from_millis(50), Some(limit));
        let upstream = ScriptedUpstream::new([
            Script::SlowHeaders(Duration::from_secs(5)),
            Script::status(200),
        ]);
        let started = clock::now();
        let (result, record) = run(&upstream, &server).await;
        let delivered = result.expect("the retry answers");
        assert_eq!(delivered.guard.pod().name, "p1");
        assert_eq!(started.elapsed(), limit + Duration::from_millis(50));
        assert_eq!(record.attempts(), 2);
        assert_eq!(
            server.pods[0].in_flight(),
            0,
            "the hung attempt is released"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_engine_without_a_timeout_is_bounded_by_the_default() {
        let server = server_with_pods(1, 0, Duration::ZERO, None);
        let upstream = ScriptedUpstream::new([Script::SlowHeaders(Duration::from_secs(24 * 3600))]);
        let started = clock::now();
        let (result, _) = run(&upstream, &server).await;
        assert_eq!(
            result.expect_err("bounded").kind,
            ErrorKind::UpstreamTimeout
        );
        assert_eq!(
            started.elapsed(),
            crate::routing::DEFAULT_RESPONSE_HEADER_TIMEOUT
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refusing_pods_are_ejected_and_skipped_up_to_five_candidates() {
        let server = server_with_pods(7, 0, Duration::from_secs(1), None);
        let upstream = ScriptedUpstream::new(std::iter::repeat_n(Script::Refuse, 7));
        let started = clock::now();
        let (result, record) = run(&upstream, &server).await;
        let error = result.expect_err("all refused");
        assert_eq!(error.kind, ErrorKind::UpstreamUnavailable);
        assert_eq!(error.kind.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(upstream.pods(), ["p0", "p1", "p2", "p3", "p4"], "top-N = 5");
        assert_eq!(record.attempts(), 5);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "refusals are not waited on"
        );
        let now = clock::now();
        let ejected: Vec<bool> = server.pods.iter().map(|p| p.is_ejected(now)).collect();
        assert_eq!(ejected, [true, true, true, true, true, false, false]);
        // The next request ranks the healthy pods first.
        let upstream = ScriptedUpstream::new([Script::status(200)]);
        let (result, _) = run(&upstream, &server).await;
        let pod = result.expect("delivered").guard.pod().name.clone();
        assert!(["p5", "p6"].contains(&pod.as_str()), "{pod}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_then_a_success_reaches_the_client() {
        let server = server_with_pods(2, 0, Duration::ZERO, None);
        let upstream = ScriptedUpstream::new([Script::Refuse, Script::status(200)]);
        let (result, _) = run(&upstream, &server).await;
        assert_eq!(result.expect("delivered").guard.pod().name, "p1");
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_retried_once_the_response_is_delivered() {
        let server = server_with_pods(2, 3, Duration::ZERO, None);
        let upstream =
            ScriptedUpstream::new([Script::cut_stream(b"data: first\n\n"), Script::status(200)]);
        let (result, _) = run(&upstream, &server).await;
        let mut body = result.expect("delivered").response.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "data: first\n\n");
        assert!(
            body.frame().await.expect("an error").is_err(),
            "the cut reaches the client"
        );
        assert_eq!(upstream.pods(), ["p0"], "no second attempt");
    }
}
