"""Backpressure for pinned results: new submits wait in their clients, not evictions.

Results that waiting or running tasks still need (pinned by ``Dependencies``) are never
dropped by ``--max-held-bytes``.  When they alone pass it, the broker closes every
client's credit window (``hold`` in a HEARTBEAT, and in WELCOME for a client that joins
meanwhile): ``submit`` still returns at once, and the task waits in the client until the
dependents ran and unpinned their results.  Only while some task is queued or out on an
agent: with none, nothing would unpin them, and holding submits back could wait forever.
"""
from __future__ import annotations

import logging
from typing import Dict

from .deps import Dependencies
from .records import Peer
from .table import KeyTable

log = logging.getLogger(__name__)


class Backpressure:
    """Whether clients must keep their new submits now (``holding``)."""

    def __init__(self, table: KeyTable, deps: Dependencies, peers: Dict[bytes, Peer]
                 ) -> None:
        self.table = table
        self.deps = deps
        self.peers = peers
        self.holding = False

    def check(self) -> bool:
        """Decide again after a turn; True if ``holding`` changed (the caller tells the
        clients).  Cheap unless the held results are over their limit."""
        table = self.table
        over = table.held_bytes > table.max_held_bytes
        if not over and not self.holding:
            return False
        hold = over and bool(self.deps.pins) and \
            self.deps.pinned_bytes() > table.max_held_bytes and self._busy()
        if hold == self.holding:
            return False
        self.holding = hold
        log.info("results pinned for dependent tasks %s --max-held-bytes %d: clients %s "
                 "new submits", "pass" if hold else "are back under", table.max_held_bytes,
                 "hold" if hold else "send")
        return True

    def _busy(self) -> bool:
        """Whether some task is queued or out on an agent."""
        return bool(self.table.queue) or any(
            p.inflight for p in self.peers.values() if p.role == "worker")
