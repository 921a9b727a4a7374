"""The client's tables and how futures complete: shared by its two threads, no I/O.

``ClientState`` holds, under one lock: ``records`` (the client's pending records, by key),
``done`` (outcomes of keys some local Future still holds) and ``refs`` (how many local
Futures each key has).  User threads register futures here (``submit``, ``attach``) and
cancel them (``cancel``, an exchange: ``cancels``); the completion thread settles them
(``complete``).  Anything that must go to the broker is posted as a command to its
``Outlet``: the thread that owns the connection (``io.ClientIO``, ``local.node``), which
the state does not know more of.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, PENDING, RUNNING
from typing import Any, Dict, List, Optional, Protocol, Tuple, Type

from ..wire import protocol as P
from ..wire import serialization as S
from ..errors import (
    BROKER_ERRORS,
    InitializerError,
    KeyExistsError,
    WorkerLostError,
    ZMQExecError,
)
from ..wire.records import SubmitRow
from .cancels import CancelRequest, apply_answers
from .future import Future, mark_running
from .items import (
    Answers,
    Broken,
    Cancel,
    Command,
    Completion,
    Inform,
    Outcome,
    Pending,
    Release,
    Results,
    Running,
    Settle,
    Unref,
    Wake,
)

log = logging.getLogger(__name__)
_WAITING = (PENDING, RUNNING)


class Outlet(Protocol):
    """Where ``ClientState`` sends what it cannot do itself: commands for the thread
    that owns the connection, and completions for the completion thread."""

    def post(self, command: Command) -> None: ...

    def defer(self, completion: Completion) -> None: ...

    @property
    def io_thread(self) -> threading.Thread:
        """The owner thread (``cancel()`` called in it cannot wait for its answer)."""


def broker_error(kw: str, e: Dict[str, Any]) -> BaseException:
    """Rebuild an error the broker reported as header fields."""
    name = str(e.get("type"))
    if name == "CancelledError":  # a dependency was cancelled: this task never started
        return concurrent.futures.CancelledError(str(e.get("msg", "")))
    if name == "WorkerLostError":
        return WorkerLostError(P.key_from_wire(kw), int(e.get("attempts", 0)),
                               str(e.get("worker", "?")), e.get("exit"))
    cls = BROKER_ERRORS.get(name, ZMQExecError)
    return cls(str(e.get("msg", "the broker reported an error")))


def _outcome(row: List[Any], payload: List[Any],
             passthrough: Tuple[Type[BaseException], ...] = (),
             spill_dir: Optional[str] = None) -> Outcome:
    """The outcome a RESULT row ``[k, status, nframes, error]`` and its frames carry
    (``passthrough``: exceptions unpickling lets through instead of failing the future;
    ``spill_dir``: where an embedded client's task processes leave large results)."""
    kw, status, _, error = row[:4]
    if error or not payload:
        return False, broker_error(kw, error)
    return S.loads_result(status, payload, passthrough, spill_dir)


def _settle_all(futures: List[Future], outcome: Outcome) -> None:
    """Complete each future; an interrupt raised in a callback (in a user thread that
    completes its own result) does not leave the others pending."""
    interrupted: Optional[BaseException] = None
    for fut in futures:
        try:
            _settle(fut, outcome)
        except BaseException as exc:
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def _settle(fut: "concurrent.futures.Future[Any]", outcome: Outcome) -> None:
    """Complete one future; one cancelled meanwhile is left alone, quietly."""
    try:
        if outcome[0]:
            fut.set_result(outcome[1])
        elif isinstance(outcome[1], concurrent.futures.CancelledError) and \
                concurrent.futures.Future.cancel(fut):
            fut.set_running_or_notify_cancel()  # (the stdlib's own cancel, not a request)
        else:
            fut.set_exception(outcome[1])
    except concurrent.futures.InvalidStateError:
        pass


class ClientState:
    """Pending records, held outcomes and reference counts of one client."""

    def __init__(self, outlet: Outlet) -> None:
        self.outlet = outlet
        self.post = outlet.post
        self.lock = threading.Lock()
        self.records: Dict[str, Pending] = {}
        self.done: Dict[str, Outcome] = {}
        self.refs: Dict[str, int] = {}
        self.broken: Optional[BaseException] = None
        # keys a thread waits for in result(): that thread's future and the record waited for
        self.awaited: Dict[str, Tuple[Future, Pending]] = {}
        self.cancelling: Dict[str, CancelRequest] = {}  # keys a cancel() waits to hear of
        self.spill_dir: Optional[str] = None  # the embedded node's shared memory, if any

    def submit(self, fut: Future, row: SubmitRow, frames: List[Any],
               blob: Optional[bytes] = None, deps: Optional[List[Future]] = None) -> Future:
        """Register a submitted future; share a live key when pure, else refuse a live one.
        ``blob``: the pickled function, which travels with the task until the broker has it."""
        kw = fut._kw
        with self.lock:
            rec, outcome = self.records.get(kw), self.done.get(kw)
            if rec is None and outcome is None:  # a new key: the usual case
                self._ref(fut)
                rec = self.records[kw] = Pending(kw, [fut], row, frames, blob)
                rec.deps = deps
            else:
                rec = self._join(fut, rec, outcome, row, frames, blob)
                if rec is None:
                    return fut
        self.post(rec)  # (a Pending record is the submit command)
        return fut

    def _join(self, fut: Future, rec: Optional[Pending], outcome: Optional[Outcome],
              row: SubmitRow, frames: List[Any], blob: Optional[bytes]) -> Optional[Pending]:
        """A submit of a key this client knows (lock held): the record to send, if any."""
        attaching = rec is not None and rec.row is None  # Future(key) waits for it
        live = (rec is not None and not attaching) or outcome is not None
        if live and not row.pure:
            raise KeyExistsError(f"key {fut.key!r} is live in this client already; "
                                 "choose another key= or submit with pure=True")
        self._ref(fut)
        if rec is not None and attaching:
            rec.futures.append(fut)
            rec.row, rec.frames, rec.blob = row, frames, blob
            rec.nbytes = sum(len(f) for f in frames)
            return rec
        if rec is not None:
            rec.futures.append(fut)
            return None
        if outcome is not None and outcome[0]:
            _settle(fut, outcome)
            return None
        rec = self.records[fut._kw] = Pending(fut._kw, [fut], row, frames, blob)  # after an error
        return rec

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
            self.post(Inform(kw))

    def _ref(self, fut: Future) -> None:
        self.refs[fut._kw] = self.refs.get(fut._kw, 0) + 1
        fut._registered = True

    def cancel(self, futs: List[Future], timeout: Optional[float]) -> List[Future]:
        """Cancel what will never start, in one exchange (``cancels``); the futures
        cancelled.  ``timeout``: seconds to wait for the answers (0: do not wait; then
        they apply when they come).  A key other local futures wait for is kept."""
        if not self.lock.acquire(timeout=0.01):  # held by this very thread (a finalizer
            return []  # run by the garbage collector inside it): nothing is cancelled
        try:
            asked: Dict[str, List[Future]] = {}
            for fut in futs:
                rec = self.records.get(fut._kw)
                if fut._state == PENDING and rec is not None and fut in rec.futures:
                    asked.setdefault(fut._kw, []).append(fut)
            requests: List[CancelRequest] = []
            new: List[str] = []
            for kw, mine in asked.items():
                if len(set(map(id, mine))) < len(self.records[kw].futures):
                    continue  # other futures of the key wait for it: it runs for them
                pending = self.cancelling.get(kw)
                if pending is None:
                    new.append(kw)
                elif pending not in requests:
                    requests.append(pending)  # another thread asked already: its answer
            if new:
                request = CancelRequest(new)
                requests.append(request)
                for kw in new:
                    self.cancelling[kw] = request
        finally:
            self.lock.release()
        if new:
            self.post(Cancel(request))
        if timeout and self.outlet.io_thread is not threading.current_thread():
            end = time.monotonic() + timeout
            for waited in requests:
                waited.event.wait(max(0.0, end - time.monotonic()))
        answers = {}
        for waited in requests:
            answers.update(waited.close())
        apply_answers(answers, self.records, self.lock)
        return [f for f in futs if f._state in (CANCELLED, CANCELLED_AND_NOTIFIED)]

    def take_cancelled(self, kw: str) -> Optional[Pending]:
        """A key's task will never start: its record leaves the tables (the owner thread,
        before it answers the cancel), so no submit of it leaves later."""
        with self.lock:
            self.cancelling.pop(kw, None)
            return self.records.pop(kw, None)

    def kept(self, kw: str) -> None:
        with self.lock:
            self.cancelling.pop(kw, None)

    def unref(self, kw: str) -> None:
        """A future of ``kw`` is gone (``__del__``, ``release()``).

        Counted at once when the lock is free, so a key whose last future was just dropped
        may be submitted again right away; inside the lock's holder (a garbage collection
        that ran while the lock was held) it is left to the I/O thread."""
        if self.lock.acquire(blocking=False):
            try:
                gone = self.drop_ref(kw)
            finally:
                self.lock.release()
            if gone:
                self.post(Release(kw))
        else:
            self.post(Unref(kw))

    def drop_ref(self, kw: str) -> bool:
        """One future fewer for ``kw`` (lock held); True if the broker may forget it."""
        count = self.refs.get(kw, 0) - 1
        if count > 0:
            self.refs[kw] = count
            return False
        self.refs.pop(kw, None)
        self.done.pop(kw, None)
        return kw not in self.records

    def complete(self, item: Completion) -> None:
        """Apply one completion (in the completion thread)."""
        if isinstance(item, Results):
            frames, at, records = item.frames, 0, self.records
            settled = []
            for row in item.rows:
                payload = frames[at:at + row[2]]
                at += row[2]
                if row[0] in records:  # else cancelled or completed: dropped quietly
                    settled.append((row[0], _outcome(row, payload, spill_dir=self.spill_dir)))
            self._settle_keys(settled)
        elif isinstance(item, Running):
            with self.lock:
                futures = [f for kw in item.kws if kw in self.records
                           for f in self.records[kw].futures]
            for fut in futures:
                mark_running(fut)
        elif isinstance(item, Settle):
            self._settle_key(item.kw, item.outcome)
        elif isinstance(item, Broken):
            self.fail_all(item.error)
        elif isinstance(item, Answers):
            apply_answers(item.answers, self.records, self.lock)
        else:
            raise TypeError(f"not a completion: {item!r}")

    # ---- a thread waiting in Future.result() -------------------------------------------
    def await_outcome(self, fut: Future, end: Optional[float]) -> None:
        """Wait for ``fut``'s result in the calling thread, and complete it here.

        The I/O thread hands a result some thread waits for in ``result()`` straight to
        that thread (``divert``) instead of to the completion thread: one thread wake-up
        less on every round trip.  The waiting thread unpickles and completes the key's
        futures (callbacks run in it, as they would in whichever thread completes a
        stdlib future).  Whatever interrupts it (Ctrl-C while it waits or unpickles)
        hands the result back to the completion thread (``Outlet.defer``), so the future
        still completes and the interrupt still reaches the caller.  Returns when the
        future is done, or at ``end`` (the caller raises TimeoutError).
        """
        kw = fut._kw
        if not self.lock.acquire(timeout=0.01):  # held by this very thread (a finalizer
            return  # run by the garbage collector inside it): the completion thread does it
        try:
            rec = self.records.get(kw)
            if rec is None or fut not in rec.futures:
                return
            waiting = self.awaited.get(kw)
            if waiting is not None and waiting[1] is rec:
                return  # another thread waits for this key: it completes ours too
            self.awaited[kw] = (fut, rec)
        finally:
            self.lock.release()
        try:
            with fut._condition:
                while rec.arrived is None and fut._state in _WAITING:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    fut._condition.wait(left)
            self._stop_awaiting(kw, fut)
            arrived = rec.arrived  # stays on the record until the record is settled
            if arrived is not None and self.records.get(kw) is rec:
                self._settle_key(kw, _outcome(*arrived, passthrough=(KeyboardInterrupt,),
                                              spill_dir=self.spill_dir))
        except BaseException:  # Ctrl-C anywhere above: the completion thread finishes it
            self._stop_awaiting(kw, fut)
            with self.lock:
                arrived = rec.arrived if self.records.get(kw) is rec else None
            if arrived is not None:  # the completion thread completes it
                self.outlet.defer(Results([arrived[0]], arrived[1]))
            raise

    def _stop_awaiting(self, kw: str, fut: Future) -> None:
        """This thread no longer waits for ``kw`` (a result handed over stays on the
        record, ``Pending.arrived``, until the record is settled)."""
        with self.lock:
            waiting = self.awaited.get(kw)
            if waiting is not None and waiting[0] is fut:
                del self.awaited[kw]

    def divert(self, rows: List[List[Any]], frames: List[Any]
               ) -> Tuple[List[List[Any]], List[Any]]:
        """Give results that threads wait for in ``result()`` to those threads; return
        the rows (and their frames) left for the completion thread."""
        woken: List[Future] = []
        rest: List[List[Any]] = []
        rest_frames: List[Any] = []
        at = 0
        with self.lock:
            awaited, records = self.awaited, self.records
            for row in rows:
                payload = frames[at:at + row[2]]
                at += row[2]
                waiting = awaited.pop(row[0], None)
                if waiting is not None and records.get(row[0]) is waiting[1]:
                    waiting[1].arrived = (row, payload)
                    woken.append(waiting[0])
                else:  # nobody waits, or a waiter for a record gone since (stale)
                    rest.append(row)
                    rest_frames.extend(payload)
        for fut in woken:
            with fut._condition:
                fut._condition.notify_all()
        return rest, rest_frames

    def _settle_key(self, kw: str, outcome: Outcome) -> None:
        """Complete every local future of a key with one outcome."""
        self._settle_keys([(kw, outcome)])

    def _settle_keys(self, outcomes: List[Tuple[str, Outcome]]) -> None:
        """Complete the local futures of many keys: the tables change under one lock
        round, then the futures complete outside it (their callbacks may take it)."""
        settled = []
        with self.lock:
            records, refs, done = self.records, self.refs, self.done
            for kw, outcome in outcomes:
                rec = records.pop(kw, None)
                if rec is None:
                    continue
                if refs.get(kw) and (outcome[0] or not isinstance(outcome[1], KeyExistsError)):
                    done[kw] = outcome  # (a refused submit says nothing about the key)
                settled.append((rec.futures, outcome))
        interrupted: Optional[BaseException] = None
        for futures, outcome in settled:  # every key, even if a callback raises
            try:
                _settle_all(futures, outcome)
            except BaseException as exc:
                interrupted = interrupted or exc
            if not outcome[0] and isinstance(outcome[1], InitializerError):
                self.fail_all(outcome[1])
        if interrupted is not None:
            raise interrupted

    def fail_all(self, error: BaseException) -> None:
        """Fail every pending record with ``error``; later submits raise it too."""
        with self.lock:
            if self.broken is None:
                self.broken = error
                log.error("executor broken: %s", error)
            records = list(self.records.values())
            self.records.clear()
            waiting = list(self.cancelling.values())
            self.cancelling.clear()
        for request in waiting:  # no answer will come: the futures fail below
            request.event.set()
        for rec in records:
            for fut in rec.futures:
                _settle(fut, (False, error))
        self.post(Wake())
