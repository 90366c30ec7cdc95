//! The library half of the `pyvisor` command: what the binary serves that other programs (and
//! the tests) can reuse.
//!
//! - [`http`]: the HTTP endpoints of a running tree (`/healthz`, `/readyz`, `/status`,
//!   `/metrics`), as `pyvisor run --http` serves them.

pub mod http;
