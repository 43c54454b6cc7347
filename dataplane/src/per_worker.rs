//! State kept once per traffic worker, so requests served by different
//! workers never write to the same memory.
//!
//! The dataplane serves traffic on a fixed number of worker threads (see
//! `workers.rs`); each knows its index. A [`PerWorker`] value has one slot per
//! worker, each on its own cache line: a request updates its own worker's
//! slot (an uncontended write to a line no other core touches), and the rare
//! reader that needs the whole picture (scoring reads a pod's in-flight
//! count) sums the slots. Threads that are not traffic workers (tests, the
//! control thread) use slot 0.
//!
//! The process's other long-lived threads run below the workers' priority
//! ([`run_below_traffic_workers`]).

use std::cell::Cell;
use std::num::NonZeroUsize;
use std::sync::OnceLock;

/// Worker count when [`set_count`] was never called (tests, benches).
const DEFAULT_COUNT: usize = 1;

/// The process's worker count, fixed before the first snapshot is applied.
static COUNT: OnceLock<usize> = OnceLock::new();

thread_local! {
    /// This thread's worker index (0 outside traffic workers).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The CPUs this process may run on: its scheduler affinity mask, further
/// bounded by a cgroup CPU quota (v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`
/// or v2 `cpu.max`), as `std::thread::available_parallelism` reads them on
/// Linux; 1 when neither can be read.
pub fn available() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// Fixes the worker count for the life of the process; the first call wins.
/// Call it before building anything that holds [`PerWorker`] state.
pub fn set_count(count: usize) {
    let _ = COUNT.set(count.max(1));
}

/// The number of traffic workers (slots of every [`PerWorker`]).
pub fn count() -> usize {
    *COUNT.get().unwrap_or(&DEFAULT_COUNT)
}

/// Marks the calling thread as worker `index`.
pub fn enter(index: usize) {
    INDEX.with(|cell| cell.set(index));
}

/// The calling thread's worker index.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// How much lower than a traffic worker's the priority of the process's other
/// threads is, in nice steps. Linux lets a thread that wakes up preempt a
/// running thread of equal priority, so each access-log batch (every ~5 ms
/// under load) paused a busy worker, and every request queued behind it
/// waited; the bench's open-loop run saw the worker preempted on almost
/// every batch. Ten steps lower, a waking background thread waits until the
/// worker's turn ends, a waking worker preempts it, and it still gets about
/// a tenth of a core the workers saturate (weights 110 : 1024): more than
/// the access log needs at saturation (about 1 µs of formatting per line).
pub const BACKGROUND_NICE_STEPS: i32 = 10;

/// The highest nice value (the lowest priority) Linux accepts.
const MAX_NICE: i32 = 19;

/// Lowers the calling thread's priority [`BACKGROUND_NICE_STEPS`] below the
/// process's (the traffic workers keep the process's). Called by every
/// long-lived thread that is not a traffic worker: the control thread once
/// the workers are spawned (threads it starts later inherit it), the
/// controller stream and the access-log writer. Lowering one's own priority
/// needs no privilege; a failure (a sandbox refusing `setpriority`) leaves
/// the thread as it was.
pub fn run_below_traffic_workers() {
    use rustix::process::{getpriority_process, setpriority_process};
    let thread = Some(rustix::thread::gettid());
    // Linux keeps a nice value per thread: PRIO_PROCESS with a thread id
    // changes that thread alone.
    let lowered = getpriority_process(thread).and_then(|nice| {
        setpriority_process(
            thread,
            nice.saturating_add(BACKGROUND_NICE_STEPS).min(MAX_NICE),
        )
    });
    if let Err(error) = lowered {
        tracing::debug!(%error, "cannot lower this thread's priority below the traffic workers'");
    }
}

/// One `T` per worker, each on its own cache line.
#[derive(Debug)]
pub struct PerWorker<T> {
    slots: Box<[CacheLine<T>]>,
}

/// 64 bytes: the cache line of the x86-64 and most ARM cores the dataplane runs on.
#[derive(Debug, Default)]
#[repr(align(64))]
struct CacheLine<T>(T);

impl<T: Default> Default for PerWorker<T> {
    fn default() -> Self {
        Self {
            slots: (0..count()).map(|_| CacheLine::default()).collect(),
        }
    }
}

impl<T> PerWorker<T> {
    /// The calling worker's slot.
    pub fn local(&self) -> &T {
        self.slot(index())
    }

    /// Worker `index`'s slot (wrapping, so a count fixed after this value was
    /// built still lands on a valid slot).
    pub fn slot(&self, index: usize) -> &T {
        &self.slots[index % self.slots.len()].0
    }

    /// The index of the calling worker's slot.
    pub fn local_index(&self) -> usize {
        index() % self.slots.len()
    }

    /// Every worker's slot.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().map(|slot| &slot.0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[test]
    fn each_thread_writes_its_own_slot_and_readers_see_all() {
        let slots = PerWorker::<AtomicU64> {
            slots: (0..3).map(|_| CacheLine::default()).collect(),
        };
        std::thread::scope(|scope| {
            for worker in 0..3 {
                let slots = &slots;
                scope.spawn(move || {
                    enter(worker);
                    for _ in 0..=worker {
                        slots.local().fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        let each: Vec<u64> = slots.iter().map(|s| s.load(Ordering::Relaxed)).collect();
        assert_eq!(each, [1, 2, 3]);
        assert_eq!(slots.slot(4).load(Ordering::Relaxed), 2, "wraps");
        assert_eq!(std::mem::align_of::<CacheLine<AtomicU64>>(), 64);
    }

    #[test]
    fn the_available_cpus_are_at_least_one() {
        assert!(available() >= 1);
    }

    fn this_threads_nice() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).expect("getpriority")
    }

    #[test]
    fn a_background_thread_runs_below_the_thread_that_started_it() {
        let before = this_threads_nice();
        let (background, after) = std::thread::spawn(move || {
            run_below_traffic_workers();
            let background = this_threads_nice();
            // Threads it starts inherit its priority.
            let child = std::thread::spawn(this_threads_nice).join().expect("child");
            (background, child)
        })
        .join()
        .expect("background thread");
        assert_eq!(background, (before + BACKGROUND_NICE_STEPS).min(MAX_NICE));
        assert_eq!(after, background);
        assert_eq!(
            this_threads_nice(),
            before,
            "only the calling thread changes"
        );
    }
}
