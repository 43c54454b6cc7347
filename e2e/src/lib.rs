//! End-to-end test support for Switchyard.
//!
//! - [`mock_engine`]: `switchyard-mock-engine`, an OpenAI-compatible fake vLLM / SGLang server that
//!   stands in for model pods in end-to-end tests and the demo.
//! - [`fake_provider`]: fake OpenAI and Anthropic providers over HTTPS with a test CA.
//! - [`harness`]: starting the real binaries on loopback for end-to-end tests.
//! - [`jwt`]: real JWTs signed with the test keys, and an issuer on loopback serving their JWKS.
//! - [`redis_server`]: a real `redis-server` on loopback for the global token budget tests.
//! - [`hostile`]: raw HTTP/1.1 and HTTP/2 bytes and process memory, for the hostile-client tests.
//! - [`sim_stack`]: simulated engines behind a controller with a router configuration, for the
//!   scheduling quality tests and benchmark.
//! - [`prefix_workload`]: the cache-bound shared-prefix workload those and the real-engine quality
//!   run send, and the engines' own counters they are judged by.
#![forbid(unsafe_code)]

pub mod fake_provider;
pub mod harness;
pub mod hostile;
pub mod jwt;
pub mod mock_engine;
pub mod prefix_workload;
pub mod redis_server;
pub mod sim_stack;
