"""The code that runs inside a task process: the only place a task is unpickled and run.

A task process reads numbered batches from one pipe, runs each task it may still start,
and writes one result record per task on another (``wire.pipe`` has the framing).  A thread of its
own reads cancels from a third pipe and answers "dropped" for each task of the running
batch not started yet, so the answer does not wait for a long running task.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from ..errors import InitializerError
from ..wire import deps as D
from ..wire import serialization as S
from ..wire.pipe import HUGE_RECORD, pack_result, record_parts, unpack
from ..wire.shm import ResultSpill
from .modules import SHIPPED

RESULT_SPILL = ResultSpill()  # where large result buffers go (embedded mode only)

_embedded = False  # this task process serves the embedded node (on its client's host)


def run_chunk(fn: Callable[..., Any], chunk: List[Tuple[Any, ...]]) -> List[Any]:
    """Run one ``map`` chunk: one task, one message, many calls.

    It lives here, in the module every task process has imported, so the first chunk
    does not import the client's modules into the task process (about 40 ms)."""
    return [fn(*args) for args in chunk]


def _lead_own_group() -> None:
    """Lead a new session, and so a process group whose id is this pid, before any task
    runs: whatever a task starts (a process pool, a subprocess) joins it, and whoever ends
    this process on purpose (a timeout, a kill, a replacement, a shutdown) or sees it die
    kills the whole group, so nothing a task started outlives its task process.

    A session rather than a group alone: a background group of the terminal's session is
    stopped (SIGTTIN, SIGTTOU) when one of its processes reads or writes the terminal,
    and Ctrl-C there is the client's to handle, not its task processes' children's."""
    try:
        os.setsid()
    except OSError:  # it leads a group already (EPERM): its id is this pid all the same
        pass


def _end_with_group() -> None:
    """Kill this process's group (itself and what its tasks started), then exit."""
    try:
        os.killpg(os.getpid(), signal.SIGKILL)
    except OSError:
        pass
    os._exit(1)


def _die_with_parent(parent: int) -> None:
    """End this process, and what its tasks started, when the agent (or the zygote) goes,
    even if it is SIGKILLed: nobody is left to kill the group then, so the process does.

    Linux sends SIGHUP at the parent's death (PR_SET_PDEATHSIG), whose handler kills the
    group; a thread that watches the parent covers the rest (another system, a handler
    that a task replaced)."""
    me = os.getpid()

    def on_hangup(signum: int, frame: Any) -> None:
        if os.getpid() != me:  # a process a task forked: SIGHUP does what it always does
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGHUP)
            return
        _end_with_group()

    if sys.platform.startswith("linux"):
        signal.signal(signal.SIGHUP, on_hangup)
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGHUP)  # PR_SET_PDEATHSIG
        except Exception:  # pragma: no cover - prctl is always there on Linux
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        _end_with_group()

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="zmqexec-parent-watch", daemon=True).start()


def _not_shipped(exc: ModuleNotFoundError, mid: str) -> ModuleNotFoundError:
    """A module the worker lacks, said so that the user knows what to do: a module of
    their own would have been shipped (remote mode), so it is one to install here."""
    if _embedded or exc.name is None or SHIPPED.serves(exc.name):  # (embedded:
        return exc  # this host is the client's, and nothing was shipped)
        return exc
    text = (f"{exc.msg} on worker host {socket.gethostname()}: zmqexec ships only your "
            f"own modules (outside site-packages and the standard library), so install "
            f"{exc.name.partition('.')[0]!r} on the workers")
    exc.msg = text
    exc.args = (text,)
    return exc


def _provide(deps: Sequence[Sequence[Any]], frames: List[Any]
             ) -> Tuple[Optional[BaseException], List[Any]]:
    """Unpickle the dependencies' results (the last frames) for the task's arguments to
    take in place of their futures; (an error if one cannot be, the task's own frames)."""
    at = len(frames) - sum(int(n) for _, n in deps)
    own, values = frames[:at], {}
    for kw, n in deps:
        ok, value = S.loads_result("finished", frames[at:at + n], spill_dir=RESULT_SPILL.dir,
                                   where=f"of dependency {kw} in the task process")
        at += n
        if not ok:
            return value, own
        values[kw] = value
    D.provide(values)
    return None, own


class TaskRunner:
    """Runs tasks with the caches of one task process: functions and initializers."""

    def __init__(self) -> None:
        self.blobs: Dict[str, Any] = {}
        self.fns: Dict[str, Callable[..., Any]] = {}
        self.initialized: Dict[str, Optional[BaseException]] = {}

    def _function(self, fid: str, mid: str) -> Callable[..., Any]:
        """The function of blob ``fid``, as the modules of blob ``mid`` define it (a
        function pickled by reference names only its module: the same blob under two
        clients' modules is two functions)."""
        fn = self.fns.get(mid + fid)
        if fn is None:
            fn = self.fns[mid + fid] = S.loads_function(self.blobs[fid])
        return fn

    def _initialize(self, client: str, iid: str) -> Optional[BaseException]:
        """Run this client's initializer once in this process; remember a failure."""
        if client not in self.initialized:
            try:
                init, initargs = S.loads_call(self.blobs[iid])
                init(*initargs)
                self.initialized[client] = None
            except BaseException as exc:
                error = InitializerError(
                    f"the initializer failed in task process {os.getpid()}: "
                    f"{type(exc).__name__}: {exc}")
                error.__cause__ = exc
                self.initialized[client] = error
        return self.initialized[client]

    def run(self, client: str, fid: str, iid: str, frames: List[Any], mid: str = "",
            deps: Sequence[Sequence[Any]] = ()) -> Tuple[str, List[Any]]:
        """(``finished``, the result's frames) or (``error``, [error pickle]).  Large
        buffers of a result leave out of band; in the embedded node, through shared memory
        (``RESULT_SPILL``).  ``mid``: the blob of the client's own modules (remote mode),
        which the task imports from."""
        try:
            SHIPPED.use(mid, self.blobs)
        except Exception as exc:
            return "error", [S.dumps_error(exc)]
        failed = self._initialize(client, iid) if iid else None
        if failed is not None:
            return "error", [S.dumps_error(failed)]
        if deps:  # the dependencies' results follow the task's own frames
            failed, frames = _provide(deps, frames)
            if failed is not None:
                return "error", [S.dumps_error(failed)]
        try:
            fn = self._function(fid, mid)
            args, kwargs = S.loads_args(frames[0], frames[1:])
            value = fn(*args, **kwargs)
        except ModuleNotFoundError as exc:
            return "error", [S.dumps_error(_not_shipped(exc, mid))]
        except BaseException as exc:  # SystemExit too: the client re-raises it
            return "error", [S.dumps_error(exc)]
        try:
            return "finished", S.dumps_result(value, RESULT_SPILL.spill)
        except BaseException as exc:
            return "error", [S.dumps_error(exc)]


class Inbox:
    """The task process's end of its three pipes: batches, read by the thread that runs
    tasks; results, written by it; and cancels, read by a thread of their own.

    Batches are not handed from a reader thread to the running one: that cost a thread
    wake-up per batch on every lone task's round trip.  Cancels have their own pipe and
    thread, so they are answered at once even while a long task runs (and the agent's
    writes to that pipe never wait for it); ``claim``, under the same lock, makes
    "started" and "dropped" exclusive.  Each cancel names its batch (the agent numbers
    them): one that overtakes its batch waits in ``_early``; one for a finished batch is
    stale and ignored, even if a later batch has a task of the same key.
    """

    def __init__(self, tasks: Connection, results: Connection, cancels: Connection) -> None:
        self.tasks = tasks
        self.results = results
        self._fd = results.fileno()
        self._lock = threading.Lock()  # batch state, and whole records on the pipe
        self._batch = 0  # number of the batch being run
        self._pending: Set[str] = set()  # of that batch: not started, not dropped
        self._early: Dict[int, Set[str]] = {}  # cancels for batches not read yet
        threading.Thread(target=self._take_cancels, args=(cancels,),
                         name="zmqexec-cancels", daemon=True).start()

    def receive(self) -> Optional[Tuple[Dict[str, Any], List[Any]]]:
        """The next batch (blocking); None when the agent is gone."""
        try:
            meta, frames, large = unpack(self.tasks.recv_bytes())
            for index, size in large:  # straight into writable memory: numpy arrays
                buffer = bytearray(size)  # made from it are writable, as with pickle
                self.tasks.recv_bytes_into(buffer)
                frames[index] = memoryview(buffer)
        except (EOFError, OSError):
            return None
        keys = {row[0] for row in meta["t"]}
        with self._lock:
            self._batch = number = meta["b"]
            dropped = keys & self._early.pop(number, set())
            self._pending = keys - dropped
            for old in [b for b in self._early if b < number]:
                del self._early[old]
            for kw in dropped:
                self._write_record(kw, "dropped")
        return meta, frames

    def claim(self, kw: str) -> bool:
        """True if the task may start now (no cancel came first)."""
        with self._lock:
            if kw in self._pending:
                self._pending.discard(kw)
                return True
            return False

    def _take_cancels(self, cancels: Connection) -> None:
        while True:
            try:
                number, kws = json.loads(cancels.recv_bytes())
            except (EOFError, OSError, ValueError, TypeError):
                return
            with self._lock:  # the answer is written in the same hold that decides it: a
                if number == self._batch:  # later task's result must never come first
                    for kw in kws:  # (the agent takes results in order, drops in any)
                        if kw in self._pending:
                            self._pending.discard(kw)
                            self._write_record(kw, "dropped")
                        else:  # started, or done (its result is on the pipe already)
                            self._write_record(kw, "kept")
                elif number > self._batch:
                    self._early.setdefault(number, set()).update(kws)

    def send(self, kw: str, status: str, result: Sequence[Any] = ()) -> None:
        """One result record (two threads write records: never interleaved)."""
        with self._lock:
            self._write_record(kw, status, result)

    def _write_record(self, kw: str, status: str, result: Sequence[Any] = ()) -> None:
        """A record framed as ``Connection.send_bytes`` frames it (the agent reads the
        descriptor directly, see ``TaskProcess.read``), in one write: the Connection's own
        checks cost as much again as the write, once per task.  Hold ``_lock``.
        ``result``: the result's frames (``[pickle, *out-of-band buffers]``)."""
        record = pack_result(kw, status, result)
        if len(record) >= HUGE_RECORD:
            self.results.send_bytes(record)
        else:
            for part in record_parts(record):
                self._write(part)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]


def adopt_context(path: List[str], cwd: str, env: Dict[str, str],
                  spill_dir: Optional[str] = None) -> None:
    """Take the client's ``sys.path``, working directory and environment as they were
    when it submitted (the embedded node sends them when they change): code that extends
    ``sys.path`` or changes directory after creating the executor works, as with
    ProcessPoolExecutor, whose workers fork later.  ``spill_dir``: the embedded client's
    shared-memory directory, where large result buffers go."""
    global _embedded
    RESULT_SPILL.dir = spill_dir
    _embedded = True
    sys.path[:] = path
    try:
        os.chdir(cwd)
    except OSError:
        pass  # a directory removed since: tasks run where they are
    if env != os.environ:
        os.environ.clear()
        os.environ.update(env)


def task_main(tasks: Connection, results: Connection, cancels: Connection,
              parent: int) -> None:
    """Body of a task process: take a batch, run each task, send each result."""
    _lead_own_group()
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    runner = TaskRunner()
    inbox = Inbox(tasks, results, cancels)
    while True:
        batch = inbox.receive()
        if batch is None:
            return
        meta, frames = batch
        if "x" in meta:
            adopt_context(*meta["x"])
        fids = meta["f"]
        for fid, blob in zip(fids, frames, strict=False):
            runner.blobs[fid] = bytes(blob)
        at = len(fids)
        task_frames: List[Any] = []
        for kw, client, fid, iid, nframes, *more in meta["t"]:
            task_frames = frames[at:at + nframes]
            at += nframes
            if inbox.claim(kw):
                status, result = runner.run(client, fid, iid, task_frames,
                                            more[0] if more else "",
                                            more[1] if len(more) > 1 else ())
                inbox.send(kw, status, result)
        del batch, frames, task_frames
