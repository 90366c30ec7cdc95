"""A deliberately wrong echo, for `pyvisor bench`'s mismatch check."""

from pyvisor_worker import expose, run_worker


@expose
def echo(x):
    return {"not": x}


if __name__ == "__main__":
    run_worker()
