//! `rateLimit` (a ModelRoute's, or a tier's in the router configuration) to
//! its snapshot form: used by the compile and by the router configuration.

use switchyard_crd::{FailureMode, RateLimit};
use switchyard_snapshot::pb;

/// The snapshot form of `limit`; None when it sets no token budget (it
/// limits nothing). The error says which field is wrong.
pub(crate) fn compile_rate_limit(limit: &RateLimit) -> Result<Option<pb::RateLimit>, String> {
    for (field, value) in [
        ("inputTokensPerUnit", limit.input_tokens_per_unit),
        ("outputTokensPerUnit", limit.output_tokens_per_unit),
    ] {
        if value == Some(0) {
            return Err(format!("{field} must be at least 1 (omit it for no limit)"));
        }
    }
    let (address, failure_mode) = match &limit.global {
        None => (String::new(), FailureMode::FailOpen),
        Some(global) => {
            let address = global
                .redis
                .as_ref()
                .map(|redis| redis.address.trim().to_owned())
                .ok_or("global.redis.address is required for a global limit")?;
            if !is_host_port(&address) {
                return Err(format!("global.redis.address {address:?} is not host:port"));
            }
            (address, global.failure_mode.unwrap_or_default())
        }
    };
    if limit.input_tokens_per_unit.is_none() && limit.output_tokens_per_unit.is_none() {
        return Ok(None);
    }
    Ok(Some(pb::RateLimit {
        input_tokens_per_unit: limit.input_tokens_per_unit.unwrap_or(0),
        output_tokens_per_unit: limit.output_tokens_per_unit.unwrap_or(0),
        unit: limit.unit.as_str().to_owned(),
        global_redis_address: address,
        redis_failure_policy: match failure_mode {
            FailureMode::FailOpen => pb::RedisFailurePolicy::FailOpen,
            FailureMode::FailClose => pb::RedisFailurePolicy::FailClose,
        } as i32,
    }))
}

/// `host:port` with a non-empty host and a valid port (what dataplanes accept).
fn is_host_port(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_crd::{GlobalRateLimit, RateLimitUnit, RedisAddress};

    fn global(address: &str, failure_mode: Option<FailureMode>) -> Option<GlobalRateLimit> {
        Some(GlobalRateLimit {
            redis: Some(RedisAddress {
                address: address.into(),
            }),
            failure_mode,
        })
    }

    #[test]
    fn converts_kthena_fields_and_the_failure_mode() {
        let limit = RateLimit {
            input_tokens_per_unit: Some(10),
            output_tokens_per_unit: Some(5000),
            unit: RateLimitUnit::Minute,
            global: global("redis.ns.svc:6379", Some(FailureMode::FailClose)),
        };
        let compiled = compile_rate_limit(&limit).expect("valid").expect("limits");
        assert_eq!(compiled.unit, "minute");
        assert_eq!(compiled.global_redis_address, "redis.ns.svc:6379");
        assert_eq!(
            compiled.redis_failure_policy,
            pb::RedisFailurePolicy::FailClose as i32
        );
        let local = RateLimit {
            output_tokens_per_unit: Some(1),
            ..Default::default()
        };
        let compiled = compile_rate_limit(&local).expect("valid").expect("limits");
        assert_eq!(
            (compiled.unit.as_str(), compiled.input_tokens_per_unit),
            ("second", 0)
        );
        assert_eq!(compile_rate_limit(&RateLimit::default()), Ok(None));
    }

    #[test]
    fn rejects_what_dataplanes_could_not_enforce() {
        let cases = [
            (
                RateLimit {
                    input_tokens_per_unit: Some(0),
                    ..Default::default()
                },
                "inputTokensPerUnit",
            ),
            (
                RateLimit {
                    input_tokens_per_unit: Some(1),
                    global: Some(GlobalRateLimit::default()),
                    ..Default::default()
                },
                "global.redis.address is required",
            ),
            (
                RateLimit {
                    input_tokens_per_unit: Some(1),
                    global: global("redis", None),
                    ..Default::default()
                },
                "not host:port",
            ),
        ];
        for (limit, expected) in cases {
            let error = compile_rate_limit(&limit).expect_err(expected);
            assert!(error.contains(expected), "{error}");
        }
    }
}
