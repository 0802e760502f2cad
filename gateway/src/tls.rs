//! TLS on the gateway's HTTP port (`--tls-cert`, `--tls-key`).
//!
//! [`TlsListener`] is an [`axum::serve::Listener`]: a task of its own accepts TCP connections
//! and runs each TLS handshake as a task of its own (at most [`HANDSHAKE_TIMEOUT`] each, at
//! most [`MAX_HANDSHAKES`] at once, past which new connections are closed), so a client that
//! connects and sends nothing holds up no other; finished handshakes are handed to axum,
//! which serves HTTP over them as over plain TCP, graceful shutdown included. With TLS on, the port speaks nothing else: a plain HTTP
//! request there fails its handshake and is dropped.
//!
//! # Cost and lifetime
//! [`server_config`] reads and checks the certificate chain and key once, at start (a key
//! that does not match the certificate is an error then, not at the first connection). Each
//! connection costs one handshake (a key exchange and a signature, a fraction of a
//! millisecond of CPU), then symmetric encryption of what it carries; HTTP keep-alive spreads
//! the handshake over every request of a connection. The listener's accepting task lives as
//! long as the [`TlsListener`]: dropping it closes the port.
//!
//! # Why rustls
//! rustls, with tokio-rustls for its async streams, is memory-safe and needs no system
//! OpenSSL, so a machine with only Rust builds it; it is already in the build (the Kubernetes
//! client uses it). It runs on its `ring` provider, the one the rest of the build uses, so no
//! second crypto library is compiled. Its defaults are the safe ones: TLS 1.2 and 1.3, forward-
//! secret suites only, no renegotiation, no compression.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The longest a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most handshakes under way at once: past it, a new connection is closed at once (and
/// a warning logged), so that clients that connect and send nothing are seen, not waited on.
pub const MAX_HANDSHAKES: usize = 1024;

/// Connections whose handshake is done and that axum has not taken yet.
const READY_QUEUE: usize = 64;

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or is not PEM.
    #[error("reading the TLS certificate chain {path}: {source}")]
    Certificates {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{0} holds no certificate (a PEM `CERTIFICATE` block)")]
    NoCertificate(PathBuf),
    /// The key file could not be read, is not PEM, or holds no private key.
    #[error("reading the TLS private key {path}: {source}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused them: a key that is not the certificate's, or an unsupported one.
    #[error("the TLS certificate {cert} and key {key} cannot serve: {source}")]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        source: rustls::Error,
    },
}

/// The server configuration for the certificate chain in PEM file `cert` (the server's
/// certificate first, then any intermediates) and the private key in PEM file `key` (PKCS#8,
/// PKCS#1 or SEC1). ALPN offers HTTP/1.1, the protocol the gateway serves (axum is built
/// without HTTP/2).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificates {
            path: cert.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_path_buf()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.to_path_buf(),
        source,
    })?;
    let config_error = |source| TlsError::Config {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    };
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_no_client_auth()
            // Checks that the key is the certificate's.
            .with_single_cert(chain, private)
            .map_err(config_error)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A listener whose connections are TLS streams, for [`axum::serve()`].
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Serves TLS with `config` on the connections `listener` accepts. Must be called within
    /// a tokio runtime (it starts the accepting task).
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (ready_tx, ready) = mpsc::channel(READY_QUEUE);
        let accepting = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), ready_tx));
        Ok(Self {
            local,
            ready,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accepting task ends on its own only if it panicked.
            None => {
                tracing::error!("the TLS accepting task ended: no new connection is taken");
                std::future::pending().await
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Accepts connections and runs each one's handshake as a task of its own, until the
/// listener is dropped (the handshakes under way end with it: they belong to this task).
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let mut handshakes = JoinSet::new();
    let mut warned: Option<std::time::Instant> = None;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
            _ = ready.closed() => return,
        };
        // Past the cap a new connection is closed at once, rather than left waiting unseen
        // behind the clients that hold the handshakes (said at most once a second).
        while handshakes.try_join_next().is_some() {}
        if handshakes.len() >= MAX_HANDSHAKES {
            if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                tracing::warn!(%peer, "{MAX_HANDSHAKES} TLS handshakes under way: connections refused");
                warned = Some(std::time::Instant::now());
            }
            continue;
        }
        // TLS writes a response as records of its own: sent at once, not held back for more.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, cause = %e, "setting TCP_NODELAY");
        }
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        handshakes.spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    // Fails only once the listener is gone: the connection is then dropped.
                    let _ = ready.send((stream, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, cause = %e, "a TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "a TLS handshake timed out"),
            }
        });
    }
}

/// What axum does with an error accepting a connection: one that concerns only that
/// connection is skipped; any other (out of file descriptors) is logged and waited out for a
/// second, so that the loop does not spin.
async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(cause = %e, "accepting a connection; trying again in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn unreadable_or_empty_files_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let empty = write(dir.path(), "empty.pem", "");
        let junk = write(dir.path(), "junk.pem", "-----BEGIN CERTIFICATE-----\n%%%\n");
        assert!(matches!(
            server_config(&missing, &missing),
            Err(TlsError::Certificates { .. })
        ));
        assert!(matches!(
            server_config(&empty, &empty),
            Err(TlsError::NoCertificate(_))
        ));
        assert!(matches!(
            server_config(&junk, &junk),
            Err(TlsError::Certificates { .. })
        ));
    }
}
