//! switchyard-dataplane: a stateless OpenAI-compatible proxy. It routes with the
//! latest snapshot pushed by the controller plus its own in-flight counts.
//!
//! A request goes through the phases of [`proxy`], in order: admit (method,
//! path, body; the body parse in [`request`]), authenticate, admission, route
//! (with the table of [`routing`]), schedule (the plugins of [`scheduling`]),
//! forward (the attempt policy: retries, timeouts, ejection, failover; two
//! legs per attempt for a prefill/decode ModelServer),
//! respond (streaming back, usage read by [`response`]) and log (request
//! [`metrics`] and the access log).
//!
//! The admission phase's wait is the [`fairness`] queue.
//!
//! Around it: [`snapshot`] (validate + atomically swap the routing table),
//! [`pod`] (per-pod state that outlives snapshots: in-flight count, load,
//! outlier ejection), [`lazy_series`] (metric series created on first use),
//! [`retired`] (replaced snapshot state, freed off the traffic workers),
//! [`providers`] (external model providers: URL, headers, HTTPS clients),
//! [`xds_client`] (the controller stream), [`admin`] (health, metrics, debug),
//! [`app`] (wiring it all together), [`server`] (the HTTP servers and their drain),
//! [`workers`] (the traffic worker threads, each with its own runtime, listener
//! and upstream connections) and [`per_worker`] (state kept once per worker).
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod chat_messages;
pub mod cli;
pub mod config_file;
pub mod endpoint_picker;
pub mod error;
pub mod fairness;
pub mod fast_map;
pub mod gateway;
pub mod health;
pub mod json_members;
pub mod lazy_series;
pub mod limits;
pub mod listener_ports;
pub mod metrics;
pub mod per_worker;
pub mod pod;
pub mod providers;
pub mod proxy;
pub mod rate_limit;
pub mod request;
pub mod request_id;
pub mod response;
pub mod retired;
pub mod rewrite;
pub mod routing;
pub mod scheduling;
pub mod server;
pub mod snapshot;
pub mod token_estimate;
pub mod workers;
pub mod xds_client;
