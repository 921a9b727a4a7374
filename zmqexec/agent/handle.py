"""The agent's handle on one task process: its process and its three pipes.

The agent gives a task process a numbered batch at a time (``give``), never waiting for the
process to read it (what its pipe cannot take yet goes on when it polls writable: ``flush``),
and reads its results in bulk (``read``).  Cancels for the batch go on a pipe of their own
(``cancel``), answered at once by the process.  Which keys a task process holds is the
agent's decision, kept in ``state.Slot``; this handle only moves bytes.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.process as mp_process
import os
import select
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from ..wire.pipe import PipeWriter, RecordReader, pack, read_records, unpack_result
from ..wire.records import Task
from .runner import task_main
from .zygote import kill_group

if TYPE_CHECKING:
    from .state import AgentState, Slot

# One read takes at most this much: glibc serves a buffer of 128 KiB or more with mmap
# (then shrinks it with mremap and frees it with munmap), which made each read of a lone
# result cost 20 us instead of 2.  A large result simply takes several reads.
_READ_SIZE = 1 << 16
CANCEL_MESSAGE = 4096  # bytes a cancel message may take on its pipe, length prefix included
# Descriptors a task process costs whoever started it (its three pipes, its sentinel, and
# room to replace it), and what else a process of ours may hold open (sockets, the
# user's files): with the common soft limit of 1,024 open files an agent would otherwise
# stop at about 200 task processes.  The limit is left alone up to 112 task processes
# there (16 under macOS's default of 256).
FDS_PER_PROCESS = 8
FDS_SPARE = 128

log = logging.getLogger(__name__)


def make_room_for(nprocs: int) -> None:
    """Raise this process's soft limit on open files, never past the hard limit, so that
    ``nprocs`` task processes fit (as an administrator's ``ulimit -n`` would).  Only
    raised, and only when ``nprocs`` would leave fewer than ``FDS_SPARE`` descriptors
    for everything else: a process that asks for few workers is left alone."""
    try:
        import resource
    except ImportError:  # no such limit on this system
        return
    needed = nprocs * FDS_PER_PROCESS + FDS_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    limit = soft
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            limit = target
            log.debug("soft limit on open files raised from %d to %d for %d task "
                      "processes", soft, target, nprocs)
        except (ValueError, OSError) as exc:
            log.debug("could not raise the soft limit on open files: %s", exc)
    if limit < needed:
        log.warning("%d task processes need about %d open files, and this process may "
                    "open %d: raise the limit (ulimit -n) if starting them fails",
                    nprocs, needed, limit)


def describe_exit(code: Optional[int]) -> str:
    """``exit code 3`` or ``killed by SIGKILL``: what a WorkerLostError reports."""
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def default_start_method() -> str:
    """fork on Linux (fast, the agent is small and single-purpose), spawn elsewhere."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


class TaskProcess:
    """The agent's handle on one task process: start it, give it batches, read results.

    An agent process starts its task processes with ``multiprocessing`` (``start``: the
    process's sentinel says when it ends); the embedded node has a zygote fork them
    (``from_zygote``: the zygote says when it ends, and kills it on request)."""

    def __init__(self) -> None:
        # One-way pipes, not one socket pair: reading a result from a socket pair wakes
        # the task process blocked reading its end (the kernel tells a socket's waiters
        # that it may write again), a wasted wake-up of another CPU on every result.
        self._child_tasks, self.tasks = multiprocessing.Pipe(duplex=False)
        self.results, self._child_results = multiprocessing.Pipe(duplex=False)
        self._child_cancels, self.cancels = multiprocessing.Pipe(duplex=False)
        self.proc: Any = None  # the multiprocessing.Process, when it has one
        self.pid = 0  # known once started
        self.context = -1  # the version of the client's context it has (the node's)
        self.batch = 0  # number of the last batch given (cancels name it)
        self.fids: Set[str] = set()  # blobs this process has
        self.told: Set[str] = set()  # keys of this batch the process was asked to drop
        self.fd = self.results.fileno()
        self._reader = RecordReader()
        # batches never block: a stopped process (SIGSTOP) must not stop its agent
        self.writer = PipeWriter(self.tasks.fileno())
        self.out_fd = self.writer.fd  # polled for writing while ``writer.waiting``

    @classmethod
    def start(cls, ctx: Any) -> "TaskProcess":
        """A task process started by a ``multiprocessing`` context (an agent process).

        Not daemonic: a task may start processes of its own (a process pool), as in a
        ProcessPoolExecutor's worker; they are in the task process's group, which the
        agent kills with it.  The agent alone reaps it (``forget_child``)."""
        self = cls()
        self.proc = ctx.Process(target=task_main,
                                args=(self._child_tasks, self._child_results,
                                      self._child_cancels, os.getpid()),
                                name="zmqexec-task", daemon=False)
        self.proc.start()
        forget_child(self.proc)
        self.pid = self.proc.pid
        self._close_child_ends()
        return self

    @classmethod
    def from_zygote(cls, zygote: Any) -> "TaskProcess":
        """A task process a zygote forks; its pid comes later (``started``)."""
        self = cls()
        zygote.spawn(self._child_tasks.fileno(), self._child_results.fileno(),
                     self._child_cancels.fileno())
        self._close_child_ends()
        return self

    def _close_child_ends(self) -> None:
        self._child_tasks.close()
        self._child_results.close()
        self._child_cancels.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the task process and its group: what its tasks started goes with it.
        Only before ``proc.join`` reaped it (the agent reaps it only after this), so its
        pid and its group's id cannot be another process's."""
        kill_group(self.pid, sig)

    def close(self) -> None:
        """Close our ends of its pipes (it then reads EOF and exits, if it still runs)."""
        self.writer.clear()
        self.tasks.close()
        self.results.close()
        self.cancels.close()

    def read(self) -> Optional[List[bytes]]:
        """The whole result records that have arrived (one read for many); None at EOF."""
        return read_records(self.fd, self._reader, _READ_SIZE)

    def read_into(self, state: "AgentState", now: float) -> bool:
        """Hand the agent's state the results that have arrived; False at EOF (its end
        is reported apart: by its sentinel, or by its zygote)."""
        try:
            messages = self.read()
        except OSError:
            messages = None
        if messages is None:
            return False
        slot = state.slots.get(self.pid)
        if slot is not None:
            on_result = state.on_result
            for message in messages:
                on_result(slot, *unpack_result(message), now)
        return True

    def cancel(self, kws: Sequence[str]) -> None:
        """Ask the process to drop these keys of its batch if it has not started them.

        They go on the cancel pipe, which a thread of the process drains at once, so the
        answer ("dropped") does not wait for the running task.  Each key is told once,
        in small messages (about 4 KiB) written only when the pipe polls writable, so
        even a stopped process (SIGSTOP) cannot make the agent block; a cancel that
        finds no room is not sent, and that task runs, its result dropped where nobody
        wants it any more."""
        fresh = [kw for kw in kws if kw not in self.told]
        empty = 4 + len(json.dumps([self.batch, []]))  # with Connection's length prefix
        chunk: List[str] = []
        size = empty
        for kw in fresh:
            more = len(json.dumps(kw)) + 2  # exactly as encoded (ASCII), and ", "
            if empty + more > CANCEL_MESSAGE:
                continue  # a key too long for a small message: not worth a stall
            if size + more > CANCEL_MESSAGE:
                if not self._send_cancels(chunk):
                    return
                chunk, size = [], empty
            chunk.append(kw)
            size += more
        if chunk:
            self._send_cancels(chunk)

    def _send_cancels(self, chunk: List[str]) -> bool:
        """One message of at most CANCEL_MESSAGE bytes, if the pipe polls writable: a
        pipe does so while one of its 4 KiB slots is free, and such a write fits it."""
        poller = select.poll()
        poller.register(self.cancels.fileno(), select.POLLOUT)
        if not poller.poll(0):
            return False
        self.told.update(chunk)
        self.cancels.send_bytes(json.dumps([self.batch, chunk]).encode())
        return True

    def give(self, tasks: List[Task], blobs: Dict[str, Any],
             context: Optional[Tuple[int, Any]] = None) -> bool:
        """One numbered batch (a message, plus one per large frame), with the blobs this
        process lacks: rows ``[k, client, fid, iid, nframes, mid]``; ``context``: the client's
        (version, [sys.path, cwd, environment]) for a process that has an older one.
        False if part of it waits for the pipe to poll writable (then ``flush``)."""
        self.told.clear()  # (the keys of an earlier batch are all done)
        self.batch += 1
        fids, rows, frames = [], [], []
        for row, task_frames in tasks:
            for fid in (row.fid, row.iid, row.mid):
                if fid and fid not in self.fids and fid in blobs:
                    self.fids.add(fid)
                    fids.append(fid)
            rows.append([row.kw, row.client, row.fid, row.iid, len(task_frames), row.mid,
                         [list(dep) for dep in row.deps]] if row.deps else
                        [row.kw, row.client, row.fid, row.iid, len(task_frames), row.mid])
            frames.extend(task_frames)
        meta: Dict[str, Any] = {"b": self.batch, "f": fids, "t": rows}
        if context is not None and context[0] != self.context:
            self.context = context[0]
            meta["x"] = context[1]
        sent = True
        for message in pack(meta, [blobs[f] for f in fids] + frames):
            sent = self.writer.send(message)
        return sent

    def flush(self) -> bool:
        """Go on writing a batch the pipe could not take whole; True once it is all
        written, or the process is gone (its end is reported apart)."""
        try:
            return self.writer.flush()
        except OSError:
            self.writer.clear()
            return True


class StalledBatches:
    """The task processes whose batch waits for their pipe (``give`` returned False),
    polled for writing until it is all written: by the agent's ``zmq.Poller`` or the
    node's ``select.poll``, which register descriptors alike."""

    def __init__(self, poller: Any, pollout: int) -> None:
        self.poller, self.pollout = poller, pollout
        self.by_fd: Dict[int, TaskProcess] = {}  # by out_fd

    def watch(self, processes: List[TaskProcess]) -> None:
        for process in processes:
            if process.out_fd not in self.by_fd:
                self.by_fd[process.out_fd] = process
                self.poller.register(process.out_fd, self.pollout)

    def on_writable(self, process: TaskProcess) -> None:
        if process.flush():
            self.forget(process)

    def forget(self, process: TaskProcess) -> None:
        """Before its pipes close: a closed descriptor's number may be reused."""
        if self.by_fd.pop(process.out_fd, None) is not None:
            self.poller.unregister(process.out_fd)


def forget_child(proc: Any) -> None:
    """Take a started ``multiprocessing.Process`` off multiprocessing's list of children.

    Whenever a process starts, multiprocessing reaps every child on that list that has
    ended; a task process reaped so before the agent saw its end would free its pid, the
    id of its group, and the agent could no longer kill that group safely (the pid, and
    so the group id, may be another's by then).  Off the list, a task process is reaped
    only by its handle's ``join``, after its group was killed.  (Nor does
    multiprocessing's exit handler wait for it: the agent kills it when it stops.)"""
    children = getattr(mp_process, "_children", None)
    if isinstance(children, set):
        children.discard(proc)


def has_ended(pid: int) -> bool:
    """True if child ``pid`` has ended, without reaping it: its group, which may hold
    what its tasks started, can still be killed by its id.  False where the system
    cannot tell so (no ``os.waitid``): the process sentinel tells then."""
    if not hasattr(os, "waitid"):
        return False
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # not a child of ours (never started)
        return False


def carry_out(state: "AgentState", processes: Dict[int, TaskProcess], *,
              kill: Callable[["Slot"], None], retire: Callable[[TaskProcess], None],
              context: Optional[Callable[[], Tuple[int, Any]]] = None
              ) -> List[TaskProcess]:
    """Do to the task processes what the agent's state decided: batches, cancels, kills
    and retirements (``kill`` and ``retire`` say how, by whoever started them;
    ``context``: the client's context to send with batches, in the embedded node).
    Returns the processes whose batch waits for their pipe: poll them for writing."""
    stalled: List[TaskProcess] = []
    if state.gives:
        gives, state.gives = state.gives, []
        now = context() if context is not None else None
        for slot, tasks in gives:
            process = processes.get(slot.pid)
            if process is not None:
                try:
                    if not process.give(tasks, state.blobs, now):
                        stalled.append(process)
                except OSError:  # it died under us: its end is reported
                    process.writer.clear()
    if state.cancels:
        cancels, state.cancels = state.cancels, []
        for slot, kws in cancels:
            process = processes.get(slot.pid)
            if process is not None:
                try:
                    process.cancel(kws)
                except OSError:
                    pass
    if state.kills:
        kills, state.kills = state.kills, []
        for slot in kills:
            if slot.pid in processes:
                kill(slot)
    if state.retires:
        retires, state.retires = state.retires, []
        for slot in retires:
            process = processes.get(slot.pid)
            if process is not None:
                retire(process)
    return stalled
