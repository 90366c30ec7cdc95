"""Test worker for confinement: reports what the worker is confined by, and exceeds limits."""

import os
import resource

from pyvisor_worker import expose, run_worker

# Burn CPU before `hello` (a CPU limit then kills the worker while it starts).
if os.environ.get("CONFINED_BURN_AT_IMPORT"):
    while True:
        pass

LIMITS = {
    "address_space": resource.RLIMIT_AS,
    "open_files": resource.RLIMIT_NOFILE,
    "cpu_time": resource.RLIMIT_CPU,
    "core_size": resource.RLIMIT_CORE,
}


def _value(v):
    return None if v == resource.RLIM_INFINITY else v


@expose(idempotent=True)
def limits(_):
    """Soft and hard limit of each resource; None means unlimited."""
    return {name: [_value(v) for v in resource.getrlimit(r)] for name, r in LIMITS.items()}


@expose(idempotent=True)
def environ(_):
    return dict(os.environ)


@expose(idempotent=True)
def cwd(_):
    return os.getcwd()


@expose(idempotent=True)
def ids(_):
    return {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "egid": os.getegid(),
        "groups": sorted(os.getgroups()),
    }


@expose(idempotent=True)
def no_new_privs(_):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("NoNewPrivs:"):
                return int(line.split()[1])
    return None


def _parent_death_signal():
    """prctl(PR_GET_PDEATHSIG) of the calling thread."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    sig = ctypes.c_int(-1)
    if libc.prctl(2, ctypes.byref(sig), 0, 0, 0) != 0:  # PR_GET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_GET_PDEATHSIG) failed")
    return sig.value


# The parent-death signal is per thread and not inherited by new threads: read it here, on the
# main thread that pyvisor forked and exec'd (calls run on other threads).
MAIN_THREAD_PDEATHSIG = _parent_death_signal()


@expose(idempotent=True)
def parent_death_signal(_):
    """The parent-death signal of the worker's main thread (the one pyvisor set up)."""
    return MAIN_THREAD_PDEATHSIG


@expose
def burn(_):
    """Burn CPU until something stops the process."""
    n = 0
    while True:
        n += 1


@expose(idempotent=True)
def burn_idempotent(_):
    n = 0
    while True:
        n += 1


@expose
def open_many(n):
    """Open /dev/null up to n times; report how many opened and the error that stopped it."""
    files = []
    error = None
    try:
        for _ in range(n):
            files.append(open("/dev/null"))
    except OSError as e:
        error = f"{type(e).__name__}: [Errno {e.errno}] {e.strerror}"
    opened = len(files)
    for f in files:
        f.close()
    return {"opened": opened, "error": error}


@expose
def allocate(mib):
    """Allocate and touch `mib` MiB; return the size."""
    block = bytearray(mib << 20)
    return len(block)


@expose(idempotent=True)
def echo(x):
    return x


run_worker()
