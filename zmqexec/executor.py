"""``ZMQExecutor`` and its ``options()`` view: the public face of a client.

::

    submit(fn, *args) -> serialization.dumps_args -> Future._new -> ClientState.submit
      -> Node thread (embedded) or ClientIO's I/O thread (remote) -> broker ... RESULT
      -> the thread waiting in result(), or the completion thread -> Future

The executor owns the embedded cluster (``local.node.Node``) when it has no address,
and holds every Future that is not done through ``ClientState.records``, so a discarded
future still runs and its callbacks still fire, as in the stdlib.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections import deque
from typing import (Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple,
                    Union)

from .wire import deps as D
from .wire import serialization as S
from .client.io import ClientIO
from .client.cancels import cancel_futures
from .client.functions import FunctionCache
from .client.future import CANCEL_WAIT, Future, register_executor, unregister_executor
from .wire.curve import peer_keys
from .local.node import Node
from .wire.protocol import key_to_wire
from .wire.records import SubmitRow
from .client.items import Kill
from .client.modules import OwnModules
from .agent.runner import run_chunk

log = logging.getLogger(__name__)
_live: "weakref.WeakSet[ZMQExecutor]" = weakref.WeakSet()
_exiting = False
_this_pid = os.getpid()  # kept current by a fork hook: os.getpid() is a system call


def _after_fork() -> None:
    global _this_pid
    _this_pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def _python_exit() -> None:
    """At interpreter exit, finish submitted work and tear every executor down (stdlib-like).

    After a Ctrl-C the wait can look like a hang (ten tasks of a minute keep the program
    for minutes, as with the stdlib), so one line says what it waits for and how to stop."""
    global _exiting
    _exiting = True
    executors = list(_live)
    pending = sum(len(ex._client.records) for ex in executors if not ex._shutdown)
    last = getattr(sys, "last_type", None)  # the exception that ended the main module
    if pending and isinstance(last, type) and issubclass(last, KeyboardInterrupt):
        log.warning("waiting for %d submitted task%s to finish before exiting; press Ctrl-C "
                    "again to stop them", pending, "" if pending == 1 else "s")
    for executor in executors:
        executor.shutdown(wait=True)


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]


class _Submitter(concurrent.futures.Executor):
    """What an executor and its views share: options, ``map``, ``gather``."""

    _executor: "ZMQExecutor"
    _opts: Dict[str, Any]

    def options(self, *, key: Any = None, pure: Optional[bool] = None,
                priority: Optional[int] = None, retries: Optional[int] = None,
                timeout: Optional[float] = None) -> "ZMQExecutorView":
        """A view with per-task options; later values win, None keeps the default."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float)) or not timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, not {timeout!r}")
        given = dict(key=key, pure=pure, priority=priority, retries=retries, timeout=timeout)
        opts = dict(self._opts)
        opts.update({k: v for k, v in given.items() if v is not None})
        return ZMQExecutorView(self._executor, opts)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._executor._submit(fn, args, kwargs, self._opts)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: Optional[float] = None, chunksize: int = 1,
            buffersize: Optional[int] = None) -> Iterator[Any]:
        """Like ``Executor.map`` of Python 3.14 (``buffersize``) on every version."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and (not isinstance(buffersize, int) or buffersize < 1):
            raise ValueError("buffersize must be None or > 0.")
        end = None if timeout is None else time.monotonic() + timeout
        prefix = self._opts.get("key")
        args_iter: Iterator[Any] = zip(*iterables, strict=False)
        if chunksize > 1:
            flat = args_iter
            args_iter = iter(lambda: list(itertools.islice(flat, chunksize)), [])
        counter = itertools.count()

        def submit_next() -> Optional[Future]:
            args = next(args_iter, None)
            if args is None:
                return None
            opts = dict(self._opts)
            if prefix is not None:
                opts["key"] = f"{prefix}-{next(counter)}"
            if chunksize > 1:
                return self._executor._submit(run_chunk, (fn, args), {}, opts)
            return self._executor._submit(fn, args, {}, opts)

        fs: Deque[Future] = deque()
        while buffersize is None or len(fs) < buffersize:
            fut = submit_next()
            if fut is None:
                break
            fs.append(fut)
        return _MapResults(fs, submit_next if buffersize else None, end, chunksize)

    def cancel(self, futures: "Iterable[concurrent.futures.Future[Any]]"
               ) -> "List[concurrent.futures.Future[Any]]":
        """Cancel many futures in one exchange (as Dask's ``Client.cancel``): the ones
        cancelled, which will never start."""
        return cancel_futures(list(futures))

    def gather(self, futures: "Iterable[concurrent.futures.Future[Any]]", *,
               timeout: Optional[float] = None) -> List[Any]:
        """All results in input order; the first error in input order is raised."""
        futures = list(futures)
        end = None if timeout is None else time.monotonic() + timeout
        return [f.result(None if end is None else max(0.0, end - time.monotonic()))
                for f in futures]


class _MapResults(Iterator[Any]):
    """Results of ``map`` in order; one more submit per result taken with ``buffersize``.

    A class rather than a generator so that ``close()`` cancels the rest even before the
    first ``next()`` (a generator that never started skips its ``finally``), and so that an
    error or garbage collection cancels them too.
    """

    def __init__(self, fs: Deque[Future], more: Optional[Callable[[], Optional[Future]]],
                 end: Optional[float], chunksize: int) -> None:
        self._fs, self._more, self._end = fs, more, end
        self._chunked, self._chunksize = chunksize > 1, chunksize
        self._chunk: Iterator[Any] = iter(())

    def __next__(self) -> Any:
        try:
            return next(self._chunk)  # the common case of a chunked map: C speed
        except StopIteration:
            pass
        while True:
            if not self._fs:
                raise StopIteration
            if self._more is not None:
                nxt = self._more()
                if nxt is not None:
                    self._fs.append(nxt)
            fut = self._fs.popleft()
            try:
                value = fut.result(None if self._end is None else self._end - time.monotonic())
            except BaseException:
                self._fs.appendleft(fut)
                self.close()
                raise
            del fut  # yielded results are not referenced any more
            if not self._chunked:
                return value
            self._chunk = iter(value)
            del value
            for item in self._chunk:
                return item

    def __length_hint__(self) -> int:
        """Results still to come, as far as known (``progress`` shows it as the total)."""
        if self._more is not None:
            return 0  # buffersize: the input may be endless
        return len(self._fs) * self._chunksize

    def close(self, wait: Optional[float] = CANCEL_WAIT) -> None:
        """Cancel every result not taken yet, in one exchange (``wait``: seconds to wait
        for the answers; those that started run on)."""
        self._more = None
        if self._fs:
            fs: "List[concurrent.futures.Future[Any]]" = list(self._fs)
            self._fs.clear()
            cancel_futures(fs, wait)

    def __del__(self) -> None:
        self.close(0)  # (garbage collection must not wait for the answers)


def _check_start(mp_context: Any, max_tasks_per_child: Optional[int], embedded: bool
                 ) -> bool:
    """ProcessPoolExecutor's checks of ``mp_context`` and ``max_tasks_per_child``; True if
    task processes should start from a fresh interpreter ('spawn' or 'forkserver')."""
    if not embedded:
        if mp_context is not None or max_tasks_per_child is not None:
            warnings.warn("mp_context and max_tasks_per_child are ignored when joining a "
                          "cluster: they belong to its agents (zmqexec worker "
                          "--max-tasks-per-child N)", stacklevel=3)
        return False
    method = mp_context.get_start_method() if mp_context is not None else None
    if max_tasks_per_child is not None:
        if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
            raise TypeError("max_tasks_per_child must be an integer")
        if max_tasks_per_child <= 0:
            raise ValueError("max_tasks_per_child must be >= 1")
        if method == "fork":
            raise ValueError("max_tasks_per_child is incompatible with the 'fork' "
                             "multiprocessing start method; supply a different mp_context.")
    return method in ("spawn", "forkserver")


class ZMQExecutor(_Submitter):
    """A concurrent.futures Executor whose tasks run on zmqexec workers."""

    def __init__(self, max_workers: Optional[int] = None, mp_context: Any = None,
                 initializer: Optional[Callable[..., Any]] = None, initargs: Tuple[Any, ...] = (),
                 *, max_tasks_per_child: Optional[int] = None, address: Optional[str] = None,
                 keys: Optional[str] = None, retries: int = 3, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 10.0, broker_timeout: float = 60.0,
                 no_workers_timeout: Optional[float] = None,
                 attach_timeout: float = 5.0) -> None:
        address = address or os.environ.get("ZMQEXEC_ADDRESS") or None
        self._embedded = address is None or address == "local"
        if self._embedded:
            if max_workers is None:
                max_workers = os.cpu_count() or 1
            elif max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        elif max_workers is not None:
            raise ValueError("max_workers must be None when joining a cluster by address: "
                             "the cluster's agents decide how many task processes there are")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        fresh = _check_start(mp_context, max_tasks_per_child, self._embedded)
        if no_workers_timeout is not None and (isinstance(no_workers_timeout, bool) or
                                               not isinstance(no_workers_timeout, (int, float))
                                               or not no_workers_timeout > 0):
            raise ValueError("no_workers_timeout must be None or a number of seconds > 0")
        if keys is not None and self._embedded:
            raise ValueError("keys= is for joining a cluster by address; the embedded "
                             "cluster is reachable only by your OS user already")
        keys = keys or (None if self._embedded else os.environ.get("ZMQEXEC_KEYS") or None)
        curve = peer_keys(keys, "client") if keys else None  # KeysError says what to fix
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self._executor = self
        self._opts: Dict[str, Any] = {}
        self._retries = retries
        self._key_prefix = uuid.uuid4().hex[:16]  # random per executor, then a counter
        self._key_counter = itertools.count()
        self._blobs: Dict[str, bytes] = {}  # the initializer's (a function's: its tasks')
        self._functions = FunctionCache()
        self._names: Dict[str, str] = {}  # function name -> wire prefix of its keys
        self._init_id = ""
        # remote mode: the user's own modules travel to the workers (embedded task
        # processes see this process's sys.path instead)
        self._modules = None if self._embedded else OwnModules(self._blobs)
        if initializer is not None:
            init_blob = S.dumps_call(initializer, tuple(initargs))
            self._init_id = S.blob_id(init_blob)
            self._blobs[self._init_id] = init_blob
        self._pid = os.getpid()
        self._shutdown = False
        self._shutdown_lock = threading.Lock()
        self._workers = max_workers
        self._spill: Optional[Callable[[List[Any]], List[Any]]] = None
        self._io: Union[Node, ClientIO]
        if max_workers is not None:
            self._io = node = Node(max_workers, self._blobs, attach_timeout=attach_timeout,
                                   heartbeat_interval=heartbeat_interval,
                                   no_workers_timeout=no_workers_timeout,
                                   max_tasks_per_child=max_tasks_per_child, fresh=fresh)
            self.address = node.address
            # large arguments through shared memory: every task process is on this machine
            self._spill = node.spill.spill
        else:
            assert address is not None
            self.address = address
            self._io = ClientIO(address, self._blobs, heartbeat_interval=heartbeat_interval,
                                heartbeat_timeout=heartbeat_timeout,
                                broker_timeout=broker_timeout,
                                attach_timeout=attach_timeout,
                                no_workers_timeout=no_workers_timeout, keys=curve)
        self._client = self._io.state
        _live.add(self)
        register_executor(self)
        # An executor nobody holds any more is shut down, as the stdlib's are (a pending
        # future holds its executor, so this happens only once no work is left to wait for)
        self._collected = weakref.finalize(self, self._io.close)
        self._collected.atexit = False  # (interpreter exit shuts every executor down)

    @property
    def _max_workers(self) -> int:
        """Current slot count (dask sizes its pool from it)."""
        if self._workers is not None:
            return self._workers
        return max(1, self._io.link.slots)

    def _check_usable(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError("this ZMQExecutor belongs to the process that created it; "
                               "a forked child must create its own executor")

    def _submit(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any],
                opts: Dict[str, Any]) -> Future:
        """The one submit path (executor and views); kept lean, it runs once per task."""
        if _this_pid != self._pid:
            self._check_usable()
        if self._shutdown or self._client.broken is not None or _exiting:
            with self._shutdown_lock:
                if self._client.broken is not None:
                    raise self._client.broken
                raise RuntimeError("cannot schedule new futures after shutdown")
        fid, name, blob = self._functions.get(fn)
        if name not in self._names:
            self._names[name] = key_to_wire(f"{name}-")[:-1]
        D.collect(self._dependency)  # futures among the arguments: dependencies
        try:
            if opts:
                pure = bool(opts.get("pure"))
                key = opts.get("key")
                if key is None:  # (pure: a dependency counts by its key)
                    token = S.pure_token(fn, args, kwargs) if pure else \
                        f"{self._key_prefix}{next(self._key_counter):016x}"
                    key = f"{name}-{token}"
                retries = opts.get("retries")
                frames = S.dumps_args(args, kwargs, self._spill)
                row = SubmitRow(key_to_wire(key), int(opts.get("priority") or 0),
                                self._retries if retries is None else max(0, int(retries)),
                                int(pure), fid, self._init_id, len(frames),
                                float(opts.get("timeout") or 0.0),
                                "" if self._modules is None else self._modules.mid())
            else:  # the default: a generated key, whose wire form needs no JSON encoder
                token = f"{self._key_prefix}{next(self._key_counter):016x}"
                frames = S.dumps_args(args, kwargs, self._spill)
                row = SubmitRow(f"{self._names[name]}{token}\"", 0, self._retries, 0, fid,
                                self._init_id, len(frames), 0.0,
                                "" if self._modules is None else self._modules.mid())
        finally:
            found = D.collected()
        if found:  # the record keeps the dependencies' futures until it is settled
            row = row._replace(deps=tuple(found))
            return self._client.submit(Future._new(row.kw, self), row, frames, blob,
                                       list(found.values()))
        return self._client.submit(Future._new(row.kw, self), row, frames, blob)

    def _dependency(self, future: Any) -> str:
        """The key of a future among a task's arguments, if it is one of this broker's."""
        theirs = getattr(future.executor, "address", None)
        if isinstance(future, Future) and (future.executor is self or theirs == self.address):
            return future._kw
        raise D.ForeignFuture(f"{future!r} belongs to another broker ({theirs}), not to this "
                              f"executor's ({self.address}): pass its .result()")

    def kill(self, future: Future) -> bool:
        """Stop a running task: its task process is killed and replaced, and the future
        raises ``TaskKilledError``. A pending future is cancelled; False if already done."""
        if not isinstance(future, Future) or future.executor is not self:
            raise ValueError("kill() takes a future of this executor")
        if future.done():
            return False
        if future.cancel():
            return True
        self._io.post(Kill(future._kw))
        return True

    def wait_for_workers(self, n: int = 1, timeout: Optional[float] = None) -> None:
        """Block until the broker has at least ``n`` worker slots (processes)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.status(timeout=None if end is None else max(0.1, end - time.monotonic())
                          )["slots"] < n:
            if end is not None and time.monotonic() >= end:
                raise concurrent.futures.TimeoutError(
                    f"fewer than {n} worker slots after {timeout} s")
            time.sleep(0.05)

    def status(self, timeout: Optional[float] = 10.0) -> Dict[str, Any]:
        """The broker's status document (the schema of ``zmqexec status --json``)."""
        self._check_usable()
        doc = self._io.request_status(timeout)
        self._io.link.slots = int(doc["slots"])  # fresher than the last heartbeat
        return doc

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stdlib semantics: no new tasks; optionally cancel pending ones; optionally wait."""
        if os.getpid() != self._pid:
            return
        if wait and threading.current_thread() is self._io.completion_thread:
            raise RuntimeError("shutdown(wait=True) from a future's callback would wait for "
                               "itself; call shutdown(wait=False) there")
        with self._shutdown_lock:
            first = not self._shutdown
            self._shutdown = True
        if cancel_futures:
            with self._client.lock:
                futures = [f for rec in self._client.records.values() for f in rec.futures]
            self._client.cancel(futures, CANCEL_WAIT)  # what had not started, in one exchange
        if first:
            unregister_executor(self)
            self._collected.detach()
            self._io.close()
        if wait:
            self._io.io_thread.join()
            self._io.completion_thread.join()
            _live.discard(self)

    def __repr__(self) -> str:
        mode = "embedded" if self._embedded else "remote"
        state = "shut down" if self._shutdown else "running"
        return (f"<ZMQExecutor {mode} {state} address={self.address} "
                f"workers={self._max_workers} pending={len(self._client.records)}>")


class ZMQExecutorView(_Submitter):
    """The executor with per-task options; ``shutdown`` on a view does nothing."""

    def __init__(self, executor: ZMQExecutor, opts: Dict[str, Any]) -> None:
        self._executor = executor
        self._opts = opts

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """A view does not own the executor: nothing to shut down."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._opts.items())
        return f"<ZMQExecutorView of {self._executor!r} with {opts or 'defaults'}>"

