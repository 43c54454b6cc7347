//! `prefix-cache`: a scorer preferring the pod most likely to hold the
//! prompt's prefix in its KV cache, consistently across dataplane replicas
//! (rendezvous hashing of the leading blocks, with bounded load), until that
//! pod is saturated.

use serde::Deserialize;

use super::{PluginArgs, PluginSpec, check_load_bound_factor, parse_yaml_args};
use crate::pb;

pub const NAME: &str = "prefix-cache";

pub const SPEC: PluginSpec = PluginSpec::scorer(NAME).with_args::<pb::PrefixCacheArgs>();

/// Kthena's block: 64 bytes of flattened prompt text (~16 tokens).
pub const DEFAULT_BLOCK_SIZE_TO_HASH: u32 = 64;
/// Kthena's bound: 128 blocks = the first 8 KiB of prompt text.
pub const DEFAULT_MAX_BLOCKS_TO_MATCH: u32 = 128;
/// Kthena's per-pod LRU size, used here as the per-dataplane total.
pub const DEFAULT_MAX_HASH_CACHE_SIZE: u32 = 50_000;
/// Leading blocks (1 KiB at the default block size) that choose a pod by
/// rendezvous hashing: long enough to tell apart system prompts that share a
/// short preamble, short enough that the requests of one conversation or one
/// system prompt agree on it.
pub const DEFAULT_AFFINITY_BLOCKS: u32 = 16;
/// Bound on how many more prefix groups than the mean a pod is made home to
/// (and, for pods without fresh engine load, requests in flight): tighter
/// than the session-affinity default because placing a group that has no
/// cache yet costs nothing. With few groups the bound is coarse (the group
/// count it allows is rounded down, never below an even split): with 16
/// groups on two pods, 1.1 splits them 8/8, 1.25 allows 10/6.
pub const DEFAULT_LOAD_BOUND_FACTOR: f64 = 1.1;
/// Pods that get a match score at most: Kthena's default
/// `topKMatches`, which this build does not make configurable.
pub const TOP_K_MATCHES: u32 = 5;

/// Bounds that keep a prompt's hashing cheap on the request path.
const MAX_BLOCK_SIZE_TO_HASH: u32 = 65_536;
const MAX_BLOCKS_TO_MATCH: u32 = 1_024;

/// `pluginConfig[].args` as users write them; 0 keeps a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct YamlArgs {
    block_size_to_hash: Option<u32>,
    max_blocks_to_match: Option<u32>,
    max_hash_cache_size: Option<u32>,
    /// Accepted for compatibility with Kthena's files; see [`TOP_K_MATCHES`].
    top_k_matches: Option<u32>,
    affinity_blocks: Option<u32>,
    load_bound_factor: Option<f64>,
}

impl PluginArgs for pb::PrefixCacheArgs {
    variant_conversions!(PrefixCache);

    fn resolved(&self) -> Self {
        Self {
            block_size_to_hash: Some(
                self.block_size_to_hash
                    .unwrap_or(DEFAULT_BLOCK_SIZE_TO_HASH),
            ),
            max_blocks_to_match: Some(
                self.max_blocks_to_match
                    .unwrap_or(DEFAULT_MAX_BLOCKS_TO_MATCH),
            ),
            max_hash_cache_size: Some(
                self.max_hash_cache_size
                    .unwrap_or(DEFAULT_MAX_HASH_CACHE_SIZE),
            ),
            affinity_blocks: Some(self.affinity_blocks.unwrap_or(DEFAULT_AFFINITY_BLOCKS)),
            load_bound_factor: Some(self.load_bound_factor.unwrap_or(DEFAULT_LOAD_BOUND_FACTOR)),
        }
    }

    fn validate(&self) -> Result<(), String> {
        let in_range = |value: Option<u32>, max: u32| value.is_none_or(|v| (1..=max).contains(&v));
        if !in_range(self.block_size_to_hash, MAX_BLOCK_SIZE_TO_HASH) {
            return Err(format!(
                "blockSizeToHash {} is out of range 1..={MAX_BLOCK_SIZE_TO_HASH}",
                self.block_size_to_hash.unwrap_or_default()
            ));
        }
        if !in_range(self.max_blocks_to_match, MAX_BLOCKS_TO_MATCH) {
            return Err(format!(
                "maxBlocksToMatch {} is out of range 1..={MAX_BLOCKS_TO_MATCH}",
                self.max_blocks_to_match.unwrap_or_default()
            ));
        }
        if self.max_hash_cache_size == Some(0) {
            return Err("maxHashCacheSize must be at least 1".to_owned());
        }
        if self.affinity_blocks == Some(0) {
            return Err("affinityBlocks must be at least 1".to_owned());
        }
        self.load_bound_factor
            .map_or(Ok(()), check_load_bound_factor)
    }

    fn merge_yaml(
        &mut self,
        yaml: &serde_yaml::Value,
        warnings: &mut Vec<String>,
    ) -> Result<(), String> {
        let args: YamlArgs = parse_yaml_args(yaml)?;
        let positive = |value: Option<u32>| value.filter(|v| *v > 0);
        let merge = |slot: &mut Option<u32>, value: Option<u32>| {
            if let Some(value) = positive(value) {
                *slot = Some(value);
            }
        };
        merge(&mut self.block_size_to_hash, args.block_size_to_hash);
        merge(&mut self.max_blocks_to_match, args.max_blocks_to_match);
        merge(&mut self.max_hash_cache_size, args.max_hash_cache_size);
        merge(&mut self.affinity_blocks, args.affinity_blocks);
        self.load_bound_factor = args.load_bound_factor.or(self.load_bound_factor);
        if let Some(top_k) = positive(args.top_k_matches).filter(|k| *k != TOP_K_MATCHES) {
            warnings.push(format!(
                "prefix-cache topKMatches {top_k} ignored: the {TOP_K_MATCHES} pods found first holding a prefix score"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{parsed, rejection, with_args};
    use super::*;

    #[test]
    fn parses_every_argument_and_zero_keeps_the_default() {
        let (args, warnings) = parsed::<pb::PrefixCacheArgs>(
            "{blockSizeToHash: 32, maxBlocksToMatch: 0, maxHashCacheSize: 100, affinityBlocks: 4, loadBoundFactor: 1.5, topKMatches: 5}",
        )
        .expect("valid");
        assert_eq!(
            args,
            pb::PrefixCacheArgs {
                block_size_to_hash: Some(32),
                max_blocks_to_match: Some(DEFAULT_MAX_BLOCKS_TO_MATCH),
                max_hash_cache_size: Some(100),
                affinity_blocks: Some(4),
                load_bound_factor: Some(1.5),
            }
        );
        assert!(
            warnings.is_empty(),
            "topKMatches 5 is what runs: {warnings:?}"
        );
        let (_, warnings) = parsed::<pb::PrefixCacheArgs>("topKMatches: 8").expect("valid");
        assert_eq!(
            warnings.len(),
            1,
            "a value that is not acted on is reported"
        );
        assert!(
            warnings[0].contains("topKMatches 8 ignored"),
            "{warnings:?}"
        );
    }

    #[test]
    fn defaults_are_kthenas_plus_affinity() {
        assert_eq!(
            pb::PrefixCacheArgs::default().resolved(),
            pb::PrefixCacheArgs {
                block_size_to_hash: Some(64),
                max_blocks_to_match: Some(128),
                max_hash_cache_size: Some(50_000),
                affinity_blocks: Some(16),
                load_bound_factor: Some(1.1),
            }
        );
    }

    #[test]
    fn out_of_range_arguments_are_rejected_with_their_name() {
        let cases = [
            (
                pb::PrefixCacheArgs {
                    block_size_to_hash: Some(70_000),
                    ..Default::default()
                },
                "prefix-cache blockSizeToHash 70000 is out of range 1..=65536",
            ),
            (
                pb::PrefixCacheArgs {
                    max_blocks_to_match: Some(5_000),
                    ..Default::default()
                },
                "prefix-cache maxBlocksToMatch 5000 is out of range 1..=1024",
            ),
            (
                pb::PrefixCacheArgs {
                    max_hash_cache_size: Some(0),
                    ..Default::default()
                },
                "prefix-cache maxHashCacheSize must be at least 1",
            ),
            (
                pb::PrefixCacheArgs {
                    affinity_blocks: Some(0),
                    ..Default::default()
                },
                "prefix-cache affinityBlocks must be at least 1",
            ),
            (
                pb::PrefixCacheArgs {
                    load_bound_factor: Some(0.5),
                    ..Default::default()
                },
                "prefix-cache loadBoundFactor 0.5 must be a finite number >= 1",
            ),
        ];
        for (args, expected) in cases {
            assert_eq!(rejection(&with_args(args)), expected);
        }
    }
}
