"""The numpy example's worker (examples/numpy_buffers.rs): sums a float64 array the Rust side
filled and sent out of band, without copying it."""

from typing import Dict, Union

import numpy as np

from pyvisor_worker import as_numpy, expose


def _rss_anon_kib() -> int:
    """This process's anonymous resident memory (shared pages do not count here, unlike RSS
    and PSS: the received buffer's pages are shared memory)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return -1


@expose(buffers="memoryview")
def total(data: memoryview) -> Dict[str, Union[float, bool, int]]:
    before = _rss_anon_kib()
    values = as_numpy(data, "float64")  # a read-only array over the parent's pages
    s = float(values.sum())
    after = _rss_anon_kib()
    return {
        "sum": s,
        "count": int(values.size),
        "shares_memory": bool(np.shares_memory(values, np.asarray(data))),
        "readonly": not values.flags.writeable,
        "rss_anon_growth_kib": after - before,
    }
