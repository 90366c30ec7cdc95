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
    #[error("the worker running `{function}` crashed (attempt {attempts}{}): {certificate}", if *.started { "" } else { "; the function had not started" })]
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
            CallError::BadResult { .. } => "bad_result",
            CallError::Timeout { .. } => "timeout",
            CallError::QueueTimeout { .. } => "queue_timeout",
            CallError::Overloaded { .. } => "overloaded",
            CallError::WorkerCrashed { .. } => "worker_crashed",
            CallError::PoisonRequest { .. } => "poison_request",
            CallError::Worker { .. } => "worker",
            CallError::IdempotencyKeyConflict { .. } => "idempotency_key_conflict",
            CallError::ShutDown { .. } => "shut_down",
            CallError::PoolFailed { .. } => "pool_failed",
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
            RemoteErrorKind::ReplyTooLarge | RemoteErrorKind::Unserializable => {
                CallError::BadResult { function, message: format!("{}: {}", e.type_name, e.message) }
            }
            _ => CallError::Worker { function, message: format!("{}: {}", e.type_name, e.message) },
        }
    }
}
