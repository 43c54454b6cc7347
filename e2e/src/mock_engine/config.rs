//! What one mock engine serves and how fast, plus the command line that builds it.

use std::time::Duration;

use clap::Parser;

/// Completion length when the request does not cap it: the `max_tokens` of the captured vLLM
/// exchanges, so mock responses are as long as the real ones in the fixtures.
pub const DEFAULT_OUTPUT_TOKENS: u32 = 16;

/// KV cache size in tokens: the size of the real vLLM capture in the fixtures (128 blocks of 32
/// tokens), so mock `kv_cache_usage_perc` values are on the same scale as the recorded ones.
pub const DEFAULT_KV_CACHE_CAPACITY_TOKENS: u64 = 4096;

/// Listen address when `--host` is not given: loopback, because the mock is a test fixture and
/// must not be reachable from other machines by accident.
pub const DEFAULT_HOST: &str = "127.0.0.1";

/// Listen port when `--port` is not given: vLLM's default serving port, which is also the
/// `workloadPort` in the Kthena examples.
pub const DEFAULT_PORT: u16 = 8000;

/// Which real engine the mock imitates; decides the `/metrics` names and the `owned_by` field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineFlavor {
    #[default]
    Vllm,
    Sglang,
}

impl EngineFlavor {
    /// The `owned_by` value the engine puts in `/v1/models`.
    pub fn owner(self) -> &'static str {
        match self {
            EngineFlavor::Vllm => "vllm",
            EngineFlavor::Sglang => "sglang",
        }
    }
}

/// Everything one mock engine instance needs.
#[derive(Clone, Debug, PartialEq)]
pub struct MockEngineConfig {
    /// Base model name (`--served-model-name` of the real engine).
    pub model: String,
    /// LoRA adapters served on top of the base model at startup.
    pub lora_adapters: Vec<String>,
    pub engine: EngineFlavor,
    /// Name of the pod this engine plays; appears in completions and in `x-mock-pod`.
    pub pod_name: String,
    /// Delay before the first token of every request.
    pub time_to_first_token: Duration,
    /// Delay between two consecutive tokens of a request.
    pub inter_token_latency: Duration,
    /// Tokens generated per request unless `max_tokens` asks for fewer.
    pub output_tokens: u32,
    /// Denominator of the KV cache usage gauge.
    pub kv_cache_capacity_tokens: u64,
}

impl MockEngineConfig {
    /// A vLLM-flavoured engine for `model` played by pod `pod_name`, answering without delay.
    pub fn new(model: impl Into<String>, pod_name: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            lora_adapters: Vec::new(),
            engine: EngineFlavor::Vllm,
            pod_name: pod_name.into(),
            time_to_first_token: Duration::ZERO,
            inter_token_latency: Duration::ZERO,
            output_tokens: DEFAULT_OUTPUT_TOKENS,
            kv_cache_capacity_tokens: DEFAULT_KV_CACHE_CAPACITY_TOKENS,
        }
    }

    /// Rejects configurations the engine could not serve consistently.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model.trim().is_empty() {
            return Err(ConfigError::EmptyModelName);
        }
        for (index, adapter) in self.lora_adapters.iter().enumerate() {
            if adapter.trim().is_empty() {
                return Err(ConfigError::EmptyLoraName);
            }
            if *adapter == self.model || self.lora_adapters[..index].contains(adapter) {
                return Err(ConfigError::DuplicateModelName(adapter.clone()));
            }
        }
        if self.output_tokens == 0 {
            return Err(ConfigError::ZeroOutputTokens);
        }
        if self.kv_cache_capacity_tokens == 0 {
            return Err(ConfigError::ZeroKvCacheCapacity);
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the model name must not be empty")]
    EmptyModelName,
    #[error("LoRA adapter names must not be empty")]
    EmptyLoraName,
    #[error("model name `{0}` is served twice (base model and LoRA names must be distinct)")]
    DuplicateModelName(String),
    #[error("--output-tokens must be at least 1: a request always produces a first token")]
    ZeroOutputTokens,
    #[error("the KV cache capacity must be at least 1 token")]
    ZeroKvCacheCapacity,
}

/// Command line of `switchyard-mock-engine`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "switchyard-mock-engine",
    about = "OpenAI-compatible fake vLLM/SGLang engine for Switchyard tests and demos"
)]
pub struct MockEngineArgs {
    /// Address to listen on.
    #[arg(long, default_value = DEFAULT_HOST)]
    pub host: String,
    /// Port to listen on (0 = any free port; the chosen address is printed).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Base model name served.
    #[arg(long)]
    pub model: String,
    /// LoRA adapter names served on top of the base model, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub lora: Vec<String>,
    /// Engine whose metrics and response shapes are imitated.
    #[arg(long, value_enum, default_value_t = EngineFlavor::Vllm)]
    pub engine: EngineFlavor,
    /// Milliseconds before the first token of each request.
    #[arg(long, default_value_t = 0)]
    pub ttft_ms: u64,
    /// Milliseconds between two tokens of a request.
    #[arg(long, default_value_t = 0)]
    pub itl_ms: u64,
    /// Tokens per completion unless the request's `max_tokens` is lower.
    #[arg(long, default_value_t = DEFAULT_OUTPUT_TOKENS)]
    pub output_tokens: u32,
    /// Pod name reported in completions and `x-mock-pod` (default `mock-<port>`).
    #[arg(long)]
    pub name: Option<String>,
}

impl MockEngineArgs {
    /// The engine configuration; `bound_port` names the pod when `--name` is absent, so that
    /// `--port 0` still yields the port actually bound.
    pub fn to_config(&self, bound_port: u16) -> MockEngineConfig {
        let pod_name = self
            .name
            .clone()
            .unwrap_or_else(|| format!("mock-{bound_port}"));
        MockEngineConfig {
            lora_adapters: self.lora.clone(),
            engine: self.engine,
            time_to_first_token: Duration::from_millis(self.ttft_ms),
            inter_token_latency: Duration::from_millis(self.itl_ms),
            output_tokens: self.output_tokens,
            ..MockEngineConfig::new(self.model.clone(), pod_name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_defaults_match_the_documented_ones() {
        let args = MockEngineArgs::parse_from(["switchyard-mock-engine", "--model", "m"]);
        assert_eq!(args.host, "127.0.0.1");
        assert_eq!(args.port, 8000);
        let config = args.to_config(8000);
        assert_eq!(config.pod_name, "mock-8000");
        assert_eq!(config.engine, EngineFlavor::Vllm);
        assert_eq!(config.output_tokens, 16);
        assert_eq!(config.time_to_first_token, Duration::ZERO);
        assert_eq!(config.inter_token_latency, Duration::ZERO);
        assert!(config.lora_adapters.is_empty());
    }

    #[test]
    fn cli_parses_every_flag() {
        let args = MockEngineArgs::parse_from([
            "switchyard-mock-engine",
            "--host",
            "127.0.0.11",
            "--port",
            "0",
            "--model",
            "base",
            "--lora",
            "a,b",
            "--engine",
            "sglang",
            "--ttft-ms",
            "20",
            "--itl-ms",
            "5",
            "--output-tokens",
            "3",
            "--name",
            "pod-a",
        ]);
        assert_eq!(args.host, "127.0.0.11");
        let config = args.to_config(41000);
        assert_eq!(config.model, "base");
        assert_eq!(config.lora_adapters, vec!["a", "b"]);
        assert_eq!(config.engine, EngineFlavor::Sglang);
        assert_eq!(config.time_to_first_token, Duration::from_millis(20));
        assert_eq!(config.inter_token_latency, Duration::from_millis(5));
        assert_eq!(config.output_tokens, 3);
        assert_eq!(config.pod_name, "pod-a");
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn validation_rejects_ambiguous_or_empty_names() {
        let mut config = MockEngineConfig::new("base", "pod");
        config.lora_adapters = vec!["base".into()];
        assert_eq!(
            config.validate(),
            Err(ConfigError::DuplicateModelName("base".into()))
        );
        config.lora_adapters = vec!["a".into(), "a".into()];
        assert_eq!(
            config.validate(),
            Err(ConfigError::DuplicateModelName("a".into()))
        );
        config.lora_adapters = vec![String::new()];
        assert_eq!(config.validate(), Err(ConfigError::EmptyLoraName));
        let config = MockEngineConfig::new(" ", "pod");
        assert_eq!(config.validate(), Err(ConfigError::EmptyModelName));
        let config = MockEngineConfig {
            output_tokens: 0,
            ..MockEngineConfig::new("m", "pod")
        };
        assert_eq!(config.validate(), Err(ConfigError::ZeroOutputTokens));
    }
}
