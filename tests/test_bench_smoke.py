"""``python -m bench --smoke`` runs every workload and reports a number or a reason.

Speed itself is never asserted here (measured times go to bench/, not to
tests); this only keeps the benchmark runnable, so that its numbers can be trusted to
come from code that still works.
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ("throughput", "latency", "map", "payload", "fan-out", "startup", "memory", "cpu",
             "cancel", "deps")
NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?(e[+-]?\d+)?$")


def run_smoke(*extra: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=280,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def result_rows(report: str):
    """The header and the rows of the first table (the medians)."""
    table = report.split("## All repetitions")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in table.splitlines() if line.startswith("| ")]
    return rows[0], rows[1:]


def check_report(report: str, executors: tuple) -> None:
    head, rows = result_rows(report)
    assert head[4:4 + len(executors)] == list(executors), head
    assert {row[0] for row in rows} == set(WORKLOADS)
    for row in rows:
        for cell in row[4:4 + len(executors)]:
            assert NUMBER.match(cell) or cell.startswith("skipped: ") or cell == "n/a", row
    # every (workload, executor) gave at least one number or an explained skip
    for name in WORKLOADS:
        for col in range(4, 4 + len(executors)):
            cells = [row[col] for row in rows if row[0] == name]
            assert any(NUMBER.match(c) or c.startswith("skipped: ") for c in cells), (name, col)


@pytest.mark.timeout(300)
def test_smoke_gives_every_workload_a_number_or_a_reason() -> None:
    report = run_smoke()
    loky = importlib.util.find_spec("loky") is not None
    base = ("zmqexec", "PPE", "zmqexec remote")
    check_report(report, (*base, "loky") if loky else base)
    assert "ratio" in report and "zmqexec vs PPE" in report


@pytest.mark.timeout(300)
@pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                    reason="dask.distributed is not installed (the bench extra)")
def test_smoke_runs_dask_when_installed() -> None:
    check_report(run_smoke("--executors", "dask"), ("dask",))


def run_module(*argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=200, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def table_rows(report: str):
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in report.splitlines() if line.startswith("| ")]


@pytest.mark.parametrize("workload", [(), ("--lone",)], ids=["throughput", "lone"])
def test_the_stage_split_runs_and_accounts_for_every_stage(workload):
    """``python -m bench.stages`` (the client CPU per task by stage, for the throughput
    and the lone-task workloads) keeps working: its table lists every timed stage with a
    number, and the summary lines follow."""
    report = run_module("bench.stages", "--seconds", "0.2", "--rounds", "1", *workload)
    rows = table_rows(report)
    assert rows[0] == ["stage", "group", "us per task"], rows[0]
    stages = {row[0]: row for row in rows[1:]}
    for name in ("user thread: submit (per task)", "completion thread: unpickle, settle "
                 "futures", "node: BrokerState.deliver SUBMIT",
                 "node: BrokerState.deliver RESULT", "node: AgentState.on_result (per task)"):
        assert name in stages, sorted(stages)
    for row in rows[1:]:
        assert row[1] in ("rules", "futures, pickling, pipes"), row
        assert NUMBER.match(row[2]), row
    assert "garbage collector ran" in report and "the rules:" in report
    if workload:
        assert "median round trip" in report and "at best" in report
    else:
        assert "at most" in report


@pytest.mark.timeout(200)
@pytest.mark.parametrize("one_cpu", [False, True], ids=["all-cpus", "one-cpu"])
def test_the_hops_floor_times_every_chain_and_its_cpu(one_cpu):
    """``python -m bench.hops`` (the latency floor of each kind of hand-over) keeps
    working: every chain, the embedded node's shape among them, gets a median, a p99
    and (where /proc tells) the CPU a round trip costs in and outside this process, and
    how often its threads slept (at least once: the echoing end waits for the next)."""
    report = run_module("bench.hops", "-n", "40", "--rounds", "2",
                        *(["--one-cpu"] if one_cpu else []))
    rows = table_rows(report)
    assert rows[0][:3] == ["chain", "median µs", "p99 µs"], rows[0]
    names = [row[0] for row in rows[1:]]
    assert any(name.startswith("node shape") for name in names), names
    assert any(name.startswith("ZMQExecutor(2)") for name in names), names
    counted = os.path.exists("/proc/self/task")
    for row in rows[1:]:
        cells = row[1:6] if counted else row[1:3]
        assert all(NUMBER.match(cell) for cell in cells), row
        if counted:  # every chain's round trip runs code in this process and another
            assert all(float(cell.replace(",", "")) > 0 for cell in row[3:5]), row
            assert float(row[5]) >= 0.9, row
    assert ("run on one CPU" in report) == one_cpu, report[-300:]
