//! One debouncer: a burst of changes (an editor's write-rename dance, a
//! rollout restarting pods, `kubectl apply -f dir`) is acted on once, after
//! it has been quiet for a while, yet never later than a bound after it
//! began, so a source that never stops changing still converges.

use std::time::Duration;

use crate::clock::{self, Instant};

/// How long a burst must be quiet, and the longest it may be waited for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Debounce {
    pub quiet: Duration,
    pub max_delay: Duration,
}

impl Debounce {
    /// A burst whose first change is seen now.
    pub fn begin(self) -> Burst {
        let started = clock::now();
        Burst {
            quiet: self.quiet,
            deadline: started + self.max_delay,
            settles_at: (started + self.quiet).min(started + self.max_delay),
        }
    }
}

/// One burst of changes being waited out.
///
/// Event sources call [`Burst::changed`] on every change while awaiting
/// [`Burst::settled`]; polling sources await `settled`, look again, and call
/// `changed` when they saw a change and [`Burst::is_overdue`] is false.
#[derive(Clone, Debug)]
pub struct Burst {
    quiet: Duration,
    deadline: Instant,
    settles_at: Instant,
}

impl Burst {
    /// Another change: the burst goes on until quiet again, up to the deadline.
    pub fn changed(&mut self) {
        self.settles_at = (clock::now() + self.quiet).min(self.deadline);
    }

    /// Completes once quiet since the last change, or at the deadline.
    pub async fn settled(&self) {
        clock::sleep_until(self.settles_at).await;
    }

    /// Whether the deadline has passed: act on what is there, changing or not.
    pub fn is_overdue(&self) -> bool {
        clock::now() >= self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: Debounce = Debounce {
        quiet: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
    };

    #[tokio::test(start_paused = true)]
    async fn a_single_change_settles_after_the_quiet_period() {
        let start = clock::now();
        let burst = RULE.begin();
        burst.settled().await;
        assert_eq!(clock::now() - start, RULE.quiet);
        assert!(!burst.is_overdue());
    }

    #[tokio::test(start_paused = true)]
    async fn each_change_restarts_the_quiet_period() {
        let start = clock::now();
        let mut burst = RULE.begin();
        clock::sleep(Duration::from_millis(60)).await;
        burst.changed();
        clock::sleep(Duration::from_millis(60)).await;
        burst.changed();
        burst.settled().await;
        assert_eq!(clock::now() - start, Duration::from_millis(220));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_that_never_ends_settles_at_the_deadline() {
        let start = clock::now();
        let mut burst = RULE.begin();
        let changes = async {
            loop {
                clock::sleep(Duration::from_millis(50)).await;
                burst.changed();
                if burst.is_overdue() {
                    return;
                }
            }
        };
        changes.await;
        burst.settled().await;
        assert_eq!(clock::now() - start, RULE.max_delay);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_period_longer_than_the_bound_is_cut_to_it() {
        let rule = Debounce {
            quiet: Duration::from_secs(5),
            max_delay: Duration::from_secs(1),
        };
        let start = clock::now();
        rule.begin().settled().await;
        assert_eq!(clock::now() - start, Duration::from_secs(1));
    }
}
