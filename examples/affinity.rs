//! Session affinity: state kept in a Python worker (an open document per session) is reached by
//! sending a session's calls with its key; when the worker holding it dies, the next call says
//! so once (`AffinityLost`), and the session is opened again on another worker.
//!
//! `PYVISOR_PYTHON=.venv/bin/python cargo run --example affinity` (after `make demo`).

use pyvisor::{AffinityLostReason, CallError, CallOptions, Pool, PoolSpec};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _telemetry = pyvisor::telemetry::init();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workers/sessions.py");
    let pool = Pool::start(PoolSpec::script(script).name("sessions").workers(3)).await?;

    let key = "session-7";
    let opts = || CallOptions::new().affinity(key);
    let pid: u32 = pool.call_with("open_session", &key, opts()).await?;
    for line in ["first line", "second line"] {
        let n: usize = pool.call_with("append", &(key, line), opts()).await?;
        println!("{key}: {n} line(s) in the document held by pid {pid}");
    }

    // The worker holding the document dies (here: we kill it; in life: a segfault, the OOM killer).
    pool.chaos().kill(pool.chaos().ready_workers().into_iter().find(|(_, p)| *p == pid).map(|(w, _)| w));
    match pool.call_with::<_, usize>("append", &(key, "third line"), opts()).await {
        Err(CallError::AffinityLost { reason: AffinityLostReason::Crashed(cert), .. }) => {
            println!("{key}: its worker is gone ({}): opening the session again", cert.cause);
        }
        other => return Err(format!("expected AffinityLost, got {other:?}").into()),
    }
    // Told once: the key is bound to another worker now, where the session is rebuilt.
    let new_pid: u32 = pool.call_with("open_session", &key, opts()).await?;
    let n: usize = pool.call_with("append", &(key, "third line"), opts()).await?;
    let doc: Vec<String> = pool.call_with("read", &key, opts()).await?;
    println!("{key}: reopened on pid {new_pid}; {n} line(s): {doc:?}");
    assert_ne!(new_pid, pid);

    pool.shutdown().await;
    println!("affinity example done");
    Ok(())
}
