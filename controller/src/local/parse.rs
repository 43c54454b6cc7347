//! YAML documents of one file -> ModelRoutes, ModelServers and Pods; a bad
//! document becomes a [`LoadProblem`] and the rest of the file still loads.

use serde::Deserialize;

use super::LocalObjects;
use crate::compile::LoadProblem;

/// `apiVersion` of ModelRoute and ModelServer documents.
const CRD_API_VERSION: &str = "networking.serving.volcano.sh/v1alpha1";
/// `apiVersion` of Pod documents.
const POD_API_VERSION: &str = "v1";
/// `apiVersion` of GatewayClass, Gateway and HTTPRoute documents.
const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";
/// `apiVersion` of InferencePool documents.
const INFERENCE_API_VERSION: &str = "inference.networking.k8s.io/v1";

/// Parses the YAML documents of one file into `objects`; bad documents become problems.
pub fn parse_documents(file: &str, text: &str, objects: &mut LocalObjects) {
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let problem = |kind: Option<&str>, name: Option<&str>, error: String| LoadProblem {
            file: file.to_owned(),
            document_index: Some(index),
            kind: kind.map(str::to_owned),
            name: name.map(str::to_owned),
            error,
        };
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(value) => value,
            Err(error) => {
                // Not a typed-field error (those come from `from_value` below) but
                // YAML syntax: the parser cannot find where the next document
                // starts, and serde_yaml would yield this same error forever.
                objects.problems.push(problem(
                    None,
                    None,
                    format!("{error}; the rest of the file was not read"),
                ));
                break;
            }
        };
        if value.is_null() {
            // An empty document, e.g. after a trailing `---`.
            continue;
        }
        let kind = value.get("kind").and_then(serde_yaml::Value::as_str);
        let api_version = value.get("apiVersion").and_then(serde_yaml::Value::as_str);
        let name = value
            .get("metadata")
            .and_then(|metadata| metadata.get("name"))
            .and_then(serde_yaml::Value::as_str);
        let expected_api_version = match kind {
            Some("ModelRoute" | "ModelServer" | "ExternalModelProvider") => CRD_API_VERSION,
            Some("Pod" | "Secret") => POD_API_VERSION,
            Some("GatewayClass" | "Gateway" | "HTTPRoute") => GATEWAY_API_VERSION,
            Some("InferencePool") => INFERENCE_API_VERSION,
            Some(other) => {
                tracing::debug!(
                    file,
                    document_index = index,
                    kind = other,
                    "ignoring a document of a kind local mode does not use"
                );
                continue;
            }
            None => {
                objects
                    .problems
                    .push(problem(None, name, "document has no `kind`".to_owned()));
                continue;
            }
        };
        if api_version != Some(expected_api_version) {
            objects.problems.push(problem(
                kind,
                name,
                format!(
                    "apiVersion {:?} is not {expected_api_version:?}",
                    api_version.unwrap_or_default()
                ),
            ));
            continue;
        }
        if kind == Some("Secret") {
            match read_api_key_secret(&value) {
                Ok(Some(key)) => objects.api_keys.push(key),
                Ok(None) => {}
                Err(error) => objects.problems.push(problem(kind, name, error)),
            }
            match read_credential_secret(&value) {
                Ok(Some(secret)) => objects.provider_secrets.push(secret),
                Ok(None) => {}
                Err(error) => objects.problems.push(problem(kind, name, error)),
            }
            continue;
        }
        let parsed =
            match kind {
                Some("ModelRoute") => {
                    serde_yaml::from_value(value.clone()).map(|route| objects.routes.push(route))
                }
                Some("ModelServer") => {
                    serde_yaml::from_value(value.clone()).map(|server| objects.servers.push(server))
                }
                Some("ExternalModelProvider") => serde_yaml::from_value(value.clone())
                    .map(|provider| objects.providers.push(provider)),
                Some("GatewayClass") => serde_yaml::from_value(value.clone())
                    .map(|class| objects.gateway_classes.push(class)),
                Some("Gateway") => serde_yaml::from_value(value.clone())
                    .map(|gateway| objects.gateways.push(gateway)),
                Some("HTTPRoute") => serde_yaml::from_value(value.clone())
                    .map(|route| objects.http_routes.push(route)),
                Some("InferencePool") => serde_yaml::from_value(value.clone())
                    .map(|pool| objects.inference_pools.push(pool)),
                _ => serde_yaml::from_value(value.clone()).map(|pod| objects.pods.push(pod)),
            };
        if let Err(error) = parsed {
            objects
                .problems
                .push(problem(kind, name, error.to_string()));
        }
    }
}

/// Reads a `Secret` document labelled as an API key; None for other
/// Secrets (not Switchyard's). The error names the field at fault, never a
/// value: a parse error could quote the key.
fn read_api_key_secret(
    value: &serde_yaml::Value,
) -> Result<Option<crate::auth::ApiKeySecret>, String> {
    let Some(secret) = labelled_secret(value, crate::auth::API_KEY_LABEL)? else {
        return Ok(None);
    };
    crate::auth::api_key_of(&secret, crate::compile::DEFAULT_NAMESPACE).map(Some)
}

/// Reads a `Secret` document labelled as a provider credential; None for
/// other Secrets.
fn read_credential_secret(
    value: &serde_yaml::Value,
) -> Result<Option<crate::compile::CredentialSecret>, String> {
    let Some(secret) = labelled_secret(value, switchyard_crd::PROVIDER_CREDENTIAL_LABEL)? else {
        return Ok(None);
    };
    Ok(crate::compile::providers::credential_secret_of(
        &secret,
        crate::compile::DEFAULT_NAMESPACE,
    ))
}

/// The `Secret` of a document carrying `label: "true"`; None without the
/// label. The error never quotes a value: a parse error could quote a secret.
fn labelled_secret(
    value: &serde_yaml::Value,
    label: &str,
) -> Result<Option<k8s_openapi::api::core::v1::Secret>, String> {
    let labelled = value
        .get("metadata")
        .and_then(|metadata| metadata.get("labels"))
        .and_then(|labels| labels.get(label))
        .and_then(serde_yaml::Value::as_str)
        == Some("true");
    if !labelled {
        return Ok(None);
    }
    serde_yaml::from_value(value.clone())
        .map(Some)
        .map_err(|_| {
            "not a valid Secret: `data` values must be base64 strings, `stringData` values strings"
                .to_owned()
        })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The one problem of `objects`.
    #[track_caller]
    fn only_problem(objects: &LocalObjects) -> &LoadProblem {
        assert_eq!(objects.problems.len(), 1, "{:?}", objects.problems);
        &objects.problems[0]
    }

    pub(crate) const ROUTE: &str = r#"
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata:
  name: deepseek-simple
spec:
  modelName: deepseek-simple
  rules:
  - name: default
    targetModels:
    - modelServerName: deepseek-r1-1-5b
"#;

    pub(crate) const SERVER: &str = r#"
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelServer
metadata:
  name: deepseek-r1-1-5b
  namespace: default
spec:
  workloadSelector:
    matchLabels:
      app: deepseek-r1-1-5b
  workloadPort:
    port: 8000
  model: deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
  inferenceEngine: vLLM
"#;

    pub(crate) const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: ds-0
  labels:
    app: deepseek-r1-1-5b
status:
  phase: Running
  podIP: 127.0.0.1
  conditions:
  - type: Ready
    status: "True"
"#;

    fn parse(text: &str) -> LocalObjects {
        let mut objects = LocalObjects::default();
        parse_documents("test.yaml", text, &mut objects);
        objects
    }

    #[test]
    fn dispatches_documents_on_kind() {
        let text = format!("{ROUTE}---\n{SERVER}---\n{POD}---\n");
        let objects = parse(&text);
        assert_eq!(objects.problems, vec![]);
        assert_eq!(objects.routes.len(), 1);
        assert_eq!(
            objects.routes[0].metadata.name.as_deref(),
            Some("deepseek-simple")
        );
        assert_eq!(
            objects.routes[0].spec.model_name.as_deref(),
            Some("deepseek-simple")
        );
        assert_eq!(objects.servers.len(), 1);
        assert_eq!(objects.servers[0].spec.workload_port.port, 8000);
        assert_eq!(objects.pods.len(), 1);
        assert_eq!(
            objects.pods[0]
                .status
                .as_ref()
                .and_then(|status| status.pod_ip.as_deref()),
            Some("127.0.0.1")
        );
    }

    #[test]
    fn ignores_other_kinds() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: y\n";
        let objects = parse(text);
        assert_eq!(objects, LocalObjects::default());
    }

    #[test]
    fn a_bad_document_is_reported_and_the_rest_still_loads() {
        let bad_server = SERVER.replace("port: 8000", "port: eight-thousand");
        let text = format!("{ROUTE}---\n{bad_server}---\n{POD}");
        let objects = parse(&text);
        assert_eq!(objects.routes.len(), 1);
        assert_eq!(objects.servers.len(), 0);
        assert_eq!(objects.pods.len(), 1);
        let problem = only_problem(&objects);
        assert_eq!(problem.file, "test.yaml");
        assert_eq!(problem.document_index, Some(1));
        assert_eq!(problem.kind.as_deref(), Some("ModelServer"));
        assert_eq!(problem.name.as_deref(), Some("deepseek-r1-1-5b"));
        assert!(problem.error.contains("invalid type"), "{}", problem.error);
    }

    #[test]
    fn wrong_api_version_is_reported() {
        let text = ROUTE.replace(
            "networking.serving.volcano.sh/v1alpha1",
            "networking.serving.volcano.sh/v1",
        );
        let objects = parse(&text);
        assert!(objects.routes.is_empty());
        let error = &only_problem(&objects).error;
        assert!(
            error.contains("networking.serving.volcano.sh/v1alpha1"),
            "{error}"
        );
    }

    #[test]
    fn a_document_without_kind_is_reported() {
        let objects = parse("metadata:\n  name: orphan\n");
        let problem = only_problem(&objects);
        assert_eq!(problem.name.as_deref(), Some("orphan"));
        assert_eq!(problem.error, "document has no `kind`");
    }

    #[test]
    fn a_syntax_error_keeps_the_documents_before_it() {
        let text = format!("{ROUTE}---\nkind: [unclosed\n---\n{POD}");
        let objects = parse(&text);
        assert_eq!(objects.routes.len(), 1);
        let problem = only_problem(&objects);
        assert_eq!(problem.document_index, Some(1));
        let error = &problem.error;
        assert!(
            error.ends_with("the rest of the file was not read"),
            "{error}"
        );
    }

    #[test]
    fn labelled_secrets_are_api_keys_and_their_problems_never_quote_them() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: alice\n  namespace: team\n  labels: {switchyard.dev/api-key: \"true\"}\ndata:\n  key: c2stYWxpY2U=\n  user: YWxpY2U=\nstringData:\n  tier: gold\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: db-password\ndata:\n  password: aHVudGVyMg==\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: broken\n  labels: {switchyard.dev/api-key: \"true\"}\ndata:\n  key: sk-not-base64!\n";
        let objects = parse(text);
        assert_eq!(objects.api_keys.len(), 1, "{:?}", objects.problems);
        let key = &objects.api_keys[0];
        assert_eq!(
            (key.namespace.as_str(), key.name.as_str()),
            ("team", "alice")
        );
        assert_eq!(
            (key.user_id.as_str(), key.tier.as_deref()),
            ("alice", Some("gold"))
        );
        assert_eq!(objects.problems.len(), 1, "unlabelled Secrets are not read");
        let problem = &objects.problems[0];
        assert_eq!(problem.name.as_deref(), Some("broken"));
        assert!(!problem.error.contains("sk-not"), "{}", problem.error);
    }

    #[test]
    fn providers_and_their_labelled_secrets_are_read() {
        let text = "apiVersion: networking.serving.volcano.sh/v1alpha1\nkind: ExternalModelProvider\nmetadata: {name: openai}\nspec: {baseURL: 'https://api.openai.com/v1'}\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: openai-key\n  labels: {networking.serving.volcano.sh/external-model-provider-credential: \"true\"}\nstringData: {api-key: sk-1}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: unrelated}\nstringData: {api-key: sk-2}\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: broken\n  labels: {networking.serving.volcano.sh/external-model-provider-credential: \"true\"}\ndata: {api-key: sk-not-base64!}\n";
        let objects = parse(text);
        assert_eq!(objects.providers.len(), 1);
        assert_eq!(objects.provider_secrets.len(), 1, "only labelled Secrets");
        assert_eq!(objects.provider_secrets[0].name, "openai-key");
        assert!(!only_problem(&objects).error.contains("sk-not"));
    }
}
