"""The agent's handle on one task process: its pipe, its process, and the keys it holds.

The agent gives a task process a batch at a time (``give``) and reads its results in bulk
(``read``); ``keys`` lists what the process was given, in order, so ``keys[0]`` is the task
it is running (the first one it has sent no result for).
"""
from __future__ import annotations

import multiprocessing
import os
import struct
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from .task import pack, task_main

_SIZE, _HUGE = struct.Struct("!i"), struct.Struct("!Q")
Task = Tuple[str, List[Any], List[Any]]  # key_wire, TASK row, payload frames


class Child:
    """The agent's handle on one task process and the keys it holds, running one first."""

    def __init__(self, ctx: Any) -> None:
        self.conn, child_conn = multiprocessing.Pipe()
        self.proc = ctx.Process(target=task_main, args=(child_conn, os.getpid()),
                                name="zmqexec-task", daemon=True)
        self.proc.start()
        child_conn.close()
        self.keys: Deque[str] = deque()  # given, in order; keys[0] is running
        self.since = 0.0  # when keys[0] started
        self.stopping: Optional[Tuple[str, str]] = None  # (key, "timeout"|"killed")
        self.fids: Set[str] = set()
        self.fd = self.conn.fileno()
        self._buf = bytearray()

    def read(self) -> Optional[List[bytes]]:
        """The complete messages that have arrived (one read for many); None at EOF.

        Reads the Pipe's descriptor directly with ``multiprocessing.Connection`` framing (a
        4-byte signed length, -1 then an 8-byte length for huge messages), since a
        ``recv_bytes`` per result would cost two system calls each.
        """
        data = os.read(self.fd, 1 << 20)
        if not data:
            return None
        buf = self._buf
        buf += data
        out, at = [], 0
        while len(buf) - at >= 4:
            size = _SIZE.unpack_from(buf, at)[0]
            head = 4
            if size == -1:
                if len(buf) - at < 12:
                    break
                size = _HUGE.unpack_from(buf, at + 4)[0]
                head = 12
            if len(buf) - at < head + size:
                break
            out.append(bytes(buf[at + head:at + head + size]))
            at += head + size
        del buf[:at]
        return out

    def give(self, tasks: List[Task], blobs: Dict[str, Any]) -> None:
        fids, rows, frames = [], [], []
        for kw, row, task_frames in tasks:
            for fid in (row[3], row[4]):
                if fid and fid not in self.fids and fid in blobs:
                    self.fids.add(fid)
                    fids.append(fid)
            rows.append([kw, row[2], row[3], row[4], len(task_frames)])
            frames.extend(task_frames)
            self.keys.append(kw)
        for message in pack({"f": fids, "t": rows}, [blobs[f] for f in fids] + frames):
            self.conn.send_bytes(message)
