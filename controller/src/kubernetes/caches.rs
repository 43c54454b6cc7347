//! Reflectors: local caches of ModelRoutes, ModelServers and Pods (and in
//! Gateway API mode GatewayClasses, Gateways, HTTPRoutes and InferencePools),
//! kept in sync with the API server by list+watch, one per watched namespace
//! (or one cluster-wide), of the API-key Secrets of the controller's
//! namespace, and of ExternalModelProviders and their credential Secrets
//! (labelled, in the watched namespaces), each bumping a shared change
//! counter on every event.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodStatus, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector::store::Writer};
use kube::{Api, Client, Resource};
use parking_lot::RwLock;
use serde::de::DeserializeOwned;
use switchyard_crd::{
    ExternalModelProvider, Gateway, GatewayClass, HTTPRoute, InferencePool, ModelRoute,
    ModelServer, PROVIDER_CREDENTIAL_LABEL,
};
use switchyard_runtime::TaskSet;
use tokio::sync::watch;

use super::pod_selector::PodWatch;
use crate::auth::{self, ApiKeySecret};
use crate::compile::providers::{credential_secret_of, strip_credential_secret};
use crate::compile::{CredentialSecret, GatewayApiConfig, LoadProblem, ObjectSet};

/// Which namespaces are watched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    All,
    Namespaces(Vec<String>),
}

impl Scope {
    /// `--namespaces`: empty means every namespace.
    pub fn from_namespaces(namespaces: &[String]) -> Self {
        let mut namespaces: Vec<String> = namespaces
            .iter()
            .map(|namespace| namespace.trim().to_owned())
            .filter(|namespace| !namespace.is_empty())
            .collect();
        namespaces.sort();
        namespaces.dedup();
        if namespaces.is_empty() {
            Self::All
        } else {
            Self::Namespaces(namespaces)
        }
    }

    fn apis<K>(&self, client: &Client) -> Vec<Api<K>>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match self {
            Self::All => vec![Api::all(client.clone())],
            Self::Namespaces(namespaces) => namespaces
                .iter()
                .map(|namespace| Api::namespaced(client.clone(), namespace))
                .collect(),
        }
    }
}

/// The cache of one kind in one namespace (or cluster-wide). The store is
/// swapped whole when the watch is restarted with a new selector, once the new
/// one has listed everything, so readers never see a half-filled cache.
#[derive(Clone)]
pub struct Cache<K: Resource<DynamicType = ()> + 'static> {
    store: Arc<RwLock<Store<K>>>,
    synced: watch::Receiver<bool>,
}

impl<K> Cache<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    /// A cache holding `objects`, already synced: for tests and for "watch nothing".
    pub fn seeded(objects: Vec<K>) -> Self {
        let (store, mut writer) = reflector::store();
        seed(&mut writer, objects);
        Self {
            store: Arc::new(RwLock::new(store)),
            synced: watch::channel(true).1,
        }
    }

    /// Every cached object.
    pub fn objects(&self) -> Vec<Arc<K>> {
        self.store.read().state()
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    async fn wait_synced(&mut self) {
        // A dropped sender means the reflector task ended; the caller's task supervision reports it.
        let _ = self.synced.wait_for(|synced| *synced).await;
    }
}

fn seed<K>(writer: &mut Writer<K>, objects: Vec<K>)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    writer.apply_watcher_event(&Event::Init);
    for object in objects {
        writer.apply_watcher_event(&Event::InitApply(object));
    }
    writer.apply_watcher_event(&Event::InitDone);
}

/// Every cache the compile reads, plus the change counter its loop waits on.
#[derive(Clone)]
pub struct Caches {
    pub routes: Vec<Cache<ModelRoute>>,
    pub servers: Vec<Cache<ModelServer>>,
    pub pods: Vec<Cache<Pod>>,
    /// Gateway API mode only (no cache otherwise).
    pub gateway_classes: Vec<Cache<GatewayClass>>,
    pub gateways: Vec<Cache<Gateway>>,
    pub http_routes: Vec<Cache<HTTPRoute>>,
    /// Inference Extension mode only.
    pub inference_pools: Vec<Cache<InferencePool>>,
    /// API-key Secrets, redacted ([`auth::redact_api_key_secret`]).
    pub secrets: Vec<Cache<Secret>>,
    pub providers: Vec<Cache<ExternalModelProvider>>,
    /// Provider credential Secrets, stripped to their data ([`strip_credential_secret`]).
    pub credential_secrets: Vec<Cache<Secret>>,
    /// Bumped on every watch event of any kind.
    pub changes: watch::Receiver<u64>,
}

impl Caches {
    /// Caches holding fixed objects, already synced (reflector stores seeded by hand).
    pub fn seeded(routes: Vec<ModelRoute>, servers: Vec<ModelServer>, pods: Vec<Pod>) -> Self {
        Self::seeded_with(ObjectSet {
            routes,
            servers,
            pods,
            ..ObjectSet::default()
        })
    }

    /// Caches holding every object of `objects`, already synced.
    pub fn seeded_with(objects: ObjectSet) -> Self {
        Self {
            routes: vec![Cache::seeded(objects.routes)],
            servers: vec![Cache::seeded(objects.servers)],
            pods: vec![Cache::seeded(objects.pods)],
            gateway_classes: vec![Cache::seeded(objects.gateway_classes)],
            gateways: vec![Cache::seeded(objects.gateways)],
            http_routes: vec![Cache::seeded(objects.http_routes)],
            inference_pools: vec![Cache::seeded(objects.inference_pools)],
            secrets: vec![Cache::seeded(Vec::new())],
            providers: vec![Cache::seeded(Vec::new())],
            credential_secrets: vec![Cache::seeded(Vec::new())],
            changes: watch::channel(0).1,
        }
    }

    /// The providers and their credential Secrets' data, in canonical order.
    pub fn providers(&self) -> (Vec<ExternalModelProvider>, Vec<CredentialSecret>) {
        let secrets = collect(&self.credential_secrets)
            .iter()
            // The watch selects by label; a fake or proxy that ignores the selector must not widen it.
            .filter_map(|secret| credential_secret_of(secret, crate::compile::DEFAULT_NAMESPACE))
            .collect();
        (collect(&self.providers), secrets)
    }

    pub fn find_provider(&self, namespace: &str, name: &str) -> Option<Arc<ExternalModelProvider>> {
        find(&self.providers, namespace, name)
    }

    /// The API keys of the cached Secrets, and the problems of those that
    /// cannot be used (named, never quoted).
    pub fn api_keys(&self) -> (Vec<ApiKeySecret>, Vec<LoadProblem>) {
        let mut keys = Vec::new();
        let mut problems = Vec::new();
        for secret in collect(&self.secrets) {
            // The watch selects by label; a fake or proxy that ignores the selector must not widen it.
            if !auth::is_api_key_secret(&secret) {
                continue;
            }
            match auth::api_key_of(&secret, crate::compile::DEFAULT_NAMESPACE) {
                Ok(key) => keys.push(key),
                Err(error) => problems.push(LoadProblem {
                    file: secret.metadata.namespace.clone().unwrap_or_default(),
                    document_index: None,
                    kind: Some("Secret".to_owned()),
                    name: secret.metadata.name.clone(),
                    error,
                }),
            }
        }
        (keys, problems)
    }

    /// Owned copies of every object, in a canonical order (namespace, name) so
    /// equal cluster states compile to equal snapshots on every replica.
    pub fn snapshot(&self) -> ObjectSet {
        ObjectSet {
            routes: collect(&self.routes),
            servers: collect(&self.servers),
            pods: collect(&self.pods),
            gateway_classes: collect(&self.gateway_classes),
            gateways: collect(&self.gateways),
            http_routes: collect(&self.http_routes),
            inference_pools: collect(&self.inference_pools),
            ..ObjectSet::default()
        }
    }

    pub fn find_route(&self, namespace: &str, name: &str) -> Option<Arc<ModelRoute>> {
        find(&self.routes, namespace, name)
    }

    pub fn find_server(&self, namespace: &str, name: &str) -> Option<Arc<ModelServer>> {
        find(&self.servers, namespace, name)
    }

    pub fn find_gateway_class(&self, name: &str) -> Option<Arc<GatewayClass>> {
        let key = reflector::ObjectRef::new(name);
        self.gateway_classes
            .iter()
            .find_map(|cache| cache.store.read().get(&key))
    }

    pub fn find_gateway(&self, namespace: &str, name: &str) -> Option<Arc<Gateway>> {
        find(&self.gateways, namespace, name)
    }

    pub fn find_http_route(&self, namespace: &str, name: &str) -> Option<Arc<HTTPRoute>> {
        find(&self.http_routes, namespace, name)
    }

    pub fn find_inference_pool(&self, namespace: &str, name: &str) -> Option<Arc<InferencePool>> {
        find(&self.inference_pools, namespace, name)
    }

    /// Whether every cache has completed its initial list.
    pub fn is_synced(&self) -> bool {
        self.synced_flags().iter().all(|synced| *synced.borrow())
    }

    pub async fn wait_synced(&mut self) {
        let flags: Vec<watch::Receiver<bool>> = self.synced_flags().into_iter().cloned().collect();
        for mut synced in flags {
            // A dropped sender means the reflector task ended; the caller's task supervision reports it.
            let _ = synced.wait_for(|synced| *synced).await;
        }
    }

    /// The "initial list done" flag of every cache of every kind.
    fn synced_flags(&self) -> Vec<&watch::Receiver<bool>> {
        fn of<K: Resource<DynamicType = ()>>(
            caches: &[Cache<K>],
        ) -> impl Iterator<Item = &watch::Receiver<bool>> {
            caches.iter().map(|cache| &cache.synced)
        }
        of(&self.routes)
            .chain(of(&self.servers))
            .chain(of(&self.pods))
            .chain(of(&self.gateway_classes))
            .chain(of(&self.gateways))
            .chain(of(&self.http_routes))
            .chain(of(&self.inference_pools))
            .chain(of(&self.secrets))
            .chain(of(&self.providers))
            .chain(of(&self.credential_secrets))
            .collect()
    }
}

fn collect<K>(caches: &[Cache<K>]) -> Vec<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let mut objects: Vec<Arc<K>> = caches.iter().flat_map(Cache::objects).collect();
    objects.sort_by(|a, b| {
        (a.meta().namespace.as_deref(), a.meta().name.as_deref())
            .cmp(&(b.meta().namespace.as_deref(), b.meta().name.as_deref()))
    });
    objects
        .into_iter()
        .map(|object| (*object).clone())
        .collect()
}

fn find<K>(caches: &[Cache<K>], namespace: &str, name: &str) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let key = reflector::ObjectRef::new(name).within(namespace);
    caches.iter().find_map(|cache| cache.store.read().get(&key))
}

/// The running reflector tasks of [`Caches`].
pub struct Reflectors {
    pub caches: Caches,
    /// Where the compile loop sends the pod watch derived from the ModelServers.
    pub pod_watch: watch::Sender<PodWatch>,
    _fixed_selection: watch::Sender<PodWatch>,
    _api_key_selection: watch::Sender<PodWatch>,
    _credential_selection: watch::Sender<PodWatch>,
}

/// Starts the ModelRoute and ModelServer reflectors of `scope` on `tasks`
/// (and those of the Gateway API kinds `gateway_api` enables), waits for the
/// ModelServers and InferencePools to sync, derives the pod watch from them,
/// then starts the Pod reflectors, and the reflector of the API-key Secrets
/// of `api_key_namespace`. Returns once the tasks are started (not synced:
/// see [`Caches::wait_synced`]).
pub async fn start(
    client: &Client,
    scope: &Scope,
    gateway_api: &GatewayApiConfig,
    api_key_namespace: &str,
    tasks: &mut TaskSet,
) -> Reflectors {
    let (changes_sender, changes) = watch::channel(0_u64);
    let changes_sender = Arc::new(changes_sender);
    // Routes and servers are watched whole; this sender never changes and lives in `Reflectors`.
    let (fixed_selection, fixed) = watch::channel(PodWatch::All);

    let mut routes = Vec::new();
    for api in scope.apis::<ModelRoute>(client) {
        let (cache, task) = cache_and_reflector(api, fixed.clone(), changes_sender.clone(), keep);
        routes.push(cache);
        tasks.spawn("ModelRoute watch", task);
    }
    let mut servers = Vec::new();
    for api in scope.apis::<ModelServer>(client) {
        let (cache, task) = cache_and_reflector(api, fixed.clone(), changes_sender.clone(), keep);
        servers.push(cache);
        tasks.spawn("ModelServer watch", task);
    }
    let mut gateway_classes = Vec::new();
    let mut gateways = Vec::new();
    let mut http_routes = Vec::new();
    if gateway_api.enabled {
        // GatewayClasses are cluster-scoped: one watch whatever the scope.
        let (cache, task) = cache_and_reflector(
            Api::<GatewayClass>::all(client.clone()),
            fixed.clone(),
            changes_sender.clone(),
            keep,
        );
        gateway_classes.push(cache);
        tasks.spawn("GatewayClass watch", task);
        for api in scope.apis::<Gateway>(client) {
            let (cache, task) =
                cache_and_reflector(api, fixed.clone(), changes_sender.clone(), keep);
            gateways.push(cache);
            tasks.spawn("Gateway watch", task);
        }
        for api in scope.apis::<HTTPRoute>(client) {
            let (cache, task) =
                cache_and_reflector(api, fixed.clone(), changes_sender.clone(), keep);
            http_routes.push(cache);
            tasks.spawn("HTTPRoute watch", task);
        }
    }
    let mut inference_pools = Vec::new();
    if gateway_api.inference_extension {
        for api in scope.apis::<InferencePool>(client) {
            let (cache, task) =
                cache_and_reflector(api, fixed.clone(), changes_sender.clone(), keep);
            inference_pools.push(cache);
            tasks.spawn("InferencePool watch", task);
        }
    }
    for cache in &mut servers {
        cache.wait_synced().await;
    }
    for cache in &mut inference_pools {
        cache.wait_synced().await;
    }
    let initial_watch =
        super::pod_selector::pod_watch(&collect(&servers), &collect(&inference_pools));
    tracing::info!(pod_watch = ?initial_watch, "watching pods");
    let (pod_watch, pod_watch_receiver) = watch::channel(initial_watch);
    let mut pods = Vec::new();
    for api in scope.apis::<Pod>(client) {
        let (cache, task) = cache_and_reflector(
            api,
            pod_watch_receiver.clone(),
            changes_sender.clone(),
            strip_pod,
        );
        pods.push(cache);
        tasks.spawn("Pod watch", task);
    }
    // Only labelled Secrets, and only of the controller's own namespace.
    let (api_key_selection, api_key_watch) =
        watch::channel(PodWatch::Labels(format!("{}=true", auth::API_KEY_LABEL)));
    let (secrets, task) = cache_and_reflector(
        Api::<Secret>::namespaced(client.clone(), api_key_namespace),
        api_key_watch,
        changes_sender.clone(),
        auth::redact_api_key_secret,
    );
    tasks.spawn("API key Secret watch", task);
    let mut providers = Vec::new();
    for api in scope.apis::<ExternalModelProvider>(client) {
        let (cache, task) = cache_and_reflector(api, fixed.clone(), changes_sender.clone(), keep);
        providers.push(cache);
        tasks.spawn("ExternalModelProvider watch", task);
    }
    // Only Secrets labelled as provider credentials, in the watched namespaces.
    let (credential_selection, credential_watch) = watch::channel(PodWatch::Labels(format!(
        "{PROVIDER_CREDENTIAL_LABEL}=true"
    )));
    let mut credential_secrets = Vec::new();
    for api in scope.apis::<Secret>(client) {
        let (cache, task) = cache_and_reflector(
            api,
            credential_watch.clone(),
            changes_sender.clone(),
            strip_credential_secret,
        );
        credential_secrets.push(cache);
        tasks.spawn("provider credential Secret watch", task);
    }
    Reflectors {
        caches: Caches {
            routes,
            servers,
            pods,
            gateway_classes,
            gateways,
            http_routes,
            inference_pools,
            secrets: vec![secrets],
            providers,
            credential_secrets,
            changes,
        },
        pod_watch,
        _fixed_selection: fixed_selection,
        _api_key_selection: api_key_selection,
        _credential_selection: credential_selection,
    }
}

fn keep<K>(_: &mut K) {}

/// Keeps only what compile reads of a pod (labels, deletion, IP, phase,
/// conditions): a pod's spec and managed fields are most of its size.
fn strip_pod(pod: &mut Pod) {
    let metadata = std::mem::take(&mut pod.metadata);
    pod.metadata = ObjectMeta {
        name: metadata.name,
        namespace: metadata.namespace,
        labels: metadata.labels,
        deletion_timestamp: metadata.deletion_timestamp,
        resource_version: metadata.resource_version,
        uid: metadata.uid,
        ..ObjectMeta::default()
    };
    pod.spec = None;
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        conditions: status.conditions,
        ..PodStatus::default()
    });
}

/// The cache of `api` and the task that fills it.
fn cache_and_reflector<K>(
    api: Api<K>,
    selection: watch::Receiver<PodWatch>,
    changes: Arc<watch::Sender<u64>>,
    modify: fn(&mut K),
) -> (Cache<K>, impl Future<Output = ()> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (empty, _) = reflector::store::<K>();
    let store = Arc::new(RwLock::new(empty));
    let (synced_sender, synced) = watch::channel(false);
    let cache = Cache {
        store: store.clone(),
        synced,
    };
    let task = run_reflector(api, selection, store, synced_sender, changes, modify);
    (cache, task)
}

/// Lists and watches `api` with the current selection; when the selection
/// changes, starts over with the new one and swaps the store in once listed.
async fn run_reflector<K>(
    api: Api<K>,
    mut selection: watch::Receiver<PodWatch>,
    current: Arc<RwLock<Store<K>>>,
    synced: watch::Sender<bool>,
    changes: Arc<watch::Sender<u64>>,
    modify: fn(&mut K),
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let bump = || changes.send_modify(|count| *count = count.wrapping_add(1));
    let kind = K::kind(&());
    loop {
        let watching = selection.borrow_and_update().clone();
        let config = match &watching {
            PodWatch::Nothing => {
                *current.write() = Cache::<K>::seeded(Vec::new()).store.read().clone();
                synced.send_replace(true);
                bump();
                if selection.changed().await.is_err() {
                    return;
                }
                continue;
            }
            PodWatch::All => watcher::Config::default(),
            PodWatch::Labels(selector) => watcher::Config::default().labels(selector),
        };
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(
            writer,
            watcher::watcher(api.clone(), config)
                .default_backoff()
                .modify(modify),
        );
        futures::pin_mut!(stream);
        let mut swapped = false;
        let mut selection_open = true;
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(event)) => {
                        if !swapped && matches!(event, Event::InitDone) {
                            *current.write() = store.clone();
                            swapped = true;
                            synced.send_replace(true);
                            tracing::debug!(kind = %kind, objects = store.len(), "cache synced");
                        }
                        if swapped {
                            bump();
                        }
                    }
                    Some(Err(error)) => {
                        // The backoff retries; the cache keeps serving what it has.
                        tracing::warn!(kind = %kind, %error, "watch failed; retrying");
                    }
                    None => return,
                },
                changed = selection.changed(), if selection_open => {
                    if changed.is_err() {
                        // Shutting down: keep the current watch until the task is dropped.
                        selection_open = false;
                        continue;
                    }
                    if *selection.borrow() != watching {
                        tracing::info!(kind = %kind, selection = ?*selection.borrow(), "restarting the watch with a new selector");
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use switchyard_crd::test_builders::ready_pod;

    use super::*;

    fn route(namespace: &str, name: &str) -> ModelRoute {
        serde_yaml::from_str(&format!(
            "metadata: {{ name: {name}, namespace: {namespace} }}\nspec:\n  modelName: {name}\n  rules: []\n"
        ))
        .expect("test route parses")
    }

    #[test]
    fn seeded_stores_give_a_canonical_snapshot_and_lookups() {
        let caches = Caches::seeded(
            vec![route("b", "z"), route("a", "y"), route("b", "a")],
            Vec::new(),
            Vec::new(),
        );
        assert!(caches.is_synced());
        let ObjectSet {
            routes,
            servers,
            pods,
            ..
        } = caches.snapshot();
        let keys: Vec<_> = routes
            .iter()
            .map(|route| {
                (
                    route.metadata.namespace.clone().unwrap_or_default(),
                    route.metadata.name.clone().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            keys,
            [
                ("a".to_owned(), "y".to_owned()),
                ("b".to_owned(), "a".to_owned()),
                ("b".to_owned(), "z".to_owned())
            ]
        );
        assert!(servers.is_empty() && pods.is_empty());
        assert!(caches.find_route("b", "z").is_some());
        assert!(caches.find_route("a", "z").is_none());
    }

    #[test]
    fn pods_keep_only_what_routing_reads() {
        let mut pod = ready_pod("ns", "p", "10.0.0.1", &[("app", "llama")]);
        pod.metadata.annotations = Some([("big".to_owned(), "x".repeat(1000))].into());
        pod.spec = Some(PodSpec {
            containers: vec![Container {
                name: "engine".to_owned(),
                ..Container::default()
            }],
            ..PodSpec::default()
        });
        let status = pod.status.as_mut().expect("a ready pod has a status");
        status.host_ip = Some("192.0.2.1".to_owned());
        strip_pod(&mut pod);
        assert_eq!(pod.spec, None);
        assert_eq!(pod.metadata.annotations, None);
        assert_eq!(
            pod.metadata.labels.as_ref().map(|labels| labels.len()),
            Some(1)
        );
        let status = pod.status.expect("status kept");
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.host_ip, None);
        assert_eq!(
            status.conditions.map(|conditions| conditions.len()),
            Some(1)
        );
    }

    #[test]
    fn namespaces_flag_becomes_a_scope() {
        assert_eq!(Scope::from_namespaces(&[]), Scope::All);
        assert_eq!(Scope::from_namespaces(&[" ".to_owned()]), Scope::All);
        assert_eq!(
            Scope::from_namespaces(&["b".to_owned(), "a".to_owned(), "b".to_owned()]),
            Scope::Namespaces(vec!["a".to_owned(), "b".to_owned()])
        );
    }
}
