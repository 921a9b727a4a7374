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


def test_the_stage_split_runs_and_accounts_for_every_stage():
    """``python -m bench.stages`` (the client CPU per task by stage) keeps working: its
    table lists every timed stage with a number, and the summary lines follow."""
    proc = subprocess.run([sys.executable, "-m", "bench.stages", "--seconds", "0.2",
                           "--rounds", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=200, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == ["stage", "group", "us per task"], rows[0]
    stages = {row[0]: row for row in rows[1:]}
    for name in ("user thread: submit (per task)", "completion thread: unpickle, settle "
                 "futures", "node: BrokerState.deliver SUBMIT",
                 "node: BrokerState.deliver RESULT", "node: AgentState.on_result (per task)"):
        assert name in stages, sorted(stages)
    for row in rows[1:]:
        assert row[1] in ("rules", "futures, pickling, pipes"), row
        assert NUMBER.match(row[2]), row
    assert "garbage collector ran" in proc.stdout
    assert "the rules:" in proc.stdout and "at most" in proc.stdout
