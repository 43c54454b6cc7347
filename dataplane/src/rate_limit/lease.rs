//! A budget shared by every dataplane, held in Redis and leased in batches.
//!
//! Each dataplane takes tokens from the shared bucket a batch at a time (a
//! lease) and admits requests from its batch without asking Redis; every
//! exchange also hands back what the previous batch did not use and pays any
//! debt (output charged beyond what was left). A batch covers
//! [`LEASE_HORIZON`] of this dataplane's recent consumption, so a busy budget
//! costs a few Redis calls per second however many requests pass, and is
//! never more than [`MAX_LEASE_FRACTION`] of the budget. A dataplane that
//! learnt the bucket is empty rejects locally until enough has refilled.
//!
//! Bounds, with `N` dataplanes sharing a budget of capacity `C` refilled at
//! `r` tokens per second, over any window `T`:
//! - admitted ≤ `C + r·T` plus what was charged after admission (output, and
//!   input the engine counted above the estimate): every admitted token was
//!   granted by Redis first, and Redis grants at most what its bucket holds;
//! - admitted ≥ `C + r·T − N·(2·MAX_LEASE_FRACTION·C + one request)` when
//!   demand exceeds the budget: what is missing is at most one batch unused
//!   in each dataplane's lease (returned to Redis after
//!   [`LEASE_IDLE_RETURN`] without requests) and one batch refilled in Redis
//!   but below each dataplane's grant threshold.
//!
//! A batch holds at least one request, so Redis sees at most one call per
//! `MAX_LEASE_FRACTION·C / request size` requests while the budget has
//! tokens (≤ 0.2 calls per request once the budget holds 250 requests or
//! more), plus, while it is exhausted, one call per dataplane each time a
//! batch has refilled.
//!
//! Redis is reached through [`LeaseBackend`], so the policy is tested on
//! paused time against an in-memory bucket and the Lua script against a real
//! Redis.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::bucket::refill_time;

/// A lease covers this much of the dataplane's recent consumption: at 10,000
/// tokens per second, a batch of 2,500 tokens, i.e. four Redis exchanges per
/// second however many requests share them.
pub const LEASE_HORIZON: Duration = Duration::from_millis(250);
/// A lease never holds more than this share of the budget, which bounds how
/// much of the budget idles in other dataplanes' leases (under-admission).
pub const MAX_LEASE_FRACTION: f64 = 0.02;
/// Redis grants a lease only once at least this share of the batch asked for
/// is available, so a starved dataplane does not poll for every refilled token.
pub const MIN_GRANT_FRACTION: f64 = 0.5;
/// Unused tokens (or debt) go back to Redis after this long without requests.
pub const LEASE_IDLE_RETURN: Duration = Duration::from_secs(1);
/// The longest a request waits for Redis: a LAN round trip is well under a
/// millisecond, and a request must never hang on an unreachable Redis.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_millis(200);
/// After a failed exchange the failure policy applies for this long before
/// Redis is tried again, so an outage costs one timeout per second, not one
/// per request.
pub const BACKEND_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// One exchange with the shared bucket: add `delta` (unused tokens handed
/// back, or debt when negative), then grant up to `want` tokens if at least
/// `min_grant` are available.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRequest {
    pub key: Arc<str>,
    pub capacity: f64,
    /// Tokens per second.
    pub rate: f64,
    pub want: f64,
    pub min_grant: f64,
    pub delta: f64,
}

/// What the shared bucket answered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeaseReply {
    pub granted: f64,
    /// Tokens left in the shared bucket after the exchange.
    pub level: f64,
}

/// Where shared buckets live (Redis in production).
pub trait LeaseBackend: Send + Sync + std::fmt::Debug {
    fn exchange(&self, request: LeaseRequest) -> BoxFuture<'static, Result<LeaseReply, String>>;
    /// Names the backend in logs and metrics (the Redis address).
    fn name(&self) -> &str;
}

/// What a global budget does while its backend cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Admit without limiting (counted and logged).
    Open,
    /// Refuse the request (503).
    Close,
}

/// The outcome of an admission check that did not simply pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// Not enough tokens; retry after this long (None: the request can never fit).
    Exhausted(Option<Duration>),
    /// The backend is unreachable and the policy is to refuse.
    Unavailable,
}

/// How a request passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passed {
    /// Tokens were taken from the budget; later charges apply to it.
    Metered,
    /// The backend is unreachable and the policy is to admit: nothing was
    /// taken and nothing will be charged.
    Unmetered,
}

/// One budget shared through a [`LeaseBackend`].
#[derive(Debug)]
pub struct LeasedBudget {
    key: Arc<str>,
    backend: Arc<dyn LeaseBackend>,
    state: Mutex<LeaseState>,
    /// One exchange at a time per budget: requests that find the lease short
    /// while an exchange is under way wait for its result instead of adding
    /// their own.
    exchange_lock: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct LeaseState {
    capacity: f64,
    rate: f64,
    policy: FailurePolicy,
    /// Tokens leased and not used yet; negative = debt owed to the bucket.
    balance: f64,
    consumed_since_exchange: f64,
    last_exchange: Option<Instant>,
    /// Tokens per second this dataplane consumed recently (smoothed).
    demand: f64,
    /// The shared bucket holds too little for a grant until then.
    empty_until: Option<Instant>,
    /// The backend failed; the failure policy applies until then.
    down_until: Option<Instant>,
    /// The shared bucket's level at the last exchange, for response headers.
    remote_level: f64,
    remote_seen: Instant,
    last_activity: Instant,
    return_scheduled: bool,
    /// Counts exchanges (for tests and the bench).
    exchanges: u64,
}

impl LeasedBudget {
    pub fn new(
        key: Arc<str>,
        limit: u32,
        unit: Duration,
        policy: FailurePolicy,
        backend: Arc<dyn LeaseBackend>,
    ) -> Arc<Self> {
        let now = Instant::now();
        let capacity = f64::from(limit);
        Arc::new(Self {
            key,
            backend,
            state: Mutex::new(LeaseState {
                capacity,
                rate: capacity / unit.as_secs_f64(),
                policy,
                balance: 0.0,
                consumed_since_exchange: 0.0,
                last_exchange: None,
                demand: 0.0,
                empty_until: None,
                down_until: None,
                remote_level: capacity,
                remote_seen: now,
                last_activity: now,
                return_scheduled: false,
                exchanges: 0,
            }),
            exchange_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn backend_name(&self) -> &str {
        self.backend.name()
    }

    /// Applies a changed limit or policy; the shared bucket follows on the next exchange.
    pub fn reconfigure(&self, limit: u32, unit: Duration, policy: FailurePolicy) {
        let mut state = self.state.lock();
        state.capacity = f64::from(limit);
        state.rate = state.capacity / unit.as_secs_f64();
        state.policy = policy;
    }

    pub fn capacity(&self) -> f64 {
        self.state.lock().capacity
    }

    /// Exchanges with the backend so far.
    pub fn exchanges(&self) -> u64 {
        self.state.lock().exchanges
    }

    /// Takes `take` tokens if `need` are available (see
    /// [`super::bucket::TokenBucket::try_take`]), leasing more when the
    /// local batch is short.
    pub async fn acquire(self: &Arc<Self>, take: u64, need: u64) -> Result<Passed, Refusal> {
        let (take, need) = (take as f64, need as f64);
        if let Some(decided) = self.state.lock().try_local(take, need, Instant::now()) {
            return decided;
        }
        let _exchange = self.exchange_lock.lock().await;
        // Another request's exchange may have refilled the lease meanwhile.
        let request = {
            let mut state = self.state.lock();
            let now = Instant::now();
            if let Some(decided) = state.try_local(take, need, now) {
                return decided;
            }
            state.lease_request(self.key.clone(), need, now)
        };
        let want = request.want;
        let outcome =
            tokio::time::timeout(EXCHANGE_TIMEOUT, self.backend.exchange(request.clone()))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {EXCHANGE_TIMEOUT:?}")));
        let now = Instant::now();
        let decided = {
            let mut state = self.state.lock();
            match outcome {
                Ok(reply) => {
                    if state.down_until.take().is_some() {
                        tracing::info!(key = %self.key, backend = self.backend.name(), "rate limit backend reachable again");
                    }
                    state.apply_reply(reply, now);
                    if state.balance >= need {
                        state.consume(take, now);
                        Ok(Passed::Metered)
                    } else {
                        // Come back when a whole batch has refilled: a starved
                        // dataplane then asks once per batch, not per token.
                        let wait = refill_time(want.max(need) - reply.level, state.rate);
                        state.empty_until = Some(now + wait);
                        Err(Refusal::Exhausted(Some(wait)))
                    }
                }
                Err(error) => {
                    // Not known to have reached the bucket: keep what was to be handed back.
                    state.balance += request.delta;
                    if state.down_until.is_none() {
                        tracing::warn!(key = %self.key, backend = self.backend.name(), %error, policy = ?state.policy, want, "rate limit backend unreachable; applying the failure policy");
                    }
                    state.down_until = Some(now + BACKEND_RETRY_INTERVAL);
                    state.on_backend_down()
                }
            }
        };
        self.schedule_return();
        decided
    }

    /// Charges `tokens` (a refund when negative) whatever the balance.
    pub fn charge(self: &Arc<Self>, tokens: f64) {
        {
            let mut state = self.state.lock();
            state.balance -= tokens;
            state.consumed_since_exchange += tokens.max(0.0);
            state.last_activity = Instant::now();
        }
        self.schedule_return();
    }

    /// (limit, tokens left, time until full) as this dataplane knows them:
    /// the shared level at the last exchange, refilled since, plus the lease.
    pub fn status(&self) -> (f64, f64, Duration) {
        let state = self.state.lock();
        let refilled = Instant::now()
            .saturating_duration_since(state.remote_seen)
            .as_secs_f64()
            * state.rate;
        let remaining = ((state.remote_level + refilled).min(state.capacity) + state.balance)
            .min(state.capacity);
        (
            state.capacity,
            remaining,
            refill_time(state.capacity - remaining, state.rate),
        )
    }

    /// Hands the lease back (or pays its debt) once requests stopped for
    /// [`LEASE_IDLE_RETURN`]. One task at a time per budget; it ends with the budget.
    fn schedule_return(self: &Arc<Self>) {
        {
            let mut state = self.state.lock();
            if state.return_scheduled || state.balance == 0.0 {
                return;
            }
            state.return_scheduled = true;
        }
        let budget: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let due = match budget.upgrade() {
                    Some(budget) => budget.state.lock().last_activity + LEASE_IDLE_RETURN,
                    None => return,
                };
                tokio::time::sleep_until(due).await;
                let Some(budget) = budget.upgrade() else {
                    return;
                };
                if budget.return_if_idle().await {
                    return;
                }
            }
        });
    }

    /// True when nothing is left to hand back (the task may end).
    async fn return_if_idle(&self) -> bool {
        let _exchange = self.exchange_lock.lock().await;
        let request = {
            let mut state = self.state.lock();
            let now = Instant::now();
            if now < state.last_activity + LEASE_IDLE_RETURN {
                return false;
            }
            if state.balance == 0.0 || state.down_until.is_some_and(|until| now < until) {
                // Nothing to hand back, or Redis is down: a later exchange settles it.
                state.return_scheduled = false;
                return true;
            }
            let mut request = state.lease_request(self.key.clone(), 0.0, now);
            request.want = 0.0;
            request.min_grant = 0.0;
            request
        };
        let outcome =
            tokio::time::timeout(EXCHANGE_TIMEOUT, self.backend.exchange(request.clone()))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {EXCHANGE_TIMEOUT:?}")));
        let mut state = self.state.lock();
        let now = Instant::now();
        match outcome {
            Ok(reply) => state.apply_reply(reply, now),
            Err(_) => {
                state.balance += request.delta;
                state.down_until = Some(now + BACKEND_RETRY_INTERVAL);
            }
        }
        state.return_scheduled = false;
        true
    }
}

impl Drop for LeasedBudget {
    /// A budget that leaves the snapshot hands its lease back.
    fn drop(&mut self) {
        let state = self.state.get_mut();
        if state.balance == 0.0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let request = LeaseRequest {
            key: self.key.clone(),
            capacity: state.capacity,
            rate: state.rate,
            want: 0.0,
            min_grant: 0.0,
            delta: state.balance,
        };
        let exchange = self.backend.exchange(request);
        runtime.spawn(async move {
            let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await;
        });
    }
}

impl LeaseState {
    /// Decides without the backend when possible.
    fn try_local(&mut self, take: f64, need: f64, now: Instant) -> Option<Result<Passed, Refusal>> {
        if need > self.capacity {
            return Some(Err(Refusal::Exhausted(None)));
        }
        if self.balance >= need {
            self.consume(take, now);
            return Some(Ok(Passed::Metered));
        }
        if let Some(until) = self.down_until
            && now < until
        {
            return Some(self.on_backend_down());
        }
        match self.empty_until {
            Some(until) if now < until => Some(Err(Refusal::Exhausted(Some(until - now)))),
            _ => None,
        }
    }

    fn consume(&mut self, take: f64, now: Instant) {
        self.balance -= take;
        self.consumed_since_exchange += take;
        self.last_activity = now;
    }

    fn on_backend_down(&self) -> Result<Passed, Refusal> {
        match self.policy {
            FailurePolicy::Open => Ok(Passed::Unmetered),
            FailurePolicy::Close => Err(Refusal::Unavailable),
        }
    }

    /// The next exchange: hand back the whole balance and ask for a batch
    /// sized to recent demand.
    fn lease_request(&mut self, key: Arc<str>, need: f64, now: Instant) -> LeaseRequest {
        if let Some(last) = self.last_exchange {
            let elapsed = now.saturating_duration_since(last).as_secs_f64().max(0.001);
            let sample = self.consumed_since_exchange / elapsed;
            self.demand = if self.demand == 0.0 {
                sample
            } else {
                (self.demand + sample) / 2.0
            };
        }
        let ceiling = need.max(self.capacity * MAX_LEASE_FRACTION);
        let want = (self.demand * LEASE_HORIZON.as_secs_f64()).clamp(need, ceiling);
        LeaseRequest {
            key,
            capacity: self.capacity,
            rate: self.rate,
            want,
            min_grant: need.max(want * MIN_GRANT_FRACTION),
            delta: std::mem::take(&mut self.balance),
        }
    }

    fn apply_reply(&mut self, reply: LeaseReply, now: Instant) {
        self.balance += reply.granted;
        self.remote_level = reply.level;
        self.remote_seen = now;
        self.last_exchange = Some(now);
        self.consumed_since_exchange = 0.0;
        self.exchanges += 1;
        if reply.granted > 0.0 {
            self.empty_until = None;
        }
    }
}

/// A shared bucket in memory with the Lua script's arithmetic: the unit
/// tests' stand-in for Redis (and the reference the script is checked against).
#[cfg(test)]
pub mod memory {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    #[derive(Debug, Default)]
    pub struct MemoryBackend {
        buckets: Mutex<HashMap<Arc<str>, (f64, Instant)>>,
        pub calls: AtomicU64,
        pub failing: AtomicBool,
        /// Exchanges hang (never answer) while set.
        pub hanging: AtomicBool,
        /// Each exchange answers after this many milliseconds.
        pub delay_ms: AtomicU64,
    }

    impl MemoryBackend {
        pub fn level(&self, key: &str) -> Option<f64> {
            self.buckets.lock().get(key).map(|(tokens, _)| *tokens)
        }
    }

    impl LeaseBackend for MemoryBackend {
        fn exchange(
            &self,
            request: LeaseRequest,
        ) -> BoxFuture<'static, Result<LeaseReply, String>> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self.hanging.load(Ordering::Relaxed) {
                return Box::pin(futures::future::pending());
            }
            if self.failing.load(Ordering::Relaxed) {
                return Box::pin(async { Err("connection refused".to_owned()) });
            }
            let now = Instant::now();
            let mut buckets = self.buckets.lock();
            let (tokens, at) = buckets
                .entry(request.key.clone())
                .or_insert((request.capacity, now));
            let elapsed = now.saturating_duration_since(*at).as_secs_f64();
            *tokens = (*tokens + elapsed * request.rate).min(request.capacity);
            *tokens = (*tokens + request.delta).min(request.capacity);
            *at = now;
            let mut granted = 0.0;
            if request.want > 0.0 && *tokens >= request.min_grant {
                granted = request.want.min(*tokens);
                *tokens -= granted;
            }
            let reply = LeaseReply {
                granted,
                level: *tokens,
            };
            let delay = Duration::from_millis(self.delay_ms.load(Ordering::Relaxed));
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(reply)
            })
        }

        fn name(&self) -> &str {
            "memory"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemoryBackend;
    use super::*;
    use std::sync::atomic::Ordering;

    const MINUTE: Duration = Duration::from_secs(60);

    fn budget(
        backend: &Arc<MemoryBackend>,
        limit: u32,
        unit: Duration,
        policy: FailurePolicy,
    ) -> Arc<LeasedBudget> {
        LeasedBudget::new(Arc::from("k"), limit, unit, policy, backend.clone())
    }

    #[tokio::test(start_paused = true)]
    async fn kthena_global_example_admits_one_hello_world_per_minute_across_dataplanes() {
        // 10 input tokens per minute, three dataplanes, "hello world" = 10 tokens.
        let backend = Arc::new(MemoryBackend::default());
        let dataplanes: Vec<_> = (0..3)
            .map(|_| budget(&backend, 10, MINUTE, FailurePolicy::Open))
            .collect();
        assert_eq!(dataplanes[0].acquire(10, 10).await, Ok(Passed::Metered));
        for dataplane in &dataplanes {
            match dataplane.acquire(10, 10).await {
                Err(Refusal::Exhausted(Some(wait))) => {
                    assert!(wait > Duration::from_secs(59) && wait <= MINUTE, "{wait:?}")
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        tokio::time::advance(MINUTE).await;
        assert_eq!(dataplanes[2].acquire(10, 10).await, Ok(Passed::Metered));
        assert_eq!(
            dataplanes[1].acquire(11, 11).await,
            Err(Refusal::Exhausted(None)),
            "more than the budget never fits"
        );
    }

    /// Three dataplanes, each offered twice its share, for a simulated
    /// minute against a per-minute budget: together they admit the ideal
    /// `C + r·T` within the stated bound, and Redis sees a fraction of a call
    /// per request.
    #[tokio::test(start_paused = true)]
    async fn three_dataplanes_admit_within_the_bound_with_few_exchanges() {
        let backend = Arc::new(MemoryBackend::default());
        let limit = 600_000; // tokens per minute: 10,000 per second
        let dataplanes: Vec<_> = (0..3)
            .map(|_| budget(&backend, limit, MINUTE, FailurePolicy::Open))
            .collect();
        // 1,000 requests per second of 10 tokens each per dataplane: 3x the refill.
        let mut admitted = 0u64;
        let mut requests = 0u64;
        let step = Duration::from_millis(1);
        let steps = 60_000;
        for _ in 0..steps {
            for dataplane in &dataplanes {
                requests += 1;
                if dataplane.acquire(10, 10).await == Ok(Passed::Metered) {
                    admitted += 10;
                }
            }
            tokio::time::advance(step).await;
        }
        let ideal = f64::from(limit) * 2.0; // full bucket + one minute of refill
        let bound = 3.0 * (2.0 * MAX_LEASE_FRACTION * f64::from(limit) + 10.0);
        let admitted = admitted as f64;
        assert!(admitted <= ideal, "{admitted} > {ideal}");
        assert!(admitted >= ideal - bound, "{admitted} < {ideal} - {bound}");
        assert!((admitted - ideal).abs() <= 0.1 * ideal);
        let calls = backend.calls.load(Ordering::Relaxed) as f64;
        eprintln!(
            "admitted {admitted} of ideal {ideal} ({:+.2}%), {calls} exchanges for {requests} requests ({:.4} per request)",
            (admitted - ideal) / ideal * 100.0,
            calls / requests as f64
        );
        assert!(
            calls / (requests as f64) <= 0.2,
            "{calls} calls for {requests} requests"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_lease_and_debt_go_back_to_the_shared_bucket() {
        let backend = Arc::new(MemoryBackend::default());
        let leased = budget(&backend, 1000, MINUTE, FailurePolicy::Open);
        // Demand ramps the batch up to its ceiling (2% of 1,000 = 20 tokens).
        for _ in 0..50 {
            assert_eq!(leased.acquire(1, 1).await, Ok(Passed::Metered));
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        let held = leased.state.lock().balance;
        assert!(held > 0.0 && held <= 20.0, "{held}");
        // Output charged beyond the lease: the balance goes into debt.
        leased.charge(500.0);
        tokio::time::sleep(LEASE_IDLE_RETURN + Duration::from_millis(10)).await;
        assert_eq!(leased.state.lock().balance, 0.0, "returned");
        // 1,000 - what was leased and used (~50) - the debt (~490) + a second of refill (~17).
        let level = backend.level("k").expect("bucket");
        assert!(level > 400.0 && level < 500.0, "debt paid: {level}");
    }

    #[tokio::test(start_paused = true)]
    async fn redis_down_fails_open_or_closed_without_hanging_and_recovers() {
        let backend = Arc::new(MemoryBackend::default());
        let open = budget(&backend, 100, MINUTE, FailurePolicy::Open);
        let closed = LeasedBudget::new(
            Arc::from("other"),
            100,
            MINUTE,
            FailurePolicy::Close,
            backend.clone(),
        );
        backend.hanging.store(true, Ordering::Relaxed);
        let started = Instant::now();
        assert_eq!(open.acquire(10, 10).await, Ok(Passed::Unmetered));
        assert_eq!(
            started.elapsed(),
            EXCHANGE_TIMEOUT,
            "bounded by the exchange timeout"
        );
        assert_eq!(closed.acquire(10, 10).await, Err(Refusal::Unavailable));
        // While down, no request waits for Redis again.
        let calls = backend.calls.load(Ordering::Relaxed);
        let started = Instant::now();
        for _ in 0..100 {
            assert_eq!(open.acquire(10, 10).await, Ok(Passed::Unmetered));
            assert_eq!(closed.acquire(10, 10).await, Err(Refusal::Unavailable));
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(backend.calls.load(Ordering::Relaxed), calls);
        backend.hanging.store(false, Ordering::Relaxed);
        backend.failing.store(true, Ordering::Relaxed);
        tokio::time::advance(BACKEND_RETRY_INTERVAL).await;
        assert_eq!(closed.acquire(10, 10).await, Err(Refusal::Unavailable));
        backend.failing.store(false, Ordering::Relaxed);
        tokio::time::advance(BACKEND_RETRY_INTERVAL).await;
        assert_eq!(open.acquire(10, 10).await, Ok(Passed::Metered));
        assert_eq!(closed.acquire(10, 10).await, Ok(Passed::Metered));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_exchange() {
        let backend = Arc::new(MemoryBackend::default());
        let leased = budget(&backend, 100_000, MINUTE, FailurePolicy::Open);
        backend.delay_ms.store(5, Ordering::Relaxed);
        let calls = backend.calls.load(Ordering::Relaxed);
        let requests: Vec<_> = (0..50)
            .map(|_| {
                let leased = leased.clone();
                tokio::spawn(async move { leased.acquire(10, 10).await })
            })
            .collect();
        for request in requests {
            assert_eq!(request.await.expect("joined"), Ok(Passed::Metered));
        }
        let used = backend.calls.load(Ordering::Relaxed) - calls;
        assert!(used <= 5, "{used} exchanges for 50 concurrent requests");
    }
}
