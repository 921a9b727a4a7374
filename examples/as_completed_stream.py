"""Stream results as they complete, giving up on stragglers after a timeout.

``as_completed`` yields each future as soon as it is done, whatever the submission
order; with ``timeout=`` it raises ``TimeoutError`` when time is up, and the futures
that are not done yet can be reported or cancelled.

Run it from the repository root::

    python examples/as_completed_stream.py
"""
import time

import zmqexec
from zmqexec import ZMQExecutor, as_completed


def measure(name, seconds):
    time.sleep(seconds)
    return f"{name} took {seconds} s"


if __name__ == "__main__":
    jobs = {"straggler": 2.0, "a": 0.4, "b": 0.1, "c": 0.3, "d": 0.2}
    with ZMQExecutor(max_workers=3) as ex:
        futures = {ex.submit(measure, name, seconds): name for name, seconds in jobs.items()}
        try:
            for fut in as_completed(futures, timeout=1.5):
                print(f"done: {fut.result(timeout=0)}")
        except zmqexec.TimeoutError:
            late = sorted(name for fut, name in futures.items() if not fut.done())
            print(f"timed out waiting for: {', '.join(late)}")
            for fut in futures:
                fut.cancel()  # drops what has not started; running tasks finish
