"""Variable and Queue: values and futures shared by name between the programs of a broker.

The other program is a real process joining this test's embedded cluster (or a broker
started by the command line) through its address.
"""
import concurrent.futures
import os
import subprocess
import sys
import textwrap
import time

import pytest

import zmqexec
from conftest import Cluster
from zmqexec import Queue, Variable, ZMQExecutor

HERE = os.path.dirname(os.path.abspath(__file__))


def inc(x):
    return x + 1


def slow_square(x):
    time.sleep(0.3)
    return x * x


@pytest.fixture(scope="module")
def ex():
    with ZMQExecutor(2) as executor:
        yield executor


def other_program(address, body, *, wait=True):
    """Run ``body`` in another process as a client of ``address``, with ``ex``, ``Queue``
    and ``Variable`` at hand; return the process (finished if ``wait``)."""
    code = textwrap.dedent("""
        import os, sys, time
        sys.path.insert(0, {here!r})
        from test_shared import inc, slow_square
        from zmqexec import Queue, Variable, ZMQExecutor
        ex = ZMQExecutor(address={address!r})
    """).format(here=HERE, address=address) + textwrap.dedent(body)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        proc.output = out.splitlines()
    return proc


def test_a_variable_set_before_and_after_the_other_program_gets_it(ex):
    Variable("before", client=ex).set({"a": 1})
    proc = other_program(ex.address, """
        print(Variable("before").get(timeout=30))
        print("waiting", flush=True)
        print(Variable("after").get(timeout=30))
        ex.shutdown()
    """, wait=False)
    assert proc.stdout.readline().strip() == "{'a': 1}"
    assert proc.stdout.readline().strip() == "waiting"  # then it waits at the broker
    Variable("after", client=ex).set([1, 2, 3])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "[1, 2, 3]"


def test_a_variable_holds_a_future_for_another_program(ex):
    var = Variable(client=ex)
    var.set(ex.submit(inc, 41))
    proc = other_program(ex.address, f"""
        fut = Variable({var.name!r}).get(timeout=30)
        print(type(fut).__name__, fut.result(timeout=30))
        ex.shutdown()
    """)
    assert proc.output == ["Future 42"]
    var.delete()


def test_get_times_out_with_the_builtin_timeout_error_and_delete_unsets(ex):
    var = Variable("unset", client=ex)
    started = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        var.get(timeout=0.2)
    assert time.monotonic() - started >= 0.2
    assert isinstance(info.value, concurrent.futures.TimeoutError)
    var.set(1)
    assert var.get(timeout=0) == 1
    var.delete()
    with pytest.raises(TimeoutError):
        var.get(timeout=0)


def test_a_queue_is_fifo_across_programs_and_waits_for_items(ex):
    queue = Queue("fifo", client=ex)
    for i in range(5):
        queue.put(i)
    proc = other_program(ex.address, """
        q = Queue("fifo")
        print([q.get(timeout=30) for _ in range(5)])
        print(q.get(timeout=30, batch=2))
        ex.shutdown()
    """, wait=False)
    assert wait_for_size(queue, 0)
    queue.put("late-1")
    queue.put("late-2")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["[0, 1, 2, 3, 4]", "['late-1', 'late-2']"]


def wait_for_size(queue, size, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if queue.qsize() == size:
            return True
        time.sleep(0.02)
    return False


def test_batch_true_takes_what_is_queued_now_and_a_full_queue_makes_put_wait(ex):
    queue = Queue("bounded", client=ex, maxsize=2)
    queue.put("a")
    queue.put("b")
    with pytest.raises(TimeoutError):
        queue.put("c", timeout=0.1)  # full: it waited, then nothing was queued
    assert queue.qsize() == 2
    assert queue.get(batch=True) == ["a", "b"]
    assert queue.get(batch=True) == []
    with pytest.raises(TimeoutError):
        queue.get(timeout=0.1)


def test_futures_in_a_queue_outlive_the_program_that_submitted_them(ex):
    proc = other_program(ex.address, """
        q = Queue("jobs")
        for x in range(3):
            q.put(ex.submit(slow_square, x))
        print("queued", flush=True)
        os._exit(0)  # gone at once: no goodbye, tasks still running
    """)
    assert proc.output == ["queued"]
    queue = Queue("jobs", client=ex)
    futures = [queue.get(timeout=30) for _ in range(3)]
    assert [f.result(timeout=30) for f in futures] == [0, 1, 4]
    proc = other_program(ex.address, """
        Queue("jobs2").put(ex.submit(inc, 1))
        ex.shutdown()  # a normal exit: its own interest in the key goes
    """)
    assert Queue("jobs2", client=ex).get(timeout=30).result(timeout=30) == 2


def test_values_are_checked_before_they_leave(ex):
    with pytest.raises(ValueError, match="submit a task that returns it"):
        Variable("big", client=ex).set(b"x" * (2 << 20))
    with pytest.raises(TypeError, match="not a zmqexec Future"):
        Queue("q", client=ex).put(concurrent.futures.Future())
    with pytest.raises(ValueError, match="batch"):
        Queue("q", client=ex).get(batch=0)


def test_status_counts_variables_and_queues(ex):
    Variable("counted", client=ex).set(1)
    Queue("counted-q", client=ex).put(1)
    shared = ex.status()["shared"]
    assert shared["variables"] >= 1 and shared["queues"] >= 1
    assert shared["queued_items"] >= 1


def test_variable_and_queue_of_a_broker_started_by_the_command_line(tmp_path):
    cluster = Cluster(agents=1, nprocs=1)
    try:
        with ZMQExecutor(address=cluster.address) as client:
            Variable("remote", client=client).set(client.submit(inc, 1))
            proc = other_program(cluster.address, """
                print(Variable("remote").get(timeout=30).result(timeout=30))
                Queue("back").put("thanks")
                ex.shutdown()
            """)
            assert proc.output == ["2"]
            assert Queue("back", client=client).get(timeout=30) == "thanks"
            held = zmqexec.Variable("remote", client=client).get(timeout=5)
            assert held.result(timeout=30) == 2
    finally:
        cluster.close()
