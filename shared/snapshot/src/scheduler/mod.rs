//! The scheduler configuration both ends agree on, and one home per plugin.
//!
//! Each plugin's file here says what the controller and the dataplane must
//! agree on: its name, whether it filters or scores, and its arguments (the
//! protocol message, defaults, validation, and parsing from the router
//! configuration file's `pluginConfig`). How it filters or scores lives in one
//! file under `dataplane/src/scheduling/plugins/`. [`PLUGINS`] lists them.
//!
//! The controller parses a router configuration with these and validates it
//! with [`validate`] before shipping it; the dataplane validates again (a
//! snapshot from an older or newer controller must not crash it) and fills in
//! defaults.

use serde::de::DeserializeOwned;

use crate::pb;

/// The `into_variant` / `from_variant` pair of a [`PluginArgs`] impl whose
/// message travels as `pb::plugin_args::Plugin::$variant`.
macro_rules! variant_conversions {
    ($variant:ident) => {
        fn into_variant(self) -> $crate::pb::plugin_args::Plugin {
            $crate::pb::plugin_args::Plugin::$variant(self)
        }

        fn from_variant(variant: &$crate::pb::plugin_args::Plugin) -> Option<&Self> {
            match variant {
                $crate::pb::plugin_args::Plugin::$variant(args) => Some(args),
                _ => None,
            }
        }
    };
}

pub mod gpu_usage;
pub mod least_latency;
pub mod least_request;
pub mod lora_affinity;
pub mod prefix_cache;
pub mod random;
pub mod session_affinity;

/// Every plugin this build knows, in the order they are listed to users and
/// their arguments are shipped.
pub const PLUGINS: &[PluginSpec] = &[
    least_request::SPEC,
    lora_affinity::SPEC,
    gpu_usage::SPEC,
    least_latency::SPEC,
    prefix_cache::SPEC,
    random::SPEC,
    session_affinity::SPEC,
];

/// What both ends know about one plugin.
#[derive(Debug)]
pub struct PluginSpec {
    /// Its name in the router configuration, the snapshot, metrics and logs.
    pub name: &'static str,
    /// It can be enabled under `plugins.Filter`.
    pub filter: bool,
    /// It can be enabled under `plugins.Score`.
    pub score: bool,
    /// Its arguments, for a plugin that takes any.
    pub args: Option<ArgsSpec>,
}

impl PluginSpec {
    /// A plugin enabled under `plugins.Score` only, without arguments.
    pub const fn scorer(name: &'static str) -> Self {
        Self::new(name, false, true)
    }

    /// A plugin enabled under `plugins.Filter` only, without arguments.
    pub const fn filter(name: &'static str) -> Self {
        Self::new(name, true, false)
    }

    /// A plugin that can be enabled as a filter and as a scorer, without arguments.
    pub const fn filter_and_scorer(name: &'static str) -> Self {
        Self::new(name, true, true)
    }

    const fn new(name: &'static str, filter: bool, score: bool) -> Self {
        Self {
            name,
            filter,
            score,
            args: None,
        }
    }

    /// This plugin, taking the arguments message `A`.
    pub const fn with_args<A: PluginArgs>(self) -> Self {
        Self {
            args: Some(ArgsSpec::of::<A>()),
            ..self
        }
    }
}

/// The plugin called `name`.
pub fn plugin(name: &str) -> Option<&'static PluginSpec> {
    PLUGINS.iter().find(|spec| spec.name == name)
}

/// One plugin's arguments message ([`pb::LeastRequestArgs`], ...): its
/// defaults, checks and parsing. An unset field means the default.
pub trait PluginArgs: Clone + Default + PartialEq + 'static {
    /// The message as the protocol's `PluginArgs.plugin` variant.
    fn into_variant(self) -> pb::plugin_args::Plugin;
    /// This plugin's message, when `variant` is it.
    fn from_variant(variant: &pb::plugin_args::Plugin) -> Option<&Self>;
    /// Every unset field at its default.
    fn resolved(&self) -> Self;
    /// Checks resolved arguments; the message names the argument as users
    /// write it in the router configuration.
    fn validate(&self) -> Result<(), String>;
    /// Applies a router configuration's `pluginConfig[].args` (Kthena's
    /// format): each field it sets replaces ours. Fields that are accepted but
    /// not acted on add a warning.
    fn merge_yaml(
        &mut self,
        yaml: &serde_yaml::Value,
        warnings: &mut Vec<String>,
    ) -> Result<(), String>;
}

/// [`PluginArgs`] behind plain function pointers, so that [`PLUGINS`] can list
/// plugins whose arguments are of different types.
#[derive(Debug)]
pub struct ArgsSpec {
    resolved: fn(Option<&pb::plugin_args::Plugin>) -> pb::plugin_args::Plugin,
    is_own: fn(&pb::plugin_args::Plugin) -> bool,
    validate: fn(&pb::plugin_args::Plugin) -> Result<(), String>,
    merge_yaml: fn(
        &mut pb::plugin_args::Plugin,
        &serde_yaml::Value,
        &mut Vec<String>,
    ) -> Result<(), String>,
}

impl ArgsSpec {
    pub const fn of<A: PluginArgs>() -> Self {
        Self {
            resolved: resolved_variant::<A>,
            is_own: is_own_variant::<A>,
            validate: validate_variant::<A>,
            merge_yaml: merge_yaml_into_variant::<A>,
        }
    }

    /// The arguments at their defaults, every field set.
    pub fn defaults(&self) -> pb::PluginArgs {
        self.resolved(None)
    }

    /// `args` (this plugin's, or none) with every unset field at its default.
    pub fn resolved(&self, args: Option<&pb::PluginArgs>) -> pb::PluginArgs {
        pb::PluginArgs {
            plugin: Some((self.resolved)(args.and_then(|args| args.plugin.as_ref()))),
        }
    }

    /// Whether `args` are this plugin's.
    pub fn is_own(&self, args: &pb::PluginArgs) -> bool {
        args.plugin.as_ref().is_some_and(self.is_own)
    }

    /// Applies `pluginConfig[].args` (YAML) to `args`, which must be this
    /// plugin's (or empty: then they start from the defaults).
    pub fn merge_yaml(
        &self,
        args: &mut pb::PluginArgs,
        yaml: &serde_yaml::Value,
        warnings: &mut Vec<String>,
    ) -> Result<(), String> {
        let variant = args.plugin.get_or_insert_with(|| (self.resolved)(None));
        (self.merge_yaml)(variant, yaml, warnings)
    }
}

fn resolved_variant<A: PluginArgs>(
    variant: Option<&pb::plugin_args::Plugin>,
) -> pb::plugin_args::Plugin {
    variant
        .and_then(A::from_variant)
        .cloned()
        .unwrap_or_default()
        .resolved()
        .into_variant()
}

fn is_own_variant<A: PluginArgs>(variant: &pb::plugin_args::Plugin) -> bool {
    A::from_variant(variant).is_some()
}

fn validate_variant<A: PluginArgs>(variant: &pb::plugin_args::Plugin) -> Result<(), String> {
    A::from_variant(variant).map_or(Ok(()), |args| args.resolved().validate())
}

fn merge_yaml_into_variant<A: PluginArgs>(
    variant: &mut pb::plugin_args::Plugin,
    yaml: &serde_yaml::Value,
    warnings: &mut Vec<String>,
) -> Result<(), String> {
    let mut args = A::from_variant(variant).cloned().unwrap_or_default();
    args.merge_yaml(yaml, warnings)?;
    *variant = args.into_variant();
    Ok(())
}

/// Parses one `pluginConfig[].args` mapping; absent or `null` args are all
/// unset.
pub fn parse_yaml_args<T: DeserializeOwned + Default>(
    yaml: &serde_yaml::Value,
) -> Result<T, String> {
    if yaml.is_null() {
        return Ok(T::default());
    }
    serde_yaml::from_value(yaml.clone()).map_err(|error| error.to_string())
}

/// The Kthena router's hard-coded top-N: enough to get past a few dead
/// pods without making a client wait on every pod of a large ModelServer.
pub const DEFAULT_TOP_N: u32 = 5;
/// Upper bound on top-N: candidates are kept inline per request, without allocation.
pub const MAX_TOP_N: u32 = 16;
/// Engine loads are scraped every second; five missed scrapes mean the
/// controller or the pod is in trouble and the numbers describe the past.
pub const DEFAULT_MAX_LOAD_AGE_MS: u64 = 5_000;
/// Consistent hashing with bounded loads (Mirrokni et al.), as session-affinity
/// uses it: 1.25 keeps affinity for most requests while no pod takes more than
/// 25% over the mean (prefix-cache has its own default).
pub const DEFAULT_LOAD_BOUND_FACTOR: f64 = 1.25;

/// The check of a bounded-load plugin's `loadBoundFactor`: below 1 even an
/// evenly loaded set of pods would all be "over".
pub fn check_load_bound_factor(factor: f64) -> Result<(), String> {
    if factor.is_finite() && factor >= 1.0 {
        Ok(())
    } else {
        Err(format!(
            "loadBoundFactor {factor} must be a finite number >= 1"
        ))
    }
}

/// Why a scheduler configuration is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedulerConfigError {
    #[error("unknown filter plugin {0:?} (known: {known})", known = names(|spec| spec.filter))]
    UnknownFilter(String),
    #[error("unknown score plugin {0:?} (known: {known})", known = names(|spec| spec.score))]
    UnknownScore(String),
    #[error("plugin {0:?} is listed twice")]
    Duplicate(String),
    #[error("no score plugin is enabled: every pod would score the same")]
    NoScorePlugin,
    #[error("topN {0} is out of range 1..={MAX_TOP_N}")]
    TopN(u32),
    #[error("{plugin} {message}")]
    InvalidArgs {
        plugin: &'static str,
        message: String,
    },
    #[error("arguments of plugin {0:?} are given twice")]
    DuplicateArgs(&'static str),
    #[error("arguments of a plugin this build does not know")]
    UnknownArgs,
}

fn names(role: impl Fn(&PluginSpec) -> bool) -> String {
    let names: Vec<&str> = PLUGINS
        .iter()
        .filter(|spec| role(spec))
        .map(|spec| spec.name)
        .collect();
    names.join(", ")
}

/// Weight of prefix-cache in the default mix. Kthena's Helm chart weighs
/// every plugin 1, which lets one extra in-flight request on the pod holding
/// a prefix (least-request 100 -> 0) cancel the cache hit. Here prefix-cache
/// already scores 0 on pods over the load bound, so it can outweigh
/// least-request without piling onto a hot pod.
pub const DEFAULT_PREFIX_CACHE_WEIGHT: u32 = 2;

/// The configuration used when the router configuration has no scheduler
/// section: Kthena's Helm chart default (filter least-request; score
/// least-request, gpu-usage, least-latency, prefix-cache), with prefix-cache
/// weighted [`DEFAULT_PREFIX_CACHE_WEIGHT`], every argument at its default.
pub fn default_config() -> pb::SchedulerConfig {
    pb::SchedulerConfig {
        filters: vec![least_request::NAME.to_owned()],
        scores: [
            (least_request::NAME, 1),
            (gpu_usage::NAME, 1),
            (least_latency::NAME, 1),
            (prefix_cache::NAME, DEFAULT_PREFIX_CACHE_WEIGHT),
        ]
        .iter()
        .map(|(name, weight)| pb::ScorePlugin {
            name: (*name).to_owned(),
            weight: *weight,
        })
        .collect(),
        top_n: DEFAULT_TOP_N,
        max_load_age_ms: DEFAULT_MAX_LOAD_AGE_MS,
        plugin_args: default_plugin_args(),
    }
}

/// The arguments of every plugin that takes any, at their defaults, in
/// [`PLUGINS`] order.
pub fn default_plugin_args() -> Vec<pb::PluginArgs> {
    PLUGINS
        .iter()
        .filter_map(|spec| spec.args.as_ref())
        .map(ArgsSpec::defaults)
        .collect()
}

/// The arguments of plugin `A` in `config`, every field set (defaults for
/// what `config` leaves unset).
pub fn plugin_args<A: PluginArgs>(config: &pb::SchedulerConfig) -> A {
    config
        .plugin_args
        .iter()
        .find_map(|args| args.plugin.as_ref().and_then(A::from_variant))
        .cloned()
        .unwrap_or_default()
        .resolved()
}

/// `config` with every default filled in: `top_n`, `max_load_age_ms`, and
/// the arguments of every plugin that takes any, in [`PLUGINS`] order.
pub fn effective(config: &pb::SchedulerConfig) -> pb::SchedulerConfig {
    let plugin_args = PLUGINS
        .iter()
        .filter_map(|spec| spec.args.as_ref())
        .map(|args_spec| {
            args_spec.resolved(
                config
                    .plugin_args
                    .iter()
                    .find(|args| args_spec.is_own(args)),
            )
        })
        .collect();
    pb::SchedulerConfig {
        filters: config.filters.clone(),
        scores: config.scores.clone(),
        top_n: effective_top_n(config),
        max_load_age_ms: effective_max_load_age_ms(config),
        plugin_args,
    }
}

/// `top_n`, defaulted.
pub fn effective_top_n(config: &pb::SchedulerConfig) -> u32 {
    if config.top_n == 0 {
        DEFAULT_TOP_N
    } else {
        config.top_n
    }
}

/// `max_load_age_ms`, defaulted.
pub fn effective_max_load_age_ms(config: &pb::SchedulerConfig) -> u64 {
    if config.max_load_age_ms == 0 {
        DEFAULT_MAX_LOAD_AGE_MS
    } else {
        config.max_load_age_ms
    }
}

/// Checks plugin names, roles, duplicates, top-N and every plugin's arguments.
pub fn validate(config: &pb::SchedulerConfig) -> Result<(), SchedulerConfigError> {
    for (index, name) in config.filters.iter().enumerate() {
        if !plugin(name).is_some_and(|spec| spec.filter) {
            return Err(SchedulerConfigError::UnknownFilter(name.clone()));
        }
        if config.filters[..index].contains(name) {
            return Err(SchedulerConfigError::Duplicate(name.clone()));
        }
    }
    for (index, score) in config.scores.iter().enumerate() {
        if !plugin(&score.name).is_some_and(|spec| spec.score) {
            return Err(SchedulerConfigError::UnknownScore(score.name.clone()));
        }
        if config.scores[..index].iter().any(|s| s.name == score.name) {
            return Err(SchedulerConfigError::Duplicate(score.name.clone()));
        }
    }
    if config.scores.is_empty() {
        return Err(SchedulerConfigError::NoScorePlugin);
    }
    let top_n = effective_top_n(config);
    if top_n > MAX_TOP_N {
        return Err(SchedulerConfigError::TopN(top_n));
    }
    let mut seen: Vec<&'static str> = Vec::new();
    for args in &config.plugin_args {
        let (name, args_spec) = PLUGINS
            .iter()
            .find_map(|spec| {
                let args_spec = spec.args.as_ref()?;
                args_spec.is_own(args).then_some((spec.name, args_spec))
            })
            .ok_or(SchedulerConfigError::UnknownArgs)?;
        if seen.contains(&name) {
            return Err(SchedulerConfigError::DuplicateArgs(name));
        }
        seen.push(name);
        if let Some(variant) = &args.plugin {
            (args_spec.validate)(variant).map_err(|message| SchedulerConfigError::InvalidArgs {
                plugin: name,
                message,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// The message `validate` gives for `config` (which must be invalid).
    pub fn rejection(config: &pb::SchedulerConfig) -> String {
        validate(config).expect_err("invalid").to_string()
    }

    /// The default configuration with `args` in place of the plugin's defaults.
    pub fn with_args<A: PluginArgs>(args: A) -> pb::SchedulerConfig {
        let mut config = default_config();
        let variant = args.into_variant();
        for entry in &mut config.plugin_args {
            if entry
                .plugin
                .as_ref()
                .is_some_and(|own| A::from_variant(own).is_some())
            {
                entry.plugin = Some(variant.clone());
            }
        }
        config
    }

    /// `yaml` (a `pluginConfig[].args` mapping) applied to `A`'s defaults.
    pub fn parsed<A: PluginArgs>(yaml: &str) -> Result<(A, Vec<String>), String> {
        let value: serde_yaml::Value = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        let mut args = A::default().resolved();
        let mut warnings = Vec::new();
        args.merge_yaml(&value, &mut warnings)?;
        Ok((args, warnings))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::rejection;
    use super::*;

    #[test]
    fn default_config_is_valid_and_complete() {
        let config = default_config();
        assert_eq!(validate(&config), Ok(()));
        assert_eq!(effective(&config), config, "nothing left to fill in");
    }

    #[test]
    fn every_plugin_has_a_role_and_a_unique_name() {
        for (index, spec) in PLUGINS.iter().enumerate() {
            assert!(spec.filter || spec.score, "{}", spec.name);
            assert_eq!(plugin(spec.name).map(|s| s.name), Some(spec.name));
            assert!(PLUGINS[..index].iter().all(|other| other.name != spec.name));
        }
        assert!(plugin("kvcache-aware").is_none());
    }

    #[test]
    fn every_plugin_with_arguments_owns_exactly_one_variant() {
        let defaults = default_plugin_args();
        for args in &defaults {
            let owners = PLUGINS
                .iter()
                .filter(|spec| spec.args.as_ref().is_some_and(|a| a.is_own(args)))
                .count();
            assert_eq!(owners, 1, "{args:?}");
        }
        assert_eq!(
            defaults.len(),
            PLUGINS.iter().filter(|spec| spec.args.is_some()).count()
        );
    }

    #[test]
    fn rejects_what_cannot_work() {
        let with = |edit: &dyn Fn(&mut pb::SchedulerConfig)| {
            let mut config = default_config();
            edit(&mut config);
            rejection(&config)
        };
        assert!(with(&|c| c.filters.push("kvcache-aware".into())).contains("unknown filter"));
        assert!(
            with(&|c| c.scores[0].name = "fastest".into())
                .contains("unknown score plugin \"fastest\"")
        );
        assert!(
            with(&|c| c.filters.push(gpu_usage::NAME.into())).contains(
                "unknown filter plugin \"gpu-usage\" (known: least-request, lora-affinity)"
            ),
            "a score-only plugin is not a filter"
        );
        assert!(with(&|c| c.scores.clear()).contains("no score plugin"));
        assert!(with(&|c| c.filters.push(least_request::NAME.into())).contains("listed twice"));
        assert!(with(&|c| c.top_n = 17).contains("topN 17"));
        assert!(
            with(&|c| c.plugin_args.push(c.plugin_args[0].clone()))
                .contains("arguments of plugin \"least-request\" are given twice")
        );
        assert!(
            with(&|c| c.plugin_args.push(pb::PluginArgs { plugin: None }))
                .contains("a plugin this build does not know")
        );
    }

    #[test]
    fn unset_settings_take_defaults() {
        let config = pb::SchedulerConfig {
            scores: vec![pb::ScorePlugin {
                name: random::NAME.into(),
                weight: 1,
            }],
            ..Default::default()
        };
        assert_eq!(validate(&config), Ok(()));
        let effective = effective(&config);
        assert_eq!(effective.top_n, DEFAULT_TOP_N);
        assert_eq!(effective.max_load_age_ms, DEFAULT_MAX_LOAD_AGE_MS);
        assert_eq!(effective.plugin_args, default_plugin_args());
        let prefix: pb::PrefixCacheArgs = plugin_args(&config);
        assert_eq!(prefix, pb::PrefixCacheArgs::default().resolved());
    }

    #[test]
    fn load_bound_factor_below_one_or_not_finite_is_rejected() {
        assert_eq!(check_load_bound_factor(1.0), Ok(()));
        for bad in [0.5, f64::NAN, f64::INFINITY] {
            assert!(check_load_bound_factor(bad).is_err(), "{bad}");
        }
    }
}
