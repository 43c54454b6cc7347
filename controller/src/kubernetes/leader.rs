//! Lease-based leader election: exactly one replica writes status and Events;
//! every replica watches, compiles and serves dataplanes regardless, so a
//! failover never interrupts a stream.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a lease stays valid without renewal: a crashed leader's status
/// duties move to another replica within this (client-go's default is 15 s).
pub const LEASE_DURATION_SECONDS: u64 = 15;
/// The holder renews this long before expiry, leaving room for a slow API call.
pub const LEASE_GRACE_SECONDS: u64 = 5;
/// Wait before retrying when the Lease cannot be read or created (RBAC, API down).
pub const LEASE_RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// Where and as whom to take part in the election.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// Unique per replica: the pod name.
    pub identity: String,
}

/// Takes part in the election in the background; the receiver says whether
/// this replica leads right now. Dropping the receiver releases the lease
/// (the task ends once it has).
pub fn spawn(client: Client, settings: LeaseSettings) -> (watch::Receiver<bool>, JoinHandle<()>) {
    let (leading_sender, leading) = watch::channel(false);
    let task = tokio::spawn(async move {
        let manager = loop {
            match build(client.clone(), &settings).await {
                Ok(manager) => break manager,
                Err(error) => {
                    tracing::warn!(lease = %settings.name, namespace = %settings.namespace, %error, "cannot set up the leader lease; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(LEASE_RETRY_INTERVAL) => {}
                        () = leading_sender.closed() => return,
                    }
                }
            }
        };
        let (mut lease, lease_task) = manager.watch().await;
        loop {
            let is_leader = *lease.borrow_and_update();
            if leading_sender.send_replace(is_leader) != is_leader {
                tracing::info!(identity = %settings.identity, leader = is_leader, "leadership changed");
            }
            tokio::select! {
                changed = lease.changed() => if changed.is_err() { break },
                () = leading_sender.closed() => break,
            }
        }
        leading_sender.send_replace(false);
        // Dropping the manager's channel makes it release the lease and return.
        drop(lease);
        match lease_task.await {
            Ok(Ok(_)) => tracing::debug!("leader lease released"),
            Ok(Err(error)) => tracing::warn!(%error, "leader lease task failed"),
            Err(error) => tracing::warn!(%error, "leader lease task panicked"),
        }
    });
    (leading, task)
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
