"""Remote mode: clients join a broker and agents started with the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any, Iterator, Set, Tuple

import cloudpickle
import pytest

from conftest import (Cluster, a_stopped_task_process_holds_up_nothing, alive, descendants,
                      room_for_open_files, run_python, under_open_files_limit, wait_until,
                      zmqexec_cmd)
from zmqexec import ZMQExecutor
from zmqexec.errors import WorkerLostError

# Agents started from the command line do not have tests/ on sys.path: ship our tasks by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 30  # every result() waits at most this long


# ---- tasks ---------------------------------------------------------------------------------
def whoami(x: Any, delay: float = 0.0) -> Tuple[Any, int, int]:
    """(x, task process pid, agent pid) after ``delay`` seconds."""
    time.sleep(delay)
    return x, os.getpid(), os.getppid()


def square(x: int) -> int:
    return x * x


def block_first_attempt(path: str) -> Tuple[int, int]:
    """Write ``pid ppid`` to ``path`` and block on the first attempt; return at once later."""
    if os.path.exists(path):
        return os.getpid(), os.getppid()
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {os.getppid()}")
    os.rename(tmp, path)
    time.sleep(60)
    return -1, -1  # only reached if nobody killed us


def read_pids(path: str) -> Tuple[int, int]:
    assert wait_until(lambda: os.path.exists(path), timeout=TIMEOUT), "the task never started"
    with open(path) as f:
        pid, ppid = f.read().split()
    return int(pid), int(ppid)


def agent_pids(cluster: Cluster) -> Set[int]:
    return {agent.pid for agent in cluster.agents}


@pytest.fixture
def client(cluster: Cluster) -> Iterator[ZMQExecutor]:
    ex = ZMQExecutor(address=cluster.address)
    ex.wait_for_workers(2, timeout=TIMEOUT)
    yield ex
    ex.shutdown(wait=True)


# ---- joining a cluster ---------------------------------------------------------------------
def test_submit_and_map_run_on_the_cli_started_agents(cluster: Cluster,
                                                      client: ZMQExecutor) -> None:
    fut = client.submit(square, 7)
    assert fut.result(timeout=TIMEOUT) == 49
    results = list(client.map(whoami, range(20), [0.05] * 20, timeout=TIMEOUT))
    assert [x for x, _, _ in results] == list(range(20))
    assert {ppid for _, _, ppid in results} == agent_pids(cluster)  # both agents worked
    agents = client.status()["agents"]
    assert len(agents) == 2
    assert all(a["finished"] > 0 for a in agents), agents
    assert sum(a["finished"] for a in agents) == 21


def test_remote_executor_starts_no_local_processes(cluster: Cluster) -> None:
    before = descendants(os.getpid())
    with ZMQExecutor(address=cluster.address) as ex:
        assert ex.submit(square, 3).result(timeout=TIMEOUT) == 9
        new = descendants(os.getpid()) - before
        assert new <= set().union(*(descendants(a.pid) for a in cluster.agents))
        assert ex.address == cluster.address
        assert "remote" in repr(ex)


@pytest.mark.parametrize("max_workers", [1, 4, 0])
def test_max_workers_with_an_address_raises_value_error(cluster: Cluster,
                                                        max_workers: int) -> None:
    with pytest.raises(ValueError):
        ZMQExecutor(max_workers, address=cluster.address)
    with pytest.raises(ValueError):
        ZMQExecutor(max_workers=max_workers, address=cluster.address)


def test_zmqexec_address_environment_variable_selects_remote_mode(cluster: Cluster) -> None:
    code = textwrap.dedent("""
        import json, os
        from zmqexec import ZMQExecutor

        def where(x):
            return x, os.getppid()

        with ZMQExecutor() as ex:
            out = {"address": ex.address, "results": list(ex.map(where, range(4), timeout=30))}
        print(json.dumps(out))
    """)
    env = dict(os.environ, ZMQEXEC_ADDRESS=cluster.address)
    proc = run_python(code, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["address"] == cluster.address
    assert [x for x, _ in out["results"]] == [0, 1, 2, 3]
    assert {ppid for _, ppid in out["results"]} <= agent_pids(cluster)


def test_explicit_address_wins_over_the_environment(cluster: Cluster, monkeypatch) -> None:
    monkeypatch.setenv("ZMQEXEC_ADDRESS", "tcp://127.0.0.1:1")
    with ZMQExecutor(address=cluster.address) as ex:
        _, _, ppid = ex.submit(whoami, 1).result(timeout=TIMEOUT)
    assert ppid in agent_pids(cluster)


def test_two_clients_in_one_process_and_one_in_another_share_a_broker(
        cluster: Cluster) -> None:
    other = textwrap.dedent(f"""
        from zmqexec import ZMQExecutor

        def cube(x):
            return x ** 3

        with ZMQExecutor(address={cluster.address!r}) as ex:
            print(sum(ex.map(cube, range(30), timeout=30)))
    """)
    with ZMQExecutor(address=cluster.address) as a, ZMQExecutor(address=cluster.address) as b:
        fa = [a.submit(whoami, ("a", i), 0.02) for i in range(15)]
        fb = [b.submit(whoami, ("b", i), 0.02) for i in range(15)]
        assert wait_until(lambda: a.status()["clients"] >= 2, timeout=TIMEOUT)
        proc = run_python(other)  # a third client, while a's and b's tasks are in flight
        assert proc.returncode == 0, proc.stderr
        assert int(proc.stdout.split()[-1]) == sum(x ** 3 for x in range(30))
        assert [f.result(timeout=TIMEOUT)[0] for f in fa] == [("a", i) for i in range(15)]
        assert [f.result(timeout=TIMEOUT)[0] for f in fb] == [("b", i) for i in range(15)]
        assert a.status()["tasks"]["finished"] == 60


# ---- failures ------------------------------------------------------------------------------
def test_task_process_killed_mid_task_completes_elsewhere(cluster: Cluster,
                                                          client: ZMQExecutor,
                                                          tmp_path) -> None:
    path = str(tmp_path / "pid")
    fut = client.submit(block_first_attempt, path)
    pid, _ = read_pids(path)
    assert wait_until(lambda: fut.status == "running", timeout=TIMEOUT)
    os.kill(pid, signal.SIGKILL)
    new_pid, new_ppid = fut.result(timeout=TIMEOUT)
    assert new_pid not in (pid, -1)
    assert new_ppid in agent_pids(cluster)
    assert fut.status == "finished"
    assert all(agent.poll() is None for agent in cluster.agents)  # the agents live on
    assert client.status()["tasks"]["lost"] == 0


def test_task_process_killed_with_retries_0_fails_with_worker_lost_error(
        client: ZMQExecutor, tmp_path) -> None:
    path = str(tmp_path / "pid")
    fut = client.options(retries=0).submit(block_first_attempt, path)
    pid, _ = read_pids(path)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerLostError, match="SIGKILL"):
        fut.result(timeout=TIMEOUT)
    assert fut.status == "lost"
    assert client.submit(square, 5).result(timeout=TIMEOUT) == 25  # the cluster lives on


def test_agent_killed_mid_task_its_task_completes_on_the_other_agent(tmp_path) -> None:
    cluster = Cluster(agent_args=("--heartbeat-interval", "0.2", "--heartbeat-timeout", "1"))
    try:
        with ZMQExecutor(address=cluster.address) as ex:
            ex.wait_for_workers(2, timeout=TIMEOUT)
            path = str(tmp_path / "pid")
            fut = ex.submit(block_first_attempt, path)
            pid, ppid = read_pids(path)
            victim = next(a for a in cluster.agents if a.pid == ppid)
            survivor = next(a for a in cluster.agents if a.pid != ppid)
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            start = time.monotonic()
            new_pid, new_ppid = fut.result(timeout=TIMEOUT)
            assert time.monotonic() - start < 5  # heartbeat timeout is 1 s
            assert new_ppid == survivor.pid
            assert new_pid != pid
            assert fut.status == "finished"
            assert wait_until(lambda: len(ex.status()["agents"]) == 1, timeout=TIMEOUT)
            assert wait_until(lambda: not alive(pid), timeout=TIMEOUT)  # died with its agent
    finally:
        cluster.close()


def test_tasks_wait_for_an_agent_started_after_they_were_submitted() -> None:
    cluster = Cluster(agents=0)
    try:
        with ZMQExecutor(address=cluster.address) as ex:
            futures = [ex.submit(square, i) for i in range(5)]
            assert wait_until(lambda: ex.status()["tasks"]["queued"] == 5, timeout=TIMEOUT)
            assert not any(f.done() for f in futures)
            assert all(f.status == "pending" for f in futures)
            cluster.agents.append(cluster.add_agent(2))
            assert [f.result(timeout=TIMEOUT) for f in futures] == [0, 1, 4, 9, 16]
    finally:
        cluster.close()


def test_max_workers_follows_the_cluster_slot_count() -> None:
    cluster = Cluster(agents=2, nprocs=2)
    try:
        with ZMQExecutor(address=cluster.address) as ex:
            ex.wait_for_workers(4, timeout=TIMEOUT)
            assert wait_until(lambda: ex._max_workers == 4, timeout=5), ex._max_workers
            cluster.agents.append(cluster.add_agent(3))
            ex.wait_for_workers(7, timeout=TIMEOUT)
            assert wait_until(lambda: ex._max_workers == 7, timeout=5), ex._max_workers
    finally:
        cluster.close()


def test_max_workers_is_the_slot_count_as_soon_as_wait_for_workers_returns() -> None:
    cluster = Cluster(agents=0)
    try:
        with ZMQExecutor(address=cluster.address, heartbeat_interval=30) as ex:
            assert ex.status(timeout=TIMEOUT)["slots"] == 0  # connected before any agent
            cluster.agents.extend([cluster.add_agent(2), cluster.add_agent(2)])
            ex.wait_for_workers(4, timeout=TIMEOUT)
            assert ex._max_workers == 4
    finally:
        cluster.close()


@pytest.mark.skipif(not room_for_open_files(2048), reason="hard limit on open files below 2048")
def test_an_agent_with_many_task_processes_fits_under_a_low_soft_limit_on_open_files():
    """An agent holds five descriptors per task process: 48 of them pass a soft limit of
    128, which the agent raises (up to the hard limit) rather than fail to start them."""
    c = Cluster(agents=0)
    agent = subprocess.Popen(
        under_open_files_limit(128, zmqexec_cmd("worker", c.address, "--nprocs", "48")),
        stdin=subprocess.DEVNULL)
    try:
        with ZMQExecutor(address=c.address) as ex:
            ex.wait_for_workers(48, timeout=60)
            assert sum(ex.map(abs, range(-100, 0), timeout=TIMEOUT)) == 5050
        assert agent.poll() is None, "the agent died"
    finally:
        agent.send_signal(signal.SIGINT)
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        c.close()


def test_a_stopped_task_process_never_blocks_its_agent():
    """A batch an agent cannot write whole to a stopped task process waits in the
    agent, which goes on (heartbeats, timeouts): it is never written off."""
    cluster = Cluster(agents=1, nprocs=1)
    try:
        with ZMQExecutor(address=cluster.address) as ex:
            _, pid, _ = ex.submit(whoami, 0).result(timeout=TIMEOUT)
            a_stopped_task_process_holds_up_nothing(ex, pid)
            assert len(ex.status()["agents"]) == 1
    finally:
        cluster.close()
