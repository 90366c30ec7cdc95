"""Out-of-band buffers in the protocol (capability ``oob``, docs/buffers.md and docs/protocol.md).

Owns what the protocol adds on top of the ``_buffers`` primitives:

- :func:`oob_supported`: the probe, once at start, that memfd sealing works here;
- :class:`Inbound` (the reading side): the parent's fds do not come on the main socket but on
  a **side channel**, the worker's end of a ``SOCK_DGRAM`` socketpair (``PYVISOR_FDS_FD``):
  for each ``fds`` message the parent first sends one datagram (1 byte, ``0``) carrying that
  message's ``n`` fds, datagrams in the order of the ``fds`` messages. So the main socket is
  read with plain ``recv_into`` whether ``oob`` is on or not (a ``recvmsg`` per read would
  cost every call). An ``fds`` message, once the frame after it is complete, receives its
  datagram (:meth:`Inbound.claim`: one ``recvmsg``, waiting at most
  ``PYVISOR_FDS_TIMEOUT_MS``), checks (:func:`~._buffers.check_sealed`) and maps
  (:func:`~._buffers.map_readonly`) each fd, closes them at once, and hands the mappings to
  that **next frame** (:class:`Owned`), which must be a ``call`` or ``call_options``
  referencing each exactly once (ext type 80). A reference decodes to ``bytes`` (copied, then
  unmapped), or to a read-only ``memoryview`` over the mapping for a function exposed with
  ``@expose(buffers="memoryview")``. Every violation (no datagram in time, a datagram with
  more than :data:`~._buffers.MAX_FDS_PER_FRAME` fds or cut ancillary data, a count other
  than the message's) is a protocol error (the worker exits with status 3);
- :class:`Outbound` (the writing side, unchanged by the side channel): a result or stream item
  that is a bytes-like value of at least ``PYVISOR_OOB_THRESHOLD`` bytes is written once into
  a sealed memfd, announced by an ``fds`` message sent with its fd on the **main** socket in
  one ``sendmsg`` immediately followed by the frame whose value references it; smaller ones
  (and every buffer when ``oob`` is off) go in band as ``bytes``.

Without the capability none of this runs: the side channel is never read and the writer never
sends an fd.
"""

from __future__ import annotations

import array
import fcntl
import functools
import os
import socket
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence

import msgpack  # type: ignore[import-untyped,unused-ignore]

from ._buffers import (
    EXT_BUFFER,
    MAX_FDS_PER_FRAME,
    BufferViolation,
    check_sealed,
    decode_ref,
    encode_ref,
    map_readonly,
    seal_bytes,
)
from ._exits import protocol_error
from ._framing import (
    HEADER,
    KIND_REPLY_TOO_LARGE,
    MSG_CALL,
    MSG_CALL_OPTIONS,
    MSG_FDS,
    MSG_ITEM,
    MSG_REPLY,
)


__all__ = [
    "ANCBUFSIZE",
    "BUFFER_TYPES",
    "oob_supported",
    "buffer_bytes",
    "Inbound",
    "Owned",
    "Outbound",
    "BufferTooLarge",
    "item_body",
    "unpack_unannounced",
]

#: The types whose top-level results the hot paths send to :class:`Outbound` (a cheap
#: ``type(x) in`` test); other buffer-protocol objects (numpy arrays) get there when
#: MessagePack cannot encode them.
BUFFER_TYPES: FrozenSet[type] = frozenset((bytes, bytearray, memoryview))
#: What the hot paths test when ``oob`` is off: nothing.
NO_TYPES: FrozenSet[type] = frozenset()

_HEADER_PACK = HEADER.pack
_REF0 = encode_ref(0)
#: Room for one fd more than a datagram may bring (17: more than 16 is seen and refused; more
#: than 17 sets ``MSG_CTRUNC``, refused too).
ANCBUFSIZE = socket.CMSG_SPACE((MAX_FDS_PER_FRAME + 1) * array.array("i").itemsize)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
# Received fds are close-on-exec from the start (Linux).
_CMSG_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))


def oob_supported() -> bool:
    """Whether this machine can make sealed memfds (``memfd_create`` and ``F_ADD_SEALS``)."""
    try:
        fd = os.memfd_create("pyvisor-probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except (AttributeError, OSError):
        return False
    try:
        os.ftruncate(fd, 1)
        fcntl.fcntl(
            fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
        )
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        return bool(seals & fcntl.F_SEAL_WRITE)
    except (AttributeError, OSError):
        return False
    finally:
        os.close(fd)


def buffer_bytes(value: Any) -> Optional[memoryview]:
    """A ``memoryview`` of ``value`` if it has the buffer protocol (``bytes``, ``bytearray``,
    ``memoryview``, a numpy array, ``array.array``...), else ``None``."""
    if isinstance(value, (str, int, float, list, tuple, dict)) or value is None:
        return None
    try:
        return memoryview(value)
    except TypeError:
        return None


def _unmap(view: memoryview) -> None:
    """Release a mapping's view and unmap it now (its mmap holds a duplicate of the fd)."""
    mapped = view.obj
    view.release()
    close = getattr(mapped, "close", None)
    if close is not None:
        try:
            close()
        except (BufferError, OSError):  # pragma: no cover - nothing else exports it
            pass


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------------- reading


class Owned:
    """The buffers an ``fds`` message handed to the next frame, and how that frame decodes.

    :meth:`unpack` decodes the frame body: it must be a ``call`` or ``call_options``, and
    reference every buffer exactly once (ext type 80, 4-byte big-endian index). A reference
    becomes ``bytes`` (copied out of the mapping, which is then unmapped), or the mapping's
    read-only ``memoryview`` if the called function was exposed with
    ``buffers="memoryview"``. Violations raise :class:`~._buffers.BufferViolation`.
    """

    __slots__ = ("_views", "_routes")

    def __init__(self, views: List[memoryview], routes: Dict[str, Any]) -> None:
        self._views = views
        self._routes = routes

    def unpack(self, body: Any) -> List[Any]:
        views = self._views
        count = len(views)
        used = [False] * count
        zero_copy = [False]

        def hook(code: int, data: bytes) -> Any:
            if code != EXT_BUFFER:
                return msgpack.ExtType(code, data)
            try:
                index = decode_ref(code, data)
            except ValueError as e:
                raise BufferViolation(str(e)) from None
            if index >= count:
                raise BufferViolation(
                    f"buffer reference {index} out of range: the fds message passed {count}"
                )
            if used[index]:
                raise BufferViolation(f"buffer {index} referenced more than once")
            used[index] = True
            view = views[index]
            if zero_copy[0]:
                return view
            copied = bytes(view)
            _unmap(view)
            return copied

        try:
            unpacker = msgpack.Unpacker(
                None,
                raw=False,
                strict_map_key=False,
                ext_hook=hook,
                max_buffer_size=max(len(body), 1),
            )
            unpacker.feed(body)
            size = unpacker.read_array_header()
            kind = unpacker.unpack() if size else None
            if type(kind) is not int or kind not in (MSG_CALL, MSG_CALL_OPTIONS):
                raise BufferViolation(
                    f"an fds message is followed by a message of type {kind!r:.50}, not a call"
                )
            msg: List[Any] = [kind]
            for i in range(1, size):
                if i == 4:  # the function's name is known: how it takes its buffers
                    route = self._routes.get(msg[3]) if type(msg[3]) is str else None
                    zero_copy[0] = route is not None and route[0].buffers == "memoryview"
                msg.append(unpacker.unpack())
            if unpacker.tell() != len(body):
                raise ValueError("extra bytes after the message")
            unused = [i for i, u in enumerate(used) if not u]
            if unused:
                raise BufferViolation(
                    f"buffer {unused[0]} of the fds message is not referenced by its frame"
                )
        except BufferViolation as e:
            self.release()
            protocol_error(str(e))
        except Exception:
            self.release()
            raise
        return msg

    def release(self) -> None:
        """Unmap every buffer nothing took (error paths)."""
        for view in self._views:
            try:
                _unmap(view)
            except Exception:  # pragma: no cover
                pass


def _unannounced(code: int, data: bytes) -> Any:
    """The ext hook of frames no ``fds`` message announced: a buffer reference there is a
    protocol error; other ext types decode as always (``msgpack.ExtType``)."""
    if code == EXT_BUFFER:
        protocol_error("a buffer reference in a frame not announced by an fds message")
    return msgpack.ExtType(code, data)


#: How a frame that no ``fds`` message announced is decoded with ``oob`` on (the hook runs only
#: for ext values: a frame without any costs nothing more).
unpack_unannounced: Callable[[Any], Any] = functools.partial(
    msgpack.unpackb, raw=False, strict_map_key=False, ext_hook=_unannounced
)


class Inbound:
    """The side channel's datagrams, and the ``fds`` messages that claim them (see the
    module). Used only by the thread holding the reader's lock."""

    __slots__ = ("_recvmsg", "_max_buffer", "_routes", "_timeout_s")

    def __init__(self, side: socket.socket, max_buffer: int, timeout_s: float) -> None:
        side.settimeout(timeout_s)  # recvmsg waits at most that long
        self._recvmsg = side.recvmsg
        self._max_buffer = max_buffer
        self._timeout_s = timeout_s
        #: name → route (``route[0]`` the spec): set by the dispatcher.
        self._routes: Dict[str, Any] = {}

    def set_routes(self, routes: Dict[str, Any]) -> None:
        self._routes = routes

    def check(self, msg: List[Any]) -> None:
        """An ``fds`` message ``[12, [len_0, ...]]`` as soon as it is read: well-formed, and
        each length within ``max_buffer``."""
        lengths = msg[1] if len(msg) >= 2 else None
        if (
            type(lengths) is not list
            or not 1 <= len(lengths) <= MAX_FDS_PER_FRAME
            or any(type(n) is not int or n < 0 for n in lengths)
        ):
            protocol_error(f"malformed fds message: {msg!r:.200}")
        for i, n in enumerate(lengths):
            if n > self._max_buffer:
                protocol_error(
                    f"buffer {i}: {n} bytes, over the maximum buffer size of "
                    f"{self._max_buffer} bytes"
                )

    def _receive(self, count: int) -> List[int]:
        """The next datagram of the side channel: its fds, exactly ``count`` of them, or a
        protocol error (every fd it brought closed first)."""
        try:
            _, ancdata, flags, _ = self._recvmsg(1, ANCBUFSIZE, _CMSG_CLOEXEC)
        except socket.timeout:
            protocol_error(
                f"an fds message whose fds did not arrive (no datagram on the side channel "
                f"within {self._timeout_s:g} s)"
            )
        except OSError as e:
            protocol_error(f"an fds message whose fds did not arrive ({e})")
        fds: List[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                ints = array.array("i")
                ints.frombytes(payload[: len(payload) - len(payload) % ints.itemsize])
                fds.extend(ints)
        if flags & _MSG_CTRUNC:
            _close_fds(fds)
            protocol_error(
                f"ancillary data truncated (MSG_CTRUNC): more than {MAX_FDS_PER_FRAME + 1} fds "
                f"in one datagram, at most {MAX_FDS_PER_FRAME}"
            )
        if len(fds) > MAX_FDS_PER_FRAME:
            _close_fds(fds)
            protocol_error(f"{len(fds)} fds in one datagram, at most {MAX_FDS_PER_FRAME}")
        if len(fds) != count:
            _close_fds(fds)
            protocol_error(f"an fds message claims {count} fds, its datagram brought {len(fds)}")
        return fds

    def claim(self, msg: List[Any]) -> Owned:
        """An ``fds`` message (passed :meth:`check`) whose frame has arrived: receive its
        datagram, check, map and close its fds; the mappings belong to that frame."""
        lengths: List[int] = msg[1]
        fds = self._receive(len(lengths))
        views: List[memoryview] = []
        try:
            for i, (fd, n) in enumerate(zip(fds, lengths)):
                check_sealed(fd, n, i)
                views.append(map_readonly(fd, n))
        except (BufferViolation, OSError, ValueError) as e:
            _close_fds(fds)
            for view in views:
                _unmap(view)
            if isinstance(e, BufferViolation):
                protocol_error(str(e))
            protocol_error(f"buffer {len(views)} cannot be mapped ({e})")
        _close_fds(fds)  # the mappings do not need them
        return Owned(views, self._routes)


# ---------------------------------------------------------------------- writing


class BufferTooLarge(ValueError):
    """A stream item over ``PYVISOR_MAX_BUFFER`` (the stream ends ``reply_too_large``)."""


class Outbound:
    """Sends large bytes-like results and stream items out of band (see the module)."""

    __slots__ = ("_writer", "threshold", "max_buffer", "_max_frame")

    def __init__(self, writer: Any, threshold: int, max_buffer: int, max_frame: int) -> None:
        #: A :class:`~._replies.Writer` (its ``send_with_fds``).
        self._writer = writer
        self.threshold = threshold
        self.max_buffer = max_buffer
        self._max_frame = max_frame

    def _send(
        self,
        message: List[Any],
        view: memoryview,
        pack: Callable[[Any], bytes],
        pending: Optional[List[bytes]] = None,
    ) -> None:
        """Seal ``view`` into a memfd and send ``fds`` + ``message`` (whose last element is the
        reference) in one ``sendmsg`` with its fd, after anything staged (and ``pending``)."""
        fd = seal_bytes(view)
        try:
            announce = pack([MSG_FDS, [view.nbytes]])
            body = pack(message)
            data = _HEADER_PACK(len(announce)) + announce + _HEADER_PACK(len(body)) + body
            self._writer.send_with_fds(data, [fd], pending)
        finally:
            os.close(fd)

    def reply(
        self,
        call: Any,
        result: Any,
        pack: Callable[[Any], bytes],
        span: Optional[List[int]],
        fallback: Callable[..., bytes],
        too_large: Callable[..., bytes],
    ) -> bytes:
        """The reply to ``call`` whose result is bytes-like (or may be): sent out of band here
        (returns ``b""``: nothing left to write), or the in-band frame to write
        (``fallback(call, value, pack, max_frame, span)``)."""
        view = buffer_bytes(result)
        if view is None:
            return fallback(call, result, pack, self._max_frame, span)
        nbytes = view.nbytes
        if nbytes < self.threshold:
            value = result if type(result) is bytes or type(result) is bytearray else view.tobytes()
            return fallback(call, value, pack, self._max_frame, span)
        if nbytes > self.max_buffer:
            return too_large(
                call._call_id,
                call._attempt,
                KIND_REPLY_TOO_LARGE,
                "ValueError",
                f"the return value of {call._spec.name!r} is {nbytes} bytes, over the maximum "
                f"buffer size of {self.max_buffer} bytes",
                pack,
                self._max_frame,
                span=span,
            )
        try:
            self._send(
                [MSG_REPLY, call._call_id, call._attempt, True, span, _REF0], view, pack
            )
        except OSError:
            # No memfd for it (out of memory, out of fds): in band if it fits.
            return fallback(call, view.tobytes(), pack, self._max_frame, span)
        return b""

    def item(
        self,
        call: Any,
        seq: int,
        view: memoryview,
        pack: Callable[[Any], bytes],
        pending: List[bytes],
    ) -> bool:
        """Send stream item ``seq`` out of band if ``view`` is large enough (the stream's
        ``pending`` items are written first, in the same locked write); False: send it in
        band."""
        nbytes = view.nbytes
        if nbytes < self.threshold:
            return False
        if nbytes > self.max_buffer:
            raise BufferTooLarge(
                f"{nbytes} bytes, over the maximum buffer size of {self.max_buffer} bytes"
            )
        try:
            self._send([MSG_ITEM, call._call_id, call._attempt, seq, _REF0], view, pack, pending)
        except OSError:
            return False
        return True


def item_body(
    oob: Optional[Outbound],
    call: Any,
    seq: int,
    value: Any,
    pack: Callable[[Any], bytes],
    pending: List[bytes],
    error: Optional[BaseException],
) -> Optional[bytes]:
    """A stream item that is bytes-like, or that MessagePack could not encode (``error``):
    ``None`` when it went out of band, else its in-band body (bytes-like values as ``bytes``).
    Raises ``error`` (or why the value cannot be sent) for anything else."""
    view = buffer_bytes(value)
    if view is None:
        if error is not None:
            raise error
        raise TypeError(f"cannot encode {type(value).__name__}")  # pragma: no cover
    if oob is not None and oob.item(call, seq, view, pack, pending):
        return None
    in_band = value if type(value) is bytes or type(value) is bytearray else view.tobytes()
    body: bytes = pack([MSG_ITEM, call._call_id, call._attempt, seq, in_band])
    return body
