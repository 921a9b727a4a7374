"""The newcomer's path through the README, step by step on one machine: make
keys, start a broker and two agents with the command line, watch them with
``zmqexec status --watch``, and run a dask array computation on the cluster (the quick
start itself is run by test_examples.py)."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest
from conftest import Cluster, zmqexec_cmd

CLIENT = """
import sys, dask, dask.array as da
from zmqexec import ZMQExecutor
with ZMQExecutor(address=sys.argv[1], keys=sys.argv[2]) as ex:
    ex.wait_for_workers(2, timeout=30)
    x = da.arange(10**6, chunks=10**5)
    print(dask.compute(x.sum(), scheduler=ex)[0])
"""


def test_keys_broker_two_agents_status_watch_and_dask(tmp_path):
    pytest.importorskip("dask.array", reason="dask is not installed")
    keys = str(tmp_path / "zx")
    made = subprocess.run(zmqexec_cmd("keygen", keys), capture_output=True, text=True,
                          timeout=30)
    assert made.returncode == 0 and "wrote" in made.stdout, made.stderr
    cluster = Cluster(agents=2, nprocs=1, broker_args=("--keys", keys),
                      agent_args=("--keys", keys))
    address = cluster.address
    watch = None
    try:
        watch = subprocess.Popen(zmqexec_cmd("status", address, "--watch", "--keys", keys),
                                 stdout=subprocess.PIPE)
        client = subprocess.run([sys.executable, "-c", CLIENT, address, keys],
                                capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == str(sum(range(10**6)))
        screen, end = b"", time.monotonic() + 30
        while b"agents 2" not in screen.split(b"\x1b[H\x1b[2J")[-1] and time.monotonic() < end:
            if select.select([watch.stdout], [], [], 1.0)[0]:
                screen += os.read(watch.stdout.fileno(), 65536)
        assert b"agents 2" in screen and b"tasks/s" in screen, screen[-2000:]
    finally:
        if watch is not None:
            watch.send_signal(signal.SIGINT)
            watch.wait(30)
            watch.stdout.close()
        cluster.close()
