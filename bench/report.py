"""The run's header of machine facts and the markdown tables of results.

Why a module: the numbers are only meaningful next to the machine, versions and load
they were measured under, and the ratio's direction must be the same on every row
(> 1 means zmqexec is better, whether higher or lower is better for that row).
"""
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

RowKey = Tuple[int, str]  # (workload index, metric key)


class Results:
    """Values per row and executor, and per workload the reason an executor has none."""

    def __init__(self) -> None:
        self.values: Dict[RowKey, Dict[str, List[float]]] = {}
        self.status: Dict[Tuple[int, str], str] = {}  # "skipped: ..." or "error: ..."

    def add(self, index: int, executor: str, values: Dict[str, float]) -> None:
        for key, value in values.items():
            self.values.setdefault((index, key), {}).setdefault(executor, []).append(value)

    def median(self, index: int, key: str, executor: str) -> Optional[float]:
        got = self.values.get((index, key), {}).get(executor)
        return statistics.median(got) if got else None

    def errors(self) -> List[str]:
        return [s for s in self.status.values() if s.startswith("error")]


def fmt(value: Optional[float]) -> str:
    """Three significant digits, thousands separated; integers for large values."""
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def ratio(zmq: Optional[float], ppe: Optional[float], better: str) -> str:
    """zmqexec relative to PPE, > 1 when zmqexec is better."""
    if zmq is None or ppe is None or zmq <= 0 or ppe <= 0:
        return "—"
    r = zmq / ppe if better == "higher" else ppe / zmq
    return f"{r:.2f}×"


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return "not installed"
    return str(getattr(mod, "__version__", "?"))


def _git(path: str, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", path, *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        return f"{kib / (1 << 20):.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "?"


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def machine_facts(settings: Sequence[str]) -> List[str]:
    """Markdown bullet lines: when, where, with what."""
    import multiprocessing

    import cloudpickle
    import zmq

    import zmqexec
    src = os.path.dirname(os.path.abspath(zmqexec.__file__))
    commit = _git(src, "rev-parse", "--short", "HEAD")
    if commit:
        dirty = _git(src, "status", "--porcelain", "--", ".")
        commit = f"git {commit}" + (" with uncommitted changes in zmqexec/" if dirty else "")
    else:
        commit = "not in a git checkout"
    try:
        affinity = f", {len(os.sched_getaffinity(0))} usable"
    except AttributeError:
        affinity = ""
    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `` {shlex.join(['python', '-m', 'bench', *sys.argv[1:]])} ``",
        f"- machine: {os.cpu_count()} CPUs{affinity} ({_cpu_model()}), {_mem_total()} RAM, "
        f"{platform.platform()}; load average at start {load()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"multiprocessing start method {multiprocessing.get_start_method()}",
        f"- pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, "
        f"cloudpickle {cloudpickle.__version__}, numpy {_version('numpy')}",
        f"- zmqexec {zmqexec.__version__} from `{src}` ({commit})",
        f"- loky {_version('loky')}, dask {_version('dask')}, "
        f"distributed {_version('distributed')}",
        *(f"- {line}" for line in settings),
    ]


def table(workloads: Sequence[Any], executors: Sequence[Any], results: Results) -> List[str]:
    """One row per metric: medians over the repetitions, and the zmqexec/PPE ratio."""
    keys = [cls.key for cls in executors]
    head = ["workload", "measure", "unit", "better", *(cls.label for cls in executors)]
    with_ratio = "zmqexec" in keys and "ppe" in keys
    if with_ratio:
        head.append("zmqexec vs PPE (>1: zmqexec better)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, wl in enumerate(workloads):
        for m in wl.metrics:
            cells = [wl.name, m.label, m.unit, m.better]
            for key in keys:
                status = results.status.get((i, key))
                cells.append(status if status else fmt(results.median(i, m.key, key)))
            if with_ratio:
                cells.append(ratio(results.median(i, m.key, "zmqexec"),
                                   results.median(i, m.key, "ppe"), m.better))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def repetitions(workloads: Sequence[Any], executors: Sequence[Any],
                results: Results) -> List[str]:
    """Every measured value, for judging the spread behind each median."""
    head = ["workload", "measure", *(cls.label for cls in executors)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, wl in enumerate(workloads):
        for m in wl.metrics:
            row = results.values.get((i, m.key), {})
            cells = [wl.name, m.label]
            cells += [", ".join(fmt(v) for v in row.get(cls.key, [])) or "—"
                      for cls in executors]
            lines.append("| " + " | ".join(cells) + " |")
    return lines
