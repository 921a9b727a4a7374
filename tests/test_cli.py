"""The command line, run as real processes: ``python -m zmqexec ...``."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import List, Tuple

import cloudpickle
import pytest

from conftest import Cluster, free_port, zmqexec_cmd
from zmqexec import ZMQExecutor
from zmqexec.cli import is_loopback

# Agents started from the command line do not have tests/ on sys.path: ship our tasks by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

STATUS_WORDS = ("queued", "running", "finished", "error", "cancelled", "lost")


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(zmqexec_cmd(*args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def start_broker(*args: str, timeout: float = 15) -> Tuple[subprocess.Popen, str]:
    """Start ``zmqexec [args]`` (a broker) and return it with its first stdout line."""
    proc = subprocess.Popen(zmqexec_cmd(*args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the broker printed nothing within {timeout} s")
    return proc, proc.stdout.readline()


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> Tuple[int, str]:
    """Send ``sig`` and return (exit code, rest of stderr)."""
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the broker did not exit within 15 s of {signal.Signals(sig).name}")
    return proc.returncode, err


def double(x: int) -> int:
    return 2 * x


# ---- top-level options ---------------------------------------------------------------------
def test_version_prints_version_and_exits_0() -> None:
    import zmqexec

    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"zmqexec {zmqexec.__version__}"


def test_help_lists_commands_and_exits_0() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("broker", "worker", "status", "keygen"):
        assert command in proc.stdout


@pytest.mark.parametrize("args", [
    ("bogus",),
    (),
    ("worker",),
    ("status",),
    ("broker", "--max-queued-bytes", "lots"),
    ("broker", "--no-such-option"),
    ("--log-level", "LOUD", "broker"),
    ("worker", "tcp://127.0.0.1:1", "--nprocs", "two"),
], ids=["unknown-command", "no-command", "worker-no-address", "status-no-address",
        "bad-int", "unknown-option", "bad-log-level", "bad-nprocs"])
def test_usage_errors_exit_2(args: Tuple[str, ...]) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "usage:" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("nprocs", ["0", "-1"])
def test_worker_with_no_processes_exits_2(nprocs: str) -> None:
    proc = run_cli("worker", f"tcp://127.0.0.1:{free_port()}", "--nprocs", nprocs)
    assert proc.returncode == 2
    assert "--nprocs" in proc.stderr


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("option", [("-v",), ("--verbose",), ("--log-level", "DEBUG"),
                                    ("--log-level", "info")],
                         ids=["v", "verbose", "log-level-DEBUG", "log-level-info"])
def test_logging_options_work_before_and_after_the_command(option: Tuple[str, ...],
                                                           where: str) -> None:
    broker = ["broker", "--bind", "tcp://127.0.0.1:0"]
    args = [*option, *broker] if where == "before" else [*broker, *option]
    proc, line = start_broker(*args)
    assert line.startswith("zmqexec broker listening on "), line
    code, err = stop(proc)
    assert code == 0, err
    assert " INFO " in err and "broker stopped" in err, err


def test_broker_logs_only_warnings_by_default() -> None:
    proc, line = start_broker("broker", "--bind", "tcp://127.0.0.1:0")
    assert line.startswith("zmqexec broker listening on "), line
    code, err = stop(proc)
    assert code == 0, err
    assert " INFO " not in err, err


@pytest.mark.parametrize("where", ["before", "after"])
def test_log_level_error_silences_the_keyless_warning(where: str) -> None:
    broker = ["broker", "--bind", "tcp://127.0.0.1:0"]
    option = ["--log-level", "ERROR"]
    args = [*option, *broker] if where == "before" else [*broker, *option]
    proc, line = start_broker(*args)
    assert line.startswith("zmqexec broker listening on "), line
    code, err = stop(proc)
    assert code == 0, err
    assert "WARNING" not in err, err


# ---- broker --------------------------------------------------------------------------------
def test_broker_prints_the_real_port_first_when_binding_port_0() -> None:
    proc, line = start_broker("broker", "--bind", "tcp://127.0.0.1:0")
    try:
        assert line.startswith("zmqexec broker listening on tcp://127.0.0.1:"), line
        address = line.split()[-1]
        port = int(address.rsplit(":", 1)[1])
        assert port != 0
        status = run_cli("status", address, "--json", "--timeout", "10")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["agents"] == []
    finally:
        code, err = stop(proc)
    assert code == 0, err


def test_broker_prints_one_listening_line_per_bind() -> None:
    proc, line = start_broker("broker", "--bind", "tcp://127.0.0.1:0",
                              "--bind", "tcp://127.0.0.1:0")
    second = proc.stdout.readline()
    code, err = stop(proc)
    assert code == 0, err
    addresses = [x.split()[-1] for x in (line, second)]
    assert all(x.startswith("zmqexec broker listening on tcp://127.0.0.1:")
               for x in (line, second)), (line, second)
    assert len(set(addresses)) == 2
    assert not any(a.endswith(":0") for a in addresses)


def test_broker_listens_on_the_ipv6_loopback() -> None:
    proc, line = start_broker("broker", "--bind", "tcp://[::1]:0")
    code, err = stop(proc)
    assert line.startswith("zmqexec broker listening on tcp://[::1]:"), (line, err)
    assert code == 0, err


@pytest.mark.parametrize("binds", [["tcp://0.0.0.0:0"], ["tcp://*:0"],
                                   ["tcp://127.0.0.1:0", "tcp://*:0"]],
                         ids=["0.0.0.0", "star", "loopback-and-star"])
def test_broker_refuses_a_non_loopback_address_without_keys(binds: List[str]) -> None:
    args = [arg for b in binds for arg in ("--bind", b)]
    start = time.monotonic()
    proc = run_cli("broker", *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert time.monotonic() - start < 15
    assert proc.stdout == ""  # refused before binding: no listening line
    assert "keys" in proc.stderr and "--insecure" in proc.stderr, proc.stderr
    assert "127.0.0.1" in proc.stderr  # says how to fix it: a loopback address


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:0", "tcp://*:0"])
def test_insecure_broker_starts_on_a_non_loopback_address_with_a_warning(bind: str) -> None:
    proc, line = start_broker("broker", "--bind", bind, "--insecure")
    code, err = stop(proc)
    assert line.startswith("zmqexec broker listening on tcp://"), (line, err)
    assert not line.rstrip().endswith(":0"), line
    assert code == 0, err
    assert "WARNING" in err and "INSECURE" in err, err


def test_keyless_loopback_tcp_broker_logs_a_warning() -> None:
    proc, line = start_broker("broker", "--bind", "tcp://127.0.0.1:0")
    code, err = stop(proc)
    assert line.startswith("zmqexec broker listening on "), line
    assert code == 0, err
    assert "WARNING" in err and "no keys" in err, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_broker_exits_0_on_signal(sig: int) -> None:
    proc, line = start_broker("broker", "--bind", "tcp://127.0.0.1:0")
    assert line.startswith("zmqexec broker listening on "), line
    code, err = stop(proc, sig)
    assert code == 0, err
    assert "Traceback" not in err, err


def test_broker_on_a_busy_port_exits_1() -> None:
    proc, line = start_broker("broker", "--bind", "tcp://127.0.0.1:0")
    try:
        address = line.split()[-1]
        second = run_cli("broker", "--bind", address)
        assert second.returncode == 1, (second.stdout, second.stderr)
        assert "cannot bind" in second.stderr
        assert second.stdout == ""
    finally:
        code, err = stop(proc)
    assert code == 0, err


# ---- is_loopback ---------------------------------------------------------------------------
@pytest.mark.parametrize("address", [
    "tcp://127.0.0.1:5555", "tcp://127.5.5.5:5555", "tcp://[::1]:5555", "tcp://localhost:5555",
    "tcp://127.0.0.1:0", "ipc:///tmp/zmqexec-test.sock", "inproc://broker",
])
def test_is_loopback_true_for_loopback_addresses(address: str) -> None:
    assert is_loopback(address) is True


@pytest.mark.parametrize("address", [
    "tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://eth0:5555", "tcp://10.0.0.1:5555",
    "tcp://example.com:5555", "tcp://[::]:5555", "tcp://192.168.1.1:0",
    "tcp://128.0.0.1:5555", "tcp://localhost.example.com:5555",
])
def test_is_loopback_false_for_other_addresses(address: str) -> None:
    assert is_loopback(address) is False


# ---- status --------------------------------------------------------------------------------
def run_six_tasks(cluster: Cluster) -> None:
    with ZMQExecutor(address=cluster.address) as ex:
        ex.wait_for_workers(2, timeout=20)
        assert list(ex.map(double, range(6), timeout=30)) == [0, 2, 4, 6, 8, 10]


def test_status_prints_agents_and_task_counts(cluster: Cluster) -> None:
    run_six_tasks(cluster)
    proc = run_cli("status", cluster.address, "--timeout", "10")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "agents 2" in text, text
    assert "finished 6" in text, text
    for word in STATUS_WORDS:
        assert word in text
    for agent in cluster.agents:
        assert f"pid {agent.pid}" in text, text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_status_json_prints_the_status_document(cluster: Cluster) -> None:
    run_six_tasks(cluster)
    proc = run_cli("status", cluster.address, "--json", "--timeout", "10")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict)
    assert {"broker", "agents", "slots", "clients", "tasks"} <= set(doc)
    assert len(doc["agents"]) == 2
    assert sorted(a["pid"] for a in doc["agents"]) == sorted(a.pid
                                                             for a in cluster.agents)
    assert doc["slots"] == 2
    assert set(STATUS_WORDS) <= set(doc["tasks"])
    assert doc["tasks"]["finished"] == 6
    assert sum(a["finished"] for a in doc["agents"]) == 6


def test_status_watch_redraws_screens_with_throughput_until_interrupted(cluster: Cluster,
                                                                       tmp_path) -> None:
    """The captured screens: each starts with the terminal's clear sequence and shows the
    agents, the counts and a tasks/s rate computed between two views."""
    proc = subprocess.Popen(zmqexec_cmd("status", cluster.address, "--watch", "--timeout",
                                        "10"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    screens = []
    try:
        run_six_tasks(cluster)
        buffer = b""
        end = time.monotonic() + 30
        while len(screens) < 4 and time.monotonic() < end:  # the first views, one a second
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                buffer += os.read(proc.stdout.fileno(), 65536)
                screens = [s.decode() for s in buffer.split(b"\x1b[H\x1b[2J") if s]
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
        err = proc.stderr.read().decode()
        proc.stdout.close()
        proc.stderr.close()
    assert code == 0 and "Traceback" not in err, err
    assert len(screens) >= 3, screens
    last = screens[-2]  # a whole screen (the last one may be cut)
    (tmp_path / "screen.txt").write_text(last)
    assert "agents 2" in last and "tasks/s" in last and "finished 6" in last, last
    assert all(f"pid {agent.pid}" in last for agent in cluster.agents), last
    assert "heartbeat" in last and "held" in last


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_status_of_an_address_where_nothing_listens_exits_1_within_timeout(
        as_json: bool) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = run_cli("status", address, "--timeout", "1", *(["--json"] if as_json else []))
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert elapsed < 6, elapsed
    assert proc.stdout == ""
    assert address in proc.stderr
