"""A client's own modules inside a remote task process, imported from the sources it shipped.

``ShippedModules`` is a finder first on ``sys.meta_path``: while a task of a client runs,
the client's top-level names are imported from its sources (so an installed module of the
same name does not shadow the user's), for real: ``import helper`` inside a task works,
classes keep their identity (a ``mymod.Point`` a task returns is the client's
``mymod.Point`` once unpickled there), and frames name the client's file, whose lines
``linecache`` holds, so tracebacks show them although the file is not on this host.

A task process may serve several clients, or runs of one client whose code changed: each
blob (``mid``) has its own set of modules.  Before a task of another blob runs, the
modules of the last one leave ``sys.modules`` (kept aside for a later task of theirs, with
their state) and those of the new one come back, so code of one client never serves
another's task, nor an old version a newer run.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import sys
from collections import OrderedDict
from types import ModuleType
from typing import Dict, Optional, Sequence, Tuple

from ..wire.modules import Shipped, decode_modules

KEPT_ASIDE = 4  # blobs whose imported modules a task process keeps for their next task


class ShippedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finder and loader of the modules of the blob in use (``use``)."""

    def __init__(self) -> None:
        self.mid = ""
        self.tops: Dict[str, Shipped] = {}
        # blobs used before, with the modules their tasks imported: (tops, modules)
        self._aside: "OrderedDict[str, Tuple[Dict[str, Shipped], Dict[str, ModuleType]]]" = \
            OrderedDict()
        self._displaced: Dict[str, ModuleType] = {}  # same-named modules, back afterwards

    def use(self, mid: str, blobs: Dict[str, bytes]) -> None:
        """Serve the modules of blob ``mid`` ("" for none) to the task about to run."""
        if mid == self.mid:
            return
        modules = sys.modules
        mine = {name: module for name, module in modules.items() if self.serves(name)}
        for name in mine:  # what the last blob's tasks imported under its names
            del modules[name]
        if self.mid:
            self._aside[self.mid] = (self.tops, mine)
            while len(self._aside) > KEPT_ASIDE:
                self._aside.popitem(last=False)
        modules.update(self._displaced)
        tops, kept = self._aside.pop(mid, (None, {}))
        self.mid = mid
        self.tops = tops if tops is not None else decode_modules(blobs[mid]) if mid else {}
        # an installed module of the same name, imported for another task, makes way
        self._displaced = {name: module for name, module in modules.items()
                           if self.serves(name)}
        for name in self._displaced:
            del modules[name]
        modules.update(kept)
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)
        importlib.invalidate_caches()

    def serves(self, name: str) -> bool:
        return name.partition(".")[0] in self.tops

    # ---- importlib's finder and loader -------------------------------------------------
    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[ModuleType] = None
                  ) -> Optional[importlib.machinery.ModuleSpec]:
        top = self.tops.get(fullname.partition(".")[0])
        if top is None:
            return None
        stem = fullname.replace(".", "/")
        for rel, package in ((f"{stem}/__init__.py", True), (f"{stem}.py", False)):
            source = top.files.get(rel)
            if source is not None:
                origin = f"{top.root}/{rel}"
                spec = importlib.util.spec_from_loader(fullname, self, origin=origin,
                                                       is_package=package)
                assert spec is not None
                spec.has_location = True  # __file__ is the client's path
                spec.loader_state = source
                if package:
                    spec.submodule_search_locations = [origin.rsplit("/", 1)[0]]
                return spec
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return None  # the default module

    def exec_module(self, module: ModuleType) -> None:
        spec = module.__spec__
        assert spec is not None and spec.origin is not None
        source: str = spec.loader_state
        # no modification time: linecache never drops these lines for a missing file
        linecache.cache[spec.origin] = (len(source), None, source.splitlines(True),
                                        spec.origin)
        code = compile(source, spec.origin, "exec", dont_inherit=True)
        exec(code, module.__dict__)

    def get_source(self, fullname: str) -> Optional[str]:
        """The source of a shipped module (``inspect`` and tracebacks ask for it)."""
        module = sys.modules.get(fullname)
        spec = getattr(module, "__spec__", None)
        return getattr(spec, "loader_state", None) if spec is not None else None


SHIPPED = ShippedModules()
