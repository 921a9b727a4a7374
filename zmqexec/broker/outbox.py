"""What the broker will send, gathered into one batch message per peer and kind.

Handlers add rows as they decide (a task for an agent, a result or state for a client);
``flush()`` turns each peer's rows into one message after the loop has handled everything
that was waiting.  Under load that packs hundreds of tasks or results into one message;
a lone task still leaves in the same loop turn, so batching costs it no latency.

Peers in ``local`` live in the same process (the embedded node's own client and agent):
their messages are not encoded but kept as ``Message`` objects in ``delivered``, which
the node hands over directly.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from ..wire.records import ResultRow, TaskRow

from ..wire import protocol as P

Frames = List[Any]


class Outbox:
    """Per-peer batches of TASK, RESULT, STATE, CANCEL and KILL rows, cancel answers,
    and single messages."""

    def __init__(self) -> None:
        self.out: List[Tuple[bytes, Frames]] = []
        self.local: Set[bytes] = set()
        self.delivered: List[Tuple[bytes, P.Message]] = []
        self._tasks: Dict[bytes, Tuple[List[str], Frames, List[TaskRow], Frames]] = {}
        self._results: Dict[bytes, Tuple[List[ResultRow], Frames]] = {}
        self._states: Dict[bytes, List[List[str]]] = {}
        self._cancels: Dict[bytes, List[str]] = {}
        self._kills: Dict[bytes, List[str]] = {}
        self._answers: Dict[bytes, Tuple[List[str], List[str]]] = {}  # cancelled, kept
        # result frames as a peer of another process gets them (the embedded node puts
        # large results it holds in shared memory back into frames); None: as they are
        self.inline: Optional[Callable[[Sequence[Any]], Sequence[Any]]] = None

    def send(self, ident: bytes, cmd: int, meta: Dict[str, Any],
             payload: Sequence[Any] = ()) -> None:
        """A message that is not batched (HELLO replies, heartbeats, status)."""
        if ident in self.local:
            self.delivered.append((ident, P.Message(cmd, meta, list(payload))))
        else:
            self.out.append((ident, P.encode(cmd, meta, payload)))

    def task(self, agent: bytes, row: TaskRow, frames: Sequence[Any],
             blobs: Sequence[Tuple[str, Any]] = ()) -> None:
        batch = self._task_batch(agent)
        for fid, blob in blobs:
            batch[0].append(fid)
            batch[1].append(blob)
        batch[2].append(row)
        batch[3].extend(frames)

    def tasks_for(self, agent: bytes) -> Tuple[List[TaskRow], Frames]:
        """The TASK rows and frames batched for ``agent``, to append to in place."""
        batch = self._task_batch(agent)
        return batch[2], batch[3]

    def _task_batch(self, agent: bytes) -> Tuple[List[str], Frames, List[TaskRow], Frames]:
        batch = self._tasks.get(agent)
        if batch is None:
            batch = self._tasks[agent] = ([], [], [], [])
        return batch

    def result(self, client: bytes, row: ResultRow, frames: Sequence[Any]) -> None:
        if self.inline is not None and frames and client not in self.local:
            frames = self.inline(frames)
        batch = self._results.get(client)
        if batch is None:
            batch = self._results[client] = ([], [])
        batch[0].append(row)
        batch[1].extend(frames)

    def error(self, client: bytes, kw: str, kind: str, text: str) -> None:
        """A result the broker makes itself: an error named by class, never a pickle."""
        self.result(client, ResultRow(kw, "error", 0, {"type": kind, "msg": text}), [])

    def tell(self, client: bytes, entry: Any) -> None:
        """Send a client what is known of a key (an ``Entry``): its result if done, else
        its state."""
        if entry.result is not None:
            status, payload, error = entry.result
            self.result(client, ResultRow(entry.kw, status, len(payload), error), payload)
        elif entry.state in ("queued", "dispatched"):
            self.state(client, entry.kw, "queued")
        elif entry.state == "running":
            self.state(client, entry.kw, "running")

    def state(self, client: bytes, kw: str, state: str) -> None:
        self._states.setdefault(client, []).append([kw, state])

    def cancel(self, agent: bytes, kw: str) -> None:
        self._cancels.setdefault(agent, []).append(kw)

    def kill(self, agent: bytes, kw: str) -> None:
        self._kills.setdefault(agent, []).append(kw)

    def answer(self, client: bytes, kw: str, cancelled: bool) -> None:
        """The answer to a client's cancel of ``kw``: cancelled, or kept (it runs on)."""
        answers = self._answers.get(client)
        if answers is None:
            answers = self._answers[client] = ([], [])
        answers[0 if cancelled else 1].append(kw)

    def flush(self) -> List[Tuple[bytes, Frames]]:
        """Everything to send now, states before results so a key never goes backwards;
        what is for local peers goes to ``delivered`` instead."""
        if not (self._results or self._tasks or self._states or self._cancels or
                self._kills or self._answers):
            out, self.out = self.out, []
            return out
        emit = self._emit
        results = self._results
        riding: Dict[bytes, List[List[str]]] = {}
        for ident, states in self._states.items():
            if ident in results and P.may_ride([row[0] for row in states]):
                riding[ident] = states  # in the RESULT below, applied before its rows
            else:
                emit(ident, P.STATE, {"r": states})
        for ident, (rows, frames) in results.items():
            meta: Dict[str, Any] = {"r": rows}
            if ident in riding:
                meta["st"] = riding[ident]
            emit(ident, P.RESULT, meta, frames)
        for ident, (fids, blobs, tasks, frames) in self._tasks.items():
            emit(ident, P.TASK, {"f": fids, "t": tasks}, blobs + frames)
        # after the tasks: a cancel or kill may name a task of this very batch
        for ident, kws in self._cancels.items():
            emit(ident, P.CANCEL, {"ks": kws})
        for ident, kws in self._kills.items():
            emit(ident, P.KILL, {"ks": kws})
        for ident, (cancelled, kept) in self._answers.items():
            if cancelled:
                emit(ident, P.CANCELLED, {"ks": cancelled, "c": True})
            if kept:
                emit(ident, P.CANCELLED, {"ks": kept, "c": False})
        out, self.out = self.out, []
        self._states, self._results, self._cancels, self._tasks = {}, {}, {}, {}
        self._kills, self._answers = {}, {}
        return out

    def _emit(self, ident: bytes, cmd: int, meta: Dict[str, Any],
              payload: Sequence[Any] = ()) -> None:
        if ident in self.local:
            self.delivered.append((ident, P.Message(cmd, meta, list(payload))))
        else:
            self.out.extend((ident, m) for m in P.encode_split(cmd, meta, payload))

    def take_delivered(self) -> List[Tuple[bytes, P.Message]]:
        """The messages for local peers since the last call."""
        delivered, self.delivered = self.delivered, []
        return delivered
