"""Dask collections on zmqexec: pass the executor as dask's scheduler.

``dask.compute(x, scheduler=executor)`` or ``dask.config.set(scheduler=executor)`` runs
the tasks of a dask array or bag graph on zmqexec workers (dask sizes its pool from the
executor's worker count). Lambdas travel by value, as with ``submit``.

Needs dask (``pip install 'dask[array]'``). Run it from the repository root::

    python examples/dask_collections.py
"""
import dask
import dask.array as da
import dask.bag as db

from zmqexec import ZMQExecutor

if __name__ == "__main__":
    with ZMQExecutor(max_workers=2) as ex:
        x = da.arange(1_000_000, chunks=100_000)
        total, largest = dask.compute(x.sum(), (x % 977).max(), scheduler=ex)
        print(f"array: sum {int(total)}, largest remainder {int(largest)}")
        with dask.config.set(scheduler=ex):
            words = db.from_sequence(["broker", "agent", "task", "future", "key"] * 20,
                                     npartitions=4)
            lengths = words.map(lambda w: (w, len(w))).distinct().compute()
        print("bag:", sorted(lengths))
