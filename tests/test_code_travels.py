"""The user's own modules reach remote workers that lack them, with no call from the user.

The broker and the agent run from the command line in an empty folder with no PYTHONPATH
(the way README "Two machines" starts them); the client is a script in a project folder
with a module, a package with relative imports, and a module only a task imports.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import Cluster

PROJECT = {
    "mymod.py": '''
        VERSION = "one"


        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y

            def __eq__(self, other):
                return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


        def double(x):
            return 2 * x


        def make_point(x):
            return Point(x, -x)


        def fail(x):
            raise ValueError(f"bad {x}")  # the line the user sees


        def lazy(x):
            import lazymod  # the client never imports it
            return lazymod.triple(x)


        def version():
            return VERSION


        def needs_missing():
            import zmqexec_no_such_package  # noqa: F401


        def who_is_iniconfig():
            import iniconfig  # installed on the worker; the project's own comes first
            return iniconfig.WHO
    ''',
    "lazymod.py": '''
        def triple(x):
            return 3 * x
    ''',
    "iniconfig.py": '''
        WHO = "the user's iniconfig"
    ''',
    "pkg/__init__.py": '''
        from .sub import inc
    ''',
    "pkg/sub.py": '''
        from . import consts


        def inc(x):
            return x + consts.STEP
    ''',
    "pkg/consts.py": '''
        STEP = 1
    ''',
    "client.py": '''
        import json
        import sys
        import traceback

        import mymod
        import pkg
        from zmqexec import ZMQExecutor


        def main_fail():
            raise RuntimeError("from main")  # the script's own line


        def outcome(fut):
            try:
                return ["ok", fut.result(timeout=60)]
            except Exception as exc:
                return [type(exc).__name__, "".join(traceback.format_exception(exc))]


        with ZMQExecutor(address=sys.argv[1]) as ex:
            out = {
                "submit": outcome(ex.submit(mymod.double, 21)),
                "map": list(ex.map(pkg.inc, range(5), timeout=60)),
                "lazy": outcome(ex.submit(mymod.lazy, 2)),
                "module traceback": outcome(ex.submit(mymod.fail, 1)),
                "main traceback": outcome(ex.submit(main_fail)),
                "missing": outcome(ex.submit(mymod.needs_missing)),
                "shadow": outcome(ex.submit(mymod.who_is_iniconfig)),
                "version": outcome(ex.submit(mymod.version)),
            }
            point = ex.submit(mymod.make_point, 3).result(timeout=60)
            out["point"] = type(point) is mymod.Point and point == mymod.Point(3, -3)
        print(json.dumps(out))
    ''',
}

OTHER = {  # another program, with no mymod of its own
    "other.py": '''
        def import_mymod():
            import mymod
            return mymod.VERSION
    ''',
    "client.py": '''
        import sys
        import other
        from zmqexec import ZMQExecutor

        with ZMQExecutor(address=sys.argv[1]) as ex:
            try:
                print(ex.submit(other.import_mymod).result(timeout=60))
            except ModuleNotFoundError as exc:
                print("ModuleNotFoundError", exc.name)
    ''',
}


def write(folder, files):
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


def no_pythonpath():
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture
def cluster(tmp_path):
    """A broker and one agent with one task process (so every client's tasks meet in the
    same process), run in an empty folder."""
    empty = tmp_path / "empty"
    empty.mkdir()
    c = Cluster(agents=1, nprocs=1, env=no_pythonpath(), cwd=str(empty))
    yield c
    c.close()


def run_client(folder, address):
    proc = subprocess.run([sys.executable, "client.py", address], cwd=folder,
                          env=no_pythonpath(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_the_users_own_modules_travel_to_remote_workers(tmp_path, cluster):
    project = tmp_path / "project"
    write(project, PROJECT)
    out = json.loads(run_client(project, cluster.address))
    assert out["submit"] == ["ok", 42]
    assert out["map"] == [1, 2, 3, 4, 5]  # a package with relative imports
    assert out["lazy"] == ["ok", 6]  # a module only a task imports
    assert out["point"] is True  # a class keeps its identity both ways
    assert out["shadow"] == ["ok", "the user's iniconfig"]
    assert out["version"] == ["ok", "one"]

    kind, text = out["module traceback"]  # frames of a shipped module: file, line, source
    assert kind == "ValueError"
    assert f'File "{project}/mymod.py", line 21, in fail' in text, text
    assert 'raise ValueError(f"bad {x}")  # the line the user sees' in text, text

    kind, text = out["main traceback"]  # and of a function of the script's __main__
    assert kind == "RuntimeError"
    assert f'File "{project}/client.py", line 11, in main_fail' in text, text
    assert 'raise RuntimeError("from main")  # the script\'s own line' in text, text

    kind, text = out["missing"]  # an installed package is never shipped: say so
    assert kind == "ModuleNotFoundError"
    assert "No module named 'zmqexec_no_such_package' on worker host" in text, text
    assert "install 'zmqexec_no_such_package' on the workers" in text, text


def test_code_never_leaks_into_another_clients_tasks_nor_an_old_version(tmp_path, cluster):
    project = tmp_path / "project"
    write(project, PROJECT)
    assert json.loads(run_client(project, cluster.address))["version"] == ["ok", "one"]

    other = tmp_path / "other"  # the same task process imported mymod for the first one
    write(other, OTHER)
    assert run_client(other, cluster.address) == "ModuleNotFoundError mymod"

    (project / "mymod.py").write_text(  # a newer run of the first program
        (project / "mymod.py").read_text().replace('VERSION = "one"', 'VERSION = "two"'))
    assert json.loads(run_client(project, cluster.address))["version"] == ["ok", "two"]


def test_own_modules_over_the_cap_are_refused_with_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "big.py").write_text("DATA = " + repr("x" * (3 << 20)) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from zmqexec.client.modules import OwnModules

    modules = OwnModules({}, cap=2 << 20)
    with pytest.raises(ValueError, match=r"over the 2 MiB .*\(largest: big \(3\.0 MiB\)"
                                         r".*install the large ones on the workers"):
        modules.mid()
    with pytest.raises(ValueError):  # every submit, until sys.path changes
        modules.mid()
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    (tmp_path / "big.py").unlink()
    assert modules.mid().startswith("m")


def test_what_is_shipped_is_the_users_own_and_no_more(tmp_path, monkeypatch):
    write(tmp_path, {"mine.py": "X = 1\n", "pkgx/__init__.py": "", "pkgx/a.py": "",
                     "notes.txt": "", "nspkg/b.py": "", "json.py": ""})
    monkeypatch.syspath_prepend(str(tmp_path))
    from zmqexec.client.modules import OwnModules
    from zmqexec.wire.modules import decode_modules

    blobs = {}
    mid = OwnModules(blobs).mid()
    tops = decode_modules(blobs[mid])
    assert {"mine", "pkgx"} <= set(tops)
    assert set(tops["pkgx"].files) == {"pkgx/__init__.py", "pkgx/a.py"}
    assert "nspkg" not in tops  # a namespace package: not shipped
    assert "json" not in tops  # a standard library name never is
    for never in ("zmqexec", "pytest", "zmq", "os"):  # installed, or the standard library
        assert never not in tops
