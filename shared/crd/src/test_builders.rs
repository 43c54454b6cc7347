//! The objects the controller reads, in one line each, for tests: a ready Pod.
//! Enabled by the `test-support` feature (tests list it in their
//! dev-dependencies), so production builds do not carry it.

use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// A Pod `namespace/name` with `labels`, Running and Ready at `ip`: one the
/// controller routes to.
pub fn ready_pod(namespace: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> Pod {
    let labels = labels
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect();
    let ready = PodCondition {
        type_: "Ready".to_owned(),
        status: "True".to_owned(),
        ..PodCondition::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: None,
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            pod_ip: Some(ip.to_owned()),
            conditions: Some(vec![ready]),
            ..PodStatus::default()
        }),
    }
}

/// The object in `testdata/kthena/examples/{file}`, one of Kthena's example
/// manifests as Kthena publishes them.
pub fn kthena_example<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = format!(
        "{}/../../testdata/kthena/examples/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}
