//! The cache-bound shared-prefix workload of the scheduling-quality runs.
//!
//! `groups` system prompts of `system_words` one-token words each (together a
//! little more than one engine's KV cache and less than two, on the engines
//! these runs use), each chat request one of them plus a short question of its
//! own, `max_tokens` small so that prefill dominates. Every round sends each
//! group once, in a seeded order; `clients` concurrent clients take the
//! requests in turn, each over the dataplanes round-robin. Prefix-cache hits
//! and requests served come from the engines' own counters.
//!
//! The same requests go to simulated engines (`make bench-quality`,
//! `tests/scheduling_quality.rs`) and to real vLLM engines
//! (`make e2e-vllm-quality`, through the `prefix_workload` example).

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use switchyard_runtime::clock;

use crate::harness::HttpClient;

/// Words the real-engine setup's tokenizer (a byte-level BPE trained on
/// licence texts and Python sources) encodes as one token each after a space,
/// as the simulator's tokenizer does every word; so a prompt of N words is
/// about N tokens on both.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "or",
    "any",
    "this",
    "that",
    "is",
    "for",
    "you",
    "software",
    "license",
    "work",
    "by",
    "with",
    "be",
    "not",
    "as",
    "program",
    "under",
    "on",
    "such",
    "may",
    "are",
    "it",
    "copyright",
    "if",
    "other",
    "all",
    "from",
    "at",
    "terms",
    "will",
    "your",
    "use",
    "can",
    "which",
    "an",
    "code",
    "source",
    "shall",
    "have",
    "no",
    "these",
    "without",
    "its",
    "must",
    "each",
    "version",
    "one",
    "provided",
    "more",
    "following",
    "only",
    "notice",
    "so",
    "do",
    "also",
    "has",
    "rights",
    "file",
    "data",
    "return",
    "self",
    "value",
    "name",
    "list",
    "true",
    "default",
    "import",
    "class",
    "object",
    "type",
    "error",
    "set",
    "get",
    "new",
    "case",
    "when",
];

/// Words of each request's own question.
const QUESTION_WORDS: usize = 12;

/// One run's requests and how they are sent.
#[derive(Clone, Debug)]
pub struct PrefixWorkload {
    /// The `model` of every request.
    pub model: String,
    pub groups: usize,
    pub system_words: usize,
    pub rounds: usize,
    pub clients: usize,
    pub max_tokens: u32,
    pub seed: u64,
}

impl PrefixWorkload {
    /// The workload for two engines of 4096 cached tokens (the real-engine
    /// setup: 128 blocks of 32 tokens): 16 system prompts of 285 tokens, about
    /// 4,600 tokens in all; 320 requests, 4 concurrent, 8 output tokens.
    pub fn two_engines(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            groups: 16,
            system_words: 285,
            rounds: 20,
            clients: 4,
            max_tokens: 8,
            seed: 1,
        }
    }

    /// The request bodies, in the order they are handed to clients.
    pub fn requests(&self) -> Vec<String> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut words = |count: usize| {
            (0..count)
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect::<Vec<_>>()
                .join(" ")
        };
        let systems: Vec<String> = (0..self.groups).map(|_| words(self.system_words)).collect();
        let mut order: Vec<usize> = (0..self.groups).collect();
        let mut requests = Vec::with_capacity(self.groups * self.rounds);
        for round in 0..self.rounds {
            order.shuffle(&mut StdRng::seed_from_u64(self.seed ^ (round as u64 + 1)));
            for &group in &order {
                let number = requests.len();
                let question = format!("question {number}: {}", words(QUESTION_WORDS));
                requests.push(
                    json!({
                        "model": self.model,
                        "messages": [
                            {"role": "system", "content": systems[group]},
                            {"role": "user", "content": question},
                        ],
                        "max_tokens": self.max_tokens,
                    })
                    .to_string(),
                );
            }
        }
        requests
    }

    /// Sends every request through `dataplanes` (base URLs, e.g.
    /// `http://127.0.0.1:8080`): client `c` sends requests `c`, `c + clients`,
    /// ... one at a time, over the dataplanes in turn.
    pub async fn run(&self, http: &HttpClient, dataplanes: &[String]) -> Run {
        let requests = Arc::new(self.requests());
        let urls: Arc<Vec<String>> = Arc::new(
            dataplanes
                .iter()
                .map(|base| format!("{base}/v1/chat/completions"))
                .collect(),
        );
        let started = clock::now();
        let clients: Vec<_> = (0..self.clients)
            .map(|client| {
                let (requests, urls, http) = (requests.clone(), urls.clone(), http.clone());
                let stride = self.clients;
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut errors = 0;
                    for (sent, body) in requests.iter().skip(client).step_by(stride).enumerate() {
                        let url = &urls[(client + sent * stride) % urls.len()];
                        let at = clock::now();
                        match http.post_json(url, &[], body).await {
                            Ok(response) if response.status.is_success() => {
                                latencies.push(at.elapsed());
                            }
                            _ => errors += 1,
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        let mut run = Run::default();
        for client in clients {
            let (latencies, errors) = client.await.expect("client task");
            run.latencies.extend(latencies);
            run.errors += errors;
        }
        run.elapsed = started.elapsed();
        run.latencies.sort();
        run
    }
}

/// What the clients saw.
#[derive(Clone, Debug, Default)]
pub struct Run {
    /// Request latencies of the successful requests, sorted.
    pub latencies: Vec<Duration>,
    /// Requests that failed or did not answer 2xx.
    pub errors: usize,
    pub elapsed: Duration,
}

impl Run {
    /// The `p` quantile (0..=1) of the latencies in milliseconds; NaN if none.
    pub fn latency_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[index].as_secs_f64() * 1000.0
    }
}

/// An engine's own cumulative counters (vLLM names, which the simulated
/// engines share).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineCounters {
    /// Prompt tokens found in the prefix cache.
    pub prefix_hits: f64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: f64,
    /// Requests finished, for any reason.
    pub requests: f64,
}

impl EngineCounters {
    /// Reads a `/metrics` page: each counter summed over its label sets.
    pub fn parse(page: &str) -> Self {
        let total = |name: &str| -> f64 {
            page.lines()
                .filter(|line| !line.starts_with('#'))
                .filter(|line| {
                    line.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(['{', ' ']))
                })
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        Self {
            prefix_hits: total("vllm:prefix_cache_hits_total"),
            prefix_queries: total("vllm:prefix_cache_queries_total"),
            requests: total("vllm:request_success_total"),
        }
    }

    /// Reads `metrics_url`.
    pub async fn read(http: &HttpClient, metrics_url: &str) -> Result<Self, String> {
        let page = http.get(metrics_url).await?;
        if !page.status.is_success() {
            return Err(format!("{metrics_url}: {}", page.status));
        }
        Ok(Self::parse(&page.text()))
    }

    /// What was counted since `before`.
    pub fn since(&self, before: &Self) -> Self {
        Self {
            prefix_hits: self.prefix_hits - before.prefix_hits,
            prefix_queries: self.prefix_queries - before.prefix_queries,
            requests: self.requests - before.requests,
        }
    }
}

/// The scheduling-quality target for the default mix on this workload: the
/// engines' prefix-cache hit rate (round robin gets about 60% on the real
/// engines, keeping every prompt on exactly one engine about 86%) ...
pub const TARGET_HIT_RATE: f64 = 0.8;
/// ... with neither engine serving more than 60% of the requests (40/60).
pub const TARGET_BUSIEST_SHARE: f64 = 0.6;

/// One line of the results table.
#[derive(Clone, Debug)]
pub struct QualityRow {
    pub strategy: String,
    pub dataplanes: usize,
    /// Per engine, what it counted during the run.
    pub engines: Vec<EngineCounters>,
    pub run: Run,
}

impl QualityRow {
    /// The table's header, in Markdown.
    pub const HEADER: &str = "| strategy | dataplanes | prefix hit rate | requests per engine | latency p50 (ms) | latency p90 (ms) | errors |\n|---|---|---|---|---|---|---|\n";

    /// Prefix-cache hits over lookups, summed over the engines.
    pub fn hit_rate(&self) -> f64 {
        let hits: f64 = self.engines.iter().map(|e| e.prefix_hits).sum();
        let queries: f64 = self.engines.iter().map(|e| e.prefix_queries).sum();
        if queries > 0.0 { hits / queries } else { 0.0 }
    }

    /// The largest share of the requests one engine served.
    pub fn busiest_share(&self) -> f64 {
        let total: f64 = self.engines.iter().map(|e| e.requests).sum();
        let most = self.engines.iter().map(|e| e.requests).fold(0.0, f64::max);
        if total > 0.0 { most / total } else { 0.0 }
    }

    /// Whether this row meets both targets ([`TARGET_HIT_RATE`] with no
    /// errors, [`TARGET_BUSIEST_SHARE`]), and one line per target saying so
    /// (`ok:` or `MISS:`, with the measured value).
    pub fn target_verdicts(&self) -> (bool, Vec<String>) {
        let name = format!(
            "{}, {} dataplane{}",
            self.strategy,
            self.dataplanes,
            if self.dataplanes == 1 { "" } else { "s" }
        );
        let verdict = |met: bool| if met { "ok" } else { "MISS" };
        let hits = self.hit_rate() >= TARGET_HIT_RATE && self.run.errors == 0;
        let even = self.busiest_share() <= TARGET_BUSIEST_SHARE;
        let lines = vec![
            format!(
                "{}: {name}: prefix hit rate {:.1}% (target >= {:.0}%), {} errors",
                verdict(hits),
                self.hit_rate() * 100.0,
                TARGET_HIT_RATE * 100.0,
                self.run.errors,
            ),
            format!(
                "{}: {name}: busiest engine served {:.1}% of requests (target <= {:.0}%)",
                verdict(even),
                self.busiest_share() * 100.0,
                TARGET_BUSIEST_SHARE * 100.0,
            ),
        ];
        (hits && even, lines)
    }

    /// The row, in Markdown.
    pub fn markdown(&self) -> String {
        let served: Vec<String> = self
            .engines
            .iter()
            .map(|e| format!("{:.0}", e.requests))
            .collect();
        format!(
            "| {} | {} | {:.1}% | {} | {:.0} | {:.0} | {} |\n",
            self.strategy,
            self.dataplanes,
            self.hit_rate() * 100.0,
            served.join(" / "),
            self.run.latency_ms(0.5),
            self.run.latency_ms(0.9),
            self.run.errors,
        )
    }
}

/// The router configurations the runs compare, as `--router-config` files.
pub const STRATEGIES: [(&str, &str); 3] = [
    // Every pod scores 0: ties rotate, which is round robin.
    (
        "round robin",
        "scheduler:\n  plugins:\n    Filter: {enabled: []}\n    Score: {enabled: [{name: least-request, weight: 0}]}\n",
    ),
    ("default mix", "auth: {}\n"),
    (
        "prefix-cache alone",
        "scheduler:\n  plugins:\n    Filter: {enabled: []}\n    Score: {enabled: [{name: prefix-cache}]}\n",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_round_sends_every_group_once_and_requests_are_distinct() {
        let workload = PrefixWorkload {
            rounds: 3,
            ..PrefixWorkload::two_engines("m")
        };
        let requests = workload.requests();
        assert_eq!(requests.len(), 48);
        let systems: Vec<String> = requests
            .iter()
            .map(|body| {
                let value: serde_json::Value = serde_json::from_str(body).expect("json");
                value["messages"][0]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        for round in systems.chunks(16) {
            let mut distinct = round.to_vec();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 16, "each group once per round");
        }
        assert_eq!(systems[0].split(' ').count(), 285);
        let mut bodies = requests.clone();
        bodies.sort();
        bodies.dedup();
        assert_eq!(bodies.len(), 48, "every question is its own");
        assert_eq!(requests, workload.requests(), "seeded");
    }

    #[test]
    fn counters_are_summed_over_label_sets_by_exact_name() {
        let page = "# TYPE vllm:prefix_cache_hits_total counter\n\
            vllm:prefix_cache_hits_total{engine=\"0\"} 10.0\n\
            vllm:prefix_cache_hits_created{engine=\"0\"} 1.7e9\n\
            vllm:prefix_cache_queries_total{engine=\"0\"} 40.0\n\
            vllm:request_success_total{finished_reason=\"stop\"} 2.0\n\
            vllm:request_success_total{finished_reason=\"length\"} 3.0\n";
        let counters = EngineCounters::parse(page);
        assert_eq!(
            counters,
            EngineCounters {
                prefix_hits: 10.0,
                prefix_queries: 40.0,
                requests: 5.0
            }
        );
        let row = QualityRow {
            strategy: "s".into(),
            dataplanes: 1,
            engines: vec![counters, counters.since(&EngineCounters::default())],
            run: Run::default(),
        };
        assert_eq!(row.hit_rate(), 0.25);
        assert_eq!(row.busiest_share(), 0.5);
    }
}
