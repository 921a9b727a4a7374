"""The latency floor of each kind of hop on this machine: ``python -m bench.hops``.

A lone task of a remote cluster crosses client -> broker -> agent -> task process and
back: four ZeroMQ ipc hops and two pipe hops; in the embedded default, user thread -> node
thread -> task process and back.  ProcessPoolExecutor crosses two pipe hops (and its
thread hand-offs).  This script measures round trips of bare echo chains with no zmqexec
code, so the latency table can be read against what the transport alone costs here:

- ``pipe``: parent <-> child over two one-way ``multiprocessing`` pipes (PPE's transport)
- ``zmq 1``: DEALER <-> ROUTER echo over ipc (2 ZeroMQ hops per round trip)
- ``zmq 2``: DEALER -> ROUTER relay -> DEALER echo over ipc (4 hops, zmqexec's broker path
  without the agent's pipe to its task process)
- ``node shape``: the embedded node's path with no zmqexec code: a user thread hands a
  message to a node thread (deque + wake pipe), which writes it to a forked child's pipe;
  the echo comes back to the node thread, which hands it to the waiting user thread
  through a condition.  Four hand-overs, as in ``ZMQExecutor()`` and ProcessPoolExecutor
  (which has one more: its feeder thread).
- ``skeleton``: the whole remote path (client I/O thread, broker, agent, task process)
  with no zmqexec code: a user thread hands a message to an I/O thread (deque + wake
  pipe), which owns a DEALER to a broker process's ROUTER; the broker routes it to an
  agent process's DEALER, the agent writes it to its task process's pipe, and the echo
  comes back the same way; the I/O thread hands it to the waiting user thread through a
  condition.  No real design of that shape can answer
  a lone task faster than this.
- ``ProcessPoolExecutor`` and ``ZMQExecutor``: a real ``submit(noop).result()`` on each,
  with 2 workers, in the same run: the latency row of ``python -m bench`` next to its floor.

It prints the median and p99 round trip in microseconds for each, the CPU time one
round trip costs (on-CPU time of the threads, ``/proc/PID/task/*/schedstat``), in this
process and in the chain's other processes, and how many times their threads went to
sleep per round trip (``voluntary_ctxt_switches``): each sleep ends in a wake-up, the
costly part of a hand-over when it wakes another CPU.  ``--one-cpu`` runs everything on one CPU:
a hand-over then costs a context switch instead of waking another CPU, so the CPU
columns show the chain's own work, and comparing the two runs shows what cross-CPU
wake-ups cost on this machine.
"""
from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import select
import statistics
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import zmq

from zmqexec import ZMQExecutor

from . import procstat


def _pipes(mp: Any) -> Tuple[Any, Any, Any, Any]:
    """Two one-way pipes, as zmqexec's task processes and ProcessPoolExecutor's queues
    use (a duplex ``Pipe`` is a socket pair, whose reads wake the other end for
    nothing): (ours to send, ours to receive, theirs to receive, theirs to send)."""
    theirs_in, ours_out = mp.Pipe(duplex=False)
    ours_in, theirs_out = mp.Pipe(duplex=False)
    return ours_out, ours_in, theirs_in, theirs_out


def _pipe_child(inbox: "multiprocessing.connection.Connection",
                outbox: "multiprocessing.connection.Connection") -> None:
    while True:
        data = inbox.recv_bytes()
        if not data:
            return
        outbox.send_bytes(data)


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


def _noop() -> None:
    return None


def _task(inbox: "multiprocessing.connection.Connection",
          outbox: "multiprocessing.connection.Connection") -> None:
    """The skeleton's task process: echo what the agent writes to the pipe."""
    while True:
        data = inbox.recv_bytes()
        outbox.send_bytes(data)
        if data == b"stop":
            return


def _agent(address: str) -> None:
    """The skeleton's agent: a DEALER to the broker and a pipe to one task process."""
    mp = multiprocessing.get_context("fork")
    to_task, from_task, theirs_in, theirs_out = _pipes(mp)
    child = mp.Process(target=_task, args=(theirs_in, theirs_out))
    child.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    sock.send(b"agent")
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(from_task.fileno(), zmq.POLLIN)
    client = b""
    while True:
        events = dict(poller.poll())
        if sock in events:
            client, data = sock.recv_multipart()
            to_task.send_bytes(data)
        if from_task.fileno() in events:
            data = from_task.recv_bytes()
            sock.send_multipart([client, data])
            if data == b"stop":
                break
    child.join()
    sock.close(linger=1000)
    ctx.term()


def _broker(address: str) -> None:
    """The skeleton's broker: one ROUTER; the agent says hello, clients' messages go to it."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(address)
    agent = b""
    early: List[List[bytes]] = []  # clients' messages from before the agent's hello
    while True:
        frames = router.recv_multipart()
        if frames[-1] == b"agent":
            agent = frames[0]
            for held in early:
                router.send_multipart([agent, *held])
        elif frames[0] == agent:
            router.send_multipart(frames[1:])
            if frames[-1] == b"stop":
                break
        elif agent:
            router.send_multipart([agent, *frames])
        else:
            early.append(frames)
    router.close(linger=1000)
    ctx.term()


class _Handover:
    """A user thread handing messages to a thread of its own (deque and wake-up pipe) and
    waiting for the answer, which that thread hands back through a condition."""

    def __init__(self) -> None:
        self._queue: Deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._reply: Optional[bytes] = None
        self._wake_r, self._wake_w = os.pipe()

    def _start(self, target: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def _woken(self) -> List[bytes]:
        """What the user thread queued (its thread polled the wake-up pipe readable)."""
        os.read(self._wake_r, 4096)
        taken = []
        while self._queue:
            taken.append(self._queue.popleft())
        return taken

    def _answer(self, data: bytes) -> None:
        with self._cond:
            self._reply = data
            self._cond.notify()

    def round_trip(self, data: bytes) -> bytes:
        with self._cond:
            self._reply = None
            self._queue.append(data)
            os.write(self._wake_w, b"x")
            while self._reply is None:
                self._cond.wait()
            return self._reply

    def _close(self, last: bytes) -> None:
        self.round_trip(last)
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)


class _SkeletonClient(_Handover):
    """The client side of the skeleton: a user thread, an I/O thread owning the DEALER."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self._ctx = zmq.Context()
        self._address = address
        self._start(self._io)

    def _io(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.connect(self._address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._wake_r in events:
                for data in self._woken():
                    sock.send(data)
            if sock in events:
                data = sock.recv()
                self._answer(data)
                if data == b"stop":
                    break
        sock.close(linger=0)

    def close(self) -> None:
        self._close(b"stop")
        self._ctx.term()


class _NodeShape(_Handover):
    """The embedded node's path with no zmqexec code: a user thread, a node thread that
    polls a wake-up pipe and a task process's pipe, the task process (an echo)."""

    def __init__(self, mp: Any) -> None:
        super().__init__()
        self._send, self._recv, theirs_in, theirs_out = _pipes(mp)
        self._child = mp.Process(target=_pipe_child, args=(theirs_in, theirs_out))
        self._child.start()  # (before the node thread: never fork while threads run)
        theirs_in.close()
        theirs_out.close()
        self._start(self._node)

    def _node(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        poller.register(self._recv.fileno(), select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    for data in self._woken():
                        self._send.send_bytes(data)
                    continue
                try:
                    data = self._recv.recv_bytes()
                except EOFError:  # the child ends at an empty message
                    data = b""
                self._answer(data)
                if not data:
                    return

    def close(self) -> None:
        self._close(b"")
        self._child.join(10)
        self._send.close()
        self._recv.close()


def _counts(pids: List[int]) -> Tuple[int, int, int]:
    """So far: on-CPU nanoseconds of this process and of ``pids`` (its other
    processes), and the times all their threads went to sleep."""
    me = os.getpid()
    own = procstat.on_cpu_ns(me) or 0
    slept = sum(procstat.sleeps(pid) or 0 for pid in [me, *pids])
    return own, sum(procstat.on_cpu_ns(pid) or 0 for pid in pids), slept


def _report(name: str, samples: List[float],
            cpu: Optional[Tuple[float, float, float]]) -> None:
    samples = sorted(samples)
    p99 = samples[max(0, -(-99 * len(samples) // 100) - 1)]
    spent = "| n/a | n/a | n/a |" if cpu is None else \
        f"| {cpu[0]:,.0f} | {cpu[1]:,.0f} | {cpu[2]:.1f} |"
    print(f"| {name} | {statistics.median(samples):,.0f} | {p99:,.0f} {spent}")


Chain = Tuple[str, Callable[[], object], Callable[[], None]]


def _chains(tmp: str, mp: Any) -> List[Chain]:
    """Start every chain; each is (name, one round trip, close)."""
    chains: List[Chain] = []
    procs: List["multiprocessing.process.BaseProcess"] = []

    to_child, from_child, theirs_in, theirs_out = _pipes(mp)
    procs.append(mp.Process(target=_pipe_child, args=(theirs_in, theirs_out)))
    chains.append(("pipe (ProcessPoolExecutor's transport)",
                   lambda: (to_child.send_bytes(b"x" * 64), from_child.recv_bytes()),
                   lambda: to_child.send_bytes(b"")))

    ctx = zmq.Context()
    for hops in (1, 2):
        echo_addr = f"ipc://{tmp}/echo{hops}"
        front = f"ipc://{tmp}/front{hops}"
        procs.append(mp.Process(target=_echo, args=(echo_addr,)))
        if hops == 2:
            procs.append(mp.Process(target=_relay, args=(front, echo_addr)))
        sock = ctx.socket(zmq.DEALER)
        sock.connect(front if hops == 2 else echo_addr)

        def zmq_once(sock: zmq.Socket = sock) -> object:
            sock.send(b"x" * 64)
            return sock.recv()

        def zmq_close(sock: zmq.Socket = sock) -> None:
            sock.send(b"stop")
            sock.recv()
            sock.close(linger=0)

        path = "client, broker, worker" if hops == 2 else "client, echo"
        chains.append((f"zmq ipc, {2 * hops} hops ({path})", zmq_once, zmq_close))

    shape = _NodeShape(mp)
    chains.append(("node shape (the embedded path: a node thread, a pipe)",
                   lambda: shape.round_trip(b"x" * 64), shape.close))

    skeleton_addr = f"ipc://{tmp}/broker"
    procs.append(mp.Process(target=_broker, args=(skeleton_addr,)))
    procs.append(mp.Process(target=_agent, args=(skeleton_addr,)))
    for p in procs:
        p.start()
    client = _SkeletonClient(skeleton_addr)
    chains.append(("skeleton of the remote path (threads, 4 zmq hops, a pipe)",
                   lambda: client.round_trip(b"x" * 64), client.close))

    pool = ProcessPoolExecutor(2, mp_context=mp)
    chains.append(("ProcessPoolExecutor(2) submit(noop).result()",
                   lambda: pool.submit(_noop).result(timeout=60), pool.shutdown))

    zex = ZMQExecutor(2)
    zex.submit(_noop).result(timeout=60)
    chains.append(("ZMQExecutor(2) submit(noop).result()",
                   lambda: zex.submit(_noop).result(timeout=60), zex.shutdown))

    def close_all() -> None:
        ctx.term()
        for p in procs:
            p.join(10)

    chains.append(("", lambda: None, close_all))
    return chains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="round trips per chain")
    parser.add_argument("--rounds", type=int, default=5,
                        help="the chains take turns this many times (noise hits all alike)")
    parser.add_argument("--one-cpu", action="store_true",
                        help="run this process and every process it starts on one CPU")
    args = parser.parse_args()
    cpus = "all CPUs"
    if args.one_cpu:  # threads and children inherit the mask
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        cpus = "one CPU (--one-cpu)"
    mp = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        chains = _chains(tmp, mp)
        timed = [c for c in chains if c[0]]
        samples: Dict[str, List[float]] = {name: [] for name, _, _ in timed}
        spent: Dict[str, List[int]] = {name: [0, 0, 0] for name, _, _ in timed}
        for _name, once, _ in timed:  # warm-up (starts the pools' processes)
            for _ in range(min(100, args.n)):
                once()
        others = procstat.descendants(os.getpid()) if procstat.AVAILABLE else []
        counted = procstat.AVAILABLE and procstat.on_cpu_ns(os.getpid()) is not None
        per_round = max(1, args.n // args.rounds)
        for _ in range(args.rounds):
            for name, once, _ in timed:  # the other chains wait idle meanwhile
                before = _counts(others) if counted else (0, 0, 0)
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    once()
                    samples[name].append((time.perf_counter() - t0) * 1e6)
                after = _counts(others) if counted else (0, 0, 0)
                for at in range(3):
                    spent[name][at] += after[at] - before[at]
        for _, _, close in chains:
            close()
    print("| chain | median µs | p99 µs | CPU µs per round trip: this process | "
          "other processes | sleeps per round trip |\n|---|---|---|---|---|---|")
    trips = per_round * args.rounds
    for name, _, _ in timed:
        cpu = (spent[name][0] / trips / 1e3, spent[name][1] / trips / 1e3,
               spent[name][2] / trips) if counted else None
        _report(name, samples[name], cpu)
    print(f"\n{os.cpu_count()} CPUs, run on {cpus}; every row but the last two is a bare chain "
          f"with no zmqexec code; the chains took turns in {args.rounds} rounds.")


if __name__ == "__main__":
    main()
