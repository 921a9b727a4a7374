"""Memory workloads, run by ``bench.workloads`` in a fresh interpreter per measurement.

Why a subprocess: RSS is a process-wide number and CPython keeps freed memory in its
arenas, so growth measured inside the long benchmark run could be hidden by memory that
earlier workloads freed.  A fresh ``python -m bench.memprobe`` has only imported the
executor and started it.  It prints one JSON line: the numbers, or ``{"skip": reason}``.

    python -m bench.memprobe pending EXECUTOR TIMEOUT N [--main-funcs]
    python -m bench.memprobe buffersize EXECUTOR TIMEOUT ITEMS CHUNKSIZE BUFFERSIZE
"""
import argparse
import gc
import json
import os
import sys
import tempfile
import time

from bench import procstat
from bench import tasks as task_module
from bench.executors import BY_KEY, Skip, running


def pending(cls, timeout, tasks, n):
    """Client RSS growth per task while ``n`` tasks are queued behind blocked workers:
    every task waits for a file that is created only after the measurement."""
    with tempfile.TemporaryDirectory(prefix="zmqexec-bench-") as tmp, \
            running(cls, timeout, tasks) as ex:
        go = os.path.join(tmp, "go")
        gc.collect()
        before = procstat.rss_bytes()
        fs = [ex.submit(tasks.wait_file, go, timeout) for _ in range(n)]
        time.sleep(0.5)  # let the executor's own threads take in what was submitted
        after = procstat.rss_bytes()
        open(go, "w").close()
        ex.cancel_all(fs)
        del fs
    return {"before": before, "after": after, "per_task": (after - before) / n}


def buffersize(cls, timeout, tasks, items, chunksize, size):
    """Client RSS before and at its peak during ``map(..., buffersize=size)`` over a lazy
    ``range(items)``: with a bounded window it must stay flat."""
    with running(cls, timeout, tasks) as ex:
        gc.collect()
        start = procstat.rss_bytes()
        hwm = procstat.reset_peak_rss()
        sampled, count = start, 0
        for _ in ex.map(tasks.identity, range(items), chunksize, size):
            count += 1
            if count % 10_000 == 0:
                sampled = max(sampled, procstat.rss_bytes())
        peak = max(sampled, procstat.rss_bytes(), procstat.peak_rss_bytes() if hwm else 0)
    if count != items:
        raise AssertionError(f"map yielded {count} of {items} results")
    return {"start": start, "peak": peak, "hwm_reset": hwm}


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.memprobe")
    parser.add_argument("kind", choices=("pending", "buffersize"))
    parser.add_argument("executor", choices=sorted(BY_KEY))
    parser.add_argument("timeout", type=float)
    parser.add_argument("numbers", type=int, nargs="+")
    parser.add_argument("--main-funcs", action="store_true")
    args = parser.parse_args()
    if not procstat.AVAILABLE:
        print(json.dumps({"skip": "no /proc"}))
        return
    tasks = task_module.main_copies(globals()) if args.main_funcs else task_module.imported()
    cls = BY_KEY[args.executor]
    try:
        if args.kind == "pending":
            doc = pending(cls, args.timeout, tasks, *args.numbers)
        else:
            doc = buffersize(cls, args.timeout, tasks, *args.numbers)
    except Skip as skip:
        doc = {"skip": str(skip)}
    print(json.dumps(doc))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
