//! `lora-affinity`: a filter keeping the pods that report the requested model
//! (base model or LoRA adapter) in their `/v1/models`. No arguments.

use super::PluginSpec;

pub const NAME: &str = "lora-affinity";

pub const SPEC: PluginSpec = PluginSpec::filter(NAME);
