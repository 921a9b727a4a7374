"""The broker's status document: what ``zmqexec status`` and ``executor.status()`` show.

Schema (every count is an int, times in seconds)::

    broker   version, protocol, epoch, uptime
    agents   [{name, host, pid, slots, capacity, running, prefetched, finished,
              last_heartbeat}]  (capacity: tasks it may hold, slots plus prefetch)
    slots    task processes across all agents
    clients  connected clients
    tasks    queued, running (now); finished, error, cancelled, lost, submitted (so far)
    held_keys, held_bytes   results kept for clients
    queued_bytes            task payloads waiting
    dropped  {reason: count} of rejected messages
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Dict

from ..wire import protocol as P
from .._version import __version__

if TYPE_CHECKING:
    from .state import BrokerState


def status_document(state: "BrokerState", now: float) -> Dict[str, Any]:
    """The status document (schema of ``zmqexec status --json``)."""
    states = Counter(e.state for e in state.table.values())
    agents = [{"name": p.name, "host": p.host, "pid": p.pid, "slots": p.slots,
               "capacity": p.capacity,
               "running": sum(e.state == "running" for e in p.inflight.values()),
               "prefetched": sum(e.state == "dispatched" for e in p.inflight.values()),
               "finished": p.finished, "last_heartbeat": round(now - p.last_seen, 3)}
              for p in state.peers.values() if p.role == "worker"]
    return {
        "broker": {"version": __version__, "protocol": P.PROTOCOL_VERSION,
                   "epoch": state.epoch,
                   "uptime": round(now - state.started, 3) if state.started else 0.0},
        "agents": agents,
        "slots": state.slots(),
        "clients": sum(p.role == "client" for p in state.peers.values()),
        "tasks": {"queued": states["queued"] + states["dispatched"],
                  "running": states["running"], "finished": state.counts["finished"],
                  "error": state.counts["error"], "cancelled": state.counts["cancelled"],
                  "lost": state.counts["lost"], "submitted": state.counts["submitted"]},
        "held_keys": len(state.held), "held_bytes": state.held_bytes,
        "queued_bytes": state.queued_bytes,
        "dropped": dict(state.dropped),
    }


