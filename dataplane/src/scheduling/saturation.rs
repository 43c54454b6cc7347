//! When a pod is saturated: it cannot start one more request without making
//! it wait. Affinity keeps a prefix on its pod until then, so this is decided
//! by the engine's own signals, not by how many requests happen to be in
//! flight (two concurrent requests of one prefix are normal, and an engine
//! batches them).

use switchyard_snapshot::pb;

use super::plugins::Candidate;

/// Engine `waiting` at which a pod is saturated: the engine already holds a
/// request it could not start (its batch or its KV cache is full).
pub const SATURATED_WAITING: f64 = 1.0;

/// KV-cache usage at which a pod whose cache size is unknown is saturated:
/// the blocks left would not hold a typical prompt, so the next one waits or
/// preempts a running request.
pub const SATURATED_KV_USAGE: f64 = 0.9;

/// Prompt bytes per token, to size a request from its text without a
/// tokenizer: about 4 for English text with the common BPE vocabularies.
pub const BYTES_PER_TOKEN: f64 = 4.0;

/// What the pod's engine says about one more request of `request_tokens`
/// tokens: `Some(true)` if it is saturated, `None` if there is no fresh engine
/// load to judge by (callers then fall back on in-flight counts).
///
/// Saturated means the engine queues (`waiting` >= [`SATURATED_WAITING`]), or
/// its KV cache cannot hold the request: the tokens in use (the larger of the
/// engine's reported usage and this dataplane's in-flight requests at this
/// request's size, which is current where the scrape is up to a second old)
/// plus the request's exceed the cache. Without a known cache size, usage at
/// [`SATURATED_KV_USAGE`] counts as full.
pub fn is_saturated(candidate: &Candidate, request_tokens: f64) -> Option<bool> {
    let load = candidate.load.as_deref()?;
    Some(engine_is_saturated(
        load,
        candidate.in_flight as f64 * request_tokens,
        request_tokens,
    ))
}

fn engine_is_saturated(
    load: &pb::EndpointLoad,
    in_flight_tokens: f64,
    request_tokens: f64,
) -> bool {
    if load.requests_waiting >= SATURATED_WAITING {
        return true;
    }
    let usage = load.kv_cache_usage.clamp(0.0, 1.0);
    let capacity = load.kv_cache_capacity_tokens as f64;
    if capacity > 0.0 {
        (usage * capacity).max(in_flight_tokens) + request_tokens > capacity
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
    use super::super::plugins::testing::candidate;
    use super::*;

    fn engine(waiting: f64, usage: f64, capacity: u64) -> Option<pb::EndpointLoad> {
        Some(pb::EndpointLoad {
            requests_waiting: waiting,
            kv_cache_usage: usage,
            kv_cache_capacity_tokens: capacity,
            observed_at_unix_ms: 1,
            ..Default::default()
        })
    }

    #[test]
    fn concurrent_requests_alone_do_not_saturate_an_engine_with_room() {
        // 4096 tokens hold twelve 300-token requests.
        assert_eq!(
            is_saturated(&candidate(0, 4, engine(0.0, 0.3, 4096)), 300.0),
            Some(false)
        );
        assert_eq!(
            is_saturated(&candidate(0, 13, engine(0.0, 0.3, 4096)), 300.0),
            Some(true),
            "this dataplane's own requests fill the cache before the scrape shows it"
        );
    }

    #[test]
    fn a_queue_or_a_full_cache_saturates() {
        assert_eq!(
            is_saturated(&candidate(0, 0, engine(1.0, 0.0, 4096)), 300.0),
            Some(true)
        );
        assert_eq!(
            is_saturated(&candidate(0, 0, engine(0.0, 0.95, 4096)), 300.0),
            Some(true),
            "205 free tokens do not hold 300"
        );
        assert_eq!(
            is_saturated(&candidate(0, 0, engine(0.0, 0.95, 4096)), 100.0),
            Some(false)
        );
        assert_eq!(
            is_saturated(&candidate(0, 0, engine(0.0, 0.95, 0)), 100.0),
            Some(true),
            "unknown capacity: 90% usage is full"
        );
        assert_eq!(
            is_saturated(&candidate(0, 0, engine(0.0, 0.5, 0)), 100.0),
            Some(false)
        );
    }

    #[test]
    fn no_fresh_engine_load_is_no_verdict() {
        assert_eq!(is_saturated(&candidate(0, 50, None), 300.0), None);
    }

    #[test]
    fn request_size_from_its_hashed_blocks() {
        assert_eq!(request_tokens(18, 64), 288.0);
    }
}
