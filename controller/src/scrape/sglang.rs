//! SGLang `/metrics` pages (served with `--enable-metrics`).
//!
//! Names from `testdata/sglang/METRICS.md` (sglang 0.5.23 source). SGLang
//! has no legacy `sglang:time_per_output_token_seconds`; its
//! `sglang:request_time_per_output_token_seconds` is a per-request average, a
//! different quantity, so TPOT comes from the inter-token latency histogram only.
//! The TTFT histogram carries an extra `is_streaming` label; its label sets are
//! summed like any other.

use super::{EngineMetricNames, EnginePageError, EngineSample, HistogramNames, KvCacheCapacity};

pub const REQUESTS_WAITING: &str = "sglang:num_queue_reqs";
pub const REQUESTS_RUNNING: &str = "sglang:num_running_reqs";
pub const KV_CACHE_USAGE: &str = "sglang:token_usage";
pub const TTFT: &str = "sglang:time_to_first_token_seconds";
pub const TPOT: &str = "sglang:inter_token_latency_seconds";
pub const KV_CACHE_CAPACITY: &str = "sglang:max_total_num_tokens";

const NAMES: EngineMetricNames = EngineMetricNames {
    engine: "SGLang",
    prefix: "sglang:",
    requests_waiting: REQUESTS_WAITING,
    requests_running: REQUESTS_RUNNING,
    kv_cache_usage: &[KV_CACHE_USAGE],
    ttft: &[HistogramNames {
        sum: "sglang:time_to_first_token_seconds_sum",
        count: "sglang:time_to_first_token_seconds_count",
    }],
    tpot: &[HistogramNames {
        sum: "sglang:inter_token_latency_seconds_sum",
        count: "sglang:inter_token_latency_seconds_count",
    }],
    kv_cache_capacity: KvCacheCapacity::TokensGauge(KV_CACHE_CAPACITY),
};

/// Reads the load values from an SGLang `/metrics` page; see [`EngineSample`]
/// for how label sets are combined.
pub fn parse_page(text: &str) -> Result<EngineSample, EnginePageError> {
    super::extract(text, &NAMES)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::super::HistogramTotals;
    use super::*;

    /// Shaped like SGLang's multiprocess exposition: scheduler gauges per
    /// `tp_rank`, two data-parallel ranks, TTFT split by `is_streaming`.
    const PAGE: &str = r#"# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0",dp_rank="0"} 5.0
sglang:num_running_reqs{engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0",dp_rank="1"} 6.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0",dp_rank="0"} 2.0
sglang:num_queue_reqs{engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0",dp_rank="1"} 1.0
# HELP sglang:num_grammar_queue_reqs The number of requests in the grammar waiting queue.
# TYPE sglang:num_grammar_queue_reqs gauge
sglang:num_grammar_queue_reqs{engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0",dp_rank="0"} 7.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0",dp_rank="0"} 0.3
sglang:token_usage{engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0",dp_rank="1"} 0.5
# HELP sglang:max_total_num_tokens Maximum total number of tokens in the KV cache pool.
# TYPE sglang:max_total_num_tokens gauge
sglang:max_total_num_tokens{engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0",dp_rank="0"} 350000.0
sglang:max_total_num_tokens{engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0",dp_rank="1"} 350000.0
# HELP sglang:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE sglang:time_to_first_token_seconds histogram
sglang:time_to_first_token_seconds_bucket{engine_type="unified",is_streaming="true",le="+Inf",model_name="qwen"} 4.0
sglang:time_to_first_token_seconds_sum{engine_type="unified",is_streaming="true",model_name="qwen"} 1.25
sglang:time_to_first_token_seconds_count{engine_type="unified",is_streaming="true",model_name="qwen"} 4.0
sglang:time_to_first_token_seconds_sum{engine_type="unified",is_streaming="false",model_name="qwen"} 0.75
sglang:time_to_first_token_seconds_count{engine_type="unified",is_streaming="false",model_name="qwen"} 1.0
# HELP sglang:inter_token_latency_seconds Histogram of inter-token latency in seconds.
# TYPE sglang:inter_token_latency_seconds histogram
sglang:inter_token_latency_seconds_sum{engine_type="unified",model_name="qwen"} 2.5
sglang:inter_token_latency_seconds_count{engine_type="unified",model_name="qwen"} 100.0
# HELP sglang:request_time_per_output_token_seconds Per-request TPOT in seconds.
# TYPE sglang:request_time_per_output_token_seconds histogram
sglang:request_time_per_output_token_seconds_sum{engine_type="unified",is_streaming="true",model_name="qwen"} 9.0
sglang:request_time_per_output_token_seconds_count{engine_type="unified",is_streaming="true",model_name="qwen"} 9.0
"#;

    #[test]
    fn reads_a_page_with_the_documented_names() {
        let sample = parse_page(PAGE).unwrap();
        assert_eq!(
            sample,
            EngineSample {
                requests_waiting: 3.0,
                requests_running: 11.0,
                kv_cache_usage: 0.4,
                ttft: HistogramTotals {
                    sum: 2.0,
                    count: 5.0
                },
                tpot: HistogramTotals {
                    sum: 2.5,
                    count: 100.0
                },
                kv_cache_capacity_tokens: 2 * 350_000,
            }
        );
    }

    #[test]
    fn a_fresh_server_without_histograms_reads_as_zero_latency_totals() {
        let page = "sglang:num_running_reqs{model_name=\"qwen\"} 0.0\n\
                    sglang:num_queue_reqs{model_name=\"qwen\"} 0.0\n\
                    sglang:token_usage{model_name=\"qwen\"} 0.0\n";
        let sample = parse_page(page).unwrap();
        assert_eq!(sample, EngineSample::default());
    }

    #[test]
    fn a_vllm_page_is_not_an_sglang_page() {
        assert_eq!(
            parse_page("vllm:num_requests_waiting 1\n"),
            Err(EnginePageError::NoEngineMetrics { engine: "SGLang" })
        );
    }
}
