//! switchyard-dataplane: a stateless OpenAI-compatible proxy. It routes with the
//! latest snapshot pushed by the controller plus its own in-flight counts.
//!
//! Where a request goes, in order:
//! - [`request`]: parse only what routing needs from the body (model, stream);
//! - [`routing`]: find the ModelRoute, its first matching rule, a weighted target;
//! - [`scheduling`]: rank that ModelServer's pods (filter + score plugins);
//! - [`proxy`]: the HTTP server and the upstream call (retries, timeouts);
//! - [`response`]: streaming the engine's answer back, reading token usage.
//!
//! Around it: [`snapshot`] (validate + atomically swap the routing table),
//! [`xds_client`] (the controller stream), [`admin`] (health, metrics, debug),
//! [`observe`] (per-request [`metrics`] and [`access_log`] lines).
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config_file;
pub mod error;
pub mod metrics;
pub mod observe;
pub mod proxy;
pub mod rate_limit;
pub mod request;
pub mod request_id;
pub mod response;
pub mod routing;
pub mod scheduling;
pub mod snapshot;
pub mod token_estimate;
pub mod xds_client;
