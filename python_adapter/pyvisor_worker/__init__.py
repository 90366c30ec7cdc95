"""pyvisor_worker: the Python side of pyvisor.

Expose functions with :func:`expose`; the pyvisor parent (a Rust process) starts this script
through ``python -m pyvisor_worker SCRIPT`` and calls them over its own socket::

    from pyvisor_worker import expose, run_worker

    @expose
    def echo(x):
        return x

    if __name__ == "__main__":
        run_worker()

Large byte strings may travel out of band, in sealed shared memory (capability ``oob``): see
``@expose(buffers="memoryview")`` and :func:`as_numpy`.
"""

from . import chaos
from ._buffers import as_numpy
from ._config import PROTOCOL_VERSION
from ._context import Context
from ._otel import tracer
from ._registry import expose
from ._version import __version__
from ._worker import run_worker

__all__ = [
    "expose",
    "run_worker",
    "Context",
    "tracer",
    "chaos",
    "as_numpy",
    "__version__",
    "PROTOCOL_VERSION",
]
