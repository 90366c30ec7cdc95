"""Out-of-band buffers (tests/out_of_band.rs): functions that read, return and try to change
the buffers the parent sends."""

import errno
import hashlib
import mmap
import os

from pyvisor_worker import expose


def _summary(data):
    return [type(data).__name__, len(data), hashlib.sha256(data).hexdigest()]


@expose(idempotent=True)
def digest(data):
    """What arrived (bytes by default) and its hash."""
    return _summary(data)


@expose(buffers="memoryview")
def view_digest(data):
    """A read-only memoryview over the mapping, when the buffer came out of band."""
    readonly = data.readonly if isinstance(data, memoryview) else None
    return _summary(data) + [readonly]


@expose
def make(n):
    """n bytes of a pattern (out of band from the threshold on)."""
    return bytes(i % 251 for i in range(min(n, 251))) * (n // 251) + bytes(i % 251 for i in range(n % 251))


@expose(buffers="memoryview")
def mirror(data):
    """A new buffer of the same size: every byte read (+1 mod 256)."""
    table = bytes((i + 1) % 256 for i in range(256))
    return bytes(data).translate(table)


def _buffer_fds():
    """This process's fds that are memfds the parent sent (pyvisor-buffer)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:pyvisor-buffer"):
                fds.append(int(name))
        except OSError:
            pass
    return fds


def _outcome(f):
    try:
        f()
        return "changed"
    except (TypeError, ValueError, BufferError):
        return "refused"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


@expose(buffers="memoryview")
def tamper(data):
    """Try every way to change the received buffer; say what each did."""
    out = {"memoryview": _outcome(lambda: data.__setitem__(0, (data[0] + 1) % 256))}
    fds = _buffer_fds()
    out["fds"] = len(fds)
    for fd in fds:
        # Reopened read-write through /proc: a new open file of the same sealed memfd.
        rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            out["mmap_shared_write"] = _outcome(lambda: mmap.mmap(rw, len(data), mmap.MAP_SHARED, mmap.PROT_WRITE | mmap.PROT_READ))
            out["write"] = _outcome(lambda: os.pwrite(rw, b"X", 0))
            out["truncate"] = _outcome(lambda: os.ftruncate(rw, 1))
            out["grow"] = _outcome(lambda: os.ftruncate(rw, len(data) * 2))
        finally:
            os.close(rw)
    return out


@expose
def open_fds(_):
    return len(os.listdir("/proc/self/fd"))


@expose(idempotent=True, buffers="memoryview")
def die_once(args):
    """Crash (SIGKILL) the first time, for the crash barrier; then say which memfd it got."""
    data, marker = args
    fds = _buffer_fds()
    inode = os.fstat(fds[0]).st_ino if fds else None
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(inode))
        os.kill(os.getpid(), 9)
    return [inode, hashlib.sha256(data).hexdigest()]


@expose(buffers="memoryview")
def hold(args):
    """Sleep with the buffer in hand (a crash mid-call)."""
    import time

    data, seconds = args
    time.sleep(seconds)
    return len(data)


@expose(buffers="memoryview")
def lengths(args):
    """The lengths of a buffer and of a list of buffers (several per call, nested)."""
    first, rest = args
    return [len(first)] + [len(b) for b in rest]
