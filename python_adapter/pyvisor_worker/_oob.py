"""Out-of-band buffers in the protocol (capability ``oob``, docs/buffers.md and docs/protocol.md).

Owns what the protocol adds on top of the ``_buffers`` primitives:

- :func:`oob_supported`: the probe, once at start, that memfd sealing works here;
- :class:`Inbound` (the reading side): the fds received with the socket's bytes, kept in
  arrival order (at most :data:`MAX_UNCLAIMED`); an ``fds`` message claims the oldest ``n``,
  checks (:func:`~._buffers.check_sealed`) and maps (:func:`~._buffers.map_readonly`) each,
  closes them at once, and hands the mappings to the **next frame** (:class:`Owned`), which
  must be a ``call`` or ``call_options`` referencing each exactly once (ext type 80). A
  reference decodes to ``bytes`` (copied, then unmapped), or to a read-only ``memoryview``
  over the mapping for a function exposed with ``@expose(buffers="memoryview")``. Every
  violation is a protocol error (the worker exits with status 3);
- :class:`Outbound` (the writing side): a result or stream item that is a bytes-like value of
  at least ``PYVISOR_OOB_THRESHOLD`` bytes is written once into a sealed memfd, announced by
  an ``fds`` message sent with its fd in one ``sendmsg`` immediately followed by the frame
  whose value references it; smaller ones (and every buffer when ``oob`` is off) go in band
  as ``bytes``.

Without the capability none of this runs: the reader keeps ``recv_into`` and the writer never
sends an fd.
"""

from __future__ import annotations

import array
import fcntl
import functools
import os
import socket
from collections import deque
from typing import Any, Callable, Deque, Dict, FrozenSet, List, Optional, Sequence, Tuple

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
    "MAX_UNCLAIMED",
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

#: Most received fds kept while no ``fds`` message has claimed them.
MAX_UNCLAIMED = 32
#: The types whose top-level results the hot paths send to :class:`Outbound` (a cheap
#: ``type(x) in`` test); other buffer-protocol objects (numpy arrays) get there when
#: MessagePack cannot encode them.
BUFFER_TYPES: FrozenSet[type] = frozenset((bytes, bytearray, memoryview))
#: What the hot paths test when ``oob`` is off: nothing.
NO_TYPES: FrozenSet[type] = frozenset()

_HEADER_PACK = HEADER.pack
_REF0 = encode_ref(0)
#: Room for the most fds one read may bring (more: ``MSG_CTRUNC``, a protocol error).
_ANCBUFSIZE = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * array.array("i").itemsize)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # (an int: MsgFlag & int runs Python code)
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
    """The fds the socket delivered, and the ``fds`` messages that claim them."""

    __slots__ = ("_recvmsg_into", "_fds", "_max_buffer", "_routes")

    def __init__(self, sock: socket.socket, max_buffer: int) -> None:
        self._recvmsg_into = sock.recvmsg_into
        self._fds: Deque[int] = deque()
        self._max_buffer = max_buffer
        #: name → route (``route[0]`` the spec): set by the dispatcher.
        self._routes: Dict[str, Any] = {}

    def set_routes(self, routes: Dict[str, Any]) -> None:
        self._routes = routes

    def recv_into(self, view: memoryview) -> int:
        """The reader's ``recv_into`` with oob on: one ``recvmsg`` keeping the fds that came
        with the bytes. More than :data:`~._buffers.MAX_FDS_PER_FRAME` in one read, cut
        ancillary data, or more than :data:`MAX_UNCLAIMED` unclaimed fds: protocol error.
        ``OSError`` propagates (the reader takes it for the parent gone)."""
        # (``recv_with_fds``, inlined: a read that brings no fds costs one recvmsg and a test)
        n, ancdata, flags, _ = self._recvmsg_into([view], _ANCBUFSIZE, _CMSG_CLOEXEC)
        if ancdata or flags & _MSG_CTRUNC:
            self._received(ancdata, flags)
        return n

    def _received(self, ancdata: List[Tuple[int, int, bytes]], flags: int) -> None:
        """Keep the fds a read brought (in arrival order), or end on a protocol error."""
        fds: List[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                ints = array.array("i")
                ints.frombytes(payload[: len(payload) - len(payload) % ints.itemsize])
                fds.extend(ints)
        queue = self._fds
        queue.extend(fds)
        if flags & _MSG_CTRUNC:
            self.close_all()
            protocol_error("ancillary data truncated (MSG_CTRUNC): fds lost")
        if len(fds) > MAX_FDS_PER_FRAME:
            self.close_all()
            protocol_error(f"{len(fds)} fds in one message, at most {MAX_FDS_PER_FRAME}")
        if len(queue) > MAX_UNCLAIMED:
            count = len(queue)
            self.close_all()
            protocol_error(
                f"{count} fds received and not claimed by an fds message (at most "
                f"{MAX_UNCLAIMED})"
            )

    @property
    def unclaimed(self) -> int:
        return len(self._fds)

    def close_all(self) -> None:
        fds = list(self._fds)
        self._fds.clear()
        _close_fds(fds)

    def check(self, msg: List[Any]) -> None:
        """An ``fds`` message ``[12, [len_0, ...]]`` as soon as it is read: well-formed, each
        length within ``max_buffer``, and its fds here (they come with its first bytes)."""
        lengths = msg[1] if len(msg) >= 2 else None
        if (
            type(lengths) is not list
            or not 1 <= len(lengths) <= MAX_FDS_PER_FRAME
            or any(type(n) is not int or n < 0 for n in lengths)
        ):
            self.close_all()
            protocol_error(f"malformed fds message: {msg!r:.200}")
        for i, n in enumerate(lengths):
            if n > self._max_buffer:
                self.close_all()
                protocol_error(
                    f"buffer {i}: {n} bytes, over the maximum buffer size of "
                    f"{self._max_buffer} bytes"
                )
        queue = self._fds
        if len(queue) < len(lengths):
            have = len(queue)
            self.close_all()
            protocol_error(f"an fds message claims {len(lengths)} fds, {have} received")

    def claim(self, msg: List[Any]) -> Owned:
        """An ``fds`` message (passed :meth:`check`) whose frame has arrived: take, check, map
        and close the oldest ``n`` fds; the mappings belong to that frame."""
        lengths: List[int] = msg[1]
        queue = self._fds
        fds = [queue.popleft() for _ in lengths]
        views: List[memoryview] = []
        try:
            for i, (fd, n) in enumerate(zip(fds, lengths)):
                check_sealed(fd, n, i)
                views.append(map_readonly(fd, n))
        except (BufferViolation, OSError, ValueError) as e:
            _close_fds(fds)
            self.close_all()
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
