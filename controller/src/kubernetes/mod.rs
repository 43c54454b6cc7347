//! Kubernetes mode: an object source of reflectors over ModelRoutes,
//! ModelServers and Pods (and the Gateway API kinds in Gateway API mode, and
//! the API-key Secrets of the controller's namespace); the elected leader
//! writes status conditions and Events (and creates Gateway API mode's
//! default GatewayClass and Gateway when absent), and every replica reports
//! its dataplanes' ACKs for the leader to count.
//!
//! The source's first object set is the caches' content once every one of
//! them has listed the cluster (see [`crate::core`] for why that matters).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::Client;
use switchyard_runtime::{CancellationToken, TaskSet, clock};
use tokio::sync::watch;

use switchyard_crd::gateway_api::GatewayStatusAddress;

use crate::cli::Args;
use crate::compile::gateway_api::{GatewayDefaults, status_addresses};
use crate::compile::{Compiled, GatewayApiConfig, ObjectSet};
use crate::core::{OBJECT_CHANGE_DEBOUNCE, ObjectSource, Serving, SourceStarted};
use crate::error::{ControllerError, KubernetesError};
use crate::scrape::PodLoads;
use crate::status::{self, AckSummary, DataplaneReport};
use crate::xds::{DataplaneRegistry, SnapshotPublisher};

pub mod caches;
pub mod dataplane_reports;
pub mod gateway_defaults;
pub mod leader;
pub mod pod_selector;
pub mod status_writer;

pub use self::caches::{Caches, Scope};
use dataplane_reports::{PEER_REPORTS_POLL_INTERVAL, PeerReports, REPORT_TTL};
use pod_selector::PodWatch;
use status_writer::{PlanInput, StatusWriter};

/// Status is written this long after its inputs changed, so a compile and the
/// ACKs that follow it within a moment are written as one patch per object.
pub const STATUS_DEBOUNCE: Duration = Duration::from_millis(250);
/// Status is re-checked at least this often without a trigger: retries failed
/// patches and refreshes `lastScrapeTime`.
pub const STATUS_RESYNC_INTERVAL: Duration = Duration::from_secs(10);

/// A client with the in-cluster or kubeconfig credentials.
pub async fn client() -> Result<Client, KubernetesError> {
    let config = kube::Config::infer()
        .await
        .map_err(KubernetesError::NoCredentials)?;
    Client::try_from(config).map_err(KubernetesError::Client)
}

/// Kubernetes mode's object source.
#[derive(Clone)]
pub struct KubernetesSource {
    client: Client,
    scope: Scope,
    lease_namespace: String,
    lease_name: String,
    gateway_api: GatewayApiConfig,
    gateway_defaults: Option<GatewayDefaults>,
    gateway_addresses: Vec<GatewayStatusAddress>,
}

impl KubernetesSource {
    /// Watches what `--namespaces` selects (and the Gateway API kinds the
    /// flags enable); takes part in the `--lease-name` election.
    pub fn new(args: &Args, client: Client) -> Result<Self, ControllerError> {
        Ok(Self {
            client,
            scope: Scope::from_namespaces(&args.namespaces),
            lease_namespace: args.lease_namespace.clone(),
            lease_name: args.lease_name.clone(),
            gateway_api: args.gateway_api().map_err(ControllerError::InvalidFlag)?,
            gateway_defaults: args
                .gateway_defaults()
                .map_err(ControllerError::InvalidFlag)?,
            gateway_addresses: status_addresses(&args.gateway_addresses),
        })
    }
}

impl ObjectSource for KubernetesSource {
    /// Lists and watches the cluster and returns once every cache has synced.
    async fn start(self, tasks: &mut TaskSet) -> Result<SourceStarted, ControllerError> {
        tracing::info!(scope = ?self.scope, "starting the Kubernetes watches");
        let reflectors = caches::start(
            &self.client,
            &self.scope,
            &self.gateway_api,
            &self.lease_namespace,
            tasks,
        )
        .await;
        let mut caches = reflectors.caches.clone();
        caches.wait_synced().await;
        tracing::info!("Kubernetes caches synced");
        let (objects_sender, objects) = watch::channel(object_set(&caches, &reflectors.pod_watch));
        tasks.spawn(
            "Kubernetes object feed",
            feed_objects(reflectors, objects_sender),
        );
        Ok(SourceStarted {
            objects,
            on_serving: Box::new(move |core: &Serving, tasks: &mut TaskSet| {
                self.start_duties(caches, core, tasks);
            }),
        })
    }
}

impl KubernetesSource {
    /// The election, this replica's dataplane report and the status writer.
    fn start_duties(self, caches: Caches, core: &Serving, tasks: &mut TaskSet) {
        let Self {
            client,
            lease_namespace,
            lease_name,
            gateway_api,
            gateway_defaults,
            gateway_addresses,
            ..
        } = self;
        let identity = core.controller_id.clone();
        let (leading_sender, leading) = watch::channel(false);
        let settings = leader::LeaseSettings {
            namespace: lease_namespace.clone(),
            name: lease_name,
            identity: identity.clone(),
        };
        tasks.spawn_graceful("leader election", |stop| {
            leader::run(client.clone(), settings, leading_sender, stop)
        });
        // Deletes the report on stop (bounded by its own timeout).
        tasks.spawn_graceful("dataplane report", |stop| {
            dataplane_reports::publish(
                client.clone(),
                lease_namespace.clone(),
                identity.clone(),
                core.dataplanes.clone(),
                stop,
            )
        });
        let status = StatusLoop {
            peers: PeerReports::new(client.clone(), &lease_namespace, identity.clone()),
            identity: identity.clone(),
            client: client.clone(),
            gateway_controller_name: gateway_api.controller_name,
            gateway_defaults,
            gateway_addresses,
            writer: StatusWriter::new(client, identity.clone(), core.metrics.clone()),
            leader_gauge: core.metrics.leader.clone(),
            leading,
            compiled: core.compiled.clone(),
            caches,
            publisher: core.publisher.clone(),
            dataplanes: core.dataplanes.clone(),
            pod_loads: core.pod_loads.clone(),
        };
        tasks.spawn_graceful("status writer", |stop| status.run(stop));
        tracing::info!(controller_id = %identity, "controller started in Kubernetes mode");
    }
}

/// Keeps the compile loop's objects current: a consistent copy of the caches
/// after each debounced burst of watch events. Ends when every watch stopped
/// or the loop is gone.
async fn feed_objects(reflectors: caches::Reflectors, objects: watch::Sender<Arc<ObjectSet>>) {
    let caches = &reflectors.caches;
    let mut changes = caches.changes.clone();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = objects.closed() => return,
        }
        let mut burst = OBJECT_CHANGE_DEBOUNCE.begin();
        loop {
            tokio::select! {
                () = burst.settled() => break,
                changed = changes.changed() => match changed {
                    Ok(()) => burst.changed(),
                    Err(_) => break,
                },
            }
        }
        objects.send_replace(object_set(caches, &reflectors.pod_watch));
    }
}

/// The caches' objects; on the way, points the pod watch at what the
/// ModelServers and InferencePools select.
fn object_set(caches: &Caches, pod_watch: &watch::Sender<PodWatch>) -> Arc<ObjectSet> {
    let (api_keys, problems) = caches.api_keys();
    let (providers, provider_secrets) = caches.providers();
    let objects = ObjectSet {
        providers,
        provider_secrets,
        api_keys,
        problems,
        ..caches.snapshot()
    };
    pod_watch.send_if_modified(|current| {
        replace_if_changed(
            current,
            pod_selector::pod_watch(&objects.servers, &objects.inference_pools),
        )
    });
    Arc::new(objects)
}

fn replace_if_changed<T: PartialEq>(current: &mut T, new: T) -> bool {
    if *current == new {
        return false;
    }
    *current = new;
    true
}

/// Writes status while this replica leads.
struct StatusLoop {
    /// The other replicas' dataplanes, merged into `Programmed`.
    peers: PeerReports,
    identity: String,
    client: Client,
    /// Switchyard's `controllerName`, on its HTTPRoute status entries.
    gateway_controller_name: String,
    /// Created when absent while this replica leads (Gateway API mode).
    gateway_defaults: Option<GatewayDefaults>,
    gateway_addresses: Vec<GatewayStatusAddress>,
    writer: StatusWriter,
    leader_gauge: prometheus::IntGauge,
    leading: watch::Receiver<bool>,
    compiled: watch::Receiver<Arc<Compiled>>,
    caches: Caches,
    publisher: Arc<SnapshotPublisher>,
    dataplanes: DataplaneRegistry,
    pod_loads: watch::Receiver<PodLoads>,
}

impl StatusLoop {
    async fn run(mut self, stop: CancellationToken) {
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        let mut leader_alive = true;
        let mut compile_alive = true;
        loop {
            let acks = self.own_acks();
            let version = acks.version.clone();
            let leading = *self.leading.borrow();
            tokio::select! {
                () = &mut stopped => return,
                changed = self.leading.changed(), if leader_alive => {
                    if changed.is_err() {
                        leader_alive = false;
                    }
                }
                changed = self.compiled.changed(), if compile_alive => {
                    if changed.is_err() {
                        compile_alive = false;
                    }
                }
                () = self.dataplanes.wait_until(|list| AckSummary::from_dataplanes(version.as_deref(), list) != acks) => {}
                () = clock::sleep(STATUS_RESYNC_INTERVAL) => {}
                // The other replicas' dataplanes change without telling this one.
                () = clock::sleep(PEER_REPORTS_POLL_INTERVAL), if leading => {}
            }
            tokio::select! {
                () = &mut stopped => return,
                () = clock::sleep(STATUS_DEBOUNCE) => {}
            }
            let leading = *self.leading.borrow_and_update();
            self.leader_gauge.set(i64::from(leading));
            if !leading {
                self.writer.forget();
                continue;
            }
            if let Some(defaults) = &self.gateway_defaults {
                tokio::select! {
                    () = &mut stopped => return,
                    () = gateway_defaults::ensure(&self.client, &self.caches, defaults) => {}
                }
            }
            let compiled = self.compiled.borrow_and_update().clone();
            let observed: BTreeMap<String, i64> = self
                .pod_loads
                .borrow()
                .iter()
                .map(|(pod, load)| (pod.clone(), load.observed_at_unix_ms))
                .collect();
            let last_scrape =
                status::last_scrape_by_server(&compiled.route_config.servers, &observed);
            let acks = tokio::select! {
                () = &mut stopped => return,
                acks = self.acks_across_replicas() => acks,
            };
            let updates = status_writer::plan(&PlanInput {
                reports: &compiled.reports,
                providers: &compiled.provider_reports,
                gateway_api: &compiled.gateway_api,
                controller_name: &self.gateway_controller_name,
                gateway_addresses: &self.gateway_addresses,
                caches: &self.caches,
                acks: &acks,
                last_scrape: &last_scrape,
                now: Timestamp::now(),
            });
            tokio::select! {
                () = &mut stopped => return,
                () = self.writer.sync(updates) => {}
            }
        }
    }

    fn published_version(&self) -> Option<String> {
        self.publisher
            .route_config()
            .map(|published| published.version.clone())
    }

    /// This replica's dataplanes only: what wakes the loop.
    fn own_acks(&self) -> AckSummary {
        AckSummary::from_dataplanes(self.published_version().as_deref(), &self.dataplanes.list())
    }

    /// Every replica's dataplanes: what `Programmed` says.
    async fn acks_across_replicas(&mut self) -> AckSummary {
        let now = clock::unix_ms_now();
        let own = DataplaneReport::from_dataplanes(&self.identity, &self.dataplanes.list(), now);
        let version = self.published_version();
        let others = self.peers.refresh().await;
        AckSummary::across_replicas(version.as_deref(), &own, others, now, REPORT_TTL)
    }
}
