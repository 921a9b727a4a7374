"""The package's floors: imports go down only, and there is no import circle anywhere.

Every module's imports are read with ``ast`` (``TYPE_CHECKING`` and function-level ones
included), so the rule holds for what the code says, not only for what one run loads.
``from . import x`` counts as importing the module ``x``, not its package.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Dict, List, Set

import pytest

import zmqexec
from conftest import ROOT

PACKAGE = os.path.dirname(zmqexec.__file__)

# Floors, bottom up: a module may import its own floor's modules and anything below.
FLOORS = [
    {"zmqexec._version", "zmqexec.errors"},
    {"zmqexec.wire"},
    {"zmqexec.broker", "zmqexec.agent", "zmqexec.client"},
    {"zmqexec.local"},
    {"zmqexec.executor", "zmqexec.cli", "zmqexec", "zmqexec.__main__"},
]
SIBLINGS = {"zmqexec.broker", "zmqexec.agent", "zmqexec.client"}  # never import one another


def module_names() -> Dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(PACKAGE))
            dotted = rel[:-3].replace(os.sep, ".")
            if dotted.endswith(".__init__"):
                dotted = dotted[: -len(".__init__")]
            found[dotted] = os.path.join(folder, name)
    return found


def imports_of(name: str, path: str, modules: Set[str]) -> Set[str]:
    """The package's modules that ``name`` imports anywhere in its file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    here = name if is_package else name.rpartition(".")[0]
    out: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:  # ``from pkg import mod`` imports the module
                candidate = f"{origin}.{alias.name}"
                out.add(candidate if candidate in modules else origin)
    return {m for m in out if m in modules and m != name}


def floor_of(name: str) -> int:
    for level, members in enumerate(FLOORS):
        for member in members:
            if name == member or name.startswith(member + ".") and member != "zmqexec":
                return level
    raise AssertionError(f"{name} is on no floor: add it to FLOORS in this test")


def group_of(name: str) -> str:
    return ".".join(name.split(".")[:2])


def graph() -> Dict[str, Set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_every_module_is_on_a_floor():
    for name in graph():
        floor_of(name)


def test_imports_only_go_down():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if floor_of(target) > floor_of(name):
                wrong.append(f"{name} -> {target}")
            elif floor_of(target) == floor_of(name) and group_of(name) in SIBLINGS and \
                    group_of(target) in SIBLINGS and group_of(target) != group_of(name):
                wrong.append(f"{name} -> {target} (sibling roles)")
    assert not wrong, "imports that do not go down:\n" + "\n".join(sorted(wrong))


def find_circle(edges: Dict[str, Set[str]]) -> List[str]:
    """One import circle as a path of modules, or [] if there is none."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_there_is_no_import_circle():
    circle = find_circle(graph())
    assert not circle, "import circle: " + " -> ".join(circle)


def test_the_circle_finder_finds_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("command", [["broker", "--bind", "ipc://{dir}/b"],
                                     ["worker", "ipc://{dir}/b", "--nprocs", "1"]])
def test_the_cluster_commands_never_import_the_client_side(command, tmp_path):
    """``zmqexec broker`` and ``zmqexec worker`` start without the executor or client."""
    code = ("import runpy, sys; sys.argv = ['zmqexec', *sys.argv[1:]]\n"
            "import zmqexec.cli as cli\n"
            "parser = cli.build_parser(); args = parser.parse_args(sys.argv[1:])\n"
            "runner = {'broker': 'run_broker', 'worker': 'run_worker'}[args.command]\n"
            "from zmqexec.broker import loop; from zmqexec.agent import loop as agent_loop\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('zmqexec.client', "
            "'zmqexec.executor', 'zmqexec.local')))\n"
            "print(bad)\n")
    args = [a.format(dir=tmp_path) for a in command]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
