use switchyard_crd::test_builders::ready_pod;
use switchyard_crd::{ModelRoute, ModelServer};

use super::*;
use crate::compile::{Reason, compile_route_config};
use crate::xds::TypeSyncStatus;

fn ts(second: i64) -> Timestamp {
    Timestamp::from_second(1_780_000_000 + second).expect("valid timestamp")
}

fn route(yaml: &str) -> ModelRoute {
    serde_yaml::from_str(yaml).expect("test ModelRoute YAML parses")
}

fn server(yaml: &str) -> ModelServer {
    serde_yaml::from_str(yaml).expect("test ModelServer YAML parses")
}

const SERVER: &str = "{metadata: {name: llama, namespace: default, generation: 2}, spec: \
    {workloadSelector: {matchLabels: {app: llama}}, workloadPort: {port: 8000}, inferenceEngine: vLLM}}";

const ROUTE: &str = "{metadata: {name: chat, namespace: default, generation: 3}, spec: \
    {modelName: chat, rules: [{name: default, targetModels: [{modelServerName: llama}]}]}}";

const ROUTE_TO_MISSING: &str = "{metadata: {name: chat, namespace: default, generation: 4}, spec: \
    {modelName: chat, rules: [{name: default, targetModels: [{modelServerName: gone}]}]}}";

const ROUTE_BAD_REGEX: &str = "{metadata: {name: chat, namespace: default, generation: 5}, spec: \
    {modelName: chat, rules: [{name: default, modelMatch: {headers: {user-type: {regex: \"(\"}}}, \
    targetModels: [{modelServerName: llama}]}]}}";

fn reports(routes: &[&str]) -> Vec<ObjectReport> {
    let routes: Vec<ModelRoute> = routes.iter().map(|yaml| route(yaml)).collect();
    compile_route_config(
        &routes,
        &[server(SERVER)],
        &[ready_pod(
            "default",
            "llama-0",
            "10.0.0.7",
            &[("app", "llama")],
        )],
    )
    .reports
}

fn report_of(reports: &[ObjectReport], kind: ObjectKind) -> &ObjectReport {
    reports
        .iter()
        .find(|report| report.kind == kind)
        .expect("report of that kind")
}

fn dataplane(stream_id: u64, acked: Option<&str>, nacked: Option<(&str, &str)>) -> DataplaneStatus {
    let route_config = TypeSyncStatus {
        subscribed: true,
        acked_version: acked.map(str::to_owned),
        nacked_version: nacked.map(|(version, _)| version.to_owned()),
        last_nack_error: nacked.map(|(_, error)| error.to_owned()),
        ..TypeSyncStatus::default()
    };
    DataplaneStatus {
        stream_id,
        node_id: Some(format!("dataplane-{stream_id}")),
        route_config,
        ..DataplaneStatus::default()
    }
}

fn all_acked(count: u64) -> AckSummary {
    let dataplanes: Vec<_> = (1..=count)
        .map(|id| dataplane(id, Some("rc-1"), None))
        .collect();
    AckSummary::from_dataplanes(Some("rc-1"), &dataplanes)
}

fn find<'a>(conditions: &'a [Condition], type_: &str) -> &'a Condition {
    conditions
        .iter()
        .find(|condition| condition.type_ == type_)
        .expect("condition present")
}

#[test]
fn healthy_route_is_accepted_resolved_and_programmed_on_every_dataplane() {
    let reports = reports(&[ROUTE]);
    let status = route_status(
        report_of(&reports, ObjectKind::ModelRoute),
        &all_acked(3),
        None,
        ts(0),
    );
    assert_eq!(status.observed_generation, Some(3));
    let types: Vec<_> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, ["Accepted", "ResolvedRefs", "Programmed"]);
    for condition in &status.conditions {
        assert_eq!(condition.status, "True", "{condition:?}");
        assert_eq!(condition.observed_generation, Some(3));
        assert_eq!(condition.last_transition_time, Time(ts(0)));
    }
    let programmed = find(&status.conditions, "Programmed");
    assert_eq!(programmed.reason, "Programmed");
    assert_eq!(programmed.message, "3/3 dataplanes at version rc-1");
}

#[test]
fn missing_backend_names_it_and_is_not_programmed() {
    let reports = reports(&[ROUTE_TO_MISSING]);
    let status = route_status(
        report_of(&reports, ObjectKind::ModelRoute),
        &all_acked(2),
        None,
        ts(0),
    );
    let resolved = find(&status.conditions, "ResolvedRefs");
    assert_eq!(resolved.status, "False");
    assert_eq!(resolved.reason, "BackendNotFound");
    assert!(resolved.message.contains("gone"), "{}", resolved.message);
    let programmed = find(&status.conditions, "Programmed");
    assert_eq!(
        (programmed.status.as_str(), programmed.reason.as_str()),
        ("False", "NotInSnapshot")
    );
}

#[test]
fn invalid_regex_is_not_accepted() {
    let reports = reports(&[ROUTE_BAD_REGEX]);
    let report = report_of(&reports, ObjectKind::ModelRoute);
    let status = route_status(report, &all_acked(1), None, ts(0));
    let accepted = find(&status.conditions, "Accepted");
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("False", "InvalidRegex")
    );
    assert_eq!(status.observed_generation, Some(5));
    let events = warning_events(report, &[]);
    assert_eq!(events.len(), 1, "a rejection deserves an event");
    let event = &events[0];
    assert_eq!(event.reason, "InvalidRegex");
    assert_eq!(
        (event.namespace.as_str(), event.name.as_str()),
        ("default", "chat")
    );
    // Once the object carries that rejection, the same rejection is not reported again.
    assert_eq!(warning_events(report, &status.conditions), []);
}

const ROUTE_WITH_IGNORED_FIELDS: &str = "{metadata: {name: chat, namespace: default, generation: 6}, spec: \
    {modelName: chat, \
    rules: [{name: default, modelMatch: {uri: {}}, targetModels: [{modelServerName: llama}]}]}}";

/// A KV connector without prefill/decode groups: nothing uses it.
const SERVER_WITH_STRAY_CONNECTOR: &str = "{metadata: {name: llama, namespace: default, generation: 2}, spec: \
    {workloadSelector: {matchLabels: {app: llama}}, kvConnector: {type: nixl}, \
    workloadPort: {port: 8000}, inferenceEngine: vLLM}}";

#[test]
fn ignored_fields_are_a_condition_and_one_warning_event_until_they_change() {
    let reports = reports(&[ROUTE_WITH_IGNORED_FIELDS]);
    let report = report_of(&reports, ObjectKind::ModelRoute);
    assert!(
        report.is_healthy(),
        "ignored fields do not reject the route"
    );
    let paths: Vec<&str> = report
        .ignored_fields
        .iter()
        .map(|field| field.path.as_str())
        .collect();
    assert_eq!(paths, ["spec.rules[0].modelMatch.uri"]);
    let status = route_status(report, &all_acked(1), None, ts(0));
    let ignored = find(&status.conditions, "IgnoredFields");
    assert_eq!(
        (ignored.status.as_str(), ignored.reason.as_str()),
        ("True", "NotImplemented")
    );
    assert_eq!(
        ignored.message,
        "set but not acted on by the router: \
         spec.rules[0].modelMatch.uri: sets none of exact, prefix or regex, so it holds for any path"
    );
    assert_eq!(find(&status.conditions, "Accepted").status, "True");
    let events = warning_events(report, &[]);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, "IgnoredFields");
    assert_eq!(events[0].note, ignored.message);
    assert_eq!(
        warning_events(report, &status.conditions),
        [],
        "reported once"
    );

    // Fixed: the condition goes, and no event.
    let fixed = reports_of_route(ROUTE);
    let fixed_status = route_status(&fixed, &all_acked(1), Some(&status), ts(5));
    assert!(
        fixed_status
            .conditions
            .iter()
            .all(|condition| condition.type_ != "IgnoredFields"),
        "{:?}",
        fixed_status.conditions
    );
    assert_eq!(warning_events(&fixed, &status.conditions), []);
}

fn reports_of_route(yaml: &str) -> ObjectReport {
    report_of(&reports(&[yaml]), ObjectKind::ModelRoute).clone()
}

#[test]
fn a_kv_connector_without_prefill_decode_groups_is_reported_as_ignored() {
    let compiled = compile_route_config(
        &[route(ROUTE)],
        &[server(SERVER_WITH_STRAY_CONNECTOR)],
        &[ready_pod(
            "default",
            "llama-0",
            "10.0.0.7",
            &[("app", "llama")],
        )],
    );
    let report = report_of(&compiled.reports, ObjectKind::ModelServer);
    let paths: Vec<&str> = report
        .ignored_fields
        .iter()
        .map(|field| field.path.as_str())
        .collect();
    assert_eq!(paths, ["spec.kvConnector"]);
    let status = server_status(report, &all_acked(1), None, None, ts(0));
    assert_eq!(find(&status.conditions, "IgnoredFields").status, "True");
    assert_eq!(warning_events(report, &[])[0].reason, "IgnoredFields");
}

#[test]
fn last_transition_time_moves_only_when_status_flips() {
    let good = reports(&[ROUTE]);
    let good = report_of(&good, ObjectKind::ModelRoute);
    let first = route_status(good, &all_acked(3), None, ts(0));

    // Same facts later: nothing changes, so a writer has nothing to patch.
    let again = route_status(good, &all_acked(3), Some(&first), ts(50));
    assert_eq!(again, first);

    // A new dataplane count changes the message, not the transition time.
    let four = route_status(good, &all_acked(4), Some(&first), ts(60));
    let programmed = find(&four.conditions, "Programmed");
    assert_eq!(programmed.message, "4/4 dataplanes at version rc-1");
    assert_eq!(programmed.last_transition_time, Time(ts(0)));

    // The backend disappears: ResolvedRefs and Programmed flip, Accepted stays.
    let broken = reports(&[ROUTE_TO_MISSING]);
    let broken = report_of(&broken, ObjectKind::ModelRoute);
    let flipped = route_status(broken, &all_acked(4), Some(&four), ts(100));
    assert_eq!(
        find(&flipped.conditions, "Accepted").last_transition_time,
        Time(ts(0))
    );
    assert_eq!(
        find(&flipped.conditions, "ResolvedRefs").last_transition_time,
        Time(ts(100))
    );
    assert_eq!(
        find(&flipped.conditions, "Programmed").last_transition_time,
        Time(ts(100))
    );
}

#[test]
fn programmed_follows_the_ack_state() {
    let cases = [
        (
            vec![],
            false,
            "NoDataplanes",
            "0/0 dataplanes at version rc-1: no dataplane is connected",
        ),
        (
            vec![
                dataplane(1, Some("rc-1"), None),
                dataplane(2, Some("rc-0"), None),
            ],
            false,
            "Pending",
            "1/2 dataplanes at version rc-1",
        ),
        (
            vec![
                dataplane(1, Some("rc-1"), None),
                dataplane(2, Some("rc-0"), Some(("rc-1", "bad regex"))),
            ],
            false,
            "RejectedByDataplane",
            "1/2 dataplanes at version rc-1; rejected by dataplane-2: bad regex",
        ),
        (
            vec![
                dataplane(1, Some("rc-1"), None),
                dataplane(2, Some("rc-1"), None),
            ],
            true,
            "Programmed",
            "2/2 dataplanes at version rc-1",
        ),
    ];
    for (dataplanes, status, reason, message) in cases {
        let acks = AckSummary::from_dataplanes(Some("rc-1"), &dataplanes);
        let (got_status, got_reason, got_message) = acks.programmed(true);
        assert_eq!(
            (got_status, got_reason.as_str(), got_message.as_str()),
            (status, reason, message)
        );
    }
    // A stream that never asked for RouteConfig does not count.
    let mut unsubscribed = dataplane(9, None, None);
    unsubscribed.route_config.subscribed = false;
    assert_eq!(
        AckSummary::from_dataplanes(Some("rc-1"), &[unsubscribed]).dataplanes,
        0
    );
}

#[test]
fn server_status_counts_pods_and_keeps_scrape_time_coarse() {
    let reports = reports(&[ROUTE]);
    let report = report_of(&reports, ObjectKind::ModelServer);
    let first = server_status(report, &all_acked(1), None, Some(ts(5)), ts(5));
    assert_eq!(first.observed_generation, Some(2));
    assert_eq!((first.ready_pods, first.total_pods), (Some(1), Some(1)));
    assert_eq!(
        first.last_scrape_time.as_deref(),
        Some("2026-05-28T20:26:45Z")
    );
    assert_eq!(
        find(&first.conditions, "ResolvedRefs").reason,
        Reason::ResolvedRefs.as_str()
    );

    // Scraped again 10 s later: below the resolution, nothing to write.
    let soon = server_status(report, &all_acked(1), Some(&first), Some(ts(15)), ts(15));
    assert_eq!(soon, first);
    // A minute later it moves.
    let later = server_status(report, &all_acked(1), Some(&first), Some(ts(65)), ts(65));
    assert_eq!(
        later.last_scrape_time.as_deref(),
        Some("2026-05-28T20:27:45Z")
    );
    // No scrape data (all pods failing): the last known time stays, it is not erased.
    let failing = server_status(report, &all_acked(1), Some(&later), None, ts(70));
    assert_eq!(failing.last_scrape_time, later.last_scrape_time);
}

#[test]
fn foreign_conditions_are_kept_and_long_messages_truncated() {
    let reports = reports(&[ROUTE]);
    let report = report_of(&reports, ObjectKind::ModelRoute);
    let foreign = condition("Degraded", true, "Other", "x".to_owned(), None, &[], ts(1));
    let previous = ModelRouteStatus {
        observed_generation: Some(1),
        conditions: vec![foreign.clone()],
    };
    let status = route_status(report, &all_acked(1), Some(&previous), ts(2));
    assert_eq!(status.conditions.last(), Some(&foreign));

    let long = condition(
        "Accepted",
        false,
        "InvalidRules",
        "é".repeat(40_000),
        None,
        &[],
        ts(1),
    );
    assert!(long.message.len() <= MAX_CONDITION_MESSAGE_BYTES);
    assert!(long.message.ends_with("..."));
}

#[test]
fn last_scrape_by_server_takes_the_newest_pod() {
    let server = switchyard_snapshot::test_builders::server(
        "llama",
        &[("a", "10.0.0.1"), ("b", "10.0.0.2")],
    );
    let observed = BTreeMap::from([
        ("default/a".to_owned(), 1_780_000_000_000),
        ("default/b".to_owned(), 1_780_000_005_000),
    ]);
    let newest = last_scrape_by_server(&[server], &observed);
    assert_eq!(
        newest.get(&("default".to_owned(), "llama".to_owned())),
        Some(&ts(5))
    );
}
