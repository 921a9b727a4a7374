"""The embedded cluster of ``ZMQExecutor()``: a broker and one agent on this machine.

Both run as ``python -m zmqexec`` child processes talking over ipc in a fresh 0700
directory, so only this OS user can connect.  Each gets the read end of a pipe whose only
write end this client holds: when the client dies, even by SIGKILL, the pipe reads EOF and
both stop (the agent then kills its task processes, which also die with their agent, and
removes the client's directories: the ipc one and the ``shm.Spill`` one for large arguments).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import List, Optional

from ..wire.shm import Spill
from ..agent.handle import describe_exit

log = logging.getLogger(__name__)


class LocalCluster:
    """Start, watch and stop the embedded broker and agent."""

    def __init__(self, nprocs: int, *, start_method: Optional[str] = None,
                 heartbeat_interval: float = 1.0, heartbeat_timeout: float = 10.0) -> None:
        self.nprocs = nprocs
        self.dir = tempfile.mkdtemp(prefix="zmqexec-")  # mode 0700
        self.address = f"ipc://{self.dir}/broker"
        self._watch_r, self._watch_w = os.pipe()
        self._env = dict(os.environ, ZMQEXEC_SYS_PATH=json.dumps(sys.path))
        self.spill = Spill()
        self._agent_args = ["worker", self.address, "--nprocs", str(nprocs),
                            "--heartbeat-interval", str(heartbeat_interval),
                            "--heartbeat-timeout", str(heartbeat_timeout),
                            "--cleanup", self.dir, "--cleanup", self.spill.dir]
        if start_method:
            self._agent_args += ["--start-method", start_method]
        self.agent_restarts = self.broker_restarts = 0
        self.closed = False
        try:
            self.broker = self._start(["broker", "--bind", self.address])
            self.agent = self._start(self._agent_args)
        except BaseException:
            self.close()
            raise

    def _start(self, args: List[str]) -> "subprocess.Popen[bytes]":
        cmd = [sys.executable, "-m", "zmqexec", *args, "--parent-fd", str(self._watch_r)]
        return subprocess.Popen(cmd, pass_fds=(self._watch_r,), env=self._env,
                                stdin=subprocess.DEVNULL, close_fds=True)

    def check(self) -> Optional[str]:
        """Replace a dead agent; restart a dead broker once, and say what is wrong if it
        dies again (None if all is well).

        A restarted broker has an empty table: the agent registers again with the keys it
        is running and the results it sent unacknowledged, the client resubmits what has
        no result, and the broker matches them by key."""
        if self.closed:
            return None
        code = self.broker.poll()
        if code is not None:
            if self.broker_restarts:
                return (f"the embedded broker process died ({describe_exit(code)}) again "
                        "after a restart")
            self.broker_restarts += 1
            log.warning("the embedded broker died (%s): starting it again",
                        describe_exit(code))
            self.broker = self._start(["broker", "--bind", self.address])
        code = self.agent.poll()
        if code is not None:
            self.agent_restarts += 1
            log.warning("the embedded agent died (%s): starting another", describe_exit(code))
            self.agent = self._start(self._agent_args)
        return None

    def close(self, timeout: float = 5.0) -> None:
        """Stop both processes: EOF on the watch pipe, then SIGTERM, then SIGKILL."""
        if self.closed:
            return
        self.closed = True
        for fd in (self._watch_w, self._watch_r):
            try:
                os.close(fd)
            except OSError:
                pass
        procs = [p for p in (getattr(self, "agent", None), getattr(self, "broker", None))
                 if p is not None]
        for proc in procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("embedded process %d did not stop: killing it", proc.pid)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.spill.close()
