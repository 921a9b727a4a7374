"""Pickling of tasks, results and errors: the only module that calls cloudpickle.

Why one module: every place that turns Python objects into bytes must give the same
clear ``SerializationError`` (what could not be pickled, and where) instead of a bare
``PicklingError`` from deep inside a socket thread, and the version strings that HELLO
compares come from here too.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import linecache
import pickle
import sys
import traceback
import types
from collections import ChainMap
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type

import cloudpickle

from ..errors import RemoteTraceback, SerializationError
from .deps import ForeignFuture
from .shm import MARK, SPILL_MIN, unspill

PICKLE_PROTOCOL = 5
PYTHON_VERSION = "%d.%d" % sys.version_info[:2]
CLOUDPICKLE_VERSION = cloudpickle.__version__

def _dumps(obj: Any) -> bytes:
    data: bytes = cloudpickle.dumps(obj, protocol=PICKLE_PROTOCOL)
    return data


# ---- code that travels by value keeps its file name and source ---------------------
_DYNAMIC = "<dynamic-code>"  # the file name cloudpickle gives code it pickles by value
_code_reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)
MAX_SOURCE = 1 << 20  # characters of one file's source sent with a function, at most


class _CodePickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, except that code pickled by value (``__main__``, notebooks) keeps its
    file name, and the files it came from are noted: a traceback in the task process then
    names the user's file and line, as ProcessPoolExecutor's does."""

    def __init__(self, file: Any) -> None:
        self.files: Set[str] = set()
        if _code_reduce is not None:  # (the pickler reads its table when it is made)
            self.dispatch_table = ChainMap({types.CodeType: _code_keeping_file(self.files)},
                                           cloudpickle.Pickler.dispatch_table)
        super().__init__(file, protocol=PICKLE_PROTOCOL)


def _code_keeping_file(files: Set[str]) -> Callable[[types.CodeType], Any]:
    """A reducer of code objects that keeps ``co_filename`` and adds it to ``files``
    (a closure over the set, not the pickler: no cycle keeps the pickled objects alive)."""
    def reduce(code: types.CodeType) -> Any:
        rebuild, args = _code_reduce(code)  # type: ignore[misc]
        name = code.co_filename
        if name and not name.startswith("<"):
            files.add(name)
            args = tuple(name if type(a) is str and a == _DYNAMIC else a for a in args)
        return rebuild, args
    return reduce


def _dumps_code(obj: Any) -> bytes:
    """Pickle a function (or an initializer call) with the source of the files of its
    code pickled by value, for tracebacks in task processes on any machine."""
    buf = io.BytesIO()
    pickler = _CodePickler(buf)
    pickler.dump(obj)
    sources: Dict[str, str] = {}
    for name in sorted(pickler.files):
        text = "".join(linecache.getlines(name))
        if text and len(text) <= MAX_SOURCE:
            sources[name] = text
    return pickle.dumps((buf.getvalue(), sources), PICKLE_PROTOCOL)


def _loads_code(data: Any) -> Any:
    """The object ``_dumps_code`` pickled; its files' source goes to ``linecache`` (an
    entry with no mtime, which ``linecache.checkcache`` keeps)."""
    inner, sources = pickle.loads(data)
    for name, text in sources.items():
        lines = text.splitlines(keepends=True)
        linecache.cache[name] = (len(text), None, lines, name)
    return pickle.loads(inner)


def _fast_dumps(obj: Any) -> bytes:
    """Plain pickle (several times faster), cloudpickle where plain pickle cannot do it.

    Plain pickle refers to ``__main__`` objects by name, which the worker's ``__main__``
    lacks, so any pickle that mentions ``__main__`` is redone with cloudpickle (by value).
    """
    try:
        data = pickle.dumps(obj, PICKLE_PROTOCOL)
    except Exception:
        return _dumps(obj)
    if b"__main__" in data:
        return _dumps(obj)
    return data


_SIMPLE = frozenset((int, float, str, bool, type(None), complex))
OUT_OF_BAND_MIN = 1 << 20  # buffers this large travel as frames of their own


def _bytes_from_buffer(buffer: Any) -> bytes:
    return bytes(buffer)


class _LargeBytes:
    """Stands in for a large ``bytes`` argument so it travels out of band.

    Pickle sends PickleBuffers out of band (numpy arrays make them) but writes ``bytes``
    in band, and it does not consult ``reducer_override`` for them; this wrapper reduces
    to a PickleBuffer and unpickles as the ``bytes`` it wraps.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _bytes_from_buffer, (pickle.PickleBuffer(self.data),)


def _dumps_parts(obj: Any, spill: Optional[Callable[[List[Any]], List[Any]]] = None,
                 snapshot: bool = True) -> List[Any]:
    """``[pickle, *buffers]``: large buffers (numpy arrays, big bytes) out of band.

    An out-of-band buffer skips the copy into the pickle here and out of it on the worker,
    and crosses each hop as its own frame.  Read-only buffers (bytes) travel as they are;
    writable ones are copied once now, so changing an array after ``submit`` cannot change
    what the task sees, as with ProcessPoolExecutor.  With ``spill`` (embedded mode, see
    ``shm``) large buffers go into shared memory instead, and that write is the copy.
    A result needs no snapshot (``snapshot=False``): it is written out before the task
    process runs anything else.
    """
    buffers: List[Any] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: in band
            return True
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True
        buffers.append(raw if raw.readonly or not snapshot or
                       spill is not None and raw.nbytes >= SPILL_MIN else bytes(raw))
        return False

    try:
        data = pickle.dumps(obj, PICKLE_PROTOCOL, buffer_callback=out_of_band)
        if b"__main__" in data:
            raise pickle.PicklingError("refers to __main__")
    except Exception:
        buffers.clear()
        data = cloudpickle.dumps(obj, protocol=PICKLE_PROTOCOL, buffer_callback=out_of_band)
    if spill is not None and buffers:
        return spill([data, *buffers])
    return [data, *buffers]


def dumps_value(value: Any) -> bytes:
    """A value a Variable or Queue holds: one pickle (cloudpickle for what plain pickle
    cannot do), read back with ``pickle.loads``."""
    return _dumps(value)


def blob_id(blob: bytes) -> str:
    """Content hash naming a pickled function or initializer in caches along the way."""
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def dumps_function(fn: Callable[..., Any]) -> bytes:
    """Pickle a task's function once per executor (cloudpickle: by value where needed)."""
    try:
        return _dumps_code(fn)
    except Exception as exc:
        raise SerializationError(
            f"cannot pickle the function ({type(fn).__name__}: {_describe(fn)}): "
            f"{type(exc).__name__}: {exc}") from exc


def dumps_args(args: Tuple[Any, ...], kwargs: Dict[str, Any],
               spill: Optional[Callable[[List[Any]], List[Any]]] = None) -> List[Any]:
    """Pickle a call's arguments as ``[pickle, *buffers]``; on failure name the argument."""
    if not kwargs:  # the common case, once per task: positional values of builtin types
        for arg in args:  # cannot name __main__ nor carry a large buffer
            kind = type(arg)
            if kind not in _SIMPLE and (kind is not bytes or len(arg) >= OUT_OF_BAND_MIN):
                break
        else:
            return [pickle.dumps((args, kwargs), PICKLE_PROTOCOL)]
    if any(type(a) is bytes and len(a) >= OUT_OF_BAND_MIN for a in args):
        args = tuple(_LargeBytes(a) if type(a) is bytes and len(a) >= OUT_OF_BAND_MIN
                     else a for a in args)
    try:
        return _dumps_parts((args, kwargs), spill)
    except ForeignFuture:
        raise
    except Exception as exc:
        parts = [(f"argument {i}", arg) for i, arg in enumerate(args)]
        parts += [(f"keyword argument {name!r}", arg) for name, arg in kwargs.items()]
        for where, obj in parts:
            try:
                _dumps(obj)
            except Exception as inner:
                raise SerializationError(
                    f"cannot pickle {where} ({type(obj).__name__}: {_describe(obj)}): "
                    f"{type(inner).__name__}: {inner}. Pass something picklable, "
                    "e.g. a path instead of an open file, or create it inside the task"
                ) from inner
        raise SerializationError(f"cannot pickle the arguments: {type(exc).__name__}: "
                                 f"{exc}") from exc


SPLIT = 0x4A  # b"J": some buffers travel as several frames (``split_frames``)


def split_frames(frames: List[Any], max_frame: int) -> List[Any]:
    """``[pickle, *buffers]`` with each buffer over ``max_frame`` cut into frames under it.

    The first frame then starts with ``b"J"``, a JSON list of ``[buffer index, parts]`` and
    a newline; ``loads_args`` joins the parts again (into writable memory)."""
    out, plan = [frames[0]], []
    for index, buffer in enumerate(frames[1:], start=1):
        view = memoryview(buffer).cast("B")
        if view.nbytes <= max_frame:
            out.append(buffer)
            continue
        parts = [view[at:at + max_frame] for at in range(0, view.nbytes, max_frame)]
        plan.append([index, len(parts)])
        out.extend(parts)
    if plan:
        out[0] = b"J" + json.dumps(plan).encode() + b"\n" + bytes(frames[0])
    return out


def _join_frames(data: Any, frames: Sequence[Any]) -> Tuple[Any, List[Any]]:
    view = memoryview(data)
    end = bytes(view[:16 + 16 * len(frames)]).index(b"\n")
    plan = dict(map(tuple, json.loads(bytes(view[1:end]))))
    buffers: List[Any] = []
    at, index = 0, 1
    while at < len(frames):
        count = plan.get(index, 1)
        if count == 1:
            buffers.append(frames[at])
        else:
            buffers.append(bytearray().join(frames[at:at + count]))
        at += count
        index += 1
    return view[end + 1:], buffers


def loads_args(data: Any, buffers: Sequence[Any] = ()) -> Tuple[Tuple[Any, ...],
                                                                Dict[str, Any]]:
    if data[0] == MARK:  # large buffers in shared memory (embedded mode)
        data, buffers = unspill(data, buffers)
    elif data[0] == SPLIT:  # buffers larger than the broker's frame cap, in parts
        data, buffers = _join_frames(data, buffers)
    args, kwargs = pickle.loads(data, buffers=buffers)
    return args, kwargs


def loads_function(data: Any) -> Callable[..., Any]:
    fn: Callable[..., Any] = _loads_code(data)
    return fn


def _describe(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def dumps_result(value: Any, spill: Optional[Callable[[List[Any]], List[Any]]] = None
                 ) -> List[Any]:
    """A task's return value as ``[pickle, *buffers]`` (large buffers out of band, as for
    arguments: a large ``bytes`` or a numpy array is not copied into the pickle), or raise
    SerializationError naming its type.  ``spill``: the embedded node's shared memory."""
    try:
        if type(value) in _SIMPLE:
            return [_fast_dumps(value)]
        if type(value) is bytes and len(value) >= OUT_OF_BAND_MIN:
            value = _LargeBytes(value)
        return _dumps_parts(value, spill, snapshot=False)
    except BaseException as exc:  # an exit inside __reduce__ is a pickling failure too
        raise SerializationError(
            f"cannot pickle the result ({type(value).__name__}: {_describe(value)}): "
            f"{type(exc).__name__}: {exc}. Return something picklable"
        ) from None


def dumps_error(exc: BaseException) -> bytes:
    """Pickle an exception with its formatted traceback; fall back to a SerializationError."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        return _dumps((exc, tb))
    except Exception as inner:
        error = SerializationError(
            f"the task raised {type(exc).__name__}: {exc!s:.200}, which cannot be pickled "
            f"({type(inner).__name__}: {inner})"
        )
        return _dumps((error, tb))


def loads_result(status: str, frames: Sequence[Any],
                 passthrough: Tuple[Type[BaseException], ...] = (),
                 spill_dir: Optional[str] = None, where: str = "on the client"
                 ) -> Tuple[bool, Any]:
    """Unpickle a result's frames: (True, value) or (False, exception with remote cause).

    ``passthrough`` names exceptions to let through (a user thread unpickling its own
    result lets Ctrl-C through; it is not the pickle's fault).  ``spill_dir``: the embedded
    node's shared-memory directory, the only place a result's buffers may be read from."""
    try:
        data, buffers = frames[0], list(frames[1:])
        if status == "finished" and data[0] == SPLIT:  # buffers over the frame cap
            data, buffers = _join_frames(data, buffers)
        if status == "finished" and data[0] == MARK:  # buffers in shared memory
            if spill_dir is None:
                raise ValueError("a result in shared memory, but this client has none")
            data, buffers = unspill(data, buffers,
                                    inside=spill_dir if where == "on the client" else None)
        obj = pickle.loads(data, buffers=buffers)
    except passthrough:
        raise
    except BaseException as exc:  # a raise or sys.exit inside __reduce__ fails one future
        what = "result" if status == "finished" else "error"
        error = SerializationError(
            f"cannot unpickle the task's {what} {where}: {type(exc).__name__}: {exc}. "
            "Is the module that defines it importable here?"
        )
        return False, error
    if status == "finished":
        return True, obj
    error, tb = obj
    error.__cause__ = RemoteTraceback(tb)
    return False, error


def dumps_call(fn: Callable[..., Any], args: Tuple[Any, ...]) -> bytes:
    """Pickle an initializer and its arguments."""
    try:
        return _dumps_code((fn, args))
    except Exception as exc:
        raise SerializationError(
            f"cannot pickle the initializer or initargs: {type(exc).__name__}: {exc}"
        ) from None


def loads_call(data: Any) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
    fn, args = _loads_code(data)
    return fn, args


def funcname(fn: Any) -> str:
    """The name part of a default key: ``__name__`` without ``<>``, a partial's inner name."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        name = type(fn).__name__
    return name.replace("<", "").replace(">", "")


def pure_token(fn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> str:
    """32 hex digits identifying a call by content, for ``pure=True`` keys."""
    digest = hashlib.sha256()
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if module and qualname and module != "__main__" and "<" not in qualname:
        digest.update(f"{module}.{qualname}".encode())
    else:
        digest.update(_dumps(fn))
    buf = io.BytesIO()
    cloudpickle.CloudPickler(buf, protocol=PICKLE_PROTOCOL).dump(
        (args, sorted(kwargs.items()))
    )
    digest.update(buf.getvalue())
    return digest.hexdigest()[:32]
