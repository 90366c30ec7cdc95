//! What can go wrong in multi-node mode ([`ClusterError`]). Owns nothing else.

use std::net::SocketAddr;
use std::time::Duration;

/// Why a node could not start, connect or serve.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClusterError {
    /// A setting is wrong (name, cookie, address): fix the configuration.
    #[error("invalid cluster configuration: {0}")]
    InvalidConfig(String),
    /// The node could not listen on its address (taken, or not this machine's).
    #[error("cannot listen on {addr}: {detail}")]
    Bind { addr: SocketAddr, detail: String },
    /// No connection to the peer (nothing listening, unreachable).
    #[error("cannot connect to {addr}: {detail}")]
    Connect { addr: SocketAddr, detail: String },
    /// The peer closed the session before it was ready: most often another cookie (the
    /// cookies must match), else a node that went away or a duplicate connection.
    #[error("the node at {addr} refused the session (check that both nodes have the same cookie)")]
    Refused { addr: SocketAddr },
    /// The TLS handshake with the peer failed: its certificate is not signed by this node's
    /// CA or not valid for the expected name, this node's is not accepted there, or the peer
    /// does not speak TLS.
    #[error("the TLS handshake with {addr} failed: {detail} (check both nodes' certificates, CA and server name)")]
    Tls { addr: SocketAddr, detail: String },
    /// A seed's host name resolved to no address (or the lookup failed): check the name, or
    /// give the seed as IP:PORT. A seed given by name is looked up again at each attempt.
    #[error("cannot resolve seed {seed}: {detail}")]
    Resolve { seed: String, detail: String },
    /// The session was not ready in time.
    #[error("the session with {addr} was not ready within {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    /// A pool could not be served.
    #[error("cannot serve pool `{pool}`: {detail}")]
    Serve { pool: String, detail: String },
    /// This node has stopped.
    #[error("the node has stopped")]
    Stopped,
}

impl ClusterError {
    /// The peer refused the session (another cookie) or the TLS handshake failed: a
    /// configuration error rather than a peer that is down.
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(self, ClusterError::Refused { .. } | ClusterError::Tls { .. })
    }
}
