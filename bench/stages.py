"""Where the embedded node's CPU goes per task: ``python -m bench.stages [--lone]``.

The throughput of ``ZMQExecutor()`` is bound by one GIL: the user thread, the node
thread and the completion thread share it, so tasks/s is about 1 / (client CPU per
task).  This script runs the throughput workload of ``python -m bench`` (rounds of
10,000 no-op submits, then ``wait``) for a few seconds on ``ProcessPoolExecutor(2)`` and
on ``ZMQExecutor(2)``, both warmed as the main bench warms them, then once more on
``ZMQExecutor(2)`` with each stage of the node's path timed by the CPU time of the thread
that runs it (``time.thread_time_ns``; wrappers around the stage methods, installed by
this script only).  Stages are called once per batch, except the ones marked "per task".

It prints, in microseconds of client CPU per task, each stage, split into the rules the
design says the node shares with the broker and agent processes (``BrokerState``,
``AgentState`` and the client's ``Link``) and everything else (futures, pickling, pipes,
the node's loop), how much of it Python's garbage collector took (``gc.callbacks``), and
what a throughput goal of ``--goal`` x PPE leaves for the rules.

``--lone`` does the same for the latency workload instead: one ``submit(noop).result()``
at a time, the node's stages timed by the wall clock (a stage runs alone then, and the
thread's clock costs a system call per reading).  A lone round trip is not bound by CPU
but by its chain of hand-overs, so it prints the median round trip of each executor and
how much of zmqexec's the rules could take at most: their time per task, all of which
the round trip waits for but the release of the previous task's future.
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import statistics
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from zmqexec.agent.state import AgentState
from zmqexec.broker.state import BrokerState
from zmqexec.client.link import Link
from zmqexec.client.state import ClientState
from zmqexec.local.node import Node
from zmqexec.wire import protocol as P

from . import tasks
from .executors import PPE, ZMQ, running

ROUND = 10_000
_spent: "collections.Counter[str]" = collections.Counter()
_stack = threading.local()
# The stages' clock: the CPU time of the thread (the throughput workload, where threads
# take turns on the GIL mid-stage); for lone tasks, where a stage runs alone, the wall
# clock, whose reading costs no system call: the thread's clock costs one per reading,
# a dozen readings per lone task, which would double its round trip
_clock: List[Callable[[], int]] = [time.thread_time_ns]
RULES = "rules"  # the shared state machines
OTHER = "futures, pickling, pipes"

# (owner, method, stage name, group); a BrokerState.deliver is named by its message
STAGES: List[Tuple[type, str, str, str]] = [
    (Link, "apply", "node: Link.apply (this client's commands, broker calls apart)", RULES),
    (BrokerState, "deliver", "node: BrokerState.deliver", RULES),
    (AgentState, "on_broker", "node: AgentState.on_broker (TASK rows)", RULES),
    (AgentState, "hand_out", "node: AgentState.hand_out", RULES),
    (AgentState, "flush", "node: AgentState.flush (RESULT out)", RULES),
    (AgentState, "on_result", "node: AgentState.on_result (per task)", RULES),
    (Link, "on_message", "node: Link.on_message (RESULT in)", RULES),
    (Node, "_carry_out", "node: batches to task processes (pack, write)", OTHER),
    (Node, "_on_data", "node: results from the pipes (read, unpack)", OTHER),
    (ClientState, "complete", "completion thread: unpickle, settle futures", OTHER),
]


def _timed(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` charging its thread's CPU time to ``name``, minus that of timed calls
    inside it (each nanosecond is charged to one stage)."""
    def timed(*args: Any, **kwargs: Any) -> Any:
        stack = getattr(_stack, "frames", None)
        if stack is None:
            stack = _stack.frames = []
        stack.append(0)
        clock = _clock[0]
        started = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = clock() - started
            inner = stack.pop()
            label = name
            if fn.__name__ == "deliver":
                label = f"{name} {P.NAMES.get(args[2].cmd, args[2].cmd)}"
            _spent[label] += spent - inner
            if stack:
                stack[-1] += spent
    return timed


class _Collections:
    """A ``gc.callbacks`` entry: how often each generation was collected, and how long
    the collections took (the collector visits every object a task keeps alive)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.count[info["generation"]] += 1
            self.seconds += time.perf_counter() - self._started


def _install() -> Dict[str, str]:
    groups = {}
    for owner, method, name, group in STAGES:
        setattr(owner, method, _timed(getattr(owner, method), name))
        groups[name] = group
    return groups


def _rounds(ex: Any, seconds: float, user: "collections.Counter[str]") -> Tuple[int, float, float]:
    """Rounds of ROUND no-op submits and a wait, for ``seconds``: (tasks, wall s, CPU s of
    this process)."""
    done = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end or not done:
        t0 = time.thread_time_ns()
        fs = [ex.submit(tasks.noop) for _ in range(ROUND)]
        t1 = time.thread_time_ns()
        ex.wait_all(fs)
        ex.results(fs)
        t2 = time.thread_time_ns()
        del fs
        t3 = time.thread_time_ns()
        user["user thread: submit (per task)"] += t1 - t0
        user["user thread: wait, result()"] += t2 - t1
        user["user thread: dropping futures (releases)"] += t3 - t2
        done += ROUND
    return done, time.perf_counter() - wall0, time.process_time() - cpu0


def _lone(ex: Any, seconds: float, user: "Optional[collections.Counter[str]]",
          timeout: float) -> Tuple[int, float, float, List[float]]:
    """Lone no-op tasks, one at a time, for ``seconds``: (tasks, wall s, CPU s of this
    process, each round trip in us).  ``user``: where to charge the user thread's CPU
    by step (its clock costs a system call per reading: None in untimed runs)."""
    trips: List[float] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end or not trips:
        if user is None:
            t0 = time.perf_counter()
            ex.submit(tasks.noop).result(timeout=timeout)
            trips.append((time.perf_counter() - t0) * 1e6)
            continue
        w0, c0 = time.perf_counter(), time.thread_time_ns()
        fut = ex.submit(tasks.noop)
        c1 = time.thread_time_ns()
        fut.result(timeout=timeout)
        c2 = time.thread_time_ns()
        del fut
        c3, w1 = time.thread_time_ns(), time.perf_counter()
        trips.append((w1 - w0) * 1e6)
        user["user thread: submit (per task)"] += c1 - c0
        user["user thread: wait, result()"] += c2 - c1
        user["user thread: dropping futures (releases)"] += c3 - c2
    return len(trips), time.perf_counter() - wall0, time.process_time() - cpu0, trips


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="untimed measurements of each executor, taking turns (median)")
    parser.add_argument("--goal", type=float, default=4.0, help="throughput goal, x PPE")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--lone", action="store_true",
                        help="the latency workload: one submit(noop).result() at a time")
    args = parser.parse_args()
    ignored: "collections.Counter[str]" = collections.Counter()
    runs: Dict[str, List[Tuple[float, float]]] = {PPE.key: [], ZMQ.key: []}
    for _ in range(args.rounds):
        for cls in (PPE, ZMQ):
            with running(cls, args.timeout, tasks) as ex:
                if args.lone:
                    n, wall, cpu, samples = _lone(ex, args.seconds, None, args.timeout)
                    runs[cls.key].append((statistics.median(samples), cpu / n * 1e6))
                else:
                    n, wall, cpu = _rounds(ex, args.seconds, ignored)
                    runs[cls.key].append((n / wall, cpu / n * 1e6))
    rates = {key: (statistics.median(r for r, _ in values),
                   statistics.median(c for _, c in values)) for key, values in runs.items()}
    if args.lone:
        _clock[0] = time.perf_counter_ns
    groups = _install()
    user: "collections.Counter[str]" = collections.Counter()
    trips: List[float] = []
    with running(ZMQ, args.timeout, tasks) as ex:
        _spent.clear()
        collector = _Collections()
        gc.callbacks.append(collector)
        try:
            if args.lone:
                n, wall, cpu, trips = _lone(ex, args.seconds, user, args.timeout)
            else:
                n, wall, cpu = _rounds(ex, args.seconds, user)
        finally:
            gc.callbacks.remove(collector)
    for name in user:
        groups[name] = OTHER
    spent = {**{name: 0.0 for _, method, name, _ in STAGES if method != "deliver"},
             # (above: a stage that never ran is listed, at 0; deliver is named by message)
             **{k: v / n / 1000 for k, v in _spent.items()},
             **{k: v / n / 1000 for k, v in user.items()}}
    for name in list(spent):
        if name.startswith("node: BrokerState.deliver"):
            groups[name] = RULES
    total = cpu / n * 1e6
    rest = total - sum(spent.values())
    spent["node loop: poll, wake-ups, context snapshot (the rest)"] = rest
    groups["node loop: poll, wake-ups, context snapshot (the rest)"] = OTHER
    if args.lone:
        _report_lone(args, rates, spent, groups, total, statistics.median(trips), collector, n)
        return
    ppe_rate = rates["ppe"][0]
    budget = 1e6 / (args.goal * ppe_rate)
    print(f"# Client CPU per task of ZMQExecutor(2), throughput workload ({os.cpu_count()} "
          "cores)\n")
    print(f"Untimed runs: medians of {args.rounds}, the executors taking turns.\n")
    print(f"- ProcessPoolExecutor(2): {ppe_rate:,.0f} tasks/s, {rates['ppe'][1]:.1f} us of "
          "CPU per task in the client process (its threads: the caller, the manager "
          "and the queue feeder)")
    print(f"- ZMQExecutor(2): {rates['zmqexec'][0]:,.0f} tasks/s "
          f"({rates['zmqexec'][0] / ppe_rate:.2f}x PPE), {rates['zmqexec'][1]:.1f} us of "
          "client CPU per task")
    print(f"- ZMQExecutor(2), stages timed: {n / wall:,.0f} tasks/s, {total:.1f} us per task\n")
    _table(spent, groups)
    _report_gc(collector, n)
    rules = sum(v for k, v in spent.items() if groups.get(k) == RULES)
    other = total - rules
    scale = rates["zmqexec"][1] / total  # the timers' own cost, and the noise between runs
    print(f"\n- the rules: {rules:.1f} us per task; everything else: {other:.1f} us "
          f"({rules * scale:.1f} and {other * scale:.1f} scaled to the untimed run)")
    other *= scale
    rules *= scale
    print(f"- {args.goal:g}x PPE is {args.goal * ppe_rate:,.0f} tasks/s: at most {budget:.1f} us "
          "of client CPU per task")
    if other >= budget:
        print(f"- everything else alone is over that budget: the goal is out of reach even "
              f"if the rules cost nothing (at most {1e6 / other:,.0f} tasks/s, "
              f"{1e6 / other / ppe_rate:.2f}x PPE)")
    else:
        print(f"- the rules must fit in {budget - other:.1f} us per task, "
              f"{rules / (budget - other):.1f}x less than now")



def _table(spent: Dict[str, float], groups: Dict[str, str]) -> None:
    print("| stage | group | us per task |\n|---|---|---|")
    for name, value in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {groups.get(name, OTHER)} | {value:.2f} |")


def _report_gc(collector: _Collections, n: int) -> None:
    counts = " / ".join(str(collector.count[g]) for g in range(3))
    print(f"\n- Python's garbage collector ran {counts} times (generations 0 / 1 / 2) and took "
          f"{collector.seconds / n * 1e6:.1f} us per task (wall time), inside whichever "
          "stage allocated when it ran")


def _report_lone(args: Any, rates: Dict[str, Tuple[float, float]], spent: Dict[str, float],
                 groups: Dict[str, str], total: float, timed_median: float,
                 collector: _Collections, n: int) -> None:
    """The latency workload's report: what the rules could take off the round trip."""
    ppe, zmq = rates["ppe"][0], rates["zmqexec"][0]
    print(f"# Client CPU per lone task of ZMQExecutor(2), latency workload "
          f"({os.cpu_count()} cores)\n")
    print(f"Untimed runs: medians of {args.rounds}, the executors taking turns.\n")
    print(f"- ProcessPoolExecutor(2): median round trip {ppe:,.0f} us, {rates['ppe'][1]:.1f} "
          "us of CPU per task in the client process")
    print(f"- ZMQExecutor(2): median round trip {zmq:,.0f} us (PPE's / zmqexec's = "
          f"{ppe / zmq:.2f}), {rates['zmqexec'][1]:.1f} us of client CPU per task")
    print(f"- ZMQExecutor(2), stages timed: median round trip {timed_median:,.0f} us, "
          f"{total:.1f} us of client CPU per task\n")
    _table(spent, groups)
    _report_gc(collector, n)
    rules = sum(v for k, v in spent.items() if groups.get(k) == RULES)
    release = spent.get("node: BrokerState.deliver RELEASE", 0.0)
    scale = rates["zmqexec"][1] / total
    waited = (rules - release) * scale
    print(f"\n- the rules: {rules:.1f} us per task, {rules - release:.1f} without the "
          f"previous future's release ({waited:.1f} scaled to the untimed run)")
    print(f"- the round trip is {zmq - ppe:,.0f} us longer than PPE's; with rules that cost "
          f"nothing it would be at best {zmq - waited:,.0f} us (PPE's / zmqexec's = "
          f"{ppe / max(1.0, zmq - waited):.2f})")


if __name__ == "__main__":
    main()
