"""A watchdog that ends the Ray processes of a run whose driver was killed (SIGKILL, the OOM killer).

Ray ties its gcs and raylet to the process that started them, but the raylet's agents (the
dashboard and runtime-env agents, started even without the dashboard) notice their raylet's
death only after trying to report it to the gcs, which is gone too: they linger about a minute.
The driver starts this watchdog (``python -m pipeline.watchdog``) as it starts Ray and holds the
write end of its stdin. Every second the watchdog adds the driver's descendants (from /proc) to
its note and drops the noted processes that have ended; a scan never removes a live process from
the note, so one that races the driver's death (and finds the driver's children already
reparented) loses nothing. When its stdin reaches end-of-file without a ``stop`` line, the
driver is gone, and it ends every noted process (SIGTERM, then SIGKILL after a second), each
checked by its start time so that a reused pid is never hit. Linux only (/proc); elsewhere it
is not started.
"""

from __future__ import annotations

import collections
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["Watchdog", "descendants", "note"]


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state is [0], ppid [1], start time [19])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid``, with its start time."""
    children: dict[int, list[tuple[int, str]]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(entry.name)
            if fields and fields[0] != "Z":
                children[int(fields[1])].append((int(entry.name), fields[19]))
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child, start in children.get(todo.pop(), []):
            out[child] = start
            todo.append(child)
    return out


def _same(pid: int, start: str) -> bool:
    """Whether ``pid`` is still the live process that started at ``start``."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z" and fields[19] == start


def note(noted: dict[int, str], scan: dict[int, str]) -> dict[int, str]:
    """``noted`` with the processes of ``scan`` added and those that have ended dropped."""
    kept = {pid: start for pid, start in noted.items() if _same(pid, start)}
    kept.update(scan)
    return kept


def _end(procs: dict[int, str], grace_s: float = 1.0) -> None:
    """SIGTERM each process still the one noted (same start time), SIGKILL those left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, start in procs.items():
            if _same(pid, start):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_same(p, s) for p, s in procs.items()):
            time.sleep(0.05)


def _watch(driver: int, every_s: float = 1.0) -> None:
    me = os.getpid()
    noted: dict[int, str] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], every_s)
        if ready:
            line = sys.stdin.readline()
            if line.strip() == "stop":
                return  # the driver ended its run and stopped Ray itself
            if not line:  # end-of-file: the driver is gone
                noted.pop(me, None)
                _end(noted)
                return
        noted = note(noted, descendants(driver))


class Watchdog:
    """The driver's handle: :meth:`start` after Ray started, :meth:`stop` after ``ray.shutdown()``."""

    def __init__(self, proc: Any) -> None:
        self._proc = proc

    @classmethod
    def start(cls) -> "Watchdog | None":
        """A watchdog for this process, or ``None`` where /proc is missing."""
        if not Path("/proc/self/stat").exists():
            return None
        # Its own session: a Ctrl-C at the terminal is the driver's to handle, not the watchdog's.
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.watchdog", str(os.getpid())], stdin=subprocess.PIPE,
                                text=True, start_new_session=True)
        return cls(proc)

    def stop(self) -> None:
        try:
            self._proc.stdin.write("stop\n")
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
