"""Example worker for session affinity: documents kept in this process, by session key.

A session's calls must reach the process that holds its document: the Rust side calls with
`CallOptions::affinity(key)`. When that process dies, the document is gone: the next call says
so (`AffinityLost`) and the caller opens the session again.
"""

import os

from pyvisor_worker import expose, run_worker

DOCUMENTS: dict[str, list[str]] = {}


@expose
def open_session(key: str) -> int:
    DOCUMENTS[key] = []
    return os.getpid()


@expose
def append(args: list) -> int:
    key, line = args
    if key not in DOCUMENTS:
        raise KeyError(f"no open session {key!r} in process {os.getpid()}")
    DOCUMENTS[key].append(line)
    return len(DOCUMENTS[key])


@expose
def read(key: str) -> list:
    return DOCUMENTS[key]


if __name__ == "__main__":
    run_worker()
