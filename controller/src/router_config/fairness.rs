//! The router configuration's `fairness` block: the admission queue of
//! saturated models. Kthena configures it with environment variables; the
//! fields here carry their names (`FAIRNESS_WINDOW_SIZE` → `windowSize`,
//! `SESSION_BOOST_MAX_SESSIONS` → `maxSessions`, ...).
//!
//! ```yaml
//! fairness:
//!   policy: vtc              # vtc (ENABLE_FAIRNESS_SCHEDULING) | sessionBoost (ENABLE_SESSION_BOOST)
//!   windowSize: 5m           # idle users' service is forgotten after this (1m..1h)
//!   inputTokenWeight: 1
//!   outputTokenWeight: 2
//!   maxConcurrent: 16        # requests per pod this dataplane lets run at once
//!   queueTimeout: 60s        # longest wait, then 504
//!   maxQueueLength: 1024     # waiting requests per model, then 429
//!   maxUserQueueLength: 256  # waiting requests per user and model, then 429
//!   userHeader: x-user-id    # who an unauthenticated request belongs to
//!   maxMetricUsers: 32       # user_id label values per model; the rest are "other"
//!   tierWeights: {gold: 2}   # a gold user is charged half per token
//!   sessionHeader: X-Session-ID
//!   maxSessions: 4096
//!   globalCounters: true     # order by the fleet's counters, not this dataplane's alone
//!   globalInterval: 250ms    # how often dataplanes report usage and the controller pushes counters (10ms..500ms)
//!   maxGlobalUsers: 10000    # users per model in the fleet's counters; the one idle longest goes
//! ```
//!
//! No `fairness` block: no queue, requests go upstream at once.

use std::time::Duration;

use serde::Deserialize;
use switchyard_snapshot::pb;

/// Kthena's `FAIRNESS_WINDOW_SIZE` default and bounds.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(5 * 60);
const MIN_WINDOW: Duration = Duration::from_secs(60);
const MAX_WINDOW: Duration = Duration::from_secs(60 * 60);
/// Kthena's `FAIRNESS_INPUT_TOKEN_WEIGHT` / `FAIRNESS_OUTPUT_TOKEN_WEIGHT`:
/// an output token costs the engine about twice an input token.
pub const DEFAULT_INPUT_TOKEN_WEIGHT: f64 = 1.0;
pub const DEFAULT_OUTPUT_TOKEN_WEIGHT: f64 = 2.0;
/// Kthena's `SESSION_BOOST_INFLIGHT_PER_POD`: what a vLLM pod of the usual
/// size batches without its latency falling apart.
pub const DEFAULT_MAX_CONCURRENT_PER_POD: u32 = 16;
/// Kthena's `FAIRNESS_QUEUE_TIMEOUT`.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(60);
/// Kthena has no bound; this keeps a flood's memory and wait bounded while
/// leaving room for bursts far above what a model's pods serve at once.
pub const DEFAULT_MAX_QUEUE_LENGTH: u32 = 1024;
/// One user may fill a quarter of a model's queue.
pub const DEFAULT_MAX_USER_QUEUE_LENGTH: u32 = 256;
/// Series per model a Prometheus can keep for every dataplane.
pub const DEFAULT_MAX_METRIC_USERS: u32 = 32;
/// Kthena's `SESSION_BOOST_HEADER` and `SESSION_BOOST_MAX_SESSIONS`.
pub const DEFAULT_SESSION_HEADER: &str = "x-session-id";
pub const DEFAULT_MAX_SESSIONS: u32 = 4096;
/// How often dataplanes report usage and the controller pushes the fleet's
/// counters: a user spread over dataplanes is ordered by service at most
/// about two intervals old, while a fleet of dataplanes costs the
/// controller a few small messages a second each.
pub const DEFAULT_GLOBAL_INTERVAL: Duration = Duration::from_millis(250);
/// Shorter would only add pushes: requests take far longer than this.
const MIN_GLOBAL_INTERVAL: Duration = Duration::from_millis(10);
/// Longer and the order lags what a user was served by a second or more.
const MAX_GLOBAL_INTERVAL: Duration = Duration::from_millis(500);
/// As many users per model as a dataplane tracks.
pub const DEFAULT_MAX_GLOBAL_USERS: u32 = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FairnessSection {
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    window_size: Option<String>,
    #[serde(default)]
    input_token_weight: Option<f64>,
    #[serde(default)]
    output_token_weight: Option<f64>,
    #[serde(default)]
    max_concurrent: Option<u32>,
    #[serde(default)]
    queue_timeout: Option<String>,
    #[serde(default)]
    max_queue_length: Option<u32>,
    #[serde(default)]
    max_user_queue_length: Option<u32>,
    #[serde(default)]
    user_header: Option<String>,
    #[serde(default)]
    max_metric_users: Option<u32>,
    #[serde(default)]
    tier_weights: std::collections::BTreeMap<String, f64>,
    #[serde(default)]
    session_header: Option<String>,
    #[serde(default)]
    max_sessions: Option<u32>,
    #[serde(default)]
    global_counters: Option<bool>,
    #[serde(default)]
    global_interval: Option<String>,
    #[serde(default)]
    max_global_users: Option<u32>,
}

/// Parses and validates a `fairness` block; `warnings` gets what is
/// accepted but adjusted (a window outside Kthena's bounds).
pub fn parse_fairness(
    value: &serde_yaml::Value,
    warnings: &mut Vec<String>,
) -> Result<pb::FairnessConfig, String> {
    let section: FairnessSection =
        serde_yaml::from_value(value.clone()).map_err(|error| format!("fairness: {error}"))?;
    let policy = match section.policy.as_deref() {
        None | Some("vtc") => pb::FairnessPolicy::Vtc,
        Some("sessionBoost") => pb::FairnessPolicy::SessionBoost,
        Some(other) => {
            return Err(format!(
                "fairness.policy {other:?}: expected vtc or sessionBoost"
            ));
        }
    };
    let duration = |field: &str, text: &Option<String>, default: Duration| match text {
        None => Ok(default),
        Some(text) => switchyard_crd::parse_go_duration(text)
            .map_err(|error| format!("fairness.{field} {text:?}: {error}")),
    };
    let mut window = duration("windowSize", &section.window_size, DEFAULT_WINDOW)?;
    if !(MIN_WINDOW..=MAX_WINDOW).contains(&window) {
        let clamped = window.clamp(MIN_WINDOW, MAX_WINDOW);
        warnings.push(format!(
            "fairness.windowSize {window:?} is outside 1m..1h; using {clamped:?}"
        ));
        window = clamped;
    }
    let queue_timeout = duration(
        "queueTimeout",
        &section.queue_timeout,
        DEFAULT_QUEUE_TIMEOUT,
    )?;
    if queue_timeout.is_zero() {
        return Err("fairness.queueTimeout must be greater than zero".to_owned());
    }
    let weight = |field: &str, value: Option<f64>, default: f64| {
        let value = value.unwrap_or(default);
        if value.is_finite() && value >= 0.0 {
            Ok(value)
        } else {
            Err(format!(
                "fairness.{field} must be a number >= 0, got {value}"
            ))
        }
    };
    let input_token_weight = weight(
        "inputTokenWeight",
        section.input_token_weight,
        DEFAULT_INPUT_TOKEN_WEIGHT,
    )?;
    let output_token_weight = weight(
        "outputTokenWeight",
        section.output_token_weight,
        DEFAULT_OUTPUT_TOKEN_WEIGHT,
    )?;
    let positive = |field: &str, value: Option<u32>, default: u32| match value.unwrap_or(default) {
        0 => Err(format!("fairness.{field} must be at least 1")),
        value => Ok(value),
    };
    let mut tier_weights = Vec::with_capacity(section.tier_weights.len());
    for (tier, weight) in section.tier_weights {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(format!(
                "fairness.tierWeights.{tier} must be a number > 0, got {weight}"
            ));
        }
        tier_weights.push(pb::TierWeight { tier, weight });
    }
    let header = |field: &str, value: Option<String>, default: &str| {
        let value = value.map_or_else(|| default.to_owned(), |value| value.trim().to_lowercase());
        if value.is_empty() || http::HeaderName::try_from(value.as_str()).is_ok() {
            Ok(value)
        } else {
            Err(format!("fairness.{field} {value:?} is not a header name"))
        }
    };
    let global_interval = duration(
        "globalInterval",
        &section.global_interval,
        DEFAULT_GLOBAL_INTERVAL,
    )?;
    if !(MIN_GLOBAL_INTERVAL..=MAX_GLOBAL_INTERVAL).contains(&global_interval) {
        return Err(format!(
            "fairness.globalInterval {global_interval:?} must be within 10ms..500ms"
        ));
    }
    let millis = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    Ok(pb::FairnessConfig {
        policy: policy.into(),
        window_ms: millis(window),
        input_token_weight,
        output_token_weight,
        max_concurrent_per_pod: positive(
            "maxConcurrent",
            section.max_concurrent,
            DEFAULT_MAX_CONCURRENT_PER_POD,
        )?,
        queue_timeout_ms: millis(queue_timeout),
        max_queue_length: positive(
            "maxQueueLength",
            section.max_queue_length,
            DEFAULT_MAX_QUEUE_LENGTH,
        )?,
        max_user_queue_length: positive(
            "maxUserQueueLength",
            section.max_user_queue_length,
            DEFAULT_MAX_USER_QUEUE_LENGTH,
        )?,
        user_header: header("userHeader", section.user_header, "")?,
        max_metric_users: section.max_metric_users.unwrap_or(DEFAULT_MAX_METRIC_USERS),
        tier_weights,
        session_header: match header(
            "sessionHeader",
            section.session_header,
            DEFAULT_SESSION_HEADER,
        )? {
            empty if empty.is_empty() => DEFAULT_SESSION_HEADER.to_owned(),
            header => header,
        },
        max_sessions: positive("maxSessions", section.max_sessions, DEFAULT_MAX_SESSIONS)?,
        global_report_interval_ms: if section.global_counters.unwrap_or(true) {
            millis(global_interval)
        } else {
            0
        },
        max_global_users: positive(
            "maxGlobalUsers",
            section.max_global_users,
            DEFAULT_MAX_GLOBAL_USERS,
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<(pb::FairnessConfig, Vec<String>), String> {
        let value: serde_yaml::Value = serde_yaml::from_str(text).expect("yaml");
        let mut warnings = Vec::new();
        parse_fairness(&value, &mut warnings).map(|config| (config, warnings))
    }

    #[test]
    fn an_empty_block_turns_vtc_on_with_kthenas_defaults() {
        let (config, warnings) = parse("{}").expect("valid");
        assert_eq!(config.policy(), pb::FairnessPolicy::Vtc);
        assert_eq!(config.window_ms, 300_000);
        assert_eq!(
            (config.input_token_weight, config.output_token_weight),
            (1.0, 2.0)
        );
        assert_eq!(config.queue_timeout_ms, 60_000);
        assert_eq!(config.max_concurrent_per_pod, 16);
        assert_eq!(config.user_header, "");
        assert_eq!(config.session_header, "x-session-id");
        assert_eq!(config.global_report_interval_ms, 250, "fleet-wide order on");
        assert_eq!(config.max_global_users, 10_000);
        assert!(warnings.is_empty());
    }

    #[test]
    fn every_field_is_read_and_checked() {
        let (config, warnings) = parse(
            "{policy: sessionBoost, windowSize: 10s, inputTokenWeight: 0.5, outputTokenWeight: 3, maxConcurrent: 4, queueTimeout: 2s, maxQueueLength: 8, maxUserQueueLength: 2, userHeader: X-User-ID, maxMetricUsers: 3, tierWeights: {gold: 2}, sessionHeader: X-Conv, maxSessions: 9, globalInterval: 100ms, maxGlobalUsers: 5}",
        )
        .expect("valid");
        assert_eq!(config.policy(), pb::FairnessPolicy::SessionBoost);
        assert_eq!(config.window_ms, 60_000, "clamped to 1m");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(
            (config.max_queue_length, config.max_user_queue_length),
            (8, 2)
        );
        assert_eq!(config.user_header, "x-user-id");
        assert_eq!(config.session_header, "x-conv");
        assert_eq!(
            (config.global_report_interval_ms, config.max_global_users),
            (100, 5)
        );
        let (off, _) = parse("{globalCounters: false}").expect("valid");
        assert_eq!(
            off.global_report_interval_ms, 0,
            "each dataplane on its own"
        );
        assert_eq!(
            config.tier_weights,
            [pb::TierWeight {
                tier: "gold".into(),
                weight: 2.0
            }]
        );
        for (text, expected) in [
            ("{policy: lottery}", "fairness.policy"),
            ("{maxConcurrent: 0}", "maxConcurrent"),
            ("{queueTimeout: 0s}", "queueTimeout"),
            ("{outputTokenWeight: -1}", "outputTokenWeight"),
            ("{tierWeights: {free: 0}}", "tierWeights.free"),
            ("{userHeader: 'bad header'}", "userHeader"),
            ("{maxQueue: 3}", "unknown field `maxQueue`"),
            ("{globalInterval: 2s}", "globalInterval"),
            ("{maxGlobalUsers: 0}", "maxGlobalUsers"),
        ] {
            let error = parse(text).expect_err(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
