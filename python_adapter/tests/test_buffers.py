"""Out-of-band buffer primitives (``_buffers``), against the real kernel.

Sealed memfds round-trip any bytes-like value and cannot be changed by anyone afterwards;
``check_sealed`` rejects every fd that is not such a memfd (or is too short); fds cross a
socketpair exactly once, with their bytes, and a cut or oversized set of fds is an error that
leaks nothing; mappings live exactly as long as what uses them; buffer references survive
MessagePack. Nothing here goes through the protocol (that is test_oob.py).
"""

from __future__ import annotations

import array
import errno
import fcntl
import gc
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import msgpack  # type: ignore[import-untyped,unused-ignore]
import pytest

from pyvisor_worker import _buffers
from pyvisor_worker._buffers import (
    EXT_BUFFER,
    MAX_FDS_PER_FRAME,
    BufferViolation,
    as_numpy,
    check_sealed,
    decode_ref,
    encode_ref,
    map_readonly,
    recv_with_fds,
    seal_bytes,
    send_with_fds,
)

KIB = 1024
MIB = 1024 * KIB
SEALS_ALL = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def pattern(n: int) -> bytes:
    """``n`` bytes that differ from their neighbours and from a shifted copy."""
    block = bytes(range(251))  # a prime length: no alignment with pages
    return (block * (n // len(block) + 1))[:n]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mapped(fd_or_inode: int, *, inode: bool = False) -> int:
    """How many mappings of this memfd (by inode) the process has."""
    ino = fd_or_inode if inode else os.fstat(fd_or_inode).st_ino
    count = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[4] == str(ino) and "pyvisor-buffer" in line:
                count += 1
    return count


def cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def memfd(data: bytes = b"", seals: int = 0, *, allow_sealing: bool = True) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if allow_sealing else 0)
    fd = os.memfd_create("pyvisor-buffer-test", flags)
    if data:
        os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.fixture
def pair() -> Iterator[Tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


# -- seal_bytes, check_sealed, map_readonly: round trip ------------------------------------


def make(kind: str, n: int) -> Tuple[Any, bytes]:
    """A value of ``kind`` holding ``n`` bytes, and those bytes."""
    data = pattern(n)
    if kind == "bytes":
        return data, data
    if kind == "bytearray":
        return bytearray(data), data
    if kind == "memoryview-slice":
        return memoryview(b"xyz" + data + b"xyz")[3 : 3 + n], data
    np = pytest.importorskip("numpy")
    return np.frombuffer(data, dtype=np.uint8).copy(), data


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview-slice", "numpy"])
@pytest.mark.parametrize("size", [0, 1, 64 * KIB, 16 * MIB], ids=["0B", "1B", "64KiB", "16MiB"])
def test_round_trip(kind: str, size: int) -> None:
    value, expected = make(kind, size)
    fd = seal_bytes(value)
    try:
        assert cloexec(fd)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == SEALS_ALL
        assert os.fstat(fd).st_size == size
        check_sealed(fd, size)
        view = map_readonly(fd, size)
    finally:
        os.close(fd)
    assert view.readonly
    assert len(view) == size
    assert view == expected


def test_round_trip_of_a_prefix() -> None:
    fd = seal_bytes(pattern(10_000))
    try:
        check_sealed(fd, 4096)
        view = map_readonly(fd, 4096)
    finally:
        os.close(fd)
    assert view == pattern(4096)


def test_numpy_layouts_travel_as_their_c_order_bytes() -> None:
    np = pytest.importorskip("numpy")
    values = [
        np.arange(1000, dtype=">f8"),  # non-native byte order
        np.arange(24, dtype=np.int32).reshape(2, 3, 4),  # several dimensions
        np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),  # not C-contiguous
        np.arange(100, dtype=np.int64)[::3],  # strided
        np.zeros(5, dtype=[("a", "<i4"), ("b", ">f8")]),  # structured
        np.float64(2.5),  # zero dimensions
    ]
    for value in values:
        expected = np.ascontiguousarray(value).tobytes()
        fd = seal_bytes(value)
        try:
            check_sealed(fd, len(expected))
            assert map_readonly(fd, len(expected)) == expected
        finally:
            os.close(fd)


def test_seal_bytes_survives_partial_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite
    calls: List[int] = []

    def short_pwrite(fd: int, data: Any, offset: int) -> int:
        calls.append(offset)
        return real(fd, memoryview(data)[:1000], offset)

    monkeypatch.setattr(os, "pwrite", short_pwrite)
    data = pattern(10_500)
    fd = seal_bytes(data)
    monkeypatch.undo()
    try:
        assert calls == list(range(0, 10_500, 1000))
        check_sealed(fd, len(data))
        assert map_readonly(fd, len(data)) == data
    finally:
        os.close(fd)


def test_seal_bytes_closes_its_fd_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pwrite(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    before = open_fds()
    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    with pytest.raises(OSError, match="No space left"):
        seal_bytes(b"abc")
    monkeypatch.undo()
    assert open_fds() == before
    with pytest.raises(TypeError):
        seal_bytes("not bytes")
    assert open_fds() == before


# -- a sealed memfd cannot be changed -------------------------------------------------------


def test_sealed_memfd_cannot_be_changed() -> None:
    data = pattern(3 * 4096 + 17)
    n = len(data)
    fd = seal_bytes(data)
    try:
        view = map_readonly(fd, n)
        with pytest.raises(TypeError):
            view[0] = 1
        with pytest.raises(TypeError):
            view[:3] = b"abc"
        # No writable shared mapping, no write, no size change, no seal removal.
        with pytest.raises(PermissionError):
            mmap.mmap(fd, n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(PermissionError):
            os.write(fd, b"x")
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, n - 1)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, n + 1)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):  # F_SEAL_SEAL: the seals are final too
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        # Reopened through /proc/self/fd (a second, writable open file description): it opens,
        # but the seals belong to the inode.
        reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.write(reopened, b"x")
            with pytest.raises(PermissionError):
                os.ftruncate(reopened, 1)
        finally:
            os.close(reopened)
        # A private writable mapping is allowed (copy-on-write): it never reaches the file.
        private = mmap.mmap(fd, n, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        private[:4] = b"EVIL"
        assert private[:4] == b"EVIL"
        private.close()
        assert view == data
        assert os.pread(fd, n, 0) == data
        assert os.fstat(fd).st_size == n
    finally:
        os.close(fd)


def test_a_writable_shared_mapping_prevents_sealing() -> None:
    fd = memfd(pattern(4096))
    try:
        writable = mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(OSError) as caught:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS_ALL)
        assert caught.value.errno == errno.EBUSY
        # Still writable through the mapping: that is why seal_bytes fills with write().
        writable[:4] = b"LATE"
        writable.close()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS_ALL)
        check_sealed(fd, 4096)
        assert bytes(map_readonly(fd, 4)) == b"LATE"
    finally:
        os.close(fd)


# -- check_sealed rejects -------------------------------------------------------------------


@pytest.mark.parametrize(
    "seals, message",
    [
        (0, "buffer 2: not sealed against writes (seals: none)"),
        (
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW,
            "buffer 2: not sealed against writes (seals: SHRINK|GROW)",
        ),
        (
            fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL,
            "buffer 2: not sealed against growing (seals: SEAL|SHRINK|WRITE)",
        ),
        (
            fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW,
            "buffer 2: not sealed against shrinking (seals: GROW|WRITE)",
        ),
    ],
    ids=["unsealed", "no-write", "no-grow", "no-shrink"],
)
def test_check_sealed_rejects_missing_seals(seals: int, message: str) -> None:
    fd = memfd(b"x" * 100, seals)
    try:
        with pytest.raises(BufferViolation) as caught:
            check_sealed(fd, 100, index=2)
        assert str(caught.value) == message
    finally:
        os.close(fd)


def test_check_sealed_accepts_without_the_seal_seal() -> None:
    fd = memfd(b"x" * 100, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    try:
        check_sealed(fd, 100)
        check_sealed(fd, 0)
    finally:
        os.close(fd)


def test_check_sealed_rejects_a_memfd_without_sealing() -> None:
    # Without MFD_ALLOW_SEALING the kernel reports F_SEAL_SEAL only: nothing can be added.
    fd = memfd(b"x" * 100, allow_sealing=False)
    try:
        with pytest.raises(BufferViolation, match=r"not sealed against writes \(seals: SEAL\)"):
            check_sealed(fd, 100)
    finally:
        os.close(fd)


def test_check_sealed_rejects_a_short_memfd() -> None:
    fd = seal_bytes(b"x" * 100)
    try:
        check_sealed(fd, 100)
        with pytest.raises(BufferViolation) as caught:
            check_sealed(fd, 4096)
        assert str(caught.value) == "buffer 0: 100 bytes, the message references 4096"
        with pytest.raises(ValueError):  # mmap refuses a mapping past the end (no SIGBUS)
            map_readonly(fd, 4096)
    finally:
        os.close(fd)


def test_check_sealed_rejects_what_is_not_a_memfd(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x" * 100)
    regular = os.open(path, os.O_RDONLY)
    read_end, write_end = os.pipe()
    a, b = socket.socketpair()
    try:
        for fd in (regular, read_end, write_end, a.fileno()):
            with pytest.raises(BufferViolation, match=r"^buffer 1: "):
                check_sealed(fd, 0, index=1)
        with pytest.raises(BufferViolation, match="not a sealable memfd"):
            check_sealed(read_end, 0, index=1)
    finally:
        for fd in (regular, read_end, write_end):
            os.close(fd)
        a.close()
        b.close()
    with pytest.raises(BufferViolation, match="not a sealable memfd"):
        check_sealed(regular, 0)  # closed: EBADF


# -- map_readonly: lifetime -----------------------------------------------------------------


def test_mapping_outlives_the_fd_and_ends_with_the_last_view() -> None:
    data = pattern(5 * 4096)
    fd = seal_bytes(data)
    inode = os.fstat(fd).st_ino
    view = map_readonly(fd, len(data))
    os.close(fd)
    assert view == data
    assert mapped(inode, inode=True) == 1
    part = view[4096:8192]
    view.release()
    with pytest.raises(ValueError):
        view[0]
    assert part == data[4096:8192]  # a slice holds the mapping on its own
    assert mapped(inode, inode=True) == 1
    del part
    gc.collect()
    assert mapped(inode, inode=True) == 0


def test_empty_mapping() -> None:
    fd = seal_bytes(b"")
    try:
        view = map_readonly(fd, 0)
    finally:
        os.close(fd)
    assert view.readonly and len(view) == 0 and bytes(view) == b""
    with pytest.raises(ValueError):
        map_readonly(-1, -1)


def test_numpy_array_shares_the_mapping_and_outlives_the_view() -> None:
    np = pytest.importorskip("numpy")
    data = np.arange(64 * KIB, dtype=np.float64)
    fd = seal_bytes(data)
    inode = os.fstat(fd).st_ino
    view = map_readonly(fd, data.nbytes)
    os.close(fd)
    arr = as_numpy(view, dtype=np.float64)
    assert np.shares_memory(arr, np.frombuffer(view, dtype=np.uint8))
    assert arr.ctypes.data == np.frombuffer(view, dtype=np.uint8).ctypes.data
    assert not arr.flags.writeable
    with pytest.raises(ValueError):
        arr[0] = 1.0
    with pytest.raises(ValueError):
        arr.flags.writeable = True  # the buffer itself is read-only
    assert np.array_equal(arr, data)
    # Released explicitly and dropped: the array still holds the mapping.
    view.release()
    del view
    gc.collect()
    assert mapped(inode, inode=True) == 1
    assert np.array_equal(arr, data)
    derived = arr[10:20]
    del arr
    gc.collect()
    assert mapped(inode, inode=True) == 1
    assert np.array_equal(derived, data[10:20])
    del derived
    gc.collect()
    assert mapped(inode, inode=True) == 0


def test_as_numpy_without_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(ImportError, match="install numpy to"):
        as_numpy(memoryview(b"abc"))


def test_importing_the_module_does_not_import_numpy() -> None:
    code = "import sys, pyvisor_worker._buffers; sys.exit('numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# -- fd passing -----------------------------------------------------------------------------


def test_data_and_fds_arrive_together(pair: Tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    contents = [b"first", pattern(70_000), b""]
    fds = [seal_bytes(c) for c in contents]
    try:
        send_with_fds(a, b"hello", fds)
    finally:
        for fd in fds:
            os.close(fd)  # the receiver has its own
    buf = bytearray(64)
    nbytes, got = recv_with_fds(b, buf)
    try:
        assert bytes(buf[:nbytes]) == b"hello"
        assert len(got) == 3
        for i, (fd, content) in enumerate(zip(got, contents)):
            assert cloexec(fd)
            check_sealed(fd, len(content), index=i)
            assert map_readonly(fd, len(content)) == content
    finally:
        for fd in got:
            os.close(fd)
    # Without fds: plain bytes; at the end of the stream: (0, []).
    send_with_fds(a, b"plain", [])
    assert recv_with_fds(b, buf) == (5, [])
    a.close()
    assert recv_with_fds(b, memoryview(buf)) == (0, [])


class SpySocket:
    """A real socket whose ``sendmsg`` results are recorded."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sendmsg_results: List[int] = []
        self.sendall_sizes: List[int] = []

    def sendmsg(self, buffers: Any, ancdata: Any) -> int:
        sent = self.sock.sendmsg(buffers, ancdata)
        self.sendmsg_results.append(sent)
        return sent

    def sendall(self, data: Any) -> None:
        self.sendall_sizes.append(memoryview(data).nbytes)
        self.sock.sendall(data)


def test_partial_send_delivers_everything_and_the_fds_once(
    pair: Tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    payload = pattern(8 * MIB)
    fds = [seal_bytes(b"fd %d" % i) for i in range(3)]
    # A timeout makes CPython's socket non-blocking underneath: sendmsg writes what fits.
    a.settimeout(30)
    spy = SpySocket(a)
    errors: List[BaseException] = []

    def sender() -> None:
        try:
            send_with_fds(spy, payload, fds)  # type: ignore[arg-type]
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    thread = threading.Thread(target=sender)
    thread.start()
    received = bytearray()
    got: List[Tuple[int, List[int]]] = []
    buf = bytearray(256 * KIB)
    try:
        while len(received) < len(payload):
            nbytes, new = recv_with_fds(b, buf)
            assert nbytes > 0
            received += buf[:nbytes]
            got.append((len(received), new))
        thread.join(30)
        assert not errors
        assert received == payload
        assert len(spy.sendmsg_results) == 1
        assert 0 < spy.sendmsg_results[0] < len(payload)  # the partial path was taken
        assert spy.sendall_sizes == [len(payload) - spy.sendmsg_results[0]]
        with_fds = [(end, new) for end, new in got if new]
        assert len(with_fds) == 1 and len(with_fds[0][1]) == 3
        assert got[0][1] == with_fds[0][1]  # with the first bytes
        for i, fd in enumerate(with_fds[0][1]):
            assert map_readonly(fd, 4) == b"fd %d" % i
    finally:
        thread.join(30)
        for fd in fds:
            os.close(fd)
        for _, new in got:
            for fd in new:
                os.close(fd)


class ShortWriter:
    """A fake socket: sendmsg takes one byte, sendall the rest."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, bytes, Any]] = []

    def sendmsg(self, buffers: Any, ancdata: Any) -> int:
        self.calls.append(("sendmsg", bytes(buffers[0][:1]), ancdata))
        return 1

    def sendall(self, data: Any) -> None:
        self.calls.append(("sendall", bytes(data), None))


def test_partial_sendmsg_sends_the_rest_without_fds() -> None:
    fake = ShortWriter()
    send_with_fds(fake, b"abcdef", [5, 6])  # type: ignore[arg-type]
    assert [c[:2] for c in fake.calls] == [("sendmsg", b"a"), ("sendall", b"bcdef")]
    ((level, kind, fds),) = fake.calls[0][2]
    assert (level, kind, list(fds)) == (socket.SOL_SOCKET, socket.SCM_RIGHTS, [5, 6])


def test_send_with_fds_limits(pair: Tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    with pytest.raises(ValueError, match="17 fds in one message, at most 16"):
        send_with_fds(a, b"x", [0] * (MAX_FDS_PER_FRAME + 1))
    with pytest.raises(ValueError, match="at least one byte"):
        send_with_fds(a, b"", [0])


def test_kernel_facts_the_protocol_relies_on(pair: Tuple[socket.socket, socket.socket]) -> None:
    """Not this module's behaviour but Linux's, pinned: why fds need their own message."""
    a, b = pair
    fd = seal_bytes(b"x")
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    buf = bytearray(64)
    try:
        # fds with no byte to carry them vanish silently (hence send_with_fds' ValueError).
        assert a.sendmsg([b""], rights) == 0
        a.send(b"z")
        assert recv_with_fds(b, buf) == (1, [])
        # A read stops after a segment that carries fds, not before: the fds of a later send
        # arrive with the plain bytes sent before it, so a read cannot tell whose they are.
        a.send(b"EEEE")
        a.sendmsg([b"FFFF"], rights)
        a.send(b"GGGG")
        nbytes, got = recv_with_fds(b, buf)
        for received in got:
            os.close(received)
        assert (bytes(buf[:nbytes]), len(got)) == (b"EEEEFFFF", 1)
        assert recv_with_fds(b, buf) == (4, [])
        # Without MSG_CMSG_CLOEXEC received fds would be inheritable (recv_with_fds asks for it).
        a.sendmsg([b"x"], rights)
        _, ancdata, _, _ = b.recvmsg_into([buf], socket.CMSG_SPACE(4))
        plain = array.array("i")
        plain.frombytes(ancdata[0][2])
        assert not cloexec(plain[0])
        os.close(plain[0])
    finally:
        os.close(fd)


def test_truncated_ancillary_data_is_an_error_and_leaks_nothing(
    pair: Tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    fds = [seal_bytes(b"%d" % i) for i in range(3)]
    try:
        send_with_fds(a, b"x", fds)
        before = open_fds()
        with pytest.raises(BufferViolation) as caught:
            recv_with_fds(b, bytearray(8), max_fds=1)
        assert str(caught.value) == "ancillary data truncated (MSG_CTRUNC): fds lost"
        assert open_fds() == before
        # Default room (16 fds) with 17 sent by a raw sendmsg: cut too.
        many = fds * 5 + fds[:2]
        a.sendmsg([b"y"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", many))])
        with pytest.raises(BufferViolation, match="MSG_CTRUNC"):
            recv_with_fds(b, bytearray(8))
        assert open_fds() == before
    finally:
        for fd in fds:
            os.close(fd)


def test_more_fds_than_allowed_is_an_error_and_leaks_nothing(
    pair: Tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    fds = [seal_bytes(b"%d" % i) for i in range(2)]
    try:
        before = open_fds()
        # Room for one fd is CMSG_SPACE(4): rounded up to 8 bytes of data on 64-bit, so the
        # kernel delivers two without MSG_CTRUNC. The receiver counts them itself.
        send_with_fds(a, b"x", fds)
        with pytest.raises(BufferViolation, match="2 fds in one message, at most 1"):
            recv_with_fds(b, bytearray(8), max_fds=1)
        assert open_fds() == before
    finally:
        for fd in fds:
            os.close(fd)


# -- no leaks -------------------------------------------------------------------------------


def test_no_fd_or_mapping_leaks_over_many_cycles(pair: Tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    data = pattern(4096 + 1)
    before = open_fds()
    inodes = set()
    for _ in range(10_000):
        fd = seal_bytes(data)
        inodes.add(os.fstat(fd).st_ino)
        check_sealed(fd, len(data))
        view = map_readonly(fd, len(data))
        os.close(fd)
        assert view[4096] == data[4096]
        del view
    assert open_fds() == before
    buf = bytearray(64)
    for i in range(1_000):
        fds = [seal_bytes(b"%d" % i), seal_bytes(b"")]
        send_with_fds(a, b"frame", fds)
        for fd in fds:
            os.close(fd)
        nbytes, got = recv_with_fds(b, buf)
        assert (nbytes, len(got)) == (5, 2)
        check_sealed(got[0], len(b"%d" % i))
        for fd in got:
            os.close(fd)
    assert open_fds() == before
    with open("/proc/self/maps") as maps:
        assert not any("pyvisor-buffer" in line for line in maps)


# -- references -----------------------------------------------------------------------------


class Ref:
    def __init__(self, index: int) -> None:
        self.index = index


def default(obj: Any) -> Any:
    if isinstance(obj, Ref):
        return encode_ref(obj.index)
    raise TypeError(f"cannot serialize {obj!r}")


def test_references_round_trip_through_msgpack() -> None:
    value = {"a": Ref(0), "b": [Ref(7), Ref(2**32 - 1)], "c": b"inline"}
    packed = msgpack.packb(value, default=default)
    assert bytes([0xD6, EXT_BUFFER]) + (7).to_bytes(4, "big") in packed  # fixext 4, type 80
    decoded = msgpack.unpackb(packed, ext_hook=lambda code, data: ("ref", decode_ref(code, data)))
    assert decoded == {"a": ("ref", 0), "b": [("ref", 7), ("ref", 2**32 - 1)], "c": b"inline"}


def test_bad_references_are_rejected() -> None:
    with pytest.raises(ValueError, match="ext type 81"):
        decode_ref(81, b"\0\0\0\0")
    for data in (b"", b"\0\0\0", b"\0\0\0\0\0"):
        with pytest.raises(ValueError, match="expected 4"):
            decode_ref(EXT_BUFFER, data)
    for index in (-1, 2**32):
        with pytest.raises(ValueError, match="out of range"):
            encode_ref(index)
    packed = msgpack.packb(msgpack.ExtType(EXT_BUFFER, b"\0\0"))
    with pytest.raises(ValueError):
        msgpack.unpackb(packed, ext_hook=decode_ref)


# -- figures --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16 * MIB, 256 * MIB], ids=["16MiB", "256MiB"])
def test_print_seal_and_map_time(size: int, capsys: pytest.CaptureFixture[str]) -> None:
    data = pattern(size)
    start = time.perf_counter()
    fd = seal_bytes(data)
    sealed = time.perf_counter()
    check_sealed(fd, size)
    view = map_readonly(fd, size)
    mapped_at = time.perf_counter()
    os.close(fd)
    # First read of every page (the mapping is lazy): page faults on the receiving side.
    assert view[::4096] == data[::4096]
    touched = time.perf_counter()
    del view
    with capsys.disabled():
        print(
            f"\n[buffers] {size // MIB} MiB: seal_bytes {(sealed - start) * 1e3:.1f} ms, "
            f"check+map {(mapped_at - sealed) * 1e3:.2f} ms, "
            f"first touch of every page {(touched - mapped_at) * 1e3:.1f} ms "
            f"({size / MIB / (sealed - start) / 1024:.2f} GiB/s sealing)"
        )


def test_module_exports() -> None:
    assert EXT_BUFFER == 80 and MAX_FDS_PER_FRAME == 16
    for name in _buffers.__all__:
        assert hasattr(_buffers, name)
