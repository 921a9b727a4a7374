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

One lock (``ClientIO.lock``) guards the tables shared by the threads: ``records`` (the
client's pending records, by key), ``done`` (outcomes of keys some local Future still
holds), and ``refs`` (how many local Futures each key has).
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
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import zmq

from . import protocol as P
from . import serialization as S
from ._version import __version__
from .errors import (
    BROKER_ERRORS,
    BrokenZMQExecutor,
    BrokerLostError,
    InitializerError,
    KeyExistsError,
    UnknownKeyError,
    WorkerLostError,
    ZMQExecError,
)
from .future import Future, mark_running

log = logging.getLogger(__name__)
Outcome = Tuple[bool, Any]  # (True, value) or (False, exception)


class Pending:
    """The client's pending record: one key this client waits for, and its futures."""

    __slots__ = ("kw", "futures", "frames", "meta", "nbytes")

    def __init__(self, kw: str, futures: List[Future], meta: Optional[Dict[str, Any]] = None,
                 frames: Optional[List[Any]] = None) -> None:
        self.kw = kw
        self.futures = futures
        self.meta = meta  # SUBMIT header, None for an attach (INFORM)
        self.frames = frames or []
        self.nbytes = sum(len(f) for f in self.frames)


def broker_error(meta: Dict[str, Any]) -> BaseException:
    """Rebuild an error the broker reported as header fields."""
    e = meta.get("e") or {}
    name = str(e.get("type"))
    if name == "WorkerLostError":
        return WorkerLostError(P.key_from_wire(meta["k"]), int(e.get("attempts", 0)),
                               str(e.get("worker", "?")), e.get("exit"))
    cls = BROKER_ERRORS.get(name, ZMQExecError)
    return cls(str(e.get("msg", "the broker reported an error")))


def _settle(fut: concurrent.futures.Future, outcome: Outcome) -> None:
    """Complete one future; one cancelled meanwhile is left alone, quietly."""
    try:
        if outcome[0]:
            fut.set_result(outcome[1])
        else:
            fut.set_exception(outcome[1])
    except concurrent.futures.InvalidStateError:
        pass


class ClientIO:
    """Client-side state and threads of one executor's connection to a broker."""

    def __init__(self, address: str, *, heartbeat_interval: float, broker_timeout: float,
                 attach_timeout: float, check: Optional[Callable[[], Optional[str]]] = None,
                 on_close: Optional[Callable[[], None]] = None) -> None:
        self.address = address
        self.interval = heartbeat_interval
        self.broker_timeout = broker_timeout
        self.attach_timeout = attach_timeout
        self.check = check
        self.on_close = on_close
        self.ident = uuid.uuid4()
        self.lock = threading.Lock()
        self.records: Dict[str, Pending] = {}
        self.done: Dict[str, Outcome] = {}
        self.refs: Dict[str, int] = {}
        self.broken: Optional[BaseException] = None
        self.slots = 0
        self.idle = threading.Condition(self.lock)  # notified when records empty out
        self._commands: "queue.SimpleQueue[Tuple[Any, ...]]" = queue.SimpleQueue()
        self._completions: "queue.SimpleQueue[Optional[Tuple[Any, ...]]]" = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closing = False
        self.io_thread = threading.Thread(target=self._io_main, name="zmqexec-io", daemon=True)
        self.completion_thread = threading.Thread(target=self._completion_main,
                                                  name="zmqexec-completion", daemon=True)
        self.io_thread.start()
        self.completion_thread.start()

    # ---- called from user threads (and __del__) --------------------------------------------
    def post(self, *command: Any) -> None:
        """Queue a command for the I/O thread and wake it (thread- and reentrant-safe)."""
        self._commands.put(command)
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already, or we are closed

    def submit(self, fut: Future, meta: Dict[str, Any], frames: List[Any],
               explicit: bool) -> Future:
        """Register a submitted future; share a live key when pure, else refuse a live one."""
        kw, pure = fut._kw, bool(meta.get("pure"))
        with self.lock:
            rec, outcome = self.records.get(kw), self.done.get(kw)
            attaching = rec is not None and rec.meta is None  # Future(key) waits for it
            live = (rec is not None and not attaching) or outcome is not None
            if live and not pure:
                raise KeyExistsError(f"key {fut.key!r} is live in this client already; "
                                     "choose another key= or submit with pure=True")
            self._ref(fut)
            if rec is not None and attaching:
                rec.futures.append(fut)
                rec.meta, rec.frames = meta, frames
                rec.nbytes = sum(len(f) for f in frames)
            elif rec is not None:
                rec.futures.append(fut)
                return fut
            elif outcome is not None and outcome[0]:
                _settle(fut, outcome)
                return fut
            else:
                rec = self.records[kw] = Pending(kw, [fut], meta, frames)
        self.post("submit", rec)
        return fut

    def attach(self, fut: Future, inform: bool) -> None:
        """Register a user-made ``Future(key)``: join a local record, or inform the broker."""
        kw = fut._kw
        with self.lock:
            if not inform and not self.refs.get(kw):
                raise ValueError(f"this client holds no future for key {fut.key!r}; "
                                 "use inform=True to ask the broker for it")
            self._ref(fut)
            rec, outcome = self.records.get(kw), self.done.get(kw)
            if rec is not None:
                rec.futures.append(fut)
            elif outcome is None:
                self.records[kw] = Pending(kw, [fut])
        if outcome is not None and rec is None:
            _settle(fut, outcome)
        elif rec is None:
            self.post("inform", kw)

    def _ref(self, fut: Future) -> None:
        self.refs[fut._kw] = self.refs.get(fut._kw, 0) + 1
        fut._registered = True

    def unref(self, kw: str) -> None:
        self.post("unref", kw)

    def cancelled(self, fut: Future) -> None:
        """A future was cancelled locally: if it was the key's last waiter, tell the broker."""
        with self.lock:
            rec = self.records.get(fut._kw)
            if rec is None or fut not in rec.futures:
                return
            rec.futures.remove(fut)
            if rec.futures:
                return
            del self.records[fut._kw]
            if not self.records:
                self.idle.notify_all()
        self.post("cancel", fut._kw)

    def request_status(self, timeout: Optional[float]) -> Dict[str, Any]:
        reply: concurrent.futures.Future = concurrent.futures.Future()
        self.post("status", reply)
        end = None if timeout is None else time.monotonic() + timeout
        while True:  # in slices, so a broken connection ends the wait
            try:
                left = 0.5 if end is None else min(0.5, max(0.0, end - time.monotonic()))
                return reply.result(left)
            except concurrent.futures.TimeoutError:
                if self.broken is not None:
                    raise self.broken from None
                if end is not None and time.monotonic() >= end:
                    raise

    def close(self) -> None:
        """Finish once every record is done (or the connection is broken), then disconnect."""
        self.post("close")

    # ---- the I/O thread -----------------------------------------------------------------------
    def _send(self, cmd: int, meta: Dict[str, Any], payload: List[Any] = []) -> None:  # noqa: B006
        self._sock.send_multipart(P.encode(cmd, meta, payload), copy=False)
        self._last_sent = time.monotonic()

    def _hello(self) -> None:
        self._send(P.HELLO, {
            "role": "client", "id": self.ident.hex, "proto": P.PROTOCOL_VERSION,
            "zmqexec": __version__, "python": S.PYTHON_VERSION,
            "cloudpickle": S.CLOUDPICKLE_VERSION, "host": socket.gethostname(),
            "pid": os.getpid(), "hb": self.interval,
            "ttl": max(60.0, self.broker_timeout)})

    def _io_main(self) -> None:
        ctx = zmq.Context()
        self._sock = sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.ident.bytes)
        sock.setsockopt(zmq.IPV6, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 20)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 1000)
        self._backlog: Deque[Pending] = deque()
        self._sent: Dict[str, int] = {}  # key -> bytes, submitted and not yet answered
        self._sent_bytes = 0
        self._attaching: Dict[str, float] = {}
        self._status_waiters: Deque[concurrent.futures.Future] = deque()
        self._window, self._window_bytes = 0, 0  # no sends before WELCOME
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
                self._run_commands()
                if sock in events:
                    for _ in range(1000):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_message(frames)
                now = time.monotonic()
                if now - self._last_sent >= self.interval:
                    self._send(P.HEARTBEAT, {})
                if now >= next_check:
                    next_check = now + 0.2
                    self._timers(now)
                if self._closing and (self.broken is not None or not self.records):
                    break
            self._send(P.BYE, {"reason": "client closing"})
        except Exception as exc:  # never die silently: every waiter must hear of it
            log.exception("client I/O thread failed")
            self._completions.put(("broken", BrokenZMQExecutor(f"client I/O failed: {exc!r}")))
        finally:
            sock.close(linger=200)
            ctx.term()
            self._completions.put(None)
            for waiter in self._status_waiters:
                waiter.set_exception(BrokenZMQExecutor("the executor closed"))
            if self.on_close is not None:
                self.on_close()

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            kind = command[0]
            if kind == "submit":
                self._backlog.append(command[1])
                continue
            self._pump()  # keep the channel ordered: earlier submits leave first
            if kind == "inform":
                self._attaching[command[1]] = time.monotonic() + self.attach_timeout
                self._send(P.INFORM, {"k": command[1]})
            elif kind == "cancel":
                kw = command[1]
                if kw in self._sent:
                    self._sent_bytes -= self._sent.pop(kw)
                    self._send(P.CANCEL, {"k": kw})
                elif self._attaching.pop(kw, None) is not None:
                    self._send(P.RELEASE, {"k": kw})
            elif kind == "unref":
                self._unref(command[1])
            elif kind == "status":
                self._status_waiters.append(command[1])
                self._send(P.STATUS, {})
            elif kind == "close":
                self._closing = True
        self._pump()

    def _unref(self, kw: str) -> None:
        with self.lock:
            count = self.refs.get(kw, 0) - 1
            if count > 0:
                self.refs[kw] = count
                return
            self.refs.pop(kw, None)
            self.done.pop(kw, None)
            if kw in self.records:
                return
        self._send(P.RELEASE, {"k": kw})

    def _pump(self) -> None:
        """Send backlogged submits while the broker's credit window allows."""
        while self._backlog and len(self._sent) < self._window and (
                self._sent_bytes < self._window_bytes or not self._sent):
            rec = self._backlog.popleft()
            if self.records.get(rec.kw) is not rec:
                continue  # cancelled before it left this client
            self._sent[rec.kw] = rec.nbytes
            self._sent_bytes += rec.nbytes
            self._attaching.pop(rec.kw, None)  # our own submit makes the key known
            assert rec.meta is not None
            self._send(P.SUBMIT, rec.meta, rec.frames)

    def _on_message(self, frames: List[Any]) -> None:
        try:
            msg = P.decode(frames)
        except ZMQExecError as exc:
            log.warning("dropped a malformed message from the broker: %s", exc)
            return
        self._last_heard = time.monotonic()
        cmd, meta = msg.cmd, msg.meta
        if cmd == P.RESULT:
            kw = meta["k"]
            if kw in self._sent:
                self._sent_bytes -= self._sent.pop(kw)
            self._attaching.pop(kw, None)
            self._completions.put(("result", meta, msg.payload))
            self._pump()
        elif cmd == P.STATE:
            self._attaching.pop(meta["k"], None)
            if meta["s"] == "running":
                self._completions.put(("running", meta["k"]))
        elif cmd in (P.WELCOME, P.HEARTBEAT):
            self.slots = int(meta.get("slots", self.slots))
            if cmd == P.WELCOME:
                self._window = int(meta.get("window", 1024))
                self._window_bytes = int(meta.get("window_bytes", 1 << 28))
                self._pump()
        elif cmd == P.STATUS:
            if self._status_waiters:
                self._status_waiters.popleft().set_result(meta)
        elif cmd == P.RESET:
            self._reregister()
        elif cmd == P.REFUSE:
            self._completions.put(("broken", BrokenZMQExecutor(meta["reason"])))
        elif cmd == P.BYE:
            log.info("the broker said goodbye: %s", meta.get("reason", ""))

    def _reregister(self) -> None:
        """The broker forgot this client: HELLO again, resubmit, re-inform.

        A task that may have started is resubmitted only if it may run again
        (``retries > 0``); with ``retries=0`` it fails with BrokerLostError instead.
        """
        log.warning("the broker forgot this client: registering again")
        self._hello()
        resend = [self.records.get(kw) for kw in self._sent]
        self._sent.clear()
        self._sent_bytes = 0
        for rec in reversed(resend):
            if rec is None or rec.meta is None:
                continue
            if rec.meta["r"] == 0:
                self._completions.put(("outcome", rec.kw, (False, BrokerLostError(
                    f"the broker lost task {P.key_from_wire(rec.kw)!r} and retries=0 "
                    "forbids running it twice"))))
            else:
                self._backlog.appendleft(rec)
        now = time.monotonic()
        for kw in list(self._attaching):
            self._attaching[kw] = now + self.attach_timeout
            self._send(P.INFORM, {"k": kw})

    def _timers(self, now: float) -> None:
        if now - self._last_heard > self.broker_timeout and self.broken is None:
            self._completions.put(("broken", BrokerLostError(
                f"no word from the broker at {self.address} for "
                f"{now - self._last_heard:.1f} s (broker_timeout={self.broker_timeout:g})")))
        if self.check is not None and self.broken is None:
            problem = self.check()
            if problem:
                self._completions.put(("broken", BrokerLostError(problem)))
        for kw, deadline in list(self._attaching.items()):
            if now >= deadline:
                del self._attaching[kw]
                self._send(P.RELEASE, {"k": kw})
                error = UnknownKeyError(f"the broker does not know key {P.key_from_wire(kw)!r} "
                                        f"(waited attach_timeout={self.attach_timeout:g} s)")
                self._completions.put(("outcome", kw, (False, error)))

    # ---- the completion thread ------------------------------------------------------------------
    def _completion_main(self) -> None:
        while True:
            item = self._completions.get()
            if item is None:
                return
            try:
                self._complete(item)
            except Exception:  # a bug here must not strand the remaining futures
                log.exception("error while completing futures")

    def _complete(self, item: Tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "running":
            with self.lock:
                rec = self.records.get(item[1])
                futures = list(rec.futures) if rec is not None else []
            for fut in futures:
                mark_running(fut)
            return
        if kind == "broken":
            self._break(item[1])
            return
        if kind == "result":
            meta, payload = item[1], item[2]
            kw = meta["k"]
            if kw not in self.records:
                return  # cancelled or already completed: dropped quietly
            outcome = (False, broker_error(meta)) if "e" in meta or not payload else \
                S.loads_result(meta["s"], payload[0])
        else:
            kw, outcome = item[1], item[2]
        with self.lock:
            rec = self.records.pop(kw, None)
            if rec is None:
                return
            if self.refs.get(kw) and not isinstance(outcome[1], KeyExistsError):
                self.done[kw] = outcome  # (a refused submit says nothing about the key)
            if not self.records:
                self.idle.notify_all()
        for fut in rec.futures:
            _settle(fut, outcome)
        if not outcome[0] and isinstance(outcome[1], InitializerError):
            self._break(outcome[1])

    def _break(self, error: BaseException) -> None:
        """Fail every pending record with ``error``; later submits raise it too."""
        with self.lock:
            if self.broken is None:
                self.broken = error
                log.error("executor broken: %s", error)
            records = list(self.records.values())
            self.records.clear()
            self.idle.notify_all()
        for rec in records:
            for fut in rec.futures:
                _settle(fut, (False, error))
        self.post("wake")
