"""Everything an agent decides, with no sockets and no processes: unit-testable by itself.

The agent process's loop (``loop.Agent``) feeds ``AgentState`` what happens — a message
from the broker (``on_broker``), a result or a death of a task process (``on_result``,
``on_exit``), the clock (``turn``) — and carries out what it decides, which it reads from
five lists: ``out`` (messages for the broker, in order), ``gives`` (batches of tasks for a
task process), ``cancels`` (keys a task process should drop if not started), ``kills``
(task processes to kill) and ``retires`` (task processes that ran ``max_tasks`` tasks:
their pipes close, they exit, and are replaced).  A ``Slot`` is the state's record of
one task process, by pid.

Decisions made here:

- **credit**: the prefetch window asked of the broker adapts to how long tasks take:
  ``PREFETCH_WINDOW`` seconds of queued work per slot (short tasks travel in large
  batches), at least one task and at most ``MAX_PREFETCH`` per slot (long tasks are not
  hoarded by one agent);
- **hand-out**: each idle task process gets an even share of the waiting tasks, at most
  ``SLOT_WINDOW`` seconds of work, as one batch;
- **started notices** wait up to ``STARTED_GRACE`` for a result to ride in while tasks are
  short (one message per lone task, not two);
- **cancels**: a prefetched task is dropped; the first task of a task process's batch
  counts as started (it was handed to an idle process) and is *kept*; a later one is the
  task process's to answer, dropped or kept, exclusively (``KEPT`` tells the broker);
- **deaths**: the running task is reported with the exit status (``DEATH``), the rest of
  the batch is given back free (``DROPPED``); **timeouts** and **kills** stop a task
  process on purpose and report the key with the reason (never retried);
- **drain** (SIGTERM): no new tasks, prefetched ones given back, running ones finish within
  ``drain_timeout``;
- **results** are kept until the broker acknowledges them, and sent again after a HELLO.
"""
from __future__ import annotations

import logging
from collections import OrderedDict, deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Tuple

from ..errors import MessageTooLargeError
from ..wire import protocol as P
from ..wire import serialization as S
from ..wire.records import ResultRow, Task, TaskRow

log = logging.getLogger(__name__)
PREFETCH_WINDOW = 0.02
MAX_PREFETCH = 128  # per slot
START_PREFETCH = 4  # per slot, until task times are known
MEASURE_PERIOD = 0.1  # seconds over which run times are averaged
SLOT_WINDOW = 0.005  # seconds of work handed to one task process at a time
MAX_SLOT_BATCH = 64
MAX_UNACKED_BYTES = 256 << 20  # results kept until the broker acknowledges them
# While this agent's tasks take under STARTED_GRACE on average, a STARTED notice waits
# that long for a RESULT to ride in (Dask's workers batch their messages every 2 ms too).
# Otherwise it leaves at once, as it does before a DEATH or a BYE (a HELLO names running
# keys itself).  A new agent knows no task times and never waits, so a task that kills its
# own agent at once is charged on the next one.
STARTED_GRACE = 0.002
Message = Tuple[int, Dict[str, Any], Sequence[Any]]


class Slot:
    """The agent's record of one task process: the keys it was given, in order, so
    ``keys[0]`` is the one it runs (the first it has sent no result for)."""

    __slots__ = ("pid", "keys", "since", "stopping", "given")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.given = 0  # tasks given to it so far (max_tasks)
        self.keys: Deque[str] = deque()
        self.since = 0.0  # when keys[0] started
        self.stopping: Optional[Tuple[str, str]] = None  # (key, "timeout"|"killed")


class AgentState:
    """Credits, hand-out, results, deaths, timeouts, kills and drain of one agent."""

    def __init__(self, nprocs: int, hello: Dict[str, Any], *, prefetch: Optional[int] = None,
                 name: str = "agent", drain_timeout: float = 60.0, now: float = 0.0,
                 max_tasks: Optional[int] = None, keep_unacked: bool = True) -> None:
        if nprocs < 1:
            raise ValueError("nprocs must be at least 1")
        self.max_tasks = max_tasks  # per task process, then it is replaced (None: no limit)
        self.keep_unacked = keep_unacked  # False in the embedded node: no broker restarts
        self.nprocs = nprocs
        self.hello_fields = hello  # what every HELLO says besides its changing fields
        self.name = name
        self.drain_timeout = drain_timeout
        self.fixed_prefetch = prefetch is not None
        self.prefetch = START_PREFETCH * nprocs if prefetch is None else prefetch
        self.task_time = PREFETCH_WINDOW / START_PREFETCH  # mean run time, last period (s)
        self.busy, self.ran, self.period = 0.0, 0, now  # this period's sums
        self.max_frame = 256 << 20  # the broker's cap per frame, from its WELCOME
        self.slots: Dict[int, Slot] = {}
        self.starting = 0  # task processes asked for and not started yet (they get a share)
        self.waiting: "OrderedDict[str, Task]" = OrderedDict()  # prefetched, not yet given
        self.blobs: Dict[str, Any] = {}  # pickled functions and initializers by id
        self.timeouts: Dict[str, float] = {}  # key -> seconds it may run (options(timeout=))
        self.killing: Set[str] = set()  # keys executor.kill() asked to stop
        self.started: List[str] = []  # batched STARTED notice (rides in a RESULT)
        self.started_at = 0.0  # when ``started`` last became non-empty (STARTED_GRACE)
        self.dropped: List[str] = []  # batched DROPPED notice
        self.kept: List[str] = []  # batched KEPT notice: cancels that found a task started
        self.results: Tuple[List[ResultRow], List[Any]] = ([], [])  # batched RESULT
        self.unacked: Deque[Tuple[int, ResultRow, List[Any]]] = deque()  # (number, row,
        # its frames)
        self.unacked_bytes = self.sent_rows = 0
        self.rejoined: Set[str] = set()  # running since before our last HELLO
        self.epoch: Optional[str] = None
        self.refused = False
        self.stop = False  # the loop should end
        self.drain_until: Optional[float] = None
        self.draining = False
        # what the loop carries out
        self.out: List[Message] = []
        self.gives: List[Tuple[Slot, List[Task]]] = []
        self.cancels: List[Tuple[Slot, List[str]]] = []
        self.kills: List[Slot] = []
        self.retires: List[Slot] = []

    # ---- task processes -----------------------------------------------------------------
    def add_slot(self, pid: int) -> Slot:
        slot = self.slots[pid] = Slot(pid)
        return slot

    def busy_slots(self) -> int:
        return sum(bool(s.keys) for s in self.slots.values())

    def hand_out(self, now: float) -> None:
        """Give waiting tasks to idle task processes, an even share each, in batches."""
        if self.draining or not self.waiting:
            return
        limit = self.max_tasks
        idle = [s for s in self.slots.values()
                if not s.keys and (limit is None or s.given < limit)]
        if not idle:
            return
        most = min(MAX_SLOT_BATCH, max(1, int(SLOT_WINDOW / self.task_time)))
        waiting = self.waiting
        while idle and waiting:
            share = max(1, min(most, len(waiting) // (len(idle) + self.starting)))
            slot = idle.pop()
            if limit is not None:
                share = min(share, limit - slot.given)
            slot.given += share
            slot.since = now
            tasks = [waiting.popitem(last=False)[1] for _ in range(min(share, len(waiting)))]
            slot.keys.extend(task.row.kw for task in tasks)
            self.gives.append((slot, tasks))
            self._mark_started(tasks[0].row.kw, now)

    def on_result(self, slot: Slot, kw: str, status: str, result: Sequence[Any],
                  now: float) -> None:
        """A task process sent a result (its frames: ``[pickle, *out-of-band buffers]``),
        or said it dropped (or kept) a task a cancel named."""
        if status == "kept":  # a cancel came after it started (or ended): it runs on
            if slot.keys and slot.keys[0] == kw and kw in self.killing:
                self._stop_slot(slot, "killed")  # a kill that reached its batch late
            self.kept.append(kw)
            return
        if status == "dropped":  # a cancel reached it before it started
            if kw in slot.keys:
                first = slot.keys[0] == kw
                slot.keys.remove(kw)
                self.rejoined.discard(kw)
                if kw in self.killing:
                    self._stopped(kw, "killed", "not started")
                else:
                    self.dropped.append(kw)
                if first and slot.keys:
                    slot.since = now
                    self._mark_started(slot.keys[0], now)
                self._retire_if_spent(slot)
            return
        if not slot.keys or slot.keys[0] != kw:
            log.error("task process %d sent an unexpected result", slot.pid)
            return
        slot.keys.popleft()
        if self.timeouts:
            self.timeouts.pop(kw, None)
        if self.killing:  # a kill that reached its batch too late: it ran
            self.killing.discard(kw)
        if self.rejoined:
            self.rejoined.discard(kw)
        parts = result if type(result) is list else list(result)
        max_frame = self.max_frame
        for part in parts:
            if len(part) > max_frame:
                status, parts = self._under_cap(kw, status, parts)
                break
        rows, frames = self.results
        rows.append(ResultRow(kw, status, len(parts)))
        frames.extend(parts)
        self.busy += now - slot.since
        self.ran += 1
        slot.since = now
        if slot.keys:
            self._mark_started(slot.keys[0], now)  # it starts the next one right away
        elif self.max_tasks is not None:
            self._retire_if_spent(slot)

    def _under_cap(self, kw: str, status: str, parts: List[Any]) -> Tuple[str, List[Any]]:
        """A result's frames cut under the broker's frame cap; a pickle over it (a large
        result that is not a buffer: a list of big strings) is an error that says why."""
        if len(parts[0]) <= self.max_frame:
            return status, S.split_frames(parts, self.max_frame)
        return "error", [S.dumps_error(MessageTooLargeError(
            f"the result of task {P.key_from_wire(kw)!r} pickles to {len(parts[0])} bytes "
            f"in band, over the broker's cap of {self.max_frame} bytes per frame: return "
            "bytes or arrays (they travel out of band, in parts) or something smaller"))]

    def _retire_if_spent(self, slot: Slot) -> None:
        """A task process that was given ``max_tasks`` tasks and finished them goes."""
        if self.max_tasks is not None and not slot.keys and slot.given >= self.max_tasks \
                and slot.stopping is None:
            slot.stopping = ("", "retired")
            self.retires.append(slot)

    def on_exit(self, slot: Slot, exit: str) -> None:
        """A task process ended (its last results were read first): report the task it
        ran with its exit status, give back the rest of its batch."""
        self.slots.pop(slot.pid, None)
        if not slot.keys:
            return
        kw = slot.keys.popleft()
        self.rejoined.difference_update([kw, *slot.keys])
        if slot.stopping is not None and slot.stopping[0] == kw:
            self._stopped(kw, slot.stopping[1], exit)
        else:
            log.warning("task process %d died running %s (%s)", slot.pid, kw, exit)
            self.timeouts.pop(kw, None)
            self.flush()
            self._send(P.DEATH, {"k": kw, "exit": exit})
        for kw in [kw for kw in slot.keys if kw in self.killing]:
            slot.keys.remove(kw)
            self._stopped(kw, "killed", "not started")
        if slot.keys:
            for kw in slot.keys:
                self.timeouts.pop(kw, None)
            self._send(P.DROPPED, {"ks": list(slot.keys)})

    # ---- the broker ---------------------------------------------------------------------
    def hello(self) -> None:
        """Register (again): name the keys our task processes hold, then send again the
        results the broker has not acknowledged, so a restarted broker loses none."""
        running = [kw for slot in self.slots.values() for kw in slot.keys]
        self.rejoined = set(running)  # a TASK for one of these is a duplicate: skip it
        self.waiting.clear()  # the broker requeues what we do not say we are running
        self.timeouts = {kw: t for kw, t in self.timeouts.items() if kw in running}
        self._send(P.HELLO, dict(self.hello_fields, prefetch=self.prefetch, running=running,
                                 epoch=self.epoch))
        self.sent_rows = 0  # the broker counts RESULT rows afresh after a HELLO
        if self.unacked:
            rows, frames = self.results
            self.results = ([row for _, row, _ in self.unacked] + rows,
                            [f for _, _, parts in self.unacked for f in parts] + frames)
            self.unacked.clear()
            self.unacked_bytes = 0
            self.flush()

    def on_broker(self, msg: P.Message, now: float = 0.0) -> None:
        """Apply one message from the broker (``now``: for a CANCEL, which first lets idle
        task processes take waiting tasks)."""
        cmd, meta = msg.cmd, msg.meta
        if cmd == P.TASK:
            self.take_tasks(meta["f"], meta["t"], msg.payload)
        elif cmd == P.CANCEL:
            self.hand_out(now)  # as ProcessPoolExecutor's call queue: idle ones take work
            self.cancel(meta["ks"])
        elif cmd == P.KILL:
            self.kill(meta["ks"])
        elif cmd in (P.WELCOME, P.HEARTBEAT):
            if "n" in meta:
                self._acked(meta["n"])
            epoch = meta.get("epoch")
            if cmd == P.WELCOME:
                self.epoch = epoch
                self.max_frame = int(meta.get("max_frame", self.max_frame))
                log.info("agent %s registered with %d slots", self.name, self.nprocs)
            elif epoch != self.epoch:
                log.warning("broker epoch changed: registering again")
                self.hello()
        elif cmd == P.RESET:
            self.hello()
        elif cmd == P.REFUSE:
            log.error("the broker refused this agent: %s", meta["reason"])
            self.refused = self.stop = True
        elif cmd == P.BYE:
            log.info("broker said goodbye: %s", meta.get("reason", ""))

    def take_tasks(self, fids: List[str], rows: List[Any], payload: List[Any]
                   ) -> None:
        """A TASK batch: blobs first, then each task waits for a task process."""
        for fid, blob in zip(fids, payload, strict=False):
            self.blobs[fid] = blob
        at = len(fids)
        waiting, rejoined = self.waiting, self.rejoined
        for wire_row in rows:  # (rows from the embedded node's broker are records already)
            row = wire_row if type(wire_row) is TaskRow else TaskRow.from_wire(wire_row)
            frames = payload[at:at + row.nframes]
            at += row.nframes
            if rejoined and row.kw in rejoined:
                continue  # already running here since before our HELLO
            if self.draining:
                self.dropped.append(row.kw)  # sent before the broker heard we drain
                continue
            waiting[row.kw] = Task(row, frames)
            if row.timeout:
                self.timeouts[row.kw] = row.timeout

    def cancel(self, kws: List[str]) -> None:
        """Drop prefetched tasks; the first of a batch is kept (handed to an idle task
        process, it counts as started); the task process answers for the others.  A key
        held nowhere has ended here (its result left): kept."""
        rest = set()
        for kw in kws:
            if self.waiting.pop(kw, None) is not None:
                self.dropped.append(kw)
            else:
                rest.add(kw)
        if rest:
            for slot in self.slots.values():
                if not slot.keys or rest.isdisjoint(slot.keys):
                    continue
                mine = [kw for kw in slot.keys if kw in rest]
                rest.difference_update(mine)
                if mine[0] == slot.keys[0]:
                    self.kept.append(mine.pop(0))
                if mine:
                    self.cancels.append((slot, mine))
            self.kept.extend(rest)

    def _acked(self, count: Any) -> None:
        """The broker has received ``count`` RESULT rows since our HELLO: forget them."""
        if type(count) is not int:
            return
        unacked = self.unacked
        while unacked and unacked[0][0] <= count:
            self.unacked_bytes -= sum(map(len, unacked.popleft()[2]))

    def _send(self, cmd: int, meta: Dict[str, Any], payload: Sequence[Any] = ()) -> None:
        self.out.append((cmd, meta, payload))

    def flush(self, now: Optional[float] = None) -> None:
        """This turn's DROPPED and RESULT notices, one message each; the started keys ride
        in the RESULT (the broker applies them first, so a key never goes backwards there),
        or leave as a STARTED of their own: from the loop (``now`` given) once their grace
        is over (``grace``), otherwise at once."""
        if self.dropped:
            for kw in self.dropped:
                self.timeouts.pop(kw, None)
            self._send(P.DROPPED, {"ks": self.dropped})
            self.dropped = []
        if self.kept:
            self._send(P.KEPT, {"ks": self.kept})
            self.kept = []
        rows, frames = self.results
        if self.started and rows:  # a task that started and finished since the last turn
            finished = {row.kw for row in rows}  # needs no "running" notice: its result
            self.started = [kw for kw in self.started if kw not in finished]  # says more
        if self.started and (not P.may_ride(self.started) if rows else
                             now is None or not self.grace(now)):
            self._send(P.STARTED, {"ks": self.started})
            self.started = []
        if rows:
            meta: Dict[str, Any] = {"r": rows}
            if self.started:
                meta["s"], self.started = self.started, []
            prefetch = self._window(now)
            if prefetch != self.prefetch:
                meta["p"] = self.prefetch = prefetch
            self._send(P.RESULT, meta, frames)
            self.results = ([], [])
            if not self.keep_unacked:
                return
            seq, unacked = self.sent_rows, self.unacked  # kept until a heartbeat acks them
            at = 0
            for row in rows:
                seq += 1
                parts = frames[at:at + row.nframes]
                at += row.nframes
                unacked.append((seq, row, parts))
                self.unacked_bytes += sum(map(len, parts))
            self.sent_rows = seq
            while self.unacked_bytes > MAX_UNACKED_BYTES and len(unacked) > 1:
                self.unacked_bytes -= sum(map(len, unacked.popleft()[2]))

    def grace(self, now: float) -> float:
        """Seconds the waiting STARTED notice may still wait for a RESULT (0: none)."""
        if self.task_time >= STARTED_GRACE:
            return 0.0
        return max(0.0, self.started_at + STARTED_GRACE - now)

    def _mark_started(self, kw: str, now: float) -> None:
        if not self.started:
            self.started_at = now
        self.started.append(kw)

    def _window(self, now: Optional[float]) -> int:
        """The prefetch to ask for now: a fixed one, or PREFETCH_WINDOW of work per slot.

        Measured over periods of MEASURE_PERIOD (or of two windows of results, if
        shorter); changes under a quarter are not worth telling the broker about.  The
        mean over a period, not a moving average of single runs: one slow run (a first
        import in a fresh task process) must not shrink the window of thousands."""
        if now is None or not self.ran or (now - self.period < MEASURE_PERIOD and
                                           self.ran < 2 * self.prefetch):
            return self.prefetch
        self.task_time = self.busy / self.ran
        self.busy, self.ran, self.period = 0.0, 0, now  # (task_time: for STARTED_GRACE too)
        if self.fixed_prefetch:
            return self.prefetch
        per_slot = min(MAX_PREFETCH, max(1, int(PREFETCH_WINDOW / self.task_time)))
        wanted = per_slot * self.nprocs
        return wanted if abs(wanted - self.prefetch) * 4 > self.prefetch else self.prefetch

    # ---- stopping tasks on purpose ----------------------------------------------------------
    def kill(self, kws: List[str]) -> None:
        """executor.kill(): a running task's process is killed and replaced; a task not
        started yet is reported killed too, without running."""
        for kw in kws:
            if self.waiting.pop(kw, None) is not None:
                self._stopped(kw, "killed", "not started")
                continue
            for slot in self.slots.values():
                if slot.keys and slot.keys[0] == kw:
                    self._stop_slot(slot, "killed")
                elif kw in slot.keys:  # in its batch: it answers "dropped", then we report
                    self.killing.add(kw)
                    self.cancels.append((slot, [kw]))

    def _stop_slot(self, slot: Slot, why: str) -> None:
        """Kill a task process on purpose; its exit reports the running key as ``why``."""
        if slot.stopping is None and slot.keys:
            slot.stopping = (slot.keys[0], why)
            log.warning("task %s %s: killing task process %d", slot.keys[0],
                        "ran past its timeout" if why == "timeout" else "was killed", slot.pid)
            self.kills.append(slot)

    def _stopped(self, kw: str, why: str, exit: str) -> None:
        self.timeouts.pop(kw, None)
        self.killing.discard(kw)
        self.flush()
        self._send(P.DEATH, {"k": kw, "exit": exit, "why": why})

    def check_timeouts(self, now: float) -> float:
        """Stop running tasks past their timeout; seconds until the next deadline."""
        wait = 3600.0
        if self.timeouts:
            for slot in self.slots.values():
                limit = self.timeouts.get(slot.keys[0]) if slot.keys else None
                if limit is not None and slot.stopping is None:
                    left = slot.since + limit - now
                    if left <= 0:
                        self._stop_slot(slot, "timeout")
                    else:
                        wait = min(wait, left)
        return wait

    def drain(self, now: float) -> None:
        """SIGTERM: take no more tasks, give back the ones not started, let the running
        ones finish within ``drain_timeout``, then stop."""
        if self.drain_until is None:
            self.drain_until = now + self.drain_timeout

    def drain_turn(self, now: float) -> None:
        if self.drain_until is None:
            return
        if not self.draining:
            self.draining = True
            log.info("agent %s draining: %d running task(s) may take up to %g s",
                     self.name, self.busy_slots(), self.drain_timeout)
            self._send(P.HEARTBEAT, {"slots": self.nprocs, "drain": True})
            self.dropped.extend(self.waiting)  # prefetched: back to the queue, free
            self.waiting.clear()
            for slot in self.slots.values():  # given, not started: the process answers
                if len(slot.keys) > 1:
                    self.cancels.append((slot, list(slot.keys)[1:]))
        busy = self.busy_slots()
        late = now >= self.drain_until
        if busy and late:
            log.warning("drain timeout: stopping %d running task(s); they run again elsewhere",
                        busy)
        if not busy or late:
            self.stop = True

    def running(self) -> List[str]:
        """The keys task processes hold (the first of each runs)."""
        return [kw for slot in self.slots.values() for kw in slot.keys]
