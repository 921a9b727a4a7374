"""Multi-host faults over real TCP: a broker, two agent hosts and a client, each
in its own network namespace on one virtual switch (``netns.Network``, needs root), with
CurveZMQ keys on every link (a client without them is refused).

An agent host's link is cut mid-task: its tasks are requeued after the heartbeat timeout
and complete on the other host; the link comes back and the agent rejoins and serves
again. The client's link is then slowed with ``tc tbf`` and, where the kernel has it, made
slow and lossy with ``tc netem``; every result must still arrive, intact.

Where namespaces cannot be made the module is skipped with the reason, unless
``ZMQEXEC_REQUIRE_NETNS=1`` (set by ``.ci/run`` when ``unshare -n true`` works), which
turns the skip into a failure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any, Dict, Iterator

import pytest

import netns
from conftest import ROOT, zmqexec_cmd

WHY_NOT = netns.usable()
if WHY_NOT and os.environ.get("ZMQEXEC_REQUIRE_NETNS"):
    raise RuntimeError(f"ZMQEXEC_REQUIRE_NETNS is set but {WHY_NOT}")
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))

PORT = 5555
HEARTBEAT = ("--heartbeat-interval", "0.2", "--heartbeat-timeout", "1.5")

# The client, in its own namespace: it says what it sees as JSON lines and waits for the
# test's word (a line on stdin) between phases. Tasks defined here travel by value.
CLIENT = textwrap.dedent("""
    import json, os, sys, time
    from zmqexec import ZMQExecutor

    def hold(i, seconds):
        time.sleep(seconds)
        return i, os.getppid()  # the agent that ran it

    def size(data):
        return len(data), data[-4:]

    def say(**kw):
        print(json.dumps(kw), flush=True)

    def wait_word():
        return sys.stdin.readline().strip()

    ex = ZMQExecutor(address=sys.argv[1], heartbeat_interval=0.2, broker_timeout=60,
                     keys=sys.argv[2])
    ex.wait_for_workers(2, timeout=60)
    agents = {a["pid"]: a["name"] for a in ex.status()["agents"]}
    futures = [ex.submit(hold, i, 1.0) for i in range(8)]
    while ex.status()["tasks"]["running"] < 2:
        time.sleep(0.05)
    say(phase="running", agents=agents)
    wait_word()  # the test has cut one agent host's link
    t0 = time.monotonic()
    results = [f.result(timeout=60) for f in futures]
    say(phase="cut", results=results, seconds=time.monotonic() - t0,
        agents=len(ex.status()["agents"]))
    wait_word()  # the link is back
    t0 = time.monotonic()
    while len(ex.status()["agents"]) < 2:
        time.sleep(0.05)
    rejoined = time.monotonic() - t0
    served = sorted({p for _, p in ex.map(hold, range(40), [0.05] * 40, timeout=60)})
    say(phase="rejoined", seconds=rejoined, served=served)
    for word in iter(wait_word, "done"):  # the test shapes our link, then says a phase name
        payload = os.urandom(4 << 20)
        t0 = time.monotonic()
        sizes = [ex.submit(size, payload).result(timeout=120) for _ in range(2)]
        quick = list(ex.map(pow, range(50), [2] * 50, timeout=120))
        say(phase=word, ok=sizes == [(len(payload), payload[-4:])] * 2 and
            quick == [i * i for i in range(50)], seconds=time.monotonic() - t0)
    ex.shutdown()
    say(phase="done")
""")


class Client:
    def __init__(self, proc: "subprocess.Popen[str]") -> None:
        self.proc = proc

    def read(self) -> Dict[str, Any]:
        line = self.proc.stdout.readline()
        assert line, f"the client ended: {self.proc.wait(10)}"
        return json.loads(line)

    def say(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()


@pytest.fixture
def network() -> Iterator[netns.Network]:
    net = netns.Network(["broker", "a1", "a2", "client"])
    procs = []
    net.procs = procs  # type: ignore[attr-defined]
    try:
        yield net
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()
        net.close()


def test_agent_host_link_cut_and_restored_then_slow_and_lossy_client_link(network, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    address = f"tcp://{network.addr['broker']}:{PORT}"
    keys = str(tmp_path / "keys")  # CurveZMQ on every link: a non-loopback broker
    subprocess.run(zmqexec_cmd("keygen", keys, "--worker", "a1", "--worker", "a2"),
                   check=True, capture_output=True)  # each agent host its own pair
    procs = network.procs
    broker = network.run("broker", zmqexec_cmd("broker", "--bind", address, "--keys", keys),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    procs.append(broker)
    assert broker.stdout.readline().decode().startswith("zmqexec broker listening on")
    for host in ("a1", "a2"):
        procs.append(network.run(host, zmqexec_cmd("worker", address, "--nprocs", "1",
                                                   "--name", host, "--keys", keys,
                                                   *HEARTBEAT), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    proc = network.run("client", [sys.executable, "-c", CLIENT, address, keys], env=env,
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    client = Client(proc)

    seen = client.read()
    assert seen["phase"] == "running" and sorted(seen["agents"].values()) == ["a1", "a2"]
    a1_pid = next(int(pid) for pid, name in seen["agents"].items() if name == "a1")
    network.link("a1", up=False)
    cut_at = time.monotonic()
    client.say("cut")
    seen = client.read()
    assert seen["phase"] == "cut"
    assert sorted(i for i, _ in seen["results"]) == list(range(8))  # all done, elsewhere too
    assert seen["agents"] == 1  # a1 written off after its heartbeat timeout
    cut_seconds = time.monotonic() - cut_at

    network.link("a1", up=True)
    client.say("up")
    seen = client.read()
    assert seen["phase"] == "rejoined" and a1_pid in seen["served"], json.dumps(seen)
    rejoin_seconds = seen["seconds"]

    phases = {"tbf": ("tbf", "rate", "20mbit", "burst", "32kbit", "latency", "400ms"),
              "netem": ("netem", "delay", "20ms", "5ms", "loss", "1%")}
    skipped = {}
    for name, qdisc in phases.items():
        refused = network.shape("client", *qdisc)
        if refused:
            skipped[name] = refused
            continue
        client.say(name)
        seen = client.read()
        assert seen == {"phase": name, "ok": True, "seconds": seen["seconds"]}, seen
        print(f"{name}: 2 x 4 MiB + 50 tasks in {seen['seconds']:.1f} s")
    client.say("done")
    assert client.read()["phase"] == "done"
    assert proc.wait(30) == 0
    network.shape("client", "pfifo")  # no more shaping
    for given, code in ((("--keys", keys), 0), ((), 1)):  # refused without keys
        shown = network.run("client", zmqexec_cmd("status", address, "--timeout", "3",
                                                  *given), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
        assert shown.wait(30) == code, shown.stderr.read()
        shown.stdout.close()
        shown.stderr.close()
    print(f"link cut: 8 tasks done in {cut_seconds:.1f} s; a1 rejoined in "
          f"{rejoin_seconds:.2f} s after the link came back")
    for name, why in skipped.items():
        print(f"{name} skipped: the kernel refused it ({why})")
