"""Which modules are the user's own, and the blob that carries them to remote workers.

A module is the user's own when it lies in a folder of ``sys.path`` (or was imported from
a file) outside the standard library's and site-packages' folders, as ``sysconfig`` and
``site`` name them; a package counts as a whole (so a package installed in editable mode
counts: its files are the user's).  What site-packages holds, the standard library's
names and zmqexec with what it runs on are never shipped: a worker must have them.  Only
``.py`` sources travel; a namespace package (no ``__init__.py``) does not.

The scan runs at the first remote submit and again whenever ``sys.path`` changes, so a
worker gets the code as it is on disk then; it costs one listing per folder and a read of
each shipped file.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import site
import sys
import sysconfig
from typing import Dict, Iterator, List, Optional, Set, Tuple

from ..wire.modules import MODULES_CAP, Shipped, encode_modules
from ..wire.serialization import blob_id

log = logging.getLogger(__name__)
# zmqexec and what its task processes run on: a local module of one of these names would
# replace them there
NEVER = frozenset(("__main__", "zmqexec", "cloudpickle", "zmq"))


def _system_folders() -> List[str]:
    """The standard library's and site-packages' folders, real paths, with a separator."""
    found: Set[str] = set()
    for base in ({}, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
        paths = sysconfig.get_paths(vars=base) if base else sysconfig.get_paths()
        for name in ("stdlib", "platstdlib", "purelib", "platlib"):
            if paths.get(name):
                found.add(paths[name])
    getsitepackages = getattr(site, "getsitepackages", None)
    if getsitepackages is not None:
        found.update(getsitepackages())
    user_site = site.getusersitepackages()
    if isinstance(user_site, str):
        found.add(user_site)
    return sorted({os.path.join(os.path.realpath(p), "") for p in found})


class OwnModules:
    """The current blob of the client's own modules, rebuilt when ``sys.path`` changes;
    ``blobs`` (the link's blobs by id) gets each blob made."""

    def __init__(self, blobs: Dict[str, bytes], cap: int = MODULES_CAP) -> None:
        self.blobs = blobs
        self.cap = cap
        self._path: Optional[List[str]] = None
        self._mid = ""
        self._error: Optional[ValueError] = None

    def mid(self) -> str:
        """The blob id to put on a task ("" if the client has no modules of its own)."""
        if sys.path != self._path:
            self._path = list(sys.path)
            self._error = None
            try:
                self._mid = self._build()
            except ValueError as exc:
                self._error = exc
        if self._error is not None:
            raise self._error
        return self._mid

    def _build(self) -> str:
        tops = dict(own_modules())
        if not tops:
            return ""
        blob = encode_modules(tops)
        if len(blob) > self.cap:
            sizes = sorted(((sum(len(t) for t in top.files.values()), name)
                            for name, top in tops.items()), reverse=True)
            largest = ", ".join(f"{name} ({size / 2**20:.1f} MiB)" for size, name in sizes[:3])
            cap = f"{self.cap >> 20} MiB" if self.cap % (1 << 20) == 0 else \
                f"{self.cap} bytes"
            raise ValueError(
                f"your own modules come to {len(blob) / 2**20:.1f} MiB of source, over the "
                f"{cap} zmqexec ships to remote workers (largest: "
                f"{largest}): install the large ones on the workers (installed packages are "
                "never shipped), or take their folder off sys.path")
        mid = "m" + blob_id(blob)
        self.blobs[mid] = blob
        log.debug("shipping %d modules of your own to remote workers (%d bytes): %s",
                  len(tops), len(blob), ", ".join(sorted(tops)))
        return mid


def own_modules() -> Iterator[Tuple[str, Shipped]]:
    """(top-level name, its sources) of every module of the user's own, first on
    ``sys.path`` first, then those imported from files outside it."""
    system = _system_folders()
    skip = NEVER | set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    seen: Set[str] = set()

    def own(folder: str) -> bool:
        real = os.path.join(os.path.realpath(folder), "")
        return not any(real.startswith(p) for p in system)

    for entry in sys.path:
        folder = entry or os.getcwd()
        if not os.path.isdir(folder) or not own(folder):
            continue
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            top = name[:-3] if name.endswith(".py") else name
            if not top.isidentifier() or top in skip or top in seen:
                continue
            shipped = _sources(folder, name)
            if shipped is not None:
                seen.add(top)
                yield top, shipped
    for name, module in list(sys.modules.items()):
        if "." in name or name in skip or name in seen:
            continue
        path = getattr(module, "__file__", None)
        if not isinstance(path, str) or not path.endswith(".py") or \
                not own(os.path.dirname(path)):
            continue
        package = os.path.basename(path) == "__init__.py"
        folder = os.path.dirname(os.path.dirname(path) if package else path)
        shipped = _sources(folder, name if package else os.path.basename(path))
        if shipped is not None:
            seen.add(name)
            yield name, shipped


def _sources(folder: str, name: str) -> Optional[Shipped]:
    """The files of module ``name`` (``x.py``) or package ``name`` (a folder with an
    ``__init__.py``) in ``folder``; None if it is neither."""
    path = os.path.join(folder, name)
    files: Dict[str, str] = {}
    if name.endswith(".py"):
        if not os.path.isfile(path):
            return None
        text = _read(path)
        if text is None:
            return None
        files[name] = text
    elif os.path.isfile(os.path.join(path, "__init__.py")):
        for where, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d.isidentifier() and d != "__pycache__")
            for file in sorted(names):
                if file.endswith(".py"):
                    text = _read(os.path.join(where, file))
                    if text is not None:
                        rel = os.path.relpath(os.path.join(where, file), folder)
                        files[rel.replace(os.sep, "/")] = text
    else:
        return None
    return Shipped(os.path.abspath(folder), files)


def _read(path: str) -> Optional[str]:
    """A source file's text, decoded as Python decodes it (its coding line, else UTF-8)."""
    try:
        with open(path, "rb") as f:
            return importlib.util.decode_source(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
