//! The scheduler configuration both ends agree on: plugin names, defaults and
//! validation. The controller validates a router configuration file with
//! [`validate`] before shipping it; the dataplane validates again (a snapshot
//! from an older or newer controller must not crash it) and fills in defaults.

use crate::pb;

/// Filter: engine waiting below a bound. Score: fewest requests in flight.
pub const LEAST_REQUEST: &str = "least-request";
/// Filter: pods that have the requested model or LoRA adapter loaded.
pub const LORA_AFFINITY: &str = "lora-affinity";
/// Score: free KV cache.
pub const GPU_USAGE: &str = "gpu-usage";
/// Score: low TTFT / TPOT.
pub const LEAST_LATENCY: &str = "least-latency";
/// Score: the pod most likely to hold the prompt's prefix in its KV cache.
pub const PREFIX_CACHE: &str = "prefix-cache";
/// Score: uniform random, meant to be used alone.
pub const RANDOM: &str = "random";
/// Score: the same pod for the same session header.
pub const SESSION_AFFINITY: &str = "session-affinity";

/// Every filter plugin name.
pub const FILTER_PLUGINS: [&str; 2] = [LEAST_REQUEST, LORA_AFFINITY];
/// Every score plugin name.
pub const SCORE_PLUGINS: [&str; 6] = [
    LEAST_REQUEST,
    GPU_USAGE,
    LEAST_LATENCY,
    PREFIX_CACHE,
    RANDOM,
    SESSION_AFFINITY,
];

/// The reference router's hard-coded top-N: enough to get past a few dead
/// pods without making a client wait on every pod of a large ModelServer.
pub const DEFAULT_TOP_N: u32 = 5;
/// Upper bound on top-N: candidates are kept inline per request, without allocation.
pub const MAX_TOP_N: u32 = 16;
/// The reference's default bound of the least-request filter.
pub const DEFAULT_MAX_WAITING_REQUESTS: u32 = 10;
/// The reference's default: TTFT and TPOT weigh the same.
pub const DEFAULT_TTFT_TPOT_WEIGHT_FACTOR: f64 = 0.5;
/// The reference's block: 64 bytes of flattened prompt text (~16 tokens).
pub const DEFAULT_BLOCK_SIZE_TO_HASH: u32 = 64;
/// The reference's bound: 128 blocks = the first 8 KiB of prompt text.
pub const DEFAULT_MAX_BLOCKS_TO_MATCH: u32 = 128;
/// The reference's per-pod LRU size, used here as the per-dataplane total.
pub const DEFAULT_MAX_HASH_CACHE_SIZE: u32 = 50_000;
/// Leading blocks (1 KiB at the default block size) that choose a pod by
/// rendezvous hashing: long enough to tell apart system prompts that share a
/// short preamble, short enough that the requests of one conversation or one
/// system prompt agree on it.
pub const DEFAULT_AFFINITY_BLOCKS: u32 = 16;
/// Consistent hashing with bounded loads (Mirrokni et al.): 1.25 keeps cache
/// affinity for most requests while no pod takes more than 25% over the mean.
pub const DEFAULT_LOAD_BOUND_FACTOR: f64 = 1.25;
/// Header read by session-affinity unless configured otherwise.
pub const DEFAULT_SESSION_HEADER: &str = "x-session-id";
/// Engine loads are scraped every second; five missed scrapes mean the
/// controller or the pod is in trouble and the numbers describe the past.
pub const DEFAULT_MAX_LOAD_AGE_MS: u64 = 5_000;

/// Bounds that keep a prompt's hashing cheap on the request path.
const MAX_BLOCK_SIZE_TO_HASH: u32 = 65_536;
const MAX_BLOCKS_TO_MATCH: u32 = 1_024;

/// Why a scheduler configuration is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedulerConfigError {
    #[error("unknown filter plugin {0:?} (known: {known})", known = FILTER_PLUGINS.join(", "))]
    UnknownFilter(String),
    #[error("unknown score plugin {0:?} (known: {known})", known = SCORE_PLUGINS.join(", "))]
    UnknownScore(String),
    #[error("plugin {0:?} is listed twice")]
    Duplicate(String),
    #[error("no score plugin is enabled: every pod would score the same")]
    NoScorePlugin,
    #[error("topN {0} is out of range 1..={MAX_TOP_N}")]
    TopN(u32),
    #[error("least-latency TTFTTPOTWeightFactor {0} must be a number in 0..=1")]
    WeightFactor(f64),
    #[error("prefix-cache blockSizeToHash {0} is out of range 1..={MAX_BLOCK_SIZE_TO_HASH}")]
    BlockSize(u32),
    #[error("prefix-cache maxBlocksToMatch {0} is out of range 1..={MAX_BLOCKS_TO_MATCH}")]
    MaxBlocks(u32),
    #[error("loadBoundFactor {0} must be a finite number >= 1")]
    LoadBound(f64),
    #[error("session-affinity header {0:?} is not a valid lower-case HTTP header name")]
    SessionHeader(String),
}

/// Weight of prefix-cache in the default mix. The reference chart weighs
/// every plugin 1, which lets one extra in-flight request on the pod holding
/// a prefix (least-request 100 -> 0) cancel the cache hit. Here prefix-cache
/// already scores 0 on pods over the load bound, so it can outweigh
/// least-request without piling onto a hot pod.
pub const DEFAULT_PREFIX_CACHE_WEIGHT: u32 = 2;

/// The configuration used when the router configuration has no scheduler
/// section: the reference's Helm chart default (filter least-request; score
/// least-request, gpu-usage, least-latency, prefix-cache), with prefix-cache
/// weighted [`DEFAULT_PREFIX_CACHE_WEIGHT`].
pub fn default_config() -> pb::SchedulerConfig {
    pb::SchedulerConfig {
        filters: vec![LEAST_REQUEST.to_owned()],
        scores: [
            (LEAST_REQUEST, 1),
            (GPU_USAGE, 1),
            (LEAST_LATENCY, 1),
            (PREFIX_CACHE, DEFAULT_PREFIX_CACHE_WEIGHT),
        ]
        .iter()
        .map(|(name, weight)| pb::ScorePlugin {
            name: (*name).to_owned(),
            weight: *weight,
        })
        .collect(),
        top_n: DEFAULT_TOP_N,
        args: Some(default_args()),
    }
}

/// Every argument at its default.
pub fn default_args() -> pb::PluginArgs {
    pb::PluginArgs {
        max_waiting_requests: DEFAULT_MAX_WAITING_REQUESTS,
        ttft_tpot_weight_factor: DEFAULT_TTFT_TPOT_WEIGHT_FACTOR,
        block_size_to_hash: DEFAULT_BLOCK_SIZE_TO_HASH,
        max_blocks_to_match: DEFAULT_MAX_BLOCKS_TO_MATCH,
        max_hash_cache_size: DEFAULT_MAX_HASH_CACHE_SIZE,
        affinity_blocks: DEFAULT_AFFINITY_BLOCKS,
        load_bound_factor: DEFAULT_LOAD_BOUND_FACTOR,
        session_header: DEFAULT_SESSION_HEADER.to_owned(),
        max_load_age_ms: DEFAULT_MAX_LOAD_AGE_MS,
    }
}

/// `args` with every unset (zero / empty) field at its default.
pub fn effective_args(args: Option<&pb::PluginArgs>) -> pb::PluginArgs {
    let defaults = default_args();
    let Some(args) = args else {
        return defaults;
    };
    let or = |value: u32, default: u32| if value == 0 { default } else { value };
    pb::PluginArgs {
        max_waiting_requests: or(args.max_waiting_requests, defaults.max_waiting_requests),
        // 0 is a meaningful factor (TPOT only), so only a missing args message defaults it.
        ttft_tpot_weight_factor: args.ttft_tpot_weight_factor,
        block_size_to_hash: or(args.block_size_to_hash, defaults.block_size_to_hash),
        max_blocks_to_match: or(args.max_blocks_to_match, defaults.max_blocks_to_match),
        max_hash_cache_size: or(args.max_hash_cache_size, defaults.max_hash_cache_size),
        affinity_blocks: or(args.affinity_blocks, defaults.affinity_blocks),
        load_bound_factor: if args.load_bound_factor == 0.0 {
            defaults.load_bound_factor
        } else {
            args.load_bound_factor
        },
        session_header: if args.session_header.is_empty() {
            defaults.session_header
        } else {
            args.session_header.clone()
        },
        max_load_age_ms: if args.max_load_age_ms == 0 {
            defaults.max_load_age_ms
        } else {
            args.max_load_age_ms
        },
    }
}

/// `top_n`, defaulted.
pub fn effective_top_n(config: &pb::SchedulerConfig) -> u32 {
    if config.top_n == 0 {
        DEFAULT_TOP_N
    } else {
        config.top_n
    }
}

/// Checks names, duplicates and argument ranges.
pub fn validate(config: &pb::SchedulerConfig) -> Result<(), SchedulerConfigError> {
    for (index, name) in config.filters.iter().enumerate() {
        if !FILTER_PLUGINS.contains(&name.as_str()) {
            return Err(SchedulerConfigError::UnknownFilter(name.clone()));
        }
        if config.filters[..index].contains(name) {
            return Err(SchedulerConfigError::Duplicate(name.clone()));
        }
    }
    for (index, plugin) in config.scores.iter().enumerate() {
        if !SCORE_PLUGINS.contains(&plugin.name.as_str()) {
            return Err(SchedulerConfigError::UnknownScore(plugin.name.clone()));
        }
        if config.scores[..index].iter().any(|p| p.name == plugin.name) {
            return Err(SchedulerConfigError::Duplicate(plugin.name.clone()));
        }
    }
    if config.scores.is_empty() {
        return Err(SchedulerConfigError::NoScorePlugin);
    }
    let top_n = effective_top_n(config);
    if top_n > MAX_TOP_N {
        return Err(SchedulerConfigError::TopN(top_n));
    }
    let args = effective_args(config.args.as_ref());
    let factor = args.ttft_tpot_weight_factor;
    if !(0.0..=1.0).contains(&factor) {
        return Err(SchedulerConfigError::WeightFactor(factor));
    }
    if args.block_size_to_hash > MAX_BLOCK_SIZE_TO_HASH {
        return Err(SchedulerConfigError::BlockSize(args.block_size_to_hash));
    }
    if args.max_blocks_to_match > MAX_BLOCKS_TO_MATCH {
        return Err(SchedulerConfigError::MaxBlocks(args.max_blocks_to_match));
    }
    if !args.load_bound_factor.is_finite() || args.load_bound_factor < 1.0 {
        return Err(SchedulerConfigError::LoadBound(args.load_bound_factor));
    }
    let header_ok = args
        .session_header
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !header_ok {
        return Err(SchedulerConfigError::SessionHeader(args.session_header));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        assert_eq!(validate(&default_config()), Ok(()));
    }

    #[test]
    fn rejects_what_cannot_work() {
        let with = |edit: &dyn Fn(&mut pb::SchedulerConfig)| {
            let mut config = default_config();
            edit(&mut config);
            validate(&config).expect_err("invalid").to_string()
        };
        assert!(with(&|c| c.filters.push("kvcache-aware".into())).contains("unknown filter"));
        assert!(
            with(&|c| c.scores[0].name = "fastest".into())
                .contains("unknown score plugin \"fastest\"")
        );
        assert!(with(&|c| c.scores.clear()).contains("no score plugin"));
        assert!(with(&|c| c.filters.push(LEAST_REQUEST.into())).contains("listed twice"));
        assert!(with(&|c| c.top_n = 17).contains("topN 17"));
        let with_args = |edit: &dyn Fn(&mut pb::PluginArgs)| {
            with(&|c| {
                let mut args = default_args();
                edit(&mut args);
                c.args = Some(args);
            })
        };
        assert!(with_args(&|a| a.ttft_tpot_weight_factor = 1.5).contains("TTFTTPOTWeightFactor"));
        assert!(
            with_args(&|a| a.ttft_tpot_weight_factor = f64::NAN).contains("TTFTTPOTWeightFactor")
        );
        assert!(with_args(&|a| a.load_bound_factor = 0.5).contains("loadBoundFactor"));
        assert!(with_args(&|a| a.session_header = "X Session".into()).contains("header"));
        assert!(with_args(&|a| a.max_blocks_to_match = 5000).contains("maxBlocksToMatch"));
    }

    #[test]
    fn unset_arguments_take_defaults() {
        let args = effective_args(Some(&pb::PluginArgs {
            max_waiting_requests: 3,
            ..Default::default()
        }));
        assert_eq!(args.max_waiting_requests, 3);
        assert_eq!(args.block_size_to_hash, DEFAULT_BLOCK_SIZE_TO_HASH);
        assert_eq!(args.session_header, DEFAULT_SESSION_HEADER);
        assert_eq!(args.load_bound_factor, DEFAULT_LOAD_BOUND_FACTOR);
    }
}
