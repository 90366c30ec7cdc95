//! Sealed memfds: the buffers that will travel out of band between the parent and its workers
//! (docs/buffers.md and docs/protocol.md, issue 16).
//!
//! Owns making a sealed memfd from bytes ([`SharedBytes::from_slice`]), checking one that a
//! worker sent before any use ([`check_sealed`]: its size covers the referenced length, it is
//! sealed against writes, shrinking and growing), mapping one read-only ([`SharedBytes`], cheap
//! to clone, unmapped when the last clone drops), and passing fds over a Unix socket with
//! `SCM_RIGHTS` ([`send_with_fds`], [`recv_with_fds`]: a cap on fds per message, `MSG_CTRUNC` an
//! error, every fd closed on every path).
//!
//! Does not own the protocol's `fds` message, (de)serialization, or when a buffer goes out of
//! band (see [`crate::buffers`]).

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{fcntl_add_seals, fcntl_get_seals, fstat, fstatfs, ftruncate, memfd_create, MemfdFlags, SealFlags};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// The most fds one message may carry (the `fds` message's bound).
pub(crate) const MAX_FDS_PER_FRAME: usize = 16;

/// The seals a received buffer must have: nobody can change its bytes or its size.
const REQUIRED_SEALS: SealFlags = SealFlags::WRITE.union(SealFlags::SHRINK).union(SealFlags::GROW);

/// A received fd that must not be used: the worker that sent it breaks the protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum BufferViolation {
    /// It lacks some of the seals WRITE, SHRINK, GROW: its sender could still change it.
    #[error("buffer {index}: not sealed against {missing} (its seals: {has})")]
    NotSealed { index: usize, missing: String, has: String },
    /// It is shorter than the length the message references.
    #[error("buffer {index}: {size} bytes, the message references {referenced}")]
    TooShort { index: usize, size: u64, referenced: u64 },
    /// It is not a sealable file (not a memfd), or could not be examined.
    #[error("buffer {index}: not a sealed memfd ({detail})")]
    NotAMemfd { index: usize, detail: String },
    /// The ancillary data was cut (`MSG_CTRUNC`): fds were lost.
    #[error("ancillary data truncated (MSG_CTRUNC): fds lost")]
    Truncated,
    /// More fds arrived in one message than allowed.
    #[error("{got} fds in one message, at most {MAX_FDS_PER_FRAME}")]
    TooMany { got: usize },
}

fn seal_names(s: SealFlags) -> String {
    let names: Vec<&str> = [(SealFlags::WRITE, "WRITE"), (SealFlags::SHRINK, "SHRINK"), (SealFlags::GROW, "GROW"), (SealFlags::SEAL, "SEAL")]
        .iter()
        .filter(|(f, _)| s.contains(*f))
        .map(|(_, n)| *n)
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join("|")
    }
}

/// `f_type` of shmem, where plain memfds live (a hugetlb memfd is sealable too, but maps in
/// huge pages whose rounding a plain `munmap` would leak).
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Check buffer `index` of a message before any use: a sealed memfd (WRITE, SHRINK and GROW)
/// on shmem, of at least `len` bytes.
pub(crate) fn check_sealed(fd: BorrowedFd<'_>, len: u64, index: usize) -> Result<(), BufferViolation> {
    let seals = fcntl_get_seals(fd).map_err(|e| BufferViolation::NotAMemfd { index, detail: e.to_string() })?;
    let fs = fstatfs(fd).map_err(|e| BufferViolation::NotAMemfd { index, detail: e.to_string() })?;
    if fs.f_type as i64 != TMPFS_MAGIC {
        return Err(BufferViolation::NotAMemfd { index, detail: format!("on a file system of type {:#x}, not shmem", fs.f_type) });
    }
    if !seals.contains(REQUIRED_SEALS) {
        return Err(BufferViolation::NotSealed { index, missing: seal_names(REQUIRED_SEALS.difference(seals)), has: seal_names(seals) });
    }
    let size = fstat(fd).map_err(|e| BufferViolation::NotAMemfd { index, detail: e.to_string() })?.st_size;
    let size = u64::try_from(size).unwrap_or(0);
    if size < len {
        return Err(BufferViolation::TooShort { index, size, referenced: len });
    }
    Ok(())
}

/// A read-only mapping of a sealed memfd, and the fd itself (to pass on, e.g. again to the
/// worker of a retry, without a second copy).
struct Mapping {
    ptr: *mut c_void,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is read-only and its memfd is sealed against writes, shrinking and
// growing: the bytes behind `ptr` never change and stay mapped until `Drop`, so sharing the
// pointer between threads is sharing immutable memory.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: `ptr`/`len` are exactly what `mmap` returned, unmapped only here.
            let _ = unsafe { munmap(self.ptr, self.len) };
        }
    }
}

/// Bytes in a sealed memfd, mapped read-only: cheap to clone (every clone shares the mapping),
/// unmapped when the last clone drops. Nobody, this process included, can change them.
///
/// In a call's input it travels **out of band**: the worker receives the memfd itself (no copy
/// through the socket) and maps it — a function exposed with `@expose(buffers="memoryview")`
/// reads the very pages this value maps. A retried call sends the same memfd again. Serialized
/// anywhere else (or to a pool set to in-band) it is plain MessagePack `bin`. See
/// docs/buffers.md.
///
/// ```
/// use pyvisor_core::SharedBytes;
/// let image = SharedBytes::from_slice(&[7u8; 1 << 20])?; // one copy, into a sealed memfd
/// let again = image.clone(); // no copy: the same mapping
/// assert_eq!(again.len(), 1 << 20);
/// assert_eq!(&image[..3], &[7, 7, 7]);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct SharedBytes {
    inner: Arc<Mapping>,
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBytes").field("len", &self.len()).finish_non_exhaustive()
    }
}

impl SharedBytes {
    /// Copy `data` once into a new sealed memfd and map it read-only. Fails only when the
    /// system refuses a memfd (no memory, too many open files, no `memfd_create`).
    pub fn from_slice(data: &[u8]) -> io::Result<Self> {
        let fd = memfd_create("pyvisor-buffer", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        ftruncate(&fd, data.len() as u64)?;
        // Written with pwrite, not through a mapping: a writable shared mapping must be gone
        // before F_SEAL_WRITE can be added.
        let mut done = 0;
        while done < data.len() {
            match rustix::io::pwrite(&fd, &data[done..], done as u64) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "memfd write returned 0")),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        fcntl_add_seals(&fd, REQUIRED_SEALS | SealFlags::SEAL)?;
        Self::map(fd, data.len())
    }

    /// Map a received fd after checking it ([`check_sealed`]) for `len` bytes.
    pub(crate) fn from_fd(fd: OwnedFd, len: usize, index: usize) -> Result<Self, BufferViolation> {
        check_sealed(fd.as_fd(), len as u64, index)?;
        Self::map(fd, len).map_err(|e| BufferViolation::NotAMemfd { index, detail: format!("cannot map it: {e}") })
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<Self> {
        let ptr = if len == 0 {
            std::ptr::NonNull::<u8>::dangling().as_ptr().cast()
        } else {
            // SAFETY: a fresh read-only mapping of a sealed memfd at least `len` long: it
            // aliases no Rust memory, and its pages cannot shrink away (SIGBUS) or change.
            // Private, not shared: before Linux 6.7 a shared mapping of a write-sealed memfd
            // is refused even read-only; a private read-only one sees the same pages.
            // Populated: page tables filled in one call rather than a fault per few pages (the
            // bytes are about to be read).
            unsafe { mmap(std::ptr::null_mut(), len, ProtFlags::READ, MapFlags::PRIVATE | MapFlags::POPULATE, &fd, 0)? }
        };
        Ok(SharedBytes { inner: Arc::new(Mapping { ptr, len, fd }) })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live read-only mapping of `len` immutable bytes (or dangling with
        // `len` 0), kept alive by `self`.
        unsafe { std::slice::from_raw_parts(self.inner.ptr.cast::<u8>(), self.inner.len) }
    }

    /// How many bytes.
    pub fn len(&self) -> usize {
        self.inner.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Whether `self` and `other` are the same mapping (clones of one value).
    pub fn same_mapping(&self, other: &SharedBytes) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The sealed memfd, to pass on.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// The sealed memfd behind the bytes (to hand to another process, or to look at: `fstat`,
/// `F_GET_SEALS`). A buffer a worker returned is the worker's own memfd (named
/// `pyvisor-buffer-python`), taken as it is.
///
/// ```
/// use std::os::fd::AsFd;
/// use pyvisor_core::SharedBytes;
/// let b = SharedBytes::from_slice(b"abc")?;
/// let file = std::fs::File::from(b.as_fd().try_clone_to_owned()?);
/// assert_eq!(file.metadata()?.len(), 3);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
impl AsFd for SharedBytes {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

impl PartialEq for SharedBytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for SharedBytes {}

/// Send `data` with `fds` attached (`SCM_RIGHTS`) to its first bytes; the rest of `data` goes
/// without them if the first write was partial. Blocking: for a blocking socket.
#[cfg(test)]
pub(crate) fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut sent = sendmsg_with_fds(sock, &[io::IoSlice::new(data)], fds, SendFlags::NOSIGNAL)?;
    while sent < data.len() {
        match rustix::net::send(sock, &data[sent..], SendFlags::NOSIGNAL) {
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One non-blocking `sendmsg` of `parts` (vectored), with `fds` attached to its first byte
/// when there are any. Returns the bytes sent (the fds went with the first of them, so a
/// partial send's rest goes without); `WouldBlock` when the socket is full (nothing sent, no
/// fd passed).
pub(crate) fn try_send_vectored_with_fds(sock: BorrowedFd<'_>, parts: &[io::IoSlice<'_>], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    sendmsg_with_fds(sock, parts, fds, SendFlags::NOSIGNAL | SendFlags::DONTWAIT)
}

/// One `sendmsg` (retried on `EINTR`) of `parts` with `fds` as `SCM_RIGHTS` (at most
/// [`MAX_FDS_PER_FRAME`]).
fn sendmsg_with_fds(sock: BorrowedFd<'_>, parts: &[io::IoSlice<'_>], fds: &[BorrowedFd<'_>], flags: SendFlags) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} fds in one message, at most {MAX_FDS_PER_FRAME}", fds.len())));
    }
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_FRAME))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("the fds do not fit the ancillary buffer"));
    }
    loop {
        match sendmsg(sock, parts, &mut control, flags) {
            Ok(n) => return Ok(n),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// What [`recv_with_fds`] got: bytes read into the buffer, and the fds that came with them.
#[derive(Debug)]
pub(crate) struct Received {
    pub bytes: usize,
    pub fds: Vec<OwnedFd>,
}

/// One `recvmsg` into `buf` (which need not be initialized: the reader's spare capacity),
/// taking at most [`MAX_FDS_PER_FRAME`] fds (close-on-exec). Cut ancillary data (`MSG_CTRUNC`:
/// fds were lost) or too many fds is an error, and every fd that did arrive is closed (they
/// drop). Non-blocking sockets give `WouldBlock` as usual.
pub(crate) fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<Result<Received, BufferViolation>> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // Room for one fd more than allowed, so that "too many" is told apart from "cut"; u64s
    // for the alignment a cmsghdr needs.
    const SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS_PER_FRAME + 1));
    let mut control = [0u64; SPACE.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (the caller's buffer, written by the kernel only) and
        // at `control`, both live for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote, with the libc macros, within
    // `msg_controllen`; each SCM_RIGHTS payload is an array of ints we now own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Ok(Err(BufferViolation::Truncated));
    }
    if fds.len() > MAX_FDS_PER_FRAME {
        return Ok(Err(BufferViolation::TooMany { got: fds.len() }));
    }
    Ok(Ok(Received { bytes: n, fds }))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    /// Open fds of this module's buffers (other tests of the process open fds of their own at
    /// the same time: only these are counted), with the module's tests that count them taking
    /// turns.
    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("memfd:pyvisor-buffer")))
                .count()
        })
    }

    static COUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Tests that count this process's fds take turns with every test that makes memfds
    /// (the crate's unit tests run in one process, in parallel).
    pub(crate) fn counting() -> std::sync::MutexGuard<'static, ()> {
        COUNTING.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// An `Errno` from any of the calls a hostile process might try on a sealed memfd.
    fn errno<T>(r: rustix::io::Result<T>) -> Option<rustix::io::Errno> {
        r.err()
    }

    #[test]
    fn bytes_round_trip_through_a_sealed_memfd() {
        let _turn = counting();
        for n in [0, 1, 4096, 64 << 10, 16 << 20] {
            let data = pattern(n);
            let b = SharedBytes::from_slice(&data).expect("sealed");
            assert_eq!(b.len(), n);
            assert_eq!(b.as_slice(), &data[..]);
            check_sealed(b.fd(), n as u64, 0).expect("it passes its own check");
            let again = b.clone();
            drop(b);
            assert_eq!(again.as_slice(), &data[..], "a clone keeps the mapping");
        }
    }

    #[test]
    fn nobody_can_change_a_sealed_memfd() {
        let _turn = counting();
        let data = pattern(8192);
        let b = SharedBytes::from_slice(&data).expect("sealed");
        let fd = b.fd();
        assert_eq!(errno(rustix::io::pwrite(fd, b"evil", 0)), Some(rustix::io::Errno::PERM), "write");
        assert_eq!(errno(ftruncate(fd, 1)), Some(rustix::io::Errno::PERM), "shrink");
        assert_eq!(errno(ftruncate(fd, 1 << 20)), Some(rustix::io::Errno::PERM), "grow");
        // SAFETY: a failed mmap maps nothing; a successful one (the bug this test catches) is
        // unmapped at once.
        let writable = unsafe { mmap(std::ptr::null_mut(), 8192, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED, fd, 0) };
        if let Ok(p) = writable {
            // SAFETY: just mapped, 8192 bytes.
            let _ = unsafe { munmap(p, 8192) };
        }
        assert_eq!(errno(writable), Some(rustix::io::Errno::PERM), "a writable shared mapping");
        assert_eq!(errno(fcntl_add_seals(fd, SealFlags::FUTURE_WRITE)), Some(rustix::io::Errno::PERM), "the seals themselves");
        assert_eq!(b.as_slice(), &data[..], "unchanged");
    }

    #[test]
    fn received_fds_are_checked_before_any_use() {
        let _turn = counting();
        let unsealed = memfd_create("t", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).expect("memfd");
        ftruncate(&unsealed, 100).expect("size");
        let e = check_sealed(unsealed.as_fd(), 100, 3).expect_err("unsealed");
        assert!(matches!(&e, BufferViolation::NotSealed { index: 3, missing, .. } if missing == "WRITE|SHRINK|GROW"), "{e}");
        fcntl_add_seals(&unsealed, SealFlags::SHRINK | SealFlags::GROW).expect("seal");
        let e = check_sealed(unsealed.as_fd(), 100, 0).expect_err("writable");
        assert_eq!(e.to_string(), "buffer 0: not sealed against WRITE (its seals: SHRINK|GROW)");
        let b = SharedBytes::from_slice(&pattern(100)).expect("sealed");
        let e = check_sealed(b.fd(), 4096, 1).expect_err("short");
        assert_eq!(e, BufferViolation::TooShort { index: 1, size: 100, referenced: 4096 });
        let (r, _w) = std::io::pipe().expect("pipe");
        assert!(matches!(check_sealed(r.as_fd(), 0, 0), Err(BufferViolation::NotAMemfd { .. })));
        let no_sealing = memfd_create("t", MemfdFlags::CLOEXEC).expect("memfd");
        assert!(matches!(SharedBytes::from_fd(no_sealing, 0, 0), Err(BufferViolation::NotSealed { .. })));
    }

    #[test]
    fn fds_travel_with_their_bytes_and_none_leaks() {
        let _turn = counting();
        let (a, b) = UnixStream::pair().expect("socketpair");
        let before = open_fds();
        for round in 0..1000 {
            let bufs: Vec<SharedBytes> = (0..3).map(|i| SharedBytes::from_slice(&pattern(1000 + i + round)).expect("sealed")).collect();
            let fds: Vec<BorrowedFd<'_>> = bufs.iter().map(SharedBytes::fd).collect();
            send_with_fds(a.as_fd(), b"frame", &fds).expect("sent");
            drop(bufs);
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
            let got = recv_with_fds(b.as_fd(), &mut buf).expect("recvmsg").expect("within the rules");
            // SAFETY: the kernel wrote the first `got.bytes` bytes.
            let read: Vec<u8> = buf[..got.bytes].iter().map(|b| unsafe { b.assume_init() }).collect();
            assert_eq!(read, b"frame");
            assert_eq!(got.fds.len(), 3);
            for (i, fd) in got.fds.into_iter().enumerate() {
                let m = SharedBytes::from_fd(fd, 1000 + i + round, i).expect("a sealed memfd");
                assert_eq!(m.as_slice(), &pattern(1000 + i + round)[..]);
            }
        }
        assert_eq!(open_fds(), before, "fds leaked");
    }

    #[test]
    fn more_fds_than_allowed_or_cut_ancillary_data_are_errors_and_close_what_came() {
        let _turn = counting();
        let (a, b) = UnixStream::pair().expect("socketpair");
        let before = open_fds();
        let bufs: Vec<SharedBytes> = (0..MAX_FDS_PER_FRAME + 1).map(|_| SharedBytes::from_slice(b"x").expect("sealed")).collect();
        let fds: Vec<BorrowedFd<'_>> = bufs.iter().map(SharedBytes::fd).collect();
        assert!(send_with_fds(a.as_fd(), b"f", &fds).is_err(), "the sender keeps to the cap");
        // A hostile sender ignores it: raw sendmsg with 17 fds.
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_FRAME + 1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        sendmsg(a.as_fd(), &[io::IoSlice::new(b"f")], &mut control, SendFlags::empty()).expect("sent");
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 8];
        let got = recv_with_fds(b.as_fd(), &mut buf).expect("recvmsg");
        assert_eq!(got.err(), Some(BufferViolation::TooMany { got: MAX_FDS_PER_FRAME + 1 }));
        // Far more than the receiver has room for: cut (MSG_CTRUNC).
        let many: Vec<SharedBytes> = (0..40).map(|_| SharedBytes::from_slice(b"x").expect("sealed")).collect();
        let many_fds: Vec<BorrowedFd<'_>> = many.iter().map(SharedBytes::fd).collect();
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(40))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&many_fds)));
        sendmsg(a.as_fd(), &[io::IoSlice::new(b"g")], &mut control, SendFlags::empty()).expect("sent");
        let got = recv_with_fds(b.as_fd(), &mut buf).expect("recvmsg");
        assert_eq!(got.err(), Some(BufferViolation::Truncated));
        drop((bufs, many));
        assert_eq!(open_fds(), before, "fds leaked");
    }

    #[test]
    fn ten_thousand_buffers_leak_no_fd_and_no_mapping() {
        let _turn = counting();
        let before = open_fds();
        for i in 0..10_000 {
            let b = SharedBytes::from_slice(&[i as u8; 100]).expect("sealed");
            assert_eq!(b.as_slice()[99], i as u8);
        }
        assert_eq!(open_fds(), before);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        assert!(maps.matches("pyvisor-buffer").count() < 10, "mappings left behind");
    }
}
