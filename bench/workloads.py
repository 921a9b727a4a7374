"""The benchmark workloads, each measured on a fresh executor of one kind.

Why one function per workload, taking the adapter class: the runner interleaves the
executors (zmqexec, PPE, loky, dask, zmqexec, PPE, ...) for each workload, and each
measurement starts its own executor, warms it (except ``startup``), measures, and shuts
it down, so that no other executor is alive meanwhile.  Memory is measured in a fresh
subprocess (``bench.memprobe``) so that the RSS of earlier workloads cannot hide growth.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from . import procstat
from .executors import WORKERS, Adapter, Skip, running

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20

FULL = dict(throughput=10_000, latency=1_000, map_chunked=100_000, chunksize=1_000,
            map_unchunked=10_000, payload_mib=64, payload_calls=3, fanout=200,
            fanout_sleep=0.01, pending=100_000, buffer_items=1_000_000, buffer_chunksize=100,
            buffersize=64, cpu=10_000, cancel=1_000, graph=1_000)
SMOKE = dict(throughput=200, latency=50, map_chunked=2_000, chunksize=100, map_unchunked=200,
             payload_mib=1, payload_calls=1, fanout=20, fanout_sleep=0.01, pending=1_000,
             buffer_items=10_000, buffer_chunksize=100, buffersize=8, cpu=200, cancel=100,
             graph=50)


@dataclass
class Context:
    params: Dict[str, Any]
    tasks: Any        # the task set used by default (bench.tasks unless --main-funcs)
    main_tasks: Any   # the copies defined in the running script's __main__
    timeout: float
    main_funcs: bool


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    better: str  # "higher" or "lower"


@dataclass
class Workload:
    name: str
    run: Callable[[type, Context], Dict[str, float]]
    metrics: List[Metric] = field(default_factory=list)


def _n(x: float) -> str:
    return f"{x:,}"


# -- throughput, latency, map, payload, fan-out, startup, cpu ------------------------------
def throughput(cls: type, ctx: Context, tasks: Any = None) -> Dict[str, float]:
    tasks = tasks or ctx.tasks
    n = ctx.params["throughput"]
    with running(cls, ctx.timeout, tasks) as ex:
        t0 = time.perf_counter()
        fs = [ex.submit(tasks.noop) for _ in range(n)]
        ex.wait_all(fs)
        elapsed = time.perf_counter() - t0
        ex.results(fs)
    return {"rate": n / elapsed}


def throughput_main(cls: type, ctx: Context) -> Dict[str, float]:
    return throughput(cls, ctx, ctx.main_tasks)


def latency(cls: type, ctx: Context) -> Dict[str, float]:
    n = ctx.params["latency"]
    samples = []
    with running(cls, ctx.timeout, ctx.tasks) as ex:
        for _ in range(n):
            t0 = time.perf_counter()
            ex.submit(ctx.tasks.noop).result(timeout=ctx.timeout)
            samples.append(time.perf_counter() - t0)
    samples.sort()
    p99 = samples[max(0, -(-99 * n // 100) - 1)]  # nearest-rank percentile
    return {"median": statistics.median(samples) * 1e6, "p99": p99 * 1e6}


def _map(cls: type, ctx: Context, n: int, chunksize: int) -> Dict[str, float]:
    with running(cls, ctx.timeout, ctx.tasks) as ex:
        t0 = time.perf_counter()
        count = sum(1 for _ in ex.map(ctx.tasks.identity, range(n), chunksize))
        elapsed = time.perf_counter() - t0
    if count != n:
        raise AssertionError(f"map yielded {count} of {n} results")
    return {"rate": n / elapsed}


def map_chunked(cls: type, ctx: Context) -> Dict[str, float]:
    return _map(cls, ctx, ctx.params["map_chunked"], ctx.params["chunksize"])


def map_unchunked(cls: type, ctx: Context) -> Dict[str, float]:
    return _map(cls, ctx, ctx.params["map_unchunked"], 1)


_payloads: Dict[str, Any] = {}


def _payload(kind: str, nbytes: int) -> Any:
    """The argument, made once per process (not timed)."""
    key = f"{kind}-{nbytes}"
    if key not in _payloads:
        if nbytes > MiB:
            _payloads.clear()
        if kind == "bytes":
            _payloads[key] = bytes(range(256)) * (nbytes // 256)
        else:
            import numpy
            _payloads[key] = numpy.arange(nbytes // 8, dtype=numpy.float64)
    return _payloads[key]


def _payload_rate(cls: type, ctx: Context, kind: str) -> Dict[str, float]:
    nbytes = ctx.params["payload_mib"] * MiB
    data = _payload(kind, nbytes)
    calls = ctx.params["payload_calls"]
    # warmed with a small argument of the same kind: the workers' one-off ``import numpy``
    # (PPE's forked workers inherit the client's) is not part of the transfer rate
    with running(cls, ctx.timeout, ctx.tasks, _payload(kind, 256)) as ex:
        t0 = time.perf_counter()
        for _ in range(calls):  # one at a time: the end-to-end time of one big call
            got = ex.submit(ctx.tasks.size_of, data).result(timeout=ctx.timeout)
            if got != nbytes:
                raise AssertionError(f"the task saw {got} bytes, not {nbytes}")
        elapsed = time.perf_counter() - t0
    return {"rate": calls * nbytes / elapsed / 1e6}


def payload_bytes(cls: type, ctx: Context) -> Dict[str, float]:
    return _payload_rate(cls, ctx, "bytes")


def payload_numpy(cls: type, ctx: Context) -> Dict[str, float]:
    try:
        import numpy  # noqa: F401
    except ImportError:
        raise Skip("numpy is not installed") from None
    return _payload_rate(cls, ctx, "numpy")


def fanout(cls: type, ctx: Context) -> Dict[str, float]:
    n, seconds = ctx.params["fanout"], ctx.params["fanout_sleep"]
    with running(cls, ctx.timeout, ctx.tasks) as ex:
        t0 = time.perf_counter()
        fs = [ex.submit(ctx.tasks.sleep, seconds) for _ in range(n)]
        count = 0
        for fut in ex.as_completed(fs):
            fut.result(timeout=ctx.timeout)
            count += 1
        elapsed = time.perf_counter() - t0
    if count != n:
        raise AssertionError(f"as_completed gave {count} of {n} futures")
    return {"wall": elapsed}


def startup(cls: type, ctx: Context) -> Dict[str, float]:
    ex: Adapter = cls(ctx.timeout)
    t0 = time.perf_counter()
    ex.start()
    try:
        ex.submit(ctx.tasks.noop).result(timeout=ctx.timeout)
        t1 = time.perf_counter()
    finally:
        t2 = time.perf_counter()
        ex.close()
    t3 = time.perf_counter()
    return {"first": t1 - t0, "shutdown": t3 - t2}


CPU_ROLES = ("client", "broker", "agent", "zygote", "task processes")


def cpu(cls: type, ctx: Context) -> Dict[str, float]:
    if not procstat.AVAILABLE:
        raise Skip("no /proc")
    n = ctx.params["cpu"]
    with running(cls, ctx.timeout, ctx.tasks) as ex:
        roles = ex.cpu_roles()
        before = {role: procstat.snapshot(pids) for role, pids in roles.items()}
        fs = [ex.submit(ctx.tasks.noop) for _ in range(n)]
        ex.results(fs)
        after = {role: procstat.snapshot(pids) for role, pids in roles.items()}
        del fs
        for role, pids in ex.cpu_roles().items():  # processes replaced meanwhile count too
            after[role].update(procstat.snapshot(set(pids) - set(roles[role])))
    out = {role: procstat.cpu_delta(before[role], after[role]) / n * 1e6 for role in roles}
    out["total"] = sum(out.values())
    return out


# -- cancel: queued futures behind busy workers ---------------------------------------------
def _wait_for_files(paths: List[str], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not all(os.path.exists(path) for path in paths):
        if time.monotonic() > end:
            raise TimeoutError(f"the blocking tasks did not start within {timeout} s")
        time.sleep(0.005)


def _cancel_queued(cls: type, ctx: Context,
                   cancel: Callable[[Adapter, List[Any]], List[Any]]) -> Dict[str, float]:
    """Time ``cancel`` on no-op tasks queued behind one blocking task per worker.

    The blocking tasks tell (by a file) that they run before the no-ops are submitted, so
    that none of those can start; they are released after the timing, and everything
    not cancelled is waited for, so that the executor shuts down idle.  Of the queued
    futures at most 1% (at least 5: PPE moves max_workers + 1 calls into its call queue,
    where they count as running) may be left uncancelled."""
    n = ctx.params["cancel"]
    with tempfile.TemporaryDirectory(prefix="zmqexec-bench-") as tmp, \
            running(cls, ctx.timeout, ctx.tasks) as ex:
        go = os.path.join(tmp, "go")
        started = [os.path.join(tmp, f"started-{i}") for i in range(WORKERS)]
        try:
            blockers = [ex.submit(ctx.tasks.hold, path, go, ctx.timeout) for path in started]
            _wait_for_files(started, ctx.timeout)
            fs = [ex.submit(ctx.tasks.noop) for _ in range(n)]
            t0 = time.perf_counter()
            said = cancel(ex, fs)
            elapsed = time.perf_counter() - t0
        finally:
            open(go, "w").close()
        cancelled = [fut for fut in fs if fut.cancelled()]
        ex.results(blockers + [fut for fut in fs if not fut.cancelled()])
    if any(not fut.cancelled() for fut in said):
        raise AssertionError("a future reported cancelled does not say cancelled()")
    if len(cancelled) < n - max(n // 100, 5):
        raise AssertionError(f"only {len(cancelled)} of {n} queued futures were cancelled")
    return {"wall": elapsed, "cancelled": len(cancelled)}


def cancel_each(cls: type, ctx: Context) -> Dict[str, float]:
    return _cancel_queued(cls, ctx, lambda ex, fs: ex.cancel_each(fs))


def cancel_batch(cls: type, ctx: Context) -> Dict[str, float]:
    why = cls.cancel_batch_skip()
    if why:
        raise Skip(why)
    return _cancel_queued(cls, ctx, lambda ex, fs: ex.cancel_batch(fs))


# -- dependencies: futures as arguments, against results fetched and resubmitted ----------
def _graph(cls: type, ctx: Context, shape: str, as_arguments: bool) -> Dict[str, float]:
    """A chain of n dependent tasks, or n tasks feeding one: each input passed on as a
    future (the broker forwards it), or fetched by the client with ``result()`` and
    submitted again (what an executor without dependencies needs)."""
    if as_arguments:
        why = cls.futures_as_arguments_skip()
        if why:
            raise Skip(why)
    n, tasks, timeout = ctx.params["graph"], ctx.tasks, ctx.timeout
    with running(cls, ctx.timeout, tasks) as ex:
        t0 = time.perf_counter()
        if shape == "chain" and as_arguments:
            fut = ex.submit(tasks.identity, 0)
            for _ in range(n - 1):
                fut = ex.submit(tasks.identity, fut)
            fut.result(timeout=timeout)
        elif shape == "chain":
            value = 0
            for _ in range(n):
                value = ex.submit(tasks.identity, value).result(timeout=timeout)
        else:
            parts = [ex.submit(tasks.identity, i) for i in range(n)]
            inputs = parts if as_arguments else ex.results(parts)
            assert ex.submit(tasks.total, *inputs).result(timeout=timeout) == n * (n - 1) // 2
        return {"wall": time.perf_counter() - t0}


def chain_futures(cls: type, ctx: Context) -> Dict[str, float]:
    return _graph(cls, ctx, "chain", True)


def chain_client(cls: type, ctx: Context) -> Dict[str, float]:
    return _graph(cls, ctx, "chain", False)


def fanin_futures(cls: type, ctx: Context) -> Dict[str, float]:
    return _graph(cls, ctx, "fan-in", True)


def fanin_client(cls: type, ctx: Context) -> Dict[str, float]:
    return _graph(cls, ctx, "fan-in", False)


# -- memory: in a fresh interpreter ---------------------------------------------------------
def _probe(cls: type, ctx: Context, kind: str, *args: str) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.memprobe", kind, cls.key, str(ctx.timeout), *args]
    if ctx.main_funcs:
        cmd.append("--main-funcs")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=ctx.timeout * 2, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"bench.memprobe exited {proc.returncode}: {tail}")
    doc = json.loads(lines[-1])
    if "skip" in doc:
        raise Skip(doc["skip"])
    return doc


def memory_pending(cls: type, ctx: Context) -> Dict[str, float]:
    doc = _probe(cls, ctx, "pending", str(ctx.params["pending"]))
    return {"per_task": doc["per_task"]}


def memory_buffersize(cls: type, ctx: Context) -> Dict[str, float]:
    why = cls.buffersize_skip()
    if why:
        raise Skip(why)
    p = ctx.params
    doc = _probe(cls, ctx, "buffersize", str(p["buffer_items"]), str(p["buffer_chunksize"]),
                 str(p["buffersize"]))
    return {"start": doc["start"] / MiB, "peak": doc["peak"] / MiB}


def workloads(p: Dict[str, Any], main_funcs: bool) -> List[Workload]:
    """The table's rows, labelled with the counts actually used."""
    fn = "`__main__`" if main_funcs else "importable"
    return [
        Workload("throughput", throughput, [Metric(
            "rate", f"{_n(p['throughput'])} no-op tasks ({fn} fn), submit all, wait all",
            "tasks/s", "higher")]),
        Workload("throughput", throughput_main, [Metric(
            "rate", "same, fn defined in `__main__`", "tasks/s", "higher")]),
        Workload("latency", latency, [
            Metric("median", f"{_n(p['latency'])} × sequential `submit().result()`, median",
                   "µs", "lower"),
            Metric("p99", "same, p99", "µs", "lower")]),
        Workload("map", map_chunked, [Metric(
            "rate", f"{_n(p['map_chunked'])} items, chunksize={_n(p['chunksize'])}",
            "items/s", "higher")]),
        Workload("map", map_unchunked, [Metric(
            "rate", f"{_n(p['map_unchunked'])} items, chunksize=1", "items/s", "higher")]),
        Workload("payload", payload_bytes, [Metric(
            "rate", f"{p['payload_mib']} MiB `bytes` argument, returns `len()`", "MB/s",
            "higher")]),
        Workload("payload", payload_numpy, [Metric(
            "rate", f"{p['payload_mib']} MiB numpy array argument, returns `nbytes`", "MB/s",
            "higher")]),
        Workload("fan-out", fanout, [Metric(
            "wall", f"{p['fanout']} × `sleep({p['fanout_sleep']})` via `as_completed` "
            f"(ideal {p['fanout'] * p['fanout_sleep'] / 2:g})", "s", "lower")]),
        Workload("startup", startup, [
            Metric("first", "construct → first result", "s", "lower"),
            Metric("shutdown", "`shutdown()`", "s", "lower")]),
        Workload("memory", memory_pending, [Metric(
            "per_task", f"client RSS growth per pending task, {_n(p['pending'])} queued",
            "bytes", "lower")]),
        Workload("memory", memory_buffersize, [
            Metric("start", f"`map(buffersize={p['buffersize']}, "
                   f"chunksize={p['buffer_chunksize']})` over {_n(p['buffer_items'])} items: "
                   "client RSS at start", "MiB", "lower"),
            Metric("peak", "same, peak client RSS during the map", "MiB", "lower")]),
        Workload("cpu", cpu, [Metric(
            role, f"CPU per task ({_n(p['cpu'])} no-ops): {role}", "µs", "lower")
            for role in (*CPU_ROLES, "total")]),
        Workload("cancel", cancel_each, [Metric(
            "wall", f"{_n(p['cancel'])} queued no-op tasks (every worker blocked): "
            "`fut.cancel()` on each", "s", "lower")]),
        Workload("cancel", cancel_batch, [Metric(
            "wall", "same, all in one call: `ex.cancel(futures)`", "s", "lower")]),
        Workload("deps", chain_futures, [Metric(
            "wall", f"chain of {_n(p['graph'])} dependent no-op tasks, futures as arguments",
            "s", "lower")]),
        Workload("deps", chain_client, [Metric(
            "wall", "same, each result fetched with `result()` and submitted again", "s",
            "lower")]),
        Workload("deps", fanin_futures, [Metric(
            "wall", f"fan-in of {_n(p['graph'])} tasks into one, futures as arguments", "s",
            "lower")]),
        Workload("deps", fanin_client, [Metric(
            "wall", "same, the results fetched and passed as values", "s", "lower")]),
    ]


def median(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None
