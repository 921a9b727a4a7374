"""Everything the broker knows and decides, with no sockets: unit-testable by itself.

``BrokerState.handle(peer, frames, now)`` takes one received message (peer routing id plus
frames) and adds what must be sent to its ``Outbox``; ``flush()`` returns the batched
messages as ``(peer, frames)``; ``tick(now)`` sends heartbeats and expires silent peers.
Payload frames are kept and forwarded as the objects the socket gave (``zmq.Frame`` or
``bytes``), never parsed and never unpickled.

It is composed of parts that own their state: the ``KeyTable`` (entries, who wants them,
the run queue, held results; the one place an entry's state changes), the ``Outbox``
(batches to send), ``Rejoin`` (agents that come back), ``Cancels`` (cancel requests an
agent must answer), ``NoWorkerWatch`` (``no_workers_timeout``), ``Dependencies`` (tasks
that wait for others), ``Shared`` (Variables and Queues), ``Backpressure`` (clients keep
new submits while pinned results are too big).  ``BrokerState`` itself
holds the peers and their credits, and routes each message to its handler.  ``validate()``
checks every count (tests call it).
"""
from __future__ import annotations

import logging
import uuid
from collections import Counter, OrderedDict
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .._version import __version__
from ..errors import ProtocolError
from ..wire import protocol as P
from ..wire.records import SubmitRow
from .backpressure import Backpressure
from .cancels import Cancels
from .outbox import Outbox
from .records import DONE, PREFETCH_LIMIT, STOPPED, Entry, Frames, Peer
from .deps import Dependencies
from .rejoin import Rejoin
from .shared import Shared
from .status import status_document
from .table import KeyTable
from .waits import NoWorkerWatch

log = logging.getLogger(__name__)
RUNNABLE = ("queued", "dispatched", "running")  # states of a task that will still run


class BrokerState:
    """The peers, agent credits and liveness of one broker, and its key table."""

    def __init__(self, *, max_held_bytes: int = 1 << 30, max_queued_bytes: int = 4 << 30,
                 max_frame: int = 256 << 20, max_message: int = 4 << 30,
                 window: int = 4096, window_bytes: int = 256 << 20,
                 client_timeout: Optional[float] = None) -> None:
        self.epoch = uuid.uuid4().hex
        self.client_timeout = client_timeout  # overrides the ttl clients ask for
        self.key_roles: Optional[Callable[[Optional[str]], Optional[str]]] = None
        self.limits = {"max_frame": max_frame, "max_message": max_message,
                       "window": window, "window_bytes": window_bytes}
        self.outbox = Outbox()
        self.send = self.outbox.send
        self.table = KeyTable(self.outbox, max_held_bytes=max_held_bytes,
                              max_queued_bytes=max_queued_bytes)
        self.blobs: Dict[str, Any] = {}  # function and initializer pickles by content hash
        self.peers: Dict[bytes, Peer] = {}
        # agents that may take another task, served in turn (checked again when popped)
        self.ready: "OrderedDict[bytes, None]" = OrderedDict()
        self.rejoin = Rejoin(self.table, self.outbox, self.peers, self._free_credit)
        self.cancels = Cancels(self.table, self.outbox)
        self.shared = Shared(self.table, self.send)
        self.deps = Dependencies(self.table)
        self.no_workers = NoWorkerWatch()
        self.dropped: Counter[str] = Counter()
        self.backpressure = Backpressure(self.table, self.deps, self.peers)
        self.started: Optional[float] = None
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

    def deliver(self, ident: bytes, msg: P.Message, now: float) -> None:
        """Apply a message from a peer in this process (the embedded node's own client and
        agent): already a ``Message``, never encoded; what the broker sends that peer
        goes to ``outbox.delivered``.  A bug here is raised, not dropped: it is ours."""
        self.now = now
        if self.started is None:
            self.started = now
        self.outbox.local.add(ident)
        self._apply(ident, msg, now, None)

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
            self._hello(ident, msg, now)
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
        if self.backpressure.check():
            self._tell_hold()

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
                self._heartbeat(peer, slots)
        self.shared.tick(now)
        for entry, why in self.no_workers.due(slots, now, self.peers, self.table):
            self.table.fail(entry, "error", {"type": "NoWorkersError", "msg": why})
        self.dispatch()
        if self.backpressure.check():
            self._tell_hold()

    def _tell_hold(self) -> None:
        """Backpressure changed: every client keeps, or sends again, its new submits."""
        slots = self.slots()
        for peer in self.peers.values():
            if peer.role == "client":
                self._heartbeat(peer, slots)

    def _heartbeat(self, peer: Peer, slots: int) -> None:
        self.send(peer.ident, P.HEARTBEAT, {"epoch": self.epoch, "slots": slots,
                                            "n": peer.results_in,
                                            "hold": self.backpressure.holding})

    def flush(self) -> List[Tuple[bytes, Frames]]:
        """The messages to send now: one batch per peer and kind."""
        return self.outbox.flush()

    def shutdown(self, reason: str) -> None:
        """Tell every peer the broker is going away."""
        for ident in self.peers:
            self.send(ident, P.BYE, {"reason": reason})

    def status(self, now: float) -> Dict[str, Any]:
        """The status document (schema of ``zmqexec status --json``)."""
        return status_document(self.peers, self.table, epoch=self.epoch,
                               started=self.started, slots=self.slots(),
                               dropped=self.dropped, now=now, shared=self.shared.counts(),
                               pinned_bytes=self.deps.pinned_bytes(),
                               holding=self.backpressure.holding)

    def validate(self) -> None:
        """Check every count and cross-reference (tests call it after each step)."""
        self.table.validate()
        self.deps.validate()
        for ident, peer in self.peers.items():
            assert peer.ident == ident
            for kw, entry in peer.inflight.items():
                assert self.table.current(entry) or entry.state in DONE or \
                    entry.state == "deleted", kw
                if self.table.current(entry):
                    assert entry.state in ("dispatched", "running"), (kw, entry.state)
                    assert entry.agent == ident, kw
        for kw, client in self.cancels.asking.items():  # an agent holds what it must answer
            asked = self.table.get(kw)
            assert asked is not None and asked.state in ("dispatched", "running"), kw
            assert asked.agent is not None and kw in self.peers[asked.agent].inflight, kw
            assert client in self.peers, kw

    # ---- helpers ----------------------------------------------------------------------
    def drop(self, reason: str, ident: bytes, exc: Optional[BaseException] = None) -> None:
        """Count a rejected message by reason; the log line is rate-limited."""
        self.dropped[reason] += 1
        if self.dropped[reason] in (1, 10, 100, 1000) or self.dropped[reason] % 10000 == 0:
            log.warning("dropped message from %s: %s (%d so far)",
                        ident.hex()[:8], exc or reason, self.dropped[reason])

    def slots(self) -> int:
        return sum(p.slots for p in self.peers.values() if p.role == "worker")

    def dispatch(self) -> None:
        """Hand queued tasks to agents with free capacity, agents taking turns.

        An agent's turn takes an even share of the queue (at least one task, at most its
        free capacity): a few long tasks spread over all agents, while a long queue leaves
        in runs of hundreds without a turn per task."""
        ready, queue, table = self.ready, self.table.queue, self.table
        still_queued, dispatched = table.still_queued, table.dispatched
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
            dispatched(entries)
            for entry in entries:
                if (entry.versions is versions or entry.versions == versions) and \
                        (not entry.fid or entry.fid in fids) and \
                        (not entry.iid or entry.iid in fids) and \
                        (not entry.mid or entry.mid in fids):
                    entry.agent = ident
                    inflight[entry.kw] = entry
                    if entry.deps:  # (its dependencies' results travel with it)
                        row, task_frames = self.deps.task(entry)
                        rows.append(row)
                        frames.extend(task_frames)
                    else:
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
            self.table.fail(entry, "error", {"type": "SerializationError", "msg": (
                f"client runs Python {versions[0]} / cloudpickle {versions[1]} but "
                f"agent {agent.name} runs Python {agent.versions[0]} / cloudpickle "
                f"{agent.versions[1]}; install the same versions on clients and workers")})
            return
        blobs = []
        for fid in (entry.fid, entry.iid, entry.mid):
            if fid and fid not in agent.fids:
                blob = self.blobs.get(fid)
                if blob is None:
                    self._free_credit(agent)
                    self.table.fail(entry, "error", {"type": "SerializationError", "msg": (
                        "the broker has no copy of this task's function or modules (did "
                        "it restart, or its client leave?); submit it again")})
                    return
                blobs.append((fid, blob))
        agent.fids.update(fid for fid, _ in blobs)
        entry.agent = agent.ident
        agent.inflight[entry.kw] = entry
        row, task_frames = self.deps.task(entry) if entry.deps else \
            (entry.task_row(), entry.frames)
        self.outbox.task(agent.ident, row, task_frames, blobs)

    def _free_credit(self, agent: Peer) -> None:
        """The agent may take another task: it joins the end of the ready ring if absent."""
        if agent.ident not in self.ready and self.peers.get(agent.ident) is agent:
            self.ready[agent.ident] = None

    def _forget(self, peer: Peer, reason: str) -> None:
        """A peer left or expired: requeue its tasks, release its interests and blobs."""
        self.peers.pop(peer.ident, None)
        self.outbox.local.discard(peer.ident)
        if peer.role == "client":
            kept = set().union(*(p.fids for p in self.peers.values() if p.role == "client"))
            for fid in peer.fids - kept - self._blobs_needed(peer.fids - kept):
                self.blobs.pop(fid, None)
            self.shared.forget_client(peer.ident)
        self.cancels.kept(peer.inflight)  # they may have started: queued again, still wanted
        for entry in list(peer.inflight.values()):
            self.table.lose(entry, peer.name, reason, charged=entry.state == "running")
        peer.inflight.clear()
        self.cancels.forget_client(peer.ident)
        for kw in self.table.forget_client(peer.ident):
            wanted = self.table.get(kw)
            if wanted is not None:
                self.table.unwant(peer.ident, wanted)
                if not wanted.interests:
                    self.table.cancel(wanted)

    # ---- handlers -------------------------------------------------------------------------
    def _hello(self, ident: bytes, msg: P.Message, now: float) -> None:
        """Refuse another protocol, else (re)register the peer and WELCOME it; an agent's
        running keys are kept if the broker gave them, else adopted or stopped."""
        meta = msg.meta
        if meta["proto"] != P.PROTOCOL_VERSION or meta["role"] not in P.ROLES:
            reason = (f"refused: peer speaks protocol {meta['proto']} as {meta['role']!r}; "
                      f"this broker (zmqexec {__version__}) speaks protocol "
                      f"{P.PROTOCOL_VERSION}: install the same zmqexec version everywhere")
            self.send(ident, P.REFUSE, {"reason": reason})
            return
        old = self.peers.get(ident)
        peer = Peer(ident, meta, now)
        if peer.role == "client" and self.client_timeout:
            peer.ttl = max(3 * peer.interval, self.client_timeout)
        if old is not None and old.role == peer.role == "worker":
            for entry in self.rejoin.keep_running(old, peer, meta.get("running") or []):
                self.cancels.kept((entry.kw,))
                self.table.lose(entry, old.name, "agent re-registered", charged=False)
        self.peers[ident] = peer
        if peer.role == "worker" and type(meta.get("running")) is list:
            self.rejoin.adopt_running(peer, meta["running"], meta.get("epoch"), self.epoch)
        log.info("%s %s joined from %s pid %s", peer.role, peer.name, peer.host, peer.pid)
        self._free_credit(peer)
        self.send(ident, P.WELCOME, {"epoch": self.epoch, "heartbeat": peer.interval,
                                     "slots": self.slots(), "hold": self.backpressure.holding,
                                     **self.limits})
        self.dispatch()

    def _submit(self, client: Peer, msg: P.Message) -> None:
        """A batch of tasks: register each key and queue it; blobs come first."""
        frames = msg.payload
        fids = msg.meta["f"]
        for fid, blob in zip(fids, frames, strict=False):
            self.blobs[fid] = blob
            client.fids.add(fid)
        at = len(fids)
        for row in msg.meta["t"]:  # (rows of this process's own client are records already)
            task = row if type(row) is SubmitRow else SubmitRow.from_wire(row)
            if not self.table.submit(client, task, frames[at:at + task.nframes]):
                self.dropped["queue full"] += 1
            at += task.nframes

    def _inform(self, client: Peer, msg: P.Message) -> None:
        self.table.inform(client.ident, msg.meta["k"])

    def _release(self, client: Peer, msg: P.Message) -> None:
        for kw in msg.meta["ks"]:
            entry = self.table.get(kw)
            if entry is not None:
                self.table.unwant(client.ident, entry)

    def _cancel(self, client: Peer, msg: P.Message) -> None:
        for kw in msg.meta["ks"]:
            self.cancels.request(client.ident, kw)

    def _kill(self, client: Peer, msg: P.Message) -> None:
        """Stop tasks this client wants: on their agent, or at once if still queued."""
        for kw in msg.meta["ks"]:
            entry = self.table.get(kw)
            if entry is None or client.ident not in entry.interests:
                continue
            if entry.state == "queued":
                self.table.fail(entry, "error", {"type": "TaskKilledError", "msg": (
                    f"task {P.key_from_wire(kw)!r} was killed before it started")})
            elif entry.state in ("dispatched", "running") and entry.agent is not None:
                self.outbox.kill(entry.agent, kw)

    def _started(self, agent: Peer, msg: P.Message) -> None:
        self._mark_started(agent, msg.meta["ks"])

    def _mark_started(self, agent: Peer, kws: List[str]) -> None:
        for kw in kws:
            entry = agent.inflight.get(kw)
            if entry is not None and entry.state == "dispatched":
                self.table.move(entry, "running")
                for ident in entry.interests:
                    self.outbox.state(ident, kw, "running")

    def _result(self, agent: Peer, msg: P.Message) -> None:
        if "s" in msg.meta:  # a STARTED notice riding along: it comes first
            self._mark_started(agent, msg.meta["s"])
        prefetch = msg.meta.get("p")  # the agent resizes its window as task times change
        if type(prefetch) is int and 0 <= prefetch <= PREFETCH_LIMIT and agent.slots:
            agent.capacity = agent.slots + prefetch
        frames, at = msg.payload, 0
        rows = msg.meta["r"]
        agent.results_in += len(rows)  # acknowledged in heartbeats: the agent may forget
        inflight, table, finished = agent.inflight, self.table, 0
        if self.cancels.asking:
            self.cancels.kept(row[0] for row in rows)
        for row in rows:
            kw, status, nframes = row[0], row[1], row[2]
            payload = frames[at:at + nframes]
            at += nframes
            if status not in DONE:
                status = "error"
            entry = inflight.pop(kw, None)
            if entry is None:
                if not self.rejoin.late_result(agent, kw, status, payload):
                    self.dropped["late or duplicate result"] += 1
                continue
            finished += 1
            if table.current(entry) and entry.state not in DONE:
                table.move(entry, status, payload)
        if finished:
            agent.finished += finished
            self._free_credit(agent)

    def _death(self, agent: Peer, msg: P.Message) -> None:
        entry = agent.inflight.pop(msg.meta["k"], None)
        if entry is None:
            return
        self.cancels.kept((entry.kw,))
        self._free_credit(agent)
        why = msg.meta.get("why")
        if why in STOPPED and self.table.current(entry) and entry.state not in DONE:
            kind, text = STOPPED[why]  # the agent stopped it on purpose: never retried
            self.table.fail(entry, "error", {"type": kind, "msg": text.format(
                key=P.key_from_wire(entry.kw), timeout=entry.timeout, worker=agent.name)})
        else:
            self.table.lose(entry, agent.name, str(msg.meta.get("exit", "died")),
                            charged=True)

    def _dropped(self, agent: Peer, msg: P.Message) -> None:
        for kw in msg.meta["ks"]:
            entry = agent.inflight.pop(kw, None)
            if entry is not None:
                self._free_credit(agent)
                cancelled = self.cancels.dropped(entry)
                self.table.lose(entry, agent.name, "cancelled" if cancelled else "given back",
                                charged=False)

    def _kept(self, agent: Peer, msg: P.Message) -> None:
        self.cancels.kept(msg.meta["ks"])

    def _agent_heartbeat(self, agent: Peer, msg: P.Message) -> None:
        """A heartbeat from an agent; one that says ``drain`` gets no more tasks."""
        if msg.meta.get("drain") is True and agent.slots:
            log.info("agent %s is draining", agent.name)
            agent.slots = agent.capacity = 0

    def _blobs_needed(self, fids: Set[str]) -> Set[str]:
        """Of ``fids``, the blobs of tasks that will still run: a Variable or a Queue
        may hold a key whose client has gone."""
        if not fids or not self.shared.holds:
            return set()
        return {fid for entry in self.table.entries.values() if entry.state in RUNNABLE
                for fid in (entry.fid, entry.iid, entry.mid) if fid in fids}

    def _shared(self, client: Peer, msg: P.Message) -> None:
        self.shared.handle(client.ident, msg.meta, msg.payload, self.now)

    def _status(self, peer: Peer, msg: P.Message) -> None:
        self.send(peer.ident, P.STATUS, self.status(self.now))

    def _bye(self, peer: Peer, msg: P.Message) -> None:
        log.info("%s %s said goodbye: %s", peer.role, peer.name, msg.meta.get("reason", ""))
        self._forget(peer, "agent left")

    def _nothing(self, peer: Peer, msg: P.Message) -> None:
        """A heartbeat from a client or status reader: ``last_seen`` is all it says."""


_HANDLERS: Dict[Tuple[str, int], Callable[[BrokerState, Peer, P.Message], None]] = {
    ("client", P.SUBMIT): BrokerState._submit,
    ("client", P.INFORM): BrokerState._inform,
    ("client", P.RELEASE): BrokerState._release,
    ("client", P.CANCEL): BrokerState._cancel,
    ("client", P.KILL): BrokerState._kill,
    ("client", P.SHARED): BrokerState._shared,
    ("worker", P.STARTED): BrokerState._started,
    ("worker", P.RESULT): BrokerState._result,
    ("worker", P.DEATH): BrokerState._death,
    ("worker", P.DROPPED): BrokerState._dropped,
    ("worker", P.KEPT): BrokerState._kept,
    **{(role, P.STATUS): BrokerState._status for role in P.ROLES},
    **{(role, P.BYE): BrokerState._bye for role in P.ROLES},
    **{(role, P.HEARTBEAT): BrokerState._nothing for role in P.ROLES},
    ("worker", P.HEARTBEAT): BrokerState._agent_heartbeat,
}
