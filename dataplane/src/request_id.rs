//! Request ids: the client's when it is a sane one, else one the router
//! generates.
//!
//! A client's `x-request-id` is kept only when it is at most
//! [`MAX_REQUEST_ID_BYTES`] of visible ASCII: the id is echoed to the engine,
//! the client, the access log and the decision ring, so an unbounded or
//! binary one would be amplified everywhere. Any other is replaced by a
//! generated id, and the replacement is logged.
//!
//! A UUID v4 per request costs a `getrandom` system call and a formatted
//! `String`. An id only has to be unique, not unpredictable, so this one is a
//! random per-process prefix (unique across replicas and restarts with
//! overwhelming probability) followed by a counter. It keeps the UUID shape
//! clients and log tooling expect: 36 characters, 8-4-4-4-12 lowercase hex,
//! stamped as an RFC 9562 version 8 ("custom") UUID.
//!
//! Each thread takes a block of counter values at a time, so requests do not
//! all contend on one shared atomic.

use std::cell::Cell;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;
use http::header::HeaderName;

/// The header carrying a request's id, from the client to the engine and back.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client request id kept: UUIDs (36), ULIDs (26), W3C trace ids
/// (32) and the ids of common gateways all fit with room to spare.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// What the client sent as its request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRequestId {
    /// None, or an empty one.
    Absent,
    /// A sane id, to keep.
    Kept(HeaderValue),
    /// Too long or not visible ASCII: to replace; `len` is its length.
    Refused { len: usize },
}

impl ClientRequestId {
    /// The `x-request-id` of `headers`, judged.
    pub fn of(headers: &http::HeaderMap) -> Self {
        match headers.get(REQUEST_ID_HEADER) {
            None => Self::Absent,
            Some(id) if id.is_empty() => Self::Absent,
            Some(id) if is_sane(id.as_bytes()) => Self::Kept(id.clone()),
            Some(id) => Self::Refused { len: id.len() },
        }
    }

    /// The id the request goes by: the client's if kept, else a fresh one
    /// (a refused id's replacement is logged).
    pub fn or_generate(self) -> HeaderValue {
        match self {
            Self::Kept(id) => id,
            Self::Absent => generate(),
            Self::Refused { len } => {
                let id = generate();
                tracing::info!(
                    replacement = ?id,
                    client_id_bytes = len,
                    "x-request-id replaced: longer than {MAX_REQUEST_ID_BYTES} bytes or not visible ASCII"
                );
                id
            }
        }
    }
}

/// At most [`MAX_REQUEST_ID_BYTES`] of visible ASCII (no spaces, no controls).
fn is_sane(id: &[u8]) -> bool {
    id.len() <= MAX_REQUEST_ID_BYTES && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// Counter values a thread reserves at once: large enough that the shared
/// atomic is touched once per thousands of requests, small enough that ids
/// stay roughly ordered across the runtime's worker threads.
const COUNTER_BLOCK: u64 = 4096;

/// Bits of the counter in an id (the low 64 bits of the UUID less its 2
/// variant bits): 2^62 ids per process, which no process lives to use up.
const COUNTER_BITS: u32 = 62;

/// The per-process random half of every id, drawn once.
static PROCESS_PREFIX: LazyLock<u64> = LazyLock::new(rand::random);

/// Next block of counter values to hand to a thread.
static NEXT_BLOCK: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// (next value, end of this thread's block).
    static BLOCK: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

fn next_counter() -> u64 {
    BLOCK.with(|block| {
        let (mut next, mut end) = block.get();
        if next == end {
            next = NEXT_BLOCK.fetch_add(COUNTER_BLOCK, Ordering::Relaxed);
            end = next + COUNTER_BLOCK;
        }
        block.set((next + 1, end));
        next
    })
}

/// A fresh id for a request that came without one.
pub fn generate() -> HeaderValue {
    let prefix = *PROCESS_PREFIX;
    let counter = next_counter() & ((1 << COUNTER_BITS) - 1);
    // Version 8 in bits 48..52, variant 0b10 in bits 64..66 (RFC 9562 §5.8).
    let high = (prefix & !0xf000) | 0x8000;
    let low = counter | (0b10 << COUNTER_BITS);
    let text = hyphenated((u128::from(high) << 64) | u128::from(low));
    // Hex digits and dashes are always a valid header value.
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("invalid-id"))
}

/// `id` as a UUID's text: 32 lowercase hex digits in groups of 8-4-4-4-12.
fn hyphenated(id: u128) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [b'-'; 36];
    let mut at = 0;
    for (index, byte) in id.to_be_bytes().into_iter().enumerate() {
        // The dashes of 8-4-4-4-12.
        if matches!(index, 4 | 6 | 8 | 10) {
            at += 1;
        }
        text[at] = HEX[usize::from(byte >> 4)];
        text[at + 1] = HEX[usize::from(byte & 0xf)];
        at += 2;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn judged(value: &[u8]) -> ClientRequestId {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            REQUEST_ID_HEADER,
            HeaderValue::from_bytes(value).expect("header value"),
        );
        ClientRequestId::of(&headers)
    }

    #[test]
    fn sane_client_ids_are_kept_and_others_replaced() {
        assert_eq!(
            judged(b"req-42_ab.cd:ef"),
            ClientRequestId::Kept(HeaderValue::from_static("req-42_ab.cd:ef"))
        );
        let longest = vec![b'a'; MAX_REQUEST_ID_BYTES];
        assert!(matches!(judged(&longest), ClientRequestId::Kept(_)));
        for refused in [
            vec![b'a'; MAX_REQUEST_ID_BYTES + 1],
            vec![b'a'; 200_000],
            b"has space".to_vec(),
            b"tab\there".to_vec(),
            "caf\u{e9}".as_bytes().to_vec(),
            vec![0xff, 0xfe],
        ] {
            let judged = judged(&refused);
            assert_eq!(judged, ClientRequestId::Refused { len: refused.len() });
            let id = judged.or_generate();
            assert_eq!(id.len(), 36, "a generated id replaces it");
        }
        assert_eq!(
            ClientRequestId::of(&http::HeaderMap::new()),
            ClientRequestId::Absent
        );
        assert_eq!(judged(b""), ClientRequestId::Absent);
    }

    #[test]
    fn ids_are_written_as_uuids_are() {
        for id in [0, u128::MAX, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210] {
            assert_eq!(
                std::str::from_utf8(&hyphenated(id)).expect("ascii"),
                uuid::Uuid::from_u128(id).hyphenated().to_string()
            );
        }
    }

    #[test]
    fn ids_are_uuid_shaped_version_8_and_unique_across_threads() {
        let ids: Vec<String> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..(COUNTER_BLOCK + 10))
                            .map(|_| generate().to_str().expect("ascii").to_owned())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|worker| worker.join().expect("worker"))
                .collect()
        });
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "every id is distinct");
        for id in &ids {
            let parsed = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(parsed.get_version_num(), 8, "{id}");
            assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{id}");
            assert_eq!(id.len(), 36);
            assert_eq!(id, &id.to_lowercase());
        }
        // One process, one prefix: the first 16 hex digits are shared.
        let prefix = &ids[0][..18];
        assert!(ids.iter().all(|id| id.starts_with(prefix)), "{prefix}");
    }
}
