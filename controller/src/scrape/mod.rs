//! Engine metrics scraping: every ready pod's `/metrics` (and `/v1/models`),
//! parsed per engine into a [`PodLoad`].

use std::net::SocketAddr;

use switchyard_crd::InferenceEngine;

pub mod prometheus_text;
pub mod scraper;
pub mod sglang;
pub mod vllm;

pub use prometheus_text::{ParseError, ParseErrorKind};
pub use scraper::{
    PodLoads, ScrapeConfig, ScrapeConfigError, ScrapeErrorReason, Scraper, ScraperError,
};

/// `namespace/name` of a pod.
pub type PodKey = String;

/// A pod the scraper polls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrapeTarget {
    pub key: PodKey,
    /// `podIP:workloadPort`.
    pub addr: SocketAddr,
    pub engine: InferenceEngine,
}

// Written out because `InferenceEngine` (crate `switchyard-crd`) derives neither
// `Hash` nor `Ord`; the engine compares by its API name, consistent with `Eq`.
impl std::hash::Hash for ScrapeTarget {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key.hash(state);
        self.addr.hash(state);
        self.engine.as_str().hash(state);
    }
}

impl Ord for ScrapeTarget {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.key, self.addr, self.engine.as_str()).cmp(&(
            &other.key,
            other.addr,
            other.engine.as_str(),
        ))
    }
}

impl PartialOrd for ScrapeTarget {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Engine load of one pod as its latest scrapes saw it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodLoad {
    pub requests_waiting: f64,
    pub requests_running: f64,
    /// 0.0 ..= 1.0
    pub kv_cache_usage: f64,
    /// Mean time to first token over the last scrape interval; 0 = no request finished prefill in it.
    pub ttft_seconds: f64,
    /// Mean time per output token over the last scrape interval; 0 = no data in it.
    pub tpot_seconds: f64,
    /// Models the engine has loaded (base model and LoRA adapters), from `/v1/models`.
    pub models: Vec<String>,
    /// When the `/metrics` values were scraped (Unix milliseconds).
    pub observed_at_unix_ms: i64,
    /// Tokens the engine's KV cache holds; 0 = the page does not say.
    pub kv_cache_capacity_tokens: u64,
}

/// Load values read from one engine `/metrics` page.
///
/// Gauges are combined across label sets (one page can carry several engines,
/// models or ranks): queue lengths are **summed**, KV-cache usage, a ratio, is
/// the **mean** over its series. Histogram totals are summed. Non-finite values
/// are ignored; queue lengths are clamped to `>= 0` and KV usage to `0..=1`.
/// KV-cache capacities are **summed** (each engine on the page has its own
/// cache). A metric the page does not have yet (engines create labelled series
/// on first use) reads as 0.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineSample {
    pub requests_waiting: f64,
    pub requests_running: f64,
    pub kv_cache_usage: f64,
    pub ttft: HistogramTotals,
    pub tpot: HistogramTotals,
    /// Tokens the KV cache holds; 0 = unknown.
    pub kv_cache_capacity_tokens: u64,
}

/// Cumulative `_sum` and `_count` of a histogram, summed over its label sets.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HistogramTotals {
    pub sum: f64,
    pub count: f64,
}

/// Mean observation over the interval between two scrapes of a histogram:
/// Δsum / Δcount.
///
/// Returns 0, meaning "no data", on the first scrape (`prev` is `None`) and when
/// nothing was observed in the interval, so a consumer never mistakes an old
/// value for a fresh one. A counter reset (count or sum went down: the engine
/// restarted) yields the cumulative mean since the reset, `now.sum / now.count`.
pub fn interval_mean(prev: Option<HistogramTotals>, now: HistogramTotals) -> f64 {
    let Some(prev) = prev else {
        return 0.0;
    };
    let mean = if now.count < prev.count || now.sum < prev.sum {
        ratio_or_zero(now.sum, now.count)
    } else {
        ratio_or_zero(now.sum - prev.sum, now.count - prev.count)
    };
    if mean.is_finite() && mean >= 0.0 {
        mean
    } else {
        0.0
    }
}

fn ratio_or_zero(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 {
        numerator / denominator
    } else {
        0.0
    }
}

/// Why an engine page could not be turned into an [`EngineSample`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnginePageError {
    #[error("malformed exposition text: {0}")]
    Syntax(#[from] ParseError),
    /// Not one of the engine's load metrics is on the page: most likely the
    /// port serves something else, or the engine runs without metrics.
    #[error("the page has none of the {engine} load metrics")]
    NoEngineMetrics { engine: &'static str },
}

/// Reads an [`EngineSample`] from a `/metrics` page of `engine`.
pub fn parse_engine_page(
    engine: InferenceEngine,
    text: &str,
) -> Result<EngineSample, EnginePageError> {
    match engine {
        InferenceEngine::Vllm => vllm::parse_page(text),
        InferenceEngine::Sglang => sglang::parse_page(text),
    }
}

/// `_sum` and `_count` sample names of one histogram family.
#[derive(Clone, Copy, Debug)]
struct HistogramNames {
    sum: &'static str,
    count: &'static str,
}

/// Where one engine exposes the values of an [`EngineSample`]. Lists hold
/// alternative names in preference order (current name first, legacy after);
/// the first one present on a page is used.
#[derive(Clone, Copy, Debug)]
struct EngineMetricNames {
    engine: &'static str,
    /// Common prefix of every name below, to skip unrelated samples quickly.
    prefix: &'static str,
    requests_waiting: &'static str,
    requests_running: &'static str,
    kv_cache_usage: &'static [&'static str],
    ttft: &'static [HistogramNames],
    tpot: &'static [HistogramNames],
    kv_cache_capacity: KvCacheCapacity,
}

/// Where an engine tells the size of its KV cache.
#[derive(Clone, Copy, Debug)]
enum KvCacheCapacity {
    /// An info gauge whose labels carry the cache's block count and block
    /// size (vLLM's `vllm:cache_config_info{num_gpu_blocks, block_size}`).
    BlocksInfo {
        name: &'static str,
        blocks_label: &'static str,
        block_size_label: &'static str,
    },
    /// A gauge whose value is the capacity in tokens.
    TokensGauge(&'static str),
}

impl KvCacheCapacity {
    /// The tokens `sample` says a cache holds, if it is this capacity's metric.
    fn tokens(&self, sample: &prometheus_text::Sample<'_>) -> Option<f64> {
        match *self {
            Self::BlocksInfo {
                name,
                blocks_label,
                block_size_label,
            } if sample.name == name => {
                // Engines print "None" until the cache is allocated.
                let number = |label| sample.label(label)?.parse::<f64>().ok();
                Some(number(blocks_label)? * number(block_size_label)?)
            }
            Self::TokensGauge(name) if sample.name == name => Some(sample.value),
            _ => None,
        }
    }
}

/// Running total of the finite samples of one name.
#[derive(Clone, Copy, Debug, Default)]
struct SeriesTotal {
    total: f64,
    series: usize,
}

impl SeriesTotal {
    fn add(&mut self, value: f64) {
        if value.is_finite() {
            self.total += value;
            self.series += 1;
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct HistogramAccumulator {
    sum: SeriesTotal,
    count: SeriesTotal,
}

impl HistogramAccumulator {
    fn is_present(&self) -> bool {
        self.sum.series > 0 || self.count.series > 0
    }

    fn totals(&self) -> HistogramTotals {
        HistogramTotals {
            sum: self.sum.total,
            count: self.count.total,
        }
    }
}

/// Upper bound of alternative names per value; the name tables have one or two.
const MAX_ALTERNATIVES: usize = 2;

fn extract(text: &str, names: &EngineMetricNames) -> Result<EngineSample, EnginePageError> {
    let mut waiting = SeriesTotal::default();
    let mut running = SeriesTotal::default();
    let mut kv_usage = [SeriesTotal::default(); MAX_ALTERNATIVES];
    let mut ttft = [HistogramAccumulator::default(); MAX_ALTERNATIVES];
    let mut tpot = [HistogramAccumulator::default(); MAX_ALTERNATIVES];
    let mut capacity = SeriesTotal::default();

    for sample in prometheus_text::samples(text) {
        let sample = sample?;
        let name = sample.name;
        if !name.starts_with(names.prefix) {
            continue;
        }
        if name == names.requests_waiting {
            waiting.add(sample.value);
        } else if name == names.requests_running {
            running.add(sample.value);
        } else if let Some(index) = names.kv_cache_usage.iter().position(|&kv| kv == name) {
            if let Some(total) = kv_usage.get_mut(index) {
                total.add(sample.value);
            }
        } else if let Some(tokens) = names.kv_cache_capacity.tokens(&sample) {
            if tokens > 0.0 {
                capacity.add(tokens);
            }
        } else {
            add_histogram_sample(&mut ttft, names.ttft, name, sample.value);
            add_histogram_sample(&mut tpot, names.tpot, name, sample.value);
        }
    }

    let kv_usage = kv_usage.iter().find(|total| total.series > 0);
    let ttft = ttft.iter().find(|histogram| histogram.is_present());
    let tpot = tpot.iter().find(|histogram| histogram.is_present());
    if waiting.series == 0
        && running.series == 0
        && kv_usage.is_none()
        && ttft.is_none()
        && tpot.is_none()
    {
        return Err(EnginePageError::NoEngineMetrics {
            engine: names.engine,
        });
    }

    Ok(EngineSample {
        requests_waiting: waiting.total.max(0.0),
        requests_running: running.total.max(0.0),
        kv_cache_usage: kv_usage
            .map(|total| ratio_or_zero(total.total, total.series as f64).clamp(0.0, 1.0))
            .unwrap_or(0.0),
        ttft: ttft.map(HistogramAccumulator::totals).unwrap_or_default(),
        tpot: tpot.map(HistogramAccumulator::totals).unwrap_or_default(),
        // Saturates on absurd values; `as` maps a non-finite total (excluded by `add`) to 0.
        kv_cache_capacity_tokens: capacity.total as u64,
    })
}

fn add_histogram_sample(
    accumulators: &mut [HistogramAccumulator; MAX_ALTERNATIVES],
    alternatives: &[HistogramNames],
    name: &str,
    value: f64,
) {
    for (accumulator, names) in accumulators.iter_mut().zip(alternatives) {
        if name == names.sum {
            accumulator.sum.add(value);
        } else if name == names.count {
            accumulator.count.add(value);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn totals(sum: f64, count: f64) -> HistogramTotals {
        HistogramTotals { sum, count }
    }

    #[test]
    fn interval_mean_is_zero_on_the_first_scrape() {
        assert_eq!(interval_mean(None, totals(10.0, 4.0)), 0.0);
    }

    #[test]
    fn interval_mean_is_the_delta_ratio() {
        assert_eq!(
            interval_mean(Some(totals(2.0, 4.0)), totals(5.0, 10.0)),
            0.5
        );
    }

    #[test]
    fn interval_mean_is_zero_without_new_observations() {
        assert_eq!(interval_mean(Some(totals(2.0, 4.0)), totals(2.0, 4.0)), 0.0);
        assert_eq!(interval_mean(Some(totals(0.0, 0.0)), totals(0.0, 0.0)), 0.0);
    }

    #[test]
    fn interval_mean_after_a_counter_reset_is_the_cumulative_mean() {
        assert_eq!(
            interval_mean(Some(totals(50.0, 100.0)), totals(3.0, 4.0)),
            0.75
        );
        // Reset to an empty histogram: no data yet.
        assert_eq!(
            interval_mean(Some(totals(50.0, 100.0)), totals(0.0, 0.0)),
            0.0
        );
        // The count grew past its old value after a restart but the sum shows the reset.
        assert_eq!(
            interval_mean(Some(totals(50.0, 3.0)), totals(8.0, 4.0)),
            2.0
        );
    }

    #[test]
    fn engine_pages_are_dispatched_by_engine() {
        let vllm_page = "vllm:num_requests_waiting 3\n";
        let sglang_page = "sglang:num_queue_reqs 4\n";
        assert_eq!(
            parse_engine_page(InferenceEngine::Vllm, vllm_page)
                .unwrap()
                .requests_waiting,
            3.0
        );
        assert_eq!(
            parse_engine_page(InferenceEngine::Sglang, sglang_page)
                .unwrap()
                .requests_waiting,
            4.0
        );
        assert_eq!(
            parse_engine_page(InferenceEngine::Sglang, vllm_page),
            Err(EnginePageError::NoEngineMetrics { engine: "SGLang" })
        );
    }
}
