"""The agent process's loop: one DEALER to the broker, N task processes, all decisions in
``AgentState``.

::

    broker <--DEALER--> Agent.run()                       TaskProcess 1..N (pipes)
                        | socket readable -> AgentState.on_broker()
                        | a task process's pipe -> TaskProcess.read() -> on_result()
                        | its sentinel -> on_exit(), then a new TaskProcess
                        | turn: check_timeouts(), drain_turn(), hand_out(), flush()
                        | carry out: out -> socket; gives -> TaskProcess.give();
                        |   (never blocks: the rest when writable -> flush())
                        |   cancels -> TaskProcess.cancel(); kills -> TaskProcess.kill()

The agent never unpickles: it moves payload bytes between its socket and its task
processes.  A task process's death is seen at once through its process sentinel, so the
broker hears the exit status without waiting for a heartbeat; a lost agent (host down,
SIGSTOP) is what heartbeats are for.

Each task process leads a process group, which holds what its tasks start (a process
pool, a subprocess).  The agent kills the whole group whenever it kills a task process
(timeout, kill, retirement, stop) and whenever it sees one end of itself, before it
reaps it: a dead child's pid, the group's id, is not free until it is reaped.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import zmq

from .._version import __version__
from ..wire import protocol as P
from ..wire import serialization as S
from ..wire.curve import apply_client
from ..wire.sockets import received
from .handle import (StalledBatches, TaskProcess, carry_out, default_start_method,
                     describe_exit, has_ended, make_room_for)
from .state import AgentState, Slot

# plain ints: ``int & zmq.POLLIN`` (an IntFlag) builds an enum member, 1.5 us a message
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
RECV_BATCH = 1000  # broker messages read per wake-up before task processes get a turn
ENDED_CHECK = 0.25  # seconds between looks for task processes whose sentinel stays quiet
DATA, END, WRITABLE = 0, 1, 2  # what a task process's polled descriptor says
log = logging.getLogger(__name__)


class Agent:
    """Owns the broker connection, the heartbeats and N task processes; ``AgentState``
    decides."""

    def __init__(self, address: str, nprocs: int, *, name: Optional[str] = None,
                 prefetch: Optional[int] = None, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 10.0,
                 drain_timeout: float = 60.0, keys: Optional[Tuple[bytes, bytes, bytes]] = None,
                 max_tasks_per_child: Optional[int] = None) -> None:
        self.address = address
        self.nprocs = nprocs
        make_room_for(nprocs)
        self.ident = uuid.uuid4().hex
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.interval = heartbeat_interval
        self.timeout = heartbeat_timeout
        self.keys = keys  # CurveZMQ: (broker public, our public, our secret)
        self.state = AgentState(nprocs, {
            "role": "worker", "id": self.ident, "proto": P.PROTOCOL_VERSION,
            "zmqexec": __version__, "python": S.PYTHON_VERSION,
            "cloudpickle": S.CLOUDPICKLE_VERSION, "host": socket.gethostname(),
            "pid": os.getpid(), "name": self.name, "slots": nprocs,
            "hb": heartbeat_interval, "ttl": heartbeat_timeout},
            prefetch=prefetch, name=self.name, drain_timeout=drain_timeout,
            now=time.monotonic(), max_tasks=max_tasks_per_child)
        self.mp = multiprocessing.get_context(default_start_method())
        self.processes: Dict[int, TaskProcess] = {}  # by pid

    @property
    def refused(self) -> bool:
        return self.state.refused

    def stop(self, *_: Any) -> None:
        """Stop at once (safe from a signal handler)."""
        self.state.stop = True

    def drain(self, *_: Any) -> None:
        """SIGTERM: finish running tasks within the drain timeout, then stop (safe from a
        signal handler)."""
        self.state.drain(time.monotonic())

    def run(self) -> None:
        """Connect, register, and serve until stopped or the parent goes away."""
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self.stalled = StalledBatches(self.poller, zmq.POLLOUT)
        for _ in range(self.nprocs):
            self._spawn()
        self._connect()
        try:
            self._loop()
        finally:
            self._shutdown()

    def _spawn(self) -> None:
        process = TaskProcess.start(self.mp)
        self.processes[process.pid] = process
        self.state.add_slot(process.pid)
        self.poller.register(process.fd, zmq.POLLIN)
        self.poller.register(process.proc.sentinel, zmq.POLLIN)

    def _connect(self) -> None:
        """A fresh DEALER to the broker, then HELLO (with what we run and have not had
        acknowledged)."""
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, uuid.UUID(self.ident).bytes)
        self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 20)
        # a local (ipc) broker may still be starting: retry every 20 ms, without backoff
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX,
                             0 if self.address.startswith("ipc:") else 1000)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 2000)
        if self.keys is not None:
            apply_client(self.sock, self.keys)
        self.poller.register(self.sock, zmq.POLLIN)
        self.sock.connect(self.address)
        self.last_sent = 0.0
        self.state.hello()
        self._carry_out()
        self.last_heard = time.monotonic()

    def _reconnect(self) -> None:
        """Silence past the heartbeat timeout: start over on a new connection.

        After a network cut, an old TCP connection can stay mute for many seconds while
        its retransmissions back off; a new one carries the HELLO (and our unacknowledged
        results) at once, and the broker hands our identity over to it."""
        self.poller.unregister(self.sock)
        self.sock.close(linger=0)
        self._connect()

    def _send(self, cmd: int, meta: Dict[str, Any], payload: Sequence[Any] = ()) -> bool:
        for message in P.encode_split(cmd, meta, payload):  # batches: under the header cap
            try:  # never block: results not sent stay unacknowledged and go again later
                self.sock.send_multipart(message, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                log.debug("no connection to the broker: %s not sent", P.NAMES.get(cmd))
                return False
        self.last_sent = time.monotonic()
        return True

    def _carry_out(self) -> None:
        """Do what the state decided: messages, then what task processes must do."""
        state = self.state
        if state.out:
            out, state.out = state.out, []
            for cmd, meta, payload in out:
                self._send(cmd, meta, payload)
        self.stalled.watch(carry_out(state, self.processes, kill=self._kill,
                                     retire=self._retire))

    def _kill(self, slot: Slot) -> None:
        """A timeout, a kill: the task process goes with its group (what its task
        started); its end, seen by its sentinel, replaces it."""
        self.processes[slot.pid].kill()

    def _retire(self, process: TaskProcess) -> None:
        """Idle, its tasks done: it ends and is replaced (by SIGTERM, not by EOF: its
        forked siblings hold copies of its pipe).  Its group gets SIGTERM too, and what
        is left of it SIGKILL when its end is seen."""
        process.kill(signal.SIGTERM)

    def _on_data(self, process: TaskProcess) -> bool:
        return process.read_into(self.state, time.monotonic())

    def _on_exit(self, process: TaskProcess) -> None:
        """A task process ended: what it started goes too (its group is killed before
        ``join`` reaps it, while its pid still names the group), then it is replaced."""
        del self.processes[process.pid]
        process.kill()
        slot = self.state.slots.get(process.pid)
        while slot is not None and slot.keys and process.results.poll(0) and \
                self._on_data(process):
            pass  # results sent just before dying count (poll: a grandchild may hold the pipe)
        process.proc.join()
        self.stalled.forget(process)
        self.poller.unregister(process.fd)
        self.poller.unregister(process.proc.sentinel)
        process.close()
        if slot is not None:
            self.state.on_exit(slot, describe_exit(process.proc.exitcode))
        if not self.state.stop:
            self._spawn()

    def _check_ended(self) -> None:
        """Task processes that ended while a process they forked holds their sentinel
        (and their pipe) open: it would not be seen to end, nor its group killed, until
        that process exits, which it may never do (a process pool's workers wait on a
        queue of the dead process forever)."""
        for process in list(self.processes.values()):
            if has_ended(process.pid):
                self._on_exit(process)

    def _loop(self) -> None:
        state, sock = self.state, self.sock
        by_fd: Dict[int, Tuple[int, TaskProcess]] = {}
        next_check = 0.0
        while not state.stop:
            by_fd.clear()
            for process in self.processes.values():
                by_fd[process.fd] = (DATA, process)
                by_fd[process.proc.sentinel] = (END, process)
            for fd, process in self.stalled.by_fd.items():
                by_fd[fd] = (WRITABLE, process)
            now = time.monotonic()
            wait = state.check_timeouts(now)
            if state.started:  # a STARTED notice waiting for a result to ride in
                wait = min(wait, state.grace(now))
            self._carry_out()  # (kills of tasks past their timeout)
            events = self.poller.poll(int(min(self.interval, 0.25, wait) * 1000) + 1)
            sock = self.sock
            for what, _ in events:
                if what is sock:
                    for frames in received(sock):
                        self._on_broker(frames)
                elif what in by_fd:
                    kind, process = by_fd[what]
                    if self.processes.get(process.pid) is not process:
                        continue
                    if kind == DATA:
                        self._on_data(process)
                    elif kind == END:
                        self._on_exit(process)
                    else:
                        self.stalled.on_writable(process)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + ENDED_CHECK
                self._check_ended()
            state.drain_turn(now)
            state.hand_out(now)
            state.flush(now)
            self._carry_out()
            if now - self.last_sent >= self.interval:
                self._send(P.HEARTBEAT, {"slots": self.nprocs, "drain": state.draining})
            if now - self.last_heard > self.timeout:
                log.warning("no word from the broker for %.1f s: connecting again",
                            now - self.last_heard)
                self._reconnect()

    def _on_broker(self, frames: List[Any]) -> None:
        try:
            msg = P.decode(frames)
        except Exception as exc:
            log.warning("dropped a malformed message from the broker: %s", exc)
            return
        self.last_heard = time.monotonic()
        self.state.on_broker(msg, self.last_heard)
        if msg.cmd == P.TASK:
            self.state.hand_out(self.last_heard)

    def _shutdown(self) -> None:
        try:
            self.state.flush()  # started keys first: their loss is charged
            self.state.out.append((P.BYE, {"reason": "agent stopping"}, ()))
            self._carry_out()
        except zmq.ZMQError:
            pass
        for process in self.processes.values():
            process.kill()  # with its group: nothing a task started outlives the agent
        for process in self.processes.values():
            process.proc.join(5)
        self.sock.close(linger=500)
        self.ctx.term()
        log.info("agent %s stopped", self.name)
