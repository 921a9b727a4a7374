"""The zygote: a single-threaded process that forks task processes on request.

Why: a fork from a process whose threads run can deadlock the child (a lock another
thread held at the moment of the fork stays held forever in the child; Python 3.12+
warns, and 3.14's ProcessPoolExecutor left fork for it).  The embedded node is a thread,
so its task processes, and their replacements after a death, a timeout or a kill, come
from a zygote instead: a process with one thread that does nothing but fork.

A client process has one **root** zygote, shared by its executors and kept until the
process ends.  While the process is still single-threaded
(a script creating its first executor) the root is forked from it, so task processes
inherit the modules it has imported, as with the 'fork' start method; a process whose
threads already run (a second executor's first one, Jupyter) starts the root by exec
(``python -m zmqexec.agent.zygote``) instead.  Each executor asks the root for a zygote
of its own (a fork of the root: single-threaded too), which forks its task processes and
reports their deaths; so executors never share a control channel.

The control channel is a Unix stream socket; each message is one fixed-size record
``op (1 byte) | a (int64) | b (int64)``, with file descriptors attached where the op
takes them (SCM_RIGHTS):

=====  =================  ==============================================================
op     direction          meaning
=====  =================  ==============================================================
``S``  client -> zygote   fork a task process; fds: its task, result and cancel pipes
``Z``  client -> root     fork a zygote of its own for a client; fd: its control socket
``K``  client -> zygote   SIGKILL child ``a`` and its process group if it is still a
                          child (the zygote reaps, so a pid it has not reported dead, and
                          the group that pid names, cannot have been reused)
``C``  client -> zygote   remove directory (``a`` bytes of UTF-8 path follow) when the
                          client goes: an embedded node's ipc and shared memory folders
``P``  zygote -> client   the child just forked has pid ``a`` (one per S or Z, in order)
``X``  zygote -> client   child ``a`` ended; ``b`` is its exit code, or -signal
=====  =================  ==============================================================

Each task process leads a process group of its own (``runner.task_main`` makes it a
session leader), so the processes a task starts (a process pool, a subprocess) are in it.
The zygote kills a task process's whole group: when the client asks (K), when the client
goes, and when the task process dies of itself (os._exit, a segfault, a kill from
outside), so nothing a task started outlives its task process.  The group is killed
before its leader is reaped: while the dead leader is an unreaped child, its pid (the
group's id) cannot be taken by another process, so the kill cannot reach a stranger.

When the client goes (its end of the control socket closes, even by SIGKILL), the zygote
kills its children with their groups and exits; task processes also die with their
zygote, and take their groups with them (``runner._die_with_parent``).
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import List, Optional, Sequence, Set, Tuple

log = logging.getLogger(__name__)
CLIENT_CHECK = 1.0  # seconds between looks for the client, where no pidfd tells its end
RECORD = struct.Struct("!cqq")
_root: Optional["_Root"] = None
_root_lock = threading.Lock()


def single_threaded() -> bool:
    """Whether this process runs one Python thread now: the threads whose locks (the
    logging module's, a user's) a forked child could find held forever."""
    return threading.active_count() == 1


def _send(sock: socket.socket, op: bytes, a: int = 0, b: int = 0,
          fds: Sequence[int] = ()) -> None:
    data = RECORD.pack(op, a, b)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def _recv(sock: socket.socket, maxfds: int) -> Tuple[Optional[Tuple[bytes, int, int]],
                                                      List[int]]:
    """One record and its fds; (None, []) at EOF.  Reads exactly one record, so the fds
    that came with it are its own."""
    data, fds, _, _ = socket.recv_fds(sock, RECORD.size, maxfds)
    while data and len(data) < RECORD.size:  # (a stream may split a record)
        more = sock.recv(RECORD.size - len(data))
        if not more:
            return None, fds
        data += more
    if not data:
        return None, fds
    op, a, b = RECORD.unpack(data)
    return (op, a, b), fds


# ---- the zygote process -------------------------------------------------------------------
def serve(control: socket.socket, root: bool, client: Optional[int] = None) -> None:
    """Fork on request until the client goes; report each child's end (not the root's:
    its children are zygotes, each with its own client).

    The client is gone at EOF on the control socket, or when process ``client`` (a root's
    parent, by default) ends: a process forked from the client after this zygote started
    (a ProcessPoolExecutor's worker, say) holds a copy of the client's end of the socket,
    and if it outlives the client no EOF ever comes."""
    client = os.getppid() if client is None else client
    watch = _watch(client)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the client's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler the client installed
    children: Set[int] = set()
    cleanup: List[str] = []
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    if watch is not None:
        selector.register(watch, selectors.EVENT_READ)
    try:
        while True:
            events = selector.select(None if watch is not None else CLIENT_CHECK)
            if (watch is None and not _alive(client)) or \
                    any(key.fileobj == watch for key, _ in events):
                return  # the client ended
            for key, _ in events:
                if key.fileobj is control:
                    record, fds = _recv(control, 3)
                    if record is None:
                        return
                    if record[0] == b"C":
                        cleanup.append(_recv_exactly(control, record[1]).decode())
                        continue
                    if record[0] == b"A":  # the client's authkey (a root started by exec)
                        multiprocessing.current_process().authkey = \
                            _recv_exactly(control, record[1])
                        continue
                    _handle(control, record, fds, children, (selector, wake_r, wake_w, watch),
                            client)
                else:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
            _reap(control, children, report=not root)
    finally:
        for pid in children if not root else ():  # (a root's children are zygotes,
            kill_group(pid)  # each watching its own client; these are not reaped yet)
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)


def _watch(pid: int) -> Optional[int]:
    """A descriptor that polls readable once process ``pid`` ends (Linux's pidfd); None
    where there is none (then ``_alive`` is asked every CLIENT_CHECK seconds)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            break
        data += more
    return data


def _handle(control: socket.socket, record: Tuple[bytes, int, int], fds: List[int],
            children: Set[int],
            own: Tuple[selectors.BaseSelector, int, int, Optional[int]],
            client: int) -> None:
    op, a, _ = record
    if op == b"K":
        if a in children:  # not reaped: neither its pid nor its group can be another's
            kill_group(a)
        return
    if op not in (b"S", b"Z"):
        for fd in fds:
            os.close(fd)
        return
    pid = os.fork()
    if pid == 0:  # the child: a task process, or a zygote for another client
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            own[0].close()
            for own_fd in own[1:]:
                if own_fd is not None:
                    os.close(own_fd)
            control.close()
            if op == b"S":
                _task_process(fds)
            else:
                serve(socket.socket(fileno=fds[0]), root=False, client=client)
        finally:
            os._exit(0)
    for fd in fds:
        os.close(fd)
    children.add(pid)
    _send(control, b"P", pid)


def _task_process(fds: List[int]) -> None:
    from .runner import task_main  # (imported by the zygote already: forks are fast)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    task_main(Connection(fds[0], writable=False), Connection(fds[1], readable=False),
              Connection(fds[2], writable=False), os.getppid())


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal task process ``pid`` and every process of its group (what its tasks
    started), then the process itself (in case it left its group, or has not made it yet:
    it does so before any task runs, so nothing it started can be outside).

    Call it only while ``pid`` is a child not yet reaped: then neither its pid nor the
    group id it names can belong to another process."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, sig)
        except OSError:  # no such group (yet), or gone already
            pass


def _ended() -> Tuple[int, Optional[int]]:
    """A child that has ended, as (pid, None), left unreaped so that its pid still names
    its group while the group is killed; (0, None) if none.  Without ``os.waitid``
    (macOS) it is reaped at once, as (pid, status), and its group is left alone."""
    if not hasattr(os, "waitid"):
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 0, None
        return (pid, status) if pid else (0, None)
    try:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return 0, None
    return (info.si_pid, None) if info is not None else (0, None)


def _reap(control: socket.socket, children: Set[int], report: bool) -> None:
    """Report each child that ended; a task process's group goes with it (a task may
    have started processes that would otherwise linger, even after the client ends)."""
    while children:
        pid, status = _ended()
        if pid == 0:
            return
        if status is None:
            if report and pid in children:  # a task process, dead of itself or killed
                try:
                    os.killpg(pid, signal.SIGKILL)  # (its pid is not free: not reaped)
                except OSError:  # its group is empty already
                    pass
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                children.discard(pid)
                continue
        children.discard(pid)
        if report:
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            try:
                _send(control, b"X", pid, code)
            except OSError:
                return


def main() -> None:
    """``python -m zmqexec.agent.zygote FD``: a root zygote started by exec."""
    from . import runner  # noqa: F401  (task processes fork with it imported)

    serve(socket.socket(fileno=int(sys.argv[1])), root=True)


# ---- the client's side --------------------------------------------------------------------
class ZygoteLink:
    """The client's end of one zygote's control socket."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self.root: Optional["_Root"] = None  # the root that forked it
        self._buf = b""

    def fileno(self) -> int:
        return self.sock.fileno()

    def spawn(self, task_fd: int, result_fd: int, cancel_fd: int) -> None:
        """Ask for a task process on these pipe ends; its pid comes as a P record."""
        _send(self.sock, b"S", fds=(task_fd, result_fd, cancel_fd))

    def cleanup(self, path: str) -> None:
        """Have the zygote remove ``path`` if this client dies without doing so."""
        data = path.encode()
        self.sock.setblocking(True)
        try:
            _send(self.sock, b"C", len(data))
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def kill(self, pid: int) -> None:
        try:
            _send(self.sock, b"K", pid)
        except OSError:
            pass

    def read(self) -> Optional[List[Tuple[bytes, int, int]]]:
        """The records that have arrived (P and X); None at EOF (the zygote died)."""
        try:
            data = self.sock.recv(RECORD.size * 256)
        except BlockingIOError:
            return []
        if not data:
            return None
        data = self._buf + data
        whole = len(data) - len(data) % RECORD.size
        self._buf = data[whole:]
        return [RECORD.unpack_from(data, at) for at in range(0, whole, RECORD.size)]

    def close(self) -> None:
        """The zygote kills its task processes and exits."""
        self.sock.close()


class _Root:
    """A root zygote: this process's shared one, or a fresh-interpreter one of an executor."""

    def __init__(self, fresh: bool = False) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc: Optional["subprocess.Popen[bytes]"] = None
        if single_threaded() and not fresh:
            from . import runner  # noqa: F401  (task processes fork with it imported)

            pid = os.fork()
            if pid == 0:
                try:
                    ours.close()
                    serve(theirs, root=True)
                finally:
                    os._exit(0)
        else:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "zmqexec.agent.zygote", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
            pid = self.proc.pid
            # the client's authkey, which a forked root inherits: task processes may then
            # use the client's multiprocessing managers (their proxies check it)
            key = bytes(multiprocessing.current_process().authkey)
            _send(ours, b"A", len(key))
            ours.sendall(key)
        theirs.close()
        self.link = ZygoteLink(ours, pid)

    def close(self) -> None:
        """EOF on its control socket ends it; it is this process's child: reap it."""
        self.link.close()
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            return
        for _ in range(500):
            try:
                if os.waitpid(self.link.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.01)
        os.kill(self.link.pid, signal.SIGKILL)
        os.waitpid(self.link.pid, 0)


def new_zygote(fresh: bool = False) -> ZygoteLink:
    """A zygote of an executor's own, forked by this process's root zygote (which starts
    if none runs, or again if it was killed); ``fresh``: by a root started by exec for
    this executor alone, so task processes start from a fresh interpreter ('spawn' or
    'forkserver' asked for).  ``release_zygote`` when the executor is done with it."""
    global _root
    with _root_lock:
        for _ in range(2):
            if fresh:
                root = _Root(fresh=True)
            else:
                if _root is None:
                    _root = _Root()
                root = _root
            link = _ask_root(root)
            if link is not None:
                link.root = root
                return link
            root.close()  # it died: a new one once
            if root is _root:
                _root = None
    raise RuntimeError("the zygote process that forks task processes did not answer")


def _ask_root(root: "_Root") -> Optional[ZygoteLink]:
    """A new zygote from ``root``; None if the root is gone."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _send(root.link.sock, b"Z", fds=(theirs.fileno(),))
        record, _ = _recv(root.link.sock, 0)
    except OSError:
        record = None
    finally:
        theirs.close()
    if record is None or record[0] != b"P":
        ours.close()
        return None
    ours.setblocking(False)
    return ZygoteLink(ours, record[1])


def release_zygote(link: ZygoteLink) -> None:
    """Close an executor's zygote (its task processes go with it).  A fresh-interpreter
    root goes with its executor; the process's shared root stays for the executors to
    come, so they fork from the small image it was taken from (forking a process that
    has grown large costs a copy of its page tables per fork), and ends with the process
    (its control socket closes then)."""
    link.close()
    root = link.root
    if root is None or root is _root:
        return
    root.close()


def _close_shared_root() -> None:
    """At interpreter exit (after the executors have shut down): end the shared root."""
    global _root
    with _root_lock:
        root, _root = _root, None
    if root is not None:
        root.close()


atexit.register(_close_shared_root)


def shared_root_pid() -> Optional[int]:
    """The pid of this process's shared root zygote, if one runs."""
    root = _root
    return root.link.pid if root is not None else None


def _after_fork_in_child() -> None:
    global _root
    _root = None  # a forked client has no root of its own yet (its parent's is not its)


os.register_at_fork(after_in_child=_after_fork_in_child)

if __name__ == "__main__":
    main()
