"""Soak: many tasks while a chaos thread SIGKILLs the task process that has just
started a task, again and again. Every future must have its value, and the number of
executions (counted through a side file) must lie between the number of tasks and that
plus the kills times the slots.

The default run is short (a few thousand tasks, a handful of kills). The long runs — the
20,000-task soak, a soak of about ``ZMQEXEC_LONG_SOAK`` seconds, and a million tasks
through ``map`` — need ``ZMQEXEC_LONG_SOAK=SECONDS``."""
from __future__ import annotations

import collections
import os
import signal
import threading
import time

import pytest
from conftest import descendants

from zmqexec import ZMQExecutor

SLOTS = 2
LONG = os.environ.get("ZMQEXEC_LONG_SOAK")
long_soak = pytest.mark.skipif(not LONG, reason="long soaks run with ZMQEXEC_LONG_SOAK=SECONDS")


def record(path: str, i: int) -> int:
    """Count this execution as it starts (with our pid: the chaos thread's next victim), then
    work a little, so a kill mid-task shows."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{i} {os.getpid()}\n".encode())  # one small O_APPEND write: atomic
    finally:
        os.close(fd)
    time.sleep(0.0005)  # long enough that the run spans many kills
    return i * 3


def last_runner(path: str) -> int:
    """The pid of the task process that started the latest task (0 if none yet)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 256))
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return 0
    for line in reversed(lines[1:-1] if len(lines) > 2 else lines[:-1]):
        fields = line.split()
        if len(fields) == 2:
            return int(fields[1])
    return 0


class Chaos(threading.Thread):
    """Every ``interval`` seconds, SIGKILLs the task process that started the latest task
    (most likely still running it, or the next of its batch)."""

    def __init__(self, side: str, interval: float) -> None:
        super().__init__(name="chaos", daemon=True)
        self.side, self.interval = side, interval
        self.kills = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            victim = last_runner(self.side)
            if victim and (victim in descendants(os.getpid())  # ours, alive: not reused
                           or not os.path.isdir("/proc")):
                try:
                    os.kill(victim, signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass


def soak(tmp_path, tasks: int, batch: int, kills: int, interval: float) -> None:
    """Run at least ``tasks`` tasks in waves of ``batch``, and on until the chaos thread
    has killed ``kills`` task processes."""
    side = str(tmp_path / "executions")
    values = {}
    with ZMQExecutor(SLOTS) as ex:
        ex.wait_for_workers(SLOTS, timeout=30)
        chaos = Chaos(side, interval)
        chaos.start()
        t0 = time.monotonic()
        more_until = None  # after ``tasks``, waves go on for at most 60 s for the kills
        try:
            start = 0
            while start < tasks or chaos.kills < kills:
                if start >= tasks:
                    more_until = more_until or time.monotonic() + 60
                    if time.monotonic() > more_until:
                        break
                futures = [ex.submit(record, side, i) for i in range(start, start + batch)]
                for i, f in enumerate(futures, start):  # in waves, so kills land throughout
                    values[i] = f.result(timeout=120)
                start += batch
        finally:
            chaos.stopped.set()
            chaos.join()
        elapsed = time.monotonic() - t0
    with open(side) as f:
        executions = collections.Counter(int(line.split()[0]) for line in f)
    total = sum(executions.values())
    assert start >= tasks and chaos.kills >= kills, (start, chaos.kills)
    assert values == {i: i * 3 for i in range(start)}
    assert set(executions) == set(range(start))
    assert start <= total <= start + chaos.kills * SLOTS, (total, chaos.kills)
    print(f"soak: {start} tasks in {elapsed:.1f} s, {chaos.kills} kills, {total} executions "
          f"({total - start} extra), 0 failures")


def test_soak_under_task_process_kills(tmp_path):
    soak(tmp_path, tasks=2_000, batch=500, kills=5, interval=0.1)


@long_soak
@pytest.mark.timeout(1800)
def test_soak_of_20000_tasks_under_task_process_kills(tmp_path):
    soak(tmp_path, tasks=20_000, batch=2_000, kills=10, interval=0.5)


@long_soak
@pytest.mark.timeout(3600)
def test_long_soak(tmp_path):
    seconds = float(LONG or 0)
    soak(tmp_path, tasks=int(seconds * 2_000), batch=5_000, kills=10, interval=0.5)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@long_soak
@pytest.mark.timeout(1800)
def test_a_million_tasks_keep_memory_bounded_and_a_second_client_is_served():
    """1,000,000 tasks from one client through map(buffersize=): the client's memory (the
    embedded node's broker state included) stays flat (credit window, buffersize), a
    second client is served meanwhile (clients take turns), and the broker drops no
    message."""
    n = 1_000_000
    with ZMQExecutor(2) as ex:
        ex.wait_for_workers(2, timeout=30)
        samples = []
        it = ex.map(abs, range(n), buffersize=20_000)
        total = 0
        base = rss_mib(os.getpid())
        with ZMQExecutor(address=ex.address) as second:
            for i, value in enumerate(it):
                total += value
                if i == n // 2:  # halfway: another client's tasks get their turn at once
                    t0 = time.monotonic()
                    assert second.submit(pow, 2, 10).result(timeout=30) == 1024
                    waited = time.monotonic() - t0
                if i % 100_000 == 0:
                    samples.append(rss_mib(os.getpid()))
            status = second.status()
        assert total == n * (n - 1) // 2
    client_growth = max(samples) - base
    assert client_growth < 96, samples
    assert not status["dropped"], status["dropped"]
    assert waited < 5
    print(f"1,000,000 tasks: client RSS (node included) +{client_growth:.1f} MiB; a second "
          f"client's task waited {waited * 1000:.0f} ms")
