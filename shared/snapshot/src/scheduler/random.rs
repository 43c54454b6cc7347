//! `random`: a uniform score, meant to be used alone (the router
//! configuration drops it, with a warning, when other scorers are enabled).
//! No arguments.

use super::PluginSpec;

pub const NAME: &str = "random";

pub const SPEC: PluginSpec = PluginSpec::scorer(NAME);
