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
    /// How long the request waited for its turn.
    pub waited: Duration,
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
    /// The counter of the user admitted last (VTC's lift when no one waits).
    last_served_counter: f64,
    /// Users holding one of the model's `max_metric_users` labels.
    labelled_users: usize,
    mean_service_seconds: f64,
    last_sweep: Instant,
}

#[derive(Debug)]
struct UserState {
    counter: f64,
    /// Waiting requests in arrival order; its length is the user's queue
    /// length under both policies.
    waiting: VecDeque<u64>,
    running: u64,
    last_active: Instant,
    queue_size: IntGauge,
    queue_duration: Histogram,
    labelled: bool,
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
    arrived: Instant,
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
        let now = clock::now();
        Slot {
            queue: self.queue.clone(),
            ticket: self.ticket.take().unwrap_or_else(Ticket::nobody),
            admitted_at: now,
            waited: now.duration_since(self.arrived),
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
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct UserView {
    pub user: String,
    pub counter: f64,
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
                last_served_counter: 0.0,
                labelled_users: 0,
                mean_service_seconds: INITIAL_SERVICE_TIME.as_secs_f64(),
                last_sweep: clock::now(),
            }),
        }
    }

    /// A new snapshot: the model's pods and the settings in force. Waiting
    /// requests keep their arrival order if the policy changed.
    pub fn update(&self, settings: &Arc<FairnessSettings>, pods: Vec<Arc<PodState>>) {
        let mut state = self.state.lock();
        state.open = true;
        state.pods = pods;
        if state.settings.policy != settings.policy {
            state.boost_order = state
                .waiters
                .iter_mut()
                .map(|(seq, waiter)| {
                    waiter.boost_key = (true, Reverse(0), *seq);
                    (waiter.boost_key, *seq)
                })
                .collect();
        }
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
                    waited: Duration::ZERO,
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
            arrived,
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
            let input_correction =
                prompt_tokens.map_or(0.0, |prompt| prompt as f64 - slot.ticket.input_tokens as f64);
            let served = input_correction * settings.input_token_weight
                + output_tokens as f64 * settings.output_token_weight;
            user.counter = (user.counter + served * slot.ticket.charge_per_token).max(0.0);
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
        state.users.insert(
            user.clone(),
            UserState {
                counter: 0.0,
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
            if let Some(user) = state.users.remove(&name) {
                if user.labelled {
                    state.labelled_users -= 1;
                    let labels = [self.model.as_str(), &*name];
                    let _ = self.metrics.queue_size.remove_label_values(&labels);
                    let _ = self.metrics.queue_duration.remove_label_values(&labels);
                }
            }
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
        }
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
            user.counter += ticket.input_tokens as f64 * weight * ticket.charge_per_token;
            user.running += 1;
            user.last_active = now;
            self.last_served_counter = user.counter;
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
        // VTC's lift: a user who starts waiting joins at the level of those
        // already waiting, so time spent idle banks no credit.
        let floor = self
            .backlogged
            .iter()
            .filter_map(|user| self.users.get(user))
            .map(|user| user.counter)
            .reduce(f64::min)
            .unwrap_or(self.last_served_counter);
        if let Some(user) = self.users.get_mut(&ticket.user) {
            if user.waiting.is_empty() {
                user.counter = user.counter.max(floor);
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

    /// The waiting request that goes next under the policy.
    fn next_in_line(&self) -> Option<u64> {
        match self.settings.policy {
            Policy::Vtc => self
                .backlogged
                .iter()
                .filter_map(|name| {
                    let user = self.users.get(name)?;
                    Some((user.counter, *user.waiting.front()?))
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
            if user.waiting.is_empty() {
                if let Some(position) = self
                    .backlogged
                    .iter()
                    .position(|name| *name == waiter.ticket.user)
                {
                    self.backlogged.swap_remove(position);
                }
            }
        }
        Some(waiter)
    }

    /// When a refused request may find room: the queue ahead drained at the
    /// recent service rate, at least a second, at most the queue timeout.
    fn retry_after(&self) -> Duration {
        let servers = self.capacity().unwrap_or(1).max(1) as f64;
        let seconds = (self.waiters.len() as f64 + 1.0) * self.mean_service_seconds / servers;
        Duration::from_secs(seconds.ceil() as u64)
            .clamp(Duration::from_secs(1), self.settings.queue_timeout.max(Duration::from_secs(1)))
    }
}
