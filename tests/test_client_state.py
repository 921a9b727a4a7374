"""ClientState without sockets: a result handed straight to a thread waiting in result().

The I/O side is a recorder (``post``, ``_hand_back``); what the completion thread would do
with a handed-back result is done by calling ``complete`` as it does.  Races are forced
with a lock that holds one chosen thread at the door.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from typing import Any, List

import pytest

from conftest import ROOT, wait_until
from zmqexec.client.items import Cancel, Results
from zmqexec.client.state import ClientState
from zmqexec.wire.records import SubmitRow
from zmqexec.client.future import Future


class DoorLock:
    """A lock that keeps one chosen thread waiting at the door until ``open()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._door = threading.Event()
        self._door.set()
        self.held: Any = None
        self.arrivals = threading.Semaphore(0)  # one per time the held thread is stopped

    def hold(self, thread: threading.Thread) -> None:
        self.held = thread
        self._door.clear()

    def open(self) -> None:
        self._door.set()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if threading.current_thread() is self.held:
            self.arrivals.release()
            self._door.wait(10)
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Outlet:
    """The thread that owns the connection, reduced to lists: what was posted to it and
    what it was given for the completion thread.  A cancel is answered at once, as the
    owner thread does for a submit that has not left the client yet."""

    def __init__(self) -> None:
        self.posted: List[Any] = []
        self.handed_back: List[Any] = []
        self.io_thread = threading.Thread(target=lambda: None)  # (never the caller)
        self.state: Any = None

    def post(self, command: Any) -> None:
        self.posted.append(command)
        if isinstance(command, Cancel):
            for kw in command.request.kws:
                command.request.answer(kw, True, self.state.take_cancelled(kw), self.defer)

    def defer(self, completion: Any) -> None:
        self.handed_back.append(completion)


class State(ClientState):
    """A ClientState whose lock can hold one thread at the door."""

    def __init__(self) -> None:
        self.outlet_lists = Outlet()
        super().__init__(self.outlet_lists)
        self.outlet_lists.state = self
        self.lock = DoorLock()  # type: ignore[assignment]

    def completion_thread_turn(self) -> None:
        while self.outlet_lists.handed_back:
            self.complete(self.outlet_lists.handed_back.pop(0))


class Owner:
    """What a Future needs of its executor here: ``_client``."""

    def __init__(self, client: State) -> None:
        self._client = client
        self._shutdown = False

    def _check_usable(self) -> None:
        pass


def submit(state: State, kw: str) -> Future:
    row = SubmitRow(kw, 0, 3, 0, "fn", "", 1)
    return state.submit(Future._new(kw, Owner(state)), row, [b"a"])


def result_row(kw: str, value: Any):
    return [[kw, "finished", 1, None]], [pickle.dumps(value)]


def test_a_result_for_a_record_resubmitted_since_the_wait_began_is_not_stranded():
    """T1 waits for A; A is cancelled and its key submitted again as B before T1 has
    left; B's result must reach B, not T1's stale wait."""
    state = State()
    a = submit(state, "k")
    outcome: List[Any] = []

    def first_waiter():
        try:
            a.exception(timeout=10)
        except cf.CancelledError as exc:
            outcome.append(exc)

    t1 = threading.Thread(target=first_waiter)
    t1.start()
    assert wait_until(lambda: "k" in state.awaited)
    state.lock.hold(t1)  # T1 wakes from the cancel but is slow to get back in
    assert a.cancel()
    b = submit(state, "k")
    rest, frames = state.divert(*result_row("k", 42))
    assert rest == [["k", "finished", 1, None]]  # for the completion thread, as nobody waits
    state.complete(Results(rest, frames))
    assert b.result(timeout=5) == 42
    state.lock.open()
    t1.join(10)
    assert not t1.is_alive() and isinstance(outcome[0], cf.CancelledError)


def test_an_interrupt_in_the_waiting_thread_gives_the_result_back():
    state = State()
    a = submit(state, "k")
    interrupting = [True]

    class Interrupted(type(a._condition)):  # Ctrl-C as the wait returns with the result
        def wait(self, timeout=None):
            woke = super().wait(timeout)
            if interrupting[0] and state.records["k"].arrived is not None:
                raise KeyboardInterrupt
            return woke

    a._condition = Interrupted()  # (nobody waits on the future yet)
    interrupted = []

    def waiter():
        try:
            a.result(timeout=10)
        except KeyboardInterrupt:
            interrupted.append(True)

    thread = threading.Thread(target=waiter)
    thread.start()
    assert wait_until(lambda: "k" in state.awaited)
    assert state.divert(*result_row("k", 42))[0] == []
    thread.join(10)
    interrupting[0] = False
    assert interrupted and not a.done()
    state.completion_thread_turn()  # the completion thread completes it, as before
    assert a.result(timeout=5) == 42


def test_result_called_while_this_thread_holds_the_state_lock_does_not_deadlock():
    """As from a finalizer that the garbage collector runs inside the lock's holder."""
    state = State()
    state.lock = threading.Lock()  # type: ignore[assignment]
    a = submit(state, "k")

    def body():
        with state.lock:
            with pytest.raises(cf.TimeoutError):
                a.result(timeout=0.1)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()


@pytest.mark.skipif(not hasattr(os, "kill"), reason="needs signals")
def test_ctrl_c_while_result_unpickles_reaches_the_caller_and_the_future_completes(tmp_path):
    script = tmp_path / "interrupt.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, time
        from zmqexec import ZMQExecutor

        def rebuild():  # runs where the result is unpickled: Ctrl-C, the first time
            if not os.environ.get("INTERRUPTED"):  # (process-wide: globals of a function
                os.environ["INTERRUPTED"] = "1"  # from __main__ travel by value)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the signal's KeyboardInterrupt lands in here
            return 42

        class Value:
            def __reduce__(self):
                return (rebuild, ())

        def task(gate):  # returns once the caller is about to wait in result()
            while not os.path.exists(gate):
                time.sleep(0.005)
            return Value()

        if __name__ == "__main__":
            with ZMQExecutor(max_workers=1) as ex:
                fut = ex.submit(task, sys.argv[1])
                open(sys.argv[1], "w").close()
                try:
                    print("returned", fut.result(timeout=30))
                except KeyboardInterrupt:
                    print("interrupted")
                print("then", fut.result(timeout=30), fut.status)
    """))
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "gate")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["interrupted", "then 42 finished"], out.stdout


@pytest.mark.skipif(not hasattr(os, "kill"), reason="needs signals")
def test_ctrl_c_while_the_waiter_takes_the_result_hands_it_back(tmp_path):
    """The waiter is held at the state lock while it takes the handed-over result, and
    Ctrl-C arrives then: the interrupt must reach the caller and the result must go back
    to the completion thread, not stay unread. Run in a subprocess: the signal goes to
    the main thread, which here is the waiter."""
    script = tmp_path / "held.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, threading
        sys.path.insert(0, sys.argv[1])
        from test_client_state import State, submit, result_row, wait_until

        state = State()
        a = submit(state, "k")

        def interrupter():
            assert wait_until(lambda: "k" in state.awaited)
            state.lock.hold(threading.main_thread())
            state.divert(*result_row("k", 42))  # wakes the waiter, held at the door
            assert state.lock.arrivals.acquire(timeout=10)
            os.kill(os.getpid(), signal.SIGINT)
            # the interrupt leaves the door; cleaning up, the waiter comes back to it
            assert state.lock.arrivals.acquire(timeout=10)
            state.lock.open()

        threading.Thread(target=interrupter).start()
        try:
            print("returned", a.result(timeout=10))
        except KeyboardInterrupt:
            print("interrupted")
        # no second waiting result() call: it would find a result left behind, hiding
        # the loss; done() says whether the completion thread's turn completed it
        state.completion_thread_turn()
        print("then", a.done() and a.result(timeout=0))
    """))
    out = subprocess.run([sys.executable, str(script), os.path.dirname(__file__)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["interrupted", "then 42"], out.stdout
