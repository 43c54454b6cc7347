//! The fleet-wide fairness counters: every dataplane reports what it served
//! each (model, user) (`FairnessUsageReport`, running totals); the
//! controller adds up the latest total of every reporter and pushes the sums
//! back inside EndpointLoads (`FairnessCounters`), at most once per
//! `globalInterval` and only when they changed. A dataplane then orders its
//! queue by the fleet's counter instead of its own, so a user whose requests
//! are spread over many dataplanes is ordered as if one router saw them all.
//!
//! [`UsageTotals`] is the pure part (aggregation, bounds, expiry);
//! [`FairnessBoard`] holds it for the stream tasks and publishes its
//! counters on a timer.
//!
//! Totals, not deltas: a report that is lost with a broken stream, or read
//! twice, changes nothing the next one does not set right, and a dataplane
//! can tell exactly which of its own service the pushed counters include
//! (its total as of the report they echo), so it never counts it twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use switchyard_runtime::clock;
use switchyard_snapshot::pb;
use tokio::sync::watch;

use crate::report_limit::first_entries;
use crate::router_config::RouterConfig;

/// Entries read from one report: a dataplane tracks at most 10,000 users per
/// model, and a faulty one cannot make us read more than this at once.
pub const MAX_USAGE_ENTRIES_PER_REPORT: usize = 65_536;
/// Models the counters hold at most: far more than one fleet serves with a
/// fairness queue; reports about further models are ignored until some expire.
pub const MAX_COUNTED_MODELS: usize = 1_024;
/// Dataplane processes whose totals are held at most (a restarted dataplane
/// is a new reporter until the old one's totals expire).
pub const MAX_REPORTERS: usize = 1_024;
/// Longest model or user name read from a report (the dataplane reads user
/// ids of at most 256 bytes).
pub const MAX_NAME_BYTES: usize = 256;
/// How often the board looks for changed counters when the router
/// configuration names no interval (fairness off: nothing is pushed anyway).
const IDLE_TICK: Duration = Duration::from_millis(500);

/// What the router configuration says about the fleet-wide counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetSettings {
    /// Usage older than this is forgotten (the fairness window).
    pub window_ms: i64,
    pub max_users_per_model: usize,
    /// How often changed counters are pushed.
    pub interval: Duration,
}

impl FleetSettings {
    /// `None` when there is no fairness block or the fleet-wide order is off.
    pub fn from_config(config: &pb::FairnessConfig) -> Option<Self> {
        (config.global_report_interval_ms > 0).then(|| Self {
            window_ms: i64::try_from(config.window_ms).unwrap_or(i64::MAX),
            max_users_per_model: usize::try_from(config.max_global_users)
                .unwrap_or(usize::MAX)
                .max(1),
            interval: Duration::from_millis(config.global_report_interval_ms),
        })
    }
}

/// Every reporter's latest totals, by model and user.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageTotals {
    models: BTreeMap<String, BTreeMap<String, UserTotals>>,
    /// Latest sequence read from each reporter, and when (Unix ms).
    reporters: BTreeMap<u64, ReporterSeen>,
    /// Something changed since [`Self::take_counters`].
    changed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReporterSeen {
    sequence: u64,
    at_unix_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct UserTotals {
    /// Latest total per reporter.
    by_reporter: BTreeMap<u64, f64>,
    /// When a total of this user last changed (Unix ms).
    changed_at_unix_ms: i64,
}

impl UserTotals {
    fn served(&self) -> f64 {
        self.by_reporter.values().sum()
    }
}

impl UsageTotals {
    /// Reads `report` (received at `now_unix_ms`): each entry replaces the
    /// reporter's total for its (model, user). Bounded: a model's user count
    /// past the setting drops the user whose total changed longest ago.
    pub fn report(
        &mut self,
        settings: &FleetSettings,
        node: &str,
        report: &pb::FairnessUsageReport,
        now_unix_ms: i64,
    ) {
        if !self.reporters.contains_key(&report.reporter) && self.reporters.len() >= MAX_REPORTERS {
            tracing::warn!(
                node,
                reporter = report.reporter,
                "too many fairness reporters; ignoring this one until others expire"
            );
            return;
        }
        let usage = first_entries(
            node,
            "fairness usage",
            &report.usage,
            MAX_USAGE_ENTRIES_PER_REPORT,
        );
        self.reporters.insert(
            report.reporter,
            ReporterSeen {
                sequence: report.sequence,
                at_unix_ms: now_unix_ms,
            },
        );
        self.changed = true;
        for usage in usage {
            let readable = |name: &str| !name.is_empty() && name.len() <= MAX_NAME_BYTES;
            let usable = readable(&usage.model)
                && readable(&usage.user)
                && usage.served.is_finite()
                && usage.served >= 0.0;
            if !usable {
                continue;
            }
            if !self.models.contains_key(&usage.model) && self.models.len() >= MAX_COUNTED_MODELS {
                tracing::warn!(node, model = %usage.model, "too many models with fairness counters; ignoring this one");
                continue;
            }
            let users = self.models.entry(usage.model.clone()).or_default();
            if !users.contains_key(&usage.user) && users.len() >= settings.max_users_per_model {
                let idle_longest = users
                    .iter()
                    .min_by_key(|(_, totals)| totals.changed_at_unix_ms)
                    .map(|(user, _)| user.clone());
                if let Some(idle_longest) = idle_longest {
                    users.remove(&idle_longest);
                }
            }
            let totals = users.entry(usage.user.clone()).or_default();
            totals.by_reporter.insert(report.reporter, usage.served);
            totals.changed_at_unix_ms = now_unix_ms;
        }
    }

    /// Forgets users whose totals have not changed for the window (their
    /// service no longer counts) and reporters silent for as long.
    pub fn expire(&mut self, settings: &FleetSettings, now_unix_ms: i64) {
        let fresh = |at: i64| now_unix_ms.saturating_sub(at) <= settings.window_ms;
        let (models, reporters) = (self.models.len(), self.reporters.len());
        let mut users_before = 0;
        let mut users_after = 0;
        self.models.retain(|_, users| {
            users_before += users.len();
            users.retain(|_, totals| fresh(totals.changed_at_unix_ms));
            users_after += users.len();
            !users.is_empty()
        });
        self.reporters.retain(|_, seen| fresh(seen.at_unix_ms));
        if users_before != users_after
            || models != self.models.len()
            || reporters != self.reporters.len()
        {
            self.changed = true;
        }
    }

    /// Drops everything (the fleet-wide order was turned off).
    pub fn clear(&mut self) {
        self.changed |= !self.models.is_empty() || !self.reporters.is_empty();
        self.models.clear();
        self.reporters.clear();
    }

    /// The counters to push, if anything changed since the last call.
    pub fn take_counters(&mut self) -> Option<pb::FairnessCounters> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        Some(self.counters())
    }

    /// The counters: per model and user the sum of every reporter's total,
    /// and the latest report read from each reporter; in canonical order.
    pub fn counters(&self) -> pb::FairnessCounters {
        pb::FairnessCounters {
            models: self
                .models
                .iter()
                .map(|(model, users)| pb::ModelFairnessCounters {
                    model: model.clone(),
                    users: users
                        .iter()
                        .map(|(user, totals)| pb::UserServed {
                            user: user.clone(),
                            served: totals.served(),
                        })
                        .collect(),
                })
                .collect(),
            reports: self
                .reporters
                .iter()
                .map(|(reporter, seen)| pb::FairnessReportSeen {
                    reporter: *reporter,
                    sequence: seen.sequence,
                })
                .collect(),
        }
    }

    /// What the controller's `/debug/fairness` shows.
    pub fn view(&self) -> FleetView {
        FleetView {
            models: self
                .models
                .iter()
                .map(|(model, users)| ModelView {
                    model: model.clone(),
                    users: users
                        .iter()
                        .map(|(user, totals)| UserView {
                            user: user.clone(),
                            served: totals.served(),
                            by_reporter: totals
                                .by_reporter
                                .iter()
                                .map(|(reporter, served)| (format!("{reporter:016x}"), *served))
                                .collect(),
                            changed_at_unix_ms: totals.changed_at_unix_ms,
                        })
                        .collect(),
                })
                .collect(),
            reporters: self
                .reporters
                .iter()
                .map(|(reporter, seen)| ReporterView {
                    reporter: format!("{reporter:016x}"),
                    sequence: seen.sequence,
                    at_unix_ms: seen.at_unix_ms,
                })
                .collect(),
        }
    }
}

/// `/debug/fairness`: the aggregated counters with each reporter's part.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetView {
    pub models: Vec<ModelView>,
    pub reporters: Vec<ReporterView>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelView {
    pub model: String,
    pub users: Vec<UserView>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    pub user: String,
    pub served: f64,
    pub by_reporter: BTreeMap<String, f64>,
    pub changed_at_unix_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReporterView {
    pub reporter: String,
    pub sequence: u64,
    pub at_unix_ms: i64,
}

/// The counters as a channel: `None` while the fleet-wide order is off.
pub type CountersReceiver = watch::Receiver<Option<Arc<pb::FairnessCounters>>>;

/// The totals the stream tasks report into, and the counters published
/// from them by [`FairnessBoard::run`].
#[derive(Debug)]
pub struct FairnessBoard {
    state: Mutex<BoardState>,
    counters: watch::Sender<Option<Arc<pb::FairnessCounters>>>,
}

#[derive(Debug, Default)]
struct BoardState {
    settings: Option<FleetSettings>,
    totals: UsageTotals,
}

impl Default for FairnessBoard {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            counters: watch::Sender::new(None),
        }
    }
}

impl FairnessBoard {
    pub fn subscribe(&self) -> CountersReceiver {
        self.counters.subscribe()
    }

    /// A dataplane's report; ignored while the fleet-wide order is off.
    pub fn report(&self, node: &str, report: &pb::FairnessUsageReport) {
        let mut state = self.state.lock();
        let BoardState { settings, totals } = &mut *state;
        if let Some(settings) = settings {
            totals.report(settings, node, report, clock::unix_ms_now());
        }
    }

    pub fn view(&self) -> FleetView {
        self.state.lock().totals.view()
    }

    /// Follows the router configuration's settings and publishes changed
    /// counters once per interval; runs until the controller stops (with
    /// the last settings once the configuration's watcher is gone).
    pub async fn run(self: Arc<Self>, mut router: watch::Receiver<RouterConfig>) {
        let mut router_alive = true;
        loop {
            let settings = router
                .borrow_and_update()
                .fairness
                .as_ref()
                .and_then(FleetSettings::from_config);
            let interval = self.tick(settings);
            tokio::select! {
                () = clock::sleep(interval) => {}
                changed = router.changed(), if router_alive => router_alive = changed.is_ok(),
            }
        }
    }

    /// Applies `settings`, expires, and publishes the counters if they
    /// changed; returns when to look again.
    fn tick(&self, settings: Option<FleetSettings>) -> Duration {
        let mut state = self.state.lock();
        state.settings = settings;
        let Some(settings) = settings else {
            state.totals.clear();
            self.counters
                .send_if_modified(|counters| counters.take().is_some());
            return IDLE_TICK;
        };
        state.totals.expire(&settings, clock::unix_ms_now());
        if let Some(counters) = state.totals.take_counters() {
            let counters = Arc::new(counters);
            self.counters.send_if_modified(|published| {
                if published.as_deref() == Some(&*counters) {
                    return false;
                }
                *published = Some(counters);
                true
            });
        } else if self.counters.borrow().is_none() {
            // Turned on: dataplanes learn that counters exist (empty yet).
            self.counters
                .send_replace(Some(Arc::new(state.totals.counters())));
        }
        settings.interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: FleetSettings = FleetSettings {
        window_ms: 60_000,
        max_users_per_model: 3,
        interval: Duration::from_millis(250),
    };

    fn report(
        reporter: u64,
        sequence: u64,
        usage: &[(&str, &str, f64)],
    ) -> pb::FairnessUsageReport {
        pb::FairnessUsageReport {
            reporter,
            sequence,
            usage: usage
                .iter()
                .map(|(model, user, served)| pb::UserUsage {
                    model: (*model).into(),
                    user: (*user).into(),
                    served: *served,
                })
                .collect(),
        }
    }

    fn served(counters: &pb::FairnessCounters, model: &str, user: &str) -> Option<f64> {
        counters
            .models
            .iter()
            .find(|counters| counters.model == model)?
            .users
            .iter()
            .find(|counter| counter.user == user)
            .map(|counter| counter.served)
    }

    #[test]
    fn the_counters_add_up_each_reporters_latest_total_and_echo_its_sequence() {
        let mut totals = UsageTotals::default();
        totals.report(
            &SETTINGS,
            "dp-0",
            &report(1, 1, &[("m", "heavy", 100.0)]),
            0,
        );
        totals.report(
            &SETTINGS,
            "dp-1",
            &report(2, 7, &[("m", "heavy", 50.0), ("m", "light", 5.0)]),
            0,
        );
        // Totals, not deltas: a later report replaces the reporter's total.
        totals.report(
            &SETTINGS,
            "dp-0",
            &report(1, 2, &[("m", "heavy", 120.0)]),
            10,
        );
        let counters = totals.take_counters().expect("changed");
        assert_eq!(served(&counters, "m", "heavy"), Some(170.0));
        assert_eq!(served(&counters, "m", "light"), Some(5.0));
        assert_eq!(
            counters.reports,
            [
                pb::FairnessReportSeen {
                    reporter: 1,
                    sequence: 2
                },
                pb::FairnessReportSeen {
                    reporter: 2,
                    sequence: 7
                },
            ]
        );
        assert_eq!(totals.take_counters(), None, "nothing changed since");
        // The same report read twice (a resend) sets the same totals.
        totals.report(
            &SETTINGS,
            "dp-0",
            &report(1, 2, &[("m", "heavy", 120.0)]),
            20,
        );
        let again = totals.take_counters().expect("read");
        assert_eq!(again, counters);
    }

    #[test]
    fn bad_entries_are_skipped_and_the_users_of_a_model_are_bounded() {
        let mut totals = UsageTotals::default();
        let long = "u".repeat(MAX_NAME_BYTES + 1);
        totals.report(
            &SETTINGS,
            "dp",
            &report(
                1,
                1,
                &[
                    ("m", "nan", f64::NAN),
                    ("m", "negative", -1.0),
                    ("", "no-model", 1.0),
                    ("m", &long, 1.0),
                    ("m", "a", 1.0),
                ],
            ),
            0,
        );
        totals.report(&SETTINGS, "dp", &report(1, 2, &[("m", "b", 1.0)]), 10);
        totals.report(&SETTINGS, "dp", &report(1, 3, &[("m", "c", 1.0)]), 20);
        totals.report(&SETTINGS, "dp", &report(1, 4, &[("m", "a", 2.0)]), 30);
        // A fourth user: "b" changed longest ago and goes.
        totals.report(&SETTINGS, "dp", &report(1, 5, &[("m", "d", 1.0)]), 40);
        let counters = totals.counters();
        let users: Vec<&str> = counters.models[0]
            .users
            .iter()
            .map(|user| user.user.as_str())
            .collect();
        assert_eq!(users, ["a", "c", "d"]);
        assert_eq!(counters.models.len(), 1);
    }

    #[test]
    fn the_reporters_and_models_held_are_bounded() {
        let mut totals = UsageTotals::default();
        for reporter in 0..=MAX_REPORTERS as u64 {
            totals.report(&SETTINGS, "dp", &report(reporter, 1, &[("m", "u", 1.0)]), 0);
        }
        let counters = totals.counters();
        assert_eq!(counters.reports.len(), MAX_REPORTERS);
        assert_eq!(served(&counters, "m", "u"), Some(MAX_REPORTERS as f64));

        let mut totals = UsageTotals::default();
        let models: Vec<String> = (0..=MAX_COUNTED_MODELS).map(|m| format!("m{m}")).collect();
        let usage: Vec<(&str, &str, f64)> = models.iter().map(|m| (m.as_str(), "u", 1.0)).collect();
        totals.report(&SETTINGS, "dp", &report(1, 1, &usage), 0);
        assert_eq!(totals.counters().models.len(), MAX_COUNTED_MODELS);
    }

    #[test]
    fn users_and_reporters_idle_beyond_the_window_expire() {
        let mut totals = UsageTotals::default();
        totals.report(&SETTINGS, "dp-0", &report(1, 1, &[("m", "old", 10.0)]), 0);
        totals.report(
            &SETTINGS,
            "dp-1",
            &report(2, 1, &[("m", "new", 10.0)]),
            30_000,
        );
        totals.take_counters();
        totals.expire(&SETTINGS, 60_000);
        assert_eq!(totals.take_counters(), None, "all within the window");
        totals.expire(&SETTINGS, 60_001);
        let counters = totals.take_counters().expect("expiry is a change");
        assert_eq!(served(&counters, "m", "old"), None);
        assert_eq!(served(&counters, "m", "new"), Some(10.0));
        assert_eq!(
            counters.reports.len(),
            1,
            "reporter 1 silent for the window"
        );
        totals.expire(&SETTINGS, 90_001);
        let counters = totals.take_counters().expect("changed");
        assert!(counters.models.is_empty() && counters.reports.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_board_publishes_changes_once_per_interval_and_nothing_when_off() {
        let board = Arc::new(FairnessBoard::default());
        let mut counters = board.subscribe();
        let config = pb::FairnessConfig {
            window_ms: 60_000,
            global_report_interval_ms: 250,
            max_global_users: 10,
            ..Default::default()
        };
        let (router, receiver) = watch::channel(RouterConfig {
            fairness: Some(config.clone()),
            ..Default::default()
        });
        let task = tokio::spawn(board.clone().run(receiver));
        counters.changed().await.expect("on: empty counters");
        assert_eq!(
            counters.borrow_and_update().as_deref(),
            Some(&pb::FairnessCounters::default())
        );
        board.report("dp", &report(1, 1, &[("m", "u", 3.0)]));
        board.report("dp", &report(1, 2, &[("m", "u", 4.0)]));
        counters.changed().await.expect("pushed");
        let pushed = counters.borrow_and_update().clone().expect("on");
        assert_eq!(
            served(&pushed, "m", "u"),
            Some(4.0),
            "both reports in one push"
        );
        assert_eq!(board.view().models[0].users[0].served, 4.0);

        router.send_replace(RouterConfig {
            fairness: Some(pb::FairnessConfig {
                global_report_interval_ms: 0,
                ..config
            }),
            ..Default::default()
        });
        counters.changed().await.expect("turned off");
        assert!(counters.borrow_and_update().is_none());
        board.report("dp", &report(1, 3, &[("m", "u", 5.0)]));
        assert!(board.view().models.is_empty(), "off: reports are ignored");
        task.abort();
    }
}
