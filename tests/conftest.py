"""Shared fixtures: an embedded executor, a CLI-started cluster, and leak checks.

Every process a test starts is found again through /proc (Linux) and must be gone when the
test ends: nothing zmqexec starts may outlive its owner.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Optional, Set

import pytest

from zmqexec import ZMQExecutor
from zmqexec.agent.zygote import shared_root_pid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def _children() -> Dict[int, List[int]]:
    tree: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        tree.setdefault(int(fields[1]), []).append(int(name))
    return tree


def descendants(pid: int) -> Set[int]:
    """Live descendants of ``pid`` (Linux /proc); empty elsewhere."""
    if not os.path.isdir("/proc"):
        return set()
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def stop_process(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until every one of its threads is stopped (Linux /proc):
    the signal wakes one thread, and another might read on for a while otherwise."""
    os.kill(pid, signal.SIGSTOP)
    end = time.monotonic() + 30

    def states() -> List[str]:
        out = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                out.append(f.read().rsplit(")", 1)[1].split()[0])
        return out

    while any(state != "T" for state in states()):
        assert time.monotonic() < end, f"{pid} did not stop: {states()}"
        time.sleep(0.001)


def a_stopped_task_process_holds_up_nothing(ex: ZMQExecutor, pid: int) -> None:
    """Stop task process ``pid`` (idle, the only one) and give it a batch bigger than a
    pipe holds (64 KiB) with a timeout of 1 s: whoever gives it (node or agent) must not
    wait for it, so the timeout fires and kills the process, and the next task runs on
    its replacement.  (Were it to wait, the timeout would never fire.)"""
    from zmqexec.errors import TaskTimeoutError

    stop_process(pid)
    try:
        stalled = ex.options(timeout=1).submit(len, b"x" * (512 << 10))
        with pytest.raises(TaskTimeoutError):
            stalled.result(timeout=15)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
    assert ex.submit(os.getpid).result(timeout=30) != pid


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not; Linux /proc, else os.kill)."""
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:  # gone (or going)
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout``; for state that has no event to wait on."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def started_since(before: Set[int]) -> Set[int]:
    """Processes below this one that are not in ``before`` (the descendants there were).

    The process's shared root zygote lives as long as the process (executors fork their
    zygotes from it), so it is no leak; what tests start below it still is.  The subtree
    of a process that was there before (a module's executor's zygote) is exempt: its task
    processes come and go as tests kill them."""
    if not os.path.isdir("/proc"):
        return set()
    root = shared_root_pid()
    tree, new, todo = _children(), set(), [os.getpid()]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child in before and child != root:
                continue
            if child not in before and child != root:
                new.add(child)
            todo.append(child)
    return new


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Processes a test started (and their trees) must be gone when it ends."""
    before = descendants(os.getpid())
    yield
    if not wait_until(lambda: not started_since(before), timeout=10):
        leaked = started_since(before)
        for pid in leaked:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        pytest.fail(f"processes leaked by the test: {sorted(leaked)}")


@pytest.fixture(scope="module")
def executor() -> Iterator[ZMQExecutor]:
    """One embedded executor with 2 workers shared by a module's well-behaved tests."""
    ex = ZMQExecutor(2)
    yield ex
    ex.shutdown(wait=True)


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on (for a fixed address or a refusal)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zmqexec_cmd(*args: str) -> List[str]:
    return [sys.executable, "-m", "zmqexec", *args]


class Cluster:
    """A broker and agents started with the command line, as separate processes."""

    def __init__(self, agents: int = 2, nprocs: int = 1, broker_args: tuple = (),
                 agent_args: tuple = (), env: Optional[dict] = None,
                 bind: str = "tcp://127.0.0.1:0", broker_log: Optional[str] = None,
                 cwd: Optional[str] = None) -> None:
        """``broker_log``: a file that takes the broker's stderr (else it is the test's);
        ``cwd``: where the broker and agents run (else the test's working directory)."""
        self.procs: List[subprocess.Popen] = []
        self._agent_pids: Set[int] = set()
        self.env = env
        self.cwd = cwd
        self.broker_args = broker_args
        self.broker_log = broker_log
        self.address = bind
        self.broker = self.start_broker()
        self.agent_args = agent_args
        self.agents = [self.add_agent(nprocs) for _ in range(agents)]

    def start_broker(self) -> subprocess.Popen:
        """Start the broker (again, on the same address after the first time)."""
        if self.broker_log is None:
            broker = self._spawn(zmqexec_cmd("broker", "--bind", self.address,
                                             *self.broker_args), stdout=subprocess.PIPE)
        else:
            with open(self.broker_log, "a") as log:
                broker = self._spawn(zmqexec_cmd("broker", "--bind", self.address,
                                                 *self.broker_args),
                                     stdout=subprocess.PIPE, stderr=log)
        line = broker.stdout.readline().decode()
        assert line.startswith("zmqexec broker listening on "), line
        self.address = line.split()[-1]
        return broker

    def _spawn(self, cmd: List[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd,
                                **kw)
        self.procs.append(proc)
        return proc

    def add_agent(self, nprocs: int = 1, *extra: str,
                  address: Optional[str] = None) -> subprocess.Popen:
        """Start an agent of the broker (or one that connects to ``address`` instead)."""
        agent = self._spawn(zmqexec_cmd("worker", address or self.address, "--nprocs",
                                        str(nprocs), *self.agent_args, *extra))
        self._agent_pids.add(agent.pid)
        return agent

    def close(self) -> None:
        """Stop everything: agents at once (SIGINT; SIGTERM would let tasks finish)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if proc.pid in self._agent_pids
                                 else signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.close()


def run_python(code: str, timeout: float = 60, env: Optional[dict] = None,
               **kw) -> subprocess.CompletedProcess:
    """Run a snippet in a fresh interpreter (for exits, kills and stderr checks)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, **kw)


def under_open_files_limit(soft: int, cmd: List[str]) -> List[str]:
    """``cmd`` run with a soft limit of ``soft`` open files (the hard limit stays, as on a
    system whose default soft limit is low): a small interpreter sets it, then execs."""
    return [sys.executable, "-c",
            "import os, resource, sys; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, hard)); "
            "os.execv(sys.argv[1], sys.argv[1:])", *cmd]


def room_for_open_files(needed: int) -> bool:
    """True if this system lets a process open ``needed`` files (its hard limit)."""
    try:
        import resource
    except ImportError:
        return False
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return hard == resource.RLIM_INFINITY or hard >= needed
