"""The exception tree of zmqexec.

Every class here is picklable, because errors travel: a worker pickles the exception a
task raised, and the client rebuilds the errors the broker reports as plain header fields
(the broker never pickles).  Classes that carry fields beyond the message keep them in
``args`` order through ``__reduce__`` so ``pickle`` round-trips them exactly.
"""
from __future__ import annotations

import concurrent.futures
import sys
from typing import Any, Optional, Tuple

__all__ = [
    "ZMQExecError",
    "BrokenZMQExecutor",
    "InitializerError",
    "BrokerLostError",
    "TaskLostError",
    "WorkerLostError",
    "KeyLostError",
    "UnknownKeyError",
    "KeyExistsError",
    "TaskTimeoutError",
    "TaskKilledError",
    "NoWorkersError",
    "SerializationError",
    "MessageTooLargeError",
    "ProtocolError",
    "RemoteTraceback",
]


class ZMQExecError(Exception):
    """Base class of every error zmqexec raises itself."""


class BrokenZMQExecutor(ZMQExecError, concurrent.futures.BrokenExecutor):
    """The executor cannot run tasks any more; create a new one."""


class InitializerError(BrokenZMQExecutor):
    """The ``initializer`` failed in a task process; the executor is broken."""


class BrokerLostError(BrokenZMQExecutor):
    """The broker was unreachable for longer than ``broker_timeout``."""


class TaskLostError(ZMQExecError):
    """The task or its result was lost (Future.status ``'lost'``)."""


class WorkerLostError(TaskLostError):
    """Every attempt of a task ended with the death of the task process running it."""

    def __init__(self, key: Any, attempts: int, worker: str, exit: Optional[str]) -> None:
        self.key = key
        self.attempts = attempts
        self.worker = worker
        self.exit = exit
        super().__init__(
            f"task {key!r} lost its task process {attempts} time(s) "
            f"(last: agent {worker}, {exit or 'unknown exit'}); "
            "it may crash the interpreter (segfault, os._exit, out of memory): "
            "raise options(retries=...) only if the crash is transient"
        )

    def __reduce__(self) -> Tuple[Any, ...]:
        return (type(self), (self.key, self.attempts, self.worker, self.exit))


class KeyLostError(TaskLostError):
    """A held result was dropped (``--max-held-bytes``) or lost before it could be read."""


class UnknownKeyError(ZMQExecError, KeyError):
    """The broker does not know this key (attach with ``Future(key)`` came to nothing)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class KeyExistsError(ZMQExecError, KeyError):
    """An explicit ``key=`` is already live; use another key or ``pure=True``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


if sys.version_info >= (3, 11):
    _TimeoutBases: Tuple[type, ...] = (ZMQExecError, TimeoutError)
else:  # concurrent.futures.TimeoutError is its own class before 3.11
    _TimeoutBases = (ZMQExecError, TimeoutError, concurrent.futures.TimeoutError)


class TaskTimeoutError(*_TimeoutBases):  # type: ignore[misc]
    """The task ran longer than ``options(timeout=...)``; its task process was replaced."""


class TaskKilledError(ZMQExecError):
    """``executor.kill(future)`` stopped the task; its task process was replaced."""


class NoWorkersError(ZMQExecError):
    """No worker was connected within ``no_workers_timeout``."""


class SerializationError(ZMQExecError):
    """Something could not be pickled or unpickled; the message says what and where."""


class MessageTooLargeError(SerializationError):
    """A message exceeds the broker's announced size limits."""


class ProtocolError(ZMQExecError):
    """A malformed message (broker side; it never reaches a future)."""


class RemoteTraceback(Exception):
    """Carries the worker's formatted traceback as the ``__cause__`` of a remote error."""

    def __init__(self, tb: str) -> None:
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return self.tb


# Errors the broker reports as header fields, rebuilt by name on the client
# (WorkerLostError, which has fields of its own, is rebuilt by client_io.broker_error).
BROKER_ERRORS = {
    cls.__name__: cls
    for cls in (
        KeyLostError,
        UnknownKeyError,
        KeyExistsError,
        SerializationError,
        NoWorkersError,
        TaskTimeoutError,
        TaskKilledError,
        ZMQExecError,
    )
}
