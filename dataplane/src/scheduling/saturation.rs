//! When a pod is saturated: one more request there would wait longer than
//! it is worth keeping it with its prefix. Affinity keeps a prefix on its pod
//! until then, so this is decided by the engine's own signals, not by how
//! many requests happen to be in flight (two concurrent requests of one
//! prefix are normal, and an engine batches them).

use crate::pod::figures::EngineFigures;

/// Requests waiting at the engine, as a share of those running, at which a
/// pod is saturated (and at least one). A short queue drains within a step or
/// two as sequences finish, while sending the request to a pod without its
/// prefix costs a whole prefill there, which also slows that pod's batch;
/// spilling on every momentary queue turns one busy pod into several (a
/// cascade the scheduling-quality benchmark showed). A queue half as long as
/// the batch is a backlog.
pub const SATURATED_QUEUE_SHARE: f64 = 0.5;

/// KV-cache usage at which a pod whose cache size is unknown is saturated:
/// the blocks left would not hold a typical prompt, so the next one waits or
/// preempts a running request.
pub const SATURATED_KV_USAGE: f64 = 0.9;

/// Prompt bytes per token, to size a request from its text without a
/// tokenizer: about 4 for English text with the common BPE vocabularies.
pub const BYTES_PER_TOKEN: f64 = 4.0;

/// What a pod's engine `load` (fresh, if any) says about one more request of
/// `request_tokens` tokens: `Some(true)` if it is saturated, `None` if there
/// is no engine load to judge by (callers then fall back on in-flight counts).
///
/// Saturated means the engine has a backlog (`waiting` >= `running` x
/// [`SATURATED_QUEUE_SHARE`], and at least 1), or its KV cache cannot hold
/// the request: the tokens in use plus the request's exceed the cache size.
/// Without a known cache size, usage at [`SATURATED_KV_USAGE`] counts as
/// full. The engine's usage counts a prefix shared by running requests once,
/// which this dataplane's in-flight count cannot: many requests of one
/// prefix in flight are the case affinity exists for, not a full cache.
pub fn is_saturated(load: Option<&EngineFigures>, request_tokens: f64) -> Option<bool> {
    load.map(|load| engine_is_saturated(load, request_tokens))
}

fn engine_is_saturated(load: &EngineFigures, request_tokens: f64) -> bool {
    let backlog = (load.requests_running * SATURATED_QUEUE_SHARE).max(1.0);
    if load.requests_waiting >= backlog {
        return true;
    }
    let usage = load.kv_cache_usage.clamp(0.0, 1.0);
    let capacity = load.kv_cache_capacity_tokens as f64;
    if capacity > 0.0 {
        usage * capacity + request_tokens > capacity
    } else {
        usage >= SATURATED_KV_USAGE
    }
}

/// Tokens of a prompt of `blocks` hashed blocks of `block_bytes` bytes.
pub fn request_tokens(blocks: usize, block_bytes: usize) -> f64 {
    (blocks * block_bytes) as f64 / BYTES_PER_TOKEN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(waiting: f64, usage: f64, capacity: u64) -> EngineFigures {
        EngineFigures {
            requests_waiting: waiting,
            kv_cache_usage: usage,
            kv_cache_capacity_tokens: capacity,
            observed_at_unix_ms: 1,
            ..Default::default()
        }
    }

    #[test]
    fn an_engine_with_room_and_no_queue_is_not_saturated() {
        assert_eq!(
            is_saturated(Some(&engine(0.0, 0.3, 4096)), 300.0),
            Some(false),
            "2,867 tokens free hold 300"
        );
    }

    #[test]
    fn a_queue_or_a_full_cache_saturates() {
        // (waiting, usage, capacity, tokens needed, saturated, why)
        for (waiting, usage, capacity, needed, saturated, why) in [
            (1.0, 0.0, 4096, 300.0, true, "a queue"),
            (
                0.0,
                0.95,
                4096,
                300.0,
                true,
                "205 free tokens do not hold 300",
            ),
            (0.0, 0.95, 4096, 100.0, false, "205 free tokens hold 100"),
            (
                0.0,
                0.95,
                0,
                100.0,
                true,
                "unknown capacity: 90% usage is full",
            ),
            (0.0, 0.5, 0, 100.0, false, "unknown capacity, half used"),
        ] {
            let engine = engine(waiting, usage, capacity);
            assert_eq!(
                is_saturated(Some(&engine), needed),
                Some(saturated),
                "{why}"
            );
        }
    }

    #[test]
    fn a_short_queue_behind_a_full_batch_is_not_yet_a_backlog() {
        let batch = |running: f64, waiting: f64| {
            let load = EngineFigures {
                requests_running: running,
                requests_waiting: waiting,
                kv_cache_capacity_tokens: 8192,
                observed_at_unix_ms: 1,
                ..Default::default()
            };
            is_saturated(Some(&load), 300.0)
        };
        assert_eq!(batch(8.0, 3.0), Some(false));
        assert_eq!(batch(8.0, 4.0), Some(true), "half the batch waits");
        assert_eq!(
            batch(1.0, 1.0),
            Some(true),
            "one waiting is a backlog for a batch of 1"
        );
    }

    #[test]
    fn no_fresh_engine_load_is_no_verdict() {
        assert_eq!(is_saturated(None, 300.0), None);
    }

    #[test]
    fn request_size_from_its_hashed_blocks() {
        assert_eq!(request_tokens(18, 64), 288.0);
    }
}
