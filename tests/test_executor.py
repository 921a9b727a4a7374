"""ZMQExecutor keeps the concurrent.futures contract on the embedded default."""
from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest
from gates import wait_for_file
from conftest import alive, descendants, wait_until

import zmqexec
from zmqexec import InitializerError, ZMQExecutor, ZMQExecutorView
from zmqexec.agent.zygote import shared_root_pid


class Box:
    """A weak-referenceable result."""

    def __init__(self, value):
        self.value = value


def make_box(x):
    return Box(x)


def add(a, b):
    return a + b


def sleep_return(seconds, value=None):
    time.sleep(seconds)
    return value


def append_line(path, text):
    with open(path, "a") as f:
        f.write(f"{text}\n")
    return text


def set_env(name, value):
    os.environ[name] = value


def get_env(name):
    return os.environ.get(name)


def fail(message):
    raise ValueError(message)


def test_submit_returns_a_zmqexec_future_with_the_result(executor):
    fut = executor.submit(add, 2, b=3)
    assert isinstance(fut, zmqexec.Future) and isinstance(fut, cf.Future)
    assert fut.result(timeout=30) == 5
    assert fut.status == "finished"


def test_map_yields_results_in_order(executor):
    assert list(executor.map(add, range(50), range(50), timeout=30)) == [2 * i for i in range(50)]


def test_map_with_chunksize_sends_one_task_per_chunk(executor):
    before = executor.status()["tasks"]["submitted"]
    assert list(executor.map(add, range(100), range(100), chunksize=30, timeout=30)) == [
        2 * i for i in range(100)]
    assert executor.status()["tasks"]["submitted"] - before == 4


def test_map_rejects_bad_chunksize_and_buffersize(executor):
    with pytest.raises(ValueError, match="chunksize"):
        executor.map(add, [1], [2], chunksize=0)
    with pytest.raises(ValueError, match="buffersize"):
        executor.map(add, [1], [2], buffersize=0)


def test_map_timeout_counts_from_the_call(executor):
    executor.wait_for_workers(2, timeout=30)
    results = executor.map(sleep_return, [0.01, 3.0], timeout=1.5)
    assert next(results) is None
    with pytest.raises(cf.TimeoutError):
        next(results)


def idle(executor):
    tasks = executor.status()["tasks"]
    return tasks["running"] == 0 and tasks["queued"] == 0


def gated_append(gate, path, text, started=None):
    if started:
        append_line(started, text)
    wait_for_file(gate, timeout=120)  # (the tests open the gate; this bound outlasts theirs)
    return append_line(path, text)


def test_closing_the_map_iterator_cancels_the_rest(executor, tmp_path):
    gate, ran, started = tmp_path / "gate", tmp_path / "ran", tmp_path / "started"
    # short tasks first: the agent then hands each task process several tasks at once,
    # so cancelled ones also wait in a task process's batch, behind a running one
    assert sum(executor.map(add, range(20_000), range(20_000), timeout=60)) > 0
    assert wait_until(lambda: idle(executor), timeout=30)  # both workers free
    before = executor.status()["tasks"]
    results = executor.map(gated_append, [str(gate)] * 10, [str(ran)] * 10, range(10),
                           [str(started)] * 10)
    try:
        assert wait_until(lambda: started.exists() and
                          len(started.read_text().split()) == 2, timeout=30)
        results.close()
        # all but the two running on the blocked workers: queued and prefetched ones
        assert wait_until(lambda: executor.status()["tasks"]["cancelled"] -
                          before["cancelled"] == 8, timeout=30)
    finally:
        gate.touch()
    assert wait_until(lambda: executor.status()["tasks"]["running"] == 0, timeout=30)
    assert len(ran.read_text().split()) == 2


def test_map_with_buffersize_keeps_at_most_that_many_submitted(executor):
    before = executor.status()["tasks"]["submitted"]
    results = executor.map(add, range(1000), range(1000), buffersize=5)
    assert executor.status()["tasks"]["submitted"] - before == 5
    assert [next(results) for _ in range(3)] == [0, 2, 4]
    assert executor.status()["tasks"]["submitted"] - before == 8
    assert sum(results) == sum(2 * i for i in range(3, 1000))


def test_map_does_not_keep_yielded_results_alive(executor):
    results = executor.map(make_box, range(3), timeout=30)
    box = next(results)
    ref = weakref.ref(box)
    del box
    gc.collect()  # the future goes; its held outcome is dropped by the I/O thread soon after
    assert wait_until(lambda: ref() is None, timeout=10)
    assert [b.value for b in results] == [1, 2]


def test_max_workers_must_be_positive():
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        ZMQExecutor(0)


def test_submit_after_shutdown_raises_the_stdlib_error():
    ex = ZMQExecutor(1)
    ex.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.submit(add, 1, 2)


def test_shutdown_cancel_futures_notifies_every_waiter(tmp_path):
    ex = ZMQExecutor(1)
    gate = tmp_path / "gate"
    running = ex.submit(wait_for_file, str(gate), "ran")
    assert wait_until(running.running, timeout=30)
    pending = [ex.submit(add, i, i) for i in range(20)]
    waiter = threading.Thread(target=cf.wait, args=(pending,))
    waiter.start()
    ex.shutdown(wait=False, cancel_futures=True)
    waiter.join(30)
    assert not waiter.is_alive()
    assert all(f.cancelled() for f in pending)
    gate.touch()
    assert running.result(timeout=30) == "ran"
    ex.shutdown(wait=True)


def test_with_block_waits_for_submitted_work(tmp_path):
    out = tmp_path / "out"
    with ZMQExecutor(2) as ex:
        futures = [ex.submit(append_line, str(out), i) for i in range(10)]
    assert all(f.done() for f in futures)
    assert len(out.read_text().splitlines()) == 10


def test_positional_arguments_match_process_pool_executor():
    import multiprocessing

    with ZMQExecutor(1, multiprocessing.get_context("spawn"), set_env,
                     ("ZMQEXEC_TEST_INIT", "yes")) as ex:
        assert ex.submit(get_env, "ZMQEXEC_TEST_INIT").result(timeout=60) == "yes"


def test_a_failing_initializer_breaks_the_executor():
    ex = ZMQExecutor(1, initializer=fail, initargs=("no init",))
    fut = ex.submit(add, 1, 2)
    with pytest.raises(InitializerError, match="no init"):
        fut.result(timeout=30)
    with pytest.raises(InitializerError):
        ex.submit(add, 1, 2)
    ex.shutdown()


def test_options_view_chains_and_its_shutdown_does_nothing(executor):
    view = executor.options(priority=1).options(key="opt-view", priority=5)
    assert isinstance(view, ZMQExecutorView) and isinstance(view, cf.Executor)
    assert view._opts == {"key": "opt-view", "priority": 5}
    fut = view.submit(add, 1, 1)
    view.shutdown()
    assert fut.key == "opt-view" and fut.result(timeout=30) == 2
    assert executor.submit(add, 2, 2).result(timeout=30) == 4


def test_map_on_a_view_uses_the_key_as_a_prefix(executor):
    futures = []
    view = executor.options(key="mapped")
    original = view._executor._submit

    def spy(fn, args, kwargs, opts):
        futures.append(original(fn, args, kwargs, opts))
        return futures[-1]

    view._executor._submit = spy
    try:
        assert list(view.map(add, [1, 2], [3, 4], timeout=30)) == [4, 6]
    finally:
        del view._executor._submit
    assert [f.key for f in futures] == ["mapped-0", "mapped-1"]


def test_priority_runs_higher_first_among_queued_tasks(tmp_path):
    log, gate = tmp_path / "order", tmp_path / "gate"
    with ZMQExecutor(1) as ex:
        ex.wait_for_workers(1, timeout=30)
        blocker = ex.submit(wait_for_file, str(gate))
        # the worker holds a few tasks beyond the running one: fill those places first
        fillers = ex.status()["agents"][0]["capacity"] - 1
        filled = [ex.submit(append_line, str(log), "filler") for _ in range(fillers)]
        assert wait_until(lambda: ex.status()["agents"][0]["prefetched"] +
                          ex.status()["agents"][0]["running"] == fillers + 1, timeout=30)
        low = [ex.options(priority=0).submit(append_line, str(log), f"low{i}") for i in range(3)]
        high = [ex.options(priority=9).submit(append_line, str(log), f"high{i}")
                for i in range(3)]
        assert wait_until(lambda: ex.status()["tasks"]["queued"] >= 6 + fillers, timeout=30)
        gate.touch()
        cf.wait([blocker, *filled, *low, *high], timeout=60)
    order = log.read_text().split()
    assert order[fillers:] == ["high0", "high1", "high2", "low0", "low1", "low2"]


def test_the_credit_window_grows_for_short_tasks_and_shrinks_for_long_ones():
    with ZMQExecutor(2) as ex:
        ex.wait_for_workers(1, timeout=30)
        start = ex.status()["agents"][0]["capacity"]
        cf.wait([ex.submit(add, i, 1) for i in range(3000)], timeout=60)
        grown = ex.status()["agents"][0]["capacity"]
        cf.wait([ex.submit(sleep_return, 0.03) for _ in range(40)], timeout=60)
        shrunk = ex.status()["agents"][0]["capacity"]
    assert start == 2 + 2 * 4  # slots plus the starting prefetch of 4 per slot
    assert grown >= 2 + 2 * 32, grown  # short tasks: tens per slot, so batches are large
    assert shrunk <= 2 + 2 * 2, shrunk  # 30 ms tasks: about one queued per slot


def test_gather_raises_the_first_error_in_input_order(executor):
    futures = [executor.submit(sleep_return, 0.3, "slow"),
               executor.submit(fail, "second"), executor.submit(fail, "third")]
    with pytest.raises(ValueError, match="second"):
        executor.gather(futures, timeout=30)
    assert executor.gather([executor.submit(add, 1, 1)], timeout=30) == [2]


def test_a_discarded_future_still_runs_and_fires_its_callback(executor):
    fired = threading.Event()
    executor.submit(add, 1, 2).add_done_callback(lambda f: fired.set())
    gc.collect()
    assert fired.wait(30)


def test_a_foreign_future_argument_is_refused_with_advice(executor):
    foreign = cf.Future()
    for args in ((foreign, 1), ([1, {"x": foreign}], 1)):  # at any depth
        with pytest.raises(TypeError, match=r"not a zmqexec Future.*\.result\(\)"):
            executor.submit(add, *args)


def test_introspection_reports_address_workers_and_status(executor):
    executor.wait_for_workers(2, timeout=30)
    assert executor._max_workers == 2
    assert executor.address.startswith("ipc://")
    status = executor.status()
    assert status["slots"] == 2 and len(status["agents"]) == 1
    assert set(status["tasks"]) >= {"queued", "running", "finished", "error", "cancelled",
                                    "lost"}
    text = repr(executor)
    assert "embedded" in text and "workers=2" in text and "pending=" in text


def test_shutdown_wait_from_a_callback_raises(executor, tmp_path):
    errors = []
    done = threading.Event()

    def callback(_):
        try:
            executor.shutdown(wait=True)
        except RuntimeError as exc:
            errors.append(exc)
        done.set()

    held = executor.submit(wait_for_file, str(tmp_path / "gate"))
    held.add_done_callback(callback)  # before it completes: it runs on the completion thread
    (tmp_path / "gate").touch()
    assert done.wait(30)
    assert errors and "callback" in str(errors[0])


def test_a_forked_child_gets_a_clear_error(executor):
    pid = os.fork()
    if pid == 0:
        try:
            executor.submit(add, 1, 2)
        except RuntimeError as exc:
            os._exit(0 if "forked child" in str(exc) else 1)
        os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def meet(directory, n, timeout=15.0):
    """Hold until ``n`` of these run at once, each in a task process of its own (a file per
    process); return our pid. Never ``n`` processes at once: it gives up and returns."""
    open(os.path.join(directory, str(os.getpid())), "w").close()
    end = time.monotonic() + timeout
    while len(os.listdir(directory)) < n and time.monotonic() < end:
        time.sleep(0.005)
    return os.getpid()


def pids_running_at_once(executor, directory, n=2):
    os.mkdir(directory)
    futures = [executor.submit(meet, str(directory), n) for _ in range(n)]
    return {f.result(timeout=60) for f in futures}


def test_a_dead_task_process_is_replaced(executor, tmp_path):
    before = pids_running_at_once(executor, tmp_path / "before")
    assert len(before) == 2, before  # both task processes of the executor
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    # two task processes again, neither of them the dead one: one is its replacement
    after = pids_running_at_once(executor, tmp_path / "after")
    assert len(after) == 2 and victim not in after, (before, after)
    assert len(after - before) == 1, (before, after)


EXIT_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from zmqexec import ZMQExecutor
    def slow(path, x):
        time.sleep(0.2)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"done {{x}}\\n".encode())
        os.close(fd)
    ex = ZMQExecutor(2)
    for i in range(4):
        ex.submit(slow, sys.argv[1], i)
    {tail}
""")


def run_exit_script(tmp_path, tail=""):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT.format(tail=tail), str(out)],
                       capture_output=True, text=True, timeout=60)
    return proc, sorted(out.read_text().splitlines()) if out.exists() else []


def test_interpreter_exit_finishes_submitted_work_silently(tmp_path):
    proc, lines = run_exit_script(tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    assert lines == [f"done {i}" for i in range(4)]


def test_shutdown_without_wait_does_not_hang_the_exit(tmp_path):
    proc, lines = run_exit_script(tmp_path, "ex.shutdown(wait=False)")
    assert proc.returncode == 0 and proc.stderr == ""
    assert lines == [f"done {i}" for i in range(4)]


def test_submit_from_atexit_raises_runtime_error(tmp_path):
    tail = textwrap.dedent("""
    import atexit
    def late():
        try:
            ex.submit(print, "never")
        except RuntimeError as exc:
            print("refused:", exc)
    atexit.register(late)
    """)
    proc, _ = run_exit_script(tmp_path, tail)
    assert "refused: cannot schedule new futures after" in proc.stdout, proc.stderr


def test_no_process_outlives_a_sigkilled_client():
    code = textwrap.dedent("""
        import os, sys, time
        sys.path.insert(0, "tests")
        from conftest import descendants
        from zmqexec import ZMQExecutor
        ex = ZMQExecutor(2)
        ex.wait_for_workers(2, timeout=30)
        fut = ex.submit(time.sleep, 60)
        while ex.status()["tasks"]["running"] < 1:
            time.sleep(0.01)
        print(" ".join(map(str, descendants(os.getpid()))), flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 4, pids  # broker, agent, two task processes
    proc.kill()
    proc.wait()
    proc.stdout.close()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    assert wait_until(lambda: not any(alive(p) for p in pids), timeout=15)
    assert not descendants(proc.pid)


def test_no_process_outlives_a_sigkilled_client_whose_fork_lives_on():
    """A process forked from the client after its zygotes started (a process pool's
    worker, say) holds the client's end of their control sockets: the zygotes and task
    processes still go when the client does."""
    code = textwrap.dedent("""
        import os, sys, time
        sys.path.insert(0, "tests")
        from conftest import descendants
        from zmqexec import ZMQExecutor
        ex = ZMQExecutor(2)
        ex.wait_for_workers(2, timeout=30)
        fut = ex.submit(time.sleep, 60)
        while ex.status()["tasks"]["running"] < 1:
            time.sleep(0.01)
        ours = descendants(os.getpid())
        child = os.fork()
        if child == 0:
            time.sleep(120)
            os._exit(0)
        print(child, " ".join(map(str, ours)), flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    child, *pids = [int(p) for p in proc.stdout.readline().split()]
    try:
        assert len(pids) == 4, pids  # root zygote, zygote, two task processes
        proc.kill()
        proc.wait()
        assert wait_until(lambda: not any(alive(p) for p in pids), timeout=15)
        assert alive(child)  # (it held their sockets all along)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        os.kill(child, signal.SIGKILL)


def test_done_futures_and_their_results_are_not_kept_by_the_executor(executor):
    fut = executor.submit(make_box, 1)
    box_ref = weakref.ref(fut.result(timeout=30))
    fut_ref = weakref.ref(fut)
    del fut
    gc.collect()
    assert fut_ref() is None
    assert wait_until(lambda: box_ref() is None, timeout=10)


def mark_then_wait(log, gate, value):
    with open(log, "a") as f:
        f.write("run\n")
    return wait_for_file(gate, value, 60)


def test_the_embedded_cluster_starts_no_broker_or_agent_process(tmp_path):
    """The node is a thread: the client's descendants are its task processes and the
    zygotes that fork them (at most two helpers), none of them a zmqexec command."""
    before = set(descendants(os.getpid()))
    with ZMQExecutor(2) as ex:
        assert ex.submit(add, 1, 2).result(timeout=30) == 3
        ours = set(descendants(os.getpid())) - before
        task_pids = set(ex._io.processes)
        assert len(task_pids) == 2 and task_pids <= ours
        helpers = ours - task_pids
        assert 1 <= len(helpers) <= 2, helpers
        for pid in ours:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"zmqexec broker" not in f.read().replace(b"\0", b" ")
    root = {shared_root_pid()}  # the process's shared root zygote stays for later executors
    assert wait_until(lambda: not set(descendants(os.getpid())) - before - root, timeout=10)


def test_a_killed_zygote_is_replaced_and_the_running_task_runs_again(tmp_path):
    ran = tmp_path / "ran"
    with ZMQExecutor(1) as ex:
        gate = tmp_path / "gate"
        fut = ex.submit(gated_append, str(gate), str(ran), "x")
        assert wait_until(fut.running, timeout=30)
        old, running = ex._io.zygote.pid, set(ex._io.processes)
        os.kill(old, signal.SIGKILL)
        # a new zygote, and new task processes: the old ones died with their zygote
        assert wait_until(lambda: ex._io.zygote.pid != old and ex._io.processes and
                          not running & set(ex._io.processes), timeout=30)
        gate.touch()
        assert fut.result(timeout=30) == "x"  # run again on a new task process
        assert ex.submit(add, 2, 3).result(timeout=30) == 5


def describe_payload(data):
    import numpy

    if isinstance(data, numpy.ndarray):
        data[0] = 1  # writable, as with ProcessPoolExecutor
        return type(data).__name__, int(data.sum()), data.flags.writeable
    return type(data).__name__, len(data), hashlib_digest(data)


def hashlib_digest(data):
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_large_buffers_arrive_intact_out_of_band(executor):
    import numpy

    blob = os.urandom(3 << 20)
    array = numpy.zeros(1 << 20, dtype=numpy.uint8)
    assert executor.submit(describe_payload, blob).result(timeout=60) == (
        "bytes", len(blob), hashlib_digest(blob))
    assert executor.submit(describe_payload, array).result(timeout=60) == ("ndarray", 1, True)


def gated_sum(gate, array):
    wait_for_file(gate)
    return int(array.sum())


def test_changing_an_array_after_submit_does_not_change_the_task(executor, tmp_path):
    import numpy

    array = numpy.ones(2 << 20, dtype=numpy.uint8)
    fut = executor.submit(gated_sum, str(tmp_path / "gate"), array)
    array[:] = 0
    (tmp_path / "gate").touch()
    assert fut.result(timeout=60) == 2 << 20


def sum_and_pid(array):
    return int(array.sum()), os.getpid()


def die_on_first_attempt(marker, array):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return int(array.sum())


def test_large_arguments_go_through_shared_memory_files_freed_with_the_future(tmp_path):
    import numpy

    with ZMQExecutor(1) as ex:
        spill_dir = ex._io.spill.dir
        gate = tmp_path / "gate"
        fut = ex.submit(gated_sum, str(gate), numpy.ones(2 << 20, dtype=numpy.uint8))
        assert len(os.listdir(spill_dir)) == 1  # written at submit: the snapshot
        gate.touch()
        assert fut.result(timeout=60) == 2 << 20
        del fut
        gc.collect()
        assert wait_until(lambda: os.listdir(spill_dir) == [], timeout=10)
        # a retried task finds its file again
        fut = ex.submit(die_on_first_attempt, str(tmp_path / "marker"),
                        numpy.ones(1 << 20, dtype=numpy.uint8))
        assert fut.result(timeout=60) == 1 << 20
        # without the directory (say /dev/shm is full) large arguments travel as frames
        shutil.rmtree(spill_dir)
        array = numpy.full(1 << 20, 3, dtype=numpy.uint8)
        fut = ex.submit(sum_and_pid, array)
        array[:] = 0  # the frame was copied at submit, as the file would have been
        assert fut.result(timeout=60)[0] == 3 << 20
    assert not os.path.exists(spill_dir)


KILLED_CLIENT = textwrap.dedent("""
    import os, signal, numpy
    from zmqexec import ZMQExecutor
    ex = ZMQExecutor(1)
    ex.submit(pow, 2, 2).result(timeout=30)
    ex.submit(len, numpy.ones(1 << 21, dtype=numpy.uint8))
    print(ex._io.dir, ex._io.spill.dir, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_client_leaves_no_directories_behind():
    proc = subprocess.run([sys.executable, "-c", KILLED_CLIENT], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dirs = proc.stdout.split()
    assert len(dirs) == 2 and "spill" in dirs[1]
    assert wait_until(lambda: not any(os.path.exists(d) for d in dirs), timeout=15), dirs


def test_batches_of_long_keys_are_split_under_the_header_cap(executor):
    before = executor.status()
    futures = [executor.options(key=f"{'k' * 3000}-{i}").submit(add, i, 1) for i in range(400)]
    assert [f.result(timeout=60) for f in futures] == list(range(1, 401))
    del futures
    gc.collect()  # 400 releases in one batch of about 1.2 MB: split
    assert wait_until(lambda: executor.status()["held_keys"] == before["held_keys"],
                      timeout=30)
    assert executor.status()["dropped"] == before["dropped"]


def test_a_key_whose_futures_are_gone_can_be_submitted_again_at_once(executor):
    for i in range(50):
        future = executor.options(key="reused").submit(add, i, 0)
        assert future.result(timeout=30) == i  # never the previous run's result
        future = None  # the last future of the key: released before the next submit


FORKED_SPILL = textwrap.dedent("""
    import gc, os, sys, time, numpy
    sys.path.insert(0, {tests!r})
    from zmqexec import ZMQExecutor
    from test_executor import gated_sum
    gate = {gate!r}
    ex = ZMQExecutor(1)
    futs = [ex.submit(gated_sum, gate, numpy.ones(2 << 20, dtype=numpy.uint8))
            for _ in range(3)]
    while not futs[0].running():  # all sent: only the records hold the files now
        time.sleep(0.01)
    pid = os.fork()
    if pid == 0:  # the child's copies of the client's records are collected as it ends
        ex._client.records.clear()
        del futs, ex
        gc.collect()
        os._exit(0)
    os.waitpid(pid, 0)
    open(gate, "w").close()
    print(sum(f.result(timeout=30) for f in futs))
    ex.shutdown()
""")


def test_a_forked_child_leaves_the_parents_shared_memory_arguments_alone(tmp_path):
    code = FORKED_SPILL.format(tests=os.path.dirname(__file__), gate=str(tmp_path / "gate"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(3 * (2 << 20))


CTRL_C_AT_EXIT = textwrap.dedent("""
    import sys, time
    from zmqexec import ZMQExecutor
    ex = ZMQExecutor(2)
    futures = [ex.submit(time.sleep, 30) for _ in range(5)]
    while not all(f.running() for f in futures[:2]):
        time.sleep(0.01)
    print("running", flush=True)
    raise KeyboardInterrupt  # as a Ctrl-C while the program waits
""")


def test_after_a_ctrl_c_exit_says_what_it_waits_for_and_a_second_one_stops_it():
    """The first Ctrl-C leaves the program waiting for its tasks, as the stdlib's does;
    one line says so, and a second Ctrl-C ends it with nothing left behind."""
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_AT_EXIT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        lines = []
        for line in proc.stderr:  # the traceback of the first Ctrl-C, then the line
            lines.append(line)
            if "to finish before exiting" in line:
                break
        assert "waiting for 5 submitted tasks to finish before exiting; press Ctrl-C " \
               "again to stop them" in lines[-1], lines
        children = descendants(proc.pid)
        assert children  # the task processes still run the tasks
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert wait_until(lambda: not any(alive(pid) for pid in children), timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_an_executor_nobody_holds_is_shut_down():
    """As the stdlib's: once the executor and its futures are dropped, its node thread and
    task processes go (a pending future would hold it: its work is never abandoned)."""
    ex = ZMQExecutor(2)
    assert ex.submit(add, 1, 2).result(timeout=30) == 3
    node_thread = ex._io.io_thread
    zygote = ex._io.zygote.pid  # this executor's zygote and the task processes it forked
    processes = {zygote} | descendants(zygote)
    assert len(processes) == 3
    ref = weakref.ref(ex)
    del ex
    gc.collect()
    assert ref() is None
    node_thread.join(timeout=30)
    assert not node_thread.is_alive()
    assert wait_until(lambda: not any(alive(pid) for pid in processes), timeout=30)
