//! `random`: a uniform score, meant to be used alone.

use rand::Rng;

use super::MAX_SCORE;

pub fn score(out: &mut [u32]) {
    let mut rng = rand::rng();
    for slot in out {
        *slot = rng.random_range(0..=MAX_SCORE);
    }
}
