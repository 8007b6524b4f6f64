"""Stopping a run as a user does: Ctrl-C at a terminal (SIGINT to the whole process group),
twice in quick succession, SIGTERM, and SIGKILL of the driver. The real CLI on the demo session,
a real SUB socket; the run's Ray processes are found through /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from live_peers import free_port
from sinks.protocol import decode
from procs import alive as _alive, descendants as _descendants

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find Ray's processes")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_session(tmp_path_factory) -> Path:
    from sources.demo import write_demo_session

    return write_demo_session(tmp_path_factory.mktemp("demo") / "demo-ego", seconds=10.0)


def _still_alive(pids: set[int], within_s: float) -> list[int]:
    deadline = time.time() + within_s
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return sorted(p for p in pids if _alive(p))


class _Run:
    """``python -m pipeline run`` of the demo session at ``rate`` in its own process group (as a
    shell runs a foreground job), with a SUB socket on its endpoint and its output collected."""

    def __init__(self, tmp_path: Path, session: Path, rate: float, *extra: str) -> None:
        port = free_port()
        config = tmp_path / "run.yaml"
        config.write_text(f"sessions: [{session}]\nmodel: {{config: imagebind_tiny, checkpoint: none, precision: fp32}}\n"
                          f"publish: {{endpoint: 'tcp://127.0.0.1:{port}', heartbeat_s: 0.5}}\nreplay: {{rate: {rate}}}\n")
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVTIMEO, 200)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.sock.subscribe(b"")
        self.messages: list = []
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config), *extra], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def receive(self, until: float) -> None:
        """Collect messages until ``until`` (time.time()) or the run ends."""
        while time.time() < until:
            try:
                self.messages.append(decode(self.sock.recv_multipart()))
            except zmq.Again:
                if self.proc.poll() is not None:
                    return

    def wait_for_embeddings(self, n: int, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline and self.proc.poll() is None:
            self.receive(time.time() + 0.5)
            if sum(m.topic.startswith("emb/") for m in self.messages) >= n:
                return
        raise AssertionError(f"no {n} embeddings within {timeout_s} s:\n{self.output}")

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground group

    def finish(self, timeout_s: float) -> int:
        try:
            self.proc.wait(timeout=timeout_s)
            self.receive(time.time() + 1.0)
            self._reader.join(timeout=10)
            return self.proc.returncode
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.sock.close(linger=0)


def test_ctrl_c_drains_and_the_summary_the_end_message_and_the_exit_code_say_interrupted(tmp_path, demo_session):
    run = _Run(tmp_path, demo_session, rate=0.5)
    run.wait_for_embeddings(3)
    run.ctrl_c()
    code = run.finish(timeout_s=120)
    out = run.output
    assert code == 130, out
    assert "Traceback" not in out, out
    assert "demo-ego: INTERRUPTED after " in out, out
    ends = [m.payload for m in run.messages if m.topic == "ctl/demo-ego" and m.payload["event"] == "end"]
    assert len(ends) == 1, out
    end = ends[0]
    assert end["interrupted"] is True
    assert {"counts", "windows", "dropped", "seq", "t_publish"} <= set(end)
    windows = end["windows"]
    assert 0 < windows < 10, "stopped before the end of the 10 s session"
    assert f"INTERRUPTED after {windows} windows" in out


def test_sigterm_is_an_interrupt_too(tmp_path, demo_session):
    run = _Run(tmp_path, demo_session, rate=0.5)
    run.wait_for_embeddings(1)
    run.proc.send_signal(signal.SIGTERM)
    code = run.finish(timeout_s=120)
    assert code == 130 and "INTERRUPTED after" in run.output and "Traceback" not in run.output, run.output


def test_a_replay_that_runs_to_its_end_is_not_interrupted(tmp_path, demo_session):
    run = _Run(tmp_path, demo_session, rate=0)
    run.receive(time.time() + 120)
    code = run.finish(timeout_s=60)
    assert code == 0, run.output
    assert "INTERRUPTED" not in run.output
    end = next(m.payload for m in run.messages if m.topic == "ctl/demo-ego" and m.payload["event"] == "end")
    assert "interrupted" not in end


@pytest.mark.parametrize("gap_s", [0.3, 0.05])
def test_two_quick_ctrl_c_stop_at_once_and_leave_no_ray_process(tmp_path, demo_session, gap_s):
    run = _Run(tmp_path, demo_session, rate=0.5)
    run.wait_for_embeddings(1)
    ray_pids = _descendants(run.proc.pid)
    assert ray_pids, "the run started no Ray processes?"
    run.ctrl_c()
    time.sleep(gap_s)
    run.ctrl_c()
    t0 = time.monotonic()
    code = run.finish(timeout_s=60)
    assert code == 130, run.output
    assert time.monotonic() - t0 < 30, run.output
    assert "interrupted" in run.output and "Traceback" not in run.output, run.output
    assert not _still_alive(ray_pids, within_s=30), run.output


def test_killing_the_driver_with_sigkill_leaves_no_ray_process_after_10_s(tmp_path, demo_session):
    run = _Run(tmp_path, demo_session, rate=0.5)
    run.wait_for_embeddings(1)
    ray_pids = _descendants(run.proc.pid)
    assert ray_pids, "the run started no Ray processes?"
    names = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode(errors="replace")
             for p in ray_pids if _alive(p)}
    run.proc.kill()  # the driver alone, as the OOM killer or `kill -9 PID` does
    run.proc.wait(timeout=10)
    left = _still_alive(ray_pids, within_s=10)
    try:
        assert not left, "\n".join(f"{p}: {names.get(p)}" for p in left)
    finally:
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        run.finish(timeout_s=5)
