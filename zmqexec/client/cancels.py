"""``cancel()`` as an exchange: True only if the call will never start.

A user thread cannot know whether a task it submitted has started: the task may wait in
this client's backlog, in the broker's queue, in an agent's prefetch, or behind a running
task in a task process's batch, or it may run already.  So ``cancel()`` asks the holder,
and the answer decides the future:

    user thread: ClientState.cancel(futures)
        -> CancelRequest, posted to the thread that owns the connection (Link):
           a key still in this client's backlog is cancelled at once; the others go
           to the broker in one CANCEL, which answers each key (CANCELLED: c true or
           false), itself or after asking the agent that holds it
        <- answers, key by key (CancelRequest.answer, in the owner thread)
    user thread, after the answers or CANCEL_WAIT: apply them
        cancelled -> the future is CANCELLED (callbacks run here, as in the stdlib)
        kept      -> the future is RUNNING (it started, or is about to)

The owner thread never runs user code and never waits for the user thread: an answer
that comes after the asking thread stopped waiting is applied by the completion thread.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from .future import CANCEL_WAIT, Future, Registry, mark_running
from .items import Answers, Pending

Answer = Tuple[bool, Optional[Pending]]  # (cancelled, its record, taken out of the tables)


class CancelRequest:
    """Keys one ``cancel()`` asks about, and the answers as they come."""

    __slots__ = ("kws", "answers", "event", "lock", "abandoned")

    def __init__(self, kws: List[str]) -> None:
        self.kws = kws
        self.answers: Dict[str, Answer] = {}
        self.event = threading.Event()
        self.lock = threading.Lock()
        self.abandoned = False  # the asking thread stopped waiting: late answers go on

    def answer(self, kw: str, cancelled: bool, rec: Optional[Pending],
               defer: Callable[[Answers], None]) -> None:
        """One key's answer (the owner thread); ``rec`` is the record of a cancelled key,
        already out of the client's tables."""
        with self.lock:
            if kw in self.answers:
                return
            self.answers[kw] = (cancelled, rec)
            late = self.abandoned
            if len(self.answers) >= len(self.kws):
                self.event.set()
        if late:
            defer(Answers({kw: (cancelled, rec)}))

    def close(self) -> Dict[str, Answer]:
        """Stop waiting: the answers so far (later ones go to the completion thread)."""
        with self.lock:
            self.abandoned = True
            return dict(self.answers)


def apply_answers(answers: Dict[str, Answer], records: Dict[str, Pending],
                  lock: threading.Lock) -> None:
    """Cancelled keys' futures become CANCELLED, kept keys' futures RUNNING.  Applying
    an answer twice (two threads cancelled the same key) changes nothing."""
    for cancelled, rec in answers.values():
        if cancelled:
            for fut in rec.futures if rec is not None else ():
                if concurrent.futures.Future.cancel(fut):  # (the stdlib's own transition)
                    mark_running(fut)  # CANCELLED -> CANCELLED_AND_NOTIFIED: wait() sees it
    kept = [kw for kw, (cancelled, _) in answers.items() if not cancelled]
    if kept:
        with lock:
            futures = [f for kw in kept if kw in records for f in records[kw].futures]
        for fut in futures:
            mark_running(fut)


def cancel_futures(futures: "List[concurrent.futures.Future[Any]]",
                   timeout: Optional[float] = CANCEL_WAIT
                   ) -> "List[concurrent.futures.Future[Any]]":
    """Cancel futures of any executors, one exchange per executor; the ones cancelled."""
    mine: Dict[int, Tuple[Registry, List[Future]]] = {}
    out: "List[concurrent.futures.Future[Any]]" = []
    for fut in futures:
        if isinstance(fut, Future):
            client = fut.executor._client
            mine.setdefault(id(client), (client, []))[1].append(fut)
        elif fut.cancel():
            out.append(fut)
    for client, futs in mine.values():
        out.extend(client.cancel(futs, timeout))
    return out
