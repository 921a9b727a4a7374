"""Futures as arguments: a task waits at the broker for the futures among its arguments and
runs with their results in their place; errors and losses travel down the graph."""
import contextlib
import gc
import os
import sys
import time

import pytest

from conftest import Cluster, free_port, wait_until
from gates import wait_for_file
from zmqexec import (
    CancelledError,
    KeyLostError,
    SerializationError,
    WorkerLostError,
    ZMQExecutor,
)

IN_CLIENT = False  # set by the test that needs it, after task processes were forked


def inc(x):
    return x + 1


def add(*xs):
    return sum(xs)


def add_len(x, data):
    return x + len(data)


def describe(items, mapping, pair, members, *, kw):
    return [items, mapping, pair, sorted(members), kw]


def fail(x):
    raise ValueError(f"failed on {x}")


def mark_then_inc(path, x):
    with open(path, "a") as f:
        f.write("ran\n")
    return x + 1


def gated(path, value):
    return wait_for_file(path, value, 30)


def _rebuild_picky():
    if IN_CLIENT:
        raise RuntimeError("this object cannot be unpickled in the client")
    return Picky()


class Picky:
    """An object only task processes can unpickle."""

    def __reduce__(self):
        return _rebuild_picky, ()


def make_picky():
    return Picky()


def is_picky(obj):
    return type(obj).__name__


@pytest.fixture(scope="module")
def ex():
    with ZMQExecutor(2) as executor:
        yield executor


def chain_and_fan_in(executor, length, width):
    """A chain of ``length`` dependent tasks, and ``width`` tasks feeding one."""
    fut = executor.submit(inc, 0)
    for _ in range(length - 1):
        fut = executor.submit(inc, fut)
    assert fut.result(timeout=60) == length
    parts = [executor.submit(inc, i) for i in range(width)]
    assert executor.submit(add, *parts).result(timeout=60) == sum(range(1, width + 1))


def test_a_chain_and_a_fan_in(ex):
    chain_and_fan_in(ex, 20, 50)


def test_futures_at_any_depth_keywords_and_map_items(ex):
    a, b, c = (ex.submit(inc, i) for i in (0, 10, 20))
    result = ex.submit(describe, [a, (b, 5)], {"x": c}, (a, b), {a, c}, kw=[c]).result(
        timeout=60)
    assert result == [[1, (11, 5)], {"x": 21}, (1, 11), [1, 21], [21]]
    assert list(ex.map(inc, [a, b, c], timeout=60)) == [2, 12, 22]
    assert list(ex.map(add, [a, b], [c, c], timeout=60, chunksize=2)) == [22, 32]


def test_an_error_ends_the_dependents_without_running_them(ex, tmp_path):
    marks = str(tmp_path / "marks")
    broken = ex.submit(fail, 1)
    first = ex.submit(mark_then_inc, marks, broken)
    second = ex.submit(mark_then_inc, marks, first)
    for fut in (broken, first, second):
        with pytest.raises(ValueError, match="failed on 1") as info:
            fut.result(timeout=60)
        assert "raise ValueError" in str(info.value.__cause__)  # the remote traceback
        assert fut.status == "error"
    assert not os.path.exists(marks)  # neither dependent ran


def test_a_dependency_whose_own_future_was_dropped(ex, tmp_path):
    gate = str(tmp_path / "gate")
    dep = ex.submit(gated, gate, 41)
    dependent = ex.submit(inc, dep)
    del dep
    gc.collect()
    open(gate, "w").close()
    assert dependent.result(timeout=60) == 42


def test_a_task_waiting_for_its_dependencies_can_be_cancelled(ex, tmp_path):
    gate, marks = str(tmp_path / "gate"), str(tmp_path / "marks")
    dep = ex.submit(gated, gate, 1)
    waiting = ex.submit(mark_then_inc, marks, dep)
    assert wait_until(lambda: ex.status()["tasks"]["queued"] >= 1, timeout=30)
    assert waiting.cancel() is True
    open(gate, "w").close()
    assert dep.result(timeout=60) == 1
    assert waiting.cancelled()
    assert ex.submit(inc, dep).result(timeout=60) == 2  # its dependency lives on
    assert not os.path.exists(marks)


def die():
    os._exit(3)


def test_a_lost_dependency_ends_its_dependents_with_its_loss(ex):
    lost = ex.options(retries=0).submit(die)
    dependent = ex.submit(inc, lost)
    for fut in (lost, dependent):
        with pytest.raises(WorkerLostError):
            fut.result(timeout=60)
        assert fut.status == "lost"


def test_cancelling_a_queued_dependency_cancels_its_dependents(ex, tmp_path):
    gate, marks = str(tmp_path / "gate"), str(tmp_path / "marks")
    room = sum(agent["capacity"] for agent in ex.status()["agents"]) + 2
    blockers = [ex.submit(gated, gate, i) for i in range(room)]  # task processes and
    try:  # their prefetch are full: the next one stays queued
        dep = ex.submit(mark_then_inc, marks, 1)
        dependent = ex.submit(mark_then_inc, marks, dep)
        further = ex.submit(mark_then_inc, marks, [dependent])
        assert dep.cancel() is True
        for fut in (dependent, further):
            with pytest.raises(CancelledError):
                fut.result(timeout=60)
            assert fut.cancelled()
    finally:
        open(gate, "w").close()
    assert [f.result(timeout=60) for f in blockers] == list(range(room))
    assert not os.path.exists(marks)  # none of the three ran


def test_a_pure_task_counts_a_dependency_by_its_key(ex, tmp_path):
    """Equal pure calls on the same future share one key and run once; on another future
    they are another call; a pure call whose dependency failed fails again when submitted
    again (errors are not cached) with the dependency's error."""
    marks = str(tmp_path / "marks")
    pure = ex.options(pure=True)
    dep, other = ex.submit(inc, 1), ex.submit(inc, 1)
    first, again = (pure.submit(mark_then_inc, marks, dep) for _ in range(2))
    assert first.key == again.key != pure.submit(mark_then_inc, marks, other).key
    assert again.result(timeout=60) == first.result(timeout=60) == 3
    assert wait_until(lambda: ex.status()["tasks"]["queued"] == 0, timeout=30)
    with open(marks) as f:
        assert f.read().count("ran") == 2  # once on dep, once on other
    broken = ex.submit(fail, 5)
    for _ in range(2):
        with pytest.raises(ValueError, match="failed on 5"):
            pure.submit(mark_then_inc, marks, broken).result(timeout=60)


def test_a_future_of_another_broker_is_refused_at_submit(ex):
    with ZMQExecutor(1) as other:
        theirs = other.submit(inc, 1)
        for args in ((theirs,), ([{"x": theirs}],)):  # at any depth
            with pytest.raises(TypeError, match=r"belongs to another broker.*\.result\(\)"):
                ex.submit(inc, *args)
        assert theirs.result(timeout=60) == 2


def test_data_the_client_cannot_unpickle_passes_from_task_to_task(ex, monkeypatch):
    ex.wait_for_workers(2, timeout=60)  # (forked before the flag is set)
    monkeypatch.setattr(sys.modules[__name__], "IN_CLIENT", True)
    made = ex.submit(make_picky)
    assert ex.submit(is_picky, made).result(timeout=60) == "Picky"
    with pytest.raises(SerializationError, match="cannot be unpickled in the client"):
        made.result(timeout=60)


@contextlib.contextmanager
def big_dependency_waiting(tmp_path, max_held_bytes):
    """A remote client whose 8,000-byte result ``big`` a task waits for (behind a gate):
    yields (client, open_gate, waiter); the gate opens on the way out in any case."""
    cluster = Cluster(agents=1, nprocs=2, broker_args=("--max-held-bytes",
                                                       str(max_held_bytes)))
    gate = str(tmp_path / "gate")
    try:
        with ZMQExecutor(address=cluster.address) as client:
            big = client.submit(bytes, 8000)
            big.result(timeout=60)
            waiter = client.submit(add_len, client.submit(gated, gate, 0), big)
            del big
            gc.collect()
            try:
                yield client, lambda: open(gate, "w").close(), waiter
            finally:
                open(gate, "w").close()
    finally:
        cluster.close()


def test_a_dependency_is_kept_for_its_dependents_past_the_held_bytes_limit(tmp_path):
    """The broker drops the oldest held results beyond --max-held-bytes, but never one
    that a waiting task depends on, even when its client released it."""
    with big_dependency_waiting(tmp_path, 10000) as (client, open_gate, waiter):
        others = [client.submit(bytes, 3000) for _ in range(5)]  # over the limit
        assert all(len(f.result(timeout=60)) == 3000 for f in others)
        open_gate()
        assert waiter.result(timeout=60) == 8000


def test_pinned_results_past_the_held_limit_keep_new_submits_in_the_client(tmp_path):
    """Results that waiting tasks need cannot be evicted: past --max-held-bytes new
    submits wait in their client (submit does not block) until those tasks ran."""
    with big_dependency_waiting(tmp_path, 5000) as (client, open_gate, waiter):
        assert wait_until(lambda: client.status()["holding"], timeout=30)
        submitted = client.status()["tasks"]["submitted"]
        later = client.submit(inc, 1)
        assert client.status()["tasks"]["submitted"] == submitted  # kept in the client
        open_gate()
        assert waiter.result(timeout=60) == 8000
        assert later.result(timeout=60) == 2
        assert not client.status()["holding"]


def test_dependencies_in_remote_mode(cluster):
    with ZMQExecutor(address=cluster.address) as client:
        chain_and_fan_in(client, 10, 20)
        with pytest.raises(ValueError, match="failed on 2"):
            client.submit(inc, client.submit(fail, 2)).result(timeout=60)
        assert wait_until(lambda: client.status()["tasks"]["queued"] == 0, timeout=30)


def test_a_restarted_broker_ends_a_dependent_whose_finished_dependency_it_lost(tmp_path):
    """A broker restart loses the results it held: a waiting task whose dependency had
    finished ends with KeyLostError (it would wait forever), one whose dependency is still
    pending is submitted again with it and runs."""
    import signal

    cluster = Cluster(agents=1, nprocs=2, bind=f"tcp://127.0.0.1:{free_port()}")
    try:
        with ZMQExecutor(address=cluster.address) as client:
            gate = str(tmp_path / "gate")
            done = client.submit(inc, 1)
            assert done.result(timeout=60) == 2
            # An agent keeps a result until the broker's heartbeat (every second)
            # acknowledges it, and gives it again to a restarted broker; nothing reports
            # the acknowledgement, so wait for two heartbeats: then the result is gone.
            time.sleep(2.5)
            pending = client.submit(gated, gate, 10)
            orphan = client.submit(add, pending, done)  # waits for the gate
            lives = client.submit(inc, pending)
            cluster.broker.send_signal(signal.SIGKILL)
            cluster.broker.wait()
            cluster.broker = cluster.start_broker()
            open(gate, "w").close()
            with pytest.raises(KeyLostError, match="submit both again"):
                orphan.result(timeout=60)
            assert lives.result(timeout=60) == 11
    finally:
        cluster.close()
