"""The broker's run queue: priority levels, round-robin between clients, FIFO within one.

Kept apart from the key table so the scheduling rule is one small readable piece:
higher priority first; within a level clients take turns; within a client, first in first
out, except that a task returned by a lost worker goes to the front of its client's line.
Removal is lazy: a cancelled entry stays in its deque and is skipped when popped, which
keeps cancel O(1).
"""
from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from typing import Callable, Deque, Dict, Generic, List, Optional, TypeVar

T = TypeVar("T")


class RunQueue(Generic[T]):
    """Queue of items by (priority, client); ``pop`` takes a callable that says "still valid"."""

    def __init__(self) -> None:
        self._levels: Dict[int, "OrderedDict[bytes, Deque[T]]"] = {}
        self._order: List[int] = []  # priorities, ascending
        self._len = 0

    def __len__(self) -> int:
        """Upper bound: lazily removed items are counted until popped."""
        return self._len

    def push(self, priority: int, client: bytes, item: T, front: bool = False) -> None:
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = OrderedDict()
            bisect.insort(self._order, priority)
        line = level.get(client)
        if line is None:
            line = level[client] = deque()
        if front:
            line.appendleft(item)
        else:
            line.append(item)
        self._len += 1

    def pop_many(self, count: int, valid: Callable[[T], bool]) -> List[T]:
        """Up to ``count`` valid items, in the order ``pop`` would give them.

        With one client in the top level (the common case) they come off its line in one
        run, without a turn of the round-robin per item."""
        out: List[T] = []
        while len(out) < count and self._order:
            level = self._levels[self._order[-1]]
            if len(level) > 1:
                item = self.pop(valid)
                if item is not None:
                    out.append(item)
                continue
            client, line = next(iter(level.items()))
            while line and len(out) < count:
                item = line.popleft()
                self._len -= 1
                if valid(item):
                    out.append(item)
            if not line:
                del level[client]
                del self._levels[self._order.pop()]
        return out

    def pop(self, valid: Callable[[T], bool]) -> Optional[T]:
        """The next valid item, or None; invalid items met on the way are discarded."""
        while self._order:
            priority = self._order[-1]
            level = self._levels[priority]
            client, line = next(iter(level.items()))
            item = line.popleft()
            self._len -= 1
            if line:
                level.move_to_end(client)  # round-robin: this client waits its turn
            else:
                del level[client]
                if not level:
                    del self._levels[priority]
                    self._order.pop()
            if valid(item):
                return item
        return None

