"""``zmqexec.progress``: watch a batch of futures or a ``map`` finish.

A tqdm bar when tqdm is installed (the ``progress`` extra; ``tqdm.auto`` picks the terminal
or the Jupyter widget), else a rate-limited "n/N done" line through ``logging``, so the
library never prints.  The wrapper does one counter update per item and redraws at most
a few times a second, so it adds nothing measurable to the tasks themselves.
"""
from __future__ import annotations

import concurrent.futures
import logging
import operator
import time
from typing import Any, Iterable, Iterator, Optional

log = logging.getLogger("zmqexec.progress")  # the name users configure; not the module path


class _LogLine:
    """The fallback display: ``n/N done`` at most every ``interval`` seconds, and at the end."""

    def __init__(self, total: Optional[int], desc: str, interval: float) -> None:
        self.total, self.desc, self.interval = total, desc, interval
        self.n = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._say(now)

    def _say(self, now: float) -> None:
        of = f"/{self.total}" if self.total else ""
        rate = self.n / max(now - self.start, 1e-9)
        log.info("%s: %d%s done (%.0f/s)", self.desc, self.n, of, rate)

    def close(self) -> None:
        self._say(time.monotonic())


def progress(iterable: Iterable[Any], total: Optional[int] = None, *, desc: str = "zmqexec",
             interval: float = 1.0) -> Iterator[Any]:
    """Yield the items of ``iterable`` while showing how many are done.

    A list (or other collection) of futures is yielded in completion order, each future
    once it is done, as with ``as_completed``; any other iterable (a ``map`` iterator) is
    yielded as it comes.  ``total`` defaults to ``len()`` or ``__length_hint__``.
    ``interval`` is the seconds between log lines when tqdm is not installed.
    """
    if total is None:
        total = operator.length_hint(iterable, 0) or None
    items: Iterable[Any] = iterable
    if isinstance(iterable, (list, tuple, set, frozenset)) and iterable and all(
            isinstance(f, concurrent.futures.Future) for f in iterable):
        items = concurrent.futures.as_completed(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        bar: Any = _LogLine(total, desc, interval)
    else:
        bar = tqdm(total=total, desc=desc, unit="task")
    try:
        for item in items:
            bar.update(1)
            yield item
    finally:
        bar.close()
