"""BrokerState decisions without sockets: routing, credits, priorities, retries, held results."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest

from zmqexec.wire import protocol as P
from zmqexec.broker import state as broker_state
from zmqexec.broker.state import BrokerState

VERSIONS = {"python": "3.11", "cloudpickle": "3.1.2"}


class Harness:
    """Drives a BrokerState with encoded messages and reads what it sends."""

    def __init__(self, **kw: Any) -> None:
        self.state = BrokerState(**kw)
        self.now = 100.0

    def send(self, ident: bytes, cmd: int, meta: Dict[str, Any], payload=()) -> None:
        self.state.handle(ident, P.encode(cmd, meta, list(payload)), self.now)
        self.state.validate()  # every count agrees with the entries after each step

    def tick(self, now: float) -> None:
        self.now = now
        self.state.tick(now)
        self.state.validate()

    def hello(self, ident: bytes, role: str, **extra: Any) -> None:
        meta = {"role": role, "id": ident.hex(), "proto": P.PROTOCOL_VERSION, **VERSIONS,
                **extra}
        self.send(ident, P.HELLO, meta)

    def take(self) -> List[Tuple[bytes, P.Message]]:
        return [(ident, P.decode(frames)) for ident, frames in self.state.flush()]

    def take_cmd(self, cmd: int) -> List[Tuple[bytes, P.Message]]:
        return [(i, m) for i, m in self.take() if m.cmd == cmd]

    def submit(self, client: bytes, key: str, priority: int = 0, retries: int = 3,
               pure: bool = False, payload: bytes = b"task", deps: Tuple[str, ...] = ()
               ) -> None:
        row = [P.key_to_wire(key), priority, retries, int(pure), "fn-1", "", 1]
        if deps:
            row += [0.0, "", [P.key_to_wire(d) for d in deps]]
        self.send(client, P.SUBMIT, {"f": ["fn-1"], "t": [row]}, [b"function", payload])

    def result(self, agent: bytes, key: str, value: bytes = b"value",
               status: str = "finished") -> None:
        self.send(agent, P.RESULT, {"r": [[kw(key), status, 1]]}, [value])

    def tasks(self) -> List[Tuple[bytes, list]]:
        """(agent, TASK row) for every task sent, in order."""
        return [(i, row) for i, m in self.take_cmd(P.TASK) for row in m.meta["t"]]

    def results(self) -> List[Tuple[bytes, list, list]]:
        """(client, RESULT row, its frames) for every result sent."""
        out = []
        for ident, m in self.take_cmd(P.RESULT):
            at = 0
            for row in m.meta["r"]:
                out.append((ident, row, m.payload[at:at + row[2]]))
                at += row[2]
        return out

    def states(self) -> List[Tuple[bytes, list]]:
        return [(i, row) for i, m in self.take_cmd(P.STATE) for row in m.meta["r"]]


@pytest.fixture
def h() -> Harness:
    return Harness()


C1, C2, A1, A2 = b"client-1", b"client-2", b"agent-1", b"agent-2"


def kw(key: str) -> str:
    return P.key_to_wire(key)


def test_hello_is_welcomed_with_epoch_limits_and_slots(h):
    h.hello(A1, "worker", slots=2, prefetch=1)
    h.hello(C1, "client")
    welcomes = dict(h.take_cmd(P.WELCOME))
    assert welcomes[C1].meta["slots"] == 2 and welcomes[C1].meta["epoch"] == h.state.epoch
    assert welcomes[C1].meta["max_frame"] >= 256 << 20
    assert welcomes[C1].meta["max_message"] >= 4 << 30


def test_a_protocol_mismatch_is_refused_with_a_reason(h):
    h.send(C1, P.HELLO, {"role": "client", "id": "x", "proto": 99})
    [(ident, msg)] = h.take()
    assert msg.cmd == P.REFUSE and "protocol 99" in msg.meta["reason"]
    assert C1 not in h.state.peers


def test_messages_before_hello_get_a_reset_and_are_counted(h):
    h.send(C1, P.SUBMIT, {"f": [], "t": [[kw("a"), 0, 0, 0, "f", "", 1]]}, [b"x"])
    [(ident, msg)] = h.take()
    assert msg.cmd == P.RESET and h.state.dropped["message before HELLO"] == 1


def test_malformed_messages_are_dropped_and_counted_by_reason(h):
    for frames in ([b"junk"], [b"ZX\x01\x63{}"], [b"ZX\x01\x0a[1]"], [b"ZX\x01\x0a{"],
                   [], [b'ZX\x01\x0a{"f": [], "t": [["k", 0]]}']):
        h.state.handle(C1, frames, h.now)
    assert sum(h.state.dropped.values()) == 6 and not h.take()
    assert h.state.status(h.now)["dropped"]


def test_tasks_go_to_agents_only_within_their_credit(h):
    h.hello(A1, "worker", slots=1, prefetch=1)
    h.hello(C1, "client")
    h.take()
    for i in range(5):
        h.submit(C1, f"t{i}")
    [(agent, msg)] = h.take_cmd(P.TASK)
    assert agent == A1 and [row[0] for row in msg.meta["t"]] == [kw("t0"), kw("t1")]
    assert msg.meta["f"] == ["fn-1"] and msg.payload == [b"function", b"task", b"task"]
    assert msg.meta["t"][0][1] == 1  # first attempt
    h.result(A1, "t0", b"r0")
    out = h.take()
    assert [(i, m.cmd) for i, m in out] == [(C1, P.RESULT), (A1, P.TASK)]
    assert out[0][1].payload == [b"r0"]
    assert out[1][1].meta["f"] == []  # the agent has the function already


def test_an_agent_resizes_its_window_with_a_result_and_agents_take_turns(h):
    h.hello(A1, "worker", slots=1, prefetch=0)
    h.hello(A2, "worker", slots=1, prefetch=0)
    h.hello(C1, "client")
    for i in range(8):
        h.submit(C1, f"t{i}")
    assert sorted(agent for agent, _ in h.tasks()) == [A1, A2]  # one each, in turn
    h.send(A1, P.RESULT, {"r": [[kw("t0"), "finished", 1]], "p": 3}, [b"r"])
    assert [agent for agent, _ in h.tasks()] == [A1] * 4  # 1 slot + 3 prefetched
    h.send(A1, P.RESULT, {"r": [[kw("t2"), "finished", 1]], "p": 0}, [b"r"])
    assert h.tasks() == []  # shrunk: it holds 3, more than its new window of 1
    h.send(A1, P.RESULT, {"r": [[kw("t3"), "finished", 1]], "p": -5}, [b"r"])
    assert h.tasks() == [] and h.state.status(h.now)["agents"][0]["capacity"] == 1


def test_higher_priority_first_and_clients_take_turns(h):
    h.hello(C1, "client")
    h.hello(C2, "client")
    for i in range(3):
        h.submit(C1, f"c1-{i}")
    for i in range(3):
        h.submit(C2, f"c2-{i}")
    h.submit(C2, "urgent", priority=5)
    h.hello(A1, "worker", slots=7, prefetch=0)
    order = [row[0] for _, row in h.tasks()]
    assert order == [kw(k) for k in ("urgent", "c1-0", "c2-0", "c1-1", "c2-1", "c1-2",
                                     "c2-2")]


def test_a_lost_started_task_is_retried_then_fails_with_worker_lost_error(h):
    h.hello(C1, "client")
    h.hello(A1, "worker", slots=1, prefetch=0, name="box")
    h.submit(C1, "poison", retries=1)
    for attempt in (1, 2):
        [(_, task)] = h.tasks()
        assert task[1] == attempt
        h.send(A1, P.STARTED, {"ks": [kw("poison")]})
        h.send(A1, P.DEATH, {"k": kw("poison"), "exit": "killed by SIGKILL"})
    [(ident, row, _)] = h.results()
    assert ident == C1 and row[1] == "lost"
    assert row[3] == {"type": "WorkerLostError", "attempts": 2, "worker": "box",
                      "exit": "killed by SIGKILL"}
    assert h.state.status(h.now)["tasks"]["lost"] == 1


def test_an_expired_agent_returns_prefetched_tasks_free_and_charges_started_ones(h):
    h.hello(C1, "client", ttl=1000)
    h.hello(A1, "worker", slots=1, prefetch=1, hb=1.0, ttl=3.0)
    h.submit(C1, "started", retries=0)
    h.submit(C1, "prefetched", retries=0)
    h.send(A1, P.STARTED, {"ks": [kw("started")]})
    h.take()
    h.now += 10
    h.tick(h.now)
    results = {row[0]: row for _, row, _ in h.results()}
    assert results[kw("started")][3]["type"] == "WorkerLostError"
    assert kw("prefetched") not in results
    h.hello(A2, "worker", slots=1, prefetch=0)
    assert [row[0] for _, row in h.tasks()] == [kw("prefetched")]


def test_cancel_drops_a_queued_task_and_recalls_a_prefetched_one(h):
    h.hello(C1, "client")
    h.hello(A1, "worker", slots=1, prefetch=1)
    for key in ("run", "fetched", "queued"):
        h.submit(C1, key)
    h.send(A1, P.STARTED, {"ks": [kw("run")]})
    h.take()
    h.send(C1, P.CANCEL, {"ks": [kw("queued"), kw("fetched")]})
    [(ident, cancel)] = h.take_cmd(P.CANCEL)
    assert ident == A1 and cancel.meta["ks"] == [kw("fetched")]
    h.send(A1, P.DROPPED, {"ks": [kw("fetched")]})
    assert h.state.status(h.now)["tasks"]["cancelled"] == 2
    assert kw("queued") not in h.state.table and kw("fetched") not in h.state.table


def answers(h: Harness) -> Dict[str, bool]:
    """The CANCELLED answers sent, by key."""
    return {k: m.meta["c"] for _, m in h.take_cmd(P.CANCELLED) for k in m.meta["ks"]}


def test_a_cancel_is_answered_by_whoever_holds_the_task(h):
    """Queued: cancelled by the broker; started: kept; out on an agent: the agent's
    answer decides (DROPPED: cancelled, KEPT or a RESULT: kept)."""
    h.hello(C1, "client")
    h.hello(A1, "worker", slots=1, prefetch=2)
    for key in ("run", "dropped", "kept", "queued", "done"):
        h.submit(C1, key)
    h.send(A1, P.STARTED, {"ks": [kw("run")]})
    h.take()
    h.send(C1, P.CANCEL, {"ks": [kw("run"), kw("dropped"), kw("kept"), kw("queued"),
                                 kw("never-submitted")]})
    out = h.take()
    assert [m.meta["ks"] for i, m in out if m.cmd == P.CANCEL and i == A1] == \
        [[kw("dropped"), kw("kept")]]
    assert {k: m.meta["c"] for _, m in out if m.cmd == P.CANCELLED for k in m.meta["ks"]} \
        == {kw("run"): False, kw("queued"): True, kw("never-submitted"): False}
    h.send(A1, P.DROPPED, {"ks": [kw("dropped")]})
    h.send(A1, P.KEPT, {"ks": [kw("kept")]})
    assert answers(h) == {kw("dropped"): True, kw("kept"): False}
    assert kw("dropped") not in h.state.table and kw("kept") in h.state.table
    h.send(A1, P.KEPT, {"ks": [kw("kept")]})  # a second answer changes nothing
    h.result(A1, "kept")
    assert [row[0] for _, row, _ in h.results()] == [kw("kept")]  # and no answer again


def test_a_cancel_is_kept_when_the_result_or_a_death_comes_first(h):
    h.hello(C1, "client")
    h.hello(A1, "worker", slots=2, prefetch=0)
    h.submit(C1, "finishes")
    h.submit(C1, "dies")
    h.take()
    h.send(C1, P.CANCEL, {"ks": [kw("finishes"), kw("dies")]})
    h.take()
    h.result(A1, "finishes")
    h.send(A1, P.DEATH, {"k": kw("dies"), "exit": "SIGKILL"})
    assert answers(h) == {kw("finishes"): False, kw("dies"): False}


def test_a_cancel_of_a_task_another_client_wants_is_kept(h):
    h.hello(C1, "client")
    h.hello(C2, "client")
    h.submit(C1, "shared", pure=True)
    h.submit(C2, "shared", pure=True)
    h.send(C1, P.CANCEL, {"ks": [kw("shared")]})
    assert answers(h) == {kw("shared"): False}
    assert h.state.table.get(kw("shared")).state == "queued"


def test_a_lost_agent_keeps_the_cancels_it_was_asked(h):
    """It may have started them: they are queued again and still wanted."""
    h.hello(C1, "client")
    h.hello(A1, "worker", slots=1, prefetch=0)
    h.submit(C1, "out")
    h.take()
    h.send(C1, P.CANCEL, {"ks": [kw("out")]})
    h.take()
    h.send(A1, P.BYE, {"reason": "gone"})
    assert answers(h) == {kw("out"): False}
    assert h.state.table.get(kw("out")).state == "queued"


def test_results_are_held_for_attaching_clients_until_released(h):
    h.hello(C1, "client")
    h.hello(C2, "client")
    h.hello(A1, "worker", slots=1, prefetch=0)
    h.submit(C1, "k")
    h.result(A1, "k")
    h.take()
    h.send(C2, P.INFORM, {"k": kw("k")})
    [(ident, row, frames)] = h.results()
    assert ident == C2 and row[1] == "finished" and frames == [b"value"]
    h.send(C1, P.RELEASE, {"ks": [kw("k")]})
    assert kw("k") in h.state.table
    h.send(C2, P.RELEASE, {"ks": [kw("k")]})
    assert kw("k") not in h.state.table and h.state.table.held_bytes == 0


def test_held_results_over_the_limit_drop_the_oldest_and_attach_gets_key_lost(h):
    h = Harness(max_held_bytes=10)
    h.hello(C1, "client")
    h.hello(A1, "worker", slots=1, prefetch=0)
    for key in ("old", "new"):
        h.submit(C1, key)
        h.take()
        h.result(A1, key, b"123456")
    assert kw("old") not in h.state.table and kw("new") in h.state.table
    h.take()
    h.hello(C2, "client")
    h.send(C2, P.INFORM, {"k": kw("old")})
    [(_, row, _)] = h.results()
    assert row[3]["type"] == "KeyLostError"


def test_an_inform_before_the_submit_is_answered_when_it_arrives(h):
    h.hello(C1, "client")
    h.hello(C2, "client")
    h.take()
    h.send(C2, P.INFORM, {"k": kw("later")})
    assert not h.take()  # unknown yet: no answer, the client's attach_timeout runs
    h.submit(C1, "later")
    [(ident, row)] = h.states()
    assert ident == C2 and row == [kw("later"), "queued"]


def test_a_live_key_from_another_client_is_refused_unless_pure(h):
    h.hello(C1, "client")
    h.hello(C2, "client")
    h.submit(C1, "mine")
    h.submit(C2, "mine")
    [(ident, row, _)] = h.results()
    assert ident == C2 and row[3]["type"] == "KeyExistsError"
    h.submit(C2, "mine", pure=True)
    assert [row[1] for _, row in h.states()] == ["queued"]
    assert set(h.state.table[kw("mine")].interests) == {C1, C2}


def test_a_version_mismatch_fails_the_task_with_a_clear_error(h):
    h.hello(C1, "client")
    h.send(A1, P.HELLO, {"role": "worker", "id": "a", "proto": P.PROTOCOL_VERSION,
                         "python": "3.12", "cloudpickle": "3.1.2", "slots": 1, "name": "w"})
    h.submit(C1, "t")
    [(_, row, _)] = h.results()
    assert row[3]["type"] == "SerializationError"
    assert "3.11" in row[3]["msg"] and "3.12" in row[3]["msg"]


def test_an_expired_client_has_its_queued_tasks_dropped(h):
    h.hello(C1, "client", hb=1.0, ttl=5.0)
    h.submit(C1, "orphan")
    h.now += 10
    h.tick(h.now)
    assert kw("orphan") not in h.state.table and C1 not in h.state.peers
    assert h.state.status(h.now)["tasks"]["cancelled"] == 1


def test_a_full_queue_refuses_new_tasks_with_an_error(h):
    h = Harness(max_queued_bytes=10)
    h.hello(C1, "client")
    h.submit(C1, "fits", payload=b"12345678")
    h.submit(C1, "too-much", payload=b"12345678")
    [(_, row, _)] = h.results()
    assert row[0] == kw("too-much") and "max-queued-bytes" in row[3]["msg"]


def test_heartbeats_go_to_every_peer_with_the_epoch(h):
    h.hello(C1, "client", hb=0.5)
    h.hello(A1, "worker", slots=1, hb=0.5)
    h.take()
    h.now += 0.6
    h.tick(h.now)
    beats = h.take_cmd(P.HEARTBEAT)
    assert {i for i, _ in beats} == {C1, A1}
    assert all(m.meta["epoch"] == h.state.epoch and m.meta["slots"] == 1 for _, m in beats)


def test_a_client_waiting_on_a_key_may_submit_it_and_joins(h):
    h.hello(C1, "client")
    h.hello(C2, "client")
    h.submit(C1, "k")
    h.send(C2, P.INFORM, {"k": kw("k")})
    h.take()
    h.submit(C2, "k")
    assert not h.results()
    assert set(h.state.table[kw("k")].interests) == {C1, C2}


def test_a_pure_resubmission_of_a_lost_key_runs_again(h):
    h.hello(C1, "client")
    h.hello(A1, "worker", slots=1, prefetch=0)
    h.submit(C1, "p", retries=0, pure=True)
    h.send(A1, P.STARTED, {"ks": [kw("p")]})
    h.send(A1, P.DEATH, {"k": kw("p"), "exit": "exit code 1"})
    h.take()
    h.submit(C1, "p", retries=0, pure=True)
    assert [row[0] for _, row in h.tasks()] == [kw("p")]


def test_a_pure_resubmission_of_a_key_its_failed_dependency_ended_lets_the_old_go(h):
    """The key ended as its dependency did; submitted again (pure), it ends so again, and
    the error it held before is let go (validate() counts the held bytes)."""
    h.hello(C1, "client")
    h.hello(A1, "worker", slots=1, prefetch=0)
    h.submit(C1, "d", retries=0)
    h.result(A1, "d", b"boom", status="error")
    h.submit(C1, "p", pure=True, deps=("d",))
    h.submit(C1, "p", pure=True, deps=("d",))
    ends = [(row[0], row[1]) for _, row, _ in h.results()]
    assert ends == [(kw("d"), "error"), (kw("p"), "error"), (kw("p"), "error")]
    assert h.state.table.held_bytes == 2 * len(b"boom")


def test_tasks_waiting_for_dependencies_count_against_max_queued_bytes():
    h = Harness(max_queued_bytes=10)
    h.hello(C1, "client")
    h.submit(C1, "d", payload=b"12345")  # no agent: it stays queued
    h.submit(C1, "w1", payload=b"12345", deps=("d",))
    assert h.state.table.queued_bytes == 10 and h.state.table["\"w1\""].state == "waiting"
    h.submit(C1, "w2", payload=b"1", deps=("d",))
    [(_, row, _)] = h.results()
    assert row[0] == kw("w2") and "queue is full" in row[3]["msg"]
    h.send(C1, P.CANCEL, {"ks": [kw("w1")]})
    assert h.state.table.queued_bytes == 5


def holds(h: Harness) -> List[Tuple[bytes, bool]]:
    return [(i, m.meta["hold"]) for i, m in h.take_cmd(P.HEARTBEAT)]


def test_pinned_results_over_the_held_limit_hold_new_submits_back_while_tasks_run():
    """DESIGN 1.5: pinned results are never evicted; past --max-held-bytes the clients are
    told to keep new submits (hold) until the dependents ran and unpinned them."""
    h = Harness(max_held_bytes=5000)
    h.hello(C1, "client")
    h.hello(C2, "client")
    h.hello(A1, "worker", slots=1, prefetch=0)
    h.submit(C1, "big")
    h.result(A1, "big", bytes(8000))  # one result over the limit: kept, not pinned
    h.take()
    assert not h.state.backpressure.holding
    h.submit(C1, "slow")  # runs on A1
    h.submit(C1, "w", deps=("big", "slow"))  # pins big: 8000 bytes over 5000
    assert holds(h) == [(C1, True), (C2, True)]
    assert h.state.status(h.now)["pinned_bytes"] == 8000
    h.send(C1, P.RELEASE, {"ks": [kw("big")]})  # still needed by w: kept
    assert kw("big") in h.state.table and h.state.backpressure.holding
    h.result(A1, "slow")  # w is dispatched: it takes big along
    assert [row[0] for _, row in h.tasks()] == [kw("w")] and h.state.backpressure.holding
    h.result(A1, "w")
    assert holds(h) == [(C1, False), (C2, False)]
    assert kw("big") not in h.state.table  # unpinned and released: gone
    h.hello(b"client-3", "client")
    assert h.take_cmd(P.WELCOME)[0][1].meta["hold"] is False


def test_pinned_results_never_hold_submits_back_when_no_task_would_unpin_them():
    """Every task waits (here for a key no task produces yet): holding submits back
    could wait forever, so nothing is held."""
    h = Harness(max_held_bytes=5000)
    h.hello(C1, "client")
    h.hello(A1, "worker", slots=1, prefetch=0)
    h.submit(C1, "big")
    h.result(A1, "big", bytes(8000))
    h.send(C1, P.INFORM, {"k": kw("later")})  # known, but nothing runs it yet
    h.submit(C1, "w", deps=("big", "later"))
    assert h.state.deps.pinned_bytes() == 8000 and not h.state.backpressure.holding
    h.tick(h.now + 1.5)
    assert all(m.meta["hold"] is False for _, m in h.take_cmd(P.HEARTBEAT))


def shared_answers(h: Harness) -> Dict[int, Any]:
    return {m.meta["r"]: m.meta.get("e") or m.meta["v"] for _, m in h.take_cmd(P.SHARED)}


def test_a_shared_request_sent_again_after_a_reconnect_runs_once(h):
    """Waiting: it waits on (one answer); never arrived: carried out; answered already:
    AnswerLost, and a put is not made twice."""
    h.hello(C1, "client")
    h.send(C1, P.SHARED, {"op": "qget", "n": "q", "r": 1})  # waits for an item
    h.send(C1, P.SHARED, {"op": "qget", "n": "q", "r": 1, "a": 1})  # again: still waiting
    h.send(C1, P.SHARED, {"op": "qput", "n": "q", "r": 2, "a": 1, "nf": 1}, [b"x"])  # new
    assert shared_answers(h) == {2: [], 1: [["b", None]]}
    h.send(C1, P.SHARED, {"op": "qput", "n": "q", "r": 2, "a": 1, "nf": 1}, [b"x"])
    assert shared_answers(h)[2][0] == "AnswerLost"
    assert h.state.shared.counts()["queued_items"] == 0  # the put was made once


def test_started_keys_riding_in_a_result_count_as_started_and_reach_clients_first(h):
    """One message per agent turn: the started keys travel in its RESULT, and the
    broker's running notice travels in the client's RESULT, applied before the rows."""
    h.hello(C1, "client", ttl=1000)
    h.hello(A1, "worker", slots=2, prefetch=0, hb=1.0, ttl=3.0)
    h.submit(C1, "done", retries=0)
    h.submit(C1, "long", retries=0)
    h.take()
    h.send(A1, P.RESULT, {"r": [[kw("done"), "finished", 1]], "s": [kw("long")]}, [b"v"])
    messages = h.take()
    assert [m.cmd for _, m in messages] == [P.RESULT]
    ident, msg = messages[0]
    assert ident == C1 and msg.meta["st"] == [[kw("long"), "running"]]
    assert [row[0] for row in msg.meta["r"]] == [kw("done")]
    h.now += 10
    h.tick(h.now)  # the agent went silent: a started task is charged
    results = {row[0]: row for _, row, _ in h.results()}
    assert results[kw("long")][3]["type"] == "WorkerLostError"


def test_a_state_notice_with_no_result_to_ride_leaves_on_its_own(h):
    h.hello(C1, "client", ttl=1000)
    h.hello(A1, "worker", slots=1, prefetch=0)
    h.submit(C1, "long")
    h.take()
    h.send(A1, P.STARTED, {"ks": [kw("long")]})
    assert h.states() == [(C1, [kw("long"), "running"])]


def test_no_task_message_when_only_cancelled_entries_were_queued(h):
    h.hello(C1, "client")
    h.submit(C1, "gone")
    h.send(C1, P.CANCEL, {"ks": [kw("gone")]})
    h.take()
    h.hello(A1, "worker", slots=1, prefetch=0)
    assert h.take_cmd(P.TASK) == []


def test_a_handler_that_fails_costs_one_message_not_the_broker(h, monkeypatch):
    """The last defence behind decode(): an unexpected error in a handler is counted as a
    dropped message, and the next message is handled as usual."""
    h.hello(C1, "client")
    h.hello(A1, "worker", slots=1, prefetch=0)

    def broken(self, peer, msg):
        raise KeyError("a bug")

    monkeypatch.setitem(broker_state._HANDLERS, ("client", P.RELEASE), broken)
    h.send(C1, P.RELEASE, {"ks": [kw("x")]})
    assert h.state.dropped["RELEASE could not be handled"] == 1
    h.submit(C1, "next")
    assert [row[0] for _, row in h.tasks()] == [kw("next")]


@pytest.mark.parametrize("fields", [{"hb": "abc"}, {"slots": 1e400}, {"ttl": [1]},
                                    {"prefetch": "many"}])
def test_a_hello_with_fields_of_the_wrong_kind_is_dropped(h, fields):
    h.hello(A1, "worker", **fields)
    assert h.state.dropped["HELLO could not be handled"] == 1
    h.hello(C1, "client")  # and the broker goes on
    assert [i for i, _ in h.take_cmd(P.WELCOME)] == [C1]
