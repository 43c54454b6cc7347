//! Session boost's memory: the sessions whose last request completed, with
//! when, bounded by evicting the least recently completed.

use std::collections::{BTreeMap, HashMap};

/// Recently completed sessions, at most `capacity`.
#[derive(Debug)]
pub struct RecentSessions {
    capacity: usize,
    /// Session → its completion tick.
    completed: HashMap<Box<str>, u64>,
    /// Completion tick → session, oldest first, for eviction.
    by_tick: BTreeMap<u64, Box<str>>,
    next_tick: u64,
}

impl RecentSessions {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            completed: HashMap::new(),
            by_tick: BTreeMap::new(),
            next_tick: 1,
        }
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        self.evict();
    }

    /// A request of `session` completed: it is now the most recent.
    pub fn completed(&mut self, session: &str) {
        let tick = self.next_tick;
        self.next_tick += 1;
        if let Some(previous) = self.completed.get_mut(session) {
            self.by_tick.remove(previous);
            *previous = tick;
            self.by_tick.insert(tick, session.into());
            return;
        }
        self.completed.insert(session.into(), tick);
        self.by_tick.insert(tick, session.into());
        self.evict();
    }

    /// When `session` last completed (higher = more recent), if remembered.
    pub fn last_completed(&self, session: &str) -> Option<u64> {
        self.completed.get(session).copied()
    }

    fn evict(&mut self) {
        while self.completed.len() > self.capacity {
            let Some((_, oldest)) = self.by_tick.pop_first() else {
                break;
            };
            self.completed.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_most_recent_sessions_only() {
        let mut sessions = RecentSessions::new(2);
        sessions.completed("a");
        sessions.completed("b");
        sessions.completed("a");
        sessions.completed("c");
        assert_eq!(sessions.completed.len(), 2);
        assert_eq!(sessions.last_completed("b"), None, "least recent evicted");
        assert!(sessions.last_completed("c") > sessions.last_completed("a"));
    }
}
