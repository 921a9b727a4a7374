"""The blob that carries a client's own modules to remote task processes.

A client in remote mode sends the sources of its own top-level modules and packages (the
ones outside the standard library and site-packages) as one blob, named like a pickled
function by its content hash (the ``mid`` of each task row).  The broker and agents keep it
as they keep function blobs; only task processes decode it.  It is JSON, not a pickle::

    {"v": 1, "m": {top-level name: {"root": the folder on the client's sys.path,
                                    "files": {path under root: source text}}}}

A plain module has one file (``name.py``); a package has ``name/__init__.py`` and every
``.py`` file below it.
"""
from __future__ import annotations

import json
from typing import Dict, NamedTuple

FORMAT = 1
MODULES_CAP = 16 << 20  # bytes of source a client may ship in all


class Shipped(NamedTuple):
    """One top-level module or package as shipped: where it lay, and its files."""

    root: str
    files: Dict[str, str]


def encode_modules(tops: Dict[str, Shipped]) -> bytes:
    return json.dumps({"v": FORMAT, "m": {name: {"root": top.root, "files": top.files}
                                          for name, top in sorted(tops.items())}},
                      sort_keys=True, separators=(",", ":")).encode()


def decode_modules(blob: bytes) -> Dict[str, Shipped]:
    doc = json.loads(blob)
    if doc.get("v") != FORMAT:
        raise ValueError(f"shipped modules in format {doc.get('v')!r}, not {FORMAT}: "
                         "run the same zmqexec version on clients and workers")
    return {name: Shipped(top["root"], top["files"]) for name, top in doc["m"].items()}
