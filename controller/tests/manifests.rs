//! `kubectl apply -k manifests/` without a cluster: every file the
//! kustomizations list parses, has a known kind/apiVersion, and the objects
//! reference each other consistently (selectors, ports, ServiceAccounts,
//! ConfigMaps, RBAC). The samples compile with the controller's own compiler.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_yaml::Value;
use switchyard_controller::compile::compile_route_config;
use switchyard_crd::test_builders::ready_pod;
use switchyard_crd::{ModelRoute, ModelServer};

const NAMESPACE: &str = "switchyard-system";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The objects of the kustomization in `dir`, as (file, document).
fn kustomize(dir: &Path) -> Vec<(String, Value)> {
    let kustomization: Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization.yaml"),
    )
    .expect("kustomization parses");
    assert_eq!(kustomization["kind"].as_str(), Some("Kustomization"));
    let mut objects = Vec::new();
    for resource in kustomization["resources"].as_sequence().expect("resources") {
        let file = resource.as_str().expect("resource path");
        let text = std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|error| panic!("{file} listed in the kustomization: {error}"));
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize_from(document, file);
            if !value.is_null() {
                objects.push((file.to_owned(), value));
            }
        }
    }
    // Every YAML file of the directory is listed (nothing silently left out of `apply -k`).
    for entry in walk(dir) {
        let relative = entry
            .strip_prefix(dir)
            .expect("inside")
            .to_string_lossy()
            .into_owned();
        if relative == "kustomization.yaml" {
            continue;
        }
        assert!(
            objects.iter().any(|(file, _)| *file == relative),
            "{relative} is not listed in {}/kustomization.yaml",
            dir.display()
        );
    }
    objects
}

trait FromDocument {
    fn deserialize_from(document: serde_yaml::Deserializer<'_>, file: &str) -> Self;
}

impl FromDocument for Value {
    fn deserialize_from(document: serde_yaml::Deserializer<'_>, file: &str) -> Self {
        serde::Deserialize::deserialize(document)
            .unwrap_or_else(|error| panic!("{file} does not parse: {error}"))
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            // A folder with its own kustomization is a separate stack
            // (samples, observability), applied on its own.
            if !path.join("kustomization.yaml").exists() {
                files.extend(walk(&path));
            }
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            files.push(path);
        }
    }
    files
}

/// Every object `kustomize build manifests/` renders.
fn manifests() -> Vec<(String, Value)> {
    kustomize(&repo().join("manifests"))
}

/// `metadata.name` of `object`, or "" without one.
fn name_of(object: &Value) -> &str {
    str_of(object, &["metadata", "name"]).unwrap_or_default()
}

fn str_of<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value, |value, key| value.get(*key))
        .and_then(Value::as_str)
}

fn find<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> Option<&'a Value> {
    objects.iter().map(|(_, object)| object).find(|object| {
        object["kind"].as_str() == Some(kind) && str_of(object, &["metadata", "name"]) == Some(name)
    })
}

fn of_kind<'a>(objects: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .map(|(_, object)| object)
        .filter(|object| object["kind"].as_str() == Some(kind))
        .collect()
}

fn labels(value: &Value) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .map(|mapping| {
            mapping
                .iter()
                .filter_map(|(key, value)| {
                    Some((key.as_str()?.to_owned(), value.as_str()?.to_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, pod_labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(key, value)| pod_labels.get(key) == Some(value))
}

fn deployment_selected_by<'a>(
    objects: &'a [(String, Value)],
    selector: &BTreeMap<String, String>,
) -> Vec<&'a Value> {
    of_kind(objects, "Deployment")
        .into_iter()
        .filter(|deployment| {
            selects(
                selector,
                &labels(&deployment["spec"]["template"]["metadata"]["labels"]),
            )
        })
        .collect()
}

fn container_ports(deployment: &Value) -> Vec<(Option<String>, i64)> {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|container| {
            container["ports"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .map(|port| {
            (
                port["name"].as_str().map(str::to_owned),
                port["containerPort"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn every_object_has_a_known_kind_and_api_version() {
    let objects = manifests();
    let known: BTreeMap<&str, &str> = [
        ("Namespace", "v1"),
        ("ServiceAccount", "v1"),
        ("ConfigMap", "v1"),
        ("Service", "v1"),
        ("Deployment", "apps/v1"),
        ("ClusterRole", "rbac.authorization.k8s.io/v1"),
        ("ClusterRoleBinding", "rbac.authorization.k8s.io/v1"),
        ("Role", "rbac.authorization.k8s.io/v1"),
        ("RoleBinding", "rbac.authorization.k8s.io/v1"),
        ("PodDisruptionBudget", "policy/v1"),
        ("HorizontalPodAutoscaler", "autoscaling/v2"),
        ("CustomResourceDefinition", "apiextensions.k8s.io/v1"),
    ]
    .into();
    let cluster_scoped = [
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
    ];
    for (file, object) in &objects {
        let kind = object["kind"].as_str().unwrap_or_default();
        let name = name_of(object);
        assert!(!name.is_empty(), "{file}: {kind} without a name");
        assert_eq!(
            known.get(kind).copied(),
            object["apiVersion"].as_str(),
            "{file}: {kind} {name}: unexpected kind or apiVersion"
        );
        if !cluster_scoped.contains(&kind) {
            assert_eq!(
                str_of(object, &["metadata", "namespace"]),
                Some(NAMESPACE),
                "{file}: {kind} {name} must live in {NAMESPACE}"
            );
        }
    }
    assert!(find(&objects, "Namespace", NAMESPACE).is_some());
}

#[test]
fn the_crds_are_the_generated_ones() {
    for name in [
        "modelroutes.networking.serving.volcano.sh.yaml",
        "modelservers.networking.serving.volcano.sh.yaml",
    ] {
        let generated = std::fs::read_to_string(repo().join("crds").join(name)).expect("crds/");
        let packaged = std::fs::read_to_string(repo().join("manifests/crds").join(name))
            .expect("manifests/crds/");
        assert_eq!(
            packaged, generated,
            "manifests/crds/{name} drifted from crds/: run `make crds`"
        );
    }
}

#[test]
fn services_pdbs_and_autoscalers_point_at_real_pods_and_ports() {
    let objects = manifests();
    for service in of_kind(&objects, "Service") {
        let selected = deployment_selected_by(&objects, &labels(&service["spec"]["selector"]));
        let name = name_of(service);
        assert_eq!(
            selected.len(),
            1,
            "Service {name} selects exactly one Deployment's pods"
        );
        let ports = container_ports(selected[0]);
        for port in service["spec"]["ports"].as_sequence().expect("ports") {
            let found = match &port["targetPort"] {
                Value::String(target) => ports
                    .iter()
                    .any(|(name, _)| name.as_deref() == Some(target)),
                Value::Number(target) => ports
                    .iter()
                    .any(|(_, number)| Some(*number) == target.as_i64()),
                _ => false,
            };
            assert!(
                found,
                "Service {name}: targetPort {:?} is no container port",
                port["targetPort"]
            );
        }
    }
    let dataplane_service =
        find(&objects, "Service", "switchyard-dataplane").expect("dataplane Service");
    assert_eq!(
        str_of(dataplane_service, &["spec", "type"]),
        Some("LoadBalancer")
    );

    for pdb in of_kind(&objects, "PodDisruptionBudget") {
        let selected =
            deployment_selected_by(&objects, &labels(&pdb["spec"]["selector"]["matchLabels"]));
        assert_eq!(selected.len(), 1, "the PDB covers one Deployment");
    }
    for hpa in of_kind(&objects, "HorizontalPodAutoscaler") {
        let target = str_of(hpa, &["spec", "scaleTargetRef", "name"]).unwrap_or_default();
        assert!(
            find(&objects, "Deployment", target).is_some(),
            "HPA target {target} exists"
        );
    }
    for deployment in of_kind(&objects, "Deployment") {
        let name = name_of(deployment);
        let selector = labels(&deployment["spec"]["selector"]["matchLabels"]);
        assert!(
            selects(
                &selector,
                &labels(&deployment["spec"]["template"]["metadata"]["labels"])
            ),
            "Deployment {name}: its selector matches its own pods"
        );
    }
}

#[test]
fn service_accounts_config_maps_and_rbac_exist_and_the_dataplane_has_no_credentials() {
    let objects = manifests();
    for deployment in of_kind(&objects, "Deployment") {
        let name = name_of(deployment);
        let pod = &deployment["spec"]["template"]["spec"];
        let account = pod["serviceAccountName"].as_str().unwrap_or_default();
        assert!(
            find(&objects, "ServiceAccount", account).is_some(),
            "{name}: ServiceAccount {account} exists"
        );
        for container in pod["containers"].as_sequence().expect("containers") {
            for source in container["envFrom"].as_sequence().into_iter().flatten() {
                if let Some(config_map) = str_of(source, &["configMapRef", "name"]) {
                    assert!(
                        find(&objects, "ConfigMap", config_map).is_some(),
                        "{name}: ConfigMap {config_map} exists"
                    );
                }
            }
            assert_eq!(
                str_of(container, &["readinessProbe", "httpGet", "path"]),
                Some("/readyz"),
                "{name}"
            );
        }
    }
    let controller = find(&objects, "Deployment", "switchyard-controller").expect("controller");
    assert_eq!(controller["spec"]["replicas"].as_i64(), Some(2));
    for deployment in [
        controller,
        find(&objects, "Deployment", "switchyard-dataplane").expect("dataplane"),
    ] {
        let pod = &deployment["spec"]["template"]["spec"];
        for volume in pod["volumes"].as_sequence().into_iter().flatten() {
            if let Some(config_map) = str_of(volume, &["configMap", "name"]) {
                assert!(
                    find(&objects, "ConfigMap", config_map).is_some(),
                    "volume ConfigMap {config_map} exists"
                );
            }
        }
    }
    let dataplane = find(&objects, "Deployment", "switchyard-dataplane").expect("dataplane");
    assert_eq!(dataplane["spec"]["replicas"].as_i64(), Some(3));
    assert_eq!(
        dataplane["spec"]["template"]["spec"]["automountServiceAccountToken"].as_bool(),
        Some(false)
    );
    let account =
        find(&objects, "ServiceAccount", "switchyard-dataplane").expect("dataplane ServiceAccount");
    assert_eq!(
        account["automountServiceAccountToken"].as_bool(),
        Some(false)
    );

    let mut bound_roles = Vec::new();
    for binding in of_kind(&objects, "ClusterRoleBinding")
        .into_iter()
        .chain(of_kind(&objects, "RoleBinding"))
    {
        let role_kind = str_of(binding, &["roleRef", "kind"]).unwrap_or_default();
        let role = str_of(binding, &["roleRef", "name"]).unwrap_or_default();
        assert!(
            find(&objects, role_kind, role).is_some(),
            "{role_kind} {role} exists"
        );
        for subject in binding["subjects"].as_sequence().expect("subjects") {
            let account = str_of(subject, &["name"]).unwrap_or_default();
            assert_eq!(
                account, "switchyard-controller",
                "only the controller is granted anything"
            );
            assert!(find(&objects, "ServiceAccount", account).is_some());
        }
        bound_roles.push((role_kind.to_owned(), role.to_owned()));
    }
    // What the controller does, it may do.
    let mut granted: Vec<(String, String, String)> = Vec::new();
    for (kind, name) in &bound_roles {
        let role = find(&objects, kind, name).expect("role");
        for rule in role["rules"].as_sequence().expect("rules") {
            for group in rule["apiGroups"].as_sequence().expect("apiGroups") {
                for resource in rule["resources"].as_sequence().expect("resources") {
                    for verb in rule["verbs"].as_sequence().expect("verbs") {
                        granted.push((
                            group.as_str().unwrap_or_default().to_owned(),
                            resource.as_str().unwrap_or_default().to_owned(),
                            verb.as_str().unwrap_or_default().to_owned(),
                        ));
                    }
                }
            }
        }
    }
    // Dataplane reports and API keys live in the controller's namespace: no
    // ClusterRole may open every ConfigMap or Secret of the cluster, except
    // the one role for provider credentials, which may only list and watch
    // Secrets (the controller selects them by label).
    let credentials_role = of_kind(&objects, "ClusterRole")
        .into_iter()
        .find(|role| {
            str_of(role, &["metadata", "name"])
                == Some("switchyard-controller-provider-credentials")
        })
        .expect("the provider credentials role");
    for rule in credentials_role["rules"].as_sequence().expect("rules") {
        assert_eq!(
            rule["resources"],
            serde_yaml::from_str::<serde_yaml::Value>("[secrets]").expect("yaml")
        );
        assert_eq!(
            rule["verbs"],
            serde_yaml::from_str::<serde_yaml::Value>("[list, watch]").expect("yaml")
        );
    }
    for resource in ["configmaps", "secrets"] {
        for role in of_kind(&objects, "ClusterRole") {
            if resource == "secrets"
                && str_of(role, &["metadata", "name"])
                    == Some("switchyard-controller-provider-credentials")
            {
                continue;
            }
            for rule in role["rules"].as_sequence().expect("rules") {
                let resources = rule["resources"].as_sequence().expect("resources");
                assert!(
                    !resources.iter().any(|granted| granted == resource),
                    "ClusterRole {:?} grants {resource}",
                    str_of(role, &["metadata", "name"])
                );
            }
        }
        let namespaces: Vec<&str> = of_kind(&objects, "Role")
            .into_iter()
            .filter(|role| {
                role["rules"].as_sequence().is_some_and(|rules| {
                    rules.iter().any(|rule| {
                        rule["resources"]
                            .as_sequence()
                            .is_some_and(|resources| resources.iter().any(|r| r == resource))
                    })
                })
            })
            .filter_map(|role| str_of(role, &["metadata", "namespace"]))
            .collect();
        assert_eq!(
            namespaces,
            ["switchyard-system"],
            "{resource} only in the controller namespace"
        );
    }
    let crd_group = "networking.serving.volcano.sh";
    for (group, resource, verb) in [
        (crd_group, "modelroutes", "list"),
        (crd_group, "modelroutes", "watch"),
        (crd_group, "modelservers", "watch"),
        (crd_group, "modelroutes/status", "patch"),
        (crd_group, "modelservers/status", "patch"),
        (crd_group, "externalmodelproviders", "watch"),
        (crd_group, "externalmodelproviders/status", "patch"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("coordination.k8s.io", "leases", "get"),
        ("coordination.k8s.io", "leases", "create"),
        ("coordination.k8s.io", "leases", "patch"),
        ("events.k8s.io", "events", "create"),
        ("", "configmaps", "list"),
        ("", "configmaps", "create"),
        ("", "configmaps", "patch"),
        ("", "configmaps", "delete"),
        ("", "secrets", "list"),
        ("", "secrets", "watch"),
    ] {
        assert!(
            granted.iter().any(|granted| *granted == (group.to_owned(), resource.to_owned(), verb.to_owned())),
            "the controller needs {verb} on {group}/{resource}"
        );
    }
}

#[test]
fn the_samples_compile_and_select_the_mock_engine() {
    let objects = kustomize(&repo().join("manifests/samples"));
    let mut routes = Vec::new();
    let mut servers = Vec::new();
    for (file, object) in &objects {
        let text = serde_yaml::to_string(object).expect("YAML");
        match object["kind"].as_str() {
            Some("ModelRoute") => routes.push(
                serde_yaml::from_str::<ModelRoute>(&text)
                    .unwrap_or_else(|error| panic!("{file}: {error}")),
            ),
            Some("ModelServer") => servers.push(
                serde_yaml::from_str::<ModelServer>(&text)
                    .unwrap_or_else(|error| panic!("{file}: {error}")),
            ),
            Some("Deployment") => {}
            other => panic!("{file}: unexpected kind {other:?}"),
        }
    }
    // One pod per mock Deployment, as the Deployment would create it.
    let mut pods = Vec::new();
    for deployment in of_kind(&objects, "Deployment") {
        let pod_labels = labels(&deployment["spec"]["template"]["metadata"]["labels"]);
        for server in &servers {
            if selects(&server.spec.workload_selector.match_labels, &pod_labels) {
                let ports = container_ports(deployment);
                assert!(
                    ports
                        .iter()
                        .any(|(_, port)| *port == i64::from(server.spec.workload_port.port)),
                    "the mock engine listens on the ModelServer's workloadPort"
                );
            }
        }
        let pod_labels: Vec<(&str, &str)> = pod_labels
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        pods.push(ready_pod(
            "default",
            "mock-llama-0",
            "10.1.0.5",
            &pod_labels,
        ));
    }
    let compiled = compile_route_config(&routes, &servers, &pods);
    for report in &compiled.reports {
        assert!(
            report.is_healthy(),
            "sample {} {}: {report:?}",
            report.kind.as_str(),
            report.name
        );
    }
    assert_eq!(compiled.route_config.routes.len(), 1);
    assert_eq!(compiled.route_config.servers[0].endpoints.len(), 1);
}

#[test]
fn the_dockerfile_is_multi_stage_non_root_and_builds_both_binaries() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let stages = dockerfile
        .lines()
        .filter(|line| line.starts_with("FROM "))
        .count();
    assert!(stages >= 2, "multi-stage");
    assert!(
        dockerfile.contains("--bin switchyard-controller")
            && dockerfile.contains("--bin switchyard-dataplane")
    );
    let user = dockerfile
        .lines()
        .rev()
        .find(|line| line.starts_with("USER "))
        .expect("a USER line");
    assert!(!user.contains("root") || user.contains("nonroot"), "{user}");
    assert!(!user.trim_start_matches("USER ").starts_with('0'), "{user}");
    // The manifests start the binaries the image installs.
    let objects = manifests();
    for deployment in of_kind(&objects, "Deployment") {
        for container in deployment["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .expect("containers")
        {
            let command = container["command"][0].as_str().unwrap_or_default();
            let binary = command.trim_start_matches("/usr/local/bin/");
            assert!(
                dockerfile.contains(&format!("--bin {binary}")),
                "image builds {binary}"
            );
        }
    }
}

/// The router configuration file both binaries are pointed at is mounted
/// where the settings say, and the controller's own parser accepts it.
#[test]
fn the_router_configuration_file_is_mounted_and_valid() {
    let objects = manifests();
    let settings = find(&objects, "ConfigMap", "switchyard-settings").expect("settings");
    let file = find(&objects, "ConfigMap", "switchyard-router-config").expect("router config");
    let path = str_of(settings, &["data", "SWITCHYARD_ROUTER_CONFIG"]).expect("controller path");
    assert_eq!(str_of(settings, &["data", "SWITCHYARD_CONFIG"]), Some(path));
    let (dir, key) = path.rsplit_once('/').expect("absolute path");
    for name in ["switchyard-controller", "switchyard-dataplane"] {
        let pod = &find(&objects, "Deployment", name).expect(name)["spec"]["template"]["spec"];
        let volume = pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|v| str_of(v, &["configMap", "name"]) == Some("switchyard-router-config"))
            .unwrap_or_else(|| panic!("{name} mounts the router configuration"));
        let volume_name = volume["name"].as_str().expect("volume name");
        let mounted = pod["containers"][0]["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|m| {
                m["name"].as_str() == Some(volume_name) && m["mountPath"].as_str() == Some(dir)
            });
        assert!(mounted, "{name} mounts it at {dir}");
    }
    let text = str_of(file, &["data", key]).expect("file content");
    let parsed = switchyard_controller::router_config::parse_router_config(Path::new(path), text)
        .expect("the controller accepts the shipped router configuration");
    assert!(parsed.scheduler.is_some(), "it has a scheduler section");
}
