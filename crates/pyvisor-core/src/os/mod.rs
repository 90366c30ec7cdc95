//! The operating system's side of a worker's processes: pidfds, `/proc`, the markers a run
//! leaves in its processes' environments, and the end of a worker's process family.
//!
//! Owns every signal pyvisor sends and every process it reaps, so that no signal can reach a
//! reused pid and no exit status of the embedding program's own children is ever taken:
//! - [`pidfd`]: one process through a pidfd (signal, observe the exit without reaping, reap);
//! - [`procfs`]: reading `/proc` (stat fields, environment markers);
//! - [`markers`]: the run and family markers, the start-up sweep of earlier runs' orphans, the
//!   exit hook and the child-subreaper setting;
//! - [`family`]: a worker's leader, its process group and its escapees, and their burial;
//! - [`memfd`]: sealed memfds (the out-of-band buffers of docs/buffers.md and docs/protocol.md),
//!   their checks, read-only mappings and passing over a Unix socket.
//!
//! It does not spawn (see [`crate::process`]) and does not decide when a worker ends (see
//! [`crate::worker`]).

pub(crate) mod family;
pub(crate) mod memfd;
pub mod markers;
pub(crate) mod pidfd;
pub(crate) mod procfs;
