//! Gateway API mode's starting objects in a cluster: the leader creates
//! Switchyard's GatewayClass and the default Gateway when they do not exist
//! (as the Kthena router does), and never touches them once they do, so
//! users may edit them.

use kube::api::PostParams;
use kube::{Api, Client};
use switchyard_crd::{Gateway, GatewayClass};

use super::caches::Caches;
use crate::compile::gateway_api::defaults::GatewayDefaults;

/// Creates whichever of `defaults` the caches do not hold. A creation that
/// fails (say the namespace does not exist yet) is logged and retried on
/// the next call; one that finds the object already created is done.
pub async fn ensure(client: &Client, caches: &Caches, defaults: &GatewayDefaults) {
    let class_name = defaults.class.metadata.name.as_deref().unwrap_or_default();
    if caches.find_gateway_class(class_name).is_none() {
        let created = Api::<GatewayClass>::all(client.clone())
            .create(&PostParams::default(), &defaults.class)
            .await;
        log_outcome("GatewayClass", class_name, created.map(|_| ()));
    }
    let namespace = defaults
        .gateway
        .metadata
        .namespace
        .as_deref()
        .unwrap_or_default();
    let name = defaults
        .gateway
        .metadata
        .name
        .as_deref()
        .unwrap_or_default();
    if caches.find_gateway(namespace, name).is_none() {
        let created = Api::<Gateway>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &defaults.gateway)
            .await;
        log_outcome(
            "Gateway",
            &format!("{namespace}/{name}"),
            created.map(|_| ()),
        );
    }
}

fn log_outcome(kind: &str, name: &str, outcome: Result<(), kube::Error>) {
    match outcome {
        Ok(()) => tracing::info!(kind, name, "created Gateway API mode's default object"),
        // Created meanwhile (another replica, a user): the watch brings it.
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => {
            tracing::warn!(kind, name, %error, "cannot create Gateway API mode's default object; retrying later");
        }
    }
}
