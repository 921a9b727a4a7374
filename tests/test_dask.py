"""Dask collections on zmqexec: the executor as dask's scheduler."""
from __future__ import annotations

import pytest

dask = pytest.importorskip("dask", reason="dask is not installed")
da = pytest.importorskip("dask.array")
db = pytest.importorskip("dask.bag")


def test_dask_array_compute_with_the_executor_as_scheduler(executor):
    import numpy

    x = da.random.default_rng(3).random((600, 600), chunks=(150, 150))
    expected = (x.compute() @ x.compute().T).trace()
    got, = dask.compute((x @ x.T).trace(), scheduler=executor)
    assert numpy.isclose(got, expected)
    assert executor._max_workers == 2  # what dask sizes its pool from


def test_dask_config_scheduler_runs_a_bag_with_lambdas(executor):
    before = executor.status()["tasks"]["submitted"]
    with dask.config.set(scheduler=executor):
        bag = db.from_sequence(range(1000), npartitions=8)
        total = bag.map(lambda v: v * 3).filter(lambda v: v % 2 == 0).sum().compute()
    assert total == sum(v * 3 for v in range(1000) if v * 3 % 2 == 0)
    assert executor.status()["tasks"]["submitted"] > before  # it really ran on zmqexec
