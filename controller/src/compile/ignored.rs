//! Fields the router accepts (the CRD schema allows them, Kthena manifests
//! set them) but does not act on yet. Each one set on an object is named in
//! its report, so it shows in the `IgnoredFields` condition, a Warning
//! Event, the controller log and `/debug/objects` instead of being silently
//! ignored. When a feature lands, its entry here goes.

use switchyard_crd::ModelServer;

use super::report::IgnoredField;

/// The set fields of `server` that routing does not act on.
pub(crate) fn server_fields(server: &ModelServer) -> Vec<IgnoredField> {
    let spec = &server.spec;
    let mut ignored = Vec::new();
    if spec.kv_connector.is_some() && spec.workload_selector.pd_group.is_none() {
        ignored.push(IgnoredField::new(
            "spec.kvConnector",
            "only a prefill/decode ModelServer (workloadSelector.pdGroup) uses a KV connector; each request goes whole to one pod",
        ));
    }
    ignored
}
