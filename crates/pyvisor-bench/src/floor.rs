//! The raw floor client: a minimal Rust client over one Unix socket to `python/floor.py`.
//! No framework: write a length-prefixed frame, read one back. A reviewer can read it in a
//! minute, which is the point.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

pub struct Floor {
    child: Child,
    sock: UnixStream,
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

fn read_frame(sock: &mut UnixStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    sock.read_exact(&mut len)?;
    buf.resize(u32::from_be_bytes(len) as usize, 0);
    sock.read_exact(buf)
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds")
}

impl Floor {
    /// Start `script` with `env` added to its environment.
    pub fn start(python: &Path, script: &Path, env: &[(&str, String)]) -> std::io::Result<Floor> {
        let (ours, theirs) = UnixStream::pair()?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(python);
        cmd.arg(script).env("FLOOR_FD", fd.to_string()).envs(env.iter().map(|(k, v)| (k, v)));
        // SAFETY: only fcntl between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(theirs);
        Ok(Floor { child, sock: ours })
    }

    /// One call at a time: the latency of each.
    pub fn sequential(&mut self, payload: &[u8], n: usize) -> Histogram<u64> {
        let mut h = histogram();
        let f = frame(payload);
        let mut buf = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            self.sock.write_all(&f).expect("floor write");
            read_frame(&mut self.sock, &mut buf).expect("floor read");
            let _ = h.record(t.elapsed().as_micros().max(1) as u64);
        }
        h
    }

    /// `window` calls outstanding: elapsed time and per-call latency.
    pub fn pipelined(&mut self, payload: &[u8], n: usize, window: usize) -> (Duration, Histogram<u64>) {
        let f = frame(payload);
        let mut writer = self.sock.try_clone().expect("clone socket");
        let (token_tx, token_rx) = mpsc::channel::<()>();
        let (sent_tx, sent_rx) = mpsc::channel::<Instant>();
        for _ in 0..window {
            let _ = token_tx.send(());
        }
        let start = Instant::now();
        let w = std::thread::spawn(move || {
            for _ in 0..n {
                if token_rx.recv().is_err() {
                    return;
                }
                let _ = sent_tx.send(Instant::now());
                writer.write_all(&f).expect("floor write");
            }
        });
        let mut h = histogram();
        let mut buf = Vec::new();
        for _ in 0..n {
            read_frame(&mut self.sock, &mut buf).expect("floor read");
            if let Ok(t) = sent_rx.recv() {
                let _ = h.record(t.elapsed().as_micros().max(1) as u64);
            }
            let _ = token_tx.send(());
        }
        let elapsed = start.elapsed();
        let _ = w.join();
        (elapsed, h)
    }
}

impl Floor {
    /// One raw frame out (`data`), one back into `back` (resized to its length): for the
    /// buffers floor (`python/floor_buffers.py`), no MessagePack.
    pub fn raw_roundtrip(&mut self, data: &[u8], back: &mut Vec<u8>) -> std::io::Result<()> {
        self.sock.write_all(&(data.len() as u32).to_be_bytes())?;
        self.sock.write_all(data)?;
        read_frame(&mut self.sock, back)
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
