"""zmqexec: a concurrent.futures Executor over a ZeroMQ broker, on one machine or many.

This module is the table of contents: every public name is re-exported here, and
``__all__`` is exact (a test checks it against the README).
"""
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
from .executor import ZMQExecutor, ZMQExecutorView
from .future import Future

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
    "__version__",
]
