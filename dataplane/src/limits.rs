//! What one client may cost the dataplane: connections, header bytes, body
//! bytes held at once, and how slowly a body may arrive. Every bound is a
//! named default sized for the dataplane pod's memory limit (1 GiB in
//! `manifests/dataplane.yaml`), so no handful of clients can grow memory
//! without limit:
//!
//! - client connections: [`DEFAULT_MAX_CONNECTIONS`] (~20 KiB each idle,
//!   [`MAX_HEADER_BYTES`] at most while a request head is read);
//! - buffered request bodies: [`DEFAULT_BODY_BUDGET_BYTES`] for all requests
//!   together ([`BodyBudget`]); a body that does not fit gets 503 with
//!   `Retry-After` instead of growing memory;
//! - body arrival: [`DEFAULT_BODY_READ_GRACE`] plus one second per
//!   [`DEFAULT_MIN_BODY_BYTES_PER_SEC`] received ([`BodyDeadline`]), so a
//!   client cannot park a body half-sent; past it, 408.
//!
//! Worst case with the defaults: 8192 connections each holding a full header
//! buffer (512 MiB) plus the body budget (256 MiB), under the 1 GiB limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use switchyard_runtime::clock::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Client connections served at once on the traffic port. An idle keep-alive
/// connection costs ~20 KiB (measured: 5,000 cost 104 MiB before its
/// buffers were bounded), one reading a request head at most
/// [`MAX_HEADER_BYTES`]: 8192 of those stay within half of a 1 GiB pod
/// limit, and one dataplane rarely has more concurrent streams than that
/// (engines batch a few hundred sequences each).
pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;

/// Connections served at once on the metrics and debug ports: scrapers and
/// operators, never client traffic.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// A request head (request line and headers) larger than this is refused
/// (HTTP/1.1: 431; HTTP/2: the header list limit). 64 KiB fits large
/// cookies and JWTs (Envoy's default is 60 KiB, nginx's 32 KiB) and bounds
/// hyper's per-connection read buffer.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Headers in one HTTP/1.1 request; more is refused (431). hyper's default,
/// named here because it is a limit clients meet.
pub const MAX_HEADERS: usize = 100;

/// Streams one HTTP/2 connection may have open at once: each may hold a
/// buffered body (the [`BodyBudget`] bounds their total).
pub const MAX_CONCURRENT_STREAMS: u32 = 128;

/// Streams an HTTP/2 client may open and reset before the server has
/// accepted them, before the connection is closed (rapid reset): h2's
/// default, named for the same reason as [`MAX_HEADERS`].
pub const MAX_PENDING_RESET_STREAMS: usize = 20;

/// Bytes of request bodies all requests of one dataplane may hold at once: a
/// quarter of a 1 GiB pod limit, which is 8 bodies of the maximum size
/// (32 MiB) or ~600 agentic prompts of 400 KB in flight at the same instant.
pub const DEFAULT_BODY_BUDGET_BYTES: usize = 256 * 1024 * 1024;

/// Time every body gets before [`DEFAULT_MIN_BODY_BYTES_PER_SEC`] applies:
/// a mobile client's slow start, a TLS terminator's buffering.
pub const DEFAULT_BODY_READ_GRACE: Duration = Duration::from_secs(10);

/// Slowest accepted body rate after the grace: a 32 MiB body gets ~8.5
/// minutes, a 400 KB prompt ~16 s; slower than this, a client is parking
/// memory (and a connection), not uploading.
pub const DEFAULT_MIN_BODY_BYTES_PER_SEC: u64 = 64 * 1024;

/// `Retry-After` (seconds) of a 503 for an exhausted body budget: budgets
/// free up as bodies are forwarded, within a second under any sane load.
pub const BUDGET_RETRY_AFTER_SECONDS: u32 = 1;

/// Bounds the connections one listener serves at once.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
}

/// One served connection; its slot frees when it is dropped.
#[derive(Debug)]
pub struct ConnectionPermit(#[allow(dead_code)] OwnedSemaphorePermit);

impl ConnectionLimit {
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A slot for one more connection, or None when `max` are open.
    pub fn try_acquire(&self) -> Option<ConnectionPermit> {
        self.permits
            .clone()
            .try_acquire_owned()
            .ok()
            .map(ConnectionPermit)
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

/// The bytes of request bodies held at once, bounded.
///
/// Split into shares, one per thread: a request charges the share of the
/// thread it starts on (and gives it back there), so requests on different
/// threads never touch the same counter. Each share is at least one maximal
/// body, so a body that fits the limit always fits an empty share. The
/// dataplane sizes it for its traffic workers, so each worker's requests
/// charge that worker's share.
#[derive(Debug)]
pub struct BodyBudget {
    shares: Box<[Share]>,
    share_bytes: usize,
}

/// One worker thread's share, on its own cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Share {
    used: AtomicUsize,
}

/// Bytes reserved in a [`BodyBudget`]; given back when dropped.
#[derive(Debug)]
pub struct BodyReservation<'a> {
    share: &'a Share,
    share_bytes: usize,
    bytes: usize,
}

/// The body budget has no room for a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the router's buffer for request bodies is full")]
pub struct BudgetExhausted;

thread_local! {
    /// This thread's share index, assigned on first use.
    static THREAD_SHARE: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

impl BodyBudget {
    /// `total` bytes split over `workers` threads, with shares no smaller
    /// than `max_body_bytes` (fewer shares when `total` is too small).
    pub fn new(total: usize, workers: usize, max_body_bytes: usize) -> Self {
        let shares = workers.min(total / max_body_bytes.max(1)).max(1);
        Self {
            shares: (0..shares).map(|_| Share::default()).collect(),
            share_bytes: total / shares,
        }
    }

    /// An empty reservation on this thread's share, grown with
    /// [`BodyReservation::grow`].
    pub fn reservation(&self) -> BodyReservation<'_> {
        let index = THREAD_SHARE.with(|index| *index) % self.shares.len();
        BodyReservation {
            share: &self.shares[index],
            share_bytes: self.share_bytes,
            bytes: 0,
        }
    }

    /// Bytes reserved now, over every share.
    pub fn used(&self) -> usize {
        self.shares
            .iter()
            .map(|share| share.used.load(Ordering::Relaxed))
            .sum()
    }
}

impl BodyReservation<'_> {
    /// Reserves `more` bytes, or fails leaving the reservation as it was.
    pub fn grow(&mut self, more: usize) -> Result<(), BudgetExhausted> {
        if more == 0 {
            return Ok(());
        }
        let share_bytes = self.share_bytes;
        self.share
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(more).filter(|after| *after <= share_bytes)
            })
            .map_err(|_| BudgetExhausted)?;
        self.bytes += more;
        Ok(())
    }

    /// Bytes held by this reservation.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for BodyReservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.share.used.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// How slowly a request body may arrive: a grace period, then a minimum rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyDeadline {
    pub grace: Duration,
    pub min_bytes_per_sec: u64,
}

impl Default for BodyDeadline {
    fn default() -> Self {
        Self {
            grace: DEFAULT_BODY_READ_GRACE,
            min_bytes_per_sec: DEFAULT_MIN_BODY_BYTES_PER_SEC,
        }
    }
}

impl BodyDeadline {
    /// When the next part of a body that started at `started` must have
    /// arrived, `received` bytes in: every byte received buys time at the
    /// minimum rate, so the deadline moves with a client that keeps up.
    pub fn next(&self, started: Instant, received: usize) -> Instant {
        let nanos = received as u128 * 1_000_000_000 / u128::from(self.min_bytes_per_sec.max(1));
        let earned = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        started + self.grace + earned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_refuses_what_does_not_fit_and_frees_on_drop() {
        let budget = BodyBudget::new(100, 1, 10);
        let mut first = budget.reservation();
        first.grow(60).expect("fits");
        let mut second = budget.reservation();
        assert_eq!(second.grow(50), Err(BudgetExhausted));
        assert_eq!(second.bytes(), 0, "a refused growth reserves nothing");
        second.grow(40).expect("the rest fits");
        assert_eq!(budget.used(), 100);
        drop(first);
        assert_eq!(budget.used(), 40);
        drop(second);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn shares_hold_at_least_one_maximal_body() {
        let budget = BodyBudget::new(256, 16, 64);
        assert_eq!(budget.shares.len(), 4);
        assert_eq!(budget.share_bytes, 64);
        let tiny = BodyBudget::new(10, 4, 64);
        assert_eq!(tiny.shares.len(), 1, "never zero shares");
    }

    #[test]
    fn shares_are_per_thread() {
        let budget = BodyBudget::new(200, 2, 100);
        std::thread::scope(|scope| {
            let a = scope.spawn(|| {
                let mut reservation = budget.reservation();
                reservation.grow(100).map(|()| reservation.bytes())
            });
            assert_eq!(a.join().expect("thread"), Ok(100));
        });
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn the_body_deadline_grows_with_the_bytes_received() {
        let deadline = BodyDeadline {
            grace: Duration::from_secs(10),
            min_bytes_per_sec: 1000,
        };
        let start = switchyard_runtime::clock::now();
        assert_eq!(deadline.next(start, 0) - start, Duration::from_secs(10));
        assert_eq!(
            deadline.next(start, 2500) - start,
            Duration::from_millis(12_500)
        );
    }

    #[test]
    fn connections_beyond_the_limit_get_no_permit_until_one_closes() {
        let limit = ConnectionLimit::new(2);
        let a = limit.try_acquire().expect("first");
        let _b = limit.try_acquire().expect("second");
        assert!(limit.try_acquire().is_none());
        assert_eq!(limit.open(), 2);
        drop(a);
        assert!(limit.try_acquire().is_some());
    }
}
