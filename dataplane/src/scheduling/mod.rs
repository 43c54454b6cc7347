//! Picking a pod of a ModelServer for a request.
//!
//! - [`framework`]: filter plugins, then score plugins summed by weight, then
//!   the top N candidates in order;
//! - [`plugins`]: how each plugin filters or scores, one file per plugin
//!   (least-request, gpu-usage, least-latency, prefix-cache, lora-affinity,
//!   random, session-affinity), listed in [`plugins::IMPLEMENTATIONS`]; their
//!   names and arguments are in `switchyard_snapshot::scheduler`;
//! - [`prefix`]: prompt block hashing, the local prefix index, rendezvous
//!   hashing with bounded load (replica-consistent affinity);
//! - [`sample`]: which candidates a pick scores when there are many (a
//!   moving window plus the pods the scorers nominate);
//! - [`saturation`]: when a pod's engine cannot start one more request, the
//!   point until which affinity keeps a prefix on its pod;
//! - [`metrics`], [`decisions`]: plugin timings and recent decisions.

pub mod decisions;
pub mod framework;
pub mod metrics;
pub mod plugins;
pub mod prefix;
pub mod sample;
pub mod saturation;

pub use framework::{
    PairRanking, Ranking, ScheduleError, ScheduleRequest, Scheduler, SchedulingShared,
};
