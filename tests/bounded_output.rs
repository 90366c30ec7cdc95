//! A worker that prints one enormous line costs the parent a bounded amount of memory: lines
//! are cut while their bytes arrive (issue 13, item 1). Alone in its test binary, so the peak
//! RSS it measures is this test's own.

mod common;

use std::time::Duration;

use pyvisor::Pool;

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_mib_line_without_a_newline_costs_the_parent_little_and_arrives_cut() {
    let pool = Pool::start(common::spec("faults.py").workers(1).heartbeat_interval(Duration::from_secs(5))).await.unwrap();
    // Reset the peak RSS to the current RSS (clear_refs 5), then measure the rise.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = vm_hwm_kib();
    let mib: u32 = pool.call("long_line", &300u32).await.unwrap();
    assert_eq!(mib, 300);
    // The stderr tail reaches the certificate: kill the worker and read it.
    let pid = pool.status().await.workers[0].pid.unwrap();
    common::signal(pid, libc::SIGKILL);
    assert!(common::eventually(Duration::from_secs(20), || pool.death_certificates().iter().any(|c| c.pid == Some(pid))).await);
    let rise_mib = vm_hwm_kib().saturating_sub(before) / 1024;
    let cert = pool.death_certificates().into_iter().find(|c| c.pid == Some(pid)).unwrap();
    let cut = cert.stderr_tail.iter().find(|l| l.contains("line cut")).expect("the long line arrives cut");
    assert!(cut.len() < 20 * 1024, "a cut line keeps at most 16 KiB: {} bytes", cut.len());
    assert!(cut.contains(&format!("{} more bytes", 300 * 1024 * 1024 - 16 * 1024)), "{}", &cut[cut.len() - 60..]);
    assert!(cert.stderr_tail.iter().any(|l| l == "after"), "the next line arrives whole");
    pool.shutdown().await;
    if reset {
        assert!(rise_mib < 32, "the parent's peak RSS rose by {rise_mib} MiB for one 300 MiB line");
    } else {
        eprintln!("skipped the RSS bound: /proc/self/clear_refs is not writable here");
    }
}
