"""How the agent stops tasks on purpose: timeouts, ``executor.kill`` and the SIGTERM drain.

A mixin of ``worker.Agent`` (which owns the state used here), kept apart because none of
it is on the path of a task that simply runs: a task process is killed only when a running
task passes its timeout or is killed, and its exit then reports the key with the reason
(``DEATH`` with ``why``), which the broker turns into ``TaskTimeoutError`` or
``TaskKilledError`` and never retries.  Draining takes no new task, gives back the ones not
started (``DROPPED``, free) and lets the running ones finish within ``drain_timeout``.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Set

from ..wire import protocol as P
from .handle import Child, Task

log = logging.getLogger(__name__)


class Stopping:
    """Timeouts, kills and drain for ``Agent``; see the module docstring."""

    children: List[Child]
    waiting: "OrderedDict[str, Task]"
    timeouts: Dict[str, float]
    killing: Set[str]
    dropped: List[str]
    drain_timeout: float
    drain_until: Optional[float]
    draining: bool
    nprocs: int
    name: str
    _stop: bool

    def _send(self, cmd: int, meta: Dict[str, Any], payload: Any = ()) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError

    def drain(self, *_: Any) -> None:
        """SIGTERM: take no more tasks, give back the ones not started, let the running
        ones finish within ``drain_timeout``, then leave (safe from a signal handler)."""
        if self.drain_until is None:
            self.drain_until = time.monotonic() + self.drain_timeout

    def _drain_turn(self, now: float) -> None:
        if not self.draining:
            self.draining = True
            log.info("agent %s draining: %d running task(s) may take up to %g s",
                     self.name, sum(bool(c.keys) for c in self.children), self.drain_timeout)
            self._send(P.HEARTBEAT, {"slots": self.nprocs, "drain": True})
            self.dropped.extend(self.waiting)  # prefetched: back to the queue, free
            self.waiting.clear()
            for child in self.children:  # given but not started: the child answers dropped
                if len(child.keys) > 1:
                    try:
                        child.cancel(list(child.keys)[1:])
                    except OSError:
                        pass
        busy = sum(bool(c.keys) for c in self.children)
        late = now >= (self.drain_until or now)
        if busy and late:
            log.warning("drain timeout: stopping %d running task(s); they run again elsewhere",
                        busy)
        if not busy or late:
            self._stop = True

    def _kill(self, kws: List[str]) -> None:
        """executor.kill(): a running task's process is killed and replaced; a task not
        started yet is reported killed too, without running."""
        for kw in kws:
            if self.waiting.pop(kw, None) is not None:
                self._stopped(kw, "killed", "not started")
                continue
            for child in self.children:
                if child.keys and child.keys[0] == kw:
                    self._stop_child(child, "killed")
                elif kw in child.keys:  # in its batch: it answers "dropped", then we report
                    self.killing.add(kw)
                    try:
                        child.cancel([kw])
                    except OSError:
                        pass

    def _stop_child(self, child: Child, why: str) -> None:
        """Kill a task process on purpose; its exit reports the running key as ``why``."""
        if child.stopping is None and child.keys:
            child.stopping = (child.keys[0], why)
            log.warning("task %s %s: killing task process %d", child.keys[0],
                        "ran past its timeout" if why == "timeout" else "was killed",
                        child.proc.pid)
            child.proc.kill()

    def _stopped(self, kw: str, why: str, exit: str) -> None:
        self.timeouts.pop(kw, None)
        self.killing.discard(kw)
        self._flush()
        self._send(P.DEATH, {"k": kw, "exit": exit, "why": why})

    def _check_timeouts(self, now: float) -> float:
        """Stop running tasks past their timeout; seconds until the next deadline."""
        wait = 3600.0
        if self.timeouts:
            for child in self.children:
                limit = self.timeouts.get(child.keys[0]) if child.keys else None
                if limit is not None and child.stopping is None:
                    left = child.since + limit - now
                    if left <= 0:
                        self._stop_child(child, "timeout")
                    else:
                        wait = min(wait, left)
        return wait
