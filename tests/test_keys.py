"""CurveZMQ keys: the keygen layout and permission checks, a keyed
cluster that serves key holders only, roles decided by the broker's allowlist folders,
and nothing unpickled for a peer that is not authenticated."""
from __future__ import annotations

import os
import pickle
import shutil
import stat
import subprocess

import pytest
import zmq
from conftest import Cluster, zmqexec_cmd

from zmqexec import BrokerLostError, ZMQExecutor
from zmqexec.wire import protocol as P

TIMEOUT = 30


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def keygen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(zmqexec_cmd("keygen", *args), capture_output=True, text=True,
                          timeout=30)


def test_keygen_writes_the_layout_with_private_modes_and_never_overwrites(tmp_path):
    keys = tmp_path / "keys"
    done = keygen(str(keys), "--client", "alice", "--worker", "w2")
    assert done.returncode == 0, done.stderr
    expected = ["broker.key", "broker.key_secret", "clients/alice.key",
                "clients/alice.key_secret", "clients/default.key",
                "clients/default.key_secret", "workers/default.key",
                "workers/default.key_secret", "workers/w2.key", "workers/w2.key_secret"]
    found = sorted(str(p.relative_to(keys)) for p in keys.rglob("*") if p.is_file())
    assert found == expected
    assert {mode(keys), mode(keys / "clients"), mode(keys / "workers")} == {0o700}
    assert all(mode(keys / f) == 0o600 for f in expected if f.endswith("_secret"))
    before = (keys / "broker.key_secret").read_bytes()
    again = keygen(str(keys), "--client", "bob")
    assert again.returncode == 0 and "kept" in again.stdout
    assert (keys / "broker.key_secret").read_bytes() == before
    assert (keys / "clients" / "bob.key_secret").exists()


@pytest.fixture
def keys(tmp_path):
    directory = tmp_path / "keys"
    assert keygen(str(directory)).returncode == 0
    return directory


def test_keys_readable_by_others_are_refused_with_the_fix(keys):
    os.chmod(keys / "broker.key_secret", 0o644)
    proc = subprocess.run(zmqexec_cmd("broker", "--bind", "tcp://127.0.0.1:0", "--keys",
                                      str(keys)), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and f"chmod 600 {keys}/broker.key_secret" in proc.stderr
    os.chmod(keys / "broker.key_secret", 0o600)
    os.chmod(keys / "workers", 0o755)
    proc = subprocess.run(zmqexec_cmd("worker", "tcp://127.0.0.1:9", "--keys", str(keys)),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and f"chmod 700 {keys}/workers" in proc.stderr


def test_a_keyed_cluster_serves_key_holders_and_refuses_the_rest(keys, tmp_path):
    cluster = Cluster(agents=1, nprocs=1, broker_args=("--keys", str(keys)),
                      agent_args=("--keys", str(keys)))
    try:
        with ZMQExecutor(address=cluster.address, keys=str(keys)) as ex:
            ex.wait_for_workers(1, timeout=TIMEOUT)
            assert ex.submit(pow, 2, 8).result(timeout=TIMEOUT) == 256
            # no keys: the handshake fails, nothing reaches the broker, and the future
            # ends after broker_timeout instead of hanging
            stranger = ZMQExecutor(address=cluster.address, broker_timeout=1.5)
            with pytest.raises(BrokerLostError):
                stranger.submit(pow, 2, 2).result(timeout=TIMEOUT)
            stranger.shutdown(wait=False)
            # a client's key posing as a worker is refused and gets no task
            impostor = tmp_path / "impostor"
            shutil.copytree(keys, impostor)
            for suffix in (".key", ".key_secret"):
                shutil.copy(keys / "clients" / f"default{suffix}",
                            impostor / "workers" / f"default{suffix}")
            agent = subprocess.run(zmqexec_cmd("worker", cluster.address, "--keys",
                                               str(impostor), "--nprocs", "1"),
                                   capture_output=True, text=True, timeout=TIMEOUT)
            assert agent.returncode == 1 and "may act as client" in agent.stderr
            status = ex.status()
            assert len(status["agents"]) == 1
            assert status["dropped"]["key not allowed for that role"] == 1
            assert ex.submit(pow, 3, 3).result(timeout=TIMEOUT) == 27
            shown = subprocess.run(zmqexec_cmd("status", cluster.address, "--keys",
                                               str(keys), "--json"),
                                   capture_output=True, text=True, timeout=TIMEOUT)
            assert shown.returncode == 0 and '"slots": 1' in shown.stdout
    finally:
        cluster.close()


class Bomb:
    """Unpickling this creates a file: proof that someone unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_an_unauthenticated_peer_gets_nothing_unpickled(keys, tmp_path):
    proof = tmp_path / "unpickled"
    bomb = pickle.dumps(Bomb(str(proof)))
    cluster = Cluster(agents=1, nprocs=1, broker_args=("--keys", str(keys)),
                      agent_args=("--keys", str(keys)))
    ctx = zmq.Context()
    try:
        with ZMQExecutor(address=cluster.address, keys=str(keys)) as ex:
            ex.wait_for_workers(1, timeout=TIMEOUT)
            layouts = [
                [bomb],
                [b"ZX" + bytes((P.PROTOCOL_VERSION, P.SUBMIT)) + b"{}", bomb],
                P.encode(P.HELLO, {"role": "client", "id": "x",
                                   "proto": P.PROTOCOL_VERSION}) + [bomb],
                P.encode(P.SUBMIT, {"f": ["f"], "t": [['"k"', 0, 0, 0, "f", "", 1]]},
                         [bomb, bomb]),
                P.encode(P.RESULT, {"r": [['"k"', "finished", 1]]}, [bomb]),
            ]
            sockets = []
            for layout in layouts:
                for sock_keys in (None, "wrong"):
                    sock = ctx.socket(zmq.DEALER)
                    sock.setsockopt(zmq.LINGER, 0)
                    if sock_keys:  # a well-formed CurveZMQ client whose key is not listed
                        public, secret = zmq.curve_keypair()
                        sock.curve_serverkey = (keys / "broker.key").read_bytes().split(
                            b'public-key = "')[1][:40]
                        sock.curve_publickey, sock.curve_secretkey = public, secret
                    sock.connect(cluster.address)
                    try:  # queued for a connection whose handshake the broker refuses
                        sock.send_multipart(layout, zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                    sockets.append(sock)
            # while they keep retrying their handshakes, the broker serves key holders
            for _ in range(20):
                assert ex.submit(pow, 2, 4).result(timeout=TIMEOUT) == 16
            status = ex.status()
            assert status["clients"] == 1 and not status["dropped"]  # nothing got through
            for sock in sockets:
                sock.close()
    finally:
        ctx.term()
        cluster.close()
    assert not proof.exists()
