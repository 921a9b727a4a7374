"""The broker's key table: every key it knows, who wants it, and the bytes it holds.

``KeyTable.move`` is the one place an entry's state changes (``dispatched`` is its batch
form for the hottest transition, a TASK batch leaving), and with it the byte counts
that depend on the state (``queued_bytes`` for the payloads of tasks queued or waiting,
``held_bytes`` for results kept for clients), the run queue, the result sent to
interested clients and the entry's removal.  ``validate()`` recomputes every count from the
entries (tests call it after each step).

Life of a key (``Entry.state``)::

    wanted --submit--> queued --dispatch--> dispatched --STARTED--> running --RESULT--> done
      ^ inform before     ^  requeued on a lost agent (charged only if started)      |
        any submit        +----------------------------------------------------------+
    done = finished | error | lost; an entry nobody wants (and that is not queued or
    out on an agent) is deleted.  A task with dependencies (``deps.Dependencies``) is
    ``waiting`` between submit and queued, out of the run queue, until they are finished
    (or ends as one of them did).  A done entry holds its result frames for the clients
    that want it, within ``max_held_bytes`` (oldest dropped first: a later inform gets
    ``KeyLostError``).
"""
from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Set

from ..wire.records import ResultRow, SubmitRow
from .outbox import Outbox
from .queue import RunQueue
from .records import DEPENDENTS_PIN, DONE, NO_FRAMES, Entry, Frames, Peer, frames_size

log = logging.getLogger(__name__)
LOST_KEYS_KEPT = 100_000  # evicted keys remembered, to answer a late inform clearly


class KeyTable:
    """Entries by wire key, the clients that want each, the run queue and byte counts."""

    def __init__(self, outbox: Outbox, *, max_held_bytes: int, max_queued_bytes: int
                 ) -> None:
        self.outbox = outbox
        self.max_held_bytes = max_held_bytes
        self.max_queued_bytes = max_queued_bytes
        self.entries: Dict[str, Entry] = {}
        self.wanted_by: Dict[bytes, Set[str]] = {}  # client -> keys it wants
        self.queue: RunQueue[Entry] = RunQueue()
        self.held: "OrderedDict[str, int]" = OrderedDict()  # done keys, oldest first
        self.held_bytes = 0
        self.queued_bytes = 0
        self.lost_keys: "OrderedDict[str, None]" = OrderedDict()
        self.counts: Counter[str] = Counter()
        self.deps: Any = None  # the broker's Dependencies, told of submits, ends, deletes

    # ---- reading ------------------------------------------------------------------------
    def __contains__(self, kw: str) -> bool:
        return kw in self.entries

    def __getitem__(self, kw: str) -> Entry:
        return self.entries[kw]

    def get(self, kw: str) -> Optional[Entry]:
        return self.entries.get(kw)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self.entries.values()))

    def current(self, entry: Entry) -> bool:
        """Whether ``entry`` is still the table's entry for its key."""
        return self.entries.get(entry.kw) is entry

    # ---- the one transition ---------------------------------------------------------------
    def move(self, entry: Entry, state: str, payload: Optional[Frames] = None,
             error: Optional[Dict[str, Any]] = None, *, front: bool = False,
             hold: bool = False) -> None:
        """Put ``entry`` in ``state``, keeping every count that depends on it.

        ``queued``: into the run queue (``front``: a task a lost agent gave back).
        A done state (``finished``, ``error``, ``lost``): ``payload`` (result frames) or
        ``error`` (fields of an error the broker made) go to every client that wants the
        key, and are held for them; with nobody to hold them for, the entry is deleted,
        unless ``hold`` (a result from before a broker restart, kept until asked for).
        ``deleted``: out of the table, and out of every client's wanted keys."""
        old = entry.state
        if old == "queued" or old == "waiting":
            self.queued_bytes -= entry.nbytes
        elif old in DONE and entry.result is not None and self.current(entry):
            self.held_bytes -= self.held.pop(entry.kw, 0)
            entry.result = None
        entry.state = state
        if state == "queued":
            entry.agent = None
            self.queued_bytes += entry.nbytes
            self.queue.push(entry.priority, entry.owner, entry, front)
        elif state == "waiting":  # (for its dependencies: out of the run queue)
            self.queued_bytes += entry.nbytes
        elif state in DONE:
            self._done(entry, state, payload or [], error, hold)
        elif state == "deleted":
            self._delete(entry)

    def dispatched(self, entries: List[Entry]) -> None:
        """``move(entry, "dispatched")`` for a run of entries popped from the run queue
        (``queued`` ones): one call per TASK batch, not one per task."""
        queued_bytes = self.queued_bytes
        for entry in entries:
            queued_bytes -= entry.nbytes
            entry.state = "dispatched"
        self.queued_bytes = queued_bytes

    def _done(self, entry: Entry, state: str, payload: Frames,
              error: Optional[Dict[str, Any]], hold: bool) -> None:
        entry.frames = NO_FRAMES
        self.counts[state] += 1
        if self.deps is not None:  # its dependents go on, or end as it did
            self.deps.on_done(entry, state, payload, error)
        row = ResultRow(entry.kw, state, len(payload), error)
        for ident in entry.interests:
            self.outbox.result(ident, row, payload)
        if not entry.interests and not hold:
            self.move(entry, "deleted")
            return
        entry.result = (state, tuple(payload), error)  # (of bytes: soon untracked by the GC)
        entry.nbytes = frames_size(payload)
        self.held[entry.kw] = entry.nbytes
        self.held_bytes += entry.nbytes
        while self.held_bytes > self.max_held_bytes and len(self.held) > 1:
            oldest = next((e for e in map(self.entries.__getitem__, self.held)
                           if DEPENDENTS_PIN not in e.interests), None)
            if oldest is None:
                break  # every held result is pinned by tasks that need it
            log.info("held results over %d bytes: dropping %s", self.max_held_bytes,
                     oldest.kw)
            self.move(oldest, "deleted")
            self.lost_keys[oldest.kw] = None
            while len(self.lost_keys) > LOST_KEYS_KEPT:
                self.lost_keys.popitem(last=False)

    def _delete(self, entry: Entry) -> None:
        if self.current(entry):
            if self.deps is not None:
                self.deps.on_deleted(entry)
            del self.entries[entry.kw]
            if entry.kw in self.held:
                self.held_bytes -= self.held.pop(entry.kw)
        for ident in entry.interests:
            keys = self.wanted_by.get(ident)
            if keys is not None:
                keys.discard(entry.kw)
        entry.result = None

    def fail(self, entry: Entry, kind: str, error: Dict[str, Any]) -> None:
        """End a key with an error the broker made (``kind``: error or lost)."""
        self.move(entry, kind, None, error)

    # ---- who wants a key ------------------------------------------------------------------
    def want(self, ident: bytes, entry: Entry) -> None:
        if ident not in entry.interests:
            entry.interests += (ident,)
        keys = self.wanted_by.get(ident)
        if keys is None:
            keys = self.wanted_by[ident] = set()
        keys.add(entry.kw)

    def unwant(self, ident: bytes, entry: Entry) -> None:
        """Drop one client's interest; an entry nobody wants is freed if it holds no task
        (one that is queued or out on an agent is the caller's to cancel)."""
        interests = entry.interests
        if ident in interests:
            entry.interests = () if len(interests) == 1 else \
                tuple(i for i in interests if i != ident)
        keys = self.wanted_by.get(ident)
        if keys is not None:
            keys.discard(entry.kw)
        if not entry.interests and (entry.state in DONE or entry.state == "wanted"):
            self.move(entry, "deleted")

    def forget_client(self, ident: bytes) -> Set[str]:
        """A client left: the keys it wanted (the caller drops each interest)."""
        return self.wanted_by.pop(ident, set())

    # ---- a client's messages ---------------------------------------------------------------
    def submit(self, client: Peer, row: SubmitRow, payload: Frames) -> bool:
        """One SUBMIT row: a new key is queued; a key the table knows is shared
        (``pure``, or this client's own attach), refused (``KeyExistsError``), run again
        (a pure key that ended in an error) or adopted (an orphan a rejoining agent runs).
        False if it was refused because the queue is full."""
        entry = self.entries.get(row.kw)
        if entry is not None and entry.state != "wanted":
            if not entry.owner:
                self._adopt(client, entry, row, payload)
                return True
            if not row.pure and client.ident not in entry.interests:
                self.outbox.error(client.ident, row.kw, "KeyExistsError",
                                  f"key {row.kw} is already live on the broker; choose "
                                  "another key= or use pure=True")
                return True
            if entry.state not in ("error", "lost") or not row.pure:
                self.want(client.ident, entry)  # pure, or this client waits for it already
                self.outbox.tell(client.ident, entry)
                return True
            entry.attempts = 0  # errors are not cached: a pure key runs again
        nbytes = frames_size(payload)
        if self.queued_bytes + nbytes > self.max_queued_bytes:
            self.outbox.error(client.ident, row.kw, "ZMQExecError", "the broker queue is "
                              f"full (--max-queued-bytes {self.max_queued_bytes}); submit "
                              "later")
            return False
        if entry is None:
            entry = self.entries[row.kw] = Entry(row.kw)
        self._take_task(client, entry, row, payload)
        self.want(client.ident, entry)
        self.counts["submitted"] += 1
        entry.nbytes = nbytes  # (a held error's size is in ``held``: move lets it go)
        if row.deps and self.deps is not None and self.deps.hold_back(entry, row.deps):
            return True  # it waits for its dependencies (or ended with one)
        self.move(entry, "queued")
        for ident in entry.interests:
            if ident != client.ident:
                self.outbox.state(ident, row.kw, "queued")
        return True

    @staticmethod
    def _take_task(client: Peer, entry: Entry, row: SubmitRow, payload: Frames) -> None:
        """The task of a SUBMIT row, and its owner, onto ``entry``."""
        entry.owner, entry.client, entry.versions = client.ident, client.hex, client.versions
        entry.priority, entry.retries, entry.pure = row.priority, row.retries, bool(row.pure)
        entry.fid, entry.iid, entry.mid, entry.timeout = row.fid, row.iid, row.mid, \
            row.timeout
        entry.frames = payload

    def _adopt(self, client: Peer, entry: Entry, row: SubmitRow, payload: Frames) -> None:
        """A client submits a key the table knows only from an agent (a run from before a
        broker restart): it waits for that run, or takes its held result; the task is
        kept in case that agent is lost."""
        self._take_task(client, entry, row, payload)
        if entry.state in DONE:
            entry.frames = NO_FRAMES
        else:
            entry.nbytes = frames_size(payload)
        self.counts["submitted"] += 1
        self.want(client.ident, entry)
        self.outbox.tell(client.ident, entry)

    def inform(self, ident: bytes, kw: str) -> None:
        """A client wants a key: its result now if held, else when it comes."""
        entry = self.entries.get(kw)
        if entry is None:
            if kw in self.lost_keys:
                self.outbox.error(ident, kw, "KeyLostError", f"the result of {kw} was "
                                  "dropped (--max-held-bytes) before this client asked for it")
                return
            entry = self.entries[kw] = Entry(kw)
        self.want(ident, entry)
        self.outbox.tell(ident, entry)

    def hold(self, ident: bytes, kw: str) -> bool:
        """``ident`` (a Variable or Queue) wants a key, known yet or not (its submit may
        still be on its way); False if its result was dropped already."""
        entry = self.entries.get(kw)
        if entry is None:
            if kw in self.lost_keys:
                return False
            entry = self.entries[kw] = Entry(kw)
        self.want(ident, entry)
        return True

    def cancel(self, entry: Entry) -> None:
        """Nobody wants a task any more: drop it if queued, recall it if prefetched."""
        if entry.state in ("queued", "waiting"):
            self.counts["cancelled"] += 1
            self.move(entry, "deleted")
        elif entry.state == "dispatched" and entry.agent is not None:
            self.outbox.cancel(entry.agent, entry.kw)

    def lose(self, entry: Entry, agent: str, exit: str, charged: bool) -> None:
        """An agent lost a task: requeue it first in its line, or fail it with
        ``WorkerLostError`` after ``retries`` charged losses (only a started task is
        charged)."""
        if not self.current(entry) or entry.state in DONE:
            return
        if charged:
            entry.attempts += 1
        if not entry.interests:
            self.counts["cancelled"] += 1
            self.move(entry, "deleted")
        elif entry.attempts > entry.retries:
            self.fail(entry, "lost", {"type": "WorkerLostError", "attempts": entry.attempts,
                                      "worker": agent, "exit": exit})
        else:
            log.info("requeueing %s (attempt %d lost: %s)", entry.kw, entry.attempts, exit)
            self.move(entry, "queued", front=True)

    def still_queued(self, entry: Entry) -> bool:
        """For the run queue: cancels leave stale items behind, skipped when popped."""
        return entry.state == "queued" and self.entries.get(entry.kw) is entry

    # ---- checks -------------------------------------------------------------------------
    def validate(self) -> None:
        """Recompute every count from the entries; raise AssertionError on a mismatch."""
        queued = sum(e.nbytes for e in self.entries.values()
                     if e.state == "queued" or e.state == "waiting")
        assert queued == self.queued_bytes, (queued, self.queued_bytes)
        assert sum(self.held.values()) == self.held_bytes, (self.held, self.held_bytes)
        for kw, size in self.held.items():
            entry = self.entries.get(kw)
            assert entry is not None and entry.state in DONE, kw
            assert entry.result is not None and entry.nbytes == size, kw
        for kw, entry in self.entries.items():
            assert entry.kw == kw and entry.state != "deleted", (kw, entry.state)
            if entry.state in DONE:
                assert not entry.frames, kw
                assert (entry.result is not None) == (kw in self.held), kw
            for ident in entry.interests:
                assert kw in self.wanted_by.get(ident, ()), (kw, ident)
        for ident, keys in self.wanted_by.items():
            for kw in keys:
                entry = self.entries.get(kw)
                assert entry is not None and ident in entry.interests, (kw, ident)
        live = sum(e.state == "queued" for e in self.entries.values())
        assert len(self.queue) >= live, (len(self.queue), live)
