"""The task process on its own: batches in, one result per task out, cancels answered at once.

Driven through the agent's own handle (``handle.TaskProcess``) on a real forked process and a
real pipe, so what is checked is exactly what the agent sees.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import select
import signal
import struct
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

import pytest

from conftest import stop_process
from gates import wait_for_file
from zmqexec.wire import protocol as P
from zmqexec.wire import serialization as S
from zmqexec.agent.handle import TaskProcess
from zmqexec.wire.records import Task, TaskRow
from zmqexec.wire.pipe import PipeWriter, RecordReader, record_parts, unpack_result

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork start method")


def held(started: str, gate: str, value: Any) -> Any:
    open(started, "w").close()
    return wait_for_file(gate, value)


def wait_started(path: str) -> None:
    """Wait for a ``held`` task to say it started (fail, not hang, if it never does)."""
    wait_for_file(path, timeout=30)
    assert os.path.exists(path), "the task never started"


def pause(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def same(value: Any) -> Any:
    return value


class Driver:
    """Plays the agent: gives batches of calls and reads the results back."""

    def __init__(self) -> None:
        self.child = TaskProcess.start(multiprocessing.get_context("fork"))
        self.blobs: Dict[str, bytes] = {}
        self.count = 0

    def task(self, fn: Any, *args: Any) -> Task:
        blob = S.dumps_function(fn)
        fid = S.blob_id(blob)
        self.blobs[fid] = blob
        frames = S.dumps_args(args, {})
        self.count += 1
        kw = f'"t-{self.count}"'
        return Task(TaskRow(kw, 1, "client", fid, "", len(frames)), frames)

    def give(self, tasks: List[Task]) -> List[str]:
        """As the agent gives: without blocking, the rest whenever the pipe polls
        writable (here at once: the process reads a whole batch before it runs it)."""
        if not self.child.give(tasks, self.blobs):
            poller = select.poll()
            poller.register(self.child.out_fd, select.POLLOUT)
            end = time.monotonic() + 10
            while not self.child.flush():
                assert poller.poll(max(0.0, end - time.monotonic()) * 1000), \
                    "the task process read none of its batch for 10 s"
        return [task.kw for task in tasks]

    def results(self, count: int, timeout: float = 10, kept: Optional[List[str]] = None
                ) -> List[Tuple[str, str, Any]]:
        """The next ``count`` records; with ``kept``, "kept" answers go there instead."""
        out: List[Tuple[str, str, Any]] = []
        end = time.monotonic() + timeout
        while len(out) < count:
            assert self.child.results.poll(max(0.0, end - time.monotonic())), \
                f"only {len(out)} of {count} results within {timeout} s: {out}"
            for message in self.child.read() or []:
                kw, status, data = unpack_result(message)
                if kept is not None and status == "kept":
                    kept.append(kw)
                    continue
                value = S.loads_result(status, [bytes(d) for d in data])[1] \
                    if status not in ("dropped", "kept") else None
                out.append((kw, status, value))
        return out

    def close(self) -> None:  # as the agent stops its task processes
        self.child.proc.kill()
        self.child.proc.join(5)
        self.child.close()


@pytest.fixture
def driver():
    d = Driver()
    yield d
    d.close()


def test_a_cancel_sent_while_a_task_runs_drops_the_next_ones_not_the_running_one(driver, tmp_path):
    """The answer for a task waiting behind a long one does not wait for that task."""
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    keys = driver.give([driver.task(held, started, gate, "first"),
                        driver.task(pause, 0, "second"), driver.task(pause, 0, "third")])
    wait_started(started)
    driver.child.cancel([keys[0], keys[1]])
    # the first runs on, and says so at once; the second is dropped
    assert driver.results(2) == [(keys[0], "kept", None), (keys[1], "dropped", None)]
    open(gate, "w").close()
    assert driver.results(2) == [(keys[0], "finished", "first"), (keys[2], "finished", "third")]


def test_a_cancel_that_overtakes_its_batch_still_drops_the_task(driver, tmp_path):
    """Cancels and batches travel on two pipes: a cancel may be read before its batch.
    Here it surely is: it is read while the batch before still runs (the answer to a
    cancel sent after it on the same pipe says so), and the task it names comes first in
    the next batch, so only the kept cancel can stop it from starting."""
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    first = driver.give([driver.task(held, started, gate, "held"),
                         driver.task(pause, 0, "marker")])
    wait_started(started)
    overtaken = driver.task(pause, 0, "overtaken")
    kw = overtaken.kw
    driver.child.cancels.send_bytes(json.dumps([driver.child.batch + 1, [kw]]).encode())
    driver.child.cancel([first[1]])
    assert driver.results(1) == [(first[1], "dropped", None)]
    open(gate, "w").close()
    assert driver.results(1) == [(first[0], "finished", "held")]
    second = driver.give([overtaken, driver.task(pause, 0, "after")])
    assert driver.results(2) == [(kw, "dropped", None), (second[1], "finished", "after")]


def test_a_stale_cancel_never_drops_a_later_task_of_the_same_key(driver, tmp_path):
    """A cancel names its batch: one that arrives late, for a batch already done, is
    ignored even though the running batch has a task of the same key (a pure key given
    again), which runs."""
    first = driver.task(pause, 0, "first")
    kw = first.kw
    driver.give([first])
    assert driver.results(1) == [(kw, "finished", "first")]
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    again = driver.task(pause, 0, "again")
    keys = driver.give([driver.task(held, started, gate, "held"),
                        Task(again.row._replace(kw=kw), again.frames),
                        driver.task(pause, 0, "marker")])
    wait_started(started)
    driver.child.cancels.send_bytes(json.dumps([driver.child.batch - 1, [kw]]).encode())
    driver.child.cancel([keys[2]])  # read after the stale one: its answer says both were
    assert driver.results(1) == [(keys[2], "dropped", None)]
    open(gate, "w").close()
    assert driver.results(2) == [(keys[0], "finished", "held"), (kw, "finished", "again")]


def test_a_dropped_task_is_answered_before_any_later_result(tmp_path):
    """The agent takes results strictly in order (the first key it has no answer for)
    and "dropped" in any order: so "dropped" for a task must never come after the result
    of a task behind it. Tried many times, with cancels landing as the batch starts and
    the task process's interpreter switching threads as often as it can, where a gap
    between deciding and writing "dropped" could show."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the forked task process keeps it
    try:
        driver = Driver()
    finally:
        sys.setswitchinterval(interval)
    try:
        dropped: Set[str] = set()
        all_kept: Set[str] = set()
        for round in range(300):
            keys = driver.give([driver.task(pause, 0, "first"), driver.task(pause, 0, "mid"),
                                driver.task(pause, 0, "last")])
            driver.child.cancel(keys[:2])
            kept: List[str] = []
            got = driver.results(3, kept=kept)
            waiting = list(keys)
            for kw, status, _ in got:
                if status == "dropped":
                    waiting.remove(kw)
                    assert kw not in kept, (round, got, kept)  # one answer, exclusively
                else:
                    assert kw == waiting.pop(0), (round, got)
            dropped.update(kw for kw, st, _ in got if st == "dropped")
            all_kept.update(kept)
        assert not dropped & all_kept  # never both answers for one task
    finally:
        driver.close()


def test_a_batch_that_arrives_while_another_runs_is_run_after_it(driver):
    """The agent gives a batch only to an idle process; if one came early anyway (read
    while looking for cancels), it must be run, never taken for a cancel and lost."""
    first = driver.give([driver.task(pause, 0.05, 1), driver.task(pause, 0, 2)])
    second = driver.give([driver.task(pause, 0, 3)])
    got = driver.results(3)
    assert [(kw, status, value) for kw, status, value in got] == [
        (first[0], "finished", 1), (first[1], "finished", 2), (second[0], "finished", 3)]


def test_batches_given_the_moment_the_last_result_arrives_all_run(driver):
    """What the agent does under load: the next batch follows the last result at once."""
    for round in range(200):
        batch = [driver.task(pause, 0.0002, (round, i)) for i in range(8)]
        keys = driver.give(batch)
        got = driver.results(len(keys))
        assert [kw for kw, _, _ in got] == keys
        assert all(status == "finished" for _, status, _ in got)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reading_a_result_does_not_wake_the_task_process(driver):
    """A lone task wakes its task process once: for its batch.  Reading the result must
    not wake it again, as it did while both directions shared one socket pair (the
    kernel tells a socket's waiters that the peer may write again): one wake-up of
    another CPU more on every round trip."""
    pid = driver.child.pid

    def blocked() -> int:  # times the task process's main thread went to sleep
        with open(f"/proc/{pid}/task/{pid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
        raise AssertionError("no voluntary_ctxt_switches in /proc")

    def wait_asleep() -> None:  # in its read of the next batch
        end = time.monotonic() + 10
        while True:
            with open(f"/proc/{pid}/task/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "S":
                    return
            assert time.monotonic() < end, "the task process never waited for a batch"
            time.sleep(0.0005)

    driver.give([driver.task(same, "warm")])
    driver.results(1)
    count = 200
    before = blocked()
    for i in range(count):
        driver.give([driver.task(same, i)])
        assert driver.child.results.poll(10), "no result within 10 s"
        wait_asleep()  # so that reading the result surely finds it waiting
        assert driver.results(1)[0][2] == i
    woken = blocked() - before
    assert woken < count * 1.5, f"the task process slept {woken} times for {count} tasks"


@pytest.mark.parametrize("size", [0, 100, 16_380, 16_390, 3_000_000])
def test_results_of_any_size_reach_the_agent_whole(driver, size):
    """Small records go in one write, large ones as length then body; the agent's reader
    (``TaskProcess.read``) must see each exactly as ``Connection.send_bytes`` would frame it."""
    keys = driver.give([driver.task(pause, 0, b"r" * size), driver.task(pause, 0, "next")])
    assert driver.results(2) == [(keys[0], "finished", b"r" * size),
                                 (keys[1], "finished", "next")]


@pytest.mark.parametrize("count, key", [
    (60, lambda i: '"' + f"{i}-" + "k" * 4000 + '"'),  # long: they overflow the pipe
    (30, lambda i: P.key_to_wire(f"{i}-" + "é" * 600)),  # JSON writes each é in 6 bytes
], ids=["long", "escaped"])
def test_cancels_for_a_stopped_process_never_block_the_agent(driver, tmp_path, count, key):
    """A stopped process (SIGSTOP) reads no cancels: what the agent sends waits in the
    pipe. Each message is sized as encoded, so it fits a free 4 KiB pipe slot; those
    that would not fit are not sent (those tasks run). So the agent never stalls behind
    the process, and every task still answers once it goes on."""
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    first = driver.task(held, started, gate, "first")
    rest = []
    for i in range(count):
        task = driver.task(pause, 0, i)
        rest.append(Task(task.row._replace(kw=key(i)), task.frames))
    keys = driver.give([first, *rest])
    wait_started(started)
    stop_process(driver.child.proc.pid)
    try:
        sender = threading.Thread(target=driver.child.cancel, args=(keys[1:],), daemon=True)
        sender.start()
        sender.join(10)
        assert not sender.is_alive(), "the agent blocked writing cancels"
    finally:
        os.kill(driver.child.proc.pid, signal.SIGCONT)
    told = len(driver.child.told)
    assert told > 0
    if os.sysconf("SC_PAGE_SIZE") == 4096:  # 16 slots of 4 KiB: the pipe fills before
        assert told < count  # all are sent (bigger pages hold several messages each)
    dropped = driver.results(told)  # answered while the first task still runs
    assert {kw for kw, _, _ in dropped} == driver.child.told
    assert all(status == "dropped" for _, status, _ in dropped)
    open(gate, "w").close()
    got = driver.results(count + 1 - told)
    assert got[0] == (keys[0], "finished", "first")
    assert all(status == "finished" for _, status, _ in got)
    assert sorted(kw for kw, _, _ in dropped + got) == sorted(keys)


def test_the_record_reader_gives_every_record_whole_however_reads_cut_them():
    """Records in both length forms (4 bytes, and -1 then 8 bytes, as
    ``Connection.send_bytes`` writes huge ones), fed in reads of any size: each comes out
    once, whole and in order, the last small one included, and nothing stays behind."""
    records = [b"", b"x", bytes(range(256)) * 3, b"y" * 70_000, b"z" * 5]
    huge = b"h" * 300
    stream = b"".join(part for record in records[:3] for part in record_parts(record))
    stream += struct.pack("!i", -1) + struct.pack("!Q", len(huge)) + huge
    stream += b"".join(part for record in records[3:] for part in record_parts(record))
    expected = records[:3] + [huge] + records[3:]
    for chunk in (1, 3, 4, 11, 12, 13, 4096, len(stream)):
        reader = RecordReader()
        out: List[bytes] = []
        for at in range(0, len(stream), chunk):
            out += reader.feed(stream[at:at + chunk])
        assert out == expected, chunk
        assert reader.feed(b"") == []


def test_the_pipe_writer_never_blocks_and_keeps_every_message_whole_and_in_order():
    """With nobody reading, a pipe takes 64 KiB: the writer takes what does not fit and
    returns at once, whatever comes next waits behind it, and once the reader drains
    the pipe every message arrives whole, in order, framed as ``Connection`` frames it
    (a buffer of any kind, the 8-byte length form apart)."""
    read_fd, write_fd = os.pipe()
    try:
        writer = PipeWriter(write_fd)
        big = bytearray(os.urandom(300_000))
        messages = [b"small", memoryview(big), b"", b"after" * 5000, b"last"]
        done = threading.Event()
        sent = []

        def send_all() -> None:
            sent.extend(writer.send(m) for m in messages)
            done.set()

        threading.Thread(target=send_all, daemon=True).start()
        assert done.wait(10), "the writer blocked on a full pipe"
        assert sent == [True, False, False, False, False] and writer.waiting
        assert not writer.flush()  # still nobody reading: nothing more fits
        reader, got = RecordReader(), []
        poller = select.poll()
        poller.register(write_fd, select.POLLOUT)
        end = time.monotonic() + 10
        while writer.waiting or len(got) < len(messages):
            got += reader.feed(os.read(read_fd, 1 << 16))
            if writer.waiting and poller.poll(0):
                writer.flush()
            assert time.monotonic() < end, f"{len(got)} of {len(messages)} arrived"
        assert got == [bytes(m) for m in messages]
        os.close(read_fd)
        read_fd = -1
        with pytest.raises(BrokenPipeError):
            writer.send(b"to nobody")
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
