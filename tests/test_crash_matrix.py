"""The crash matrix: every way a task can fail, at every stage of its life.

{raise, sys.exit, os._exit, SIGKILL, segfault} x {task unpickle on the worker, run,
result pickle on the worker, result unpickle on the client}.  Worker-side deaths are
retried and end in WorkerLostError; raises are task errors, never retried; cells that
would kill the client run in a subprocess client and must leave nothing behind.
"""
from __future__ import annotations

import os
import signal
import textwrap

import crashers
import gates
import pytest
from conftest import Cluster, alive, run_python, wait_until

from zmqexec import SerializationError, WorkerLostError, ZMQExecutor

DEATHS = ["os_exit", "sigkill", "segfault"]
EXIT_TEXT = {"os_exit": "exit code 9", "sigkill": "SIGKILL", "segfault": "SIGSEGV"}


@pytest.fixture(scope="module")
def ex():
    executor = ZMQExecutor(2, retries=1)
    yield executor
    executor.shutdown()


def submit_at(ex, stage, how):
    if stage == "task-unpickle":
        return ex.submit(crashers.identity, crashers.ActOnUnpickle(how))
    if stage == "run":
        return ex.submit(crashers.run, how)
    if stage == "result-pickle":
        return ex.submit(crashers.make, how, "ActOnPickle")
    return ex.submit(crashers.make, how, "ActOnUnpickle")


@pytest.mark.parametrize("stage", ["task-unpickle", "run"])
def test_a_raise_on_the_worker_is_the_tasks_error_with_a_remote_traceback(ex, stage):
    fut = submit_at(ex, stage, "raise")
    with pytest.raises(crashers.Boom) as info:
        fut.result(timeout=30)
    assert "act" in str(info.value.__cause__)
    assert fut.status == "error"


@pytest.mark.parametrize("stage", ["task-unpickle", "run"])
def test_sys_exit_on_the_worker_is_re_raised_as_system_exit(ex, stage):
    fut = submit_at(ex, stage, "exit")
    with pytest.raises(SystemExit) as info:
        fut.result(timeout=30)
    assert info.value.code == 7


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_failure_while_pickling_the_result_is_a_serialization_error(ex, how):
    fut = submit_at(ex, "result-pickle", how)
    with pytest.raises(SerializationError, match="cannot pickle the result"):
        fut.result(timeout=30)


@pytest.mark.parametrize("how", DEATHS)
@pytest.mark.parametrize("stage", ["task-unpickle", "run", "result-pickle"])
def test_a_worker_death_is_retried_then_ends_in_worker_lost_error(ex, stage, how):
    fut = submit_at(ex, stage, how)
    with pytest.raises(WorkerLostError) as info:
        fut.result(timeout=60)
    err = info.value
    assert err.attempts == 2 and err.key == fut.key and EXIT_TEXT[how] in err.exit
    assert fut.status == "lost"
    # the cluster replaced the dead processes and still serves other work
    assert ex.submit(pow, 2, 5).result(timeout=30) == 32


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_failure_while_unpickling_on_the_client_fails_only_that_future(ex, how):
    fut = submit_at(ex, "result-unpickle", how)
    with pytest.raises(SerializationError, match="cannot unpickle"):
        fut.result(timeout=30)
    assert ex.submit(pow, 3, 2).result(timeout=30) == 9


CLIENT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, "tests")
    import crashers
    from conftest import descendants
    from zmqexec import ZMQExecutor
    ex = ZMQExecutor({args})
    ex.wait_for_workers(1, timeout=30)
    print(" ".join(map(str, sorted(descendants(os.getpid())))), flush=True)
    ex.submit(crashers.make, {how!r}, "ActOnUnpickle").result(timeout=30)
    print("survived", flush=True)
""")
CLIENT_EXIT = {"os_exit": 9, "sigkill": -signal.SIGKILL, "segfault": -signal.SIGSEGV}


@pytest.mark.parametrize("how", DEATHS)
def test_a_death_while_unpickling_on_the_client_orphans_nothing(how):
    proc = run_python(CLIENT.format(how=how, args="1"), timeout=60)
    assert proc.returncode == CLIENT_EXIT[how], proc.stderr
    assert "survived" not in proc.stdout
    pids = [int(p) for p in proc.stdout.splitlines()[0].split()]
    assert len(pids) >= 3, proc.stdout  # broker, agent, task process
    assert wait_until(lambda: not any(alive(p) for p in pids), timeout=15), pids


@pytest.mark.parametrize("how", DEATHS)
def test_a_client_dying_while_unpickling_leaves_other_clients_unaffected(how):
    # remote agents import the task's module like any other: put tests/ on their path
    env = dict(os.environ, PYTHONPATH=os.path.dirname(crashers.__file__))
    cluster = Cluster(agents=1, nprocs=2, env=env)
    try:
        with ZMQExecutor(address=cluster.address) as other:
            other.wait_for_workers(2, timeout=30)
            proc = run_python(CLIENT.format(how=how, args=f"address={cluster.address!r}"))
            assert proc.returncode == CLIENT_EXIT[how], proc.stderr
            assert list(other.map(pow, range(20), [2] * 20, timeout=30)) == [
                i * i for i in range(20)]
            assert cluster.agents[0].poll() is None
    finally:
        cluster.close()


MARK = "zmqexec-batch-task-"


def in_this_process(mark: str) -> set:
    """Numbers of the tasks whose payloads this process holds: the batch it was handed
    (frames are kept, as buffers in a list, while the batch runs)."""
    import gc
    import re

    found = set()
    pattern = re.compile(re.escape(mark).encode() + rb"(\d+)")
    for obj in gc.get_objects():
        if isinstance(obj, list):
            for item in obj:
                if isinstance(item, (bytes, bytearray, memoryview)):
                    found.update(int(m) for m in pattern.findall(bytes(item)))
    return found


def die_or_count(path, i, mark):  # mark: travels in the payload, for in_this_process
    if i == 0:  # say which tasks wait in this task process's batch, then die
        with open(f"{path}.batch", "w") as f:
            f.write(" ".join(map(str, sorted(in_this_process(MARK)))))
        os._exit(3)
    with open(path, "a") as f:
        f.write(f"{i}\n")
    return i


def test_a_death_in_a_batch_charges_only_the_running_task(tmp_path):
    counts, gate = tmp_path / "counts", tmp_path / "gate"
    with ZMQExecutor(1, retries=0) as ex:
        ex.wait_for_workers(1, timeout=30)
        # short tasks first: the agent then hands its task process many tasks at once
        assert sum(ex.map(pow, range(3000), [2] * 3000, timeout=60)) > 0
        held = ex.submit(gates.wait_for_file, str(gate), "held")
        assert wait_until(held.running, timeout=30)
        futures = [ex.submit(die_or_count, str(counts), i, f"{MARK}{i}") for i in range(10)]
        # all ten wait at the agent, behind the held task: freed, its task process takes
        # them in one batch
        assert wait_until(lambda: ex.status()["agents"][0]["prefetched"] == 10, timeout=30)
        gate.touch()
        assert held.result(timeout=30) == "held"
        with pytest.raises(WorkerLostError) as info:
            futures[0].result(timeout=60)
        assert info.value.attempts == 1
        assert [f.result(timeout=60) for f in futures[1:]] == list(range(1, 10))
    # the batch formed: the nine others waited in the process that died ...
    assert (tmp_path / "counts.batch").read_text().split() == [str(i) for i in range(10)]
    # ... went back unstarted and ran once each, though retries=0
    assert sorted(int(x) for x in counts.read_text().split()) == list(range(1, 10))
