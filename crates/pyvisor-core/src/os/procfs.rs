//! Reading `/proc`: the pids, a process's stat fields, and the markers in its environment.
//!
//! Owns only the parsing. Everything here reads files, so none of it may run on an async
//! runtime thread: callers run it on threads of their own (see [`crate::os::family`]) or in
//! `spawn_blocking`. A number read here names a process only until it is reaped; pin it with
//! a pidfd ([`crate::os::pidfd::Pidfd::open`]) and check again before acting on it.

/// The fields of `/proc/PID/stat` pyvisor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    pub pid: u32,
    /// `R`, `S`, `D`, `Z`, `T`, ...
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
    /// Start time in clock ticks after boot.
    pub start_time: u64,
}

impl Stat {
    /// Exited but not reaped.
    pub(crate) fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Every pid in `/proc` (threads excluded).
pub(crate) fn pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).collect()
}

/// Parse the text of `/proc/PID/stat`.
pub(crate) fn parse_stat(pid: u32, text: &str) -> Option<Stat> {
    // The command is in parentheses and may itself contain ") ": cut at the last one.
    let (_, rest) = text.rsplit_once(')')?;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    // Fields 6..=21 (session .. itrealvalue), then 22: starttime.
    let start_time = f.nth(16)?.parse().ok()?;
    Some(Stat { pid, state, ppid, pgrp, start_time })
}

/// `/proc/PID/stat`, if the process exists.
pub(crate) fn stat(pid: u32) -> Option<Stat> {
    parse_stat(pid, &std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

#[cfg(test)]
/// The value of `key` in a process's environment as it was at exec (`/proc/PID/environ`);
/// `None` if unreadable (gone, a zombie, or not ours to read) or absent.
pub(crate) fn environ_value(pid: u32, key: &str) -> Option<Vec<u8>> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env_value(&env, key)
}

/// The value of `key` in a NUL-separated environment block.
pub(crate) fn env_value(env: &[u8], key: &str) -> Option<Vec<u8>> {
    env.split(|b| *b == 0).find_map(|kv| {
        let rest = kv.strip_prefix(key.as_bytes())?;
        rest.strip_prefix(b"=").map(<[u8]>::to_vec)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_odd_command_names() {
        let text = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        let s = parse_stat(1234, text).expect("parses");
        assert_eq!(s, Stat { pid: 1234, state: 'S', ppid: 1, pgrp: 1234, start_time: 98765 });
        assert!(parse_stat(1, "garbage").is_none());
        assert!(parse_stat(1, "1 (x) Z").is_none());
    }

    #[test]
    fn our_own_stat_and_environment_read_back() {
        let me = std::process::id();
        let s = stat(me).expect("our stat");
        assert_eq!(s.pid, me);
        assert!(!s.is_zombie());
        assert_eq!(env_value(b"A=1\0PYVISOR_X=2\0PYVISOR_XY=3\0", "PYVISOR_X"), Some(b"2".to_vec()));
        assert_eq!(env_value(b"A=1\0", "PYVISOR_X"), None);
    }
}
