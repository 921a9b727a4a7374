"""The examples in examples/ run as documented: from the repository root, in a fresh
interpreter, exiting 0 with the output they promise and leaving no process behind.

Each example runs in a session of its own, so a process it started that outlives it
(reparented away from this test process, where the leak-check fixture cannot see it) is
still found through its session id.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import List

import pytest
from conftest import ROOT, wait_until

EXAMPLES = os.path.join(ROOT, "examples")


def session_members(sid: int) -> List[int]:
    """Live processes in session ``sid`` (Linux /proc); empty elsewhere."""
    if not os.path.isdir("/proc"):
        return []
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(name))
    return members


def run_example(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``examples/<args[0]>`` like a user would, and check it left nothing running."""
    proc = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, args[0]), *args[1:]],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    left = wait_until(lambda: not session_members(proc.pid), timeout=10)
    assert left, f"{args[0]} left processes running: {session_members(proc.pid)}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_quickstart_prints_results_and_exits_cleanly() -> None:
    result = run_example("quickstart.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "add(2, 3) = 5",
        "squares: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]",
        "sum of squares of 3, 4, 5 = 50",
    ]
    assert result.stderr == ""


def test_wait_first_completed_reports_the_quickest_task_and_cancels_queued_ones() -> None:
    result = run_example("wait_first_completed.py")
    assert result.returncode == 0, result.stderr
    first, *rest = result.stdout.splitlines()
    assert first == "first finished: quick (0.1 s)"
    names = {"medium", "slow", "slowest"}
    assert {line.rsplit(": ", 1)[1] for line in rest} == names
    assert all(line.startswith(("cancelled: ", "already running, left to finish: "))
               for line in rest), rest
    assert any(line.startswith("cancelled: ") for line in rest), rest
    assert result.stderr == ""


def test_as_completed_stream_yields_finished_results_then_times_out_on_the_straggler() -> None:
    result = run_example("as_completed_stream.py")
    assert result.returncode == 0, result.stderr
    *done, last = result.stdout.splitlines()
    expected = {"done: a took 0.4 s", "done: b took 0.1 s", "done: c took 0.3 s",
                "done: d took 0.2 s"}
    assert done and set(done) <= expected, done
    assert len(set(done)) == len(done)
    assert last.startswith("timed out waiting for: ") and last.endswith("straggler"), last
    assert result.stderr == ""


def test_asyncio_many_awaits_thousands_of_tasks_with_a_free_event_loop() -> None:
    result = run_example("asyncio_many.py")
    assert result.returncode == 0, result.stderr
    first, ticks, helpers = result.stdout.splitlines()
    assert re.fullmatch(r"5000 tasks awaited in [0-9.]+ s; longest chain: 3711 \(237 steps\)",
                        first), first
    assert re.fullmatch(r"the event loop ticked [1-9][0-9]* times meanwhile", ticks), ticks
    assert helpers == "wrap_future: 27 takes 111 steps; run_in_executor: 97 takes 118 steps"
    assert result.stderr == ""


def test_dask_collections_example_runs_an_array_and_a_bag_on_zmqexec() -> None:
    pytest.importorskip("dask.array", reason="dask is not installed")
    result = run_example("dask_collections.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "array: sum 499999500000, largest remainder 976",
        "bag: [('agent', 5), ('broker', 6), ('future', 6), ('key', 3), ('task', 4)]"]


def test_cluster_example_runs_tasks_on_two_cli_agents_and_stops_them() -> None:
    result = run_example(os.path.join("cluster", "run_cluster.py"), timeout=90)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"broker at tcp://\S+:\d+", lines[0]), lines
    assert "cubes: [0, 1, 8, 27, 64, 125, 216, 343]" in lines
    counts = [int(m.group(1)) for line in lines
              if (m := re.fullmatch(r"agent \S+: (\d+) tasks finished", line))]
    assert len(counts) == 2 and sum(counts) == 8 and min(counts) > 0, lines
    assert lines[-1] == "cluster stopped (exit codes [0, 0, 0])"
    assert "Traceback" not in result.stderr, result.stderr


def test_attach_by_key_gives_two_client_processes_the_same_result() -> None:
    result = run_example("attach_by_key.py")
    assert result.returncode == 0, result.stderr
    got = dict(line.split(" got: ", 1) for line in result.stdout.splitlines())
    assert set(got) == {"A", "B"}, result.stdout
    assert got["A"] == got["B"]
    assert got["A"].startswith("42, computed once by worker pid ")
    assert result.stderr == ""


def test_shared_queue_example_hands_futures_from_a_producer_to_a_consumer() -> None:
    result = run_example("shared_queue.py")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "producer: queued 5 futures, leaving"
    assert [line.rsplit(" -> ", 1)[1] for line in lines[1:6]] == ["0", "1", "4", "9", "16"]
    assert all(line.startswith("consumer: square-") for line in lines[1:6])
    assert lines[6:] == ["queued items left: 0"]
    assert result.stderr == ""


def test_pipeline_example_runs_a_small_graph_and_propagates_an_error() -> None:
    result = run_example("pipeline.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "report: 3 files, 6 rows, total 43",
        "report of the broken branch: FileNotFoundError: missing.csv",
    ]
    assert result.stderr == ""
