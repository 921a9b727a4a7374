"""Quickstart: ZMQExecutor is a drop-in concurrent.futures Executor.

Shows submit, map and as_completed on the embedded default: ``ZMQExecutor()`` starts
its own broker and worker processes on this machine and stops them on exit.

Run it from the repository root::

    python examples/quickstart.py
"""
from zmqexec import ZMQExecutor, as_completed


def square(x):
    return x * x


def add(a, b):
    return a + b


if __name__ == "__main__":
    with ZMQExecutor(max_workers=2) as ex:
        # submit: one call, one Future
        fut = ex.submit(add, 2, 3)
        print(f"add(2, 3) = {fut.result(timeout=30)}")

        # map: results in input order
        print(f"squares: {list(ex.map(square, range(10), timeout=30))}")

        # as_completed: futures in the order they finish
        futures = {ex.submit(square, n): n for n in (3, 4, 5)}
        total = 0
        for done in as_completed(futures, timeout=30):
            total += done.result(timeout=0)
        print(f"sum of squares of 3, 4, 5 = {total}")
