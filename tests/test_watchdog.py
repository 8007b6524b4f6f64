"""The watchdog that ends a killed driver's processes: its note of them (a plain rule, on real
processes) and the whole path through ``python -m pipeline.watchdog`` with a process tree shaped
as Ray's (a child that dies with the driver and leaves its own child behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.watchdog import descendants, note
from procs import alive

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the watchdog reads /proc (Linux)")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sleepers():
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_a_scan_that_misses_a_live_process_does_not_drop_it_from_the_note(sleepers):
    a, b = sleepers
    scan = descendants(os.getpid())
    assert {a.pid, b.pid} <= set(scan)
    # The scan that races the driver's death finds nothing below it.
    assert {a.pid, b.pid} <= set(note(scan, {}))


def test_ended_processes_and_reused_pids_leave_the_note(sleepers):
    a, b = sleepers
    noted = note({}, descendants(os.getpid()))
    a.kill()
    a.wait()
    noted[b.pid] = "1"  # b's pid, as if reused by a process that started at another time
    kept = note(noted, {})
    assert a.pid not in kept and b.pid not in kept


_DRIVER = textwrap.dedent("""
    import ctypes, subprocess, sys, time
    from pipeline.watchdog import Watchdog
    # A 'raylet': dies with this driver (as Ray's do), leaving its own child, the 'agent', behind.
    raylet = subprocess.Popen([sys.executable, "-c", '''
    import ctypes, subprocess, sys, time
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(agent.pid, flush=True)
    time.sleep(60)
    '''], stdout=subprocess.PIPE, text=True)
    agent = raylet.stdout.readline().strip()
    Watchdog.start()
    time.sleep(3.0)  # the watchdog notes the tree at least twice
    print(raylet.pid, agent, flush=True)
    time.sleep(60)
""")


def test_killing_the_driver_ends_what_it_left_behind_within_seconds():
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        raylet, agent = (int(x) for x in driver.stdout.readline().split())
        assert alive(raylet) and alive(agent)
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (alive(raylet) or alive(agent)):
            time.sleep(0.1)
        left = [p for p in (raylet, agent) if alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, "the watchdog left the driver's processes running"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
