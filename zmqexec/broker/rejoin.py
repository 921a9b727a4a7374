"""Peers joining (HELLO), agents that come back (after a broker restart, or after a silence
long enough for the broker to have given their tasks to others: SIGSTOP, a network cut),
and agents that drain.

A draining agent (SIGTERM) says so in its heartbeats: it gets no more tasks and counts for
no slots, while its running tasks finish; it gives back the rest (DROPPED) and says BYE.

An agent's HELLO names the keys its task processes hold, and after it the agent sends
again the results the broker has not acknowledged (``RESULT`` rows counted in the
broker's heartbeats).  The broker matches them by key:

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
from typing import TYPE_CHECKING, List

from ..wire import protocol as P
from .._version import __version__
from .records import DONE, Entry, Frames, Peer, frames_size

if TYPE_CHECKING:
    from .state import BrokerState

log = logging.getLogger(__name__)


def hello(state: "BrokerState", ident: bytes, msg: "P.Message", now: float) -> None:
    """A HELLO: refuse another protocol, else (re)register the peer and WELCOME it; a
    worker's running keys are kept if the broker gave them, else adopted or stopped."""
    meta = msg.meta
    if meta["proto"] != P.PROTOCOL_VERSION or meta["role"] not in P.ROLES:
        reason = (f"refused: peer speaks protocol {meta['proto']} as {meta['role']!r}; "
                  f"this broker (zmqexec {__version__}) speaks protocol "
                  f"{P.PROTOCOL_VERSION}: install the same zmqexec version everywhere")
        state.send(ident, P.REFUSE, {"reason": reason})
        return
    old = state.peers.get(ident)
    peer = Peer(ident, meta, now)
    if peer.role == "client" and state.client_timeout:
        peer.ttl = max(3 * peer.interval, state.client_timeout)
    if old is not None and old.role == peer.role == "worker":
        running = set(meta.get("running") or ())
        for kw, entry in old.inflight.items():
            if kw in running and state.table.get(kw) is entry:
                peer.inflight[kw] = entry
            else:
                state._lose(old, entry, "agent re-registered", charged=False)
        old.inflight = {}
    if old is not None:
        peer.interests = old.interests
    state.peers[ident] = peer
    if peer.role == "worker" and type(meta.get("running")) is list:
        adopt_running(state, peer, meta["running"], meta.get("epoch"))
    log.info("%s %s joined from %s pid %s", peer.role, peer.name, peer.host, peer.pid)
    state._free_credit(peer)
    state.send(ident, P.WELCOME, {"epoch": state.epoch, "heartbeat": peer.interval,
                                  "slots": state.slots(), **state.limits})
    state.dispatch()


def adopt_running(state: "BrokerState", agent: Peer, running: List[str],
                  epoch: object) -> None:
    """Take in the keys an agent's HELLO says it is running and the broker did not give it
    in this life of the connection (``_hello`` keeps those it did).  ``epoch`` is the one
    the agent last registered with: a key this broker does not know is an orphan only if
    the broker is new to the agent; otherwise it was finished and forgotten meanwhile."""
    for kw in running:
        if type(kw) is not str or kw in agent.inflight:
            continue
        entry = state.table.get(kw)
        if entry is None and epoch == state.epoch:
            state.outbox.kill(agent.ident, kw)  # done and released while the agent was away
            continue
        if entry is None or (entry.state == "wanted" and not entry.owner):
            entry = entry or Entry(kw)  # an orphan until a client submits the key again
            state.table[kw] = entry
        elif entry.state in DONE or entry.state in ("dispatched", "running"):
            state.outbox.kill(agent.ident, kw)  # finished, or running elsewhere: a duplicate
            continue
        elif entry.state == "queued":
            state.queued_bytes -= entry.nbytes  # requeued meanwhile: this run counts
        else:
            continue
        entry.state, entry.agent = "running", agent.ident
        agent.inflight[kw] = entry
        for ident in entry.interests:
            state.outbox.state(ident, kw, "running")
    if running:
        log.info("agent %s rejoined running %d task(s)", agent.name, len(running))


def agent_heartbeat(state: "BrokerState", agent: Peer, msg: "P.Message") -> None:
    """A heartbeat from an agent; one that says ``drain`` gets no more tasks."""
    if msg.meta.get("drain") is True and agent.slots:
        log.info("agent %s is draining", agent.name)
        agent.slots = agent.capacity = 0


def late_result(state: "BrokerState", agent: Peer, kw: str, status: str,
                payload: Frames) -> None:
    """A result from an agent that does not hold the key (any more): the first one wins."""
    entry = state.table.get(kw)
    if entry is not None and entry.state in DONE:
        state.dropped["late or duplicate result"] += 1
        return
    if entry is None or (entry.state == "wanted" and not entry.owner):
        entry = entry or Entry(kw)  # a restarted broker: held until a client asks
        state.table[kw] = entry
        if not entry.interests:
            hold_orphan(state, entry, status, payload)
            return
    holder = state.peers.get(entry.agent) if entry.agent is not None else None
    if holder is not None and holder is not agent and kw in holder.inflight:
        del holder.inflight[kw]
        state.outbox.kill(holder.ident, kw)  # the copy still running there is moot now
        state._free_credit(holder)
    state._complete(entry, status, payload)


def hold_orphan(state: "BrokerState", entry: Entry, status: str, payload: Frames) -> None:
    """Keep a result nobody has asked for yet, within ``--max-held-bytes``."""
    entry.state = status if status in DONE else "error"
    entry.result = (entry.state, payload, None)
    entry.nbytes = frames_size(payload)
    state.held[entry.kw] = entry.nbytes
    state.held_bytes += entry.nbytes
    state.counts[entry.state] += 1


def adopt_orphan(state: "BrokerState", client: Peer, entry: Entry, row: List,
                 payload: Frames, timeout: float) -> None:
    """A client submits a key the broker knows only from an agent: it waits for that run
    (or takes its held result); the task is kept in case that agent is lost."""
    entry.owner, entry.client, entry.versions = client.ident, client.hex, client.versions
    _, entry.priority, retries, pure, entry.fid, entry.iid = row[:6]
    entry.retries, entry.pure, entry.timeout = max(0, retries), bool(pure), timeout
    if entry.state not in DONE:
        entry.frames, entry.nbytes = payload, frames_size(payload)
    state.counts["submitted"] += 1
    state._interest(client, entry)
    state.outbox.tell(client.ident, entry)
