//! `session-affinity`: a scorer sending requests that carry the same session
//! header to the same pod (rendezvous hashing of the session id, with bounded
//! load), so every dataplane replica agrees without shared state.

use serde::Deserialize;

use super::{
    DEFAULT_LOAD_BOUND_FACTOR, PluginArgs, PluginSpec, check_load_bound_factor, parse_yaml_args,
};
use crate::pb;

pub const NAME: &str = "session-affinity";

pub const SPEC: PluginSpec = PluginSpec::scorer(NAME).with_args::<pb::SessionAffinityArgs>();

/// Header read unless configured otherwise.
pub const DEFAULT_SESSION_HEADER: &str = "x-session-id";

/// `pluginConfig[].args` as users write them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct YamlArgs {
    /// Any case; "" keeps the default.
    header: Option<String>,
    load_bound_factor: Option<f64>,
}

/// A header name the request path can look up as given: HTTP/2 header names
/// are lower case, and the `http` crate's `HeaderName` accepts these bytes.
fn is_lower_case_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl PluginArgs for pb::SessionAffinityArgs {
    variant_conversions!(SessionAffinity);

    fn resolved(&self) -> Self {
        Self {
            header: Some(
                self.header
                    .clone()
                    .unwrap_or_else(|| DEFAULT_SESSION_HEADER.to_owned()),
            ),
            load_bound_factor: Some(self.load_bound_factor.unwrap_or(DEFAULT_LOAD_BOUND_FACTOR)),
        }
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(header) = self
            .header
            .as_deref()
            .filter(|h| !is_lower_case_header_name(h))
        {
            return Err(format!(
                "header {header:?} is not a valid lower-case HTTP header name"
            ));
        }
        self.load_bound_factor
            .map_or(Ok(()), check_load_bound_factor)
    }

    fn merge_yaml(&mut self, yaml: &serde_yaml::Value, _: &mut Vec<String>) -> Result<(), String> {
        let args: YamlArgs = parse_yaml_args(yaml)?;
        if let Some(header) = args.header.filter(|header| !header.is_empty()) {
            self.header = Some(header.to_ascii_lowercase());
        }
        self.load_bound_factor = args.load_bound_factor.or(self.load_bound_factor);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{parsed, rejection, with_args};
    use super::*;

    #[test]
    fn parses_validates_and_defaults() {
        let (args, _) =
            parsed::<pb::SessionAffinityArgs>("{header: X-Conversation, loadBoundFactor: 1.5}")
                .expect("valid");
        assert_eq!(
            args.header.as_deref(),
            Some("x-conversation"),
            "lower-cased"
        );
        assert_eq!(args.load_bound_factor, Some(1.5));
        let (args, _) = parsed::<pb::SessionAffinityArgs>("header: ''").expect("valid");
        assert_eq!(
            args.header.as_deref(),
            Some(DEFAULT_SESSION_HEADER),
            "'' keeps the default"
        );
        assert_eq!(
            pb::SessionAffinityArgs::default().resolved(),
            pb::SessionAffinityArgs {
                header: Some(DEFAULT_SESSION_HEADER.to_owned()),
                load_bound_factor: Some(DEFAULT_LOAD_BOUND_FACTOR),
            }
        );
        for bad in ["x session", "", "x:y"] {
            let config = with_args(pb::SessionAffinityArgs {
                header: Some(bad.to_owned()),
                load_bound_factor: None,
            });
            assert_eq!(
                rejection(&config),
                format!(
                    "session-affinity header {bad:?} is not a valid lower-case HTTP header name"
                )
            );
        }
        let config = with_args(pb::SessionAffinityArgs {
            header: None,
            load_bound_factor: Some(0.9),
        });
        assert!(rejection(&config).starts_with("session-affinity loadBoundFactor 0.9"));
    }
}
