//! ModelRoute validation, reference resolution and conversion to the snapshot form.

use std::collections::{BTreeMap, BTreeSet};

use switchyard_crd::{ModelRoute, StringMatch, TargetModel};
use switchyard_snapshot::{object_key, pb};

use super::gateway_api::{Attachment, ListenerIndex, ListenerKey, RouteKind, listener_refs};
use super::providers::CompiledProviders;
use super::report::{ConditionReport, IgnoredField, ObjectKind, ObjectReport, Problem, Reason};
use super::{non_empty, start_validation};
use crate::rate_limit::compile_rate_limit;

/// Largest weight a target may carry, as in Kthena's API.
const MAX_TARGET_WEIGHT: u32 = 100;

/// Which backends a route may reference: `(namespace, name)` of every
/// server in the input, of those that were accepted, and the providers.
pub(crate) struct KnownServers<'a> {
    pub accepted: BTreeSet<(&'a str, &'a str)>,
    pub present: BTreeSet<(&'a str, &'a str)>,
    pub providers: &'a CompiledProviders,
}

/// Validates one ModelRoute, resolves its targets and binds it to the
/// Gateway listeners its parentRefs name (`listeners` is `None` when Gateway
/// API mode is off). Returns the route to put in the snapshot (when it was
/// accepted, kept at least one rule and, with parentRefs, serves on a listener).
pub(crate) fn compile_route(
    route: &ModelRoute,
    servers: &KnownServers<'_>,
    listeners: Option<&ListenerIndex>,
) -> (Option<pb::ModelRoute>, ObjectReport) {
    let (namespace, name, mut invalid) = start_validation(&route.metadata, Reason::InvalidName);
    let spec = &route.spec;
    let model_name = spec.model_name.as_deref().unwrap_or_default();
    if model_name.is_empty() && spec.lora_adapters.is_empty() {
        invalid.push(Problem::new(
            Reason::InvalidModelName,
            "spec.modelName: must be set when spec.loraAdapters is empty",
        ));
    }
    for (index, adapter) in spec.lora_adapters.iter().enumerate() {
        if adapter.is_empty() {
            invalid.push(Problem::new(
                Reason::InvalidModelName,
                format!(
                    "spec.loraAdapters[{index}]: a LoRA adapter name cannot be an empty string"
                ),
            ));
        }
    }
    if spec.rules.is_empty() {
        invalid.push(Problem::new(
            Reason::InvalidRules,
            "spec.rules: at least one rule is required",
        ));
    }

    let mut unresolved = Vec::new();
    // Every ModelRoute field is acted on; conditions that set nothing are named below.
    let mut ignored_fields = Vec::new();
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (rule_index, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{rule_index}]");
        let matcher = compile_model_match(
            &path,
            rule.model_match.as_ref(),
            &mut invalid,
            &mut ignored_fields,
        );
        validate_targets(
            &path,
            &rule.target_models,
            !spec.lora_adapters.is_empty(),
            &mut invalid,
        );
        let targets = resolve_targets(
            &path,
            namespace,
            &rule.target_models,
            servers,
            &mut unresolved,
        );
        let kept_weight: u64 = targets.iter().map(|target| u64::from(target.weight)).sum();
        if kept_weight == 0 {
            let declared_weight: u64 = rule
                .target_models
                .iter()
                .map(|target| u64::from(target.weight))
                .sum();
            // A rule whose own weights sum to 0 is already rejected by validation;
            // here resolution dropped every target that carried weight.
            if declared_weight > 0 {
                unresolved.push(Problem::new(
                    first_reason_or(&unresolved, Reason::BackendNotFound),
                    format!(
                        "{path}: no target with a weight above 0 is left; rule dropped, its requests fall through to later rules and routes"
                    ),
                ));
            }
            continue;
        }
        rules.push(pb::Rule {
            name: rule.name.clone().unwrap_or_default(),
            r#match: matcher,
            targets,
        });
    }

    let rate_limit = match spec.rate_limit.as_ref().map(compile_rate_limit) {
        None => None,
        Some(Ok(limit)) => limit,
        Some(Err(error)) => {
            invalid.push(Problem::new(
                Reason::InvalidRateLimit,
                format!("spec.rateLimit: {error}"),
            ));
            None
        }
    };

    let bound = bind_parents(namespace, &spec.parent_refs, listeners, &mut unresolved);
    let accepted = ConditionReport::from_problems(&invalid, Reason::Accepted, "");
    if accepted.status && rules.is_empty() && !spec.rules.is_empty() {
        unresolved.push(Problem::new(
            first_reason_or(&unresolved, Reason::BackendNotFound),
            "no rule has a resolvable target; the route is left out of the snapshot",
        ));
    }
    let serves = !spec.parent_refs.is_empty() && bound.is_empty();
    if accepted.status && serves {
        unresolved.push(Problem::new(
            Reason::NoMatchingParent,
            "no parentRef names a listener the route can serve on; the route is left out of the snapshot",
        ));
    }
    let resolved_refs = ConditionReport::from_problems(&unresolved, Reason::ResolvedRefs, "");
    let in_snapshot = accepted.status && !rules.is_empty() && !serves;
    let report = ObjectReport {
        kind: ObjectKind::ModelRoute,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        generation: route.metadata.generation,
        accepted,
        resolved_refs,
        ready_pods: None,
        total_pods: None,
        pd_groups: None,
        complete_pd_groups: None,
        in_snapshot,
        ignored_fields,
    };
    if !in_snapshot {
        return (None, report);
    }

    let compiled = pb::ModelRoute {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        model_name: model_name.to_owned(),
        lora_adapters: spec.lora_adapters.clone(),
        creation_timestamp_unix_ms: creation_timestamp_unix_ms(route),
        generation: route.metadata.generation.unwrap_or(0),
        rules,
        rate_limit,
        listeners: listener_refs(bound),
    };
    (Some(compiled), report)
}

/// The listeners `parents` bind the route to; every parentRef that binds it
/// nowhere is a problem. Without parentRefs the route serves the default
/// listener (an empty list); with Gateway API mode off, parentRefs bind it
/// nowhere.
fn bind_parents(
    namespace: &str,
    parents: &[switchyard_crd::ParentReference],
    listeners: Option<&ListenerIndex>,
    unresolved: &mut Vec<Problem>,
) -> Vec<ListenerKey> {
    if parents.is_empty() {
        return Vec::new();
    }
    let Some(listeners) = listeners else {
        unresolved.push(Problem::new(
            Reason::NoMatchingParent,
            "spec.parentRefs: Gateway API mode is off (--enable-gateway-api), so a route bound to Gateways serves on no listener",
        ));
        return Vec::new();
    };
    let mut bound = Vec::new();
    for (index, parent) in parents.iter().enumerate() {
        let path = format!("spec.parentRefs[{index}]");
        match listeners.attach(namespace, RouteKind::ModelRoute, &[], parent) {
            Attachment::Attached(keys) => bound.extend(keys),
            Attachment::Rejected(problem) => unresolved.push(Problem::new(
                problem.reason,
                format!("{path}: {}", problem.message),
            )),
            Attachment::NotOurs => unresolved.push(Problem::new(
                Reason::NoMatchingParent,
                format!(
                    "{path}: {}/{} {}/{} is not a Gateway of a GatewayClass Switchyard implements",
                    non_empty(parent.group.as_deref()).unwrap_or(switchyard_crd::GATEWAY_API_GROUP),
                    non_empty(parent.kind.as_deref()).unwrap_or("Gateway"),
                    non_empty(parent.namespace.as_deref()).unwrap_or(namespace),
                    parent.name
                ),
            )),
        }
    }
    bound
}

/// `metadata.creationTimestamp` in Unix milliseconds; 0 when absent (local files).
pub(crate) fn creation_timestamp_unix_ms(route: &ModelRoute) -> i64 {
    route
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |time| time.0.as_millisecond())
}

fn first_reason_or(problems: &[Problem], fallback: Reason) -> Reason {
    problems.first().map_or(fallback, |problem| problem.reason)
}

fn validate_targets(
    path: &str,
    targets: &[TargetModel],
    has_lora_adapters: bool,
    invalid: &mut Vec<Problem>,
) {
    if targets.is_empty() {
        invalid.push(Problem::new(
            Reason::InvalidRules,
            format!("{path}.targetModels: at least one target is required"),
        ));
        return;
    }
    let mut total_weight: u64 = 0;
    for (index, target) in targets.iter().enumerate() {
        let server = non_empty(target.model_server_name.as_deref());
        let provider = non_empty(target.external_model_provider_name.as_deref());
        if server.is_some() == provider.is_some() {
            invalid.push(Problem::new(
                Reason::InvalidRules,
                format!(
                    "{path}.targetModels[{index}]: exactly one of modelServerName or externalModelProviderName must be set"
                ),
            ));
        }
        // A LoRA adapter name only means something to the pods that loaded it.
        if provider.is_some() && has_lora_adapters {
            invalid.push(Problem::new(
                Reason::InvalidRules,
                format!(
                    "{path}.targetModels[{index}].externalModelProviderName: a route with loraAdapters cannot target an ExternalModelProvider"
                ),
            ));
        }
        if target.weight > MAX_TARGET_WEIGHT {
            invalid.push(Problem::new(
                Reason::InvalidWeights,
                format!(
                    "{path}.targetModels[{index}].weight: {} is above the maximum {MAX_TARGET_WEIGHT}",
                    target.weight
                ),
            ));
        }
        total_weight += u64::from(target.weight);
    }
    if total_weight == 0 {
        invalid.push(Problem::new(
            Reason::InvalidWeights,
            format!(
                "{path}.targetModels: weights sum to 0; at least one target needs a weight above 0"
            ),
        ));
    }
}

/// The targets that name an accepted ModelServer or a Ready provider; every
/// other one is dropped and reported.
fn resolve_targets(
    path: &str,
    namespace: &str,
    targets: &[TargetModel],
    servers: &KnownServers<'_>,
    unresolved: &mut Vec<Problem>,
) -> Vec<pb::WeightedTarget> {
    let mut resolved = Vec::with_capacity(targets.len());
    for (index, target) in targets.iter().enumerate() {
        let target_path = format!("{path}.targetModels[{index}]");
        let server = non_empty(target.model_server_name.as_deref());
        let provider = non_empty(target.external_model_provider_name.as_deref());
        match (server, provider) {
            (Some(server), None) => {
                let key = object_key(namespace, server);
                if servers.accepted.contains(&(namespace, server)) {
                    resolved.push(pb::WeightedTarget {
                        model_server: key,
                        weight: target.weight,
                        ..Default::default()
                    });
                } else if servers.present.contains(&(namespace, server)) {
                    unresolved.push(Problem::new(
                        Reason::BackendNotFound,
                        format!(
                            "{target_path}.modelServerName: ModelServer {key} was not accepted (see its report); target dropped"
                        ),
                    ));
                } else {
                    unresolved.push(Problem::new(
                        Reason::BackendNotFound,
                        format!("{target_path}.modelServerName: ModelServer {key} not found; target dropped"),
                    ));
                }
            }
            (None, Some(provider)) => {
                let key = object_key(namespace, provider);
                if servers.providers.is_ready(namespace, provider) {
                    resolved.push(pb::WeightedTarget {
                        external_provider: key,
                        weight: target.weight,
                        ..Default::default()
                    });
                } else if let Some(report) = servers.providers.report(namespace, provider) {
                    unresolved.push(Problem::new(
                        Reason::BackendNotFound,
                        format!(
                            "{target_path}.externalModelProviderName: ExternalModelProvider {key} is not Ready ({}); target dropped",
                            report.ready.reason
                        ),
                    ));
                } else {
                    unresolved.push(Problem::new(
                        Reason::BackendNotFound,
                        format!("{target_path}.externalModelProviderName: ExternalModelProvider {key} not found; target dropped"),
                    ));
                }
            }
            // Neither or both: already an InvalidRules problem, the route is rejected.
            _ => {}
        }
    }
    resolved
}

fn compile_model_match(
    path: &str,
    model_match: Option<&switchyard_crd::ModelMatch>,
    invalid: &mut Vec<Problem>,
    ignored: &mut Vec<IgnoredField>,
) -> Option<pb::ModelMatch> {
    let model_match = model_match?;
    let path = format!("{path}.modelMatch");
    // Header names are case-insensitive; two spellings of one name would be
    // two conditions on the same header, which is never what the author meant.
    let mut headers: BTreeMap<String, (String, Option<pb::StringMatch>)> = BTreeMap::new();
    for (name, value) in model_match.headers.iter().flatten() {
        let header_path = format!("{path}.headers[{name:?}]");
        if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            invalid.push(Problem::new(
                Reason::InvalidMatch,
                format!("{header_path}: {name:?} is not a valid HTTP header name"),
            ));
            continue;
        }
        let lower = name.to_ascii_lowercase();
        let compiled = compile_string_match(&header_path, value, invalid);
        if is_empty_match(value) {
            ignored.push(IgnoredField::new(
                header_path.clone(),
                "sets none of exact, prefix or regex, so it holds for any value, a missing header included",
            ));
        }
        if let Some((first_name, _)) = headers.get(&lower) {
            invalid.push(Problem::new(
                Reason::InvalidMatch,
                format!("{header_path}: the same header as {first_name:?} (header names are case-insensitive)"),
            ));
            continue;
        }
        headers.insert(lower, (name.clone(), compiled));
    }
    if model_match.uri.as_ref().is_some_and(is_empty_match) {
        ignored.push(IgnoredField::new(
            format!("{path}.uri"),
            "sets none of exact, prefix or regex, so it holds for any path",
        ));
    }
    if model_match
        .body
        .as_ref()
        .is_some_and(|body| non_empty(body.model.as_deref()).is_none())
    {
        ignored.push(IgnoredField::new(
            format!("{path}.body"),
            "sets no model, so it holds for any request",
        ));
    }
    let uri = model_match
        .uri
        .as_ref()
        .and_then(|uri| compile_string_match(&format!("{path}.uri"), uri, invalid));
    let body_model = model_match
        .body
        .as_ref()
        .and_then(|body| non_empty(body.model.as_deref()))
        .map(|model| pb::StringMatch {
            kind: Some(pb::string_match::Kind::Exact(model.to_owned())),
        });
    let headers: Vec<pb::HeaderMatch> = headers
        .into_iter()
        // A match with no exact/prefix/regex holds for any value: no condition.
        .filter_map(|(name, (_, value))| {
            value.map(|value| pb::HeaderMatch {
                name,
                value: Some(value),
            })
        })
        .collect();
    if headers.is_empty() && uri.is_none() && body_model.is_none() {
        // No condition at all matches every request, which is what an absent match means.
        return None;
    }
    Some(pb::ModelMatch {
        headers,
        uri,
        body_model,
    })
}

fn is_empty_match(string_match: &StringMatch) -> bool {
    string_match.exact.is_none() && string_match.prefix.is_none() && string_match.regex.is_none()
}

/// `None` when the match sets nothing (holds for any value).
fn compile_string_match(
    path: &str,
    string_match: &StringMatch,
    invalid: &mut Vec<Problem>,
) -> Option<pb::StringMatch> {
    use pb::string_match::Kind;
    let set = [
        string_match.exact.is_some(),
        string_match.prefix.is_some(),
        string_match.regex.is_some(),
    ]
    .into_iter()
    .filter(|set| *set)
    .count();
    if set > 1 {
        invalid.push(Problem::new(
            Reason::InvalidMatch,
            format!("{path}: only one of exact, prefix or regex may be set"),
        ));
        return None;
    }
    let kind = if let Some(exact) = &string_match.exact {
        Kind::Exact(exact.clone())
    } else if let Some(prefix) = &string_match.prefix {
        Kind::Prefix(prefix.clone())
    } else if let Some(pattern) = &string_match.regex {
        if let Err(error) = regex::Regex::new(pattern) {
            invalid.push(Problem::new(
                Reason::InvalidRegex,
                format!(
                    "{path}.regex: invalid regex {pattern:?}: {}",
                    regex_error_summary(&error)
                ),
            ));
            return None;
        }
        Kind::Regex(pattern.clone())
    } else {
        return None;
    };
    Some(pb::StringMatch { kind: Some(kind) })
}

/// `regex::Error` renders syntax errors over several lines with a caret
/// diagram; a condition message needs one line, and the last line says what is wrong.
fn regex_error_summary(error: &regex::Error) -> String {
    let text = error.to_string();
    text.lines()
        .rev()
        .find_map(|line| line.trim().strip_prefix("error: "))
        .map_or_else(
            || text.split_whitespace().collect::<Vec<_>>().join(" "),
            str::to_owned,
        )
}
