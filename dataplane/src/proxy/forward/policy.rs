//! The attempt policy of one request, as a pure state machine: it walks the
//! scheduler's ranked candidates and, told how each attempt went, answers
//! "try this pod (after this wait, within this timeout)", "deliver the
//! response you have" or "give up with this error". No I/O and no clock: the
//! caller sends, waits and measures.
//!
//! The rules:
//! - a pod that refuses the connection costs nothing: the next candidate is
//!   tried at once, up to the end of the ranking (top-N), and the refusing
//!   pod is ejected for a while;
//! - an engine answering 502/503/504, or a connection that breaks before the
//!   response head, consumes one of the ModelServer's `retry.attempts`; the
//!   retry goes to the next candidate after `retry.retryInterval`;
//! - when no retry is left (or no candidate), a retryable status is passed
//!   through to the client as the engine sent it;
//! - no response head within the ModelServer's timeout answers 504 at once;
//! - any other response, 4xx included, is delivered as is. Once delivered,
//!   the response belongs to the client: nothing is retried after that.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use super::upstream::UpstreamError;
use crate::error::{ApiError, ErrorKind};
use crate::pod::PodState;
use crate::routing::Server;
use crate::scheduling::Ranking;

/// Engine statuses that mean "this pod cannot serve it now; another may".
pub const RETRYABLE_STATUSES: [StatusCode; 3] = [
    StatusCode::BAD_GATEWAY,
    StatusCode::SERVICE_UNAVAILABLE,
    StatusCode::GATEWAY_TIMEOUT,
];

/// One attempt to make.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'s> {
    pub pod: &'s Arc<PodState>,
    /// Wait this long before sending.
    pub wait: Duration,
    /// Give up when the response head has not arrived within this.
    pub timeout: Option<Duration>,
    /// No attempt can follow this one, so what it sends may be moved rather
    /// than copied.
    pub is_last: bool,
}

/// What to do next.
#[derive(Debug)]
pub enum Next<'s> {
    Try(Attempt<'s>),
    GiveUp(ApiError),
}

/// What to do with a response head that arrived.
#[derive(Debug)]
pub enum Verdict<'s> {
    /// Hand it to the client.
    Deliver,
    /// Drop it and make this attempt instead.
    Retry(Attempt<'s>),
}

/// Why the latest attempt failed.
#[derive(Debug)]
enum Failure {
    Upstream(UpstreamError),
    Status(StatusCode),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Upstream(error) => error.fmt(f),
            Self::Status(status) => write!(f, "engine answered {status}"),
        }
    }
}

/// The attempts of one request to one ModelServer.
#[derive(Debug)]
pub struct AttemptPolicy<'s> {
    server: &'s Server,
    ranking: Ranking,
    /// Attempts made so far; the next one goes to this candidate.
    tried: usize,
    retries_left: u32,
    last_failure: Option<Failure>,
}

impl<'s> AttemptPolicy<'s> {
    pub fn new(server: &'s Server, ranking: Ranking) -> Self {
        Self {
            server,
            ranking,
            tried: 0,
            retries_left: server.retry_attempts,
            last_failure: None,
        }
    }

    /// The first attempt.
    pub fn first(&mut self) -> Next<'s> {
        self.next(Duration::ZERO)
    }

    /// A response head arrived from the latest attempt.
    pub fn on_response(&mut self, status: StatusCode) -> Verdict<'s> {
        if !RETRYABLE_STATUSES.contains(&status) || self.retries_left == 0 {
            return Verdict::Deliver;
        }
        let Some(attempt) = self.attempt(self.tried + 1, self.server.retry_interval) else {
            return Verdict::Deliver;
        };
        self.tried += 1;
        self.retries_left -= 1;
        self.last_failure = Some(Failure::Status(status));
        Verdict::Retry(attempt)
    }

    /// The latest attempt got no response head.
    pub fn on_failure(&mut self, error: UpstreamError) -> Next<'s> {
        let failed_pod = self.candidate(self.tried);
        self.tried += 1;
        let (allowed, wait) = match &error {
            UpstreamError::Connect(_) => (true, Duration::ZERO),
            UpstreamError::BeforeHeaders(_) => {
                let allowed = self.retries_left > 0;
                self.retries_left = self.retries_left.saturating_sub(1);
                (allowed, self.server.retry_interval)
            }
            UpstreamError::Timeout(limit) => {
                let pod = failed_pod.map_or("?", |pod| pod.key.as_str());
                return Next::GiveUp(ApiError::new(
                    ErrorKind::UpstreamTimeout,
                    format!(
                        "pod {pod} of ModelServer {} sent no response headers within {limit:?}",
                        self.server.key
                    ),
                ));
            }
        };
        self.last_failure = Some(Failure::Upstream(error));
        if !allowed {
            return Next::GiveUp(self.exhausted());
        }
        self.next(wait)
    }

    /// Whether a pod that failed this way should be avoided by later
    /// requests too: one that refuses connections is down or gone, while a
    /// slow or erroring one may still serve others.
    pub fn ejects(error: &UpstreamError) -> bool {
        matches!(error, UpstreamError::Connect(_))
    }

    fn next(&self, wait: Duration) -> Next<'s> {
        match self.attempt(self.tried, wait) {
            Some(attempt) => Next::Try(attempt),
            None => Next::GiveUp(self.exhausted()),
        }
    }

    fn attempt(&self, position: usize, wait: Duration) -> Option<Attempt<'s>> {
        Some(Attempt {
            pod: self.candidate(position)?,
            wait,
            timeout: self.server.timeout,
            is_last: position + 1 >= self.ranking.len(),
        })
    }

    fn candidate(&self, position: usize) -> Option<&'s Arc<PodState>> {
        let server: &'s Server = self.server;
        self.ranking
            .get(position)
            .and_then(|index| server.pods.get(index))
    }

    fn exhausted(&self) -> ApiError {
        let key = &self.server.key;
        match &self.last_failure {
            None => ApiError::new(
                ErrorKind::NoReadyPod,
                format!("no ready pod for ModelServer {key}"),
            ),
            Some(Failure::Upstream(UpstreamError::Connect(error))) => ApiError::new(
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
    use crate::proxy::testing::{ranked, server_with_pods};

    fn connect() -> UpstreamError {
        UpstreamError::Connect("refused".into())
    }

    fn reset() -> UpstreamError {
        UpstreamError::BeforeHeaders("reset".into())
    }

    fn tried(next: Next<'_>) -> Attempt<'_> {
        match next {
            Next::Try(attempt) => attempt,
            Next::GiveUp(error) => panic!("gave up: {error}"),
        }
    }

    fn gave_up(next: Next<'_>) -> ApiError {
        match next {
            Next::Try(attempt) => panic!("tries {} instead of giving up", attempt.pod.name),
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
        assert!(AttemptPolicy::ejects(&connect()));
        loop {
            match policy.on_failure(connect()) {
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
        let names: Vec<&str> = pods.iter().map(|a| a.pod.name.as_str()).collect();
        assert_eq!(names, ["p0", "p1", "p2", "p3", "p4"]);
        assert!(pods[..4].iter().all(|a| !a.is_last) && pods[4].is_last);
    }

    #[test]
    fn retryable_statuses_consume_retries_then_pass_through() {
        let server = server_with_pods(3, 1, Duration::from_millis(10), None);
        let mut policy = AttemptPolicy::new(&server, ranked(&server));
        assert_eq!(tried(policy.first()).pod.name, "p0");
        match policy.on_response(StatusCode::SERVICE_UNAVAILABLE) {
            Verdict::Retry(attempt) => {
                assert_eq!(attempt.pod.name, "p1");
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
        tried(policy.first());
        assert!(!AttemptPolicy::ejects(&reset()));
        let retry = tried(policy.on_failure(reset()));
        assert_eq!(
            (retry.pod.name.as_str(), retry.wait),
            ("p1", Duration::from_millis(5))
        );
        let error = gave_up(policy.on_failure(reset()));
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
        tried(policy.first());
        tried(policy.on_failure(connect()));
        tried(policy.on_failure(connect()));
        let retry = tried(policy.on_failure(reset()));
        assert_eq!(retry.pod.name, "p3", "the one retry is still there");
    }

    #[test]
    fn a_timeout_gives_up_at_once_with_504() {
        let limit = Duration::from_millis(300);
        let server = server_with_pods(3, 2, Duration::ZERO, Some(limit));
        let mut policy = AttemptPolicy::new(&server, ranked(&server));
        assert_eq!(tried(policy.first()).timeout, Some(limit));
        let error = gave_up(policy.on_failure(UpstreamError::Timeout(limit)));
        assert_eq!(error.kind, ErrorKind::UpstreamTimeout);
        assert_eq!(error.kind.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            error.message,
            "pod default/p0 of ModelServer default/s sent no response headers within 300ms"
        );
    }

    #[test]
    fn no_candidate_means_no_ready_pod() {
        let server = server_with_pods(0, 2, Duration::ZERO, None);
        let mut policy = AttemptPolicy::new(&server, Ranking::default());
        assert_eq!(gave_up(policy.first()).kind, ErrorKind::NoReadyPod);
    }
}
