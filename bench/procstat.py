"""Process accounting from /proc (Linux): CPU seconds, children, resident memory.

Why /proc rather than psutil: the smoke test must run with nothing beyond the ``test``
extra, and /proc gives exactly what is needed: utime+stime of any process of ours (so
the broker's and the agent's CPU can be read from the client), and VmRSS/VmHWM.
"""
import os
from typing import Callable, Dict, Iterable, List, Optional

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
AVAILABLE = os.path.isdir("/proc/self")


def _stat_fields(pid: int) -> Optional[List[str]]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    return text.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> Optional[float]:
    """utime + stime of ``pid`` in seconds (its own threads, not its children); None if gone."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def _threads_sum(pid: int, name: str, value: Callable[[str], Optional[int]]
                 ) -> Optional[int]:
    """The sum over ``pid``'s threads of ``value`` of each one's ``/proc/PID/task/TID/
    name`` file; None if the process is gone or no thread's file told."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total, told = 0, False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                found = value(f.read())
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile (or a kernel without the file)
        if found is not None:
            total += found
            told = True
    return total if told else None


def on_cpu_ns(pid: int) -> Optional[int]:
    """Nanoseconds ``pid``'s threads have run on a CPU (``/proc/PID/task/*/schedstat``):
    exact where utime and stime count whole clock ticks; None if gone or not told."""
    return _threads_sum(pid, "schedstat", lambda text: int(text.split()[0]))


def _voluntary(status: str) -> Optional[int]:
    for line in status.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return None


def sleeps(pid: int) -> Optional[int]:
    """Times ``pid``'s threads have gone to sleep so far (``voluntary_ctxt_switches``):
    each sleep ends with a wake-up, so a round trip's count is the hand-overs it costs
    (on two CPUs, a wake-up of the other CPU each when it idles); None if gone."""
    return _threads_sum(pid, "status", _voluntary)


def children(pid: int) -> List[int]:
    """Live direct children of ``pid``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None and fields[0] != "Z" and int(fields[1]) == pid:
                found.append(int(name))
    return found


def descendants(pid: int) -> List[int]:
    """Live children of ``pid``, their children, and so on."""
    out, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def parent(pid: int) -> Optional[int]:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def snapshot(pids: Iterable[int]) -> Dict[int, float]:
    """CPU seconds of each live pid."""
    out = {}
    for pid in pids:
        cpu = cpu_seconds(pid)
        if cpu is not None:
            out[pid] = cpu
    return out


def cpu_delta(before: Dict[int, float], after: Dict[int, float]) -> float:
    """CPU used between two snapshots; a process that appeared in between counts whole
    (it started at zero), one that ended in between is lost (reaped children's time is
    not attributed to a role)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def _status_kib(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    """This process's resident set size now."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (VmHWM) since start or ``reset_peak_rss``."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
