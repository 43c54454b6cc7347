//! `session-affinity`: requests carrying the same session header go to the
//! same pod. The pod is chosen by rendezvous hashing of the session id, so
//! every dataplane replica agrees without shared state, and a session whose
//! pod is gone moves to the next pod in its order (the others keep theirs).
//! A pod over the load bound is passed over the same way, so one heavy
//! session cannot saturate its pod. Requests without the header score 0 everywhere.

use http::header::HeaderName;
use switchyard_snapshot::pb;
use switchyard_snapshot::scheduler::{self, SchedulerConfigError};

use super::super::prefix::{bounded_rendezvous, nominate_rendezvous};
use super::super::sample::PoolIds;
use super::{
    Candidate, Implementation, MAX_SCORE, PluginContext, PluginInput, ScorePlugin, with_scratch,
};

pub const IMPLEMENTATION: Implementation =
    Implementation::scorer(&scheduler::session_affinity::SPEC, build_scorer);

fn build_scorer(context: &PluginContext<'_>) -> Result<Box<dyn ScorePlugin>, SchedulerConfigError> {
    let args: pb::SessionAffinityArgs = scheduler::plugin_args(context.config);
    let header =
        HeaderName::try_from(args.header()).map_err(|_| SchedulerConfigError::InvalidArgs {
            plugin: scheduler::session_affinity::NAME,
            message: format!("header {:?} is not a valid HTTP header name", args.header()),
        })?;
    Ok(Box::new(SessionAffinity {
        header,
        load_bound_factor: args.load_bound_factor(),
    }))
}

#[derive(Debug)]
struct SessionAffinity {
    /// The request header carrying the session id.
    header: HeaderName,
    load_bound_factor: f64,
}

impl ScorePlugin for SessionAffinity {
    fn score(&self, candidates: &[Candidate], request: &PluginInput<'_>, out: &mut [u32]) {
        score(
            candidates,
            self.session_key(request),
            self.load_bound_factor,
            out,
        );
    }

    fn nominate(&self, pool: PoolIds<'_>, request: &PluginInput<'_>, out: &mut Vec<usize>) {
        if let Some(key) = self.session_key(request) {
            nominate_rendezvous(key, pool, out);
        }
    }
}

impl SessionAffinity {
    /// The hash of the request's session header, if it has one.
    fn session_key(&self, request: &PluginInput<'_>) -> Option<u64> {
        request
            .headers
            .get(&self.header)
            .filter(|value| !value.is_empty())
            .map(|value| xxhash_rust::xxh3::xxh3_64(value.as_bytes()))
    }
}

pub fn score(candidates: &[Candidate], session_key: Option<u64>, factor: f64, out: &mut [u32]) {
    out.fill(0);
    let Some(key) = session_key else {
        return;
    };
    with_scratch(|scratch| {
        scratch.fill(candidates);
        if let Some(chosen) =
            bounded_rendezvous(key, &scratch.ids, &scratch.loads, &scratch.eligible, factor)
        {
            out[chosen] = MAX_SCORE;
        }
    });
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::super::super::prefix::SharedPrefixIndex;
    use super::super::testing::{candidate, input};
    use super::*;

    #[test]
    fn reads_the_configured_header() {
        let mut config = scheduler::default_config();
        config.plugin_args = vec![pb::PluginArgs {
            plugin: Some(pb::plugin_args::Plugin::SessionAffinity(
                pb::SessionAffinityArgs {
                    header: Some("x-conversation".into()),
                    load_bound_factor: None,
                },
            )),
        }];
        let shared = SharedPrefixIndex::default();
        let plugin = build_scorer(&PluginContext {
            config: &config,
            prefix_index: &shared,
        })
        .expect("valid");
        let pods: Vec<_> = (0..4).map(|i| candidate(i, 0, None)).collect();
        let mut out = [0; 4];
        let mut headers = HeaderMap::new();
        headers.insert("x-session-id", "abc".parse().expect("value"));
        plugin.score(&pods, &input(&headers, &[]), &mut out);
        assert_eq!(out, [0; 4], "not the configured header");
        headers.insert("x-conversation", "abc".parse().expect("value"));
        plugin.score(&pods, &input(&headers, &[]), &mut out);
        assert_eq!(out.iter().filter(|s| **s == 100).count(), 1, "{out:?}");
    }

    #[test]
    fn same_session_same_pod_until_it_is_gone_or_overloaded() {
        let mut pods: Vec<_> = (0..4).map(|i| candidate(i, 0, None)).collect();
        let mut out = [0; 4];
        score(&pods, Some(42), 1.25, &mut out);
        let home = out.iter().position(|s| *s == 100).expect("a pod");
        score(&pods, Some(42), 1.25, &mut out);
        assert_eq!(out[home], 100);
        pods[home].in_flight = 20;
        score(&pods, Some(42), 1.25, &mut out);
        assert_eq!(out[home], 0, "overloaded home is passed over");
        pods[home].in_flight = 0;
        pods[home].ejected = true;
        score(&pods, Some(42), 1.25, &mut out);
        assert_eq!(out[home], 0, "failing home is passed over");
        score(&pods, None, 1.25, &mut out);
        assert_eq!(out, [0; 4]);
    }
}
