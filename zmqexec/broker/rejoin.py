"""Agents that come back: after a broker restart, or after a silence long enough for the
broker to have given their tasks to others (SIGSTOP, a network cut).

An agent's HELLO names the keys its task processes hold, and after it the agent sends
again the results the broker has not acknowledged (``RESULT`` rows counted in the
broker's heartbeats).  ``Rejoin`` matches them against the key table by key:

- a key the broker gave this agent in this life of its connection stays with it;
- a key it does not know (a restarted broker) becomes an *orphan*: running on that agent,
  or finished with its result held, owned by nobody until a client submits the key again,
  which then waits for that run instead of starting another;
- a key queued again meanwhile goes back to the agent that holds it, without a new run;
- a key finished meanwhile, or running elsewhere, is a duplicate: the agent is told to
  stop it (KILL), and its late result is dropped;
- the first result for a key wins wherever it comes from; a copy still running elsewhere
  is stopped.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List

from .outbox import Outbox
from .records import DONE, Entry, Frames, Peer
from .table import KeyTable

log = logging.getLogger(__name__)


class Rejoin:
    """Reconciles what agents say they run or ran with the key table."""

    def __init__(self, table: KeyTable, outbox: Outbox, peers: Dict[bytes, Peer],
                 free_credit: Callable[[Peer], None]) -> None:
        self.table = table
        self.outbox = outbox
        self.peers = peers
        self.free_credit = free_credit

    def keep_running(self, old: Peer, new: Peer, running: List[str]) -> List[Entry]:
        """A re-HELLO of a connected agent: the tasks it still runs stay with it; the
        others it held are returned (the caller requeues them, uncharged)."""
        kept = set(running)
        lost = []
        for kw, entry in old.inflight.items():
            if kw in kept and self.table.current(entry):
                new.inflight[kw] = entry
            else:
                lost.append(entry)
        old.inflight = {}
        return lost

    def adopt_running(self, agent: Peer, running: List[str], agent_epoch: object,
                      epoch: str) -> None:
        """Take in the keys an agent's HELLO says it runs and the broker did not give it in
        this life of the connection.  ``agent_epoch`` is the broker epoch the agent last
        registered with: an unknown key is an orphan only if this broker is new to the
        agent; otherwise it was finished and forgotten meanwhile."""
        table = self.table
        for kw in running:
            if type(kw) is not str or kw in agent.inflight:
                continue
            entry = table.get(kw)
            if entry is None and agent_epoch == epoch:
                self.outbox.kill(agent.ident, kw)  # done and released while it was away
                continue
            if entry is None or (entry.state == "wanted" and not entry.owner):
                if entry is None:  # an orphan until a client submits the key again
                    entry = table.entries[kw] = Entry(kw)
            elif entry.state in DONE or entry.state in ("dispatched", "running"):
                self.outbox.kill(agent.ident, kw)  # finished, or running elsewhere
                continue
            elif entry.state != "queued":
                continue
            table.move(entry, "running")  # (queued meanwhile: this run counts)
            entry.agent = agent.ident
            agent.inflight[kw] = entry
            for ident in entry.interests:
                self.outbox.state(ident, kw, "running")
        if running:
            log.info("agent %s rejoined running %d task(s)", agent.name, len(running))

    def late_result(self, agent: Peer, kw: str, status: str, payload: Frames) -> bool:
        """A result from an agent that does not hold the key (any more): the first one
        wins.  False if it came too late (the key is done already)."""
        table = self.table
        entry = table.get(kw)
        if entry is not None and entry.state in DONE:
            return False
        if entry is None or (entry.state == "wanted" and not entry.owner):
            if entry is None:  # a restarted broker: held until a client asks
                entry = table.entries[kw] = Entry(kw)
            if not entry.interests:
                table.move(entry, status, payload, hold=True)
                return True
        holder = self.peers.get(entry.agent) if entry.agent is not None else None
        if holder is not None and holder is not agent and kw in holder.inflight:
            del holder.inflight[kw]
            self.outbox.kill(holder.ident, kw)  # the copy still running there is moot now
            self.free_credit(holder)
        table.move(entry, status, payload)
        return True
