//! The router configuration file (`--router-config FILE`): the Kthena
//! router's format, `scheduler` and `auth` sections, plus Switchyard's
//! `tiers` (the latter two are parsed in `router_config/auth_and_tiers.rs`),
//! `outlierDetection`, and `fairness`, the admission queue
//! (`router_config/fairness.rs`).
//!
//! ```yaml
//! scheduler:
//!   topN: 5                     # Switchyard: candidates tried in order
//!   maxLoadAge: 5s              # Switchyard: older engine metrics are not trusted
//!   pluginConfig:
//!   - name: least-request
//!     args: {maxWaitingRequests: 10}
//!   - name: least-latency
//!     args: {TTFTTPOTWeightFactor: 0.5}
//!   - name: prefix-cache
//!     args: {blockSizeToHash: 64, maxBlocksToMatch: 128, maxHashCacheSize: 50000,
//!            affinityBlocks: 16, loadBoundFactor: 1.25}
//!   - name: session-affinity
//!     args: {header: x-session-id, loadBoundFactor: 1.25}
//!   plugins:
//!     Filter: {enabled: [least-request]}
//!     Score:
//!       enabled: [{name: least-request, weight: 1}, {name: prefix-cache, weight: 1}]
//! ```
//!
//! ```yaml
//! outlierDetection:             # when dataplanes eject a pod whose attempts keep failing
//!   consecutiveFailures: 5      # failures in a row (a refused connection ejects at once)
//!   baseEjectionTime: 10s       # first ejection; each recent one adds as much again
//!   maxEjectionTime: 5m
//!   maxEjectionPercent: 50      # of a ModelServer's pods at once (always at least one)
//!   modelServers:               # per ModelServer (namespace/name, or name in default)
//!     prod/llama: {consecutiveFailures: 3}
//! ```
//!
//! Each plugin's arguments are parsed, defaulted and checked by the plugin's
//! own spec in `switchyard_snapshot::scheduler`; this module reads the rest of
//! the section. The result travels inside the snapshot, so every dataplane
//! applies a change without restarting. A file that does not parse or
//! validate is rejected with the reason and the previous configuration stays
//! in force.

mod auth_and_tiers;
mod fairness;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use switchyard_snapshot::pb;
use switchyard_snapshot::scheduler::{self, SchedulerConfigError};
use tokio::sync::watch;

pub use auth_and_tiers::JwtSettings;

/// How often the file is checked for changes: like the config directory, a
/// poll (works on ConfigMap volumes, whose updates are symlink swaps).
pub const ROUTER_CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Longest `maxEjectionTime` (and `baseEjectionTime`) accepted: an hour
/// keeps a broken pod out for as long as anyone would want without
/// forgetting it for good, and bounds what a dataplane may report.
pub const MAX_EJECTION_TIME_LIMIT: Duration = Duration::from_secs(3600);

/// Why a router configuration file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum RouterConfigError {
    #[error("cannot read router configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("router configuration {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("router configuration {path}: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: SchedulerConfigError,
    },
}

#[derive(Debug, Deserialize)]
struct RouterConfigFile {
    #[serde(default)]
    scheduler: Option<SchedulerSection>,
    /// JWT verification (see `router_config/auth_and_tiers.rs`).
    #[serde(default)]
    auth: Option<serde_yaml::Value>,
    /// Per-user token budgets of each tier (see `router_config/auth_and_tiers.rs`).
    #[serde(default)]
    tiers: Option<serde_yaml::Value>,
    /// The admission queue (see `router_config/fairness.rs`).
    #[serde(default)]
    fairness: Option<serde_yaml::Value>,
    #[serde(default, rename = "outlierDetection")]
    outlier_detection: Option<OutlierSection>,
    /// Sections Switchyard does not read: named in a warning, never
    /// silently dropped.
    #[serde(flatten)]
    unread: BTreeMap<String, serde_yaml::Value>,
}

/// `outlierDetection`: the defaults of every ModelServer, and per-ModelServer values.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OutlierSection {
    consecutive_failures: Option<u32>,
    base_ejection_time: Option<String>,
    max_ejection_time: Option<String>,
    max_ejection_percent: Option<u32>,
    #[serde(default)]
    model_servers: BTreeMap<String, OutlierFields>,
}

/// One ModelServer's entry of `outlierDetection.modelServers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OutlierFields {
    consecutive_failures: Option<u32>,
    base_ejection_time: Option<String>,
    max_ejection_time: Option<String>,
    max_ejection_percent: Option<u32>,
}

/// The outlier detection to ship: every ModelServer's defaults (RouteConfig)
/// and each named ModelServer's own values, unset fields falling through to
/// the defaults and then to the dataplane's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutlierConfig {
    pub defaults: Option<pb::OutlierDetection>,
    /// By `namespace/name`.
    pub model_servers: BTreeMap<String, pb::OutlierDetection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SchedulerSection {
    #[serde(default)]
    plugin_config: Vec<PluginConfigEntry>,
    #[serde(default)]
    plugins: Option<PluginsSection>,
    #[serde(default, rename = "topN")]
    top_n: Option<u32>,
    #[serde(default)]
    max_load_age: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginConfigEntry {
    name: String,
    #[serde(default)]
    args: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginsSection {
    #[serde(rename = "Filter", default)]
    filter: Option<FilterSet>,
    #[serde(rename = "Score", default)]
    score: Option<ScoreSet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterSet {
    #[serde(default)]
    enabled: Vec<String>,
    /// Parsed and ignored, as in the Kthena router.
    #[serde(default)]
    #[allow(dead_code)]
    disabled: Vec<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreSet {
    #[serde(default)]
    enabled: Vec<ScoreEntry>,
    #[serde(default)]
    #[allow(dead_code)]
    disabled: Vec<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreEntry {
    name: String,
    /// Absent = 1; negative = 0, as in the Kthena router.
    #[serde(default)]
    weight: Option<i64>,
}

/// A parsed file: the scheduler configuration to ship (None = the file has
/// no scheduler section; dataplanes use their defaults), the JWT settings,
/// the tiers' budgets, the outlier detection to ship, and warnings to log.
/// The default is the configuration without a file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouterConfig {
    pub scheduler: Option<pb::SchedulerConfig>,
    pub auth: Option<JwtSettings>,
    pub tiers: Vec<pb::TierRateLimit>,
    /// None = no admission queue.
    pub fairness: Option<pb::FairnessConfig>,
    pub outlier_detection: OutlierConfig,
    pub warnings: Vec<String>,
}

/// Parses one level of `outlierDetection` (`at` names it in errors).
fn outlier_detection(
    at: &str,
    consecutive_failures: Option<u32>,
    base_ejection_time: Option<&str>,
    max_ejection_time: Option<&str>,
    max_ejection_percent: Option<u32>,
) -> Result<pb::OutlierDetection, String> {
    let duration = |field: &str, text: Option<&str>| -> Result<Option<u64>, String> {
        let Some(text) = text else {
            return Ok(None);
        };
        let duration = switchyard_crd::parse_go_duration(text)
            .map_err(|error| format!("{at}.{field} {text:?}: {error}"))?;
        if duration.is_zero() || duration > MAX_EJECTION_TIME_LIMIT {
            return Err(format!(
                "{at}.{field} {text:?}: must be more than 0 and at most {MAX_EJECTION_TIME_LIMIT:?}"
            ));
        }
        Ok(Some(
            u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        ))
    };
    if let Some(percent) = max_ejection_percent.filter(|percent| *percent > 100) {
        return Err(format!(
            "{at}.maxEjectionPercent {percent}: must be 0..=100"
        ));
    }
    Ok(pb::OutlierDetection {
        consecutive_failures,
        base_ejection_time_ms: duration("baseEjectionTime", base_ejection_time)?,
        max_ejection_time_ms: duration("maxEjectionTime", max_ejection_time)?,
        max_ejection_percent,
    })
}

/// Parses the `outlierDetection` section.
fn outlier_config(section: Option<&OutlierSection>) -> Result<OutlierConfig, String> {
    let Some(section) = section else {
        return Ok(OutlierConfig::default());
    };
    let defaults = outlier_detection(
        "outlierDetection",
        section.consecutive_failures,
        section.base_ejection_time.as_deref(),
        section.max_ejection_time.as_deref(),
        section.max_ejection_percent,
    )?;
    let mut model_servers = BTreeMap::new();
    for (name, fields) in &section.model_servers {
        let key = match name.split_once('/') {
            Some((namespace, server)) if !namespace.is_empty() && !server.is_empty() => {
                name.clone()
            }
            None if !name.is_empty() => format!("default/{name}"),
            _ => {
                return Err(format!(
                    "outlierDetection.modelServers: {name:?} is not namespace/name or name"
                ));
            }
        };
        let values = outlier_detection(
            &format!("outlierDetection.modelServers[{name}]"),
            fields.consecutive_failures,
            fields.base_ejection_time.as_deref(),
            fields.max_ejection_time.as_deref(),
            fields.max_ejection_percent,
        )?;
        model_servers.insert(key, values);
    }
    Ok(OutlierConfig {
        defaults: Some(defaults),
        model_servers,
    })
}

/// Parses and validates the text of a router configuration file.
pub fn parse_router_config(path: &Path, text: &str) -> Result<RouterConfig, RouterConfigError> {
    let parse_error = |message: String| RouterConfigError::Parse {
        path: path.to_owned(),
        message,
    };
    let file: Option<RouterConfigFile> =
        serde_yaml::from_str(text).map_err(|error| parse_error(error.to_string()))?;
    let Some(file) = file else {
        return Ok(RouterConfig::default());
    };
    let outlier_detection = outlier_config(file.outlier_detection.as_ref()).map_err(parse_error)?;
    let mut warnings: Vec<String> = file
        .unread
        .keys()
        .map(|section| format!("section {section:?} is not read by Switchyard: it has no effect"))
        .collect();
    let auth = match &file.auth {
        None => None,
        Some(block) => {
            let settings = auth_and_tiers::parse_auth(block).map_err(parse_error)?;
            if settings.is_none() {
                warnings.push(
                    "auth names neither jwksUri nor issuer: JWT authentication stays off"
                        .to_owned(),
                );
            }
            settings
        }
    };
    let tiers = file
        .tiers
        .as_ref()
        .map(auth_and_tiers::parse_tiers)
        .transpose()
        .map_err(parse_error)?
        .unwrap_or_default();
    let fairness = file
        .fairness
        .as_ref()
        .map(|block| fairness::parse_fairness(block, &mut warnings))
        .transpose()
        .map_err(parse_error)?;
    let Some(section) = file.scheduler else {
        return Ok(RouterConfig {
            scheduler: None,
            auth,
            tiers,
            fairness,
            outlier_detection,
            warnings,
        });
    };
    let defaults = scheduler::default_config();
    let mut plugin_args = defaults.plugin_args;
    for entry in &section.plugin_config {
        let Some(args_spec) = scheduler::plugin(&entry.name).and_then(|spec| spec.args.as_ref())
        else {
            warnings.push(format!(
                "pluginConfig for {:?} ignored: Switchyard has no such plugin with arguments",
                entry.name
            ));
            continue;
        };
        let index = match plugin_args.iter().position(|args| args_spec.is_own(args)) {
            Some(index) => index,
            None => {
                plugin_args.push(args_spec.defaults());
                plugin_args.len() - 1
            }
        };
        let yaml = entry.args.clone().unwrap_or(serde_yaml::Value::Null);
        args_spec
            .merge_yaml(&mut plugin_args[index], &yaml, &mut warnings)
            .map_err(|error| parse_error(format!("pluginConfig {}: {error}", entry.name)))?;
    }
    let mut max_load_age_ms = defaults.max_load_age_ms;
    if let Some(age) = &section.max_load_age {
        let age = switchyard_crd::parse_go_duration(age)
            .map_err(|error| parse_error(format!("maxLoadAge {age:?}: {error}")))?;
        if age.is_zero() {
            return Err(parse_error(
                "maxLoadAge must be greater than zero".to_owned(),
            ));
        }
        max_load_age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
    }
    let (filter, score) = match section.plugins {
        Some(plugins) => (plugins.filter, plugins.score),
        None => (None, None),
    };
    let filters = filter.map_or(defaults.filters, |set| set.enabled);
    let mut scores: Vec<pb::ScorePlugin> = match score {
        Some(set) => set
            .enabled
            .into_iter()
            .map(|entry| pb::ScorePlugin {
                weight: u32::try_from(entry.weight.unwrap_or(1).max(0)).unwrap_or(u32::MAX),
                name: entry.name,
            })
            .collect(),
        None => defaults.scores,
    };
    if scores.len() > 1 && scores.iter().any(|s| s.name == scheduler::random::NAME) {
        scores.retain(|s| s.name != scheduler::random::NAME);
        warnings.push("score plugin random is meant to be used alone; removed because other score plugins are enabled".to_owned());
    }
    let config = pb::SchedulerConfig {
        filters,
        scores,
        top_n: section.top_n.unwrap_or(scheduler::DEFAULT_TOP_N),
        max_load_age_ms,
        plugin_args,
    };
    scheduler::validate(&config).map_err(|source| RouterConfigError::Invalid {
        path: path.to_owned(),
        source,
    })?;
    Ok(RouterConfig {
        scheduler: Some(config),
        auth,
        tiers,
        fairness,
        outlier_detection,
        warnings,
    })
}

/// Reads and parses the file.
pub async fn load_router_config(path: &Path) -> Result<RouterConfig, RouterConfigError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| RouterConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
    parse_router_config(path, &text)
}

fn log_warnings(path: &Path, config: &RouterConfig) {
    for warning in &config.warnings {
        tracing::warn!(path = %path.display(), "router configuration: {warning}");
    }
}

/// Loads the file once (an error here is fatal: there is no previous
/// configuration to keep) and returns its parsed configuration and the watcher
/// to run: it polls the file; each valid change is sent, each invalid one is
/// logged and ignored.
pub async fn watch_router_config(
    path: PathBuf,
) -> Result<
    (
        watch::Receiver<RouterConfig>,
        impl Future<Output = ()> + Send + 'static,
    ),
    RouterConfigError,
> {
    let text =
        tokio::fs::read_to_string(&path)
            .await
            .map_err(|source| RouterConfigError::Read {
                path: path.clone(),
                source,
            })?;
    let initial = parse_router_config(&path, &text)?;
    log_warnings(&path, &initial);
    tracing::info!(path = %path.display(), scheduler = ?initial.scheduler, auth = ?initial.auth, tiers = initial.tiers.len(), fairness = ?initial.fairness, outlier_detection = ?initial.outlier_detection, "router configuration loaded");
    let (sender, receiver) = watch::channel(initial);
    let watcher = async move {
        let mut last_text = text;
        let mut interval = tokio::time::interval(ROUTER_CONFIG_POLL_INTERVAL);
        interval.tick().await;
        loop {
            interval.tick().await;
            let text = match tokio::fs::read_to_string(&path).await {
                Ok(text) => text,
                Err(error) => {
                    if !last_text.is_empty() {
                        tracing::error!(path = %path.display(), %error, "cannot read router configuration; keeping the previous one");
                        last_text.clear();
                    }
                    continue;
                }
            };
            if text == last_text {
                continue;
            }
            match parse_router_config(&path, &text) {
                Ok(config) => {
                    log_warnings(&path, &config);
                    tracing::info!(path = %path.display(), scheduler = ?config.scheduler, auth = ?config.auth, tiers = config.tiers.len(), fairness = ?config.fairness, outlier_detection = ?config.outlier_detection, "router configuration reloaded");
                    sender.send_replace(config);
                }
                Err(error) => {
                    tracing::error!(%error, "router configuration rejected; keeping the previous one");
                }
            }
            last_text = text;
        }
    };
    Ok((receiver, watcher))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RouterConfig, RouterConfigError> {
        parse_router_config(Path::new("router.yaml"), text)
    }

    #[test]
    fn a_section_switchyard_does_not_read_is_named_in_a_warning() {
        let config = parse("scheduler: {}\nkvCacheEvents: {enabled: true}\n").expect("parses");
        assert_eq!(
            config.warnings,
            ["section \"kvCacheEvents\" is not read by Switchyard: it has no effect"]
        );
        let without_scheduler = parse("somethingElse: 1\n").expect("parses");
        assert_eq!(without_scheduler.warnings.len(), 1);
        assert_eq!(without_scheduler.scheduler, None);
    }

    #[test]
    fn kthena_chart_default_parses() {
        let config = parse(
            r#"
scheduler:
  pluginConfig:
  - name: least-request
    args:
      maxWaitingRequests: 10
  - name: least-latency
    args:
      TTFTTPOTWeightFactor: 0.5
  - name: prefix-cache
    args:
      blockSizeToHash: 64
      maxBlocksToMatch: 128
      maxHashCacheSize: 50000
  plugins:
    Filter:
      enabled:
        - least-request
      disabled:
        - lora-affinity
    Score:
      enabled:
        - name: least-request
          weight: 1
        - name: gpu-usage
          weight: 1
        - name: least-latency
          weight: 1
        - name: prefix-cache
          weight: 1
auth:
  issuer: https://issuer.example
  audiences: [switchyard]
"#,
        )
        .expect("valid");
        let scheduler = config.scheduler.expect("section");
        let defaults = scheduler::default_config();
        assert_eq!(scheduler.filters, defaults.filters);
        assert_eq!(scheduler.plugin_args, defaults.plugin_args);
        assert_eq!(scheduler.top_n, defaults.top_n);
        assert_eq!(scheduler.max_load_age_ms, defaults.max_load_age_ms);
        let weights: Vec<(&str, u32)> = scheduler
            .scores
            .iter()
            .map(|s| (s.name.as_str(), s.weight))
            .collect();
        assert_eq!(
            weights,
            [
                ("least-request", 1),
                ("gpu-usage", 1),
                ("least-latency", 1),
                ("prefix-cache", 1)
            ]
        );
        assert!(config.warnings.is_empty());
    }

    #[test]
    fn no_scheduler_section_means_defaults_not_nothing() {
        assert_eq!(
            parse("auth:\n  issuer: https://x\n")
                .expect("valid")
                .scheduler,
            None
        );
        assert_eq!(parse("").expect("valid").scheduler, None);
        let partial = parse("scheduler:\n  topN: 3\n").expect("valid");
        let scheduler = partial.scheduler.expect("section");
        assert_eq!(scheduler.top_n, 3);
        assert_eq!(scheduler.scores, scheduler::default_config().scores);
    }

    #[test]
    fn auth_and_tiers_sections() {
        let config = parse(
            "auth:\n  jwksUri: http://127.0.0.1:9/keys\n  tierClaim: plan\ntiers:\n  free: {inputTokensPerUnit: 100, unit: minute}\n",
        )
        .expect("valid");
        let auth = config.auth.expect("auth");
        assert_eq!(auth.jwks_uri.as_deref(), Some("http://127.0.0.1:9/keys"));
        assert_eq!(auth.tier_claim, "plan");
        assert_eq!(config.tiers.len(), 1);
        assert_eq!(config.scheduler, None);
        assert_eq!(config.fairness, None, "no block, no queue");
        let fair = parse("fairness:\n  maxConcurrent: 2\n").expect("valid");
        assert_eq!(fair.fairness.expect("on").max_concurrent_per_pod, 2);
        let error = parse("fairness:\n  maxConcurrent: 0\n").expect_err("zero");
        assert!(error.to_string().contains("maxConcurrent"), "{error}");
        let error = parse("tiers:\n  free: {unit: minute}\n").expect_err("no budget");
        assert!(error.to_string().contains("tiers.free"), "{error}");
    }

    #[test]
    fn switchyard_arguments_and_random_alone() {
        let config = parse(
            r#"
scheduler:
  maxLoadAge: 2s
  pluginConfig:
  - name: session-affinity
    args: {header: X-Conversation, loadBoundFactor: 1.5}
  - name: kvcache-aware
    args: {vllmTokenizerPort: 8000}
  plugins:
    Filter: {enabled: [lora-affinity]}
    Score:
      enabled: [{name: random}, {name: session-affinity, weight: -3}]
"#,
        )
        .expect("valid");
        let scheduler = config.scheduler.expect("section");
        let args: pb::SessionAffinityArgs = scheduler::plugin_args(&scheduler);
        assert_eq!(args.header.as_deref(), Some("x-conversation"));
        assert_eq!(args.load_bound_factor, Some(1.5));
        assert_eq!(scheduler.max_load_age_ms, 2000);
        assert_eq!(scheduler.filters, vec!["lora-affinity"]);
        assert_eq!(
            scheduler.scores,
            vec![pb::ScorePlugin {
                name: "session-affinity".into(),
                weight: 0
            }]
        );
        assert_eq!(config.warnings.len(), 2, "{:?}", config.warnings);
    }

    #[test]
    fn each_plugin_reads_its_own_arguments() {
        let config = parse(
            r#"
scheduler:
  pluginConfig:
  - name: prefix-cache
    args: {loadBoundFactor: 2, blockSizeToHash: 32}
  - name: prefix-cache
    args: {maxBlocksToMatch: 16}
  - name: session-affinity
    args: {loadBoundFactor: 1.5}
  - name: gpu-usage
    args: {}
"#,
        )
        .expect("valid");
        let scheduler = config.scheduler.expect("section");
        let prefix: pb::PrefixCacheArgs = scheduler::plugin_args(&scheduler);
        let session: pb::SessionAffinityArgs = scheduler::plugin_args(&scheduler);
        assert_eq!(prefix.load_bound_factor, Some(2.0));
        assert_eq!(session.load_bound_factor, Some(1.5), "its own bound");
        assert_eq!(
            (prefix.block_size_to_hash, prefix.max_blocks_to_match),
            (Some(32), Some(16)),
            "a second entry for a plugin adds to the first"
        );
        assert_eq!(
            scheduler.plugin_args.len(),
            scheduler::default_plugin_args().len(),
            "one entry per plugin"
        );
        assert_eq!(
            config.warnings,
            [
                "pluginConfig for \"gpu-usage\" ignored: Switchyard has no such plugin with arguments"
            ]
        );
    }

    #[test]
    fn outlier_detection_defaults_and_per_model_server_values() {
        let config = parse(
            r#"
outlierDetection:
  consecutiveFailures: 3
  baseEjectionTime: 5s
  maxEjectionPercent: 30
  modelServers:
    prod/llama: {maxEjectionTime: 2m, consecutiveFailures: 0}
    mistral: {maxEjectionPercent: 100}
"#,
        )
        .expect("valid");
        assert_eq!(config.scheduler, None, "no scheduler section: the defaults");
        let outlier = config.outlier_detection;
        assert_eq!(
            outlier.defaults,
            Some(pb::OutlierDetection {
                consecutive_failures: Some(3),
                base_ejection_time_ms: Some(5_000),
                max_ejection_time_ms: None,
                max_ejection_percent: Some(30),
            })
        );
        assert_eq!(
            outlier.model_servers["prod/llama"],
            pb::OutlierDetection {
                consecutive_failures: Some(0),
                max_ejection_time_ms: Some(120_000),
                ..Default::default()
            }
        );
        assert_eq!(
            outlier.model_servers["default/mistral"].max_ejection_percent,
            Some(100),
            "a bare name is in the default namespace"
        );
        assert_eq!(
            parse("").expect("valid").outlier_detection,
            OutlierConfig::default()
        );
    }

    #[test]
    fn invalid_files_are_rejected_with_the_reason() {
        let cases = [
            ("scheduler: [", "router.yaml"),
            (
                "scheduler:\n  plugins:\n    Score:\n      enabled: [{name: fastest}]\n",
                "unknown score plugin \"fastest\"",
            ),
            (
                "scheduler:\n  plugins:\n    Filter: {enabled: [kvcache-aware]}\n",
                "unknown filter plugin",
            ),
            (
                "scheduler:\n  plugins:\n    Score: {enabled: []}\n",
                "no score plugin",
            ),
            (
                "scheduler:\n  pluginConfig:\n  - name: least-latency\n    args: {TTFTTPOTWeightFactor: 2}\n",
                "TTFTTPOTWeightFactor",
            ),
            (
                "scheduler:\n  pluginConfig:\n  - name: least-request\n    args: {maxWaiting: 2}\n",
                "unknown field `maxWaiting`",
            ),
            ("scheduler:\n  topN: 99\n", "topN 99"),
            ("scheduler:\n  maxLoadAge: soon\n", "maxLoadAge"),
            ("scheduler:\n  sheduler: typo\n", "unknown field `sheduler`"),
            (
                "outlierDetection:\n  maxEjectionPercent: 101\n",
                "outlierDetection.maxEjectionPercent 101: must be 0..=100",
            ),
            (
                "outlierDetection:\n  baseEjectionTime: 0s\n",
                "outlierDetection.baseEjectionTime",
            ),
            (
                "outlierDetection:\n  modelServers: {a: {maxEjectionTime: 2h}}\n",
                "outlierDetection.modelServers[a].maxEjectionTime \"2h\": must be more than 0 and at most 3600s",
            ),
            (
                "outlierDetection:\n  modelServers: {/x: {}}\n",
                "is not namespace/name or name",
            ),
            (
                "outlierDetection:\n  consecutiveFailure: 3\n",
                "unknown field `consecutiveFailure`",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(text).expect_err(text).to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
