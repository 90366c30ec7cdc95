//! The process tree, from /proc: listing the processes below this one, signalling exactly the
//! process that was listed (pidfd), and the zombies among this process's children. Used by the
//! tests whose monkeys know nothing of a pool but the process tree (chaos_external.rs, soak.rs).

use std::collections::{HashMap, HashSet};

/// What the monkeys need of `/proc/PID/stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub state: char,
    /// Start time in clock ticks after boot: with the pid, the process's identity.
    pub start: u64,
}

pub fn read_proc(pid: u32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is parenthesised and may hold anything: fields start after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?; // field 3
    let ppid = fields.next()?.parse().ok()?; // field 4
    let start = fields.nth(17)?.parse().ok()?; // field 22
    Some(Proc { pid, ppid, state, start })
}

pub fn is_zombie(p: &Proc) -> bool {
    matches!(p.state, 'Z' | 'X')
}

/// Every process in /proc (those that vanish while listed are skipped).
fn all_procs() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).filter_map(read_proc).collect()
}

/// Live (not zombie) processes below `root` (excluding `root`), by walking the ppid links of
/// every process in /proc.
pub fn descendants(root: u32) -> Vec<Proc> {
    let mut children: HashMap<u32, Vec<Proc>> = HashMap::new();
    for p in all_procs() {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut seen = HashSet::from([root]);
    let mut stack = vec![root];
    while let Some(parent) = stack.pop() {
        for child in children.get(&parent).into_iter().flatten() {
            if child.pid > 1 && seen.insert(child.pid) {
                stack.push(child.pid);
                if !is_zombie(child) {
                    out.push(*child);
                }
            }
        }
    }
    out
}

/// Children of `parent` that are zombies (dead, not yet reaped by `parent`).
pub fn zombie_children(parent: u32) -> Vec<Proc> {
    all_procs().into_iter().filter(|p| p.ppid == parent && p.pid != parent && is_zombie(p)).collect()
}

pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim().to_string()).unwrap_or_default()
}

pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline")).map(|b| String::from_utf8_lossy(&b).replace('\0', " ")).unwrap_or_default()
}

/// Send `sig` to exactly the process `p` was listed as: pinned with a pidfd, then checked to be
/// still the same process (pid, parent and start time, not a zombie), so a pid reused since the
/// listing is never signalled. Never signals pid <= 1 or this process. Returns whether the
/// signal was sent (a process that is already gone is not an error).
pub fn signal_listed(p: &Proc, sig: i32) -> bool {
    let me = std::process::id();
    if p.pid <= 1 || p.pid == me || p.ppid == 0 {
        return false;
    }
    let still_it = || read_proc(p.pid).is_some_and(|now| now.ppid == p.ppid && now.start == p.start && !is_zombie(&now));
    // SAFETY: plain syscalls on integers we own.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, p.pid as libc::pid_t, 0u32) as i32;
        if fd < 0 {
            // ESRCH: gone since the listing. ENOSYS (kernel < 5.3): plain kill after a re-check.
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) && still_it() {
                return libc::kill(p.pid as libc::pid_t, sig) == 0;
            }
            return false;
        }
        let sent = still_it() && libc::syscall(libc::SYS_pidfd_send_signal, fd, sig, std::ptr::null::<libc::siginfo_t>(), 0u32) == 0;
        libc::close(fd);
        sent
    }
}

/// SIGKILL exactly the process `p` was listed as (see [`signal_listed`]).
pub fn kill_listed(p: &Proc) -> bool {
    signal_listed(p, libc::SIGKILL)
}

/// A small PRNG (xorshift64*): the victims differ from run to run; print the seed.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn seeded() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        XorShift((nanos ^ (u64::from(std::process::id()) << 32)) | 1)
    }
    /// Seeded from `var` when it is set to a number (to replay a run), else from the clock.
    pub fn from_env_or_seeded(var: &str) -> Self {
        match std::env::var(var).ok().and_then(|s| s.parse::<u64>().ok()) {
            Some(seed) => XorShift(seed | 1),
            None => Self::seeded(),
        }
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// After a pool's shutdown: what of it is left — processes below `root` (after up to 15 s) and
/// processes carrying this run's marker anywhere — each killed. One line per kind of leftover;
/// empty when nothing outlived the shutdown.
pub async fn leftovers_after_shutdown(root: u32) -> Vec<String> {
    let mut found = Vec::new();
    if !super::eventually(std::time::Duration::from_secs(15), || descendants(root).is_empty()).await {
        let left: Vec<String> =
            descendants(root).iter().map(|p| format!("{} ({}, {}, state {})", p.pid, comm(p.pid), cmdline(p.pid).trim(), p.state)).collect();
        found.push(format!("processes of the pool left 15 s after shutdown: {left:?}"));
        for p in descendants(root) {
            kill_listed(&p);
        }
    }
    let escaped = super::processes_of_run(pyvisor::run_id());
    if !escaped.is_empty() {
        found.push(format!("processes of this run (outside the tree) left after shutdown: {escaped:?}"));
        for pid in escaped {
            super::signal(pid, libc::SIGKILL);
        }
    }
    found
}
