//! Per-dataplane sync state, shared between the streams (writers) and the
//! admin endpoint and tests (readers).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use prometheus::IntGauge;
use serde::Serialize;
use tokio::sync::watch;

use super::ResourceType;

/// Sync state of one resource type on one stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TypeSyncStatus {
    /// The dataplane asked for this type.
    pub subscribed: bool,
    /// Version of the last response sent.
    pub sent_version: Option<String>,
    /// Nonce of the response sent and not answered yet.
    pub pending_nonce: Option<String>,
    /// Last version the dataplane applied (from an ACK, or from its first request).
    pub acked_version: Option<String>,
    /// Last version the dataplane rejected as invalid; never re-sent.
    pub nacked_version: Option<String>,
    pub last_nack_error: Option<String>,
    /// `NackReason` of the last NACK, as named in the protocol.
    pub last_nack_reason: Option<String>,
    pub responses_sent: u64,
    pub acks: u64,
    pub nacks: u64,
}

/// Sync state of one connected dataplane stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DataplaneStatus {
    /// Unique within this controller process.
    pub stream_id: u64,
    /// `Node.id` from the first request; `None` until it arrives.
    pub node_id: Option<String>,
    pub build_version: Option<String>,
    pub peer: Option<String>,
    pub connected_since_unix_ms: i64,
    pub route_config: TypeSyncStatus,
    pub endpoint_loads: TypeSyncStatus,
}

impl DataplaneStatus {
    pub fn resource(&self, resource: ResourceType) -> &TypeSyncStatus {
        match resource {
            ResourceType::RouteConfig => &self.route_config,
            ResourceType::EndpointLoads => &self.endpoint_loads,
        }
    }

    pub(crate) fn resource_mut(&mut self, resource: ResourceType) -> &mut TypeSyncStatus {
        match resource {
            ResourceType::RouteConfig => &mut self.route_config,
            ResourceType::EndpointLoads => &mut self.endpoint_loads,
        }
    }
}

/// Every open stream's [`DataplaneStatus`].
#[derive(Clone, Debug)]
pub struct DataplaneRegistry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    streams: Mutex<BTreeMap<u64, DataplaneStatus>>,
    next_stream_id: AtomicU64,
    /// Bumped on every change, so readers can wait for a condition instead of polling.
    revision: watch::Sender<u64>,
}

impl Default for DataplaneRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl DataplaneRegistry {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                streams: Mutex::new(BTreeMap::new()),
                next_stream_id: AtomicU64::new(1),
                revision: watch::channel(0).0,
            }),
        }
    }

    /// Every open stream, by stream id.
    pub fn list(&self) -> Vec<DataplaneStatus> {
        self.inner.streams.lock().values().cloned().collect()
    }

    /// Number of open streams.
    pub fn len(&self) -> usize {
        self.inner.streams.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until `condition` holds for the open streams.
    pub async fn wait_until(&self, mut condition: impl FnMut(&[DataplaneStatus]) -> bool) {
        let mut revision = self.inner.revision.subscribe();
        loop {
            revision.borrow_and_update();
            if condition(&self.list()) {
                return;
            }
            // The sender lives in `self`, so this only fails if it is being dropped.
            if revision.changed().await.is_err() {
                return;
            }
        }
    }

    pub(crate) fn register(&self, status: DataplaneStatus, connected: IntGauge) -> RegistryEntry {
        let stream_id = status.stream_id;
        self.inner.streams.lock().insert(stream_id, status);
        connected.inc();
        self.bump();
        RegistryEntry {
            registry: self.clone(),
            stream_id,
            connected,
        }
    }

    pub(crate) fn next_stream_id(&self) -> u64 {
        self.inner.next_stream_id.fetch_add(1, Ordering::Relaxed)
    }

    fn bump(&self) {
        self.inner
            .revision
            .send_modify(|revision| *revision = revision.wrapping_add(1));
    }
}

/// A stream's place in the registry; removes it when dropped, whichever way the stream ends.
#[derive(Debug)]
pub(crate) struct RegistryEntry {
    registry: DataplaneRegistry,
    stream_id: u64,
    connected: IntGauge,
}

impl RegistryEntry {
    pub(crate) fn registry(&self) -> &DataplaneRegistry {
        &self.registry
    }

    pub(crate) fn update(&self, status: &DataplaneStatus) {
        if let Some(entry) = self.registry.inner.streams.lock().get_mut(&self.stream_id) {
            entry.clone_from(status);
        }
        self.registry.bump();
    }
}

impl Drop for RegistryEntry {
    fn drop(&mut self) {
        self.registry.inner.streams.lock().remove(&self.stream_id);
        self.connected.dec();
        self.registry.bump();
    }
}
