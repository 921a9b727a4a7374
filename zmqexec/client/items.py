"""What the client's threads hand one another, as typed items.

User threads post **commands** to the thread that owns the connection (the I/O thread);
that thread posts **completions** to the completion thread, which settles futures (or a
thread waiting in ``result()`` settles its own).  Each kind is a small record of its own,
so a handler is chosen by type and a kind nobody handles is a type error, not a string
that falls through to an ``else``.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

from ..wire.records import SubmitRow

Outcome = Tuple[bool, Any]  # (True, value) or (False, exception)


class Pending:
    """The client's pending record: one key this client waits for, and its futures."""

    __slots__ = ("kw", "futures", "frames", "row", "nbytes", "arrived", "out", "blob", "deps")

    def __init__(self, kw: str, futures: List[Any], row: "SubmitRow | None" = None,
                 frames: "List[Any] | None" = None, blob: "bytes | None" = None) -> None:
        self.kw = kw
        self.futures = futures
        self.row = row  # what to submit; None: a Future(key) that attaches to the key
        self.frames = frames or []
        self.blob = blob  # the pickled function (row.fid), until the broker has it
        self.nbytes = sum(map(len, self.frames))
        self.arrived: "Tuple[List[Any], List[Any]] | None" = None  # (RESULT row, frames)
        # handed to a thread waiting in result() (``ClientState.await_outcome``)
        self.out = False  # its submit left this client (a cancel must ask the broker)
        # the futures of its dependencies: held (so not released at the broker before
        # this submit reaches it) until the record is settled
        self.deps: "List[Any] | None" = None


# ---- commands: user threads -> the thread that owns the connection ------------------
# A submit is posted as its ``Pending`` record itself (one object fewer per task).


class Inform(NamedTuple):
    """``Future(key)``: tell the broker this client wants the key."""

    kw: str


class Cancel(NamedTuple):
    """``cancel()``: ask whoever holds these keys' tasks to drop them if not started."""

    request: Any  # a cancels.CancelRequest (answered key by key)


class Kill(NamedTuple):
    """``executor.kill``: stop the task wherever it runs."""

    kw: str


class Release(NamedTuple):
    """No local future holds the key any more: the broker may forget it."""

    kw: str


class Unref(NamedTuple):
    """A future of the key was dropped while the tables' lock was held (a finalizer run
    inside it): the I/O thread counts it instead."""

    kw: str


class StatusRequest(NamedTuple):
    reply: "concurrent.futures.Future[Dict[str, Any]]"


class SharedRequest(NamedTuple):
    """A Variable's or Queue's request (``meta`` and a value's pickle, if any); the
    broker's answer (its meta and payload) completes ``reply``.  ``deadline``: when its
    timeout runs out (``time.monotonic``), for sending it again after a reconnect."""

    meta: Dict[str, Any]
    payload: List[Any]
    reply: "concurrent.futures.Future[Tuple[Dict[str, Any], List[Any]]]"
    deadline: Optional[float] = None


class Close(NamedTuple):
    """Finish once every record is done (or the connection is broken), then disconnect."""


class Wake(NamedTuple):
    """Nothing to do but look again (the executor broke: the loop may end now)."""


Command = Union[Pending, Inform, Cancel, Kill, Release, Unref, StatusRequest, SharedRequest,
                Close, Wake]


# ---- completions: the I/O thread -> the completion thread ----------------------------
class Running(NamedTuple):
    """These keys started: their futures become RUNNING."""

    kws: List[str]


class Results(NamedTuple):
    """RESULT rows ``[k, status, nframes, error]`` and their frames, to unpickle."""

    rows: List[List[Any]]
    frames: List[Any]


class Settle(NamedTuple):
    """One key's outcome, decided in the client (never sent by the broker)."""

    kw: str
    outcome: Outcome


class Broken(NamedTuple):
    """The executor cannot go on: every pending future fails with ``error``."""

    error: BaseException


class Answers(NamedTuple):
    """Answers to a ``cancel()`` that came after the asking thread stopped waiting:
    key -> (cancelled, its record, already out of the client's tables)."""

    answers: Dict[str, Tuple[bool, "Pending | None"]]


Completion = Union[Running, Results, Settle, Broken, Answers]
