"""The two hand-overs between a client's threads: ``Mailbox`` (user threads -> the thread
that owns the connection) and ``Completions`` (that thread -> the completion thread).

Both the client I/O thread (remote mode) and the embedded node thread own a connection
and read a ``Mailbox``; both give results to a ``Completions`` thread, which unpickles
them and runs user callbacks, so user code never runs on a thread that owns a socket.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable, List, Optional

from .items import Command, Completion, Release, Unref

log = logging.getLogger(__name__)
# Commands that do not wake the owner thread: they leave with the next command that does,
# or within a poll timeout.  A dropped future's release is never urgent, and waking for
# it cost a loop turn per task.
LAZY = frozenset((Release, Unref))
# Commands a user thread queues, after waking the owner thread, before it hands over the
# GIL.  A thread submitting in a loop holds the GIL; the woken owner would wait for
# Python's switch interval (5 ms) between turns, the pipeline would fill, and the task
# processes would idle while results wait unread.  One voluntary hand-over per HANDOFF
# submits keeps the pipeline flowing during a burst, at one sleep(0) per batch.
HANDOFF = 256


class Mailbox:
    """Commands from user threads, and the pipe that wakes the thread reading them."""

    def __init__(self) -> None:
        self._commands: "queue.SimpleQueue[Command]" = queue.SimpleQueue()
        self.wake_fd, self._wake_w = os.pipe()  # the owner polls wake_fd
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(self._wake_w, False)
        self._asleep = True  # the owner may be in poll(): post() must wake it
        self._unserved = 0  # commands queued since the last wake-up (see HANDOFF)

    def post(self, command: Command) -> None:
        """Queue a command and wake the owner (thread- and reentrant-safe)."""
        self._commands.put(command)
        if type(command) in LAZY:
            return
        if self._asleep:  # one wake-up per batch of commands, not one per submit
            self._asleep = False
            self._unserved = 0
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass  # a wake-up is pending already, or we are closed
        else:
            self._unserved += 1
            if self._unserved >= HANDOFF:
                self._unserved = 0
                time.sleep(0)  # lets the woken owner take the GIL now (see HANDOFF)

    def take(self, woken: bool) -> List[Command]:
        """Everything queued (the owner calls it each turn; ``woken``: the wake pipe
        polled readable, and is emptied)."""
        if woken:
            try:
                os.read(self.wake_fd, 65536)
            except BlockingIOError:
                pass
        self._asleep = True  # before draining: a later post() writes again
        out: List[Command] = []
        commands = self._commands
        while not commands.empty():  # (cheaper than the exception get_nowait raises)
            out.append(commands.get_nowait())
        return out


class Completions:
    """The completion thread and its queue: completions are applied in order by
    ``complete`` (``ClientState.complete``), outside every thread that owns a socket."""

    def __init__(self, complete: Callable[[Completion], None]) -> None:
        self._complete = complete
        self._queue: "queue.SimpleQueue[Optional[Completion]]" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._main, name="zmqexec-completion",
                                       daemon=True)
        self.thread.start()

    def defer(self, completion: Completion) -> None:
        self._queue.put(completion)

    def close(self) -> None:
        """The thread ends once what was queued before is applied."""
        self._queue.put(None)

    def _main(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._complete(item)
            except BaseException:  # a bug, or a callback's sys.exit(): the thread goes on
                log.exception("error while completing futures")
