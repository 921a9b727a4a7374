"""Task functions that wait for a file: how tests hold a task running until they let go.

A file, not an event, because the task runs in another process; the tests create the file
once they have observed what they need while the task is held.
"""
from __future__ import annotations

import os
import time
from typing import Any


def wait_for_file(path: str, value: Any = None, timeout: float = 30) -> Any:
    end = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.005)
    return value
