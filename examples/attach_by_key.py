"""Two client processes share one result by its key.

Process A submits a task under the key ``"shared-result"`` and starts process B, which
joins A's embedded cluster through ``ex.address`` and attaches to the same key with
``zmqexec.Future(key)``: the task runs once, and both print the same value.

Run it from the repository root (it starts process B itself)::

    python examples/attach_by_key.py
"""
import os
import subprocess
import sys
import time

import zmqexec
from zmqexec import ZMQExecutor

KEY = "shared-result"


def answer():
    time.sleep(1.0)  # slow-ish: B attaches while the task is still running
    return f"42, computed once by worker pid {os.getpid()}"


def process_a():
    with ZMQExecutor(max_workers=2) as ex:
        fut = ex.options(key=KEY).submit(answer)
        cmd = [sys.executable, os.path.abspath(__file__), "attach", ex.address]
        subprocess.run(cmd, check=True, timeout=60)  # process B, below
        print(f"A got: {fut.result(timeout=30)}")


def process_b(address):
    with ZMQExecutor(address=address) as ex:
        fut = zmqexec.Future(KEY, client=ex)
        print(f"B got: {fut.result(timeout=30)}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["attach"]:
        process_b(sys.argv[2])
    else:
        process_a()
