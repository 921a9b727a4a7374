"""What an agent tells its broker, read off the wire: a tap between a real agent and broker.

The tap is a ROUTER the agent connects to and a DEALER to the broker; it forwards every
message both ways unchanged and keeps the command of each one the agent sent.
"""
from __future__ import annotations

import sys
import threading
from collections import Counter
from typing import Iterator, List, Tuple

import cloudpickle
import pytest
import zmq

import gates
from conftest import Cluster, wait_until
from zmqexec import ZMQExecutor
from zmqexec.wire import protocol as P

# The agent started from the command line does not have tests/ on sys.path.
cloudpickle.register_pickle_by_value(gates)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 30


def square(x: int) -> int:
    return x * x


class Tap:
    """Forwards agent <-> broker messages and counts the agent's commands by name."""

    def __init__(self, agent_side: str, broker: str) -> None:
        self.ctx = zmq.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.bind(agent_side)
        self.back = self.ctx.socket(zmq.DEALER)
        self.back.connect(broker)
        self.sent: List[str] = []  # the agent's commands, in order
        self.lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        agent = b""
        while not self._stop:
            for sock, _ in poller.poll(50):
                if sock is self.front:
                    agent, *frames = self.front.recv_multipart()
                    with self.lock:
                        self.sent.append(P.decode(frames).name)
                    self.back.send_multipart(frames)
                else:
                    self.front.send_multipart([agent, *self.back.recv_multipart()])
        self.front.close(linger=0)
        self.back.close(linger=0)

    def counts(self) -> Counter:
        with self.lock:
            return Counter(self.sent)

    def close(self) -> None:
        self._stop = True
        self._thread.join(10)
        self.ctx.term()


@pytest.fixture
def tapped(tmp_path) -> Iterator[Tuple[str, Tap]]:
    """A broker's address, and one agent (one task process) talking to it through a Tap."""
    cluster = Cluster(agents=0)
    tap = Tap(f"ipc://{tmp_path}/tap", cluster.address)
    cluster.add_agent(1, address=f"ipc://{tmp_path}/tap")
    yield cluster.address, tap
    cluster.close()
    tap.close()


def test_short_tasks_send_no_started_notice_of_their_own(tapped: Tuple[str, Tap],
                                                         tmp_path) -> None:
    """A lone task that ends within the agent's grace is reported by its RESULT alone
    (one message instead of two past the broker and the client); a task that runs on
    still says it started, while it runs."""
    address, tap = tapped
    with ZMQExecutor(address=address) as ex:
        ex.wait_for_workers(1, timeout=TIMEOUT)
        for i in range(50):
            assert ex.submit(square, i).result(timeout=TIMEOUT) == i * i
        counts = tap.counts()
        assert counts["RESULT"] >= 1, counts
        # each went alone to an idle task process; without the grace, every one of them
        # sent a STARTED of its own the moment it was handed over (only a machine so busy
        # that every one of them took over 2 ms could make them all send one still)
        assert counts["STARTED"] < 50, counts

        gate = tmp_path / "gate"
        held = ex.submit(gates.wait_for_file, str(gate), "ran")
        assert wait_until(held.running, timeout=TIMEOUT)
        assert not held.done()
        assert tap.counts()["STARTED"] == counts["STARTED"] + 1
        gate.touch()
        assert held.result(timeout=TIMEOUT) == "ran"
