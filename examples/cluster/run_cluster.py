"""A real cluster on this machine: a broker and two agents started with the command line.

The broker, both agents and the client are separate processes, exactly as they would be
on several machines (see README.md for that).  The broker prints
``zmqexec broker listening on ADDR`` as its first line, so there is nothing to sleep on.

Run it from the repository root::

    python examples/cluster/run_cluster.py
"""
import os
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def zmqexec(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "zmqexec", *args],
                            stdin=subprocess.DEVNULL, **kwargs)


if __name__ == "__main__":
    broker = zmqexec("broker", "--bind", "tcp://127.0.0.1:0", stdout=subprocess.PIPE, text=True)
    procs = [broker]
    try:
        line = broker.stdout.readline()  # "zmqexec broker listening on tcp://127.0.0.1:PORT"
        if not line.startswith("zmqexec broker listening on "):
            sys.exit(f"the broker did not start: {line!r}")
        address = line.split()[-1]
        print(f"broker at {address}", flush=True)  # before the client writes
        procs += [zmqexec("worker", address, "--nprocs", "1") for _ in range(2)]
        client = subprocess.run([sys.executable, os.path.join(HERE, "client.py"), address],
                                timeout=120)
    finally:
        for proc in reversed(procs):  # agents first, then the broker
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            proc.wait(timeout=30)
        broker.stdout.close()
    print(f"cluster stopped (exit codes {[proc.returncode for proc in procs]})")
    sys.exit(client.returncode)
