"""Processes a task starts (a subprocess, a forked process, a process pool) go with its task
process: when it is timed out, killed, retired or stopped, when it dies of itself, and when
the agent, the zygote or the client dies, even by SIGKILL.  Embedded and remote alike.

Each task writes its own pid and those of the processes it started to a file; the test checks
that those processes are gone (they are no descendants of the test once their task process
has died, so the leak check alone would not see them).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Dict, Iterator, List, Optional, Tuple

import cloudpickle
import pytest
from conftest import ROOT, Cluster, alive, wait_until

from zmqexec import TaskKilledError, TaskTimeoutError, WorkerLostError, ZMQExecutor

TIMEOUT = 30  # every result() waits at most this long
GONE = 10  # seconds within which what a task started must be gone
# Agents started from the command line do not have tests/ on sys.path: ship our tasks by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc; process groups of task processes")


# ---- what runs in task processes ----------------------------------------------------------
def _descendants_of(pid: int) -> List[int]:
    """Live processes below ``pid`` (read from /proc in the task process)."""
    tree: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                tree.setdefault(int(fields[1]), []).append(int(name))
    found: List[int] = []
    todo = [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def start_children(kind: str) -> Tuple[List[int], object]:
    """Start processes of our own: ``popen`` a subprocess, ``fork`` a multiprocessing
    process (it holds copies of the task process's pipes), ``pool`` a process pool with
    its workers running.  Returns their pids, and what keeps them referenced."""
    if kind == "popen":
        child = subprocess.Popen(["sleep", "300"])
        return [child.pid], child
    if kind == "fork":
        proc = multiprocessing.get_context("fork").Process(target=time.sleep, args=(300,))
        proc.start()
        return [proc.pid], proc
    pool = concurrent.futures.ProcessPoolExecutor(2)
    assert pool.submit(abs, -1).result(timeout=60) == 1
    return _descendants_of(os.getpid()), pool


def report(path: str, pids: List[int]) -> None:
    """Write ``task pid`` then the started pids to ``path``, whole or not at all."""
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n{' '.join(map(str, pids))}\n")
    os.replace(path + ".tmp", path)


def start_and_hold(path: str, kind: str) -> None:
    """Start processes, say which, then run on (until timed out or killed)."""
    pids, keep = start_children(kind)
    report(path, pids)
    time.sleep(300)
    del keep


def start_and_exit(path: str, kind: str) -> None:
    """Start processes, say which, then end the task process at once (os._exit)."""
    pids, keep = start_children(kind)
    report(path, pids)
    os._exit(3)


LEFT_BEHIND: List[object] = []  # what a task leaves running in its task process


def start_and_return(path: str, kind: str) -> int:
    """Start processes and return, leaving them running in the task process."""
    pids, keep = start_children(kind)
    LEFT_BEHIND.append(keep)
    report(path, pids)
    return os.getpid()


def pool_in_a_task(n: int) -> int:
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        return sum(pool.map(abs, range(-n, 0)))


# ---- the test's side ----------------------------------------------------------------------
def _start_time(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


class Started:
    """The pids a task reported; whatever is still alive of them when the test ends is
    killed (by pid and start time, so never a stranger), so a failing test leaves nothing."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.count = 0
        self.seen: Dict[int, Optional[str]] = {}

    def path(self) -> str:
        self.count += 1
        return str(self.tmp_path / f"started-{self.count}")

    def read(self, path: str) -> Tuple[int, List[int]]:
        """(task pid, started pids), once the task has written them."""
        assert wait_until(lambda: os.path.exists(path), timeout=TIMEOUT), \
            "the task never said what it started"
        with open(path) as f:
            task, started = f.read().split("\n")[:2]
        pids = [int(p) for p in started.split()]
        assert pids, "the task started nothing"
        for pid in [int(task), *pids]:
            self.seen[pid] = _start_time(pid)
        return int(task), pids

    def cleanup(self) -> None:
        for pid, started in self.seen.items():
            if started is not None and _start_time(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def started(tmp_path) -> Iterator[Started]:
    s = Started(tmp_path)
    yield s
    s.cleanup()


def all_gone(pids: List[int]) -> bool:
    return wait_until(lambda: not any(alive(pid) for pid in pids), timeout=GONE)


@contextlib.contextmanager
def executor_in(mode: str, *, agent_args: tuple = (), **kw) -> Iterator[
        Tuple[ZMQExecutor, Optional[Cluster]]]:
    """An embedded executor of one task process, or a client of a CLI-started cluster
    with one agent of one task process."""
    if mode == "embedded":
        with ZMQExecutor(1, **kw) as ex:
            yield ex, None
        return
    cluster = Cluster(agents=1, nprocs=1, agent_args=agent_args)
    try:
        with ZMQExecutor(address=cluster.address, **kw) as ex:
            ex.wait_for_workers(1, timeout=TIMEOUT)
            yield ex, cluster
    finally:
        cluster.close()


MODES = ["embedded", "remote"]


@pytest.mark.parametrize("kind", ["popen", "fork"])
@pytest.mark.parametrize("mode", MODES)
def test_a_timed_out_task_takes_what_it_started_with_it(mode, kind, started):
    with executor_in(mode) as (ex, _):
        path = started.path()
        fut = ex.options(timeout=3).submit(start_and_hold, path, kind)
        task, pids = started.read(path)
        with pytest.raises(TaskTimeoutError):
            fut.result(timeout=TIMEOUT)
        assert all_gone([task, *pids]), [p for p in pids if alive(p)]
        assert ex.submit(os.getpid).result(timeout=TIMEOUT) != task  # replaced


@pytest.mark.parametrize("kind", ["popen", "pool"])
@pytest.mark.parametrize("mode", MODES)
def test_a_killed_task_takes_what_it_started_with_it(mode, kind, started):
    with executor_in(mode) as (ex, _):
        path = started.path()
        fut = ex.submit(start_and_hold, path, kind)
        task, pids = started.read(path)
        assert wait_until(fut.running, timeout=TIMEOUT)
        assert ex.kill(fut) is True
        with pytest.raises(TaskKilledError):
            fut.result(timeout=TIMEOUT)
        assert all_gone([task, *pids]), [p for p in pids if alive(p)]
        assert ex.submit(pow, 2, 5).result(timeout=TIMEOUT) == 32


@pytest.mark.parametrize("kind", ["popen", "fork"])
@pytest.mark.parametrize("how", ["sigkill", "os_exit"])
@pytest.mark.parametrize("mode", MODES)
def test_a_task_process_that_dies_of_itself_takes_what_it_started(mode, how, kind, started):
    """SIGKILLed from outside, or ended by its task (os._exit): what it started goes too,
    once its death is seen (a forked process holds its pipes open: that must not hide it)."""
    with executor_in(mode, retries=0) as (ex, _):
        path = started.path()
        fut = ex.submit(start_and_hold if how == "sigkill" else start_and_exit, path, kind)
        task, pids = started.read(path)
        if how == "sigkill":
            os.kill(task, signal.SIGKILL)
        with pytest.raises(WorkerLostError):
            fut.result(timeout=TIMEOUT)
        assert all_gone([task, *pids]), [p for p in pids if alive(p)]
        assert ex.submit(pow, 2, 5).result(timeout=TIMEOUT) == 32


@pytest.mark.parametrize("mode", MODES)
def test_a_retired_task_process_takes_what_it_left_running(mode, started):
    """max_tasks_per_child: the task process retires after its task; what the task left
    running goes with it."""
    kw = {"max_tasks_per_child": 1} if mode == "embedded" else {}
    with executor_in(mode, agent_args=("--max-tasks-per-child", "1"), **kw) as (ex, _):
        path = started.path()
        task = ex.submit(start_and_return, path, "popen").result(timeout=TIMEOUT)
        _, pids = started.read(path)
        assert all_gone([task, *pids]), [p for p in pids if alive(p)]
        assert ex.submit(os.getpid).result(timeout=TIMEOUT) != task


def test_a_shut_down_embedded_executor_leaves_nothing_a_task_started(started):
    with ZMQExecutor(1) as ex:
        path = started.path()
        task = ex.submit(start_and_return, path, "fork").result(timeout=TIMEOUT)
        _, pids = started.read(path)
        assert all(alive(pid) for pid in pids)  # left running while the executor runs
    assert all_gone([task, *pids]), [p for p in pids if alive(p)]


def test_a_stopped_agent_leaves_nothing_its_running_tasks_started(started):
    """SIGINT stops an agent at once: its running task's process goes with its group."""
    cluster = Cluster(agents=1, nprocs=1)
    try:
        with ZMQExecutor(address=cluster.address, retries=0) as ex:
            path = started.path()
            fut = ex.submit(start_and_hold, path, "popen")
            task, pids = started.read(path)
            agent = cluster.agents[0]
            agent.send_signal(signal.SIGINT)
            assert agent.wait(TIMEOUT) == 0
            assert all_gone([task, *pids]), [p for p in pids if alive(p)]
            with pytest.raises(WorkerLostError):
                fut.result(timeout=TIMEOUT)
    finally:
        cluster.close()


def test_a_sigkilled_agent_leaves_nothing_its_tasks_started(started):
    """Nobody is left to kill the group: the task process does, as it dies with its agent."""
    cluster = Cluster(agents=1, nprocs=1,
                      agent_args=("--heartbeat-interval", "0.2", "--heartbeat-timeout", "1"))
    try:
        with ZMQExecutor(address=cluster.address, retries=0) as ex:
            path = started.path()
            fut = ex.submit(start_and_hold, path, "fork")
            task, pids = started.read(path)
            agent = cluster.agents[0]
            agent.kill()
            agent.wait(TIMEOUT)
            assert all_gone([task, *pids]), [p for p in pids if alive(p)]
            with pytest.raises(WorkerLostError):
                fut.result(timeout=TIMEOUT)
    finally:
        cluster.close()


def test_a_sigkilled_zygote_leaves_nothing_its_tasks_started(started):
    with ZMQExecutor(1, retries=0) as ex:
        path = started.path()
        fut = ex.submit(start_and_hold, path, "popen")
        task, pids = started.read(path)
        os.kill(ex._io.zygote.pid, signal.SIGKILL)
        assert all_gone([task, *pids]), [p for p in pids if alive(p)]
        with pytest.raises(WorkerLostError):
            fut.result(timeout=TIMEOUT)
        assert ex.submit(pow, 2, 5).result(timeout=TIMEOUT) == 32


SIGKILLED_CLIENT = textwrap.dedent("""
    import os, subprocess, sys, time
    from zmqexec import ZMQExecutor

    def hold(path):
        child = subprocess.Popen(["sleep", "300"])
        with open(path + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\\n{child.pid}\\n")
        os.replace(path + ".tmp", path)
        time.sleep(300)

    with ZMQExecutor(1) as ex:
        ex.submit(hold, sys.argv[1]).result(timeout=600)
""")


def test_a_sigkilled_client_leaves_nothing_its_tasks_started(started):
    """The zygote sees its client go (even by SIGKILL) and kills each task process's group."""
    path = started.path()
    client = subprocess.Popen([sys.executable, "-c", SIGKILLED_CLIENT, path], cwd=ROOT,
                              stdin=subprocess.DEVNULL)
    try:
        task, pids = started.read(path)
        client.kill()
        client.wait(TIMEOUT)
        assert all_gone([task, *pids]), [p for p in pids if alive(p)]
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


@pytest.mark.parametrize("mode", MODES)
def test_a_task_may_use_a_process_pool(mode):
    """Task processes are not daemonic: a task may start a ProcessPoolExecutor, as it can
    inside a ProcessPoolExecutor's worker."""
    with executor_in(mode) as (ex, _):
        assert ex.submit(pool_in_a_task, 10).result(timeout=120) == 55
        assert ex.submit(pool_in_a_task, 3).result(timeout=120) == 6  # and again
