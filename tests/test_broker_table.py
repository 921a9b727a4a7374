"""The broker's key table under random message sequences: every count always agrees.

``BrokerState.validate()`` recomputes queued and held bytes, the held list, who wants
each key and each agent's in-flight tasks from the entries; it runs after every message
of a random sequence of submits, informs, releases, cancels, kills, starts, results,
deaths, give-backs, re-HELLOs and expiries from two clients and two agents.
"""
from __future__ import annotations

from typing import Any, Dict, List

from hypothesis import example, given, settings
from hypothesis import strategies as st

from zmqexec.broker.state import BrokerState
from zmqexec.wire import protocol as P

VERSIONS = {"python": "3.11", "cloudpickle": "3.1.2"}
CLIENTS = [b"client-1", b"client-2"]
AGENTS = [b"agent-1", b"agent-2"]
KEYS = [P.key_to_wire(f"k{i}") for i in range(3)]


class Driver:
    def __init__(self) -> None:
        self.state = BrokerState(max_held_bytes=40, max_queued_bytes=60)
        self.now = 100.0
        for ident in CLIENTS:
            self.hello(ident, "client")
        for ident in AGENTS:
            self.hello(ident, "worker", slots=1, prefetch=0)

    def send(self, ident: bytes, cmd: int, meta: Dict[str, Any], payload=()) -> None:
        self.state.handle(ident, P.encode(cmd, meta, list(payload)), self.now)
        self.state.flush()
        self.state.validate()

    def hello(self, ident: bytes, role: str, **extra: Any) -> None:
        meta = {"role": role, "id": ident.hex(), "proto": P.PROTOCOL_VERSION, **VERSIONS,
                **extra}
        self.send(ident, P.HELLO, meta)

    def inflight(self, agent: bytes) -> List[str]:
        peer = self.state.peers.get(agent)
        return list(peer.inflight) if peer else []


def step(d: Driver, action: str, who: int, key: int, size: int) -> None:
    client, agent, kw = CLIENTS[who], AGENTS[who], KEYS[key]
    held = d.inflight(agent)
    if action == "submit":
        row = [kw, key % 2, who, int(size % 3 == 0), "fn", "", 1]
        d.send(client, P.SUBMIT, {"f": ["fn"], "t": [row]}, [b"f", b"x" * size])
    elif action in ("inform", "release", "cancel", "kill"):
        wanted = sorted(d.state.table.wanted_by.get(client, ()))
        if wanted and size % 2 == 0:  # mostly a key the client holds: queued, out, done
            kw = wanted[key % len(wanted)]
        cmd = {"inform": P.INFORM, "release": P.RELEASE, "cancel": P.CANCEL,
               "kill": P.KILL}[action]
        d.send(client, cmd, {"k": kw} if cmd == P.INFORM else {"ks": [kw]})
    elif action == "start" and held:
        d.send(agent, P.STARTED, {"ks": held[:1]})
    elif action == "result":
        target = held[0] if held else kw  # a late result, too, when nothing is held
        status = "finished" if size % 2 else "error"
        d.send(agent, P.RESULT, {"r": [[target, status, 1]]}, [b"r" * size])
    elif action == "death" and held:
        d.send(agent, P.DEATH, {"k": held[0], "exit": "killed by SIGKILL"})
    elif action == "dropped" and held:
        d.send(agent, P.DROPPED, {"ks": held[-1:]})
    elif action == "rehello":
        d.hello(agent, "worker", slots=1, prefetch=0, running=held[:1],
                epoch=d.state.epoch if size % 2 else "another")
    elif action == "expire":
        d.now += 30.0  # everyone falls silent; the peers come back at once
        d.state.tick(d.now)
        d.state.validate()
        for ident in CLIENTS:
            d.hello(ident, "client")
        for ident in AGENTS:
            d.hello(ident, "worker", slots=1, prefetch=0)


ACTIONS = ["submit", "submit", "inform", "release", "cancel", "kill", "start", "result",
           "result", "death", "dropped", "rehello", "expire"]


@settings(max_examples=300, deadline=None)
@example([("submit", 0, 0, 5), ("submit", 0, 1, 5), ("submit", 0, 2, 5),
          ("cancel", 0, 2, 5)])  # a queued task cancelled
@example([("submit", 0, 0, 3), ("start", 0, 0, 3), ("result", 0, 0, 4),
          ("submit", 0, 0, 3)])  # a pure key that ended in an error runs again
@example([("submit", 0, 0, 21), ("result", 0, 0, 21), ("submit", 1, 1, 21),
          ("result", 1, 1, 21)])  # held results over the limit: the oldest goes
@example([("result", 0, 1, 9), ("rehello", 0, 0, 2), ("submit", 1, 1, 9)])  # an orphan
@given(st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 1), st.integers(0, 2),
                          st.integers(0, 25)), max_size=50))
def test_every_count_agrees_with_the_entries_after_every_message(steps):
    d = Driver()
    for action, who, key, size in steps:
        step(d, action, who, key, size)


def test_validate_catches_a_count_that_drifts():
    d = Driver()
    step(d, "submit", 0, 0, 5)
    d.state.table.queued_bytes += 1
    try:
        d.state.validate()
    except AssertionError:
        return
    raise AssertionError("validate() missed a queued_bytes drift")
