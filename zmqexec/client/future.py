"""``zmqexec.Future``: a concurrent.futures.Future with a cluster-wide key, status and inform.

No I/O happens here.  A Future only registers itself with its executor's client state
(``ClientState.attach``), which queues any message for the thread that owns the
connection: the inform travels on the one ordered channel, and ``__del__`` only drops a
reference count through a reentrant-safe queue, so garbage collection can never touch a
socket or a lock.  The Future knows its executor only through the small ``Owner``
protocol below, so this module never imports the executor.
"""
from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import copyreg
import threading
import time
import weakref
from collections import deque
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import Any, Generator, List, Optional, Protocol

from ..errors import BrokerLostError, TaskLostError
from ..wire import deps
from ..wire.protocol import key_from_wire, key_to_wire


class Registry(Protocol):
    """What a Future needs of its client's tables (``state.ClientState``)."""

    def attach(self, fut: "Future", inform: bool) -> None: ...

    def await_outcome(self, fut: "Future", end: Optional[float]) -> None: ...

    def cancel(self, futs: List["Future"], timeout: Optional[float]) -> List["Future"]: ...

    def unref(self, kw: str) -> None: ...

    @property
    def broken(self) -> Optional[BaseException]: ...

    def post(self, command: Any) -> None: ...


class Owner(Protocol):
    """What a Future needs of its executor (``ZMQExecutor``)."""

    @property
    def _client(self) -> Registry: ...

    @property
    def _shutdown(self) -> bool: ...

    def _check_usable(self) -> None: ...


# A stdlib future (or another library's) met while pickling: a clear TypeError, not a
# complaint about its lock
copyreg.pickle(concurrent.futures.Future, deps.refuse_foreign)

CANCEL_WAIT = 10.0  # seconds cancel() waits for the holder's answer at most (then False)

# Executors that are running, oldest first: ``Future(key)`` with no client takes the last.
_running: List["weakref.ref[Owner]"] = []


def register_executor(executor: Owner) -> None:
    _running.append(weakref.ref(executor))


def unregister_executor(executor: Owner) -> None:
    _running[:] = [r for r in _running if r() is not None and r() is not executor]


def default_executor() -> Owner:
    for ref in reversed(_running):
        executor = ref()
        if executor is not None and not executor._shutdown:
            return executor
    raise ValueError("no running ZMQExecutor: pass client=executor, or create one first")


_RLock: Any = _thread.RLock  # (final to typing; a class to subclass from 3.10 to 3.13 at least)

try:
    class _Condition(_RLock):  # type: ignore[misc]
        """A ``threading.Condition`` that is its own re-entrant lock: one per task.

        The stdlib's is a Python object around an RLock: three objects per Future for the
        garbage collector (with its dict), five methods of the lock bound when made, a
        waiter deque made at once, and two Python calls per ``with``.  This one is the
        lock (the C ``RLock``, subclassed): ``with``, ``acquire``, ``release`` and the
        lock calls inside ``wait`` are the lock's own, one object stands for three, the
        deque is made by the first ``wait``, and a notify with no waiter returns at once
        (every ``set_result`` notifies).  ``wait``, ``wait_for`` and ``notify`` are the
        stdlib's own code, which needs of its condition only what the lock has
        (``_is_owned``, ``_release_save``, ``_acquire_restore``) and ``_waiters``."""

        __slots__ = ("_waiters",)

        def __init__(self) -> None:
            self._waiters: Any = ()

        def wait(self, timeout: Optional[float] = None) -> bool:
            if not self._waiters:
                self._waiters = deque()
            return threading.Condition.wait(self, timeout)

        wait_for = threading.Condition.wait_for

        def notify(self, n: int = 1) -> None:
            if self._waiters:
                threading.Condition.notify(self, n)
            elif not self._is_owned():
                raise RuntimeError("cannot notify on un-acquired lock")  # (as the stdlib)

        def notify_all(self) -> None:
            self.notify(len(self._waiters))  # (most futures complete with nobody waiting)
except TypeError:  # pragma: no cover - a Python whose RLock cannot be subclassed
    _Condition = threading.Condition  # type: ignore[misc,assignment]


class _Waiters(list):  # type: ignore[type-arg]
    """A future's waiters from ``wait`` and ``as_completed``, which add theirs and remove
    them when they return (both under the future's condition): the future lets go of the
    list with its last waiter, so a held future that was waited on costs no extra
    object."""

    __slots__ = ("fut",)
    fut: Optional["Future"]

    def remove(self, waiter: Any) -> None:
        list.remove(self, waiter)
        if not self and self.fut is not None:
            if self.fut._w is self:
                self.fut._w = None
            self.fut = None


def mark_running(fut: "concurrent.futures.Future[Any]") -> None:
    """``set_running_or_notify_cancel`` only where it applies (it logs CRITICAL elsewhere).

    PENDING -> RUNNING is set directly (one lock round instead of two, once per task):
    nothing waits on that transition, as in ``set_running_or_notify_cancel``."""
    with fut._condition:  # an RLock: the call below takes it again
        if fut._state == PENDING:
            fut._state = RUNNING
        elif fut._state == CANCELLED:
            fut.set_running_or_notify_cancel()


_WAITING = (PENDING, RUNNING)
_OVER = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))
_STATUS = {PENDING: "pending", RUNNING: "running", CANCELLED: "cancelled",
           CANCELLED_AND_NOTIFIED: "cancelled"}


class Future(concurrent.futures.Future[Any]):
    """A handle on the result of the task with this ``key``.

    ``Future(key)`` attaches to a key submitted by any client of the same broker: with
    ``inform=True`` (the default) this client tells the broker it wants the result.
    """

    # The stdlib makes two lists per future: the waiters of ``wait``/``as_completed`` and
    # the done callbacks.  Most futures never get either, and a held done future would
    # cost the garbage collector three objects instead of one (every collection that
    # reaches the held futures visits them all).  Here each is made at its first use:
    # ``_waiters`` and ``_done_callbacks`` are properties the stdlib's own code reaches
    # (``wait``, ``as_completed``, ``add_done_callback``); completion and cancellation
    # read the plain ``_w`` and ``_cb`` (None until made) and so make neither.
    _w: Optional[List[Any]] = None
    _cb: Optional[List[Any]] = None

    @property
    def _waiters(self) -> List[Any]:
        if self._w is None:
            self._w = waiters = _Waiters()
            waiters.fut = self
        return self._w

    @_waiters.setter
    def _waiters(self, value: List[Any]) -> None:
        self._w = value

    @property
    def _done_callbacks(self) -> List[Any]:
        if self._cb is None:
            self._cb = []
        return self._cb

    @_done_callbacks.setter
    def _done_callbacks(self, value: List[Any]) -> None:
        self._cb = value

    def __init__(self, key: Any, client: Optional[Owner] = None,
                 inform: bool = True) -> None:
        # (concurrent.futures.Future.__init__ as in ``_new``)
        self._condition = _Condition()
        self._state, self._result, self._exception = PENDING, None, None
        self._registered = False
        self._kw = key_to_wire(key)
        self.executor = client if client is not None else default_executor()
        self.inform = bool(inform)
        self.executor._check_usable()
        self.executor._client.attach(self, self.inform)

    @classmethod
    def _new(cls, kw: str, executor: Owner) -> "Future":
        """A Future made by ``submit``; the caller registers it (no inform message)."""
        self = cls.__new__(cls)
        # concurrent.futures.Future.__init__, with the cheaper condition and no lists
        self._condition = _Condition()
        self._state, self._result, self._exception = PENDING, None, None
        self._registered = False
        self._kw, self.executor, self.inform = kw, executor, False
        return self

    def set_result(self, result: Any) -> None:
        """The stdlib's ``set_result``, touching the waiter and callback lists only if
        they were made."""
        self._finish(result, None, False)

    def set_exception(self, exception: Optional[BaseException]) -> None:
        """The stdlib's ``set_exception``, as ``set_result``."""
        self._finish(None, exception, True)

    def _finish(self, result: Any, exception: Optional[BaseException], failed: bool
                ) -> None:
        with self._condition:
            if self._state in _OVER:
                raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
            self._result, self._exception, self._state = result, exception, FINISHED
            if self._w:
                for waiter in self._w:
                    if failed:
                        waiter.add_exception(self)
                    else:
                        waiter.add_result(self)
            self._condition.notify_all()
        if self._cb:
            self._invoke_callbacks()

    def _invoke_callbacks(self) -> None:
        if self._cb:  # (through the property, a future with none would make a list)
            super()._invoke_callbacks()  # type: ignore[misc]

    def set_running_or_notify_cancel(self) -> bool:
        """The stdlib's, reading the waiter list only if it was made: made here, it would
        hold this future with nobody to remove it, and a cancelled future would then wait
        for the garbage collector to be freed (and release its key)."""
        with self._condition:
            if self._state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._w or ():
                    waiter.add_cancelled(self)
                return False
            if self._state == PENDING:
                self._state = RUNNING
                return True
        return super().set_running_or_notify_cancel()  # (an unexpected state: it raises)

    def __reduce__(self) -> Any:
        """Pickled as a task's argument, a future is a dependency: its key, whose result
        the task process gets in its place (``wire.deps``); anywhere else, a TypeError."""
        return deps.reference(self)

    @property
    def key(self) -> Any:
        """The cluster-wide key: a str, or a tuple of str/int.

        Kept only in its wire form (one string per pending task, not two) and decoded here.
        """
        return key_from_wire(self._kw)

    @property
    def client(self) -> Owner:
        return self.executor

    @property
    def status(self) -> str:
        """``pending``, ``running``, ``cancelled``, ``finished``, ``lost`` or ``error``."""
        with self._condition:
            state, exc = self._state, self._exception
        if state != FINISHED:
            return _STATUS[state]
        if exc is None:
            return "finished"
        return "lost" if isinstance(exc, (TaskLostError, BrokerLostError)) else "error"

    def result(self, timeout: Optional[float] = None) -> Any:
        """The stdlib's ``result``; while it waits, this thread completes the future
        itself when its result arrives (``ClientState.await_outcome``: no hop through
        the completion thread)."""
        if self._state in _WAITING:
            timeout = self._await(timeout)
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """The stdlib's ``exception``, waiting as ``result`` does."""
        if self._state in _WAITING:
            timeout = self._await(timeout)
        return super().exception(timeout)

    def _await(self, timeout: Optional[float]) -> float:
        """Wait until done or past ``timeout``; then the stdlib's checks run with 0.

        One waiting thread per key takes the result from the I/O thread; the others wait
        here, in a loop: the I/O thread's wake-up of that one thread also wakes them, and
        the stdlib's single ``wait`` would take it for a timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        self.executor._client.await_outcome(self, end)
        with self._condition:
            while self._state in _WAITING:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._condition.wait(left)
        return 0.0

    def cancel(self) -> bool:
        """True only if the call will never start: whoever holds the task answers
        (``client.cancels``), within ``CANCEL_WAIT`` seconds (else False).  After False
        the future is running or done; a task that other futures of its key (or other
        clients) wait for runs for them, so its cancel says False too."""
        if self._state != PENDING:
            return super().cancel()  # running or done: False; cancelled already: True
        return bool(self.executor._client.cancel([self], CANCEL_WAIT))

    def release(self) -> None:
        """Drop this client's interest in a done future; the broker may free its copy."""
        if not self.done():
            raise concurrent.futures.InvalidStateError(
                f"release() needs a done future; {self!r} is {self.status}")
        if self._registered:
            self._registered = False
            self.executor._client.unref(self._kw)

    def __del__(self) -> None:
        if getattr(self, "_registered", False):
            self._registered = False
            self.executor._client.unref(self._kw)

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        return f"<Future: status: {self.status}, key: {self.key}>"
