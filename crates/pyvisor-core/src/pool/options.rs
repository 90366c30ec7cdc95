//! Per-call options: timeout or deadline, idempotency override, idempotency key, trace context,
//! affinity key.
//!
//! Owns [`CallOptions`] and how they resolve into a call's deadline; nothing else.

use std::sync::Arc;
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
    affinity: Option<Arc<str>>,
    idempotency_key: Option<Arc<str>>,
    /// The out-of-band buffers the payload references (set by the handle that encoded it).
    /// (`None` for none: a plain call allocates nothing for it).
    buffers: Option<Arc<[crate::os::memfd::SharedBytes]>>,
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
    /// Session affinity: calls with the same `key` go to the same worker while it lives, so
    /// that state kept in the worker (an open connection, a loaded document) is there. When
    /// that worker is gone, the key's next call fails once with
    /// [`crate::CallError::AffinityLost`] (rebuild the state) and the key is bound to another
    /// worker. A keyed call is never retried on another worker after a crash. See
    /// docs/affinity.md.
    ///
    /// ```
    /// use pyvisor_core::CallOptions;
    /// let opts = CallOptions::new().affinity("session-42");
    /// assert_eq!(opts.affinity_key(), Some("session-42"));
    /// ```
    pub fn affinity(mut self, key: impl Into<Arc<str>>) -> Self {
        self.affinity = Some(key.into());
        self
    }
    /// The affinity key, if set.
    pub fn affinity_key(&self) -> Option<&str> {
        self.affinity.as_deref()
    }
    /// Give the call an idempotency key: calls with one key run the function once. Concurrent
    /// ones are coalesced into one execution and all get its outcome; a later one gets the
    /// kept outcome (for the pool's [`crate::IdempotencyPolicy`] time) without running
    /// anything. A crash before the function started is retried even for a non-idempotent
    /// function; after it started, the call fails with `WorkerCrashed { started: true }` and
    /// that outcome is kept like a result. The key with another function or payload fails
    /// with `IdempotencyKeyConflict`. See docs/idempotency.md.
    ///
    /// ```
    /// use pyvisor_core::CallOptions;
    /// let opts = CallOptions::new().idempotency_key("order-1234/charge");
    /// assert_eq!(opts.get_idempotency_key(), Some("order-1234/charge"));
    /// ```
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(Arc::from(key.into()));
        self
    }
    /// The idempotency key, if set.
    pub fn get_idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }
    /// Propagate this W3C trace context to the worker.
    #[must_use]
    pub fn trace_context(mut self, traceparent: impl Into<String>, tracestate: Option<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self.tracestate = tracestate;
        self
    }
    /// The W3C trace context given with [`CallOptions::trace_context`], if any.
    pub fn get_trace_context(&self) -> Option<(&str, Option<&str>)> {
        Some((self.traceparent.as_deref()?, self.tracestate.as_deref()))
    }
    /// The deadline of a call made at `called` with these options, where `default` is the
    /// timeout that applies when none was given (a pool's call timeout); `None`: no deadline.
    /// What a caller that forwards the call elsewhere (another node) measures its time by.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pyvisor_core::CallOptions;
    /// let now = tokio::time::Instant::now();
    /// let opts = CallOptions::new().timeout(Duration::from_secs(2));
    /// assert_eq!(opts.deadline_at(now, Some(Duration::from_secs(30))), Some(now + Duration::from_secs(2)));
    /// assert_eq!(CallOptions::new().no_timeout().deadline_at(now, Some(Duration::from_secs(30))), None);
    /// ```
    pub fn deadline_at(&self, called: Instant, default: Option<Duration>) -> Option<Instant> {
        self.deadline_from(called, default)
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
    pub(crate) fn key(&self) -> Option<&Arc<str>> {
        self.idempotency_key.as_ref()
    }
    pub(crate) fn traceparent_str(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }
    pub(crate) fn tracestate_str(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }
    pub(crate) fn affinity_arc(&self) -> Option<&Arc<str>> {
        self.affinity.as_ref()
    }
    pub(crate) fn with_buffers(mut self, buffers: Option<Arc<[crate::os::memfd::SharedBytes]>>) -> Self {
        self.buffers = buffers;
        self
    }
    pub(crate) fn buffers(&self) -> &[crate::os::memfd::SharedBytes] {
        self.buffers.as_deref().unwrap_or(&[])
    }
}
