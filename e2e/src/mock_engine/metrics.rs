//! `GET /metrics`: Prometheus text with the real engines' metric names, labels, bucket bounds and
//! number formatting (prometheus_client's), so the controller's scrapers parse the mock exactly as
//! they parse a real pod.

use std::fmt::Write as _;

use super::backend::{EngineLoad, PrefixCacheStats};
use super::config::EngineFlavor;
use super::stats::{Delivery, FinishReason, Histogram, HistogramLayout, StatsSnapshot};

/// vLLM's histogram bounds, copied from a real vLLM 0.32 `/metrics` page.
pub const VLLM_HISTOGRAMS: HistogramLayout = HistogramLayout {
    time_to_first_token: &[
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
    ],
    inter_token_latency: VLLM_TOKEN_LATENCY_BUCKETS,
    time_per_output_token: VLLM_TOKEN_LATENCY_BUCKETS,
    e2e_request_latency: &[
        0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
        240.0, 480.0, 960.0, 1920.0, 7680.0,
    ],
};

const VLLM_TOKEN_LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// SGLang's default histogram bounds (`TokenizerMetricsCollector`). SGLang has no per-request
/// time-per-output-token family in its routing set, so that histogram reuses the ITL bounds and is
/// not exposed.
pub const SGLANG_HISTOGRAMS: HistogramLayout = HistogramLayout {
    time_to_first_token: &[
        0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0,
        200.0, 400.0,
    ],
    inter_token_latency: SGLANG_INTER_TOKEN_LATENCY_BUCKETS,
    time_per_output_token: SGLANG_INTER_TOKEN_LATENCY_BUCKETS,
    e2e_request_latency: &[
        0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0,
        200.0, 400.0, 600.0, 1200.0, 1800.0, 2400.0,
    ],
};

const SGLANG_INTER_TOKEN_LATENCY_BUCKETS: &[f64] = &[
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080,
    0.100, 0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000,
];

/// vLLM's `engine` label: the index of the engine core; a single-engine server is always `0`.
const VLLM_ENGINE_INDEX: &str = "0";

/// vLLM `finished_reason` label values, in the order vLLM declares them; the mock never produces
/// `error` or `repetition` but exposes them at 0 like the real server.
const VLLM_FINISHED_REASONS: [&str; 5] = ["stop", "length", "abort", "error", "repetition"];

pub fn histogram_layout(flavor: EngineFlavor) -> HistogramLayout {
    match flavor {
        EngineFlavor::Vllm => VLLM_HISTOGRAMS,
        EngineFlavor::Sglang => SGLANG_HISTOGRAMS,
    }
}

/// Everything one `/metrics` page shows.
pub struct MetricsInput<'a> {
    pub flavor: EngineFlavor,
    pub model: &'a str,
    pub lora_adapters: &'a [String],
    pub load: &'a EngineLoad,
    /// Present when the backend models a prefix cache (sim mode); its families are left out
    /// otherwise.
    pub prefix_cache: Option<&'a PrefixCacheStats>,
    /// The paged KV cache's (blocks, tokens per block), for vLLM's `vllm:cache_config_info`;
    /// present when the backend models one (sim mode).
    pub kv_cache_blocks: Option<(u32, u32)>,
    pub stats: &'a StatsSnapshot,
    /// Unix seconds at engine start: value of vLLM's `*_created` series.
    pub started_at_unix: f64,
    /// Unix seconds now: value of `vllm:lora_requests_info`.
    pub now_unix: f64,
}

pub fn render(input: &MetricsInput<'_>) -> String {
    let mut page = Exposition::default();
    match input.flavor {
        EngineFlavor::Vllm => render_vllm(&mut page, input),
        EngineFlavor::Sglang => render_sglang(&mut page, input),
    }
    page.text
}

fn render_vllm(page: &mut Exposition, input: &MetricsInput<'_>) {
    let labels = [("engine", VLLM_ENGINE_INDEX), ("model_name", input.model)];
    let created = input.started_at_unix;
    let stats = input.stats;
    let load = input.load;

    page.family(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
    );
    page.sample("vllm:num_requests_running", &labels, load.running as f64);
    page.family(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
    );
    page.sample("vllm:num_requests_waiting", &labels, load.waiting as f64);
    page.family(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
    );
    page.sample("vllm:kv_cache_usage_perc", &labels, load.kv_cache_usage());
    if let Some((blocks, block_size)) = input.kv_cache_blocks {
        // The real family has some thirty labels; these are the ones routers read.
        let (blocks, block_size) = (blocks.to_string(), block_size.to_string());
        page.family(
            "vllm:cache_config_info",
            "gauge",
            "Information of the LLMEngine CacheConfig",
        );
        page.sample(
            "vllm:cache_config_info",
            &[
                ("block_size", &block_size),
                ("enable_prefix_caching", "True"),
                ("engine", VLLM_ENGINE_INDEX),
                ("num_gpu_blocks", &blocks),
            ],
            1.0,
        );
    }
    if let Some(cache) = input.prefix_cache {
        let counters = [
            (
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                cache.queried_tokens,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                cache.hit_tokens,
            ),
            (
                "vllm:num_preemptions",
                "Cumulative number of preemption from the engine.",
                cache.preemptions,
            ),
        ];
        for (base, help, value) in counters {
            page.vllm_counter(base, help, &[(labels.to_vec(), value)], created);
        }
    }

    page.vllm_counter(
        "vllm:prompt_tokens",
        "Number of prefill tokens processed.",
        &[(labels.to_vec(), stats.prompt_tokens.iter().sum())],
        created,
    );
    page.vllm_counter(
        "vllm:generation_tokens",
        "Number of generation tokens processed.",
        &[(labels.to_vec(), stats.generation_tokens.iter().sum())],
        created,
    );
    let successes: Vec<_> = VLLM_FINISHED_REASONS
        .iter()
        .map(|reason| {
            let count = FinishReason::ALL
                .iter()
                .find(|known| known.as_str() == *reason)
                .map_or(0, |known| {
                    Delivery::ALL
                        .iter()
                        .map(|delivery| stats.finished(*known, *delivery))
                        .sum()
                });
            let series = vec![
                ("engine", VLLM_ENGINE_INDEX),
                ("finished_reason", *reason),
                ("model_name", input.model),
            ];
            (series, count)
        })
        .collect();
    page.vllm_counter(
        "vllm:request_success",
        "Count of successfully processed requests.",
        &successes,
        created,
    );

    let histograms = [
        (
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            merged(&stats.time_to_first_token),
        ),
        (
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            stats.inter_token_latency.clone(),
        ),
        (
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            merged(&stats.time_per_output_token),
        ),
        (
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            merged(&stats.e2e_request_latency),
        ),
    ];
    for (name, help, histogram) in &histograms {
        page.family(name, "histogram", help);
        page.histogram(name, &labels, histogram);
        let created_name = format!("{name}_created");
        page.family(&created_name, "gauge", help);
        page.sample(&created_name, &labels, created);
    }

    page.family(
        "vllm:lora_requests_info",
        "gauge",
        "Running stats on lora requests.",
    );
    if !input.lora_adapters.is_empty() {
        let running = adapters_in(&load.running_models, input.model);
        let waiting = adapters_in(&load.waiting_models, input.model);
        let max_lora = input.lora_adapters.len().to_string();
        page.sample(
            "vllm:lora_requests_info",
            &[
                ("max_lora", &max_lora),
                ("running_lora_adapters", &running),
                ("waiting_lora_adapters", &waiting),
            ],
            input.now_unix,
        );
    }
}

fn render_sglang(page: &mut Exposition, input: &MetricsInput<'_>) {
    // Scheduler and tokenizer processes label their metrics differently.
    let scheduler = [
        ("engine_type", "unified"),
        ("model_name", input.model),
        ("moe_ep_rank", "0"),
        ("pp_rank", "0"),
        ("tp_rank", "0"),
    ];
    let tokenizer = [("engine_type", "unified"), ("model_name", input.model)];
    let with_streaming = |delivery: Delivery| {
        let is_streaming = match delivery {
            Delivery::Unary => "false",
            Delivery::Streamed => "true",
        };
        vec![
            ("engine_type", "unified"),
            ("is_streaming", is_streaming),
            ("model_name", input.model),
        ]
    };
    let stats = input.stats;
    let load = input.load;

    let gauges = [
        (
            "sglang:num_running_reqs",
            "The number of running requests.",
            load.running as f64,
        ),
        (
            "sglang:num_queue_reqs",
            "The number of requests in the waiting queue.",
            load.waiting as f64,
        ),
        (
            "sglang:token_usage",
            "The token usage.",
            load.kv_cache_usage(),
        ),
        (
            "sglang:num_used_tokens",
            "The number of used tokens.",
            load.kv_cache_used_tokens as f64,
        ),
        (
            "sglang:max_total_num_tokens",
            "Maximum total number of tokens in the KV cache pool.",
            load.kv_cache_capacity_tokens as f64,
        ),
    ];
    for (name, help, value) in gauges {
        page.family(name, "gauge", help);
        page.sample(name, &scheduler, value);
    }
    if let Some(cache) = input.prefix_cache {
        page.family(
            "sglang:cache_hit_rate",
            "gauge",
            "The prefix cache hit rate.",
        );
        page.sample(
            "sglang:cache_hit_rate",
            &scheduler,
            cache.last_batch_hit_rate,
        );
        page.family(
            "sglang:cached_tokens_total",
            "counter",
            "Number of cached prompt tokens by source (device/host/storage).",
        );
        page.sample(
            "sglang:cached_tokens_total",
            &[
                ("cache_source", "device"),
                ("engine_type", "unified"),
                ("model_name", input.model),
            ],
            cache.hit_tokens as f64,
        );
    }

    let per_delivery_counters = [
        (
            "sglang:prompt_tokens_total",
            "Number of prefill tokens processed.",
            stats.prompt_tokens,
        ),
        (
            "sglang:generation_tokens_total",
            "Number of generation tokens processed.",
            stats.generation_tokens,
        ),
        (
            "sglang:num_requests_total",
            "Number of requests processed.",
            [Delivery::Unary, Delivery::Streamed].map(|delivery| {
                stats.finished(FinishReason::Stop, delivery)
                    + stats.finished(FinishReason::Length, delivery)
            }),
        ),
    ];
    for (name, help, values) in per_delivery_counters {
        page.family(name, "counter", help);
        for delivery in Delivery::ALL {
            page.sample(
                name,
                &with_streaming(delivery),
                values[delivery.slot()] as f64,
            );
        }
    }
    page.family(
        "sglang:num_aborted_requests_total",
        "counter",
        "Number of requests aborted.",
    );
    let aborted: u64 = Delivery::ALL
        .iter()
        .map(|delivery| stats.finished(FinishReason::Abort, *delivery))
        .sum();
    page.sample(
        "sglang:num_aborted_requests_total",
        &tokenizer,
        aborted as f64,
    );

    page.family(
        "sglang:time_to_first_token_seconds",
        "histogram",
        "Histogram of time to first token in seconds.",
    );
    for delivery in Delivery::ALL {
        page.histogram(
            "sglang:time_to_first_token_seconds",
            &with_streaming(delivery),
            &stats.time_to_first_token[delivery.slot()],
        );
    }
    page.family(
        "sglang:inter_token_latency_seconds",
        "histogram",
        "Histogram of inter-token latency in seconds.",
    );
    page.histogram(
        "sglang:inter_token_latency_seconds",
        &tokenizer,
        &stats.inter_token_latency,
    );
    page.family(
        "sglang:e2e_request_latency_seconds",
        "histogram",
        "Histogram of End-to-end request latency in seconds",
    );
    for delivery in Delivery::ALL {
        page.histogram(
            "sglang:e2e_request_latency_seconds",
            &with_streaming(delivery),
            &stats.e2e_request_latency[delivery.slot()],
        );
    }
}

fn merged(per_delivery: &[Histogram; 2]) -> Histogram {
    let mut total = per_delivery[0].clone();
    total.merge(&per_delivery[1]);
    total
}

/// vLLM lists adapters, not the base model, comma separated.
fn adapters_in(models: &std::collections::BTreeSet<String>, base_model: &str) -> String {
    models
        .iter()
        .filter(|model| *model != base_model)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// Prometheus text exposition writer. Label pairs are written in the order given, which callers
/// keep alphabetical like the real engines do.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (index, (label, label_value)) in labels.iter().enumerate() {
                if index > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape_label_value(label_value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
    }

    /// `_bucket` series (with `le` in its alphabetical place), then `_count` and `_sum`, the order
    /// vLLM's pages use.
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let bucket_name = format!("{name}_bucket");
        for (bound, count) in histogram.cumulative_buckets() {
            let le = format_value(bound);
            let mut series: Vec<(&str, &str)> = labels.to_vec();
            let position = series.partition_point(|(label, _)| *label < "le");
            series.insert(position, ("le", &le));
            self.sample(&bucket_name, &series, count as f64);
        }
        self.sample(&format!("{name}_count"), labels, histogram.count() as f64);
        self.sample(&format!("{name}_sum"), labels, histogram.sum());
    }

    /// A vLLM counter family `{base}_total` followed by its `{base}_created` gauge family, as
    /// prometheus_client exposes counters outside multiprocess mode.
    fn vllm_counter(
        &mut self,
        base: &str,
        help: &str,
        series: &[(Vec<(&str, &str)>, u64)],
        created: f64,
    ) {
        let total = format!("{base}_total");
        self.family(&total, "counter", help);
        for (labels, value) in series {
            self.sample(&total, labels, *value as f64);
        }
        let created_name = format!("{base}_created");
        self.family(&created_name, "gauge", help);
        for (labels, _) in series {
            self.sample(&created_name, labels, created);
        }
    }
}

fn escape_label_value(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// A sample value or bound the way prometheus_client prints it (`floatToGoString`): Python's
/// `repr` of the float (`8.0`, `0.25`, `5e-05`), switched to an exponent once the integer part has
/// more than six digits (`1.7952664050212803e+09`).
pub fn format_value(value: f64) -> String {
    if value.is_nan() {
        return "NaN".into();
    }
    if value == f64::INFINITY {
        return "+Inf".into();
    }
    if value == f64::NEG_INFINITY {
        return "-Inf".into();
    }
    let repr = python_float_repr(value);
    if value > 0.0
        && let Some(dot) = repr.find('.')
        && dot > 6
    {
        let mantissa = format!("{}.{}{}", &repr[..1], &repr[1..dot], &repr[dot + 1..]);
        let mantissa = mantissa.trim_end_matches(['0', '.']);
        return format!("{mantissa}e+0{}", dot - 1);
    }
    repr
}

/// Python's `repr(float)`: Rust's `Debug` already picks the same shortest round-trip digits and
/// the same fixed/scientific cut-over; only the exponent is written differently (`5e-5` vs
/// `5e-05`, `1e16` vs `1e+16`).
fn python_float_repr(value: f64) -> String {
    let debug = format!("{value:?}");
    let Some((mantissa, exponent)) = debug.split_once('e') else {
        return debug;
    };
    let (sign, digits) = match exponent.strip_prefix('-') {
        Some(digits) => ('-', digits),
        None => ('+', exponent),
    };
    format!("{mantissa}e{sign}{digits:0>2}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_engine::stats::EngineStats;
    use std::collections::BTreeSet;
    use std::time::Duration;

    #[test]
    fn values_are_formatted_like_prometheus_client() {
        assert_eq!(format_value(8.0), "8.0");
        assert_eq!(format_value(0.0), "0.0");
        assert_eq!(format_value(0.17322834645669294), "0.17322834645669294");
        assert_eq!(format_value(4.773876905441284), "4.773876905441284");
        assert_eq!(format_value(1.7952664050212803e9), "1.7952664050212803e+09");
        assert_eq!(format_value(1_000_000.0), "1e+06");
        assert_eq!(format_value(123456.0), "123456.0");
        assert_eq!(format_value(5e-5), "5e-05");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(2560.0), "2560.0");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    fn sample_input_stats(layout: HistogramLayout) -> StatsSnapshot {
        let stats = EngineStats::new(layout);
        stats.record_first_token(Delivery::Streamed, 5, Duration::from_millis(30));
        stats.record_next_token(Delivery::Streamed, Duration::from_millis(20));
        stats.record_finished(
            FinishReason::Length,
            Delivery::Streamed,
            Duration::from_millis(50),
            Some((Duration::from_millis(20), 2)),
        );
        stats.snapshot()
    }

    /// `running` requests of `models`, none waiting, `kv_cache_used_tokens`
    /// of a 4096-token KV cache in use.
    fn running_load(running: u64, kv_cache_used_tokens: u64, models: &[&str]) -> EngineLoad {
        EngineLoad {
            running,
            waiting: 0,
            kv_cache_used_tokens,
            kv_cache_capacity_tokens: 4096,
            running_models: models.iter().map(|model| model.to_string()).collect(),
            waiting_models: BTreeSet::new(),
        }
    }

    #[test]
    fn vllm_page_has_the_fixture_series() {
        let stats = sample_input_stats(VLLM_HISTOGRAMS);
        let load = running_load(2, 1024, &["base", "tiny-lora"]);
        let adapters = vec!["tiny-lora".to_string()];
        let page = render(&MetricsInput {
            flavor: EngineFlavor::Vllm,
            model: "base",
            lora_adapters: &adapters,
            load: &load,
            prefix_cache: None,
            kv_cache_blocks: None,
            stats: &stats,
            started_at_unix: 1_795_266_405.0,
            now_unix: 1_795_266_410.5,
        });
        for line in [
            "# TYPE vllm:num_requests_running gauge",
            "vllm:num_requests_running{engine=\"0\",model_name=\"base\"} 2.0",
            "vllm:num_requests_waiting{engine=\"0\",model_name=\"base\"} 0.0",
            "vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"base\"} 0.25",
            "# TYPE vllm:prompt_tokens_total counter",
            "vllm:prompt_tokens_total{engine=\"0\",model_name=\"base\"} 5.0",
            "# TYPE vllm:prompt_tokens_created gauge",
            "vllm:prompt_tokens_created{engine=\"0\",model_name=\"base\"} 1.795266405e+09",
            "vllm:generation_tokens_total{engine=\"0\",model_name=\"base\"} 2.0",
            "vllm:request_success_total{engine=\"0\",finished_reason=\"length\",model_name=\"base\"} 1.0",
            "vllm:request_success_total{engine=\"0\",finished_reason=\"repetition\",model_name=\"base\"} 0.0",
            "# TYPE vllm:time_to_first_token_seconds histogram",
            "vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"0.02\",model_name=\"base\"} 0.0",
            "vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"0.04\",model_name=\"base\"} 1.0",
            "vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"+Inf\",model_name=\"base\"} 1.0",
            "vllm:time_to_first_token_seconds_count{engine=\"0\",model_name=\"base\"} 1.0",
            "vllm:time_to_first_token_seconds_sum{engine=\"0\",model_name=\"base\"} 0.03",
            "vllm:inter_token_latency_seconds_bucket{engine=\"0\",le=\"0.025\",model_name=\"base\"} 1.0",
            "vllm:inter_token_latency_seconds_count{engine=\"0\",model_name=\"base\"} 1.0",
            "vllm:request_time_per_output_token_seconds_count{engine=\"0\",model_name=\"base\"} 1.0",
            "vllm:e2e_request_latency_seconds_count{engine=\"0\",model_name=\"base\"} 1.0",
            "vllm:lora_requests_info{max_lora=\"1\",running_lora_adapters=\"tiny-lora\",waiting_lora_adapters=\"\"} 1.7952664105e+09",
        ] {
            assert!(
                page.lines().any(|l| l == line),
                "missing `{line}` in\n{page}"
            );
        }
    }

    #[test]
    fn vllm_page_without_adapters_has_no_lora_sample() {
        let stats = sample_input_stats(VLLM_HISTOGRAMS);
        let page = render(&MetricsInput {
            flavor: EngineFlavor::Vllm,
            model: "base",
            lora_adapters: &[],
            load: &EngineLoad::default(),
            prefix_cache: None,
            kv_cache_blocks: None,
            stats: &stats,
            started_at_unix: 0.0,
            now_unix: 0.0,
        });
        assert!(page.contains("# TYPE vllm:lora_requests_info gauge"));
        assert!(!page.contains("vllm:lora_requests_info{"));
    }

    #[test]
    fn prefix_cache_families_appear_only_with_a_prefix_cache() {
        let cache = PrefixCacheStats {
            queried_tokens: 7627,
            hit_tokens: 2624,
            last_batch_hit_rate: 0.25,
            preemptions: 1,
        };
        for flavor in [EngineFlavor::Vllm, EngineFlavor::Sglang] {
            let stats = sample_input_stats(histogram_layout(flavor));
            let render_with = |prefix_cache| {
                render(&MetricsInput {
                    flavor,
                    model: "base",
                    lora_adapters: &[],
                    load: &EngineLoad::default(),
                    prefix_cache,
                    // The simulator's cache comes with its prefix-cache stats.
                    kv_cache_blocks: prefix_cache.map(|_| (128, 32)),
                    stats: &stats,
                    started_at_unix: 1_795_266_405.0,
                    now_unix: 0.0,
                })
            };
            let without = render_with(None);
            assert!(!without.contains("cache_config_info"));
            assert!(!without.contains("prefix_cache"));
            assert!(!without.contains("cache_hit_rate"));
            assert!(!without.contains("cached_tokens"));
            let page = render_with(Some(&cache));
            let expected: &[&str] = match flavor {
                EngineFlavor::Vllm => &[
                    "# TYPE vllm:prefix_cache_queries_total counter",
                    "vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"base\"} 7627.0",
                    "vllm:prefix_cache_queries_created{engine=\"0\",model_name=\"base\"} 1.795266405e+09",
                    "vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"base\"} 2624.0",
                    "vllm:num_preemptions_total{engine=\"0\",model_name=\"base\"} 1.0",
                    "vllm:cache_config_info{block_size=\"32\",enable_prefix_caching=\"True\",engine=\"0\",num_gpu_blocks=\"128\"} 1.0",
                ],
                EngineFlavor::Sglang => &[
                    "# TYPE sglang:cache_hit_rate gauge",
                    "sglang:cache_hit_rate{engine_type=\"unified\",model_name=\"base\",moe_ep_rank=\"0\",pp_rank=\"0\",tp_rank=\"0\"} 0.25",
                    "# TYPE sglang:cached_tokens_total counter",
                    "sglang:cached_tokens_total{cache_source=\"device\",engine_type=\"unified\",model_name=\"base\"} 2624.0",
                ],
            };
            for line in expected {
                assert!(
                    page.lines().any(|l| l == *line),
                    "missing `{line}` in\n{page}"
                );
            }
        }
    }

    #[test]
    fn sglang_page_uses_sglang_names_and_labels() {
        let stats = sample_input_stats(SGLANG_HISTOGRAMS);
        let load = running_load(1, 2048, &["qwen"]);
        let page = render(&MetricsInput {
            flavor: EngineFlavor::Sglang,
            model: "qwen",
            lora_adapters: &[],
            load: &load,
            prefix_cache: None,
            kv_cache_blocks: None,
            stats: &stats,
            started_at_unix: 0.0,
            now_unix: 0.0,
        });
        let scheduler = "engine_type=\"unified\",model_name=\"qwen\",moe_ep_rank=\"0\",pp_rank=\"0\",tp_rank=\"0\"";
        for line in [
            format!("sglang:num_running_reqs{{{scheduler}}} 1.0"),
            format!("sglang:num_queue_reqs{{{scheduler}}} 0.0"),
            format!("sglang:token_usage{{{scheduler}}} 0.5"),
            format!("sglang:max_total_num_tokens{{{scheduler}}} 4096.0"),
            "sglang:prompt_tokens_total{engine_type=\"unified\",is_streaming=\"true\",model_name=\"qwen\"} 5.0".into(),
            "sglang:num_requests_total{engine_type=\"unified\",is_streaming=\"true\",model_name=\"qwen\"} 1.0".into(),
            "sglang:time_to_first_token_seconds_bucket{engine_type=\"unified\",is_streaming=\"true\",le=\"0.1\",model_name=\"qwen\"} 1.0".into(),
            "sglang:time_to_first_token_seconds_count{engine_type=\"unified\",is_streaming=\"false\",model_name=\"qwen\"} 0.0".into(),
            "sglang:inter_token_latency_seconds_bucket{engine_type=\"unified\",le=\"0.02\",model_name=\"qwen\"} 1.0".into(),
            "sglang:inter_token_latency_seconds_count{engine_type=\"unified\",model_name=\"qwen\"} 1.0".into(),
        ] {
            assert!(page.lines().any(|l| l == line), "missing `{line}` in\n{page}");
        }
        assert!(!page.contains("vllm:"));
        assert!(!page.contains("_created"));
    }
}
