"""The broker's records: one ``Peer`` per connected routing id, one ``Entry`` per key.

Plain records with no behaviour of their own: ``BrokerState`` decides about peers, and
``KeyTable.move`` (with its batch form ``dispatched``) is the only place an entry's state
changes.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from ..wire.records import TaskRow

Frames = List[Any]
NO_FRAMES: Sequence[Any] = ()  # an entry's frames when it has none (not a list per key)
DONE = ("finished", "error", "lost")
PREFETCH_LIMIT = 1 << 16  # tasks an agent may ask to hold beyond its slots
STOPPED = {  # DEATH "why" from an agent that killed a task process on purpose
    "timeout": ("TaskTimeoutError", "task {key!r} ran longer than its timeout of "
                "{timeout:g} s on agent {worker}; its task process was replaced"),
    "killed": ("TaskKilledError", "task {key!r} was killed on agent {worker} "
               "(executor.kill); its process was replaced"),
}


def frames_size(frames: Frames) -> int:
    return sum(map(len, frames))


class Peer:
    """A connected client, agent or status reader, by routing id (an agent's role on
    the wire is ``"worker"``, the name of its command)."""

    def __init__(self, ident: bytes, meta: Dict[str, Any], now: float) -> None:
        self.ident = ident
        self.hex = ident.hex()
        self.key: Optional[str] = None  # its CurveZMQ public key, when the broker has keys
        self.role: str = meta["role"]
        self.name = str(meta.get("name") or meta["id"][:8])
        self.host = str(meta.get("host", "?"))
        self.pid = meta.get("pid")
        self.versions = (str(meta.get("python")), str(meta.get("cloudpickle")))
        self.interval = max(0.01, float(meta.get("hb", 1.0)))
        self.ttl = max(3 * self.interval, float(meta.get("ttl", 10.0)))
        self.last_seen = self.joined = now
        self.next_beat = now
        # agents
        self.slots = max(0, int(meta.get("slots", 0)))
        self.capacity = self.slots + min(PREFETCH_LIMIT, max(0, int(meta.get("prefetch", 0))))
        self.inflight: Dict[str, Entry] = {}
        self.finished = 0
        self.results_in = 0  # RESULT rows received from this agent since its HELLO
        self.fids: Set[str] = set()  # blobs this agent has, or this client sent
        # clients (the keys a client wants are the key table's: ``KeyTable.wanted_by``)
        nw: Any = meta.get("nw")  # no_workers_timeout, seconds
        self.no_workers_timeout = float(nw) if type(nw) in (int, float) and nw > 0 else 0.0


DEPENDENTS_PIN = b"\x00dependents"  # the interest tasks hold in the keys they depend on


class Entry:
    """One key: its task frames while it must run, its result frames while held."""

    __slots__ = ("kw", "state", "owner", "client", "versions", "priority", "retries",
                 "attempts", "pure", "fid", "iid", "mid", "timeout", "frames", "nbytes",
                 "interests", "agent", "result", "deps")

    def __init__(self, kw: str) -> None:
        self.kw = kw
        self.state = "wanted"
        self.owner = b""
        self.client = ""  # the owner's routing id in hex, as TASK rows name it
        self.versions: Tuple[str, str] = ("", "")  # the owner's Python and cloudpickle
        self.priority = 0
        self.retries = 0
        self.attempts = 0  # charged losses so far
        self.pure = False
        self.fid = self.iid = self.mid = ""
        self.timeout = 0.0  # seconds it may run on a worker; 0: no limit
        self.frames: Sequence[Any] = NO_FRAMES  # the task's, until it is done
        self.nbytes = 0
        # who wants it: a tuple, not a set (most keys have one client; a tuple of bytes
        # is a tracked object only until the garbage collector first sees it)
        self.interests: Tuple[bytes, ...] = ()
        self.agent: Optional[bytes] = None
        self.result: Optional[Tuple[str, Sequence[Any], Optional[Dict[str, Any]]]] = None
        self.deps: Tuple[str, ...] = ()  # keys whose results its task takes (pinned)

    def task_row(self) -> TaskRow:
        """The TASK row sent to an agent."""
        return TaskRow(self.kw, self.attempts + 1, self.client, self.fid, self.iid,
                       len(self.frames), self.timeout, self.mid)
