//! `least-request`: as a filter, pods whose engine queue is below a bound; as
//! a scorer, pods with the fewest requests.

use serde::Deserialize;

use super::{PluginArgs, PluginSpec, parse_yaml_args};
use crate::pb;

pub const NAME: &str = "least-request";

pub const SPEC: PluginSpec =
    PluginSpec::filter_and_scorer(NAME).with_args::<pb::LeastRequestArgs>();

/// Kthena's default bound of the filter.
pub const DEFAULT_MAX_WAITING_REQUESTS: u32 = 10;

/// `pluginConfig[].args` as users write them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct YamlArgs {
    /// 0 keeps the default, as in the Kthena router.
    max_waiting_requests: Option<u32>,
}

impl PluginArgs for pb::LeastRequestArgs {
    variant_conversions!(LeastRequest);

    fn resolved(&self) -> Self {
        Self {
            max_waiting_requests: Some(
                self.max_waiting_requests
                    .unwrap_or(DEFAULT_MAX_WAITING_REQUESTS),
            ),
        }
    }

    fn validate(&self) -> Result<(), String> {
        match self.max_waiting_requests {
            Some(0) => Err("maxWaitingRequests must be at least 1".to_owned()),
            _ => Ok(()),
        }
    }

    fn merge_yaml(&mut self, yaml: &serde_yaml::Value, _: &mut Vec<String>) -> Result<(), String> {
        let args: YamlArgs = parse_yaml_args(yaml)?;
        self.max_waiting_requests = args
            .max_waiting_requests
            .filter(|max| *max > 0)
            .or(self.max_waiting_requests);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{parsed, rejection, with_args};
    use super::*;

    #[test]
    fn parses_validates_and_defaults() {
        let (args, warnings) =
            parsed::<pb::LeastRequestArgs>("maxWaitingRequests: 3").expect("valid");
        assert_eq!(args.max_waiting_requests, Some(3));
        assert!(warnings.is_empty());
        let (args, _) = parsed::<pb::LeastRequestArgs>("maxWaitingRequests: 0").expect("valid");
        assert_eq!(
            args.max_waiting_requests,
            Some(DEFAULT_MAX_WAITING_REQUESTS),
            "0 keeps the default"
        );
        let (args, _) = parsed::<pb::LeastRequestArgs>("null").expect("valid");
        assert_eq!(args, pb::LeastRequestArgs::default().resolved());
        assert!(
            parsed::<pb::LeastRequestArgs>("maxWaiting: 2")
                .expect_err("typo")
                .contains("unknown field `maxWaiting`")
        );
        assert_eq!(
            pb::LeastRequestArgs::default()
                .resolved()
                .max_waiting_requests,
            Some(DEFAULT_MAX_WAITING_REQUESTS)
        );
        assert!(
            rejection(&with_args(pb::LeastRequestArgs {
                max_waiting_requests: Some(0),
            }))
            .contains("least-request maxWaitingRequests must be at least 1")
        );
    }
}
