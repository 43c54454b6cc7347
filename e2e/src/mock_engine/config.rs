//! What one mock engine serves and how fast, plus the command line that builds it.

use std::time::Duration;

use clap::Parser;

use super::pd::{DEFAULT_HANDSHAKE_TIMEOUT, PdConfig, PdRole};

/// Completion length when the request does not cap it: the `max_tokens` of the vLLM exchanges
/// recorded in `testdata/vllm/`, so mock responses are as long as the real ones.
pub const DEFAULT_OUTPUT_TOKENS: u32 = 16;

/// KV cache size in tokens: that of the vLLM engine recorded in `testdata/vllm/` (128 blocks of
/// 32 tokens), so mock `kv_cache_usage_perc` values are on the same scale as the recorded ones.
pub const DEFAULT_KV_CACHE_CAPACITY_TOKENS: u64 = 4096;

/// Listen address when `--host` is not given: loopback, because the mock is a test fixture and
/// must not be reachable from other machines by accident.
pub const DEFAULT_HOST: &str = "127.0.0.1";

/// Listen port when `--port` is not given: vLLM's default serving port, which is also the
/// `workloadPort` in the Kthena examples.
pub const DEFAULT_PORT: u16 = 8000;

/// Engine steps a simulated engine may run at once when `--max-num-seqs` is not given: the
/// `--max-num-seqs 8` of the vLLM engine recorded in `testdata/vllm/`, small enough that a handful of
/// concurrent test requests already makes others wait.
pub const DEFAULT_MAX_NUM_SEQS: u32 = 8;

/// KV cache blocks of a simulated engine: with [`DEFAULT_BLOCK_SIZE`] that is 8192 tokens, room
/// for a few dozen multi-hundred-token prompts, so eviction only starts under real pressure.
pub const DEFAULT_KV_BLOCKS: u32 = 512;

/// Tokens per KV block: vLLM's default `--block-size` on GPUs, and therefore the granularity at
/// which its prefix cache matches.
pub const DEFAULT_BLOCK_SIZE: u32 = 16;

/// Prefill cost per uncached prompt token: about 20k tokens/s, the prefill throughput of an 8B
/// model on one data-centre GPU, so a 1000-token cold prompt costs 50 ms.
pub const DEFAULT_PREFILL_MS_PER_TOKEN: f64 = 0.05;

/// Decode step time of a simulated engine with a single running sequence when `--itl-ms` is not
/// given: the ~10 ms inter-token latency of an 8B model on one GPU at batch size 1.
pub const DEFAULT_SIM_ITL_MS: u64 = 10;

/// Extra decode step time per running sequence: memory-bound decoding slows down mildly with the
/// batch, so 8 sequences add 4 ms to the 10 ms base.
pub const DEFAULT_ITL_MS_PER_SEQ: f64 = 0.5;

/// Seed of a simulated engine when `--seed` is not given; any fixed value keeps runs repeatable.
pub const DEFAULT_SEED: u64 = 0;

/// Simulated time runs at wall-clock speed unless `--time-scale` says otherwise.
pub const DEFAULT_TIME_SCALE: f64 = 1.0;

/// Step times are exact unless `--latency-jitter` asks for noise, so tests see the model's
/// latencies unblurred.
pub const DEFAULT_LATENCY_JITTER: f64 = 0.0;

/// How tokens are scheduled: `simple` serves every request at once at a fixed pace, `sim`
/// simulates a continuous-batching engine with a paged, prefix-caching KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    #[default]
    Simple,
    Sim,
}

/// The scheduler behind the HTTP layer.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum EngineMode {
    /// [`PacedBackend`](super::backend::PacedBackend): the configured TTFT and ITL for every
    /// request, nothing ever waits.
    #[default]
    Simple,
    /// [`Simulator`](super::sim::Simulator): latency and load follow from batching and caching.
    Sim(SimConfig),
}

/// Parameters of the engine simulator. Latencies are milliseconds of simulated time; the
/// `time_scale` factor turns them into tokio time.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Sequences decoded together at most (vLLM's `--max-num-seqs`); the rest wait.
    pub max_num_seqs: u32,
    /// KV cache size in blocks.
    pub kv_blocks: u32,
    /// Tokens per KV block, the unit of allocation and of prefix matching.
    pub block_size: u32,
    /// Prefill time per prompt token not found in the prefix cache.
    pub prefill_ms_per_token: f64,
    /// Decode step time of an empty batch; the inter-token latency is this plus
    /// `itl_ms_per_seq` per running sequence.
    pub itl_ms: f64,
    pub itl_ms_per_seq: f64,
    /// Seeds the block hashes and the latency jitter.
    pub seed: u64,
    /// Multiplies every simulated duration: 0.1 runs ten times faster than modelled.
    pub time_scale: f64,
    /// Each step lasts its modelled time times a factor drawn uniformly from
    /// `1 ± latency_jitter`; 0 makes step times exact.
    pub latency_jitter: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: DEFAULT_MAX_NUM_SEQS,
            kv_blocks: DEFAULT_KV_BLOCKS,
            block_size: DEFAULT_BLOCK_SIZE,
            prefill_ms_per_token: DEFAULT_PREFILL_MS_PER_TOKEN,
            itl_ms: DEFAULT_SIM_ITL_MS as f64,
            itl_ms_per_seq: DEFAULT_ITL_MS_PER_SEQ,
            seed: DEFAULT_SEED,
            time_scale: DEFAULT_TIME_SCALE,
            latency_jitter: DEFAULT_LATENCY_JITTER,
        }
    }
}

impl SimConfig {
    /// Tokens the KV cache holds.
    pub fn kv_capacity_tokens(&self) -> u64 {
        u64::from(self.kv_blocks) * u64::from(self.block_size)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_num_seqs == 0 {
            return Err(ConfigError::ZeroSimParameter("--max-num-seqs"));
        }
        if self.kv_blocks == 0 {
            return Err(ConfigError::ZeroSimParameter("--kv-blocks"));
        }
        if self.block_size == 0 {
            return Err(ConfigError::ZeroSimParameter("--block-size"));
        }
        let non_negative = [
            ("--prefill-ms-per-token", self.prefill_ms_per_token),
            ("--itl-ms", self.itl_ms),
            ("--itl-ms-per-seq", self.itl_ms_per_seq),
        ];
        for (flag, value) in non_negative {
            if !(value.is_finite() && value >= 0.0) {
                return Err(ConfigError::InvalidSimLatency { flag, value });
            }
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return Err(ConfigError::InvalidTimeScale(self.time_scale));
        }
        if !(0.0..1.0).contains(&self.latency_jitter) {
            return Err(ConfigError::InvalidJitter(self.latency_jitter));
        }
        Ok(())
    }
}

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

/// A broken engine, for failure tests: how every inference request fails.
/// `/health`, `/metrics` and `/v1/models` keep answering, as they do on a
/// real engine whose inference path is broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answered at once with this status (4xx or 5xx) and vLLM's error body.
    Status(u16),
    /// Streamed responses: the connection is cut after this many events,
    /// without the end of the body. Other responses are not affected.
    CutStreamAfter(u32),
    /// The request is read and never answered.
    Hang,
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
    /// Denominator of the KV cache usage gauge (simple mode; the simulator's cache size is
    /// [`SimConfig::kv_capacity_tokens`]).
    pub kv_cache_capacity_tokens: u64,
    /// Simple pacing or the engine simulator. In sim mode latencies come from [`SimConfig`]
    /// and `time_to_first_token` / `inter_token_latency` must stay zero.
    pub mode: EngineMode,
    /// How every inference request fails, if the engine is to be broken.
    pub fault: Option<Fault>,
    /// The part of a prefill/decode pair this engine plays, if any.
    pub pd: Option<PdConfig>,
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
            mode: EngineMode::Simple,
            fault: None,
            pd: None,
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
        if let Some(Fault::Status(status)) = self.fault
            && !(400..=599).contains(&status)
        {
            return Err(ConfigError::InvalidFailStatus(status));
        }
        if let EngineMode::Sim(sim) = &self.mode {
            if !self.time_to_first_token.is_zero() || !self.inter_token_latency.is_zero() {
                return Err(ConfigError::FixedLatencyInSimMode);
            }
            sim.validate()?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
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
    #[error(
        "fixed latencies (--ttft-ms) do not apply in sim mode: latency follows from queueing, \
         prefill and batch size"
    )]
    FixedLatencyInSimMode,
    #[error("{0} must be at least 1")]
    ZeroSimParameter(&'static str),
    #[error("{flag} must be a finite number of milliseconds >= 0, got {value}")]
    InvalidSimLatency { flag: &'static str, value: f64 },
    #[error("--time-scale must be a finite factor > 0, got {0}")]
    InvalidTimeScale(f64),
    #[error("--latency-jitter must be in [0, 1), got {0}")]
    InvalidJitter(f64),
    #[error("--fail-status must be a 4xx or 5xx status, got {0}")]
    InvalidFailStatus(u16),
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
    /// Milliseconds between two tokens of a request; in sim mode the decode step time of an
    /// empty batch [default: 0, sim: 10].
    #[arg(long)]
    pub itl_ms: Option<u64>,
    /// Tokens per completion unless the request's `max_tokens` is lower.
    #[arg(long, default_value_t = DEFAULT_OUTPUT_TOKENS)]
    pub output_tokens: u32,
    /// Pod name reported in completions and `x-mock-pod` (default `mock-<port>`).
    #[arg(long)]
    pub name: Option<String>,
    /// `simple`: fixed TTFT/ITL, nothing waits. `sim`: continuous batching with a paged,
    /// prefix-caching KV cache; the flags below apply to it only.
    #[arg(long, value_enum, default_value_t = ModeArg::Simple)]
    pub mode: ModeArg,
    /// Sim: sequences decoded together at most; the rest wait.
    #[arg(long, default_value_t = DEFAULT_MAX_NUM_SEQS)]
    pub max_num_seqs: u32,
    /// Sim: KV cache size in blocks.
    #[arg(long, default_value_t = DEFAULT_KV_BLOCKS)]
    pub kv_blocks: u32,
    /// Sim: tokens per KV block (unit of allocation and prefix matching).
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: u32,
    /// Sim: prefill milliseconds per prompt token not in the prefix cache.
    #[arg(long, default_value_t = DEFAULT_PREFILL_MS_PER_TOKEN)]
    pub prefill_ms_per_token: f64,
    /// Sim: extra decode step milliseconds per running sequence.
    #[arg(long, default_value_t = DEFAULT_ITL_MS_PER_SEQ)]
    pub itl_ms_per_seq: f64,
    /// Sim: seed of block hashes and latency jitter; same seed and requests, same results.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Sim: multiplies every simulated duration (0.1 = ten times faster).
    #[arg(long, default_value_t = DEFAULT_TIME_SCALE)]
    pub time_scale: f64,
    /// Sim: each step lasts its modelled time times a seeded factor in `1 ± this`.
    #[arg(long, default_value_t = DEFAULT_LATENCY_JITTER)]
    pub latency_jitter: f64,
    /// Fault: answer every inference request at once with this status (4xx or 5xx).
    #[arg(long, conflicts_with_all = ["cut_stream_after", "hang"])]
    pub fail_status: Option<u16>,
    /// Fault: cut every streamed response's connection after this many events.
    #[arg(long, conflicts_with = "hang")]
    pub cut_stream_after: Option<u32>,
    /// Fault: read inference requests and never answer them.
    #[arg(long)]
    pub hang: bool,
    /// Play the prefill or the decode engine of prefill/decode pairs.
    #[arg(long, value_enum)]
    pub pd_role: Option<PdRole>,
    /// Prefill: also serve SGLang's bootstrap endpoint on this port (SGLang's default is 8998).
    #[arg(long, requires = "pd_role")]
    pub bootstrap_port: Option<u16>,
    /// How long either side of an SGLang bootstrap pairing waits for the other.
    #[arg(long, default_value_t = DEFAULT_HANDSHAKE_TIMEOUT.as_millis() as u64)]
    pub pd_handshake_timeout_ms: u64,
}

impl MockEngineArgs {
    /// The engine configuration; `bound_port` names the pod when `--name` is absent, so that
    /// `--port 0` still yields the port actually bound.
    pub fn to_config(&self, bound_port: u16) -> MockEngineConfig {
        let pod_name = self
            .name
            .clone()
            .unwrap_or_else(|| format!("mock-{bound_port}"));
        let (mode, inter_token_latency) = match self.mode {
            ModeArg::Simple => (
                EngineMode::Simple,
                Duration::from_millis(self.itl_ms.unwrap_or(0)),
            ),
            ModeArg::Sim => {
                let sim = SimConfig {
                    max_num_seqs: self.max_num_seqs,
                    kv_blocks: self.kv_blocks,
                    block_size: self.block_size,
                    prefill_ms_per_token: self.prefill_ms_per_token,
                    itl_ms: self.itl_ms.unwrap_or(DEFAULT_SIM_ITL_MS) as f64,
                    itl_ms_per_seq: self.itl_ms_per_seq,
                    seed: self.seed,
                    time_scale: self.time_scale,
                    latency_jitter: self.latency_jitter,
                };
                (EngineMode::Sim(sim), Duration::ZERO)
            }
        };
        MockEngineConfig {
            pd: self.pd_role.map(|role| PdConfig {
                role,
                bootstrap_port: self.bootstrap_port,
                handshake_timeout: Duration::from_millis(self.pd_handshake_timeout_ms),
            }),
            lora_adapters: self.lora.clone(),
            engine: self.engine,
            time_to_first_token: Duration::from_millis(self.ttft_ms),
            inter_token_latency,
            output_tokens: self.output_tokens,
            mode,
            fault: self.fault(),
            ..MockEngineConfig::new(self.model.clone(), pod_name)
        }
    }

    fn fault(&self) -> Option<Fault> {
        if self.hang {
            return Some(Fault::Hang);
        }
        self.fail_status
            .map(Fault::Status)
            .or(self.cut_stream_after.map(Fault::CutStreamAfter))
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
    fn sim_mode_collects_its_flags_and_defaults() {
        let args = MockEngineArgs::parse_from(["switchyard-mock-engine", "--model", "m"]);
        assert_eq!(args.to_config(1).mode, EngineMode::Simple);

        let args =
            MockEngineArgs::parse_from(["switchyard-mock-engine", "--model", "m", "--mode", "sim"]);
        let config = args.to_config(1);
        assert_eq!(config.mode, EngineMode::Sim(SimConfig::default()));
        assert_eq!(config.inter_token_latency, Duration::ZERO);
        assert_eq!(config.validate(), Ok(()));

        let args = MockEngineArgs::parse_from([
            "switchyard-mock-engine",
            "--model",
            "m",
            "--mode",
            "sim",
            "--max-num-seqs",
            "4",
            "--kv-blocks",
            "64",
            "--block-size",
            "32",
            "--prefill-ms-per-token",
            "0.1",
            "--itl-ms",
            "20",
            "--itl-ms-per-seq",
            "1.5",
            "--seed",
            "42",
            "--time-scale",
            "0.25",
            "--latency-jitter",
            "0.1",
        ]);
        let expected = SimConfig {
            max_num_seqs: 4,
            kv_blocks: 64,
            block_size: 32,
            prefill_ms_per_token: 0.1,
            itl_ms: 20.0,
            itl_ms_per_seq: 1.5,
            seed: 42,
            time_scale: 0.25,
            latency_jitter: 0.1,
        };
        assert_eq!(expected.kv_capacity_tokens(), 2048);
        assert_eq!(args.to_config(1).mode, EngineMode::Sim(expected));
    }

    #[test]
    fn validation_rejects_unusable_sim_parameters() {
        let sim = |sim: SimConfig| MockEngineConfig {
            mode: EngineMode::Sim(sim),
            ..MockEngineConfig::new("m", "pod")
        };
        let default = SimConfig::default;
        assert_eq!(
            sim(SimConfig {
                max_num_seqs: 0,
                ..default()
            })
            .validate(),
            Err(ConfigError::ZeroSimParameter("--max-num-seqs"))
        );
        assert_eq!(
            sim(SimConfig {
                block_size: 0,
                ..default()
            })
            .validate(),
            Err(ConfigError::ZeroSimParameter("--block-size"))
        );
        assert_eq!(
            sim(SimConfig {
                prefill_ms_per_token: -1.0,
                ..default()
            })
            .validate(),
            Err(ConfigError::InvalidSimLatency {
                flag: "--prefill-ms-per-token",
                value: -1.0
            })
        );
        assert!(matches!(
            sim(SimConfig {
                itl_ms_per_seq: f64::NAN,
                ..default()
            })
            .validate(),
            Err(ConfigError::InvalidSimLatency {
                flag: "--itl-ms-per-seq",
                ..
            })
        ));
        assert_eq!(
            sim(SimConfig {
                time_scale: 0.0,
                ..default()
            })
            .validate(),
            Err(ConfigError::InvalidTimeScale(0.0))
        );
        assert_eq!(
            sim(SimConfig {
                latency_jitter: 1.0,
                ..default()
            })
            .validate(),
            Err(ConfigError::InvalidJitter(1.0))
        );
        let fixed_ttft = MockEngineConfig {
            time_to_first_token: Duration::from_millis(5),
            ..sim(default())
        };
        assert_eq!(
            fixed_ttft.validate(),
            Err(ConfigError::FixedLatencyInSimMode)
        );
    }

    #[test]
    fn fault_flags() {
        let parse = |flags: &[&str]| {
            let mut args = vec!["switchyard-mock-engine", "--model", "m"];
            args.extend_from_slice(flags);
            MockEngineArgs::try_parse_from(args).map(|args| args.to_config(1))
        };
        assert_eq!(parse(&[]).expect("valid").fault, None);
        let failing = parse(&["--fail-status", "503"]).expect("valid");
        assert_eq!(failing.fault, Some(Fault::Status(503)));
        assert_eq!(failing.validate(), Ok(()));
        assert_eq!(
            parse(&["--cut-stream-after", "3"]).expect("valid").fault,
            Some(Fault::CutStreamAfter(3))
        );
        assert_eq!(parse(&["--hang"]).expect("valid").fault, Some(Fault::Hang));
        assert!(
            parse(&["--hang", "--fail-status", "503"]).is_err(),
            "one fault"
        );
        assert_eq!(
            parse(&["--fail-status", "200"]).expect("parses").validate(),
            Err(ConfigError::InvalidFailStatus(200))
        );
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
