//! One model's admission queue. A request is admitted at once while the
//! model's pods have room; otherwise it waits, and each time room appears
//! (a request of the model finishes, engine loads arrive, the snapshot
//! changes) the next waiting request goes:
//!
//! - **VTC** (Virtual Token Counter, Sheng et al., OSDI 2024): every user has
//!   a counter of the weighted tokens it was served; the waiting user with
//!   the smallest counter goes first, its requests in arrival order. A user
//!   who starts waiting is lifted to the smallest counter among the users
//!   waiting (or to the counter of the user served last), so time spent idle
//!   banks no credit.
//! - **Fleet-wide VTC**: with several dataplanes, a user's order key is its
//!   counter here plus what the other dataplanes served it, from the
//!   counters the controller pushes (the fleet's total for the user minus
//!   this dataplane's total as of its report those counters include). So a
//!   user spread over dataplanes is ordered by all it was served; service
//!   here counts at once, never twice; without pushed counters (no
//!   controller, or the fleet-wide order off) the key is the counter alone.
//! - **Session boost**: requests of a session whose last request completed
//!   go first, the most recently completed session first; the others in
//!   arrival order.
//!
//! Room: each pod takes `max_concurrent_per_pod` requests, minus those its
//! engine reported from elsewhere (other dataplanes) in the latest
//! EndpointLoads; the requests this dataplane admitted for the model and
//! that have not finished fill the rest. A model without pods has unlimited
//! room: the request goes on and fails fast where it would have anyway.
//!
//! Everything here runs under the queue's lock, which only requests of a
//! model with fairness on take: a few map operations per request.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{Histogram, IntGauge};
use switchyard_runtime::clock::{self, Instant};
use tokio::sync::oneshot;

use switchyard_snapshot::pb;

use super::sessions::RecentSessions;
use super::{FairnessMetrics, FairnessSettings, Policy};
use crate::pod::PodState;

/// Users (per model) whose counters are kept at most: beyond it, the idle
/// users served longest ago are forgotten before the window ends, so a
/// client inventing user ids cannot grow the dataplane's memory.
pub const MAX_TRACKED_USERS: usize = 10_000;
/// How often idle users are looked for: often enough that a window is
/// honoured to the second, rarely enough to cost nothing.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// The service time assumed for `Retry-After` before any request finished.
const INITIAL_SERVICE_TIME: Duration = Duration::from_secs(1);
/// Weight of the newest service time in the running mean behind `Retry-After`.
const SERVICE_TIME_SMOOTHING: f64 = 0.1;
/// The `user_id` label of users past `max_metric_users`.
pub const OTHER_USERS_LABEL: &str = "other";

/// Who a request is accounted to, and what it costs up front.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub user: Arc<str>,
    /// What one weighted token costs this user (`1 / tier weight`).
    pub charge_per_token: f64,
    /// Estimated input tokens, charged when the request is admitted.
    pub input_tokens: u64,
    /// Session boost: the request's session id.
    pub session: Option<Box<str>>,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The model's queue, or the user's share of it, is full.
    Full {
        user_limit: bool,
        retry_after: Duration,
    },
    /// It waited `queue_timeout`.
    Timeout,
}

/// A request that may go upstream: holds its place in the model's room
/// until [`Slot::finish`] (or drop: finished with nothing more served).
#[derive(Debug)]
pub struct Slot {
    queue: Arc<ModelQueue>,
    ticket: Ticket,
    admitted_at: Instant,
    finished: bool,
}

impl Slot {
    /// The request ended: the engine's usage (`prompt_tokens` replaces the
    /// estimate charged at admission when known), `completed` when the
    /// response was whole and successful (session boost remembers it).
    pub fn finish(mut self, prompt_tokens: Option<u64>, output_tokens: u64, completed: bool) {
        self.finished = true;
        self.queue
            .release(&self, prompt_tokens, output_tokens, completed);
    }

    pub fn model(&self) -> &str {
        &self.queue.model
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.finished {
            self.finished = true;
            self.queue.release(self, None, 0, false);
        }
    }
}

/// One model's queue.
#[derive(Debug)]
pub struct ModelQueue {
    pub model: String,
    metrics: FairnessMetrics,
    state: Mutex<QueueState>,
}

/// Session boost's order of a waiting request: boosted first, the most
/// recently completed session first, then arrival.
type BoostKey = (bool, Reverse<u64>, u64);

#[derive(Debug)]
struct QueueState {
    settings: Arc<FairnessSettings>,
    /// False once the model left the snapshot or fairness was turned off:
    /// every waiting and new request goes at once.
    open: bool,
    pods: Vec<Arc<PodState>>,
    /// Requests admitted and not finished.
    admitted: u64,
    users: HashMap<Arc<str>, UserState>,
    /// Users with waiting requests (VTC picks among them).
    backlogged: Vec<Arc<str>>,
    /// Waiting requests by arrival sequence number.
    waiters: HashMap<u64, Waiter>,
    boost_order: BTreeMap<BoostKey, u64>,
    sessions: RecentSessions,
    next_seq: u64,
    /// The order key of the user admitted last (VTC's lift when no one waits).
    last_served_key: f64,
    /// The fleet's totals for this model's users, from the latest pushed
    /// counters; a user seen here for the first time starts from its own.
    fleet_served: HashMap<Box<str>, f64>,
    /// Users holding one of the model's `max_metric_users` labels.
    labelled_users: usize,
    mean_service_seconds: f64,
    last_sweep: Instant,
}

#[derive(Debug)]
struct UserState {
    /// Weighted tokens served here, plus VTC's lifts.
    counter: f64,
    /// The user's part of the fleet-wide counters.
    fleet: FleetShare,
    /// Waiting requests in arrival order; its length is the user's queue
    /// length under both policies.
    waiting: VecDeque<u64>,
    running: u64,
    last_active: Instant,
    queue_size: IntGauge,
    queue_duration: Histogram,
    labelled: bool,
}

/// What the fleet served a user and what of it this dataplane reported.
#[derive(Debug, Default, Clone, Copy)]
struct FleetShare {
    /// Weighted tokens served here (the counter without lifts): the total
    /// this dataplane reports.
    served: f64,
    /// `served` as last put in a report.
    sent: f64,
    /// `served` as put in the report the controller has not yet echoed.
    in_report: Option<f64>,
    /// This dataplane's total as of its report the pushed counters include.
    included: f64,
    /// The fleet's total from the pushed counters (0 without).
    fleet: f64,
}

impl FleetShare {
    /// What the other dataplanes served the user.
    fn elsewhere(&self) -> f64 {
        (self.fleet - self.included).max(0.0)
    }
}

/// How much of this dataplane's reports pushed counters include.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// None: they hold nothing of this dataplane (or there are none).
    Nothing,
    /// The report awaiting its echo (and those before).
    Latest,
    /// Only earlier reports: the one awaited is not in yet.
    Earlier,
}

#[derive(Debug)]
struct Waiter {
    /// Its session is with the waiting request; not needed here.
    ticket: Ticket,
    boost_key: BoostKey,
    arrived: Instant,
    grant: oneshot::Sender<()>,
}

/// A waiting request's place. Dropped before its turn (the client went
/// away), it leaves the queue at once.
struct Waiting<'a> {
    queue: &'a Arc<ModelQueue>,
    seq: u64,
    grant: oneshot::Receiver<()>,
    ticket: Option<Ticket>,
}

impl Waiting<'_> {
    /// Leaves the queue; true if its turn came after all (a grant that
    /// raced with the timeout), and it holds a slot.
    fn leave(&mut self) -> bool {
        let mut state = self.queue.state.lock();
        state.remove_waiter(self.seq).is_none() && self.grant.try_recv().is_ok()
    }

    fn into_slot(mut self) -> Slot {
        self.slot()
    }

    /// The slot its grant gave it.
    fn slot(&mut self) -> Slot {
        Slot {
            queue: self.queue.clone(),
            ticket: self.ticket.take().unwrap_or_else(Ticket::nobody),
            admitted_at: clock::now(),
            finished: false,
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.ticket.is_some() && self.leave() {
            // Admitted just as its client left: the room goes back.
            drop(self.slot());
        }
    }
}

impl Ticket {
    fn nobody() -> Self {
        Self {
            user: Arc::from(""),
            charge_per_token: 0.0,
            input_tokens: 0,
            session: None,
        }
    }
}

/// What `/debug/router/state` shows of a queue.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueView {
    pub model: String,
    /// Requests admitted and not finished.
    pub admitted: u64,
    /// What the pods take now (None: no pods, no bound).
    pub capacity: Option<u64>,
    pub waiting: usize,
    pub users: Vec<UserView>,
    /// The fleet-wide counters last pushed for the model, by user (empty
    /// without: each user is ordered by this dataplane's counter alone).
    pub global_counters: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    pub user: String,
    /// Weighted tokens served here, plus lifts.
    pub counter: f64,
    /// The fleet's total from the pushed counters (0 without).
    pub global_counter: f64,
    /// What other dataplanes served the user: the pushed total minus this
    /// dataplane's reported part.
    pub served_elsewhere: f64,
    /// Served here and not yet in the pushed counters.
    pub unreflected: f64,
    /// What the queue orders by: `counter + servedElsewhere`.
    pub order_key: f64,
    pub waiting: usize,
    pub running: u64,
}

impl ModelQueue {
    pub fn new(model: String, settings: Arc<FairnessSettings>, metrics: FairnessMetrics) -> Self {
        Self {
            model,
            metrics,
            state: Mutex::new(QueueState {
                sessions: RecentSessions::new(settings.max_sessions),
                settings,
                open: true,
                pods: Vec::new(),
                admitted: 0,
                users: HashMap::new(),
                backlogged: Vec::new(),
                waiters: HashMap::new(),
                boost_order: BTreeMap::new(),
                next_seq: 0,
                last_served_key: 0.0,
                fleet_served: HashMap::new(),
                labelled_users: 0,
                mean_service_seconds: INITIAL_SERVICE_TIME.as_secs_f64(),
                last_sweep: clock::now(),
            }),
        }
    }

    /// A new snapshot: the model's pods and the settings in force. Both
    /// orders are kept for every waiting request, so a change of policy
    /// applies to those already waiting.
    pub fn update(&self, settings: &Arc<FairnessSettings>, pods: Vec<Arc<PodState>>) {
        let mut state = self.state.lock();
        state.open = true;
        state.pods = pods;
        state.sessions.set_capacity(settings.max_sessions);
        state.settings = settings.clone();
        self.pump(&mut state);
    }

    /// The model left the snapshot, or fairness was turned off: everyone
    /// goes through (and meets the new table).
    pub fn open_gates(&self) {
        let mut state = self.state.lock();
        state.open = false;
        self.pump(&mut state);
    }

    /// The model's metric series go with it (its queue was dropped).
    pub fn retire_series(&self) {
        let state = self.state.lock();
        let labelled = state.users.iter().filter(|(_, user)| user.labelled);
        for label in labelled.map(|(name, _)| &**name).chain([OTHER_USERS_LABEL]) {
            let labels = [self.model.as_str(), label];
            let _ = self.metrics.queue_size.remove_label_values(&labels);
            let _ = self.metrics.queue_duration.remove_label_values(&labels);
        }
    }

    /// Room may have appeared (new engine loads).
    pub fn wake(&self) {
        let mut state = self.state.lock();
        self.pump(&mut state);
    }

    /// Admits the request now or when its turn comes; refuses it when the
    /// queue is full or its wait reaches the timeout. Dropping the future
    /// (the client went away) removes the request from the queue at once.
    pub async fn admit(self: &Arc<Self>, ticket: Ticket) -> Result<Slot, Refusal> {
        let arrived = clock::now();
        let (grant, seq, timeout) = {
            let mut state = self.state.lock();
            self.sweep(&mut state, arrived);
            self.user_entry(&mut state, &ticket.user, arrived);
            state.lift(&ticket.user);
            if !state.open || (state.waiters.is_empty() && state.room() > 0) {
                if let Some(user) = state.users.get(&ticket.user) {
                    user.queue_duration.observe(0.0);
                }
                state.charge_admission(&ticket, arrived);
                drop(state);
                return Ok(Slot {
                    queue: self.clone(),
                    ticket,
                    admitted_at: arrived,
                    finished: false,
                });
            }
            let user_waiting = state.users.get(&ticket.user).map_or(0, |u| u.waiting.len());
            let user_limit = user_waiting >= state.settings.max_user_queue_length;
            if user_limit || state.waiters.len() >= state.settings.max_queue_length {
                return Err(Refusal::Full {
                    user_limit,
                    retry_after: state.retry_after(),
                });
            }
            let (grant, seq) = state.enqueue(&ticket, arrived);
            (grant, seq, state.settings.queue_timeout)
        };
        let mut waiting = Waiting {
            queue: self,
            seq,
            grant,
            ticket: Some(ticket),
        };
        let granted = matches!(
            clock::timeout(timeout, &mut waiting.grant).await,
            Ok(Ok(()))
        );
        if granted || waiting.leave() {
            Ok(waiting.into_slot())
        } else {
            waiting.ticket = None;
            Err(Refusal::Timeout)
        }
    }

    /// Admits as many waiting requests as there is room for, in policy order.
    fn pump(&self, state: &mut QueueState) {
        while !state.waiters.is_empty() && (!state.open || state.room() > 0) {
            let Some(seq) = state.next_in_line() else {
                break;
            };
            let Some(waiter) = state.remove_waiter(seq) else {
                break;
            };
            let now = clock::now();
            if waiter.grant.send(()).is_err() {
                continue;
            }
            if let Some(user) = state.users.get(&waiter.ticket.user) {
                user.queue_duration
                    .observe(now.duration_since(waiter.arrived).as_secs_f64());
            }
            state.charge_admission(&waiter.ticket, now);
        }
    }

    fn release(
        &self,
        slot: &Slot,
        prompt_tokens: Option<u64>,
        output_tokens: u64,
        completed: bool,
    ) {
        let now = clock::now();
        let mut state = self.state.lock();
        state.admitted = state.admitted.saturating_sub(1);
        if completed {
            let service = now.duration_since(slot.admitted_at).as_secs_f64();
            state.mean_service_seconds +=
                SERVICE_TIME_SMOOTHING * (service - state.mean_service_seconds);
        }
        let settings = state.settings.clone();
        if let Some(user) = state.users.get_mut(&slot.ticket.user) {
            user.running = user.running.saturating_sub(1);
            user.last_active = now;
            let input_correction = prompt_tokens.map_or(0.0, |prompt| {
                prompt as f64 - slot.ticket.input_tokens as f64
            });
            let served = (input_correction * settings.input_token_weight
                + output_tokens as f64 * settings.output_token_weight)
                * slot.ticket.charge_per_token;
            user.counter = (user.counter + served).max(0.0);
            user.fleet.served = (user.fleet.served + served).max(0.0);
        }
        if let (true, Some(session)) = (completed, slot.ticket.session.as_deref()) {
            state.sessions.completed(session);
        }
        self.pump(&mut state);
    }

    /// A user's entry, created with its metric handles on first sight.
    fn user_entry(&self, state: &mut QueueState, user: &Arc<str>, now: Instant) {
        if state.users.contains_key(user) {
            return;
        }
        let labelled = state.labelled_users < state.settings.max_metric_users;
        let label = if labelled { user } else { OTHER_USERS_LABEL };
        state.labelled_users += usize::from(labelled);
        let labels = [self.model.as_str(), label];
        let fleet = FleetShare {
            fleet: state.fleet_served.get(&**user).copied().unwrap_or(0.0),
            ..FleetShare::default()
        };
        state.users.insert(
            user.clone(),
            UserState {
                counter: 0.0,
                fleet,
                waiting: VecDeque::new(),
                running: 0,
                last_active: now,
                queue_size: self.metrics.queue_size.with_label_values(&labels),
                queue_duration: self.metrics.queue_duration.with_label_values(&labels),
                labelled,
            },
        );
    }

    /// Forgets users idle longer than the window (their service no longer
    /// counts), and the longest idle beyond [`MAX_TRACKED_USERS`].
    fn sweep(&self, state: &mut QueueState, now: Instant) {
        if now.duration_since(state.last_sweep) < SWEEP_INTERVAL
            && state.users.len() < MAX_TRACKED_USERS
        {
            return;
        }
        state.last_sweep = now;
        let window = state.settings.window;
        let idle = |user: &UserState| user.waiting.is_empty() && user.running == 0;
        let mut forgotten: Vec<Arc<str>> = state
            .users
            .iter()
            .filter(|(_, user)| idle(user) && now.duration_since(user.last_active) > window)
            .map(|(name, _)| name.clone())
            .collect();
        let excess = (state.users.len() - forgotten.len()).saturating_sub(MAX_TRACKED_USERS - 1);
        if excess > 0 {
            let mut idle_users: Vec<(Instant, Arc<str>)> = state
                .users
                .iter()
                .filter(|(_, user)| idle(user) && now.duration_since(user.last_active) <= window)
                .map(|(name, user)| (user.last_active, name.clone()))
                .collect();
            idle_users.sort_unstable();
            forgotten.extend(idle_users.into_iter().take(excess).map(|(_, name)| name));
        }
        for name in forgotten {
            if let Some(user) = state.users.remove(&name)
                && user.labelled
            {
                state.labelled_users -= 1;
                let labels = [self.model.as_str(), &*name];
                let _ = self.metrics.queue_size.remove_label_values(&labels);
                let _ = self.metrics.queue_duration.remove_label_values(&labels);
            }
        }
    }

    /// Adds to `usage` the users whose total served here changed since the
    /// last report (every user served anything, with `everything`), and
    /// marks them as awaiting the controller's echo.
    pub fn report_usage(&self, everything: bool, usage: &mut Vec<pb::UserUsage>) {
        let mut state = self.state.lock();
        for (name, user) in &mut state.users {
            let share = &mut user.fleet;
            let changed = share.served != share.sent;
            if !(changed || (everything && share.served > 0.0)) {
                continue;
            }
            share.sent = share.served;
            share.in_report = Some(share.served);
            usage.push(pb::UserUsage {
                model: self.model.clone(),
                user: name.to_string(),
                served: share.served,
            });
        }
    }

    /// New fleet-wide counters for this model (`users`, at most
    /// `max_users` read), including as much of this dataplane's reports
    /// as `echo` says. `None`: no fleet-wide counters, every user's key is
    /// its own counter.
    pub fn apply_fleet(&self, users: Option<&[pb::UserServed]>, echo: Echo, max_users: usize) {
        let mut state = self.state.lock();
        let state = &mut *state;
        state.fleet_served.clear();
        for user in users.unwrap_or_default().iter().take(max_users) {
            if user.served.is_finite() && user.served >= 0.0 {
                state
                    .fleet_served
                    .insert(user.user.as_str().into(), user.served);
            }
        }
        for (name, user) in &mut state.users {
            let share = &mut user.fleet;
            match echo {
                Echo::Latest => {
                    if let Some(reported) = share.in_report.take() {
                        share.included = reported;
                    }
                }
                Echo::Earlier => {}
                Echo::Nothing => share.included = 0.0,
            }
            share.fleet = state.fleet_served.get(&**name).copied().unwrap_or(0.0);
        }
    }

    pub fn view(&self) -> QueueView {
        let state = self.state.lock();
        let mut users: Vec<UserView> = state
            .users
            .iter()
            .map(|(name, user)| UserView {
                user: name.to_string(),
                counter: user.counter,
                global_counter: user.fleet.fleet,
                served_elsewhere: user.fleet.elsewhere(),
                unreflected: (user.fleet.served - user.fleet.included).max(0.0),
                order_key: user.order_key(),
                waiting: user.waiting.len(),
                running: user.running,
            })
            .collect();
        users.sort_by(|a, b| a.user.cmp(&b.user));
        QueueView {
            model: self.model.clone(),
            admitted: state.admitted,
            capacity: state.capacity(),
            waiting: state.waiters.len(),
            users,
            global_counters: state
                .fleet_served
                .iter()
                .map(|(user, served)| (user.to_string(), *served))
                .collect(),
        }
    }
}

impl UserState {
    /// What VTC orders by: served here (with lifts) plus served elsewhere.
    fn order_key(&self) -> f64 {
        self.counter + self.fleet.elsewhere()
    }
}

impl QueueState {
    /// Requests the model's pods take now; None without pods.
    fn capacity(&self) -> Option<u64> {
        if self.pods.is_empty() {
            return None;
        }
        let now = clock::now();
        let ceiling = u64::from(self.settings.max_concurrent_per_pod);
        Some(
            self.pods
                .iter()
                .filter(|pod| !pod.is_ejected(now))
                .map(|pod| ceiling.saturating_sub(pod.load_from_elsewhere()))
                .sum(),
        )
    }

    fn room(&self) -> u64 {
        self.capacity()
            .map_or(u64::MAX, |capacity| capacity.saturating_sub(self.admitted))
    }

    /// A request of `user` goes upstream: its input is charged now.
    fn charge_admission(&mut self, ticket: &Ticket, now: Instant) {
        self.admitted += 1;
        let weight = self.settings.input_token_weight;
        if let Some(user) = self.users.get_mut(&ticket.user) {
            let charge = ticket.input_tokens as f64 * weight * ticket.charge_per_token;
            user.counter += charge;
            user.fleet.served += charge;
            user.running += 1;
            user.last_active = now;
            self.last_served_key = user.order_key();
        }
    }

    fn enqueue(&mut self, ticket: &Ticket, arrived: Instant) -> (oneshot::Receiver<()>, u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let boost = ticket
            .session
            .as_deref()
            .and_then(|session| self.sessions.last_completed(session));
        let boost_key = (boost.is_none(), Reverse(boost.unwrap_or(0)), seq);
        if let Some(user) = self.users.get_mut(&ticket.user) {
            if user.waiting.is_empty() {
                self.backlogged.push(ticket.user.clone());
            }
            user.waiting.push_back(seq);
            user.queue_size.inc();
        }
        let (grant, receiver) = oneshot::channel();
        self.boost_order.insert(boost_key, seq);
        self.waiters.insert(
            seq,
            Waiter {
                ticket: Ticket {
                    user: ticket.user.clone(),
                    charge_per_token: ticket.charge_per_token,
                    input_tokens: ticket.input_tokens,
                    session: None,
                },
                boost_key,
                arrived,
                grant,
            },
        );
        (receiver, seq)
    }

    /// VTC's lift: a user arriving with nothing waiting joins at the level
    /// of the users waiting (or of the user served last when no one
    /// waits), so time spent idle banks no credit. Levels are order keys:
    /// what the user was served elsewhere counts towards its level.
    fn lift(&mut self, name: &str) {
        if self
            .users
            .get(name)
            .is_none_or(|user| !user.waiting.is_empty())
        {
            return;
        }
        let floor = self
            .backlogged
            .iter()
            .filter_map(|user| self.users.get(user))
            .map(UserState::order_key)
            .reduce(f64::min)
            .unwrap_or(self.last_served_key);
        if let Some(user) = self.users.get_mut(name) {
            user.counter = user.counter.max(floor - user.fleet.elsewhere());
        }
    }

    /// The waiting request that goes next under the policy.
    fn next_in_line(&self) -> Option<u64> {
        match self.settings.policy {
            Policy::Vtc => self
                .backlogged
                .iter()
                .filter_map(|name| {
                    let user = self.users.get(name)?;
                    Some((user.order_key(), *user.waiting.front()?))
                })
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
                .map(|(_, seq)| seq),
            Policy::SessionBoost => self.boost_order.values().next().copied(),
        }
    }

    fn remove_waiter(&mut self, seq: u64) -> Option<Waiter> {
        let waiter = self.waiters.remove(&seq)?;
        self.boost_order.remove(&waiter.boost_key);
        if let Some(user) = self.users.get_mut(&waiter.ticket.user) {
            if let Some(position) = user.waiting.iter().position(|queued| *queued == seq) {
                user.waiting.remove(position);
                user.queue_size.dec();
            }
            if user.waiting.is_empty()
                && let Some(position) = self
                    .backlogged
                    .iter()
                    .position(|name| *name == waiter.ticket.user)
            {
                self.backlogged.swap_remove(position);
            }
        }
        Some(waiter)
    }

    /// When a refused request may find room: the queue ahead drained at the
    /// recent service rate, at least a second, at most the queue timeout.
    fn retry_after(&self) -> Duration {
        let servers = self.capacity().unwrap_or(1).max(1) as f64;
        let seconds = (self.waiters.len() as f64 + 1.0) * self.mean_service_seconds / servers;
        Duration::from_secs(seconds.ceil() as u64).clamp(
            Duration::from_secs(1),
            self.settings.queue_timeout.max(Duration::from_secs(1)),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use switchyard_snapshot::pb;
    use tokio::sync::mpsc;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn settings(change: impl FnOnce(&mut pb::FairnessConfig)) -> Arc<FairnessSettings> {
        let mut config = pb::FairnessConfig {
            policy: pb::FairnessPolicy::Vtc.into(),
            window_ms: 300_000,
            input_token_weight: 1.0,
            output_token_weight: 2.0,
            max_concurrent_per_pod: 1,
            queue_timeout_ms: u64::try_from(TIMEOUT.as_millis()).unwrap_or(u64::MAX),
            max_queue_length: 100,
            max_user_queue_length: 100,
            user_header: String::new(),
            max_metric_users: 10,
            tier_weights: vec![],
            session_header: "x-session-id".into(),
            max_sessions: 16,
            global_report_interval_ms: 0,
            max_global_users: 100,
        };
        change(&mut config);
        Arc::new(FairnessSettings::from_config(&config).expect("valid"))
    }

    fn pod(name: &str) -> Arc<PodState> {
        PodState::for_tests(name, SocketAddr::from(([127, 0, 0, 1], 8000)))
    }

    /// A queue for model `m` over `pods` pods.
    fn queue(settings: Arc<FairnessSettings>, pods: usize) -> Arc<ModelQueue> {
        let queue = Arc::new(ModelQueue::new(
            "m".into(),
            settings.clone(),
            FairnessMetrics::unregistered(),
        ));
        queue.update(
            &settings,
            (0..pods).map(|i| pod(&format!("p{i}"))).collect(),
        );
        queue
    }

    fn ticket(user: &str, input_tokens: u64) -> Ticket {
        Ticket {
            user: Arc::from(user),
            charge_per_token: 1.0,
            input_tokens,
            session: None,
        }
    }

    /// Requests admitted in the background, reported in the order their
    /// turn came.
    struct Line {
        queue: Arc<ModelQueue>,
        admitted: mpsc::UnboundedSender<(String, Result<Slot, Refusal>)>,
        order: mpsc::UnboundedReceiver<(String, Result<Slot, Refusal>)>,
    }

    impl Line {
        fn new(queue: &Arc<ModelQueue>) -> Self {
            let (admitted, order) = mpsc::unbounded_channel();
            Self {
                queue: queue.clone(),
                admitted,
                order,
            }
        }

        /// `name` asks to be admitted; returns once it waits (or was
        /// answered), so arrival order is the call order.
        async fn arrive(&self, name: &str, ticket: Ticket) -> tokio::task::JoinHandle<()> {
            let before = self.queue.view().waiting;
            let queue = self.queue.clone();
            let sender = self.admitted.clone();
            let name = name.to_owned();
            let task = tokio::spawn(async move {
                let admitted = queue.admit(ticket).await;
                let _ = sender.send((name, admitted));
            });
            while self.queue.view().waiting == before && !task.is_finished() {
                tokio::task::yield_now().await;
            }
            task
        }

        /// The next request whose turn came.
        async fn next(&mut self) -> (String, Slot) {
            let (name, admitted) = self.order.recv().await.expect("a request");
            (name, admitted.expect("admitted"))
        }
    }

    fn counter(queue: &ModelQueue, user: &str) -> f64 {
        user_view(queue, user).counter
    }

    #[tokio::test(start_paused = true)]
    async fn admits_at_once_while_there_is_room() {
        let queue = queue(settings(|c| c.max_concurrent_per_pod = 2), 1);
        let a = queue.admit(ticket("a", 10)).await.expect("room");
        let b = queue.admit(ticket("b", 10)).await.expect("room");
        assert_eq!(queue.view().admitted, 2);
        drop((a, b));
        assert_eq!(queue.view().admitted, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_user_served_least_goes_first_and_each_users_requests_keep_their_order() {
        let queue = queue(settings(|_| {}), 1);
        let mut line = Line::new(&queue);
        let running = queue.admit(ticket("heavy", 10)).await.expect("room");
        for (name, tokens) in [("heavy-1", 30), ("heavy-2", 1), ("heavy-3", 5)] {
            line.arrive(name, ticket("heavy", tokens)).await;
        }
        line.arrive("light-1", ticket("light", 10)).await;
        line.arrive("light-2", ticket("light", 10)).await;
        // Lifted to heavy's level when it started waiting: no credit from
        // having been idle, but heavy's output is charged when it finishes.
        assert_eq!(counter(&queue, "light"), counter(&queue, "heavy"));
        running.finish(Some(10), 20, true);
        let mut order = Vec::new();
        for _ in 0..5 {
            let (name, slot) = line.next().await;
            order.push(name);
            slot.finish(None, 0, true);
        }
        assert_eq!(
            order,
            ["light-1", "light-2", "heavy-1", "heavy-2", "heavy-3"],
            "light (10, then 20, 30) before heavy (10 + 2 x 20), then heavy in arrival order"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn backlogged_users_share_turns_by_tokens_served() {
        let queue = queue(settings(|_| {}), 1);
        let mut line = Line::new(&queue);
        let running = queue.admit(ticket("a", 0)).await.expect("room");
        for i in 0..4 {
            line.arrive(&format!("a{i}"), ticket("a", 0)).await;
        }
        for i in 0..4 {
            line.arrive(&format!("b{i}"), ticket("b", 0)).await;
        }
        running.finish(Some(0), 10, true);
        let mut order = Vec::new();
        for _ in 0..8 {
            let (name, slot) = line.next().await;
            // b's requests cost twice a's.
            let output = if name.starts_with('b') { 20 } else { 10 };
            order.push(name);
            slot.finish(Some(0), output, true);
        }
        assert_eq!(order, ["b0", "a0", "a1", "b1", "a2", "a3", "b2", "b3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_back_from_idle_is_lifted_to_the_waiting_users_level() {
        let queue = queue(settings(|_| {}), 1);
        let mut line = Line::new(&queue);
        // "early" is served a little, then goes idle while "busy" is served a lot.
        queue
            .admit(ticket("early", 5))
            .await
            .expect("room")
            .finish(Some(5), 0, true);
        let running = queue.admit(ticket("busy", 1000)).await.expect("room");
        line.arrive("busy-1", ticket("busy", 1000)).await;
        assert_eq!(counter(&queue, "early"), 5.0);
        line.arrive("early-1", ticket("early", 1)).await;
        assert_eq!(counter(&queue, "early"), counter(&queue, "busy"));
        running.finish(Some(1000), 0, true);
        let (first, slot) = line.next().await;
        assert_eq!(
            first, "busy-1",
            "equal counters: arrival order, no banked credit"
        );
        slot.finish(Some(1000), 0, true);
        assert_eq!(line.next().await.0, "early-1");
    }

    /// A model `m` with one pod taking one request at once, under a
    /// [`super::super::Fairness`] whose fleet-wide order is on.
    fn fleet_queue() -> (super::super::Fairness, Arc<ModelQueue>) {
        let fairness = super::super::Fairness::default();
        let settings = settings(|c| {
            c.global_report_interval_ms = 250;
            c.max_global_users = 100;
        });
        let queues = fairness
            .apply(
                Some((*settings).clone()),
                HashMap::from([("m".to_owned(), vec![pod("p0")])]),
            )
            .expect("on");
        let queue = queues.queue("m").expect("m").clone();
        (fairness, queue)
    }

    fn pushed(users: &[(&str, f64)], reports: &[(u64, u64)]) -> pb::FairnessCounters {
        pb::FairnessCounters {
            models: vec![pb::ModelFairnessCounters {
                model: "m".into(),
                users: users
                    .iter()
                    .map(|(user, served)| pb::UserServed {
                        user: (*user).into(),
                        served: *served,
                    })
                    .collect(),
            }],
            reports: reports
                .iter()
                .map(|(reporter, sequence)| pb::FairnessReportSeen {
                    reporter: *reporter,
                    sequence: *sequence,
                })
                .collect(),
        }
    }

    fn user_view(queue: &ModelQueue, user: &str) -> UserView {
        queue
            .view()
            .users
            .into_iter()
            .find(|view| view.user == user)
            .expect("user known")
    }

    #[tokio::test(start_paused = true)]
    async fn backlogged_users_are_ordered_by_what_the_whole_fleet_served_them() {
        let (fairness, queue) = fleet_queue();
        let mut line = Line::new(&queue);
        let running = queue.admit(ticket("x", 0)).await.expect("room");
        line.arrive("heavy-1", ticket("heavy", 10)).await;
        line.arrive("heavy-2", ticket("heavy", 10)).await;
        line.arrive("light-1", ticket("light", 10)).await;
        line.arrive("light-2", ticket("light", 10)).await;
        // Other dataplanes served "heavy" 1,000 tokens; this one reported nothing.
        fairness.apply_counters(Some(&pushed(&[("heavy", 1_000.0)], &[(7, 1)])));
        let heavy = user_view(&queue, "heavy");
        assert_eq!((heavy.counter, heavy.served_elsewhere), (0.0, 1_000.0));
        assert_eq!(heavy.order_key, 1_000.0);
        running.finish(Some(0), 0, true);
        let mut order = Vec::new();
        for _ in 0..4 {
            let (name, slot) = line.next().await;
            order.push(name);
            slot.finish(Some(10), 0, true);
        }
        assert_eq!(order, ["light-1", "light-2", "heavy-1", "heavy-2"]);

        // A user back from idle is lifted to the waiting users' level, in
        // order keys: its counter rises to the key less what it was served
        // elsewhere.
        let running = queue.admit(ticket("x", 0)).await.expect("room");
        line.arrive("heavy-3", ticket("heavy", 10)).await;
        fairness.apply_counters(Some(&pushed(
            &[("heavy", 1_000.0), ("light", 300.0)],
            &[(7, 2)],
        )));
        line.arrive("light-3", ticket("light", 10)).await;
        let (heavy, light) = (user_view(&queue, "heavy"), user_view(&queue, "light"));
        assert_eq!(light.order_key, heavy.order_key, "no banked credit");
        assert_eq!(light.counter, heavy.order_key - 300.0);
        running.finish(Some(0), 0, true);
        assert_eq!(line.next().await.0, "heavy-3", "equal keys: arrival order");

        // Without pushed counters (the fleet-wide order turned off), each
        // user's key is its own counter again.
        fairness.apply_counters(None);
        let heavy = user_view(&queue, "heavy");
        assert_eq!(heavy.order_key, heavy.counter);
        assert_eq!(heavy.global_counter, 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn service_here_counts_at_once_and_never_twice() {
        let (fairness, queue) = fleet_queue();
        queue
            .admit(ticket("u", 100))
            .await
            .expect("room")
            .finish(Some(100), 0, true);
        let first = fairness.usage_report(true).expect("served: a report");
        let reporter = first.reporter;
        assert_eq!(first.sequence, 1);
        assert_eq!(
            first.usage,
            [pb::UserUsage {
                model: "m".into(),
                user: "u".into(),
                served: 100.0
            }]
        );
        assert_eq!(
            fairness.usage_report(false),
            None,
            "one report awaits its echo at a time"
        );

        // The counters include the report: the fleet's 100 are this
        // dataplane's own, nothing was served elsewhere.
        fairness.apply_counters(Some(&pushed(&[("u", 100.0)], &[(reporter, 1)])));
        let view = user_view(&queue, "u");
        assert_eq!((view.order_key, view.served_elsewhere), (100.0, 0.0));
        assert_eq!(fairness.usage_report(false), None, "nothing new");

        // 50 more here, reported; the next push still includes only the
        // first report, plus 30 from another dataplane.
        queue
            .admit(ticket("u", 50))
            .await
            .expect("room")
            .finish(Some(50), 0, true);
        assert_eq!(user_view(&queue, "u").order_key, 150.0, "counted at once");
        let second = fairness.usage_report(false).expect("changed");
        assert_eq!((second.sequence, second.usage[0].served), (2, 150.0));
        fairness.apply_counters(Some(&pushed(&[("u", 130.0)], &[(reporter, 1), (9, 4)])));
        let view = user_view(&queue, "u");
        assert_eq!(
            (view.order_key, view.served_elsewhere, view.unreflected),
            (180.0, 30.0, 50.0)
        );
        // Then the push that includes it.
        fairness.apply_counters(Some(&pushed(&[("u", 180.0)], &[(reporter, 2), (9, 4)])));
        let view = user_view(&queue, "u");
        assert_eq!(
            (view.order_key, view.served_elsewhere, view.unreflected),
            (180.0, 30.0, 0.0)
        );

        // A report whose echo never comes is made again, whole, after a while.
        queue
            .admit(ticket("u", 1))
            .await
            .expect("room")
            .finish(Some(1), 0, true);
        assert_eq!(fairness.usage_report(false).expect("changed").sequence, 3);
        assert_eq!(fairness.usage_report(false), None);
        tokio::time::advance(super::super::REPORT_ECHO_TIMEOUT).await;
        let again = fairness.usage_report(false).expect("echo overdue");
        assert_eq!((again.sequence, again.usage[0].served), (4, 151.0));
    }

    #[tokio::test(start_paused = true)]
    async fn full_queues_refuse_with_a_retry_time() {
        let queue = queue(
            settings(|c| {
                c.max_queue_length = 3;
                c.max_user_queue_length = 2;
            }),
            1,
        );
        let line = Line::new(&queue);
        let _running = queue.admit(ticket("a", 1)).await.expect("room");
        line.arrive("a1", ticket("a", 1)).await;
        line.arrive("a2", ticket("a", 1)).await;
        // a's share is full.
        let refused = queue.admit(ticket("a", 1)).await;
        assert!(
            matches!(refused, Err(Refusal::Full { user_limit: true, retry_after }) if retry_after >= Duration::from_secs(1)),
            "{refused:?}"
        );
        line.arrive("b1", ticket("b", 1)).await;
        // The model's queue is full.
        let refused = queue.admit(ticket("c", 1)).await;
        assert!(
            matches!(
                refused,
                Err(Refusal::Full {
                    user_limit: false,
                    ..
                })
            ),
            "{refused:?}"
        );
        assert_eq!(queue.view().waiting, 3, "refusals take no place");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_at_most_the_timeout_and_leaves_no_entry() {
        let queue = queue(settings(|_| {}), 1);
        let _running = queue.admit(ticket("a", 1)).await.expect("room");
        let started = clock::now();
        let refused = queue
            .admit(ticket("b", 1))
            .await
            .expect_err("no room in time");
        assert_eq!(refused, Refusal::Timeout);
        assert_eq!(started.elapsed(), TIMEOUT);
        let view = queue.view();
        assert_eq!(view.waiting, 0);
        assert!(view.users.iter().all(|user| user.waiting == 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_is_gone_from_the_queue_at_once() {
        let metrics = FairnessMetrics::unregistered();
        let settings = settings(|_| {});
        let queue = Arc::new(ModelQueue::new(
            "m".into(),
            settings.clone(),
            metrics.clone(),
        ));
        queue.update(&settings, vec![pod("p0")]);
        let mut line = Line::new(&queue);
        let running = queue.admit(ticket("a", 1)).await.expect("room");
        let gone = line.arrive("gone", ticket("b", 1)).await;
        line.arrive("stays", ticket("c", 1)).await;
        let gauge = metrics.queue_size.with_label_values(&["m", "b"]);
        assert_eq!(gauge.get(), 1);
        gone.abort();
        let _ = gone.await;
        assert_eq!(queue.view().waiting, 1);
        assert_eq!(gauge.get(), 0);
        drop(running);
        let (next, slot) = line.next().await;
        assert_eq!(next, "stays", "the slot went to the next in line");
        drop(slot);
        assert_eq!(queue.view().admitted, 0, "no slot leaked");
    }

    #[tokio::test(start_paused = true)]
    async fn room_counts_the_engines_requests_from_elsewhere() {
        let settings = settings(|c| c.max_concurrent_per_pod = 4);
        let busy = pod("p0");
        busy.set_load(Some(Arc::new(pb::EndpointLoad {
            requests_running: 2.0,
            requests_waiting: 1.0,
            ..Default::default()
        })));
        let queue = Arc::new(ModelQueue::new(
            "m".into(),
            settings.clone(),
            FairnessMetrics::unregistered(),
        ));
        queue.update(&settings, vec![busy.clone()]);
        assert_eq!(queue.view().capacity, Some(1));
        let mut line = Line::new(&queue);
        let _one = queue.admit(ticket("a", 1)).await.expect("room for one");
        line.arrive("waits", ticket("a", 1)).await;
        busy.set_load(Some(Arc::new(pb::EndpointLoad::default())));
        queue.wake();
        assert_eq!(line.next().await.0, "waits");
    }

    #[tokio::test(start_paused = true)]
    async fn session_boost_serves_sessions_that_just_completed_first() {
        let queue = queue(
            settings(|c| c.policy = pb::FairnessPolicy::SessionBoost.into()),
            1,
        );
        let mut line = Line::new(&queue);
        let session = |user: &str, id: &str| Ticket {
            session: Some(id.into()),
            ..ticket(user, 1)
        };
        queue
            .admit(session("u", "old"))
            .await
            .expect("room")
            .finish(Some(1), 1, true);
        queue
            .admit(session("u", "recent"))
            .await
            .expect("room")
            .finish(Some(1), 1, true);
        let running = queue.admit(ticket("u", 1)).await.expect("room");
        line.arrive("new", session("u", "new")).await;
        line.arrive("old", session("u", "old")).await;
        line.arrive("plain", ticket("u", 1)).await;
        line.arrive("recent", session("u", "recent")).await;
        drop(running);
        let mut order = Vec::new();
        for _ in 0..4 {
            let (name, slot) = line.next().await;
            order.push(name);
            drop(slot);
        }
        assert_eq!(order, ["recent", "old", "new", "plain"]);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_users_are_forgotten_after_the_window_and_labels_are_bounded() {
        let metrics = FairnessMetrics::unregistered();
        let settings = settings(|c| {
            c.window_ms = 60_000;
            c.max_metric_users = 1;
            c.max_concurrent_per_pod = 10;
        });
        let queue = Arc::new(ModelQueue::new(
            "m".into(),
            settings.clone(),
            metrics.clone(),
        ));
        queue.update(&settings, vec![pod("p0")]);
        drop(queue.admit(ticket("first", 1)).await.expect("room"));
        drop(queue.admit(ticket("second", 1)).await.expect("room"));
        let duration_count = |user: &str| {
            metrics
                .queue_duration
                .with_label_values(&["m", user])
                .get_sample_count()
        };
        assert_eq!(duration_count("first"), 1);
        assert_eq!(duration_count("other"), 1, "past maxMetricUsers");
        tokio::time::advance(Duration::from_secs(61)).await;
        drop(queue.admit(ticket("third", 1)).await.expect("room"));
        let users: Vec<String> = queue.view().users.into_iter().map(|u| u.user).collect();
        assert_eq!(users, ["third"], "idle past the window: forgotten");
        assert_eq!(duration_count("third"), 1, "the freed label is reused");
    }

    #[tokio::test(start_paused = true)]
    async fn turning_fairness_off_lets_everyone_through() {
        let queue = queue(settings(|_| {}), 1);
        let mut line = Line::new(&queue);
        let _running = queue.admit(ticket("a", 1)).await.expect("room");
        line.arrive("b", ticket("b", 1)).await;
        queue.open_gates();
        assert_eq!(line.next().await.0, "b");
        queue
            .admit(ticket("c", 1))
            .await
            .expect("no queue any more");
    }
}
