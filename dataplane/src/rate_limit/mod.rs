//! Token rate limits: the budgets of ModelRoutes (`spec.rateLimit`, shared by
//! every route serving the same model name, as Kthena keys them) and of the
//! router configuration's tiers (per user), each local to this dataplane or
//! shared through Redis.
//!
//! How a request is charged:
//! - before it is forwarded, its estimated input tokens
//!   ([`crate::token_estimate`]) are taken from every input budget that
//!   applies, and every output budget must hold at least one token;
//! - when its response ends, input the engine counted beyond the estimate
//!   and all of its output are charged, even past what is left (the budget
//!   goes into debt and later requests wait for it to be paid back). An
//!   estimate above the engine's count is not refunded, so a budget means
//!   what it means to Kthena, where the estimate is the whole charge. A
//!   request the router could not deliver to any engine is refunded.
//!
//! Budgets live across snapshots: a snapshot that keeps a limit keeps its
//! state (a changed number applies to the tokens already used), one that
//! drops it drops the budget.

pub mod bucket;
pub mod lease;
pub mod redis;

use std::collections::{HashMap, HashSet};

use crate::fast_map::FastMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use parking_lot::Mutex;
use prometheus::{IntCounterVec, Opts, Registry};
use switchyard_snapshot::pb;
use tokio::time::Instant;

use crate::auth::User;
use bucket::TokenBucket;
use lease::{FailurePolicy, LeaseBackend, LeasedBudget, Passed, Refusal};

pub use redis::KEY_PREFIX;

/// Which budget refused a request (the `limit_type` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitType {
    InputTokens,
    OutputTokens,
}

impl LimitType {
    pub const ALL: [Self; 2] = [Self::InputTokens, Self::OutputTokens];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InputTokens => "input_tokens",
            Self::OutputTokens => "output_tokens",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Self::InputTokens => "input",
            Self::OutputTokens => "output",
        }
    }
}

/// Why a snapshot's limits could not be used (the snapshot is NACKed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitConfigError {
    #[error("{scope}: unknown rate limit unit {unit:?} (second, minute, hour, day, month)")]
    UnknownUnit { scope: String, unit: String },
    #[error("{scope}: invalid Redis address {address:?}: expected host:port")]
    InvalidRedisAddress { scope: String, address: String },
}

/// The period a budget refills over.
fn unit_duration(unit: &str) -> Option<Duration> {
    const DAY: u64 = 24 * 3600;
    Some(Duration::from_secs(match unit {
        "" | "second" => 1,
        "minute" => 60,
        "hour" => 3600,
        "day" => DAY,
        "month" => 30 * DAY,
        _ => return None,
    }))
}

/// One budget: a bucket in this dataplane, or a lease on a shared one.
#[derive(Debug)]
pub enum Budget {
    Local(Mutex<TokenBucket>),
    Leased(Arc<LeasedBudget>),
}

impl Budget {
    async fn acquire(&self, take: u64, need: u64) -> Result<Passed, Refusal> {
        match self {
            Self::Local(bucket) => bucket
                .lock()
                .try_take(take, need, Instant::now())
                .map(|()| Passed::Metered)
                .map_err(|shortfall| Refusal::Exhausted(shortfall.retry_after)),
            Self::Leased(leased) => leased.acquire(take, need).await,
        }
    }

    fn charge(&self, tokens: f64) {
        if tokens == 0.0 {
            return;
        }
        match self {
            Self::Local(bucket) => bucket.lock().charge(tokens, Instant::now()),
            Self::Leased(leased) => leased.charge(tokens),
        }
    }

    /// (limit, tokens left, time until full).
    fn status(&self) -> (f64, f64, Duration) {
        match self {
            Self::Local(bucket) => {
                let mut bucket = bucket.lock();
                let level = bucket.level(Instant::now());
                let capacity = bucket.capacity();
                (
                    capacity,
                    level,
                    bucket::refill_time(capacity - level, bucket.rate()),
                )
            }
            Self::Leased(leased) => leased.status(),
        }
    }

    /// Whether dropping it loses nothing: a full local bucket, an idle lease.
    fn is_idle(&self) -> bool {
        let (limit, remaining, _) = self.status();
        remaining >= limit
    }
}

/// How a budget is configured; a budget is reused by a new snapshot when
/// its backend (local, or which Redis) is unchanged.
#[derive(Debug, Clone, PartialEq)]
struct BudgetSpec {
    limit: u32,
    unit: Duration,
    redis: Option<(String, FailurePolicy)>,
}

/// A limit of one scope (a model, or the users of a tier) in both directions.
#[derive(Debug, Clone, PartialEq)]
struct LimitSpec {
    input: Option<BudgetSpec>,
    output: Option<BudgetSpec>,
    unit_name: String,
}

impl LimitSpec {
    fn parse(scope: &str, limit: &pb::RateLimit) -> Result<Self, RateLimitConfigError> {
        let unit = unit_duration(&limit.unit).ok_or_else(|| RateLimitConfigError::UnknownUnit {
            scope: scope.to_owned(),
            unit: limit.unit.clone(),
        })?;
        let redis = if limit.global_redis_address.is_empty() {
            None
        } else {
            let address = &limit.global_redis_address;
            let valid = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(RateLimitConfigError::InvalidRedisAddress {
                    scope: scope.to_owned(),
                    address: address.clone(),
                });
            }
            let policy = if limit.redis_failure_policy == pb::RedisFailurePolicy::FailClose as i32 {
                FailurePolicy::Close
            } else {
                FailurePolicy::Open
            };
            Some((address.clone(), policy))
        };
        let budget = |tokens: u32| {
            (tokens > 0).then(|| BudgetSpec {
                limit: tokens,
                unit,
                redis: redis.clone(),
            })
        };
        Ok(Self {
            input: budget(limit.input_tokens_per_unit),
            output: budget(limit.output_tokens_per_unit),
            unit_name: if limit.unit.is_empty() {
                "second".to_owned()
            } else {
                limit.unit.clone()
            },
        })
    }

    fn describe(&self, limit_type: LimitType) -> String {
        let tokens = match limit_type {
            LimitType::InputTokens => self.input.as_ref(),
            LimitType::OutputTokens => self.output.as_ref(),
        }
        .map_or(0, |budget| budget.limit);
        format!(
            "{tokens} {} tokens per {}",
            limit_type.noun(),
            self.unit_name
        )
    }
}

/// The limits a snapshot configures, validated; applying it creates or
/// reuses budgets ([`RateLimiting::apply`]).
#[derive(Debug, Default)]
pub struct RateLimitPlan {
    /// (budget scope, request model names it covers, spec), oldest route first.
    models: Vec<(String, Vec<String>, LimitSpec)>,
    tiers: Vec<(String, LimitSpec)>,
}

impl RateLimitPlan {
    /// Reads the limits of `config`. Routes sharing a model name share one
    /// budget, configured by the oldest of them that has a limit; a route
    /// serving only LoRA adapters has a budget of its own for them.
    pub fn parse(config: &pb::RouteConfig) -> Result<Self, RateLimitConfigError> {
        let mut plan = Self::default();
        let mut covered: HashSet<&str> = HashSet::new();
        for route in &config.routes {
            let Some(limit) = &route.rate_limit else {
                continue;
            };
            let route_key = switchyard_snapshot::object_key(&route.namespace, &route.name);
            let scope = if route.model_name.is_empty() {
                format!("route {route_key}")
            } else {
                format!("model {}", route.model_name)
            };
            let spec = LimitSpec::parse(&format!("ModelRoute {route_key}"), limit)?;
            if spec.input.is_none() && spec.output.is_none() {
                continue;
            }
            let names: Vec<String> = std::iter::once(&route.model_name)
                .chain(&route.lora_adapters)
                .filter(|name| !name.is_empty() && !covered.contains(name.as_str()))
                .cloned()
                .collect();
            if names.is_empty() || plan.models.iter().any(|(existing, ..)| *existing == scope) {
                continue;
            }
            covered.extend(
                std::iter::once(&route.model_name)
                    .chain(&route.lora_adapters)
                    .map(String::as_str),
            );
            plan.models.push((scope, names, spec));
        }
        for tier in &config.tier_rate_limits {
            let Some(limit) = &tier.limit else {
                continue;
            };
            let spec = LimitSpec::parse(&format!("tier {}", tier.tier), limit)?;
            if spec.input.is_some() || spec.output.is_some() {
                plan.tiers.push((tier.tier.clone(), spec));
            }
        }
        Ok(plan)
    }
}

/// The budgets of one scope.
#[derive(Debug)]
struct ScopeBudgets {
    /// "model m", "route ns/name" or "user u of tier t": names the scope in
    /// 429 messages.
    scope: String,
    spec: LimitSpec,
    input: Option<Arc<Budget>>,
    output: Option<Arc<Budget>>,
}

/// Users of one tier: a budget pair per user, created on first use.
#[derive(Debug)]
struct TierBudgets {
    tier: String,
    spec: LimitSpec,
    /// Sharded so requests of different users rarely share a lock.
    shards: Vec<Mutex<HashMap<String, Arc<ScopeBudgets>>>>,
    hasher: std::collections::hash_map::RandomState,
    backends: Arc<Backends>,
}

/// Shards of a tier's user map.
const TIER_SHARDS: usize = 16;
/// A shard holding more users than this drops the idle ones (full buckets,
/// returned leases) when it takes a new one: they would start full anyway.
const TIER_SHARD_PRUNE_AT: usize = 4096;

impl TierBudgets {
    fn user(&self, user_id: &str) -> Arc<ScopeBudgets> {
        let shard = &self.shards[(self.hasher.hash_one(user_id) as usize) % TIER_SHARDS];
        let mut users = shard.lock();
        if let Some(found) = users.get(user_id) {
            return found.clone();
        }
        if users.len() >= TIER_SHARD_PRUNE_AT {
            users.retain(|_, budgets| {
                !budgets
                    .input
                    .iter()
                    .chain(&budgets.output)
                    .all(|b| b.is_idle())
            });
        }
        let key = format!("tier:{}:user:{user_id}", self.tier);
        let budgets = Arc::new(ScopeBudgets {
            scope: format!("user {user_id} of tier {}", self.tier),
            spec: self.spec.clone(),
            input: self
                .spec
                .input
                .as_ref()
                .map(|spec| self.backends.new_budget(&format!("{key}:input"), spec)),
            output: self
                .spec
                .output
                .as_ref()
                .map(|spec| self.backends.new_budget(&format!("{key}:output"), spec)),
        });
        users.insert(user_id.to_owned(), budgets.clone());
        budgets
    }
}

/// Redis servers by address, shared by every budget that names one.
#[derive(Debug)]
struct Backends {
    redis: Mutex<HashMap<String, Arc<dyn LeaseBackend>>>,
    exchanges: IntCounterVec,
    #[cfg(test)]
    override_backend: Mutex<Option<Arc<dyn LeaseBackend>>>,
}

impl Backends {
    fn backend(&self, address: &str) -> Arc<dyn LeaseBackend> {
        #[cfg(test)]
        if let Some(backend) = self.override_backend.lock().clone() {
            return backend;
        }
        self.redis
            .lock()
            .entry(address.to_owned())
            .or_insert_with(|| {
                Arc::new(redis::RedisBackend::new(
                    address,
                    self.exchanges.with_label_values(&[address, "ok"]),
                    self.exchanges.with_label_values(&[address, "error"]),
                ))
            })
            .clone()
    }

    fn new_budget(&self, key: &str, spec: &BudgetSpec) -> Arc<Budget> {
        Arc::new(match &spec.redis {
            None => Budget::Local(Mutex::new(TokenBucket::new(
                spec.limit,
                spec.unit,
                Instant::now(),
            ))),
            Some((address, policy)) => Budget::Leased(LeasedBudget::new(
                Arc::from(key),
                spec.limit,
                spec.unit,
                *policy,
                self.backend(address),
            )),
        })
    }

    /// The budget for `spec`: `previous` reconfigured when it has the same
    /// backend, else a new one.
    fn reuse_or_new(
        &self,
        key: &str,
        spec: &BudgetSpec,
        previous: Option<(&BudgetSpec, &Arc<Budget>)>,
    ) -> Arc<Budget> {
        match previous {
            Some((old, budget))
                if old.redis.as_ref().map(|(address, _)| address)
                    == spec.redis.as_ref().map(|(address, _)| address) =>
            {
                match &**budget {
                    Budget::Local(bucket) => {
                        bucket
                            .lock()
                            .reconfigure(spec.limit, spec.unit, Instant::now())
                    }
                    Budget::Leased(leased) => leased.reconfigure(
                        spec.limit,
                        spec.unit,
                        spec.redis.as_ref().map_or(FailurePolicy::Open, |(_, p)| *p),
                    ),
                }
                budget.clone()
            }
            _ => self.new_budget(key, spec),
        }
    }
}

impl Default for RateLimiting {
    /// Budgets whose metrics are not exported (tests, tools).
    fn default() -> Self {
        Self::new(None).expect("constant metric names are valid")
    }
}

/// The limits of the applied snapshot.
#[derive(Debug, Default)]
pub struct RateLimits {
    by_model: FastMap<String, Arc<ScopeBudgets>>,
    tiers: FastMap<String, Arc<TierBudgets>>,
}

/// State shared by the limits of successive snapshots: the budgets in use,
/// the Redis connections, the metrics.
#[derive(Debug)]
pub struct RateLimiting {
    backends: Arc<Backends>,
    current: Mutex<Arc<RateLimits>>,
    /// `switchyard_rate_limit_unmetered_total{model, limit_type}`.
    unmetered: IntCounterVec,
}

impl RateLimiting {
    pub fn new(registry: Option<&Registry>) -> prometheus::Result<Self> {
        let exchanges = IntCounterVec::new(
            Opts::new(
                "switchyard_rate_limit_redis_exchanges_total",
                "Lease exchanges with the Redis of global token budgets, by outcome",
            ),
            &["address", "outcome"],
        )?;
        let unmetered = IntCounterVec::new(
            Opts::new(
                "switchyard_rate_limit_unmetered_total",
                "Requests admitted without a global token budget because its Redis was unreachable (fail open)",
            ),
            &["model", "limit_type"],
        )?;
        if let Some(registry) = registry {
            registry.register(Box::new(exchanges.clone()))?;
            registry.register(Box::new(unmetered.clone()))?;
        }
        Ok(Self {
            backends: Arc::new(Backends {
                redis: Mutex::new(HashMap::new()),
                exchanges,
                #[cfg(test)]
                override_backend: Mutex::new(None),
            }),
            current: Mutex::new(Arc::default()),
            unmetered,
        })
    }

    /// Every global budget uses `backend` instead of Redis.
    #[cfg(test)]
    fn with_backend(backend: Arc<dyn LeaseBackend>) -> Self {
        let limiting = Self::new(None).expect("metrics");
        *limiting.backends.override_backend.lock() = Some(backend);
        limiting
    }

    /// Builds the limits of a new snapshot, reusing the budgets that stay.
    pub fn apply(&self, plan: RateLimitPlan) -> Arc<RateLimits> {
        let mut current = self.current.lock();
        let previous = current.clone();
        let mut by_model = FastMap::default();
        for (scope, names, spec) in plan.models {
            let old = names
                .iter()
                .find_map(|name| previous.by_model.get(name))
                .filter(|old| old.scope == scope);
            let budget = |spec: Option<&BudgetSpec>, direction: &str| {
                spec.map(|spec| {
                    let previous = old.and_then(|old| match direction {
                        "input" => old.spec.input.as_ref().zip(old.input.as_ref()),
                        _ => old.spec.output.as_ref().zip(old.output.as_ref()),
                    });
                    self.backends.reuse_or_new(
                        &format!("{}:{direction}", scope.replace(' ', ":")),
                        spec,
                        previous,
                    )
                })
            };
            let budgets = Arc::new(ScopeBudgets {
                input: budget(spec.input.as_ref(), "input"),
                output: budget(spec.output.as_ref(), "output"),
                scope,
                spec,
            });
            for name in names {
                by_model.insert(name, budgets.clone());
            }
        }
        let mut tiers = FastMap::default();
        for (tier, spec) in plan.tiers {
            let reused = previous.tiers.get(&tier).filter(|old| {
                let backends = |spec: &LimitSpec| {
                    [&spec.input, &spec.output].map(|budget| {
                        budget
                            .as_ref()
                            .map(|budget| budget.redis.as_ref().map(|(address, _)| address.clone()))
                    })
                };
                backends(&old.spec) == backends(&spec)
            });
            let budgets = match reused {
                // Same backends: keep the users' state, apply the new numbers.
                Some(old) if old.spec == spec => old.clone(),
                Some(old) => {
                    let next = self.new_tier(&tier, spec);
                    for (shard, old_shard) in next.shards.iter().zip(&old.shards) {
                        let mut users = shard.lock();
                        for (user, old_user) in old_shard.lock().iter() {
                            let reuse = |spec: Option<&BudgetSpec>,
                                         old_spec: Option<&BudgetSpec>,
                                         old: Option<&Arc<Budget>>,
                                         direction: &str| {
                                spec.map(|spec| {
                                    self.backends.reuse_or_new(
                                        &format!("tier:{tier}:user:{user}:{direction}"),
                                        spec,
                                        old_spec.zip(old),
                                    )
                                })
                            };
                            users.insert(
                                user.clone(),
                                Arc::new(ScopeBudgets {
                                    scope: old_user.scope.clone(),
                                    spec: next.spec.clone(),
                                    input: reuse(
                                        next.spec.input.as_ref(),
                                        old.spec.input.as_ref(),
                                        old_user.input.as_ref(),
                                        "input",
                                    ),
                                    output: reuse(
                                        next.spec.output.as_ref(),
                                        old.spec.output.as_ref(),
                                        old_user.output.as_ref(),
                                        "output",
                                    ),
                                }),
                            );
                        }
                    }
                    next
                }
                None => self.new_tier(&tier, spec),
            };
            tiers.insert(tier, budgets);
        }
        let limits = Arc::new(RateLimits { by_model, tiers });
        *current = limits.clone();
        limits
    }

    fn new_tier(&self, tier: &str, spec: LimitSpec) -> Arc<TierBudgets> {
        Arc::new(TierBudgets {
            tier: tier.to_owned(),
            spec,
            shards: (0..TIER_SHARDS).map(|_| Mutex::default()).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            backends: self.backends.clone(),
        })
    }

    /// Counts a request admitted by a budget whose Redis was unreachable.
    fn count_unmetered(&self, model: &str, limit_type: LimitType) {
        self.unmetered
            .with_label_values(&[model, limit_type.as_str()])
            .inc();
    }
}

/// The `x-ratelimit-*` values of a response.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitStatus {
    pub limit: f64,
    pub remaining: f64,
    pub reset: Duration,
}

impl LimitStatus {
    /// `x-ratelimit-limit-tokens`, `x-ratelimit-remaining-tokens` and
    /// `x-ratelimit-reset-tokens` (OpenAI's duration format, e.g. `6m0s`).
    pub fn headers(&self) -> [(http::HeaderName, HeaderValue); 3] {
        let number = |value: f64| HeaderValue::from(value.max(0.0).floor() as u64);
        [
            (
                http::HeaderName::from_static("x-ratelimit-limit-tokens"),
                number(self.limit),
            ),
            (
                http::HeaderName::from_static("x-ratelimit-remaining-tokens"),
                number(self.remaining),
            ),
            (
                http::HeaderName::from_static("x-ratelimit-reset-tokens"),
                HeaderValue::from_str(&format_reset(self.reset))
                    .unwrap_or_else(|_| HeaderValue::from_static("0s")),
            ),
        ]
    }
}

/// `1h2m3s`, `6m0s`, `1s`, `250ms`: seconds rounded up above one second.
pub fn format_reset(reset: Duration) -> String {
    if reset.is_zero() {
        return "0s".to_owned();
    }
    if reset < Duration::from_secs(1) {
        return format!("{}ms", reset.as_millis().max(1));
    }
    let seconds = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
    let (hours, minutes, seconds) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    if hours > 0 {
        format!("{hours}h{minutes}m{seconds}s")
    } else if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

/// The most constraining of several budgets: the lowest share left.
fn tightest<'a>(budgets: impl Iterator<Item = &'a Arc<Budget>>) -> Option<LimitStatus> {
    budgets
        .map(|budget| {
            let (limit, remaining, reset) = budget.status();
            LimitStatus {
                limit,
                remaining,
                reset,
            }
        })
        .min_by(|a, b| {
            (a.remaining / a.limit)
                .partial_cmp(&(b.remaining / b.limit))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
}

/// A refused request.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub limit_type: LimitType,
    /// Names the limit, e.g. "input token rate limit exceeded for model m
    /// (30 input tokens per minute)".
    pub message: String,
    /// None when the request can never fit (or Redis is down and the policy
    /// is to refuse).
    pub retry_after: Option<Duration>,
    /// The global budget's Redis is unreachable and its policy is to refuse.
    pub unavailable: bool,
    pub status: Option<LimitStatus>,
}

impl Rejection {
    /// `Retry-After` in whole seconds, rounded up.
    pub fn retry_after_header(&self) -> Option<HeaderValue> {
        self.retry_after
            .map(|wait| HeaderValue::from(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)))
    }
}

/// What a request's response reported, to settle its charges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settlement {
    /// The request reached an engine (false: refund what was reserved).
    pub forwarded: bool,
    /// The engine's `usage.prompt_tokens`, when it reported usage.
    pub prompt_tokens: Option<u64>,
    /// Output produced: `usage.completion_tokens`, or for a stream cut short
    /// the content chunks delivered.
    pub output_tokens: u64,
}

/// The charges of one admitted request, settled when its response ends.
/// Dropped unsettled (the request went away mid-flight), it keeps what was
/// reserved.
#[derive(Debug)]
pub struct Admission {
    reserved_input: u64,
    /// Budgets that metered this request, input ones first.
    charged: Vec<(Arc<Budget>, LimitType)>,
    /// Every budget that applies, for the response headers.
    budgets: Vec<Arc<Budget>>,
}

impl Admission {
    /// The response's `x-ratelimit-*` values.
    pub fn status(&self) -> Option<LimitStatus> {
        tightest(self.budgets.iter())
    }

    /// Charges what the response reported.
    pub fn settle(self, settlement: Settlement) {
        for (budget, limit_type) in &self.charged {
            let tokens = match (limit_type, settlement.forwarded) {
                (LimitType::InputTokens, false) => -(self.reserved_input as f64),
                (LimitType::InputTokens, true) => settlement.prompt_tokens.map_or(0.0, |actual| {
                    actual.saturating_sub(self.reserved_input) as f64
                }),
                (LimitType::OutputTokens, false) => 0.0,
                (LimitType::OutputTokens, true) => settlement.output_tokens as f64,
            };
            budget.charge(tokens);
        }
    }
}

impl RateLimits {
    /// Whether any limit applies to a request for `model` by `user`
    /// (requests no limit applies to skip estimating their input).
    pub fn applies(&self, model: &str, user: Option<&User>) -> bool {
        self.by_model.contains_key(model) || self.tier_of(user).is_some()
    }

    fn tier_of<'a>(&'a self, user: Option<&'a User>) -> Option<(&'a Arc<TierBudgets>, &'a str)> {
        let user = user?;
        let tier = user.tier.as_deref()?;
        self.tiers
            .get(tier)
            .map(|budgets| (budgets, user.user_id.as_str()))
    }

    /// Checks and reserves every budget that applies: `estimate` input
    /// tokens from input budgets, one token's headroom in output budgets.
    /// None when no limit applies.
    pub async fn admit(
        &self,
        limiting: &RateLimiting,
        model: &str,
        user: Option<&User>,
        estimate: u64,
    ) -> Option<Result<Admission, Rejection>> {
        let route = self.by_model.get(model).cloned();
        let tier = self.tier_of(user).map(|(tier, user_id)| tier.user(user_id));
        if route.is_none() && tier.is_none() {
            return None;
        }
        let scopes: Vec<Arc<ScopeBudgets>> = route.into_iter().chain(tier).collect();
        let mut admission = Admission {
            reserved_input: estimate,
            charged: Vec::with_capacity(4),
            budgets: scopes
                .iter()
                .flat_map(|scope| scope.input.iter().chain(&scope.output).cloned())
                .collect(),
        };
        for limit_type in [LimitType::InputTokens, LimitType::OutputTokens] {
            for scope in &scopes {
                let (budget, take, need) = match limit_type {
                    LimitType::InputTokens => (&scope.input, estimate, estimate),
                    LimitType::OutputTokens => (&scope.output, 0, 1),
                };
                let Some(budget) = budget else {
                    continue;
                };
                match budget.acquire(take, need).await {
                    Ok(Passed::Metered) => admission.charged.push((budget.clone(), limit_type)),
                    Ok(Passed::Unmetered) => limiting.count_unmetered(model, limit_type),
                    Err(refusal) => {
                        // Give back what earlier budgets reserved for this request.
                        admission.settle(Settlement::default());
                        let description = scope.spec.describe(limit_type);
                        let (retry_after, unavailable, message) = match refusal {
                            Refusal::Exhausted(retry_after) => (
                                retry_after,
                                false,
                                format!(
                                    "{} token rate limit exceeded for {} ({description}){}",
                                    limit_type.noun(),
                                    scope.scope,
                                    if retry_after.is_none() {
                                        format!(
                                            ": the request needs {estimate} input tokens, more than the whole budget"
                                        )
                                    } else {
                                        String::new()
                                    }
                                ),
                            ),
                            Refusal::Unavailable => (
                                None,
                                true,
                                format!(
                                    "{} token rate limit for {} ({description}) cannot be checked: its Redis is unreachable",
                                    limit_type.noun(),
                                    scope.scope
                                ),
                            ),
                        };
                        return Some(Err(Rejection {
                            limit_type,
                            message,
                            retry_after,
                            unavailable,
                            status: tightest(std::iter::once(budget)),
                        }));
                    }
                }
            }
        }
        Some(Ok(admission))
    }
}

#[cfg(test)]
mod tests {
    use super::lease::memory::MemoryBackend;
    use super::*;

    fn route(
        name: &str,
        model: &str,
        adapters: &[&str],
        limit: Option<pb::RateLimit>,
    ) -> pb::ModelRoute {
        pb::ModelRoute {
            namespace: "default".into(),
            name: name.into(),
            model_name: model.into(),
            lora_adapters: adapters.iter().map(|a| (*a).to_owned()).collect(),
            rate_limit: limit,
            ..Default::default()
        }
    }

    fn limit(input: u32, output: u32, unit: &str) -> Option<pb::RateLimit> {
        Some(pb::RateLimit {
            input_tokens_per_unit: input,
            output_tokens_per_unit: output,
            unit: unit.into(),
            ..Default::default()
        })
    }

    fn config(
        routes: Vec<pb::ModelRoute>,
        tiers: Vec<(&str, Option<pb::RateLimit>)>,
    ) -> pb::RouteConfig {
        pb::RouteConfig {
            routes,
            tier_rate_limits: tiers
                .into_iter()
                .map(|(tier, limit)| pb::TierRateLimit {
                    tier: tier.into(),
                    limit,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn apply(limiting: &RateLimiting, config: &pb::RouteConfig) -> Arc<RateLimits> {
        limiting.apply(RateLimitPlan::parse(config).expect("valid"))
    }

    async fn admit(
        limits: &RateLimits,
        limiting: &RateLimiting,
        model: &str,
        user: Option<&User>,
        estimate: u64,
    ) -> Result<Admission, Rejection> {
        limits
            .admit(limiting, model, user, estimate)
            .await
            .expect("a limit applies")
    }

    fn served(prompt: u64, output: u64) -> Settlement {
        Settlement {
            forwarded: true,
            prompt_tokens: Some(prompt),
            output_tokens: output,
        }
    }

    /// Kthena's example: 30 input tokens per minute admits three "hello
    /// world" chats (10 tokens each), then refuses with a Retry-After, and
    /// admits again once the minute has refilled the bucket.
    #[tokio::test(start_paused = true)]
    async fn kthena_example_admits_three_hello_worlds_per_minute() {
        let limiting = RateLimiting::default();
        let limits = apply(
            &limiting,
            &config(
                vec![route("r", "deepseek", &[], limit(30, 100, "minute"))],
                vec![],
            ),
        );
        for _ in 0..3 {
            // The mock engine counts 2 prompt tokens: the estimate is not refunded.
            admit(&limits, &limiting, "deepseek", None, 10)
                .await
                .expect("admitted")
                .settle(served(2, 5));
        }
        let rejection = admit(&limits, &limiting, "deepseek", None, 10)
            .await
            .expect_err("the fourth is refused");
        assert_eq!(rejection.limit_type, LimitType::InputTokens);
        assert_eq!(
            rejection.message,
            "input token rate limit exceeded for model deepseek (30 input tokens per minute)"
        );
        assert_eq!(rejection.retry_after_header(), Some(HeaderValue::from(20)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            admit(&limits, &limiting, "deepseek", None, 10)
                .await
                .is_err()
        );
        tokio::time::advance(Duration::from_secs(50)).await;
        let admitted = admit(&limits, &limiting, "deepseek", None, 10)
            .await
            .expect("refilled after a minute");
        let status = admitted.status().expect("limited");
        assert_eq!((status.limit, status.remaining.floor()), (30.0, 20.0));
        assert!(limits.admit(&limiting, "other", None, 10).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn output_is_charged_in_full_into_debt_and_the_next_request_waits() {
        let limiting = RateLimiting::default();
        let limits = apply(
            &limiting,
            &config(vec![route("r", "m", &[], limit(0, 100, "minute"))], vec![]),
        );
        admit(&limits, &limiting, "m", None, 10)
            .await
            .expect("one token of headroom is enough")
            .settle(served(10, 250));
        let rejection = admit(&limits, &limiting, "m", None, 10)
            .await
            .expect_err("150 tokens of debt");
        assert_eq!(rejection.limit_type, LimitType::OutputTokens);
        // 151 tokens at 100 per minute = 90.6 s.
        assert_eq!(rejection.retry_after_header(), Some(HeaderValue::from(91)));
        tokio::time::advance(Duration::from_secs(91)).await;
        assert!(admit(&limits, &limiting, "m", None, 10).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn input_above_the_estimate_is_charged_and_undelivered_requests_refunded() {
        let limiting = RateLimiting::default();
        let limits = apply(
            &limiting,
            &config(vec![route("r", "m", &[], limit(100, 0, "hour"))], vec![]),
        );
        admit(&limits, &limiting, "m", None, 10)
            .await
            .expect("admitted")
            .settle(served(40, 0));
        let status = admit(&limits, &limiting, "m", None, 10)
            .await
            .expect("admitted");
        assert_eq!(status.status().expect("limited").remaining.floor(), 50.0);
        status.settle(Settlement::default());
        let after_refund = admit(&limits, &limiting, "m", None, 50)
            .await
            .expect("refunded");
        assert_eq!(
            after_refund.status().expect("limited").remaining.floor(),
            10.0
        );
        let never = admit(&limits, &limiting, "m", None, 101)
            .await
            .expect_err("too big");
        assert_eq!(never.retry_after, None);
        assert_eq!(never.retry_after_header(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn routes_sharing_a_model_share_a_budget_and_lora_only_routes_are_limited() {
        let limiting = RateLimiting::default();
        let limits = apply(
            &limiting,
            &config(
                vec![
                    route("old", "m", &["m-lora"], limit(20, 0, "minute")),
                    route("new", "m", &[], limit(1000, 0, "minute")),
                    route("adapters", "", &["a", "b"], limit(10, 0, "minute")),
                ],
                vec![],
            ),
        );
        admit(&limits, &limiting, "m", None, 10).await.expect("1st");
        admit(&limits, &limiting, "m-lora", None, 10)
            .await
            .expect("2nd: same budget");
        let rejection = admit(&limits, &limiting, "m", None, 10)
            .await
            .expect_err("oldest route's 20");
        assert!(
            rejection.message.contains("model m (20 input"),
            "{}",
            rejection.message
        );
        admit(&limits, &limiting, "a", None, 10)
            .await
            .expect("LoRA-only route");
        let rejection = admit(&limits, &limiting, "b", None, 10)
            .await
            .expect_err("shared by its adapters");
        assert!(
            rejection.message.contains("route default/adapters"),
            "{}",
            rejection.message
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tiers_give_each_user_a_budget_on_top_of_the_route() {
        let limiting = RateLimiting::default();
        let limits = apply(
            &limiting,
            &config(
                vec![route("r", "m", &[], limit(1000, 0, "minute"))],
                vec![
                    ("free", limit(20, 0, "minute")),
                    ("gold", limit(100, 0, "minute")),
                ],
            ),
        );
        let user = |id: &str, tier: Option<&str>| User {
            user_id: id.into(),
            tier: tier.map(str::to_owned),
        };
        let (alice, bob, carol) = (
            user("alice", Some("free")),
            user("bob", Some("free")),
            user("carol", Some("gold")),
        );
        for _ in 0..2 {
            admit(&limits, &limiting, "m", Some(&alice), 10)
                .await
                .expect("alice");
        }
        let rejection = admit(&limits, &limiting, "m", Some(&alice), 10)
            .await
            .expect_err("alice is out");
        assert_eq!(
            rejection.message,
            "input token rate limit exceeded for user alice of tier free (20 input tokens per minute)"
        );
        admit(&limits, &limiting, "m", Some(&bob), 10)
            .await
            .expect("bob has his own budget");
        for _ in 0..10 {
            admit(&limits, &limiting, "m", Some(&carol), 10)
                .await
                .expect("gold");
        }
        // A tier limits users on models without a route limit too; an unknown tier limits nothing.
        assert!(
            limits
                .admit(&limiting, "unlimited", Some(&bob), 10)
                .await
                .is_some()
        );
        assert!(
            limits
                .admit(
                    &limiting,
                    "unlimited",
                    Some(&user("dan", Some("platinum"))),
                    10
                )
                .await
                .is_none()
        );
        assert!(limits.applies("unlimited", Some(&bob)));
        assert!(!limits.applies("unlimited", None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_snapshot_keeps_budgets_and_removing_a_limit_removes_it() {
        let limiting = RateLimiting::default();
        let limits = apply(
            &limiting,
            &config(vec![route("r", "m", &[], limit(30, 0, "minute"))], vec![]),
        );
        for _ in 0..3 {
            admit(&limits, &limiting, "m", None, 10)
                .await
                .expect("admitted");
        }
        // A pod change republishes the same limit: the budget stays spent.
        let same = apply(
            &limiting,
            &config(vec![route("r", "m", &[], limit(30, 0, "minute"))], vec![]),
        );
        assert!(admit(&same, &limiting, "m", None, 10).await.is_err());
        // A raised limit applies to what was used: 30 used of 60.
        let raised = apply(
            &limiting,
            &config(vec![route("r", "m", &[], limit(60, 0, "minute"))], vec![]),
        );
        assert!(
            admit(&raised, &limiting, "m", None, 10).await.is_err(),
            "no tokens were added"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            admit(&raised, &limiting, "m", None, 10).await.is_ok(),
            "refills at 60 per minute"
        );
        let removed = apply(&limiting, &config(vec![route("r", "m", &[], None)], vec![]));
        assert!(removed.admit(&limiting, "m", None, 10).await.is_none());
        let back = apply(
            &limiting,
            &config(vec![route("r", "m", &[], limit(30, 0, "minute"))], vec![]),
        );
        for _ in 0..3 {
            admit(&back, &limiting, "m", None, 10)
                .await
                .expect("a new budget starts full");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn global_limits_fail_open_or_closed() {
        let backend = Arc::new(MemoryBackend::default());
        let limiting = RateLimiting::with_backend(backend.clone());
        let global = |policy: pb::RedisFailurePolicy| {
            Some(pb::RateLimit {
                input_tokens_per_unit: 100,
                unit: "minute".into(),
                global_redis_address: "127.0.0.1:6379".into(),
                redis_failure_policy: policy as i32,
                ..Default::default()
            })
        };
        let limits = apply(
            &limiting,
            &config(
                vec![
                    route(
                        "open",
                        "open",
                        &[],
                        global(pb::RedisFailurePolicy::FailOpen),
                    ),
                    route(
                        "closed",
                        "closed",
                        &[],
                        global(pb::RedisFailurePolicy::FailClose),
                    ),
                ],
                vec![],
            ),
        );
        assert!(admit(&limits, &limiting, "open", None, 10).await.is_ok());
        backend
            .failing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        admit(&limits, &limiting, "open", None, 95)
            .await
            .expect("fail open");
        assert_eq!(
            limiting
                .unmetered
                .with_label_values(&["open", "input_tokens"])
                .get(),
            1
        );
        let rejection = admit(&limits, &limiting, "closed", None, 10)
            .await
            .expect_err("fail closed");
        assert!(rejection.unavailable && rejection.retry_after.is_none());
        assert!(
            rejection.message.contains("Redis is unreachable"),
            "{}",
            rejection.message
        );
    }

    #[test]
    fn invalid_limits_are_reported() {
        let bad_unit = config(vec![route("r", "m", &[], limit(1, 0, "fortnight"))], vec![]);
        assert_eq!(
            RateLimitPlan::parse(&bad_unit)
                .expect_err("unit")
                .to_string(),
            "ModelRoute default/r: unknown rate limit unit \"fortnight\" (second, minute, hour, day, month)"
        );
        let mut bad_address = limit(1, 0, "minute");
        if let Some(limit) = bad_address.as_mut() {
            limit.global_redis_address = "redis".into();
        }
        assert!(RateLimitPlan::parse(&config(vec![], vec![("t", bad_address)])).is_err());
    }

    #[test]
    fn reset_durations_read_like_openai() {
        for (duration, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1500), "2s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_secs(3725), "1h2m5s"),
        ] {
            assert_eq!(format_reset(duration), text);
        }
    }
}
