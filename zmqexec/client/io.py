"""The client's two threads: the I/O thread that owns the DEALER socket, and the
completion thread that unpickles results and completes futures.

::

    user threads --(commands queue + wake pipe)--> I/O thread --SUBMIT/INFORM/...--> broker
        submit(): a Pending record                 | credit window: backlog -> sent
                                                   | heartbeats, broker liveness, attach timers
    broker --RESULT/STATE--> I/O thread --(completions queue)--> completion thread
                                                   unpickle -> set_result / set_exception
                                                   -> callbacks (may block: the socket
                                                      keeps going)
                             I/O thread --(divert: Pending.arrived)--> a user thread blocked
                                                   in Future.result() for that key, which
                                                   unpickles and completes it itself

The tables both threads share (pending records, held outcomes, reference counts) and how
futures complete live in ``state.ClientState``; ``ClientIO`` is its ``Outlet`` (it takes
the state's commands and completions) and holds it as ``state``.  Under
load the I/O thread packs many submits into one SUBMIT message (``SUBMIT_BATCH``), and cancels
and releases into one message each per loop turn; a lone submit still leaves at once.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

import zmq

from ..wire import protocol as P
from ..wire import serialization as S
from .._version import __version__
from ..wire.records import SubmitRow
from .items import (
    Broken,
    Cancel,
    Close,
    Command,
    Completion,
    Inform,
    Kill,
    Pending,
    Release,
    Results,
    Running,
    Settle,
    StatusRequest,
    Submit,
    Unref,
)
from .state import ClientState
from ..wire.curve import apply_client
from ..errors import (
    BrokenZMQExecutor,
    BrokerLostError,
    MessageTooLargeError,
    UnknownKeyError,
    ZMQExecError,
)

log = logging.getLogger(__name__)
# plain ints: ``int & zmq.POLLIN`` (an IntFlag) builds an enum member, 1.5 us a message
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
SUBMIT_BATCH = 1000  # tasks per SUBMIT message at most
SUBMIT_BATCH_BYTES = 8 << 20  # payload bytes per SUBMIT message, beyond one task
# Commands that do not wake the I/O thread: they leave with the next command that does,
# or within a poll timeout (0.1 s).  A dropped future's release is never urgent, and
# waking for it cost a loop turn in the client and one in the broker per task.
LAZY = frozenset((Release, Unref))
# Commands a user thread queues, after waking the I/O thread, before it hands over the GIL.
# A thread submitting in a loop holds the GIL; the woken I/O thread would wait for
# Python's switch interval (5 ms) between turns, the broker's credit window fills, and
# the workers idle while results wait unread.  One voluntary hand-over per HANDOFF
# submits keeps the pipeline flowing during a burst, at one sleep(0) per batch.
HANDOFF = 256


class ClientIO:
    """The threads and socket of one executor's connection to a broker."""

    def __init__(self, address: str, blobs: Dict[str, bytes], *,
                 heartbeat_interval: float, broker_timeout: float,
                 attach_timeout: float, no_workers_timeout: Optional[float] = None,
                 keys: Optional[Tuple[bytes, bytes, bytes]] = None,
                 check: Optional[Callable[[], Optional[str]]] = None,
                 on_close: Optional[Callable[[], None]] = None) -> None:
        self.address = address
        self.blobs = blobs  # pickled functions and initializers by id, filled by submit
        self.interval = heartbeat_interval
        self.broker_timeout = broker_timeout
        self.no_workers_timeout = no_workers_timeout
        self.keys = keys  # CurveZMQ: (broker public, our public, our secret)
        self.attach_timeout = attach_timeout
        self.check = check
        self.on_close = on_close
        self.state = ClientState(self)
        self.slots = 0  # task processes at the broker, as its last heartbeat said
        self.ident = uuid.uuid4()
        self._commands: "queue.SimpleQueue[Command]" = queue.SimpleQueue()
        self._completions: "queue.SimpleQueue[Optional[Completion]]" = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closing = False
        self._asleep = True  # the I/O thread may be in poll(): post() must wake it
        self._unserved = 0  # commands queued since the last wake-up (see HANDOFF)
        self.io_thread = threading.Thread(target=self._io_main, name="zmqexec-io", daemon=True)
        self.completion_thread = threading.Thread(target=self._completion_main,
                                                  name="zmqexec-completion", daemon=True)
        self.io_thread.start()
        self.completion_thread.start()

    # ---- called from user threads (and __del__) --------------------------------------------
    def post(self, command: Command) -> None:
        """Queue a command for the I/O thread and wake it (thread- and reentrant-safe)."""
        self._commands.put(command)
        if type(command) in LAZY:
            return
        if self._asleep:  # one wake-up per batch of commands, not one per submit
            self._asleep = False
            self._unserved = 0
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass  # a wake-up is pending already, or we are closed
        else:
            self._unserved += 1
            if self._unserved >= HANDOFF:
                self._unserved = 0
                time.sleep(0)  # lets the woken I/O thread take the GIL now (see HANDOFF)

    def defer(self, completion: Completion) -> None:
        """Queue a completion for the completion thread."""
        self._completions.put(completion)

    def request_status(self, timeout: Optional[float]) -> Dict[str, Any]:
        reply: "concurrent.futures.Future[Dict[str, Any]]" = concurrent.futures.Future()
        self.post(StatusRequest(reply))
        end = None if timeout is None else time.monotonic() + timeout
        while True:  # in slices, so a broken connection ends the wait
            try:
                left = 0.5 if end is None else min(0.5, max(0.0, end - time.monotonic()))
                return reply.result(left)
            except concurrent.futures.TimeoutError:
                if self.state.broken is not None:
                    raise self.state.broken from None
                if end is not None and time.monotonic() >= end:
                    raise

    def close(self) -> None:
        """Finish once every record is done (or the connection is broken), then disconnect."""
        self.post(Close())

    # ---- the I/O thread -----------------------------------------------------------------------
    def _send(self, cmd: int, meta: Dict[str, Any], payload: Sequence[Any] = ()) -> None:
        """Send without ever blocking: with no usable connection (a broker that refuses
        our handshake, say) the message is dropped and the timers still run, so pending
        futures end with BrokerLostError after ``broker_timeout`` instead of hanging."""
        for message in P.encode_split(cmd, meta, payload):  # batches: under the header cap
            try:
                self._sock.send_multipart(message, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                log.debug("no connection to the broker: %s not sent", P.NAMES.get(cmd))
                return
        self._last_sent = time.monotonic()

    def _hello(self) -> None:
        self._send(P.HELLO, {
            "role": "client", "id": self.ident.hex, "proto": P.PROTOCOL_VERSION,
            "zmqexec": __version__, "python": S.PYTHON_VERSION,
            "cloudpickle": S.CLOUDPICKLE_VERSION, "host": socket.gethostname(),
            "pid": os.getpid(), "hb": self.interval,
            "ttl": max(60.0, self.broker_timeout), "nw": self.no_workers_timeout})

    def _io_main(self) -> None:
        ctx = zmq.Context()
        self._sock = sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.ident.bytes)
        sock.setsockopt(zmq.IPV6, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 20)
        # a local (ipc) broker may still be starting: retry every 20 ms, without backoff
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 0 if self.address.startswith("ipc:") else 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 1000)
        if self.keys is not None:
            apply_client(sock, self.keys)
        self._backlog: Deque[Pending] = deque()
        self._sent: Dict[str, int] = {}  # key -> bytes, submitted and not yet answered
        self._sent_bytes = 0
        self._attaching: Dict[str, float] = {}
        self._sent_fids: Set[str] = set()  # blobs the broker has from this client
        self._cancels: List[str] = []
        self._releases: List[str] = []
        self._kills: List[str] = []
        self._status_waiters: "Deque[concurrent.futures.Future[Dict[str, Any]]]" = deque()
        self._window, self._window_bytes = 0, 0  # no sends before WELCOME
        self._max_frame, self._max_message = 256 << 20, 4 << 30  # caps WELCOME announces
        now = self._last_heard = self._last_sent = time.monotonic()
        next_check = now
        try:
            sock.connect(self.address)
            self._hello()
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
            while True:
                events = dict(poller.poll(int(min(self.interval, 0.1) * 1000)))
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 65536)
                    except BlockingIOError:
                        pass
                self._asleep = True  # before draining: a later post() writes again
                self._run_commands()
                if sock in events:
                    for _ in range(1000):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_message(frames)
                        if not int(sock.getsockopt(EVENTS)) & POLLIN:
                            break  # cheaper than a recv that raises zmq.Again
                    self._pump()  # answers freed window space
                now = time.monotonic()
                if now - self._last_sent >= self.interval:
                    if self._window:
                        self._send(P.HEARTBEAT, {})
                    else:  # not welcomed yet: our HELLO may have found no connection
                        self._hello()
                if now >= next_check:
                    next_check = now + 0.2
                    self._timers(now)
                if self._closing and (self.state.broken is not None or
                                      not self.state.records):
                    break
            self._send(P.BYE, {"reason": "client closing"})
        except Exception as exc:  # never die silently: every waiter must hear of it
            log.exception("client I/O thread failed")
            self.defer(Broken(BrokenZMQExecutor(f"client I/O failed: {exc!r}")))
        finally:
            sock.close(linger=200)
            ctx.term()
            self._completions.put(None)
            for waiter in self._status_waiters:
                waiter.set_exception(BrokenZMQExecutor("the executor closed"))
            if self.on_close is not None:
                self.on_close()

    def _run_commands(self) -> None:
        """Apply what user threads queued; CANCEL and RELEASE leave as one batch each.

        Releases leave before submits: a release names a key with no pending record, so
        a key dropped and submitted again is released first, not after its new submit."""
        unrefs: List[str] = []
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, Submit):
                self._backlog.append(command.record)
            elif isinstance(command, Unref):
                unrefs.append(command.kw)
            elif isinstance(command, Release):
                self._releases.append(command.kw)
            elif isinstance(command, Kill):
                if command.kw in self._sent:
                    self._kills.append(command.kw)
            elif isinstance(command, Cancel):
                kw = command.kw
                if kw in self._sent:
                    self._sent_bytes -= self._sent.pop(kw)
                    self._cancels.append(kw)
                elif self._attaching.pop(kw, None) is not None:
                    self._releases.append(kw)
            elif isinstance(command, (Inform, StatusRequest)):
                self._unref(unrefs)  # keep the channel ordered: what came earlier leaves first
                unrefs = []
                self._flush_batches()
                self._pump()
                if isinstance(command, Inform):
                    self._attaching[command.kw] = time.monotonic() + self.attach_timeout
                    self._send(P.INFORM, {"k": command.kw})
                else:
                    self._status_waiters.append(command.reply)
                    self._send(P.STATUS, {})
            elif isinstance(command, Close):
                self._closing = True
            # Wake: nothing to do; the loop looks at its state again
        if unrefs:
            self._unref(unrefs)
        self._flush_batches()
        self._pump()

    def _flush_batches(self) -> None:
        if self._cancels:
            self._send(P.CANCEL, {"ks": self._cancels})
            self._cancels = []
        if self._releases:
            self._send(P.RELEASE, {"ks": self._releases})
            self._releases = []
        if self._kills:
            self._send(P.KILL, {"ks": self._kills})
            self._kills = []

    def _unref(self, kws: List[str]) -> None:
        """Futures of these keys were dropped; release keys no local future holds."""
        state = self.state
        with state.lock:
            self._releases.extend(kw for kw in kws if state.drop_ref(kw))

    def _pump(self) -> None:
        """Send backlogged submits as batches while the broker's credit window allows."""
        backlog, sent, records, sent_fids = self._backlog, self._sent, self.state.records, \
            self._sent_fids
        window, window_bytes, max_frame = self._window, self._window_bytes, self._max_frame
        while backlog and len(sent) < window and (
                self._sent_bytes < window_bytes or not sent):
            fids: List[str] = []
            rows: List[SubmitRow] = []
            frames: List[Any] = []
            size, sent_bytes = 0, self._sent_bytes
            room = min(SUBMIT_BATCH, window - len(sent))  # tasks this message may take
            while backlog and room and size < SUBMIT_BATCH_BYTES and (
                    sent_bytes < window_bytes or not rows):
                rec = backlog.popleft()
                if records.get(rec.kw) is not rec or rec.row is None:
                    continue  # cancelled before it left this client
                if rec.nbytes > max_frame and self._too_large(rec):
                    continue
                room -= 1
                sent[rec.kw] = rec.nbytes
                sent_bytes += rec.nbytes
                size += rec.nbytes
                if self._attaching:
                    self._attaching.pop(rec.kw, None)  # our own submit makes the key known
                row = rec.row
                if row.fid not in sent_fids or row.iid and row.iid not in sent_fids:
                    for fid in (row.fid, row.iid):
                        if fid and fid not in sent_fids:
                            sent_fids.add(fid)
                            fids.append(fid)
                rows.append(row)
                frames += rec.frames
            self._sent_bytes = sent_bytes
            if rows:
                blobs = [self.blobs[fid] for fid in fids]
                self._send(P.SUBMIT, {"f": fids, "t": rows}, blobs + frames)

    def _too_large(self, rec: Pending) -> bool:
        """Fail a task the broker would refuse for its size, before sending it; cut an
        out-of-band buffer over the frame cap into frames under it."""
        largest = max(map(len, rec.frames))
        if largest <= self._max_frame and rec.nbytes <= self._max_message:
            return False
        if rec.nbytes <= self._max_message and len(rec.frames[0]) <= self._max_frame:
            assert rec.row is not None
            rec.frames = S.split_frames(rec.frames, self._max_frame)
            rec.row = rec.row._replace(nframes=len(rec.frames))
            return False
        what = (f"{rec.nbytes} bytes, over the broker's cap of {self._max_message} per "
                "task" if rec.nbytes > self._max_message else f"a pickle of {largest} "
                f"bytes, over the broker's cap of {self._max_frame} bytes per frame")
        self.defer(Settle(rec.kw, (False, MessageTooLargeError(
            f"task {P.key_from_wire(rec.kw)!r} has {what}: pass a path or a smaller "
            "argument, or start the broker with a larger --max-frame/--max-message"))))
        return True

    def _on_message(self, frames: List[Any]) -> None:
        try:
            msg = P.decode(frames)
        except ZMQExecError as exc:
            log.warning("dropped a malformed message from the broker: %s", exc)
            return
        self._last_heard = time.monotonic()
        cmd, meta = msg.cmd, msg.meta
        if cmd == P.RESULT:
            if "st" in meta:  # a STATE notice riding along: it comes first
                self._on_states(meta["st"])
            sent, attaching = self._sent, self._attaching
            for row in meta["r"]:
                kw = row[0]
                if kw in sent:
                    self._sent_bytes -= sent.pop(kw)
                if attaching:
                    attaching.pop(kw, None)
            rows, payload = meta["r"], msg.payload
            if self.state.awaited:  # a thread waits in result(): straight there
                rows, payload = self.state.divert(rows, payload)
            if rows:
                self.defer(Results(rows, payload))
        elif cmd == P.STATE:
            self._on_states(meta["r"])
        elif cmd in (P.WELCOME, P.HEARTBEAT):
            self.slots = int(meta.get("slots", self.slots))
            if cmd == P.WELCOME:
                self._window = int(meta.get("window", 1024))
                self._window_bytes = int(meta.get("window_bytes", 1 << 28))
                self._max_frame = int(meta.get("max_frame", self._max_frame))
                self._max_message = int(meta.get("max_message", self._max_message))
                self._pump()
        elif cmd == P.STATUS:
            if self._status_waiters:
                self._status_waiters.popleft().set_result(meta)
        elif cmd == P.RESET:
            self._reregister()
        elif cmd == P.REFUSE:
            self.defer(Broken(BrokenZMQExecutor(meta["reason"])))
        elif cmd == P.BYE:
            log.info("the broker said goodbye: %s", meta.get("reason", ""))

    def _on_states(self, rows: List[List[str]]) -> None:
        """``[key, queued|running]`` rows: the key is known; running ones are marked so."""
        running = []
        for kw, state in rows:
            self._attaching.pop(kw, None)
            if state == "running":
                running.append(kw)
        if running:
            self.defer(Running(running))

    def _reregister(self) -> None:
        """The broker forgot this client: HELLO again, resubmit, re-inform.

        A task that may have started is resubmitted only if it may run again
        (``retries > 0``); with ``retries=0`` it fails with BrokerLostError instead.
        """
        log.warning("the broker forgot this client: registering again")
        self._hello()
        self._sent_fids.clear()  # a new broker has none of our blobs
        resend = [self.state.records.get(kw) for kw in self._sent]
        self._sent.clear()
        self._sent_bytes = 0
        for rec in reversed(resend):
            if rec is None or rec.row is None:
                continue
            if rec.row.retries == 0:
                self.defer(Settle(rec.kw, (False, BrokerLostError(
                    f"the broker lost task {P.key_from_wire(rec.kw)!r} and retries=0 "
                    "forbids running it twice"))))
            else:
                self._backlog.appendleft(rec)
        now = time.monotonic()
        for kw in list(self._attaching):
            self._attaching[kw] = now + self.attach_timeout
            self._send(P.INFORM, {"k": kw})

    def _timers(self, now: float) -> None:
        if now - self._last_heard > self.broker_timeout and self.state.broken is None:
            self.defer(Broken(BrokerLostError(
                f"no word from the broker at {self.address} for "
                f"{now - self._last_heard:.1f} s (broker_timeout={self.broker_timeout:g})")))
        if self.check is not None and self.state.broken is None:
            problem = self.check()
            if problem:
                self.defer(Broken(BrokerLostError(problem)))
        for kw, deadline in list(self._attaching.items()):
            if now >= deadline:
                del self._attaching[kw]
                self._releases.append(kw)
                error = UnknownKeyError(f"the broker does not know key {P.key_from_wire(kw)!r} "
                                        f"(waited attach_timeout={self.attach_timeout:g} s)")
                self.defer(Settle(kw, (False, error)))

    # ---- the completion thread ------------------------------------------------------------------
    def _completion_main(self) -> None:
        while True:
            item = self._completions.get()
            if item is None:
                return
            try:
                self.state.complete(item)
            except BaseException:  # a bug, or a callback's sys.exit(): the thread goes on
                log.exception("error while completing futures")
