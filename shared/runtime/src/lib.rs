//! The process lifecycle both Switchyard binaries share, so the controller and
//! the dataplane start, supervise, log and stop the same way:
//!
//! - [`shutdown`]: SIGINT / SIGTERM cancel one [`CancellationToken`];
//! - [`tasks`]: one [`TaskSet`] supervises every background task of a binary
//!   and stops all of them on shutdown or when one fails;
//! - [`net`]: [`bind`] a listener with an error that names it;
//! - [`logging`]: a tracing subscriber that is installed at most once and never panics;
//! - [`clock`]: the one place library code reads time from, so tests can pause it;
//! - [`debounce`]: one rule for turning a burst of changes into one reaction.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod clock;
pub mod debounce;
pub mod logging;
pub mod net;
pub mod shutdown;
pub mod tasks;

pub use debounce::Debounce;
pub use logging::{LogFormat, init_tracing};
pub use net::{BindError, bind};
pub use shutdown::cancel_on_signal;
pub use tasks::{TaskError, TaskSet};
pub use tokio_util::sync::CancellationToken;
