//! The attempt policy of one request, as a pure state machine: it walks the
//! scheduler's ranked candidates (pods, or prefill/decode pairs) and, told
//! how each attempt went, answers "try this candidate (after this wait,
//! within this timeout)", "deliver the response you have" or "give up with
//! this error". No I/O and no clock: the caller sends, waits and measures.
//!
//! The rules:
//! - a pod that refuses the connection costs nothing: the next candidate is
//!   tried at once, up to the end of the ranking (top-N); later candidates
//!   with that pod (a pair sharing its prefill pod) are skipped;
//! - an engine answering 502/503/504, a connection that breaks before the
//!   response is complete enough to use, or no response within the
//!   ModelServer's timeout ([`Server::timeout`]), consumes one of the
//!   ModelServer's `retry.attempts`; the retry goes to the next candidate
//!   after `retry.retryInterval`;
//! - when no retry is left (or no candidate), a retryable status is passed
//!   through to the client as the engine sent it, a timeout answers 504;
//! - any other response, 4xx included, is delivered as is. Once delivered,
//!   the response belongs to the client: nothing is retried after that.
//!
//! Every failed attempt also counts against its pod ([`failure_of`]), and
//! outlier detection ejects pods that keep failing (`crate::pod::outlier`).
//!
//! For a prefill/decode pair each leg is judged by these rules, and a retry
//! is a whole new pair: the budget counts pairs, not legs.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use super::upstream::UpstreamError;
use crate::error::{ApiError, ErrorKind};
use crate::pod::PodState;
use crate::pod::outlier::Failure;
use crate::routing::Server;
use crate::scheduling::{PairRanking, Ranking};

/// Engine statuses that mean "this pod cannot serve it now; another may".
pub const RETRYABLE_STATUSES: [StatusCode; 3] = [
    StatusCode::BAD_GATEWAY,
    StatusCode::SERVICE_UNAVAILABLE,
    StatusCode::GATEWAY_TIMEOUT,
];

/// Pods that refused a connection remembered per request to skip their
/// other pairs: more than the candidates a request ever has.
const REMEMBERED_REFUSALS: usize = 2 * switchyard_snapshot::scheduler::MAX_TOP_N as usize;

/// How a failed attempt counts against its pod.
pub fn failure_of(error: &UpstreamError) -> Failure {
    match error {
        UpstreamError::Connect(_) => Failure::ConnectFailure,
        UpstreamError::BeforeHeaders(_) | UpstreamError::Incomplete(_) => Failure::Reset,
        UpstreamError::Timeout(_) => Failure::Timeout,
    }
}

/// The scheduler's candidates of one request, best first.
pub trait Candidates {
    /// What one attempt goes to.
    type Target<'s>: Copy;

    /// How many candidates there are.
    fn count(&self) -> usize;

    /// The candidate at `position`, resolved against `server`'s pods.
    fn target<'s>(&self, server: &'s Server, position: usize) -> Option<Self::Target<'s>>;

    /// Whether `target` sends anything to the pod `pod_id`.
    fn involves(target: &Self::Target<'_>, pod_id: u64) -> bool;
}

impl Candidates for Ranking {
    type Target<'s> = &'s Arc<PodState>;

    fn count(&self) -> usize {
        self.len()
    }

    fn target<'s>(&self, server: &'s Server, position: usize) -> Option<&'s Arc<PodState>> {
        self.get(position).and_then(|index| server.pods.get(index))
    }

    fn involves(target: &&Arc<PodState>, pod_id: u64) -> bool {
        target.id == pod_id
    }
}

/// A prefill pod and a decode pod of one group.
#[derive(Debug, Clone, Copy)]
pub struct Pair<'s> {
    pub prefill: &'s Arc<PodState>,
    pub decode: &'s Arc<PodState>,
    /// Index of their group in the ModelServer's groups.
    pub group: usize,
    /// The prefill pod's SGLang bootstrap port, when configured.
    pub bootstrap_port: Option<u16>,
}

/// As logs name an attempt.
impl std::fmt::Display for Pair<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "prefill {} decode {}", self.prefill.key, self.decode.key)
    }
}

impl Candidates for PairRanking {
    type Target<'s> = Pair<'s>;

    fn count(&self) -> usize {
        self.len()
    }

    fn target<'s>(&self, server: &'s Server, position: usize) -> Option<Pair<'s>> {
        let (prefill, decode) = self.get(position)?;
        let pd = server.prefill_decode.as_ref()?;
        Some(Pair {
            prefill: server.pods.get(prefill)?,
            decode: server.pods.get(decode)?,
            group: *pd.group_of.get(decode)?,
            bootstrap_port: pd
                .bootstrap_ports
                .get(prefill)
                .copied()
                .filter(|port| *port != 0),
        })
    }

    fn involves(target: &Pair<'_>, pod_id: u64) -> bool {
        target.prefill.id == pod_id || target.decode.id == pod_id
    }
}

/// One attempt to make.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<T> {
    pub target: T,
    /// Wait this long before sending.
    pub wait: Duration,
    /// Give up when the response has not arrived within this.
    pub timeout: Duration,
    /// No attempt can follow this one, so what it sends may be moved rather
    /// than copied.
    pub is_last: bool,
}

/// What to do next.
#[derive(Debug)]
pub enum Next<T> {
    Try(Attempt<T>),
    GiveUp(ApiError),
}

/// What to do with a response head that arrived.
#[derive(Debug)]
pub enum Verdict<T> {
    /// Hand it to the client.
    Deliver,
    /// Drop it and make this attempt instead.
    Retry(Attempt<T>),
}

/// Why the latest attempt failed.
#[derive(Debug)]
enum AttemptFailure {
    Upstream(UpstreamError),
    Status(StatusCode),
}

impl std::fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Upstream(error) => error.fmt(f),
            Self::Status(status) => write!(f, "engine answered {status}"),
        }
    }
}

/// The attempts of one request to one ModelServer.
#[derive(Debug)]
pub struct AttemptPolicy<'s, C> {
    server: &'s Server,
    candidates: C,
    /// The next attempt goes to the first usable candidate from here.
    position: usize,
    /// Attempts made so far.
    tried: usize,
    retries_left: u32,
    last_failure: Option<AttemptFailure>,
    /// Pods that refused a connection during this request.
    refused: [u64; REMEMBERED_REFUSALS],
    refused_count: usize,
}

impl<'s, C: Candidates> AttemptPolicy<'s, C> {
    pub fn new(server: &'s Server, candidates: C) -> Self {
        Self {
            server,
            candidates,
            position: 0,
            tried: 0,
            retries_left: server.retry_attempts,
            last_failure: None,
            refused: [0; REMEMBERED_REFUSALS],
            refused_count: 0,
        }
    }

    /// The first attempt.
    pub fn first(&mut self) -> Next<C::Target<'s>> {
        self.next(Duration::ZERO)
    }

    /// A response head arrived from the latest attempt.
    pub fn on_response(&mut self, status: StatusCode) -> Verdict<C::Target<'s>> {
        if !RETRYABLE_STATUSES.contains(&status) || self.retries_left == 0 {
            return Verdict::Deliver;
        }
        let Some((position, attempt)) = self.attempt(self.position + 1, self.server.retry_interval)
        else {
            return Verdict::Deliver;
        };
        self.advance_to(position);
        self.retries_left -= 1;
        self.last_failure = Some(AttemptFailure::Status(status));
        Verdict::Retry(attempt)
    }

    /// The latest attempt got no usable response from `pod` (one of its pods).
    pub fn on_failure(&mut self, error: UpstreamError, pod: &PodState) -> Next<C::Target<'s>> {
        self.tried += 1;
        self.position += 1;
        let (allowed, wait) = match &error {
            UpstreamError::Connect(_) => {
                if self.refused_count < REMEMBERED_REFUSALS {
                    self.refused[self.refused_count] = pod.id;
                    self.refused_count += 1;
                }
                (true, Duration::ZERO)
            }
            UpstreamError::BeforeHeaders(_)
            | UpstreamError::Incomplete(_)
            | UpstreamError::Timeout(_) => {
                let allowed = self.retries_left > 0;
                self.retries_left = self.retries_left.saturating_sub(1);
                (allowed, self.server.retry_interval)
            }
        };
        if let UpstreamError::Timeout(limit) = &error
            && (!allowed || self.attempt(self.position, wait).is_none())
        {
            return Next::GiveUp(ApiError::new(
                ErrorKind::UpstreamTimeout,
                format!(
                    "pod {} of ModelServer {} sent no response within {limit:?}",
                    pod.key, self.server.key
                ),
            ));
        }
        self.last_failure = Some(AttemptFailure::Upstream(error));
        if !allowed {
            return Next::GiveUp(self.exhausted());
        }
        self.next(wait)
    }

    fn next(&mut self, wait: Duration) -> Next<C::Target<'s>> {
        match self.attempt(self.position, wait) {
            Some((position, attempt)) => {
                self.position = position;
                Next::Try(attempt)
            }
            None => Next::GiveUp(self.exhausted()),
        }
    }

    /// Moves on to `position` after a failed attempt.
    fn advance_to(&mut self, position: usize) {
        self.tried += 1;
        self.position = position;
    }

    /// The first usable candidate from `from`, and its position.
    fn attempt(&self, from: usize, wait: Duration) -> Option<(usize, Attempt<C::Target<'s>>)> {
        let (position, target) = (from..self.candidates.count())
            .filter_map(|position| Some((position, self.usable(position)?)))
            .next()?;
        let is_last = (position + 1..self.candidates.count()).all(|p| self.usable(p).is_none());
        Some((
            position,
            Attempt {
                target,
                wait,
                timeout: self.server.timeout,
                is_last,
            },
        ))
    }

    /// The candidate at `position`, unless it involves a pod that refused.
    fn usable(&self, position: usize) -> Option<C::Target<'s>> {
        let target = self.candidates.target(self.server, position)?;
        let refused = &self.refused[..self.refused_count];
        (!refused.iter().any(|id| C::involves(&target, *id))).then_some(target)
    }

    fn exhausted(&self) -> ApiError {
        let key = &self.server.key;
        match &self.last_failure {
            None => ApiError::new(
                ErrorKind::NoReadyPod,
                format!("no ready pod for ModelServer {key}"),
            ),
            Some(AttemptFailure::Upstream(UpstreamError::Connect(error))) => ApiError::new(
                ErrorKind::UpstreamUnavailable,
                format!(
                    "could not connect to any pod of ModelServer {key} ({} tried; last error: {error})",
                    self.tried
                ),
            ),
            Some(failure) => ApiError::new(
                ErrorKind::UpstreamFailed,
                format!("ModelServer {key}: {failure} ({} attempts)", self.tried),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::{pd_server, ranked, ranked_pairs, server_with_pods};
    use crate::routing::{DEFAULT_RESPONSE_HEADER_TIMEOUT, KvConnector};

    fn connect() -> UpstreamError {
        UpstreamError::Connect("refused".into())
    }

    fn reset() -> UpstreamError {
        UpstreamError::BeforeHeaders("reset".into())
    }

    fn tried<T>(next: Next<T>) -> Attempt<T> {
        match next {
            Next::Try(attempt) => attempt,
            Next::GiveUp(error) => panic!("gave up: {error}"),
        }
    }

    fn gave_up<T>(next: Next<T>) -> ApiError {
        match next {
            Next::Try(_) => panic!("tries again instead of giving up"),
            Next::GiveUp(error) => error,
        }
    }

    #[test]
    fn refused_connections_walk_the_whole_ranking_without_waiting_or_retries() {
        let server = server_with_pods(7, 0, Duration::from_millis(10), None);
        let ranking = ranked(&server);
        assert_eq!(ranking.len(), 5, "top-N bounds the candidates");
        let mut policy = AttemptPolicy::new(&server, ranking);
        let mut pods = vec![tried(policy.first())];
        assert_eq!(failure_of(&connect()), Failure::ConnectFailure);
        loop {
            let failed = pods.last().expect("an attempt").target;
            match policy.on_failure(connect(), failed) {
                Next::Try(attempt) => {
                    assert_eq!(attempt.wait, Duration::ZERO);
                    pods.push(attempt);
                }
                Next::GiveUp(error) => {
                    assert_eq!(error.kind, ErrorKind::UpstreamUnavailable);
                    assert!(
                        error.message.contains("(5 tried; last error: refused)"),
                        "{error}"
                    );
                    break;
                }
            }
        }
        let names: Vec<&str> = pods.iter().map(|a| a.target.name.as_str()).collect();
        assert_eq!(names, ["p0", "p1", "p2", "p3", "p4"]);
        assert!(pods[..4].iter().all(|a| !a.is_last) && pods[4].is_last);
    }

    #[test]
    fn retryable_statuses_consume_retries_then_pass_through() {
        let server = server_with_pods(3, 1, Duration::from_millis(10), None);
        let mut policy = AttemptPolicy::new(&server, ranked(&server));
        assert_eq!(tried(policy.first()).target.name, "p0");
        match policy.on_response(StatusCode::SERVICE_UNAVAILABLE) {
            Verdict::Retry(attempt) => {
                assert_eq!(attempt.target.name, "p1");
                assert_eq!(attempt.wait, Duration::from_millis(10), "retry interval");
            }
            Verdict::Deliver => panic!("a 503 with a retry left is retried"),
        }
        assert!(
            matches!(
                policy.on_response(StatusCode::BAD_GATEWAY),
                Verdict::Deliver
            ),
            "no retry left: the engine's 502 goes to the client"
        );
    }

    #[test]
    fn client_errors_and_successes_are_delivered_at_once() {
        let server = server_with_pods(3, 2, Duration::ZERO, None);
        for status in [
            StatusCode::OK,
            StatusCode::BAD_REQUEST,
            StatusCode::NOT_FOUND,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::INTERNAL_SERVER_ERROR,
        ] {
            let mut policy = AttemptPolicy::new(&server, ranked(&server));
            tried(policy.first());
            assert!(
                matches!(policy.on_response(status), Verdict::Deliver),
                "{status}"
            );
        }
    }

    #[test]
    fn the_last_candidate_delivers_a_retryable_status() {
        let server = server_with_pods(1, 3, Duration::ZERO, None);
        let mut policy = AttemptPolicy::new(&server, ranked(&server));
        assert!(tried(policy.first()).is_last);
        assert!(matches!(
            policy.on_response(StatusCode::SERVICE_UNAVAILABLE),
            Verdict::Deliver
        ));
    }

    #[test]
    fn a_reset_before_headers_is_retried_then_fails_as_bad_gateway() {
        let server = server_with_pods(3, 1, Duration::from_millis(5), None);
        let mut policy = AttemptPolicy::new(&server, ranked(&server));
        let first = tried(policy.first()).target;
        assert_eq!(failure_of(&reset()), Failure::Reset);
        let retry = tried(policy.on_failure(reset(), first));
        assert_eq!(
            (retry.target.name.as_str(), retry.wait),
            ("p1", Duration::from_millis(5))
        );
        let error = gave_up(policy.on_failure(reset(), retry.target));
        assert_eq!(error.kind, ErrorKind::UpstreamFailed);
        assert_eq!(
            error.message,
            "ModelServer default/s: connection failed before response headers: reset (2 attempts)"
        );
    }

    #[test]
    fn refused_connections_do_not_consume_retries() {
        let server = server_with_pods(4, 1, Duration::ZERO, None);
        let mut policy = AttemptPolicy::new(&server, ranked(&server));
        let p0 = tried(policy.first()).target;
        let p1 = tried(policy.on_failure(connect(), p0)).target;
        let p2 = tried(policy.on_failure(connect(), p1)).target;
        let retry = tried(policy.on_failure(reset(), p2));
        assert_eq!(retry.target.name, "p3", "the one retry is still there");
    }

    #[test]
    fn a_timeout_is_retried_while_retries_last_then_answers_504() {
        let limit = Duration::from_millis(300);
        let server = server_with_pods(3, 1, Duration::from_millis(5), Some(limit));
        let mut policy = AttemptPolicy::new(&server, ranked(&server));
        let first = tried(policy.first());
        assert_eq!(first.timeout, limit);
        let timeout = || UpstreamError::Timeout(limit);
        assert_eq!(failure_of(&timeout()), Failure::Timeout);
        let retry = tried(policy.on_failure(timeout(), first.target));
        assert_eq!(
            (retry.target.name.as_str(), retry.wait, retry.timeout),
            ("p1", Duration::from_millis(5), limit),
            "the next pod, after the interval, with the whole timeout again"
        );
        let error = gave_up(policy.on_failure(timeout(), retry.target));
        assert_eq!(error.kind, ErrorKind::UpstreamTimeout);
        assert_eq!(error.kind.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            error.message,
            "pod default/p1 of ModelServer default/s sent no response within 300ms"
        );
    }

    #[test]
    fn without_a_timeout_a_hung_engine_is_bounded_by_the_default() {
        let server = server_with_pods(2, 0, Duration::ZERO, None);
        let mut policy = AttemptPolicy::new(&server, ranked(&server));
        let attempt = tried(policy.first());
        assert_eq!(attempt.timeout, DEFAULT_RESPONSE_HEADER_TIMEOUT);
        let error =
            gave_up(policy.on_failure(UpstreamError::Timeout(attempt.timeout), attempt.target));
        assert_eq!(
            error.kind,
            ErrorKind::UpstreamTimeout,
            "no retry configured"
        );
    }

    #[test]
    fn no_candidate_means_no_ready_pod() {
        let server = server_with_pods(0, 2, Duration::ZERO, None);
        let mut policy = AttemptPolicy::new(&server, Ranking::default());
        assert_eq!(gave_up(policy.first()).kind, ErrorKind::NoReadyPod);
    }

    fn names(pair: Pair<'_>) -> (&str, &str) {
        (pair.prefill.name.as_str(), pair.decode.name.as_str())
    }

    #[test]
    fn pairs_with_a_pod_that_refused_are_skipped() {
        // g0: prefill p0, decode p1 and p2; g1: prefill p3, decode p4.
        let server = pd_server(
            &[("g0", 1, 2), ("g1", 1, 1)],
            KvConnector::Http,
            0,
            Duration::from_millis(10),
            None,
        );
        let mut policy = AttemptPolicy::new(&server, ranked_pairs(&server));
        let first = tried(policy.first());
        assert_eq!(names(first.target), ("p0", "p1"));
        assert_eq!((first.target.group, first.wait), (0, Duration::ZERO));
        assert!(!first.is_last);
        let next = tried(policy.on_failure(connect(), first.target.prefill));
        assert_eq!(
            names(next.target),
            ("p3", "p4"),
            "(p0, p2) shares the refusing prefill pod"
        );
        assert_eq!((next.target.group, next.wait), (1, Duration::ZERO));
        assert!(next.is_last, "no usable pair follows");
        let error = gave_up(policy.on_failure(connect(), next.target.decode));
        assert_eq!(error.kind, ErrorKind::UpstreamUnavailable);
        assert!(error.message.contains("(2 tried;"), "{error}");
    }

    #[test]
    fn retries_count_pairs_and_wait_the_interval() {
        let server = pd_server(
            &[("g0", 1, 1), ("g1", 1, 1), ("g2", 1, 1)],
            KvConnector::Nixl,
            1,
            Duration::from_millis(25),
            Some(Duration::from_secs(2)),
        );
        let mut policy = AttemptPolicy::new(&server, ranked_pairs(&server));
        let first = tried(policy.first());
        assert_eq!(first.timeout, Duration::from_secs(2), "per leg");
        // The prefill leg breaks: one retry used, a new pair after the interval.
        let retry = tried(policy.on_failure(reset(), first.target.prefill));
        assert_eq!(names(retry.target), ("p2", "p3"));
        assert_eq!(retry.wait, Duration::from_millis(25));
        // The decode leg of that pair answers 503: no retry left, it goes to the client.
        assert!(matches!(
            policy.on_response(StatusCode::SERVICE_UNAVAILABLE),
            Verdict::Deliver
        ));
    }

    #[test]
    fn a_pair_leg_timeout_without_a_retry_gives_up_naming_the_pod() {
        let limit = Duration::from_millis(500);
        let server = pd_server(
            &[("g0", 1, 1), ("g1", 1, 1)],
            KvConnector::Sglang,
            0,
            Duration::ZERO,
            Some(limit),
        );
        let mut policy = AttemptPolicy::new(&server, ranked_pairs(&server));
        let first = tried(policy.first());
        let error = gave_up(policy.on_failure(UpstreamError::Timeout(limit), first.target.decode));
        assert_eq!(error.kind, ErrorKind::UpstreamTimeout);
        assert_eq!(
            error.message,
            "pod default/p1 of ModelServer default/s sent no response within 500ms"
        );
    }
}
