"""No reference to a submitted callable beyond its tasks: a bound method holds its object,
and ProcessPoolExecutor lets that object go once the call is submitted and done."""
from __future__ import annotations

import gc
import threading
import weakref

from conftest import wait_until
from zmqexec import ZMQExecutor

TIMEOUT = 30


class Holder:
    def __init__(self, n: int) -> None:
        self.n = n
        self.payload = bytearray(1000)

    def method(self) -> int:
        return self.n


def test_a_submitted_bound_method_does_not_keep_its_object_alive(executor):
    """CPython's test_no_stale_references, on a zmqexec executor."""
    obj = Holder(1)
    collected = threading.Event()
    ref = weakref.ref(obj, lambda _: collected.set())
    fut = executor.submit(obj.method)
    del obj
    assert collected.wait(TIMEOUT), gc.get_referrers(ref())
    assert fut.result(timeout=TIMEOUT) == 1


def test_three_thousand_bound_methods_leave_nothing_behind():
    with ZMQExecutor(2) as ex:
        objects = [Holder(i) for i in range(3000)]
        refs = [weakref.ref(o) for o in objects]
        futures = [ex.submit(o.method) for o in objects]
        assert [f.result(timeout=TIMEOUT) for f in futures] == list(range(3000))
        del objects, futures
        gc.collect()
        assert wait_until(lambda: not any(r() is not None for r in refs), timeout=TIMEOUT)
        assert len(ex._functions) < 10  # (the executor's cache of pickled functions)
        assert list(ex._blobs) == []  # (no initializer: nothing is kept by id)


def test_a_function_is_still_pickled_once_while_it_lives(executor):
    def task(x):
        return x + 1

    before = len(executor._functions)
    assert list(executor.map(task, range(100))) == list(range(1, 101))
    assert len(executor._functions) == before + 1
    del task
    gc.collect()
    assert wait_until(lambda: len(executor._functions) == before, timeout=TIMEOUT)
