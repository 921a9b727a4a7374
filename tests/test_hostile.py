"""Hostile input: the wire decoder under hypothesis, a live broker under 10,000+
random, truncated and out-of-order messages over a real socket, and another OS user at
an embedded executor's door."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import cloudpickle
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Cluster, zmqexec_cmd
from zmqexec import ZMQExecutor
from zmqexec.wire import protocol as P
from zmqexec.errors import ProtocolError

TIMEOUT = 30
# Agents started from the command line do not have tests/ on sys.path: ship our tasks by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
COMMANDS = sorted(P.NAMES)


def header(cmd: int, meta: object, version: int = P.PROTOCOL_VERSION) -> bytes:
    return P.MAGIC + bytes((version, cmd)) + json.dumps(meta).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner,
                                                                  max_size=4),
    max_leaves=12)
metas = st.dictionaries(st.sampled_from(["t", "r", "f", "ks", "k", "z", "role", "id", "proto",
                                         "reason", "epoch", "p"]), json_values, max_size=5)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_frames_decode_or_raise_protocol_error(frames):
    try:
        P.decode(frames)
    except ProtocolError:
        pass


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(COMMANDS), metas, st.lists(st.binary(max_size=16), max_size=5))
def test_wellformed_headers_with_random_fields_decode_or_raise_protocol_error(cmd, meta,
                                                                             payload):
    try:
        msg = P.decode([header(cmd, meta), *payload])
    except ProtocolError:
        return
    assert msg.cmd == cmd and isinstance(msg.meta, dict)


def bad_messages(rng: random.Random, n: int):
    """Random, truncated and out-of-order messages, with the reason each is bad."""
    valid = [
        P.encode(P.SUBMIT, {"f": ["f"], "t": [['"k"', 0, 0, 0, "f", "", 1]]}, [b"b", b"a"]),
        P.encode(P.RESULT, {"r": [['"k"', "finished", 1]]}, [b"x"]),
        P.encode(P.STARTED, {"ks": ['"k"']}),
        P.encode(P.RELEASE, {"ks": ['"k"']}),
    ]
    for i in range(n):
        kind = i % 6
        if kind == 0:
            yield [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(1, 4))]
        elif kind == 1:  # a valid message cut short
            frames = list(rng.choice(valid))
            cut = rng.randint(0, len(frames[0]) - 1)
            yield [frames[0][:cut], *frames[1:]]
        elif kind == 2:  # frames missing or extra
            frames = list(rng.choice(valid))
            yield frames[:1] if rng.random() < 0.5 else frames + [b"extra"]
        elif kind == 3:  # unknown command or version
            version = rng.choice([0, P.PROTOCOL_VERSION, P.PROTOCOL_VERSION + 7])
            yield [P.MAGIC + bytes((version, rng.randint(0, 255))) + b"{}"]
        elif kind == 4:  # wrong field types
            yield [header(P.SUBMIT, {"f": "x", "t": [[1, 2, 3]]})]
        else:  # fine on the wire but a role this peer does not have, or before HELLO
            yield list(rng.choice(valid))


def test_a_live_broker_survives_a_flood_of_bad_messages(tmp_path):
    n = 12_000
    log_path = tmp_path / "broker.log"
    cluster = Cluster(agents=1, nprocs=1, broker_log=str(log_path))
    try:
        address = cluster.address
        ctx = zmq.Context()
        with ZMQExecutor(address=address) as ex:
            ex.wait_for_workers(1, timeout=TIMEOUT)
            rng = random.Random(5)
            hostile = ctx.socket(zmq.DEALER)
            hostile.setsockopt(zmq.LINGER, 0)
            hostile.connect(address)
            registered = ctx.socket(zmq.DEALER)  # a client that then talks nonsense
            registered.setsockopt(zmq.LINGER, 0)
            registered.connect(address)
            registered.send_multipart(P.encode(P.HELLO, {"role": "client", "id": "bad",
                                                         "proto": P.PROTOCOL_VERSION}))
            for i, frames in enumerate(bad_messages(rng, n)):
                (registered if i % 2 else hostile).send_multipart(frames)
                if i % 1000 == 0:  # it keeps serving while the flood goes on
                    assert ex.submit(pow, 2, 5).result(timeout=TIMEOUT) == 32
            assert ex.submit(pow, 3, 3).result(timeout=TIMEOUT) == 27
            dropped = ex.status()["dropped"]
            for sock in (hostile, registered):
                sock.close()
        ctx.term()
        shown = subprocess.run(zmqexec_cmd("status", address), capture_output=True,
                               text=True, timeout=TIMEOUT)
        assert cluster.broker.poll() is None  # never crashed
    finally:
        cluster.close()
    assert sum(dropped.values()) >= n * 0.9, dropped  # each bad message counted
    assert len(dropped) >= 5, dropped  # by reason
    assert "dropped" in shown.stdout
    warnings = [line for line in log_path.read_text().splitlines() if "dropped" in line]
    assert len(warnings) < 100, len(warnings)  # logging is rate-limited
    print(f"{n} bad messages: {sum(dropped.values())} dropped, by reason {dropped}; "
          f"{len(warnings)} log lines")


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON) or
                    shutil.which("runuser") is None,
                    reason="needs root, runuser and a system python3 to act as nobody")
def test_another_os_user_cannot_reach_an_embedded_executor():
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n"
             "    s.connect(sys.argv[1])\n"
             "except OSError as exc:\n"
             "    print(type(exc).__name__)\n"
             "else:\n"
             "    print('connected')\n")
    with ZMQExecutor(1) as ex:
        path = ex.address[len("ipc://"):]
        assert ex.submit(pow, 2, 2).result(timeout=TIMEOUT) == 4
        as_root = subprocess.run([sys.executable, "-c", probe, path], capture_output=True,
                                 text=True, timeout=TIMEOUT)
        as_nobody = subprocess.run(["runuser", "-u", "nobody", "--", SYSTEM_PYTHON, "-c",
                                    probe, path], capture_output=True, text=True,
                                   timeout=TIMEOUT)
    assert as_root.stdout.strip() == "connected"  # the same user gets in
    assert as_nobody.stdout.strip() == "PermissionError", as_nobody


def big_result(n: int) -> bytes:
    return b"r" * n


def big_list_result(n: int) -> list:
    return [b"r" * n]  # bytes inside a list pickle in band


def describe(array) -> tuple:
    array[0] = 7  # joined into writable memory
    return int(array.sum()), array.flags.writeable


def test_size_caps_are_announced_and_checked_by_senders_first():
    from conftest import Cluster

    from zmqexec import MessageTooLargeError

    cap = 1 << 20
    cluster = Cluster(agents=1, nprocs=1, broker_args=("--max-frame", str(cap)))
    ctx = zmq.Context()
    try:
        with ZMQExecutor(address=cluster.address) as ex:
            ex.wait_for_workers(1, timeout=TIMEOUT)
            # a buffer over the cap travels as several frames under it
            assert ex.submit(len, b"a" * (2 * cap + 5)).result(timeout=TIMEOUT) == 2 * cap + 5
            import numpy

            array = numpy.ones(3 * cap + 3, dtype=numpy.uint8)
            assert ex.submit(describe, array).result(timeout=TIMEOUT) == (3 * cap + 9, True)
            # an in-band pickle over the cap cannot be cut: refused before sending
            with pytest.raises(MessageTooLargeError, match="over the broker's cap of 1048576"):
                ex.submit(len, list(range(cap))).result(timeout=TIMEOUT)
            # a result's buffer over the cap comes back in parts; an in-band one cannot
            assert ex.submit(big_result, 2 * cap).result(timeout=TIMEOUT) == b"r" * 2 * cap
            with pytest.raises(MessageTooLargeError, match="result of task .* in band"):
                ex.submit(big_list_result, 2 * cap).result(timeout=TIMEOUT)
            assert ex.submit(len, b"a" * (cap // 2)).result(timeout=TIMEOUT) == cap // 2
            # a peer that ignores the caps is cut off by libzmq (MAXMSGSIZE); others carry on
            rogue = ctx.socket(zmq.DEALER)
            rogue.setsockopt(zmq.LINGER, 0)
            rogue.connect(cluster.address)
            rogue.send_multipart(P.encode(P.HELLO, {"role": "client", "id": "rogue",
                                                    "proto": P.PROTOCOL_VERSION}))
            rogue.send_multipart([header(P.RELEASE, {"ks": []}), b"z" * (40 << 20)])
            assert ex.submit(pow, 2, 7).result(timeout=TIMEOUT) == 128
            rogue.close()
    finally:
        ctx.term()
        cluster.close()
