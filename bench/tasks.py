"""Task functions of the benchmark, importable as ``bench.tasks``.

Why a module of their own: an importable function is pickled by reference (module and
name), which is the cheap, common case.  ``bench/__main__.py`` and ``bench/memprobe.py``
also execute this very file into their own ``__main__`` namespace (see ``main_copies``),
so the same code exists once more as functions defined in the running script, which
cloudpickle must pickle by value: the other common case, measured separately.

Only the standard library is imported here, so executing the file again is harmless.
"""
import ast
import os
import time

NAMES = ("noop", "identity", "total", "sleep", "size_of", "wait_file", "hold")


def noop():
    """The empty task: measures everything but the work."""
    return None


def identity(x):
    """One map item in, the same item out."""
    return x


def total(*values):
    """Many results in, their sum out (a fan-in)."""
    return sum(values)


def sleep(seconds, payload=None):
    """A task that takes time but no CPU (fan-out, warming).  ``payload`` is ignored: a
    small one of the kind a workload sends makes each worker import what unpickling it
    needs (numpy) before the measurement."""
    time.sleep(seconds)
    return seconds


def size_of(obj):
    """``nbytes`` of an array, ``len()`` of bytes: proves the payload arrived whole."""
    nbytes = getattr(obj, "nbytes", None)
    return len(obj) if nbytes is None else int(nbytes)


def wait_file(path, timeout):
    """Block until ``path`` exists (at most ``timeout`` s): keeps workers busy so that
    later tasks stay queued for the memory workload."""
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)
    return True


def hold(started, path, timeout):
    """Create the file ``started``, then block like ``wait_file``: keeps one worker busy,
    and tells the benchmark that it does, so that later tasks stay queued (cancel
    workload)."""
    open(started, "w").close()
    return wait_file(path, timeout)


class TaskSet:
    """The task functions of one namespace (this module, or a script's ``__main__``)."""

    def __init__(self, namespace, origin):
        self.origin = origin
        for name in NAMES:
            setattr(self, name, namespace[name])


def imported():
    """The importable functions (pickled by reference)."""
    return TaskSet(globals(), "bench.tasks")


def main_copies(main_globals):
    """Define this file's task functions again in ``main_globals`` (the running script's
    globals) and return them: their ``__module__`` is then that script's ``__name__``.

    Only the imports and the functions in ``NAMES`` are executed there, taken from this
    file's source, so both sets are the same code.
    """
    with open(__file__) as f:
        tree = ast.parse(f.read(), __file__)
    tree.body = [node for node in tree.body
                 if isinstance(node, (ast.Import, ast.ImportFrom))
                 or (isinstance(node, ast.FunctionDef) and node.name in NAMES)]
    exec(compile(tree, __file__, "exec"), main_globals)
    if main_globals["noop"].__module__ != main_globals["__name__"]:
        raise RuntimeError("the __main__ copies of the task functions are not in __main__")
    return TaskSet(main_globals, f"{main_globals['__name__']} (defined in the script)")
