//! Phase `log`: what the request path reports. A [`RequestRecord`] opens
//! when a request arrives, the phases fill it in, and it closes when the
//! response body ends, fails, or the client goes away: request metrics and
//! one [`access_log`] line per request.

pub mod access_log;
mod record;

use std::sync::Arc;

use self::access_log::AccessLog;
pub use self::record::{CLIENT_CLOSED_REQUEST, RequestRecord};
use crate::metrics::RouterMetrics;

/// Metrics and access log, shared by every request.
#[derive(Debug)]
pub struct Observer {
    pub metrics: Arc<RouterMetrics>,
    pub access_log: AccessLog,
}

impl Observer {
    /// Metrics only, no access log.
    pub fn without_access_log(metrics: Arc<RouterMetrics>) -> Self {
        let dropped = metrics.access_log_dropped_total.clone();
        Self {
            metrics,
            access_log: AccessLog::disabled(dropped),
        }
    }
}
