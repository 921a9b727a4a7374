"""The framing of the pipes between an agent and its task processes.

The agent and a task process talk over two one-way pipes.  Each message is one
packed buffer (``pack``/``unpack``): a header and the frames it names, so a batch of
tasks is one write and one read.  The header is a pickle of plain lists, dicts and
strings: the pipe joins a process and its own child, which runs the pickles it is sent
anyway, and a pickle costs a quarter of the JSON encoding on the agent's (the embedded
node's: the client's) thread.  Agent to task process::

    {"b": batch number, "f": [fid...], "t": [[k, client, fid, iid, nframes, mid]...]}
    blobs, then task frames (a large frame follows as a message of its own)

and task process to agent, one record per finished task, sent before the next starts so
the agent always knows which task is running (the one it has no result for); it is a
small binary record (``pack_result``), as there is one per task::

    status (finished|error|dropped) | key | result pickle

Records are framed as ``multiprocessing.Connection.send_bytes`` frames them (a 4-byte
signed length, or -1 and an 8-byte length for huge ones), written in one system call
(``record_parts``) and read many at a time (``RecordReader``): a ``recv_bytes`` per
result would cost two system calls each, and the Connection's own checks as much again.

Batches are written without ever blocking (``PipeWriter``): a task process that cannot
read (stopped by SIGSTOP, or gone while a process it started holds the pipe) must not
stop the agent, nor the embedded node, which has other work and timeouts to see to.

Cancels travel on a third pipe, agent to task process: ``[batch number, [k...]]`` in
JSON, through ``Connection.send_bytes``.
"""
from __future__ import annotations

import os
import pickle
import struct
from collections import deque
from itertools import islice
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

from .serialization import OUT_OF_BAND_MIN

_HEAD = struct.Struct("!II")  # header length, frame count
_RESULT = struct.Struct("!BHH")  # status code, key length, number of frames
_SIZE = struct.Struct("!i")  # Connection's length prefix (-1: an 8-byte one follows)
_U64 = struct.Struct("!Q")  # that 8-byte length; also the size of a result's only frame
COPY_BELOW = 1 << 16  # result frames smaller than this are copied out of their record
HUGE_RECORD = 1 << 30  # from here on, Connection.send_bytes (its 8-byte length form)
_LONG_SIZE = 0x7FFFFFFF  # messages this long take the 8-byte length form, as in Connection
_JOIN_BELOW = 16384  # a message this short is copied behind its length: one buffer to write
STATUSES = ("finished", "error", "dropped", "kept")
_CODES = {name: code for code, name in enumerate(STATUSES)}


def pack(meta: Dict[str, Any], frames: Sequence[Any]) -> List[Any]:
    """Messages for one batch: lengths, header and small frames in one buffer, then
    each large frame (an out-of-band buffer) as a message of its own, never copied here.
    A large frame's length is stored negated so ``unpack`` knows to read it separately.
    """
    head = pickle.dumps(meta, pickle.HIGHEST_PROTOCOL)
    sizes = [len(f) if type(f) is bytes else memoryview(f).nbytes for f in frames]
    large = [f for f, n in zip(frames, sizes, strict=False) if n >= OUT_OF_BAND_MIN]
    if large:
        sizes = [-n if n >= OUT_OF_BAND_MIN else n for n in sizes]
        frames = [f for f in frames if memoryview(f).nbytes < OUT_OF_BAND_MIN]
    packed = b"".join([_HEAD.pack(len(head), len(sizes)),
                       struct.pack(f"!{len(sizes)}q", *sizes), head, *frames])
    return [packed, *large]


def unpack(data: bytes) -> Tuple[Dict[str, Any], List[Any], List[Tuple[int, int]]]:
    """The header, zero-copy views of the packed frames (None for a large one), and the
    (index, size) of each large frame, which follows as a message of its own."""
    view = memoryview(data)
    nhead, count = _HEAD.unpack_from(view)
    at = _HEAD.size
    sizes = struct.unpack_from(f"!{count}q", view, at)
    at += 8 * count
    meta = pickle.loads(view[at:at + nhead])
    at += nhead
    frames: List[Any] = []
    large = []
    for index, size in enumerate(sizes):
        if size < 0:
            frames.append(None)
            large.append((index, -size))
        else:
            frames.append(view[at:at + size])
            at += size
    return meta, frames, large


def pack_result(kw: str, status: str, parts: Sequence[Any] = ()) -> bytes:
    """One result record: the key, the status, and the result's frames (``[pickle,
    *out-of-band buffers]``), each preceded by its size."""
    key = kw.encode()
    sizes = [memoryview(part).nbytes for part in parts]
    return b"".join((_RESULT.pack(_CODES[status], len(key), len(sizes)), key,
                     struct.pack(f"!{len(sizes)}Q", *sizes), *parts))


def unpack_result(data: bytes) -> Tuple[str, str, List[Any]]:
    """(key, status, the result's frames) of a ``pack_result`` record: views of it for
    frames of ``COPY_BELOW`` bytes or more, copies of smaller ones (a view is two objects
    for the garbage collector to visit while the result is held, and keeps the whole
    record alive)."""
    code, size, count = _RESULT.unpack_from(data)
    at = _RESULT.size + size
    kw = data[_RESULT.size:at].decode()
    sizes = _U64.unpack_from(data, at) if count == 1 else \
        struct.unpack_from(f"!{count}Q", data, at)
    at += 8 * count
    view: Optional[memoryview] = None
    parts: List[Any] = []
    for part in sizes:
        if part < COPY_BELOW:
            parts.append(data[at:at + part])
        else:
            if view is None:
                view = memoryview(data)
            parts.append(view[at:at + part])
        at += part
    return kw, STATUSES[code], parts


def record_parts(record: bytes) -> List[bytes]:
    """A record with its length prefix, as the writes to make (one, or two for a large
    record, which is not copied to prepend its size).  Records of ``HUGE_RECORD`` bytes
    or more go through ``Connection.send_bytes`` instead."""
    if len(record) > 16384:
        return [_SIZE.pack(len(record)), record]
    return [_SIZE.pack(len(record)) + record]


class PipeWriter:
    """Messages framed as ``Connection.send_bytes`` frames them, written to a pipe set
    non-blocking: what the pipe cannot take yet waits here, in order, and goes on as
    the pipe polls writable again (``flush``).  Its owner polls ``fd`` for writing
    while ``waiting``; the bytes of a message are never copied to wait."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._unsent: Deque[memoryview] = deque()

    @property
    def waiting(self) -> bool:
        return bool(self._unsent)

    def send(self, message: Any) -> bool:
        """Write ``message`` (bytes or another buffer) after what waits, as far as the
        pipe takes it now; True if nothing is left waiting.  OSError (a broken pipe)
        if the reader has gone."""
        size = len(message) if type(message) is bytes else memoryview(message).nbytes
        head = _SIZE.pack(size) if size < _LONG_SIZE else \
            _SIZE.pack(-1) + _U64.pack(size)
        unsent = self._unsent
        if unsent:
            unsent.append(memoryview(head))
            unsent.append(memoryview(message).cast("B"))
            return False
        if size < _JOIN_BELOW and type(message) is bytes:  # the common case: one write
            data = head + message
            try:
                written = os.write(self.fd, data)
            except BlockingIOError:
                written = 0
            if written < len(data):
                unsent.append(memoryview(data)[written:])
                return False
            return True
        try:
            written = os.writev(self.fd, (head, message))
        except BlockingIOError:
            written = 0
        if written < len(head):
            unsent.append(memoryview(head)[written:])
            written = 0
        else:
            written -= len(head)
        if written < size:
            unsent.append(memoryview(message).cast("B")[written:])
        return not unsent

    def flush(self) -> bool:
        """Write what waits, as far as the pipe takes it; True once nothing waits.
        OSError (a broken pipe) if the reader has gone."""
        unsent = self._unsent
        while unsent:
            try:
                written = os.writev(self.fd, list(islice(unsent, 64)))
            except BlockingIOError:
                return False
            while written:
                part = unsent[0]
                if written < part.nbytes:
                    unsent[0] = part[written:]
                    break
                written -= part.nbytes
                unsent.popleft()
        return True

    def clear(self) -> None:
        """Forget what waits (its reader is gone)."""
        self._unsent.clear()


class RecordReader:
    """Splits what one read of a pipe returned into whole records, keeping a partial one
    for the next read.  Records are cut from the bytes read (one copy each); only a
    partial record waits in a buffer, and is joined once it is complete."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = 0  # bytes the buffered partial record needs to be complete

    def feed(self, data: bytes) -> List[bytes]:
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []  # (a large record arriving read by read is not copied each time)
            data = bytes(buf)
            buf.clear()
        out: List[bytes] = []
        at, end = 0, len(data)
        while True:
            left = end - at
            if left < 4:
                self._need = 4
                break
            size = _SIZE.unpack_from(data, at)[0]
            head = 4
            if size == -1:
                if left < 12:
                    self._need = 12
                    break
                size = _U64.unpack_from(data, at + 4)[0]
                head = 12
            if left < head + size:
                self._need = head + size
                break
            at += head
            out.append(data[at:at + size])
            at += size
        if at < end:
            buf += memoryview(data)[at:]
        return out


def read_records(fd: int, reader: RecordReader, size: int) -> Optional[List[bytes]]:
    """The whole records one read of ``fd`` completes; None at EOF."""
    data = os.read(fd, size)
    if not data:
        return None
    return reader.feed(data)
