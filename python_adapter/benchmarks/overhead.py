"""Per-call overhead of the adapter against a bare msgpack echo loop.

Both servers run in a child process over one socketpair and are driven by the same minimal
client loop (sequential: one call in flight; pipelined: DEPTH in flight), so the difference is
what the adapter adds per call.

    python benchmarks/overhead.py [N]
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import List, Tuple

import msgpack

HEADER = struct.Struct(">I")

BARE_SERVER = textwrap.dedent(
    """
    import os, socket, struct
    import msgpack
    H = struct.Struct(">I")
    sock = socket.socket(fileno=int(os.environ["PYVISOR_FD"]))
    buf = bytearray(1 << 18)
    view = memoryview(buf)
    start = end = 0
    while True:
        n = sock.recv_into(view[end:])
        if not n:
            break
        end += n
        out = []
        while end - start >= 4:
            (size,) = H.unpack_from(buf, start)
            if end - start < 4 + size:
                break
            msg = msgpack.unpackb(view[start + 4:start + 4 + size], raw=False)
            start += 4 + size
            body = msgpack.packb([2, msg[1], msg[2], True, None, msg[7]], use_bin_type=True)
            out.append(H.pack(len(body)) + body)
        if start == end:
            start = end = 0
        else:
            buf[:end - start] = view[start:end]
            end -= start
            start = 0
        if out:
            sock.sendall(b"".join(out))
    """
)

ADAPTER_SERVER = textwrap.dedent(
    """
    from pyvisor_worker import expose

    @expose
    def echo(x):
        return x
    """
)


def spawn(argv: List[str]) -> Tuple[subprocess.Popen, socket.socket]:
    parent, child = socket.socketpair()
    env = dict(os.environ, PYVISOR_FD=str(child.fileno()), PYVISOR_BEAT_INTERVAL_MS="1000")
    proc = subprocess.Popen(argv, pass_fds=(child.fileno(),), env=env, start_new_session=True)
    child.close()
    return proc, parent


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.pack = msgpack.Packer(use_bin_type=True).pack

    def send_calls(self, first_id: int, count: int, payload: object) -> None:
        out = []
        for i in range(first_id, first_id + count):
            body = self.pack([1, i, 1, "echo", None, None, None, payload])
            out.append(HEADER.pack(len(body)) + body)
        self.sock.sendall(b"".join(out))

    def recv_replies(self, count: int) -> None:
        got = 0
        while got < count:
            while len(self.buf) >= 4:
                (n,) = HEADER.unpack_from(self.buf, 0)
                if len(self.buf) < 4 + n:
                    break
                msg = msgpack.unpackb(self.buf[4 : 4 + n], raw=False)
                self.buf = self.buf[4 + n :]
                if msg[0] == 2:
                    got += 1
            if got >= count:
                break
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError
            self.buf += data

    def skip_hello(self) -> None:
        while len(self.buf) < 4 or len(self.buf) < 4 + HEADER.unpack_from(self.buf, 0)[0]:
            self.buf += self.sock.recv(65536)
        (n,) = HEADER.unpack_from(self.buf, 0)
        self.buf = self.buf[4 + n :]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(client: Client, n: int, depth: int, payload: object) -> float:
    next_id = 1
    for _ in range(20):  # warm-up
        client.send_calls(next_id, 10, payload)
        client.recv_replies(10)
        next_id += 10
    t0 = time.perf_counter()
    if depth == 1:
        for _ in range(n):
            client.send_calls(next_id, 1, payload)
            client.recv_replies(1)
            next_id += 1
    else:
        for _ in range(n // depth):
            client.send_calls(next_id, depth, payload)
            client.recv_replies(depth)
            next_id += depth
    return (time.perf_counter() - t0) / n * 1e6


def run(name: str, argv: List[str], hello: bool, n: int) -> None:
    proc, sock = spawn(argv)
    client = Client(sock)
    if hello:
        client.skip_hello()
    for label, depth, payload in (
        ("sequential, small", 1, 42),
        ("pipelined x16, small", 16, 42),
        ("sequential, 10 KiB", 1, b"x" * 10240),
    ):
        cpu0 = cpu_seconds(proc.pid)
        us = measure(client, n, depth, payload)
        cpu_us = (cpu_seconds(proc.pid) - cpu0) / n * 1e6
        print(f"{name:8s} {label:22s} {us:7.2f} us/call wall  {cpu_us:6.2f} us/call server CPU")
    sock.close()
    proc.wait()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    with tempfile.TemporaryDirectory() as tmp:
        bare = os.path.join(tmp, "bare.py")
        worker = os.path.join(tmp, "worker.py")
        with open(bare, "w") as f:
            f.write(BARE_SERVER)
        with open(worker, "w") as f:
            f.write(ADAPTER_SERVER)
        run("bare", [sys.executable, bare], False, n)
        run("adapter", [sys.executable, "-m", "pyvisor_worker", worker], True, n)


if __name__ == "__main__":
    main()
