"""The latency floor of each kind of hop on this machine: ``python -m bench.hops``.

A lone task in zmqexec crosses client -> broker -> agent -> task process and back: four
ZeroMQ ipc hops and two pipe hops.  ProcessPoolExecutor crosses two pipe hops (and two
thread hand-offs).  This script measures round trips of bare echo chains with no zmqexec
code, so the latency table can be read against what the transport alone costs here:

- ``pipe``: parent <-> child over a ``multiprocessing.Pipe`` (PPE's transport)
- ``zmq 1``: DEALER <-> ROUTER echo over ipc (2 ZeroMQ hops per round trip)
- ``zmq 2``: DEALER -> ROUTER relay -> DEALER echo over ipc (4 hops, zmqexec's broker path
  without the agent's pipe to its task process)

It prints the median and p99 round trip in microseconds for each.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from typing import Callable, List

import zmq


def _pipe_child(conn: "multiprocessing.connection.Connection") -> None:
    while True:
        data = conn.recv_bytes()
        if not data:
            return
        conn.send_bytes(data)


def _echo(address: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    while True:
        frames = sock.recv_multipart()
        sock.send_multipart(frames)
        if frames[-1] == b"stop":
            break
    sock.close(linger=1000)
    ctx.term()


def _relay(front: str, back: str) -> None:
    """A broker in miniature: a ROUTER that passes client messages to one DEALER worker."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(front)
    worker = ctx.socket(zmq.DEALER)
    worker.connect(back)
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(worker, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if router in events:
            frames = router.recv_multipart()
            worker.send_multipart(frames)
        if worker in events:
            frames = worker.recv_multipart()
            router.send_multipart(frames)
            if frames[-1] == b"stop":
                break
    router.close(linger=1000)
    worker.close(linger=1000)
    ctx.term()


def _time(n: int, once: Callable[[], None]) -> List[float]:
    for _ in range(min(100, n)):
        once()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        once()
        samples.append((time.perf_counter() - t0) * 1e6)
    return sorted(samples)


def _report(name: str, samples: List[float]) -> None:
    p99 = samples[max(0, -(-99 * len(samples) // 100) - 1)]
    print(f"| {name} | {statistics.median(samples):,.0f} | {p99:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="round trips per chain")
    n = parser.parse_args().n
    mp = multiprocessing.get_context("fork")
    print("| chain | median µs | p99 µs |\n|---|---|---|")

    parent, child = mp.Pipe()
    proc = mp.Process(target=_pipe_child, args=(child,))
    proc.start()

    def pipe_once() -> None:
        parent.send_bytes(b"x" * 64)
        parent.recv_bytes()

    _report("pipe (ProcessPoolExecutor's transport)", _time(n, pipe_once))
    parent.send_bytes(b"")
    proc.join()

    with tempfile.TemporaryDirectory() as tmp:
        for hops in (1, 2):
            echo_addr = f"ipc://{tmp}/echo{hops}"
            front = f"ipc://{tmp}/front{hops}"
            procs = [mp.Process(target=_echo, args=(echo_addr,))]
            if hops == 2:
                procs.append(mp.Process(target=_relay, args=(front, echo_addr)))
            for p in procs:
                p.start()
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.connect(front if hops == 2 else echo_addr)

            def zmq_once(sock: zmq.Socket = sock) -> None:
                sock.send_multipart([b"x" * 64])
                sock.recv_multipart()

            path = "client, broker, worker" if hops == 2 else "client, echo"
            _report(f"zmq ipc, {2 * hops} hops ({path})", _time(n, zmq_once))
            sock.send_multipart([b"stop"])
            sock.recv_multipart()
            sock.close(linger=0)
            ctx.term()
            for p in procs:
                p.join(10)
    print(f"\n{os.cpu_count()} CPUs; each row is a bare echo chain with no zmqexec code.")


if __name__ == "__main__":
    main()
