//! `least-latency`: a scorer preferring pods with low TTFT and TPOT, weighed
//! against each other by `TTFTTPOTWeightFactor`.

use serde::Deserialize;

use super::{PluginArgs, PluginSpec, parse_yaml_args};
use crate::pb;

pub const NAME: &str = "least-latency";

pub const SPEC: PluginSpec = PluginSpec::scorer(NAME).with_args::<pb::LeastLatencyArgs>();

/// Kthena's default: TTFT and TPOT weigh the same.
pub const DEFAULT_TTFT_TPOT_WEIGHT_FACTOR: f64 = 0.5;

/// `pluginConfig[].args` as users write them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlArgs {
    /// 0 is meaningful (TPOT only).
    #[serde(rename = "TTFTTPOTWeightFactor")]
    ttft_tpot_weight_factor: Option<f64>,
}

impl PluginArgs for pb::LeastLatencyArgs {
    variant_conversions!(LeastLatency);

    fn resolved(&self) -> Self {
        Self {
            ttft_tpot_weight_factor: Some(
                self.ttft_tpot_weight_factor
                    .unwrap_or(DEFAULT_TTFT_TPOT_WEIGHT_FACTOR),
            ),
        }
    }

    fn validate(&self) -> Result<(), String> {
        match self.ttft_tpot_weight_factor {
            Some(factor) if !(0.0..=1.0).contains(&factor) => Err(format!(
                "TTFTTPOTWeightFactor {factor} must be a number in 0..=1"
            )),
            _ => Ok(()),
        }
    }

    fn merge_yaml(&mut self, yaml: &serde_yaml::Value, _: &mut Vec<String>) -> Result<(), String> {
        let args: YamlArgs = parse_yaml_args(yaml)?;
        self.ttft_tpot_weight_factor = args
            .ttft_tpot_weight_factor
            .or(self.ttft_tpot_weight_factor);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{parsed, rejection, with_args};
    use super::*;

    #[test]
    fn parses_validates_and_defaults() {
        let (args, _) = parsed::<pb::LeastLatencyArgs>("TTFTTPOTWeightFactor: 0").expect("valid");
        assert_eq!(args.ttft_tpot_weight_factor, Some(0.0), "0 means TPOT only");
        assert_eq!(
            pb::LeastLatencyArgs::default()
                .resolved()
                .ttft_tpot_weight_factor,
            Some(DEFAULT_TTFT_TPOT_WEIGHT_FACTOR)
        );
        assert!(
            parsed::<pb::LeastLatencyArgs>("ttftTpotWeightFactor: 0.3")
                .expect_err("wrong spelling")
                .contains("unknown field")
        );
        for bad in [1.5, -0.1, f64::NAN] {
            let config = with_args(pb::LeastLatencyArgs {
                ttft_tpot_weight_factor: Some(bad),
            });
            assert!(
                rejection(&config).starts_with("least-latency TTFTTPOTWeightFactor"),
                "{bad}"
            );
        }
    }
}
