"""zmqexec.progress: futures in completion order or a map in order,
with a tqdm bar when tqdm is installed and a rate-limited log line when it is not."""
from __future__ import annotations

import io
import logging
import sys

import pytest

import zmqexec
from zmqexec import progress


def test_futures_come_back_as_they_finish_with_a_log_line_without_tqdm(executor, monkeypatch,
                                                                        caplog):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    futures = [executor.submit(pow, i, 2) for i in range(50)]
    with caplog.at_level(logging.INFO, logger="zmqexec.progress"):
        done = list(progress(futures, interval=0.0, desc="squares"))
    assert sorted(f.result(timeout=30) for f in done) == [i * i for i in range(50)]
    assert all(f.done() for f in done) and len(done) == 50
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("squares: 50/50 done")


def test_the_log_line_is_rate_limited(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with caplog.at_level(logging.INFO, logger="zmqexec.progress"):
        assert sum(progress(range(10_000), interval=60)) == sum(range(10_000))
    assert len(caplog.records) == 1  # only the final line within the minute


def test_a_map_iterator_keeps_its_order_and_gives_its_length(executor, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    results = executor.map(abs, range(-20, 0), chunksize=4, timeout=30)
    assert results.__length_hint__() == 20
    with caplog.at_level(logging.INFO, logger="zmqexec.progress"):
        assert list(progress(results, interval=0.0)) == list(range(20, 0, -1))
    assert "20/20 done" in caplog.records[-1].getMessage()


def test_with_tqdm_a_bar_counts_to_the_total(executor):
    tqdm_auto = pytest.importorskip("tqdm.auto", reason="tqdm (the progress extra) is not "
                                                        "installed")
    stream = io.StringIO()
    original = tqdm_auto.tqdm

    class Captured(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kw):
            super().__init__(*args, file=stream, **kw)

    tqdm_auto.tqdm = Captured
    try:
        futures = [executor.submit(pow, i, 3) for i in range(30)]
        assert len(list(zmqexec.progress(futures))) == 30
    finally:
        tqdm_auto.tqdm = original
    assert "30/30" in stream.getvalue()
