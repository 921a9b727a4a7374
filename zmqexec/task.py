"""The task process: the only place a task is unpickled and run.

The agent and a task process talk over one ``multiprocessing`` Pipe.  Each message is one
packed buffer (``pack``/``unpack``): a JSON header and the frames it names, so a batch of
tasks is one write and one read.  Agent to task process::

    {"f": [fid...], "t": [[k, client, fid, iid, nframes]...]}  blobs, then task frames

and task process to agent, one message per finished task, sent before the next starts so
the agent always knows which task is running (the one it has no result for); it is a
small binary record (``pack_result``), as there is one per task::

    status (finished|error|dropped) | key | result pickle

While a batch runs, the agent may send ``{"cancel": [k...]}``: between two tasks the
process reads it (``Inbox.check``) and answers "dropped" for each of those it reaches
without having started it.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from . import serialization as S
from .errors import InitializerError

def run_chunk(fn: Callable[..., Any], chunk: List[Tuple[Any, ...]]) -> List[Any]:
    """Run one ``map`` chunk: one task, one message, many calls.

    It lives here, in the module every task process has imported, so the first chunk
    does not import the client's modules into the task process (about 40 ms)."""
    return [fn(*args) for args in chunk]


CANCEL_CHECK = 0.001  # seconds between looks for cancels while a batch runs
_HEAD = struct.Struct("!II")  # JSON length, frame count
_RESULT = struct.Struct("!BH")  # status code, key length
_SIZE = struct.Struct("!i")  # multiprocessing.Connection's length prefix
_HUGE_RECORD = 1 << 30  # from here on, Connection.send_bytes (its 8-byte length form)
STATUSES = ("finished", "error", "dropped")
_CODES = {name: code for code, name in enumerate(STATUSES)}


def pack_result(kw: str, status: str, result: bytes = b"") -> bytes:
    key = kw.encode()
    return b"".join((_RESULT.pack(_CODES[status], len(key)), key, result))


def unpack_result(data: bytes) -> Tuple[str, str, memoryview]:
    """(key, status, result view) of a ``pack_result`` record."""
    code, size = _RESULT.unpack_from(data)
    at = _RESULT.size + size
    return data[_RESULT.size:at].decode(), STATUSES[code], memoryview(data)[at:]


def pack(meta: Dict[str, Any], frames: Sequence[Any]) -> List[Any]:
    """Messages for one batch: lengths, JSON header and small frames in one buffer, then
    each large frame (an out-of-band buffer) as a message of its own, never copied here.
    A large frame's length is stored negated so ``unpack`` knows to read it separately.
    """
    head = json.dumps(meta, separators=(",", ":")).encode()
    sizes = [memoryview(f).nbytes for f in frames]
    large = [f for f, n in zip(frames, sizes) if n >= S.OUT_OF_BAND_MIN]
    if large:
        sizes = [-n if n >= S.OUT_OF_BAND_MIN else n for n in sizes]
        frames = [f for f in frames if memoryview(f).nbytes < S.OUT_OF_BAND_MIN]
    packed = b"".join([_HEAD.pack(len(head), len(sizes)),
                       struct.pack(f"!{len(sizes)}q", *sizes), head, *frames])
    return [packed, *large]


def unpack(data: bytes) -> Tuple[Dict[str, Any], List[Any], List[Tuple[int, int]]]:
    """The header, zero-copy views of the packed frames (None for a large one), and the
    (index, size) of each large frame, which follows as a message of its own."""
    view = memoryview(data)
    nhead, count = _HEAD.unpack_from(view)
    at = _HEAD.size
    sizes = struct.unpack_from(f"!{count}q", view, at)
    at += 8 * count
    meta = json.loads(bytes(view[at:at + nhead]))
    at += nhead
    frames: List[Any] = []
    large = []
    for index, size in enumerate(sizes):
        if size < 0:
            frames.append(None)
            large.append((index, -size))
        else:
            frames.append(view[at:at + size])
            at += size
    return meta, frames, large


def _die_with_parent(parent: int) -> None:
    """End this process when the agent goes, even if the agent is SIGKILLed."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:  # pragma: no cover - prctl is always there on Linux
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="zmqexec-parent-watch", daemon=True).start()


class TaskRunner:
    """Runs tasks with the caches of one task process: functions and initializers."""

    def __init__(self) -> None:
        self.blobs: Dict[str, Any] = {}
        self.fns: Dict[str, Callable[..., Any]] = {}
        self.initialized: Dict[str, Optional[BaseException]] = {}

    def _function(self, fid: str) -> Callable[..., Any]:
        fn = self.fns.get(fid)
        if fn is None:
            fn = self.fns[fid] = S.loads_function(self.blobs[fid])
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
                    f"the initializer failed in worker process {os.getpid()}: "
                    f"{type(exc).__name__}: {exc}")
                error.__cause__ = exc
                self.initialized[client] = error
        return self.initialized[client]

    def run(self, client: str, fid: str, iid: str, frames: List[Any]) -> Tuple[str, bytes]:
        """(``finished``, result pickle) or (``error``, error pickle)."""
        failed = self._initialize(client, iid) if iid else None
        if failed is not None:
            return "error", S.dumps_error(failed)
        try:
            fn = self._function(fid)
            args, kwargs = S.loads_args(frames[0], frames[1:])
            value = fn(*args, **kwargs)
        except BaseException as exc:  # SystemExit too: the client re-raises it
            return "error", S.dumps_error(exc)
        try:
            return "finished", S.dumps_result(value)
        except BaseException as exc:
            return "error", S.dumps_error(exc)


class Inbox:
    """The task process's end of its pipe, read by the one thread that also runs tasks.

    No reader thread: handing each batch from a reader to the running thread cost a
    thread wake-up per task (about a tenth of a lone task's round trip).  The agent gives
    a batch only to an idle process, so while one runs the only messages that can arrive
    are cancels; between two tasks the process looks for them (``check``, one poll at
    most every ``CANCEL_CHECK`` seconds) and answers "dropped" for each task not started.
    A cancel read while idle names tasks of a finished batch: it is stale and ignored.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._fd = conn.fileno()
        self.cancelled: Set[str] = set()  # of the current batch, not started yet
        self._next_check = 0.0
        self._next: Optional[Tuple[Dict[str, Any], List[Any]]] = None  # read early

    def receive(self) -> Optional[Tuple[Dict[str, Any], List[Any]]]:
        """The next batch (blocking); None when the agent is gone."""
        self.cancelled.clear()
        while True:
            message, self._next = self._next or self._read(), None
            if message is None:
                return None
            if "cancel" not in message[0]:
                self._next_check = time.monotonic() + CANCEL_CHECK
                return message

    def check(self) -> None:
        """Take the cancels that arrived while a task ran (cheap when it is not time)."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CANCEL_CHECK
        while self._next is None and self.conn.poll(0):
            message = self._read()
            if message is None:
                return  # EOF: the next receive() ends the process
            if "cancel" in message[0]:
                self.cancelled.update(message[0]["cancel"])
            else:  # the next batch (we had sent our last result): keep it for receive()
                self._next = message

    def send(self, kw: str, status: str, result: bytes = b"") -> None:
        """One result record, framed as ``Connection.send_bytes`` frames it (the agent
        reads the descriptor directly, see ``Child.read``), in one write: the
        Connection's own checks cost as much again as the write, once per task."""
        record = pack_result(kw, status, result)
        if len(record) >= _HUGE_RECORD:
            self.conn.send_bytes(record)
        elif len(record) > 16384:  # a large result is not copied to prepend its length
            self._write(_SIZE.pack(len(record)))
            self._write(record)
        else:
            self._write(_SIZE.pack(len(record)) + record)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _read(self) -> Optional[Tuple[Dict[str, Any], List[Any]]]:
        try:
            meta, frames, large = unpack(self.conn.recv_bytes())
            for index, size in large:  # straight into writable memory: numpy arrays
                buffer = bytearray(size)  # made from it are writable, as with pickle
                self.conn.recv_bytes_into(buffer)
                frames[index] = memoryview(buffer)
        except (EOFError, OSError):
            return None
        return meta, frames


def task_main(conn: Connection, parent: int) -> None:
    """Body of a task process: take a batch, run each task, send each result."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    runner = TaskRunner()
    inbox = Inbox(conn)
    while True:
        batch = inbox.receive()
        if batch is None:
            return
        meta, frames = batch
        fids = meta["f"]
        for fid, blob in zip(fids, frames):
            runner.blobs[fid] = bytes(blob)
        at = len(fids)
        cancelled, task_frames = inbox.cancelled, []
        last = len(meta["t"]) - 1
        for index, (kw, client, fid, iid, nframes) in enumerate(meta["t"]):
            task_frames = frames[at:at + nframes]
            at += nframes
            if cancelled and kw in cancelled:
                inbox.send(kw, "dropped")
                continue
            status, result = runner.run(client, fid, iid, task_frames)
            inbox.send(kw, status, result)
            if index < last:  # after the last result, what comes is the next batch
                inbox.check()
        del batch, frames, task_frames
