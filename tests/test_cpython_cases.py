"""CPython's own test cases for concurrent.futures executors, run against ZMQExecutor.

ZMQExecutor is meant to replace ProcessPoolExecutor without changes to the code that
uses it: ``submit``, ``map``, ``wait``, ``as_completed``, ``shutdown``, ``with`` and the
initializer should behave as they do there.  The most exact statement of that behaviour
is the standard library's own test suite, so its executor cases run here, unchanged
where possible, against an embedded ``ZMQExecutor(max_workers)``.  They are imported from
the running Python's ``test`` package (``test.test_concurrent_futures``: one module up to
3.11, a package from 3.12); a Python installed without it skips this module.

What differs from how CPython runs them:

- ``executor_type`` is ZMQExecutor.  Its ``_broken`` attribute (which the
  failing-initializer case polls, as it does on both stdlib executors) is the executor's
  broken state.
- Cases that start a fresh interpreter with a script import ZMQExecutor from zmqexec
  where the script imports the executor from concurrent.futures; nothing else in the
  script changes.  ``test_cancel_futures_wait_false`` (a ThreadPoolExecutor case, since
  its script hangs with ProcessPoolExecutor) runs this way too, where its version
  accepts a task that never started (Python 3.10's requires that it started).
- ``test_cancel_futures`` first waits for the executor's task processes (see there).
- ``test_traceback`` accepts ``zmqexec.RemoteTraceback`` as the cause where it checks
  for ProcessPoolExecutor's private ``_RemoteTraceback``; its other checks are as written.
- The failing initializer is reported on the ``zmqexec`` logger at ERROR level, where
  the stdlib executors log it on ``concurrent.futures`` at CRITICAL.
- ``test_context_manager_shutdown`` and ``test_shutdown_no_wait`` find the executor's
  processes as the processes below this one that it started, where CPython joins
  ProcessPoolExecutor's ``_processes`` (and its manager thread and call queue).
- CPython's per-case leak check warns about threads left running and reaps every child
  of the process; here threads a case starts must end after it (or the case fails), and
  conftest's fixture checks processes instead of reaping children zmqexec waits for.
- Cases that need an internal of ProcessPoolExecutor are skipped, each saying which.
  (CPython's deadlock cases, which expect BrokenProcessPool where a ZMQExecutor retries
  the task, and its ThreadPoolExecutor-only cases are not run.)
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import importlib
import inspect
import multiprocessing
from multiprocessing import resource_tracker
import os
import threading
import unittest
from typing import Any, Callable
from unittest import mock

import pytest

import zmqexec
from conftest import descendants, started_since, wait_until

try:
    _cases = importlib.import_module("test.test_concurrent_futures")
except ImportError:
    pytest.skip("this Python has no test.test_concurrent_futures (install the python3-test "
                "package, or a Python built with its test suite)", allow_module_level=True)
except unittest.SkipTest as exc:  # (the module skips itself, e.g. without _multiprocessing)
    pytest.skip(f"test.test_concurrent_futures skips itself here: {exc}",
                allow_module_level=True)

# Where each class lives in the package layout (3.12+); before, all are in one module.
_SUBMODULE = {
    "ExecutorMixin": "util",
    "ProcessPoolExecutorTest": "test_process_pool",
    "ProcessPoolShutdownTest": "test_shutdown",
    "ThreadPoolShutdownTest": "test_shutdown",
    "WaitTests": "test_wait",
    "AsCompletedTests": "test_as_completed",
    "InitializerMixin": "test_init",
    "FailingInitializerMixin": "test_init",
}


def _cpython(name: str) -> Any:
    """A class of CPython's test_concurrent_futures, in either layout."""
    if hasattr(_cases, "__path__"):
        module = importlib.import_module(f"{_cases.__name__}.{_SUBMODULE[name]}")
        return getattr(module, name)
    return getattr(_cases, name)


# (Module-level names here are never TestCase classes of CPython's: pytest would collect
# them and run them against the stdlib executors.)
ExecutorMixin = _cpython("ExecutorMixin")
ProcessPoolExecutorTest = _cpython("ProcessPoolExecutorTest")
ProcessPoolShutdownTest = _cpython("ProcessPoolShutdownTest")
WaitTests = _cpython("WaitTests")
AsCompletedTests = _cpython("AsCompletedTests")
InitializerMixin = _cpython("InitializerMixin")
FailingInitializerMixin = _cpython("FailingInitializerMixin")
_cancel_futures_wait_false = getattr(_cpython("ThreadPoolShutdownTest"),
                                     "test_cancel_futures_wait_false", None)

THREADS_END_TIMEOUT = 10.0
PROCESSES_END_TIMEOUT = 30.0


class ZMQExecutor(zmqexec.ZMQExecutor):
    """The executor under test, with the ``_broken`` state both stdlib executors have.

    (Named as zmqexec's: the script cases write ``executor_type.__name__`` into their
    scripts.)"""

    @property
    def _broken(self) -> Any:
        # Read under the lock that is held while the executor is marked broken and the
        # failure logged, so a case that sees it broken has seen the log record too.
        with self._client.lock:
            return self._client.broken


def _with_zmqexec(assert_python_ok: Callable[..., Any]) -> Callable[..., Any]:
    """CPython's ``assert_python_ok``, running its scripts with ZMQExecutor."""
    imports = {
        "from concurrent.futures import ZMQExecutor": "from zmqexec import ZMQExecutor",
        "from concurrent.futures import ThreadPoolExecutor":
            "from zmqexec import ZMQExecutor as ThreadPoolExecutor",
    }

    def run(*args: Any, **env: Any) -> Any:
        args = list(args)
        for i, arg in enumerate(args):
            if isinstance(arg, str):
                for stdlib, ours in imports.items():
                    arg = arg.replace(stdlib, ours)
                assert "from concurrent.futures import" not in arg, arg
                args[i] = arg
        return assert_python_ok(*args, **env)

    return run


def _skip(**reasons: str) -> Callable[[type], type]:
    """Skip the named CPython cases (those this Python has), each with its reason."""
    def decorate(cls: type) -> type:
        for name, reason in reasons.items():
            if hasattr(cls, name):
                setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))
        return cls
    return decorate


class _Case(unittest.TestCase):
    """Threads a case starts must end after it (CPython's BaseTestCase only warns)."""

    def setUp(self) -> None:
        self._threads_before = set(threading.enumerate())
        super().setUp()

    def tearDown(self) -> None:
        super().tearDown()

        def started() -> list:
            return [t for t in threading.enumerate()
                    if t not in self._threads_before and t.is_alive()]

        if not wait_until(lambda: not started(), timeout=THREADS_END_TIMEOUT):
            self.fail(f"threads still running {THREADS_END_TIMEOUT:.0f} s after the case: "
                      f"{started()}")


class ZMQExecutorMixin(ExecutorMixin):
    """Each case gets ``ZMQExecutor(worker_count)``: embedded, no start method given."""

    executor_type = ZMQExecutor

    def get_context(self) -> Any:
        # For the cases that ask for a start method of their own (a Manager, or
        # max_tasks_per_child): 'spawn', since 'fork' warns in a process with threads on
        # 3.12+ and 'forkserver' leaves its server running.  What spawn starts first, the
        # resource tracker, is stopped after the case, as CPython's test_init does.
        tracker = resource_tracker._resource_tracker
        if getattr(tracker, "_pid", None) is None:
            self.addCleanup(tracker._stop)
        return multiprocessing.get_context("spawn")


@_skip(
    test_killed_child="terminates one of ProcessPoolExecutor's _processes and expects "
                      "BrokenProcessPool",
    test_saturation="counts ProcessPoolExecutor's _processes",
    test_idle_process_reuse_one="counts ProcessPoolExecutor's _processes",
    test_idle_process_reuse_multiple="counts ProcessPoolExecutor's _processes",
    test_max_tasks_per_child="counts ProcessPoolExecutor's _processes",
    test_max_tasks_per_child_defaults_to_spawn_context="reads ProcessPoolExecutor's "
                                                       "_mp_context",
    test_python_finalization_error="fails the thread start of ProcessPoolExecutor's "
                                   "queue feeder thread and expects BrokenProcessPool",
)
class ZMQExecutorTest(ProcessPoolExecutorTest, ZMQExecutorMixin, _Case):
    """Submit, map, references, tracebacks (ProcessPoolExecutorTest and ExecutorTest)."""

    def test_traceback(self) -> None:
        with mock.patch.object(concurrent.futures.process, "_RemoteTraceback",
                               zmqexec.RemoteTraceback):
            super().test_traceback()


class ZMQExecutorWaitTest(WaitTests, ZMQExecutorMixin, _Case):
    """wait(): FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED, timeout."""


class ZMQExecutorAsCompletedTest(AsCompletedTests, ZMQExecutorMixin, _Case):
    """as_completed(): timeouts, duplicates, references, mixed with stdlib futures."""


@_skip(
    test_processes_terminate="counts ProcessPoolExecutor's _processes",
    test_del_shutdown="joins ProcessPoolExecutor's _executor_manager_thread, _processes "
                      "and _call_queue once the executor is garbage collected",
)
class ZMQExecutorShutdownTest(ProcessPoolShutdownTest, ZMQExecutorMixin, _Case):
    """shutdown(): after it, at interpreter exit, with cancel_futures, in ``with``."""

    if _cancel_futures_wait_false is not None:
        test_cancel_futures_wait_false = _cancel_futures_wait_false
        if 'b""' not in inspect.getsource(_cancel_futures_wait_false):
            test_cancel_futures_wait_false = unittest.skip(
                "this Python's version of the case requires the task to have started "
                "before shutdown(cancel_futures=True), as a ThreadPoolExecutor thread "
                "takes it at submit; later versions also accept a task that never "
                "started")(_cancel_futures_wait_false)

    def setUp(self) -> None:
        module = importlib.import_module(ProcessPoolShutdownTest.__module__)
        patch = mock.patch.object(module, "assert_python_ok",
                                  _with_zmqexec(module.assert_python_ok))
        patch.start()
        self.addCleanup(patch.stop)
        super().setUp()

    def test_cancel_futures(self) -> None:
        # CPython's case counts on some of its 50 tasks having started when shutdown
        # cancels the rest: ProcessPoolExecutor marks a future running as it enters the
        # call queue, before a process takes it.  A ZMQExecutor's future runs only once
        # a task process has it, and the processes of an executor made a moment ago are
        # not up yet (all 50 are cancelled, none runs), so the case waits for them first.
        self.executor.wait_for_workers(self.worker_count, timeout=PROCESSES_END_TIMEOUT)
        super().test_cancel_futures()

    def _assert_processes_end(self, before: set) -> None:
        """What joining ProcessPoolExecutor's ``_processes`` checks: the executor's
        processes (found as those it started below this one) all end."""
        self.assertTrue(wait_until(lambda: not started_since(before),
                                   timeout=PROCESSES_END_TIMEOUT),
                        f"processes still running: {sorted(started_since(before))}")

    def test_context_manager_shutdown(self) -> None:
        before = descendants(os.getpid())
        with self.executor_type(max_workers=5) as e:
            self.assertEqual(list(e.map(abs, range(-5, 5))),
                             [5, 4, 3, 2, 1, 0, 1, 2, 3, 4])
        self._assert_processes_end(before)

    def test_shutdown_no_wait(self) -> None:
        before = descendants(os.getpid())
        executor = self.executor_type(max_workers=5)
        res = executor.map(abs, range(-5, 5))
        executor.shutdown(wait=False)
        self._assert_processes_end(before)
        # Make sure the results were all computed before the executor got shutdown.
        assert all([r == abs(v) for r, v in zip(res, range(-5, 5), strict=True)])


class ZMQExecutorInitializerTest(InitializerMixin, ZMQExecutorMixin, _Case):
    """An initializer runs in each task process before its first task."""


class ZMQExecutorFailingInitializerTest(FailingInitializerMixin, ZMQExecutorMixin, _Case):
    """A failing initializer breaks the executor: its futures and later submits raise."""

    @contextlib.contextmanager
    def _assert_logged(self, msg: str) -> Any:
        with self.assertLogs("zmqexec", "ERROR") as cm:
            yield
        self.assertTrue(any(msg in line for line in cm.output), cm.output)

