"""A SUBMIT batch becoming entries in the broker's key table and run queue.

Kept apart from ``broker_state`` because it runs once per task: the common case (a new
key) is written out inline, without a helper call per step.  A key the table knows already
is shared (``pure=True``, or this client's own attach), refused (``KeyExistsError``), run
again (a pure key that ended in an error) or adopted (an orphan a rejoining agent holds).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..wire import protocol as P
from .rejoin import adopt_orphan
from .records import Entry, Frames, Peer, frames_size

if TYPE_CHECKING:
    from .state import BrokerState


def submit(state: "BrokerState", peer: Peer, msg: P.Message) -> None:
    """A batch of tasks: register each key and queue it; blobs come first."""
    frames = msg.payload
    fids = msg.meta["f"]
    for fid, blob in zip(fids, frames):
        state.blobs[fid] = blob
        peer.fids.add(fid)
    at = len(fids)
    table = state.table
    for row in msg.meta["t"]:
        kw, priority, retries, pure, fid, iid, nframes = row[:7]
        limit = row[7] if len(row) > 7 else 0  # options(timeout=)
        timeout = float(limit) if type(limit) in (int, float) and limit > 0 else 0.0
        entry = table.get(kw)
        if entry is not None and not entry.owner and entry.state != "wanted":
            adopt_orphan(state, peer, entry, row, frames[at:at + nframes], timeout)
        else:
            submit_one(state, peer, entry, kw, priority, retries, bool(pure), fid, iid,
                       frames[at:at + nframes], timeout)
        at += nframes

def submit_one(state: "BrokerState", peer: Peer, entry: Optional[Entry], kw: str,
               priority: int, retries: int, pure: bool, fid: str, iid: str,
               payload: Frames, timeout: float) -> None:
    """One SUBMIT row (``entry``: the table's entry for ``kw``, if any); it runs once
    per task, so the common case (a new key) is written out inline."""
    if entry is not None and entry.state != "wanted":
        if not pure and peer.ident not in entry.interests:
            state.outbox.error(peer.ident, kw, "KeyExistsError", f"key {kw} is already "
                               "live on the broker; choose another key= or use pure=True")
            return
        if entry.state not in ("error", "lost") or not pure:
            state._interest(peer, entry)  # pure, or this client waits for it already
            state.outbox.tell(peer.ident, entry)
            return
        if entry.kw in state.held:  # errors are not cached: run a pure key again
            state.held_bytes -= state.held.pop(entry.kw)
        entry.result, entry.attempts = None, 0
    nbytes = frames_size(payload)
    if state.queued_bytes + nbytes > state.max_queued_bytes:
        state.outbox.error(peer.ident, kw, "ZMQExecError", "the broker queue is full "
                           f"(--max-queued-bytes {state.max_queued_bytes}); submit later")
        state.dropped["queue full"] += 1
        return
    if entry is None:
        entry = state.table[kw] = Entry(kw)
    else:
        state.table[kw] = entry
    entry.owner, entry.client = peer.ident, peer.hex
    entry.versions, entry.pure = peer.versions, pure
    entry.fid, entry.iid, entry.timeout = fid, iid, timeout
    entry.priority, entry.retries = priority, retries if retries > 0 else 0
    entry.frames, entry.nbytes = payload, nbytes
    entry.interests.add(peer.ident)
    peer.interests.add(kw)
    state.counts["submitted"] += 1
    entry.state, entry.agent = "queued", None
    state.queued_bytes += nbytes
    state.queue.push(priority, entry.owner, entry)
    if len(entry.interests) > 1:
        for ident in entry.interests:
            if ident != peer.ident:
                state.outbox.state(ident, kw, "queued")
