"""Out-of-band buffers: sealed memfds and fd passing (docs/buffers.md and docs/protocol.md).

This module owns the primitives of issue 16, each usable and tested alone:

- making a buffer: :func:`seal_bytes` copies a bytes-like value once into a new memfd and
  seals it against every change (write, shrink, grow, further seals);
- checking a received one: :func:`check_sealed` (size and seals, before any use), raising
  :class:`BufferViolation` that names the failed check;
- reading one: :func:`map_readonly` (a read-only ``memoryview`` over a shared mapping that
  lives as long as the view and whatever derives from it) and :func:`as_numpy` (zero-copy,
  numpy imported only when called);
- moving fds: :func:`send_with_fds` / :func:`recv_with_fds`, one ``sendmsg``/``recvmsg`` whose
  ``SCM_RIGHTS`` fds travel with the first bytes; a cut or oversized set of fds is an error and
  every fd received with it is closed;
- the reference a MessagePack value carries instead of the bytes: :func:`encode_ref` /
  :func:`decode_ref` (ext type :data:`EXT_BUFFER`).

It does not own the protocol: the ``oob`` capability, the ``fds`` message, which frame owns
which fds, thresholds and limits (``max_buffer``) and (de)serialization of values belong to
``_oob`` (with the reader, the dispatcher and the writer), built on these primitives.
Linux only (``memfd_create``, file seals).
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import struct
import sys
from typing import TYPE_CHECKING, Any, List, Sequence, Tuple, Union

import msgpack  # type: ignore[import-untyped,unused-ignore]

if TYPE_CHECKING:  # pragma: no cover
    import numpy

__all__ = [
    "EXT_BUFFER",
    "MAX_FDS_PER_FRAME",
    "REQUIRED_SEALS",
    "BufferViolation",
    "seal_bytes",
    "check_sealed",
    "map_readonly",
    "as_numpy",
    "send_with_fds",
    "recv_with_fds",
    "encode_ref",
    "decode_ref",
]

#: MessagePack ext type of a reference to a buffer: 4 bytes, the big-endian index of the buffer
#: among its frame's fds.
EXT_BUFFER = 80
#: Most fds one ``fds`` message (one ``sendmsg``) may carry.
MAX_FDS_PER_FRAME = 16

_REF = struct.Struct(">I")
_INT_SIZE = array.array("i").itemsize

#: The seals a received buffer must carry: with these nobody can change its bytes or its size.
#: ``F_SEAL_SEAL`` is added by :func:`seal_bytes` but not required of a received fd.
REQUIRED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_ALL_SEALS = REQUIRED_SEALS | fcntl.F_SEAL_SEAL
_SEAL_NAMES = (
    (fcntl.F_SEAL_SEAL, "SEAL"),
    (fcntl.F_SEAL_SHRINK, "SHRINK"),
    (fcntl.F_SEAL_GROW, "GROW"),
    (fcntl.F_SEAL_WRITE, "WRITE"),
)
_MEMFD_NAME = "pyvisor-buffer-python"
# mmap(trackfd=False), Python 3.13+: a mapping does not hold a duplicate of its fd.
_TRACKFD = sys.version_info >= (3, 13)
# Received fds are close-on-exec from the start where the kernel can do it (Linux: always).
_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)

#: Any object with the buffer protocol (bytes, bytearray, memoryview, numpy array, ...);
#: ``collections.abc.Buffer`` is Python 3.12+.
BytesLike = Any


class BufferViolation(Exception):
    """A received fd failed a check, or fds arrived in a way the protocol forbids.

    The message names the check (and the buffer's index when there is one), e.g.
    ``buffer 2: not sealed against writes (seals: SHRINK|GROW)``. The fds concerned have been
    closed, or were never the receiver's to close (:func:`check_sealed`).
    """


def _seal_names(seals: int) -> str:
    names = [name for bit, name in _SEAL_NAMES if seals & bit]
    return "|".join(names) if names else "none"


def seal_bytes(data: BytesLike) -> int:
    """Copy ``data`` into a new memfd, seal it and return the fd (the caller owns it).

    ``data`` is any buffer-protocol object (``bytes``, ``bytearray``, ``memoryview``, a numpy
    array, ...); a C-contiguous one is written straight from its memory, once, with ``write``
    (a non-contiguous one is first copied into contiguous bytes). The bytes go in with
    ``write`` rather than through a mapping because ``F_SEAL_WRITE`` cannot be added while a
    writable shared mapping exists. Sealed with WRITE, SHRINK, GROW and SEAL: from then on
    neither this process nor the receiver can change its bytes or its size. On any failure the
    fd is closed and the error propagates.
    """
    fd = os.memfd_create(_MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with memoryview(data) as view:
            if not view.c_contiguous:
                view = memoryview(view.tobytes())
            with view.cast("B") as raw:
                total = raw.nbytes
                if total:
                    # Sized first: the write fills an allocated file instead of growing it.
                    os.ftruncate(fd, total)
                done = 0
                while done < total:
                    done += os.pwrite(fd, raw[done:], done)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _ALL_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_sealed(fd: int, length: int, index: int = 0) -> None:
    """Check a received buffer before any use: sealed against change, at least ``length`` bytes.

    Raises :class:`BufferViolation` naming buffer ``index`` and the failed check: not a
    sealable memfd (``F_GET_SEALS`` fails, e.g. a pipe or a file on disk), a missing WRITE,
    SHRINK or GROW seal, or fewer bytes than the message references. ``F_SEAL_SEAL`` is not
    required. The fd is not closed (the caller owns it).
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        raise BufferViolation(
            f"buffer {index}: not a sealable memfd (F_GET_SEALS: {e.strerror})"
        ) from None
    shown = _seal_names(seals)
    if not seals & fcntl.F_SEAL_WRITE:
        raise BufferViolation(f"buffer {index}: not sealed against writes (seals: {shown})")
    if not seals & fcntl.F_SEAL_SHRINK:
        raise BufferViolation(f"buffer {index}: not sealed against shrinking (seals: {shown})")
    if not seals & fcntl.F_SEAL_GROW:
        raise BufferViolation(f"buffer {index}: not sealed against growing (seals: {shown})")
    try:
        size = os.fstat(fd).st_size
    except OSError as e:  # pragma: no cover - F_GET_SEALS succeeded on this fd
        raise BufferViolation(f"buffer {index}: fstat failed ({e.strerror})") from None
    if size < length:
        raise BufferViolation(
            f"buffer {index}: {size} bytes, the message references {length}"
        )


_POPULATE: int = getattr(mmap, "MAP_POPULATE", 0)


def map_readonly(fd: int, length: int) -> memoryview:
    """A read-only ``memoryview`` of the first ``length`` bytes of ``fd``, mapped, not copied.

    ``mmap(PROT_READ, MAP_PRIVATE)`` (private, not shared: before Linux 6.7 a shared mapping of
    a write-sealed memfd is refused even read-only; a private read-only mapping sees the same
    pages); writing through the view raises ``TypeError``. The fd may
    be closed right after: the mapping does not need it. The mapping is unmapped when the last
    reference to it goes: the view, its slices, and anything that exported a buffer from them
    (a numpy array from :func:`as_numpy` holds its own). Nothing has to call ``mmap.close()``:
    the mmap object is referenced only by the views, and unmaps when it is collected.

    Check the fd with :func:`check_sealed` first: only a sealed fd guarantees the bytes cannot
    change under the reader, nor the file shrink under the mapping (``SIGBUS``). ``length``
    larger than the file raises ``ValueError``; ``0`` gives an empty view without a mapping.
    """
    if length < 0:
        raise ValueError(f"negative buffer length {length}")
    if length == 0:
        return memoryview(b"")
    # Page tables filled at once (one call instead of a fault per few pages): the buffer is
    # about to be read (measured: docs/benchmarks.md, "Out-of-band buffers").
    flags = mmap.MAP_PRIVATE | _POPULATE
    if _TRACKFD:  # Python 3.13+: the mmap object keeps no duplicate of the fd
        mapped = mmap.mmap(  # type: ignore[call-arg,unused-ignore]
            fd, length, flags=flags, prot=mmap.PROT_READ, trackfd=False
        )
    else:  # (it holds a duplicate of the fd, closed when it is collected)
        mapped = mmap.mmap(fd, length, flags=flags, prot=mmap.PROT_READ)
    # A PROT_READ mmap exports read-only buffers; the view keeps `mapped` alive.
    return memoryview(mapped)


def as_numpy(view: memoryview, dtype: Any = "uint8") -> numpy.ndarray:
    """A read-only numpy array over ``view``'s memory (zero-copy ``numpy.frombuffer``).

    Public as ``pyvisor_worker.as_numpy``: in a function exposed with
    ``@expose(buffers="memoryview")``, ``as_numpy(buf, "float32")`` reads a buffer the parent
    sent out of band as an array without copying it (``dtype`` is anything
    ``numpy.dtype`` accepts; the buffer's size must be a multiple of its item size). The
    array is read-only (the memory is sealed shared memory: nobody can change it); use
    ``.copy()`` for a writable one. Any bytes-like ``view`` works (``bytes`` too).

    The array keeps the mapping alive on its own: releasing ``view`` later does not pull the
    memory from under it. numpy is imported here, not when this module is.
    """
    try:
        import numpy as np
    except ImportError:
        raise ImportError(
            "install numpy to read a buffer as an array (pip install numpy)"
        ) from None
    # A view of our own, which nobody else can release(): the array's base holds the mapping
    # whatever numpy keeps as its base (recent numpy keeps a fresh memoryview; older numpy the
    # object passed in).
    arr = np.frombuffer(memoryview(view), dtype=dtype)
    arr.flags.writeable = False
    return arr


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send_with_fds(sock: socket.socket, data: BytesLike, fds: Sequence[int]) -> None:
    """Send all of ``data`` with ``fds`` attached to its first bytes, as one ``SCM_RIGHTS``.

    One ``sendmsg`` carries the fds (they go exactly once); if it wrote only part of ``data``
    (a non-blocking socket, a socket with a timeout), the rest follows with ``sendall``. The
    fds stay open here: the kernel passes duplicates. With fds, ``data`` must not be empty (a
    stream socket carries ancillary data only with at least one byte). At most
    :data:`MAX_FDS_PER_FRAME` fds, else ``ValueError``.
    """
    if len(fds) > MAX_FDS_PER_FRAME:
        raise ValueError(f"{len(fds)} fds in one message, at most {MAX_FDS_PER_FRAME}")
    with memoryview(data) as view, view.cast("B") as raw:
        if fds and not raw.nbytes:
            raise ValueError("fds need at least one byte of data to travel with")
        if fds:
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            sent = sock.sendmsg([raw], ancdata)
        else:
            sent = 0
        if sent < raw.nbytes:
            sock.sendall(raw[sent:])


def recv_with_fds(
    sock: socket.socket, buf: Union[bytearray, memoryview], max_fds: int = MAX_FDS_PER_FRAME
) -> Tuple[int, List[int]]:
    """One ``recvmsg`` into ``buf``: how many bytes arrived and the fds that came with them.

    Room is made for ``max_fds`` fds. Every ``SCM_RIGHTS`` message is read (a trailing partial
    int is ignored). ``MSG_CTRUNC`` (the kernel had more ancillary data than room: fds were
    lost) or more than ``max_fds`` fds raise :class:`BufferViolation` after closing every fd
    received. Received fds are close-on-exec. ``(0, [])`` is the end of the stream.
    """
    if not 0 < max_fds <= 0xFFFF:
        raise ValueError(f"max_fds must be between 1 and 65535, not {max_fds}")
    nbytes, ancdata, flags, _ = sock.recvmsg_into(
        [buf], socket.CMSG_SPACE(max_fds * _INT_SIZE), _CMSG_CLOEXEC
    )
    fds: List[int] = []
    try:
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                ints = array.array("i")
                ints.frombytes(payload[: len(payload) - len(payload) % _INT_SIZE])
                fds.extend(ints)
        if not _CMSG_CLOEXEC:  # pragma: no cover - Linux has MSG_CMSG_CLOEXEC
            for fd in fds:
                os.set_inheritable(fd, False)
        if flags & socket.MSG_CTRUNC:
            raise BufferViolation("ancillary data truncated (MSG_CTRUNC): fds lost")
        if len(fds) > max_fds:
            raise BufferViolation(f"{len(fds)} fds in one message, at most {max_fds}")
    except BaseException:
        _close_all(fds)
        raise
    return nbytes, fds


def encode_ref(index: int) -> msgpack.ExtType:
    """The MessagePack value that stands for buffer ``index`` of its frame (ext type 80)."""
    if not 0 <= index <= 0xFFFFFFFF:
        raise ValueError(f"buffer index {index} out of range (0 to 2**32 - 1)")
    return msgpack.ExtType(EXT_BUFFER, _REF.pack(index))


def decode_ref(code: int, data: bytes) -> int:
    """The buffer index an ext value carries; ``ValueError`` unless type 80 with 4 bytes."""
    if code != EXT_BUFFER:
        raise ValueError(f"ext type {code} is not a buffer reference ({EXT_BUFFER})")
    if len(data) != _REF.size:
        raise ValueError(f"buffer reference of {len(data)} bytes, expected {_REF.size}")
    index: int = _REF.unpack(data)[0]
    return index
