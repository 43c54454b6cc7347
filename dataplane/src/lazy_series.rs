//! Metric series created on first use: a snapshot places an empty slot per
//! model, route or server it serves, and a request fills it the first time it
//! needs the series. Applying a snapshot then costs one slot per object,
//! idle objects add nothing to `/metrics`, and an object that leaves retires
//! its slot, which removes exactly the series it created.

use std::sync::OnceLock;

use parking_lot::Mutex;

/// One series, or a bundle of them, created on first use, until what it
/// describes leaves the snapshot: then it is retired, its series are
/// removed, and it is never created again (a request still holding the slot
/// of a removed model or route records nothing more).
#[derive(Debug)]
pub struct LazySeries<T> {
    series: OnceLock<T>,
    /// Set when retired; held while creating, so nothing is created after
    /// the slot was retired.
    retired: Mutex<bool>,
}

impl<T> Default for LazySeries<T> {
    fn default() -> Self {
        Self {
            series: OnceLock::new(),
            retired: Mutex::new(false),
        }
    }
}

impl<T> LazySeries<T> {
    /// The series, created by `create` on first use; `None` once retired.
    /// After the first call this is one atomic load.
    pub fn get_or_create(&self, create: impl FnOnce() -> T) -> Option<&T> {
        if let Some(series) = self.series.get() {
            return Some(series);
        }
        let retired = self.retired.lock();
        if *retired {
            return None;
        }
        Some(self.series.get_or_init(create))
    }

    /// Stops creating; returns the series if one was created, for removal.
    pub fn retire(&self) -> Option<&T> {
        *self.retired.lock() = true;
        self.series.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_and_never_after_retirement() {
        let slot = LazySeries::default();
        assert_eq!(slot.get_or_create(|| 1), Some(&1));
        assert_eq!(slot.get_or_create(|| 2), Some(&1), "created once");
        assert_eq!(slot.retire(), Some(&1), "the series to remove");
        assert_eq!(
            slot.get_or_create(|| 3),
            Some(&1),
            "a holder keeps the detached handle"
        );

        let unused: LazySeries<u32> = LazySeries::default();
        assert_eq!(unused.retire(), None, "nothing to remove");
        assert_eq!(unused.get_or_create(|| 4), None, "nothing created after");
    }
}
