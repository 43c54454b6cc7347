//! Which pods the controller needs to watch: a label selector derived from
//! every ModelServer's `workloadSelector` and every InferencePool's
//! `selector`, so a large cluster's other pods are never cached.
//!
//! The API server takes one selector per watch and selectors cannot express
//! "any of these label sets", so the controller looks for a label key every
//! ModelServer selects on and watches `key in (v1, v2, ...)`: a superset of
//! every ModelServer's pods (compile then applies each exact selector). When
//! no such key exists it falls back to watching every pod of the namespaces.

use std::collections::{BTreeMap, BTreeSet};

use switchyard_crd::{InferencePool, ModelServer};

/// What the pod watch should cover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodWatch {
    /// No usable ModelServer: no pod is needed, nothing is watched.
    Nothing,
    /// Pods matching this label selector.
    Labels(String),
    /// Every pod (no label key is shared by all ModelServers).
    All,
}

/// Derives the pod watch from the ModelServers and InferencePools.
pub fn pod_watch(servers: &[ModelServer], pools: &[InferencePool]) -> PodWatch {
    let selectors: Vec<&BTreeMap<String, String>> = servers
        .iter()
        .map(|server| &server.spec.workload_selector.match_labels)
        .chain(pools.iter().map(|pool| &pool.spec.selector.match_labels))
        // Compile rejects empty selectors: they need no pods.
        .filter(|labels| !labels.is_empty())
        .collect();
    let Some((first, rest)) = selectors.split_first() else {
        return PodWatch::Nothing;
    };
    let mut common: BTreeSet<&str> = first.keys().map(String::as_str).collect();
    for labels in rest {
        common.retain(|key| labels.contains_key(*key));
    }
    // Deterministic choice: the first shared key that forms a valid selector.
    for key in common {
        let values: BTreeSet<&str> = selectors
            .iter()
            .filter_map(|labels| labels.get(key).map(String::as_str))
            .collect();
        if is_label_key(key) && values.iter().all(|value| is_label_value(value)) {
            let values: Vec<&str> = values.into_iter().collect();
            return PodWatch::Labels(format!("{key} in ({})", values.join(",")));
        }
    }
    PodWatch::All
}

/// `[prefix/]name`, as Kubernetes validates label keys (prefix a DNS subdomain).
fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|prefix| {
        !prefix.is_empty()
            && prefix.len() <= 253
            && prefix
                .split('.')
                .all(|part| !part.is_empty() && is_dns_label(part))
    });
    prefix_ok && !name.is_empty() && is_label_value(name)
}

fn is_dns_label(part: &str) -> bool {
    part.len() <= 63
        && part
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
        && !part.starts_with('-')
        && !part.ends_with('-')
}

/// At most 63 characters of `[A-Za-z0-9_.-]`, alphanumeric at both ends (empty allowed).
fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    value.len() <= 63
        && bytes
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
        && bytes.first().is_none_or(u8::is_ascii_alphanumeric)
        && bytes.last().is_none_or(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(labels: &[(&str, &str)]) -> ModelServer {
        let labels: String = labels
            .iter()
            .map(|(key, value)| format!("\"{key}\": \"{value}\", "))
            .collect();
        serde_yaml::from_str(&format!(
            "metadata: {{ name: s }}\nspec:\n  workloadSelector: {{ matchLabels: {{ {labels} }} }}\n  workloadPort: {{ port: 8000 }}\n  inferenceEngine: vLLM\n"
        ))
        .expect("test ModelServer parses")
    }

    #[test]
    fn a_shared_key_becomes_a_set_selector() {
        let servers = [
            server(&[("app", "llama"), ("tier", "gpu")]),
            server(&[("app", "qwen")]),
            server(&[("app", "llama")]),
        ];
        assert_eq!(
            pod_watch(&servers, &[]),
            PodWatch::Labels("app in (llama,qwen)".to_owned())
        );
    }

    #[test]
    fn the_first_shared_key_in_order_is_used() {
        let servers = [
            server(&[("model.example.com/name", "a"), ("app", "x")]),
            server(&[("model.example.com/name", "b"), ("app", "y")]),
        ];
        assert_eq!(
            pod_watch(&servers, &[]),
            PodWatch::Labels("app in (x,y)".to_owned())
        );
    }

    #[test]
    fn no_shared_key_watches_every_pod() {
        let servers = [server(&[("app", "a")]), server(&[("model", "b")])];
        assert_eq!(pod_watch(&servers, &[]), PodWatch::All);
    }

    #[test]
    fn values_that_are_not_label_values_fall_back_to_every_pod() {
        let servers = [server(&[("app", "a,b")])];
        assert_eq!(pod_watch(&servers, &[]), PodWatch::All);
        let servers = [server(&[("bad key!", "a")])];
        assert_eq!(pod_watch(&servers, &[]), PodWatch::All);
    }

    #[test]
    fn inference_pools_select_pods_too() {
        let pool: InferencePool = serde_yaml::from_str(
            "metadata: { name: p }\nspec:\n  selector: { matchLabels: { app: pooled } }\n  targetPorts: [{ number: 8000 }]\n",
        )
        .expect("test InferencePool parses");
        assert_eq!(
            pod_watch(&[server(&[("app", "llama")])], std::slice::from_ref(&pool)),
            PodWatch::Labels("app in (llama,pooled)".to_owned())
        );
        assert_eq!(
            pod_watch(&[], &[pool]),
            PodWatch::Labels("app in (pooled)".to_owned())
        );
    }

    #[test]
    fn without_servers_nothing_is_watched() {
        assert_eq!(pod_watch(&[], &[]), PodWatch::Nothing);
        assert_eq!(pod_watch(&[server(&[])], &[]), PodWatch::Nothing);
    }
}
