"""The stage records of a task, by name: what a row of each batch message holds.

A task is a ``SubmitRow`` from the client to the broker, a ``TaskRow`` from the broker to
an agent, a ``Task`` while an agent holds it, and a ``ResultRow`` on the way back.  They
are NamedTuples: code reads fields by name, and JSON still writes them as the compact
lists the wire carries (``protocol`` validates the lists it receives, and a receiver
builds the record from a valid list with ``from_wire``).
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple


def _timeout(value: Any) -> float:
    """A row's optional timeout field: seconds > 0, else 0.0 (no limit)."""
    return float(value) if type(value) in (int, float) and value > 0 else 0.0


MAX_DEPS = 100_000  # dependencies of one task at most


def _keys(row: List[Any], at: int) -> Tuple[str, ...]:
    """A row's optional list of keys: () when absent or malformed."""
    keys = row[at] if len(row) > at else None
    if type(keys) is not list or len(keys) > MAX_DEPS or \
            not all(type(k) is str and len(k) <= 4096 for k in keys):
        return ()
    return tuple(keys)


def _text(row: List[Any], at: int) -> str:
    """A row's optional string field (a blob id): "" when absent or not a string."""
    return row[at] if len(row) > at and type(row[at]) is str else ""


class SubmitRow(NamedTuple):
    """One task of a SUBMIT batch, client -> broker (its frames follow in the payload)."""

    kw: str  # the key's wire text
    priority: int
    retries: int  # charged losses allowed; 0: never run twice
    pure: int  # 1: equal submissions share one task and result
    fid: str  # the function's blob id
    iid: str  # the initializer's blob id, "" without one
    nframes: int
    timeout: float = 0.0  # seconds it may run on a task process; 0: no limit
    mid: str = ""  # the blob id of the client's own modules (remote mode), "" for none
    deps: Tuple[str, ...] = ()  # keys whose results the task takes as arguments

    @classmethod
    def from_wire(cls, row: List[Any]) -> "SubmitRow":
        """A record from a row ``protocol.decode`` validated (extra fields ignored)."""
        return cls(row[0], row[1], max(0, row[2]), row[3], row[4], row[5], row[6],
                   _timeout(row[7]) if len(row) > 7 else 0.0, _text(row, 8),
                   _keys(row, 9))


class TaskRow(NamedTuple):
    """One task of a TASK batch, broker -> agent (its frames follow in the payload)."""

    kw: str
    attempt: int  # 1 for the first run, +1 per charged loss
    client: str  # the submitting client's id (initializers run once per client)
    fid: str
    iid: str
    nframes: int
    timeout: float = 0.0
    mid: str = ""
    deps: Tuple[Tuple[str, int], ...] = ()  # (key, frames) of each dependency's result,
    # whose frames follow the task's own (``nframes`` counts them all)

    @classmethod
    def from_wire(cls, row: List[Any]) -> "TaskRow":
        deps = row[8] if len(row) > 8 and type(row[8]) is list else []
        return cls(row[0], row[1], row[2], row[3], row[4], row[5],
                   _timeout(row[6]) if len(row) > 6 else 0.0, _text(row, 7),
                   tuple((kw, n) for kw, n in deps if type(kw) is str and type(n) is int
                         and 0 <= n <= row[5]))


class Task(NamedTuple):
    """A task an agent holds: its TASK row and its payload frames."""

    row: TaskRow
    frames: List[Any]

    @property
    def kw(self) -> str:
        return self.row.kw


class ResultRow(NamedTuple):
    """One result of a RESULT batch.  Agent -> broker rows stop at ``nframes``; broker ->
    client rows add ``error``: the fields of an error the broker made itself (never a
    pickle), or None when the frames carry the outcome."""

    kw: str
    status: str  # finished | error | lost
    nframes: int
    error: Optional[Dict[str, Any]] = None
