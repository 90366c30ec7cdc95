//! Workers: one Python process each, owned by a worker actor.
//!
//! - [`actor`]: the worker actor — spawn, `hello`, the reader task that delivers replies
//!   straight to their callers, periodic checks, recycling drain, graceful stop, and death
//!   (a [`crate::DeathCertificate`], every call in flight failed with it). Whatever way the
//!   actor ends, its `Drop` fails what is still pending and kills the process group.
//! - [`health`]: the verdicts of the periodic check (hung, unresponsive, harakiri, memory,
//!   recycling thresholds), as a pure function.
//!
//! Workers report to the pool router through a [`Reporter`] callback, so this module does
//! not depend on the router; processes are spawned through [`crate::process`].

pub(crate) mod actor;
pub(crate) mod health;

pub(crate) use actor::{Reporter, WorkerActor, WorkerArgs, WorkerDied, WorkerMsg, WorkerReport};
