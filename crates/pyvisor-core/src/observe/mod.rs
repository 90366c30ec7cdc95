//! Observation: what pyvisor tells the outside about calls and workers.
//!
//! - [`telemetry`] (public): the OpenTelemetry set-up the CLI, examples and users share;
//! - [`call_trace`]: per-call spans (call, queue wait, attempt), made with the OpenTelemetry
//!   API directly; [`function_span`]: the Python function's span from the worker's timing;
//!   [`tracing_ctx`]: W3C trace context in and out;
//! - [`metrics`]: OpenTelemetry metrics (calls, retries, restarts, recycles, crashes, gauges);
//!   [`prometheus`] (public as `pyvisor_core::metrics`): the same metrics as plain values, their
//!   definitions, and the Prometheus text format.
//!
//! Lifecycle events (spawn, ready, crash, restart, quarantine, recycle) are emitted as
//! `tracing` spans by `crate::shared::PoolShared::emit`.

pub(crate) mod call_trace;
pub(crate) mod function_span;
pub(crate) mod metrics;
pub mod prometheus;
pub mod telemetry;
pub(crate) mod tracing_ctx;
