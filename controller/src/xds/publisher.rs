//! The latest resource of each type, built once per change and shared by every stream.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use switchyard_snapshot::{content_version, pb};
use tokio::sync::watch;

use super::ResourceType;
use super::metrics::XdsMetrics;
use super::wire::EncodedResponse;

/// One published resource: the response every stream sends, minus the nonce.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishedResource {
    pub version: String,
    pub generated_at_unix_ms: i64,
    /// The whole resource. `nonce` is empty; each stream sets its own.
    pub response: pb::SnapshotResponse,
    /// `response` encoded, shared by every stream.
    pub encoded: Bytes,
    /// The same state as an incremental update from the previously published
    /// version, for streams whose dataplane applied that one; `None` when the
    /// type has no updates or the update would not be smaller than the whole.
    pub update: Option<IncrementalUpdate>,
}

/// A response that turns version `base_version` into the published one.
#[derive(Clone, Debug, PartialEq)]
pub struct IncrementalUpdate {
    pub base_version: String,
    pub response: pb::SnapshotResponse,
    pub encoded: Bytes,
}

impl PublishedResource {
    /// What to send a dataplane that has applied `applied_version` (encoded,
    /// and whether it is the update): the update when it applies to that
    /// version, the whole resource otherwise.
    pub fn encoded_for(&self, applied_version: Option<&str>) -> (&Bytes, bool) {
        match &self.update {
            Some(update) if applied_version == Some(update.base_version.as_str()) => {
                (&update.encoded, true)
            }
            _ => (&self.encoded, false),
        }
    }
}

/// Latest published resource of one type; `None` until the first publish.
pub type ResourceReceiver = watch::Receiver<Option<Arc<PublishedResource>>>;

/// What a publish did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishResult {
    pub version: String,
    /// `false` when the content equals the published one: nothing was sent, no stream woke up.
    pub changed: bool,
}

/// Holds the latest RouteConfig and EndpointLoads for the stream server.
#[derive(Debug)]
pub struct SnapshotPublisher {
    control_plane_id: String,
    route_config: watch::Sender<Option<Arc<PublishedResource>>>,
    endpoint_loads: watch::Sender<Option<Arc<PublishedResource>>>,
    metrics: XdsMetrics,
}

impl SnapshotPublisher {
    /// `control_plane_id` goes into every response (which controller replica sent it).
    pub fn new(control_plane_id: impl Into<String>, metrics: XdsMetrics) -> Self {
        Self {
            control_plane_id: control_plane_id.into(),
            route_config: watch::channel(None).0,
            endpoint_loads: watch::channel(None).0,
            metrics,
        }
    }

    pub fn control_plane_id(&self) -> &str {
        &self.control_plane_id
    }

    /// Publishes a RouteConfig unless its content version is already the published one.
    pub fn publish_route_config(
        &self,
        route_config: pb::RouteConfig,
        generated_at_unix_ms: i64,
    ) -> PublishResult {
        let version = content_version(ResourceType::RouteConfig, &route_config);
        let resource = pb::snapshot_response::Resource::RouteConfig(route_config);
        self.publish(version, resource, generated_at_unix_ms, |_, _| None)
    }

    /// Publishes EndpointLoads (the whole set) unless its content version is
    /// already the published one, together with the incremental update from
    /// the previously published set when that is smaller.
    pub fn publish_endpoint_loads(
        &self,
        endpoint_loads: pb::EndpointLoads,
        generated_at_unix_ms: i64,
    ) -> PublishResult {
        let version = content_version(ResourceType::EndpointLoads, &endpoint_loads);
        let resource = pb::snapshot_response::Resource::EndpointLoads(endpoint_loads);
        self.publish(
            version,
            resource,
            generated_at_unix_ms,
            endpoint_loads_update,
        )
    }

    /// The published RouteConfig, if any.
    pub fn route_config(&self) -> Option<Arc<PublishedResource>> {
        self.route_config.borrow().clone()
    }

    /// The published EndpointLoads, if any.
    pub fn endpoint_loads(&self) -> Option<Arc<PublishedResource>> {
        self.endpoint_loads.borrow().clone()
    }

    /// The latest resource of a type, as a channel that wakes on every change.
    pub fn subscribe(&self, resource: ResourceType) -> ResourceReceiver {
        self.sender(resource).subscribe()
    }

    fn sender(&self, resource: ResourceType) -> &watch::Sender<Option<Arc<PublishedResource>>> {
        match resource {
            ResourceType::RouteConfig => &self.route_config,
            ResourceType::EndpointLoads => &self.endpoint_loads,
        }
    }

    /// `update` builds the incremental update from the published resource to
    /// `resource`, if the type has them.
    fn publish(
        &self,
        version: String,
        resource: pb::snapshot_response::Resource,
        generated_at_unix_ms: i64,
        update: impl FnOnce(
            &PublishedResource,
            &pb::snapshot_response::Resource,
        ) -> Option<pb::snapshot_response::Resource>,
    ) -> PublishResult {
        let resource_type = ResourceType::of(&resource);
        let mut previous_version = None;
        let response = |resource| pb::SnapshotResponse {
            type_url: resource_type.type_url().to_owned(),
            version_info: version.clone(),
            nonce: String::new(),
            control_plane_id: self.control_plane_id.clone(),
            generated_at_unix_ms,
            resource: Some(resource),
        };
        let changed = self.sender(resource_type).send_if_modified(|current| {
            let mut incremental = None;
            if let Some(current) = current {
                if current.version == version {
                    return false;
                }
                previous_version = Some(current.version.clone());
                incremental = update(current, &resource).map(|resource| {
                    let response = response(resource);
                    IncrementalUpdate {
                        base_version: current.version.clone(),
                        encoded: EncodedResponse::share(&response),
                        response,
                    }
                });
            }
            let response = response(resource);
            *current = Some(Arc::new(PublishedResource {
                version: version.clone(),
                generated_at_unix_ms,
                encoded: EncodedResponse::share(&response),
                response,
                update: incremental,
            }));
            true
        });
        if changed {
            self.metrics.record_published(
                resource_type,
                previous_version.as_deref(),
                &version,
                generated_at_unix_ms,
            );
            tracing::debug!(r#type = resource_type.label(), %version, "published");
        }
        PublishResult { version, changed }
    }
}

/// The update from the published EndpointLoads to `next`: the entries added
/// or changed and the ones removed. `None` when it would not be smaller than
/// the whole set (e.g. every pod's load changed).
fn endpoint_loads_update(
    published: &PublishedResource,
    next: &pb::snapshot_response::Resource,
) -> Option<pb::snapshot_response::Resource> {
    let (
        Some(pb::snapshot_response::Resource::EndpointLoads(base)),
        pb::snapshot_response::Resource::EndpointLoads(next),
    ) = (&published.response.resource, next)
    else {
        return None;
    };
    let update = endpoint_loads_diff(base, next, &published.version);
    (update.encoded_len() < next.encoded_len())
        .then_some(pb::snapshot_response::Resource::EndpointLoads(update))
}

/// The update that turns `base` (of version `base_version`) into `next`; both
/// sorted by (namespace, pod), as compiled.
pub fn endpoint_loads_diff(
    base: &pb::EndpointLoads,
    next: &pb::EndpointLoads,
    base_version: &str,
) -> pb::EndpointLoads {
    use std::cmp::Ordering;

    fn key(load: &pb::EndpointLoad) -> (&str, &str) {
        (&load.namespace, &load.pod)
    }
    let mut update = pb::EndpointLoads {
        base_version: base_version.to_owned(),
        observed_at_unix_ms: next.observed_at_unix_ms,
        // Always whole: they replace the ones held.
        ejections: next.ejections.clone(),
        fairness_counters: next.fairness_counters.clone(),
        ..Default::default()
    };
    let removed = |load: &pb::EndpointLoad| pb::EndpointRef {
        namespace: load.namespace.clone(),
        pod: load.pod.clone(),
    };
    let (mut old, mut new) = (base.loads.iter().peekable(), next.loads.iter().peekable());
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(gone), None) => {
                update.removed.push(removed(gone));
                old.next();
            }
            (None, Some(added)) => {
                update.loads.push((*added).clone());
                new.next();
            }
            (Some(before), Some(after)) => match key(before).cmp(&key(after)) {
                Ordering::Less => {
                    update.removed.push(removed(before));
                    old.next();
                }
                Ordering::Greater => {
                    update.loads.push((*after).clone());
                    new.next();
                }
                Ordering::Equal => {
                    if before != after {
                        update.loads.push((*after).clone());
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
    update
}

#[cfg(test)]
mod tests {
    use prometheus::Registry;

    use super::*;

    fn load(pod: &str, waiting: f64) -> pb::EndpointLoad {
        pb::EndpointLoad {
            namespace: "default".into(),
            pod: pod.into(),
            requests_waiting: waiting,
            ..Default::default()
        }
    }

    fn set(loads: Vec<pb::EndpointLoad>, observed_at_unix_ms: i64) -> pb::EndpointLoads {
        pb::EndpointLoads {
            loads,
            observed_at_unix_ms,
            ..Default::default()
        }
    }

    #[test]
    fn the_diff_lists_added_changed_and_removed_entries() {
        let base = set(vec![load("a", 1.0), load("b", 1.0), load("c", 1.0)], 1_000);
        let next = pb::EndpointLoads {
            ejections: vec![pb::PodEjection {
                until_unix_ms: 9_000,
                ..switchyard_snapshot::test_builders::ejection("c")
            }],
            ..set(vec![load("b", 2.0), load("c", 1.0), load("d", 1.0)], 2_000)
        };
        let update = endpoint_loads_diff(&base, &next, "el-1");
        assert_eq!(update.base_version, "el-1");
        assert_eq!(update.observed_at_unix_ms, 2_000);
        assert_eq!(update.loads, vec![load("b", 2.0), load("d", 1.0)]);
        assert_eq!(update.ejections, next.ejections, "carried whole");
        let removed: Vec<_> = update
            .removed
            .iter()
            .map(|gone| gone.pod.as_str())
            .collect();
        assert_eq!(removed, ["a"]);
    }

    #[test]
    fn an_update_is_published_only_when_smaller_than_the_whole_set() {
        let metrics = XdsMetrics::register(&Registry::new()).expect("metrics");
        let publisher = SnapshotPublisher::new("test", metrics);
        let pods: Vec<String> = (0..50).map(|index| format!("pod-{index:02}")).collect();
        let all = |waiting: f64| set(pods.iter().map(|pod| load(pod, waiting)).collect(), 1);
        let one_changed = {
            let mut loads = all(1.0);
            loads.loads[3].requests_waiting = 4.0;
            loads
        };

        let has_update = || {
            publisher
                .endpoint_loads()
                .expect("published")
                .update
                .is_some()
        };

        let first = publisher.publish_endpoint_loads(all(1.0), 1);
        assert!(!has_update());
        publisher.publish_endpoint_loads(one_changed, 2);
        let published = publisher.endpoint_loads().expect("published");
        let update = published
            .update
            .as_ref()
            .expect("one pod changed: an update");
        assert_eq!(update.base_version, first.version);
        assert_eq!(update.response.version_info, published.version);
        let (sent, incremental) = published.encoded_for(Some(&first.version));
        assert!(incremental);
        assert_eq!(sent, &update.response.encode_to_vec());
        let (sent, incremental) = published.encoded_for(Some("el-other"));
        assert!(!incremental);
        assert_eq!(sent, &published.response.encode_to_vec());

        // Every pod changed: the update would be as big as the set, so there is none.
        publisher.publish_endpoint_loads(all(9.0), 3);
        assert!(!has_update());
    }
}
