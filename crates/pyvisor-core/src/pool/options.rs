//! Per-call options: timeout or deadline, idempotency override, trace context.
//!
//! Owns [`CallOptions`] and how they resolve into a call's deadline; nothing else.

use std::time::Duration;

use tokio::time::Instant;

/// Per-call options: timeout or deadline, and the idempotency override.
///
/// ```
/// use std::time::Duration;
/// use pyvisor_core::CallOptions;
/// let opts = CallOptions::new().timeout(Duration::from_millis(250)).idempotent(true);
/// assert_eq!(opts.idempotent_override(), Some(true));
/// ```
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    timeout: Option<Duration>,
    deadline: Option<Instant>,
    no_timeout: bool,
    idempotent: Option<bool>,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl CallOptions {
    /// The pool's defaults.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
    /// Fail with `Timeout` after `d` (instead of the pool's call timeout). A `d` too long for
    /// the clock (e.g. `Duration::MAX`) means no deadline.
    #[must_use]
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }
    /// Fail with `Timeout` at `at` (takes precedence over any timeout).
    #[must_use]
    pub fn deadline(mut self, at: Instant) -> Self {
        self.deadline = Some(at);
        self
    }
    /// No timeout at all for this call.
    #[must_use]
    pub fn no_timeout(mut self) -> Self {
        self.no_timeout = true;
        self
    }
    /// Override whether this call may be retried after a crash (default: the function's
    /// `@expose(idempotent=...)`).
    #[must_use]
    pub fn idempotent(mut self, yes: bool) -> Self {
        self.idempotent = Some(yes);
        self
    }
    /// The idempotency override, if set.
    pub fn idempotent_override(&self) -> Option<bool> {
        self.idempotent
    }
    /// Propagate this W3C trace context to the worker.
    #[must_use]
    pub fn trace_context(mut self, traceparent: impl Into<String>, tracestate: Option<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self.tracestate = tracestate;
        self
    }
}


impl CallOptions {
    /// The call's deadline, for a call made at `called` under a pool call timeout of
    /// `pool_timeout` (`None`: no deadline).
    pub(crate) fn deadline_from(&self, called: Instant, pool_timeout: Option<Duration>) -> Option<Instant> {
        match (self.deadline, self.no_timeout) {
            (Some(d), _) => Some(d),
            (None, true) => None,
            // A timeout too long for the clock is no deadline at all.
            (None, false) => self.timeout.or(pool_timeout).and_then(|t| called.checked_add(t)),
        }
    }
    pub(crate) fn traceparent_str(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }
    pub(crate) fn tracestate_str(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }
}
