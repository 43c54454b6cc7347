//! Global token budgets against a real Redis: the Lua script's arithmetic and
//! key expiry, one script load then calls by SHA (and a reload after
//! NOSCRIPT), three lease holders (three dataplanes) sharing one budget at
//! 1,000 requests per second, and Redis killed mid-run.
//!
//! Real time, as Redis's clock is: each test runs for a few seconds at most.

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use switchyard_dataplane::rate_limit::KEY_PREFIX;
use switchyard_dataplane::rate_limit::lease::{
    EXCHANGE_TIMEOUT, FailurePolicy, LeaseBackend, LeasedBudget, MAX_LEASE_FRACTION, Passed,
    Refusal,
};
use switchyard_dataplane::rate_limit::redis::RedisBackend;
use switchyard_e2e::redis_server::RedisServer;
use switchyard_runtime::clock;

const MINUTE: Duration = Duration::from_secs(60);
const SECOND: Duration = Duration::from_secs(1);

fn backend(redis: &RedisServer) -> Arc<dyn LeaseBackend> {
    let counter = |name: &str| IntCounter::new(name, "test").expect("counter");
    Arc::new(RedisBackend::new(
        &redis.address(),
        counter("ok"),
        counter("failed"),
    ))
}

fn budget(
    backend: &Arc<dyn LeaseBackend>,
    key: &str,
    limit: u32,
    unit: Duration,
    policy: FailurePolicy,
) -> Arc<LeasedBudget> {
    LeasedBudget::new(Arc::from(key), limit, unit, policy, backend.clone())
}

#[tokio::test]
async fn kthena_global_example_on_redis_with_an_expiring_key_and_one_script_load() {
    let redis = RedisServer::start().await;
    // Three dataplanes: three connections to the same Redis.
    let backends: Vec<_> = (0..3).map(|_| backend(&redis)).collect();
    let dataplanes: Vec<_> = backends
        .iter()
        .map(|backend| {
            budget(
                backend,
                "model:deepseek:input",
                10,
                MINUTE,
                FailurePolicy::Open,
            )
        })
        .collect();
    assert_eq!(dataplanes[0].acquire(10, 10).await, Ok(Passed::Metered));
    for dataplane in &dataplanes {
        match dataplane.acquire(10, 10).await {
            Err(Refusal::Exhausted(Some(wait))) => {
                assert!(wait > Duration::from_secs(55) && wait <= MINUTE, "{wait:?}")
            }
            other => panic!("expected a refusal with a wait, got {other:?}"),
        }
    }
    // The bucket expires when it would be full again: within the minute.
    let ttl = redis
        .command(&format!("PTTL {KEY_PREFIX}model:deepseek:input"))
        .expect("PTTL");
    let ttl: i64 = ttl.trim_start_matches(':').parse().expect("integer reply");
    assert!(ttl > 55_000 && ttl <= 61_000, "PTTL {ttl}");
    // Each connection loaded the script once; every exchange was an EVALSHA.
    let exchanges: u64 = dataplanes.iter().map(|d| d.exchanges()).sum();
    assert_eq!(redis.command_calls("evalsha"), exchanges);
    assert_eq!(redis.command_calls("script|load"), 3);
    assert_eq!(redis.command_calls("eval"), 0);

    // A flushed script cache (a Redis restart, failover) is reloaded on NOSCRIPT.
    assert_eq!(redis.command("SCRIPT FLUSH").as_deref(), Some("+OK"));
    let other = budget(
        &backends[1],
        "model:other:input",
        10,
        MINUTE,
        FailurePolicy::Close,
    );
    assert_eq!(other.acquire(10, 10).await, Ok(Passed::Metered));
    assert_eq!(redis.command_calls("script|load"), 4);
}

/// Drives `dataplanes` with 1,000 requests per second of 10 tokens in
/// total for `run`; returns (requests, admitted tokens, seconds from the
/// first request to the last).
async fn drive(dataplanes: &[Arc<LeasedBudget>], run: Duration) -> (u64, f64, f64) {
    let interval = Duration::from_micros(1_000 * dataplanes.len() as u64);
    let started = clock::now();
    let tasks: Vec<_> = dataplanes
        .iter()
        .map(|dataplane| {
            let dataplane = dataplane.clone();
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let (mut requests, mut admitted, mut last) = (0u64, 0u64, started);
                while started.elapsed() < run {
                    ticker.tick().await;
                    requests += 1;
                    last = clock::now();
                    match dataplane.acquire(10, 10).await {
                        Ok(Passed::Metered) => admitted += 10,
                        Ok(Passed::Unmetered) | Err(Refusal::Unavailable) => {
                            panic!("Redis is up")
                        }
                        Err(Refusal::Exhausted(_)) => {}
                    }
                }
                (requests, admitted, last)
            })
        })
        .collect();
    let (mut requests, mut admitted, mut last) = (0u64, 0u64, started);
    for task in tasks {
        let (r, a, l) = task.await.expect("joined");
        requests += r;
        admitted += a;
        last = last.max(l);
    }
    (requests, admitted as f64, (last - started).as_secs_f64())
}

fn shared_budget(
    redis: &RedisServer,
    key: &str,
    limit: u32,
    unit: Duration,
) -> Vec<Arc<LeasedBudget>> {
    (0..3)
        .map(|_| budget(&backend(redis), key, limit, unit, FailurePolicy::Close))
        .collect()
}

/// Three dataplanes at 1,000 requests per second in total against a
/// per-minute budget that covers them: every request passes, with about one
/// Redis call per hundred requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_1000_requests_per_second_a_fraction_of_a_redis_call_per_request() {
    let redis = RedisServer::start().await;
    let dataplanes = shared_budget(&redis, "model:busy:input", 600_000, MINUTE);
    let (requests, admitted, elapsed) = drive(&dataplanes, Duration::from_secs(3)).await;
    let calls = redis.command_calls("evalsha");
    eprintln!(
        "{requests} requests in {elapsed:.2} s, {admitted} tokens admitted, {calls} Redis calls ({:.4} per request)",
        calls as f64 / requests as f64
    );
    assert_eq!(
        admitted,
        requests as f64 * 10.0,
        "the budget covers the load"
    );
    assert!(requests >= 1_500, "load generator too slow: {requests}");
    assert!(
        (calls as f64) / (requests as f64) <= 0.2,
        "{calls} calls for {requests} requests"
    );
}

/// The same load against a budget of half of it, 5,000 tokens per second,
/// for three seconds: admitted tokens stay within the stated bound below
/// the ideal `C + r·T` and never above it.
///
/// The budget's unit is a second, not a minute, so the run takes seconds
/// instead of a minute with the same ratio of run time to unit; the bound
/// is in tokens (a lease is at most a share of the budget), so it holds at
/// either scale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_dataplanes_share_an_exhausted_budget_within_the_bound() {
    let redis = RedisServer::start().await;
    let limit = 5_000;
    let dataplanes = shared_budget(&redis, "model:shared:input", limit, SECOND);
    let (requests, admitted, elapsed) = drive(&dataplanes, Duration::from_secs(3)).await;
    let calls = redis.command_calls("evalsha");
    let ideal = f64::from(limit) * (1.0 + elapsed);
    let bound = 3.0 * (2.0 * MAX_LEASE_FRACTION * f64::from(limit) + 10.0);
    eprintln!(
        "{requests} requests in {elapsed:.2} s, admitted {admitted} tokens of ideal {ideal:.0} ({:+.2}%, bound -{bound}), {calls} Redis calls ({:.3} per request)",
        (admitted - ideal) / ideal * 100.0,
        calls as f64 / requests as f64
    );
    assert!(
        requests as f64 * 10.0 >= 1.2 * ideal,
        "load generator too slow: {requests}"
    );
    assert!(
        admitted <= ideal + 1.0,
        "over-admitted: {admitted} > {ideal}"
    );
    assert!(admitted >= ideal - bound, "{admitted} < {ideal} - {bound}");
}

#[tokio::test]
async fn redis_killed_mid_run_fails_open_or_closed_quickly_and_recovers() {
    let mut redis = RedisServer::start().await;
    let backend = backend(&redis);
    let open = budget(
        &backend,
        "model:open:input",
        1_000,
        MINUTE,
        FailurePolicy::Open,
    );
    let closed = budget(
        &backend,
        "model:closed:input",
        1_000,
        MINUTE,
        FailurePolicy::Close,
    );
    assert_eq!(open.acquire(10, 10).await, Ok(Passed::Metered));
    assert_eq!(closed.acquire(10, 10).await, Ok(Passed::Metered));
    // The first batch is exactly the first request: the next one needs Redis.
    redis.kill();
    let started = clock::now();
    assert_eq!(open.acquire(10, 10).await, Ok(Passed::Unmetered));
    assert_eq!(closed.acquire(10, 10).await, Err(Refusal::Unavailable));
    assert!(
        started.elapsed() < 2 * EXCHANGE_TIMEOUT + Duration::from_millis(500),
        "never a hung request: {:?}",
        started.elapsed()
    );
    redis.restart().await;
    // The failure policy holds for a second, then Redis is tried again.
    let recovered = clock::now() + Duration::from_secs(10);
    loop {
        if open.acquire(10, 10).await == Ok(Passed::Metered)
            && closed.acquire(10, 10).await == Ok(Passed::Metered)
        {
            break;
        }
        assert!(
            clock::now() < recovered,
            "did not recover after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
