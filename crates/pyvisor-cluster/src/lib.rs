//! pyvisor's multi-node mode, built on `ractor_cluster` (docs/cluster.md).
//!
//! Status: the node layer — a [`Node`] listens, proves and checks a cookie, connects to peers
//! and reports its sessions ([`NodeEvent`], [`Node::peers`]). Serving pools to the cluster,
//! `RemotePool`, the node heartbeat and the crash barrier across nodes are not built yet.
//!
//! Enabling this crate turns on ractor's `cluster` feature for the whole program, which removes
//! ractor's blanket `Message` impl: every actor message type of the program needs
//! `impl ractor::Message for MyMsg {}` (pyvisor's own types have theirs).

mod error;
mod node;

pub use error::ClusterError;
pub use node::{Node, NodeConfig, NodeEvent, Peer};
