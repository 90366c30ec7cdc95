//! The service manager's end of systemd's notify protocol, for tests: a datagram socket's
//! lines, in arrival order.

use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The service manager's side: every line of every datagram, in arrival order.
pub struct Manager {
    rx: mpsc::Receiver<String>,
    pub lines: Vec<String>,
}

impl Manager {
    pub fn listen(sock: UnixDatagram) -> Manager {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = sock.recv(&mut buf) {
                for line in String::from_utf8_lossy(&buf[..n]).lines() {
                    if tx.send(line.to_string()).is_err() {
                        return;
                    }
                }
            }
        });
        Manager { rx, lines: Vec::new() }
    }

    /// Wait for a line `pred` accepts (a guard, not a budget: a run that never sends it fails
    /// here instead of hanging). Returns its index in `lines`.
    pub fn wait_for(&mut self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> usize {
        let start = Instant::now();
        if let Some(i) = self.lines.iter().position(|l| pred(l)) {
            return i;
        }
        loop {
            let left = limit.checked_sub(start.elapsed()).unwrap_or_else(|| panic!("no {what} within {limit:?}; got {:?}", self.lines));
            if let Ok(line) = self.rx.recv_timeout(left.min(Duration::from_millis(100))) {
                self.lines.push(line);
                if pred(self.lines.last().unwrap()) {
                    return self.lines.len() - 1;
                }
            }
        }
    }

    /// Wait (a guard) until `n` lines equal to `line` arrived from index `from` on.
    pub fn wait_count(&mut self, what: &str, from: usize, line: &str, n: usize, limit: Duration) {
        let start = Instant::now();
        while self.count_from(from, line) < n {
            assert!(start.elapsed() < limit, "no {what} within {limit:?}; got {:?}", &self.lines[from..]);
            if let Ok(l) = self.rx.recv_timeout(Duration::from_millis(100)) {
                self.lines.push(l);
            }
        }
    }

    pub fn drain(&mut self) {
        self.lines.extend(self.rx.try_iter());
    }

    pub fn count_from(&self, from: usize, line: &str) -> usize {
        self.lines[from..].iter().filter(|l| *l == line).count()
    }
}
