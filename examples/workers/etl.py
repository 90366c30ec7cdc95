"""The `etl/loader` pool of examples/supervision_tree.rs and examples/tree.toml."""

from pyvisor_worker import expose, run_worker


@expose(idempotent=True)
def load(rows: list) -> dict:
    cleaned = [r.strip().lower() for r in rows if r.strip()]
    return {"loaded": len(cleaned), "rows": cleaned}


@expose(idempotent=True)
def echo(x):
    return x


if __name__ == "__main__":
    run_worker()
