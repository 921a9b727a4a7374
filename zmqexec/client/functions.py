"""Each distinct function is pickled once, and kept alive by nobody but its user.

Like Dask, a function is pickled the first time it is submitted, and tasks name it by the
content hash of its pickle: later submits of the same function object cost a dictionary
lookup.  The cache holds the function weakly (a bound method holds its object, and
``ProcessPoolExecutor`` keeps no reference to a submitted callable once its call is
done): when the user drops the function, its entry and its pickle go.  A callable that
cannot be weakly referenced is cached only if it holds nothing of the user's (a builtin of
a module, such as ``abs``); others are pickled at each submit.

The pickle itself travels with each pending task (``Pending.blob``) until the broker has
it, so nothing else needs to keep it.
"""
from __future__ import annotations

import types
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

from ..wire import serialization as S

Entry = Tuple[Callable[[], Any], str, str, bytes]  # (reference, blob id, name, blob)


class FunctionCache:
    """Function object -> (blob id, name, blob), without keeping the function alive."""

    def __init__(self) -> None:
        self._entries: Dict[int, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, fn: Callable[..., Any]) -> Tuple[str, str, bytes]:
        """The function's blob id, name (for default keys) and pickle."""
        entry = self._entries.get(id(fn))
        if entry is not None and entry[0]() is fn:
            return entry[1], entry[2], entry[3]
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        blob = S.dumps_function(fn)
        fid, name = S.blob_id(blob), S.funcname(fn)
        ref = self._reference(fn)
        if ref is not None:
            self._entries[id(fn)] = (ref, fid, name, blob)
        return fid, name, blob

    def _reference(self, fn: Callable[..., Any]) -> Optional[Callable[[], Any]]:
        """A weak reference that drops the entry with the function; a strong one for a
        module's builtin; None: do not cache."""
        key, entries = id(fn), self._entries

        def gone(ref: "weakref.ref[Any]") -> None:
            entry = entries.get(key)
            if entry is not None and entry[0] is ref:  # (not a later function at this id)
                del entries[key]

        try:
            return weakref.ref(fn, gone)
        except TypeError:
            owner = getattr(fn, "__self__", None)
            if isinstance(fn, types.BuiltinFunctionType) and (
                    owner is None or isinstance(owner, types.ModuleType)):
                return lambda: fn
            return None
