//! Route lookup: request `model` -> ModelRoute -> first matching rule ->
//! weighted ModelServer. Everything here is built once per snapshot, when
//! it is applied; the request path only reads it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::HeaderMap;
use http::header::HeaderName;
use rand::Rng;
use regex::Regex;
use switchyard_runtime::clock::{self, Instant};

use crate::fast_map::FastMap;
use crate::per_worker::PerWorker;
use crate::pod::PodState;
use crate::pod::outlier::OutlierDetector;
use crate::providers::Provider;
use crate::rewrite::Rewrite;

/// How long an attempt waits for the response head when the ModelServer
/// sets no `trafficPolicy.timeout`, so a hung engine never holds a request
/// forever. A streamed response's head comes once the engine has accepted
/// the request, a non-streamed one's after the whole generation; the bound
/// is sized for the longest prefill: a 100k-token prompt at 1,000 tokens/s
/// (a mid-size model on one GPU under load; a data-centre GPU prefills a
/// small model several times faster) takes 100 s, and 3x that allows for
/// queueing behind other requests. ModelServers that return long
/// generations without streaming should set their own timeout.
pub const DEFAULT_RESPONSE_HEADER_TIMEOUT: Duration = Duration::from_secs(300);

/// Index of a Gateway listener in the snapshot (see `gateway::Gateways`).
pub type ListenerId = u32;

/// A ModelServer as the dataplane uses it, or an external provider (no pods;
/// `provider` set), which routes target the same way.
#[derive(Debug)]
pub struct Server {
    /// `namespace/name`.
    pub key: String,
    /// JSON string literal (quotes included) the request `model` is rewritten to, if any.
    pub model_rewrite_literal: Option<bytes::Bytes>,
    pub model_rewrite: Option<String>,
    /// Bounds connect + send + wait for response headers: the ModelServer's
    /// `trafficPolicy.timeout`, or [`DEFAULT_RESPONSE_HEADER_TIMEOUT`].
    pub timeout: Duration,
    pub retry_attempts: u32,
    pub retry_interval: Duration,
    /// Ready pods, in snapshot order.
    pub pods: Vec<Arc<PodState>>,
    /// The ids of `pods`, gathered by the first [`Server::pod_ids`]: a pick
    /// among many pods finds pods by id in it instead of reading one pod
    /// state each.
    pub pod_ids: OnceLock<PodIds>,
    /// Spreads ties between equally loaded pods (per worker: no counter
    /// shared by all requests).
    pub rotation: PerWorker<AtomicUsize>,
    /// Set for an ExternalModelProvider: requests go to it, not to pods.
    pub provider: Option<Arc<Provider>>,
    /// Ejects pods whose attempts keep failing.
    pub outlier: OutlierDetector,
    /// Set when every request goes to a prefill and a decode pod of one group.
    pub prefill_decode: Option<PrefillDecode>,
}

/// The pod ids of one server, in pod order, and a way to find a pod by id.
#[derive(Debug)]
pub struct PodIds {
    ids: Box<[u64]>,
    /// `(id, position)` sorted: finds a pod by id in a few steps, where a
    /// scan of 1,000 ids cost a pick thousands of instructions per lookup.
    by_id: Box<[(u64, u32)]>,
    /// Names this list for the life of the process (no other list gets the
    /// same number), so a per-thread cache can keep what it computed from
    /// the ids under it and never see a stale entry after a snapshot change.
    generation: u64,
}

impl PodIds {
    pub fn new(ids: Box<[u64]>) -> Self {
        static GENERATIONS: AtomicU64 = AtomicU64::new(1);
        let mut by_id: Box<[(u64, u32)]> = ids
            .iter()
            .enumerate()
            .map(|(position, id)| (*id, position as u32))
            .collect();
        // Sorted by position too: a duplicated id is found at its first
        // position, as a scan from the start would find it.
        by_id.sort_unstable();
        Self {
            ids,
            by_id,
            // Relaxed: only uniqueness matters, and once per snapshot.
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
        }
    }

    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The first position of `id`.
    pub fn position(&self, id: u64) -> Option<usize> {
        let at = self.by_id.partition_point(|(each, _)| *each < id);
        self.by_id
            .get(at)
            .filter(|(each, _)| *each == id)
            .map(|(_, position)| *position as usize)
    }
}

impl Server {
    /// `default/<name>`-style ModelServer `key` with `pods` and the default
    /// traffic policy and outlier detection, for tests.
    #[cfg(test)]
    pub(crate) fn for_tests(key: &str, pods: Vec<Arc<PodState>>) -> Self {
        Self {
            key: key.into(),
            model_rewrite_literal: None,
            model_rewrite: None,
            timeout: DEFAULT_RESPONSE_HEADER_TIMEOUT,
            retry_attempts: 0,
            retry_interval: Duration::ZERO,
            pods,
            pod_ids: OnceLock::new(),
            rotation: Default::default(),
            outlier: OutlierDetector::new(Default::default(), Default::default()),
            prefill_decode: None,
            provider: None,
        }
    }

    /// The ids of [`Server::pods`].
    pub fn pod_ids(&self) -> &PodIds {
        self.pod_ids
            .get_or_init(|| PodIds::new(self.pods.iter().map(|pod| pod.id).collect()))
    }

    /// Whether a request sent here now has a pod that is not ejected (for a
    /// prefill/decode ModelServer: a complete group with a prefill and a
    /// decode pod that are not). Stops at the first: usually the first pod.
    /// An external provider has no pods and is always usable.
    pub fn has_usable_pod(&self, now: Instant) -> bool {
        if self.provider.is_some() {
            return true;
        }
        let usable = |index: &usize| {
            self.pods
                .get(*index)
                .is_some_and(|pod| !pod.is_ejected(now))
        };
        match &self.prefill_decode {
            None => self.pods.iter().any(|pod| !pod.is_ejected(now)),
            Some(pd) => pd
                .groups
                .iter()
                .any(|group| group.prefill.iter().any(usable) && group.decode.iter().any(usable)),
        }
    }
}

/// How the router talks to the two pods of a prefill/decode pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvConnector {
    /// Prefill first, its answer discarded; then decode with the client's body.
    Http,
    /// As [`Self::Http`]; the engines share KV through LMCache themselves.
    Lmcache,
    /// As [`Self::Http`], and the prefill answer's `kv_transfer_params` go to decode.
    Nixl,
    /// The request shapes of [`Self::Nixl`].
    Mooncake,
    /// Both legs at once, paired by a `bootstrap_room`.
    Sglang,
}

impl KvConnector {
    /// The `kvConnector.type` spelling (`sglang` for SGLang's bootstrap protocol).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Lmcache => "lmcache",
            Self::Nixl => "nixl",
            Self::Mooncake => "mooncake",
            Self::Sglang => "sglang",
        }
    }

    /// The prefill asks the engine to keep the KV for a remote decode, and
    /// the decode gets the `kv_transfer_params` the prefill answered with.
    pub fn relays_kv_transfer_params(self) -> bool {
        matches!(self, Self::Nixl | Self::Mooncake)
    }
}

/// A prefill/decode ModelServer's pods, by group and role.
#[derive(Debug)]
pub struct PrefillDecode {
    pub connector: KvConnector,
    /// The pod label whose value names a pod's group.
    pub group_label: String,
    /// Sorted by name; incomplete groups included (shown, never scheduled).
    pub groups: Vec<PdGroup>,
    /// The decode pods of complete groups (indices into [`Server::pods`]),
    /// the candidates of the first choice.
    pub decode_candidates: Vec<usize>,
    /// Per pod of [`Server::pods`]: its group (index into `groups`).
    pub group_of: Vec<usize>,
    /// Per pod of [`Server::pods`]: the SGLang bootstrap port of a prefill
    /// pod that has one configured, else 0.
    pub bootstrap_ports: Vec<u16>,
}

/// The pods of one group (indices into [`Server::pods`]).
#[derive(Debug)]
pub struct PdGroup {
    /// The group label's value.
    pub name: String,
    pub prefill: Vec<usize>,
    pub decode: Vec<usize>,
}

impl PdGroup {
    /// A group serves requests only with a pod of each role.
    pub fn is_complete(&self) -> bool {
        !self.prefill.is_empty() && !self.decode.is_empty()
    }
}

/// A compiled string condition.
#[derive(Debug)]
pub enum StringMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    /// A StringMatch with no condition set matches anything.
    Any,
}

impl StringMatcher {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(expected) => value == expected,
            Self::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Self::Regex(regex) => regex.is_match(value),
            Self::Any => true,
        }
    }
}

/// A rule's conditions; all must hold.
#[derive(Debug, Default)]
pub struct Matcher {
    pub headers: Vec<(HeaderName, StringMatcher)>,
    pub uri: Option<StringMatcher>,
    pub body_model: Option<StringMatcher>,
}

impl Matcher {
    fn matches(&self, request: &RequestFacts<'_>) -> bool {
        self.headers.iter().all(|(name, matcher)| {
            let value = request
                .headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("");
            matcher.matches(value)
        }) && self.uri.as_ref().is_none_or(|m| m.matches(request.path))
            && self
                .body_model
                .as_ref()
                .is_none_or(|m| m.matches(request.model))
    }
}

/// Weighted targets of a rule, picked by smooth weighted round-robin.
///
/// The whole smooth-WRR cycle is precomputed when the snapshot is applied, so
/// a request only increments its worker's position in it: any window of a
/// worker's requests follows the weights closely, and no lock or counter is
/// shared between the workers' requests.
///
/// Failover: when the target the cycle picks has no pod that is not ejected,
/// the request goes to one of the rule's other targets that has one, chosen
/// at random in proportion to their weights, so the dead target's share is
/// spread as the weights say. When none has one, the targets that still have
/// pods (all ejected) are preferred over those with none, and the pick
/// stands when no target is better: ejection steers traffic, it never
/// refuses it on its own.
#[derive(Debug)]
pub struct WeightedTargets {
    servers: Vec<Arc<Server>>,
    /// Relative weights of `servers`, reduced by their common divisor.
    weights: Vec<u32>,
    /// Indices into `servers`, one full smooth-WRR period.
    cycle: Vec<u16>,
    next: PerWorker<AtomicUsize>,
}

/// The target a request goes to.
#[derive(Debug, Clone, Copy)]
pub struct Picked<'a> {
    pub server: &'a Arc<Server>,
    /// The target the weights picked, when it could not serve the request
    /// and `server` took it over.
    pub failed_over_from: Option<&'a Arc<Server>>,
}

/// How well a target can serve a request now: better is higher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Usability {
    NoPods,
    OnlyEjectedPods,
    Usable,
}

impl Usability {
    fn of(server: &Server, now: Instant) -> Self {
        if server.has_usable_pod(now) {
            Self::Usable
        } else if server.pods.is_empty() {
            Self::NoPods
        } else {
            Self::OnlyEjectedPods
        }
    }
}

impl WeightedTargets {
    /// `targets` with weight 0 are excluded. Returns None when no weight is positive.
    pub fn new(targets: Vec<(Arc<Server>, u32)>) -> Option<Self> {
        let targets: Vec<_> = targets.into_iter().filter(|(_, w)| *w > 0).collect();
        if targets.is_empty() {
            return None;
        }
        let divisor = targets.iter().fold(0, |acc, (_, w)| gcd(acc, *w));
        let weights: Vec<u32> = targets.iter().map(|(_, w)| *w / divisor).collect();
        let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
        let mut current = vec![0i64; weights.len()];
        let mut cycle = Vec::with_capacity(total as usize);
        for _ in 0..total {
            for (c, w) in current.iter_mut().zip(&weights) {
                *c += i64::from(*w);
            }
            let (chosen, _) = current
                .iter()
                .enumerate()
                .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))?;
            current[chosen] -= total;
            cycle.push(chosen as u16);
        }
        Some(Self {
            servers: targets.into_iter().map(|(s, _)| s).collect(),
            weights,
            cycle,
            next: PerWorker::default(),
        })
    }

    /// The target of the next request: the cycle's, or another by failover.
    pub fn pick(&self) -> Picked<'_> {
        let slot = self.next.local().fetch_add(1, Ordering::Relaxed) % self.cycle.len();
        let picked = &self.servers[usize::from(self.cycle[slot])];
        let stays = Picked {
            server: picked,
            failed_over_from: None,
        };
        if self.servers.len() == 1 {
            return stays;
        }
        let now = clock::now();
        let level = Usability::of(picked, now);
        if level == Usability::Usable {
            return stays;
        }
        self.fail_over(picked, level, now).unwrap_or(stays)
    }

    /// One of the other targets better than `picked` (at `level`), at
    /// random in proportion to the weights among the best ones.
    fn fail_over<'a>(
        &'a self,
        picked: &'a Arc<Server>,
        level: Usability,
        now: Instant,
    ) -> Option<Picked<'a>> {
        let levels: Vec<Usability> = self
            .servers
            .iter()
            .map(|server| Usability::of(server, now))
            .collect();
        let best = levels.iter().copied().max()?;
        if best <= level {
            return None;
        }
        let candidates = || {
            self.servers
                .iter()
                .zip(&self.weights)
                .zip(&levels)
                .filter(move |(_, l)| **l == best)
                .map(|(target, _)| target)
        };
        let total: u64 = candidates().map(|(_, w)| u64::from(*w)).sum();
        let mut point = rand::rng().random_range(0..total);
        candidates().find_map(|(server, weight)| {
            if point < u64::from(*weight) {
                return Some(Picked {
                    server,
                    failed_over_from: Some(picked),
                });
            }
            point -= u64::from(*weight);
            None
        })
    }

    pub fn servers(&self) -> &[Arc<Server>] {
        &self.servers
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// One rule of a route.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    /// None = matches every request.
    pub matcher: Option<Matcher>,
    pub targets: WeightedTargets,
}

/// A ModelRoute as the dataplane uses it.
#[derive(Debug)]
pub struct Route {
    /// `namespace/name`.
    pub key: String,
    pub model_name: String,
    pub lora_adapters: Vec<String>,
    pub rules: Vec<Rule>,
    /// The Gateway listeners it serves on (its parentRefs); empty = the
    /// traffic port and the default Gateway's listeners.
    pub listeners: Vec<ListenerId>,
}

impl Route {
    /// Whether a request that came through `arrival` may take this route.
    fn serves(&self, arrival: &ArrivalFacts) -> bool {
        if self.listeners.is_empty() {
            arrival.on_traffic_port
        } else {
            arrival
                .listener
                .is_some_and(|listener| self.listeners.contains(&listener))
        }
    }
}

/// Where a request came in, as routes are bound to it.
#[derive(Debug, Clone, Copy)]
pub struct ArrivalFacts {
    /// On the dataplane's traffic port (not a port opened for a Gateway).
    pub on_traffic_port: bool,
    /// The Gateway listener its port and host resolved to.
    pub listener: Option<ListenerId>,
}

impl Default for ArrivalFacts {
    fn default() -> Self {
        Self {
            on_traffic_port: true,
            listener: None,
        }
    }
}

/// What a rule may look at.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub model: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub arrival: ArrivalFacts,
}

/// The outcome of a lookup.
#[derive(Debug, Clone)]
pub struct RouteDecision {
    pub route: Arc<Route>,
    pub rule_index: usize,
    pub server: Arc<Server>,
    /// The target the rule's weights picked, when it had no usable pod and
    /// `server` took its request ([`WeightedTargets`]' failover).
    pub failed_over_from: Option<Arc<Server>>,
    /// The model matched a route's `loraAdapters` (no model rewrite then).
    pub is_lora: bool,
    /// An HTTPRoute rule's edits of the upstream request.
    pub rewrite: Option<Arc<Rewrite>>,
}

/// Routes indexed by the model names they serve, oldest route first.
#[derive(Debug, Default)]
pub struct RouteIndex {
    by_model_name: FastMap<String, Vec<Arc<Route>>>,
    by_lora_adapter: FastMap<String, Vec<Arc<Route>>>,
}

impl RouteIndex {
    /// `routes` must already be oldest first.
    pub fn new(routes: &[Arc<Route>]) -> Self {
        let mut index = Self::default();
        for route in routes {
            if !route.model_name.is_empty() {
                index
                    .by_model_name
                    .entry(route.model_name.clone())
                    .or_default()
                    .push(route.clone());
            }
            for adapter in &route.lora_adapters {
                index
                    .by_lora_adapter
                    .entry(adapter.clone())
                    .or_default()
                    .push(route.clone());
            }
        }
        index
    }

    /// Routes serving `model` by name first, then by LoRA adapter; in each
    /// group the oldest route first, falling through to the next route when
    /// none of a route's rules match.
    pub fn lookup(&self, request: &RequestFacts<'_>) -> Option<RouteDecision> {
        let by_name = self.by_model_name.get(request.model).into_iter().flatten();
        let by_lora = self
            .by_lora_adapter
            .get(request.model)
            .into_iter()
            .flatten();
        by_name
            .map(|route| (route, false))
            .chain(by_lora.map(|route| (route, true)))
            .filter(|(route, _)| route.serves(&request.arrival))
            .find_map(|(route, is_lora)| {
                let (rule_index, rule) =
                    route.rules.iter().enumerate().find(|(_, rule)| {
                        rule.matcher.as_ref().is_none_or(|m| m.matches(request))
                    })?;
                let picked = rule.targets.pick();
                Some(RouteDecision {
                    route: route.clone(),
                    rule_index,
                    server: picked.server.clone(),
                    failed_over_from: picked.failed_over_from.cloned(),
                    is_lora,
                    rewrite: None,
                })
            })
    }

    /// Every model name and LoRA adapter served, sorted.
    pub fn model_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .by_model_name
            .keys()
            .chain(self.by_lora_adapter.keys())
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn server(key: &str) -> Arc<Server> {
        Arc::new(Server::for_tests(key, Vec::new()))
    }

    #[test]
    fn pod_ids_are_the_pods_ids_in_order() {
        let pods = PodState::numbered_for_tests(5, |i| {
            std::net::SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16))
        });
        let server = Server::for_tests("default/s", pods);
        let expected: Vec<u64> = server.pods.iter().map(|pod| pod.id).collect();
        let ids = server.pod_ids();
        assert_eq!(ids.ids(), expected.as_slice());
        assert!(std::ptr::eq(ids, server.pod_ids()), "gathered once");
        for (position, id) in expected.iter().enumerate() {
            assert_eq!(ids.position(*id), Some(position));
        }
        assert_eq!(ids.position(0), None);
        let other = Server::for_tests("default/s", server.pods.clone());
        assert_ne!(
            other.pod_ids().generation(),
            ids.generation(),
            "every list has a number of its own"
        );
        let duplicated = PodIds::new(Box::new([7, 3, 7]));
        assert_eq!(
            duplicated.position(7),
            Some(0),
            "the first, as a scan finds it"
        );
    }

    fn count_picks(targets: &WeightedTargets, n: usize) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            *counts.entry(targets.pick().server.key.clone()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn smooth_wrr_follows_weights_in_every_window() {
        let targets =
            WeightedTargets::new(vec![(server("v1"), 70), (server("v2"), 30)]).expect("targets");
        let counts = count_picks(&targets, 1000);
        assert_eq!(counts["v1"], 700);
        assert_eq!(counts["v2"], 300);
        // Smooth: every window of 10 consecutive picks holds exactly 7/3.
        let picks: Vec<String> = (0..100)
            .map(|_| targets.pick().server.key.clone())
            .collect();
        for window in picks.windows(10) {
            let v1 = window.iter().filter(|k| *k == "v1").count();
            assert!((6..=8).contains(&v1), "{window:?}");
        }
    }

    #[test]
    fn relative_weights_and_zero_excluded() {
        let targets =
            WeightedTargets::new(vec![(server("a"), 50), (server("b"), 30), (server("c"), 0)])
                .expect("targets");
        let counts = count_picks(&targets, 800);
        assert_eq!(counts["a"], 500, "50/30 is 62.5%");
        assert_eq!(counts["b"], 300);
        assert!(!counts.contains_key("c"));
        assert!(WeightedTargets::new(vec![(server("a"), 0)]).is_none());
    }

    /// ModelServer `key` with `pods` pods on their own loopback addresses.
    fn server_with_pods(key: &str, pods: u8) -> Arc<Server> {
        let pods = (0..pods)
            .map(|i| {
                let addr = std::net::SocketAddr::from(([127, 0, 0, i + 1], 8000));
                PodState::for_tests(&format!("{key}-{i}"), addr)
            })
            .collect();
        Arc::new(Server::for_tests(key, pods))
    }

    fn eject_all(server: &Server) {
        for pod in &server.pods {
            let failure = crate::pod::outlier::Failure::ConnectFailure;
            server
                .outlier
                .record_failure(&server.pods, pod, failure, clock::now());
        }
        assert!(!server.has_usable_pod(clock::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_targets_share_goes_to_the_others_by_weight() {
        let (a, b, c, dead) = (
            server_with_pods("a", 2),
            server_with_pods("b", 1),
            server_with_pods("c", 1),
            server_with_pods("dead", 1),
        );
        eject_all(&dead);
        let targets = WeightedTargets::new(vec![(a, 40), (b, 30), (c, 20), (dead.clone(), 10)])
            .expect("targets");
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut failovers = 0;
        for _ in 0..9_000 {
            let picked = targets.pick();
            *counts.entry(picked.server.key.clone()).or_default() += 1;
            if let Some(from) = picked.failed_over_from {
                assert!(Arc::ptr_eq(from, &dead));
                failovers += 1;
            }
        }
        assert_eq!(failovers, 900, "the dead target's 10 %");
        assert!(!counts.contains_key("dead"));
        // 900 requests spread 40:30:20 on top of 3600/2700/1800; the bounds
        // are 4 standard deviations of that random spread.
        for (target, weight_share, own) in
            [("a", 4.0, 3600.0), ("b", 3.0, 2700.0), ("c", 2.0, 1800.0)]
        {
            let expected = own + 900.0 * weight_share / 9.0;
            let got = counts[target] as f64;
            assert!(
                (got - expected).abs() < 60.0,
                "{target}: {got} vs {expected}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_usable_target_the_pick_stands_and_pods_beat_none() {
        let (ejected, empty) = (server_with_pods("ejected", 1), server_with_pods("empty", 0));
        eject_all(&ejected);
        let targets =
            WeightedTargets::new(vec![(ejected.clone(), 1), (empty.clone(), 1)]).expect("targets");
        let mut picks = (0..10).map(|_| targets.pick());
        assert!(
            picks.all(|picked| Arc::ptr_eq(picked.server, &ejected)
                && picked
                    .failed_over_from
                    .is_none_or(|from| Arc::ptr_eq(from, &empty))),
            "a target whose pods are all ejected beats one without pods: they may answer yet"
        );
        let alone = WeightedTargets::new(vec![(ejected, 1)]).expect("targets");
        assert!(alone.pick().failed_over_from.is_none(), "nowhere to go");
    }

    fn route(key: &str, model: &str, lora: &[&str], rules: Vec<Rule>) -> Arc<Route> {
        Arc::new(Route {
            key: key.into(),
            model_name: model.into(),
            lora_adapters: lora.iter().map(|s| s.to_string()).collect(),
            rules,
            listeners: Vec::new(),
        })
    }

    fn rule(name: &str, matcher: Option<Matcher>, target: &str) -> Rule {
        Rule {
            name: name.into(),
            matcher,
            targets: WeightedTargets::new(vec![(server(target), 100)]).expect("targets"),
        }
    }

    fn header_matcher(name: &'static str, exact: &str) -> Matcher {
        Matcher {
            headers: vec![(
                HeaderName::from_static(name),
                StringMatcher::Exact(exact.into()),
            )],
            ..Matcher::default()
        }
    }

    fn lookup(
        index: &RouteIndex,
        model: &str,
        headers: &HeaderMap,
    ) -> Option<(String, String, bool)> {
        index
            .lookup(&RequestFacts {
                model,
                path: "/v1/completions",
                headers,
                arrival: ArrivalFacts::default(),
            })
            .map(|d| (d.route.key.clone(), d.server.key.clone(), d.is_lora))
    }

    #[test]
    fn first_matching_rule_then_fall_through_then_lora() {
        let premium = route(
            "default/premium-only",
            "m",
            &[],
            vec![rule(
                "premium",
                Some(header_matcher("user-type", "premium")),
                "7b",
            )],
        );
        let catch_all = route(
            "default/catch-all",
            "m",
            &[],
            vec![rule("default", None, "1.5b")],
        );
        let lora = route(
            "default/lora",
            "",
            &["lora-A"],
            vec![rule("lora", None, "lora-server")],
        );
        let index = RouteIndex::new(&[premium, catch_all, lora]);
        let mut headers = HeaderMap::new();
        assert_eq!(
            lookup(&index, "m", &headers),
            Some(("default/catch-all".into(), "1.5b".into(), false))
        );
        headers.insert("user-type", "premium".parse().expect("header"));
        assert_eq!(
            lookup(&index, "m", &headers),
            Some(("default/premium-only".into(), "7b".into(), false))
        );
        assert_eq!(
            lookup(&index, "lora-A", &headers),
            Some(("default/lora".into(), "lora-server".into(), true))
        );
        assert_eq!(lookup(&index, "unknown", &headers), None);
        assert_eq!(index.model_names(), vec!["lora-A", "m"]);
    }

    #[test]
    fn string_matchers() {
        assert!(StringMatcher::Exact("a".into()).matches("a"));
        assert!(!StringMatcher::Exact("a".into()).matches("ab"));
        assert!(StringMatcher::Prefix("/v1/chat".into()).matches("/v1/chat/completions"));
        assert!(
            StringMatcher::Regex(Regex::new("comp").expect("regex")).matches("/v1/completions")
        );
        assert!(StringMatcher::Any.matches(""));
    }
}
