"""Dependencies: tasks that take other keys' results as arguments.

A SUBMIT row may name keys (``deps``) whose results its task needs.  The task waits here
(state ``waiting``, out of the run queue) until every one is finished, then is queued; it
leaves for an agent with those results, as the frames the broker holds (the broker never
unpickles them, and the client never downloads them to feed a task).  A dependency that
ends in an error or is lost ends its dependents the same way, without running them, and
so on down the graph.

While a task depends on a key, the key is pinned: wanted by ``PIN`` (its result is held
even after every client released it, and never dropped by ``--max-held-bytes``) until the
dependent is done, since a lost dependent runs again and needs it again.  When pinned
results alone pass ``--max-held-bytes``, the broker holds new submits back in the clients
(``backpressure.Backpressure``) instead of dropping them.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from ..wire.records import TaskRow
from .records import DEPENDENTS_PIN as PIN
from .records import DONE, Entry, Frames
from .table import KeyTable


class Dependencies:
    """The dependency edges of the broker's keys."""

    def __init__(self, table: KeyTable) -> None:
        self.table = table
        self.unfinished: Dict[str, int] = {}  # a waiting task -> dependencies not finished
        self.dependents: Dict[str, Set[str]] = {}  # a key -> the waiting tasks that need it
        self.pins: "Counter[str]" = Counter()  # a key -> tasks not done that need it
        table.deps = self

    def hold_back(self, entry: Entry, kws: Tuple[str, ...]) -> bool:
        """A task with dependencies arrives: pin them; True if it must wait for some (it
        is then ``waiting``), False if it may be queued now (all are finished)."""
        entry.deps = kws = tuple(dict.fromkeys(kws))
        table = self.table
        failed: Optional[Entry] = None
        lost = False
        waiting = 0
        for kw in kws:
            if not table.hold(PIN, kw):  # (a key not known yet, an attach's, may come)
                lost = True  # its result was dropped already
                continue
            self.pins[kw] += 1
            dep = table.entries[kw]
            if dep.state in ("error", "lost"):
                failed = failed or dep
            elif dep.state != "finished":
                waiting += 1
                self.dependents.setdefault(kw, set()).add(entry.kw)
        if failed is not None or lost:
            self._fail_from(entry, failed)
            return True
        if waiting:
            self.unfinished[entry.kw] = waiting
            self.table.move(entry, "waiting")
            return True
        return False

    def on_done(self, entry: Entry, state: str, payload: Frames,
                error: Optional[Dict[str, Any]]) -> None:
        """``entry`` ended in ``state``: its waiting dependents go on (queued, when it was
        their last unfinished dependency) or end as it did; its own pins go."""
        if entry.deps:
            self._unpin(entry)
        waiting = self.dependents.pop(entry.kw, ())
        for kw in waiting:
            dependent = self.table.get(kw)
            if dependent is None or dependent.state != "waiting":
                continue
            if state == "finished":
                self.unfinished[kw] -= 1
                if self.unfinished[kw] == 0:
                    del self.unfinished[kw]
                    self.table.move(dependent, "queued")
            else:
                self._fail_from(dependent, entry, state, payload, error)

    def cancel_dependents(self, entry: Entry) -> None:
        """``entry`` is cancelled before it started: the tasks waiting for it are
        cancelled with it (their clients' futures end cancelled), and theirs in turn."""
        error = {"type": "CancelledError", "msg": f"a dependency ({entry.kw}) was cancelled"}
        for kw in sorted(self.dependents.get(entry.kw, ())):
            dependent = self.table.get(kw)
            if dependent is not None and dependent.state == "waiting":
                self._fail_from(dependent, entry, "error", [], error)

    def on_deleted(self, entry: Entry) -> None:
        """``entry`` left the table (a waiting task cancelled): its edges and pins go."""
        self.unfinished.pop(entry.kw, None)
        if entry.deps:
            for kw in entry.deps:
                waiting = self.dependents.get(kw)
                if waiting is not None:
                    waiting.discard(entry.kw)
                    if not waiting:
                        del self.dependents[kw]
            self._unpin(entry)

    def _fail_from(self, entry: Entry, dep: Optional[Entry], state: str = "",
                   payload: Optional[Sequence[Any]] = None,
                   error: Optional[Dict[str, Any]] = None) -> None:
        """End ``entry`` as its dependency ``dep`` ended (its own error pickle or the
        broker's error), or with KeyLostError if ``dep`` is gone."""
        self.unfinished.pop(entry.kw, None)
        if dep is not None and dep.result is not None and not state:
            state, payload, error = dep.result
        if dep is None or state not in ("error", "lost"):
            state, payload, error = "lost", [], {
                "type": "KeyLostError", "msg": f"a dependency of {entry.kw} is gone (its "
                "result was dropped before the task could use it)"}
        # (never queued here: a new key, waiting, or a pure key's held error or loss,
        # which move() lets go before it holds the new one)
        self.table.move(entry, state, list(payload or []), error)

    def _unpin(self, entry: Entry) -> None:
        for kw in entry.deps:
            if not self.pins[kw]:
                continue  # (a lost key: never pinned)
            self.pins[kw] -= 1
            if self.pins[kw] <= 0:
                del self.pins[kw]
                dep = self.table.get(kw)
                if dep is not None:
                    self.table.unwant(PIN, dep)
                    if not dep.interests:
                        self.table.cancel(dep)
        entry.deps = ()

    def task(self, entry: Entry) -> Tuple[TaskRow, Frames]:
        """The TASK row of a task with dependencies, and its frames: its own, then each
        dependency's result as the broker holds it."""
        frames: List[Any] = list(entry.frames)
        sent: List[Tuple[str, int]] = []
        for kw in entry.deps:
            dep = self.table.get(kw)
            result = dep.result if dep is not None else None
            parts = result[1] if result is not None and result[0] == "finished" else []
            sent.append((kw, len(parts)))
            frames.extend(parts)
        row = entry.task_row()._replace(nframes=len(frames), deps=tuple(sent))
        return row, frames

    def pinned_bytes(self) -> int:
        """Bytes of the held results that tasks still need (never evicted).  A sum over
        the pins: callers ask only when the held results are over their limit."""
        held = self.table.held
        return sum(held.get(kw, 0) for kw in self.pins)

    def validate(self) -> None:
        for kw, count in self.unfinished.items():
            entry = self.table.get(kw)
            assert entry is not None and entry.state == "waiting", kw
            assert 0 < count <= len(entry.deps), kw
        for kw in self.pins:
            dep = self.table.get(kw)
            assert dep is not None and PIN in dep.interests, kw
        for kw in self.dependents:
            dep = self.table.get(kw)
            assert dep is not None and dep.state not in DONE, kw
