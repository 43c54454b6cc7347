//! `random`: a uniform score, meant to be used alone.

use rand::Rng;
use switchyard_snapshot::scheduler;

use super::{Candidate, Implementation, MAX_SCORE, PluginInput, ScorePlugin};

pub const IMPLEMENTATION: Implementation =
    Implementation::scorer(&scheduler::random::SPEC, |_| Ok(Box::new(Random)));

#[derive(Debug)]
struct Random;

impl ScorePlugin for Random {
    fn score(&self, _: &[Candidate], _: &PluginInput<'_>, out: &mut [u32]) {
        score(out);
    }
}

pub fn score(out: &mut [u32]) {
    let mut rng = rand::rng();
    for slot in out {
        *slot = rng.random_range(0..=MAX_SCORE);
    }
}
