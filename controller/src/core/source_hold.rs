//! A controller that starts on a source holding no ModelRoute (an empty
//! config directory, one that cannot be read, a cluster or namespace with
//! none) does not publish the empty RouteConfig at once: dataplanes that
//! reconnect to it would drop every route they serve. It holds its first
//! snapshot, and with it its stream server, until the source has a
//! ModelRoute, or has read the same way (empty, or unreadable) for the grace
//! period (`--empty-source-grace-period`, default
//! [`crate::cli::EMPTY_SOURCE_GRACE_PERIOD`]); then it publishes the empty
//! snapshot and says so.
//!
//! Kubernetes mode holds too, on a successful empty list: the API server's
//! answer is the truth about the cluster, but not about whether this
//! controller looks at the right part of it (a wrong `--namespaces`, a
//! manifest for another cluster), and during a rollout the dataplanes that
//! reconnect to a new replica would be wiped while the old replicas still
//! serve the routes. An empty cluster pays the grace period once, at start.

use std::sync::Arc;
use std::time::Duration;

use switchyard_runtime::clock;
use tokio::sync::watch;

use crate::admin::{ObjectsView, SourceState, SourceStatus};
use crate::compile::{GatewayApiReports, ObjectSet};

/// How a source reads while it has no ModelRoute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    HasRoutes,
    NoRoutes,
    Unreadable,
}

impl Reading {
    fn of(objects: &ObjectSet) -> Self {
        if !objects.routes.is_empty() {
            Self::HasRoutes
        } else if objects.source_error.is_some() {
            Self::Unreadable
        } else {
            Self::NoRoutes
        }
    }
}

/// Waits until `objects` has a ModelRoute, or has read the same way for
/// `grace`, showing the wait in `view` and `held` (1 while holding). Returns
/// the status the controller serves with.
pub(super) async fn hold_while_empty(
    objects: &mut watch::Receiver<Arc<ObjectSet>>,
    grace: Duration,
    view: &watch::Sender<Arc<ObjectsView>>,
    held: &prometheus::IntGauge,
) -> SourceStatus {
    let mut reading = Reading::of(&objects.borrow_and_update());
    if reading == Reading::HasRoutes {
        return serving(false, String::new());
    }
    let mut deadline = clock::now() + grace;
    let mut announced = None;
    held.set(1);
    loop {
        let current = objects.borrow().clone();
        let what = match reading {
            Reading::Unreadable => "cannot be read",
            _ => "holds no ModelRoute",
        };
        let message = format!(
            "the source {what}; the first routing snapshot (empty) is published once it has read so for {grace:?}, unless a ModelRoute appears first"
        );
        if announced != Some(reading) {
            tracing::warn!(error = ?current.source_error, "{message}");
            announced = Some(reading);
        }
        view.send_replace(Arc::new(ObjectsView {
            reports: Vec::new(),
            providers: Vec::new(),
            gateway_api: GatewayApiReports::default(),
            load_problems: current.problems.clone(),
            source: SourceStatus {
                state: SourceState::Holding,
                empty_after_grace: false,
                error: current.source_error.clone(),
                message,
            },
        }));
        let changed = tokio::select! {
            () = clock::sleep_until(deadline) => {
                held.set(0);
                let message = format!(
                    "published an empty routing snapshot: the source {what} for {grace:?}"
                );
                tracing::warn!("{message}");
                return serving(true, message);
            }
            changed = objects.changed() => changed,
        };
        if changed.is_err() {
            // The source's task ended: the task supervisor reports why.
            held.set(0);
            return serving(false, String::new());
        }
        let now_reading = Reading::of(&objects.borrow_and_update());
        if now_reading == Reading::HasRoutes {
            held.set(0);
            return serving(false, String::new());
        }
        if now_reading != reading {
            reading = now_reading;
            deadline = clock::now() + grace;
        }
    }
}

fn serving(empty_after_grace: bool, message: String) -> SourceStatus {
    SourceStatus {
        state: SourceState::Serving,
        empty_after_grace,
        error: None,
        message,
    }
}

#[cfg(test)]
mod tests {
    use switchyard_crd::ModelRoute;

    use super::*;

    const GRACE: Duration = Duration::from_secs(30);

    struct Hold {
        objects: watch::Sender<Arc<ObjectSet>>,
        view: watch::Receiver<Arc<ObjectsView>>,
        held: prometheus::IntGauge,
        task: tokio::task::JoinHandle<SourceStatus>,
    }

    fn start(first: ObjectSet) -> Hold {
        let (objects, mut receiver) = watch::channel(Arc::new(first));
        let (view_sender, view) = watch::channel(Arc::new(ObjectsView::default()));
        let held = prometheus::IntGauge::new("held", "held").expect("gauge");
        let gauge = held.clone();
        let task = tokio::spawn(async move {
            hold_while_empty(&mut receiver, GRACE, &view_sender, &gauge).await
        });
        Hold {
            objects,
            view,
            held,
            task,
        }
    }

    fn with_route() -> ObjectSet {
        ObjectSet {
            routes: vec![ModelRoute::new("r", Default::default())],
            ..ObjectSet::default()
        }
    }

    fn unreadable() -> ObjectSet {
        ObjectSet {
            source_error: Some("permission denied".into()),
            ..ObjectSet::default()
        }
    }

    /// Lets the hold task run until it waits again.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_with_routes_is_served_at_once() {
        let hold = start(with_route());
        let status = hold.task.await.expect("hold task");
        assert_eq!(status.state, SourceState::Serving);
        assert!(!status.empty_after_grace);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_source_is_published_only_after_the_grace_period() {
        let started = clock::now();
        let mut hold = start(ObjectSet::default());
        settle().await;
        assert_eq!(hold.held.get(), 1);
        let view = hold.view.borrow_and_update().clone();
        assert_eq!(view.source.state, SourceState::Holding);
        assert!(
            view.source
                .message
                .starts_with("the source holds no ModelRoute"),
            "{}",
            view.source.message
        );
        // A change that leaves it empty (a Pod file) does not restart the clock.
        hold.objects.send_replace(Arc::new(ObjectSet {
            pods: vec![Default::default()],
            ..ObjectSet::default()
        }));
        tokio::time::sleep(GRACE - Duration::from_millis(1)).await;
        assert!(!hold.task.is_finished(), "held within the grace period");
        let status = hold.task.await.expect("hold task");
        assert_eq!(clock::now() - started, GRACE);
        assert_eq!(status.state, SourceState::Serving);
        assert!(status.empty_after_grace);
        assert_eq!(
            status.message,
            "published an empty routing snapshot: the source holds no ModelRoute for 30s"
        );
        assert_eq!(hold.held.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_appearing_ends_the_hold_at_once() {
        let hold = start(unreadable());
        tokio::time::sleep(GRACE / 2).await;
        hold.objects.send_replace(Arc::new(with_route()));
        let status = hold.task.await.expect("hold task");
        assert!(!status.empty_after_grace);
        assert_eq!(hold.held.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn reading_another_way_restarts_the_grace_period() {
        let started = clock::now();
        let mut hold = start(unreadable());
        settle().await;
        assert_eq!(
            hold.view.borrow_and_update().source.error.as_deref(),
            Some("permission denied")
        );
        tokio::time::sleep(GRACE / 2).await;
        // Readable now, but empty: another reading, a full grace period again.
        hold.objects.send_replace(Arc::new(ObjectSet::default()));
        let status = hold.task.await.expect("hold task");
        assert_eq!(clock::now() - started, GRACE / 2 + GRACE);
        assert!(status.empty_after_grace);
    }
}
