//! The path of a call with an idempotency key: return the key's kept outcome, join its
//! execution in flight, or start that execution.
//!
//! An execution runs as its own task (the plain call path, [`super::traced::traced_call`],
//! under the deadline of the call that started it), so a caller that drops its future or
//! whose own deadline passes leaves it running for the others: it ends on its own, its outcome
//! is kept if it ran (or may have), and later callers with the key get it. The callers of one
//! execution all get a clone of its outcome.
//!
//! Owns the waiting and the key's span attributes and metrics; the maps, the bounds and the
//! rule of what is kept are `barrier::idempotency`'s, the crash barrier's start-acknowledged
//! retry is the call path's.

use std::sync::Arc;

use tokio::time::Instant;

use super::options::CallOptions;
use crate::buffers::Reply;
use crate::barrier::idempotency::{Ended, Lookup, Shared};
use crate::barrier::quarantine::fingerprint;
use crate::error::CallError;
use crate::observe::call_trace::CallTrace;
use crate::shared::PoolShared;

/// Run a keyed call to its outcome. `attempts` is set to the attempts of the execution whose
/// outcome it returns (0 for a kept outcome or a conflict).
pub(crate) async fn call(
    shared: &Arc<PoolShared>,
    key: &Arc<str>,
    function: &str,
    payload: &[u8],
    opts: &CallOptions,
    attempts: &mut u32,
) -> Result<Reply, CallError> {
    let called = Instant::now();
    let fp = fingerprint(function, payload, opts.buffers());
    let lookup = shared.idempotency.lookup(key, function, fp, std::time::Instant::now());
    let (mut rx, how, deadline) = match lookup {
        Err(conflict) => {
            let outcome = Err(conflict);
            observe(shared, key, function, opts, None, &outcome, called);
            return outcome;
        }
        Ok(Lookup::Hit(outcome)) => {
            observe(shared, key, function, opts, Some("hit"), &outcome, called);
            return outcome;
        }
        Ok(Lookup::Coalesced(rx)) => (rx, "coalesced", opts.deadline_from(called, shared.spec.call_timeout)),
        Ok(Lookup::Miss(tx)) => {
            crate::observe::metrics::idempotency(&shared.name, function, "miss");
            let rx = tx.subscribe();
            spawn_execution(Arc::clone(shared), Arc::clone(key), function, payload, opts.clone(), tx);
            // The execution has this call's deadline: wait for it to end.
            (rx, "miss", None)
        }
    };
    let waited = async {
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        }
    };
    let ended: Option<Ended> = match deadline {
        Some(d) => match tokio::time::timeout_at(d, waited).await {
            Ok(e) => e,
            Err(_) => {
                // This caller's deadline passed; the execution goes on for the others.
                let outcome = Err(CallError::Timeout {
                    function: function.to_string(),
                    after: d.saturating_duration_since(called),
                    sent: true,
                });
                observe(shared, key, function, opts, Some(how), &outcome, called);
                return outcome;
            }
        },
        None => waited.await,
    };
    let outcome = match ended {
        Some((outcome, n)) => {
            *attempts = n;
            outcome
        }
        None => Err(CallError::Worker {
            function: function.to_string(),
            message: "the execution of the idempotency key ended without an outcome".into(),
        }),
    };
    if how == "coalesced" {
        observe(shared, key, function, opts, Some(how), &outcome, called);
    }
    outcome
}

/// Start the key's execution as its own task; the key leaves the in-flight map when it ends,
/// however it ends.
fn spawn_execution(
    shared: Arc<PoolShared>,
    key: Arc<str>,
    function: &str,
    payload: &[u8],
    opts: CallOptions,
    tx: tokio::sync::watch::Sender<Option<Ended>>,
) {
    /// Frees the key if the task ends without finishing (a panic, a runtime shutting down).
    struct Release {
        shared: Arc<PoolShared>,
        key: Arc<str>,
        armed: bool,
    }
    impl Drop for Release {
        fn drop(&mut self) {
            if self.armed {
                self.shared.idempotency.finish(&self.key, None, std::time::Instant::now());
            }
        }
    }
    let function = function.to_string();
    let payload = payload.to_vec();
    tokio::spawn(async move {
        let mut release = Release { shared, key, armed: true };
        let mut attempts = 0;
        let shared = Arc::clone(&release.shared);
        let outcome =
            super::traced::traced_call(&shared, &function, None, &payload, &opts, &mut attempts, Some((&release.key, "miss"))).await;
        // Kept (and the key freed) before the waiters hear it: a caller that got the outcome
        // and calls again with the key finds it kept (a hit), never the ending execution.
        shared.idempotency.finish(&release.key, Some(&outcome), std::time::Instant::now());
        release.armed = false;
        tx.send_replace(Some((outcome, attempts)));
    });
}

/// Span and metrics of a caller that ran nothing itself (a hit, a coalesced caller, a
/// conflict): a call span with the key and how it was found, the call's outcome metric, and
/// the key's counter.
fn observe(
    shared: &PoolShared,
    key: &str,
    function: &str,
    opts: &CallOptions,
    how: Option<&'static str>,
    outcome: &Shared,
    called: Instant,
) {
    if let Some(how) = how {
        crate::observe::metrics::idempotency(&shared.name, function, how);
    }
    if let Some(t) = CallTrace::start(&shared.name, function, opts.traceparent_str(), opts.tracestate_str()) {
        if let Some(how) = how {
            t.idempotency(key, how);
        }
        t.finish(outcome.as_ref().map(|_| ()), 0);
    }
    crate::observe::metrics::call_done(
        &shared.name,
        function,
        outcome.as_ref().map_or_else(|e| e.kind(), |_| "ok"),
        called.elapsed().as_secs_f64(),
    );
}
