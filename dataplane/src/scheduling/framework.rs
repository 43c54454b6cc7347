//! The scheduling framework: filter plugins narrow a ModelServer's pods, score
//! plugins give each survivor 0..=100, the weighted sum ranks them, and the
//! top N are tried in order (the next one when a connection fails).
//!
//! A [`Scheduler`] is built once per snapshot from the snapshot's
//! `SchedulerConfig` (validated, defaults filled in), with its metric handles
//! resolved; the request path only reads it. State that must outlive a
//! snapshot (the prefix index, the decision log) lives in [`SchedulingShared`].

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use http::HeaderMap;
use http::header::HeaderName;
use parking_lot::Mutex;
use prometheus::Histogram;
use switchyard_snapshot::pb;
use switchyard_snapshot::scheduler::{
    self as config, GPU_USAGE, LEAST_LATENCY, LEAST_REQUEST, LORA_AFFINITY, MAX_TOP_N,
    PREFIX_CACHE, RANDOM, SESSION_AFFINITY, SchedulerConfigError,
};

use super::decisions::DecisionLog;
use super::metrics::PluginMetrics;
use super::plugins::{Candidate, Filter, FilterError, ScoreInput, Scorer};
use super::prefix::{PrefixIndex, hash_prompt};
use crate::pod::{is_fresh, unix_ms_now};
use crate::request::PromptField;
use crate::routing::Server;

/// Why no pod can be tried for a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("no ready pod for ModelServer {0}")]
    NoPods(String),
    #[error("ModelServer {server}: {source}")]
    Filtered {
        server: String,
        #[source]
        source: FilterError,
    },
}

/// State shared by the schedulers of successive snapshots.
#[derive(Debug)]
pub struct SchedulingShared {
    /// Rebuilt only when its configured size changes.
    prefix: Mutex<Option<(usize, Arc<PrefixIndex>)>>,
    metrics: Option<PluginMetrics>,
    pub decisions: DecisionLog,
    /// `EndpointLoads.observed_at_unix_ms` of the latest loads: the observation
    /// time of every load whose own time is 0. One atomic written once per
    /// update, so an update need not touch the pods whose load did not change.
    loads_observed_at_unix_ms: AtomicI64,
}

impl SchedulingShared {
    pub fn new(metrics: Option<PluginMetrics>) -> Self {
        Self {
            prefix: Mutex::new(None),
            metrics,
            decisions: DecisionLog::new(),
            loads_observed_at_unix_ms: AtomicI64::new(0),
        }
    }

    pub fn set_loads_observed_at(&self, unix_ms: i64) {
        self.loads_observed_at_unix_ms
            .store(unix_ms, Ordering::Relaxed);
    }

    /// When `load` was observed (0 = unknown).
    pub fn observed_at(&self, load: &pb::EndpointLoad) -> i64 {
        if load.observed_at_unix_ms != 0 {
            load.observed_at_unix_ms
        } else {
            self.loads_observed_at_unix_ms.load(Ordering::Relaxed)
        }
    }

    fn prefix_index(&self, capacity: usize) -> Arc<PrefixIndex> {
        let mut slot = self.prefix.lock();
        match &*slot {
            Some((size, index)) if *size == capacity => index.clone(),
            _ => {
                let index = Arc::new(PrefixIndex::new(capacity));
                *slot = Some((capacity, index.clone()));
                index
            }
        }
    }
}

impl Default for SchedulingShared {
    fn default() -> Self {
        Self::new(None)
    }
}

/// Plugin duration histograms of one model, resolved when the snapshot is applied.
#[derive(Debug, Default)]
struct ModelHandles {
    filters: Vec<Histogram>,
    scores: Vec<Histogram>,
}

/// What the scheduler reads about one request.
#[derive(Debug)]
pub struct ScheduleRequest<'a> {
    /// The request's `model` (the metrics label).
    pub model: &'a str,
    /// The model a pod must have loaded: the LoRA adapter, or the upstream model name.
    pub served_model: &'a str,
    pub headers: &'a HeaderMap,
    pub prompt_hashes: &'a [u64],
    pub request_id: &'a str,
}

/// The pods to try for one request, best first (indices into the ModelServer's pods).
#[derive(Debug, Clone, Copy, Default)]
pub struct Ranking {
    pods: [u32; MAX_TOP_N as usize],
    len: usize,
}

impl Ranking {
    fn push(&mut self, index: usize) {
        if self.len < self.pods.len() {
            self.pods[self.len] = index as u32;
            self.len += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `n`-th candidate's index into the ModelServer's pods.
    pub fn get(&self, n: usize) -> Option<usize> {
        (n < self.len).then(|| self.pods[n] as usize)
    }
}

/// One snapshot's scheduler.
#[derive(Debug)]
pub struct Scheduler {
    filters: Vec<Filter>,
    scorers: Vec<(Scorer, u32)>,
    top_n: usize,
    max_load_age_ms: u64,
    block_size: usize,
    max_blocks: usize,
    /// Set when session-affinity is enabled.
    session_header: Option<HeaderName>,
    uses_prefix: bool,
    prefix: Arc<PrefixIndex>,
    handles: HashMap<String, ModelHandles>,
    shared: Arc<SchedulingShared>,
    /// The effective configuration (defaults filled in), for debug dumps.
    pub effective: pb::SchedulerConfig,
}

impl Scheduler {
    /// Builds the scheduler of a snapshot; `models` are the request models its
    /// routes serve (plugin metric handles are resolved for each).
    pub fn build(
        snapshot_config: Option<&pb::SchedulerConfig>,
        models: &[&str],
        shared: &Arc<SchedulingShared>,
    ) -> Result<Self, SchedulerConfigError> {
        let mut effective = snapshot_config
            .cloned()
            .unwrap_or_else(config::default_config);
        config::validate(&effective)?;
        let args = config::effective_args(effective.args.as_ref());
        effective.top_n = config::effective_top_n(&effective);
        let filters: Vec<Filter> = effective
            .filters
            .iter()
            .map(|name| match name.as_str() {
                LEAST_REQUEST => Ok(Filter::LeastRequest {
                    max_waiting_requests: args.max_waiting_requests,
                }),
                LORA_AFFINITY => Ok(Filter::LoraAffinity),
                other => Err(SchedulerConfigError::UnknownFilter(other.to_owned())),
            })
            .collect::<Result<_, _>>()?;
        let scorers: Vec<(Scorer, u32)> = effective
            .scores
            .iter()
            .map(|plugin| {
                let scorer = match plugin.name.as_str() {
                    LEAST_REQUEST => Scorer::LeastRequest,
                    GPU_USAGE => Scorer::GpuUsage,
                    LEAST_LATENCY => Scorer::LeastLatency {
                        ttft_weight: args.ttft_tpot_weight_factor,
                    },
                    PREFIX_CACHE => Scorer::PrefixCache {
                        affinity_blocks: args.affinity_blocks as usize,
                        load_bound_factor: args.load_bound_factor,
                    },
                    RANDOM => Scorer::Random,
                    SESSION_AFFINITY => Scorer::SessionAffinity {
                        load_bound_factor: args.load_bound_factor,
                    },
                    other => return Err(SchedulerConfigError::UnknownScore(other.to_owned())),
                };
                Ok((scorer, plugin.weight))
            })
            .collect::<Result<_, _>>()?;
        let uses_prefix = scorers
            .iter()
            .any(|(s, _)| matches!(s, Scorer::PrefixCache { .. }));
        let session_header = if scorers
            .iter()
            .any(|(s, _)| matches!(s, Scorer::SessionAffinity { .. }))
        {
            Some(
                HeaderName::try_from(args.session_header.as_str()).map_err(|_| {
                    SchedulerConfigError::SessionHeader(args.session_header.clone())
                })?,
            )
        } else {
            None
        };
        let handles = resolve_handles(shared.metrics.as_ref(), models, &filters, &scorers);
        effective.args = Some(args.clone());
        Ok(Self {
            top_n: effective.top_n as usize,
            max_load_age_ms: args.max_load_age_ms,
            block_size: args.block_size_to_hash as usize,
            max_blocks: args.max_blocks_to_match as usize,
            prefix: shared.prefix_index(args.max_hash_cache_size as usize),
            filters,
            scorers,
            session_header,
            uses_prefix,
            handles,
            shared: shared.clone(),
            effective,
        })
    }

    /// The prompt's chained block hashes when a plugin needs them (empty, and
    /// no allocation, otherwise).
    pub fn prompt_hashes(
        &self,
        model: &str,
        body: &[u8],
        span: Option<&(PromptField, Range<usize>)>,
    ) -> Vec<u64> {
        let mut hashes = Vec::new();
        if !self.uses_prefix {
            return hashes;
        }
        let Some((field, range)) = span else {
            return hashes;
        };
        let Some(raw) = body
            .get(range.clone())
            .and_then(|b| std::str::from_utf8(b).ok())
        else {
            return hashes;
        };
        hashes.reserve_exact(self.max_blocks.min(raw.len() / self.block_size.max(1) + 1));
        hash_prompt(
            model,
            *field,
            raw,
            self.block_size,
            self.max_blocks,
            &mut hashes,
        );
        hashes
    }

    /// Ranks `server`'s pods for one request.
    pub fn schedule(
        &self,
        server: &Server,
        request: &ScheduleRequest<'_>,
    ) -> Result<Ranking, ScheduleError> {
        if server.pods.is_empty() {
            return Err(ScheduleError::NoPods(server.key.clone()));
        }
        let now = Instant::now();
        let now_ms = unix_ms_now();
        let handles = self.handles.get(request.model);
        let session_key = self.session_header.as_ref().and_then(|name| {
            request
                .headers
                .get(name)
                .filter(|value| !value.is_empty())
                .map(|value| xxhash_rust::xxh3::xxh3_64(value.as_bytes()))
        });
        with_framework_scratch(|scratch| {
            let FrameworkScratch {
                candidates,
                totals,
                scores,
                order,
            } = scratch;
            candidates.clear();
            for (index, pod) in server.pods.iter().enumerate() {
                let any_load = pod.load();
                let load = any_load
                    .clone()
                    .filter(|l| is_fresh(self.shared.observed_at(l), now_ms, self.max_load_age_ms));
                candidates.push(Candidate {
                    index,
                    pod_id: pod.id,
                    in_flight: pod.in_flight(),
                    ejected: pod.is_ejected(now),
                    load,
                    any_load,
                });
            }
            let considered = candidates.len();
            for (position, filter) in self.filters.iter().enumerate() {
                let started = Instant::now();
                let outcome = filter.apply(candidates, request.served_model);
                observe(handles.and_then(|h| h.filters.get(position)), started);
                outcome.map_err(|source| ScheduleError::Filtered {
                    server: server.key.clone(),
                    source,
                })?;
            }
            let count = candidates.len();
            totals.clear();
            totals.resize(count, 0);
            scores.clear();
            scores.resize(count * self.scorers.len(), 0);
            let input = ScoreInput {
                prompt_hashes: request.prompt_hashes,
                session_key,
                prefix: &self.prefix,
            };
            for (position, (scorer, weight)) in self.scorers.iter().enumerate() {
                let started = Instant::now();
                let out = &mut scores[position * count..(position + 1) * count];
                scorer.score(candidates, &input, out);
                observe(handles.and_then(|h| h.scores.get(position)), started);
                for (total, score) in totals.iter_mut().zip(out.iter()) {
                    *total = total.saturating_add(weight.saturating_mul(*score));
                }
            }
            // Ties rotate, so equal pods share the load.
            let start = server.rotation.fetch_add(1, Ordering::Relaxed) % count.max(1);
            order.clear();
            order.extend(0..count);
            order.sort_unstable_by_key(|&i| {
                (
                    candidates[i].ejected,
                    Reverse(totals[i]),
                    (i + count - start) % count,
                )
            });
            let mut ranking = Ranking::default();
            for &i in order.iter().take(self.top_n) {
                ranking.push(candidates[i].index);
            }
            self.shared.decisions.record(|record| {
                record.begin(
                    now_ms,
                    request.request_id,
                    request.model,
                    &server.key,
                    considered,
                    count,
                );
                record
                    .plugins
                    .extend(self.scorers.iter().map(|(s, w)| (s.name(), *w)));
                record.filters.extend(self.filters.iter().map(Filter::name));
                for &i in order.iter().take(self.top_n) {
                    let candidate = &candidates[i];
                    let plugin_scores = (0..self.scorers.len()).map(|p| scores[p * count + i]);
                    record.push_candidate(
                        server.pods[candidate.index].clone(),
                        totals[i],
                        candidate.ejected,
                        plugin_scores,
                    );
                }
            });
            Ok(ranking)
        })
    }

    /// After a pod accepted the request (the reference's PostSchedule): remember
    /// where this prefix went.
    pub fn on_dispatched(&self, pod_id: u64, prompt_hashes: &[u64]) {
        if self.uses_prefix && !prompt_hashes.is_empty() {
            self.prefix.record(prompt_hashes, pod_id);
        }
    }
}

fn observe(handle: Option<&Histogram>, started: Instant) {
    if let Some(handle) = handle {
        handle.observe(started.elapsed().as_secs_f64());
    }
}

fn resolve_handles(
    metrics: Option<&PluginMetrics>,
    models: &[&str],
    filters: &[Filter],
    scorers: &[(Scorer, u32)],
) -> HashMap<String, ModelHandles> {
    let Some(metrics) = metrics else {
        return HashMap::new();
    };
    let mut live = HashSet::new();
    let handles = models
        .iter()
        .map(|model| {
            let handles = ModelHandles {
                filters: filters
                    .iter()
                    .map(|f| metrics.handle(model, f.name(), "filter", &mut live))
                    .collect(),
                scores: scorers
                    .iter()
                    .map(|(s, _)| metrics.handle(model, s.name(), "score", &mut live))
                    .collect(),
            };
            ((*model).to_owned(), handles)
        })
        .collect();
    metrics.retain_only(live);
    handles
}

/// Reusable per-thread buffers of [`Scheduler::schedule`].
#[derive(Debug, Default)]
struct FrameworkScratch {
    candidates: Vec<Candidate>,
    totals: Vec<u32>,
    scores: Vec<u32>,
    order: Vec<usize>,
}

thread_local! {
    static FRAMEWORK_SCRATCH: RefCell<FrameworkScratch> = RefCell::default();
}

fn with_framework_scratch<R>(f: impl FnOnce(&mut FrameworkScratch) -> R) -> R {
    FRAMEWORK_SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => {
            let result = f(&mut scratch);
            // Do not keep engine loads of an old snapshot alive in idle threads.
            scratch.candidates.clear();
            result
        }
        Err(_) => f(&mut FrameworkScratch::default()),
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;
    use crate::pod::PodState;
    use crate::scheduling::metrics::PluginMetrics;

    fn server(pods: usize) -> Server {
        Server {
            key: "default/s".into(),
            model_rewrite_literal: None,
            model_rewrite: None,
            timeout: None,
            retry_attempts: 0,
            retry_interval: Duration::ZERO,
            pods: (0..pods)
                .map(|i| {
                    Arc::new(
                        PodState::new(
                            format!("default/p{i}"),
                            format!("p{i}"),
                            SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                        )
                        .expect("valid"),
                    )
                })
                .collect(),
            rotation: AtomicUsize::new(0),
        }
    }

    fn only(scores: &[(&str, u32)], filters: &[&str]) -> pb::SchedulerConfig {
        pb::SchedulerConfig {
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
            scores: scores
                .iter()
                .map(|(name, weight)| pb::ScorePlugin {
                    name: (*name).to_owned(),
                    weight: *weight,
                })
                .collect(),
            top_n: 0,
            args: None,
        }
    }

    fn request<'a>(headers: &'a HeaderMap, hashes: &'a [u64]) -> ScheduleRequest<'a> {
        ScheduleRequest {
            model: "m",
            served_model: "m",
            headers,
            prompt_hashes: hashes,
            request_id: "r",
        }
    }

    fn names(server: &Server, ranking: &Ranking) -> Vec<String> {
        (0..ranking.len())
            .filter_map(|n| ranking.get(n))
            .map(|i| server.pods[i].name.clone())
            .collect()
    }

    #[test]
    fn ranks_by_score_puts_ejected_last_and_keeps_top_n() {
        let shared = Arc::new(SchedulingShared::default());
        let scheduler = Scheduler::build(Some(&only(&[(LEAST_REQUEST, 1)], &[])), &["m"], &shared)
            .expect("valid");
        let server = server(7);
        let _busy: Vec<_> = (0..3).map(|_| server.pods[0].begin_request()).collect();
        let _one = server.pods[2].begin_request();
        server.pods[1].eject(Instant::now());
        let headers = HeaderMap::new();
        let ranking = scheduler
            .schedule(&server, &request(&headers, &[]))
            .expect("pods");
        assert_eq!(ranking.len(), 5, "default top-N");
        let order = names(&server, &ranking);
        assert!(
            !order.contains(&"p0".to_owned()),
            "busiest pod is not in the top 5: {order:?}"
        );
        assert!(
            !order.contains(&"p1".to_owned()),
            "ejected pod comes last: {order:?}"
        );
        assert_eq!(
            order[..4].iter().filter(|n| *n == "p2").count(),
            0,
            "{order:?}"
        );
    }

    #[test]
    fn equal_pods_share_requests() {
        let shared = Arc::new(SchedulingShared::default());
        let scheduler = Scheduler::build(Some(&only(&[(LEAST_REQUEST, 1)], &[])), &["m"], &shared)
            .expect("valid");
        let server = server(3);
        let headers = HeaderMap::new();
        let mut counts = HashMap::new();
        for _ in 0..30 {
            let ranking = scheduler
                .schedule(&server, &request(&headers, &[]))
                .expect("pods");
            *counts
                .entry(names(&server, &ranking)[0].clone())
                .or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&n| n == 10), "{counts:?}");
    }

    #[test]
    fn lora_filter_without_any_pod_is_a_clear_error() {
        let shared = Arc::new(SchedulingShared::default());
        let scheduler = Scheduler::build(
            Some(&only(&[(RANDOM, 1)], &[LORA_AFFINITY])),
            &["m"],
            &shared,
        )
        .expect("valid");
        let server = server(2);
        for pod in &server.pods {
            pod.set_load(Some(Arc::new(pb::EndpointLoad {
                models: vec!["base".into()],
                observed_at_unix_ms: 1,
                ..Default::default()
            })));
        }
        let headers = HeaderMap::new();
        let error = scheduler
            .schedule(&server, &request(&headers, &[]))
            .expect_err("no pod has m");
        assert_eq!(
            error.to_string(),
            "ModelServer default/s: no pod has model \"m\" loaded"
        );
        assert_eq!(
            scheduler
                .schedule(&self::server(0), &request(&headers, &[]))
                .expect_err("no pods"),
            ScheduleError::NoPods("default/s".into())
        );
    }

    #[test]
    fn stale_engine_load_is_ignored() {
        let shared = Arc::new(SchedulingShared::default());
        let scheduler =
            Scheduler::build(Some(&only(&[(GPU_USAGE, 1)], &[])), &["m"], &shared).expect("valid");
        let server = server(2);
        let now = unix_ms_now();
        let kv = |usage: f64, at: i64| {
            Some(Arc::new(pb::EndpointLoad {
                kv_cache_usage: usage,
                observed_at_unix_ms: at,
                ..Default::default()
            }))
        };
        server.pods[0].set_load(kv(0.1, now));
        server.pods[1].set_load(kv(0.9, now));
        let headers = HeaderMap::new();
        for _ in 0..4 {
            let ranking = scheduler
                .schedule(&server, &request(&headers, &[]))
                .expect("pods");
            assert_eq!(names(&server, &ranking)[0], "p0");
        }
        // p0's low usage is a minute old: it no longer wins; both are equal and rotate.
        server.pods[0].set_load(kv(0.1, now - 60_000));
        let firsts: HashSet<String> = (0..4)
            .map(|_| {
                let ranking = scheduler
                    .schedule(&server, &request(&headers, &[]))
                    .expect("pods");
                names(&server, &ranking)[0].clone()
            })
            .collect();
        assert_eq!(firsts.len(), 2, "{firsts:?}");
    }

    #[test]
    fn decisions_and_plugin_metrics_are_recorded() {
        let registry = prometheus::Registry::new();
        let shared = Arc::new(SchedulingShared::new(Some(
            PluginMetrics::register(&registry).expect("register"),
        )));
        let scheduler = Scheduler::build(None, &["m", "gone"], &shared).expect("defaults");
        let server = server(2);
        let headers = HeaderMap::new();
        scheduler
            .schedule(&server, &request(&headers, &[1, 2]))
            .expect("pods");
        let recent = shared.decisions.recent(10);
        assert_eq!(recent.len(), 1);
        let decision = &recent[0];
        assert_eq!(decision["model"], "m");
        assert_eq!(decision["ranked"].as_array().expect("ranked").len(), 2);
        for plugin in [LEAST_REQUEST, GPU_USAGE, LEAST_LATENCY, PREFIX_CACHE] {
            assert!(
                decision["ranked"][0]["scores"][plugin].is_u64(),
                "{decision}"
            );
        }
        let families = registry.gather();
        let family = families
            .iter()
            .find(|f| f.name() == "kthena_router_scheduler_plugin_duration_seconds")
            .expect("registered");
        let observed: u64 = family
            .get_metric()
            .iter()
            .map(|m| m.get_histogram().get_sample_count())
            .sum();
        assert_eq!(observed, 5, "one filter and four scorers, once each");
        assert_eq!(family.get_metric().len(), 10, "handles for both models");
        // A snapshot without "gone" drops its series.
        let _next = Scheduler::build(None, &["m"], &shared).expect("defaults");
        let families = registry.gather();
        let family = families
            .iter()
            .find(|f| f.name() == "kthena_router_scheduler_plugin_duration_seconds")
            .expect("registered");
        assert_eq!(family.get_metric().len(), 5);
    }

    #[test]
    fn invalid_configuration_is_rejected() {
        let shared = Arc::new(SchedulingShared::default());
        let error = Scheduler::build(Some(&only(&[("kvcache-aware", 1)], &[])), &["m"], &shared)
            .expect_err("unknown plugin");
        assert!(
            error
                .to_string()
                .contains("unknown score plugin \"kvcache-aware\""),
            "{error}"
        );
    }
}
