//! The errors a user sees: [`CallError`] for one call, [`StartError`] for a pool.
//!
//! Each variant names what went wrong and carries what is needed to act on it (the available
//! functions, the Python traceback, the death certificate).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::confine::ConfineError;
use crate::death::DeathCertificate;

/// A Python exception raised by the called function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonError {
    /// Exception class, qualified (`ValueError`, `mymod.MyError`).
    pub type_name: String,
    /// `str(exception)`.
    pub message: String,
    /// The formatted traceback, when the worker sent one.
    pub traceback: Option<String>,
}

impl std::fmt::Display for PythonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.type_name, self.message)
    }
}

/// Why a call failed. Cheap to clone (what is large is shared): the callers coalesced into one
/// keyed execution each get a clone of its outcome.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// No worker exposes a function of that name.
    #[error("unknown function `{function}`; the workers expose: {}", available.join(", "))]
    UnknownFunction {
        /// The name asked for.
        function: String,
        /// The names the workers expose.
        available: Vec<String>,
    },
    /// The function raised; the Python traceback is in the error.
    #[error("`{function}` raised {error}")]
    Python {
        /// The function called.
        function: String,
        /// The exception.
        error: Box<PythonError>,
    },
    /// The input could not be encoded as MessagePack.
    #[error("the input for `{function}` cannot be serialized: {detail}")]
    Serialize {
        /// The function called.
        function: String,
        /// serde's message.
        detail: String,
    },
    /// The function's result does not deserialize into the requested output type.
    #[error("the result of `{function}` does not deserialize into the requested type: {detail}")]
    Deserialize {
        /// The function called.
        function: String,
        /// serde's message.
        detail: String,
    },
    /// The encoded call exceeds the maximum frame size.
    #[error("the call to `{function}` is {size} bytes, over the {max}-byte frame limit (raise `max_frame`)")]
    PayloadTooLarge {
        /// The function called.
        function: String,
        /// Encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// An out-of-band buffer of the call's input is larger than the pool's `max_buffer`.
    #[error("a buffer in the call to `{function}` is {size} bytes, over the pool's {max}-byte max_buffer (raise `BufferPolicy::max_buffer`)")]
    BufferTooLarge {
        /// The function called.
        function: String,
        /// The buffer's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The worker could not send the result back (too large, or not encodable).
    #[error("the worker could not return the result of `{function}`: {message}")]
    BadResult {
        /// The function called.
        function: String,
        /// The worker's explanation (e.g. `reply_too_large`, an int over 64 bits).
        message: String,
    },
    /// The call's deadline passed.
    #[error("`{function}` timed out after {after:?}{}", if *.sent { " (it was running on a worker; cancel was sent)" } else { " (it never reached a worker)" })]
    Timeout {
        /// The function called.
        function: String,
        /// Time from the call to the deadline.
        after: Duration,
        /// Whether it had been sent to a worker.
        sent: bool,
    },
    /// The call waited in the queue for longer than the queue timeout.
    #[error("`{function}` waited {waited:?} in the queue for a free worker (queue_timeout); add workers or raise max_in_flight")]
    QueueTimeout {
        /// The function called.
        function: String,
        /// How long it waited.
        waited: Duration,
    },
    /// The queue is full.
    #[error("pool `{pool}` is overloaded: {max_queue} calls are already queued; retry later or raise max_queue")]
    Overloaded {
        /// Pool name.
        pool: String,
        /// The queue bound.
        max_queue: usize,
    },
    /// The worker running the call died; the certificate says how.
    #[error("the worker running `{function}` crashed (attempt {attempts}{}{}): {certificate}", if *.started { "" } else { "; the function had not started" }, .delivered.map(|n| format!("; {n} stream items delivered")).unwrap_or_default())]
    WorkerCrashed {
        /// The function called.
        function: String,
        /// How many attempts were made.
        attempts: u32,
        /// How the (last) worker died.
        certificate: Arc<DeathCertificate>,
        /// Whether the function started, or may have started, on some attempt. `false` only
        /// when the parent knows that it never ran: a call with an idempotency key, on
        /// workers that acknowledge the start of a call, whose dead workers' sockets were read
        /// to their end without an acknowledgement. Every other crash says `true` ("may have
        /// run"); see docs/idempotency.md.
        started: bool,
        /// For a stream: the items its caller received before the crash (`None` for a call).
        delivered: Option<u64>,
    },
    /// The worker running a stream that asked to be restarted after a crash
    /// ([`crate::StreamOptions::restart_on_crash`]) died after `delivered` items: the stream
    /// goes on, **from its first item again**, on another worker. Not the stream's end: the
    /// items that follow may repeat the ones already received.
    #[error("the worker streaming `{function}` crashed after {delivered} items; the stream restarts from its first item (attempt {attempt}): {certificate}")]
    StreamRestarted {
        /// The function streamed.
        function: String,
        /// Items received from the attempt that crashed.
        delivered: u64,
        /// The attempt that starts now.
        attempt: u32,
        /// How the worker died.
        certificate: Arc<DeathCertificate>,
    },
    /// A stream of a function that is not a generator, or a call of one that is.
    #[error("{}", if *.stream { format!("`{function}` is a generator function: stream it (Pool::stream)") } else { format!("`{function}` is not a generator function: call it (Pool::call), it cannot be streamed") })]
    StreamMismatch {
        /// The function.
        function: String,
        /// Whether the function is a generator (it streams).
        stream: bool,
    },
    /// The worker that held this affinity key's state is gone (crashed, recycled, or removed
    /// with its pool): state kept in it (an open connection, a loaded document) must be rebuilt.
    /// Said once per loss: the key's next call goes to another worker and is bound there. A
    /// keyed call in flight when its worker died gets this too (it is not retried elsewhere:
    /// the state it relied on is gone), and that is the key's one notice.
    #[error("affinity key `{key}` lost its worker ({reason}); rebuild its state: the next call binds it to another worker")]
    AffinityLost {
        /// The key.
        key: String,
        /// Why its worker is gone.
        reason: AffinityLostReason,
    },
    /// The call crashed its workers repeatedly (or is quarantined for having done so): it is a
    /// poison request and is refused until the quarantine window ends.
    #[error("`{function}` is a poison request: {}; quarantined for {quarantined_for:.0?}{}", if *refused { "refused at once" } else { "it crashed the workers running it" }, certificates.last().map(|c| format!("; last: {c}")).unwrap_or_default())]
    PoisonRequest {
        /// The function called.
        function: String,
        /// The deaths it caused, in order.
        certificates: Vec<Arc<DeathCertificate>>,
        /// Time left in quarantine.
        quarantined_for: Duration,
        /// Whether it was refused by the quarantine without being sent.
        refused: bool,
    },
    /// The worker reported an internal failure (e.g. it is shutting down).
    #[error("worker failure in `{function}`: {message}")]
    Worker {
        /// The function called.
        function: String,
        /// The worker's message.
        message: String,
    },
    /// The idempotency key is held by a call to another function, or with another payload:
    /// one key names one execution (docs/idempotency.md).
    #[error("idempotency key `{key}` belongs to a call to `{held_by}` {}; one key names one execution", if held_by == function { "with another payload".to_string() } else { format!("(this call is to `{function}`)") })]
    IdempotencyKeyConflict {
        /// The key.
        key: String,
        /// The function this call asked for.
        function: String,
        /// The function of the call that holds the key (the same name: another payload).
        held_by: String,
    },
    /// The pool has been shut down.
    #[error("pool `{pool}` is shut down")]
    ShutDown {
        /// Pool name.
        pool: String,
    },
    /// The pool failed (too many start failures) and takes no calls.
    #[error("pool `{pool}` has failed: {reason}")]
    PoolFailed {
        /// Pool name.
        pool: String,
        /// Why it failed.
        reason: Arc<StartError>,
    },
}

impl CallError {
    /// A short, stable name for the error's kind (`python`, `timeout`, `worker_crashed`, ...),
    /// for metrics and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::UnknownFunction { .. } => "unknown_function",
            CallError::Python { .. } => "python",
            CallError::Serialize { .. } => "serialize",
            CallError::Deserialize { .. } => "deserialize",
            CallError::PayloadTooLarge { .. } => "payload_too_large",
            CallError::BufferTooLarge { .. } => "buffer_too_large",
            CallError::BadResult { .. } => "bad_result",
            CallError::Timeout { .. } => "timeout",
            CallError::QueueTimeout { .. } => "queue_timeout",
            CallError::Overloaded { .. } => "overloaded",
            CallError::WorkerCrashed { .. } => "worker_crashed",
            CallError::StreamRestarted { .. } => "stream_restarted",
            CallError::StreamMismatch { .. } => "stream_mismatch",
            CallError::AffinityLost { .. } => "affinity_lost",
            CallError::PoisonRequest { .. } => "poison_request",
            CallError::Worker { .. } => "worker",
            CallError::IdempotencyKeyConflict { .. } => "idempotency_key_conflict",
            CallError::ShutDown { .. } => "shut_down",
            CallError::PoolFailed { .. } => "pool_failed",
        }
    }
}

/// Why an affinity key's worker is gone ([`CallError::AffinityLost`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AffinityLostReason {
    /// It crashed; the certificate says how.
    Crashed(Arc<DeathCertificate>),
    /// It was recycled (age, requests, memory, or a lost watchdog): it drained and stopped.
    Recycled,
    /// It stopped for another reason than a crash or a recycle: its pool is shutting down
    /// (a call made once the pool has closed gets [`CallError::ShutDown`] instead).
    Removed,
}

impl std::fmt::Display for AffinityLostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AffinityLostReason::Crashed(c) => write!(f, "crashed: {c}"),
            AffinityLostReason::Recycled => f.write_str("recycled"),
            AffinityLostReason::Removed => f.write_str("removed"),
        }
    }
}

impl CallError {
    /// Whether sending the same call again is both safe and worth it: true only when the call
    /// certainly did not run (so a retry cannot run a non-idempotent function twice) and the
    /// refusal is transient (another try may succeed). What a `tower::retry` policy (or any
    /// retry around pyvisor) must ask; see docs/typed_handles_and_tower.md.
    ///
    /// - `true`: [`Overloaded`](CallError::Overloaded) (refused at admission),
    ///   [`QueueTimeout`](CallError::QueueTimeout) (never left the queue), and
    ///   [`Timeout`](CallError::Timeout) with `sent: false` (its deadline passed before it
    ///   reached a worker).
    /// - `false`: everything that may have run or will fail the same way again:
    ///   [`AffinityLost`](CallError::AffinityLost) (the key's state must be rebuilt first; a
    ///   call in flight at the death may have run);
    ///   [`IdempotencyKeyConflict`](CallError::IdempotencyKeyConflict) (the same call conflicts
    ///   again);
    ///   [`WorkerCrashed`](CallError::WorkerCrashed) always — the crash barrier has already
    ///   retried an idempotent call (up to `max_retries`) and refused to repeat a
    ///   non-idempotent one, and middleware must not overrule it;
    ///   [`StreamRestarted`](CallError::StreamRestarted) (not an end: the stream goes on);
    ///   [`StreamMismatch`](CallError::StreamMismatch) (the same call fails the same way);
    ///   `Timeout` with `sent: true`
    ///   (it may be running: cancel is cooperative); [`Python`](CallError::Python),
    ///   [`Deserialize`](CallError::Deserialize), [`BadResult`](CallError::BadResult) (it ran);
    ///   [`Worker`](CallError::Worker) (the worker failed with the call in hand);
    ///   [`PoisonRequest`](CallError::PoisonRequest) (quarantined: refused again until the
    ///   window ends); [`UnknownFunction`](CallError::UnknownFunction),
    ///   [`Serialize`](CallError::Serialize), [`PayloadTooLarge`](CallError::PayloadTooLarge),
    ///   [`BufferTooLarge`](CallError::BufferTooLarge) (the same call fails the same way); [`ShutDown`](CallError::ShutDown) and
    ///   [`PoolFailed`](CallError::PoolFailed) (the pool takes no calls; a call in flight when
    ///   it stopped may have run).
    ///
    /// ```
    /// use pyvisor_core::CallError;
    /// let full = CallError::Overloaded { pool: "p".into(), max_queue: 1024 };
    /// assert!(full.is_retryable());
    /// let ran = CallError::Timeout { function: "f".into(), after: std::time::Duration::from_secs(1), sent: true };
    /// assert!(!ran.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        match self {
            CallError::Overloaded { .. } | CallError::QueueTimeout { .. } => true,
            CallError::Timeout { sent, .. } => !sent,
            CallError::WorkerCrashed { .. }
            | CallError::StreamRestarted { .. }
            | CallError::StreamMismatch { .. }
            | CallError::AffinityLost { .. }
            | CallError::IdempotencyKeyConflict { .. }
            | CallError::PoisonRequest { .. }
            | CallError::Python { .. }
            | CallError::Deserialize { .. }
            | CallError::BadResult { .. }
            | CallError::Worker { .. }
            | CallError::UnknownFunction { .. }
            | CallError::Serialize { .. }
            | CallError::PayloadTooLarge { .. }
            | CallError::BufferTooLarge { .. }
            | CallError::ShutDown { .. }
            | CallError::PoolFailed { .. } => false,
        }
    }
}

/// Why a pool could not start (or stopped running).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The spec is not usable as given.
    #[error("invalid pool spec: {0}")]
    InvalidSpec(String),
    /// The confinement cannot be applied (a bad limit, an unknown user, a parent that is not
    /// root, a file the worker's user cannot reach); the error names the field.
    #[error("invalid pool spec: {0}")]
    Confinement(#[from] ConfineError),
    /// The configured working directory (`PoolSpec::cwd`) cannot be used.
    #[error("working directory {} {problem}; create it, fix its permissions, or change PoolSpec::cwd", path.display())]
    WorkingDirectory {
        /// The directory as configured.
        path: PathBuf,
        /// What is wrong with it (`does not exist`, `is not a directory`, ...).
        problem: String,
    },
    /// The worker script does not exist.
    #[error("worker script not found: {} (paths are relative to the working directory {})", path.display(), cwd.display())]
    ScriptNotFound {
        /// The script path as given.
        path: PathBuf,
        /// The directory it was resolved against.
        cwd: PathBuf,
    },
    /// The Python interpreter does not exist or is not executable.
    #[error("Python interpreter not found: {}; pass --python PATH, set PYVISOR_PYTHON, or use PoolSpec::python / ::venv", path.display())]
    InterpreterNotFound {
        /// The interpreter as configured.
        path: PathBuf,
    },
    /// Workers kept failing to start; the last death certificate says why.
    #[error("{failures} worker start failures within {period:?} (max_start_failures {max}); last: {certificate}{}", hint(certificate))]
    TooManyStartFailures {
        /// Failures counted.
        failures: usize,
        /// The window they were counted in.
        period: Duration,
        /// The limit.
        max: usize,
        /// The last failure.
        certificate: Box<DeathCertificate>,
    },
    /// The pool's actors could not be spawned.
    #[error("could not spawn the pool's actors: {0}")]
    Actor(String),
}

fn hint(cert: &DeathCertificate) -> &'static str {
    let stderr = cert.stderr_tail.join("\n");
    if stderr.contains("No module named pyvisor_worker") || stderr.contains("No module named 'pyvisor_worker'") {
        "\nhint: the interpreter cannot import pyvisor_worker; install it with `pip install ./python_adapter` into that interpreter (or run `pyvisor doctor`)"
    } else if stderr.contains("No module named 'msgpack'") {
        "\nhint: the interpreter lacks msgpack; `pip install msgpack` (or reinstall ./python_adapter)"
    } else {
        ""
    }
}

impl CallError {
    /// The error for a failure the worker reported for a call to `function`; `functions` is
    /// the pool's function table, for the unknown-function hint when the worker sent none.
    pub(crate) fn from_remote(
        function: &str,
        e: pyvisor_protocol::RemoteError,
        functions: Option<&Vec<pyvisor_protocol::FunctionInfo>>,
    ) -> CallError {
        use pyvisor_protocol::RemoteErrorKind;
        let function = function.to_string();
        match e.kind {
            RemoteErrorKind::Exception => CallError::Python {
                function,
                error: Box::new(PythonError { type_name: e.type_name, message: e.message, traceback: e.traceback }),
            },
            RemoteErrorKind::UnknownFunction => CallError::UnknownFunction {
                function,
                available: e.functions.unwrap_or_else(|| {
                    functions.map(|f| f.iter().map(|f| f.name.clone()).collect()).unwrap_or_default()
                }),
            },
            RemoteErrorKind::StreamMismatch => {
                let stream = functions.and_then(|f| f.iter().find(|f| f.name == function)).is_some_and(|f| f.stream);
                CallError::StreamMismatch { function, stream }
            }
            RemoteErrorKind::ReplyTooLarge | RemoteErrorKind::Unserializable => {
                CallError::BadResult { function, message: format!("{}: {}", e.type_name, e.message) }
            }
            _ => CallError::Worker { function, message: format!("{}: {}", e.type_name, e.message) },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::time::Duration;

    use super::{CallError, PythonError, StartError};
    use crate::barrier::testing::death;

    /// One error of every kind, with whether a retry around the pool may send it again.
    fn every_variant() -> Vec<(CallError, bool)> {
        let f = || "f".to_string();
        let cert = Arc::new(death(None, Some(libc::SIGKILL), &[(1, false)]));
        vec![
            (CallError::UnknownFunction { function: f(), available: vec!["g".into()] }, false),
            (CallError::AffinityLost { key: "k".into(), reason: super::AffinityLostReason::Crashed(Arc::clone(&cert)) }, false),
            (CallError::IdempotencyKeyConflict { key: "k".into(), function: f(), held_by: f() }, false),
            (
                CallError::Python {
                    function: f(),
                    error: Box::new(PythonError { type_name: "ValueError".into(), message: "m".into(), traceback: None }),
                },
                false,
            ),
            (CallError::Serialize { function: f(), detail: "d".into() }, false),
            (CallError::Deserialize { function: f(), detail: "d".into() }, false),
            (CallError::PayloadTooLarge { function: f(), size: 2, max: 1 }, false),
            (CallError::BadResult { function: f(), message: "m".into() }, false),
            (CallError::Timeout { function: f(), after: Duration::from_secs(1), sent: false }, true),
            (CallError::Timeout { function: f(), after: Duration::from_secs(1), sent: true }, false),
            (CallError::QueueTimeout { function: f(), waited: Duration::from_secs(10) }, true),
            (CallError::Overloaded { pool: "p".into(), max_queue: 1 }, true),
            // Non-idempotent (failed at once) or idempotent with retries spent: the same error,
            // and never for middleware to repeat.
            (CallError::WorkerCrashed { function: f(), attempts: 1, certificate: Arc::clone(&cert), started: true, delivered: None }, false),
            (CallError::WorkerCrashed { function: f(), attempts: 3, certificate: Arc::clone(&cert), started: false, delivered: None }, false),
            (CallError::WorkerCrashed { function: f(), attempts: 1, certificate: Arc::clone(&cert), started: true, delivered: Some(5) }, false),
            (CallError::StreamRestarted { function: f(), delivered: 5, attempt: 2, certificate: Arc::clone(&cert) }, false),
            (CallError::StreamMismatch { function: f(), stream: true }, false),
            (
                CallError::PoisonRequest {
                    function: f(),
                    certificates: vec![Arc::clone(&cert)],
                    quarantined_for: Duration::from_secs(300),
                    refused: false,
                },
                false,
            ),
            (
                CallError::PoisonRequest {
                    function: f(),
                    certificates: vec![cert],
                    quarantined_for: Duration::from_secs(300),
                    refused: true,
                },
                false,
            ),
            (CallError::Worker { function: f(), message: "m".into() }, false),
            (CallError::ShutDown { pool: "p".into() }, false),
            (CallError::PoolFailed { pool: "p".into(), reason: Arc::new(StartError::InvalidSpec("x".into())) }, false),
        ]
    }

    #[test]
    fn is_retryable_only_for_calls_that_never_ran() {
        for (error, retryable) in every_variant() {
            assert_eq!(error.is_retryable(), retryable, "{} ({error})", error.kind());
        }
    }

    #[test]
    fn every_variant_is_covered() {
        let kinds: HashSet<&str> = every_variant().iter().map(|(e, _)| e.kind()).collect();
        // `kind` is an exhaustive match: a new variant gets a new kind, and must be added above.
        assert_eq!(kinds.len(), 18, "{kinds:?}");
    }
}
