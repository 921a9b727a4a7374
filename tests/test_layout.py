"""The package's shape: exact public names, documented, small modules, picklable errors."""
from __future__ import annotations

import concurrent.futures
import os
import pickle
import re

import pytest

import zmqexec
from zmqexec import errors

PACKAGE = os.path.dirname(zmqexec.__file__)
ROOT = os.path.dirname(PACKAGE)

EXPECTED = {
    "ZMQExecutor", "ZMQExecutorView", "Future", "ZMQExecError", "BrokenZMQExecutor",
    "InitializerError", "BrokerLostError", "TaskLostError", "WorkerLostError", "KeyLostError",
    "UnknownKeyError", "KeyExistsError", "TaskTimeoutError", "TaskKilledError",
    "NoWorkersError", "SerializationError", "MessageTooLargeError", "ProtocolError",
    "RemoteTraceback", "wait", "as_completed", "FIRST_COMPLETED", "FIRST_EXCEPTION",
    "ALL_COMPLETED", "CancelledError", "TimeoutError", "BrokenExecutor", "progress",
    "__version__", "Variable", "Queue",
}


def test_all_is_exact_and_every_name_exists():
    assert set(zmqexec.__all__) == EXPECTED
    assert len(zmqexec.__all__) == len(EXPECTED)
    for name in zmqexec.__all__:
        assert hasattr(zmqexec, name), name


def test_stdlib_names_are_the_stdlib_objects():
    for name in ("wait", "as_completed", "FIRST_COMPLETED", "FIRST_EXCEPTION",
                 "ALL_COMPLETED", "CancelledError", "TimeoutError", "BrokenExecutor"):
        assert getattr(zmqexec, name) is getattr(concurrent.futures, name)


def test_every_public_name_is_documented_in_the_api_reference():
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        api = f.read()
    missing = [n for n in zmqexec.__all__
               if not re.search(rf"`{re.escape(n)}[`(.\[]", api)]
    assert not missing, f"docs/api.md does not document: {missing}"


MODULES = sorted(os.path.relpath(os.path.join(folder, name), PACKAGE)
                 for folder, _, names in os.walk(PACKAGE) for name in names
                 if name.endswith(".py"))


@pytest.mark.parametrize("name", MODULES)
def test_modules_stay_small(name):
    with open(os.path.join(PACKAGE, name)) as f:
        lines = len(f.readlines())
    assert lines <= 500, f"{name} has {lines} lines; split it by role (limit 500)"


def test_the_error_tree_matches_the_design():
    e = errors
    assert issubclass(e.BrokenZMQExecutor, concurrent.futures.BrokenExecutor)
    assert issubclass(e.InitializerError, e.BrokenZMQExecutor)
    assert issubclass(e.BrokerLostError, e.BrokenZMQExecutor)
    assert issubclass(e.WorkerLostError, e.TaskLostError)
    assert issubclass(e.KeyLostError, e.TaskLostError)
    assert issubclass(e.TaskTimeoutError, TimeoutError)
    assert issubclass(e.TaskTimeoutError, concurrent.futures.TimeoutError)
    assert issubclass(e.MessageTooLargeError, e.SerializationError)
    for name in errors.__all__:
        cls = getattr(errors, name)
        if name != "RemoteTraceback":
            assert issubclass(cls, e.ZMQExecError), name


@pytest.mark.parametrize("error", [
    errors.WorkerLostError(("k", 1), 4, "host-1", "killed by SIGKILL"),
    errors.KeyLostError("gone"), errors.UnknownKeyError("k"), errors.KeyExistsError("k"),
    errors.TaskTimeoutError("slow"), errors.SerializationError("bad"),
    errors.InitializerError("init"), errors.BrokerLostError("away"),
    errors.RemoteTraceback("Traceback ..."), errors.MessageTooLargeError("big"),
])
def test_errors_pickle_round_trip(error):
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)
    assert again.args == error.args


def test_worker_lost_error_names_key_attempts_worker_and_exit():
    err = errors.WorkerLostError("job-1", 4, "host-1", "killed by SIGSEGV")
    assert re.search(r"job-1.*4 time.*host-1.*SIGSEGV", str(err))
