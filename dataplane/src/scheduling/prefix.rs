//! Prompt prefix hashing, the local index of where prefixes were sent (block
//! by block, and each prefix group's first choice), and the
//! deterministic choice (rendezvous hashing with bounded load) that lets
//! several dataplanes agree on a pod for a prefix without talking.
//!
//! A prompt (the `prompt` string, or chat `messages` flattened as
//! `role: content\n`) is cut into fixed blocks of bytes; block `i`'s hash is
//! seeded with block `i-1`'s, and block 0's with the model's, so one hash
//! names a whole prefix of one model.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::value::RawValue;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::sample::PoolIds;
use crate::chat_messages::{MessageVisitor, Role, walk_message};
use crate::json_members::{Refused, Scan};
use crate::request::PromptField;

/// Shards of the prefix index: requests for different prefixes rarely touch
/// the same lock; 64 keeps contention negligible on the largest nodes.
const INDEX_SHARDS: usize = 64;
/// Pods remembered per prefix block: a prefix spilled by the load bound
/// lives on a few pods; more would only keep stale owners.
const OWNERS_PER_BLOCK: usize = 4;
/// Distinct owners [`PrefixIndex::matches`] remembers having looked for
/// (a few cache lines on the stack; beyond them it just searches again).
const SEEN_OWNERS: usize = 32;
/// Pods that get a match score at most, as in the Kthena router (`topKMatches`).
pub const TOP_K_MATCHES: usize =
    switchyard_snapshot::scheduler::prefix_cache::TOP_K_MATCHES as usize;
/// Below this many requests a pod is never "overloaded": one engine step
/// batches many sequences, and without a floor the second concurrent request
/// of a prefix would leave its pod at almost no load.
pub const BOUNDED_LOAD_FLOOR: f64 = 2.0;
/// Shards of the per-pod lists of groups: a request reads the count of every
/// candidate, so no single lock is shared by all requests.
const GROUP_COUNT_SHARDS: usize = 16;

/// Chained block hashes of a prompt; appends to `out` (cleared first).
/// `raw` is the JSON of the request's prompt field, from a body already
/// checked to be UTF-8.
pub fn hash_prompt(
    model: &str,
    field: PromptField,
    raw: &[u8],
    block_size: usize,
    max_blocks: usize,
    out: &mut Vec<u64>,
) {
    SCRATCH.with_borrow_mut(|Scratch { pending, decoded }| {
        let seed = xxh3_64(model.as_bytes());
        let mut hasher = BlockHasher {
            block_size,
            max_blocks,
            pending,
            decoded,
            previous: seed,
            out,
        };
        hasher.restart(seed);
        match field {
            // The common shapes by a scan; anything else, from the
            // beginning again, by the general path.
            PromptField::Prompt => {
                if feed_prompt(raw, &mut hasher).is_err() {
                    hasher.restart(seed);
                    flatten_prompt(raw, &mut hasher);
                }
            }
            PromptField::Messages | PromptField::Input => {
                if feed_messages(raw, &mut hasher).is_err() {
                    // A string or a list of strings (the Responses API's
                    // `input`) reads as a prompt.
                    hasher.restart(seed);
                    if feed_prompt(raw, &mut hasher).is_err() {
                        hasher.restart(seed);
                        hash_messages_generally(raw, &mut hasher);
                    }
                }
            }
        }
        hasher.pending.clear();
        if hasher.decoded.capacity() > MAX_KEPT_DECODED_BYTES {
            *hasher.decoded = Vec::new();
        }
    });
}

/// What hashing a prompt writes down on the way, kept per thread so that it
/// allocates nothing once it has held a block and a decoded string.
#[derive(Default)]
struct Scratch {
    /// The start of a block whose end has not been fed yet.
    pending: Vec<u8>,
    /// The text of the string being fed when it has escapes.
    decoded: Vec<u8>,
}

/// A decoded string larger than this (a long prompt with escapes) is not
/// kept for the next request: that would hold the largest prompt ever seen
/// per thread; most prompts fit.
const MAX_KEPT_DECODED_BYTES: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Chat `messages` (or `input` messages) of any shape: each message read
/// whole, then each content decoded again ([`feed_text`]); not a list of
/// messages: flattened as a prompt.
fn hash_messages_generally(raw: &[u8], hasher: &mut BlockHasher<'_>) {
    if let Ok(messages) = serde_json::from_slice::<Vec<Message<'_>>>(raw) {
        for message in &messages {
            hasher.feed(message.role.as_bytes());
            hasher.feed(b": ");
            if let Some(content) = message.content {
                feed_text(content.get().as_bytes(), hasher);
            }
            hasher.feed(b"\n");
        }
    } else {
        flatten_prompt(raw, hasher);
    }
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Cow<'a, str>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// The common shapes of chat messages ([`crate::chat_messages`]), fed by a
/// scan that jumps over string bytes with memchr instead of building values
/// (a string with escapes is decoded into a reused buffer): a list of
/// messages whose `role` is a string or absent. Refuses every other shape,
/// which [`hash_messages_generally`] then reads; for the shapes this accepts
/// both feed the same bytes.
fn feed_messages(raw: &[u8], hasher: &mut BlockHasher<'_>) -> Result<(), Refused> {
    let mut scan = Scan::new(raw);
    scan.whitespace();
    scan.each_element(|message| {
        walk_message(message, hasher)?;
        hasher.feed(b"\n");
        Ok(())
    })?;
    scan.end()
}

/// A message fed as `role: content`, the content's texts concatenated.
impl MessageVisitor for BlockHasher<'_> {
    const ROLE_BEFORE_TEXT: bool = true;

    fn role(&mut self, role: Role<'_, '_>) -> Result<(), Refused> {
        match role {
            Role::Text(role) => self.feed_string(role)?,
            // serde's default for a missing role: the empty string.
            Role::Absent => {}
            // serde refuses null for a string.
            Role::Null => return Err(Refused),
        }
        self.feed(b": ");
        Ok(())
    }

    fn text(&mut self, text: &mut Scan<'_>) -> Result<(), Refused> {
        self.feed_string(text)
    }
}

/// A JSON string, borrowed from the body unless it has escapes: serde's own
/// `Cow<str>` impl always copies, which for a 400 KB prompt is a 400 KB copy.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

#[derive(Deserialize)]
struct ContentPart<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

/// A completion prompt that is a string, or a list of strings (each
/// followed by a line break), fed by the scan. Refuses every other shape
/// (token ids, a value that does not start at `raw`'s first byte), which
/// [`flatten_prompt`] then reads; for the shapes this accepts both feed the
/// same bytes.
fn feed_prompt(raw: &[u8], hasher: &mut BlockHasher<'_>) -> Result<(), Refused> {
    let mut scan = Scan::new(raw);
    if scan.peek()? == b'[' {
        scan.each_element(|part| {
            hasher.feed_string(part)?;
            hasher.feed(b"\n");
            Ok(())
        })?;
    } else {
        hasher.feed_string(&mut scan)?;
    }
    scan.end()
}

/// A prompt of any shape: a list of strings, each followed by a line break;
/// else its text ([`feed_text`]).
fn flatten_prompt(raw: &[u8], hasher: &mut BlockHasher<'_>) {
    if let Ok(parts) = serde_json::from_slice::<Vec<Text<'_>>>(raw) {
        for Text(part) in parts {
            hasher.feed(part.as_bytes());
            hasher.feed(b"\n");
        }
    } else {
        feed_text(raw, hasher);
    }
}

/// A JSON value's text: strings decoded, text parts concatenated, anything else as its JSON.
fn feed_text(json: &[u8], hasher: &mut BlockHasher<'_>) {
    if json.starts_with(b"\"") {
        match serde_json::from_slice::<Text<'_>>(json) {
            Ok(Text(text)) => hasher.feed(text.as_bytes()),
            Err(_) => hasher.feed(json),
        }
    } else if let Ok(parts) = serde_json::from_slice::<Vec<ContentPart<'_>>>(json) {
        for text in parts.iter().filter_map(|part| part.text.as_deref()) {
            hasher.feed(text.as_bytes());
        }
    } else {
        hasher.feed(json);
    }
}

/// Cuts a byte stream into blocks and chains their hashes.
struct BlockHasher<'o> {
    block_size: usize,
    max_blocks: usize,
    pending: &'o mut Vec<u8>,
    /// Where the text of a string with escapes is decoded before it is fed.
    decoded: &'o mut Vec<u8>,
    previous: u64,
    out: &'o mut Vec<u64>,
}

impl BlockHasher<'_> {
    /// Feeds the text of the string at `scan`.
    fn feed_string(&mut self, scan: &mut Scan<'_>) -> Result<(), Refused> {
        // Out of `self` for the call: the text may borrow it while it is fed.
        let mut decoded = std::mem::take(self.decoded);
        let fed = scan.text(&mut decoded).map(|text| self.feed(text));
        *self.decoded = decoded;
        fed
    }

    /// Back to the first block, chained to `seed`.
    fn restart(&mut self, seed: u64) {
        self.pending.clear();
        self.out.clear();
        self.previous = seed;
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.out.len() < self.max_blocks {
            if self.pending.is_empty() && bytes.len() >= self.block_size {
                let (block, rest) = bytes.split_at(self.block_size);
                self.push(block);
                bytes = rest;
                continue;
            }
            let take = (self.block_size - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == self.block_size {
                self.previous = xxh3_64_with_seed(self.pending, self.previous);
                self.out.push(self.previous);
                self.pending.clear();
            }
        }
    }

    fn push(&mut self, block: &[u8]) {
        self.previous = xxh3_64_with_seed(block, self.previous);
        self.out.push(self.previous);
    }
}

/// Hashes are already uniformly distributed: use them as they are.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 << 8) | u64::from(*byte);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

type BlockMap = HashMap<u64, [u64; OWNERS_PER_BLOCK], BuildHasherDefault<IdentityHasher>>;
type GroupMap = HashMap<u64, u64, BuildHasherDefault<IdentityHasher>>;
/// Pod id -> the rendezvous weights of the groups that chose it first, ascending.
type WeightsByPod = HashMap<u64, Vec<u64>, BuildHasherDefault<IdentityHasher>>;

/// Where this dataplane recently sent each prefix block: block hash -> pod
/// ids, most recent first; and the first choice of each prefix group
/// ([`GroupTable`]).
/// Bounded: each shard keeps two generations and drops the older one when
/// the newer is full (an LRU approximation with O(1) upkeep and no per-entry
/// list).
#[derive(Debug)]
pub struct PrefixIndex {
    shards: Vec<Mutex<Shard>>,
    per_generation: usize,
    pub groups: GroupTable,
}

#[derive(Debug, Default)]
struct Shard {
    current: BlockMap,
    previous: BlockMap,
}

/// The prefix groups this dataplane has seen: group key (the hash that names
/// a prompt's leading blocks) -> its first choice, the pod with the highest
/// rendezvous weight for it when it was first seen; and, per pod, the
/// rendezvous weights of the groups that chose it first, sorted, so that a
/// pod chosen by more than its share of groups can keep those that weigh the
/// most for it and pass on the rest, the same ones on every dataplane that
/// has seen the same groups. Bounded and aged like the block index; a group
/// that ages out no longer counts.
#[derive(Debug)]
pub struct GroupTable {
    shards: Vec<Mutex<GroupShard>>,
    per_generation: usize,
    /// Sharded by pod id.
    chosen_by: Vec<Mutex<WeightsByPod>>,
}

#[derive(Debug, Default)]
struct GroupShard {
    current: GroupMap,
    previous: GroupMap,
}

/// Where one group stands with the pod it chose first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Standing {
    /// Groups that chose the pod first.
    pub groups: usize,
    /// Of those, the groups that weigh less for it than this one.
    pub lighter: usize,
}

impl GroupTable {
    /// A table of about `capacity` groups.
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..INDEX_SHARDS).map(|_| Mutex::default()).collect(),
            per_generation: (capacity / 2 / INDEX_SHARDS).max(1),
            chosen_by: (0..GROUP_COUNT_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, key: u64) -> &Mutex<GroupShard> {
        &self.shards[(key >> 58) as usize % INDEX_SHARDS]
    }

    fn chosen_by(&self, pod_id: u64) -> &Mutex<WeightsByPod> {
        // Pod ids are hashes: their low bits are uniform.
        &self.chosen_by[pod_id as usize % GROUP_COUNT_SHARDS]
    }

    /// The first choice of group `key`: the one recorded when the group was
    /// first seen, or `first_choice` for a group seen now for the first time
    /// (recorded). Keeps the group from ageing out while it is in use.
    pub fn observe(&self, key: u64, first_choice: u64) -> u64 {
        self.observe_with(key, || first_choice)
    }

    /// [`GroupTable::observe`] with the first choice computed only for a
    /// group not seen before: among many candidates it is a rendezvous
    /// weight per candidate, and most requests are of known groups.
    pub fn observe_with(&self, key: u64, first_choice: impl FnOnce() -> u64) -> u64 {
        let mut shard = self.shard(key).lock();
        if let Some(pod) = shard.current.get(&key) {
            return *pod;
        }
        let (pod, new) = match shard.previous.remove(&key) {
            Some(pod) => (pod, false),
            None => (first_choice(), true),
        };
        if shard.current.len() >= self.per_generation {
            let current = std::mem::take(&mut shard.current);
            let aged_out = std::mem::replace(&mut shard.previous, current);
            for (key, pod) in aged_out {
                self.forget(pod, rendezvous_weight(key, pod));
            }
        }
        shard.current.insert(key, pod);
        if new {
            let weight = rendezvous_weight(key, pod);
            let mut chosen_by = self.chosen_by(pod).lock();
            let weights = chosen_by.entry(pod).or_default();
            let at = weights.partition_point(|w| *w < weight);
            weights.insert(at, weight);
        }
        pod
    }

    fn forget(&self, pod_id: u64, weight: u64) {
        let mut chosen_by = self.chosen_by(pod_id).lock();
        if let Some(weights) = chosen_by.get_mut(&pod_id) {
            if let Ok(at) = weights.binary_search(&weight) {
                weights.remove(at);
            }
            if weights.is_empty() {
                chosen_by.remove(&pod_id);
            }
        }
    }

    /// The recorded first choice of group `key`, if the group is known
    /// (unlike [`GroupTable::observe`], records nothing).
    pub fn first_choice(&self, key: u64) -> Option<u64> {
        let shard = self.shard(key).lock();
        shard
            .current
            .get(&key)
            .or_else(|| shard.previous.get(&key))
            .copied()
    }

    /// Groups that chose `pod_id` first.
    pub fn chosen_by_count(&self, pod_id: u64) -> usize {
        self.chosen_by(pod_id)
            .lock()
            .get(&pod_id)
            .map_or(0, Vec::len)
    }

    /// Where group `key` stands with `pod_id`, the pod it chose first.
    pub fn standing(&self, key: u64, pod_id: u64) -> Standing {
        let weight = rendezvous_weight(key, pod_id);
        let chosen_by = self.chosen_by(pod_id).lock();
        let weights = chosen_by.get(&pod_id).map_or(&[][..], Vec::as_slice);
        Standing {
            groups: weights.len(),
            lighter: weights.partition_point(|w| *w < weight),
        }
    }
}

impl std::fmt::Debug for IdentityHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityHasher")
    }
}

/// The prefix index kept across snapshots, so a new snapshot does not forget
/// where prefixes went; rebuilt only when its configured size changes.
#[derive(Debug, Default)]
pub struct SharedPrefixIndex(Mutex<Option<(usize, Arc<PrefixIndex>)>>);

impl SharedPrefixIndex {
    /// The index of about `capacity` block hashes: the current one if it has
    /// that size, else a new, empty one that replaces it.
    pub fn get(&self, capacity: usize) -> Arc<PrefixIndex> {
        let mut slot = self.0.lock();
        match &*slot {
            Some((size, index)) if *size == capacity => index.clone(),
            _ => {
                let index = Arc::new(PrefixIndex::new(capacity));
                *slot = Some((capacity, index.clone()));
                index
            }
        }
    }
}

impl PrefixIndex {
    /// An index holding about `capacity` block hashes.
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..INDEX_SHARDS).map(|_| Mutex::default()).collect(),
            per_generation: (capacity / 2 / INDEX_SHARDS).max(1),
            groups: GroupTable::new(capacity),
        }
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        // The low bits pick the HashMap bucket; use high bits for the shard.
        &self.shards[(hash >> 58) as usize % INDEX_SHARDS]
    }

    /// Records that the prefix ending at each of `hashes` was sent to `pod_id`.
    pub fn record(&self, hashes: &[u64], pod_id: u64) {
        for &hash in hashes {
            let mut shard = self.shard(hash).lock();
            let mut owners = shard
                .current
                .get(&hash)
                .or_else(|| shard.previous.get(&hash))
                .copied()
                .unwrap_or([0; OWNERS_PER_BLOCK]);
            if owners[0] != pod_id {
                let position = owners
                    .iter()
                    .position(|owner| *owner == pod_id)
                    .unwrap_or(OWNERS_PER_BLOCK - 1);
                owners.copy_within(0..position, 1);
                owners[0] = pod_id;
            }
            if shard.current.len() >= self.per_generation && !shard.current.contains_key(&hash) {
                let full = std::mem::take(&mut shard.current);
                shard.previous = full;
            }
            shard.current.insert(hash, owners);
        }
    }

    /// For each pod in `pod_ids`, the number of leading blocks of `hashes` it
    /// was last seen holding (0 = none); at most [`TOP_K_MATCHES`] pods match.
    /// Walks from the longest prefix back, as the Kthena router does.
    pub fn matches(&self, hashes: &[u64], pod_ids: &[u64], out: &mut [usize]) {
        out.fill(0);
        self.each_match(
            hashes,
            pod_ids.len(),
            |owner| pod_ids.iter().position(|id| *id == owner),
            |slot, blocks| {
                let new = out[slot] == 0;
                if new {
                    out[slot] = blocks;
                }
                new
            },
        );
    }

    /// The pods of a pool of `pool_len` that [`PrefixIndex::matches`] gives
    /// a match, without a slot per pod: `position` finds an owner in the
    /// pool, `found(position, blocks)` records a match and says whether that
    /// pod had none yet. Among many pods, zeroing a slot per pod cost more
    /// than the rest of the search.
    pub fn each_match(
        &self,
        hashes: &[u64],
        pool_len: usize,
        position: impl Fn(u64) -> Option<usize>,
        mut found: impl FnMut(usize, usize) -> bool,
    ) {
        let mut count = 0;
        // Owners already looked for: the same pods hold most blocks of a
        // prompt, and among many pods each search costs. A pod seen at a
        // longer prefix keeps that match (or is not in the pool), so seeing
        // it again changes nothing.
        let mut seen = [0u64; SEEN_OWNERS];
        let mut seen_len = 0;
        for (index, &hash) in hashes.iter().enumerate().rev() {
            let owners = {
                let shard = self.shard(hash).lock();
                match shard
                    .current
                    .get(&hash)
                    .or_else(|| shard.previous.get(&hash))
                {
                    Some(owners) => *owners,
                    None => continue,
                }
            };
            for owner in owners.iter().filter(|owner| **owner != 0) {
                if seen[..seen_len].contains(owner) {
                    continue;
                }
                if seen_len < SEEN_OWNERS {
                    seen[seen_len] = *owner;
                    seen_len += 1;
                }
                if let Some(slot) = position(*owner)
                    && found(slot, index + 1)
                {
                    count += 1;
                }
            }
            if count >= TOP_K_MATCHES.min(pool_len) {
                return;
            }
        }
    }
}

/// Rendezvous (highest random weight) hashing: the weight of `pod_id` for
/// `key`; every dataplane computes the same.
pub fn rendezvous_weight(key: u64, pod_id: u64) -> u64 {
    // splitmix64 finaliser over the pair: cheap and well mixed.
    let mut z = key ^ pod_id.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Pods an affinity nominates for a sampled pick (see `sample`): its first
/// rendezvous choices, the one it goes to and those it falls back to when the
/// first is ejected, saturated or over its share; the sample then holds the
/// pod a pick among all candidates would choose unless that many in a row
/// are unavailable.
pub const RENDEZVOUS_NOMINEES: usize = 4;

/// Slots of the per-thread cache of [`nominate_rendezvous`]: prefix groups
/// and sessions in use at once on one worker before their nominees are
/// computed again (40 bytes a slot: 10 KiB per thread).
const RENDEZVOUS_CACHE_SLOTS: usize = 256;

/// A group's (or session's) nominees among one pod list, by position.
#[derive(Clone, Copy, Debug)]
struct CachedNominees {
    key: u64,
    /// The list's [`PoolIds::generation`]; 0 = empty slot (generations start at 1).
    generation: u64,
    positions: [u32; RENDEZVOUS_NOMINEES],
    len: u8,
}

const NO_NOMINEES: CachedNominees = CachedNominees {
    key: 0,
    generation: 0,
    positions: [0; RENDEZVOUS_NOMINEES],
    len: 0,
};

thread_local! {
    /// Per worker: no lock, and each worker's own traffic warms it.
    static RENDEZVOUS_CACHE: RefCell<[CachedNominees; RENDEZVOUS_CACHE_SLOTS]> =
        const { RefCell::new([NO_NOMINEES; RENDEZVOUS_CACHE_SLOTS]) };
}

/// Appends to `out` the positions in `pool` of the [`RENDEZVOUS_NOMINEES`]
/// pods with the highest rendezvous weight for `key`, best first.
///
/// That takes a weight per pod, the one pass over a large pool a sampled
/// pick had left (22,000 instructions among 1,000 pods). The answer depends
/// only on the key and the pod list, and the same few groups and sessions
/// come again and again, so when the list has a generation (a server's whole
/// pod list) each worker keeps the last answer per slot of a small
/// direct-mapped cache: a request of a group seen before reads it.
pub fn nominate_rendezvous(key: u64, pool: PoolIds<'_>, out: &mut Vec<usize>) {
    let Some(generation) = pool.generation() else {
        top_rendezvous(key, pool.ids(), out);
        return;
    };
    // Keys are hashes; the generation is mixed in so that two servers'
    // lists do not always evict each other's entries for one key.
    let slot =
        (key ^ generation.wrapping_mul(0x9e37_79b9_7f4a_7c15)) as usize % RENDEZVOUS_CACHE_SLOTS;
    RENDEZVOUS_CACHE.with(|cache| {
        let Ok(mut cache) = cache.try_borrow_mut() else {
            // Not reentrant in practice; stay correct if it ever is.
            top_rendezvous(key, pool.ids(), out);
            return;
        };
        let entry = &mut cache[slot];
        if entry.generation != generation || entry.key != key {
            let start = out.len();
            top_rendezvous(key, pool.ids(), out);
            let mut positions = [0; RENDEZVOUS_NOMINEES];
            for (cached, position) in positions.iter_mut().zip(&out[start..]) {
                *cached = *position as u32;
            }
            *entry = CachedNominees {
                key,
                generation,
                positions,
                len: (out.len() - start) as u8,
            };
            return;
        }
        out.extend(
            entry.positions[..usize::from(entry.len)]
                .iter()
                .map(|position| *position as usize),
        );
    });
}

/// [`nominate_rendezvous`] computed: one weight per pod.
fn top_rendezvous(key: u64, pod_ids: &[u64], out: &mut Vec<usize>) {
    let mut top = [(0u64, usize::MAX); RENDEZVOUS_NOMINEES];
    for (position, &id) in pod_ids.iter().enumerate() {
        let weight = rendezvous_weight(key, id);
        if top[RENDEZVOUS_NOMINEES - 1].1 == usize::MAX || weight > top[RENDEZVOUS_NOMINEES - 1].0 {
            let at = top.partition_point(|(w, p)| *p != usize::MAX && *w >= weight);
            top.copy_within(at..RENDEZVOUS_NOMINEES - 1, at + 1);
            top[at] = (weight, position);
        }
    }
    out.extend(
        top.iter()
            .map(|(_, position)| *position)
            .filter(|position| *position != usize::MAX),
    );
}

/// The in-flight bound of a pod: `factor` x the mean load of the eligible
/// pods, counting this request, never below [`BOUNDED_LOAD_FLOOR`].
pub fn load_bound(loads: &[f64], eligible: &[bool], factor: f64) -> f64 {
    let count = eligible.iter().filter(|e| **e).count().max(1);
    let total: f64 = loads
        .iter()
        .zip(eligible)
        .filter(|(_, e)| **e)
        .map(|(load, _)| *load)
        .sum();
    (factor * (total + 1.0) / count as f64)
        .ceil()
        .max(BOUNDED_LOAD_FLOOR)
}

/// Consistent hashing with bounded loads: the pod with the highest
/// rendezvous weight for `key` among those whose load stays within
/// `factor` x the mean (counting this request), never below
/// [`BOUNDED_LOAD_FLOOR`]. `eligible[i]` false excludes pod `i` (e.g. ejected).
pub fn bounded_rendezvous(
    key: u64,
    pod_ids: &[u64],
    loads: &[f64],
    eligible: &[bool],
    factor: f64,
) -> Option<usize> {
    if !eligible.contains(&true) {
        return None;
    }
    let bound = load_bound(loads, eligible, factor);
    let mut best: Option<(usize, u64)> = None;
    let mut best_any: Option<(usize, u64)> = None;
    for (index, (&id, &load)) in pod_ids.iter().zip(loads).enumerate() {
        if !eligible[index] {
            continue;
        }
        let weight = rendezvous_weight(key, id);
        if best_any.is_none_or(|(_, w)| weight > w) {
            best_any = Some((index, weight));
        }
        if load + 1.0 <= bound && best.is_none_or(|(_, w)| weight > w) {
            best = Some((index, weight));
        }
    }
    // The bound always admits the least loaded pod; the fallback is for NaN loads.
    best.or(best_any).map(|(index, _)| index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::PodIds;

    fn hashes(field: PromptField, raw: &str) -> Vec<u64> {
        let mut out = Vec::new();
        hash_prompt("m", field, raw.as_bytes(), 4, 128, &mut out);
        out
    }

    #[test]
    fn chained_blocks_share_a_prefix() {
        let a = hashes(PromptField::Prompt, r#""aaaabbbbcccc""#);
        let b = hashes(PromptField::Prompt, r#""aaaabbbbdddd""#);
        assert_eq!(a.len(), 3);
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        let c = hashes(PromptField::Prompt, r#""xxxxbbbbcccc""#);
        assert_ne!(a[1], c[1], "a block's hash depends on everything before it");
        let mut other_model = Vec::new();
        hash_prompt(
            "n",
            PromptField::Prompt,
            br#""aaaabbbbcccc""#,
            4,
            128,
            &mut other_model,
        );
        assert_ne!(a[0], other_model[0]);
        assert_eq!(
            hashes(PromptField::Prompt, r#""aaa""#),
            Vec::<u64>::new(),
            "no full block"
        );
    }

    #[test]
    fn chat_messages_flatten_deterministically() {
        let plain = hashes(
            PromptField::Messages,
            r#"[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]"#,
        );
        let parts = hashes(
            PromptField::Messages,
            r#"[{"role":"system","content":[{"type":"text","text":"be "},{"type":"text","text":"brief"}]},{"content":"hi","role":"user"}]"#,
        );
        assert_eq!(plain, parts, "content parts and key order do not matter");
        let flat = hashes(PromptField::Prompt, r#""system: be brief\nuser: hi\n""#);
        assert_eq!(plain, flat);
        assert!(
            !hashes(PromptField::Messages, r#"{"not":"a list of messages"}"#).is_empty(),
            "odd shapes still hash"
        );
    }

    /// What `feed` gives a fresh hasher (blocks of 4, seeded as for model
    /// `m`), and the hashes it made.
    fn fed_by<R>(feed: impl FnOnce(&mut BlockHasher<'_>) -> R) -> (R, Vec<u64>) {
        let (mut out, mut pending, mut decoded) = (Vec::new(), Vec::new(), Vec::new());
        let mut hasher = BlockHasher {
            block_size: 4,
            max_blocks: 128,
            pending: &mut pending,
            decoded: &mut decoded,
            previous: xxh3_64(b"m"),
            out: &mut out,
        };
        let result = feed(&mut hasher);
        (result, out)
    }

    /// The general reading of messages: each message read whole, then its content again.
    fn hashed_generally(raw: &str) -> Vec<u64> {
        fed_by(|hasher| hash_messages_generally(raw.as_bytes(), hasher)).1
    }

    #[test]
    fn the_prompt_scan_hashes_what_the_general_reading_does() {
        let scan = |raw: &str| {
            let (fed, out) = fed_by(|hasher| feed_prompt(raw.as_bytes(), hasher));
            fed.map(|()| out)
        };
        let general = |raw: &str| fed_by(|hasher| flatten_prompt(raw.as_bytes(), hasher)).1;
        for raw in [
            r#""a plain prompt of some length""#,
            r#""lines\nand caf\u00e9 \"quoted\" \ud83d\ude00" "#,
            r#"["one","two\nlines",""]"#,
            r#"[ "spaced" , "list" ]"#,
            "[]",
        ] {
            assert_eq!(scan(raw), Ok(general(raw)), "{raw}");
        }
        for raw in [
            "[1,2,3]",
            r#"[["nested"]]"#,
            r#"["a",1]"#,
            r#" "leading space""#,
            r#""lone \ud83d surrogate""#,
            r#""unterminated"#,
            r#""x" y"#,
            "42",
            "null",
        ] {
            assert_eq!(scan(raw), Err(Refused), "{raw}");
            assert_eq!(hashes(PromptField::Prompt, raw), general(raw), "{raw}");
        }
    }

    #[test]
    fn messages_of_any_shape_hash_as_the_general_reading_does() {
        for raw in [
            r#"[{"role":"user","content":42}]"#,
            r#"[{"role":"user","content":{"text":"an object"}}]"#,
            r#"[{"role":"user","content":[1,2]}]"#,
            r#"[{"role":"user","content":[{"text":7}]}]"#,
            r#"[{"role":"user","role":"twice","content":"x"}]"#,
            r#"[{"role":3,"content":"x"}]"#,
            r#"[{"role":null,"content":"x"}]"#,
            r#"[{"role":"us\u0065r","r\u0063ntent":"ignored","c\u006fntent":"escaped names"}]"#,
            r#"[["user","seq-form message"]]"#,
            r#"[{"role":"user","content":"lone \ud83d surrogate"}]"#,
            r#""a plain input string""#,
            r#"["a","list","of","strings"]"#,
            r#"{"not":"a list"}"#,
        ] {
            assert_eq!(
                hashes(PromptField::Messages, raw),
                hashed_generally(raw),
                "{raw}"
            );
        }
    }

    #[test]
    fn the_scan_takes_the_common_shapes_and_leaves_the_rest_to_serde() {
        let scan = |raw: &str| {
            let (fed, out) = fed_by(|hasher| feed_messages(raw.as_bytes(), hasher));
            fed.map(|()| out)
        };
        let taken = [
            r#"[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"lorem ipsum dolor sit amet"}]"#,
            r#" [ { "role" : "user" , "name":{"a":[1,null]}, "content" : [ {"type":"text","text":"be "}, {"type":"image_url"}, {"text":null}, {"text":"brief"} ] } ] "#,
            r#"[{"role":"assistant","content":null,"tool_calls":[]},{"role":"tool"},{}]"#,
            r#"[{"content":"hi","role":"user","name":"x"},{"content":[{"text":"parts first"}],"role":"user"}]"#,
            r#"[{"content":"no role"},{"content":null}]"#,
            r#"[{"role":"user","content":"caf\u00e9 \"quoted\"\nline\ttab \\ \/ \b\f\r"}]"#,
            r#"[{"role":"us\u0065r","content":[{"text":"\ud83d\ude00 \u4e2d\u6587"}]}]"#,
            "[]",
        ];
        for raw in taken {
            assert_eq!(scan(raw), Ok(hashed_generally(raw)), "{raw}");
        }
        let left = [
            r#"[{"r\u006fle":"user","content":"x"}]"#,
            r#"[{"role":"user","role":"again","content":"x"}]"#,
            r#"[{"content":"x","content":"again","role":"user"}]"#,
            r#"[{"role":"user","content":[{"text":"a","text":"b"}]}]"#,
            r#"[{"role":"user","content":[["seq"]]}]"#,
            r#"[{"content":42,"role":"user"}]"#,
            r#"[["user","seq-form message"]]"#,
            r#"[{"role":"user","content":"lone \ud83d surrogate"}]"#,
            r#"[{"role":"user","content":"lone \ude00 surrogate"}]"#,
            r#"[{"role":"user","content":"bad \x escape"}]"#,
            r#"[{"role":"user","content":"x"}] x"#,
            r#"[{"role":"user","content":"x"},]"#,
        ];
        for raw in left {
            assert_eq!(scan(raw), Err(Refused), "{raw}");
            assert_eq!(
                hashes(PromptField::Messages, raw),
                hashed_generally(raw),
                "{raw}"
            );
        }
    }

    #[test]
    fn max_blocks_bounds_the_work() {
        let long = format!("\"{}\"", "x".repeat(10_000));
        let mut out = Vec::new();
        hash_prompt("m", PromptField::Prompt, long.as_bytes(), 64, 128, &mut out);
        assert_eq!(out.len(), 128);
    }

    #[test]
    fn index_finds_longest_prefix_per_pod() {
        let index = PrefixIndex::new(1000);
        index.record(&[1, 2, 3, 4], 10);
        index.record(&[1, 2], 20);
        let mut out = [0; 3];
        index.matches(&[1, 2, 3, 4, 5], &[10, 20, 30], &mut out);
        assert_eq!(out, [4, 2, 0]);
    }

    #[test]
    fn matches_agree_with_a_search_per_block_however_many_owners_repeat() {
        // 48 pods (more than SEEN_OWNERS) hold prefixes of 1..=48 blocks,
        // interleaved with 4 pods of another server holding all 48.
        let index = PrefixIndex::new(100_000);
        let hashes: Vec<u64> = (1..=48).collect();
        for pod in 0..48u64 {
            index.record(&hashes[..=pod as usize], 1000 + pod);
            if pod % 3 == 0 {
                index.record(&hashes, 100 + pod % 4);
            }
        }
        let pod_ids: Vec<u64> = (0..48).map(|pod| 1000 + pod).rev().collect();
        let mut out = vec![0; pod_ids.len()];
        index.matches(&hashes, &pod_ids, &mut out);
        // The same walk, searching `pod_ids` for every owner of every block.
        let mut expected = vec![0; pod_ids.len()];
        let mut found = 0;
        for (block, hash) in hashes.iter().enumerate().rev() {
            let owners = index.shard(*hash).lock().current.get(hash).copied();
            for owner in owners.unwrap_or_default().iter().filter(|o| **o != 0) {
                if let Some(slot) = pod_ids.iter().position(|id| id == owner)
                    && expected[slot] == 0
                {
                    expected[slot] = block + 1;
                    found += 1;
                }
            }
            if found >= TOP_K_MATCHES {
                break;
            }
        }
        assert!(found > 0);
        assert_eq!(out, expected);
    }

    #[test]
    fn index_stays_bounded() {
        let index = PrefixIndex::new(INDEX_SHARDS * 2 * 10);
        for hash in 0..100_000u64 {
            index.record(&[hash.wrapping_mul(0x9e37_79b9_7f4a_7c15)], 1);
        }
        let entries: usize = index
            .shards
            .iter()
            .map(|s| {
                let s = s.lock();
                s.current.len() + s.previous.len()
            })
            .sum();
        assert!(entries <= INDEX_SHARDS * 2 * 10, "{entries}");
    }

    #[test]
    fn a_group_keeps_its_first_choice_and_counts_until_it_ages_out() {
        let groups = GroupTable::new(INDEX_SHARDS * 2);
        assert_eq!(groups.observe(7, 10), 10);
        assert_eq!(groups.observe(7, 20), 10, "the first choice is kept");
        assert_eq!(groups.observe(8 << 58, 10), 10);
        assert_eq!(
            (groups.chosen_by_count(10), groups.chosen_by_count(20)),
            (2, 0)
        );
        let heavier = if rendezvous_weight(7, 10) > rendezvous_weight(8 << 58, 10) {
            7
        } else {
            8 << 58
        };
        assert_eq!(
            groups.standing(heavier, 10),
            Standing {
                groups: 2,
                lighter: 1
            }
        );
        // One entry per generation in key 7's shard: two newer groups there
        // age it out (the first moves it to the older generation).
        groups.observe(1, 20);
        assert_eq!(groups.observe(7, 30), 10, "still in the older generation");
        groups.observe(2, 20);
        groups.observe(3, 20);
        assert_eq!(groups.observe(7, 30), 30, "aged out: seen anew");
        assert_eq!(
            (groups.chosen_by_count(10), groups.chosen_by_count(20)),
            (1, 1),
            "groups 7 (first seen), 1 and 2 aged out"
        );
        // The first choice is computed for a new group only.
        assert_eq!(groups.observe_with(7, || unreachable!("a known group")), 30);
        assert_eq!(groups.observe_with(9, || 40), 40, "a new group");
    }

    #[test]
    fn nominees_are_the_first_rendezvous_choices_in_order() {
        let ids: Vec<u64> = (0..500)
            .map(|i| xxh3_64(format!("pod-{i}").as_bytes()))
            .collect();
        let whole = PodIds::new(ids.clone().into());
        let first_choices = |key: u64, ids: &[u64]| {
            let mut by_weight: Vec<usize> = (0..ids.len()).collect();
            by_weight.sort_by_key(|&i| std::cmp::Reverse(rendezvous_weight(key, ids[i])));
            by_weight.truncate(RENDEZVOUS_NOMINEES);
            by_weight
        };
        // Twice over a server's list: computed, then read from the cache.
        for _ in 0..2 {
            for key in 0..100u64 {
                for pool in [PoolIds::among(&ids), PoolIds::whole(&whole)] {
                    let mut nominated = vec![9999];
                    nominate_rendezvous(key, pool, &mut nominated);
                    assert_eq!(nominated[0], 9999, "appends");
                    assert_eq!(nominated[1..], first_choices(key, &ids), "key {key}");
                }
            }
        }
        // A new snapshot's list (one pod gone): its own nominees, not the
        // cached ones of the old list.
        let fewer = PodIds::new(ids[1..].into());
        for key in 0..100u64 {
            let mut nominated = Vec::new();
            nominate_rendezvous(key, PoolIds::whole(&fewer), &mut nominated);
            assert_eq!(nominated, first_choices(key, &ids[1..]), "key {key}");
        }
        let mut few = Vec::new();
        nominate_rendezvous(1, PoolIds::among(&ids[..2]), &mut few);
        assert_eq!(few.len(), 2);
        let two = PodIds::new(ids[..2].into());
        for _ in 0..2 {
            few.clear();
            nominate_rendezvous(1, PoolIds::whole(&two), &mut few);
            assert_eq!(few, first_choices(1, &ids[..2]));
        }
    }

    #[test]
    fn rendezvous_is_stable_and_spreads() {
        let ids = [11, 22, 33, 44];
        let loads = [0.0; 4];
        let all = [true; 4];
        let mut counts = [0; 4];
        for key in 0..4000u64 {
            let chosen = bounded_rendezvous(key, &ids, &loads, &all, 1.25).expect("pod");
            assert_eq!(
                Some(chosen),
                bounded_rendezvous(key, &ids, &loads, &all, 1.25)
            );
            counts[chosen] += 1;
        }
        assert!(
            counts.iter().all(|&n| (800..1200).contains(&n)),
            "{counts:?}"
        );
        // Removing a pod only moves the keys that were on it.
        let fewer = [11, 22, 44];
        for key in 0..1000u64 {
            let before = ids[bounded_rendezvous(key, &ids, &loads, &all, 1.25).expect("pod")];
            let after =
                fewer[bounded_rendezvous(key, &fewer, &[0.0; 3], &[true; 3], 1.25).expect("pod")];
            if before != 33 {
                assert_eq!(before, after);
            }
        }
    }

    #[test]
    fn bounded_load_moves_away_from_a_hot_pod() {
        let ids = [11, 22, 33, 44];
        let key = 7;
        let preferred = bounded_rendezvous(key, &ids, &[0.0; 4], &[true; 4], 1.25).expect("pod");
        let mut loads = [1.0; 4];
        loads[preferred] = 6.0;
        let chosen = bounded_rendezvous(key, &ids, &loads, &[true; 4], 1.25).expect("pod");
        assert_ne!(
            chosen, preferred,
            "6 in flight vs a mean of 2.25 is over 1.25x"
        );
        let mut eligible = [true; 4];
        eligible[preferred] = false;
        let fallback = bounded_rendezvous(key, &ids, &[0.0; 4], &eligible, 1.25).expect("pod");
        assert_eq!(
            chosen, fallback,
            "the spill goes where the pod's absence would"
        );
    }
}
