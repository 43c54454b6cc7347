//! The latest resource of each type, built once per change and shared by every stream.

use std::sync::Arc;

use switchyard_snapshot::{content_version, pb};
use tokio::sync::watch;

use super::ResourceType;
use super::metrics::XdsMetrics;

/// Version prefix of RouteConfig resources.
const ROUTE_CONFIG_VERSION_PREFIX: &str = "rc";
/// Version prefix of EndpointLoads resources.
const ENDPOINT_LOADS_VERSION_PREFIX: &str = "el";

/// One published resource: the response every stream sends, minus the nonce.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishedResource {
    pub version: String,
    pub generated_at_unix_ms: i64,
    /// `nonce` is empty; each stream sets its own.
    pub response: pb::SnapshotResponse,
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
        let version = content_version(ROUTE_CONFIG_VERSION_PREFIX, &route_config);
        self.publish(
            ResourceType::RouteConfig,
            version,
            pb::snapshot_response::Resource::RouteConfig(route_config),
            generated_at_unix_ms,
        )
    }

    /// Publishes EndpointLoads unless its content version is already the published one.
    pub fn publish_endpoint_loads(
        &self,
        endpoint_loads: pb::EndpointLoads,
        generated_at_unix_ms: i64,
    ) -> PublishResult {
        let version = content_version(ENDPOINT_LOADS_VERSION_PREFIX, &endpoint_loads);
        self.publish(
            ResourceType::EndpointLoads,
            version,
            pb::snapshot_response::Resource::EndpointLoads(endpoint_loads),
            generated_at_unix_ms,
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

    fn publish(
        &self,
        resource_type: ResourceType,
        version: String,
        resource: pb::snapshot_response::Resource,
        generated_at_unix_ms: i64,
    ) -> PublishResult {
        let mut previous_version = None;
        let changed = self.sender(resource_type).send_if_modified(|current| {
            if let Some(current) = current {
                if current.version == version {
                    return false;
                }
                previous_version = Some(current.version.clone());
            }
            *current = Some(Arc::new(PublishedResource {
                version: version.clone(),
                generated_at_unix_ms,
                response: pb::SnapshotResponse {
                    type_url: resource_type.type_url().to_owned(),
                    version_info: version.clone(),
                    nonce: String::new(),
                    control_plane_id: self.control_plane_id.clone(),
                    generated_at_unix_ms,
                    resource: Some(resource),
                },
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
