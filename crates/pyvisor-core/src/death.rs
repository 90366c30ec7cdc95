//! Death certificates: the record of one worker crash.
//!
//! Owns the [`DeathCertificate`] type and its rendering. It does not decide anything about the
//! crash (replacement and call failure are the router's and the worker actor's).

use std::fmt;
use std::time::{Duration, SystemTime};

/// Identifies one worker process over the pool's lifetime (a replacement gets a new id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// Why a worker died.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum DeathCause {
    /// The process exited or was killed by a signal that pyvisor did not send.
    Exited,
    /// The worker sent something that is not the protocol; pyvisor killed it.
    ProtocolError(String),
    /// The worker did not send `hello` within the start timeout; pyvisor killed it.
    StartTimeout(Duration),
    /// The worker speaks another protocol version; pyvisor killed it.
    VersionMismatch {
        /// Version the worker announced.
        worker: u32,
        /// Version this parent speaks.
        parent: u32,
    },
    /// The process could not be spawned at all.
    SpawnFailed(String),
    /// The worker's actor failed (a bug in pyvisor; please report it).
    ActorFailed(String),
    /// No beat for `silent_for` (more than `max_missed` intervals); pyvisor killed it.
    Hung {
        /// Time since the last beat (or since ready).
        silent_for: Duration,
    },
    /// Its memory passed the hard limit; pyvisor killed it.
    MemoryLimit {
        /// Measured bytes (PSS/USS where readable, else RSS).
        bytes: u64,
        /// The hard limit.
        limit: u64,
    },
    /// The worker stopped reading its socket (no answer to a `ping` for `silent_for`, while
    /// it kept beating); pyvisor killed it.
    Unresponsive {
        /// Time since the oldest unanswered ping was sent.
        silent_for: Duration,
    },
    /// A call overran its deadline by more than the harakiri grace; pyvisor killed it.
    Harakiri {
        /// The call's id.
        call_id: u64,
        /// Its function.
        function: String,
        /// How far past its deadline it was.
        overrun: Duration,
    },
}

impl DeathCause {
    /// A short, stable name: `exited`, `protocol_error`, `start_timeout`, `version_mismatch`,
    /// `spawn_failed`, `actor_failed`, `hung`, `unresponsive`, `memory_limit`, `harakiri`.
    pub fn kind(&self) -> &'static str {
        match self {
            DeathCause::Exited => "exited",
            DeathCause::ProtocolError(_) => "protocol_error",
            DeathCause::StartTimeout(_) => "start_timeout",
            DeathCause::VersionMismatch { .. } => "version_mismatch",
            DeathCause::SpawnFailed(_) => "spawn_failed",
            DeathCause::ActorFailed(_) => "actor_failed",
            DeathCause::Hung { .. } => "hung",
            DeathCause::MemoryLimit { .. } => "memory_limit",
            DeathCause::Unresponsive { .. } => "unresponsive",
            DeathCause::Harakiri { .. } => "harakiri",
        }
    }
}

impl fmt::Display for DeathCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeathCause::Exited => write!(f, "process exited"),
            DeathCause::ProtocolError(e) => write!(f, "protocol error: {e}"),
            DeathCause::StartTimeout(d) => write!(f, "no hello within the start timeout ({d:?})"),
            DeathCause::VersionMismatch { worker, parent } => write!(
                f,
                "protocol version mismatch: worker speaks {worker}, pyvisor speaks {parent} \
                 (install the pyvisor-worker matching this pyvisor)"
            ),
            DeathCause::SpawnFailed(e) => write!(f, "could not spawn the interpreter: {e}"),
            DeathCause::ActorFailed(e) => write!(f, "worker actor failed: {e}"),
            DeathCause::Hung { silent_for } => write!(f, "hung: no beat for {silent_for:.1?}"),
            DeathCause::MemoryLimit { bytes, limit } => {
                write!(f, "memory {} MiB passed the hard limit of {} MiB", bytes >> 20, limit >> 20)
            }
            DeathCause::Unresponsive { silent_for } => {
                write!(f, "stopped reading its socket: no answer to a ping for {silent_for:.1?}")
            }
            DeathCause::Harakiri { call_id, function, overrun } => {
                write!(f, "harakiri: call {call_id} to `{function}` ran {overrun:.1?} past its deadline")
            }
        }
    }
}

/// A call that was in flight on a worker when it died.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CallInFlight {
    /// Call id.
    pub id: u64,
    /// Function name.
    pub function: String,
    /// Attempt number.
    pub attempt: u32,
    /// How long it had been on the worker.
    pub running_for: Duration,
    /// W3C trace id of the call, when it was traced.
    pub trace_id: Option<String>,
    /// Whether its caller had given up on it (cancelled or timed out) while the worker still
    /// held it.
    pub abandoned: bool,
}

/// The record of one worker crash: who, how, and what it took with it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct DeathCertificate {
    /// Pool name.
    pub pool: String,
    /// The worker.
    pub worker: WorkerId,
    /// Its position in the pool (stable across replacements).
    pub index: usize,
    /// Process id, when it was spawned.
    pub pid: Option<u32>,
    /// Why it died.
    pub cause: DeathCause,
    /// Exit code, when it exited normally.
    pub exit_code: Option<i32>,
    /// Signal that killed it, when it was killed.
    pub signal: Option<i32>,
    /// Whether pyvisor sent the kill (protocol error, start timeout, hang).
    pub killed_by_pyvisor: bool,
    /// Whether the kernel's OOM killer probably killed it (SIGKILL that pyvisor did not send,
    /// and the cgroup's `oom_kill` counter rose during the worker's life).
    pub oom_suspected: bool,
    /// How long it lived.
    pub uptime: Duration,
    /// Whether it had sent `hello`.
    pub became_ready: bool,
    /// When it died.
    pub died_at: SystemTime,
    /// The last beat's RSS, in bytes.
    pub last_rss: Option<u64>,
    /// How long before death the last beat arrived.
    pub last_beat_age: Option<Duration>,
    /// Calls it held.
    pub calls_in_flight: Vec<CallInFlight>,
    /// Last lines of its stderr.
    pub stderr_tail: Vec<String>,
    /// Python stack, when one was captured.
    pub python_stack: Option<String>,
}

/// Signals that mean the process faulted by itself (a crash in C code, an abort).
pub fn is_fault_signal(sig: i32) -> bool {
    matches!(sig, libc::SIGSEGV | libc::SIGBUS | libc::SIGABRT | libc::SIGFPE | libc::SIGILL)
}

impl DeathCertificate {
    /// Whether the process died of a fault signal (SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL).
    pub fn is_fault(&self) -> bool {
        self.signal.is_some_and(is_fault_signal)
    }

    /// Whether this death may have been caused by the calls it held. An external kill (SIGKILL,
    /// SIGTERM, SIGINT, SIGHUP that pyvisor did not send, and not the OOM killer) does not
    /// implicate them: random kills of busy workers must never make a call look poisonous.
    pub fn implicates_calls(&self) -> bool {
        !self.is_external_kill()
            && !matches!(self.cause, DeathCause::SpawnFailed(_) | DeathCause::VersionMismatch { .. })
    }

    /// Whether the process was killed from outside: SIGKILL, SIGTERM, SIGINT or SIGHUP that
    /// pyvisor did not send and that the OOM killer did not (probably) cause.
    pub fn is_external_kill(&self) -> bool {
        !self.killed_by_pyvisor
            && !self.oom_suspected
            && matches!(self.signal, Some(libc::SIGKILL | libc::SIGTERM | libc::SIGINT | libc::SIGHUP))
    }

    /// A human name for how the process ended: `exit code 1`, `signal 9 (SIGKILL)`.
    pub fn ending(&self) -> String {
        match (self.exit_code, self.signal) {
            (_, Some(sig)) => match limit_signal(sig) {
                Some(limit) => format!("signal {sig} ({}: {limit})", signal_name(sig)),
                None => format!("signal {sig} ({})", signal_name(sig)),
            },
            (Some(code), None) => format!("exit code {code}"),
            (None, None) => "no exit status".to_string(),
        }
    }
}

/// The resource limit whose soft limit the kernel enforces with `sig`, described: SIGXCPU for
/// the CPU time limit, SIGXFSZ for the file size limit. Such a death is the worker's own doing.
fn limit_signal(sig: i32) -> Option<&'static str> {
    match sig {
        libc::SIGXCPU => Some("CPU time limit (RLIMIT_CPU) reached"),
        libc::SIGXFSZ => Some("file size limit (RLIMIT_FSIZE) exceeded"),
        _ => None,
    }
}

/// The conventional name of a signal number.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => "signal",
    }
}

impl fmt::Display for DeathCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "worker {} (pool {}, pid {}) died: {}; {}; up {:.1?}{}",
            self.worker,
            self.pool,
            self.pid.map_or_else(|| "-".to_string(), |p| p.to_string()),
            self.cause,
            self.ending(),
            self.uptime,
            if self.became_ready { "" } else { "; never became ready" },
        )?;
        if self.oom_suspected {
            write!(f, "; the OOM killer probably killed it")?;
        }
        if !self.calls_in_flight.is_empty() {
            write!(f, "; {} call(s) in flight", self.calls_in_flight.len())?;
        }
        if !self.stderr_tail.is_empty() {
            write!(f, "\n--- last stderr lines ---")?;
            for line in &self.stderr_tail {
                write!(f, "\n{line}")?;
            }
        }
        Ok(())
    }
}
