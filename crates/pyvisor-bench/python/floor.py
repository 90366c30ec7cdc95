"""The raw floor: a minimal MessagePack echo loop over one Unix socket, no framework.

Frames are a 4-byte big-endian length and one MessagePack value; every value received is
decoded and re-encoded (as a real worker would), and replies ready together go out in one write.
"""

import os
import socket

import msgpack

sock = socket.socket(fileno=int(os.environ["FLOOR_FD"]))
unpackb, packb = msgpack.unpackb, msgpack.packb
buf = b""
while True:
    data = sock.recv(1 << 20)
    if not data:
        break
    buf += data
    out = []
    pos = 0
    while len(buf) - pos >= 4:
        n = int.from_bytes(buf[pos : pos + 4], "big")
        if len(buf) - pos - 4 < n:
            break
        body = packb(unpackb(buf[pos + 4 : pos + 4 + n]))
        out.append(len(body).to_bytes(4, "big") + body)
        pos += 4 + n
    buf = buf[pos:]
    if out:
        sock.sendall(b"".join(out))
