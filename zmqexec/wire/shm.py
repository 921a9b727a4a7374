"""Large arguments through shared memory, between an embedded client and its task processes.

An out-of-band buffer of an argument (a numpy array, a large ``bytes``) normally crosses
client -> broker -> agent -> task process as a frame, and every hop copies it through the
kernel.  In embedded mode all those processes share one machine, so ``Spill`` writes each
buffer of ``SPILL_MIN`` bytes or more once into a file of a private 0700 directory on
``/dev/shm`` (a RAM file system) and sends its path instead; the task process maps the file
copy-on-write, so a numpy argument is used in place and a task that changes its argument
changes only its own copy.  The copy into the file is also the snapshot taken at
``submit``, so changing an array afterwards cannot change what the task sees.

Results take the same road back (``ResultSpill``, in the task process): a large buffer
of a result is written into the same directory, and the client maps the file as it
unpickles the result (``unspill(..., inside=the directory)``: a path from anywhere else is
refused).  The node owns those files as soon as the result reaches it (``own_result``:
its path frames become ``SpillRef``s), so a file lives while anyone holds the result's
frames: the key's held result (a dependent task may still need it, long after the client
unpickled its own copy), or the client's pending record.  Every write first checks that
the file system has room for it (a container's ``/dev/shm`` is often 64 MiB; a full one
is an error, and a mapped file that cannot be backed is a SIGBUS): without room, the
buffer travels as a frame.

The first frame says which frames are paths: ``b"M"`` + a JSON list of their indices +
``b"\\n"`` + the pickle (a pickle itself starts with ``b"\\x80"``, so the two cannot be
confused).  A file lives as long as its ``SpillRef`` frame: the client's pending record
holds the frames until the key's future completes, so a retried or resubmitted task still
finds its file, and dropping the record deletes it.  The directory is removed by
``Spill.close``, or by the zygote if the client dies first.
"""
from __future__ import annotations

import itertools
import json
import logging
import mmap
import os
import shutil
import tempfile
from typing import Any, List, Optional, Sequence

log = logging.getLogger(__name__)
SPILL_MIN = 1 << 20
MARK = 0x4D  # b"M"
HEADROOM = 16 << 20  # bytes a spill leaves free in its file system


def has_room(directory: str, nbytes: int) -> bool:
    """Whether ``directory``'s file system can take ``nbytes`` more and keep some left."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize >= nbytes + HEADROOM


def _write_file(path: str, view: memoryview) -> None:
    """Write ``view`` into a new file at ``path`` (mode 0600); OSError if it cannot."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = view.cast("B")
        written = 0
        while written < view.nbytes:
            written += os.write(fd, view[written:])
    except OSError:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


class SpillRef(bytes):
    """A frame holding a spilled buffer's path; deleting the last reference frees the file.

    The frame is the UTF-8 path, so it travels like any small frame; ``__del__`` ties the
    file's life to the client's record of the task without any bookkeeping by key.  Only
    the process that wrote the file deletes it: a forked child that inherits the record
    and exits must not take a pending task's argument away.
    """

    owner = 0

    def __del__(self) -> None:
        if self.owner == os.getpid():
            try:
                os.unlink(self)
            except OSError:
                pass


class Spill:
    """Writes large argument buffers into files of one private directory."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(prefix="zmqexec-spill-", dir=base)  # mode 0700
        self._names = itertools.count()
        self.broken = False

    def spill(self, frames: List[Any]) -> List[Any]:
        """``frames`` (``[pickle, *buffers]``) with each large buffer moved into a file.

        A write that fails (a full ``/dev/shm``) keeps that buffer a frame: slower, never
        lost.  Writable buffers ``serialization`` left uncopied for this are copied then."""
        spilled: List[int] = []
        out = list(frames)
        for index in range(1, len(frames)):
            view = memoryview(frames[index])
            if view.nbytes < SPILL_MIN:
                continue
            ref = None if self.broken else self._write(view)
            if ref is not None:
                out[index] = ref
                spilled.append(index)
            elif not view.readonly:
                out[index] = bytes(view)
        if spilled:
            out[0] = b"M" + json.dumps(spilled).encode() + b"\n" + bytes(frames[0])
        return out

    def _write(self, view: memoryview) -> Optional[SpillRef]:
        if not has_room(self.dir, view.nbytes):
            log.info("no room in %s for a %d-byte argument: sending it as a frame",
                     self.dir, view.nbytes)
            return None
        path = os.path.join(self.dir, str(next(self._names)))
        try:
            _write_file(path, view)
        except OSError as exc:
            log.warning("cannot spill a large argument to %s (%s): sending it as a frame",
                        self.dir, exc)
            self.broken = True
            return None
        ref = SpillRef(path.encode())  # from here on, dropping ``ref`` deletes the file
        ref.owner = os.getpid()
        return ref

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ResultSpill:
    """The task process's side: large result buffers into the embedded client's directory
    (``dir`` is set from the client's context; None in remote mode: no spill)."""

    def __init__(self) -> None:
        self.dir: Optional[str] = None
        self._names = itertools.count()

    def spill(self, frames: List[Any]) -> List[Any]:
        """``frames`` (``[pickle, *buffers]``) with each large buffer moved into a file
        when there is room; the others stay frames."""
        if self.dir is None:
            return frames
        spilled: List[int] = []
        out = list(frames)
        for index in range(1, len(frames)):
            view = memoryview(frames[index])
            if view.nbytes < SPILL_MIN or not has_room(self.dir, view.nbytes):
                continue
            path = os.path.join(self.dir, f"r{os.getpid()}-{next(self._names)}")
            try:
                _write_file(path, view)
            except OSError as exc:
                log.warning("cannot write a large result to %s (%s): sending it as a frame",
                            self.dir, exc)
                continue
            out[index] = path.encode()
            spilled.append(index)
        if spilled:
            out[0] = b"M" + json.dumps(spilled).encode() + b"\n" + bytes(frames[0])
        return out


def _manifest(view: memoryview, nbuffers: int) -> "tuple[Any, int]":
    """The indices a spilled first frame lists (``b"M" [i, ...] b"\\n"``, parsed but not
    checked), and where its pickle starts after the newline."""
    end = bytes(view[:16 + 8 * nbuffers]).index(b"\n")
    return json.loads(bytes(view[1:end])), end


def own_result(frames: List[Any], at: int, count: int) -> None:
    """The node takes ownership of a spilled result (``frames[at:at + count]``, in
    place): its path frames become ``SpillRef``s of this process, so the file goes when
    the last holder of the frames lets them go."""
    data = frames[at]
    if count < 2 or not len(data) or data[0] != MARK:
        return
    for index in _manifest(memoryview(data), count - 1)[0]:
        if type(index) is int and 1 <= index < count:
            ref = SpillRef(bytes(frames[at + index]))
            ref.owner = os.getpid()
            frames[at + index] = ref


def inline(frames: Sequence[Any]) -> Sequence[Any]:
    """A result's frames with its spilled buffers read back into frames (for a peer of
    another process, which has no way into this node's directory); others as they are."""
    if len(frames) < 2 or not len(frames[0]) or frames[0][0] != MARK:
        return frames
    data, buffers = unspill(frames[0], frames[1:])
    return [data, *buffers]


def unspill(data: Any, buffers: Sequence[Any], inside: Optional[str] = None
            ) -> "tuple[Any, List[Any]]":
    """The pickle and buffers of frames made by ``Spill.spill`` or ``ResultSpill.spill``.

    Spilled buffers are mapped copy-on-write: writable, private, and backed by the file's
    pages rather than a copy.  With ``inside`` (a client reading a result), every path
    must be a file of that directory.  Nothing is unlinked here: the file belongs to the
    frame that names it (``own_result``), and the mapping outlives it."""
    view = memoryview(data)
    indices, end = _manifest(view, len(buffers))
    out = list(buffers)
    for index in indices:
        if type(index) is not int or not 1 <= index <= len(out):
            raise ValueError("malformed spill manifest")
        path = bytes(out[index - 1])
        if inside is not None and os.path.dirname(os.path.realpath(path)) != \
                os.path.realpath(inside).encode():
            raise ValueError("a spilled result names a file outside this client's directory")
        with open(path, "rb") as file:
            out[index - 1] = memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY))
    return view[end + 1:], out
