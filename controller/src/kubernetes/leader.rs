//! Lease-based leader election: exactly one replica writes status and Events;
//! every replica watches, compiles and serves dataplanes regardless, so a
//! failover never interrupts a stream.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use switchyard_runtime::{CancellationToken, clock};
use tokio::sync::watch;

/// How long a lease stays valid without renewal: a crashed leader's status
/// duties move to another replica within this (client-go's default is 15 s).
pub const LEASE_DURATION_SECONDS: u64 = 15;
/// The holder renews this long before expiry, leaving room for a slow API call.
pub const LEASE_GRACE_SECONDS: u64 = 5;
/// Wait before retrying when the Lease cannot be read or created (RBAC, API down).
pub const LEASE_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// How long shutdown waits for the lease to be released, so the next leader
/// takes over at once instead of after the lease expires.
pub const LEASE_RELEASE_TIMEOUT: Duration = Duration::from_secs(3);

/// Where and as whom to take part in the election.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// Unique per replica: the pod name.
    pub identity: String,
}

/// Takes part in the election until `stop`, sending on `leading` whether this
/// replica leads right now; then releases the lease (within
/// [`LEASE_RELEASE_TIMEOUT`]) so the next leader takes over at once.
pub async fn run(
    client: Client,
    settings: LeaseSettings,
    leading: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let manager = loop {
        let built = tokio::select! {
            built = build(client.clone(), &settings) => built,
            () = stop.cancelled() => return,
        };
        match built {
            Ok(manager) => break manager,
            Err(error) => {
                tracing::warn!(lease = %settings.name, namespace = %settings.namespace, %error, "cannot set up the leader lease; retrying");
                tokio::select! {
                    () = clock::sleep(LEASE_RETRY_INTERVAL) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    };
    let (mut lease, lease_task) = manager.watch().await;
    loop {
        let is_leader = *lease.borrow_and_update();
        if leading.send_replace(is_leader) != is_leader {
            tracing::info!(identity = %settings.identity, leader = is_leader, "leadership changed");
        }
        tokio::select! {
            changed = lease.changed() => if changed.is_err() { break },
            () = stop.cancelled() => break,
        }
    }
    leading.send_replace(false);
    // Dropping the manager's channel makes it release the lease and return.
    drop(lease);
    match clock::timeout(LEASE_RELEASE_TIMEOUT, lease_task).await {
        Ok(Ok(Ok(_))) => tracing::debug!("leader lease released"),
        Ok(Ok(Err(error))) => tracing::warn!(%error, "leader lease task failed"),
        Ok(Err(error)) => tracing::warn!(%error, "leader lease task panicked"),
        Err(_) => tracing::warn!("the leader lease was not released in time; it will expire"),
    }
}

async fn build(
    client: Client,
    settings: &LeaseSettings,
) -> Result<LeaseManager, kube_lease_manager::LeaseManagerError> {
    LeaseManagerBuilder::new(client, &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(LEASE_DURATION_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .build()
        .await
}
