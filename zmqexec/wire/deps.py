"""Futures as arguments: how a dependency travels inside a task's pickled arguments.

While a client pickles a task's arguments (``collecting``), a zmqexec ``Future`` met at any
depth reduces to ``resolve(key)`` and its key is noted: the task names its dependencies,
the broker holds it until they are finished, and sends their results with it as the bytes
it holds.  In the task process, those results are unpickled first (``provide``), and each
``resolve(key)`` in the arguments becomes its dependency's value.  Nothing is found by
walking the arguments: a submit without futures costs what it did.

``wire`` never imports ``client``: the client's ``Future.__reduce__`` calls ``reference``
with a check of its own (same broker), which the executor installs while it pickles.
"""
from __future__ import annotations

import threading
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

_local = threading.local()  # .check, .found: the collection in progress in this thread
_values: Dict[str, Any] = {}  # in a task process: the dependencies of the task it loads
_NONE: Mapping[str, Any] = MappingProxyType({})  # what a submit without futures collected

class ForeignFuture(TypeError):
    """A future that cannot be a dependency: another broker's, or not a zmqexec one."""


def refuse_foreign(future: Any) -> Any:
    """The reduction of a ``concurrent.futures.Future`` that is not a zmqexec one."""
    raise ForeignFuture(f"{future!r} is not a zmqexec Future of this executor's broker, so it "
                        "cannot be a task argument: pass its .result() instead")


NOT_AN_ARGUMENT = ("a zmqexec Future is pickled only as an argument of submit or map (a "
                   "dependency): pass its .result() anywhere else")


def collect(check: Callable[[Any], str]) -> None:
    """Start noting the futures pickled in this thread; ``check(future)`` returns its key
    (or raises TypeError for a future of another broker)."""
    _local.check = check
    _local.found = None  # (made by the first future met: most submits have none)


def collected() -> Mapping[str, Any]:
    """Stop noting; the futures met, by key (in order)."""
    found: Optional[Dict[str, Any]] = getattr(_local, "found", None)
    _local.check = _local.found = None
    return found if found is not None else _NONE


def reference(future: Any) -> Tuple[Callable[[str], Any], Tuple[str]]:
    """``Future.__reduce__``: while collecting, the future's key in its place."""
    check: Optional[Callable[[Any], str]] = getattr(_local, "check", None)
    if check is None:
        raise TypeError(NOT_AN_ARGUMENT)
    kw = check(future)
    found = _local.found
    if found is None:
        found = _local.found = {}
    found[kw] = future
    return resolve, (kw,)


def resolve(kw: str) -> Any:
    """In a task process: the value of dependency ``kw`` (unpickling its reference)."""
    try:
        return _values[kw]
    except KeyError:
        raise LookupError(f"dependency {kw} was not sent with this task") from None


def provide(values: Dict[str, Any]) -> None:
    """The dependencies' values for the task about to be unpickled."""
    _values.clear()
    _values.update(values)

