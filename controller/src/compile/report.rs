//! Per-object outcome of a compile: the facts a status writer turns into
//! `Accepted` / `ResolvedRefs` conditions, and `/debug/objects` shows as is.

use serde::Serialize;

/// Which custom resource a report is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ObjectKind {
    ModelRoute,
    ModelServer,
    ExternalModelProvider,
    GatewayClass,
    Gateway,
    HTTPRoute,
    InferencePool,
}

impl ObjectKind {
    /// The resource's `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ModelRoute => "ModelRoute",
            Self::ModelServer => "ModelServer",
            Self::ExternalModelProvider => "ExternalModelProvider",
            Self::GatewayClass => "GatewayClass",
            Self::Gateway => "Gateway",
            Self::HTTPRoute => "HTTPRoute",
            Self::InferencePool => "InferencePool",
        }
    }
}

/// CamelCase condition reasons, as Kubernetes conditions spell them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Reason {
    /// `Accepted=True`.
    Accepted,
    /// `ResolvedRefs=True`.
    ResolvedRefs,
    /// `metadata.name` is missing.
    InvalidName,
    /// Neither `modelName` nor any `loraAdapters`, or an empty LoRA adapter name.
    InvalidModelName,
    /// No rules, a rule without targets, or a target that is not exactly one backend.
    InvalidRules,
    /// A weight above 100, or a rule whose weights sum to 0.
    InvalidWeights,
    /// A header or URI regex that does not compile.
    InvalidRegex,
    /// A string match with several of exact/prefix/regex, or an unusable header name.
    InvalidMatch,
    /// `workloadPort.port` outside 1..=65535.
    InvalidPort,
    /// Empty `workloadSelector.matchLabels` (it would select nothing).
    InvalidSelector,
    /// A `trafficPolicy` duration that does not parse.
    InvalidDuration,
    /// Negative `trafficPolicy.retry.attempts`.
    InvalidRetry,
    /// `workloadPort.protocol` other than `http`.
    UnsupportedProtocol,
    /// A `rateLimit` dataplanes could not enforce (a budget of 0, a global
    /// limit without a usable Redis address).
    InvalidRateLimit,
    /// `kvConnector.type` other than `http`, `lmcache`, `nixl` or `mooncake`.
    InvalidKvConnector,
    /// Another object with the same namespace/name came earlier in the input.
    Duplicate,
    /// A target names a ModelServer or ExternalModelProvider that does not
    /// exist or is not usable (not accepted, not Ready).
    BackendNotFound,
    /// The ModelServer's selector matched no pod.
    NoMatchingPods,
    /// A selected pod is Running and Ready with a `status.podIP` no request can go to.
    InvalidPodIP,
    /// A prefill/decode ModelServer has no group with a ready pod of each role.
    NoCompletePdGroup,
    /// ExternalModelProvider `Ready=True`.
    Ready,
    /// An ExternalModelProvider field is invalid (base URL, headers, auth).
    ConfigurationInvalid,
    /// `CredentialsResolved=True`: the Secret and key were found.
    CredentialResolved,
    /// `CredentialsResolved=True`: the provider sets no `auth`.
    CredentialNotRequired,
    /// The credential Secret does not exist (or lacks the credential label).
    CredentialNotFound,
    /// The credential Secret has no such key.
    CredentialKeyNotFound,
    /// The credential is empty, not UTF-8 or not a valid header value.
    CredentialInvalid,
    /// The snapshot stream cannot carry credentials (no TLS with client authentication).
    InsecureSnapshotStream,
    /// Gateway API: a route's parentRef names no usable listener of a Switchyard Gateway.
    NoMatchingParent,
    /// Gateway API: the listeners a parentRef names do not admit the route's namespace or kind.
    NotAllowedByListeners,
    /// Gateway API: no listener a parentRef names shares a hostname with the route.
    NoMatchingListenerHostname,
    /// Gateway API: a value Switchyard does not support (a filter, a match type, a field).
    UnsupportedValue,
    /// Gateway API: a backendRef (or a listener's route kind) of a kind Switchyard cannot use.
    InvalidKind,
    /// Gateway API: a backendRef to another namespace (ReferenceGrants are not read).
    RefNotPermitted,
    /// Gateway API: a listener's port is outside 1..=65535.
    PortUnavailable,
    /// Gateway API: a listener shares its port and hostname with an older one.
    HostnameConflict,
    /// Gateway API: `Conflicted=False`.
    NoConflicts,
    /// Gateway API: a listener's `allowedRoutes.kinds` names kinds Switchyard has no route of.
    InvalidRouteKinds,
    /// Gateway API: some or all listeners of a Gateway are invalid.
    ListenersNotValid,
    /// Gateway API: an object of a Gateway API kind read while Gateway API mode is off.
    GatewayApiDisabled,
}

impl Reason {
    /// The reason as it appears in a condition.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "Accepted",
            Self::ResolvedRefs => "ResolvedRefs",
            Self::InvalidName => "InvalidName",
            Self::InvalidModelName => "InvalidModelName",
            Self::InvalidRules => "InvalidRules",
            Self::InvalidWeights => "InvalidWeights",
            Self::InvalidRegex => "InvalidRegex",
            Self::InvalidMatch => "InvalidMatch",
            Self::InvalidPort => "InvalidPort",
            Self::InvalidSelector => "InvalidSelector",
            Self::InvalidDuration => "InvalidDuration",
            Self::InvalidRetry => "InvalidRetry",
            Self::UnsupportedProtocol => "UnsupportedProtocol",
            Self::InvalidRateLimit => "InvalidRateLimit",
            Self::InvalidKvConnector => "InvalidKvConnector",
            Self::Duplicate => "Duplicate",
            Self::BackendNotFound => "BackendNotFound",
            Self::NoMatchingPods => "NoMatchingPods",
            Self::InvalidPodIP => "InvalidPodIP",
            Self::NoCompletePdGroup => "NoCompletePdGroup",
            Self::Ready => "Ready",
            Self::ConfigurationInvalid => "ConfigurationInvalid",
            Self::CredentialResolved => "CredentialResolved",
            Self::CredentialNotRequired => "CredentialNotRequired",
            Self::CredentialNotFound => "CredentialNotFound",
            Self::CredentialKeyNotFound => "CredentialKeyNotFound",
            Self::CredentialInvalid => "CredentialInvalid",
            Self::InsecureSnapshotStream => "InsecureSnapshotStream",
            Self::NoMatchingParent => "NoMatchingParent",
            Self::NotAllowedByListeners => "NotAllowedByListeners",
            Self::NoMatchingListenerHostname => "NoMatchingListenerHostname",
            Self::UnsupportedValue => "UnsupportedValue",
            Self::InvalidKind => "InvalidKind",
            Self::RefNotPermitted => "RefNotPermitted",
            Self::PortUnavailable => "PortUnavailable",
            Self::HostnameConflict => "HostnameConflict",
            Self::NoConflicts => "NoConflicts",
            Self::InvalidRouteKinds => "InvalidRouteKinds",
            Self::ListenersNotValid => "ListenersNotValid",
            Self::GatewayApiDisabled => "GatewayApiDisabled",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One condition of one object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConditionReport {
    pub status: bool,
    pub reason: Reason,
    /// For humans; names the offending field. Several problems are joined with `"; "`.
    pub message: String,
}

impl ConditionReport {
    pub(crate) fn ok(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            status: true,
            reason,
            message: message.into(),
        }
    }

    /// `True` with `ok_reason` when there are no problems, else `False` with the
    /// first problem's reason and every problem's message.
    pub(crate) fn from_problems(problems: &[Problem], ok_reason: Reason, ok_message: &str) -> Self {
        match problems.first() {
            None => Self::ok(ok_reason, ok_message),
            Some(first) => Self {
                status: false,
                reason: first.reason,
                message: problems
                    .iter()
                    .map(|problem| problem.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            },
        }
    }
}

/// What the compiler concluded about one ModelRoute or ModelServer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectReport {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
    /// `metadata.generation`; absent for objects read from local files.
    pub generation: Option<i64>,
    pub accepted: ConditionReport,
    pub resolved_refs: ConditionReport,
    /// ModelServers only: selected pods that are Running and Ready.
    pub ready_pods: Option<u32>,
    /// ModelServers only: selected pods in any state.
    pub total_pods: Option<u32>,
    /// Prefill/decode ModelServers only: groups with at least one ready pod.
    pub pd_groups: Option<u32>,
    /// Prefill/decode ModelServers only: groups with a ready prefill and a
    /// ready decode pod, the only ones requests can use.
    pub complete_pd_groups: Option<u32>,
    /// Whether the object is part of the published RouteConfig (an accepted
    /// route whose every rule lost its targets is not).
    pub in_snapshot: bool,
    /// Set fields the router does not act on; empty for most objects.
    pub ignored_fields: Vec<IgnoredField>,
}

/// A set field the router does not act on, and what that means for traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IgnoredField {
    /// Where the field is, e.g. `spec.parentRefs`.
    pub path: String,
    pub message: String,
}

impl IgnoredField {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl ObjectReport {
    /// Accepted and every reference resolved.
    pub fn is_healthy(&self) -> bool {
        self.accepted.status && self.resolved_refs.status
    }
}

/// One thing wrong with an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Problem {
    pub reason: Reason,
    pub message: String,
}

impl Problem {
    pub(crate) fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}
