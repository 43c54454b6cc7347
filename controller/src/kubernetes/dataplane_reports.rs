//! Sharing dataplane ACK state between controller replicas, so the leader's
//! `Programmed` counts every dataplane, not only those connected to it.
//!
//! Every replica server-side-applies a ConfigMap of its own in the
//! controller namespace, `switchyard-dataplanes-<identity>`, labelled
//! [`REPORT_LABEL`]=[`REPORT_LABEL_VALUE`], holding a
//! [`DataplaneReport`] as JSON: on every change of its streams' RouteConfig
//! state (debounced) and at least every [`REPORT_RENEW_INTERVAL`]. The leader lists those
//! ConfigMaps and merges the unexpired ones with its own streams
//! (`AckSummary::across_replicas`). A replica deletes its report when it stops;
//! one that crashed stops renewing and is ignored after [`REPORT_TTL`].

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use switchyard_runtime::{CancellationToken, clock};

use super::status_writer::FIELD_MANAGER;
use crate::status::{DataplaneReport, ReportedDataplane};
use crate::xds::DataplaneRegistry;

/// A replica rewrites its report at least this often, so the leader can tell
/// a live replica with unchanged dataplanes from a dead one.
pub const REPORT_RENEW_INTERVAL: Duration = Duration::from_secs(10);
/// A report not renewed for this long is from a replica that died or lost the
/// API server: three missed renewals, so one slow write does not drop it.
pub const REPORT_TTL: Duration = Duration::from_secs(30);
/// A burst of stream changes (a dataplane rollout, a new snapshot being
/// ACKed by every dataplane) is written as one report once quiet this long.
pub const REPORT_DEBOUNCE: Duration = Duration::from_millis(250);
/// How often the leader re-reads the other replicas' reports: an ACK on
/// another replica reaches `Programmed` within about this plus the debounce.
pub const PEER_REPORTS_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How long a stopping replica tries to delete its report before leaving it to expire.
pub const REPORT_DELETE_TIMEOUT: Duration = Duration::from_secs(2);
/// Label selecting the report ConfigMaps (and nothing else the controller may read).
pub const REPORT_LABEL: &str = "app.kubernetes.io/component";
pub const REPORT_LABEL_VALUE: &str = "dataplane-report";
/// Report ConfigMaps are named this plus the replica identity.
pub const REPORT_NAME_PREFIX: &str = "switchyard-dataplanes-";
/// The ConfigMap key holding the report JSON.
pub const REPORT_DATA_KEY: &str = "report.json";
/// Object names are DNS subdomains of at most this many characters.
const MAX_NAME_LENGTH: usize = 253;

/// The report ConfigMap name of replica `identity`, made a valid object
/// name (pod names already are; `--controller-id` may be anything).
pub fn report_name(identity: &str) -> String {
    let mut name: String = REPORT_NAME_PREFIX.to_owned();
    name.extend(identity.chars().map(|character| {
        let lower = character.to_ascii_lowercase();
        if lower.is_ascii_alphanumeric() || lower == '-' || lower == '.' {
            lower
        } else {
            '-'
        }
    }));
    name.truncate(MAX_NAME_LENGTH);
    while name.ends_with(['-', '.']) {
        name.pop();
    }
    name
}

/// `label=value` for listing the reports.
pub fn report_selector() -> String {
    format!("{REPORT_LABEL}={REPORT_LABEL_VALUE}")
}

/// Keeps this replica's report current until `stop`, then deletes it.
pub async fn publish(
    client: Client,
    namespace: String,
    identity: String,
    dataplanes: DataplaneRegistry,
    stop: CancellationToken,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let name = report_name(&identity);
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    let mut failing = false;
    loop {
        let report =
            DataplaneReport::from_dataplanes(&identity, &dataplanes.list(), clock::unix_ms_now());
        let written = report.dataplanes.clone();
        tokio::select! {
            () = &mut stopped => break,
            applied = apply(&api, &name, &namespace, &report) => match applied {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!(configmap = %name, "dataplane report written again");
                }
                Ok(()) => {}
                Err(error) => {
                    if !failing {
                        tracing::warn!(configmap = %name, namespace = %namespace, %error, "cannot write this replica's dataplane report; the leader will not count its dataplanes");
                    }
                    failing = true;
                }
            },
        }
        // Only what `Programmed` reads triggers a write: EndpointLoads are
        // re-ACKed after every scrape, and writing a ConfigMap each time would
        // load the API server for nothing; their state rides along on renewals.
        let changed = dataplanes.wait_until(|list| {
            !list
                .iter()
                .map(ReportedDataplane::from_status)
                .map(|dataplane| (dataplane.node_id, dataplane.route_config))
                .eq(written
                    .iter()
                    .map(|dataplane| (dataplane.node_id.clone(), dataplane.route_config.clone())))
        });
        tokio::select! {
            () = &mut stopped => break,
            () = clock::sleep(REPORT_RENEW_INTERVAL) => continue,
            () = changed => {}
        }
        tokio::select! {
            () = &mut stopped => break,
            () = clock::sleep(REPORT_DEBOUNCE) => {}
        }
    }
    match clock::timeout(
        REPORT_DELETE_TIMEOUT,
        api.delete(&name, &DeleteParams::default()),
    )
    .await
    {
        Ok(Ok(_)) => tracing::debug!(configmap = %name, "dataplane report deleted"),
        Ok(Err(error)) => {
            tracing::warn!(configmap = %name, %error, "cannot delete the dataplane report; it will expire");
        }
        Err(_) => {
            tracing::warn!(configmap = %name, "deleting the dataplane report timed out; it will expire")
        }
    }
}

async fn apply(
    api: &Api<ConfigMap>,
    name: &str,
    namespace: &str,
    report: &DataplaneReport,
) -> Result<(), ReportError> {
    let body = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {REPORT_LABEL: REPORT_LABEL_VALUE},
        },
        "data": {REPORT_DATA_KEY: serde_json::to_string(report)?},
    });
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("encoding the report: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Api(#[from] kube::Error),
}

/// The other replicas' reports, as the leader last read them.
pub struct PeerReports {
    api: Api<ConfigMap>,
    identity: String,
    last: Vec<DataplaneReport>,
    failing: bool,
}

impl PeerReports {
    pub fn new(client: Client, namespace: &str, identity: String) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            identity,
            last: Vec::new(),
            failing: false,
        }
    }

    /// Re-reads the reports. When the list fails, the previous ones stay
    /// (their TTL still applies), so one failed read does not flap `Programmed`.
    pub async fn refresh(&mut self) -> &[DataplaneReport] {
        match self
            .api
            .list(&ListParams::default().labels(&report_selector()))
            .await
        {
            Ok(list) => {
                if std::mem::take(&mut self.failing) {
                    tracing::info!("dataplane reports readable again");
                }
                self.last = list
                    .items
                    .iter()
                    .filter_map(parse_report)
                    .filter(|report| report.replica != self.identity)
                    .collect();
            }
            Err(error) => {
                if !self.failing {
                    tracing::warn!(%error, "cannot list the other replicas' dataplane reports; using the last ones read");
                }
                self.failing = true;
            }
        }
        &self.last
    }
}

fn parse_report(config_map: &ConfigMap) -> Option<DataplaneReport> {
    let name = config_map.metadata.name.as_deref().unwrap_or_default();
    let Some(text) = config_map
        .data
        .as_ref()
        .and_then(|data| data.get(REPORT_DATA_KEY))
    else {
        tracing::warn!(configmap = %name, key = REPORT_DATA_KEY, "dataplane report without its key; ignored");
        return None;
    };
    match serde_json::from_str(text) {
        Ok(report) => Some(report),
        Err(error) => {
            tracing::warn!(configmap = %name, %error, "unreadable dataplane report; ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_are_valid_object_names() {
        assert_eq!(
            report_name("switchyard-controller-7d9f-abcde"),
            "switchyard-dataplanes-switchyard-controller-7d9f-abcde"
        );
        assert_eq!(
            report_name("Host_1:9090"),
            "switchyard-dataplanes-host-1-9090"
        );
        let long = report_name(&"a".repeat(400));
        assert_eq!(long.len(), MAX_NAME_LENGTH);
        assert_eq!(report_name("x_"), "switchyard-dataplanes-x");
    }
}
