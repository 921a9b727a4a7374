"""``python -m bench``: run the workloads, interleaving the executors, and print the report.

Why this file also holds task functions: ``tasks.main_copies`` defines the functions of
``bench/tasks.py`` again here, in the running script's ``__main__``, so the benchmark can
measure both kinds of function a user submits: importable ones (pickled by reference, the
default) and ones defined in the script (pickled by value by cloudpickle, ``--main-funcs``,
and always on the "fn defined in `__main__`" throughput row).

The report (markdown) goes to stdout, progress to stderr.
"""
import argparse
import sys
import time
import traceback

from . import tasks as task_module
from .executors import ALL, BY_KEY, Dask, Skip
from .report import Results, load, machine_facts, repetitions, table
from .workloads import FULL, SMOKE, Context, workloads

MAIN_TASKS = task_module.main_copies(globals())
MEMORY_MAX_REPS = 3  # memory is measured in fresh interpreters: stable, and slow on Dask


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5, help="measured repetitions (default 5)")
    p.add_argument("--warmup", type=int, default=1,
                   help="unrecorded repetitions before them (default 1)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny counts, 1 repetition, no warm-up: checks that every workload "
                        "runs; its numbers mean nothing")
    p.add_argument("--main-funcs", action="store_true",
                   help="use task functions defined in __main__ for every workload "
                        "(default: the importable bench.tasks)")
    p.add_argument("--executors",
                   help="comma-separated, from: " + ", ".join(BY_KEY) + " (default: all, "
                        "but --smoke leaves dask out unless named here: its cluster start "
                        "alone would take most of a minute; those not installed are "
                        "skipped with a note)")
    p.add_argument("--only", default="",
                   help="comma-separated workload names to run (default: all)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds any single wait may take (default 600)")
    p.add_argument("--output", help="also write the report to this file")
    p.add_argument("--note", action="append", default=[],
                   help="a line to add to the report's header (repeatable)")
    args = p.parse_args(argv)
    if args.smoke:
        args.reps, args.warmup = 1, 0
    if args.executors is None:
        args.executors = ",".join(cls.key for cls in ALL if not (args.smoke and cls is Dask))
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    unknown = set(args.executors.split(",")) - set(BY_KEY)
    if unknown:
        p.error(f"unknown executor(s): {', '.join(sorted(unknown))}")
    return args


def progress(start, text):
    print(f"[{time.monotonic() - start:7.1f}s] {text}", file=sys.stderr, flush=True)


def main(argv=None):
    args = parse(argv)
    start = time.monotonic()
    params = SMOKE if args.smoke else FULL
    wanted = args.executors.split(",")
    executors, notes = [], []
    for cls in ALL:
        if cls.key not in wanted:
            continue
        why = cls.unavailable()
        if why:
            notes.append(f"{cls.label} skipped: {why}")
            progress(start, notes[-1])
        else:
            executors.append(cls)
    ctx = Context(params, MAIN_TASKS if args.main_funcs else task_module.imported(),
                  MAIN_TASKS, args.timeout, args.main_funcs)
    wls = workloads(params, args.main_funcs)
    if args.only:
        names = set(args.only.split(","))
        wls = [wl for wl in wls if wl.name in names]
    settings = [
        f"mode: {'smoke (tiny counts: the numbers mean nothing)' if args.smoke else 'full'}; "
        f"{args.reps} measured repetition(s) after {args.warmup} warm-up "
        f"(memory: at most {MEMORY_MAX_REPS}, no warm-up, each in a fresh interpreter); "
        "executors interleaved within each repetition; table cells are medians",
        f"task functions: {ctx.tasks.origin} by default"
        + ("" if args.main_funcs else " (`--main-funcs` for ones defined in `__main__`)"),
        *args.note,
    ]
    header = ["# zmqexec benchmark", "", *machine_facts(settings), ""]
    results = Results()
    for i, wl in enumerate(wls):
        memory = wl.name == "memory"
        reps = min(args.reps, MEMORY_MAX_REPS) if memory else args.reps
        warmup = 0 if memory else args.warmup
        for rep in range(-warmup, reps):
            what = "warm-up" if rep < 0 else f"rep {rep + 1}/{reps}"
            for cls in executors:
                if (i, cls.key) in results.status:
                    continue  # skipped or failed once: not again
                try:
                    values = wl.run(cls, ctx)
                except Skip as skip:
                    results.status[(i, cls.key)] = f"skipped: {skip}"
                    progress(start, f"{wl.name} {cls.label}: skipped: {skip}")
                    continue
                except Exception as exc:
                    traceback.print_exc(file=sys.stderr)
                    results.status[(i, cls.key)] = f"error: {type(exc).__name__}"
                    progress(start, f"{wl.name} {cls.label}: error: {exc!r}")
                    continue
                if rep >= 0:
                    results.add(i, cls.key, values)
                shown = ", ".join(f"{k}={v:,.4g}" for k, v in values.items())
                progress(start, f"{wl.name} ({wl.metrics[0].label[:40]}) {what} "
                                f"{cls.label}: {shown}")
    missing = [f"{wl.name} / {cls.label}" for i, wl in enumerate(wls) for cls in executors
               if (i, cls.key) not in results.status
               and not any(results.values.get((i, m.key), {}).get(cls.key)
                           for m in wl.metrics)]
    lines = header + table(wls, executors, results) + [""]
    lines += [f"- {cls.label}: {cls.note}" for cls in executors]
    lines += [f"- {note}" for note in notes]
    lines += ["- ratio: zmqexec vs PPE, computed so that > 1 means zmqexec is better: "
              "zmqexec/PPE where higher is better, PPE/zmqexec where lower is better",
              "- n/a: the executor has no such process (broker, agent) or the row does not "
              "apply; CPU is utime+stime from /proc/PID/stat over the run, per task",
              f"- load average at end {load()}; wall time of the whole run "
              f"{time.monotonic() - start:.0f} s", ""]
    lines += ["## All repetitions", ""] + repetitions(wls, executors, results) + [""]
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    failed = results.errors() + [f"no result: {m}" for m in missing]
    for problem in failed:
        print(f"bench: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
