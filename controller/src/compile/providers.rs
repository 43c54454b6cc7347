//! ExternalModelProvider validation, credential resolution and conversion to
//! the snapshot form.
//!
//! A provider's credential is the value of a key of a `Secret` in its
//! namespace, labelled [`PROVIDER_CREDENTIAL_LABEL`] (only those are read).
//! It goes into the snapshot only when the snapshot stream can carry it
//! (`ship_credentials`: TLS with authenticated clients); otherwise the
//! provider is not Ready and stays out of the snapshot, so routes fall
//! through rather than send requests without their credential.

use std::collections::{BTreeMap, BTreeSet};

use http::header::{HeaderName, HeaderValue};
use k8s_openapi::api::core::v1::Secret;
use serde::Serialize;
use switchyard_crd::{
    AuthScheme, ExternalModelProvider, PROVIDER_CREDENTIAL_LABEL, ProviderAuth, ProviderType,
};
use switchyard_snapshot::pb;

use super::report::{ConditionReport, Problem, Reason};
use super::{first_of_its_name, key_of, non_empty, start_validation};
use crate::auth::strip_secret;

/// Static headers a provider may not set: the credential's headers, the
/// connection's own, and what the proxy computes (Kthena rejects the same).
pub const RESERVED_HEADERS: [&str; 13] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "trailer",
    "te",
];

/// Longest `spec.model`, as in Kthena's API.
const MAX_MODEL_BYTES: usize = 256;

/// A provider credential Secret as the compile reads it: its name and data.
/// Its `Debug` names the keys, never the values.
#[derive(Clone, PartialEq, Eq)]
pub struct CredentialSecret {
    pub namespace: String,
    pub name: String,
    pub data: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for CredentialSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialSecret")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Whether `secret` is labelled as a provider credential.
pub fn is_credential_secret(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(PROVIDER_CREDENTIAL_LABEL))
        .is_some_and(|value| value == "true")
}

/// The data of a labelled Secret (`data`, overridden by `stringData` as the
/// API server does); `None` for any other Secret.
pub fn credential_secret_of(secret: &Secret, default_namespace: &str) -> Option<CredentialSecret> {
    if !is_credential_secret(secret) {
        return None;
    }
    let mut data: BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(key, value)| (key.clone(), value.0.clone()))
        .collect();
    for (key, value) in secret.string_data.iter().flatten() {
        data.insert(key.clone(), value.clone().into_bytes());
    }
    Some(CredentialSecret {
        namespace: non_empty(secret.metadata.namespace.as_deref())
            .unwrap_or(default_namespace)
            .to_owned(),
        name: secret.metadata.name.clone().unwrap_or_default(),
        data,
    })
}

/// Keeps only what the compile reads of a credential Secret (name,
/// namespace, labels, data): see [`strip_secret`].
pub fn strip_credential_secret(secret: &mut Secret) {
    strip_secret(secret, |_| {});
}

/// What the compiler concluded about one ExternalModelProvider: its two
/// conditions. `/debug/objects` shows it; the status writer writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProviderReport {
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    /// `CredentialsResolved`.
    pub credentials: ConditionReport,
    /// `Ready`: the provider is in the snapshot and routes may send to it.
    pub ready: ConditionReport,
}

/// The providers of one compile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompiledProviders {
    /// Ready providers, sorted by (namespace, name).
    pub providers: Vec<pb::ExternalProvider>,
    /// One per input provider, sorted by (namespace, name).
    pub reports: Vec<ProviderReport>,
}

impl CompiledProviders {
    /// Whether `namespace/name` is ready (in the snapshot).
    pub(crate) fn is_ready(&self, namespace: &str, name: &str) -> bool {
        self.providers
            .binary_search_by(|provider| {
                (provider.namespace.as_str(), provider.name.as_str()).cmp(&(namespace, name))
            })
            .is_ok()
    }

    /// The report of `namespace/name`, if such a provider exists.
    pub(crate) fn report(&self, namespace: &str, name: &str) -> Option<&ProviderReport> {
        self.reports
            .iter()
            .find(|report| report.namespace == namespace && report.name == name)
    }
}

/// Validates every provider and resolves its credential among `secrets`.
/// `ship_credentials`: the snapshot stream is encrypted and its clients
/// authenticated, so a credential may go into the snapshot.
pub fn compile_providers(
    providers: &[ExternalModelProvider],
    secrets: &[CredentialSecret],
    ship_credentials: bool,
) -> CompiledProviders {
    let mut compiled = CompiledProviders::default();
    let mut seen: BTreeSet<(&str, &str)> = BTreeSet::new();
    for provider in providers {
        let (namespace, name) = key_of(&provider.metadata);
        if !first_of_its_name(&mut seen, (namespace, name)) {
            let message = format!(
                "another ExternalModelProvider {namespace}/{name} came earlier in the input (local files are read in file-name order); this one is ignored"
            );
            compiled.reports.push(ProviderReport {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                generation: provider.metadata.generation,
                credentials: failed(Reason::Duplicate, message.clone()),
                ready: failed(Reason::Duplicate, message),
            });
            continue;
        }
        let (provider, report) = compile_provider(provider, secrets, ship_credentials);
        compiled.providers.extend(provider);
        compiled.reports.push(report);
    }
    compiled.providers.sort_by(|a, b| {
        (a.namespace.as_str(), a.name.as_str()).cmp(&(b.namespace.as_str(), b.name.as_str()))
    });
    // Stable: a duplicate stays behind the object it lost to.
    compiled
        .reports
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    compiled
}

fn failed(reason: Reason, message: String) -> ConditionReport {
    ConditionReport {
        status: false,
        reason,
        message,
    }
}

fn compile_provider(
    provider: &ExternalModelProvider,
    secrets: &[CredentialSecret],
    ship_credentials: bool,
) -> (Option<pb::ExternalProvider>, ProviderReport) {
    let (namespace, name, mut invalid) =
        start_validation(&provider.metadata, Reason::ConfigurationInvalid);
    let spec = &provider.spec;
    if let Err(error) = validate_base_url(&spec.base_url) {
        invalid.push(Problem::new(
            Reason::ConfigurationInvalid,
            format!("spec.baseURL: {error}"),
        ));
    }
    if spec
        .model
        .as_ref()
        .is_some_and(|model| model.len() > MAX_MODEL_BYTES)
    {
        invalid.push(Problem::new(
            Reason::ConfigurationInvalid,
            format!("spec.model: longer than {MAX_MODEL_BYTES} bytes"),
        ));
    }
    let headers = compile_headers(&spec.headers, &mut invalid);
    if let Some(auth) = &spec.auth {
        validate_auth(auth, &mut invalid);
    }

    let credential = resolve_credential(namespace, spec.auth.as_ref(), secrets);
    let credentials = match &credential {
        Ok(None) => ConditionReport::ok(
            Reason::CredentialNotRequired,
            "spec.auth is not set: requests carry no credential",
        ),
        Ok(Some(_)) => ConditionReport::ok(
            Reason::CredentialResolved,
            "the credential Secret and key were found",
        ),
        Err(problem) => failed(problem.reason, problem.message.clone()),
    };

    let ready = if !invalid.is_empty() {
        ConditionReport::from_problems(&invalid, Reason::Ready, "")
    } else if !credentials.status {
        failed(credentials.reason, credentials.message.clone())
    } else if matches!(credential, Ok(Some(_))) && !ship_credentials {
        failed(
            Reason::InsecureSnapshotStream,
            "the snapshot stream is not encrypted with authenticated dataplanes, so the credential is not sent to them (start the controller with --stream-tls-cert, --stream-tls-key and --stream-client-ca or --stream-token-file)".to_owned(),
        )
    } else {
        ConditionReport::ok(Reason::Ready, "routes can send requests to this provider")
    };
    let report = ProviderReport {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        generation: provider.metadata.generation,
        credentials,
        ready,
    };
    if !report.ready.status {
        return (None, report);
    }
    let scheme = spec
        .auth
        .as_ref()
        .and_then(|auth| auth.scheme)
        .unwrap_or_else(|| spec.provider_type.default_scheme());
    let compiled = pb::ExternalProvider {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        provider_type: match spec.provider_type {
            ProviderType::OpenAI => pb::ProviderType::Openai,
            ProviderType::Anthropic => pb::ProviderType::Anthropic,
        }
        .into(),
        model: non_empty(spec.model.as_deref()).map(str::to_owned),
        base_url: spec.base_url.trim_end_matches('/').to_owned(),
        insecure_skip_verify: spec.insecure_skip_verify,
        credential: credential
            .ok()
            .flatten()
            .map(|value| pb::ProviderCredential {
                scheme: match scheme {
                    AuthScheme::Bearer => pb::CredentialScheme::Bearer,
                    AuthScheme::APIKey => pb::CredentialScheme::ApiKey,
                }
                .into(),
                value,
            }),
        headers,
        generation: provider.metadata.generation.unwrap_or(0),
    };
    (Some(compiled), report)
}

/// `https://` with a host; no userinfo, query or fragment (they would leak
/// into logs or change the meaning of the appended request path).
fn validate_base_url(base_url: &str) -> Result<(), String> {
    if !base_url.starts_with("https://") {
        return Err(format!("{base_url:?} must start with https://"));
    }
    if base_url.contains('#') {
        return Err("must not have a fragment".to_owned());
    }
    let uri: http::Uri = base_url
        .parse()
        .map_err(|error| format!("{base_url:?} is not a URL: {error}"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{base_url:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(
            "must not carry user information (put credentials in auth.secretRef)".to_owned(),
        );
    }
    if authority.host().is_empty() {
        return Err(format!("{base_url:?} has no host"));
    }
    if uri.query().is_some() {
        return Err("must not have a query".to_owned());
    }
    Ok(())
}

fn validate_auth(auth: &ProviderAuth, invalid: &mut Vec<Problem>) {
    let reference = &auth.secret_ref;
    if reference.optional == Some(true) {
        invalid.push(Problem::new(
            Reason::ConfigurationInvalid,
            "spec.auth.secretRef.optional: must be false (a provider needs its credential)",
        ));
    }
    if reference.name.is_empty() || reference.key.is_empty() {
        invalid.push(Problem::new(
            Reason::ConfigurationInvalid,
            "spec.auth.secretRef: name and key must both be set",
        ));
    }
}

/// Lower-cased, sorted, validated static headers.
fn compile_headers(
    headers: &BTreeMap<String, String>,
    invalid: &mut Vec<Problem>,
) -> Vec<pb::ProviderHeader> {
    let mut compiled: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let path = format!("spec.headers[{name:?}]");
        let lower = name.to_ascii_lowercase();
        if name.is_empty() || HeaderName::from_bytes(name.as_bytes()).is_err() {
            invalid.push(Problem::new(
                Reason::ConfigurationInvalid,
                format!("{path}: not a valid HTTP header name"),
            ));
        } else if RESERVED_HEADERS.contains(&lower.as_str()) {
            invalid.push(Problem::new(
                Reason::ConfigurationInvalid,
                format!("{path}: a reserved header the router sets itself (or never forwards)"),
            ));
        } else if value.contains(['\r', '\n']) || HeaderValue::from_str(value).is_err() {
            // The value is not quoted: static headers often carry tokens.
            invalid.push(Problem::new(
                Reason::ConfigurationInvalid,
                format!("{path}: the value is not a valid HTTP header value (CR, LF or control characters)"),
            ));
        } else if compiled.insert(lower, value.clone()).is_some() {
            invalid.push(Problem::new(
                Reason::ConfigurationInvalid,
                format!("{path}: set twice (header names are case-insensitive)"),
            ));
        }
    }
    compiled
        .into_iter()
        .map(|(name, value)| pb::ProviderHeader { name, value })
        .collect()
}

/// The credential, trimmed; `None` when the provider takes none. The
/// error names the Secret and key, never the value.
fn resolve_credential(
    namespace: &str,
    auth: Option<&ProviderAuth>,
    secrets: &[CredentialSecret],
) -> Result<Option<String>, Problem> {
    let Some(auth) = auth else {
        return Ok(None);
    };
    let reference = &auth.secret_ref;
    let secret = secrets
        .iter()
        .find(|secret| secret.namespace == namespace && secret.name == reference.name)
        .ok_or_else(|| {
            Problem::new(
                Reason::CredentialNotFound,
                format!(
                    "spec.auth.secretRef: Secret {namespace}/{} not found (a credential Secret must carry the label {PROVIDER_CREDENTIAL_LABEL}: \"true\")",
                    reference.name
                ),
            )
        })?;
    let value = secret.data.get(&reference.key).ok_or_else(|| {
        Problem::new(
            Reason::CredentialKeyNotFound,
            format!(
                "spec.auth.secretRef: Secret {namespace}/{} has no key {:?}",
                reference.name, reference.key
            ),
        )
    })?;
    let invalid = |why: &str| {
        Problem::new(
            Reason::CredentialInvalid,
            format!(
                "spec.auth.secretRef: key {:?} of Secret {namespace}/{} {why}",
                reference.key, reference.name
            ),
        )
    };
    let value = std::str::from_utf8(value).map_err(|_| invalid("is not UTF-8"))?;
    // Files and `echo` add a trailing newline, which no header value can carry.
    let value = value.trim();
    if value.is_empty() {
        return Err(invalid("is empty"));
    }
    if HeaderValue::from_str(value).is_err() {
        return Err(invalid("holds characters an HTTP header cannot carry"));
    }
    Ok(Some(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(yaml: &str) -> ExternalModelProvider {
        serde_yaml::from_str(yaml).expect("test provider parses")
    }

    const OPENAI: &str = r#"
metadata: { name: openai, namespace: team, generation: 2 }
spec:
  baseURL: https://api.openai.com/v1/
  model: gpt-4o-mini
  auth: { secretRef: { name: openai-key, key: api-key } }
  headers: { OpenAI-Organization: org-1 }
"#;

    fn secret(namespace: &str, name: &str, key: &str, value: &str) -> CredentialSecret {
        CredentialSecret {
            namespace: namespace.into(),
            name: name.into(),
            data: [(key.to_owned(), value.as_bytes().to_vec())].into(),
        }
    }

    #[test]
    fn a_resolved_provider_ships_its_trimmed_credential_over_tls() {
        let secrets = [secret("team", "openai-key", "api-key", "sk-123\n")];
        let compiled = compile_providers(&[provider(OPENAI)], &secrets, true);
        let [report] = compiled.reports.as_slice() else {
            panic!("{compiled:?}")
        };
        assert!(
            report.ready.status && report.credentials.status,
            "{report:?}"
        );
        assert_eq!(report.credentials.reason, Reason::CredentialResolved);
        let [shipped] = compiled.providers.as_slice() else {
            panic!("{compiled:?}")
        };
        assert_eq!(shipped.base_url, "https://api.openai.com/v1");
        assert_eq!(shipped.model.as_deref(), Some("gpt-4o-mini"));
        let credential = shipped.credential.as_ref().expect("a credential");
        assert_eq!(credential.value, "sk-123");
        assert_eq!(credential.scheme(), pb::CredentialScheme::Bearer);
        assert_eq!(shipped.headers[0].name, "openai-organization");
        assert!(compiled.is_ready("team", "openai"));
        assert!(!format!("{compiled:?}").contains("sk-123"));
    }

    #[test]
    fn without_tls_a_provider_with_a_credential_is_not_ready() {
        let secrets = [secret("team", "openai-key", "api-key", "sk-123")];
        let compiled = compile_providers(&[provider(OPENAI)], &secrets, false);
        let report = &compiled.reports[0];
        assert!(report.credentials.status);
        assert!(!report.ready.status);
        assert_eq!(report.ready.reason, Reason::InsecureSnapshotStream);
        assert!(compiled.providers.is_empty());
        // A provider that takes no credential needs no protection.
        let open = provider(
            "metadata: { name: local }\nspec: { baseURL: 'https://llm.internal', providerType: Anthropic }\n",
        );
        let compiled = compile_providers(&[open], &[], false);
        assert_eq!(
            compiled.reports[0].credentials.reason,
            Reason::CredentialNotRequired
        );
        assert!(compiled.reports[0].ready.status);
        assert_eq!(
            compiled.providers[0].provider_type(),
            pb::ProviderType::Anthropic
        );
    }

    #[test]
    fn credential_problems_have_their_reasons_and_never_quote_the_value() {
        let cases = [
            (vec![], Reason::CredentialNotFound),
            (
                vec![secret("other", "openai-key", "api-key", "sk-1")],
                Reason::CredentialNotFound,
            ),
            (
                vec![secret("team", "openai-key", "key", "sk-1")],
                Reason::CredentialKeyNotFound,
            ),
            (
                vec![secret("team", "openai-key", "api-key", " \n")],
                Reason::CredentialInvalid,
            ),
            (
                vec![secret("team", "openai-key", "api-key", "sk-\u{7}bell")],
                Reason::CredentialInvalid,
            ),
        ];
        for (secrets, reason) in cases {
            let compiled = compile_providers(&[provider(OPENAI)], &secrets, true);
            let report = &compiled.reports[0];
            assert_eq!(report.credentials.reason, reason, "{report:?}");
            assert_eq!(report.ready.reason, reason);
            assert!(!report.ready.status && compiled.providers.is_empty());
            assert!(!report.credentials.message.contains("sk-"), "{report:?}");
        }
    }

    #[test]
    fn invalid_configuration_is_reported_field_by_field() {
        let cases = [
            (
                "baseURL: http://api.example.com",
                "must start with https://",
            ),
            (
                "baseURL: 'https://user:pw@api.example.com'",
                "user information",
            ),
            ("baseURL: 'https://api.example.com/v1?x=1'", "query"),
            ("baseURL: 'https://api.example.com/#x'", "fragment"),
            (
                "{ baseURL: 'https://a.example', headers: { Authorization: x } }",
                "reserved",
            ),
            (
                "{ baseURL: 'https://a.example', headers: { x-bad: \"a\\r\\nb\" } }",
                "not a valid HTTP header value",
            ),
            (
                "{ baseURL: 'https://a.example', headers: { 'bad name': x } }",
                "not a valid HTTP header name",
            ),
            (
                "{ baseURL: 'https://a.example', auth: { secretRef: { name: s, key: k, optional: true } } }",
                "optional",
            ),
        ];
        for (spec, expected) in cases {
            let yaml = format!("metadata: {{ name: p }}\nspec:\n  {spec}\n");
            let compiled = compile_providers(&[provider(&yaml)], &[], true);
            let ready = &compiled.reports[0].ready;
            assert_eq!(
                ready.reason,
                Reason::ConfigurationInvalid,
                "{spec}: {ready:?}"
            );
            assert!(ready.message.contains(expected), "{spec}: {ready:?}");
            assert!(!ready.message.contains("\r\n"));
        }
    }

    #[test]
    fn anthropic_defaults_to_an_api_key_and_a_scheme_can_be_chosen() {
        let secrets = [secret("default", "k", "v", "key")];
        let anthropic = provider(
            "metadata: { name: a }\nspec: { providerType: Anthropic, baseURL: 'https://api.anthropic.com', auth: { secretRef: { name: k, key: v } } }\n",
        );
        let bearer = provider(
            "metadata: { name: b }\nspec: { providerType: Anthropic, baseURL: 'https://api.anthropic.com', auth: { scheme: Bearer, secretRef: { name: k, key: v } } }\n",
        );
        let compiled = compile_providers(&[anthropic, bearer], &secrets, true);
        let schemes: Vec<_> = compiled
            .providers
            .iter()
            .map(|p| p.credential.as_ref().map(pb::ProviderCredential::scheme))
            .collect();
        assert_eq!(
            schemes,
            [
                Some(pb::CredentialScheme::ApiKey),
                Some(pb::CredentialScheme::Bearer)
            ]
        );
    }

    #[test]
    fn only_labelled_secrets_are_credentials_and_stripping_keeps_only_their_data() {
        let mut secret: Secret = serde_yaml::from_str(
            "metadata:\n  name: k\n  namespace: team\n  labels: { networking.serving.volcano.sh/external-model-provider-credential: \"true\" }\n  annotations: { kubectl.kubernetes.io/last-applied-configuration: sk-copy }\ndata: { api-key: c2stMTIz }\nstringData: { other: x }\n",
        )
        .expect("secret");
        let read = credential_secret_of(&secret, "default").expect("labelled");
        assert_eq!(read.data["api-key"], b"sk-123");
        assert_eq!(read.data["other"], b"x");
        strip_credential_secret(&mut secret);
        assert!(secret.metadata.annotations.is_none());
        assert_eq!(credential_secret_of(&secret, "default"), Some(read));
        let mut unlabelled = secret.clone();
        unlabelled.metadata.labels = None;
        assert_eq!(credential_secret_of(&unlabelled, "default"), None);
    }
}
