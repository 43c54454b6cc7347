//! The `RoutingDiscovery` gRPC service: one task per dataplane stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use switchyard_runtime::clock::unix_ms_now;
use switchyard_snapshot::{MAX_UNKNOWN_KEY_IDS, Nack, bounded_key_id, pb};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::ResourceType;
use super::metrics::XdsMetrics;
use super::publisher::{ResourceReceiver, SnapshotPublisher};
use super::registry::{DataplaneRegistry, DataplaneStatus, RegistryEntry, TypeSyncStatus};
use super::wire::EncodedResponse;
use crate::fleet_fairness::FairnessBoard;
use crate::outlier::EjectionBoard;

/// Responses queued per stream: at most one un-ACKed response per type is in
/// flight, so 4 only fills up when the dataplane stopped reading.
pub const STREAM_CHANNEL_CAPACITY: usize = 4;
/// A dataplane that does not take a response for this long is stuck (or its
/// connection is); closing the stream lets it reconnect and resync.
pub const STREAM_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-stream tunables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamSettings {
    pub channel_capacity: usize,
    pub send_timeout: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            channel_capacity: STREAM_CHANNEL_CAPACITY,
            send_timeout: STREAM_SEND_TIMEOUT,
        }
    }
}

/// Serves the published snapshots to every dataplane stream.
#[derive(Clone, Debug)]
pub struct RoutingDiscoveryService {
    publisher: Arc<SnapshotPublisher>,
    registry: DataplaneRegistry,
    metrics: XdsMetrics,
    settings: StreamSettings,
    /// Where the dataplanes' outlier reports go.
    ejections: Arc<EjectionBoard>,
    /// Where the dataplanes' fairness usage reports go.
    fairness: Arc<FairnessBoard>,
    /// Flips to `true` when the server shuts down: bidi streams never end on
    /// their own, so graceful shutdown has to end them.
    closing: Arc<watch::Sender<bool>>,
    /// Where dataplanes' unknown JWT key ids go (the JWKS refresher); None
    /// drops them.
    key_hints: Option<mpsc::Sender<Vec<String>>>,
}

impl RoutingDiscoveryService {
    pub fn new(
        publisher: Arc<SnapshotPublisher>,
        registry: DataplaneRegistry,
        metrics: XdsMetrics,
    ) -> Self {
        Self {
            publisher,
            registry,
            metrics,
            settings: StreamSettings::default(),
            ejections: Arc::default(),
            fairness: Arc::default(),
            closing: Arc::new(watch::channel(false).0),
            key_hints: None,
        }
    }

    /// Sends the key ids of dataplanes' unknown-key hints to `hints`.
    pub fn with_key_hints(mut self, hints: mpsc::Sender<Vec<String>>) -> Self {
        self.key_hints = Some(hints);
        self
    }

    /// Dataplanes' fairness usage reports go to `fairness`.
    pub fn with_fairness_reports(mut self, fairness: Arc<FairnessBoard>) -> Self {
        self.fairness = fairness;
        self
    }

    /// Dataplanes' outlier reports go to `ejections`.
    pub fn with_outlier_reports(mut self, ejections: Arc<EjectionBoard>) -> Self {
        self.ejections = ejections;
        self
    }

    pub fn with_settings(mut self, settings: StreamSettings) -> Self {
        self.settings = settings;
        self
    }

    /// Ends every open stream (cleanly, so dataplanes reconnect at once, e.g. to another replica).
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }
}

impl RoutingDiscoveryService {
    /// `RoutingDiscovery.StreamSnapshots`: starts the stream's task.
    pub(super) async fn open_stream(
        &self,
        request: Request<Streaming<pb::SnapshotRequest>>,
    ) -> Result<Response<ReceiverStream<Result<EncodedResponse, Status>>>, Status> {
        if self.publisher.route_config().is_none() {
            // A dataplane must not believe it is in sync with an empty config.
            return Err(Status::unavailable("no routing snapshot compiled yet"));
        }
        if *self.closing.borrow() {
            return Err(Status::unavailable("controller is shutting down"));
        }
        let peer = request.remote_addr();
        let (sender, receiver) = mpsc::channel(self.settings.channel_capacity);
        let stream = SnapshotStream::new(self, peer, sender);
        tokio::spawn(stream.run(request.into_inner()));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// State of one dataplane stream, owned by its task.
struct SnapshotStream {
    metrics: XdsMetrics,
    settings: StreamSettings,
    ejections: Arc<EjectionBoard>,
    fairness: Arc<FairnessBoard>,
    closing: watch::Receiver<bool>,
    responses: mpsc::Sender<Result<EncodedResponse, Status>>,
    route_config: ResourceReceiver,
    endpoint_loads: ResourceReceiver,
    status: DataplaneStatus,
    entry: RegistryEntry,
    requests_seen: u64,
    next_nonce: u64,
    key_hints: Option<mpsc::Sender<Vec<String>>>,
}

/// Why a stream task ended.
enum StreamEnd {
    ClientClosed,
    ClientError(Status),
    ResponseStreamDropped,
    SendTimeout(ResourceType),
    ServerClosing,
}

impl SnapshotStream {
    fn new(
        service: &RoutingDiscoveryService,
        peer: Option<SocketAddr>,
        responses: mpsc::Sender<Result<EncodedResponse, Status>>,
    ) -> Self {
        let status = DataplaneStatus {
            stream_id: service.registry.next_stream_id(),
            node_id: None,
            build_version: None,
            peer: peer.map(|peer| peer.to_string()),
            connected_since_unix_ms: unix_ms_now(),
            route_config: TypeSyncStatus::default(),
            endpoint_loads: TypeSyncStatus::default(),
        };
        let entry = service
            .registry
            .register(status.clone(), service.metrics.connected_dataplanes.clone());
        Self {
            metrics: service.metrics.clone(),
            settings: service.settings,
            ejections: service.ejections.clone(),
            fairness: service.fairness.clone(),
            closing: service.closing.subscribe(),
            responses,
            route_config: service.publisher.subscribe(ResourceType::RouteConfig),
            endpoint_loads: service.publisher.subscribe(ResourceType::EndpointLoads),
            status,
            entry,
            requests_seen: 0,
            next_nonce: 0,
            key_hints: service.key_hints.clone(),
        }
    }

    async fn run(mut self, mut requests: Streaming<pb::SnapshotRequest>) {
        tracing::debug!(stream_id = self.status.stream_id, peer = ?self.status.peer, "snapshot stream opened");
        let end = loop {
            if let Err(end) = self.send_due().await {
                break end;
            }
            let request = tokio::select! {
                _ = self.closing.wait_for(|closing| *closing) => break StreamEnd::ServerClosing,
                request = requests.next() => request,
                // A failed `changed()` means the publisher is gone: the server is going down.
                changed = self.route_config.changed() => match changed {
                    Ok(()) => continue,
                    Err(_) => break StreamEnd::ServerClosing,
                },
                changed = self.endpoint_loads.changed() => match changed {
                    Ok(()) => continue,
                    Err(_) => break StreamEnd::ServerClosing,
                },
                () = self.responses.closed() => break StreamEnd::ResponseStreamDropped,
            };
            match request {
                Some(Ok(request)) => self.handle_request(request),
                Some(Err(status)) => break StreamEnd::ClientError(status),
                None => break StreamEnd::ClientClosed,
            }
        };
        self.log_end(end);
    }

    /// Sends the latest resource of every type that is due (see [`is_due`]).
    async fn send_due(&mut self) -> Result<(), StreamEnd> {
        for resource in ResourceType::ALL {
            let latest = match resource {
                ResourceType::RouteConfig => self.route_config.borrow_and_update().clone(),
                ResourceType::EndpointLoads => self.endpoint_loads.borrow_and_update().clone(),
            };
            let Some(latest) = latest else {
                continue;
            };
            if !is_due(self.status.resource(resource), &latest.version) {
                continue;
            }
            self.next_nonce += 1;
            let nonce = self.next_nonce.to_string();
            let (encoded, incremental) =
                latest.encoded_for(self.status.resource(resource).acked_version.as_deref());
            let response = EncodedResponse::new(encoded.clone(), nonce.clone());
            match tokio::time::timeout(
                self.settings.send_timeout,
                self.responses.send(Ok(response)),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(StreamEnd::ResponseStreamDropped),
                Err(_) => {
                    self.metrics
                        .send_timeouts
                        .with_label_values(&[resource.label()])
                        .inc();
                    return Err(StreamEnd::SendTimeout(resource));
                }
            }
            let sync = self.status.resource_mut(resource);
            sync.sent_version = Some(latest.version.clone());
            sync.pending_nonce = Some(nonce);
            sync.responses_sent += 1;
            self.metrics
                .pushes
                .with_label_values(&[resource.label()])
                .inc();
            if incremental {
                self.metrics
                    .incremental_pushes
                    .with_label_values(&[resource.label()])
                    .inc();
            }
            self.entry.update(&self.status);
            tracing::debug!(
                stream_id = self.status.stream_id,
                node_id = self.status.node_id.as_deref().unwrap_or_default(),
                r#type = resource.label(),
                version = %latest.version,
                incremental,
                "sent snapshot"
            );
        }
        Ok(())
    }

    /// Hands a dataplane's unknown JWT key ids (bounded: they come from
    /// client tokens) to the JWKS refresher; dropped when it is busy.
    fn forward_key_hint(&self, key_ids: &[String]) {
        let Some(hints) = &self.key_hints else {
            return;
        };
        let key_ids: Vec<String> = key_ids
            .iter()
            .take(MAX_UNKNOWN_KEY_IDS)
            .map(|kid| bounded_key_id(kid).to_owned())
            .collect();
        tracing::debug!(
            stream_id = self.status.stream_id,
            node_id = self.status.node_id.as_deref().unwrap_or_default(),
            ?key_ids,
            "dataplane saw JWTs signed by unknown keys"
        );
        let _ = hints.try_send(key_ids);
    }

    fn handle_request(&mut self, request: pb::SnapshotRequest) {
        self.requests_seen += 1;
        if self.requests_seen == 1 {
            if let Some(node) = request.node.as_ref() {
                self.status.node_id = Some(node.id.clone());
                self.status.build_version = Some(node.build_version.clone());
            }
            tracing::info!(
                stream_id = self.status.stream_id,
                node_id = self.status.node_id.as_deref().unwrap_or_default(),
                build_version = self.status.build_version.as_deref().unwrap_or_default(),
                peer = self.status.peer.as_deref().unwrap_or_default(),
                "dataplane connected"
            );
        }
        if !request.unknown_jwt_key_ids.is_empty() {
            self.forward_key_hint(&request.unknown_jwt_key_ids);
        }
        if let Some(report) = &request.outlier_report {
            let node_id = self.status.node_id.as_deref().unwrap_or_default();
            self.ejections.report(node_id, report, unix_ms_now());
        }
        if let Some(report) = &request.fairness_usage {
            let node_id = self.status.node_id.as_deref().unwrap_or_default();
            self.fairness.report(node_id, report);
        }
        if request.type_url.is_empty() && request.response_nonce.is_empty() {
            // A hint or a report only, not an ACK or NACK.
            return;
        }
        let Some(resource) = ResourceType::from_type_url(&request.type_url) else {
            tracing::warn!(
                stream_id = self.status.stream_id,
                node_id = self.status.node_id.as_deref().unwrap_or_default(),
                type_url = %request.type_url,
                "ignoring a request for an unknown type"
            );
            return;
        };
        let stream_id = self.status.stream_id;
        let node_id = self.status.node_id.clone().unwrap_or_default();
        let sync = self.status.resource_mut(resource);
        if !sync.subscribed {
            sync.subscribed = true;
            if !request.version_info.is_empty() {
                // The dataplane already applied this version (kept across a reconnect).
                sync.acked_version = Some(request.version_info);
            }
            self.entry.update(&self.status);
            return;
        }
        if sync.pending_nonce.as_deref() != Some(request.response_nonce.as_str()) {
            tracing::debug!(
                stream_id,
                node_id,
                r#type = resource.label(),
                nonce = %request.response_nonce,
                "ignoring a request with a stale nonce"
            );
            return;
        }
        sync.pending_nonce = None;
        // The nonce identifies what is answered; trust it over the request's version_info.
        let answered_version = sync.sent_version.clone();
        let mut acked = false;
        match request.error_detail {
            Some(error) => {
                let nack = Nack::from_error_detail(error);
                if nack.reason == pb::NackReason::UnknownBaseVersion {
                    // An update the dataplane cannot apply, not a bad version:
                    // forget what it holds, so the whole set of this version
                    // is due at once (and an update cannot be sent again).
                    sync.acked_version = None;
                } else {
                    sync.nacked_version = answered_version.clone();
                }
                sync.last_nack_error = Some(nack.message.clone());
                sync.last_nack_reason = Some(nack.reason.as_str_name().to_owned());
                sync.nacks += 1;
                self.metrics
                    .nacks
                    .with_label_values(&[resource.label()])
                    .inc();
                tracing::warn!(
                    stream_id,
                    node_id,
                    r#type = resource.label(),
                    version = answered_version.as_deref().unwrap_or_default(),
                    applied_version = %request.version_info,
                    reason = nack.reason.as_str_name(),
                    error = %nack.message,
                    "dataplane rejected a snapshot (NACK)"
                );
            }
            None => {
                sync.acked_version = answered_version;
                sync.acks += 1;
                self.metrics
                    .acks
                    .with_label_values(&[resource.label()])
                    .inc();
                tracing::debug!(
                    stream_id,
                    node_id,
                    r#type = resource.label(),
                    version = sync.acked_version.as_deref().unwrap_or_default(),
                    "dataplane applied a snapshot (ACK)"
                );
                acked = true;
            }
        }
        self.entry.update(&self.status);
        if acked {
            let latest = match resource {
                ResourceType::RouteConfig => self.route_config.borrow().clone(),
                ResourceType::EndpointLoads => self.endpoint_loads.borrow().clone(),
            };
            if let Some(latest) = latest {
                self.metrics.record_ack(
                    resource,
                    &latest,
                    &self.entry.registry().list(),
                    unix_ms_now(),
                );
            }
        }
    }

    fn log_end(&self, end: StreamEnd) {
        let stream_id = self.status.stream_id;
        let node_id = self.status.node_id.as_deref().unwrap_or_default();
        match end {
            StreamEnd::ClientClosed | StreamEnd::ResponseStreamDropped => {
                tracing::info!(stream_id, node_id, "dataplane disconnected");
            }
            StreamEnd::ClientError(status) => {
                tracing::info!(stream_id, node_id, error = %status, "dataplane stream failed");
            }
            StreamEnd::SendTimeout(resource) => tracing::warn!(
                stream_id,
                node_id,
                r#type = resource.label(),
                timeout = ?self.settings.send_timeout,
                "dataplane did not read a snapshot in time; closing its stream"
            ),
            StreamEnd::ServerClosing => {
                tracing::debug!(stream_id, node_id, "closing stream: server shutting down");
            }
        }
    }
}

/// Whether the latest version of a type should go out now: the dataplane asked
/// for the type, nothing is awaiting its answer (one un-ACKed response per
/// type, so a slow dataplane skips intermediate versions), and it neither has
/// nor rejected that version.
fn is_due(sync: &TypeSyncStatus, latest_version: &str) -> bool {
    sync.subscribed
        && sync.pending_nonce.is_none()
        && sync.acked_version.as_deref() != Some(latest_version)
        && sync.nacked_version.as_deref() != Some(latest_version)
}
