"""A producer program and a consumer program exchange futures through a Queue.

This script owns the cluster (an embedded one) and starts two more programs that join it
through ``ex.address``: a producer that submits tasks and puts their futures into the
Queue ``"squares"``, then exits, and a consumer, started after it, that takes the futures
in order and prints their results. The queue holds the futures, so their results wait for
the consumer although the program that submitted them is gone.

Run it from the repository root::

    python examples/shared_queue.py
"""
import subprocess
import sys
import time

from zmqexec import Queue, ZMQExecutor

COUNT = 5


def square(x):
    time.sleep(0.1)
    return x * x


def produce(address):
    with ZMQExecutor(address=address) as ex:
        queue = Queue("squares", client=ex)
        for x in range(COUNT):
            queue.put(ex.submit(square, x))
        queue.put("done")  # any small picklable value travels too
        print(f"producer: queued {COUNT} futures, leaving", flush=True)


def consume(address):
    with ZMQExecutor(address=address) as ex:
        queue = Queue("squares", client=ex)
        while True:
            item = queue.get(timeout=60)
            if item == "done":
                break
            print(f"consumer: {item.key} -> {item.result(timeout=60)}", flush=True)


def main():
    with ZMQExecutor(max_workers=2) as ex:
        here = [sys.executable, __file__]
        subprocess.run([*here, "produce", ex.address], check=True, timeout=60)
        subprocess.run([*here, "consume", ex.address], check=True, timeout=60)
        print(f"queued items left: {Queue('squares', client=ex).qsize()}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["produce"]:
        produce(sys.argv[2])
    elif sys.argv[1:2] == ["consume"]:
        consume(sys.argv[2])
    else:
        main()
