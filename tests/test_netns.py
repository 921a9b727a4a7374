"""Multi-host faults over real TCP: a broker, two agent hosts and a client, each
in its own network namespace on one virtual switch (``netns.Network``, needs root), with
CurveZMQ keys on every link (a client without them is refused).

An agent host's link is cut mid-task: its tasks are requeued after the heartbeat timeout
and complete on the other host; the link comes back and the agent rejoins and serves
again. The client's link is then slowed with ``tc tbf`` and, where the kernel has it, made
slow and lossy with ``tc netem``; every result must still arrive, intact.

The client's own link is cut past its heartbeat timeout (its interface down, or its
packets dropped at the switch, where TCP backs off) while its tasks run and finish (their
results pushed into the dead connection) and it submits more: it connects again by
itself, and every future finishes with its result, no task having run twice. Cut past the
broker's client timeout too, it registers again: no retries=0 task runs twice.

Where namespaces cannot be made the module is skipped with the reason, unless
``ZMQEXEC_REQUIRE_NETNS=1`` (set by ``.ci/run`` when ``unshare -n true`` works), which
turns the skip into a failure.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any, Dict, Iterator, List

import pytest

import netns
from conftest import ROOT, wait_until, zmqexec_cmd

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


@contextlib.contextmanager
def hosts(names: List[str]) -> Iterator[netns.Network]:
    """A network of these hosts; the processes started in ``net.procs`` end with it."""
    net = netns.Network(names)
    procs: List["subprocess.Popen[Any]"] = []
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


@pytest.fixture
def network() -> Iterator[netns.Network]:
    with hosts(["broker", "a1", "a2", "client"]) as net:
        yield net


@pytest.fixture
def three_hosts() -> Iterator[netns.Network]:
    with hosts(["broker", "agent", "client"]) as net:
        yield net


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


# A client whose own link the test cuts: it logs to a file (``argv[3]``), its tasks write a
# line to ``argv[4]`` when they start and another when they end, and wait for a gate file.
# Odd tasks have retries=0.
CLIENT_CUT = textwrap.dedent("""
    import json, logging, os, sys, threading, time
    from zmqexec import BrokerLostError, Queue, ZMQExecutor

    address, keys, log_path, runs = sys.argv[1:5]
    logging.basicConfig(filename=log_path, level=logging.INFO,
                        format="%(created).3f %(name)s %(levelname)s %(message)s")

    def step(runs, i, gate):
        with open(runs, "a") as f:
            f.write(f"run {i}\\n")
        while not os.path.exists(gate):
            time.sleep(0.01)
        with open(runs, "a") as f:
            f.write(f"end {i}\\n")
        return i * i

    def outcome(fut):
        try:
            return fut.result(timeout=60)
        except BrokerLostError:
            return "lost"

    def say(**kw):
        print(json.dumps(kw), flush=True)

    got = {}

    def getter(name):  # a Queue get waiting across the cut, with no timeout
        def get():
            try:
                got[name] = Queue(name, client=ex).get()
            except BrokerLostError:
                got[name] = "lost"
        thread = threading.Thread(target=get)
        thread.start()
        return thread

    ex = ZMQExecutor(address=address, keys=keys, heartbeat_interval=0.2,
                     heartbeat_timeout=1.5, broker_timeout=60)
    ex.wait_for_workers(2, timeout=60)
    once, gate = ex.options(retries=0), runs + ".gate"
    futures = [(once if i % 2 else ex).submit(step, runs, i, gate) for i in range(6)]
    while ex.status()["tasks"]["running"] < 2:
        time.sleep(0.05)
    getters = [getter("before")]  # waiting at the broker (the status after it answered)
    ex.status()
    say(phase="running")
    sys.stdin.readline()  # the test has cut our link: these submits may die with it
    futures += [(once if i % 2 else ex).submit(step, runs, i, gate) for i in range(6, 10)]
    getters.append(getter("during"))  # sent into the dead connection
    asked = []  # a status request sent while the link is cut
    asker = threading.Thread(target=lambda: asked.append(ex.status(timeout=60)))
    asker.start()
    say(phase="submitted")
    results = [outcome(f) for f in futures]
    asker.join()
    for name in ("before", "during"):
        Queue(name, client=ex).put(name)
    for thread in getters:
        thread.join(60)
    say(phase="results", results=results, at=time.time(), status=bool(asked), got=got)
    ex.shutdown()
    say(phase="done")
""")


@pytest.mark.parametrize("cut, forgotten", [("down", False), ("dropped", False),
                                            ("down", True)],
                         ids=["down", "dropped", "forgotten"])
def test_a_client_reconnects_by_itself_after_a_cut_of_its_own_link(three_hosts, tmp_path,
                                                                   cut, forgotten):
    """The link is cut past the client's heartbeat timeout while tasks 0-5 run and finish
    (their results pushed into the dead connection) and 6-9 are submitted; ``forgotten``:
    past the broker's client timeout too, so the broker has dropped the client when it
    connects again."""
    network = three_hosts

    def link(up: bool) -> None:
        if cut == "down":
            network.link("client", up=up)
        else:  # dropped at the switch: the old connection backs off
            network.block("client", blocked=not up)

    env = dict(os.environ, PYTHONPATH=ROOT)
    address = f"tcp://{network.addr['broker']}:{PORT}"
    keys = str(tmp_path / "keys")
    subprocess.run(zmqexec_cmd("keygen", keys, "--worker", "agent"), check=True,
                   capture_output=True)
    procs = network.procs
    client_timeout = ("--client-timeout", "3") if forgotten else ()
    broker = network.run("broker", zmqexec_cmd("broker", "--bind", address, "--keys", keys,
                                               *client_timeout),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    procs.append(broker)
    assert broker.stdout.readline().decode().startswith("zmqexec broker listening on")
    procs.append(network.run("agent", zmqexec_cmd("worker", address, "--nprocs", "2",
                                                  "--name", "agent", "--keys", keys,
                                                  *HEARTBEAT), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    log_path, runs = tmp_path / "client.log", tmp_path / "runs"
    proc = network.run("client", [sys.executable, "-c", CLIENT_CUT, address, keys,
                                  str(log_path), str(runs)], env=env,
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    client = Client(proc)

    def logged(text: str) -> List[str]:
        return [line for line in log_path.read_text().splitlines() if text in line]

    def lines(word: str) -> "collections.Counter[int]":
        return collections.Counter(int(line.split()[1]) for line in
                                   runs.read_text().splitlines() if line.startswith(word))

    def clients() -> int:
        """How many clients the broker knows, asked on its own host (not cut)."""
        shown = subprocess.run(["ip", "netns", "exec", network.ns["broker"],
                                *zmqexec_cmd("status", address, "--keys", keys, "--json")],
                               capture_output=True, text=True, env=env, timeout=30)
        return int(json.loads(shown.stdout)["clients"])

    assert client.read()["phase"] == "running"
    link(up=False)
    cut_at = time.monotonic()
    client.say("cut")
    assert client.read()["phase"] == "submitted"
    (tmp_path / "runs.gate").touch()  # tasks 0-5 finish while the client cannot hear
    assert wait_until(lambda: set(lines("end")) >= set(range(6)), timeout=30), \
        runs.read_text()
    assert wait_until(lambda: logged("connecting again"), timeout=30), \
        "the client never noticed the broker's silence"
    if forgotten:
        assert wait_until(lambda: clients() == 0, timeout=30)
    link(up=True)
    up_at, cut_seconds = time.time(), time.monotonic() - cut_at
    assert cut_seconds < 60  # shorter than broker_timeout (and the default client timeout)

    seen = client.read()
    assert seen["phase"] == "results" and seen["status"], seen
    # Queue gets with no timeout: a forgotten client's fail; else each gets its item
    assert seen["got"] == ({"before": "lost", "during": "lost"} if forgotten else
                           {"before": "before", "during": "during"}), seen
    assert client.read()["phase"] == "done"
    assert proc.wait(30) == 0
    ran, results = lines("run"), seen["results"]
    assert all(ran[i] <= 1 for i in range(1, 10, 2)), ran  # retries=0: never twice
    reconnected = logged("reconnected to the broker")
    assert reconnected, log_path.read_text()
    if forgotten:  # registered again: retries=0 tasks that may have started are lost
        assert "forgotten" in reconnected[0], reconnected
        assert all(results[i] in (i * i, "lost") for i in range(1, 10, 2)), results
        assert all(results[i] == i * i and 1 <= ran[i] <= 2 for i in range(0, 10, 2)), \
            (results, ran)
    else:  # the broker still knew the client: every result, and no task ran again
        assert "asked again" in reconnected[0], reconnected
        assert results == [i * i for i in range(10)], results
        assert sorted(ran) == list(range(10)) and set(ran.values()) == {1}, ran
    answered = float(reconnected[0].split()[0]) - up_at
    print(f"client link {cut} for {cut_seconds:.1f} s{' (forgotten)' * forgotten}: the "
          f"broker answered again {answered:.2f} s after the link came back, every future "
          f"done in {seen['at'] - up_at:.2f} s; {len(logged('connecting again'))} new "
          f"connections; re-runs {sum(ran.values()) - len(ran)}, lost {results.count('lost')}")
