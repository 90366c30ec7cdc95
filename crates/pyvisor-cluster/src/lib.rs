//! pyvisor's multi-node mode, built on `ractor_cluster` (docs/cluster.md).
//!
//! Status: a [`Node`] listens, proves and checks a cookie, connects to peers and reports its
//! sessions ([`NodeEvent`], [`Node::peers`]); it serves local pools to the cluster
//! ([`Node::serve`]) and [`RemotePool`] calls them on any connected node (local first), retrying
//! an idempotent call whose node was lost and failing any other with
//! [`RemoteCallError::NodeLost`]. A node heartbeat of our own ([`HeartbeatPolicy`]) stops the
//! session of a peer that stops answering (SIGSTOP, a frozen machine), which ends its calls the
//! same way. Taint windows for nodes, TLS and the CLI are not built yet (docs/cluster.md).
//!
//! Enabling this crate turns on ractor's `cluster` feature for the whole program, which removes
//! ractor's blanket `Message` impl: every actor message type of the program needs
//! `impl ractor::Message for MyMsg {}` (pyvisor's own types have theirs).

mod error;
mod heartbeat;
mod node;
mod node_loss;
mod remote;
mod routing;
mod serve;
mod tls;
mod trace;
mod wire;

pub use error::ClusterError;
pub use heartbeat::{HeartbeatPolicy, NodeBeatMsg};
pub use node::{Node, NodeConfig, NodeEvent, Peer, DEFAULT_TAINT_WINDOW};
pub use node_loss::{LossCause, NodeLoss, NodeTaint};
pub use remote::{RemoteCallError, RemoteCallOptions, RemotePool, DEFAULT_REMOTE_TIMEOUT};
pub use serve::Served;
pub use tls::{NodeTls, HANDSHAKE_TIMEOUT, MAX_HANDSHAKES};
pub use wire::PoolMemberMsg;
