//! The paged KV cache: a fixed number of blocks, reference-counted by the sequences using them,
//! with full prompt blocks kept under their chained hash after release so later requests with
//! the same prefix can reuse them until they are evicted, least recently released first.

use std::collections::{BTreeSet, HashMap};

/// Index of a block in the pool.
pub type BlockId = u32;

#[derive(Clone, Debug, Default)]
struct Block {
    ref_count: u32,
    /// Set while the block is in the prefix cache.
    hash: Option<u64>,
}

/// Every block is in exactly one state: referenced (`ref_count > 0`), free (unreferenced, no
/// hash) or evictable (unreferenced, still cached).
#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<Block>,
    /// Free blocks, handed out from the end.
    free: Vec<BlockId>,
    /// Evictable blocks by release order: the first entry is the least recently released.
    evictable: BTreeSet<(u64, BlockId)>,
    /// Release tick of each evictable block, to find its `evictable` entry.
    released_at: HashMap<BlockId, u64>,
    by_hash: HashMap<u64, BlockId>,
    release_clock: u64,
    evictions: u64,
}

impl BlockPool {
    pub fn new(total_blocks: u32) -> Self {
        Self {
            blocks: vec![Block::default(); total_blocks as usize],
            // Reversed so block 0 is handed out first; only for readable test output.
            free: (0..total_blocks).rev().collect(),
            evictable: BTreeSet::new(),
            released_at: HashMap::new(),
            by_hash: HashMap::new(),
            release_clock: 0,
            evictions: 0,
        }
    }

    pub fn total(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks an allocation can get: free ones, then evictable ones.
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn in_use(&self) -> usize {
        self.total() - self.available()
    }

    /// Blocks holding a reusable prefix, referenced or not.
    pub fn cached(&self) -> usize {
        self.by_hash.len()
    }

    /// Cached blocks dropped from the cache to make room.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    pub fn lookup(&self, hash: u64) -> Option<BlockId> {
        self.by_hash.get(&hash).copied()
    }

    /// Whether taking `id` for a sequence would also use up one of the available blocks.
    pub fn is_evictable(&self, id: BlockId) -> bool {
        self.released_at.contains_key(&id)
    }

    /// Adds a reference to a cached block found by [`lookup`](Self::lookup).
    pub fn reuse(&mut self, id: BlockId) {
        if let Some(tick) = self.released_at.remove(&id) {
            self.evictable.remove(&(tick, id));
        }
        if let Some(block) = self.blocks.get_mut(id as usize) {
            block.ref_count += 1;
        }
    }

    /// `count` blocks for one sequence, free ones first, then evicting the least recently
    /// released cached ones; `None` (and nothing taken) when fewer are available.
    pub fn allocate(&mut self, count: usize) -> Option<Vec<BlockId>> {
        if count > self.available() {
            return None;
        }
        let mut allocated = Vec::with_capacity(count);
        while allocated.len() < count {
            let id = match self.free.pop() {
                Some(id) => id,
                None => {
                    let (_, id) = self.evictable.pop_first()?;
                    self.released_at.remove(&id);
                    if let Some(hash) = self.blocks[id as usize].hash.take() {
                        self.by_hash.remove(&hash);
                    }
                    self.evictions += 1;
                    id
                }
            };
            self.blocks[id as usize].ref_count = 1;
            allocated.push(id);
        }
        Some(allocated)
    }

    /// Puts a block just filled with a full prompt block into the prefix cache. A block whose
    /// content is already cached elsewhere stays private and is freed on release.
    pub fn register(&mut self, id: BlockId, hash: u64) {
        let Some(block) = self.blocks.get_mut(id as usize) else {
            return;
        };
        if block.hash.is_none() && !self.by_hash.contains_key(&hash) {
            block.hash = Some(hash);
            self.by_hash.insert(hash, id);
        }
    }

    /// Drops one sequence's references to `ids` (in sequence order). Blocks nobody uses any
    /// more stay cached if they hold a prefix, and are released last block first, so a
    /// prefix's tail is evicted before its head: the head is what most requests share.
    pub fn release(&mut self, ids: &[BlockId]) {
        for id in ids.iter().rev() {
            let Some(block) = self.blocks.get_mut(*id as usize) else {
                continue;
            };
            block.ref_count = block.ref_count.saturating_sub(1);
            if block.ref_count > 0 {
                continue;
            }
            if block.hash.is_some() {
                self.release_clock += 1;
                self.evictable.insert((self.release_clock, *id));
                self.released_at.insert(*id, self.release_clock);
            } else {
                self.free.push(*id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_takes_free_blocks_and_fails_atomically() {
        let mut pool = BlockPool::new(3);
        assert_eq!(pool.allocate(2), Some(vec![0, 1]));
        assert_eq!(pool.in_use(), 2);
        assert_eq!(pool.allocate(2), None);
        assert_eq!(pool.available(), 1);
        pool.release(&[0, 1]);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.cached(), 0);
    }

    #[test]
    fn released_prefix_blocks_stay_cached_and_can_be_reused() {
        let mut pool = BlockPool::new(4);
        let blocks = pool.allocate(2).expect("room");
        pool.register(blocks[0], 10);
        pool.register(blocks[1], 11);
        pool.release(&blocks);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.cached(), 2);
        assert_eq!(pool.available(), 4);

        let hit = pool.lookup(10).expect("cached");
        assert!(pool.is_evictable(hit));
        pool.reuse(hit);
        assert!(!pool.is_evictable(hit));
        assert_eq!(pool.in_use(), 1);
        // A shared block stays referenced until its last user releases it.
        pool.reuse(hit);
        pool.release(&[hit]);
        assert_eq!(pool.in_use(), 1);
        pool.release(&[hit]);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.lookup(10), Some(hit));
    }

    #[test]
    fn eviction_prefers_free_blocks_then_the_least_recently_released_tail() {
        let mut pool = BlockPool::new(4);
        let old = pool.allocate(2).expect("room");
        pool.register(old[0], 1);
        pool.register(old[1], 2);
        pool.release(&old);
        let recent = pool.allocate(2).expect("free blocks first");
        assert_eq!(pool.evictions(), 0);
        pool.register(recent[0], 3);
        pool.register(recent[1], 4);
        pool.release(&recent);

        // The older prefix goes first, its tail before its head.
        let taken = pool.allocate(1).expect("evicts");
        assert_eq!(taken, vec![old[1]]);
        assert_eq!(pool.lookup(2), None);
        assert_eq!(pool.lookup(1), Some(old[0]));
        pool.allocate(1).expect("evicts");
        assert_eq!(pool.lookup(1), None);
        assert_eq!(pool.lookup(3), Some(recent[0]));
        assert_eq!(pool.evictions(), 2);
        assert_eq!(pool.cached(), 2);
    }

    #[test]
    fn duplicate_content_stays_private() {
        let mut pool = BlockPool::new(2);
        let blocks = pool.allocate(2).expect("room");
        pool.register(blocks[0], 7);
        pool.register(blocks[1], 7);
        assert_eq!(pool.lookup(7), Some(blocks[0]));
        pool.release(&blocks);
        assert_eq!(pool.cached(), 1);
        // The private duplicate went back to the free list, not into the cache.
        assert_eq!(pool.allocate(1), Some(vec![blocks[1]]));
        assert_eq!(pool.evictions(), 0);
    }
}
