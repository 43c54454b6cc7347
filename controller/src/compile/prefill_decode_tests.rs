//! Compiling prefill/decode ModelServers: connectors, groups, status counts.

use k8s_openapi::api::core::v1::Pod;
use switchyard_crd::test_builders::{kthena_example, ready_pod};
use switchyard_crd::{ModelRoute, ModelServer};
use switchyard_snapshot::pb;
use switchyard_snapshot::test_builders::pd_group as group;

use super::*;

fn server(yaml: &str) -> ModelServer {
    serde_yaml::from_str(yaml).expect("test ModelServer YAML parses")
}

/// A ready pod with `labels` and `annotations`.
fn pod(
    namespace: &str,
    name: &str,
    ip: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
) -> Pod {
    let mut pod = ready_pod(namespace, name, ip, labels);
    pod.metadata.annotations = (!annotations.is_empty()).then(|| {
        annotations
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    });
    pod
}

fn not_ready(mut pod: Pod) -> Pod {
    if let Some(status) = pod.status.as_mut() {
        status.phase = Some("Pending".to_owned());
    }
    pod
}

/// Pod `name` of the ds1.5b example: group `group`, role label `role`.
fn ds_pod(name: &str, ip: &str, group: &str, role: &str) -> Pod {
    pod(
        "default",
        name,
        ip,
        &[
            ("app", "deepseek-r1-1-5b"),
            ("modelserving.volcano.sh/group-name", group),
            ("modelserving.volcano.sh/rolename", role),
        ],
        &[],
    )
}

fn the_report<'a>(compiled: &'a CompiledRoutes, name: &str) -> &'a ObjectReport {
    compiled
        .reports
        .iter()
        .find(|report| report.kind == ObjectKind::ModelServer && report.name == name)
        .unwrap_or_else(|| panic!("no report for {name}"))
}

#[test]
fn kthena_pd_examples_compile_into_groups_with_their_connectors() {
    let servers: Vec<ModelServer> = vec![
        kthena_example("ModelServer-ds1.5b-pd-disaggregation.yaml"),
        kthena_example("ModelServer-prefill-decode-disaggregation.yaml"),
    ];
    let routes: Vec<ModelRoute> = vec![
        kthena_example("ModelRoute-ds1.5b-pd-disaggregation.yaml"),
        kthena_example("ModelRoute-prefill-decode-disaggregation.yaml"),
    ];
    let v2 = |name: &str, ip: &str, group: &str, role: &str| {
        pod(
            "dev",
            name,
            ip,
            &[
                ("modelserving.volcano.sh/name", "deepseek-v2-lite"),
                ("modelserving.volcano.sh/group-name", group),
                ("modelserving.volcano.sh/role", role),
            ],
            &[],
        )
    };
    let pods = [
        ds_pod("ds-p-0", "10.0.0.1", "group-0", "P-instance"),
        ds_pod("ds-d-0", "10.0.0.2", "group-0", "D-instance"),
        ds_pod("ds-p-1", "10.0.0.3", "group-1", "P-instance"),
        ds_pod("ds-d-1", "10.0.0.4", "group-1", "D-instance"),
        ds_pod("ds-d-2", "10.0.0.5", "group-1", "D-instance"),
        v2("v2-prefill", "10.0.1.1", "g", "prefill"),
        v2("v2-decode", "10.0.1.2", "g", "decode"),
    ];
    let compiled = compile_route_config(&routes, &servers, &pods);
    assert_eq!(compiled.route_config.routes.len(), 2, "both routes resolve");
    let ds = &compiled.route_config.servers[0];
    assert_eq!(ds.name, "deepseek-r1-1-5b-pd-disaggregation");
    assert_eq!(
        ds.prefill_decode,
        Some(pb::PrefillDecode {
            kv_connector: pb::KvConnector::Http.into(),
            group_label: "modelserving.volcano.sh/group-name".to_owned(),
            groups: vec![
                group("group-0", &["ds-p-0"], &["ds-d-0"]),
                group("group-1", &["ds-p-1"], &["ds-d-1", "ds-d-2"]),
            ],
        }),
        "default connector of a vLLM engine: http"
    );
    let names: Vec<&str> = ds.endpoints.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["ds-d-0", "ds-d-1", "ds-d-2", "ds-p-0", "ds-p-1"]);
    assert_eq!(compiled.scrape_targets.len(), 7, "both roles are scraped");
    let report = the_report(&compiled, "deepseek-r1-1-5b-pd-disaggregation");
    assert!(report.is_healthy(), "{report:#?}");
    assert_eq!(report.accepted.message, "");
    assert_eq!(
        (report.pd_groups, report.complete_pd_groups),
        (Some(2), Some(2))
    );
    assert_eq!(
        report.resolved_refs.message,
        "5 of 5 selected pods ready; 2 of 2 prefill/decode groups complete"
    );

    let v2 = &compiled.route_config.servers[1];
    assert_eq!(
        (v2.namespace.as_str(), v2.name.as_str()),
        ("dev", "deepseek-v2")
    );
    let pd = v2.prefill_decode.as_ref().expect("a PD server");
    assert_eq!(pd.kv_connector(), pb::KvConnector::Nixl);
    assert_eq!(pd.groups, [group("g", &["v2-prefill"], &["v2-decode"])]);
}

#[test]
fn a_server_without_a_complete_group_is_not_resolved_and_says_why() {
    let servers = [kthena_example::<ModelServer>(
        "ModelServer-ds1.5b-pd-disaggregation.yaml",
    )];
    let pods = [
        ds_pod("p-0", "10.0.0.1", "group-0", "P-instance"),
        not_ready(ds_pod("d-0", "10.0.0.2", "group-0", "D-instance")),
        ds_pod("d-1", "10.0.0.3", "group-1", "D-instance"),
    ];
    let compiled = compile_route_config(&[], &servers, &pods);
    let report = the_report(&compiled, "deepseek-r1-1-5b-pd-disaggregation");
    assert!(report.accepted.status);
    assert!(!report.resolved_refs.status);
    assert_eq!(report.resolved_refs.reason, Reason::NoCompletePdGroup);
    assert_eq!(
        report.resolved_refs.message,
        "spec.workloadSelector.pdGroup: no group (pods with one value of label \
         modelserving.volcano.sh/group-name) has both a ready prefill pod \
         {modelserving.volcano.sh/rolename=P-instance} and a ready decode pod \
         {modelserving.volcano.sh/rolename=D-instance}; requests routed here get 503 \
         (2 of 3 selected pods ready; incomplete groups: 2 [group-0 (no ready decode pod), \
         group-1 (no ready prefill pod)])"
    );
    assert_eq!(
        (report.pd_groups, report.complete_pd_groups),
        (Some(2), Some(0))
    );
    assert!(
        report.in_snapshot,
        "kept in the snapshot: requests get a 503 rather than a 404"
    );
    let pd = compiled.route_config.servers[0]
        .prefill_decode
        .as_ref()
        .expect("PD");
    assert_eq!(
        pd.groups,
        [
            group("group-0", &["p-0"], &[]),
            group("group-1", &[], &["d-1"])
        ],
        "incomplete groups travel; dataplanes never schedule them"
    );
}

#[test]
fn decode_labels_win_and_pods_without_a_role_or_group_are_named() {
    let servers = [server(
        r#"
metadata: { name: pd, namespace: default }
spec:
  workloadSelector:
    matchLabels: { app: m }
    pdGroup:
      groupKey: group
      prefillLabels: { role: prefill }
      decodeLabels: { tier: decode }
  workloadPort: { port: 8000 }
  inferenceEngine: vLLM
"#,
    )];
    let pods = [
        // Both roles' labels: decode is checked first.
        pod(
            "default",
            "both",
            "10.0.0.1",
            &[
                ("app", "m"),
                ("group", "a"),
                ("role", "prefill"),
                ("tier", "decode"),
            ],
            &[],
        ),
        pod(
            "default",
            "prefill",
            "10.0.0.2",
            &[("app", "m"), ("group", "a"), ("role", "prefill")],
            &[],
        ),
        pod(
            "default",
            "no-role",
            "10.0.0.3",
            &[("app", "m"), ("group", "a")],
            &[],
        ),
        pod(
            "default",
            "no-group",
            "10.0.0.4",
            &[("app", "m"), ("role", "prefill")],
            &[],
        ),
    ];
    let compiled = compile_route_config(&[], &servers, &pods);
    let pd = compiled.route_config.servers[0]
        .prefill_decode
        .as_ref()
        .expect("PD");
    assert_eq!(pd.groups, [group("a", &["prefill"], &["both"])]);
    let names: Vec<&str> = compiled.route_config.servers[0]
        .endpoints
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["both", "prefill"],
        "pods that get no traffic are not endpoints"
    );
    let report = the_report(&compiled, "pd");
    assert_eq!(
        report.resolved_refs.message,
        "4 of 4 selected pods ready; 1 of 1 prefill/decode groups complete; \
         1 selected pods (first: no-role) match neither prefillLabels nor decodeLabels and get no traffic; \
         1 selected pods (first: no-group) have no group label and get no traffic"
    );
}

#[test]
fn connectors_default_by_engine_and_unknown_ones_are_rejected() {
    let pd_server = |name: &str, engine: &str, connector: &str| {
        server(&format!(
            r#"
metadata: {{ name: {name}, namespace: default }}
spec:
  workloadSelector:
    matchLabels: {{ app: m }}
    pdGroup: {{ groupKey: g, prefillLabels: {{ role: p }}, decodeLabels: {{ role: d }} }}
  workloadPort: {{ port: 8000 }}
  inferenceEngine: {engine}
{connector}
"#
        ))
    };
    let servers = [
        pd_server("sglang-default", "SGLang", ""),
        pd_server("sglang-http", "SGLang", "  kvConnector: {}"),
        pd_server("vllm-lmcache", "vLLM", "  kvConnector: { type: lmcache }"),
        pd_server("vllm-mooncake", "vLLM", "  kvConnector: { type: mooncake }"),
        pd_server("bogus", "vLLM", "  kvConnector: { type: p2p }"),
    ];
    let compiled = compile_route_config(&[], &servers, &[]);
    let connector = |name: &str| {
        compiled
            .route_config
            .servers
            .iter()
            .find(|server| server.name == name)
            .and_then(|server| server.prefill_decode.as_ref())
            .map(pb::PrefillDecode::kv_connector)
    };
    assert_eq!(connector("sglang-default"), Some(pb::KvConnector::Sglang));
    assert_eq!(
        connector("sglang-http"),
        Some(pb::KvConnector::Http),
        "an explicit kvConnector (type defaulting to http) wins over the engine"
    );
    assert_eq!(connector("vllm-lmcache"), Some(pb::KvConnector::Lmcache));
    assert_eq!(connector("vllm-mooncake"), Some(pb::KvConnector::Mooncake));
    assert_eq!(connector("bogus"), None, "left out of the snapshot");
    let bogus = the_report(&compiled, "bogus");
    assert!(!bogus.accepted.status);
    assert_eq!(bogus.accepted.reason, Reason::InvalidKvConnector);
    assert_eq!(
        bogus.accepted.message,
        r#"spec.kvConnector.type: unknown connector "p2p"; use http, lmcache, nixl or mooncake"#
    );
}

#[test]
fn a_kv_connector_without_pd_group_is_accepted_and_reported_as_without_effect() {
    let servers = [server(
        r#"
metadata: { name: plain, namespace: default }
spec:
  workloadSelector: { matchLabels: { app: m } }
  workloadPort: { port: 8000 }
  inferenceEngine: vLLM
  kvConnector: { type: nixl }
"#,
    )];
    let compiled = compile_route_config(&[], &servers, &[]);
    assert_eq!(compiled.route_config.servers[0].prefill_decode, None);
    let report = the_report(&compiled, "plain");
    assert!(report.accepted.status);
    assert_eq!(
        report.accepted.message,
        "spec.kvConnector has no effect without spec.workloadSelector.pdGroup: requests go to one pod each"
    );
    assert_eq!((report.pd_groups, report.complete_pd_groups), (None, None));
}

#[test]
fn a_pd_group_whose_roles_cannot_differ_is_rejected() {
    let servers = [server(
        r#"
metadata: { name: same, namespace: default }
spec:
  workloadSelector:
    matchLabels: { app: m }
    pdGroup: { groupKey: "", prefillLabels: { role: x }, decodeLabels: { role: x } }
  workloadPort: { port: 8000 }
  inferenceEngine: vLLM
"#,
    )];
    let compiled = compile_route_config(&[], &servers, &[]);
    assert!(compiled.route_config.servers.is_empty());
    let report = the_report(&compiled, "same");
    assert_eq!(report.accepted.reason, Reason::InvalidSelector);
    assert_eq!(
        report.accepted.message,
        "spec.workloadSelector.pdGroup.groupKey: must name a pod label; \
         spec.workloadSelector.pdGroup: prefillLabels and decodeLabels are equal, so every pod is a decode pod and none can prefill"
    );
}

#[test]
fn sglang_prefill_pods_carry_their_bootstrap_port_annotation() {
    let servers = [server(
        r#"
metadata: { name: sg, namespace: default }
spec:
  workloadSelector:
    matchLabels: { app: sg }
    pdGroup: { groupKey: g, prefillLabels: { role: p }, decodeLabels: { role: d } }
  workloadPort: { port: 30000 }
  inferenceEngine: SGLang
"#,
    )];
    let labels = |role| [("app", "sg"), ("g", "0"), ("role", role)];
    let pods = [
        pod(
            "default",
            "p-annotated",
            "10.0.0.1",
            &labels("p"),
            &[(SGLANG_BOOTSTRAP_PORT_ANNOTATION, "9001")],
        ),
        pod(
            "default",
            "p-bad",
            "10.0.0.2",
            &labels("p"),
            &[(SGLANG_BOOTSTRAP_PORT_ANNOTATION, "ninety")],
        ),
        pod("default", "p-plain", "10.0.0.3", &labels("p"), &[]),
        // Only prefill pods serve bootstrap.
        pod(
            "default",
            "d",
            "10.0.0.4",
            &labels("d"),
            &[(SGLANG_BOOTSTRAP_PORT_ANNOTATION, "9002")],
        ),
    ];
    let compiled = compile_route_config(&[], &servers, &pods);
    let ports: Vec<(&str, u32)> = compiled.route_config.servers[0]
        .endpoints
        .iter()
        .map(|e| (e.name.as_str(), e.bootstrap_port))
        .collect();
    assert_eq!(
        ports,
        [
            ("d", 0),
            ("p-annotated", 9001),
            ("p-bad", 0),
            ("p-plain", 0)
        ]
    );
    let report = the_report(&compiled, "sg");
    assert!(report.resolved_refs.status);
    assert!(
        report.resolved_refs.message.ends_with(
            r#"pod p-bad: annotation sglang.ai/bootstrap-port "ninety" is not a port in 1..=65535; the engine's default bootstrap port is used"#
        ),
        "{}",
        report.resolved_refs.message
    );
}

#[test]
fn pd_groups_reach_the_status() {
    let servers = [kthena_example::<ModelServer>(
        "ModelServer-ds1.5b-pd-disaggregation.yaml",
    )];
    let pods = [
        ds_pod("p-0", "10.0.0.1", "group-0", "P-instance"),
        ds_pod("d-0", "10.0.0.2", "group-0", "D-instance"),
        ds_pod("p-1", "10.0.0.3", "group-1", "P-instance"),
    ];
    let compiled = compile_route_config(&[], &servers, &pods);
    let report = the_report(&compiled, "deepseek-r1-1-5b-pd-disaggregation");
    let status = crate::status::server_status(
        report,
        &crate::status::AckSummary::default(),
        None,
        None,
        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
    );
    assert_eq!(
        (status.pd_groups, status.complete_pd_groups),
        (Some(2), Some(1))
    );
    let yaml = serde_yaml::to_string(&status).expect("serialises");
    assert!(
        yaml.contains("pdGroups: 2\n") && yaml.contains("completePdGroups: 1\n"),
        "{yaml}"
    );
}
