"""Large results travel out of band: a ``bytes`` or a numpy array returned by a task is not
copied into a pickle, is cut under the broker's frame cap on the wire, and in embedded mode
comes back through shared memory (when there is room)."""
from __future__ import annotations

import gc
import mmap
import os
import subprocess
import sys

import cloudpickle
import numpy as np
import pytest

from conftest import Cluster, wait_until
from zmqexec import ZMQExecutor
from zmqexec.wire import shm

cloudpickle.register_pickle_by_value(sys.modules[__name__])
TIMEOUT = 120
MIB = 1 << 20


def big_bytes(n: int) -> bytes:
    return bytes(range(256)) * (n // 256)


def big_array(n: int) -> "np.ndarray":
    return np.arange(n // 8, dtype=np.int64)


def in_band(n: int) -> list:
    return [b"x" * (n // 2), b"y" * (n // 2)]  # bytes inside a list pickle in band


def mapped(array: "np.ndarray") -> bool:
    """Whether the array's memory is a mapped file (shared memory), not a copy."""
    base = array.base
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "obj", None) if isinstance(base, memoryview) else \
            getattr(base, "base", None)
    return isinstance(base, mmap.mmap)


@pytest.mark.parametrize("mode", ["embedded", "remote"])
def test_a_300_mib_result_arrives(mode):
    cluster = Cluster(agents=1, nprocs=1) if mode == "remote" else None
    try:
        with ZMQExecutor(1) if cluster is None else ZMQExecutor(address=cluster.address) as ex:
            data = ex.submit(big_bytes, 300 * MIB).result(timeout=TIMEOUT)
            assert len(data) == 300 * MIB and data[:256] == bytes(range(256))
            assert data[-1] == 255
            del data
            array = ex.submit(big_array, 300 * MIB).result(timeout=TIMEOUT)
            assert array.nbytes == 300 * MIB and int(array[-1]) == 300 * MIB // 8 - 1
            if mode == "embedded" and shm.has_room(ex._io.spill.dir, 300 * MIB):
                assert mapped(array)  # it came through shared memory
            array[0] = 7  # a result is the caller's to change
    finally:
        if cluster is not None:
            cluster.close()


def test_a_result_in_shared_memory_lives_while_held_and_leaves_no_file_behind(executor):
    """The client maps its copy, and the file stays while the node holds the result: a
    task submitted later still reads it as its argument; then it goes."""
    fut = executor.submit(big_array, 8 * MIB)
    array = fut.result(timeout=TIMEOUT)
    assert mapped(array) or not shm.has_room(executor._io.spill.dir, 8 * MIB)
    assert executor.submit(np.sum, fut).result(timeout=TIMEOUT) == sum(range(MIB))
    del fut
    gc.collect()
    assert wait_until(lambda: os.listdir(executor._io.spill.dir) == [], timeout=30)
    assert int(array.sum()) == sum(range(MIB))  # the mapping outlives the file


ATTACH = """
import sys
from zmqexec import Future, ZMQExecutor
with ZMQExecutor(address=sys.argv[1]) as client:
    print(int(Future(sys.argv[2], client=client).result(timeout=60).sum()))
"""


def test_another_process_attaches_to_a_large_result_held_in_shared_memory(executor):
    """Another program has no way into the node's directory: it gets the frames."""
    fut = executor.submit(big_array, 8 * MIB)
    assert int(fut.result(timeout=TIMEOUT).sum()) == sum(range(MIB))
    out = subprocess.run([sys.executable, "-c", ATTACH, executor.address, fut.key],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0 and out.stdout.split() == [str(sum(range(MIB)))], out.stderr


def test_without_room_in_shared_memory_a_result_stays_frames(tmp_path, monkeypatch):
    """A full /dev/shm (a container's is often 64 MiB) must mean frames, not SIGBUS."""
    spill = shm.ResultSpill()
    spill.dir = str(tmp_path)
    frames = [b"\x80pickle", memoryview(bytes(2 * MIB))]
    spilled = spill.spill(frames)
    assert spilled[0][:1] == b"M" and os.listdir(tmp_path)  # room: into a file
    monkeypatch.setattr(shm, "HEADROOM", 1 << 62)  # no room left
    assert spill.spill(frames) == frames


def test_a_spilled_result_outside_the_clients_directory_is_refused(tmp_path):
    """A result's frames name files; only the client's own directory may be read."""
    from zmqexec.wire import serialization as S

    outside = tmp_path / "elsewhere"
    outside.write_bytes(bytes(2 * MIB))
    frames = [b"M[1]\n" + S.dumps_result(b"")[0], str(outside).encode()]
    ok, error = S.loads_result("finished", frames, spill_dir=str(tmp_path / "mine"))
    assert not ok and "outside this client's directory" in str(error)
    assert outside.exists()


def test_an_in_band_result_over_the_frame_cap_says_what_to_do():
    cluster = Cluster(agents=1, nprocs=1, broker_args=("--max-frame", str(4 * MIB)))
    try:
        with ZMQExecutor(address=cluster.address) as ex:
            assert len(ex.submit(big_bytes, 16 * MIB).result(timeout=TIMEOUT)) == 16 * MIB
            with pytest.raises(Exception, match="in band, over the broker's cap"):
                ex.submit(in_band, 16 * MIB).result(timeout=TIMEOUT)
    finally:
        cluster.close()
