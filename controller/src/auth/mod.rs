//! Client authentication, compiled into the snapshot: API keys from labelled
//! `Secret`s (only a SHA-256 digest of each key leaves the controller) and
//! the router configuration's JWT settings with the issuer's public keys,
//! which the controller fetches so dataplanes need no egress.
//!
//! An API key is a `Secret` labelled [`API_KEY_LABEL`]`: "true"` with the
//! key in data field [`KEY_FIELD`] (or its hex SHA-256 in
//! [`KEY_DIGEST_FIELD`]), the user id in [`USER_FIELD`] and optionally a tier
//! in [`TIER_FIELD`]. In Kubernetes mode only the
//! controller's own namespace is read (whoever may create Secrets there may
//! mint keys); local mode reads every such `Secret` of the directory.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest, Sha256};
use switchyard_snapshot::pb;

pub mod jwks;

use crate::router_config::JwtSettings;

/// The label that marks a `Secret` as a Switchyard API key (value `"true"`).
pub const API_KEY_LABEL: &str = "switchyard.dev/api-key";
/// Data field holding the key itself.
pub const KEY_FIELD: &str = "key";
/// Data field holding the user id the key stands for.
pub const USER_FIELD: &str = "user";
/// Optional data field holding the user's tier.
pub const TIER_FIELD: &str = "tier";
/// Data field holding the hex SHA-256 of the key instead of the key, so the
/// key itself need not be stored in the cluster (and how the Kubernetes
/// source keeps API-key Secrets in memory: see [`redact_api_key_secret`]).
pub const KEY_DIGEST_FIELD: &str = "key-sha256";

/// An API key as the compile sees it: the Secret's name and the digest of
/// its key, never the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeySecret {
    pub namespace: String,
    pub name: String,
    pub key_sha256: [u8; 32],
    pub user_id: String,
    pub tier: Option<String>,
}

impl std::fmt::Debug for ApiKeySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeySecret")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("user_id", &self.user_id)
            .field("tier", &self.tier)
            .finish_non_exhaustive()
    }
}

/// Whether `secret` carries the API key label.
pub fn is_api_key_secret(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(API_KEY_LABEL))
        .is_some_and(|value| value == "true")
}

/// Reads an API key `Secret` (`data`, overridden by `stringData` as the API
/// server does). The error names the Secret's problem, never its content.
pub fn api_key_of(secret: &Secret, default_namespace: &str) -> Result<ApiKeySecret, String> {
    let field = |name: &str| -> Result<Option<String>, String> {
        if let Some(value) = secret.string_data.as_ref().and_then(|data| data.get(name)) {
            return Ok(Some(value.clone()));
        }
        match secret.data.as_ref().and_then(|data| data.get(name)) {
            None => Ok(None),
            Some(bytes) => String::from_utf8(bytes.0.clone())
                .map(Some)
                .map_err(|_| format!("data field `{name}` is not UTF-8")),
        }
    };
    let key_sha256 = match (field(KEY_FIELD)?, field(KEY_DIGEST_FIELD)?) {
        (Some(key), _) => digest_of_key(&key)?,
        (None, Some(digest)) => parse_digest(&digest)?,
        (None, None) => {
            return Err(format!(
                "no `{KEY_FIELD}` (or `{KEY_DIGEST_FIELD}`) data field"
            ));
        }
    };
    let user_id = field(USER_FIELD)?
        .map(|user| user.trim().to_owned())
        .filter(|user| !user.is_empty())
        .ok_or_else(|| format!("no `{USER_FIELD}` data field: the key must name its user"))?;
    let tier = field(TIER_FIELD)?
        .map(|tier| tier.trim().to_owned())
        .filter(|tier| !tier.is_empty());
    Ok(ApiKeySecret {
        namespace: secret
            .metadata
            .namespace
            .clone()
            .filter(|namespace| !namespace.is_empty())
            .unwrap_or_else(|| default_namespace.to_owned()),
        name: secret.metadata.name.clone().unwrap_or_default(),
        key_sha256,
        user_id,
        tier,
    })
}

/// SHA-256 of a key as a `Secret` holds it.
fn digest_of_key(key: &str) -> Result<[u8; 32], String> {
    // Files and `echo` add a trailing newline; HTTP header values cannot
    // carry one, so it can never be part of a key.
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("data field `{KEY_FIELD}` is empty"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "data field `{KEY_FIELD}` must be printable ASCII without spaces (it travels in an HTTP header)"
        ));
    }
    Ok(Sha256::digest(key.as_bytes()).into())
}

/// A hex SHA-256 (64 hex digits).
fn parse_digest(hex: &str) -> Result<[u8; 32], String> {
    let hex = hex.trim();
    let invalid = || format!("data field `{KEY_DIGEST_FIELD}` must be 64 hex digits (a SHA-256)");
    if hex.len() != 64 {
        return Err(invalid());
    }
    let mut digest = [0u8; 32];
    for (index, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * index..2 * index + 2], 16).map_err(|_| invalid())?;
    }
    Ok(digest)
}

/// Keeps only what the compile reads of an API-key `Secret`: its name,
/// namespace and labels, and `key` replaced by its digest (`key-sha256`),
/// so the controller never keeps a key in memory ([`strip_secret`]). A key
/// that is unusable is left out (its problem is reported).
pub fn redact_api_key_secret(secret: &mut Secret) {
    strip_secret(secret, |data| {
        if let Some(key) = data.remove(KEY_FIELD) {
            let digest = String::from_utf8(key.0)
                .map_err(|_| format!("data field `{KEY_FIELD}` is not UTF-8"))
                .and_then(|key| digest_of_key(&key));
            if let Ok(digest) = digest {
                let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
                data.insert(KEY_DIGEST_FIELD.to_owned(), ByteString(hex.into_bytes()));
            }
        }
        data.retain(|name, _| [KEY_DIGEST_FIELD, USER_FIELD, TIER_FIELD].contains(&name.as_str()));
    });
}

/// Replaces `secret` by what the compile reads of a Secret: its name,
/// namespace, labels, resourceVersion and uid, and its data (`stringData`
/// merged in) as `edit` leaves it. Everything else goes: `kubectl apply`'s
/// last-applied annotation holds the whole Secret a second time, and
/// annotations are printed by debug tools.
pub fn strip_secret(secret: &mut Secret, edit: impl FnOnce(&mut BTreeMap<String, ByteString>)) {
    let metadata = std::mem::take(&mut secret.metadata);
    let mut data = secret.data.take().unwrap_or_default();
    for (name, value) in secret.string_data.take().unwrap_or_default() {
        data.insert(name, ByteString(value.into_bytes()));
    }
    edit(&mut data);
    *secret = Secret {
        metadata: ObjectMeta {
            name: metadata.name,
            namespace: metadata.namespace,
            labels: metadata.labels,
            resource_version: metadata.resource_version,
            uid: metadata.uid,
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
}

/// The auth section of a snapshot: None when nothing is configured (no API
/// key and no `auth` block), so dataplanes serve everyone as before. Two
/// Secrets holding the same key: the first by (namespace, name) wins and
/// the other is reported.
pub fn compile_auth(
    api_keys: &[ApiKeySecret],
    jwt: Option<&JwtSettings>,
    jwks_keys: &[String],
) -> (Option<pb::AuthConfig>, Vec<String>) {
    let mut problems = Vec::new();
    let mut sorted: Vec<&ApiKeySecret> = api_keys.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut by_digest: BTreeMap<[u8; 32], &ApiKeySecret> = BTreeMap::new();
    for secret in sorted {
        if let Some(first) = by_digest.get(&secret.key_sha256) {
            problems.push(format!(
                "Secret {}/{}: holds the same API key as Secret {}/{}; ignored",
                secret.namespace, secret.name, first.namespace, first.name
            ));
            continue;
        }
        by_digest.insert(secret.key_sha256, secret);
    }
    if by_digest.is_empty() && jwt.is_none() {
        return (None, problems);
    }
    let config = pb::AuthConfig {
        // BTreeMap order: by digest, as the protocol asks.
        api_keys: by_digest
            .into_values()
            .map(|secret| pb::ApiKey {
                key_sha256: secret.key_sha256.to_vec(),
                user_id: secret.user_id.clone(),
                tier: secret.tier.clone().unwrap_or_default(),
            })
            .collect(),
        jwt: jwt.map(|jwt| pb::JwtConfig {
            issuer: jwt.issuer.clone(),
            audiences: jwt.audiences.clone(),
            tier_claim: jwt.tier_claim.clone(),
            jwks_keys: jwks_keys.to_vec(),
        }),
    };
    (Some(config), problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(
        name: &str,
        labelled: bool,
        data: &[(&str, &str)],
        string_data: &[(&str, &str)],
    ) -> Secret {
        let mut secret = Secret::default();
        secret.metadata.name = Some(name.into());
        if labelled {
            secret.metadata.labels = Some([(API_KEY_LABEL.to_owned(), "true".to_owned())].into());
        }
        if !data.is_empty() {
            secret.data = Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            );
        }
        if !string_data.is_empty() {
            secret.string_data = Some(
                string_data
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            );
        }
        secret
    }

    #[test]
    fn reads_key_user_and_tier_and_only_keeps_a_digest() {
        let read = api_key_of(
            &secret(
                "alice",
                true,
                &[("key", "sk-alice\n"), ("user", "alice")],
                &[("tier", "gold")],
            ),
            "default",
        )
        .expect("valid");
        assert_eq!(read.namespace, "default");
        assert_eq!(read.user_id, "alice");
        assert_eq!(read.tier.as_deref(), Some("gold"));
        assert_eq!(
            read.key_sha256,
            <[u8; 32]>::from(Sha256::digest(b"sk-alice"))
        );
        let debug = format!("{read:?}");
        assert!(
            !debug.contains("sk-alice") && !debug.contains("key_sha256"),
            "{debug}"
        );
        assert!(is_api_key_secret(&secret("a", true, &[], &[])));
        assert!(!is_api_key_secret(&secret("a", false, &[], &[])));
    }

    #[test]
    fn problems_name_the_field_never_the_key() {
        let cases = [
            (
                secret("s", true, &[("user", "u")], &[]),
                "no `key` (or `key-sha256`) data field",
            ),
            (secret("s", true, &[("key", " \n")], &[]), "`key` is empty"),
            (
                secret("s", true, &[("key", "sk with space"), ("user", "u")], &[]),
                "printable ASCII",
            ),
            (
                secret("s", true, &[("key", "sk-x")], &[]),
                "no `user` data field",
            ),
        ];
        for (secret, expected) in cases {
            let error = api_key_of(&secret, "default").expect_err(expected);
            assert!(error.contains(expected) && !error.contains("sk"), "{error}");
        }
    }

    #[test]
    fn a_digest_stands_for_the_key_and_redaction_keeps_nothing_secret() {
        let digest: String = Sha256::digest(b"sk-dave")
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let by_digest = api_key_of(
            &secret("d", true, &[("key-sha256", &digest), ("user", "dave")], &[]),
            "default",
        )
        .expect("valid");
        let mut full = secret("d", true, &[("user", "dave")], &[("key", "sk-dave")]);
        full.metadata.annotations = Some(
            [(
                "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
                "{\"stringData\":{\"key\":\"sk-dave\"}}".to_owned(),
            )]
            .into(),
        );
        full.metadata.namespace = Some("default".into());
        redact_api_key_secret(&mut full);
        assert!(!format!("{full:?}").contains("sk-dave"), "{full:?}");
        assert_eq!(api_key_of(&full, "default").expect("valid"), by_digest);
        assert!(
            api_key_of(
                &secret("d", true, &[("key-sha256", "abc"), ("user", "u")], &[]),
                "ns"
            )
            .expect_err("short")
            .contains("64 hex digits")
        );
    }

    #[test]
    fn compiles_digests_sorted_and_reports_duplicates() {
        let key = |name: &str, key: &str, user: &str| {
            api_key_of(
                &secret(name, true, &[("key", key), ("user", user)], &[]),
                "ns",
            )
            .expect("valid")
        };
        let keys = [
            key("b", "sk-1", "bob"),
            key("a", "sk-1", "alice"),
            key("c", "sk-2", "carol"),
        ];
        let (config, problems) = compile_auth(&keys, None, &[]);
        let config = config.expect("API keys turn auth on");
        let users: Vec<&str> = config.api_keys.iter().map(|k| k.user_id.as_str()).collect();
        assert_eq!(users.len(), 2);
        assert!(
            users.contains(&"alice") && !users.contains(&"bob"),
            "{users:?}"
        );
        assert!(
            config
                .api_keys
                .windows(2)
                .all(|w| w[0].key_sha256 < w[1].key_sha256)
        );
        assert_eq!(
            problems,
            ["Secret ns/b: holds the same API key as Secret ns/a; ignored"]
        );
        assert_eq!(compile_auth(&[], None, &[]), (None, vec![]), "auth off");
    }
}
