//! Phase `admission`: may this identity's request go upstream now?
//!
//! 1. Token rate limits: the budgets of the request's model and of the
//!    caller's tier are checked and its estimated input reserved
//!    ([`crate::rate_limit`]); the reservation rides on the request's record
//!    and is settled against the engine's usage when the response ends.
//! 2. The fairness queue ([`crate::fairness`]): when the model's pods are
//!    full the request waits for its turn; its slot rides on the record and
//!    is given back (with the tokens served) when the response ends.
//!
//! Requests neither applies to pass without their input being estimated.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, header};

use super::admit::InferenceRequest;
use super::authenticate::Identity;
use super::log::RequestRecord;
use crate::auth::User;
use crate::error::{ApiError, ErrorKind};
use crate::fairness::queue::ModelQueue;
use crate::fairness::{
    ANONYMOUS_USER, FairQueues, FairnessSettings, MAX_USER_ID_BYTES, Policy, Refusal, Ticket,
};
use crate::rate_limit::{RateLimiting, RateLimits, Rejection};
use crate::token_estimate::estimate_input_tokens;

/// Kthena's message for a request that waited too long.
const QUEUE_TIMEOUT_MESSAGE: &str = "Request processing timed out in queue";

/// Whether a token budget or a fairness queue applies to the request (else
/// [`admission`] admits it at once).
pub fn applies(
    limits: &RateLimits,
    fairness: Option<&FairQueues>,
    identity: &Identity,
    request: &InferenceRequest,
) -> bool {
    let model = request.parsed.model.as_str();
    limits.applies(model, identity.user())
        || fairness.is_some_and(|fairness| fairness.queue(model).is_some())
}

/// Admits the request now (or once its turn in the fairness queue comes),
/// or says why not: 429 (a spent budget, a full queue), 504 (waited too
/// long), or 503 when a global budget's Redis is unreachable and its policy
/// is to refuse.
pub async fn admission(
    limits: &RateLimits,
    limiting: &RateLimiting,
    fairness: Option<&FairQueues>,
    identity: &Identity,
    request: &InferenceRequest,
    record: &mut RequestRecord,
) -> Result<(), ApiError> {
    let model = request.parsed.model.as_str();
    let user = identity.user();
    let limited = limits.applies(model, user);
    let queue = fairness.and_then(|fairness| Some((fairness.queue(model)?, &fairness.settings)));
    if !limited && queue.is_none() {
        return Ok(());
    }
    let estimate = request
        .parsed
        .prompt_span
        .as_ref()
        .map_or(0, |(field, span)| {
            estimate_input_tokens(*field, &request.body[span.clone()])
        });
    if limited {
        match limits.admit(limiting, model, user, estimate).await {
            None => {}
            Some(Ok(admission)) => record.set_admission(admission),
            Some(Err(rejection)) => {
                if !rejection.unavailable {
                    record.rate_limited(model, rejection.limit_type);
                }
                return Err(rejection_error(rejection));
            }
        }
    }
    if let Some((queue, settings)) = queue {
        wait_turn(queue, settings, identity, request, estimate, record).await?;
    }
    Ok(())
}

/// Waits for the request's turn in its model's fairness queue.
async fn wait_turn(
    queue: &Arc<ModelQueue>,
    settings: &FairnessSettings,
    identity: &Identity,
    request: &InferenceRequest,
    input_tokens: u64,
    record: &mut RequestRecord,
) -> Result<(), ApiError> {
    let headers = &request.head.headers;
    let (user, tier) = match identity.user() {
        Some(user) => (Arc::from(user.user_id.as_str()), user.tier.as_deref()),
        None => {
            let user = settings
                .user_header
                .as_ref()
                .and_then(|name| header_text(headers, name))
                .filter(|user| user.len() <= MAX_USER_ID_BYTES)
                .unwrap_or(ANONYMOUS_USER);
            if user != ANONYMOUS_USER {
                record.set_identity(&Identity::User(Arc::new(User {
                    user_id: user.to_owned(),
                    tier: None,
                })));
            }
            (Arc::from(user), None)
        }
    };
    let session = match settings.policy {
        Policy::SessionBoost => header_text(headers, &settings.session_header).map(Box::from),
        Policy::Vtc => None,
    };
    let ticket = Ticket {
        user,
        charge_per_token: settings.charge_per_token(tier),
        input_tokens,
        session,
    };
    record.queue_entered();
    let admitted = queue.admit(ticket).await;
    record.queue_left();
    match admitted {
        Ok(slot) => {
            record.set_fair_slot(slot);
            Ok(())
        }
        Err(Refusal::Full {
            user_limit,
            retry_after,
        }) => {
            let whose = if user_limit { "your share of " } else { "" };
            let seconds = retry_after.as_secs().max(1);
            Err(ApiError::new(
                ErrorKind::QueueFull,
                format!(
                    "{whose}the queue of model {} is full; retry in {seconds}s",
                    queue.model
                ),
            )
            .with_header(header::RETRY_AFTER, HeaderValue::from(seconds)))
        }
        Err(Refusal::Timeout) => Err(ApiError::new(
            ErrorKind::QueueTimeout,
            QUEUE_TIMEOUT_MESSAGE,
        )),
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &http::HeaderName) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
}

/// The response to a refused request: which limit in the message,
/// `Retry-After` when it can pass later, the refusing budget's `x-ratelimit-*`.
fn rejection_error(rejection: Rejection) -> ApiError {
    let kind = if rejection.unavailable {
        ErrorKind::RateLimitUnavailable
    } else {
        ErrorKind::RateLimited
    };
    let retry_after = rejection.retry_after_header();
    let mut error = ApiError::new(kind, rejection.message);
    if let Some(seconds) = retry_after {
        error = error.with_header(header::RETRY_AFTER, seconds);
    }
    for (name, value) in rejection.status.iter().flat_map(|status| status.headers()) {
        error = error.with_header(name, value);
    }
    error
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use switchyard_snapshot::pb;

    use super::*;
    use crate::auth::User;
    use crate::proxy::testing::{inference_request, test_record};
    use crate::rate_limit::RateLimitPlan;

    const HELLO_WORLD: &str =
        r#"{"model":"m","messages":[{"role":"user","content":"hello world"}]}"#;

    /// Route `m` with `input` tokens a minute (0: no limit), and `tiers`.
    struct Limits {
        limiting: RateLimiting,
        limits: Arc<RateLimits>,
    }

    impl Limits {
        fn new(input: u32, tiers: Vec<pb::TierRateLimit>) -> Self {
            let config = pb::RouteConfig {
                routes: vec![pb::ModelRoute {
                    namespace: "default".into(),
                    name: "r".into(),
                    model_name: "m".into(),
                    rate_limit: (input > 0).then(|| pb::RateLimit {
                        input_tokens_per_unit: input,
                        unit: "minute".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                tier_rate_limits: tiers,
                ..Default::default()
            };
            let limiting = RateLimiting::default();
            let limits = limiting.apply(RateLimitPlan::parse(&config).expect("valid"));
            Self { limiting, limits }
        }

        /// Admits `body` from `identity`; the record keeps the reservation.
        async fn admit(
            &self,
            identity: &Identity,
            body: &str,
        ) -> (Result<(), ApiError>, RequestRecord) {
            let request = inference_request("/v1/chat/completions", body);
            let mut record = test_record();
            let admitted = admission(
                &self.limits,
                &self.limiting,
                None,
                identity,
                &request,
                &mut record,
            )
            .await;
            (admitted, record)
        }
    }

    fn user(id: &str) -> Identity {
        Identity::User(Arc::new(User {
            user_id: id.into(),
            tier: Some("free".into()),
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn admits_at_once_without_limits() {
        let limits = Limits::new(0, vec![]);
        let started = tokio::time::Instant::now();
        let (admitted, record) = limits
            .admit(&Identity::Anonymous, r#"{"model":"m","prompt":"hi"}"#)
            .await;
        assert_eq!(admitted, Ok(()));
        assert_eq!(
            started.elapsed(),
            std::time::Duration::ZERO,
            "nothing waits"
        );
        assert!(record.rate_limit_status().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn reserves_the_chatml_estimate_then_refuses_with_retry_after_and_headers() {
        let limits = Limits::new(30, vec![]);
        // Kept in flight: a request that ends undelivered is refunded.
        let mut in_flight = Vec::new();
        for remaining in [20.0, 10.0, 0.0] {
            let (admitted, record) = limits.admit(&Identity::Anonymous, HELLO_WORLD).await;
            admitted.expect("admitted");
            let status = record.rate_limit_status().expect("limited");
            assert_eq!((status.limit, status.remaining.floor()), (30.0, remaining));
            in_flight.push(record);
        }
        let (refused, _) = limits.admit(&Identity::Anonymous, HELLO_WORLD).await;
        let error = refused.expect_err("the fourth hello world");
        assert_eq!(error.kind, ErrorKind::RateLimited);
        assert_eq!(
            error.message,
            "input token rate limit exceeded for model m (30 input tokens per minute)"
        );
        let headers: Vec<(&str, &str)> = error
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.to_str().expect("ascii")))
            .collect();
        assert_eq!(
            headers,
            [
                ("retry-after", "20"),
                ("x-ratelimit-limit-tokens", "30"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "1m0s"),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_tier_limits_each_of_its_users() {
        let free = pb::TierRateLimit {
            tier: "free".into(),
            limit: Some(pb::RateLimit {
                input_tokens_per_unit: 10,
                unit: "hour".into(),
                ..Default::default()
            }),
        };
        let limits = Limits::new(0, vec![free]);
        let (first, _kept) = limits.admit(&user("a"), HELLO_WORLD).await;
        first.expect("first");
        let (refused, _) = limits.admit(&user("a"), HELLO_WORLD).await;
        let error = refused.expect_err("a's budget is spent");
        assert!(
            error.message.contains("user a of tier free"),
            "{}",
            error.message
        );
        let (other, _) = limits.admit(&user("b"), HELLO_WORLD).await;
        other.expect("b has a budget of its own");
        let (anonymous, _) = limits.admit(&Identity::Anonymous, HELLO_WORLD).await;
        anonymous.expect("no tier, no route limit");
    }
}
