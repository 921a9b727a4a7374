"""Everything the broker knows and decides, with no sockets: unit-testable by itself.

``BrokerState.handle(peer, frames, now)`` takes one received message (peer routing id plus
frames) and adds what must be sent to its ``Outbox``; ``flush()`` returns the batched
messages as ``(peer, frames)``; ``tick(now)`` sends heartbeats and expires silent peers.
Payload frames are kept and forwarded as the objects the socket gave (``zmq.Frame`` or
``bytes``), never parsed and never unpickled.

Life of a key in the table (``Entry.state``)::

    wanted --SUBMIT--> queued --TASK--> dispatched --STARTED--> running --RESULT--> done
      ^ INFORM before     ^   requeue on a lost worker (charged only if started)    |
        any submit        +---------------------------------------------------------+
    An entry lives while a client wants it or it is queued or out on an agent; a done
    entry holds its result frames for those clients (--max-held-bytes).
"""
from __future__ import annotations

import logging
import uuid
from collections import Counter, OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..wire import protocol as P
from .outbox import Outbox
from .queue import RunQueue
from .status import status_document
from .rejoin import agent_heartbeat, hello, late_result
from .submit import submit
from .waits import NoWorkerWatch
from .records import DONE, MAX_PREFETCH, STOPPED, Entry, Frames, Peer, frames_size
from ..errors import ProtocolError

log = logging.getLogger(__name__)


class BrokerState:
    """The key table, run queue, agent credits and peer liveness of one broker."""

    def __init__(self, *, max_held_bytes: int = 1 << 30, max_queued_bytes: int = 4 << 30,
                 max_frame: int = 256 << 20, max_message: int = 4 << 30,
                 window: int = 4096, window_bytes: int = 256 << 20,
                 client_timeout: Optional[float] = None) -> None:
        self.epoch = uuid.uuid4().hex
        self.client_timeout = client_timeout  # overrides the ttl clients ask for
        self.key_roles: Optional[Callable[[Optional[str]], Optional[str]]] = None
        self.limits = {"max_frame": max_frame, "max_message": max_message,
                       "window": window, "window_bytes": window_bytes}
        self.max_held_bytes = max_held_bytes
        self.max_queued_bytes = max_queued_bytes
        self.outbox = Outbox()
        self.send = self.outbox.send
        self.blobs: Dict[str, Any] = {}  # function and initializer pickles by content hash
        self.peers: Dict[bytes, Peer] = {}
        self.table: Dict[str, Entry] = {}
        self.queue: RunQueue[Entry] = RunQueue()
        # agents that may take another task, served in turn (checked again when popped)
        self.ready: "OrderedDict[bytes, None]" = OrderedDict()
        self.held: "OrderedDict[str, int]" = OrderedDict()  # done keys, oldest first
        self.held_bytes = 0
        self.queued_bytes = 0
        self.lost_keys: "OrderedDict[str, None]" = OrderedDict()
        self.counts: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.started: Optional[float] = None
        self.no_workers = NoWorkerWatch()
        self.now = 0.0

    # ---- entry points -------------------------------------------------------------
    def handle(self, ident: bytes, frames: Frames, now: float,
               user: Optional[str] = None) -> None:
        """Apply one received message; problems are counted and logged, never raised.

        With keys, ``user`` is the sender's public key (CurveZMQ authenticated it): its
        folder decides the roles it may HELLO as, and every later message of that peer
        must come from the same key (a routing id alone proves nothing)."""
        self.now = now
        if self.started is None:
            self.started = now
        try:
            msg = P.decode(frames)
        except ProtocolError as exc:
            self.drop(str(exc).split(":")[0], ident, exc)
            return
        try:
            self._apply(ident, msg, now, user)
        except Exception as exc:  # the last defence: decode() should have refused it
            reason = f"{msg.name} could not be handled"
            if not self.dropped[reason]:  # a traceback once per reason; then counts
                log.exception("error handling %s from %s", msg.name, ident.hex()[:8])
            self.drop(reason, ident, exc)

    def _apply(self, ident: bytes, msg: P.Message, now: float, user: Optional[str]) -> None:
        peer = self.peers.get(ident)
        if self.key_roles is not None:
            role = self.key_roles(user)
            if msg.cmd == P.HELLO and msg.meta["role"] != role and not (
                    role == "client" and msg.meta["role"] == "status"):
                self.drop("key not allowed for that role", ident)
                self.send(ident, P.REFUSE, {"reason": (
                    f"refused: this key may act as {role or 'nothing'}, not as "
                    f"{msg.meta['role']}; a worker needs a key from the workers/ folder")})
                return
            if peer is not None and msg.cmd != P.HELLO and peer.key != user:
                self.drop("message from another key", ident)
                return
        if msg.cmd == P.HELLO:
            hello(self, ident, msg, now)
            if ident in self.peers:
                self.peers[ident].key = user
            return
        if peer is None:
            self.drop("message before HELLO", ident)
            self.send(ident, P.RESET, {"reason": "unknown peer; send HELLO"})
            return
        peer.last_seen = now
        handler = _HANDLERS.get((peer.role, msg.cmd))
        if handler is None:
            self.drop(f"{msg.name} from a {peer.role}", ident)
            return
        handler(self, peer, msg)
        self.dispatch()

    def tick(self, now: float) -> None:
        """Heartbeat every peer that is due and expire the ones gone silent."""
        self.now = now
        slots = self.slots()
        for peer in list(self.peers.values()):
            if now - peer.last_seen > peer.ttl:
                log.warning("%s %s silent for %.1f s: dropping it", peer.role, peer.name,
                            now - peer.last_seen)
                self._forget(peer, f"heartbeat expired after {peer.ttl:g} s")
            elif now >= peer.next_beat:
                peer.next_beat = now + peer.interval
                self.send(peer.ident, P.HEARTBEAT, {"epoch": self.epoch, "slots": slots,
                                                    "n": peer.results_in})
        self.no_workers.tick(self, slots, now)
        self.dispatch()

    def flush(self) -> List[Tuple[bytes, Frames]]:
        """The messages to send now: one batch per peer and kind."""
        return self.outbox.flush()

    def shutdown(self, reason: str) -> None:
        """Tell every peer the broker is going away."""
        for ident in self.peers:
            self.send(ident, P.BYE, {"reason": reason})

    # ---- helpers ----------------------------------------------------------------------
    def drop(self, reason: str, ident: bytes, exc: Optional[BaseException] = None) -> None:
        """Count a rejected message by reason; logging is rate-limited by the caller."""
        self.dropped[reason] += 1
        if self.dropped[reason] in (1, 10, 100, 1000) or self.dropped[reason] % 10000 == 0:
            log.warning("dropped message from %s: %s (%d so far)",
                        ident.hex()[:8], exc or reason, self.dropped[reason])

    def slots(self) -> int:
        return sum(p.slots for p in self.peers.values() if p.role == "worker")

    def _fail(self, entry: Entry, kind: str, error: Dict[str, Any]) -> None:
        """Finish a key with an error the broker made (header only, no pickle)."""
        self._complete(entry, kind, [], error)

    def _complete(self, entry: Entry, status: str, payload: Frames,
                  error: Optional[Dict[str, Any]] = None) -> None:
        if entry.state == "queued":
            self.queued_bytes -= entry.nbytes
        entry.state = status if status in DONE else "error"
        entry.frames = []
        self.counts[entry.state] += 1
        row = [entry.kw, entry.state, len(payload), error]
        for ident in entry.interests:
            self.outbox.result(ident, row, payload)
        if not entry.interests:
            self._delete(entry)
            return
        entry.result = (entry.state, payload, error)
        entry.nbytes = frames_size(payload)
        self.held[entry.kw] = entry.nbytes
        self.held_bytes += entry.nbytes
        while self.held_bytes > self.max_held_bytes and len(self.held) > 1:
            kw, _ = next(iter(self.held.items()))
            log.info("held results over %d bytes: dropping %s", self.max_held_bytes, kw)
            self._delete(self.table[kw])
            self.lost_keys[kw] = None
            while len(self.lost_keys) > 100_000:
                self.lost_keys.popitem(last=False)

    def _delete(self, entry: Entry) -> None:
        if self.table.get(entry.kw) is entry:
            del self.table[entry.kw]
        if entry.kw in self.held and entry.result is not None:
            self.held_bytes -= self.held.pop(entry.kw)
        for ident in entry.interests:
            peer = self.peers.get(ident)
            if peer is not None:
                peer.interests.discard(entry.kw)
        if entry.state == "queued":
            self.queued_bytes -= entry.nbytes
        entry.state = "deleted"

    def _enqueue(self, entry: Entry, front: bool = False) -> None:
        entry.state = "queued"
        entry.agent = None
        self.queued_bytes += entry.nbytes
        self.queue.push(entry.priority, entry.owner, entry, front)

    def _interest(self, peer: Peer, entry: Entry) -> None:
        entry.interests.add(peer.ident)
        peer.interests.add(entry.kw)

    def _uninterest(self, peer: Peer, entry: Entry) -> None:
        """Drop one client's interest; an entry nobody wants is freed or stopped."""
        entry.interests.discard(peer.ident)
        peer.interests.discard(entry.kw)
        if entry.interests:
            return
        if entry.state in DONE or entry.state == "wanted":
            self._delete(entry)

    def _cancel(self, entry: Entry) -> None:
        """Nobody wants a task any more: drop it if queued, recall it if prefetched."""
        if entry.state == "queued":
            self.counts["cancelled"] += 1
            self._delete(entry)
        elif entry.state == "dispatched" and entry.agent is not None:
            self.outbox.cancel(entry.agent, entry.kw)

    def dispatch(self) -> None:
        """Hand queued tasks to agents with free capacity, agents taking turns.

        An agent's turn takes an even share of the queue (at least one task, at most its
        free capacity): a few long tasks spread over all agents, while a long queue leaves
        in runs of hundreds without a turn per task."""
        ready, queue, still_queued = self.ready, self.queue, self._still_queued
        while ready and len(queue):
            ident = next(iter(ready))
            agent = self.peers.get(ident)
            if agent is None or agent.role != "worker" or \
                    agent.capacity <= len(agent.inflight):
                del ready[ident]
                continue
            free = agent.capacity - len(agent.inflight)
            take = max(1, min(free, len(queue) // len(ready)))
            if take >= free:
                del ready[ident]
            else:
                ready.move_to_end(ident)
            entries = queue.pop_many(take, still_queued)
            if len(entries) < take:  # only stale items were left
                self._free_credit(agent)
            if not entries:
                return
            inflight, fids, versions = agent.inflight, agent.fids, agent.versions
            rows, frames = self.outbox.tasks_for(ident)
            for entry in entries:
                self.queued_bytes -= entry.nbytes
                entry.state = "dispatched"
                if (entry.versions is versions or entry.versions == versions) and \
                        (not entry.fid or entry.fid in fids) and \
                        (not entry.iid or entry.iid in fids):
                    entry.agent = ident
                    inflight[entry.kw] = entry
                    rows.append(entry.task_row())
                    frames.extend(entry.frames)
                else:
                    self._give_first(agent, entry)
            if len(entries) < take:
                return

    def _give_first(self, agent: Peer, entry: Entry) -> None:
        """The slow path of ``dispatch``: send blobs the agent lacks, or fail the task."""
        versions = entry.versions
        if versions != agent.versions:
            self._free_credit(agent)
            self._fail(entry, "error", {"type": "SerializationError", "msg": (
                f"client runs Python {versions[0]} / cloudpickle {versions[1]} but "
                f"worker {agent.name} runs Python {agent.versions[0]} / cloudpickle "
                f"{agent.versions[1]}; install the same versions on clients and workers")})
            return
        blobs = []
        for fid in (entry.fid, entry.iid):
            if fid and fid not in agent.fids:
                blob = self.blobs.get(fid)
                if blob is None:
                    self._free_credit(agent)
                    self._fail(entry, "error", {"type": "SerializationError", "msg": (
                        "the broker has no pickled function for this task (did it "
                        "restart?); submit it again")})
                    return
                blobs.append((fid, blob))
        agent.fids.update(fid for fid, _ in blobs)
        entry.agent = agent.ident
        agent.inflight[entry.kw] = entry
        self.outbox.task(agent.ident, entry.task_row(), entry.frames, blobs)

    def _still_queued(self, entry: Entry) -> bool:  # cancels leave stale queue items
        return entry.state == "queued" and self.table.get(entry.kw) is entry

    def _free_credit(self, agent: Peer) -> None:
        """The agent may take another task: it joins the end of the ready ring if absent."""
        if agent.ident not in self.ready and self.peers.get(agent.ident) is agent:
            self.ready[agent.ident] = None

    def _lose(self, agent: Peer, entry: Entry, exit: str, charged: bool) -> None:
        """An agent lost a task: requeue it, or fail it after ``retries`` charged losses."""
        if self.table.get(entry.kw) is not entry or entry.state in DONE:
            return
        if charged:
            entry.attempts += 1
        if not entry.interests:
            self.counts["cancelled"] += 1
            self._delete(entry)
        elif entry.attempts > entry.retries:
            self._fail(entry, "lost", {"type": "WorkerLostError", "attempts": entry.attempts,
                                       "worker": agent.name, "exit": exit})
        else:
            log.info("requeueing %s (attempt %d lost: %s)", entry.kw, entry.attempts, exit)
            self._enqueue(entry, front=True)

    def _forget(self, peer: Peer, reason: str) -> None:
        """A peer left or expired: requeue its tasks, release its interests and blobs."""
        self.peers.pop(peer.ident, None)
        if peer.role == "client":
            kept = set().union(*(p.fids for p in self.peers.values() if p.role == "client"))
            for fid in peer.fids - kept:
                self.blobs.pop(fid, None)
        for entry in list(peer.inflight.values()):
            self._lose(peer, entry, reason, charged=entry.state == "running")
        peer.inflight.clear()
        for kw in list(peer.interests):
            wanted = self.table.get(kw)
            if wanted is not None:
                self._uninterest(peer, wanted)
                if not wanted.interests:
                    self._cancel(wanted)

    # ---- handlers -------------------------------------------------------------------------
    def _inform(self, peer: Peer, msg: P.Message) -> None:
        kw = msg.meta["k"]
        entry = self.table.get(kw)
        if entry is None:
            if kw in self.lost_keys:
                self.outbox.error(peer.ident, kw, "KeyLostError", f"the result of {kw} was "
                                  "dropped (--max-held-bytes) before this client asked for it")
                return
            entry = self.table[kw] = Entry(kw)
        self._interest(peer, entry)
        self.outbox.tell(peer.ident, entry)

    def _release(self, peer: Peer, msg: P.Message) -> None:
        for kw in msg.meta["ks"]:
            entry = self.table.get(kw)
            if entry is not None:
                self._uninterest(peer, entry)

    def _cancel_msg(self, peer: Peer, msg: P.Message) -> None:
        for kw in msg.meta["ks"]:
            entry = self.table.get(kw)
            if entry is not None and peer.ident in entry.interests:
                self._uninterest(peer, entry)
                if not entry.interests:
                    self._cancel(entry)

    def _started(self, agent: Peer, msg: P.Message) -> None:
        self._mark_started(agent, msg.meta["ks"])

    def _mark_started(self, agent: Peer, kws: List[str]) -> None:
        for kw in kws:
            entry = agent.inflight.get(kw)
            if entry is not None and entry.state == "dispatched":
                entry.state = "running"
                for ident in entry.interests:
                    self.outbox.state(ident, kw, "running")

    def _result(self, agent: Peer, msg: P.Message) -> None:
        if "s" in msg.meta:  # a STARTED notice riding along: it comes first
            self._mark_started(agent, msg.meta["s"])
        prefetch = msg.meta.get("p")  # the agent resizes its window as task times change
        if type(prefetch) is int and 0 <= prefetch <= MAX_PREFETCH and agent.slots:
            agent.capacity = agent.slots + prefetch
        frames, at = msg.payload, 0
        rows = msg.meta["r"]
        agent.results_in += len(rows)  # acknowledged in heartbeats: the agent may forget
        inflight, table, finished = agent.inflight, self.table, 0
        for kw, status, nframes in (row[:3] for row in rows):
            payload = frames[at:at + nframes]
            at += nframes
            entry = inflight.pop(kw, None)
            if entry is None:
                late_result(self, agent, kw, status, payload)
                continue
            finished += 1
            if table.get(kw) is entry and entry.state not in DONE:
                self._complete(entry, status, payload)
        if finished:
            agent.finished += finished
            self._free_credit(agent)

    def _death(self, agent: Peer, msg: P.Message) -> None:
        entry = agent.inflight.pop(msg.meta["k"], None)
        if entry is None:
            return
        self._free_credit(agent)
        why = msg.meta.get("why")
        if why in STOPPED and self.table.get(entry.kw) is entry and entry.state not in DONE:
            kind, text = STOPPED[why]  # the agent stopped it on purpose: never retried
            self._fail(entry, "error", {"type": kind, "msg": text.format(
                key=P.key_from_wire(entry.kw), timeout=entry.timeout, worker=agent.name)})
        else:
            self._lose(agent, entry, str(msg.meta.get("exit", "died")), charged=True)

    def _kill(self, peer: Peer, msg: P.Message) -> None:
        """Stop tasks this client wants: on their agent, or at once if still queued."""
        for kw in msg.meta["ks"]:
            entry = self.table.get(kw)
            if entry is None or peer.ident not in entry.interests:
                continue
            if entry.state == "queued":
                self._fail(entry, "error", {"type": "TaskKilledError", "msg": (
                    f"task {P.key_from_wire(kw)!r} was killed before it started")})
            elif entry.state in ("dispatched", "running") and entry.agent is not None:
                self.outbox.kill(entry.agent, kw)

    def _dropped(self, agent: Peer, msg: P.Message) -> None:
        for kw in msg.meta["ks"]:
            entry = agent.inflight.pop(kw, None)
            if entry is not None:
                self._free_credit(agent)
                self._lose(agent, entry, "given back", charged=False)

    def _status(self, peer: Peer, msg: P.Message) -> None:
        self.send(peer.ident, P.STATUS, self.status(self.now))

    def _bye(self, peer: Peer, msg: P.Message) -> None:
        log.info("%s %s said goodbye: %s", peer.role, peer.name, msg.meta.get("reason", ""))
        self._forget(peer, "agent left")

    def status(self, now: float) -> Dict[str, Any]:
        """The status document (schema of ``zmqexec status --json``)."""
        return status_document(self, now)


_HANDLERS = {
    ("client", P.SUBMIT): submit,
    ("client", P.INFORM): BrokerState._inform,
    ("client", P.RELEASE): BrokerState._release,
    ("client", P.CANCEL): BrokerState._cancel_msg,
    ("client", P.KILL): BrokerState._kill,
    ("worker", P.STARTED): BrokerState._started,
    ("worker", P.RESULT): BrokerState._result,
    ("worker", P.DEATH): BrokerState._death,
    ("worker", P.DROPPED): BrokerState._dropped,
    **{(role, P.STATUS): BrokerState._status for role in P.ROLES},
    **{(role, P.BYE): BrokerState._bye for role in P.ROLES},
    **{(role, P.HEARTBEAT): lambda self, peer, msg: None for role in P.ROLES},
    ("worker", P.HEARTBEAT): agent_heartbeat,
}
