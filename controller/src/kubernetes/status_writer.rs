//! Writes status (server-side apply on the status subresource) and Events for
//! rejected objects. Only the elected leader runs [`StatusWriter::sync`];
//! what to write is decided by the pure [`plan`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use switchyard_crd::gateway_api::GatewayStatusAddress;
use switchyard_crd::{
    ExternalModelProvider, Gateway, GatewayClass, HTTPRoute, InferencePool, ModelRoute, ModelServer,
};

use super::caches::Caches;
use crate::compile::{GatewayApiReports, ObjectKind, ObjectReport, ProviderReport};
use crate::metrics::ControllerMetrics;
use crate::status::{self, AckSummary, WarningEvent, gateway_api};

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
    pub events: Vec<WarningEvent>,
    /// `metadata.uid`, so the Event is attached to this very object (`kubectl describe` matches on it).
    pub uid: Option<String>,
}

/// Everything [`plan`] reads.
pub struct PlanInput<'a> {
    pub reports: &'a [ObjectReport],
    pub providers: &'a [ProviderReport],
    /// The Gateway API kinds' reports (empty when the mode is off).
    pub gateway_api: &'a GatewayApiReports,
    /// Switchyard's `controllerName` (its HTTPRoute status entries carry it).
    pub controller_name: &'a str,
    /// The Gateways' addresses (`--gateway-addresses`).
    pub gateway_addresses: &'a [GatewayStatusAddress],
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
                let conditions = previous.map_or(&[][..], |status| &status.conditions);
                update_if_changed::<ModelRoute, _>(report, &object, previous, conditions, desired)
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
                let conditions = previous.map_or(&[][..], |status| &status.conditions);
                update_if_changed::<ModelServer, _>(report, &object, previous, conditions, desired)
            }
            // Providers have reports of their own (below).
            ObjectKind::ExternalModelProvider => continue,
            // Reported through `gateway_api` below.
            ObjectKind::GatewayClass
            | ObjectKind::Gateway
            | ObjectKind::HTTPRoute
            | ObjectKind::InferencePool => continue,
        };
        updates.extend(update);
    }
    for report in input.providers {
        let Some(object) = input.caches.find_provider(&report.namespace, &report.name) else {
            continue;
        };
        let previous = object.status.as_ref();
        let desired = status::provider_status(report, previous, input.now);
        if previous == Some(&desired) {
            continue;
        }
        let conditions = previous.map_or(&[][..], |status| &status.conditions);
        updates.push(StatusUpdate {
            kind: ObjectKind::ExternalModelProvider,
            namespace: report.namespace.clone(),
            name: report.name.clone(),
            patch: apply_body::<ExternalModelProvider>(serde_json::to_value(&desired)),
            events: status::provider_events(report, conditions),
            uid: object.metadata.uid.clone(),
        });
    }
    plan_gateway_api(input, &mut updates);
    updates
}

/// The update that takes `object` from its `previous` status (whose
/// conditions are `previous_conditions`) to `desired`; `None` when they are
/// the same.
fn update_if_changed<K: Resource<DynamicType = ()>, S: PartialEq + serde::Serialize>(
    report: &ObjectReport,
    object: &K,
    previous: Option<&S>,
    previous_conditions: &[Condition],
    desired: S,
) -> Option<StatusUpdate> {
    if previous == Some(&desired) {
        return None;
    }
    Some(StatusUpdate {
        kind: report.kind,
        namespace: report.namespace.clone(),
        name: report.name.clone(),
        patch: apply_body::<K>(serde_json::to_value(&desired)),
        events: status::warning_events(report, previous_conditions),
        uid: object.meta().uid.clone(),
    })
}

/// The Gateway API kinds' status patches that would change something.
fn plan_gateway_api(input: &PlanInput<'_>, updates: &mut Vec<StatusUpdate>) {
    let reports = input.gateway_api;
    let mut push = |kind, namespace: &str, name: &str, patch| {
        updates.push(StatusUpdate {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            patch,
            events: Vec::new(),
            uid: None,
        });
    };
    for report in &reports.gateway_classes {
        let Some(object) = input.caches.find_gateway_class(&report.name) else {
            continue;
        };
        let previous = object.status.as_ref();
        let desired = gateway_api::gateway_class_status(report, previous, input.now);
        if previous != Some(&desired) {
            push(
                ObjectKind::GatewayClass,
                "",
                &report.name,
                apply_body::<GatewayClass>(serde_json::to_value(&desired)),
            );
        }
    }
    for report in &reports.gateways {
        let Some(object) = input.caches.find_gateway(&report.namespace, &report.name) else {
            continue;
        };
        let previous = object.status.as_ref();
        let desired = gateway_api::gateway_status(
            report,
            input.acks,
            input.gateway_addresses,
            previous,
            input.now,
        );
        if previous != Some(&desired) {
            push(
                ObjectKind::Gateway,
                &report.namespace,
                &report.name,
                apply_body::<Gateway>(serde_json::to_value(&desired)),
            );
        }
    }
    for report in &reports.http_routes {
        let Some(object) = input
            .caches
            .find_http_route(&report.namespace, &report.name)
        else {
            continue;
        };
        let previous = object.status.as_ref();
        let desired =
            gateway_api::http_route_status(report, input.controller_name, previous, input.now);
        if previous != Some(&desired) {
            push(
                ObjectKind::HTTPRoute,
                &report.namespace,
                &report.name,
                apply_body::<HTTPRoute>(serde_json::to_value(&desired)),
            );
        }
    }
    let ours: BTreeSet<(String, String)> = reports
        .gateways
        .iter()
        .map(|gateway| (gateway.namespace.clone(), gateway.name.clone()))
        .collect();
    for report in &reports.inference_pools {
        let Some(object) = input
            .caches
            .find_inference_pool(&report.namespace, &report.name)
        else {
            continue;
        };
        let previous = object.status.as_ref();
        let desired = gateway_api::inference_pool_status(report, &ours, previous, input.now);
        // A pool no Gateway of Switchyard's routes to, that carries no entry of one, is not ours to touch.
        if previous == Some(&desired) || (previous.is_none() && desired.parents.is_empty()) {
            continue;
        }
        push(
            ObjectKind::InferencePool,
            &report.namespace,
            &report.name,
            apply_body::<InferencePool>(serde_json::to_value(&desired)),
        );
    }
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
    metrics: ControllerMetrics,
}

impl StatusWriter {
    pub fn new(client: Client, instance: String, metrics: ControllerMetrics) -> Self {
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
            metrics,
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
            let outcome = self.apply(&update).await;
            self.metrics
                .status_writes
                .with_label_values(&[
                    update.kind.as_str(),
                    if outcome.is_ok() { "applied" } else { "failed" },
                ])
                .inc();
            match outcome {
                Ok(()) => {
                    tracing::debug!(kind = update.kind.as_str(), namespace = %update.namespace, name = %update.name, "status applied");
                    self.applied.insert(key, update.patch.clone());
                }
                Err(error) => {
                    tracing::warn!(kind = update.kind.as_str(), namespace = %update.namespace, name = %update.name, %error, "cannot write status; retrying later");
                    continue;
                }
            }
            for event in &update.events {
                let outcome = self.publish(event, update.uid.clone()).await;
                self.metrics
                    .events
                    .with_label_values(&[if outcome.is_ok() {
                        "published"
                    } else {
                        "failed"
                    }])
                    .inc();
                if let Err(error) = outcome {
                    tracing::warn!(kind = event.kind.as_str(), namespace = %event.namespace, name = %event.name, %error, "cannot publish event");
                }
            }
        }
    }

    async fn apply(&self, update: &StatusUpdate) -> Result<(), kube::Error> {
        let client = self.client.clone();
        let namespace = update.namespace.as_str();
        match update.kind {
            ObjectKind::ModelRoute => {
                patch_status(Api::<ModelRoute>::namespaced(client, namespace), update).await
            }
            ObjectKind::ModelServer => {
                patch_status(Api::<ModelServer>::namespaced(client, namespace), update).await
            }
            ObjectKind::ExternalModelProvider => {
                let api = Api::<ExternalModelProvider>::namespaced(client, namespace);
                patch_status(api, update).await
            }
            ObjectKind::GatewayClass => {
                patch_status(Api::<GatewayClass>::all(client), update).await
            }
            ObjectKind::Gateway => {
                patch_status(Api::<Gateway>::namespaced(client, namespace), update).await
            }
            ObjectKind::HTTPRoute => {
                patch_status(Api::<HTTPRoute>::namespaced(client, namespace), update).await
            }
            ObjectKind::InferencePool => {
                patch_status(Api::<InferencePool>::namespaced(client, namespace), update).await
            }
        }
    }

    async fn publish(&self, event: &WarningEvent, uid: Option<String>) -> Result<(), kube::Error> {
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

/// Applies `update`'s status through `api`: server-side apply, forced, as the
/// status is ours to write.
async fn patch_status<K>(api: Api<K>, update: &StatusUpdate) -> Result<(), kube::Error>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&update.name, &params, &Patch::Apply(&update.patch))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use http::{Request, Response};
    use kube::client::Body;
    use tower_test::mock;

    use super::*;
    use crate::compile::compile_route_config;

    const ROUTE: &str = r#"
metadata: { name: broken, namespace: team-a, uid: uid-1, generation: 3 }
spec:
  modelName: broken
  rules:
  - name: default
    targetModels:
    - modelServerName: gone
"#;

    /// Plans from a reflector store seeded by hand, then checks, request by
    /// request, what the writer sends (tower-test scenario, as kube-rs tests do).
    #[tokio::test]
    async fn writes_status_by_server_side_apply_then_the_event() {
        let route: ModelRoute = serde_yaml::from_str(ROUTE).expect("test route parses");
        let caches = Caches::seeded(vec![route.clone()], Vec::new(), Vec::new());
        let compiled = compile_route_config(&[route], &[], &[]);
        let acks = AckSummary::from_dataplanes(Some("rc-1"), &[]);
        let now = Timestamp::from_second(1_780_000_000).expect("timestamp");
        let updates = plan(&PlanInput {
            reports: &compiled.reports,
            providers: &[],
            gateway_api: &GatewayApiReports::default(),
            controller_name: crate::compile::gateway_api::DEFAULT_CONTROLLER_NAME,
            gateway_addresses: &[],
            caches: &caches,
            acks: &acks,
            last_scrape: &BTreeMap::new(),
            now,
        });
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].uid.as_deref(), Some("uid-1"));

        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let registry = prometheus::Registry::new();
        let metrics = ControllerMetrics::register(&registry).expect("metrics register");
        let mut writer = StatusWriter::new(
            kube::Client::new(service, "default"),
            "replica-a".into(),
            metrics.clone(),
        );
        let scenario = tokio::spawn(async move {
            let (request, respond) = handle.next_request().await.expect("status patch");
            assert_eq!(request.method(), http::Method::PATCH);
            assert_eq!(
                request.uri().to_string(),
                "/apis/networking.serving.volcano.sh/v1alpha1/namespaces/team-a/modelroutes/broken/status?&force=true&fieldManager=switchyard-controller"
            );
            assert_eq!(
                request
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .map(|value| value.as_bytes()),
                Some(&b"application/apply-patch+yaml"[..])
            );
            let body = http_body_util::BodyExt::collect(request.into_body())
                .await
                .expect("body")
                .to_bytes();
            let body: Value = serde_json::from_slice(&body).expect("JSON body");
            assert_eq!(body["apiVersion"], "networking.serving.volcano.sh/v1alpha1");
            assert_eq!(body["kind"], "ModelRoute");
            assert_eq!(body["status"]["observedGeneration"], 3);
            let conditions = body["status"]["conditions"].as_array().expect("conditions");
            let summary: Vec<(&str, &str, &str)> = conditions
                .iter()
                .map(|c| {
                    (
                        c["type"].as_str().unwrap_or_default(),
                        c["status"].as_str().unwrap_or_default(),
                        c["reason"].as_str().unwrap_or_default(),
                    )
                })
                .collect();
            assert_eq!(
                summary,
                [
                    ("Accepted", "True", "Accepted"),
                    ("ResolvedRefs", "False", "BackendNotFound"),
                    ("Programmed", "False", "NotInSnapshot"),
                ]
            );
            assert_eq!(conditions[1]["lastTransitionTime"], "2026-05-28T20:26:40Z");
            let object = json!({"apiVersion": "networking.serving.volcano.sh/v1alpha1", "kind": "ModelRoute",
                "metadata": {"name": "broken", "namespace": "team-a"}, "spec": {"rules": []}, "status": body["status"]});
            respond.send_response(Response::new(Body::from(object.to_string().into_bytes())));

            let (request, respond) = handle.next_request().await.expect("event");
            assert_eq!(request.method(), http::Method::POST);
            assert_eq!(
                request.uri().path(),
                "/apis/events.k8s.io/v1/namespaces/team-a/events"
            );
            let body = http_body_util::BodyExt::collect(request.into_body())
                .await
                .expect("body")
                .to_bytes();
            let event: Value = serde_json::from_slice(&body).expect("JSON body");
            assert_eq!(event["type"], "Warning");
            assert_eq!(event["reason"], "BackendNotFound");
            assert_eq!(event["action"], "Compile");
            assert_eq!(event["regarding"]["uid"], "uid-1");
            assert_eq!(event["reportingInstance"], "replica-a");
            respond.send_response(Response::new(Body::from(body.to_vec())));
        });
        writer.sync(updates.clone()).await;
        tokio::time::timeout(std::time::Duration::from_secs(10), scenario)
            .await
            .expect("scenario in time")
            .expect("scenario assertions");

        // Remembered as applied, so the same plan is not sent again before the watch catches up.
        assert_eq!(
            writer.applied.get(&(
                ObjectKind::ModelRoute,
                "team-a".to_owned(),
                "broken".to_owned()
            )),
            Some(&updates[0].patch)
        );
        assert_eq!(
            metrics
                .status_writes
                .with_label_values(&["ModelRoute", "applied"])
                .get(),
            1
        );
        assert_eq!(metrics.events.with_label_values(&["published"]).get(), 1);
        // Leadership lost: forgotten, the next leader owns it.
        writer.forget();
        assert!(writer.applied.is_empty());
    }
}
