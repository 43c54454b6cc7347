//! One supervisor for every background task of a binary.
//!
//! Every task is spawned on one [`TaskSet`] under a name. The set runs until
//! shutdown is requested (its token is cancelled) or until any task ends: a
//! task of a server process is meant to run as long as the process, so one
//! that returns, fails or panics early takes the process down with an error
//! that names it, instead of leaving a half-working process behind. Either
//! way every other task is stopped, and dropping a set that was never run
//! (a start-up that failed half-way) aborts whatever it had started.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

/// Any error a task can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a supervised task returns: `()` or `Result<(), E>`.
pub trait TaskOutcome: Send + 'static {
    fn into_result(self) -> Result<(), BoxError>;
}

impl TaskOutcome for () {
    fn into_result(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<E: Into<BoxError> + Send + 'static> TaskOutcome for Result<(), E> {
    fn into_result(self) -> Result<(), BoxError> {
        self.map_err(Into::into)
    }
}

/// Why a [`TaskSet`] stopped without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("the {task} task failed: {source}")]
    Failed {
        task: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("the {task} task panicked: {message}")]
    Panicked { task: &'static str, message: String },
    #[error("the {task} task ended unexpectedly")]
    Ended { task: &'static str },
}

impl TaskError {
    /// The name of the task that stopped the set.
    pub fn task(&self) -> &'static str {
        match self {
            Self::Failed { task, .. } | Self::Panicked { task, .. } | Self::Ended { task } => task,
        }
    }
}

/// The background tasks of one binary; see the module documentation.
#[derive(Debug)]
pub struct TaskSet {
    shutdown: CancellationToken,
    tasks: JoinSet<Result<(), BoxError>>,
    names: HashMap<Id, &'static str>,
}

impl TaskSet {
    /// An empty set that stops when `shutdown` is cancelled.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            tasks: JoinSet::new(),
            names: HashMap::new(),
        }
    }

    /// The token that stops this set (cancelling it requests a shutdown).
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Runs `task` until it ends or the set stops. At the stop it is dropped,
    /// i.e. cancelled at its next `.await`: for tasks with nothing to finish
    /// (watch loops, pollers, feeders).
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future + Send + 'static,
        F::Output: TaskOutcome,
    {
        let shutdown = self.shutdown.clone();
        self.insert(name, async move {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => Ok(()),
                outcome = task => outcome.into_result(),
            }
        });
    }

    /// Runs the task `start(stop)` returns. It must finish on its own soon
    /// after `stop` is cancelled (servers draining connections, a lease being
    /// released), within the grace period given to [`TaskSet::run`].
    pub fn spawn_graceful<S, F>(&mut self, name: &'static str, start: S)
    where
        S: FnOnce(CancellationToken) -> F,
        F: Future + Send + 'static,
        F::Output: TaskOutcome,
    {
        // A child token: a task may cancel its own, not the whole set's.
        let task = start(self.shutdown.child_token());
        self.insert(name, async move { task.await.into_result() });
    }

    fn insert<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let id = self.tasks.spawn(task).id();
        self.names.insert(id, name);
    }

    /// Supervises until shutdown is requested or a task ends, then stops
    /// every task: cancels the token, waits up to `grace` for them to finish,
    /// and aborts those still running. Ok after a requested shutdown; the
    /// first task's failure otherwise.
    pub async fn run(mut self, grace: Duration) -> Result<(), TaskError> {
        let outcome = tokio::select! {
            // A task that finishes because shutdown was requested is not a failure.
            biased;
            () = self.shutdown.cancelled() => Ok(()),
            Some(joined) = self.tasks.join_next_with_id() => Err(self.early_end(joined)),
        };
        if let Err(error) = &outcome {
            tracing::error!(task = error.task(), %error, "a task stopped; stopping every other task");
        }
        self.shutdown.cancel();
        let names = &mut self.names;
        let tasks = &mut self.tasks;
        let drained = crate::clock::timeout(grace, async {
            while let Some(joined) = tasks.join_next_with_id().await {
                let (id, result) = match joined {
                    Ok((id, result)) => (id, result.map_err(|error| error.to_string())),
                    Err(error) => (error.id(), Err(panic_message(error))),
                };
                let task = names.remove(&id).unwrap_or("unnamed");
                if let Err(error) = result {
                    tracing::warn!(task, %error, "a task failed while stopping");
                }
            }
        })
        .await;
        if drained.is_err() {
            let mut unfinished: Vec<&str> = self.names.values().copied().collect();
            unfinished.sort_unstable();
            tracing::warn!(tasks = ?unfinished, grace_period = ?grace, "tasks did not stop in time; aborting them");
            self.tasks.shutdown().await;
        }
        outcome
    }

    fn early_end(&mut self, joined: Result<(Id, Result<(), BoxError>), JoinError>) -> TaskError {
        match joined {
            Ok((id, Ok(()))) => TaskError::Ended {
                task: self.take_name(id),
            },
            Ok((id, Err(source))) => TaskError::Failed {
                task: self.take_name(id),
                source,
            },
            Err(error) => TaskError::Panicked {
                task: self.take_name(error.id()),
                message: panic_message(error),
            },
        }
    }

    fn take_name(&mut self, id: Id) -> &'static str {
        self.names.remove(&id).unwrap_or("unnamed")
    }
}

fn panic_message(error: JoinError) -> String {
    if !error.is_panic() {
        return error.to_string();
    }
    let payload = error.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|message| (*message).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::clock;

    const GRACE: Duration = Duration::from_secs(5);

    /// A task that runs until dropped and records that it was.
    fn forever(dropped: &Arc<AtomicBool>) -> impl Future<Output = ()> + Send + 'static {
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let guard = SetOnDrop(dropped.clone());
        async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_task_stops_the_others_and_is_named_in_the_error() {
        let token = CancellationToken::new();
        let mut tasks = TaskSet::new(token.clone());
        let dropped = Arc::new(AtomicBool::new(false));
        tasks.spawn("watcher", forever(&dropped));
        let server_stopped = Arc::new(AtomicBool::new(false));
        let stopped = server_stopped.clone();
        tasks.spawn_graceful("admin server", move |stop| async move {
            stop.cancelled().await;
            stopped.store(true, Ordering::SeqCst);
        });
        tasks.spawn("scraper", async {
            clock::sleep(Duration::from_secs(1)).await;
            Err::<(), _>(std::io::Error::other("connection refused"))
        });

        let error = tasks.run(GRACE).await.unwrap_err();
        assert_eq!(error.task(), "scraper");
        assert_eq!(
            error.to_string(),
            "the scraper task failed: connection refused"
        );
        assert!(token.is_cancelled(), "everyone is told to stop");
        assert!(dropped.load(Ordering::SeqCst));
        assert!(server_stopped.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_returns_early_or_panics_is_an_error() {
        let mut tasks = TaskSet::new(CancellationToken::new());
        tasks.spawn("feeder", async {});
        let error = tasks.run(GRACE).await.unwrap_err();
        assert!(
            matches!(error, TaskError::Ended { task: "feeder" }),
            "{error}"
        );
        assert_eq!(error.to_string(), "the feeder task ended unexpectedly");

        let mut tasks = TaskSet::new(CancellationToken::new());
        tasks.spawn("compile loop", async {
            clock::sleep(Duration::from_millis(1)).await;
            if true {
                panic!("simulated bug");
            }
        });
        let error = tasks.run(GRACE).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "the compile loop task panicked: simulated bug"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_graceful_tasks_and_is_not_an_error() {
        let token = CancellationToken::new();
        let mut tasks = TaskSet::new(token.clone());
        let dropped = Arc::new(AtomicBool::new(false));
        tasks.spawn("poller", forever(&dropped));
        let drained = Arc::new(AtomicBool::new(false));
        let done = drained.clone();
        tasks.spawn_graceful("traffic server", move |stop| async move {
            stop.cancelled().await;
            // Draining takes a while but less than the grace period.
            clock::sleep(Duration::from_secs(2)).await;
            done.store(true, Ordering::SeqCst);
            Err::<(), _>(std::io::Error::other("a connection reset while draining"))
        });
        let start = clock::now();
        let cancel = token.clone();
        tokio::spawn(async move {
            clock::sleep(Duration::from_secs(10)).await;
            cancel.cancel();
        });
        tasks
            .run(GRACE)
            .await
            .expect("a requested shutdown is not a failure");
        assert_eq!(clock::now() - start, Duration::from_secs(12));
        assert!(drained.load(Ordering::SeqCst));
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ignores_shutdown_is_aborted_after_the_grace_period() {
        let token = CancellationToken::new();
        let mut tasks = TaskSet::new(token.clone());
        let dropped = Arc::new(AtomicBool::new(false));
        let stuck = forever(&dropped);
        tasks.spawn_graceful("stuck server", move |_stop| stuck);
        token.cancel();
        let start = clock::now();
        tasks.run(GRACE).await.expect("shutdown");
        assert_eq!(clock::now() - start, GRACE);
        assert!(dropped.load(Ordering::SeqCst), "aborted");
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_a_set_that_never_ran_aborts_its_tasks() {
        let mut tasks = TaskSet::new(CancellationToken::new());
        let dropped = Arc::new(AtomicBool::new(false));
        tasks.spawn("watcher", forever(&dropped));
        tokio::task::yield_now().await;
        drop(tasks);
        clock::sleep(Duration::from_millis(1)).await;
        assert!(dropped.load(Ordering::SeqCst));
    }
}
