"""zmqexec.Future: keys, pure sharing, attach by key, release, status, await."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import gc
import re
import subprocess
import sys
import textwrap
import time
import weakref

import pytest
from gates import wait_for_file
from conftest import ROOT, wait_until

import zmqexec
from zmqexec import Future, KeyExistsError, RemoteTraceback, UnknownKeyError, ZMQExecutor


def add(a, b):
    return a + b


def count_call(path, value):
    with open(path, "a") as f:
        f.write("x")
    time.sleep(0.2)
    return value


class Adder:
    def __call__(self, a, b):
        return a + b


def raise_value_error(*args):
    raise ValueError(*args)


HEX32 = r"[0-9a-f]{32}"


def held_keys(ex):
    return ex.status()["held_keys"]


def test_default_keys_name_the_function(executor):
    cases = [(add, "add"), (lambda a, b: a + b, "lambda"),
             (functools.partial(add, 1), "add"), (Adder(), "Adder")]
    for fn, name in cases:
        args = (1,) if isinstance(fn, functools.partial) else (1, 2)
        fut = executor.submit(fn, *args)
        assert re.fullmatch(f"{name}-{HEX32}", fut.key), fut.key
        fut.result(timeout=30)


def test_pure_submissions_share_one_task_and_one_result(executor, tmp_path):
    calls = tmp_path / "calls"
    view = executor.options(pure=True)
    first = view.submit(count_call, str(calls), 7)
    second = view.submit(count_call, str(calls), 7)
    other = view.submit(count_call, str(calls), 8)
    assert first.key == second.key != other.key
    assert re.fullmatch(f"count_call-{HEX32}", first.key)
    assert [first.result(timeout=30), second.result(timeout=30), other.result(30)] == [7, 7, 8]
    assert calls.read_text() == "xx"
    third = view.submit(count_call, str(calls), 7)  # still held: no new run
    assert third.result(timeout=30) == 7 and calls.read_text() == "xx"


def test_pure_errors_are_not_cached(executor, tmp_path):
    view = executor.options(pure=True)
    first = view.submit(raise_value_error, "once")
    with pytest.raises(ValueError):
        first.result(timeout=30)
    second = view.submit(raise_value_error, "once")
    assert second.key == first.key
    with pytest.raises(ValueError):
        second.result(timeout=30)


def test_an_explicit_live_key_is_refused(executor):
    fut = executor.options(key="explicit-live").submit(add, 1, 2)
    with pytest.raises(KeyExistsError, match="pure=True"):
        executor.options(key="explicit-live").submit(add, 1, 2)
    assert fut.result(timeout=30) == 3
    shared = executor.options(key="explicit-live", pure=True).submit(add, 1, 2)
    assert shared.result(timeout=30) == 3


def test_tuple_keys_travel_and_show_in_repr(executor):
    fut = executor.options(key=("x", 1)).submit(add, 1, 1)
    assert fut.result(timeout=30) == 2
    assert fut.key == ("x", 1)
    assert repr(fut) == "<Future: status: finished, key: ('x', 1)>"
    with pytest.raises(TypeError, match="key"):
        executor.options(key=["not", "a", "tuple"]).submit(add, 1, 1)


def test_status_follows_the_life_of_a_task(executor, tmp_path):
    gate = tmp_path / "gate"
    fut = executor.submit(wait_for_file, str(gate), "ok")
    assert fut.status in ("pending", "running")
    assert wait_until(lambda: fut.status == "running", timeout=30)
    gate.touch()
    assert fut.result(timeout=30) == "ok" and fut.status == "finished"
    bad = executor.submit(raise_value_error, "x")
    cf.wait([bad], timeout=30)
    assert bad.status == "error"


def test_remote_exceptions_keep_type_args_and_traceback(executor):
    fut = executor.submit(raise_value_error, "bad", 42)
    with pytest.raises(ValueError) as info:
        fut.result(timeout=30)
    assert info.value.args == ("bad", 42)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_value_error" in str(cause) and "Traceback" in str(cause)


def test_attach_by_key_in_the_same_client_completes_together(executor, tmp_path):
    gate = tmp_path / "gate"
    fut = executor.options(key="attach-same").submit(wait_for_file, str(gate), "v")
    local = Future("attach-same", executor, inform=False)
    informed = Future("attach-same", executor)
    assert not local.done() and not informed.done()
    gate.touch()
    assert [f.result(timeout=30) for f in (fut, local, informed)] == ["v"] * 3


def test_inform_false_without_a_local_future_is_refused(executor):
    with pytest.raises(ValueError, match="inform=True"):
        Future("nobody-has-this", executor, inform=False)


def test_an_unknown_key_ends_in_unknown_key_error():
    with ZMQExecutor(1, attach_timeout=0.3) as ex:
        start = time.monotonic()
        fut = Future("never-submitted", ex)
        with pytest.raises(UnknownKeyError, match="never-submitted"):
            fut.result(timeout=30)
        assert time.monotonic() - start < 5


def test_an_attach_before_the_submit_waits_for_it(executor):
    early = Future("late-submit", executor)  # one ordered channel: its INFORM goes first
    fut = executor.options(key="late-submit").submit(add, 20, 22)
    assert early.result(timeout=30) == fut.result(timeout=30) == 42


ATTACH = textwrap.dedent("""
    import sys
    from zmqexec import Future, ZMQExecutor
    with ZMQExecutor(address=sys.argv[1]) as ex:
        fut = Future(sys.argv[2], ex)
        ex.status()  # answered after the INFORM before it: the broker knows we wait
        print("informed", flush=True)
        print(fut.result(timeout=60), flush=True)
""")


def attach_elsewhere(address, key):
    return subprocess.Popen([sys.executable, "-c", ATTACH, address, key],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)


def test_another_process_attaches_before_and_after_the_task_finished(executor, tmp_path):
    gate = tmp_path / "gate"
    fut = executor.options(key="shared-key").submit(wait_for_file, str(gate), "shared")
    before = attach_elsewhere(executor.address, "shared-key")
    assert before.stdout.readline().strip() == "informed"  # while the task still runs
    gate.touch()
    assert fut.result(timeout=30) == "shared"
    after = attach_elsewhere(executor.address, "shared-key")
    for proc in (before, after):
        out, err = proc.communicate(timeout=60)
        assert out.split()[-1] == "shared", err


def test_release_drops_the_held_result_and_needs_a_done_future(executor, tmp_path):
    gate = tmp_path / "gate"
    fut = executor.submit(wait_for_file, str(gate))
    with pytest.raises(cf.InvalidStateError):
        fut.release()
    gate.touch()
    fut.result(timeout=30)
    held = held_keys(executor)
    fut.release()
    assert wait_until(lambda: held_keys(executor) == held - 1, timeout=10)


def test_garbage_collecting_the_last_future_releases_the_key(executor):
    fut = executor.submit(add, 5, 5)
    fut.result(timeout=30)
    held = held_keys(executor)
    del fut
    gc.collect()
    assert wait_until(lambda: held_keys(executor) == held - 1, timeout=10)


def test_cancel_of_a_queued_task_means_it_never_runs(tmp_path):
    gate, calls = tmp_path / "gate", tmp_path / "calls"
    with ZMQExecutor(1) as ex:
        blocker = ex.submit(wait_for_file, str(gate))
        queued = [ex.submit(count_call, str(calls), i) for i in range(5)]
        assert all(f.cancel() for f in queued[1:])
        assert all(f.status == "cancelled" for f in queued[1:])
        done, _ = cf.wait(queued[1:], timeout=5)  # waiters see it at once
        assert len(done) == 4
        gate.touch()
        assert queued[0].result(timeout=30) == 0 and blocker.result(timeout=30) is None
    assert calls.read_text() == "x"


def test_await_and_asyncio_helpers_work(executor):
    async def main():
        direct = await executor.submit(add, 1, 2)
        wrapped = await asyncio.wrap_future(executor.submit(add, 3, 4))
        loop = asyncio.get_running_loop()
        via_loop = await loop.run_in_executor(executor, add, 5, 6)
        many = await asyncio.gather(*(executor.submit(add, i, i) for i in range(20)))
        return direct, wrapped, via_loop, many

    assert asyncio.run(asyncio.wait_for(main(), 60)) == (3, 7, 11, [2 * i for i in range(20)])


def test_future_without_a_running_executor_is_refused():
    import zmqexec.client.future as future_module

    saved = future_module._running[:]
    future_module._running.clear()
    try:
        with pytest.raises(ValueError, match="no running ZMQExecutor"):
            Future("k")
    finally:
        future_module._running[:] = saved


def test_future_defaults_to_the_most_recent_executor(executor):
    fut = executor.options(key="default-client").submit(add, 2, 2)
    fut.result(timeout=30)
    again = Future("default-client")
    assert again.client is executor and again.result(timeout=30) == 4
    assert isinstance(again, zmqexec.Future) and again.executor is executor


def test_a_refused_submit_does_not_poison_a_later_attach(tmp_path):
    gate = tmp_path / "gate"
    with ZMQExecutor(1) as owner, ZMQExecutor(address=owner.address) as other:
        fut = owner.options(key="taken").submit(wait_for_file, str(gate), "owner's")
        assert wait_until(fut.running, timeout=30)
        refused = other.options(key="taken").submit(add, 1, 2)
        with pytest.raises(KeyExistsError):
            refused.result(timeout=30)
        attached = Future("taken", other)
        gate.touch()
        assert attached.result(timeout=30) == fut.result(timeout=30) == "owner's"


def test_kill_of_a_finished_future_returns_false(executor):
    fut = executor.submit(add, 1, 1)
    fut.result(timeout=30)
    assert executor.kill(fut) is False


def test_a_waiter_that_times_out_leaves_the_result_to_later_waiters(executor, tmp_path):
    """result() completes the future in the waiting thread when it can; a waiter that gave
    up (timeout) must not take the result with it, nor strand callbacks and other waiters."""
    gate = str(tmp_path / "gate")
    fut = executor.submit(wait_for_file, gate, "done")
    with pytest.raises(cf.TimeoutError):
        fut.result(timeout=0.2)
    with pytest.raises(cf.TimeoutError):
        fut.exception(timeout=0.05)
    called = []
    fut.add_done_callback(lambda f: called.append(f.result()))
    waiting = [fut]
    done_iter = cf.as_completed(waiting, timeout=10)
    open(gate, "w").close()
    assert next(done_iter) is fut
    assert fut.result(timeout=10) == "done"
    assert fut.exception(timeout=0) is None
    assert called == ["done"]


def test_threads_waiting_on_one_key_all_get_its_result(executor, tmp_path):
    gate = str(tmp_path / "gate")
    fut = executor.options(key="shared-wait").submit(wait_for_file, gate, 42)
    same = Future("shared-wait", executor, inform=False)
    with cf.ThreadPoolExecutor(4) as pool:
        waits = [pool.submit(f.result, 10) for f in (fut, same, fut, same)]
        # one of them takes the result from the I/O thread, the others wait on the future
        assert wait_until(lambda: fut._kw in executor._client.awaited)
        open(gate, "w").close()
        assert [w.result(timeout=20) for w in waits] == [42, 42, 42, 42]


def test_a_result_waiter_sees_errors_and_cancels(executor, tmp_path):
    fut = executor.submit(raise_value_error, "bad")
    with pytest.raises(ValueError, match="bad"):
        fut.result(timeout=10)
    assert isinstance(fut.exception(timeout=0), ValueError)
    gate = str(tmp_path / "gate")
    blocker = [executor.submit(wait_for_file, gate) for _ in range(executor._max_workers)]
    queued = executor.submit(add, 1, 2)
    with cf.ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(queued.result, 10)
        assert wait_until(lambda: queued._kw in executor._client.awaited)
        assert queued.cancel()
        with pytest.raises(cf.CancelledError):
            waiter.result(timeout=10)
    open(gate, "w").close()
    assert [f.result(timeout=10) for f in blocker] == [None] * len(blocker)


def test_a_futures_condition_is_its_own_lock_one_object_for_the_collector(executor):
    """One object per future for its condition: the C re-entrant lock itself, with no
    dict (the stdlib's Condition is three: itself, its dict and its lock)."""
    import _thread

    fut = executor.submit(add, 1, 2)
    cond = fut._condition
    assert isinstance(cond, _thread.RLock) and not hasattr(cond, "__dict__"), type(cond)
    assert not any(gc.is_tracked(ref) for ref in gc.get_referents(cond)
                   if ref is not type(cond))
    assert fut.result(timeout=10) == 3


def test_a_held_future_keeps_no_waiter_or_callback_list_it_does_not_use(executor, tmp_path):
    """The stdlib gives each future two lists, for ``wait``/``as_completed`` waiters and
    for done callbacks; here they exist only while used, so a held done future costs the
    garbage collector one object.  A waiter that leaves keeps the others' wake-ups, and
    a cancelled future is freed as soon as it is dropped (no list holding it)."""
    def lists(fut):  # (the attributes are in a dict of their own up to 3.10)
        refs = gc.get_referents(fut)
        refs += [value for ref in refs if type(ref) is dict for value in ref.values()]
        return [ref for ref in refs if isinstance(ref, list)]

    def waiters(fut):  # (read under its condition, where wait() adds and removes them)
        with fut._condition:
            return len(fut._w or ())

    futs = [executor.submit(add, i, 1) for i in range(4)]
    assert all(not lists(f) for f in futs)
    done, _ = cf.wait(futs, timeout=10)
    assert len(done) == 4
    assert sorted(f.result(timeout=0) for f in cf.as_completed(futs, timeout=10)) == [1, 2, 3, 4]
    assert all(not lists(f) for f in futs), [lists(f) for f in futs]

    gate = tmp_path / "go"
    held = [executor.submit(wait_for_file, str(gate), n) for n in range(2)]  # both busy
    queued = executor.submit(add, 1, 2)
    called = []
    held[0].add_done_callback(lambda f: called.append(f.result(timeout=0)))
    with cf.ThreadPoolExecutor(1) as pool:
        patient = pool.submit(cf.wait, [held[0]], 30)  # waits on, while another gives up
        assert wait_until(lambda: waiters(held[0]) == 1)
        done, pending = cf.wait([held[0]], timeout=0.05)
        assert pending == {held[0]} and waiters(held[0]) == 1  # only its own waiter left
        assert queued.cancel() and not lists(queued)
        gone = weakref.ref(queued)
        gc.disable()
        try:
            del queued
            assert gone() is None  # freed by its last reference, not by the collector
        finally:
            gc.enable()
        gate.touch()
        assert patient.result(timeout=30)[0] == {held[0]}
    assert [f.result(timeout=10) for f in held] == [0, 1]
    assert wait_until(lambda: called == [0])  # (callbacks run after the waiters wake)
    assert lists(held[0]) == [held[0]._done_callbacks]  # kept after they ran, as the stdlib


def test_the_futures_lighter_condition_behaves_as_the_stdlib_one():
    from zmqexec.client.future import _Condition

    cond = _Condition()
    with pytest.raises(RuntimeError):
        cond.notify()  # not owned, as with threading.Condition
    with cond:
        assert cond.wait(0.01) is False  # a timeout, the first wait makes the deque
        with cond:  # reentrant, as the RLock of Future._condition is
            cond.notify_all()
    woken = []

    def waiter():
        with cond:
            woken.append(cond.wait_for(lambda: bool(woken) or False, timeout=10) or "late")

    with cf.ThreadPoolExecutor(2) as pool:
        waits = [pool.submit(waiter) for _ in range(2)]
        assert wait_until(lambda: len(cond._waiters) == 2)
        with cond:
            woken.append("go")
            cond.notify_all()
        for w in waits:
            w.result(timeout=10)
    assert woken[0] == "go" and woken[1:] == [True, True]
