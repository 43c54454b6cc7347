//! switchyard-controller: turns ModelRoute / ModelServer / Pod state and scraped
//! engine load into versioned routing snapshots, and streams them to dataplanes.
//!
//! Layout:
//! - [`auth`]: API keys from Secrets, the router configuration's JWT settings, JWKS fetching;
//! - [`compile`]: the pure core, inputs -> snapshot + per-object reports;
//! - [`compile_loop`]: recompiles and publishes on every input change, in both modes;
//! - [`local`]: local mode, objects read from YAML files in a directory;
//! - [`kubernetes`]: Kubernetes mode: watches, leader election, status writing;
//! - [`status`]: the pure status-condition computation;
//! - [`scrape`]: engine `/metrics` and `/v1/models` scraping and parsing;
//! - [`xds`]: the snapshot stream server (versions, nonces, ACK/NACK);
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/debug/...`;
//! - [`metrics`]: status-write and leader metrics;
//! - [`app`]: wires the pieces together for `main`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod compile;
pub mod compile_loop;
pub mod kubernetes;
pub mod local;
pub mod metrics;
pub mod router_config;
pub mod scrape;
pub mod status;
pub mod xds;
