"""Objects that misbehave at a chosen stage of a task's life, for the crash matrix.

The stages: ``task-unpickle`` (an argument that acts when the worker unpickles it),
``run`` (the task body), ``result-pickle`` (a result that acts when the worker pickles it)
and ``result-unpickle`` (a result that acts when the client unpickles it).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any, Callable, Dict, Tuple


class Boom(Exception):
    pass


def act(how: str) -> Any:
    """Misbehave in one of the ways of the matrix."""
    if how == "raise":
        raise Boom(how)
    if how == "exit":
        sys.exit(7)
    if how == "os_exit":
        os._exit(9)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segfault":
        ctypes.string_at(0)
    raise ValueError(how)


class ActOnUnpickle:
    """Pickles fine; unpickling it runs ``act(how)`` wherever that happens."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
        return act, (self.how,)


class ActOnPickle:
    """Pickling it runs ``act(how)`` (on the worker, when the result is sent)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> Tuple[Any, ...]:
        act(self.how)
        return (ActOnPickle, (self.how,))


def identity(x: Any) -> Any:
    return x


def run(how: str) -> None:
    act(how)


def make(how: str, cls_name: str) -> Any:
    return {"ActOnPickle": ActOnPickle, "ActOnUnpickle": ActOnUnpickle}[cls_name](how)


COUNTS: Dict[str, int] = {}
