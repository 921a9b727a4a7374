"""The broker's status document: what ``zmqexec status`` and ``executor.status()`` show.

Schema (every count is an int, times in seconds)::

    broker   version, protocol, epoch, uptime
    agents   [{name, host, pid, slots, capacity, running, prefetched, finished,
              last_heartbeat}]  (capacity: tasks it may hold, slots plus prefetch)
    slots    task processes across all agents
    clients  connected clients
    tasks    queued, running (now); finished, error, cancelled, lost, submitted (so far)
    held_keys, held_bytes   results kept for clients
    pinned_bytes            of those, results that waiting or running tasks still need
    holding                 true while clients keep new submits (pinned_bytes over the
                            held limit, until those tasks ran)
    queued_bytes            task payloads waiting
    shared   variables, queues, queued_items (Variables and Queues of all clients)
    dropped  {reason: count} of rejected messages
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, Optional

from .._version import __version__
from ..wire import protocol as P
from .records import Peer
from .table import KeyTable


def status_document(peers: Dict[bytes, Peer], table: KeyTable, *, epoch: str,
                    started: Optional[float], slots: int, dropped: "Counter[str]",
                    now: float, shared: Optional[Dict[str, int]] = None,
                    pinned_bytes: int = 0, holding: bool = False) -> Dict[str, Any]:
    """The status document (schema of ``zmqexec status --json``)."""
    states = Counter(e.state for e in table.entries.values())
    counts = table.counts
    agents = [{"name": p.name, "host": p.host, "pid": p.pid, "slots": p.slots,
               "capacity": p.capacity,
               "running": sum(e.state == "running" for e in p.inflight.values()),
               "prefetched": sum(e.state == "dispatched" for e in p.inflight.values()),
               "finished": p.finished, "last_heartbeat": round(now - p.last_seen, 3)}
              for p in peers.values() if p.role == "worker"]
    return {
        "broker": {"version": __version__, "protocol": P.PROTOCOL_VERSION, "epoch": epoch,
                   "uptime": round(now - started, 3) if started else 0.0},
        "agents": agents,
        "slots": slots,
        "clients": sum(p.role == "client" for p in peers.values()),
        "tasks": {"queued": states["queued"] + states["dispatched"] + states["waiting"],
                  "running": states["running"], "finished": counts["finished"],
                  "error": counts["error"], "cancelled": counts["cancelled"],
                  "lost": counts["lost"], "submitted": counts["submitted"]},
        "held_keys": len(table.held), "held_bytes": table.held_bytes,
        "pinned_bytes": pinned_bytes, "holding": holding,
        "queued_bytes": table.queued_bytes,
        "shared": shared or {"variables": 0, "queues": 0, "queued_items": 0},
        "dropped": dict(dropped),
    }
