//! vLLM `/metrics` pages.
//!
//! Current names first; vLLM releases before the V1 engine metrics renamed
//! them exposed `vllm:gpu_cache_usage_perc` and
//! `vllm:time_per_output_token_seconds`, which are read when the current name
//! is absent from the page (when both are present the current one wins).

use super::{EngineMetricNames, EnginePageError, EngineSample, HistogramNames, KvCacheCapacity};

pub const REQUESTS_WAITING: &str = "vllm:num_requests_waiting";
pub const REQUESTS_RUNNING: &str = "vllm:num_requests_running";
pub const KV_CACHE_USAGE: &str = "vllm:kv_cache_usage_perc";
pub const LEGACY_KV_CACHE_USAGE: &str = "vllm:gpu_cache_usage_perc";
pub const TTFT: &str = "vllm:time_to_first_token_seconds";
pub const TPOT: &str = "vllm:inter_token_latency_seconds";
pub const LEGACY_TPOT: &str = "vllm:time_per_output_token_seconds";
pub const CACHE_CONFIG_INFO: &str = "vllm:cache_config_info";

const NAMES: EngineMetricNames = EngineMetricNames {
    engine: "vLLM",
    prefix: "vllm:",
    requests_waiting: REQUESTS_WAITING,
    requests_running: REQUESTS_RUNNING,
    kv_cache_usage: &[KV_CACHE_USAGE, LEGACY_KV_CACHE_USAGE],
    ttft: &[HistogramNames {
        sum: "vllm:time_to_first_token_seconds_sum",
        count: "vllm:time_to_first_token_seconds_count",
    }],
    tpot: &[
        HistogramNames {
            sum: "vllm:inter_token_latency_seconds_sum",
            count: "vllm:inter_token_latency_seconds_count",
        },
        HistogramNames {
            sum: "vllm:time_per_output_token_seconds_sum",
            count: "vllm:time_per_output_token_seconds_count",
        },
    ],
    kv_cache_capacity: KvCacheCapacity::BlocksInfo {
        name: CACHE_CONFIG_INFO,
        blocks_label: "num_gpu_blocks",
        block_size_label: "block_size",
    },
};

/// Reads the load values from a vLLM `/metrics` page; see [`EngineSample`]
/// for how label sets are combined.
pub fn parse_page(text: &str) -> Result<EngineSample, EnginePageError> {
    super::extract(text, &NAMES)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::super::{HistogramTotals, ParseError, ParseErrorKind};
    use super::*;

    /// Checks what `parse_page` reads from `page`, one of the pages recorded from a real vLLM
    /// engine in `testdata/vllm/` (see `testdata/README.md`).
    fn assert_recorded_page(
        page: &str,
        waiting: f64,
        running: f64,
        kv_usage: f64,
        ttft: HistogramTotals,
        tpot: HistogramTotals,
    ) {
        let sample = parse_page(page).unwrap();
        assert_eq!(
            sample,
            EngineSample {
                requests_waiting: waiting,
                requests_running: running,
                kv_cache_usage: kv_usage,
                ttft,
                tpot,
                // Every recording: 128 blocks of 32 tokens.
                kv_cache_capacity_tokens: 4096,
            }
        );
    }

    fn totals(sum: f64, count: f64) -> HistogramTotals {
        HistogramTotals { sum, count }
    }

    #[test]
    fn reads_the_recorded_idle_page() {
        assert_recorded_page(
            include_str!("../../../testdata/vllm/metrics_idle.txt"),
            0.0,
            0.0,
            0.0,
            totals(0.0, 0.0),
            totals(0.0, 0.0),
        );
    }

    #[test]
    fn reads_the_recorded_page_during_load() {
        assert_recorded_page(
            include_str!("../../../testdata/vllm/metrics_during_load.txt"),
            16.0,
            8.0,
            0.17322834645669294,
            totals(4.773876905441284, 18.0),
            totals(3.5375548469999103, 683.0),
        );
    }

    #[test]
    fn reads_the_recorded_page_under_kv_pressure() {
        assert_recorded_page(
            include_str!("../../../testdata/vllm/metrics_during_kv_pressure.txt"),
            2.0,
            8.0,
            0.9448818897637795,
            totals(22.045464754104614, 42.0),
            totals(18.6253756289982, 3034.0),
        );
    }

    #[test]
    fn reads_the_recorded_page_after_load() {
        assert_recorded_page(
            include_str!("../../../testdata/vllm/metrics_after_load.txt"),
            0.0,
            0.0,
            0.0,
            totals(22.964831352233887, 44.0),
            totals(21.017625271998213, 3499.0),
        );
    }

    #[test]
    fn sums_queues_and_histograms_and_averages_kv_usage_across_label_sets() {
        let page = r#"# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="a"} 3.0
vllm:num_requests_waiting{engine="1",model_name="b"} 4.0
vllm:num_requests_running{engine="0",model_name="a"} 1.0
vllm:num_requests_running{engine="1",model_name="b"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="a"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="b"} 0.6
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="a"} 2.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="a"} 2.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="a"} 1.5
vllm:time_to_first_token_seconds_created{engine="0",model_name="a"} 1.7e+09
vllm:time_to_first_token_seconds_count{engine="1",model_name="b"} 3.0
vllm:time_to_first_token_seconds_sum{engine="1",model_name="b"} 2.5
vllm:inter_token_latency_seconds_count{engine="0",model_name="a"} 10.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="a"} 0.25
vllm:inter_token_latency_seconds_count{engine="1",model_name="b"} 30.0
vllm:inter_token_latency_seconds_sum{engine="1",model_name="b"} 0.75
"#;
        let sample = parse_page(page).unwrap();
        assert_eq!(sample.requests_waiting, 7.0);
        assert_eq!(sample.requests_running, 3.0);
        assert!((sample.kv_cache_usage - 0.4).abs() < 1e-12);
        assert_eq!(sample.ttft, totals(4.0, 5.0));
        assert_eq!(sample.tpot, totals(1.0, 40.0));
    }

    #[test]
    fn kv_cache_capacity_is_blocks_times_block_size_summed_over_engines() {
        let page = r#"vllm:num_requests_running{engine="0",model_name="m"} 0.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="1000"} 1.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="1",num_gpu_blocks="24"} 1.0
"#;
        assert_eq!(parse_page(page).unwrap().kv_cache_capacity_tokens, 16_384);
        // Before the cache is allocated vLLM prints "None": unknown, not an error.
        let page = r#"vllm:num_requests_running{engine="0",model_name="m"} 0.0
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="None"} 1.0
"#;
        assert_eq!(parse_page(page).unwrap().kv_cache_capacity_tokens, 0);
    }

    #[test]
    fn reads_legacy_names_when_the_current_ones_are_absent() {
        let page = r#"vllm:num_requests_waiting{model_name="m"} 1.0
vllm:num_requests_running{model_name="m"} 2.0
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
vllm:time_to_first_token_seconds_sum{model_name="m"} 0.5
vllm:time_to_first_token_seconds_count{model_name="m"} 2.0
vllm:time_per_output_token_seconds_sum{model_name="m"} 0.3
vllm:time_per_output_token_seconds_count{model_name="m"} 6.0
"#;
        let sample = parse_page(page).unwrap();
        assert_eq!(sample.kv_cache_usage, 0.5);
        assert_eq!(sample.ttft, totals(0.5, 2.0));
        assert_eq!(sample.tpot, totals(0.3, 6.0));
    }

    #[test]
    fn prefers_current_names_over_legacy_ones() {
        let page = r#"vllm:gpu_cache_usage_perc{model_name="m"} 0.9
vllm:kv_cache_usage_perc{model_name="m"} 0.25
vllm:time_per_output_token_seconds_sum{model_name="m"} 99.0
vllm:time_per_output_token_seconds_count{model_name="m"} 99.0
vllm:inter_token_latency_seconds_sum{model_name="m"} 0.5
vllm:inter_token_latency_seconds_count{model_name="m"} 10.0
"#;
        let sample = parse_page(page).unwrap();
        assert_eq!(sample.kv_cache_usage, 0.25);
        assert_eq!(sample.tpot, totals(0.5, 10.0));
    }

    #[test]
    fn ignores_non_finite_values_and_clamps_ratios() {
        let page = r#"vllm:num_requests_waiting{engine="0"} NaN
vllm:num_requests_waiting{engine="1"} 2.0
vllm:kv_cache_usage_perc{engine="0"} +Inf
vllm:kv_cache_usage_perc{engine="1"} 1.5
"#;
        let sample = parse_page(page).unwrap();
        assert_eq!(sample.requests_waiting, 2.0);
        assert_eq!(sample.kv_cache_usage, 1.0);
    }

    #[test]
    fn rejects_pages_without_engine_metrics_and_malformed_pages() {
        assert_eq!(
            parse_page("process_cpu_seconds_total 9.09\n"),
            Err(EnginePageError::NoEngineMetrics { engine: "vLLM" })
        );
        assert_eq!(
            parse_page("vllm:num_requests_waiting 1\nvllm:num_requests_running{x=1} 2\n"),
            Err(EnginePageError::Syntax(ParseError {
                line: 2,
                kind: ParseErrorKind::MissingLabelValueQuote,
            }))
        );
    }
}
