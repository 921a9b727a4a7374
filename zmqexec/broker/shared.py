"""Variables and Queues: values and futures that clients of one broker share by name.

A value is either a key (a future of this broker, shared by key) or the bytes of a small
pickle the broker never unpickles.  While a Variable or a Queue holds a key, the table
keeps the key wanted (by ``HOLDER``), so its task runs and its result is kept even after
every client released it or left; a client that gets the key is made to want it before the
hold goes, so the result cannot vanish between the two.

Requests come in SHARED messages, ``{"op", "n": name, "r": request id, ...}``, and each is
answered once with a SHARED of the same ``r``: the values (``v``: ``[["k", key]]`` or
``[["b", null]]`` with the bytes as payload), or an error (``e``: the exception's type,
``msg``).  A request that must wait (a get of an unset Variable, of an empty Queue, a put
into a full one) waits here until it can be answered or its timeout passes (``tick``):
the broker decides, so an item is never taken for a client that gave up waiting.

A client whose connection was renewed sends its unanswered requests again with ``a``
(again): one still waiting here waits on (its answer takes the new connection), one that
never arrived is carried out now, and one answered already (the answer was lost with the
old connection) gets the error ``AnswerLost``, never a second run.
"""
from __future__ import annotations

from collections import Counter, OrderedDict, deque
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional

from ..wire import protocol as P
from .table import KeyTable

HOLDER = b"\x00shared"  # the interest of every Variable and Queue in the keys they hold
MAX_VALUE = 1 << 20  # bytes of a value held by itself (larger: share a task's future)
ANSWERED_KEPT = 1024  # request ids remembered per client, to tell a lost answer apart


class Item(NamedTuple):
    """A value: ``("k", key)`` or ``("b", the pickle's bytes)``."""

    kind: str
    value: Any


class Wait(NamedTuple):
    """A request waiting for its answer."""

    ident: bytes
    rid: int
    deadline: Optional[float]
    want: int  # items a Queue get waits for (1, or its batch)
    item: Optional[Item]  # what a Queue put waits to enqueue


class SharedQueue:
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.items: Deque[Item] = deque()
        self.getters: Deque[Wait] = deque()
        self.putters: Deque[Wait] = deque()


class Shared:
    """Every Variable and Queue of one broker, and the requests waiting on them."""

    def __init__(self, table: KeyTable, send: Callable[..., None]) -> None:
        self.table = table
        self.send = send
        self.variables: Dict[str, Item] = {}
        self.queues: Dict[str, SharedQueue] = {}
        self.var_waits: Dict[str, List[Wait]] = {}
        self.holds: "Counter[str]" = Counter()
        self.answered: Dict[bytes, "OrderedDict[int, None]"] = {}  # client -> recent rids

    # ---- requests ---------------------------------------------------------------------
    def handle(self, ident: bytes, meta: Dict[str, Any], payload: List[Any],
               now: float) -> None:
        self.now = now
        op, name, rid = meta.get("op"), meta.get("n"), meta["r"]
        timeout: Any = meta.get("t")
        deadline = now + timeout if type(timeout) in (int, float) else None
        if meta.get("a") and self._seen(ident, rid):
            return
        if type(name) is not str or not name:
            self._error(ident, rid, "ValueError", "a Variable or Queue needs a name")
            return
        try:
            if op == "vset":
                self._set(ident, rid, name, self._item(meta, payload))
            elif op == "vget":
                self._var_get(Wait(ident, rid, deadline, 1, None), name)
            elif op == "vdel":
                self._release(self.variables.pop(name, None))
                self._answer(ident, rid, [])
            elif op == "qput":
                queue = self._queue(name, meta)
                wait = Wait(ident, rid, deadline, 1, self._item(meta, payload))
                queue.putters.append(wait)
                self._serve(queue)
                self._expire_now(queue.putters, wait)
            elif op == "qget":
                queue = self._queue(name, meta)
                batch = meta.get("b", 1)
                if batch == -1:  # everything queued now, without waiting
                    self._answer(ident, rid, self._take(ident, queue, len(queue.items)))
                    self._serve(queue)
                    return
                count = batch if type(batch) is int and batch > 0 else 1
                wait = Wait(ident, rid, deadline, count, None)
                queue.getters.append(wait)
                self._serve(queue)
                self._expire_now(queue.getters, wait)
            elif op == "qsize":
                known = self.queues.get(name)
                self._answer(ident, rid, [], size=len(known.items) if known else 0)
            else:
                self._error(ident, rid, "ValueError", f"unknown operation {op!r}")
        except ValueError as exc:
            self._error(ident, rid, "ValueError", str(exc))

    def _seen(self, ident: bytes, rid: int) -> bool:
        """A request sent again after a reconnect: True if it is here already (waiting,
        or answered: then it is told its answer was lost)."""
        if rid in self.answered.get(ident, ()):
            self._error(ident, rid, "AnswerLost", "the broker carried out this request, "
                        "but its answer was lost with the client's old connection (the "
                        "items a get took are gone)")
            return True
        waits = [w for ws in self.var_waits.values() for w in ws]
        for queue in self.queues.values():
            waits += queue.getters
            waits += queue.putters
        return any(w.ident == ident and w.rid == rid for w in waits)

    def _item(self, meta: Dict[str, Any], payload: List[Any]) -> Item:
        key = meta.get("k")
        if type(key) is str:
            if not self.holds[key] and not self.table.hold(HOLDER, key):
                raise ValueError(f"the result of {key} was dropped (--max-held-bytes)")
            self.holds[key] += 1
            return Item("k", key)
        if len(payload) != 1 or len(payload[0]) > MAX_VALUE:
            raise ValueError(f"a value must be one pickle of at most {MAX_VALUE} bytes")
        return Item("b", payload[0])

    def _release(self, item: Optional[Item]) -> None:
        """A held key is held once less; at none, the table may free it."""
        if item is None or item.kind != "k":
            return
        self.holds[item.value] -= 1
        if self.holds[item.value] <= 0:
            del self.holds[item.value]
            entry = self.table.get(item.value)
            if entry is not None:
                self.table.unwant(HOLDER, entry)
                if not entry.interests:
                    self.table.cancel(entry)

    def _handed(self, ident: bytes, item: Item) -> None:
        """``ident`` gets ``item``: it wants the key before any hold goes."""
        if item.kind == "k":
            entry = self.table.get(item.value)
            if entry is not None:
                self.table.want(ident, entry)

    # ---- Variables --------------------------------------------------------------------
    def _set(self, ident: bytes, rid: int, name: str, item: Item) -> None:
        old = self.variables.get(name)
        self.variables[name] = item
        for wait in self.var_waits.pop(name, []):
            self._handed(wait.ident, item)
            self._answer(wait.ident, wait.rid, [item])
        self._release(old)
        self._answer(ident, rid, [])

    def _var_get(self, wait: Wait, name: str) -> None:
        item = self.variables.get(name)
        if item is not None:
            self._handed(wait.ident, item)
            self._answer(wait.ident, wait.rid, [item])
        elif wait.deadline is not None and wait.deadline <= self.now:
            self._timeout(wait)
        else:
            self.var_waits.setdefault(name, []).append(wait)

    # ---- Queues -----------------------------------------------------------------------
    def _queue(self, name: str, meta: Dict[str, Any]) -> SharedQueue:
        queue = self.queues.get(name)
        if queue is None:
            maxsize = meta.get("m")
            queue = self.queues[name] = SharedQueue(
                maxsize if type(maxsize) is int and maxsize > 0 else 0)
        return queue

    def _take(self, ident: bytes, queue: SharedQueue, count: int) -> List[Item]:
        taken = [queue.items.popleft() for _ in range(count)]
        for item in taken:
            self._handed(ident, item)
            self._release(item)
        return taken

    def _serve(self, queue: SharedQueue) -> None:
        """Answer what can be answered now: puts while there is room, gets in turn."""
        while True:
            if queue.putters and (not queue.maxsize or len(queue.items) < queue.maxsize):
                wait = queue.putters.popleft()
                assert wait.item is not None
                queue.items.append(wait.item)
                self._answer(wait.ident, wait.rid, [])
            elif queue.getters and len(queue.items) >= queue.getters[0].want:
                wait = queue.getters.popleft()
                self._answer(wait.ident, wait.rid, self._take(wait.ident, queue, wait.want))
            else:
                return

    def _expire_now(self, waits: Deque[Wait], wait: Wait) -> None:
        """A request with a timeout of 0 that could not be answered at once times out."""
        if wait.deadline is not None and wait in waits and wait.deadline <= self.now:
            waits.remove(wait)
            self._timeout(wait)

    # ---- time and departures ----------------------------------------------------------
    now = 0.0

    def tick(self, now: float) -> None:
        """Answer the requests whose timeout passed."""
        self.now = now
        for name, var_waits in list(self.var_waits.items()):
            self.var_waits[name] = self._expired(var_waits, now)
            if not self.var_waits[name]:
                del self.var_waits[name]
        for queue in self.queues.values():
            for waits in (queue.getters, queue.putters):
                if waits:
                    kept = self._expired(list(waits), now)
                    if len(kept) != len(waits):
                        waits.clear()
                        waits.extend(kept)
                        self._serve(queue)

    def _expired(self, waits: List[Wait], now: float) -> List[Wait]:
        kept = []
        for wait in waits:
            if wait.deadline is not None and wait.deadline <= now:
                self._timeout(wait)
            else:
                kept.append(wait)
        return kept

    def forget_client(self, ident: bytes) -> None:
        """A client left: its waiting requests go (a put it waited on is not made)."""
        self.answered.pop(ident, None)
        for name, var_waits in list(self.var_waits.items()):
            self.var_waits[name] = [w for w in var_waits if w.ident != ident]
            if not self.var_waits[name]:
                del self.var_waits[name]
        for queue in self.queues.values():
            for waits in (queue.getters, queue.putters):
                for wait in [w for w in waits if w.ident == ident]:
                    waits.remove(wait)
                    self._release(wait.item)
            self._serve(queue)

    def counts(self) -> Dict[str, int]:
        return {"variables": len(self.variables), "queues": len(self.queues),
                "queued_items": sum(len(q.items) for q in self.queues.values())}

    # ---- answers ----------------------------------------------------------------------
    def _answer(self, ident: bytes, rid: int, items: List[Item], **extra: Any) -> None:
        rows = [[item.kind, item.value if item.kind == "k" else None] for item in items]
        frames = [item.value for item in items if item.kind == "b"]
        self._sent(ident, rid)
        self.send(ident, P.SHARED, {"r": rid, "v": rows, "nf": len(frames), **extra}, frames)

    def _sent(self, ident: bytes, rid: int) -> None:
        answered = self.answered.get(ident)
        if answered is None:
            answered = self.answered[ident] = OrderedDict()
        answered[rid] = None
        if len(answered) > ANSWERED_KEPT:
            answered.popitem(last=False)

    def _timeout(self, wait: Wait) -> None:
        self._release(wait.item)
        self._error(wait.ident, wait.rid, "TimeoutError", "timed out")

    def _error(self, ident: bytes, rid: int, kind: str, text: str) -> None:
        self._sent(ident, rid)
        self.send(ident, P.SHARED, {"r": rid, "e": [kind, text]})
