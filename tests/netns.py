"""A small network of Linux network namespaces for multi-host tests (needs root).

``Network`` makes one namespace per host, each with a veth pair whose other end joins a
bridge in a namespace of its own (the "switch"), and addresses ``10.<n>.0.<i>/24``: real
TCP between separate network stacks, with no effect on the machine's own network.  Links
can be cut (``down``/``up``), silenced at the switch (``block``), slowed (``tc ... tbf``) or
made lossy (``tc ... netem``, where the kernel has it).  Everything is removed by
``close``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional


def usable() -> Optional[str]:
    """None if namespaces can be made here, else why not."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not all(map(shutil.which, ("ip", "tc", "bridge"))):
        return "the ip, tc and bridge commands (iproute2) are missing"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare -n fails here: {probe.stderr.decode().strip()}"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Network:
    """Hosts on one switch; ``run(host, cmd)`` starts a process inside a host."""

    def __init__(self, hosts: List[str]) -> None:
        tag = f"{os.getpid() % 10000}"
        self.net = 10 + os.getpid() % 200  # the second octet: 10.<net>.0.<i>
        self.switch = f"zx{tag}sw"
        self.ns: Dict[str, str] = {}
        self.addr: Dict[str, str] = {}
        self.port: Dict[str, str] = {}  # host -> its veth end on the bridge
        self._made: List[str] = []
        try:
            self._add_ns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, host in enumerate(hosts, start=1):
                ns = f"zx{tag}{host}"
                self._add_ns(ns)
                self.ns[host] = ns
                self.addr[host] = f"10.{self.net}.0.{i}"
                inner, outer = f"zx{tag}i{i}", f"zx{tag}o{i}"
                self.port[host] = outer
                _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
                _ip("link", "set", inner, "netns", ns)
                _ip("link", "set", outer, "netns", self.switch)
                _ip("-n", ns, "link", "set", inner, "name", "eth0")
                _ip("-n", ns, "addr", "add", f"{self.addr[host]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", self.switch, "link", "set", outer, "master", "br0")
                _ip("-n", self.switch, "link", "set", outer, "up")
        except BaseException:
            self.close()
            raise

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def run(self, host: str, cmd: List[str], **kw) -> "subprocess.Popen[bytes]":
        return subprocess.Popen(["ip", "netns", "exec", self.ns[host], *cmd], **kw)

    def link(self, host: str, up: bool) -> None:
        """Cut (or restore) a host's only link: its packets go nowhere meanwhile."""
        _ip("-n", self.ns[host], "link", "set", "eth0", "up" if up else "down")

    def block(self, host: str, blocked: bool) -> None:
        """Silence (or restore) a host's link at the switch: its bridge port forwards
        nothing while both ends keep their carrier, so packets vanish as on a broken
        network and TCP's retransmissions back off (with ``link`` down, the host's own
        sends fail at once instead)."""
        subprocess.run(["bridge", "-n", self.switch, "link", "set", "dev", self.port[host],
                        "state", "0" if blocked else "3"],  # disabled / forwarding
                       check=True, capture_output=True)

    def shape(self, host: str, *qdisc: str) -> Optional[str]:
        """Put a queueing discipline on a host's link; None, or why the kernel refused."""
        done = subprocess.run(["ip", "netns", "exec", self.ns[host], "tc", "qdisc", "replace",
                               "dev", "eth0", "root", *qdisc], capture_output=True)
        return None if done.returncode == 0 else done.stderr.decode().strip()

    def close(self) -> None:
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._made.clear()
