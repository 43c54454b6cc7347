//! Outlier detection, in the manner of Envoy's: a pod whose attempts keep
//! failing is ejected, i.e. ranked after every healthy pod and left out when
//! a rule picks its target, for a while.
//!
//! The rules, per ModelServer ([`OutlierSettings`]):
//! - `consecutive_failures` failed attempts in a row eject the pod: an
//!   engine answering 5xx, a connection reset before the response, no
//!   response head within the timeout, a response body cut by the engine. A
//!   refused connection ejects at once: nothing listens there.
//! - An ejection lasts `base_ejection_time` x the number of times the pod was
//!   ejected recently, at most `max_ejection_time`; every
//!   `base_ejection_time` the pod spends in service forgives one of those.
//! - A pod back from an ejection is on probation: its first failure ejects it
//!   again (for longer); its first success ends the probation.
//! - At most `max_ejection_percent` of a ModelServer's pods (and always at
//!   least one) are ejected at once, so a fault shared by every pod (an
//!   overload answering 503 everywhere) never takes the whole ModelServer
//!   out. Refused connections are not capped: a pod that refuses has no
//!   capacity to lose.
//! - While it keeps failing, each failure in a row counts as one more
//!   request in flight for the scheduler, so a pod that fails fast (and so
//!   never has anything in flight) stops looking like the least loaded one,
//!   also when the cap keeps it in service.
//!
//! Every dataplane decides on its own from its own attempts, and reports
//! its ejections to the controller, which sends them to every dataplane
//! with the next EndpointLoads: a pod one dataplane found bad is avoided by
//! all ([`OutlierDetector::eject_for_fleet`], within the same cap).
//!
//! Only atomics are touched by a successful attempt; the lock of a pod is
//! taken when one of its attempts fails, and a ModelServer's lock only when
//! one of its pods is about to be ejected.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use switchyard_runtime::clock::{self, Instant};
use switchyard_snapshot::pb;
use tokio::sync::watch;

use super::PodState;

/// Failed attempts in a row that eject a pod: Envoy's `consecutive_5xx`
/// default, enough that one unlucky request never ejects a healthy pod,
/// few enough that a broken pod costs a handful of requests per dataplane.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;

/// First ejection of a pod: long enough that a broken pod stops costing
/// requests for many scrape intervals (and its report reaches every
/// dataplane), short enough that a pod that merely restarted is back in
/// seconds. Envoy's 30 s default suits long-lived hosts; here a pod back too
/// early costs one request (probation), not five.
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(10);

/// Longest ejection, however often a pod failed: Envoy's default. A pod
/// that stays broken is retried every 5 minutes, which is noise next to the
/// traffic it would otherwise fail.
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// Share of a ModelServer's pods that may be ejected at once. Envoy uses
/// 10 %, written for fleets of dozens of hosts; LLM ModelServers run a few
/// pods, where 10 % would never allow more than one. Half keeps at least half
/// of the capacity serving whatever the pods answer.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;

/// How a ModelServer ejects its pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Failed attempts in a row that eject a pod; 0 = never eject (refused
    /// connections included).
    pub consecutive_failures: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    /// 0..=100; at least one pod may always be ejected.
    pub max_ejection_percent: u32,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection_time: DEFAULT_BASE_EJECTION_TIME,
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
        }
    }
}

impl OutlierSettings {
    /// The snapshot's settings: the ModelServer's own fields over the
    /// RouteConfig's over the defaults.
    pub fn resolve(
        server: Option<&pb::OutlierDetection>,
        route_config: Option<&pb::OutlierDetection>,
    ) -> Self {
        let defaults = Self::default();
        let pick = |field: fn(&pb::OutlierDetection) -> Option<u64>| {
            server
                .and_then(field)
                .or_else(|| route_config.and_then(field))
        };
        let millis =
            |value: Option<u64>, default: Duration| value.map_or(default, Duration::from_millis);
        let count = |value: Option<u64>, default: u32| {
            value.map_or(default, |value| u32::try_from(value).unwrap_or(u32::MAX))
        };
        Self {
            consecutive_failures: count(
                pick(|o| o.consecutive_failures.map(u64::from)),
                defaults.consecutive_failures,
            ),
            base_ejection_time: millis(
                pick(|o| o.base_ejection_time_ms),
                defaults.base_ejection_time,
            ),
            max_ejection_time: millis(pick(|o| o.max_ejection_time_ms), defaults.max_ejection_time),
            max_ejection_percent: count(
                pick(|o| o.max_ejection_percent.map(u64::from)),
                defaults.max_ejection_percent,
            )
            .min(100),
        }
    }

    /// Pods of `total` that may be ejected at once: at least one.
    fn ejection_cap(&self, total: usize) -> usize {
        (total * self.max_ejection_percent as usize / 100).max(1)
    }
}

/// How an attempt on a pod went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The engine answered 5xx.
    ServerError,
    /// The pod did not accept the connection.
    ConnectFailure,
    /// The connection broke before the response head.
    Reset,
    /// No response head within the timeout.
    Timeout,
    /// The engine's connection broke while the body was streamed.
    StreamCut,
}

impl Failure {
    pub const ALL: [Failure; 5] = [
        Self::ServerError,
        Self::ConnectFailure,
        Self::Reset,
        Self::Timeout,
        Self::StreamCut,
    ];

    /// Label value (metrics, reports, debug dumps).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServerError => "5xx",
            Self::ConnectFailure => "connect_failure",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::StreamCut => "stream_cut",
        }
    }
}

/// A pod was just ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    pub duration: Duration,
    /// The failure that tipped it.
    pub cause: Failure,
    /// How many recent ejections this one makes (the duration's multiplier).
    pub times: u32,
}

/// Outlier state of one pod; survives snapshot swaps with its [`PodState`].
#[derive(Debug)]
pub struct PodHealth {
    consecutive_failures: AtomicU32,
    on_probation: AtomicBool,
    /// Until when (ms on [`monotonic_ms`]'s clock) the pod is ejected, by
    /// this dataplane or by the fleet; `i64::MIN` = never.
    ejected_until_ms: AtomicI64,
    local: Mutex<LocalEjections>,
}

/// This dataplane's own ejections of a pod.
#[derive(Debug, Clone, Copy)]
struct LocalEjections {
    /// Recent ejections, for the duration's multiplier.
    times: u32,
    /// When the latest one ends (ms on [`monotonic_ms`]'s clock).
    until_ms: i64,
    cause: Failure,
}

impl Default for PodHealth {
    fn default() -> Self {
        Self {
            consecutive_failures: AtomicU32::new(0),
            on_probation: AtomicBool::new(false),
            ejected_until_ms: AtomicI64::new(i64::MIN),
            local: Mutex::new(LocalEjections {
                times: 0,
                until_ms: i64::MIN,
                cause: Failure::ServerError,
            }),
        }
    }
}

impl PodHealth {
    /// Ejects the pod until `until`, bypassing detection and the cap: for
    /// tests of what reads ejections.
    #[cfg(test)]
    pub fn eject_until(&self, until: Instant) {
        self.ejected_until_ms
            .fetch_max(monotonic_ms(until), Ordering::Relaxed);
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.is_ejected_at(EjectionClock::at(now))
    }

    /// [`PodHealth::is_ejected`] at a time converted once for many pods.
    pub fn is_ejected_at(&self, now: EjectionClock) -> bool {
        now.0 < self.ejected_until_ms.load(Ordering::Relaxed)
    }

    /// How long the pod stays ejected from `now`, if it is.
    pub fn ejection_remaining(&self, now: Instant) -> Option<Duration> {
        let left = self
            .ejected_until_ms
            .load(Ordering::Relaxed)
            .saturating_sub(monotonic_ms(now));
        (left > 0).then(|| Duration::from_millis(u64::try_from(left).unwrap_or(0)))
    }

    /// Failed attempts in a row so far: what the scheduler adds to the pod's
    /// in-flight count.
    pub fn failure_load(&self) -> u64 {
        u64::from(self.consecutive_failures.load(Ordering::Relaxed))
    }

    /// An attempt succeeded: the failure count and any probation end. Only
    /// reads unless there is something to reset.
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.on_probation.load(Ordering::Relaxed) {
            self.on_probation.store(false, Ordering::Relaxed);
        }
    }

    /// This dataplane's ejection of the pod in progress at `now`: until
    /// when, and why.
    pub fn local_ejection(&self, now: Instant) -> Option<(Instant, Failure)> {
        let local = *self.local.lock();
        let now_ms = monotonic_ms(now);
        (local.until_ms > now_ms).then(|| {
            let left = u64::try_from(local.until_ms - now_ms).unwrap_or(0);
            (now + Duration::from_millis(left), local.cause)
        })
    }
}

/// Wakes whoever reports this dataplane's ejections (the controller
/// stream) when there is a new one.
#[derive(Debug)]
pub struct EjectionNotifier(watch::Sender<u64>);

impl Default for EjectionNotifier {
    fn default() -> Self {
        Self(watch::Sender::new(0))
    }
}

impl EjectionNotifier {
    fn notify(&self) {
        self.0.send_modify(|count| *count = count.wrapping_add(1));
    }

    /// Changes with every new ejection.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// The outlier detection of one ModelServer.
#[derive(Debug)]
pub struct OutlierDetector {
    pub settings: OutlierSettings,
    /// Held while deciding an ejection, so two concurrent ejections cannot
    /// both pass the cap.
    deciding: Mutex<()>,
    notifier: Arc<EjectionNotifier>,
}

impl OutlierDetector {
    pub fn new(settings: OutlierSettings, notifier: Arc<EjectionNotifier>) -> Self {
        Self {
            settings,
            deciding: Mutex::new(()),
            notifier,
        }
    }

    /// An attempt on `pod` (one of `pods`, this ModelServer's) failed at
    /// `now`; returns the ejection it caused, if any.
    pub fn record_failure(
        &self,
        pods: &[Arc<PodState>],
        pod: &PodState,
        failure: Failure,
        now: Instant,
    ) -> Option<Ejection> {
        let settings = &self.settings;
        if settings.consecutive_failures == 0 {
            return None;
        }
        let health = &pod.health;
        let failures = health
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let immediate =
            failure == Failure::ConnectFailure || health.on_probation.load(Ordering::Relaxed);
        if (failures < settings.consecutive_failures && !immediate) || health.is_ejected(now) {
            return None;
        }
        let _deciding = self.deciding.lock();
        if failure != Failure::ConnectFailure && !self.below_cap(pods, now) {
            return None;
        }
        let now_ms = monotonic_ms(now);
        let base_ms = millis(settings.base_ejection_time).max(1);
        let mut local = health.local.lock();
        let forgiven = if local.until_ms == i64::MIN {
            u32::MAX
        } else {
            u32::try_from((now_ms - local.until_ms).max(0) / base_ms).unwrap_or(u32::MAX)
        };
        let times = local.times.saturating_sub(forgiven).saturating_add(1);
        let duration = settings
            .base_ejection_time
            .saturating_mul(times)
            .min(settings.max_ejection_time.max(settings.base_ejection_time));
        let until_ms = now_ms.saturating_add(millis(duration));
        *local = LocalEjections {
            times,
            until_ms,
            cause: failure,
        };
        drop(local);
        health
            .ejected_until_ms
            .fetch_max(until_ms, Ordering::Relaxed);
        health.consecutive_failures.store(0, Ordering::Relaxed);
        health.on_probation.store(true, Ordering::Relaxed);
        self.notifier.notify();
        Some(Ejection {
            duration,
            cause: failure,
            times,
        })
    }

    /// Ejects `pod` (one of `pods`) until `until` on the fleet's word
    /// (another dataplane ejected it), unless that would exceed the cap.
    /// Never shortens an ejection in progress; returns whether it applied.
    pub fn eject_for_fleet(
        &self,
        pods: &[Arc<PodState>],
        pod: &PodState,
        until: Instant,
        now: Instant,
    ) -> bool {
        let _deciding = self.deciding.lock();
        if !pod.is_ejected(now) && !self.below_cap(pods, now) {
            return false;
        }
        pod.health
            .ejected_until_ms
            .fetch_max(monotonic_ms(until), Ordering::Relaxed);
        true
    }

    /// Whether one more of `pods` may be ejected at `now`.
    fn below_cap(&self, pods: &[Arc<PodState>], now: Instant) -> bool {
        let ejected = pods.iter().filter(|pod| pod.is_ejected(now)).count();
        ejected < self.settings.ejection_cap(pods.len())
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Milliseconds from the first call in this process, so an instant fits in
/// an atomic. Signed: an instant before that first call (a paused test
/// clock started earlier) still compares correctly.
/// A time on the clock ejections are kept on: a pick that checks many pods
/// converts its `now` once.
#[derive(Debug, Clone, Copy)]
pub struct EjectionClock(i64);

impl EjectionClock {
    pub fn at(now: Instant) -> Self {
        Self(monotonic_ms(now))
    }
}

pub(super) fn monotonic_ms(at: Instant) -> i64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(clock::now);
    if at >= epoch {
        millis(at - epoch)
    } else {
        -millis(epoch - at)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    const BASE: Duration = Duration::from_secs(10);

    fn pods(count: u8) -> Vec<Arc<PodState>> {
        PodState::numbered_for_tests(count.into(), |i| {
            SocketAddr::from(([127, 0, 0, i as u8 + 1], 8000))
        })
    }

    fn detector(settings: OutlierSettings) -> (OutlierDetector, watch::Receiver<u64>) {
        let notifier = Arc::new(EjectionNotifier::default());
        let woken = notifier.subscribe();
        (OutlierDetector::new(settings, notifier), woken)
    }

    /// `times` failures of `failure` on `pod`; the ejection of the last one.
    fn fail(
        detector: &OutlierDetector,
        pods: &[Arc<PodState>],
        pod: usize,
        failure: Failure,
        times: u32,
    ) -> Option<Ejection> {
        (0..times)
            .map(|_| detector.record_failure(pods, &pods[pod], failure, clock::now()))
            .last()
            .flatten()
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_and_a_success_starts_the_count_again() {
        let (detector, woken) = detector(OutlierSettings::default());
        let pods = pods(3);
        assert_eq!(fail(&detector, &pods, 0, Failure::ServerError, 4), None);
        assert_eq!(
            pods[0].health.failure_load(),
            4,
            "each failure counts as load"
        );
        pods[0].health.record_success();
        assert_eq!(pods[0].health.failure_load(), 0);
        assert_eq!(fail(&detector, &pods, 0, Failure::Timeout, 4), None);
        assert!(!woken.has_changed().expect("open"));
        let ejection = detector
            .record_failure(&pods, &pods[0], Failure::StreamCut, clock::now())
            .expect("the fifth in a row ejects");
        assert_eq!(
            ejection,
            Ejection {
                duration: BASE,
                cause: Failure::StreamCut,
                times: 1
            }
        );
        assert!(woken.has_changed().expect("open"), "the report is due");
        assert!(pods[0].is_ejected(clock::now()));
        assert_eq!(pods[0].health.failure_load(), 0, "counting starts again");
        assert_eq!(
            pods[0].health.local_ejection(clock::now()),
            Some((clock::now() + BASE, Failure::StreamCut))
        );
        tokio::time::advance(BASE).await;
        assert!(!pods[0].is_ejected(clock::now()), "back in service");
        assert_eq!(pods[0].health.local_ejection(clock::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_connection_ejects_at_once() {
        let (detector, _woken) = detector(OutlierSettings::default());
        let pods = pods(2);
        let ejection = fail(&detector, &pods, 1, Failure::ConnectFailure, 1).expect("ejected");
        assert_eq!(ejection.cause, Failure::ConnectFailure);
        assert!(pods[1].is_ejected(clock::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_returning_pod_is_on_probation_and_repeated_ejections_last_longer() {
        let settings = OutlierSettings {
            max_ejection_time: Duration::from_secs(25),
            ..OutlierSettings::default()
        };
        let (detector, _woken) = detector(settings);
        let pods = pods(2);
        let first = fail(&detector, &pods, 0, Failure::ServerError, 5).expect("ejected");
        assert_eq!(first.duration, BASE);
        tokio::time::advance(BASE).await;
        let second = fail(&detector, &pods, 0, Failure::ServerError, 1)
            .expect("on probation, the first failure ejects again");
        assert_eq!((second.duration, second.times), (2 * BASE, 2));
        tokio::time::advance(2 * BASE).await;
        let third = fail(&detector, &pods, 0, Failure::Reset, 1).expect("still on probation");
        assert_eq!(
            (third.duration, third.times),
            (Duration::from_secs(25), 3),
            "capped by max_ejection_time"
        );
        tokio::time::advance(Duration::from_secs(25)).await;
        pods[0].health.record_success();
        assert_eq!(
            fail(&detector, &pods, 0, Failure::ServerError, 4),
            None,
            "a success ends the probation"
        );
        pods[0].health.record_success();
        // Two base times in service forgive two of the three ejections.
        tokio::time::advance(2 * BASE).await;
        let fourth = fail(&detector, &pods, 0, Failure::ServerError, 5).expect("ejected");
        assert_eq!((fourth.duration, fourth.times), (2 * BASE, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_share_of_a_model_server_but_always_one() {
        let (detector, _woken) = detector(OutlierSettings::default());
        let pods = pods(4);
        for pod in 0..2 {
            assert!(fail(&detector, &pods, pod, Failure::ServerError, 5).is_some());
        }
        assert_eq!(
            fail(&detector, &pods, 2, Failure::ServerError, 10),
            None,
            "half of 4 are out already"
        );
        assert!(!pods[2].is_ejected(clock::now()));
        assert_eq!(
            pods[2].health.failure_load(),
            10,
            "kept in service, it looks ever busier to the scheduler"
        );
        assert!(
            fail(&detector, &pods, 3, Failure::ConnectFailure, 1).is_some(),
            "a pod that refuses has no capacity to keep: not capped"
        );
        tokio::time::advance(BASE).await;
        assert!(
            detector
                .record_failure(&pods, &pods[2], Failure::ServerError, clock::now())
                .is_some(),
            "room again once the others are back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_only_pod_may_be_ejected_whatever_the_share() {
        let (detector, _woken) = detector(OutlierSettings {
            max_ejection_percent: 10,
            ..OutlierSettings::default()
        });
        let pods = pods(1);
        assert!(
            fail(&detector, &pods, 0, Failure::ServerError, 5).is_some(),
            "the rule's other targets take over"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_fleets_ejections_apply_within_the_cap_and_never_shorten_one() {
        let (detector, woken) = detector(OutlierSettings::default());
        let pods = pods(2);
        let now = clock::now();
        assert!(detector.eject_for_fleet(&pods, &pods[0], now + BASE, now));
        assert!(pods[0].is_ejected(now));
        assert_eq!(
            pods[0].health.local_ejection(now),
            None,
            "not this dataplane's"
        );
        assert!(
            !woken.has_changed().expect("open"),
            "nothing of ours to report"
        );
        assert!(
            !detector.eject_for_fleet(&pods, &pods[1], now + BASE, now),
            "one of two is the cap"
        );
        assert!(detector.eject_for_fleet(&pods, &pods[0], now + BASE / 2, now));
        assert_eq!(pods[0].health.ejection_remaining(now), Some(BASE));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_consecutive_failures_turns_ejection_off() {
        let (detector, _woken) = detector(OutlierSettings {
            consecutive_failures: 0,
            ..OutlierSettings::default()
        });
        let pods = pods(2);
        assert_eq!(fail(&detector, &pods, 0, Failure::ConnectFailure, 10), None);
        assert_eq!(pods[0].health.failure_load(), 0);
    }

    #[test]
    fn settings_take_the_servers_fields_then_the_route_configs_then_the_defaults() {
        let route_config = pb::OutlierDetection {
            consecutive_failures: Some(3),
            base_ejection_time_ms: Some(2_000),
            ..Default::default()
        };
        let server = pb::OutlierDetection {
            consecutive_failures: Some(7),
            max_ejection_percent: Some(150),
            ..Default::default()
        };
        assert_eq!(
            OutlierSettings::resolve(Some(&server), Some(&route_config)),
            OutlierSettings {
                consecutive_failures: 7,
                base_ejection_time: Duration::from_secs(2),
                max_ejection_time: DEFAULT_MAX_EJECTION_TIME,
                max_ejection_percent: 100,
            }
        );
        assert_eq!(
            OutlierSettings::resolve(None, None),
            OutlierSettings::default()
        );
    }
}
