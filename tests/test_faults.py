"""Faults injected for real: timeouts and kills of running
tasks, tasks that wait for workers, and what each leaves behind."""
from __future__ import annotations

import concurrent.futures as cf
import os
import sys
import time

import cloudpickle
import pytest
from gates import wait_for_file
from conftest import Cluster, alive, free_port, wait_until

from zmqexec import NoWorkersError, TaskKilledError, TaskTimeoutError, ZMQExecutor

TIMEOUT = 30  # every result() waits at most this long
# Agents started from the command line do not have tests/ on sys.path: ship our tasks by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def mark_and_hold(path: str, seconds: float) -> int:
    """Append our pid to ``path`` (one line per execution), then run for ``seconds``."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return os.getpid()


def pid_of() -> int:
    return os.getpid()


def runs(path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def test_a_task_past_its_timeout_fails_alone_and_is_not_retried(tmp_path):
    log = tmp_path / "runs"
    with ZMQExecutor(2) as ex:
        ex.wait_for_workers(2, timeout=TIMEOUT)
        slow = ex.options(timeout=0.5, key="slow-one").submit(mark_and_hold, str(log), 60)
        others = [ex.submit(pow, i, 2) for i in range(50)]
        t0 = time.monotonic()
        with pytest.raises(TaskTimeoutError, match="slow-one.*timeout of 0.5 s") as info:
            slow.result(timeout=TIMEOUT)
        detected = time.monotonic() - t0
        assert isinstance(info.value, TimeoutError)
        assert [f.result(timeout=TIMEOUT) for f in others] == [i * i for i in range(50)]
        assert slow.status == "error"
        assert detected < 5, detected
        # its process was killed and replaced: new tasks run on a fresh one
        killed = int(log.read_text().split()[0])
        assert wait_until(lambda: not alive(killed), timeout=10)
        assert killed not in {ex.submit(pid_of).result(timeout=TIMEOUT) for _ in range(20)}
        # tasks within their timeout are unaffected by it
        assert ex.options(timeout=30).submit(mark_and_hold, str(tmp_path / "ok"), 0.1
                                             ).result(timeout=TIMEOUT) > 0
    assert runs(log) == 1  # never retried


def test_map_timeout_option_applies_to_each_chunk(tmp_path):
    with ZMQExecutor(2) as ex:
        results = ex.options(timeout=0.5).map(time.sleep, [0, 0, 5, 0], chunksize=2)
        assert next(results) is None and next(results) is None
        with pytest.raises(TaskTimeoutError):
            next(results)


def test_kill_stops_a_running_task_and_replaces_its_process(tmp_path):
    log, gate = tmp_path / "runs", tmp_path / "gate"
    with ZMQExecutor(1) as ex:
        running = ex.submit(mark_and_hold, str(log), 60)
        queued = ex.submit(wait_for_file, str(gate), "queued ran")
        assert wait_until(lambda: runs(log) == 1, timeout=TIMEOUT)
        assert wait_until(running.running, timeout=TIMEOUT)
        assert ex.kill(running) is True
        with pytest.raises(TaskKilledError, match="was killed"):
            running.result(timeout=TIMEOUT)
        gate.touch()
        assert queued.result(timeout=TIMEOUT) == "queued ran"  # the next task still runs
        assert ex.kill(queued) is False  # done: nothing to do
        pending = ex.submit(mark_and_hold, str(log), 60)
        blocked = ex.submit(pow, 2, 2)
        assert wait_until(lambda: runs(log) == 2, timeout=TIMEOUT)
        assert ex.kill(blocked) is True and blocked.cancelled()  # pending: cancel()
        assert ex.kill(pending) is True
        with pytest.raises(TaskKilledError):
            pending.result(timeout=TIMEOUT)
        with pytest.raises(ValueError, match="future of this executor"):
            ex.kill(cf.Future())
    assert runs(log) == 2  # a killed task is not retried


def test_timeout_option_must_be_positive():
    with ZMQExecutor(1) as ex:
        for bad in (0, -1, "1", True):
            with pytest.raises(ValueError, match="timeout must be"):
                ex.options(timeout=bad)


def test_without_workers_tasks_wait_unless_no_workers_timeout_is_set():
    cluster = Cluster(agents=0)
    try:
        with ZMQExecutor(address=cluster.address, no_workers_timeout=0.5) as impatient, \
                ZMQExecutor(address=cluster.address) as patient:
            waiting = patient.submit(pow, 3, 2)
            t0 = time.monotonic()
            doomed = impatient.submit(pow, 2, 2)
            with pytest.raises(NoWorkersError, match="no_workers_timeout=0.5"):
                doomed.result(timeout=TIMEOUT)
            assert 0.4 < time.monotonic() - t0 < 5  # counted from the client's arrival
            assert not waiting.done()  # the other client's task still waits
            cluster.add_agent(1)
            assert waiting.result(timeout=TIMEOUT) == 9, waiting.cancel()
            impatient.wait_for_workers(1, timeout=TIMEOUT)
            assert impatient.submit(pow, 2, 3).result(timeout=TIMEOUT) == 8
    finally:
        cluster.close()
    with pytest.raises(ValueError, match="no_workers_timeout"):
        ZMQExecutor(address=cluster.address, no_workers_timeout=0)


def count_run(path: str, i: int, delay: float) -> int:
    with open(path, "a") as f:
        f.write(f"{i}\n")
    time.sleep(delay)
    return i * i


def test_a_restarted_broker_loses_no_future_and_keeps_the_run_count_guarantee(tmp_path):
    import collections
    import signal

    from zmqexec import BrokerLostError

    runs_a, runs_b = tmp_path / "a", tmp_path / "b"
    cluster = Cluster(agents=2, nprocs=2, bind=f"tcp://127.0.0.1:{free_port()}")
    try:
        with ZMQExecutor(address=cluster.address) as a, \
                ZMQExecutor(address=cluster.address, retries=0) as b:
            a.wait_for_workers(4, timeout=TIMEOUT)
            fa = [a.submit(count_run, str(runs_a), i, 0.05) for i in range(100)]
            fb = [b.submit(count_run, str(runs_b), i, 0.05) for i in range(20)]
            assert wait_until(lambda: sum(f.done() for f in fa) >= 20, timeout=TIMEOUT)
            t0 = time.monotonic()
            cluster.broker.send_signal(signal.SIGKILL)
            cluster.broker.wait()
            cluster.broker = cluster.start_broker()
            assert [f.result(timeout=TIMEOUT) for f in fa] == [i * i for i in range(100)]
            recovered = time.monotonic() - t0
            outcomes = []
            for i, f in enumerate(fb):
                try:
                    outcomes.append(f.result(timeout=TIMEOUT) == i * i)
                except BrokerLostError:
                    outcomes.append("lost")
            assert all(o is True or o == "lost" for o in outcomes), outcomes
            assert a.submit(pow, 3, 3).result(timeout=TIMEOUT) == 27  # serving again
    finally:
        cluster.close()
    count_a = collections.Counter(runs_a.read_text().split())
    count_b = collections.Counter(runs_b.read_text().split())
    assert len(count_a) == 100 and max(count_a.values()) <= 2, count_a  # at most once more
    assert max(count_b.values()) == 1, count_b  # retries=0: never twice
    print(f"recovered in {recovered:.2f} s; re-runs {sum(count_a.values()) - 100}, "
          f"retries=0 lost {outcomes.count('lost')}")


def test_a_frozen_agent_is_written_off_and_rejoins_cleanly_when_it_thaws(tmp_path):
    import collections
    import signal

    from conftest import descendants

    runs = tmp_path / "runs"
    cluster = Cluster(agents=2, nprocs=1,
                      agent_args=("--heartbeat-interval", "0.2", "--heartbeat-timeout", "1.0"))
    try:
        with ZMQExecutor(address=cluster.address) as ex:
            ex.wait_for_workers(2, timeout=TIMEOUT)
            futures = [ex.submit(count_run, str(runs), i, 0.3) for i in range(12)]
            assert wait_until(lambda: len(runs.read_text().split()) >= 2 if runs.exists()
                              else False, timeout=TIMEOUT)
            frozen = cluster.agents[0]
            pids = [frozen.pid, *descendants(frozen.pid)]
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            assert wait_until(lambda: len(ex.status()["agents"]) == 1, timeout=TIMEOUT)
            detected = time.monotonic() - t0
            assert [f.result(timeout=TIMEOUT) for f in futures] == [i * i for i in range(12)]
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            assert wait_until(lambda: len(ex.status()["agents"]) == 2, timeout=TIMEOUT)
            status = ex.status()
            assert status["tasks"]["running"] == 0 and status["tasks"]["queued"] == 0
            # the stopped agent never made the broker block or drop a send (a RESET to the
            # thawed agent's old connection, closed as it reconnects, is routine)
            assert not [r for r in status["dropped"]
                        if r.startswith("send failed") and not r.endswith("unreachable")]
            later = [ex.submit(count_run, str(tmp_path / "later"), i, 0.0) for i in range(20)]
            assert [f.result(timeout=TIMEOUT) for f in later] == [i * i for i in range(20)]
    finally:
        cluster.close()
    count = collections.Counter(runs.read_text().split())
    assert len(count) == 12 and max(count.values()) <= 2, count
    assert detected < 5, detected
    print(f"frozen agent written off after {detected:.2f} s; "
          f"re-runs {sum(count.values()) - 12}")


def test_sigterm_drains_an_agent_running_tasks_finish_and_the_rest_move(tmp_path):
    import collections
    import signal

    runs = tmp_path / "runs"
    cluster = Cluster(agents=1, nprocs=1)
    try:
        with ZMQExecutor(address=cluster.address) as ex:
            ex.wait_for_workers(1, timeout=TIMEOUT)
            first = ex.submit(count_run, str(runs), 0, 1.0)
            rest = [ex.submit(count_run, str(runs), i, 0.0) for i in range(1, 6)]
            assert wait_until(lambda: runs.exists() and runs.read_text().split() == ["0"],
                              timeout=TIMEOUT)
            draining = cluster.agents[0]
            draining.send_signal(signal.SIGTERM)
            assert wait_until(lambda: ex.status()["slots"] == 0, timeout=TIMEOUT)
            assert draining.wait(TIMEOUT) == 0  # once its running task finished
            assert first.result(timeout=TIMEOUT) == 0
            assert not any(f.done() for f in rest)  # given back, waiting for a worker
            cluster.add_agent(1)
            assert [f.result(timeout=TIMEOUT) for f in rest] == [i * i for i in range(1, 6)]
            # past --drain-timeout, a running task is stopped and runs again elsewhere
            impatient = cluster.add_agent(1, "--drain-timeout", "0.5")
            ex.wait_for_workers(2, timeout=TIMEOUT)
            long = [ex.submit(count_run, str(tmp_path / "long"), i, 2.0) for i in range(2)]
            assert wait_until(lambda: (tmp_path / "long").exists() and
                              len((tmp_path / "long").read_text().split()) == 2, timeout=TIMEOUT)
            t0 = time.monotonic()
            impatient.send_signal(signal.SIGTERM)
            assert impatient.wait(TIMEOUT) == 0
            assert time.monotonic() - t0 < 1.5
            assert [f.result(timeout=TIMEOUT) for f in long] == [0, 1]
    finally:
        cluster.close()
    assert collections.Counter(runs.read_text().split()) == {str(i): 1 for i in range(6)}


KILLED_CLIENT = """
import os, signal, sys, time
from zmqexec import ZMQExecutor
def wait_for_file(path, value, timeout):  # defined here: it travels by value
    end = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.01)
    return value
ex = ZMQExecutor(address=sys.argv[1], heartbeat_interval=0.2)
fs = [ex.submit(wait_for_file, sys.argv[2], None, 60) for _ in range(50)]
end = time.monotonic() + 30
while True:
    tasks = ex.status()["tasks"]
    if tasks["queued"] + tasks["running"] >= 50:
        break
    if time.monotonic() > end:  # (os._exit: exit would wait for the held tasks)
        print(f"not all at the broker within 30 s: {tasks}", flush=True)
        os._exit(1)
    time.sleep(0.01)
print("submitted", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_client_is_dropped_by_heartbeat_and_others_carry_on(tmp_path):
    import subprocess

    gate = tmp_path / "gate"
    cluster = Cluster(agents=1, nprocs=2, broker_args=("--client-timeout", "1"))
    try:
        with ZMQExecutor(address=cluster.address) as other:
            other.wait_for_workers(2, timeout=TIMEOUT)
            proc = subprocess.run([sys.executable, "-c", KILLED_CLIENT, cluster.address,
                                   str(gate)],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == -9 and proc.stdout.strip() == "submitted", (
                proc.stdout, proc.stderr)
            t0 = time.monotonic()
            assert wait_until(lambda: other.status()["clients"] == 1, timeout=TIMEOUT)
            detected = time.monotonic() - t0
            status = other.status()
            assert status["tasks"]["queued"] == 0  # its queued tasks were dropped
            assert status["tasks"]["cancelled"] >= 40, status
            gate.touch()  # let its two running tasks end: their results go nowhere
            assert list(other.map(pow, range(20), [2] * 20, timeout=TIMEOUT)) == [
                i * i for i in range(20)]
            assert wait_until(lambda: other.status()["held_keys"] == 0, timeout=TIMEOUT)
    finally:
        cluster.close()
    assert detected < 5, detected
    print(f"killed client dropped {detected:.2f} s after its death")


EXIT_WAITS = """
import os, sys, time
from zmqexec import ZMQExecutor
ex = ZMQExecutor(address=sys.argv[1], broker_timeout=2.0, heartbeat_interval=0.2)
fut = ex.submit(time.sleep, 60)
end = time.monotonic() + 30
while not fut.running():
    if time.monotonic() > end:  # (os._exit: exit would wait for the task)
        print(f"not running within 30 s: {fut.status}", flush=True)
        os._exit(1)
    time.sleep(0.01)
print("running", flush=True)
sys.stdin.readline()  # the broker is gone now; the interpreter exits with a task pending
"""


def test_a_lost_remote_broker_ends_pending_futures_and_exit_waits_only_broker_timeout():
    import signal
    import subprocess

    from zmqexec import BrokerLostError

    cluster = Cluster(agents=1, nprocs=2)
    try:
        with ZMQExecutor(address=cluster.address, broker_timeout=1.5,
                         heartbeat_interval=0.2) as ex:
            fut = ex.submit(time.sleep, 60)
            assert wait_until(fut.running, timeout=TIMEOUT)
            with subprocess.Popen([sys.executable, "-c", EXIT_WAITS, cluster.address],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True) as proc:  # (its exit closes the pipes)
                try:
                    assert proc.stdout.readline().strip() == "running"
                    cluster.broker.send_signal(signal.SIGKILL)
                    t0 = time.monotonic()
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                    with pytest.raises(BrokerLostError, match="broker_timeout=1.5"):
                        fut.result(timeout=TIMEOUT)
                    lost_after = time.monotonic() - t0
                    assert fut.status == "lost"
                    assert proc.wait(TIMEOUT) == 0
                    exited_after = time.monotonic() - t0
                finally:
                    if proc.poll() is None:
                        proc.kill()
            ex.shutdown(wait=False)
    finally:
        cluster.close()
    # The broker's last word came at most one heartbeat (0.2 s) before it was killed at t0,
    # so the loss is declared between broker_timeout - heartbeat_interval and a few seconds.
    assert 1.5 - 0.2 - 0.05 < lost_after < 5, lost_after
    assert exited_after < 2.0 + 3, exited_after  # broker_timeout=2 plus interpreter teardown
    print(f"BrokerLostError after {lost_after:.2f} s; exit after {exited_after:.2f} s")
