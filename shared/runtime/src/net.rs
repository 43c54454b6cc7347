//! Listeners.

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// A listener could not be bound; says which one and where.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for the {listener} server: {source}")]
pub struct BindError {
    /// What the listener serves ("admin", "snapshot stream", "traffic", ...).
    pub listener: &'static str,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` for the `listener` server; returns the listener and the
/// address it is bound to (the port is known even when `addr` asked for port 0).
pub async fn bind(
    listener: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), BindError> {
    let error = |source| BindError {
        listener,
        addr,
        source,
    };
    let bound = TcpListener::bind(addr).await.map_err(error)?;
    let local_addr = bound.local_addr().map_err(error)?;
    Ok((bound, local_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_port_zero_and_names_the_listener_in_a_failure() {
        let (first, addr) = bind("admin", "127.0.0.1:0".parse().unwrap()).await.unwrap();
        assert_ne!(addr.port(), 0);
        let error = bind("snapshot stream", addr).await.unwrap_err();
        assert_eq!(error.listener, "snapshot stream");
        assert_eq!(error.addr, addr);
        assert!(
            error.to_string().starts_with(&format!(
                "cannot listen on {addr} for the snapshot stream server: "
            )),
            "{error}"
        );
        drop(first);
    }
}
