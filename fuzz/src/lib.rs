//! Fuzzing on stable Rust: each [`Harness`] is a property checked on
//! generated inputs. Inputs are mutations of the harness's seed corpus
//! (real engine output, real manifests, encoded snapshots): byte flips,
//! insertions of the harness's dictionary tokens, deletions, duplications,
//! splices of two seeds. Generation is deterministic: `(seed, iteration)`
//! names an input, so any failure is replayed with `--replay`.
//!
//! A failure is a panic inside the property (an assertion the harness makes
//! or a crash of the code under test), or an input that takes longer than
//! [`HANG_LIMIT`] (a watchdog ends the run and names it).
#![forbid(unsafe_code)]

pub mod harnesses;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use switchyard_runtime::clock;

/// An input running this long is a hang: the run stops and names it.
pub const HANG_LIMIT: Duration = Duration::from_secs(10);

/// Generated inputs stay below this size: large enough for every seed plus
/// growth, small enough that a million inputs run in minutes.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;

/// One property over byte inputs.
pub struct Harness {
    pub name: &'static str,
    /// Valid inputs mutations start from.
    pub seeds: Vec<Vec<u8>>,
    /// Tokens worth inserting (delimiters, keywords, edge values).
    pub dictionary: Vec<&'static [u8]>,
    /// Panics when the property does not hold.
    pub check: fn(&[u8]),
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub inputs: u64,
    /// (iteration, panic message, input) of each failing input.
    pub failures: Vec<(u64, String, Vec<u8>)>,
    pub elapsed: Duration,
    /// The slowest input's time.
    pub slowest: Duration,
}

/// Input `iteration` of a run seeded with `seed`.
pub fn generate(harness: &Harness, seed: u64, iteration: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed ^ iteration.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut input = if harness.seeds.is_empty() || rng.random_ratio(1, 50) {
        let len = rng.random_range(0..256);
        (0..len).map(|_| rng.random()).collect()
    } else {
        harness.seeds[rng.random_range(0..harness.seeds.len())].clone()
    };
    let mutations = rng.random_range(1..=8);
    for _ in 0..mutations {
        mutate(&mut input, harness, &mut rng);
    }
    input.truncate(MAX_INPUT_BYTES);
    input
}

fn mutate(input: &mut Vec<u8>, harness: &Harness, rng: &mut StdRng) {
    let len = input.len();
    let at = |rng: &mut StdRng| rng.random_range(0..=len);
    match rng.random_range(0..8) {
        0 if len > 0 => {
            let i = rng.random_range(0..len);
            input[i] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let i = rng.random_range(0..len);
            input[i] = rng.random();
        }
        2 => {
            let i = at(rng);
            let byte = rng.random();
            input.insert(i, byte);
        }
        3 if len > 0 => {
            let start = rng.random_range(0..len);
            let end = (start + rng.random_range(1..=64)).min(len);
            input.drain(start..end);
        }
        4 if len > 0 => {
            // Duplicate a range: repeated keys, nesting, long values.
            let start = rng.random_range(0..len);
            let end = (start + rng.random_range(1..=256)).min(len);
            let copy = input[start..end].to_vec();
            let times = rng.random_range(1..=16);
            let i = at(rng);
            for _ in 0..times {
                input.splice(i..i, copy.iter().copied());
            }
        }
        5 if !harness.seeds.is_empty() => {
            // Splice: this input's head, another seed's tail.
            let other = &harness.seeds[rng.random_range(0..harness.seeds.len())];
            let cut = at(rng);
            let from = rng.random_range(0..=other.len());
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
        6 if len > 0 => {
            input.truncate(rng.random_range(0..len));
        }
        _ if !harness.dictionary.is_empty() => {
            let token = harness.dictionary[rng.random_range(0..harness.dictionary.len())];
            let i = at(rng);
            input.splice(i..i, token.iter().copied());
        }
        _ => {}
    }
}

/// Checks `harness` on `inputs` generated inputs; `progress` is called
/// every `every` inputs with the count done.
pub fn run(harness: &Harness, seed: u64, inputs: u64, mut progress: impl FnMut(u64)) -> Report {
    let done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (done, finished, name) = (done.clone(), finished.clone(), harness.name);
        std::thread::spawn(move || watch(name, seed, &done, &finished))
    };
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let started = clock::now();
    let mut report = Report::default();
    for iteration in 0..inputs {
        let input = generate(harness, seed, iteration);
        let one = clock::now();
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (harness.check)(&input))) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            report.failures.push((iteration, message, input));
        }
        report.slowest = report.slowest.max(one.elapsed());
        done.store(iteration + 1, Ordering::Relaxed);
        if (iteration + 1) % 100_000 == 0 {
            progress(iteration + 1);
        }
    }
    std::panic::set_hook(quiet);
    finished.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    report.inputs = inputs;
    report.elapsed = started.elapsed();
    report
}

/// Ends the process when no input finishes within [`HANG_LIMIT`].
fn watch(name: &str, seed: u64, done: &AtomicU64, finished: &AtomicBool) {
    let mut last = (done.load(Ordering::Relaxed), clock::now());
    while !finished.load(Ordering::Relaxed) {
        std::thread::park_timeout(Duration::from_millis(200));
        let now = done.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, clock::now());
        } else if last.1.elapsed() > HANG_LIMIT {
            eprintln!(
                "HANG: harness {name}, input {now} of seed {seed} ran over {HANG_LIMIT:?}; replay with --harness {name} --seed {seed} --replay {now}"
            );
            std::process::exit(2);
        }
    }
}
