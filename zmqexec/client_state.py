"""The client's tables and how futures complete: shared by its two threads, no I/O.

``ClientState`` holds, under one lock: ``records`` (the client's pending records, by key),
``done`` (outcomes of keys some local Future still holds) and ``refs`` (how many local
Futures each key has).  User threads register futures here (``submit``, ``attach``,
``cancelled``); the completion thread settles them (``complete``).  Anything that must go
to the broker is handed to ``post``, which the I/O side (``client_io.ClientIO``) provides.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Dict, List, Optional, Tuple

from . import protocol as P
from . import serialization as S
from .errors import (
    BROKER_ERRORS,
    InitializerError,
    KeyExistsError,
    WorkerLostError,
    ZMQExecError,
)
from .future import Future, mark_running

log = logging.getLogger(__name__)
Outcome = Tuple[bool, Any]  # (True, value) or (False, exception)


class Pending:
    """The client's pending record: one key this client waits for, and its futures."""

    __slots__ = ("kw", "futures", "frames", "row", "nbytes")

    def __init__(self, kw: str, futures: List[Future], row: Optional[List[Any]] = None,
                 frames: Optional[List[Any]] = None) -> None:
        self.kw = kw
        self.futures = futures
        self.row = row  # SUBMIT row [k, priority, retries, pure, fid, iid, n]; None: attach
        self.frames = frames or []
        self.nbytes = sum(map(len, self.frames))


def broker_error(kw: str, e: Dict[str, Any]) -> BaseException:
    """Rebuild an error the broker reported as header fields."""
    name = str(e.get("type"))
    if name == "WorkerLostError":
        return WorkerLostError(P.key_from_wire(kw), int(e.get("attempts", 0)),
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


class ClientState:
    """Pending records, held outcomes and reference counts of one client."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: Dict[str, Pending] = {}
        self.done: Dict[str, Outcome] = {}
        self.refs: Dict[str, int] = {}
        self.broken: Optional[BaseException] = None
        self.slots = 0

    def post(self, *command: Any) -> None:
        """Hand a command to the I/O side (``ClientIO`` provides it)."""
        raise NotImplementedError

    def submit(self, fut: Future, row: List[Any], frames: List[Any]) -> Future:
        """Register a submitted future; share a live key when pure, else refuse a live one."""
        kw, pure = fut._kw, bool(row[3])
        with self.lock:
            rec, outcome = self.records.get(kw), self.done.get(kw)
            attaching = rec is not None and rec.row is None  # Future(key) waits for it
            live = (rec is not None and not attaching) or outcome is not None
            if live and not pure:
                raise KeyExistsError(f"key {fut.key!r} is live in this client already; "
                                     "choose another key= or submit with pure=True")
            self._ref(fut)
            if rec is not None and attaching:
                rec.futures.append(fut)
                rec.row, rec.frames = row, frames
                rec.nbytes = sum(len(f) for f in frames)
            elif rec is not None:
                rec.futures.append(fut)
                return fut
            elif outcome is not None and outcome[0]:
                _settle(fut, outcome)
                return fut
            else:
                rec = self.records[kw] = Pending(kw, [fut], row, frames)
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
        self.post("cancel", fut._kw)

    def _complete(self, item: Tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "running":
            with self.lock:
                futures = [f for kw in item[1] if kw in self.records
                           for f in self.records[kw].futures]
            for fut in futures:
                mark_running(fut)
        elif kind == "broken":
            self._break(item[1])
        elif kind == "results":
            frames, at = item[2], 0
            for kw, status, nframes, error in (row[:4] for row in item[1]):
                payload = frames[at:at + nframes]
                at += nframes
                if kw not in self.records:
                    continue  # cancelled or already completed: dropped quietly
                outcome = (False, broker_error(kw, error)) if error or not payload else \
                    S.loads_result(status, payload[0])
                self._settle_key(kw, outcome)
        else:
            self._settle_key(item[1], item[2])

    def _settle_key(self, kw: str, outcome: Outcome) -> None:
        """Complete every local future of a key with one outcome."""
        with self.lock:
            rec = self.records.pop(kw, None)
            if rec is None:
                return
            if self.refs.get(kw) and not isinstance(outcome[1], KeyExistsError):
                self.done[kw] = outcome  # (a refused submit says nothing about the key)
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
        for rec in records:
            for fut in rec.futures:
                _settle(fut, (False, error))
        self.post("wake")
