"""A task process's finder of shipped modules, in this process: which module a name means
while each blob is in use."""
import importlib
import sys

import pytest

from zmqexec.agent.modules import ShippedModules
from zmqexec.wire.modules import Shipped, encode_modules


@pytest.fixture
def finder(tmp_path, monkeypatch):
    """A finder, and a module ``zxmod`` 'installed' on this host (on sys.path)."""
    (tmp_path / "zxmod.py").write_text("WHO = 'installed'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    shipped = ShippedModules()
    yield shipped
    if shipped in sys.meta_path:
        sys.meta_path.remove(shipped)
    for name in [n for n in sys.modules if n.partition(".")[0] in ("zxmod", "zxpkg")]:
        del sys.modules[name]


def blob(who, extra=None):
    files = {"zxmod.py": f"WHO = {who!r}\nCOUNT = []\n"}
    return encode_modules({"zxmod": Shipped("/client/project", files), **(extra or {})})


def test_shipped_modules_come_first_and_each_blob_keeps_its_own(finder):
    import zxmod
    assert zxmod.WHO == "installed"  # imported before any task of a client
    blobs = {"mA": blob("A"), "mB": blob("B")}

    finder.use("mA", blobs)
    a = importlib.import_module("zxmod")
    assert a.WHO == "A" and a.__file__ == "/client/project/zxmod.py"
    a.COUNT.append(1)  # state a task left

    finder.use("mB", blobs)  # another client's blob: its own module, no trace of A's
    assert importlib.import_module("zxmod").WHO == "B"

    finder.use("", blobs)  # a task with nothing shipped: the installed module again
    assert importlib.import_module("zxmod") is zxmod

    finder.use("mA", blobs)  # A's module comes back as A's tasks left it
    assert importlib.import_module("zxmod") is a and a.COUNT == [1]


def test_a_shipped_package_imports_its_submodules_relatively(finder):
    pkg = Shipped("/client/project", {
        "zxpkg/__init__.py": "from .sub import VALUE\n",
        "zxpkg/sub.py": "from . import deep\nVALUE = deep.X + 1\n",
        "zxpkg/deep.py": "X = 41\n",
    })
    finder.use("mP", {"mP": encode_modules({"zxpkg": pkg})})
    module = importlib.import_module("zxpkg")
    assert module.VALUE == 42
    assert module.__path__ == ["/client/project/zxpkg"]
    import linecache
    assert linecache.getline("/client/project/zxpkg/deep.py", 1) == "X = 41\n"
