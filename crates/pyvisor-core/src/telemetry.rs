//! One telemetry set-up for the CLI, the examples and users: a `tracing` subscriber with an
//! env filter (`PYVISOR_LOG`, else `RUST_LOG`, else `info`), writing to stderr.
//!
//! The OpenTelemetry export (issue 5) extends this module; callers keep calling [`init`].

use tracing_subscriber::EnvFilter;

/// Keeps telemetry running; flushes on drop (once exporters exist).
#[derive(Debug)]
#[must_use = "telemetry stops when the guard is dropped"]
pub struct TelemetryGuard {
    _private: (),
}

/// Install the global subscriber. Safe to call more than once (later calls do nothing).
///
/// ```
/// let _guard = pyvisor_core::telemetry::init();
/// tracing::info!("visible with PYVISOR_LOG=info");
/// ```
pub fn init() -> TelemetryGuard {
    let filter = std::env::var("PYVISOR_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    // ractor logs every actor at INFO; keep it quiet unless asked for.
    let filter = EnvFilter::try_new(format!("ractor=warn,{filter}")).unwrap_or_else(|_| EnvFilter::new("info,ractor=warn"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
    TelemetryGuard { _private: () }
}
