"""cancel() says True only for a call that will never run: in the client's backlog, the
broker's queue, an agent's prefetch, or behind a running task in a task process's batch.

Each task leaves a file when it starts, so a test can tell afterwards which calls ran.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import random
import sys
import threading
import time
from typing import List

import cloudpickle
import pytest

from conftest import Cluster, wait_until
import gates
from gates import wait_for_file
from zmqexec import ZMQExecutor

cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(gates)
TIMEOUT = 30


def mark_and_sleep(path: str, seconds: float) -> str:
    with open(path, "w"):
        pass
    time.sleep(seconds)
    return path


def ran(path: str) -> bool:
    return os.path.exists(path)


@pytest.fixture(params=["embedded", "remote"])
def make_executor(request):
    """A factory of executors of one mode (remote: a CLI cluster on loopback)."""
    cluster = None
    made: List[ZMQExecutor] = []

    def make(workers: int = 2) -> ZMQExecutor:
        nonlocal cluster
        if request.param == "embedded":
            ex = ZMQExecutor(workers)
        else:
            if cluster is None:
                cluster = Cluster(agents=1, nprocs=workers)
            ex = ZMQExecutor(address=cluster.address)
            ex.wait_for_workers(workers, timeout=TIMEOUT)
        made.append(ex)
        return ex

    make.mode = request.param
    yield make
    for ex in made:
        ex.shutdown(wait=True)
    if cluster is not None:
        cluster.close()


def test_a_cancelled_call_never_runs_and_the_others_finish(make_executor, tmp_path):
    """The probe: tasks that each leave a file and sleep 20 ms, cancelled after 0-10 ms.
    Every future that said cancelled left no file, every other one ran and finished."""
    rounds = 40 if make_executor.mode == "embedded" else 20
    ex = make_executor()
    rng = random.Random(7)
    said_cancelled = ran_anyway = 0
    rounds_answers: List[List[bool]] = []
    for r in range(rounds):
        paths = [str(tmp_path / f"{r}-{i}") for i in range(12)]
        futures = [ex.submit(mark_and_sleep, p, 0.02) for p in paths]
        time.sleep(rng.uniform(0, 0.01))  # (the probe's point: cancels at random moments)
        answers = [f.cancel() for f in futures]
        rounds_answers.append(answers)
        for fut, path, cancelled in zip(futures, paths, answers, strict=True):
            if cancelled:
                said_cancelled += 1
                assert fut.cancelled()
            else:
                assert fut.result(timeout=TIMEOUT) == path  # ran, or about to
                ran_anyway += 1
    ex.shutdown(wait=True)  # every call that could still start has ended
    assert said_cancelled > 0 and ran_anyway > 0, (said_cancelled, ran_anyway)
    for r, answers in enumerate(rounds_answers):
        for i, cancelled in enumerate(answers):
            assert ran(str(tmp_path / f"{r}-{i}")) is not cancelled, (r, i, cancelled)


def test_one_exchange_cancels_many_and_returns_the_cancelled(make_executor, tmp_path):
    ex = make_executor(1)
    gate = tmp_path / "gate"
    blocker = ex.submit(wait_for_file, str(gate), "held")
    assert wait_until(lambda: blocker.running(), timeout=TIMEOUT)
    queued = [ex.submit(mark_and_sleep, str(tmp_path / str(i)), 0) for i in range(50)]
    cancelled = ex.cancel([blocker, *queued])
    assert blocker not in cancelled and not blocker.cancelled()
    assert set(cancelled) == set(queued)
    assert all(f.cancelled() for f in queued)
    gate.touch()
    assert blocker.result(timeout=TIMEOUT) == "held"
    ex.shutdown(wait=True)
    assert not any(ran(str(tmp_path / str(i))) for i in range(50))


def test_shutdown_cancels_exactly_what_had_not_started(make_executor, tmp_path):
    """Idle task processes take work first (as ProcessPoolExecutor's call queue does);
    then everything else is cancelled; the started calls finish with their results."""
    ex = make_executor(2)
    ex.submit(abs, 1).result(timeout=TIMEOUT)  # task processes up and idle
    paths = [str(tmp_path / str(i)) for i in range(50)]
    futures = [ex.submit(mark_and_sleep, p, 0.05) for p in paths]
    ex.shutdown(wait=True, cancel_futures=True)
    kept = [f for f in futures if not f.cancelled()]
    assert futures[0] in kept and futures[1] in kept  # the two idle processes took them
    for fut, path in zip(futures, paths, strict=True):
        if fut.cancelled():
            assert not ran(path)
        else:
            assert fut.result(timeout=0) == path and ran(path)
    assert len(kept) < 50


def test_closing_a_map_iterator_cancels_what_had_not_started(make_executor, tmp_path):
    ex = make_executor(1)
    gate = tmp_path / "gate"
    blocker = ex.submit(wait_for_file, str(gate), "held")
    assert wait_until(lambda: blocker.running(), timeout=TIMEOUT)
    paths = [str(tmp_path / str(i)) for i in range(20)]
    results = ex.map(mark_and_sleep, paths, [0] * 20)
    results.close()
    gate.touch()
    assert blocker.result(timeout=TIMEOUT) == "held"
    ex.shutdown(wait=True)
    assert not any(ran(p) for p in paths)


def test_a_callback_may_cancel_another_future(make_executor, tmp_path):
    """The answer never waits behind user callbacks: a callback on the completion thread
    may cancel, and gets its answer."""
    ex = make_executor(1)
    first_gate, gate = tmp_path / "first", tmp_path / "gate"
    first = ex.submit(wait_for_file, str(first_gate), "first")
    blocker = ex.submit(wait_for_file, str(gate), "held")
    queued = ex.submit(mark_and_sleep, str(tmp_path / "queued"), 0)
    answers: List[bool] = []
    answered = threading.Event()

    def on_done(_: cf.Future) -> None:
        answers.append(queued.cancel())
        answered.set()

    first.add_done_callback(on_done)  # (before it is done: the completion thread runs it)
    first_gate.touch()
    assert answered.wait(TIMEOUT)
    assert answers == [True] and queued.cancelled()
    gate.touch()
    assert blocker.result(timeout=TIMEOUT) == "held"
    ex.shutdown(wait=True)
    assert not ran(str(tmp_path / "queued"))


def test_a_task_waiting_behind_a_running_one_in_its_batch_is_dropped(tmp_path):
    """A task process handed several short tasks at once: a cancel of one not started
    yet is answered by the task process itself (exclusive with starting it)."""
    with ZMQExecutor(1) as ex:
        for _ in range(3):  # many short tasks: the agent learns to give batches
            list(ex.map(abs, range(20000)))
        gate = tmp_path / "gate"
        futures = [ex.submit(wait_for_file, str(gate), "first")]
        futures += [ex.submit(mark_and_sleep, str(tmp_path / str(i)), 0) for i in range(8)]
        assert wait_until(lambda: futures[0].running(), timeout=TIMEOUT)
        cancelled = ex.cancel(futures[1:])
        assert len(cancelled) == 8
        gate.touch()
        assert futures[0].result(timeout=TIMEOUT) == "first"
    assert not any(ran(str(tmp_path / str(i))) for i in range(8))
