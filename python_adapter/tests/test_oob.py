"""Out-of-band buffers through the protocol (capability ``oob``), against real worker processes.

Large bytes travel in sealed memfds both ways (the FakeParent sends ``OutOfBand`` values as the
parent does, and resolves the worker's references); a function gets ``bytes`` by default or a
read-only ``memoryview`` over the shared memory with ``@expose(buffers="memoryview")``; large
results and stream items go out of band above ``PYVISOR_OOB_THRESHOLD``, in band below it and
with ``PYVISOR_OOB=0``; the parent's fds come on the side channel (``PYVISOR_FDS_FD``, one
datagram per ``fds`` message), never on the main socket; every violation by a hostile parent
is a protocol error (status 3); no fd leaks over 10,000 calls.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

import pytest

from pyvisor_worker import _buffers, as_numpy, expose
from pyvisor_worker._buffers import recv_with_fds, seal_bytes, send_with_fds
from pyvisor_worker._config import EXIT_PROTOCOL
from pyvisor_worker._framing import MSG_CALL, MSG_CALL_OPTIONS, MSG_FDS, MSG_PING
from pyvisor_worker.testing import FakeParent, OutOfBand, WorkerExited, encode_frame, ref

SpawnFn = Callable[..., FakeParent]

KIB = 1024
MIB = 1024 * KIB
THRESHOLD = 64 * KIB  # PYVISOR_OOB_THRESHOLD in these tests (the default is larger)


@pytest.fixture
def spawn(spawn: SpawnFn) -> SpawnFn:
    """conftest's ``spawn`` with ``PYVISOR_OOB_THRESHOLD`` at :data:`THRESHOLD` unless the
    test sets it (these tests are about the out-of-band path, not the default's size)."""

    def spawn_at_threshold(*args: Any, env: Optional[dict] = None, **kwargs: Any) -> FakeParent:
        merged = {"PYVISOR_OOB_THRESHOLD": str(THRESHOLD)}
        merged.update(env or {})
        return spawn(*args, env=merged, **kwargs)

    return spawn_at_threshold

WORKER = '''
import asyncio
import mmap
import os

from pyvisor_worker import as_numpy, expose, run_worker


@expose
def echo(x):
    return x


@expose
def describe(x):
    """What the function received (the default: bytes)."""
    if isinstance(x, dict):
        return {k: [type(v).__name__, len(v)] for k, v in x.items()}
    if isinstance(x, list):
        return [[type(v).__name__, len(v)] for v in x]
    return [type(x).__name__, len(x)]


@expose(buffers="memoryview")
def view_echo(x):
    """Returns the memoryview itself: sent back out of band (or in band) from the mapping."""
    return x


@expose(buffers="memoryview")
def view_probe(x):
    """What a memoryview-taking function sees, and what it cannot do with it."""
    out = {"type": type(x).__name__, "readonly": x.readonly, "nbytes": x.nbytes}
    try:
        x[0] = 1
        out["write"] = "allowed"
    except TypeError as e:
        out["write"] = "TypeError"
    # The view's memory lies in a mapping of a memfd (zero copy), not in the heap.
    arr = as_numpy(x)
    address = arr.ctypes.data
    out["in_memfd_mapping"] = False
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= address < hi and "memfd:" in line:
                out["in_memfd_mapping"] = True
    import numpy as np

    out["shares_memory"] = bool(np.shares_memory(arr, np.frombuffer(x, dtype=np.uint8)))
    out["array_writeable"] = bool(arr.flags.writeable)
    out["sum"] = int(arr[:1000].sum())
    # Any fd of a memfd this process holds (Python < 3.13: the mapping's own duplicate) is
    # sealed: no write, no resize, no writable shared mapping.
    tampered = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if "memfd:pyvisor-buffer" not in target:
            continue
        fd = int(name)
        for attempt in (
            lambda: os.write(fd, b"x"),
            lambda: os.pwrite(fd, b"x", 0),
            lambda: os.ftruncate(fd, 1),
            lambda: mmap.mmap(fd, 1, flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE),
        ):
            try:
                attempt()
                tampered.append("succeeded")
            except PermissionError:
                tampered.append("EPERM")
            except OSError as e:
                tampered.append(f"errno {e.errno}")
    out["tamper"] = tampered
    return out


@expose(buffers="memoryview")
def view_nested(x):
    return {k: [type(v).__name__, bytes(v[:4])] for k, v in x.items()}


@expose
def make(n):
    return bytes(i % 251 for i in range(256)) * (n // 256) + bytes(n % 256)


@expose
def make_bytearray(n):
    return bytearray(b"b" * n)


@expose
def make_numpy(args):
    import numpy as np

    n, layout = args
    arr = np.arange(n, dtype=np.uint32)
    if layout == "strided":
        return arr[::2]
    if layout == "2d-fortran":
        return np.asfortranarray(arr.reshape(2, -1))
    return arr


@expose
async def async_echo(x):
    await asyncio.sleep(0)
    return x


@expose(buffers="memoryview")
async def async_view_len(x):
    await asyncio.sleep(0)
    return [type(x).__name__, x.nbytes, x.readonly]


@expose(threads=2)
def threaded_echo(x):
    return x


@expose
def chunks(args):
    """Yields large and small bytes (and a numpy array) in turn."""
    n, count = args
    for i in range(count):
        yield bytes([i % 256]) * (n if i % 2 == 0 else 10)


@expose
async def async_chunks(args):
    n, count = args
    for i in range(count):
        await asyncio.sleep(0)
        yield bytes([i % 256]) * n


@expose(threads=1)
def threaded_chunks(args):
    n, count = args
    for i in range(count):
        yield bytes([i % 256]) * n


@expose
def numpy_chunks(n):
    import numpy as np

    yield np.full(n, 7, dtype=np.uint8)
    yield np.full(10, 8, dtype=np.uint8)


@expose(buffers="memoryview")
def split(x):
    half = x.nbytes // 2
    yield x[:half]
    yield x[half:]


@expose
def marker(path):
    with open(path, "w") as f:
        f.write("ran")
    return "ran"


if __name__ == "__main__":
    run_worker()
'''


def pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((i + seed) % 251 for i in range(251))
    return (block * (n // len(block) + 1))[:n]


def expected_make(n: int) -> bytes:
    return bytes(i % 251 for i in range(256)) * (n // 256) + bytes(n % 256)


@pytest.fixture
def oob(spawn: SpawnFn) -> FakeParent:
    return spawn(WORKER)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------------- capability


def test_the_worker_announces_oob(oob: FakeParent) -> None:
    assert "oob" in oob.hello["capabilities"]
    # The capabilities it had before stay.
    assert {"call_options", "started", "stream"} <= set(oob.hello["capabilities"])


def test_oob_off_means_no_capability_and_everything_in_band(spawn: SpawnFn) -> None:
    parent = spawn(WORKER, env={"PYVISOR_OOB": "0"})
    assert "oob" not in parent.hello["capabilities"]
    reply = parent.reply_for(parent.call("make", 1 * MIB))
    assert reply.ok, reply.error
    assert reply.value == expected_make(1 * MIB)
    assert reply.buffers == 0 and parent.fds_messages == [] and parent.unclaimed_fds == 0
    result = parent.stream_result(parent.stream("chunks", [100 * KIB, 3], credit=8))
    assert result.ok and [len(v) for v in result.items] == [100 * KIB, 10, 100 * KIB]
    assert parent.fds_messages == []


def test_oob_off_refuses_an_fds_message(spawn: SpawnFn) -> None:
    parent = spawn(WORKER, env={"PYVISOR_OOB": "0"})
    fd = FakeParent.memfd(b"x" * 100)
    try:
        parent.send_with_fds([[MSG_FDS, [100]], call_message(1, "echo", ref(0))], [fd])
    finally:
        os.close(fd)
    assert parent.wait() == EXIT_PROTOCOL
    assert "unexpected message" in parent.stderr_text()


@pytest.mark.parametrize("value", ["2", "yes", "off"])
def test_a_bad_pyvisor_oob_is_a_bad_start(spawn: SpawnFn, value: str) -> None:
    with pytest.raises(WorkerExited, match="exit status 2"):
        spawn(WORKER, env={"PYVISOR_OOB": value})


@pytest.mark.parametrize("key", ["PYVISOR_OOB_THRESHOLD", "PYVISOR_MAX_BUFFER"])
def test_bad_sizes_are_a_bad_start(spawn: SpawnFn, key: str) -> None:
    with pytest.raises(WorkerExited, match="exit status 2"):
        spawn(WORKER, env={key: "0"})


# ---------------------------------------------------------------------- round trips


@pytest.mark.parametrize("size", [1 * MIB, 64 * MIB], ids=["1MiB", "64MiB"])
def test_round_trip_both_ways(oob: FakeParent, size: int) -> None:
    data = pattern(size, seed=size % 7)
    reply = oob.reply_for(oob.call("echo", OutOfBand(data)), timeout=60)
    assert reply.ok, reply.error
    assert reply.buffers == 1  # came back out of band too
    assert oob.fds_messages[-1] == [size]
    assert type(reply.value) is bytes and reply.value == data
    # The function got bytes.
    assert oob.invoke("describe", OutOfBand(data), timeout=60) == ["bytes", size]


def test_a_64_mib_result_goes_out_of_band_despite_a_smaller_frame_limit(
    spawn: SpawnFn,
) -> None:
    parent = spawn(WORKER, max_frame=1 * MIB)
    size = 64 * MIB
    reply = parent.reply_for(parent.call("make", size), timeout=60)
    assert reply.ok, reply.error
    assert reply.buffers == 1 and reply.value == expected_make(size)
    # And one the parent sends, past the frame limit too.
    assert parent.invoke("describe", OutOfBand(b"z" * size), timeout=60) == ["bytes", size]


def test_buffers_anywhere_in_the_payload(oob: FakeParent) -> None:
    a, b, c = pattern(100 * KIB, 1), pattern(3, 2), pattern(2 * MIB, 3)
    payload = {"a": OutOfBand(a), "b": OutOfBand(b), "c": OutOfBand(bytearray(c))}
    assert oob.invoke("describe", payload) == {
        "a": ["bytes", len(a)],
        "b": ["bytes", len(b)],
        "c": ["bytes", len(c)],
    }
    nested = [1, {"deep": [OutOfBand(a), "x", {"k": OutOfBand(b)}]}, OutOfBand(c)]
    assert oob.invoke("echo", nested) == [1, {"deep": [a, "x", {"k": b}]}, c]
    assert oob.invoke("view_nested", {"a": OutOfBand(a), "c": OutOfBand(c)}) == {
        "a": ["memoryview", a[:4]],
        "c": ["memoryview", c[:4]],
    }
    # Sixteen buffers in one call (the most one fds message carries).
    many = [pattern(1000 + i, i) for i in range(16)]
    assert oob.invoke("echo", [OutOfBand(m) for m in many]) == many


def test_an_empty_buffer(oob: FakeParent) -> None:
    assert oob.invoke("describe", OutOfBand(b"")) == ["bytes", 0]
    assert oob.invoke("view_probe", OutOfBand(b"\x05" * 1000))["sum"] == 5000


# ---------------------------------------------------------------------- memoryview


def test_memoryview_function_gets_a_read_only_view_of_the_shared_memory(
    oob: FakeParent,
) -> None:
    pytest.importorskip("numpy")
    data = b"\x01" * (2 * MIB)
    out = oob.invoke("view_probe", OutOfBand(data))
    assert out["type"] == "memoryview"
    assert out["readonly"] is True
    assert out["nbytes"] == len(data)
    assert out["write"] == "TypeError"
    assert out["in_memfd_mapping"] is True  # zero copy: the mapping itself
    assert out["shares_memory"] is True
    assert out["array_writeable"] is False
    assert out["sum"] == 1000
    # Whatever memfd fd the process holds is sealed against every change.
    assert all(result == "EPERM" for result in out["tamper"]), out["tamper"]


def test_a_memoryview_result_goes_back_out_of_band(oob: FakeParent) -> None:
    data = pattern(3 * MIB)
    reply = oob.reply_for(oob.call("view_echo", OutOfBand(data)))
    assert reply.ok and reply.buffers == 1 and reply.value == data
    small = pattern(100)
    reply = oob.reply_for(oob.call("view_echo", OutOfBand(small)))
    assert reply.ok and reply.buffers == 0 and reply.value == small


def test_received_sealed_memfd_cannot_be_written() -> None:
    """The fd the worker receives (before it maps and closes it) refuses every change."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    data = pattern(8192)
    fd = seal_bytes(data)
    try:
        send_with_fds(a, b"f", [fd])
        n, fds = recv_with_fds(b, bytearray(16))
        assert n == 1 and len(fds) == 1
        (received,) = fds
        try:
            _buffers.check_sealed(received, len(data))
            with pytest.raises(PermissionError):
                mmap.mmap(received, len(data), flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                os.write(received, b"x")
            with pytest.raises(PermissionError):
                os.ftruncate(received, 1)
            view = _buffers.map_readonly(received, len(data))
        finally:
            os.close(received)
        assert view == data  # still readable once the fd is closed
        with pytest.raises(TypeError):
            view[0] = 0
    finally:
        os.close(fd)
        a.close()
        b.close()


def test_expose_checks_buffers() -> None:
    with pytest.raises(TypeError, match="buffers"):

        @expose(name="oob_bad_mode", buffers="numpy")  # type: ignore[call-overload]
        def bad(x: Any) -> Any:
            return x

    with pytest.raises(TypeError, match='"bytes"'):
        expose(name="oob_bad_mode2", buffers=None)  # type: ignore[call-overload]

    @expose(name="oob_good_mode", buffers="memoryview")
    def good(x: Any) -> Any:
        return x

    from pyvisor_worker._registry import registered

    assert registered()["oob_good_mode"].buffers == "memoryview"


def test_as_numpy_is_public() -> None:
    np = pytest.importorskip("numpy")
    fd = seal_bytes(np.arange(10, dtype=np.float32))
    try:
        view = _buffers.map_readonly(fd, 40)
    finally:
        os.close(fd)
    arr = as_numpy(view, "float32")
    assert arr.tolist() == list(range(10)) and not arr.flags.writeable


# ---------------------------------------------------------------------- results


def test_threshold_decides_in_or_out_of_band(spawn: SpawnFn) -> None:
    parent = spawn(WORKER, env={"PYVISOR_OOB_THRESHOLD": "1000"})
    below = parent.reply_for(parent.call("make", 999))
    assert below.ok and below.buffers == 0 and below.value == expected_make(999)
    assert parent.fds_messages == []
    at = parent.reply_for(parent.call("make", 1000))
    assert at.ok and at.buffers == 1 and at.value == expected_make(1000)
    assert parent.fds_messages == [[1000]]


def test_default_threshold(oob: FakeParent) -> None:
    below = oob.reply_for(oob.call("make", THRESHOLD - 1))
    assert below.ok and below.buffers == 0 and len(below.value) == THRESHOLD - 1
    at = oob.reply_for(oob.call("make_bytearray", THRESHOLD))
    assert at.ok and at.buffers == 1 and at.value == b"b" * THRESHOLD
    # Only a top-level value goes out of band: nested bytes stay in band.
    nested = oob.reply_for(oob.call("echo", [b"n" * (2 * THRESHOLD)]))
    assert nested.ok and nested.buffers == 0 and nested.value == [b"n" * (2 * THRESHOLD)]


@pytest.mark.parametrize("oob_on", [True, False], ids=["oob", "in-band"])
def test_numpy_results(spawn: SpawnFn, oob_on: bool) -> None:
    np = pytest.importorskip("numpy")
    parent = spawn(WORKER, env={} if oob_on else {"PYVISOR_OOB": "0"})
    for n, layout in [(100_000, "c"), (10, "c"), (100_000, "strided"), (100_000, "2d-fortran")]:
        arr = np.arange(n, dtype=np.uint32)
        expected = {
            "c": arr,
            "strided": arr[::2],
            "2d-fortran": np.asfortranarray(arr.reshape(2, -1)),
        }[layout].tobytes()
        reply = parent.reply_for(parent.call("make_numpy", [n, layout]))
        assert reply.ok, reply.error
        assert reply.value == expected, layout
        big = len(expected) >= THRESHOLD
        assert reply.buffers == (1 if big and oob_on else 0), layout


def test_a_result_over_max_buffer_is_too_large(spawn: SpawnFn) -> None:
    parent = spawn(WORKER, env={"PYVISOR_MAX_BUFFER": str(100_000)})
    reply = parent.reply_for(parent.call("make", 100_001))
    assert not reply.ok and reply.error["kind"] == "reply_too_large"
    assert "maximum buffer size" in reply.error["message"]
    assert parent.invoke("make", 100_000) == expected_make(100_000)
    # A stream item too: the stream ends with the error, the items before it stand.
    result = parent.stream_result(parent.stream("chunks", [100_001, 3], credit=8))
    assert result.items == []
    assert result.error["kind"] == "reply_too_large"
    assert "item 0" in result.error["message"] and "maximum buffer size" in result.error["message"]


@pytest.mark.parametrize("function", ["async_echo", "threaded_echo"])
def test_async_and_threaded_functions(oob: FakeParent, function: str) -> None:
    data = pattern(5 * MIB)
    call_ids = [oob.call(function, OutOfBand(data)) for _ in range(5)]
    call_ids.append(oob.call(function, OutOfBand(b"tiny")))
    for call_id in call_ids[:-1]:
        reply = oob.reply_for(call_id)
        assert reply.ok and reply.buffers == 1 and reply.value == data
    tiny = oob.reply_for(call_ids[-1])
    assert tiny.ok and tiny.buffers == 0 and tiny.value == b"tiny"


def test_async_memoryview_function(oob: FakeParent) -> None:
    assert oob.invoke("async_view_len", OutOfBand(b"q" * MIB)) == ["memoryview", MIB, True]


# ---------------------------------------------------------------------- streams


@pytest.mark.parametrize("function", ["chunks", "async_chunks", "threaded_chunks"])
def test_streams_send_large_items_out_of_band(oob: FakeParent, function: str) -> None:
    n, count = 200 * KIB, 9
    call_id = oob.stream(function, [n, count], credit=3)
    result = oob.stream_result(call_id)
    assert result.ok, result.error
    assert result.reply.value == count
    for i, item in enumerate(result.items):
        size = 10 if function == "chunks" and i % 2 else n
        assert item == bytes([i % 256]) * size, i
    big = sum(1 for i in range(count) if function != "chunks" or i % 2 == 0)
    assert len(oob.fds_messages) == big


def test_an_item_over_the_maximum_frame_goes_out_of_band(spawn: SpawnFn) -> None:
    parent = spawn(WORKER, max_frame=65536)
    result = parent.stream_result(parent.stream("chunks", [70_000, 3], credit=10))
    assert result.ok, result.error
    assert [len(v) for v in result.items] == [70_000, 10, 70_000]


def test_numpy_stream_items(oob: FakeParent) -> None:
    pytest.importorskip("numpy")
    call_id = oob.stream("numpy_chunks", 100_000, credit=5)
    items: List[Any] = []
    deadline = time.monotonic() + 10
    while len(items) < 2 and time.monotonic() < deadline:
        items.extend(oob.item_messages_for(call_id, 1))
    assert [(i.value, i.buffers) for i in items] == [(b"\x07" * 100_000, 1), (b"\x08" * 10, 0)]
    assert oob.reply_for(call_id).value == 2


def test_a_stream_call_with_buffers_in_and_out(oob: FakeParent) -> None:
    # A stream's payload may carry buffers too (call_options with stream); its items here are
    # slices of the received mapping, sent out of band again.
    data = pattern(4 * MIB)
    result = oob.stream_result(oob.stream("split", OutOfBand(data), credit=1))
    assert result.ok, result.error
    assert result.items == [data[: 2 * MIB], data[2 * MIB :]]
    assert oob.fds_messages == [[2 * MIB], [2 * MIB]]


# ---------------------------------------------------------------------- hostile parent


def expect_protocol_error(parent: FakeParent, words: str, marker: Optional[Path] = None) -> None:
    assert parent.wait(timeout=20) == EXIT_PROTOCOL, parent.stderr_text()
    stderr = parent.stderr_text()
    assert "protocol error" in stderr and words in stderr, stderr
    if marker is not None:
        assert not marker.exists(), "the function ran"


def call_message(call_id: int, function: str, payload: Any) -> List[Any]:
    return [MSG_CALL, call_id, 1, function, None, None, None, payload]


def hostile(
    parent: FakeParent, lengths: List[int], fds: List[int], *then: List[Any]
) -> None:
    try:
        parent.send_with_fds([[MSG_FDS, lengths], *then], fds)
    finally:
        for fd in set(fds):
            os.close(fd)


def test_hostile_unsealed_memfd(oob: FakeParent, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    fd = FakeParent.memfd(b"x" * 100, sealed=False)
    hostile(oob, [100], [fd], call_message(1, "marker", [str(marker), ref(0)]))
    expect_protocol_error(oob, "not sealed against writes", marker)


def test_hostile_short_memfd(oob: FakeParent, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    fd = FakeParent.memfd(b"x" * 100)
    hostile(oob, [200], [fd], call_message(1, "marker", [str(marker), ref(0)]))
    expect_protocol_error(oob, "the message references 200", marker)


def test_hostile_not_a_memfd(oob: FakeParent, tmp_path: Path) -> None:
    r, w = os.pipe()
    os.close(w)
    hostile(oob, [1], [r], call_message(1, "echo", ref(0)))
    expect_protocol_error(oob, "not a sealable memfd")


def test_hostile_repeated_reference(oob: FakeParent, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    fd = FakeParent.memfd(b"x" * 100)
    hostile(oob, [100], [fd], call_message(1, "marker", [str(marker), ref(0), ref(0)]))
    expect_protocol_error(oob, "referenced more than once", marker)


def test_hostile_reference_out_of_range(oob: FakeParent) -> None:
    fd = FakeParent.memfd(b"x" * 100)
    hostile(oob, [100], [fd], call_message(1, "echo", [ref(0), ref(1)]))
    expect_protocol_error(oob, "out of range")


def test_hostile_reference_without_fds(oob: FakeParent, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    oob.send(call_message(1, "marker", [str(marker), ref(0)]))
    expect_protocol_error(oob, "not announced by an fds message", marker)


def test_hostile_fds_without_reference(oob: FakeParent, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    fd = FakeParent.memfd(b"x" * 100)
    hostile(oob, [100], [fd], call_message(1, "marker", str(marker)))
    expect_protocol_error(oob, "not referenced", marker)


def test_hostile_fds_followed_by_something_else(oob: FakeParent) -> None:
    fd = FakeParent.memfd(b"x" * 100)
    hostile(oob, [100], [fd], [MSG_PING, 1])
    expect_protocol_error(oob, "not a call")


def test_hostile_fds_message_without_a_datagram(spawn: SpawnFn, tmp_path: Path) -> None:
    """An fds message whose datagram never comes: the worker waits PYVISOR_FDS_TIMEOUT_MS for
    it, then ends on a protocol error (the call never runs)."""
    marker = tmp_path / "ran"
    parent = spawn(WORKER, env={"PYVISOR_FDS_TIMEOUT_MS": "500"})
    began = time.monotonic()
    parent.send_with_fds([[MSG_FDS, [10]], call_message(1, "marker", [str(marker), ref(0)])], [])
    expect_protocol_error(parent, "an fds message whose fds did not arrive", marker)
    assert time.monotonic() - began >= 0.4


def test_pyvisor_fds_timeout_ms_must_be_positive(spawn: SpawnFn) -> None:
    with pytest.raises(WorkerExited, match="exit status 2"):
        spawn(WORKER, env={"PYVISOR_FDS_TIMEOUT_MS": "0"})


@pytest.mark.parametrize("lengths", [[], list(range(17)), [-1], ["x"], None])
def test_hostile_malformed_fds_message(oob: FakeParent, lengths: Any) -> None:
    oob.send([MSG_FDS, lengths])
    expect_protocol_error(oob, "malformed fds message")


def test_hostile_buffer_over_max_buffer(spawn: SpawnFn) -> None:
    parent = spawn(WORKER, env={"PYVISOR_MAX_BUFFER": "1000"})
    fd = FakeParent.memfd(b"x" * 1001)
    hostile(parent, [1001], [fd], call_message(1, "echo", ref(0)))
    expect_protocol_error(parent, "over the maximum buffer size")


@pytest.mark.parametrize("count", [17, 20], ids=["17", "MSG_CTRUNC"])
def test_hostile_too_many_fds_in_one_datagram(oob: FakeParent, count: int) -> None:
    # 17 fit the worker's ancillary buffer and are counted; more are cut (MSG_CTRUNC).
    fd = FakeParent.memfd(b"x")
    try:
        oob.send_with_fds(
            [[MSG_FDS, [1] * 16], call_message(1, "echo", [ref(i) for i in range(16)])],
            [fd] * count,
        )
    finally:
        os.close(fd)
    expect_protocol_error(oob, "at most 16")


@pytest.mark.parametrize("sent", [0, 1, 3])
def test_hostile_datagram_count_differs_from_the_fds_message(oob: FakeParent, sent: int) -> None:
    fd = FakeParent.memfd(b"xy")
    try:
        if sent == 0:  # an empty datagram (no fds at all)
            oob.send_fds([])
        oob.send_with_fds(
            [[MSG_FDS, [2, 2]], call_message(1, "echo", [ref(0), ref(1)])], [fd] * sent
        )
    finally:
        os.close(fd)
    expect_protocol_error(oob, f"an fds message claims 2 fds, its datagram brought {sent}")


class _ProtocolError(Exception):
    pass


@pytest.mark.parametrize(
    "sent, words",
    [(3, "its datagram brought 3"), (17, "17 fds in one datagram"), (20, "MSG_CTRUNC")],
)
def test_a_refused_datagram_leaves_no_fd_open(
    monkeypatch: pytest.MonkeyPatch, sent: int, words: str
) -> None:
    """In process: every fd of a refused datagram is closed before the protocol error."""
    from pyvisor_worker import _oob

    def raise_instead(message: str) -> None:
        raise _ProtocolError(message)

    monkeypatch.setattr(_oob, "protocol_error", raise_instead)
    parent, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    fd = seal_bytes(b"x" * 100)
    try:
        inbound = _oob.Inbound(worker, 1 << 20, 1.0)
        before = len(os.listdir("/proc/self/fd"))
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd] * sent))]
        parent.sendmsg([b"\0"], rights)
        with pytest.raises(_ProtocolError, match=words):
            inbound.claim([MSG_FDS, [100]])
        assert len(os.listdir("/proc/self/fd")) == before
        # And one that matches is taken, mapped and closed too (Python < 3.13: the mapping
        # holds a duplicate until it is released).
        parent.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        owned = inbound.claim([MSG_FDS, [100]])
        owned.release()
        assert len(os.listdir("/proc/self/fd")) == before
        # No datagram: the wait is bounded.
        began = time.monotonic()
        with pytest.raises(_ProtocolError, match="did not arrive"):
            inbound.claim([MSG_FDS, [100]])
        assert 0.9 <= time.monotonic() - began < 5
    finally:
        os.close(fd)
        parent.close()
        worker.close()


def test_datagrams_are_claimed_in_order(oob: FakeParent) -> None:
    """Datagrams sent ahead of their fds messages wait in the side channel; each fds message
    takes the next one."""
    first = FakeParent.memfd(b"first")
    second = FakeParent.memfd(b"second!")
    try:
        oob.send_fds([first])
        oob.send_fds([second, first])
        assert oob.invoke("echo", 1) == 1  # the datagrams wait: main goes on
        oob.send_with_fds([[MSG_FDS, [5]], call_message(50, "echo", ref(0))], [])
        oob.send_with_fds(
            [[MSG_FDS, [7, 5]], call_message(51, "echo", [ref(1), ref(0)])], []
        )
    finally:
        os.close(first)
        os.close(second)
    assert oob.reply_for(50).value == b"first"
    assert oob.reply_for(51).value == [b"first", b"second!"]
    assert oob.invoke("echo", OutOfBand(b"next")) == b"next"


def test_fds_on_the_main_socket_are_not_received(oob: FakeParent) -> None:
    """The worker reads the main socket with plain recv_into: fds sent there are dropped by
    the kernel (never installed in the worker), and the bytes are read as usual."""
    pid = oob.pid
    oob.invoke("echo", 1)
    time.sleep(0.2)
    before = open_fds(pid)
    fd = FakeParent.memfd(b"x")
    try:
        data = encode_frame([MSG_PING, 3])
        oob.sock.sendmsg(
            [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd] * 16))]
        )
    finally:
        os.close(fd)
    assert oob.pong_for(3) is not None
    assert oob.invoke("echo", OutOfBand(b"abc")) == b"abc"
    assert open_fds(pid) <= before


def test_no_side_channel_means_no_oob(spawn: SpawnFn) -> None:
    """Without PYVISOR_FDS_FD (or with one that is not a datagram socket) the worker cannot
    receive fds, so it does not announce oob, and it works in band."""
    parent = spawn(WORKER, env={"PYVISOR_FDS_FD": ""})
    assert "oob" not in parent.hello["capabilities"]
    assert parent.invoke("make", 1000) == expected_make(1000)
    parent.close()
    # Not a socket (the worker's stdout, a pipe): no side channel either.
    parent = spawn(WORKER, env={"PYVISOR_FDS_FD": "1"})
    assert "oob" not in parent.hello["capabilities"]
    reply = parent.reply_for(parent.call("make", 1 * MIB))
    assert reply.ok and reply.buffers == 0 and reply.value == expected_make(1 * MIB)
    # A number that is not a descriptor number at all is a bad start.
    with pytest.raises(WorkerExited, match="exit status 2"):
        spawn(WORKER, env={"PYVISOR_FDS_FD": "x"})


@pytest.mark.parametrize("cut", [0, 3, 4, 1000, -1])
def test_the_frame_after_fds_may_arrive_in_pieces(oob: FakeParent, cut: int) -> None:
    """The fds message is read first, its frame (larger than the read buffer) in pieces
    later: the fds wait, nothing is claimed twice, the call runs once."""
    fd = FakeParent.memfd(b"late")
    big = b"i" * MIB  # in band: longer than the worker's read buffer
    data = encode_frame(call_message(60, "echo", [ref(0), big]))
    try:
        oob.send_with_fds([[MSG_FDS, [4]]], [fd])
    finally:
        os.close(fd)
    cut = len(data) - 1 if cut < 0 else cut
    time.sleep(0.05)
    oob.send_raw(data[:cut])
    time.sleep(0.05)
    oob.send_raw(data[cut:])
    reply = oob.reply_for(60)
    assert reply.ok and reply.value == [b"late", big]
    assert oob.invoke("echo", OutOfBand(b"next")) == b"next"


def test_call_options_with_buffers(oob: FakeParent) -> None:
    data = pattern(MIB)
    call_id = oob.call("echo", OutOfBand(data), options={"ack_start": True})
    assert oob.recv()[0] == 8  # started
    assert oob.reply_for(call_id).value == data
    # A call_options right after fds is accepted as the frame that owns them.
    fd = FakeParent.memfd(b"abc")
    hostile(oob, [3], [fd], [MSG_CALL_OPTIONS, 99, 1, "echo", None, None, None, {}, ref(0)])
    assert oob.reply_for(99).value == b"abc"


# ---------------------------------------------------------------------- no leaks


def test_no_fd_leaks_over_10000_calls(oob: FakeParent) -> None:
    pid = oob.pid
    data = pattern(THRESHOLD + 123)
    # Warm up (threads, pools, imports), then count once the worker is idle (a call's payload
    # may be released a moment after its reply went out).
    oob.invoke("echo", OutOfBand(data))
    oob.invoke("view_echo", OutOfBand(data))
    oob.invoke("async_echo", OutOfBand(data))
    oob.invoke("echo", 1)
    time.sleep(0.2)
    before = open_fds(pid)
    mine_before = len(os.listdir("/proc/self/fd"))
    functions = ["echo", "view_echo", "echo", "async_echo"]
    done = 0
    batch = 50
    while done < 10_000:
        ids = [oob.call(functions[(done + i) % 4], OutOfBand(data)) for i in range(batch)]
        for call_id in ids:
            reply = oob.reply_for(call_id, timeout=30)
            assert reply.ok and reply.buffers == 1, reply.error
            assert len(reply.value) == len(data)
        done += batch
    assert oob.invoke("echo", 1) == 1
    assert len(oob.fds_messages) >= 10_000
    assert oob.unclaimed_fds == 0
    # Every fd the worker received or made is closed (mappings released with their values).
    deadline = time.monotonic() + 5
    while open_fds(pid) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(pid) <= before
    assert len(os.listdir("/proc/self/fd")) == mine_before


def test_mappings_are_released(oob: FakeParent) -> None:
    pid = oob.pid
    data = pattern(MIB)

    def memfd_mappings() -> int:
        with open(f"/proc/{pid}/maps") as maps:
            return sum(1 for line in maps if "memfd:pyvisor-buffer" in line)

    for function in ("describe", "view_probe", "view_echo", "echo"):
        oob.invoke(function, OutOfBand(data))
    assert memfd_mappings() == 0
