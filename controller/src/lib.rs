//! switchyard-controller: turns ModelRoute / ModelServer / Pod state and scraped
//! engine load into versioned routing snapshots, and streams them to dataplanes.
//!
//! Layout:
//! - [`auth`]: API keys from Secrets, compiling authentication, JWKS fetching;
//! - [`rate_limit`]: `rateLimit` (a route's or a tier's) to its snapshot form;
//! - [`app`]: chooses the mode and starts the core with its object source;
//! - [`core`]: the same in both modes: registry, publisher, admin server,
//!   scraper, compile loop and stream server, fed by an [`core::ObjectSource`];
//! - [`compile`]: the pure function, inputs -> snapshot + per-object reports;
//! - [`local`]: local mode's source, objects read from YAML files in a directory;
//! - [`kubernetes`]: Kubernetes mode's source: watches, leader election, status writing;
//! - [`status`]: the pure status-condition computation;
//! - [`scrape`]: engine `/metrics` and `/v1/models` scraping and parsing;
//! - [`xds`]: the snapshot stream server (versions, nonces, ACK/NACK);
//! - [`outlier`]: the pod ejections dataplanes report, merged for every dataplane;
//! - [`fleet_fairness`]: the fairness usage dataplanes report, summed into
//!   the fleet-wide counters pushed back to every dataplane;
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/debug/...`;
//! - [`metrics`]: status-write and leader metrics;
//! - [`error`]: why the controller stops, and the exit codes.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod compile;
pub mod core;
pub mod error;
pub mod fleet_fairness;
pub mod kubernetes;
pub mod local;
pub mod metrics;
pub mod outlier;
pub mod rate_limit;
pub mod report_limit;
pub mod router_config;
pub mod scrape;
pub mod status;
pub mod xds;
