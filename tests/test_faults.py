"""Faults injected for real (issue 4, DESIGN §1.1 and §1.4): timeouts and kills of running
tasks, tasks that wait for workers, and what each leaves behind."""
from __future__ import annotations

import concurrent.futures as cf
import os
import time

import pytest
from gates import wait_for_file
from conftest import Cluster, wait_until

from zmqexec import NoWorkersError, TaskKilledError, TaskTimeoutError, ZMQExecutor

TIMEOUT = 30  # every result() waits at most this long


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
        assert wait_until(lambda: not os.path.exists(f"/proc/{killed}") or
                          open(f"/proc/{killed}/stat").read().split()[2] == "Z", timeout=10)
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
