"""A client of a running zmqexec cluster: connect by address, run tasks, show who ran them.

Start a broker and agents first (see README.md, or let run_cluster.py do it), then::

    python examples/cluster/client.py tcp://127.0.0.1:5555
"""
import sys
import time

from zmqexec import ZMQExecutor


def cube(x):
    time.sleep(0.1)  # long enough for both agents to get work
    return x ** 3


if __name__ == "__main__":
    address = sys.argv[1]
    with ZMQExecutor(address=address) as ex:
        ex.wait_for_workers(2, timeout=30)
        results = list(ex.map(cube, range(8), timeout=60))
        print(f"cubes: {results}")
        for agent in sorted(ex.status()["agents"], key=lambda a: a["name"]):
            print(f"agent {agent['name']}: {agent['finished']} tasks finished")
