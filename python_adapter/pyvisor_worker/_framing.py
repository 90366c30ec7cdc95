"""Frames and messages of the pyvisor wire protocol (docs/protocol.md)."""

from __future__ import annotations

import functools
import struct
from typing import Any, Callable, Dict, Optional, Sequence

import msgpack  # type: ignore[import-untyped,unused-ignore]

__all__ = [
    "HEADER",
    "MSG_HELLO",
    "MSG_CALL",
    "MSG_REPLY",
    "MSG_CANCEL",
    "MSG_BEAT",
    "MSG_PING",
    "MSG_PONG",
    "MSG_SHUTDOWN",
    "MSG_STARTED",
    "MSG_CALL_OPTIONS",
    "MSG_ITEM",
    "MSG_CREDIT",
    "MSG_FDS",
    "CAPABILITIES",
    "CAP_OOB",
    "new_packer",
    "unpack_body",
    "frame",
    "error_map",
    "qualified_name",
]

#: Frame header: 4-byte big-endian unsigned body length.
HEADER = struct.Struct(">I")

MSG_HELLO = 0
MSG_CALL = 1
MSG_REPLY = 2
MSG_CANCEL = 3
MSG_BEAT = 4
MSG_PING = 5
MSG_PONG = 6
MSG_SHUTDOWN = 7
#: worker → parent: the function of a call whose options had ``ack_start`` is about to run.
MSG_STARTED = 8
#: parent → worker: a ``call`` with an options map before the payload.
MSG_CALL_OPTIONS = 9
#: worker → parent: one value a stream's generator yielded (``[10, id, attempt, seq, value]``).
MSG_ITEM = 10
#: parent → worker: ``[11, id, n]``: the stream may send ``n`` more items.
MSG_CREDIT = 11
#: either direction (capability ``oob``): ``[12, [len_0, ..., len_n-1]]``, written by one
#: ``sendmsg`` carrying its n fds; the next frame references them (ext type 80).
MSG_FDS = 12

#: What ``hello`` announces (``capabilities``): the parent uses messages 8 to 11 only with a
#: worker that announced them.
CAPABILITIES = ("call_options", "started", "stream")
#: Announced in addition when out-of-band buffers work and are wanted (``PYVISOR_OOB``).
CAP_OOB = "oob"

#: Error kinds of a reply.
KIND_EXCEPTION = "exception"
KIND_UNKNOWN_FUNCTION = "unknown_function"
KIND_CANCELLED = "cancelled"
KIND_REPLY_TOO_LARGE = "reply_too_large"
KIND_UNSERIALIZABLE = "unserializable"
KIND_INTERNAL = "internal"
#: The call arrived after shutdown began and did not run: the parent may route it elsewhere.
KIND_REFUSED = "refused"
#: A stream call to a function that is not a generator, or a plain call to one that is.
KIND_STREAM_MISMATCH = "stream_mismatch"


def new_packer() -> Callable[[Any], bytes]:
    """A reusable encoder (``bytes`` → bin, ``str`` → str). Not thread-safe: one per thread."""
    pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True, autoreset=True).pack
    return pack


#: Decode one frame body (str → ``str``, bin → ``bytes``, arrays → ``list``, any map keys).
unpack_body: Callable[[Any], Any] = functools.partial(
    msgpack.unpackb, raw=False, strict_map_key=False
)


def frame(body: bytes) -> bytes:
    """Prefix an encoded message with its length header."""
    return HEADER.pack(len(body)) + body


def qualified_name(cls: type) -> str:
    """``ValueError`` for builtins, ``module.Qualified.Name`` otherwise."""
    module = getattr(cls, "__module__", None)
    qualname = str(getattr(cls, "__qualname__", None) or getattr(cls, "__name__", None) or cls)
    if not module or module == "builtins":
        return qualname
    return f"{module}.{qualname}"


def error_map(
    kind: str,
    type_name: str,
    message: str,
    traceback: Optional[str] = None,
    functions: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """The ``error`` map of a failed reply; every key is present (``nil`` when absent)."""
    return {
        "kind": kind,
        "type": type_name,
        "message": message,
        "traceback": traceback,
        "functions": None if functions is None else list(functions),
    }

