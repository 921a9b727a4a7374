"""A small pipeline of dependent tasks: futures passed as arguments.

Three files are "loaded" and cleaned in parallel, a summary waits for all of them (a
fan-in), and a report waits for the summary. The tasks wait at the broker for their
inputs, which reach them without passing through this program. A second branch shows an
error travelling down the graph: the task after a failing one never runs, and its future
raises the same error.

Run it from the repository root::

    python examples/pipeline.py
"""
from zmqexec import ZMQExecutor

DATA = {"a.csv": [3, 1, 2], "b.csv": [10, 20], "c.csv": [7]}


def load(name):
    if name not in DATA:
        raise FileNotFoundError(name)
    return list(DATA[name])


def clean(rows):
    return sorted(rows)


def summarize(parts):
    return {"files": len(parts), "rows": sum(len(p) for p in parts),
            "total": sum(sum(p) for p in parts)}


def report(summary):
    return f"{summary['files']} files, {summary['rows']} rows, total {summary['total']}"


if __name__ == "__main__":
    with ZMQExecutor(max_workers=2) as ex:
        cleaned = [ex.submit(clean, ex.submit(load, name)) for name in DATA]
        summary = ex.submit(summarize, cleaned)  # a list of futures: waits for all three
        print("report:", ex.submit(report, summary).result(timeout=60))

        broken = ex.submit(clean, ex.submit(load, "missing.csv"))
        try:
            ex.submit(report, ex.submit(summarize, [broken])).result(timeout=60)
        except FileNotFoundError as exc:
            print(f"report of the broken branch: {type(exc).__name__}: {exc}")
