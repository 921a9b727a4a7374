"""The worker agent: one broker connection, N task processes it keeps alive.

::

    broker <--DEALER--> Agent.run()  --batches over a Pipe-->  task_main() in child 1..N
                        | TASK batch: into ``waiting``; each idle child gets an even share
                        |   (STARTED for the first; the next starts when a result arrives)
                        | child results -> one RESULT batch per loop turn
                        | child death (sentinel) -> DEATH for the running task, DROPPED
                        |   for the rest of its batch, and a new child
                        | CANCEL: drop from ``waiting``, or tell the child (DROPPED)
                        | KILL, or a running task past its TASK row's timeout: kill
                        |   its child; DEATH with why=killed|timeout (never retried)

The agent never unpickles: it moves payload bytes between its socket and its children.
Only a task process unpickles, runs, and pickles the result.  A child's death is seen at
once through its process sentinel, so the broker hears the exit status without waiting for
a heartbeat; a lost agent (host down, SIGSTOP) is what heartbeats are for.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import socket
import time
import uuid
from collections import OrderedDict, deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Tuple

import zmq

from ..wire import protocol as P
from ..wire import serialization as S
from .._version import __version__
from .handle import Child, Task, default_start_method, describe_exit
from ..errors import MessageTooLargeError
from ..wire.curve import apply_client
from .stops import Stopping
from .runner import unpack_result

# plain ints: ``int & zmq.POLLIN`` (an IntFlag) builds an enum member, 1.5 us a message
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
log = logging.getLogger(__name__)
# The credit window adapts to how long tasks take: enough queued work per slot to cover
# PREFETCH_WINDOW seconds (so short tasks travel in large batches), at least one task and
# at most MAX_PREFETCH beyond each running one (so long tasks are not hoarded by one agent).
PREFETCH_WINDOW = 0.02
MAX_PREFETCH = 128
START_PREFETCH = 4  # per slot, until task times are known
MEASURE_PERIOD = 0.1  # seconds over which run times are averaged
CHILD_WINDOW = 0.005  # seconds of work handed to one task process at a time
MAX_CHILD_BATCH = 64
MAX_UNACKED_BYTES = 256 << 20  # results kept until the broker acknowledges them
# While this agent's tasks take under STARTED_GRACE on average, a STARTED notice of its own
# waits that long for a RESULT to ride in (Dask's workers batch their messages every 2 ms
# too): a lone short task then costs one message past the broker and the client, not two.
# Otherwise it leaves at once, as it does before a DEATH or a BYE (a HELLO names running
# keys itself).  A new agent knows no task times and never waits, so a task that kills its
# own agent at once is charged on the next one as it was before the grace.
STARTED_GRACE = 0.002


class Agent(Stopping):
    """Owns the broker connection and heartbeats, and N task processes it keeps alive."""

    def __init__(self, address: str, nprocs: int, *, name: Optional[str] = None,
                 prefetch: Optional[int] = None, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 10.0, parent_fd: Optional[int] = None,
                 start_method: Optional[str] = None, cleanup: Sequence[str] = (),
                 drain_timeout: float = 60.0, keys: Optional[Tuple[bytes, bytes, bytes]] = None
                 ) -> None:
        if nprocs < 1:
            raise ValueError("nprocs must be at least 1")
        self.address = address
        self.nprocs = nprocs
        self.fixed_prefetch = prefetch is not None
        self.prefetch = START_PREFETCH * nprocs if prefetch is None else prefetch
        self.task_time = PREFETCH_WINDOW / START_PREFETCH  # mean run time, last period (s)
        self.busy, self.ran, self.period = 0.0, 0, time.monotonic()  # this period's sums
        self.ident = uuid.uuid4().hex
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.interval = heartbeat_interval
        self.timeout = heartbeat_timeout
        self.parent_fd = parent_fd
        self.cleanup = list(cleanup)  # an embedding client's directories, if it dies first
        self.drain_timeout = drain_timeout
        self.keys = keys  # CurveZMQ: (broker public, our public, our secret)
        self.max_frame = 256 << 20  # the broker's cap per frame, from its WELCOME
        self.drain_until: Optional[float] = None  # set by SIGTERM
        self.draining = False
        self.mp = multiprocessing.get_context(start_method or default_start_method())
        self.children: List[Child] = []
        self.waiting: "OrderedDict[str, Task]" = OrderedDict()  # prefetched, not yet given
        self.blobs: Dict[str, Any] = {}
        self.timeouts: Dict[str, float] = {}  # key -> seconds it may run (options(timeout=))
        self.killing: Set[str] = set()  # keys executor.kill() asked to stop
        self.started: List[str] = []  # batched STARTED notice (rides in a RESULT)
        self.started_at = 0.0  # when ``started`` last became non-empty (STARTED_GRACE)
        self.dropped: List[str] = []  # batched DROPPED notice
        self.results: Tuple[List[list], List[Any]] = ([], [])  # batched RESULT
        self.unacked: Deque[Tuple[int, list, Any]] = deque()  # (row number, row, frame)
        self.unacked_bytes = self.sent_rows = 0
        self.rejoined: Set[str] = set()
        self.epoch: Optional[str] = None
        self.refused = False
        self._stop = self._orphaned = False

    def stop(self, *_: Any) -> None:
        self._stop = True

    def _hello(self) -> None:
        """Register (again): name the keys our task processes hold, then send again the
        results the broker has not acknowledged, so a restarted broker loses none."""
        running = [kw for c in self.children for kw in c.keys]
        self.rejoined = set(running)  # a TASK for one of these is a duplicate: skip it
        if self.waiting:  # the broker requeues what we do not say we are running
            self.waiting.clear()
        self.timeouts = {kw: t for kw, t in self.timeouts.items() if kw in running}
        self._send(P.HELLO, {
            "role": "worker", "id": self.ident, "proto": P.PROTOCOL_VERSION,
            "zmqexec": __version__, "python": S.PYTHON_VERSION,
            "cloudpickle": S.CLOUDPICKLE_VERSION, "host": socket.gethostname(),
            "pid": os.getpid(), "name": self.name, "slots": self.nprocs,
            "prefetch": self.prefetch, "hb": self.interval, "ttl": self.timeout,
            "running": running, "epoch": self.epoch})
        self.sent_rows = 0  # the broker counts RESULT rows afresh after a HELLO
        if self.unacked:
            rows, frames = self.results
            self.results = ([row for _, row, _ in self.unacked] + rows,
                            [frame for _, _, frame in self.unacked] + frames)
            self.unacked.clear()
            self.unacked_bytes = 0
            self._flush()

    def _acked(self, count: Any) -> None:
        """The broker has received ``count`` RESULT rows since our HELLO: forget them."""
        if type(count) is not int:
            return
        unacked = self.unacked
        while unacked and unacked[0][0] <= count:
            self.unacked_bytes -= len(unacked.popleft()[2])

    def _send(self, cmd: int, meta: Dict[str, Any], payload: Sequence[Any] = ()) -> None:
        for message in P.encode_split(cmd, meta, payload):  # batches: under the header cap
            try:  # never block: results not sent stay unacknowledged and go again later
                self.sock.send_multipart(message, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                log.debug("no connection to the broker: %s not sent", P.NAMES.get(cmd))
                return
        self.last_sent = time.monotonic()

    def _flush(self, now: Optional[float] = None) -> None:
        """Send this loop turn's DROPPED and RESULT notices, one message each; the
        started keys ride in the RESULT (the broker applies them first, so a key never
        goes backwards there), or leave as a STARTED of their own: from the loop (``now``
        given) once their grace is over (``_grace``), otherwise at once."""
        if self.dropped:
            for kw in self.dropped:
                self.timeouts.pop(kw, None)
            self._send(P.DROPPED, {"ks": self.dropped})
            self.dropped = []
        rows, frames = self.results
        if self.started and rows:  # a task that started and finished since the last turn
            finished = {row[0] for row in rows}  # needs no "running" notice: its result
            self.started = [kw for kw in self.started if kw not in finished]  # says more
        if self.started and (not P.may_ride(self.started) if rows else
                             now is None or not self._grace(now)):
            self._send(P.STARTED, {"ks": self.started})
            self.started = []
        if rows:
            meta: Dict[str, Any] = {"r": rows}
            if self.started:
                meta["s"], self.started = self.started, []
            prefetch = self._window()
            if prefetch != self.prefetch:
                meta["p"] = self.prefetch = prefetch
            self._send(P.RESULT, meta, frames)
            self.results = ([], [])
            seq, unacked = self.sent_rows, self.unacked  # kept until a heartbeat acks them
            for row, frame in zip(rows, frames):
                seq += 1
                unacked.append((seq, row, frame))
                self.unacked_bytes += len(frame)
            self.sent_rows = seq
            while self.unacked_bytes > MAX_UNACKED_BYTES and len(unacked) > 1:
                self.unacked_bytes -= len(unacked.popleft()[2])

    def _grace(self, now: float) -> float:
        """Seconds the waiting STARTED notice may still wait for a RESULT (0: none)."""
        if self.task_time >= STARTED_GRACE:
            return 0.0
        return max(0.0, self.started_at + STARTED_GRACE - now)

    def _mark_started(self, kw: str, now: float) -> None:
        if not self.started:
            self.started_at = now
        self.started.append(kw)

    def _window(self) -> int:
        """The prefetch to ask for now: a fixed one, or PREFETCH_WINDOW of work per slot.

        Measured over periods of MEASURE_PERIOD (or of two windows of results, if
        shorter); changes under a quarter are not worth telling the broker about."""
        now = time.monotonic()
        if not self.ran or (now - self.period < MEASURE_PERIOD and
                            self.ran < 2 * self.prefetch):
            return self.prefetch
        # the mean over a period, not a moving average of single runs: one slow run (a
        # first import in a fresh task process) must not shrink the window of thousands;
        # a period also ends after two windows' worth of results, so that short tasks
        # after long ones widen a small window within a few milliseconds
        self.task_time = self.busy / self.ran
        self.busy, self.ran, self.period = 0.0, 0, now  # (task_time: for STARTED_GRACE too)
        if self.fixed_prefetch:
            return self.prefetch
        per_slot = min(MAX_PREFETCH, max(1, int(PREFETCH_WINDOW / self.task_time)))
        wanted = per_slot * self.nprocs
        return wanted if abs(wanted - self.prefetch) * 4 > self.prefetch else self.prefetch

    def _spawn(self) -> Child:
        child = Child(self.mp)
        self.children.append(child)
        self.poller.register(child.conn.fileno(), zmq.POLLIN)
        self.poller.register(child.proc.sentinel, zmq.POLLIN)
        return child

    def _start_next(self) -> None:
        """Give waiting tasks to idle children, an even share each, in batches."""
        if self.draining:
            return
        idle = [c for c in self.children if not c.keys]
        if not idle or not self.waiting:
            return
        most = min(MAX_CHILD_BATCH, max(1, int(CHILD_WINDOW / self.task_time)))
        now = time.monotonic()
        while idle and self.waiting:
            share = max(1, min(most, len(self.waiting) // len(idle)))
            child = idle.pop()
            child.since = now
            tasks = [self.waiting.popitem(last=False)[1]
                     for _ in range(min(share, len(self.waiting)))]
            try:
                child.give(tasks, self.blobs)
            except OSError:  # the child died under us; its sentinel will report it
                pass
            self._mark_started(tasks[0][0], now)

    def _on_broker(self, frames: List[Any]) -> None:
        try:
            msg = P.decode(frames)
        except Exception as exc:
            log.warning("dropped a malformed message from the broker: %s", exc)
            return
        self.last_heard = time.monotonic()
        if msg.cmd == P.TASK:
            fids, payload = msg.meta["f"], msg.payload
            for fid, blob in zip(fids, payload):
                self.blobs[fid] = blob
            at = len(fids)
            for row in msg.meta["t"]:
                at += row[5]
                if self.rejoined and row[0] in self.rejoined:
                    continue  # already running here since before our HELLO
                if self.draining:
                    self.dropped.append(row[0])  # sent before the broker heard we drain
                    continue
                self.waiting[row[0]] = (row[0], row, payload[at - row[5]:at])
                if len(row) > 6 and type(row[6]) in (int, float) and row[6] > 0:
                    self.timeouts[row[0]] = float(row[6])
            self._start_next()
        elif msg.cmd == P.CANCEL:
            rest = []
            for kw in msg.meta["ks"]:
                if self.waiting.pop(kw, None) is not None:
                    self.dropped.append(kw)
                else:
                    rest.append(kw)
            for child in self.children:  # tasks given to a process but not started yet
                mine = [kw for kw in rest if kw in child.keys]
                if mine:
                    try:
                        child.cancel(mine)
                    except OSError:
                        pass
        elif msg.cmd == P.KILL:
            self._kill(msg.meta["ks"])
        elif msg.cmd in (P.WELCOME, P.HEARTBEAT):
            if "n" in msg.meta:
                self._acked(msg.meta["n"])
            epoch = msg.meta.get("epoch")
            if msg.cmd == P.WELCOME:
                self.epoch = epoch
                self.max_frame = int(msg.meta.get("max_frame", self.max_frame))
                log.info("agent %s registered with %d slots", self.name, self.nprocs)
            elif epoch != self.epoch:
                log.warning("broker epoch changed: registering again")
                self._hello()
        elif msg.cmd == P.RESET:
            self._hello()
        elif msg.cmd == P.REFUSE:
            log.error("the broker refused this agent: %s", msg.meta["reason"])
            self.refused = True
            self._stop = True
        elif msg.cmd == P.BYE:
            log.info("broker said goodbye: %s", msg.meta.get("reason", ""))

    def _on_child_data(self, child: Child) -> bool:
        """Take the results a task process sent; False at its end (EOF)."""
        try:
            messages = child.read()
        except OSError:
            messages = None
        if messages is None:
            return False  # it died; the sentinel reports the death
        for message in messages:
            self._on_child_message(child, *unpack_result(message))
        return True

    def _on_child_message(self, child: Child, kw: str, status: str, result: Any) -> None:
        if status == "dropped":  # a cancel reached it before it started
            if kw in child.keys:
                first = child.keys[0] == kw
                child.keys.remove(kw)
                self.rejoined.discard(kw)
                if kw in self.killing:
                    self._stopped(kw, "killed", "not started")
                else:
                    self.dropped.append(kw)
                if first and child.keys:
                    child.since = time.monotonic()
                    self._mark_started(child.keys[0], time.monotonic())
            return
        if not child.keys or child.keys[0] != kw:
            log.error("task process %d sent an unexpected result", child.proc.pid)
            return
        child.keys.popleft()
        if self.timeouts:
            self.timeouts.pop(kw, None)
        if self.killing:  # a kill that reached its batch too late: it ran
            self.killing.discard(kw)
        if self.rejoined:
            self.rejoined.discard(kw)
        if len(result) > self.max_frame:  # the broker would cut us off: say why instead
            status, result = "error", S.dumps_error(MessageTooLargeError(
                f"the result of task {P.key_from_wire(kw)!r} is {len(result)} bytes, over "
                f"the broker's cap of {self.max_frame} bytes: return something smaller "
                "(write big data to shared storage and return its path)"))
        rows, out = self.results
        rows.append([kw, status, 1])
        out.append(result)
        now = time.monotonic()
        self.busy += now - child.since
        self.ran += 1
        child.since = now
        if child.keys:
            self._mark_started(child.keys[0], now)  # it starts the next one right away

    def _on_child_exit(self, child: Child) -> None:
        self.children.remove(child)
        while child.keys and child.conn.poll(0) and self._on_child_data(child):
            pass  # results sent just before dying count (poll: a grandchild may hold the pipe)
        child.proc.join()
        exit = describe_exit(child.proc.exitcode)
        self.poller.unregister(child.conn.fileno())
        self.poller.unregister(child.proc.sentinel)
        child.conn.close()
        child.cancels.close()
        if child.keys:
            kw = child.keys.popleft()
            self.rejoined.difference_update([kw, *child.keys])
            if child.stopping is not None and child.stopping[0] == kw:
                self._stopped(kw, child.stopping[1], exit)
            else:
                log.warning("task process %d died running %s (%s)", child.proc.pid, kw, exit)
                self.timeouts.pop(kw, None)
                self._flush()
                self._send(P.DEATH, {"k": kw, "exit": exit})
            for kw in [kw for kw in child.keys if kw in self.killing]:
                child.keys.remove(kw)
                self._stopped(kw, "killed", "not started")
            if child.keys:
                for kw in child.keys:
                    self.timeouts.pop(kw, None)
                self._send(P.DROPPED, {"ks": list(child.keys)})
        if not self._stop:
            self._spawn()
            self._start_next()

    def run(self) -> None:
        """Connect, register, and serve until stopped or the parent goes away."""
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        if self.parent_fd is not None:
            self.poller.register(self.parent_fd, zmq.POLLIN)
        for _ in range(self.nprocs):
            self._spawn()
        self._connect()
        try:
            self._loop()
        finally:
            self._shutdown()

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
        self._hello()
        self.last_heard = time.monotonic()

    def _reconnect(self) -> None:
        """Silence past the heartbeat timeout: start over on a new connection.

        After a network cut, an old TCP connection can stay mute for many seconds while
        its retransmissions back off; a new one carries the HELLO (and our unacknowledged
        results) at once, and the broker hands our identity over to it."""
        self.poller.unregister(self.sock)
        self.sock.close(linger=0)
        self._connect()

    def _loop(self) -> None:
        by_fd: Dict[int, Tuple[str, Child]] = {}
        while not self._stop:
            by_fd.clear()
            for child in self.children:
                by_fd[child.conn.fileno()] = ("data", child)
                by_fd[child.proc.sentinel] = ("exit", child)
            now = time.monotonic()
            wait = self._check_timeouts(now)
            if self.started:  # a STARTED notice waiting for a result to ride in
                wait = min(wait, self._grace(now))
            events = self.poller.poll(int(min(self.interval, 0.25, wait) * 1000) + 1)
            for what, _ in events:
                if what is self.sock:
                    for _ in range(1000):
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_broker(frames)
                        if not int(self.sock.getsockopt(EVENTS)) & POLLIN:
                            break  # cheaper than a recv that raises zmq.Again
                elif what == self.parent_fd:
                    log.info("parent process is gone: stopping")
                    self._stop = self._orphaned = True
                elif what in by_fd:
                    kind, child = by_fd[what]
                    if child not in self.children:
                        continue
                    if kind == "data":
                        self._on_child_data(child)
                    else:
                        self._on_child_exit(child)
            now = time.monotonic()
            if self.drain_until is not None:
                self._drain_turn(now)
            self._start_next()
            self._flush(now)
            if now - self.last_sent >= self.interval:
                self._send(P.HEARTBEAT, {"slots": self.nprocs, "drain": self.draining})
            if now - self.last_heard > self.timeout:
                log.warning("no word from the broker for %.1f s: connecting again",
                            now - self.last_heard)
                self._reconnect()

    def _shutdown(self) -> None:
        try:
            self._flush()  # started keys first: their loss is charged
            self._send(P.BYE, {"reason": "agent stopping"})
        except zmq.ZMQError:
            pass
        for child in self.children:
            child.proc.kill()
        for child in self.children:
            child.proc.join(5)
        # an embedded cluster stops as a whole: nobody waits for our goodbye then
        self.sock.close(linger=0 if self._orphaned else 500)
        self.ctx.term()
        if self._orphaned:
            for path in self.cleanup:
                shutil.rmtree(path, ignore_errors=True)
        log.info("agent %s stopped", self.name)
