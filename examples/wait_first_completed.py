"""Wait for the first of several tasks to finish, then cancel the others.

``zmqexec.wait`` and ``FIRST_COMPLETED`` are the stdlib's own objects, re-exported, so
code written for ProcessPoolExecutor works unchanged.  As with the stdlib, ``cancel()``
succeeds only while a task is pending; one already running is left to finish.

Run it from the repository root::

    python examples/wait_first_completed.py
"""
import time

from zmqexec import FIRST_COMPLETED, ZMQExecutor, wait


def nap(seconds):
    time.sleep(seconds)
    return seconds


if __name__ == "__main__":
    durations = {"quick": 0.1, "medium": 1.0, "slow": 1.5, "slowest": 2.0}
    with ZMQExecutor(max_workers=2) as ex:
        names = {ex.submit(nap, seconds): name for name, seconds in durations.items()}
        done, not_done = wait(names, timeout=30, return_when=FIRST_COMPLETED)
        for fut in done:
            print(f"first finished: {names[fut]} ({fut.result(timeout=0)} s)")
        for fut in sorted(not_done, key=lambda f: durations[names[f]]):
            if fut.cancel():
                print(f"cancelled: {names[fut]}")
            else:
                print(f"already running, left to finish: {names[fut]}")
