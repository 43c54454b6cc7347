//! Shared by the controller's integration test binaries; each uses a part of
//! it, so what one binary leaves unused is not dead code.
#![allow(dead_code)]

pub mod dataplane;
pub mod fake_api;
