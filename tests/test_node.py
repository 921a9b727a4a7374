"""The embedded node: task processes from a zygote, the client's context at submit time,
max_tasks_per_child, and start methods as ProcessPoolExecutor takes them."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
from conftest import (ROOT, Cluster, a_stopped_task_process_holds_up_nothing,
                      room_for_open_files, under_open_files_limit)

from zmqexec import ZMQExecutor


def probe_context():
    import node_probe_module  # only on a sys.path entry added after the executor started

    return os.getcwd(), os.environ.get("ZMQEXEC_PROBE"), node_probe_module.VALUE


def own_pid(_=None):
    return os.getpid()


def pool_in_a_task():
    import concurrent.futures

    with concurrent.futures.ProcessPoolExecutor(1) as pool:
        return pool.submit(pow, 2, 5).result(timeout=60)


def test_task_processes_see_sys_path_cwd_and_environment_as_at_submit(tmp_path, monkeypatch):
    """As with ProcessPoolExecutor, whose workers fork lazily: a module directory added
    to sys.path, a new working directory and a variable set after the executor started
    are what its tasks see."""
    with ZMQExecutor(1) as ex:
        assert ex.submit(own_pid).result(timeout=30)  # task processes exist already
        (tmp_path / "node_probe_module.py").write_text("VALUE = 42\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("ZMQEXEC_PROBE", "set after start")
        cwd, env, value = ex.submit(probe_context).result(timeout=30)
        assert (cwd, env, value) == (str(tmp_path), "set after start", 42)
        monkeypatch.delenv("ZMQEXEC_PROBE")
        assert ex.submit(probe_context).result(timeout=30)[1] is None


def test_max_tasks_per_child_replaces_a_task_process_after_that_many_tasks():
    with ZMQExecutor(1, max_tasks_per_child=2) as ex:
        pids = [ex.submit(own_pid).result(timeout=30) for _ in range(6)]
        assert [pids.count(pid) for pid in dict.fromkeys(pids)] == [2, 2, 2], pids
        burst = list(ex.map(own_pid, range(10), timeout=60))
        assert max(burst.count(pid) for pid in burst) <= 2, burst


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError),
                                          (1.5, TypeError), ("2", TypeError)])
def test_max_tasks_per_child_takes_a_positive_int(value, error):
    with pytest.raises(error):
        ZMQExecutor(1, max_tasks_per_child=value)


def test_max_tasks_per_child_refuses_a_fork_context_as_the_stdlib_does():
    with pytest.raises(ValueError, match="incompatible with the 'fork'"):
        ZMQExecutor(1, mp_context=multiprocessing.get_context("fork"), max_tasks_per_child=2)


def test_a_spawn_context_starts_task_processes_from_a_fresh_interpreter():
    script = textwrap.dedent("""
        import multiprocessing, os, sys
        from zmqexec import ZMQExecutor
        sys.marker = "client"
        def marker():
            import sys
            return getattr(sys, "marker", None)
        with ZMQExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
            print(ex.submit(marker).result(timeout=60))
        with ZMQExecutor(1) as ex:
            print(ex.submit(marker).result(timeout=60))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    # by value, marker runs in the task process: forked ones inherit sys.marker
    assert out.stdout.split() == ["None", "client"]


ROOT_OF = textwrap.dedent("""
    import os, sys, threading
    from zmqexec import ZMQExecutor
    if sys.argv[1] == "threads":
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
    with ZMQExecutor(1) as ex:
        ex.submit(pow, 2, 2).result(timeout=60)
        zygote = ex._io.zygote.pid
        with open(f"/proc/{zygote}/stat") as f:
            root = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{root}/cmdline", "rb") as f:
            print(b" ".join(f.read().split(b"\\0")).decode())
""")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
@pytest.mark.parametrize("threads", ["none", "threads"])
def test_task_processes_are_never_forked_from_a_process_whose_threads_run(threads):
    """A single-threaded client forks its root zygote; one whose threads already run
    starts it by exec (so nothing is ever forked from a threaded process)."""
    out = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", ROOT_OF,
                          threads], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert ("zmqexec.agent.zygote" in out.stdout) == (threads == "threads"), out.stdout


MANAGER_IN_A_TASK = textwrap.dedent("""
    import multiprocessing, sys, threading
    from zmqexec import ZMQExecutor

    def set_it(event):
        event.set()
        return "set"

    if __name__ == "__main__":
        if sys.argv[1] == "threads":  # the root zygote is then started by exec
            stop = threading.Event()
            threading.Thread(target=stop.wait, daemon=True).start()
        with multiprocessing.get_context("spawn").Manager() as manager:
            event = manager.Event()
            with ZMQExecutor(1) as ex:
                print(ex.submit(set_it, event).result(timeout=60), event.is_set())
""")


@pytest.mark.parametrize("threads", ["none", "threads"])
def test_a_task_may_use_a_manager_of_its_client(tmp_path, threads):
    """Task processes carry the client's authkey, as ProcessPoolExecutor's workers do, so
    a proxy of the client's multiprocessing manager works in a task, whether the root
    zygote was forked or started by exec."""
    script = tmp_path / "manager_in_a_task.py"
    script.write_text(MANAGER_IN_A_TASK)
    out = subprocess.run([sys.executable, str(script), threads], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["set", "True"], out.stdout


def test_a_task_may_start_processes_of_its_own(executor):
    """Task processes are not daemonic: a task may use a process pool, as it can inside
    a ProcessPoolExecutor."""
    assert executor.submit(pool_in_a_task).result(timeout=120) == 32


def test_remote_mode_leaves_start_options_to_the_agents():
    cluster = Cluster(agents=1, nprocs=1, agent_args=("--max-tasks-per-child", "2"))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ex = ZMQExecutor(address=cluster.address, max_tasks_per_child=3)
        assert any("belong to its agents" in str(w.message) for w in caught)
        with ex:
            pids = [ex.submit(os.getpid).result(timeout=60) for _ in range(4)]
        assert [pids.count(pid) for pid in dict.fromkeys(pids)] == [2, 2], pids
    finally:
        cluster.close()


SIGTERM_CLIENT = textwrap.dedent("""
    import os, signal, sys, time
    from zmqexec import ZMQExecutor
    marker = sys.argv[1]
    def handler(signum, frame):  # the client's own: never to run in a zygote
        open(marker, "a").write(f"{os.getpid()}\\n")
    signal.signal(signal.SIGTERM, handler)
    with ZMQExecutor(1) as ex:
        assert ex.submit(pow, 2, 2).result(timeout=60) == 4
        zygote = ex._io.zygote.pid
        os.kill(zygote, signal.SIGTERM)
        end = time.monotonic() + 30
        while ex._io.zygote.pid == zygote and time.monotonic() < end:
            time.sleep(0.01)
        assert ex.submit(pow, 2, 3).result(timeout=60) == 8
        print(zygote, ex._io.zygote.pid)
""")


def test_a_zygote_does_not_run_the_clients_signal_handlers(tmp_path):
    """SIGTERM ends a zygote (which is then replaced) instead of running the handler the
    client installed before the zygote was forked from it."""
    marker = tmp_path / "handled"
    out = subprocess.run([sys.executable, "-c", SIGTERM_CLIENT, str(marker)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    old, new = out.stdout.split()
    assert old != new and not marker.exists()


@pytest.mark.skipif(not room_for_open_files(2048), reason="hard limit on open files below 2048")
def test_many_task_processes_fit_under_a_low_soft_limit_on_open_files():
    """Each task process costs the client three descriptors: 48 of them pass a soft limit
    of 128, which the executor raises (up to the hard limit) rather than fail."""
    code = textwrap.dedent("""
        import resource
        from zmqexec import ZMQExecutor
        with ZMQExecutor(48) as ex:
            ex.wait_for_workers(48, timeout=60)
            print(sum(ex.map(abs, range(-100, 0), timeout=60)), flush=True)
        print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 128)
    """)
    out = subprocess.run(under_open_files_limit(128, [sys.executable, "-c", code]),
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["5050", "True"], out.stdout


def test_a_stopped_task_process_never_blocks_the_node():
    """A batch the node cannot write whole to a stopped task process waits in the node,
    which goes on: that task's timeout still fires."""
    with ZMQExecutor(1) as ex:
        a_stopped_task_process_holds_up_nothing(ex, ex.submit(own_pid).result(timeout=30))
