//! Writes status (server-side apply on the status subresource) and Events for
//! rejected objects. Only the elected leader runs [`StatusWriter::sync`];
//! what to write is decided by the pure [`plan`].

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};
use serde_json::{Value, json};
use switchyard_crd::{ModelRoute, ModelServer};

use super::caches::Caches;
use crate::compile::{ObjectKind, ObjectReport};
use crate::status::{self, AckSummary, RejectionEvent};

/// Field manager of every status patch: `kubectl get -o yaml --show-managed-fields` names it.
pub const FIELD_MANAGER: &str = "switchyard-controller";
/// `action` of the Events published for rejected objects.
const EVENT_ACTION: &str = "Compile";

/// One status to apply, and the Event that goes with it.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusUpdate {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
    /// The server-side apply body: `apiVersion`, `kind`, `status`.
    pub patch: Value,
    pub event: Option<RejectionEvent>,
    /// `metadata.uid`, so the Event is attached to this very object (`kubectl describe` matches on it).
    pub uid: Option<String>,
}

/// Everything [`plan`] reads.
pub struct PlanInput<'a> {
    pub reports: &'a [ObjectReport],
    pub caches: &'a Caches,
    pub acks: &'a AckSummary,
    /// Newest successful scrape per ModelServer (namespace, name).
    pub last_scrape: &'a BTreeMap<(String, String), Timestamp>,
    pub now: Timestamp,
}

/// The status patches that would change something, given each object's
/// current status in the cache. Objects no longer cached (deleted since the
/// compile) are skipped.
pub fn plan(input: &PlanInput<'_>) -> Vec<StatusUpdate> {
    let mut updates = Vec::new();
    for report in input.reports {
        let update = match report.kind {
            ObjectKind::ModelRoute => {
                let Some(object) = input.caches.find_route(&report.namespace, &report.name) else {
                    continue;
                };
                let previous = object.status.as_ref();
                let desired = status::route_status(report, input.acks, previous, input.now);
                if previous == Some(&desired) {
                    continue;
                }
                let conditions = previous.map_or(&[][..], |status| &status.conditions);
                StatusUpdate {
                    kind: report.kind,
                    namespace: report.namespace.clone(),
                    name: report.name.clone(),
                    patch: apply_body::<ModelRoute>(serde_json::to_value(&desired)),
                    event: status::rejection_event(report, conditions),
                    uid: object.metadata.uid.clone(),
                }
            }
            ObjectKind::ModelServer => {
                let Some(object) = input.caches.find_server(&report.namespace, &report.name) else {
                    continue;
                };
                let previous = object.status.as_ref();
                let last_scrape = input
                    .last_scrape
                    .get(&(report.namespace.clone(), report.name.clone()))
                    .copied();
                let desired =
                    status::server_status(report, input.acks, previous, last_scrape, input.now);
                if previous == Some(&desired) {
                    continue;
                }
                let conditions = previous.map_or(&[][..], |status| &status.conditions);
                StatusUpdate {
                    kind: report.kind,
                    namespace: report.namespace.clone(),
                    name: report.name.clone(),
                    patch: apply_body::<ModelServer>(serde_json::to_value(&desired)),
                    event: status::rejection_event(report, conditions),
                    uid: object.metadata.uid.clone(),
                }
            }
        };
        updates.push(update);
    }
    updates
}

fn apply_body<K: Resource<DynamicType = ()>>(status: Result<Value, serde_json::Error>) -> Value {
    json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        // Status types are plain structs of strings and numbers: serialising cannot fail.
        "status": status.unwrap_or(Value::Null),
    })
}

/// Applies [`StatusUpdate`]s and publishes their Events.
pub struct StatusWriter {
    client: Client,
    recorder: Recorder,
    /// What this replica last applied per object, so a patch is not repeated
    /// before its watch event brings the new status into the cache.
    applied: HashMap<(ObjectKind, String, String), Value>,
}

impl StatusWriter {
    pub fn new(client: Client, instance: String) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_owned(),
                instance: Some(instance),
            },
        );
        Self {
            client,
            recorder,
            applied: HashMap::new(),
        }
    }

    /// Forgets what was applied (leadership lost: the next leader owns it now).
    pub fn forget(&mut self) {
        self.applied.clear();
    }

    /// Applies every update not already applied; a failed one is logged and retried on the next sync.
    pub async fn sync(&mut self, updates: Vec<StatusUpdate>) {
        for update in updates {
            let key = (update.kind, update.namespace.clone(), update.name.clone());
            if self.applied.get(&key) == Some(&update.patch) {
                continue;
            }
            match self.apply(&update).await {
                Ok(()) => {
                    tracing::debug!(kind = update.kind.as_str(), namespace = %update.namespace, name = %update.name, "status applied");
                    self.applied.insert(key, update.patch.clone());
                }
                Err(error) => {
                    tracing::warn!(kind = update.kind.as_str(), namespace = %update.namespace, name = %update.name, %error, "cannot write status; retrying later");
                    continue;
                }
            }
            if let Some(event) = &update.event
                && let Err(error) = self.publish(event, update.uid.clone()).await
            {
                tracing::warn!(kind = event.kind.as_str(), namespace = %event.namespace, name = %event.name, %error, "cannot publish event");
            }
        }
    }

    async fn apply(&self, update: &StatusUpdate) -> Result<(), kube::Error> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let patch = Patch::Apply(&update.patch);
        match update.kind {
            ObjectKind::ModelRoute => {
                Api::<ModelRoute>::namespaced(self.client.clone(), &update.namespace)
                    .patch_status(&update.name, &params, &patch)
                    .await?;
            }
            ObjectKind::ModelServer => {
                Api::<ModelServer>::namespaced(self.client.clone(), &update.namespace)
                    .patch_status(&update.name, &params, &patch)
                    .await?;
            }
        }
        Ok(())
    }

    async fn publish(
        &self,
        event: &RejectionEvent,
        uid: Option<String>,
    ) -> Result<(), kube::Error> {
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(ModelRoute::api_version(&()).into_owned()),
            kind: Some(event.kind.as_str().to_owned()),
            namespace: Some(event.namespace.clone()),
            name: Some(event.name.clone()),
            uid,
            ..Default::default()
        };
        self.recorder
            .publish(
                &Event {
                    type_: EventType::Warning,
                    reason: event.reason.clone(),
                    note: Some(event.note.clone()),
                    action: EVENT_ACTION.to_owned(),
                    secondary: None,
                },
                &reference,
            )
            .await
    }
}
