//! Snapshot state replaced while requests may still hold it (a routing
//! table, the metric handles of a snapshot). Freeing it costs in proportion
//! to the snapshot (tens of thousands of routes: milliseconds), so it must
//! happen on the thread that applies snapshots, never on a traffic worker
//! that happens to let go of the last reference.

use std::sync::Arc;

use parking_lot::Mutex;

/// Replaced values some reader still held when they were replaced; freed
/// by [`Retired::reclaim`] once no reader holds them.
#[derive(Debug)]
pub struct Retired<T>(Mutex<Vec<Arc<T>>>);

impl<T> Default for Retired<T> {
    fn default() -> Self {
        Self(Mutex::new(Vec::new()))
    }
}

impl<T> Retired<T> {
    /// Takes `replaced`, already swapped out so no reader can pick it up
    /// again: freed now, on the calling thread, when nothing else holds it;
    /// kept for [`Retired::reclaim`] otherwise.
    pub fn retire(&self, replaced: Arc<T>) {
        if Arc::strong_count(&replaced) > 1 {
            self.0.lock().push(replaced);
        }
    }

    /// Frees, on the calling thread, the values no reader holds any more.
    pub fn reclaim(&self) {
        let unused: Vec<Arc<T>> = {
            let mut retired = self.0.lock();
            let (unused, held) = std::mem::take(&mut *retired)
                .into_iter()
                .partition(|value| Arc::strong_count(value) == 1);
            *retired = held;
            unused
        };
        // Dropped here, outside the lock.
        drop(unused);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_still_held_is_freed_by_reclaim_after_its_reader_lets_go() {
        let retired = Retired::default();
        let unused = Arc::new("unused");
        let freed_at_once = Arc::downgrade(&unused);
        retired.retire(unused);
        assert!(freed_at_once.upgrade().is_none(), "nothing held it");

        let replaced = Arc::new("replaced");
        let reader = replaced.clone();
        let watched = Arc::downgrade(&replaced);
        retired.retire(replaced);
        retired.reclaim();
        assert!(watched.upgrade().is_some(), "still read");
        drop(reader);
        assert!(
            watched.upgrade().is_some(),
            "the reader's release does not free it"
        );
        retired.reclaim();
        assert!(watched.upgrade().is_none(), "freed by reclaim");
    }
}
