"""``Variable`` and ``Queue``: values and futures shared by name between the clients of one
broker (Dask's ``distributed.Variable`` and ``distributed.Queue``).

Both live at the broker (in the embedded node for ``ZMQExecutor()``), so any program that
reaches the same broker sees them.  A value is a ``zmqexec.Future`` of that broker, shared
by its key (the broker keeps the task running and its result held while a Variable or a
Queue holds it, even after the program that submitted it exited), or any other picklable
object of at most 1 MiB, held as bytes the broker never unpickles.  A key that comes back
is a new ``Future`` attached to it.

Every call is one request to the broker and waits for its answer; the broker decides
timeouts, so a ``get`` that timed out never took an item.
"""
from __future__ import annotations

import concurrent.futures
import pickle
import sys
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple, Union

from ..errors import BrokenZMQExecutor, BrokerLostError
from ..wire import protocol as P
from ..wire import serialization as S
from .future import Future, Owner, default_executor
from .items import SharedRequest

MAX_VALUE = 1 << 20  # bytes of a value held by itself
ANSWER_GRACE = 30.0  # seconds an answer may take beyond the request's own timeout

if sys.version_info >= (3, 11):
    WaitTimeout = TimeoutError
else:  # pragma: no cover - 3.10: the builtin, and the one concurrent.futures raises
    class WaitTimeout(TimeoutError, concurrent.futures.TimeoutError):
        """A Variable's or Queue's timeout ran out."""


class _Shared:
    kind = ""

    def __init__(self, name: Optional[str], client: Optional[Owner]) -> None:
        self.name = name if name is not None else f"{self.kind}-{uuid.uuid4().hex}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a {type(self).__name__} name is a non-empty str")
        self.client = client if client is not None else default_executor()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def __reduce__(self) -> Any:
        raise TypeError(f"a {type(self).__name__} does not travel in a task: pass its name "
                        f"and make a {type(self).__name__}(name) there")

    # ---- one request, one answer -------------------------------------------------------
    def _ask(self, op: str, timeout: Optional[float] = None, value: Any = None,
             has_value: bool = False, **fields: Any) -> Tuple[Dict[str, Any], List[Any]]:
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be None or >= 0")
        meta: Dict[str, Any] = {"op": op, "n": self.name, "t": timeout, **fields}
        payload: List[Any] = []
        if has_value:
            key = self._key_of(value)
            if key is not None:
                meta["k"] = key
            else:
                payload.append(_dumps(value))
        executor = self.client
        executor._check_usable()
        state = executor._client
        if state.broken is not None:
            raise state.broken
        reply: "concurrent.futures.Future[Tuple[Dict[str, Any], List[Any]]]" = \
            concurrent.futures.Future()
        meta["nf"] = len(payload)
        deadline = None if timeout is None else time.monotonic() + timeout
        state.post(SharedRequest(meta, payload, reply, deadline))
        end = None if deadline is None else deadline + ANSWER_GRACE
        while True:
            left = 1.0 if end is None else min(1.0, end - time.monotonic())
            try:
                answer, frames = reply.result(max(0.0, left))
                break
            except concurrent.futures.TimeoutError:
                if state.broken is not None:
                    raise state.broken from None
                if end is not None and time.monotonic() >= end:
                    raise BrokenZMQExecutor(
                        f"the broker did not answer a {type(self).__name__} request within "
                        f"{ANSWER_GRACE:g} s of its timeout") from None
        error = answer.get("e")
        if error:
            kind, text = error
            if kind == "TimeoutError":
                raise WaitTimeout(f"{type(self).__name__} {self.name!r}: {op[1:]} timed out "
                                  f"after {timeout} s")
            if kind == "AnswerLost":
                raise BrokerLostError(f"{type(self).__name__} {self.name!r}: {text}")
            raise ValueError(f"{type(self).__name__} {self.name!r}: {text}")
        return answer, frames

    def _key_of(self, value: Any) -> Optional[str]:
        if isinstance(value, Future):
            if value.executor is not self.client and \
                    getattr(value.executor, "address", None) != \
                    getattr(self.client, "address", None):
                raise TypeError(f"{value!r} belongs to another broker: share it there, or "
                                "pass its .result()")
            return value._kw
        if isinstance(value, concurrent.futures.Future):
            raise TypeError(f"{value!r} is not a zmqexec Future of this broker: pass its "
                            ".result() instead")
        return None

    def _values(self, answer: Dict[str, Any], frames: List[Any]) -> List[Any]:
        """The answer's values: an attached Future for a key, the object for bytes."""
        out: List[Any] = []
        at = 0
        for kind, key in answer.get("v", []):
            if kind == "k":
                out.append(Future(P.key_from_wire(key), client=self.client))
            else:
                out.append(pickle.loads(frames[at]))
                at += 1
        return out


def _dumps(value: Any) -> bytes:
    data = S.dumps_value(value)
    if len(data) > MAX_VALUE:
        raise ValueError(f"a value of {len(data)} bytes pickled is over the "
                         f"{MAX_VALUE >> 20} MiB a Variable or Queue holds: submit a task "
                         "that returns it and share its future instead")
    return data


class Variable(_Shared):
    """A value shared by name: ``set`` replaces it for every client of the broker."""

    kind = "variable"

    def __init__(self, name: Optional[str] = None, client: Optional[Owner] = None) -> None:
        super().__init__(name, client)

    def set(self, value: Any) -> None:
        """Hold ``value`` (a Future of this broker, or a picklable object up to 1 MiB);
        the old value's hold goes."""
        self._ask("vset", value=value, has_value=True)

    def get(self, timeout: Optional[float] = None) -> Any:
        """The value, waiting until the variable is set; an attached Future for a future.
        Raises TimeoutError when ``timeout`` seconds pass first."""
        answer, frames = self._ask("vget", timeout)
        return self._values(answer, frames)[0]

    def delete(self) -> None:
        """Remove the variable for every client (its hold on a future goes)."""
        self._ask("vdel")


class Queue(_Shared):
    """A FIFO of values shared by name across the clients of one broker."""

    kind = "queue"

    def __init__(self, name: Optional[str] = None, client: Optional[Owner] = None,
                 maxsize: int = 0) -> None:
        super().__init__(name, client)
        if not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError("maxsize is an int >= 0 (0: unbounded)")
        self.maxsize = maxsize

    def put(self, value: Any, timeout: Optional[float] = None) -> None:
        """Append ``value``, waiting while ``maxsize`` items are queued."""
        self._ask("qput", timeout, value=value, has_value=True, m=self.maxsize)

    def get(self, timeout: Optional[float] = None, batch: Union[bool, int] = False) -> Any:
        """The oldest item, waiting for one; ``batch=True``: every item queued now (a
        list, maybe empty); ``batch=n``: a list of n items, waiting for them."""
        if batch is True:
            count = -1
        elif batch is False:
            count = 1
        elif isinstance(batch, int) and batch > 0:
            count = batch
        else:
            raise ValueError("batch is True, False or an int > 0")
        answer, frames = self._ask("qget", timeout, m=self.maxsize, b=count)
        values = self._values(answer, frames)
        return values if batch is not False else values[0]

    def qsize(self) -> int:
        """How many items are queued now."""
        answer, _ = self._ask("qsize")
        return int(answer.get("size", 0))
