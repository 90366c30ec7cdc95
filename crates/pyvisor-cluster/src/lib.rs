//! pyvisor's multi-node mode, built on `ractor_cluster` (docs/cluster.md).
//!
//! A [`Node`] listens, proves and checks a cookie (and with [`NodeTls`], mutual TLS), connects
//! to peers and reports its sessions ([`NodeEvent`], [`Node::peers`]); it serves local pools to
//! the cluster ([`Node::serve`], [`Node::serve_with`]) and [`RemotePool`] calls them on any
//! connected node (untainted first, a key's node for keyed calls, else the fewest in flight,
//! local on a tie). Sessions, membership and the heartbeat ride on ractor_cluster; the calls
//! ride a call channel per pair of nodes (a framed connection to the serving node's call port,
//! opened with a single-use token handed out over the authenticated session). A node lost
//! mid-call — its session closed, given up by the node heartbeat ([`HeartbeatPolicy`]), or its
//! call channel broken — is a crash for the calls in flight there: idempotent ones are retried
//! on another node, the others fail with [`RemoteCallError::NodeLost`] and a [`NodeLoss`]
//! certificate, and the node is tainted for a window ([`NodeTaint`]). Deadlines,
//! cancellation and trace context cross. [`Node::join`] keeps a node connected to its seeds
//! (ractor_cluster does not reconnect by itself); [`NodeArgs`] are a node process's flags
//! (`pyvisor-cluster-node`, `pyvisor node`). See docs/cluster.md.
//!
//! Enabling this crate turns on ractor's `cluster` feature for the whole program, which removes
//! ractor's blanket `Message` impl: every actor message type of the program needs
//! `impl ractor::Message for MyMsg {}` (pyvisor's own types have theirs).

mod admission;
mod args;
mod call_port;
mod channel;
mod error;
mod heartbeat;
mod link;
mod node;
mod node_loss;
mod remote;
mod routing;
mod seeds;
mod serve;
mod tls;
mod trace;
mod wire;

pub use args::NodeArgs;
pub use call_port::TOKEN_LIFE;
pub use error::ClusterError;
pub use heartbeat::{HeartbeatPolicy, NodeBeatMsg};
pub use node::{Node, NodeConfig, NodeEvent, Peer, DEFAULT_TAINT_WINDOW};
pub use node_loss::{LossCause, NodeLoss, NodeTaint};
pub use remote::{RemoteCallError, RemotePool, DEFAULT_REMOTE_TIMEOUT};
pub use seeds::{SeedAddr, SeedPolicy, SeedStatus, Seeds};
pub use serve::Served;
pub use admission::{HANDSHAKE_TIMEOUT, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE, WAITING_PER_SOURCE};
pub use tls::NodeTls;
pub use wire::PoolMemberMsg;
