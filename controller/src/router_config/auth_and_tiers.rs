//! The router configuration's `auth` block (Kthena's format, plus
//! `tierClaim`) and `tiers` block (Switchyard's per-user token budgets).
//!
//! ```yaml
//! auth:
//!   issuer: https://issuer.example          # required value of `iss`
//!   audiences: [switchyard]                 # `aud` must contain one; optional
//!   jwksUri: https://issuer.example/jwks    # optional: OIDC discovery from the issuer otherwise
//!   tierClaim: tier                         # Switchyard: claim naming the caller's tier
//! tiers:
//!   free: {inputTokensPerUnit: 10000, outputTokensPerUnit: 2000, unit: minute}
//!   gold:
//!     inputTokensPerUnit: 1000000
//!     unit: hour
//!     global: {redis: {address: "redis.switchyard-system:6379"}}
//! ```

use serde::Deserialize;
use switchyard_crd::RateLimit;
use switchyard_snapshot::pb;

use crate::rate_limit::compile_rate_limit;

/// How JWTs are verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSettings {
    /// Required `iss`; "" = not checked (only possible with `jwksUri`).
    pub issuer: String,
    pub audiences: Vec<String>,
    /// Where the keys are; None = OIDC discovery from `issuer`.
    pub jwks_uri: Option<String>,
    /// Claim naming the caller's tier; "" = none.
    pub tier_claim: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AuthSection {
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    jwks_uri: Option<String>,
    #[serde(default)]
    tier_claim: Option<String>,
}

/// Parses and validates an `auth` block. None for a block that names
/// neither `jwksUri` nor `issuer`: as in Kthena, JWTs stay off.
pub fn parse_auth(value: &serde_yaml::Value) -> Result<Option<JwtSettings>, String> {
    let section: AuthSection =
        serde_yaml::from_value(value.clone()).map_err(|error| format!("auth: {error}"))?;
    let non_empty = |value: Option<String>| {
        value
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
    };
    let issuer = non_empty(section.issuer);
    let jwks_uri = non_empty(section.jwks_uri);
    match (&issuer, &jwks_uri) {
        (None, None) => return Ok(None),
        (Some(issuer), None) if !is_http_url(issuer) => {
            return Err(format!(
                "auth.issuer {issuer:?}: OIDC discovery needs an http(s) URL (or set jwksUri)"
            ));
        }
        (_, Some(uri)) if !is_http_url(uri) => {
            return Err(format!("auth.jwksUri {uri:?} is not an http(s) URL"));
        }
        _ => {}
    }
    Ok(Some(JwtSettings {
        issuer: issuer.unwrap_or_default(),
        audiences: section
            .audiences
            .into_iter()
            .map(|audience| audience.trim().to_owned())
            .filter(|audience| !audience.is_empty())
            .collect(),
        jwks_uri,
        tier_claim: non_empty(section.tier_claim).unwrap_or_default(),
    }))
}

fn is_http_url(text: &str) -> bool {
    text.parse::<http::Uri>().is_ok_and(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some()
    })
}

/// Fields of a tier's budget: Kthena's `rateLimit` fields.
const TIER_FIELDS: [&str; 4] = [
    "inputTokensPerUnit",
    "outputTokensPerUnit",
    "unit",
    "global",
];

/// Parses a `tiers` block: tier name -> a budget in Kthena's `rateLimit`
/// format, applying to each user of the tier. Sorted by tier.
pub fn parse_tiers(value: &serde_yaml::Value) -> Result<Vec<pb::TierRateLimit>, String> {
    let tiers = value
        .as_mapping()
        .ok_or("tiers: expected a map of tier name to its budget")?;
    let mut parsed = Vec::with_capacity(tiers.len());
    for (name, budget) in tiers {
        let name = name
            .as_str()
            .filter(|name| !name.trim().is_empty())
            .ok_or("tiers: every tier needs a name")?;
        if let Some(fields) = budget.as_mapping() {
            for field in fields.keys() {
                let field = field.as_str().unwrap_or_default();
                if !TIER_FIELDS.contains(&field) {
                    return Err(format!(
                        "tiers.{name}: unknown field `{field}` (expected one of {TIER_FIELDS:?})"
                    ));
                }
            }
        }
        let limit: RateLimit = serde_yaml::from_value(budget.clone())
            .map_err(|error| format!("tiers.{name}: {error}"))?;
        let limit = compile_rate_limit(&limit)
            .map_err(|error| format!("tiers.{name}: {error}"))?
            .ok_or_else(|| {
                format!("tiers.{name}: set inputTokensPerUnit and/or outputTokensPerUnit")
            })?;
        parsed.push(pb::TierRateLimit {
            tier: name.to_owned(),
            limit: Some(limit),
        });
    }
    parsed.sort_by(|a, b| a.tier.cmp(&b.tier));
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> serde_yaml::Value {
        serde_yaml::from_str(text).expect("yaml")
    }

    #[test]
    fn kthena_auth_block_with_switchyard_tier_claim() {
        let settings = parse_auth(&yaml(
            "issuer: https://issuer.example\naudiences: [a, b]\njwksUri: https://issuer.example/keys\ntierClaim: plan\n",
        ))
        .expect("valid")
        .expect("JWTs on");
        assert_eq!(
            settings,
            JwtSettings {
                issuer: "https://issuer.example".into(),
                audiences: vec!["a".into(), "b".into()],
                jwks_uri: Some("https://issuer.example/keys".into()),
                tier_claim: "plan".into(),
            }
        );
        let discovered = parse_auth(&yaml("issuer: http://127.0.0.1:8080/realms/x\n"))
            .expect("valid")
            .expect("JWTs on");
        assert_eq!(discovered.jwks_uri, None);
        // Neither jwksUri nor issuer: off, as in Kthena.
        assert_eq!(parse_auth(&yaml("{}")), Ok(None));
        assert_eq!(parse_auth(&yaml("audiences: [a]\n")), Ok(None));
    }

    #[test]
    fn auth_blocks_that_cannot_work_are_rejected() {
        for (text, expected) in [
            ("issuer: my-issuer\n", "OIDC discovery needs an http(s) URL"),
            ("issuer: x\njwksUri: file:///keys\n", "not an http(s) URL"),
            (
                "issuer: https://i\njwks_uri: https://i/k\n",
                "unknown field `jwks_uri`",
            ),
        ] {
            let error = parse_auth(&yaml(text)).expect_err(text);
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn tiers_use_kthena_rate_limit_fields() {
        let tiers = parse_tiers(&yaml(
            "gold:\n  inputTokensPerUnit: 1000\n  unit: hour\n  global: {redis: {address: 'r:6379'}, failureMode: FailClose}\nfree: {outputTokensPerUnit: 10, unit: minute}\n",
        ))
        .expect("valid");
        let names: Vec<&str> = tiers.iter().map(|t| t.tier.as_str()).collect();
        assert_eq!(names, ["free", "gold"]);
        let gold = tiers[1].limit.as_ref().expect("limit");
        assert_eq!(
            (gold.input_tokens_per_unit, gold.unit.as_str()),
            (1000, "hour")
        );
        assert_eq!(gold.global_redis_address, "r:6379");
        assert_eq!(
            gold.redis_failure_policy,
            pb::RedisFailurePolicy::FailClose as i32
        );
        for (text, expected) in [
            ("free: {inputTokens: 5}\n", "unknown field `inputTokens`"),
            ("free: {unit: minute}\n", "set inputTokensPerUnit"),
            (
                "free: {inputTokensPerUnit: 5, unit: week}\n",
                "unknown variant `week`",
            ),
            ("[a]\n", "expected a map"),
        ] {
            let error = parse_tiers(&yaml(text)).expect_err(text);
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
