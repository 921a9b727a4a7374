"""The embedded node: the local cluster of ``ZMQExecutor()`` as one thread of the client.

::

    user threads --(Mailbox)--> node thread ------------------------------+
      submit(): a Pending record  | Link.apply -> BrokerState.deliver     |
                                  |   (this client's messages as objects, |
                                  |    never encoded)                     |
                                  | BrokerState -> outbox.delivered ->    |
                                  |   AgentState.on_broker (TASK, CANCEL) |
                                  | AgentState.gives -> TaskProcess.give  |--pipes--> task
                                  |   (never blocks: TaskProcess.flush)   |
                                  | TaskProcess.read -> on_result         |<--------- processes
                                  | AgentState.out -> BrokerState.deliver |   (forked by the
                                  | outbox.delivered -> Link.on_message   |    zygote, which
                                  |   -> divert / Completions             |    reports deaths)
    other processes of this user <--ROUTER (ipc, 0700 directory)-->       |
      (clients, status, agents)     BrokerState.handle / send_all         |
                                                                          +

The node drives the same ``BrokerState`` and ``AgentState`` as the broker and agent
processes do: one set of rules.  It never runs user code: results are unpickled by the
thread waiting in ``result()`` or by the completion thread, and callbacks run there.
Task processes are forked by this executor's zygote (never by a process whose threads
run), and see the client's ``sys.path``, working directory and environment as they are
when tasks are submitted (sent with a batch when they change).
"""
from __future__ import annotations

import logging
import os
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import zmq

from .._version import __version__
from ..agent.handle import (StalledBatches, TaskProcess, carry_out, describe_exit,
                            make_room_for)
from ..agent.state import AgentState, Slot
from ..agent.zygote import ZygoteLink, new_zygote, release_zygote
from ..broker.loop import router, send_all
from ..broker.state import BrokerState
from ..client.items import Broken, Close
from ..client.link import Link, request_status
from ..client.state import ClientState
from ..client.threads import Completions, Mailbox
from ..errors import BrokenZMQExecutor
from ..wire import protocol as P
from ..wire import serialization as S
from ..wire.sockets import EVENTS, POLLIN, received
from ..wire.shm import Spill, inline, own_result

log = logging.getLogger(__name__)
CLIENT, AGENT = b"\x00node-client", b"\x00node-agent"  # never a remote routing id (uuid)
TICK = 0.05  # seconds between the broker's timer turns
FOREVER = float("inf")  # a local peer is never silent: it lives and dies with the node


def own_results(rows: List[Any], payload: List[Any]) -> None:
    """Large results that task processes left in shared memory become the node's files
    (in place; see ``wire.shm``): a file lives while its result is held or unread."""
    at = 0
    for row in rows:
        if row[2] > 1:
            own_result(payload, at, row[2])
        at += row[2]


class Node:
    """The embedded cluster: BrokerState + AgentState on one thread of the client."""

    # set by the node thread when it starts (``_main``)
    now: float
    sock: "zmq.Socket[Any]"
    sock_fd: int
    _sock_dirty: bool

    def __init__(self, nprocs: int, blobs: Dict[str, bytes], *, attach_timeout: float,
                 heartbeat_interval: float = 1.0,
                 no_workers_timeout: Optional[float] = None,
                 max_tasks_per_child: Optional[int] = None, fresh: bool = False) -> None:
        self.nprocs = nprocs
        make_room_for(nprocs)
        self.interval = heartbeat_interval
        self.no_workers_timeout = no_workers_timeout
        # the zygote first: forked while this process may still be single-threaded
        self.fresh = fresh
        self.zygote: ZygoteLink = new_zygote(fresh)
        self.dir = tempfile.mkdtemp(prefix="zmqexec-")  # mode 0700: only this OS user
        self.address = f"ipc://{self.dir}/node"
        self.spill = Spill()
        for path in (self.dir, self.spill.dir):  # if this process dies by SIGKILL
            self.zygote.cleanup(path)
        self.broker = BrokerState(client_timeout=None)
        self.broker.outbox.inline = inline  # other processes get large results as frames
        self.agent = AgentState(nprocs, {
            "role": "worker", "id": f"node-{os.getpid()}", "proto": P.PROTOCOL_VERSION,
            "zmqexec": __version__, "python": S.PYTHON_VERSION,
            "cloudpickle": S.CLOUDPICKLE_VERSION, "host": socket.gethostname(),
            "pid": os.getpid(), "name": f"embedded-{os.getpid()}", "slots": nprocs,
            "hb": heartbeat_interval, "ttl": FOREVER},
            name=f"embedded-{os.getpid()}", max_tasks=max_tasks_per_child,
            keep_unacked=False, now=time.monotonic())
        self.processes: Dict[int, TaskProcess] = {}  # by pid, once the zygote said it
        self.starting: List[TaskProcess] = []  # asked of the zygote, pid not known yet
        self.context: Tuple[int, Any] = (0, None)  # (version, [sys.path, cwd, env])
        self._context_seen: Any = None
        self.mailbox = Mailbox()
        self.post = self.mailbox.post
        self.state = ClientState(self)
        self.state.spill_dir = self.spill.dir  # task processes leave large results there
        self.completions = Completions(self.state.complete)
        self.defer = self.completions.defer
        self.completion_thread = self.completions.thread
        self.link = Link(self.state, blobs, self._client_send, self.defer, self._client_hello,
                         attach_timeout=attach_timeout)
        self._joined = False  # the agent says HELLO once its task processes exist, as an
        # agent process does: the slots it announces are real
        self._ready = threading.Event()
        self._failed: Optional[BaseException] = None
        self.io_thread = threading.Thread(target=self._main, name="zmqexec-node", daemon=True)
        self.io_thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise self._failed

    # ---- called from user threads ------------------------------------------------------------
    def request_status(self, timeout: Optional[float]) -> Dict[str, Any]:
        return request_status(self.post, self.state, timeout)

    def close(self) -> None:
        """Finish once every record is done (or the executor is broken), then stop."""
        self.post(Close())

    # ---- this client and this agent, as peers of the broker ----------------------------------
    def _client_send(self, cmd: int, meta: Dict[str, Any], payload: Sequence[Any]) -> None:
        self.broker.deliver(CLIENT, P.Message(cmd, meta, list(payload)), self.now)

    def _client_hello(self) -> None:
        self._client_send(P.HELLO, {
            "role": "client", "id": "node-client", "proto": P.PROTOCOL_VERSION,
            "python": S.PYTHON_VERSION, "cloudpickle": S.CLOUDPICKLE_VERSION,
            "host": socket.gethostname(), "pid": os.getpid(), "hb": self.interval,
            "ttl": FOREVER, "nw": self.no_workers_timeout}, ())

    def _route(self) -> None:
        """Move messages between this client, the broker and this agent until none is
        left, then carry out what the agent decided and send what remote peers get."""
        broker, agent, link, outbox = self.broker, self.agent, self.link, self.broker.outbox
        now = self.now
        while True:
            agent.hand_out(now)
            agent.flush(now)
            if agent.out:
                out, agent.out = agent.out, []
                for cmd, meta, payload in out:
                    payload = list(payload)
                    if cmd == P.RESULT and len(payload) > len(meta["r"]):
                        own_results(meta["r"], payload)
                    broker.deliver(AGENT, P.Message(cmd, meta, payload), now)
            if send_all(self.sock, broker):  # (flushes the outbox: local messages too)
                self._sock_dirty = True
            if not outbox.delivered:
                break
            for ident, msg in outbox.take_delivered():
                if ident == CLIENT:
                    link.on_message(msg)
                elif ident == AGENT:
                    agent.on_broker(msg, now)
        self._carry_out()

    def _carry_out(self) -> None:
        self.stalled.watch(carry_out(self.agent, self.processes, kill=self._kill,
                                     retire=self._retire, context=self._snapshot))

    def _kill(self, slot: Slot) -> None:
        """A timeout, a kill: the zygote kills the task process with its group (what its
        task started), then reports its end, which replaces it."""
        self.zygote.kill(slot.pid)  # (the zygote reaps: a pid it has not reported lives)

    def _retire(self, process: TaskProcess) -> None:
        """EOF on its pipe: it exits, and the zygote kills what it left running (its
        group) and reports its end."""
        if not process.results.closed:
            self.stalled.forget(process)
            self.poller.unregister(process.fd)
            process.close()

    def _snapshot(self) -> Tuple[int, Any]:
        """The client's sys.path, working directory and environment, versioned: task
        processes get them with a batch when they change.  Compared as the environment's
        own bytes (decoding every variable cost more than the rest of a lone task)."""
        try:
            cwd = os.getcwd()
        except OSError:
            cwd = ""
        environ = getattr(os.environ, "_data", None)
        seen = self._context_seen  # compared before copying: they rarely change
        if seen is None or seen[0] != sys.path or seen[1] != cwd or seen[2] != environ:
            seen = self._context_seen = (list(sys.path), cwd,
                                         dict(environ) if environ is not None else None)
            self.context = (self.context[0] + 1,
                            [seen[0], seen[1], dict(os.environ), self.spill.dir])
        return self.context

    # ---- task processes -----------------------------------------------------------------------
    def _spawn(self) -> None:
        self.starting.append(TaskProcess.from_zygote(self.zygote))
        self.agent.starting = len(self.starting)

    def _on_zygote(self) -> None:
        records = self.zygote.read()
        if records is None:
            self._replace_zygote()
            return
        for op, pid, code in records:
            if op == b"P" and self.starting:
                process = self.starting.pop(0)
                self.agent.starting = len(self.starting)
                process.pid = pid
                self.processes[pid] = process
                self.poller.register(process.fd, select.POLLIN)
                self.agent.add_slot(pid)
                if not self._joined and not self.starting:
                    self._joined = True
                    self.agent.hello()
            elif op == b"X":
                self._on_exit(pid, code)

    def _replace_zygote(self) -> None:
        """The zygote died (killed from outside): its task processes die with it (they
        watch their parent); each running task is reported lost and retried, and a new
        zygote, forked by the root, starts new task processes."""
        log.warning("the embedded cluster's zygote process died: replacing it")
        self.poller.unregister(self.zygote.fileno())
        release_zygote(self.zygote)
        self.zygote = new_zygote(self.fresh)
        self.poller.register(self.zygote.fileno(), select.POLLIN)
        lost, self.starting = self.starting, []
        self.agent.starting = 0
        for pid in list(self.processes):
            self._on_exit(pid, None)
        for _ in lost:
            self._spawn()

    def _on_exit(self, pid: int, code: Optional[int]) -> None:
        process = self.processes.pop(pid, None)
        slot = self.agent.slots.get(pid)
        if process is not None:
            if not process.results.closed:
                while slot is not None and slot.keys and process.results.poll(0) and \
                        self._on_data(process):
                    pass  # results sent just before dying count
                self.stalled.forget(process)
                self.poller.unregister(process.fd)
                process.close()
        if slot is not None:
            self.agent.on_exit(slot, describe_exit(code))
        if not self.closing:
            self._spawn()

    def _on_data(self, process: TaskProcess) -> bool:
        return process.read_into(self.agent, time.monotonic())

    # ---- the node thread ----------------------------------------------------------------------
    def _main(self) -> None:
        self.ctx = zmq.Context()
        self.closing = False
        self._sock_dirty = True
        self.now = time.monotonic()
        try:
            self.sock, _ = router(self.ctx, [self.address], self.broker)
            # select.poll, not zmq.Poller: a wake-up of the node costs about 10 us of CPU
            # less (zmq_poll asks every socket for its events on each call); the ROUTER
            # is polled by its FD, which signals that its EVENTS may have changed
            self.poller = select.poll()
            self.stalled = StalledBatches(self.poller, select.POLLOUT)
            self.sock_fd = int(self.sock.getsockopt(zmq.FD))
            self.poller.register(self.sock_fd, select.POLLIN)
            self.poller.register(self.mailbox.wake_fd, select.POLLIN)
            self.poller.register(self.zygote.fileno(), select.POLLIN)
            self._client_hello()
            for _ in range(self.nprocs):  # (the agent says HELLO once they exist)
                self._spawn()
            self._route()
        except BaseException as exc:
            self._failed = exc
            self._ready.set()
            self._stop()
            return
        self._ready.set()
        try:
            self._loop()
        except Exception as exc:  # never die silently: every waiter must hear of it
            log.exception("embedded node failed")
            self.defer(Broken(exc if isinstance(exc, BrokenZMQExecutor) else
                              BrokenZMQExecutor(f"the embedded node failed: {exc!r}")))
        finally:
            self._stop()

    def _loop(self) -> None:
        broker, agent, link, sock = self.broker, self.agent, self.link, self.sock
        wake_fd = self.mailbox.wake_fd
        sock_fd = self.sock_fd
        next_tick = next_check = 0.0
        while True:
            now = time.monotonic()
            wait = min(agent.check_timeouts(now), max(0.0, next_tick - now) + 0.001)
            if agent.started:
                wait = min(wait, agent.grace(now))
            if agent.kills:
                self._carry_out()
            # The ROUTER's FD signals only changes: after a send or a partial read, its
            # EVENTS tell whether messages wait already (then the poll must not sleep)
            readable = self._sock_dirty and bool(int(sock.getsockopt(EVENTS)) & POLLIN)
            self._sock_dirty = False
            events = self.poller.poll(0 if readable else int(wait * 1000) + 1)
            self.now = now = time.monotonic()
            woken = False
            for what, _ in events:
                if what == wake_fd:
                    woken = True
                elif what == sock_fd:
                    readable = True
                elif what == self.zygote.fileno():
                    self._on_zygote()
                elif what in self.stalled.by_fd:
                    self.stalled.on_writable(self.stalled.by_fd[what])
                else:
                    process = self._by_fd(what)
                    if process is not None:
                        self._on_data(process)
            if readable:
                for frames in received(sock):
                    broker.handle(frames[0].bytes, frames[1:], now, None)
                self._sock_dirty = True  # (a read stops after RECV_BATCH messages)
            link.apply(self.mailbox.take(woken))
            if now >= next_tick:
                next_tick = now + TICK
                broker.tick(now)
            if now >= next_check:
                next_check = now + 0.2
                link.check_attaching(now)
            self._route()
            if link.finished:
                return

    def _by_fd(self, fd: Any) -> Optional[TaskProcess]:
        for process in self.processes.values():
            if process.fd == fd and not process.results.closed:
                return process
        return None

    def _stop(self) -> None:
        """Tell remote peers, stop the task processes (their zygote goes), clean up."""
        self.closing = True
        try:
            if hasattr(self, "sock"):
                self.broker.shutdown("the embedding program is stopping")
                send_all(self.sock, self.broker)
                self.broker.outbox.take_delivered()
                self.sock.close(linger=200)
        finally:
            for process in [*self.processes.values(), *self.starting]:
                process.close()
            release_zygote(self.zygote)
            self.ctx.term()
            self.completions.close()
            self.link.close_waiters()
            shutil.rmtree(self.dir, ignore_errors=True)
            self.spill.close()
