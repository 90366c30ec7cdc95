//! pyvisor never blocks a runtime thread: on a current-thread runtime (one thread for
//! everything), a 10 ms timer keeps firing on time while a pool starts, serves, loses a worker
//! to a crash, replaces it and shuts down, and while the telemetry guard is dropped with a
//! collector that does not answer. (One test per binary: the tracing subscriber is global.)
//!
//! Lateness here is a guard against blocking (the HTTP exporter's flush blocks for its timeout,
//! a /proc scan for as long as it reads), not a performance claim: the bound is generous.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyvisor::telemetry::{Protocol, TelemetryConfig};
use pyvisor::Pool;

/// A guard well above scheduling noise on a loaded 2-core machine, far below a blocked flush.
const LATE: Duration = Duration::from_millis(1500);

#[test]
fn a_timer_fires_on_time_while_a_pool_lives_and_dies() {
    // A "collector" that accepts connections and never answers: the exporter's flush waits
    // for its timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", silent.local_addr().expect("addr"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let guard = pyvisor::telemetry::init_with(
            &TelemetryConfig::default().endpoint(endpoint).protocol(Protocol::HttpProtobuf).service_name("pyvisor-blocking-test"),
        );
        let worst = Arc::new(AtomicU64::new(0));
        let ticker = tokio::spawn({
            let worst = Arc::clone(&worst);
            async move {
                let period = Duration::from_millis(10);
                let mut last = Instant::now();
                loop {
                    tokio::time::sleep(period).await;
                    let late = last.elapsed().saturating_sub(period);
                    worst.fetch_max(late.as_micros() as u64, Ordering::Relaxed);
                    last = Instant::now();
                }
            }
        });
        let check = |what: &str| {
            let late = Duration::from_micros(worst.load(Ordering::Relaxed));
            assert!(late < LATE, "the timer fired {late:?} late during {what}: a runtime thread blocked");
        };

        let pool = Pool::start(common::spec("stubborn.py").workers(2)).await.expect("pool starts");
        for i in 0..20u64 {
            let v: u64 = pool.call("echo", &i).await.unwrap_or(i);
            assert_eq!(v, i);
        }
        // A worker with a subprocess dies: its family is buried.
        let _: u32 = pool.call("spawn_child", &()).await.expect("spawn_child");
        let victim = pool.status().await.workers.iter().find_map(|w| w.pid).expect("a worker");
        common::signal(victim, libc::SIGKILL);
        let replaced = async {
            loop {
                let s = pool.status().await;
                if s.workers.iter().filter(|w| w.pid.is_some_and(|p| p != victim) && w.state == pyvisor::WorkerState::Ready).count() == 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), replaced).await.expect("the worker is replaced");
        check("start, calls and a crash");
        pool.shutdown().await;
        check("shutdown");
        // The collector does not answer: the flush must not stop this thread.
        drop(guard);
        tokio::time::sleep(Duration::from_millis(100)).await;
        check("the drop of the telemetry guard");
        ticker.abort();
    });
}
