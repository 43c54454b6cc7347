//! `gpu-usage`: a scorer preferring pods with free KV cache. No arguments.

use super::PluginSpec;

pub const NAME: &str = "gpu-usage";

pub const SPEC: PluginSpec = PluginSpec::scorer(NAME);
