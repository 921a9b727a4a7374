"""The worker agent and its task processes.

::

    broker <--DEALER--> Agent.run()  --task frames over a Pipe-->  task_main() in child 1..N
                        | TASK: to an idle child (STARTED) or the prefetch line
                        | child result -> RESULT; child death (sentinel) -> DEATH + replace
                        | CANCEL: drop from the prefetch line (DROPPED); running tasks run on

The agent never unpickles: it moves the payload bytes between its socket and its children.
Only a task process unpickles, runs, and pickles the result.  A child's death is seen at
once through its process sentinel, so the broker hears the exit status without waiting for
a heartbeat; a lost agent (host down, SIGSTOP) is what heartbeats are for.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from multiprocessing.connection import Connection
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import zmq

from . import protocol as P
from . import serialization as S
from ._version import __version__
from .errors import InitializerError

log = logging.getLogger(__name__)
Task = Tuple[str, Dict[str, Any], List[Any]]  # key_wire, TASK header, payload frames


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


# ---- the task process ---------------------------------------------------------------------
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


def run_task(meta: Dict[str, Any], frames: List[bytes],
             initialized: Dict[str, Optional[BaseException]]) -> Tuple[str, bytes]:
    """Run one task: (``finished``, result pickle) or (``error``, error pickle)."""
    client = str(meta.get("c", ""))
    if len(frames) > 1 and client not in initialized:
        try:
            init, initargs = S.loads_call(frames[1])
            init(*initargs)
            initialized[client] = None
        except BaseException as exc:
            error = InitializerError(
                f"the initializer failed in worker process {os.getpid()}: "
                f"{type(exc).__name__}: {exc}")
            error.__cause__ = exc
            initialized[client] = error
    failed = initialized.get(client)
    if failed is not None:
        return "error", S.dumps_error(failed)
    try:
        fn, args, kwargs = S.loads_task(frames[0])
        value = fn(*args, **kwargs)
    except BaseException as exc:  # SystemExit too: the client re-raises it
        return "error", S.dumps_error(exc)
    try:
        return "finished", S.dumps_result(value)
    except BaseException as exc:
        return "error", S.dumps_error(exc)


def task_main(conn: Connection, parent: int) -> None:
    """Body of a task process: receive a task, run it, send the result, repeat."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    initialized: Dict[str, Optional[BaseException]] = {}
    while True:
        try:
            meta = json.loads(conn.recv_bytes())
            frames = [conn.recv_bytes() for _ in range(meta["n"])]
        except (EOFError, OSError):
            return
        status, data = run_task(meta, frames, initialized)
        del frames
        conn.send_bytes(json.dumps({"k": meta["k"], "s": status}).encode())
        conn.send_bytes(data)


# ---- the agent ----------------------------------------------------------------------------
class Child:
    """The agent's handle on one task process."""

    def __init__(self, ctx: Any) -> None:
        self.conn, child_conn = multiprocessing.Pipe()
        self.proc = ctx.Process(target=task_main, args=(child_conn, os.getpid()),
                                name="zmqexec-task", daemon=True)
        self.proc.start()
        child_conn.close()
        self.key: Optional[str] = None

    def give(self, task: Task) -> None:
        kw, meta, frames = task
        self.key = kw
        self.conn.send_bytes(json.dumps({"k": kw, "c": meta.get("c", ""),
                                         "n": len(frames)}).encode())
        for frame in frames:
            self.conn.send_bytes(frame)


class Agent:
    """Owns the broker connection and heartbeats, and N task processes it keeps alive."""

    def __init__(self, address: str, nprocs: int, *, name: Optional[str] = None,
                 prefetch: Optional[int] = None, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 10.0, parent_fd: Optional[int] = None,
                 start_method: Optional[str] = None) -> None:
        if nprocs < 1:
            raise ValueError("nprocs must be at least 1")
        self.address = address
        self.nprocs = nprocs
        self.prefetch = nprocs if prefetch is None else prefetch
        self.ident = uuid.uuid4().hex
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.interval = heartbeat_interval
        self.timeout = heartbeat_timeout
        self.parent_fd = parent_fd
        self.mp = multiprocessing.get_context(start_method or default_start_method())
        self.children: List[Child] = []
        self.idle: Deque[Child] = deque()
        self.waiting: Deque[Task] = deque()  # prefetched tasks
        self.epoch: Optional[str] = None
        self.refused = False
        self._stop = False

    def stop(self, *_: Any) -> None:
        self._stop = True

    def _hello(self) -> None:
        running = [c.key for c in self.children if c.key is not None]
        self.waiting.clear()  # the broker requeues what we do not say we are running
        self._send(P.HELLO, {
            "role": "worker", "id": self.ident, "proto": P.PROTOCOL_VERSION,
            "zmqexec": __version__, "python": S.PYTHON_VERSION,
            "cloudpickle": S.CLOUDPICKLE_VERSION, "host": socket.gethostname(),
            "pid": os.getpid(), "name": self.name, "slots": self.nprocs,
            "prefetch": self.prefetch, "hb": self.interval, "ttl": self.timeout,
            "running": running})

    def _send(self, cmd: int, meta: Dict[str, Any], payload: Sequence[Any] = ()) -> None:
        self.sock.send_multipart(P.encode(cmd, meta, payload), copy=False)
        self.last_sent = time.monotonic()

    def _spawn(self) -> Child:
        child = Child(self.mp)
        self.children.append(child)
        self.idle.append(child)
        self.poller.register(child.conn.fileno(), zmq.POLLIN)
        self.poller.register(child.proc.sentinel, zmq.POLLIN)
        return child

    def _start_next(self) -> None:
        while self.idle and self.waiting:
            child, task = self.idle.popleft(), self.waiting.popleft()
            try:
                child.give(task)
            except OSError:  # the child died under us; its sentinel will report it
                pass
            self._send(P.STARTED, {"k": task[0]})

    def _on_broker(self, frames: List[Any]) -> None:
        try:
            msg = P.decode(frames)
        except Exception as exc:
            log.warning("dropped a malformed message from the broker: %s", exc)
            return
        self.last_heard = time.monotonic()
        if msg.cmd == P.TASK:
            self.waiting.append((msg.meta["k"], msg.meta, msg.payload))
            self._start_next()
        elif msg.cmd == P.CANCEL:
            kw = msg.meta["k"]
            for task in self.waiting:
                if task[0] == kw:
                    self.waiting.remove(task)
                    self._send(P.DROPPED, {"k": kw})
                    break
        elif msg.cmd in (P.WELCOME, P.HEARTBEAT):
            epoch = msg.meta.get("epoch")
            if msg.cmd == P.WELCOME:
                self.epoch = epoch
                log.info("agent %s registered with %d slots", self.name, self.nprocs)
            elif epoch != self.epoch:
                log.warning("broker epoch changed: registering again")
                self._hello()
        elif msg.cmd == P.RESET:
            self._hello()
        elif msg.cmd == P.REFUSE:
            log.error("the broker refused this agent: %s", msg.meta["reason"])
            self.refused = True
            self._stop = True
        elif msg.cmd == P.BYE:
            log.info("broker said goodbye: %s", msg.meta.get("reason", ""))

    def _on_child_data(self, child: Child, alive: bool = True) -> None:
        try:
            meta = json.loads(child.conn.recv_bytes())
            result = child.conn.recv_bytes()
        except (EOFError, OSError):
            return  # it died mid-message; the sentinel reports the death
        child.key = None
        self._send(P.RESULT, {"k": meta["k"], "s": meta["s"]}, [result])
        if alive:
            self.idle.append(child)
            self._start_next()

    def _on_child_exit(self, child: Child) -> None:
        self.children.remove(child)
        if child in self.idle:
            self.idle.remove(child)
        if child.key is not None and child.conn.poll(0):
            self._on_child_data(child, alive=False)  # a result sent just before dying counts
        child.proc.join()
        exit = describe_exit(child.proc.exitcode)
        self.poller.unregister(child.conn.fileno())
        self.poller.unregister(child.proc.sentinel)
        child.conn.close()
        if child.key is not None:
            log.warning("task process %d died running %s (%s)", child.proc.pid, child.key, exit)
            self._send(P.DEATH, {"k": child.key, "exit": exit})
        if not self._stop:
            self._spawn()
            self._start_next()

    def run(self) -> None:
        """Connect, register, and serve until stopped or the parent goes away."""
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, uuid.UUID(self.ident).bytes)
        self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 20)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        if self.parent_fd is not None:
            self.poller.register(self.parent_fd, zmq.POLLIN)
        for _ in range(self.nprocs):
            self._spawn()
        self.sock.connect(self.address)
        self._hello()
        self.last_heard = time.monotonic()
        try:
            self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> None:
        by_fd: Dict[int, Tuple[str, Child]] = {}
        while not self._stop:
            by_fd.clear()
            for child in self.children:
                by_fd[child.conn.fileno()] = ("data", child)
                by_fd[child.proc.sentinel] = ("exit", child)
            events = self.poller.poll(int(min(self.interval, 0.25) * 1000))
            for what, _ in events:
                if what is self.sock:
                    for _ in range(1000):
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_broker(frames)
                elif what == self.parent_fd:
                    log.info("parent process is gone: stopping")
                    self._stop = True
                elif what in by_fd:
                    kind, child = by_fd[what]
                    if child not in self.children:
                        continue
                    if kind == "data":
                        self._on_child_data(child)
                    else:
                        self._on_child_exit(child)
            now = time.monotonic()
            if now - self.last_sent >= self.interval:
                self._send(P.HEARTBEAT, {"slots": self.nprocs})
            if now - self.last_heard > self.timeout:
                log.warning("no word from the broker for %.1f s: registering again",
                            now - self.last_heard)
                self.last_heard = now
                self._hello()

    def _shutdown(self) -> None:
        try:
            self._send(P.BYE, {"reason": "agent stopping"})
        except zmq.ZMQError:
            pass
        for child in self.children:
            child.proc.kill()
        for child in self.children:
            child.proc.join(5)
        self.sock.close(linger=500)
        self.ctx.term()
        log.info("agent %s stopped", self.name)
