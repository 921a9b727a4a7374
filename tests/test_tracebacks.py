"""A task's traceback reads like a local one: frames of functions defined in ``__main__``
(which travel by value) name the user's file and line and show the source line, even
where that file does not exist (its source travels with the function)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Optional

import pytest

from conftest import ROOT, Cluster

SCRIPT = textwrap.dedent('''
    import os, sys, traceback
    from zmqexec import ZMQExecutor

    def helper():
        raise RuntimeError(123)  # some comment

    def raise_123():
        helper()

    if __name__ == "__main__":
        address = sys.argv[1] if len(sys.argv) > 1 else None
        ex = ZMQExecutor(address=address) if address else ZMQExecutor(1)
        with ex:
            ex.submit(abs, 1).result(timeout=60)  # workers up
            fut = ex.submit(raise_123)
            os.remove(__file__)  # from here on, only the source sent with it is left
            try:
                fut.result(timeout=60)
            except RuntimeError as exc:
                print(exc.__cause__)
''')


@pytest.mark.parametrize("mode", ["embedded", "remote"])
def test_a_main_function_s_traceback_names_its_file_line_and_source(mode, tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    cluster: Optional[Cluster] = Cluster(agents=1, nprocs=1) if mode == "remote" else None
    try:
        args = [cluster.address] if cluster is not None else []
        done = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)
    finally:
        if cluster is not None:
            cluster.close()
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert f'File "{script}", line 6, in helper' in text, text
    assert "raise RuntimeError(123)  # some comment" in text, text
    assert f'File "{script}", line 9, in raise_123' in text, text
    assert "<dynamic-code>" not in text, text
