"""zmqexec: a concurrent.futures Executor over a ZeroMQ broker, on one machine or many.

This module is the table of contents: every public name is re-exported here, and
``__all__`` is exact (a test checks it against the README).
"""
import importlib
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    BrokenExecutor,
    CancelledError,
    TimeoutError,
    as_completed,
    wait,
)
from typing import TYPE_CHECKING, Any, List

from ._version import __version__
from .errors import (
    BrokenZMQExecutor,
    BrokerLostError,
    InitializerError,
    KeyExistsError,
    KeyLostError,
    MessageTooLargeError,
    NoWorkersError,
    ProtocolError,
    RemoteTraceback,
    SerializationError,
    TaskKilledError,
    TaskLostError,
    TaskTimeoutError,
    UnknownKeyError,
    WorkerLostError,
    ZMQExecError,
)

if TYPE_CHECKING:
    from .client.future import Future
    from .client.progress import progress
    from .client.shared import Queue, Variable
    from .executor import ZMQExecutor, ZMQExecutorView

# The client side loads on first use, so ``python -m zmqexec broker`` (and ``zmqexec
# worker``) never import it: a faster start, and a test checks it.
_LAZY = {"ZMQExecutor": "executor", "ZMQExecutorView": "executor", "Future": "client.future",
         "progress": "client.progress", "Variable": "client.shared",
         "Queue": "client.shared"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zmqexec' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    # executor and futures
    "ZMQExecutor",
    "ZMQExecutorView",
    "Future",
    # errors (zmqexec.errors)
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
    # the stdlib's own objects, re-exported
    "wait",
    "as_completed",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "ALL_COMPLETED",
    "CancelledError",
    "TimeoutError",
    "BrokenExecutor",
    # futures shared by name
    "Variable",
    "Queue",
    # around the core
    "progress",
    "__version__",
]
