//! The one place library code takes time from.
//!
//! Monotonic time is tokio's [`Instant`]: under `#[tokio::test(start_paused =
//! true)]` it stands still until the test advances it, so timeouts, backoffs,
//! ejections and debounces are tested in milliseconds and without flakes.
//! Wall-clock time ([`unix_ms_now`], [`wall_now`]) is real time: it is what
//! other processes compare against (snapshot ages, report expiry, access-log
//! timestamps), so it cannot be paused; code that decides on it takes "now"
//! as a parameter instead, so tests pass the time they need.
//!
//! `clippy.toml` forbids `std::time::Instant::now`, `std::time::SystemTime::now`
//! and `std::thread::sleep` everywhere else.

use std::time::{SystemTime, UNIX_EPOCH};

pub use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};

/// Monotonic now; paused with tokio's test clock.
pub fn now() -> Instant {
    Instant::now()
}

/// Wall-clock now.
#[allow(clippy::disallowed_methods)] // the one wall-clock read
pub fn wall_now() -> SystemTime {
    SystemTime::now()
}

/// Wall-clock now in milliseconds since the Unix epoch (0 before 1970,
/// `i64::MAX` in the year 292 million).
pub fn unix_ms_now() -> i64 {
    unix_ms(wall_now())
}

/// `time` in milliseconds since the Unix epoch, clamped as [`unix_ms_now`].
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |elapsed| {
        i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn unix_ms_counts_from_the_epoch_and_clamps_before_it() {
        assert_eq!(
            unix_ms(UNIX_EPOCH + Duration::from_millis(1_705_314_645_123)),
            1_705_314_645_123
        );
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert!(unix_ms_now() > 1_700_000_000_000);
    }

    #[tokio::test(start_paused = true)]
    async fn monotonic_time_follows_the_paused_test_clock() {
        let start = now();
        sleep(Duration::from_secs(3600)).await;
        assert_eq!(now() - start, Duration::from_secs(3600));
    }
}
