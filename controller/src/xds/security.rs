//! Security of the snapshot stream: TLS (the server certificate from files,
//! typically a mounted Secret) and how dataplanes prove who they are —
//! a client certificate signed by a CA (mutual TLS) and/or a bearer token.
//!
//! Snapshots may carry provider credentials; they are only put in a snapshot
//! when the stream is both encrypted and limited to authenticated clients
//! ([`StreamSecurity::protects_credentials`]).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The stream security flags (all files, read once at start).
#[derive(Clone, Debug, Default)]
pub struct StreamSecurityFiles {
    /// PEM certificate chain of the stream server.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: dataplanes must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
    /// A file holding the token dataplanes must send (`authorization: Bearer`).
    pub token_file: Option<PathBuf>,
}

/// Why the stream security could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StreamSecurityError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--stream-tls-cert and --stream-tls-key go together")]
    HalfIdentity,
    #[error(
        "--stream-client-ca and --stream-token-file need TLS (--stream-tls-cert and --stream-tls-key): without it the token or certificate would authenticate a stream anyone can read"
    )]
    AuthenticationWithoutTls,
    #[error("the stream token file {0} is empty")]
    EmptyToken(PathBuf),
}

/// What the stream server enforces.
#[derive(Clone, Default)]
pub struct StreamSecurity {
    pub tls: Option<ServerTlsConfig>,
    /// Clients must present a certificate signed by the configured CA.
    pub mutual_tls: bool,
    /// SHA-256 of the token clients must present; compared digest to digest
    /// so the comparison time says nothing about the token.
    pub token_sha256: Option<[u8; 32]>,
}

impl std::fmt::Debug for StreamSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSecurity")
            .field("tls", &self.tls.is_some())
            .field("mutual_tls", &self.mutual_tls)
            .field("token", &self.token_sha256.is_some())
            .finish()
    }
}

impl StreamSecurity {
    /// Reads the files named by the flags.
    pub fn load(files: &StreamSecurityFiles) -> Result<Self, StreamSecurityError> {
        let identity = match (&files.tls_cert, &files.tls_key) {
            (Some(cert), Some(key)) => Some(Identity::from_pem(
                read(cert, "--stream-tls-cert")?,
                read(key, "--stream-tls-key")?,
            )),
            (None, None) => None,
            _ => return Err(StreamSecurityError::HalfIdentity),
        };
        let Some(identity) = identity else {
            if files.client_ca.is_some() || files.token_file.is_some() {
                return Err(StreamSecurityError::AuthenticationWithoutTls);
            }
            return Ok(Self::default());
        };
        let mut tls = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &files.client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca, "--stream-client-ca")?));
        }
        let token_sha256 = match &files.token_file {
            None => None,
            Some(path) => {
                let token = read(path, "--stream-token-file")?;
                let token = String::from_utf8_lossy(&token).trim().to_owned();
                if token.is_empty() {
                    return Err(StreamSecurityError::EmptyToken(path.clone()));
                }
                Some(Sha256::digest(token.as_bytes()).into())
            }
        };
        Ok(Self {
            tls: Some(tls),
            mutual_tls: files.client_ca.is_some(),
            token_sha256,
        })
    }

    /// Encrypted, and only authenticated dataplanes get a stream.
    pub fn protects_credentials(&self) -> bool {
        self.tls.is_some() && (self.mutual_tls || self.token_sha256.is_some())
    }

    /// Whether a request's `authorization` header value admits it.
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(expected) = &self.token_sha256 else {
            return true;
        };
        let Some(token) = authorization.and_then(|value| value.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(token).into();
        presented == *expected
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, StreamSecurityError> {
    std::fs::read(path).map_err(|source| StreamSecurityError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authentication_without_tls_is_refused() {
        let files = StreamSecurityFiles {
            token_file: Some("/nonexistent".into()),
            ..Default::default()
        };
        assert!(matches!(
            StreamSecurity::load(&files),
            Err(StreamSecurityError::AuthenticationWithoutTls)
        ));
        let files = StreamSecurityFiles {
            tls_cert: Some("/nonexistent".into()),
            ..Default::default()
        };
        assert!(matches!(
            StreamSecurity::load(&files),
            Err(StreamSecurityError::HalfIdentity)
        ));
        let plain = StreamSecurity::load(&StreamSecurityFiles::default()).expect("plain");
        assert!(!plain.protects_credentials());
        assert!(plain.admits(None));
    }

    #[test]
    fn a_token_admits_only_its_bearer() {
        let security = StreamSecurity {
            token_sha256: Some(Sha256::digest(b"t0k3n").into()),
            ..Default::default()
        };
        assert!(security.admits(Some(b"Bearer t0k3n")));
        assert!(!security.admits(Some(b"Bearer t0k3")));
        assert!(!security.admits(Some(b"t0k3n")));
        assert!(!security.admits(None));
        assert!(!format!("{security:?}").contains("t0k3n"));
    }
}
