"""AgentState decisions without sockets or processes: credit, hand-out, started notices,
results and acknowledgements, deaths, timeouts, kills, cancels and drain.

Task processes are plain pids here; what the state decides is read from its ``out``,
``gives``, ``cancels`` and ``kills`` lists, as the agent's loop reads them.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest

from zmqexec.agent import state as agent_state
from zmqexec.agent.state import AgentState
from zmqexec.wire import protocol as P
from zmqexec.wire import serialization as S

HELLO = {"role": "worker", "id": "a1", "proto": P.PROTOCOL_VERSION, "slots": 2}


def kw(key: str) -> str:
    return P.key_to_wire(key)


def agent(nprocs: int = 2, **extra: Any) -> AgentState:
    """An agent whose tasks are known to be short, so batches of several form."""
    state = AgentState(nprocs, dict(HELLO, slots=nprocs), name="a1", **extra)
    state.task_time = 0.0001
    for pid in range(100, 100 + nprocs):
        state.add_slot(pid)
    return state


def tasks(state: AgentState, *keys: str, timeout: float = 0.0, fid: str = "fn") -> None:
    rows = [[kw(k), 1, "client", fid, "", 1] + ([timeout] if timeout else []) for k in keys]
    state.on_broker(P.Message(P.TASK, {"f": [fid], "t": rows},
                              [b"blob"] + [b"args"] * len(keys)))


def sent(state: AgentState) -> List[Tuple[str, Dict[str, Any], Any]]:
    """What the agent sends, as the broker decodes it."""
    out, state.out = state.out, []
    decoded = [P.decode(P.encode(cmd, meta, list(payload))) for cmd, meta, payload in out]
    return [(m.name, m.meta, m.payload) for m in decoded]


def given(state: AgentState) -> Dict[int, List[str]]:
    gives, state.gives = state.gives, []
    return {slot.pid: [t.kw for t in batch] for slot, batch in gives}


def test_hello_names_what_task_processes_hold_and_the_prefetch():
    state = agent()
    state.hello()
    [(name, meta, _)] = sent(state)
    assert name == "HELLO" and meta["running"] == [] and meta["prefetch"] == 8
    assert meta["slots"] == 2 and meta["epoch"] is None


def test_a_new_agent_gives_one_task_at_a_time_until_it_knows_task_times():
    state = AgentState(2, HELLO, name="a1")
    state.add_slot(100)
    state.add_slot(101)
    tasks(state, "a", "b", "c", "d")
    state.hand_out(now=1.0)
    assert sorted(map(len, given(state).values())) == [1, 1] and len(state.waiting) == 2


def test_idle_task_processes_get_an_even_share_and_the_first_of_each_is_started():
    state = agent()
    tasks(state, "a", "b", "c", "d")
    state.hand_out(now=1.0)
    batches = given(state)
    assert sorted(len(b) for b in batches.values()) == [2, 2]
    assert sorted(state.started) == sorted(b[0] for b in batches.values())
    assert state.blobs == {"fn": b"blob"} and not state.waiting


def test_a_started_notice_waits_for_a_result_to_ride_in_while_tasks_are_short():
    state = agent(nprocs=1)
    tasks(state, "a")
    state.hand_out(now=1.0)
    state.flush(now=1.0005)
    assert sent(state) == []  # within the grace: the started key waits
    slot = state.slots[100]
    state.on_result(slot, kw("a"), "finished", [b"r"], now=1.001)
    state.flush(now=1.001)
    [(name, meta, payload)] = sent(state)
    assert name == "RESULT" and meta["r"] == [[kw("a"), "finished", 1, None]]
    assert "s" not in meta
    assert payload == [b"r"]


def test_a_started_notice_leaves_on_its_own_once_the_grace_is_over():
    state = agent(nprocs=1)
    tasks(state, "a")
    state.hand_out(now=1.0)
    state.flush(now=1.0 + agent_state.STARTED_GRACE)
    assert [(n, m["ks"]) for n, m, _ in sent(state)] == [("STARTED", [kw("a")])]


def test_results_are_kept_until_acknowledged_and_sent_again_after_a_hello():
    state = agent(nprocs=1)
    tasks(state, "a", "b")
    state.hand_out(now=1.0)
    slot = state.slots[100]
    state.on_result(slot, kw("a"), "finished", [b"ra"], now=1.1)
    state.on_result(slot, kw("b"), "finished", [b"rb"], now=1.2)
    state.flush(now=1.2)
    assert [n for n, _, _ in sent(state)] == ["RESULT"]
    state.on_broker(P.Message(P.HEARTBEAT, {"epoch": None, "n": 1}))
    assert [row[0] for _, row, _ in state.unacked] == [kw("b")]
    state.on_broker(P.Message(P.RESET, {}))  # a new broker: register, resend b
    out = sent(state)
    assert [n for n, _, _ in out] == ["HELLO", "RESULT"]
    assert out[1][1]["r"] == [[kw("b"), "finished", 1, None]] and out[1][2] == [b"rb"]


def test_the_prefetch_follows_measured_task_times():
    state = agent(nprocs=2)
    tasks(state, *[f"t{i}" for i in range(40)])
    slot = state.slots[100]
    now = 1.0
    state.waiting.clear()
    for i in range(40):  # 1 ms each, measured on one task process
        slot.keys.append(kw(f"t{i}"))
        slot.since = now
        now += 0.001
        state.on_result(slot, kw(f"t{i}"), "finished", [b""], now)
    state.flush(now=now + agent_state.MEASURE_PERIOD)
    [(_, meta, _)] = [m for m in sent(state) if m[0] == "RESULT"]
    assert meta["p"] == int(agent_state.PREFETCH_WINDOW / 0.001) * 2  # 20 per slot
    assert state.prefetch == meta["p"]


def test_a_death_reports_the_running_task_and_gives_back_the_rest():
    state = agent(nprocs=1)
    tasks(state, "a", "b", "c")
    state.hand_out(now=1.0)
    state.flush()
    sent(state)
    state.on_exit(state.slots[100], "killed by SIGKILL")
    assert [(n, m) for n, m, _ in sent(state)] == [
        ("DEATH", {"k": kw("a"), "exit": "killed by SIGKILL"}),
        ("DROPPED", {"ks": [kw("b"), kw("c")]})]
    assert 100 not in state.slots


def test_a_task_past_its_timeout_has_its_process_killed_and_is_reported_as_such():
    state = agent(nprocs=1)
    tasks(state, "slow", timeout=0.5)
    state.hand_out(now=1.0)
    assert state.check_timeouts(now=1.2) == pytest.approx(0.3)
    assert not state.kills
    state.check_timeouts(now=1.6)
    [slot] = state.kills
    state.flush()
    sent(state)
    state.on_exit(slot, "killed by SIGKILL")
    [(name, meta, _)] = sent(state)
    assert name == "DEATH" and meta == {"k": kw("slow"), "exit": "killed by SIGKILL",
                                        "why": "timeout"}


def test_kill_stops_a_running_task_a_waiting_one_and_one_in_a_batch():
    state = agent(nprocs=1)
    tasks(state, "run", "batched")
    state.hand_out(now=1.0)
    tasks(state, "waiting")
    state.kill([kw("waiting"), kw("batched"), kw("run")])
    assert [(n, m["k"], m["why"]) for n, m, _ in sent(state) if n == "DEATH"] == [
        ("DEATH", kw("waiting"), "killed")]
    assert [(s.pid, kws) for s, kws in state.cancels] == [(100, [kw("batched")])]
    assert [s.pid for s in state.kills] == [100]
    slot = state.slots[100]
    state.on_result(slot, kw("batched"), "dropped", [b""], now=1.1)  # the process answers
    assert [(n, m["k"]) for n, m, _ in sent(state)] == [("DEATH", kw("batched"))]


def test_cancel_drops_waiting_tasks_and_asks_for_given_ones():
    state = agent(nprocs=1)
    tasks(state, "a", "b")
    state.hand_out(now=1.0)
    tasks(state, "c")
    state.cancel([kw("c"), kw("b"), kw("a"), kw("unknown")])
    assert state.dropped == [kw("c")]
    # the first of a batch was handed to an idle task process: it counts as started; a
    # key held nowhere has ended here
    assert sorted(state.kept) == sorted([kw("a"), kw("unknown")])
    assert [(s.pid, kws) for s, kws in state.cancels] == [(100, [kw("b")])]
    state.on_result(state.slots[100], kw("b"), "kept", [b""], now=1.1)  # the process's answer
    state.flush()
    assert [(n, sorted(m["ks"])) for n, m, _ in sent(state) if n != "STARTED"] == [
        ("DROPPED", [kw("c")]), ("KEPT", sorted([kw("a"), kw("unknown"), kw("b")]))]
    assert list(state.slots[100].keys) == [kw("a"), kw("b")]  # both still to report


def test_a_cancel_lets_idle_task_processes_take_work_first():
    """As ProcessPoolExecutor's call queue: a task an idle process could take is not
    cancelled from under it."""
    state = agent(nprocs=2)
    tasks(state, "a", "b", "c")
    state.on_broker(P.Message(P.CANCEL, {"ks": [kw("a"), kw("b"), kw("c")]}), now=1.0)
    assert set(given(state)) == {100, 101}
    assert len(state.kept) == 2  # the first of each batch


def test_drain_gives_back_prefetched_tasks_and_stops_when_running_ones_finish():
    state = agent(nprocs=1, drain_timeout=5.0)
    tasks(state, "a", "b")
    state.hand_out(now=1.0)
    tasks(state, "c")
    state.drain(now=2.0)
    state.drain_turn(now=2.0)
    assert state.draining and not state.stop
    assert state.dropped == [kw("c")] and state.cancels[0][1] == [kw("b")]
    tasks(state, "late")  # sent before the broker heard: given back at once
    assert state.dropped[-1] == kw("late")
    slot = state.slots[100]
    state.on_result(slot, kw("b"), "dropped", [b""], now=2.1)
    state.on_result(slot, kw("a"), "finished", [b"r"], now=2.2)
    state.drain_turn(now=2.2)
    assert state.stop


def test_drain_stops_at_its_timeout_with_tasks_still_running():
    state = agent(nprocs=1, drain_timeout=5.0)
    tasks(state, "a")
    state.hand_out(now=1.0)
    state.drain(now=2.0)
    state.drain_turn(now=3.0)
    assert not state.stop
    state.drain_turn(now=7.0)
    assert state.stop


def test_a_task_it_runs_since_before_its_hello_is_not_taken_twice():
    state = agent(nprocs=1)
    tasks(state, "a")
    state.hand_out(now=1.0)
    state.hello()
    assert state.rejoined == {kw("a")}
    tasks(state, "a")  # the broker gives it back to us: already running here
    assert not state.waiting


def test_a_result_over_the_brokers_frame_cap_becomes_a_clear_error():
    state = agent(nprocs=1)
    state.on_broker(P.Message(P.WELCOME, {"epoch": "e1", "max_frame": 10}))
    tasks(state, "big")
    state.hand_out(now=1.0)
    state.on_result(state.slots[100], kw("big"), "finished", [b"x" * 11], now=1.1)
    rows, frames = state.results
    assert [tuple(row) for row in rows] == [(kw("big"), "error", 1, None)]
    ok, error = S.loads_result("error", frames[:1])
    assert not ok and "over the broker's cap of 10 bytes" in str(error)


def test_a_refusal_stops_the_agent_and_a_new_epoch_registers_again():
    state = agent()
    state.on_broker(P.Message(P.WELCOME, {"epoch": "e1"}))
    state.on_broker(P.Message(P.HEARTBEAT, {"epoch": "e2"}))
    assert [n for n, _, _ in sent(state)] == ["HELLO"]
    state.on_broker(P.Message(P.REFUSE, {"reason": "no"}))
    assert state.refused and state.stop


def test_a_hello_forgets_prefetched_tasks_which_the_broker_requeues():
    state = agent(nprocs=1)
    tasks(state, "a", "b")
    state.hand_out(now=1.0)
    tasks(state, "c")
    state.hello()
    assert not state.waiting  # not named as running: the broker queues it again
    [(name, meta, _)] = sent(state)
    assert name == "HELLO" and meta["running"] == [kw("a"), kw("b")]


def test_a_task_process_being_started_gets_its_share_of_the_waiting_tasks():
    """While a replacement starts, the idle one does not take the whole queue: a batch
    would run behind its first task while the new process idles."""
    state = agent(nprocs=2)
    del state.slots[101]  # it died; its replacement is starting
    state.starting = 1
    tasks(state, "a", "b")
    state.hand_out(now=1.0)
    assert given(state) == {100: [kw("a")]} and list(state.waiting) == [kw("b")]
    state.starting = 0
    state.add_slot(102)
    state.hand_out(now=1.1)
    assert given(state) == {102: [kw("b")]}
