//! The token bucket every budget is: `limit` tokens of capacity, refilled
//! continuously at `limit` per unit, starting full (so a fresh budget admits a
//! burst of `limit`, as Kthena's does). Charges after the fact may take it
//! below zero: that debt is paid back by refill before anything else passes.

use std::time::Duration;

use tokio::time::Instant;

/// A bucket in memory (local budgets, and the unit tests of the leasing logic).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    /// Tokens per second.
    rate: f64,
    tokens: f64,
    updated: Instant,
}

/// Why tokens could not be taken.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shortfall {
    /// How long until the bucket holds what was needed; None when it never
    /// can (more than its capacity was needed).
    pub retry_after: Option<Duration>,
}

impl TokenBucket {
    pub fn new(limit: u32, unit: Duration, now: Instant) -> Self {
        let capacity = f64::from(limit);
        Self {
            capacity,
            rate: capacity / unit.as_secs_f64(),
            tokens: capacity,
            updated: now,
        }
    }

    /// Applies a changed limit, keeping what was consumed (a lowered limit
    /// caps the tokens left; a raised one does not add any).
    pub fn reconfigure(&mut self, limit: u32, unit: Duration, now: Instant) {
        self.refill(now);
        self.capacity = f64::from(limit);
        self.rate = self.capacity / unit.as_secs_f64();
        self.tokens = self.tokens.min(self.capacity);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.updated = now;
    }

    /// Takes `take` tokens if the bucket holds at least `need` (`need` >=
    /// `take`: an output budget needs 1 token to admit a request and takes
    /// nothing until the output is known).
    pub fn try_take(&mut self, take: u64, need: u64, now: Instant) -> Result<(), Shortfall> {
        self.refill(now);
        let need = need as f64;
        if self.tokens >= need {
            self.tokens -= take as f64;
            return Ok(());
        }
        Err(Shortfall {
            retry_after: (need <= self.capacity).then(|| self.time_until(need)),
        })
    }

    /// Charges `tokens` (a refund when negative) whatever the level: the
    /// bucket may go into debt, never above capacity.
    pub fn charge(&mut self, tokens: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - tokens).min(self.capacity);
    }

    /// Tokens available now (negative = debt).
    pub fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    /// Tokens per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// How long until the bucket holds `tokens` (zero if it already does).
    fn time_until(&self, tokens: f64) -> Duration {
        refill_time(tokens - self.tokens, self.rate)
    }
}

/// How long refilling `missing` tokens at `rate` per second takes.
pub fn refill_time(missing: f64, rate: f64) -> Duration {
    if missing <= 0.0 || rate <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(missing / rate).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn starts_full_refills_continuously_and_never_exceeds_capacity() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(30, MINUTE, start);
        for _ in 0..3 {
            bucket
                .try_take(10, 10, start)
                .expect("a full bucket admits a burst of 30");
        }
        let shortfall = bucket.try_take(10, 10, start).expect_err("empty");
        assert_eq!(shortfall.retry_after, Some(Duration::from_secs(20)));
        tokio::time::advance(Duration::from_secs(19)).await;
        assert!(bucket.try_take(10, 10, Instant::now()).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        bucket
            .try_take(10, 10, Instant::now())
            .expect("refilled after 20 s");
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(bucket.level(Instant::now()), 30.0);
    }

    #[tokio::test(start_paused = true)]
    async fn charges_go_into_debt_and_the_next_request_waits_for_it() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100, MINUTE, start);
        bucket.try_take(0, 1, start).expect("output budget admits");
        bucket.charge(250.0, start);
        assert_eq!(bucket.level(start), -150.0);
        let shortfall = bucket.try_take(0, 1, start).expect_err("in debt");
        // 151 tokens at 100/60 per second.
        assert_eq!(
            shortfall.retry_after,
            Some(Duration::from_secs_f64(151.0 * 0.6))
        );
        bucket.charge(-1000.0, start);
        assert_eq!(bucket.level(start), 100.0, "refunds stop at capacity");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_budget_never_fits() {
        let mut bucket = TokenBucket::new(30, MINUTE, Instant::now());
        let shortfall = bucket
            .try_take(31, 31, Instant::now())
            .expect_err("too big");
        assert_eq!(shortfall.retry_after, None);
    }

    #[tokio::test(start_paused = true)]
    async fn reconfiguring_keeps_what_was_used() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100, MINUTE, start);
        bucket.charge(90.0, start);
        bucket.reconfigure(1000, MINUTE, start);
        assert_eq!(bucket.level(start), 10.0);
        bucket.reconfigure(5, MINUTE, start);
        assert_eq!(bucket.level(start), 5.0);
    }
}
