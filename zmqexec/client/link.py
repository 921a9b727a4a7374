"""A client's half of the conversation with a broker, with no transport of its own.

``Link`` turns the commands user threads post (submit, inform, cancel, kill, release,
status) into broker messages, within the broker's credit window, and turns the broker's
answers (RESULT, STATE, WELCOME, STATUS, ...) into completions.  It sends through a
callable and is fed decoded messages, so the same rules serve a remote broker (the client
I/O thread encodes, ``io.ClientIO``) and the embedded node (which hands the broker the
message objects themselves, ``local.node``).

Under load many submits leave as one SUBMIT message (``SUBMIT_BATCH``), cancels, releases
and kills as one message each per turn; a lone submit still leaves at once.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set

from ..errors import (
    BrokenZMQExecutor,
    BrokerLostError,
    KeyLostError,
    MessageTooLargeError,
    UnknownKeyError,
)
from ..wire import protocol as P
from ..wire import serialization as S
from ..wire.records import SubmitRow
from .cancels import CancelRequest
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
    SharedRequest,
    StatusRequest,
    Unref,
)
from .state import ClientState

log = logging.getLogger(__name__)
SUBMIT_BATCH = 1000  # tasks per SUBMIT message at most
SUBMIT_BATCH_BYTES = 8 << 20  # payload bytes per SUBMIT message, beyond one task
Send = Callable[[int, Dict[str, Any], Sequence[Any]], None]


def request_status(post: Callable[[Command], None], state: ClientState,
                   timeout: Optional[float]) -> Dict[str, Any]:
    """Ask the broker for its status document and wait for it (a user thread), in slices,
    so a broken connection ends the wait."""
    reply: "concurrent.futures.Future[Dict[str, Any]]" = concurrent.futures.Future()
    post(StatusRequest(reply))
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            left = 0.5 if end is None else min(0.5, max(0.0, end - time.monotonic()))
            return reply.result(left)
        except concurrent.futures.TimeoutError:
            if state.broken is not None:
                raise state.broken from None
            if end is not None and time.monotonic() >= end:
                raise


class Link:
    """Submits within the credit window, attach timers, batched cancels and releases,
    and what the broker's answers mean for this client's futures."""

    def __init__(self, state: ClientState, blobs: Dict[str, bytes], send: Send,
                 defer: Callable[[Completion], None], hello: Callable[[], None], *,
                 attach_timeout: float) -> None:
        self.state = state
        self.blobs = blobs  # the initializer's pickle by id (a function's is on its records)
        self.send = send
        self.defer = defer
        self.hello = hello  # register (again) with the broker
        self.attach_timeout = attach_timeout
        self.backlog: Deque[Pending] = deque()
        self.sent: Dict[str, int] = {}  # key -> bytes, submitted and not yet answered
        self.sent_bytes = 0
        self.attaching: Dict[str, float] = {}  # informed keys not known yet -> deadline
        self.sent_fids: Set[str] = set()  # blobs the broker has from this client
        self.cancels: List[str] = []
        self.asking: Dict[str, CancelRequest] = {}  # keys whose cancel the broker answers
        self.releases: List[str] = []
        self.kills: List[str] = []
        self.status_waiters: "Deque[concurrent.futures.Future[Dict[str, Any]]]" = deque()
        self.shared_waiters: Dict[int, SharedRequest] = {}  # Variable/Queue requests, by id
        self.shared_ids = itertools.count(1)
        self.window, self.window_bytes = 0, 0  # no sends before WELCOME
        self.max_frame, self.max_message = 256 << 20, 4 << 30  # caps WELCOME announces
        self.slots = 0  # task processes at the broker, as its last word said
        self.hold = False  # the broker asks for no new submits (results pinned for tasks)
        self.closing = False

    @property
    def finished(self) -> bool:
        """Closing, and nothing left to wait for."""
        return self.closing and (self.state.broken is not None or not self.state.records)

    # ---- commands from user threads -------------------------------------------------------
    def apply(self, commands: List[Command]) -> None:
        """Apply what user threads queued; CANCEL and RELEASE leave as one batch each.

        Releases leave before submits: a release names a key with no pending record, so
        a key dropped and submitted again is released first, not after its new submit."""
        if not commands and not self.backlog:
            return
        unrefs: List[str] = []
        for command in commands:
            if type(command) is Pending:
                self.backlog.append(command)
            elif isinstance(command, Unref):
                unrefs.append(command.kw)
            elif isinstance(command, Release):
                self.releases.append(command.kw)
            elif isinstance(command, Kill):
                if command.kw in self.sent:
                    self.kills.append(command.kw)
            elif isinstance(command, Cancel):
                self.unref(unrefs)  # keep the channel ordered: what came earlier leaves first
                unrefs = []
                self.flush_batches()
                self.pump()  # idle task processes take work first, as with the stdlib
                self._cancel(command.request)
            elif isinstance(command, SharedRequest):
                self.unref(unrefs)  # keep the channel ordered: a key submitted before it
                unrefs = []  # is put in a Variable or Queue reaches the broker first
                self.flush_batches()
                self.pump()
                rid = next(self.shared_ids)
                self.shared_waiters[rid] = command
                self.send(P.SHARED, {**command.meta, "r": rid}, command.payload)
            elif isinstance(command, (Inform, StatusRequest)):
                self.unref(unrefs)  # keep the channel ordered: what came earlier leaves first
                unrefs = []
                self.flush_batches()
                self.pump()
                if isinstance(command, Inform):
                    self.attaching[command.kw] = time.monotonic() + self.attach_timeout
                    self.send(P.INFORM, {"k": command.kw}, ())
                else:
                    self.status_waiters.append(command.reply)
                    self.send(P.STATUS, {}, ())
            elif isinstance(command, Close):
                self.closing = True
            # Wake: nothing to do; the owner looks at its state again
        if unrefs:
            self.unref(unrefs)
        self.flush_batches()
        self.pump()

    def _cancel(self, request: CancelRequest) -> None:
        """A key whose submit has not left is cancelled here; the broker answers for the
        others (a key answered already, its result on the way, is kept)."""
        records = self.state.records
        for kw in request.kws:
            rec = records.get(kw)
            if rec is not None and rec.row is not None and not rec.out:
                request.answer(kw, True, self.state.take_cancelled(kw), self.defer)
            elif rec is not None and (kw in self.sent or rec.row is None):
                self.asking[kw] = request
                self.cancels.append(kw)
            else:
                self.state.kept(kw)
                request.answer(kw, False, None, self.defer)

    def _on_cancelled(self, kws: List[str], cancelled: bool) -> None:
        """The broker's answers to our cancels."""
        for kw in kws:
            request = self.asking.pop(kw, None)
            if request is None:
                continue
            rec = None
            if cancelled:
                if kw in self.sent:
                    self.sent_bytes -= self.sent.pop(kw)
                self.attaching.pop(kw, None)
                rec = self.state.take_cancelled(kw)
            else:
                self.state.kept(kw)
            request.answer(kw, cancelled and rec is not None, rec, self.defer)

    def flush_batches(self) -> None:
        if self.cancels:
            self.send(P.CANCEL, {"ks": self.cancels}, ())
            self.cancels = []
        if self.releases:
            self.send(P.RELEASE, {"ks": self.releases}, ())
            self.releases = []
        if self.kills:
            self.send(P.KILL, {"ks": self.kills}, ())
            self.kills = []

    def unref(self, kws: List[str]) -> None:
        """Futures of these keys were dropped; release keys no local future holds."""
        state = self.state
        with state.lock:
            self.releases.extend(kw for kw in kws if state.drop_ref(kw))

    def pump(self) -> None:
        """Send backlogged submits as batches while the broker's credit window allows."""
        backlog, sent, records, sent_fids = self.backlog, self.sent, self.state.records, \
            self.sent_fids
        window, window_bytes, max_frame = self.window, self.window_bytes, self.max_frame
        if self.hold:
            window = 0  # until the broker's dependents ran (a HEARTBEAT says hold: false)
        while backlog and len(sent) < window and (
                self.sent_bytes < window_bytes or not sent):
            fids: List[str] = []
            blobs: List[bytes] = []
            rows: List[SubmitRow] = []
            frames: List[Any] = []
            size, sent_bytes = 0, self.sent_bytes
            room = min(SUBMIT_BATCH, window - len(sent))  # tasks this message may take
            while backlog and room and size < SUBMIT_BATCH_BYTES and (
                    sent_bytes < window_bytes or not rows):
                rec = backlog.popleft()
                if records.get(rec.kw) is not rec or rec.row is None:
                    continue  # cancelled before it left this client
                if rec.nbytes > max_frame and self._too_large(rec):
                    continue
                room -= 1
                rec.out = True
                sent[rec.kw] = rec.nbytes
                sent_bytes += rec.nbytes
                size += rec.nbytes
                if self.attaching:
                    self.attaching.pop(rec.kw, None)  # our own submit makes the key known
                row = rec.row
                if row.fid not in sent_fids or row.iid and row.iid not in sent_fids or \
                        row.mid and row.mid not in sent_fids:
                    for fid in (row.fid, row.iid, row.mid):
                        if fid and fid not in sent_fids:
                            sent_fids.add(fid)
                            fids.append(fid)
                            blobs.append(rec.blob if fid == row.fid and rec.blob is not None
                                         else self.blobs[fid])
                rows.append(row)
                frames += rec.frames
            self.sent_bytes = sent_bytes
            if rows:
                self.send(P.SUBMIT, {"f": fids, "t": rows}, blobs + frames)

    def _too_large(self, rec: Pending) -> bool:
        """Fail a task the broker would refuse for its size, before sending it; cut an
        out-of-band buffer over the frame cap into frames under it."""
        largest = max(map(len, rec.frames))
        if largest <= self.max_frame and rec.nbytes <= self.max_message:
            return False
        if rec.nbytes <= self.max_message and len(rec.frames[0]) <= self.max_frame:
            assert rec.row is not None
            rec.frames = S.split_frames(rec.frames, self.max_frame)
            rec.row = rec.row._replace(nframes=len(rec.frames))
            return False
        what = (f"{rec.nbytes} bytes, over the broker's cap of {self.max_message} per "
                "task" if rec.nbytes > self.max_message else f"a pickle of {largest} "
                f"bytes, over the broker's cap of {self.max_frame} bytes per frame")
        self.defer(Settle(rec.kw, (False, MessageTooLargeError(
            f"task {P.key_from_wire(rec.kw)!r} has {what}: pass a path or a smaller "
            "argument, or start the broker with a larger --max-frame/--max-message"))))
        return True

    # ---- the broker's answers -------------------------------------------------------------
    def on_message(self, msg: P.Message) -> None:
        cmd, meta = msg.cmd, msg.meta
        if cmd == P.RESULT:
            if "st" in meta:  # a STATE notice riding along: it comes first
                self._on_states(meta["st"])
            sent, attaching = self.sent, self.attaching
            for row in meta["r"]:
                kw = row[0]
                if kw in sent:
                    self.sent_bytes -= sent.pop(kw)
                if attaching:
                    attaching.pop(kw, None)
            rows, payload = meta["r"], msg.payload
            if self.state.awaited:  # a thread waits in result(): straight there
                rows, payload = self.state.divert(rows, payload)
            if rows:
                self.defer(Results(rows, payload))
        elif cmd == P.STATE:
            self._on_states(meta["r"])
        elif cmd == P.CANCELLED:
            self._on_cancelled(meta["ks"], meta["c"])
        elif cmd in (P.WELCOME, P.HEARTBEAT):
            self.slots = int(meta.get("slots", self.slots))
            hold = meta.get("hold") is True
            if hold != self.hold:
                log.info("the broker %s new submits (results pinned for dependent tasks)",
                         "holds back" if hold else "takes")
                self.hold = hold
                if not hold:
                    self.pump()
            if cmd == P.WELCOME:
                self.window = int(meta.get("window", 1024))
                self.window_bytes = int(meta.get("window_bytes", 1 << 28))
                self.max_frame = int(meta.get("max_frame", self.max_frame))
                self.max_message = int(meta.get("max_message", self.max_message))
                self.pump()
        elif cmd == P.SHARED:
            request = self.shared_waiters.pop(meta["r"], None)
            if request is not None and not request.reply.done():
                request.reply.set_result((meta, list(msg.payload)))
        elif cmd == P.STATUS:
            if self.status_waiters:
                self.status_waiters.popleft().set_result(meta)
        elif cmd == P.RESET:
            self.reregister()
        elif cmd == P.REFUSE:
            self.defer(Broken(BrokenZMQExecutor(meta["reason"])))
        elif cmd == P.BYE:
            log.info("the broker said goodbye: %s", meta.get("reason", ""))

    def _on_states(self, rows: List[List[str]]) -> None:
        """``[key, queued|running]`` rows: the key is known; running ones are marked so."""
        running = []
        for kw, state in rows:
            self.attaching.pop(kw, None)
            if state == "running":
                running.append(kw)
        if running:
            self.defer(Running(running))

    def reregister(self) -> None:
        """The broker forgot this client: HELLO again, resubmit, re-inform.

        A task that may have started is resubmitted only if it may run again
        (``retries > 0``); with ``retries=0`` it fails with BrokerLostError instead.
        """
        log.warning("the broker forgot this client: registering again")
        self.hello()
        self._on_cancelled(list(self.asking), False)  # resubmitted below, or failed
        self._fail_shared(BrokerLostError(
            "the broker forgot this client while a Variable or Queue request waited for "
            "its answer; it was not carried out: try again"))
        self.sent_fids.clear()  # a new broker has none of our blobs
        resend = [self.state.records.get(kw) for kw in self.sent]
        self.sent.clear()
        self.sent_bytes = 0
        records = self.state.records
        for rec in reversed(resend):
            if rec is None or rec.row is None:
                continue
            if rec.row.deps and not all(kw in records for kw in rec.row.deps):
                self.defer(Settle(rec.kw, (False, KeyLostError(  # (a done one: the broker
                    f"a dependency of task {P.key_from_wire(rec.kw)!r} was lost with the "
                    "broker's held results; submit both again"))))  # lost its result)
            elif rec.row.retries == 0:
                self.defer(Settle(rec.kw, (False, BrokerLostError(
                    f"the broker lost task {P.key_from_wire(rec.kw)!r} and retries=0 "
                    "forbids running it twice"))))
            else:
                self.backlog.appendleft(rec)
        now = time.monotonic()
        for kw in list(self.attaching):
            self.attaching[kw] = now + self.attach_timeout
            self.send(P.INFORM, {"k": kw}, ())

    def ask_shared_again(self) -> None:
        """After a reconnect to a broker that still knows this client: the Variable and
        Queue requests not answered yet go again (``a``), with what is left of their
        timeouts; the broker answers each once (see ``broker.shared``)."""
        now = time.monotonic()
        for rid, request in self.shared_waiters.items():
            meta = {**request.meta, "r": rid, "a": 1}
            if request.deadline is not None:
                meta["t"] = max(0.0, request.deadline - now)
            self.send(P.SHARED, meta, request.payload)

    def check_attaching(self, now: float) -> None:
        """Keys informed but unknown past ``attach_timeout`` end with UnknownKeyError."""
        for kw, deadline in list(self.attaching.items()):
            if now >= deadline:
                del self.attaching[kw]
                self.releases.append(kw)
                error = UnknownKeyError(f"the broker does not know key {P.key_from_wire(kw)!r} "
                                        f"(waited attach_timeout={self.attach_timeout:g} s)")
                self.defer(Settle(kw, (False, error)))

    def close_waiters(self) -> None:
        """The connection is gone: status requests still waiting fail."""
        for waiter in self.status_waiters:
            waiter.set_exception(BrokenZMQExecutor("the executor closed"))
        self.status_waiters.clear()
        self._fail_shared(BrokenZMQExecutor("the executor closed"))

    def _fail_shared(self, error: BaseException) -> None:
        for request in self.shared_waiters.values():
            if not request.reply.done():
                request.reply.set_exception(error)
        self.shared_waiters.clear()
        self._on_cancelled(list(self.asking), False)
