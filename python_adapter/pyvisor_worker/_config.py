"""The start environment the parent hands to a worker (``PYVISOR_*`` variables)."""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from typing import Mapping, NoReturn, Optional

__all__ = [
    "WorkerConfig",
    "StartError",
    "load_config",
    "current_config",
    "exit_bad_start",
    "PROTOCOL_VERSION",
]

PROTOCOL_VERSION = 2
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
DEFAULT_BEAT_INTERVAL_MS = 1000
#: Results (and stream items) of at least this many bytes go out of band
#: (``PYVISOR_OOB_THRESHOLD``).
DEFAULT_OOB_THRESHOLD = 4 * 1024 * 1024
#: The largest single out-of-band buffer accepted from (or sent to) the parent
#: (``PYVISOR_MAX_BUFFER``).
DEFAULT_MAX_BUFFER = 1 << 30
#: How long an ``fds`` message waits for its datagram on the side channel
#: (``PYVISOR_FDS_TIMEOUT_MS``); past it: protocol error.
DEFAULT_FDS_TIMEOUT_MS = 10_000

#: Exit statuses (docs/protocol.md, "Exit statuses of the worker").
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_START = 2
EXIT_PROTOCOL = 3

NOT_UNDER_PYVISOR = (
    "this is a pyvisor worker; start it through pyvisor (Pool or the `pyvisor` CLI)"
)


class StartError(Exception):
    """The environment does not describe a usable pyvisor start."""


@dataclass(frozen=True)
class WorkerConfig:
    fd: int
    worker_id: str
    protocol: Optional[int]
    max_frame: int
    beat_interval_ms: int
    run_id: str
    #: ``PYVISOR_OOB`` is not ``0``: out-of-band buffers wanted (used only if memfd sealing
    #: works here: see ``_oob.oob_supported``).
    oob: bool = True
    oob_threshold: int = DEFAULT_OOB_THRESHOLD
    max_buffer: int = DEFAULT_MAX_BUFFER
    #: ``PYVISOR_FDS_FD``: the worker's end of the parent's ``SOCK_DGRAM`` socketpair that
    #: carries the fds of the parent's ``fds`` messages (the side channel); ``None`` when
    #: unset (the worker cannot receive fds: no ``oob``).
    fds_fd: Optional[int] = None
    #: ``PYVISOR_FDS_TIMEOUT_MS``: how long an ``fds`` message waits for its datagram.
    fds_timeout_ms: int = DEFAULT_FDS_TIMEOUT_MS


def _positive_int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise StartError(f"{key}={raw!r} is not an integer") from None
    if value <= 0:
        raise StartError(f"{key}={raw!r} must be positive")
    return value


def _flag(env: Mapping[str, str], key: str, default: bool) -> bool:
    """``0`` is off, ``1`` on, unset or empty the default; anything else is a bad start."""
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip()
    if value == "0":
        return False
    if value == "1":
        return True
    raise StartError(f"{key}={raw!r} must be 0 or 1")


def load_config(env: Optional[Mapping[str, str]] = None) -> WorkerConfig:
    """Read and check the ``PYVISOR_*`` variables; raises :class:`StartError`."""
    env = os.environ if env is None else env
    raw_fd = env.get("PYVISOR_FD")
    if raw_fd is None or raw_fd.strip() == "":
        raise StartError("PYVISOR_FD is not set")
    try:
        fd = int(raw_fd)
    except ValueError:
        raise StartError(f"PYVISOR_FD={raw_fd!r} is not a file descriptor number") from None
    if fd < 0:
        raise StartError(f"PYVISOR_FD={raw_fd!r} is not a file descriptor number")
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise StartError(f"PYVISOR_FD={fd} is not an open file descriptor ({e.strerror})") from None
    if not stat.S_ISSOCK(mode):
        raise StartError(f"PYVISOR_FD={fd} is not a socket")
    fds_fd: Optional[int] = None
    raw_fds_fd = env.get("PYVISOR_FDS_FD")
    if raw_fds_fd is not None and raw_fds_fd.strip() != "":
        try:
            fds_fd = int(raw_fds_fd)
        except ValueError:
            raise StartError(
                f"PYVISOR_FDS_FD={raw_fds_fd!r} is not a file descriptor number"
            ) from None
        if fds_fd < 0:
            raise StartError(f"PYVISOR_FDS_FD={raw_fds_fd!r} is not a file descriptor number")
    raw_protocol = env.get("PYVISOR_PROTOCOL")
    try:
        protocol = int(raw_protocol) if raw_protocol else None
    except ValueError:
        raise StartError(f"PYVISOR_PROTOCOL={raw_protocol!r} is not an integer") from None
    return WorkerConfig(
        fd=fd,
        worker_id=env.get("PYVISOR_WORKER_ID", ""),
        protocol=protocol,
        max_frame=_positive_int(env, "PYVISOR_MAX_FRAME", DEFAULT_MAX_FRAME),
        beat_interval_ms=_positive_int(env, "PYVISOR_BEAT_INTERVAL_MS", DEFAULT_BEAT_INTERVAL_MS),
        run_id=env.get("PYVISOR_RUN_ID", ""),
        oob=_flag(env, "PYVISOR_OOB", True),
        oob_threshold=_positive_int(env, "PYVISOR_OOB_THRESHOLD", DEFAULT_OOB_THRESHOLD),
        max_buffer=_positive_int(env, "PYVISOR_MAX_BUFFER", DEFAULT_MAX_BUFFER),
        fds_fd=fds_fd,
        fds_timeout_ms=_positive_int(env, "PYVISOR_FDS_TIMEOUT_MS", DEFAULT_FDS_TIMEOUT_MS),
    )


_current: Optional[WorkerConfig] = None


def current_config() -> WorkerConfig:
    """This process's start configuration, read once from the environment.

    ``PYVISOR_FD`` and ``PYVISOR_FDS_FD`` are then removed from ``os.environ`` so that processes
    started by user code do not inherit descriptor numbers that mean nothing to them (the
    descriptors themselves are made close-on-exec by the worker).
    """
    global _current
    if _current is None:
        _current = load_config()
        os.environ.pop("PYVISOR_FD", None)
        os.environ.pop("PYVISOR_FDS_FD", None)
    return _current


def exit_bad_start(err: StartError) -> NoReturn:
    """Explain on stderr that this process must be started by pyvisor, and exit 2."""
    try:
        sys.stderr.write(f"pyvisor_worker: {NOT_UNDER_PYVISOR}\n  ({err})\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    raise SystemExit(EXIT_BAD_START)
