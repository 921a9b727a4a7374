"""One small adapter per executor, so every workload is written once for all of them.

Why adapters: Dask's ``Client`` is not a ``concurrent.futures.Executor`` (``pure=False``,
``distributed.wait``/``as_completed``, ``Client.map`` without chunksize), and the CPU
workload needs to know which processes play which role (client, broker, agent, task
processes).  Each adapter starts a fresh executor, so only one executor is alive while
another is measured (an idle Dask scheduler runs in the client process and would steal
its GIL and CPU).
"""
import concurrent.futures as cf
import contextlib
import inspect
import logging
import os
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from . import procstat

WORKERS = 2


class Skip(Exception):
    """This executor cannot do this workload; the message says why (shown in the table)."""


class Adapter:
    """A running executor of one kind, with the few operations the workloads use."""

    key = ""     # command-line name
    label = ""   # column title
    note = ""    # what "client" means for it, etc.

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """Why this executor cannot run here (None if it can)."""
        return None

    @classmethod
    def version(cls) -> str:
        return ""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.ex: Any = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)

    @classmethod
    def buffersize_skip(cls) -> Optional[str]:
        """Why ``map(buffersize=)`` is not available (None if it is)."""
        if "buffersize" in inspect.signature(cf.ProcessPoolExecutor.map).parameters:
            return None
        return "no map(buffersize=) before Python 3.14"

    def warm(self, tasks: Any, sample: Any = None) -> None:
        """Make sure every worker process exists and has run the task functions (and has
        unpickled a ``sample`` of the workload's arguments, if given)."""
        fs = [self.submit(tasks.sleep, 0.05, sample) for _ in range(2 * WORKERS)]
        fs += [self.submit(tasks.noop) for _ in range(20)]
        self.results(fs)

    # -- work -------------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.ex.submit(fn, *args)

    def wait_all(self, fs: List[Any]) -> None:
        done, not_done = cf.wait(fs, timeout=self.timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} of {len(fs)} tasks not done "
                               f"after {self.timeout} s")

    def results(self, fs: List[Any]) -> List[Any]:
        """Every result, raising the first error (waits at most ``timeout`` in all)."""
        self.wait_all(fs)
        return [f.result(timeout=0) for f in fs]

    def as_completed(self, fs: List[Any]) -> Iterable[Any]:
        return cf.as_completed(fs, timeout=self.timeout)

    def cancel_all(self, fs: List[Any]) -> None:
        for fut in fs:
            fut.cancel()

    def cancel_each(self, fs: List[Any]) -> List[Any]:
        """``fut.cancel()`` on each future in turn: the ones it said True for."""
        return [fut for fut in fs if fut.cancel()]

    @classmethod
    def cancel_batch_skip(cls) -> Optional[str]:
        """Why there is no call that cancels many futures at once (None if there is)."""
        return "no cancel(futures)"

    def cancel_batch(self, fs: List[Any]) -> List[Any]:
        """Cancel all of ``fs`` in one call: the ones cancelled."""
        raise Skip(self.cancel_batch_skip())

    @classmethod
    def futures_as_arguments_skip(cls) -> Optional[str]:
        """Why a future cannot be another task's argument (None if it can)."""
        return "no futures as arguments"

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int,
            buffersize: Optional[int] = None) -> Iterator[Any]:
        kwargs: Dict[str, Any] = {"timeout": self.timeout, "chunksize": chunksize}
        if buffersize is not None:
            why = self.buffersize_skip()
            if why:
                raise Skip(why)
            kwargs["buffersize"] = buffersize
        return iter(self.ex.map(fn, items, **kwargs))

    def cpu_roles(self) -> Dict[str, List[int]]:
        """Pids per role, for CPU accounting."""
        return {"client": [os.getpid()], "task processes": list(self.ex._processes or ())}


class ZMQ(Adapter):
    key, label = "zmqexec", "zmqexec"
    note = ("`ZMQExecutor(max_workers=2)`, the embedded node (broker and agent state on a "
            "thread of the client: their CPU counts as the client's); task processes "
            "forked by its zygote")

    @classmethod
    def version(cls) -> str:
        import zmqexec
        return zmqexec.__version__

    def start(self) -> None:
        from zmqexec import ZMQExecutor
        self.ex = ZMQExecutor(max_workers=WORKERS)

    @classmethod
    def buffersize_skip(cls) -> Optional[str]:
        return None

    def warm(self, tasks: Any, sample: Any = None) -> None:
        self.ex.wait_for_workers(WORKERS, timeout=self.timeout)
        super().warm(tasks, sample)

    @classmethod
    def cancel_batch_skip(cls) -> Optional[str]:
        return None

    def cancel_batch(self, fs: List[Any]) -> List[Any]:
        return list(self.ex.cancel(fs))

    @classmethod
    def futures_as_arguments_skip(cls) -> Optional[str]:
        return None

    def cpu_roles(self) -> Dict[str, List[int]]:
        node = self.ex._io
        return {"client": [os.getpid()], "zygote": [node.zygote.pid],
                "task processes": list(node.processes)}


class ZMQRemote(ZMQ):
    key, label = "remote", "zmqexec remote"
    note = ("`ZMQExecutor(address=...)` with `zmqexec broker` and one `zmqexec worker "
            "--nprocs 2` started by the command line on loopback: the remote path")

    def start(self) -> None:
        import subprocess
        import sys

        from zmqexec import ZMQExecutor
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        cmd = [sys.executable, "-m", "zmqexec"]
        self.broker = subprocess.Popen([*cmd, "broker", "--bind", "tcp://127.0.0.1:0"],
                                       stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                       env=env)
        assert self.broker.stdout is not None
        address = self.broker.stdout.readline().decode().split()[-1]
        self.agent = subprocess.Popen([*cmd, "worker", address, "--nprocs", str(WORKERS)],
                                      stdin=subprocess.DEVNULL, env=env)
        self.ex = ZMQExecutor(address=address)

    def close(self) -> None:
        try:
            super().close()
        finally:
            for proc in (self.agent, self.broker):
                proc.terminate()
            for proc in (self.agent, self.broker):
                proc.wait(30)
            if self.broker.stdout is not None:
                self.broker.stdout.close()

    def cpu_roles(self) -> Dict[str, List[int]]:
        return {"client": [os.getpid()], "broker": [self.broker.pid],
                "agent": [self.agent.pid],
                "task processes": procstat.children(self.agent.pid)}


class PPE(Adapter):
    key, label = "ppe", "PPE"
    note = "`concurrent.futures.ProcessPoolExecutor(2)`, default start method"

    @classmethod
    def version(cls) -> str:
        import multiprocessing
        return f"stdlib, start method {multiprocessing.get_start_method()}"

    def start(self) -> None:
        self.ex = cf.ProcessPoolExecutor(WORKERS)


class Loky(Adapter):
    key, label = "loky", "loky"
    note = "`loky.ProcessPoolExecutor(max_workers=2)` (fresh, not the reusable one)"

    @classmethod
    def unavailable(cls) -> Optional[str]:
        try:
            import loky  # noqa: F401
        except ImportError:
            return "loky is not installed (pip install '.[bench]')"
        return None

    @classmethod
    def version(cls) -> str:
        import loky
        return loky.__version__

    def start(self) -> None:
        import loky
        self.ex = loky.ProcessPoolExecutor(max_workers=WORKERS)

    def close(self) -> None:
        self.ex.shutdown(wait=True, kill_workers=False)

    @classmethod
    def buffersize_skip(cls) -> Optional[str]:
        return "no map(buffersize=)"

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int,
            buffersize: Optional[int] = None) -> Iterator[Any]:
        if buffersize is not None:
            raise Skip(self.buffersize_skip())
        return iter(self.ex.map(fn, items, timeout=self.timeout, chunksize=chunksize))


class Dask(Adapter):
    key, label = "dask", "dask"
    note = ("`Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=True))`, "
            "`submit(..., pure=False)`; its scheduler runs in the client process, so "
            "its CPU and memory count as the client's; task processes = workers and nannies")

    @classmethod
    def unavailable(cls) -> Optional[str]:
        try:
            import distributed  # noqa: F401
        except ImportError:
            return "dask.distributed is not installed (pip install '.[bench]')"
        return None

    @classmethod
    def version(cls) -> str:
        import distributed
        return distributed.__version__

    def start(self) -> None:
        from distributed import Client, LocalCluster
        self.cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                                    host="127.0.0.1", dashboard_address=None,
                                    silence_logs=logging.CRITICAL)
        self.ex = Client(self.cluster)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ex.close(timeout=self.timeout)
        self.cluster.close(timeout=self.timeout)

    @classmethod
    def buffersize_skip(cls) -> Optional[str]:
        return "Client.map has no buffersize"

    def warm(self, tasks: Any, sample: Any = None) -> None:
        self.ex.wait_for_workers(WORKERS, timeout=self.timeout)
        super().warm(tasks, sample)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        with warnings.catch_warnings():  # "large object in the task graph": we mean it
            warnings.simplefilter("ignore", UserWarning)
            return self.ex.submit(fn, *args, pure=False)

    def wait_all(self, fs: List[Any]) -> None:
        import distributed
        distributed.wait(fs, timeout=self.timeout)

    def results(self, fs: List[Any]) -> List[Any]:
        self.wait_all(fs)
        return list(self.ex.gather(fs))

    def as_completed(self, fs: List[Any]) -> Iterable[Any]:
        import distributed
        return distributed.as_completed(fs, timeout=self.timeout)

    def cancel_all(self, fs: List[Any]) -> None:
        self.ex.cancel(fs)

    def cancel_each(self, fs: List[Any]) -> List[Any]:
        for fut in fs:  # distributed's Future.cancel() returns nothing
            fut.cancel()
        return [fut for fut in fs if fut.cancelled()]

    @classmethod
    def cancel_batch_skip(cls) -> Optional[str]:
        return None

    def cancel_batch(self, fs: List[Any]) -> List[Any]:
        self.ex.cancel(fs)
        return [fut for fut in fs if fut.cancelled()]

    @classmethod
    def futures_as_arguments_skip(cls) -> Optional[str]:
        return None

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int,
            buffersize: Optional[int] = None) -> Iterator[Any]:
        if buffersize is not None:
            raise Skip(self.buffersize_skip())
        if chunksize != 1:
            raise Skip("Client.map has no chunksize")
        fs = self.ex.map(fn, list(items), pure=False)
        return iter(self.results(fs))

    def cpu_roles(self) -> Dict[str, List[int]]:
        workers = list(self.ex.run(os.getpid).values())
        nannies = [procstat.parent(pid) for pid in workers]
        return {"client": [os.getpid()],
                "task processes": workers + [p for p in nannies if p and p != os.getpid()]}


ALL = [ZMQ, PPE, ZMQRemote, Loky, Dask]
BY_KEY = {cls.key: cls for cls in ALL}


@contextlib.contextmanager
def running(cls: type, timeout: float, tasks: Any = None,
            sample: Any = None) -> Iterator[Adapter]:
    """A started (and, given ``tasks``, warmed) executor, always shut down afterwards."""
    adapter = cls(timeout)
    adapter.start()
    try:
        if tasks is not None:
            adapter.warm(tasks, sample)
        yield adapter
    finally:
        adapter.close()
