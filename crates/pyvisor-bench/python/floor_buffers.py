"""The raw floor for large buffers: one Unix socket, no framework, no MessagePack.

A frame is a 4-byte big-endian length and that many raw bytes. The bytes are read into a
buffer kept from call to call (no page faults after the first), the same function as the
pyvisor side runs (numpy: every byte read, a new array of the same size) makes the answer, and
it goes back without another copy in Python. The fastest honest socket path we can write.
"""

import os
import socket

import numpy as np

sock = socket.socket(fileno=int(os.environ["FLOOR_FD"]))
header = bytearray(4)
buf = bytearray(0)


def read_exact(view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise SystemExit(0)
        got += n


while True:
    read_exact(memoryview(header))
    n = int.from_bytes(header, "big")
    if len(buf) < n:
        buf = bytearray(n)
    data = memoryview(buf)[:n]
    read_exact(data)
    out = np.frombuffer(data, np.uint8) + 1
    sock.sendall(n.to_bytes(4, "big"))
    sock.sendall(memoryview(out))
