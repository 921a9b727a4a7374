"""Tasks that wait with no worker connected: the broker side of ``no_workers_timeout``.

With no worker, tasks wait, since a cluster may be starting.  A client that
set ``no_workers_timeout`` says so in its HELLO (``nw``); once there has been no worker
slot for that long (counted from the client's arrival at the latest), that client's queued
tasks end with ``NoWorkersError``, and so do the ones it queues while there is still none.
Other clients' tasks keep waiting.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..wire import protocol as P
from .records import Entry, Peer
from .table import KeyTable

SCAN_EVERY = 0.2  # seconds between scans of the key table while nobody can run tasks


class NoWorkerWatch:
    """When the last worker slot went, and which clients' queued tasks to fail."""

    def __init__(self) -> None:
        self.since: Optional[float] = 0.0  # no worker since (None: some are connected)
        self.next_scan = 0.0

    def due(self, slots: int, now: float, peers: Dict[bytes, Peer], table: KeyTable
            ) -> List[Tuple[Entry, str]]:
        """The queued entries to fail now with ``NoWorkersError``, and why."""
        if slots:
            self.since = None
            return []
        if self.since is None:
            self.since = now
        if now < self.next_scan or not len(table.queue):
            return []
        self.next_scan = now + SCAN_EVERY
        waited = {ident: now - max(self.since, peer.joined)  # a client that just came
                  for ident, peer in peers.items()  # gets its whole timeout
                  if peer.role == "client" and peer.no_workers_timeout and
                  now - max(self.since, peer.joined) >= peer.no_workers_timeout}
        if not waited:
            return []
        return [(entry, f"no worker connected for {waited[entry.owner]:.1f} s "
                 f"(no_workers_timeout={peers[entry.owner].no_workers_timeout:g}); task "
                 f"{P.key_from_wire(entry.kw)!r} did not run: start workers with "
                 "'zmqexec worker ADDRESS', or raise the timeout")
                for entry in table if entry.state == "queued" and entry.owner in waited]
