//! TLS between nodes: [`NodeTls`] (both ends' rustls settings, mutual by default: every node
//! shows a certificate its peers' CA signed) and the listener a TLS node accepts peers on.
//!
//! ractor_cluster's own TLS listener completes each handshake before it accepts the next
//! connection, with no time limit: one client that connects and says nothing (a port scanner, a
//! half-open connection) would stop the node from accepting any peer again. So a TLS node
//! accepts on a listener of its own, each handshake in a task of its own with a time limit
//! ([`HANDSHAKE_TIMEOUT`], at most [`MAX_HANDSHAKES`] at once, [`MAX_HANDSHAKES_PER_SOURCE`]
//! from one address), and hands the encrypted stream
//! to the node server as an incoming session; the cookie is checked on it as on any session.
//!
//! Owns the TLS settings and that listener. Not the sessions (`node`), not the call channels'
//! connections (`call_port`, `channel`; they use these settings too).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use ractor::ActorRef;
use ractor_cluster::{NetworkStream, NodeServerMessage};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::admission::{self, HANDSHAKE_TIMEOUT, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE};
use crate::error::ClusterError;

/// A node's TLS settings: how it accepts peers (server side) and dials them (client side),
/// and the name it expects in their certificates.
///
/// ```no_run
/// use std::path::Path;
/// use pyvisor_cluster::{NodeConfig, NodeTls};
/// let tls = NodeTls::from_pem_files(Path::new("node.pem"), Path::new("node.key"), Path::new("ca.pem"), "pyvisor.internal")?;
/// let config = NodeConfig::new("a", "10.0.0.1:7400".parse()?, "s3cret")?.tls(tls);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct NodeTls {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) connector: TlsConnector,
    pub(crate) server_name: ServerName<'static>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl NodeTls {
    /// From rustls settings of your own: `server` for peers that dial this node, `client` for
    /// dialing them, `server_name` the name peers' certificates must be valid for.
    pub fn new(server: Arc<ServerConfig>, client: Arc<ClientConfig>, server_name: &str) -> Result<Self, ClusterError> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| ClusterError::InvalidConfig(format!("not a TLS server name: {server_name:?}: {e}")))?;
        Ok(NodeTls { acceptor: TlsAcceptor::from(server), connector: TlsConnector::from(client), server_name })
    }

    /// Mutual TLS from PEM files: this node's certificate chain and private key, and the CA
    /// certificate(s) that signed every node's certificate (for self-signed certificates, the
    /// certificate itself). Peers must show a certificate signed by that CA and valid for
    /// `server_name`, both when they dial this node and when it dials them.
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path, server_name: &str) -> Result<Self, ClusterError> {
        let bad = |what: &str, path: &Path, e: &dyn std::fmt::Display| ClusterError::InvalidConfig(format!("{what} {}: {e}", path.display()));
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad("cannot read the certificate file", cert, &e))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad("a certificate in", cert, &e))?;
        if chain.is_empty() {
            return Err(bad("no certificate in", cert, &"the file has no CERTIFICATE block"));
        }
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("cannot read a private key from", key, &e))?;
        let mut roots = RootCertStore::empty();
        for ca_cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad("cannot read the CA file", ca, &e))? {
            let ca_cert = ca_cert.map_err(|e| bad("a certificate in", ca, &e))?;
            roots.add(ca_cert).map_err(|e| bad("not a usable CA certificate in", ca, &e))?;
        }
        if roots.is_empty() {
            return Err(bad("no certificate in", ca, &"the file has no CERTIFICATE block"));
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder(Arc::clone(&roots)).build().map_err(|e| bad("the CA in", ca, &e))?;
        let server = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), private.clone_key())
            .map_err(|e| bad("the certificate and key do not make a server identity:", cert, &e))?;
        let client = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private)
            .map_err(|e| bad("the certificate and key do not make a client identity:", cert, &e))?;
        NodeTls::new(Arc::new(server), Arc::new(client), server_name)
    }
}

/// Accept peers on `listen` for the node server `server`: each handshake in its own task,
/// within [`HANDSHAKE_TIMEOUT`]. The listener stops when the returned task is aborted.
pub(crate) async fn listen(listen: SocketAddr, tls: NodeTls, server: ActorRef<NodeServerMessage>) -> Result<JoinHandle<()>, ClusterError> {
    let listener = TcpListener::bind(listen).await.map_err(|e| ClusterError::Bind { addr: listen, detail: e.to_string() })?;
    Ok(admission::accept_loop(listener, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE, move |stream, peer_addr, slot| {
        let (acceptor, server) = (tls.acceptor.clone(), server.clone());
        async move {
            let _slot = slot;
            let Ok(local_addr) = stream.local_addr() else { return };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let stream = Box::new(NetworkStream::TlsServer { peer_addr, local_addr, stream });
                    let _ = server.cast(NodeServerMessage::ConnectionOpened { stream, is_server: true });
                }
                Ok(Err(e)) => tracing::warn!(%peer_addr, error = %e, "a peer failed the TLS handshake"),
                Err(_) => tracing::warn!(%peer_addr, "a peer did not complete the TLS handshake in {HANDSHAKE_TIMEOUT:?}"),
            }
        }
    }))
}
