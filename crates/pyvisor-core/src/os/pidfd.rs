//! One process through a pidfd: a handle that names the process itself, not its number.
//!
//! A pid number is reused once the process is reaped; a pidfd keeps naming the process it was
//! opened for, so a signal sent through it reaches that process or nobody (`ESRCH`). Owns the
//! syscalls (`pidfd_open`, `pidfd_send_signal`, `waitid(P_PIDFD)`) and the decoding of an exit
//! status. It does not know about workers or groups of processes beyond one flag.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// `pidfd_send_signal` flag (Linux 6.9): signal the process group the pidfd's process leads.
/// The group is named by the kernel's pid object, not by its number, so it cannot be another
/// group after the number was reused.
const PIDFD_SIGNAL_PROCESS_GROUP: libc::c_uint = 1 << 2;

/// A pidfd and the pid it was opened for.
#[derive(Debug)]
pub(crate) struct Pidfd {
    fd: OwnedFd,
    pid: u32,
    /// Reaped through this pidfd: its number may belong to another process now.
    reaped: AtomicBool,
}

impl Pidfd {
    /// Open a pidfd for `pid`. Race-free for an unreaped child of ours (its number cannot be
    /// reused before we reap it); for any other process the caller must check, after opening,
    /// that the process is the one it meant (e.g. its markers), since only then is the identity
    /// pinned.
    pub(crate) fn open(pid: u32) -> io::Result<Pidfd> {
        let pid_t = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        if pid_t <= 0 {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: plain syscall; on success it returns a new file descriptor we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(Pidfd { fd, pid, reaped: AtomicBool::new(false) })
    }

    /// The pid this pidfd was opened for.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    fn send(&self, sig: i32, flags: libc::c_uint) -> io::Result<bool> {
        // SAFETY: plain syscall on a descriptor we own; a null siginfo means "as kill(2)".
        let r = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.fd.as_raw_fd(), sig, std::ptr::null::<libc::siginfo_t>(), flags)
        };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ESRCH) => Ok(false),
            _ => Err(e),
        }
    }

    /// Send `sig` to this process. `Ok(false)`: it is gone (nothing else was signalled).
    pub(crate) fn signal(&self, sig: i32) -> io::Result<bool> {
        self.send(sig, 0)
    }

    /// Send `sig` to the process group this process leads. `Ok(false)`: the group is empty.
    ///
    /// Uses `PIDFD_SIGNAL_PROCESS_GROUP` where the kernel has it (the group is then named by
    /// the kernel's pid object and cannot be confused with a later group of the same number).
    /// On older kernels it falls back to `killpg`, which is safe only while the leader is
    /// unreaped: [`crate::os::family::Family`] reaps the leader only after its last group
    /// signal, and once this pidfd reaped it, the fallback signals nobody.
    pub(crate) fn signal_group(&self, sig: i32) -> io::Result<bool> {
        match self.send(sig, PIDFD_SIGNAL_PROCESS_GROUP) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                if self.reaped.load(Ordering::SeqCst) {
                    return Ok(false);
                }
                let pgid = libc::pid_t::try_from(self.pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
                // SAFETY: plain syscall; see above for why the number is still ours.
                if unsafe { libc::killpg(pgid, sig) } == 0 {
                    Ok(true)
                } else {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::ESRCH) {
                        Ok(false)
                    } else {
                        Err(e)
                    }
                }
            }
            other => other,
        }
    }

    fn waitid(&self, flags: libc::c_int) -> io::Result<Option<ExitInfo>> {
        // SAFETY: zeroed siginfo is a valid out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: plain syscall on a descriptor we own, writing into `info`.
        let r = unsafe { libc::waitid(libc::P_PIDFD, self.fd.as_raw_fd() as libc::id_t, &mut info, flags) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: waitid filled `info` (or left it zeroed: si_pid 0 means "not yet").
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        Ok(Some(match info.si_code {
            libc::CLD_EXITED => ExitInfo { code: Some(status), signal: None },
            libc::CLD_KILLED | libc::CLD_DUMPED => ExitInfo { code: None, signal: Some(status) },
            _ => ExitInfo { code: None, signal: None },
        }))
    }

    /// The exit status if the process has exited, **without reaping it** (`WNOWAIT`): the pid
    /// stays ours, and its process group addressable, until [`Pidfd::reap`].
    /// `Err(ECHILD)`: not our child (or already reaped).
    pub(crate) fn peek_exit(&self) -> io::Result<Option<ExitInfo>> {
        self.waitid(libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
    }

    /// Reap the process if it has exited (never blocks). `Ok(None)`: still running.
    /// `Err(ECHILD)`: not our child, or reaped already.
    pub(crate) fn reap(&self) -> io::Result<Option<ExitInfo>> {
        let r = self.waitid(libc::WEXITED | libc::WNOHANG);
        if matches!(r, Ok(Some(_))) {
            self.reaped.store(true, Ordering::SeqCst);
        }
        r
    }

    /// Whether the process has ended (a pidfd polls readable once it has exited; also true of
    /// processes that are not our children).
    pub(crate) fn has_exited(&self) -> bool {
        let mut p = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLIN | libc::POLLHUP) != 0
    }

    /// Wait (asynchronously) until this child has exited and return its status, without
    /// reaping it. Must be called from a tokio runtime.
    pub(crate) async fn exited(&self) -> io::Result<ExitInfo> {
        // SAFETY: the duplicate is owned by the `AsyncFd` alone and closed only when it drops.
        let watched = unsafe { AsyncFd::register_with_interest(self.fd.try_clone()?, Interest::READABLE)? };
        loop {
            if let Some(info) = self.peek_exit()? {
                return Ok(info);
            }
            let mut ready = watched.readable().await?;
            ready.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    #[allow(clippy::zombie_processes)] // reaped through its pidfd
    fn a_child_is_observed_without_reaping_then_reaped_once() {
        let child = Command::new("sh").args(["-c", "exit 7"]).spawn().expect("sh starts");
        let fd = Pidfd::open(child.id()).expect("pidfd of our child");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !fd.has_exited() {
            assert!(std::time::Instant::now() < deadline, "sh did not exit");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let seen = ExitInfo { code: Some(7), signal: None };
        assert_eq!(fd.peek_exit().expect("peek"), Some(seen));
        assert_eq!(fd.peek_exit().expect("peek again"), Some(seen), "WNOWAIT leaves it unreaped");
        assert!(std::path::Path::new(&format!("/proc/{}", child.id())).exists(), "a zombie until reaped");
        assert_eq!(fd.reap().expect("reap"), Some(seen));
        assert_eq!(fd.reap().map_err(|e| e.raw_os_error()), Err(Some(libc::ECHILD)));
        assert!(!fd.signal(libc::SIGKILL).expect("no error"), "a reaped process is gone: nothing signalled");
    }

    #[test]
    #[allow(clippy::zombie_processes)] // reaped through its pidfd
    fn a_killed_child_reports_its_signal() {
        let child = Command::new("sleep").arg("30").spawn().expect("sleep starts");
        let fd = Pidfd::open(child.id()).expect("pidfd");
        assert!(fd.signal(libc::SIGKILL).expect("signal"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let info = rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(10), fd.exited()).await });
        assert_eq!(info.expect("exit seen in time").expect("status"), ExitInfo { code: None, signal: Some(libc::SIGKILL) });
        assert!(fd.reap().expect("reap").is_some());
    }
}
