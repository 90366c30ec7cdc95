//! A worker's process family: its leader (the Python process pyvisor spawned), the process
//! group the leader leads, and its escapees (processes that left the group, found by the
//! family's `PYVISOR_FAMILY` marker), and their burial.
//!
//! Owns the rule that makes group signals safe: the leader is never reaped while the family
//! may still be signalled. Its exit is observed with `waitid(…, WNOWAIT)`; only [`Family::bury`]
//! (or the `Drop` of an unburied family) reaps it, after the last group signal. Burial runs on
//! a thread of its own (it reads `/proc` and waits for exits), never on an async thread.
//! It reaps only processes it identified — the leader, members of the leader's group and
//! marked escapees that were re-parented to this program — by pid or pidfd, never with
//! `waitpid(-1)`.
//!
//! It does not decide when a worker ends (the worker actor does) and does not spawn.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::markers::{kill_marked_among, subreaper_on, FAMILY_VAR};
use super::pidfd::{ExitInfo, Pidfd};
use super::procfs;

/// What a burial found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Burial {
    /// The leader's exit status (`None` if it could not be read).
    pub leader_exit: Option<ExitInfo>,
    /// Escapees killed by their marker.
    pub escapees: usize,
    /// Processes still alive when the time limit was up (SIGKILLed, so stuck in the kernel).
    pub survivors: usize,
}

/// A worker's leader and family token; see the module doc.
#[derive(Debug)]
pub(crate) struct Family {
    leader: Arc<Pidfd>,
    token: String,
    buried: bool,
}

/// How long a burial waits for SIGKILLed processes to disappear.
pub(crate) const BURIAL_LIMIT: Duration = Duration::from_secs(2);

impl Family {
    pub(crate) fn new(leader: Arc<Pidfd>, token: String) -> Family {
        Family { leader, token, buried: false }
    }

    /// Signal the leader alone (e.g. SIGUSR1 for a stack dump). False if it is gone.
    pub(crate) fn signal_leader(&self, sig: i32) -> bool {
        self.leader.signal(sig).unwrap_or(false)
    }

    /// Signal the leader's whole process group (safe: the leader is unreaped until burial).
    pub(crate) fn signal_group(&self, sig: i32) -> bool {
        match self.leader.signal_group(sig) {
            Ok(sent) => sent,
            Err(e) => {
                tracing::warn!(pid = self.leader.pid(), "cannot signal the worker's process group: {e}");
                false
            }
        }
    }

    /// SIGKILL the group and the escapees, wait (up to `limit`) until they are gone, reap what
    /// is ours to reap, the leader last. Runs on a thread of its own.
    pub(crate) async fn bury(mut self, limit: Duration) -> Burial {
        self.buried = true;
        let (leader, token) = (Arc::clone(&self.leader), std::mem::take(&mut self.token));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let work = move || {
            let _ = tx.send(bury_now(&leader, &token, limit));
        };
        match std::thread::Builder::new().name("pyvisor-bury".into()).spawn(work) {
            Ok(_) => rx.await.unwrap_or_default(),
            Err(e) => {
                tracing::warn!("cannot start a burial thread ({e}); burying on the blocking pool");
                let (leader, token) = (Arc::clone(&self.leader), self.token.clone());
                tokio::task::spawn_blocking(move || bury_now(&leader, &token, limit)).await.unwrap_or_default()
            }
        }
    }
}

impl Drop for Family {
    /// An unburied family (its actor was killed or its runtime dropped) is buried on a
    /// detached thread; the program's exit hook covers a program that exits meanwhile.
    fn drop(&mut self) {
        if self.buried {
            return;
        }
        let (leader, token) = (Arc::clone(&self.leader), std::mem::take(&mut self.token));
        // The group is killed at once, whatever happens to the thread.
        let _ = leader.signal_group(libc::SIGKILL);
        let spawned = std::thread::Builder::new().name("pyvisor-bury".into()).spawn(move || {
            bury_now(&leader, &token, BURIAL_LIMIT);
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a burial thread ({e}): the worker's processes were killed but not reaped");
        }
    }
}

/// Processes that may be escapees of a family whose leader started at `leader_start`: started
/// no earlier (a descendant starts after its ancestor), outside the leader's group, and — when
/// this program is a subreaper, so every orphan of a worker stays in its tree — descendants of
/// this program. Only these have their environment read: reading another process's environment
/// takes its memory map's lock, which a busy process can hold for a while.
fn escapee_candidates(stats: &[procfs::Stat], pgid: u32, leader_start: u64) -> Vec<u32> {
    let me = std::process::id();
    let ours: HashSet<u32> = if subreaper_on() {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for s in stats {
            children.entry(s.ppid).or_default().push(s.pid);
        }
        let mut seen = HashSet::new();
        let mut next = vec![me];
        while let Some(p) = next.pop() {
            for c in children.get(&p).into_iter().flatten() {
                if seen.insert(*c) {
                    next.push(*c);
                }
            }
        }
        seen
    } else {
        HashSet::new()
    };
    stats
        .iter()
        .filter(|s| s.pgrp != pgid && s.start_time >= leader_start && !s.is_zombie())
        .filter(|s| !subreaper_on() || ours.contains(&s.pid))
        .map(|s| s.pid)
        .collect()
}

/// The burial itself (blocking). See [`Family::bury`].
fn bury_now(leader: &Pidfd, token: &str, limit: Duration) -> Burial {
    let started = Instant::now();
    let me = std::process::id();
    let pgid = leader.pid();
    let deadline = started + limit;
    let leader_start = procfs::stat(pgid).map_or(0, |s| s.start_time);
    let _ = leader.signal_group(libc::SIGKILL);
    let marked = |env: &[u8]| !token.is_empty() && procfs::env_value(env, FAMILY_VAR).as_deref() == Some(token.as_bytes());
    let mut escapees: Vec<Pidfd> = Vec::new();
    let mut found = 0;
    let mut pause = Duration::from_millis(1);
    let mut next_scan = Instant::now();
    let survivors = loop {
        let stats: Vec<procfs::Stat> = procfs::pids().into_iter().filter_map(procfs::stat).collect();
        if Instant::now() >= next_scan {
            // Again later too: an escapee may have started another before it was killed.
            let more = kill_marked_among(escapee_candidates(&stats, pgid, leader_start), marked);
            found += more.len();
            escapees.extend(more);
            next_scan = Instant::now() + Duration::from_millis(50);
        }
        // Members of the group: SIGKILLed above (a process cannot fork once SIGKILLed, so no
        // new member appears). Zombies re-parented to us are ours to reap: their number is
        // pinned until we do, and they were identified by the group the leader still holds.
        let mut alive = 0;
        for s in stats.iter().filter(|s| s.pgrp == pgid && s.pid != pgid) {
            if !s.is_zombie() {
                alive += 1;
            } else if s.ppid == me {
                // SAFETY: plain syscall for one zombie child of ours.
                unsafe {
                    libc::waitpid(s.pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG);
                }
            }
        }
        escapees.retain(|fd| {
            if !fd.has_exited() {
                return true;
            }
            // Re-parented to us (we are a subreaper): ours to reap; otherwise ECHILD.
            let _ = fd.reap();
            false
        });
        let leader_gone = leader.has_exited();
        if alive == 0 && escapees.is_empty() && leader_gone {
            break 0;
        }
        if Instant::now() >= deadline {
            break alive + escapees.len() + usize::from(!leader_gone);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    if survivors > 0 {
        tracing::error!(pid = pgid, survivors, "processes of a worker survived SIGKILL");
    }
    // The last group signal is sent: the leader may go now.
    let leader_exit = leader.reap().ok().flatten();
    tracing::debug!(pid = pgid, escapees = found, took_us = started.elapsed().as_micros() as u64, "worker family buried");
    Burial { leader_exit, escapees: found, survivors }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    use super::*;

    fn alive(pid: u32) -> bool {
        procfs::stat(pid).is_some_and(|s| !s.is_zombie())
    }

    #[tokio::test]
    #[allow(clippy::zombie_processes)] // reaped through its pidfd, by the burial
    async fn burial_takes_the_group_and_marked_escapees_and_reaps_the_leader() {
        let token = super::super::markers::new_family();
        // The leader starts one member in its group and one escapee in a session of its own.
        let script = "sleep 60 & setsid sleep 61 & echo ready; wait";
        let mut child = Command::new("sh")
            .args(["-c", script])
            .env(FAMILY_VAR, &token)
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh starts");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready");
        let leader = Arc::new(Pidfd::open(child.id()).expect("pidfd"));
        let family_pids = |tok: &str| -> Vec<u32> {
            procfs::pids()
                .into_iter()
                .filter(|p| procfs::environ_value(*p, FAMILY_VAR).as_deref() == Some(tok.as_bytes()))
                .collect()
        };
        // Three marked processes, one of which has left the group (`setsid` is visible with the
        // marker before it has called setsid()).
        let escaped = |tok: &str| family_pids(tok).iter().any(|p| procfs::stat(*p).is_some_and(|s| s.pgrp != child.id()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while family_pids(&token).len() < 3 || !escaped(&token) {
            assert!(Instant::now() < deadline, "the family did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        let pids = family_pids(&token);
        let burial = Family::new(Arc::clone(&leader), token.clone()).bury(BURIAL_LIMIT).await;
        assert_eq!(burial.survivors, 0);
        assert!(burial.escapees >= 1, "the setsid sleep is found by its marker: {burial:?}");
        assert_eq!(burial.leader_exit.and_then(|e| e.signal), Some(libc::SIGKILL));
        for pid in pids {
            assert!(!alive(pid), "{pid} survived the burial");
        }
        assert!(!std::path::Path::new(&format!("/proc/{}", child.id())).exists(), "the leader is reaped");
    }

    /// Put a new process on `pid` by setting the kernel's last-pid counter (root only); `None`
    /// when the counter is not writable or other forks keep taking the number.
    fn spawn_on_pid(pid: u32) -> Option<std::process::Child> {
        const NS_LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";
        for _ in 0..200 {
            std::fs::write(NS_LAST_PID, (pid - 1).to_string()).ok()?;
            // Its own process group, so the number also names a group, as a worker's does.
            let mut victim = Command::new("sleep").arg("30").process_group(0).spawn().ok()?;
            if victim.id() == pid {
                return Some(victim);
            }
            let _ = victim.kill();
            let _ = victim.wait();
        }
        None
    }

    #[tokio::test]
    #[allow(clippy::zombie_processes)] // reaped through its pidfd, by the burial
    async fn signals_never_reach_a_process_that_reused_a_workers_pid() {
        // A worker-like leader in its own group, ended and buried (reaped).
        let child = Command::new("true").process_group(0).spawn().expect("true starts");
        let pid = child.id();
        let leader = Arc::new(Pidfd::open(pid).expect("pidfd"));
        // It ends by itself, as a worker that exits does, before its family is buried.
        tokio::time::timeout(Duration::from_secs(10), leader.exited()).await.expect("true exits").expect("status");
        let burial = Family::new(Arc::clone(&leader), String::new()).bury(BURIAL_LIMIT).await;
        assert_eq!(burial.leader_exit.and_then(|e| e.code), Some(0));
        let Some(mut victim) = spawn_on_pid(pid) else {
            eprintln!("skipped: cannot place a process on pid {pid} (/proc/sys/kernel/ns_last_pid is not writable here, or the number was taken)");
            return;
        };
        // Every way pyvisor signals a worker, after its number went to someone else.
        for sig in [libc::SIGUSR1, libc::SIGTERM, libc::SIGKILL] {
            assert!(!leader.signal(sig).expect("signal"), "signal {sig} was delivered");
            assert!(!leader.signal_group(sig).expect("group signal"), "group signal {sig} was delivered");
        }
        std::thread::sleep(Duration::from_millis(50));
        let unharmed = victim.try_wait().expect("try_wait").is_none();
        let _ = victim.kill();
        let _ = victim.wait();
        assert!(unharmed, "the process that reused pid {pid} was signalled");
    }
}
