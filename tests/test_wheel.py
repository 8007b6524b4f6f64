"""The built wheel, installed where the source tree is out of reach, runs live and replayed sessions.

A plain ``pip install .`` and a cluster's worker nodes get the wheel, not the source tree, so a
package the wheel leaves out fails only there. The wheel is built from a copy of the tracked
tree (an in-tree build reuses ``build/lib``, whose leftovers from an earlier build go into the
wheel and would hide a package missing from ``pyproject.toml``), installed with ``--no-deps``
into a fresh virtual environment, and run from an empty directory without ``PYTHONPATH``.

The fresh environment gets the dependencies from a ``.pth`` file listing this interpreter's
site-packages directories. Python adds such a directory to ``sys.path`` without processing the
``.pth`` files inside it, so an editable install of the source tree there stays inactive;
``test_wheel_installs_every_package_outside_the_source_tree`` checks that.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("pipeline", "encoders", "sources", "sinks")
# Not part of the build: VCS data, build outputs, environments, caches, local sessions.
_NOT_COPIED = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", ".venv", "__pycache__", "sessions",
                                     ".pytest_cache", ".hypothesis", "gpu_check_out")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _source_packages() -> list[str]:
    """Every package (folder with ``__init__.py``) of the source tree under the top-level ones."""
    found = []
    for top in TOP_LEVEL:
        for init in sorted((REPO / top).rglob("__init__.py")):
            if "__pycache__" not in init.parts:
                found.append(".".join(init.parent.relative_to(REPO).parts))
    return found


class FreshVenv:
    def __init__(self, root: Path, python: Path, site_packages: Path, env: dict[str, str]):
        self.root, self.python, self.site_packages, self.env = root, python, site_packages, env

    def run(self, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.python), *args], cwd=cwd, env=self.env, capture_output=True,
                              text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> FreshVenv:
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(REPO, src, ignore=_NOT_COPIED)
    wheels = base / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(wheels), str(src)],
                           cwd=base, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("bindstream-*.whl")

    root = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=60)
    python = root / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", str(wheel)], cwd=base, capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        capture_output=True, text=True, check=True, timeout=30).stdout.strip())
    # Written after the install, so pip sees an empty environment (not this one's bindstream).
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    if site.ENABLE_USER_SITE and Path(site.getusersitepackages()).is_dir():
        deps.append(site.getusersitepackages())
    (site_packages / "_test_deps.pth").write_text("".join(f"{p}\n" for p in deps), encoding="utf-8")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["RAY_enable_metrics_collection"] = "0"  # as conftest.py sets it for everything tests start
    return FreshVenv(root, python, site_packages, env)


def _run_config(fresh_venv: FreshVenv, cwd: Path, body: str) -> tuple[subprocess.CompletedProcess, str]:
    """``python -m pipeline run`` of the config ``body`` from the fresh venv, in ``cwd``, publishing on a
    free loopback port; returns the process and its endpoint."""
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    (cwd / "run.yaml").write_text(textwrap.dedent(body) + textwrap.dedent("""\
        model: {config: imagebind_tiny, checkpoint: none, device: cpu, precision: fp32}
        ray: {num_cpus: 2}
        progress: false
        """), encoding="utf-8")
    proc = fresh_venv.run("-m", "pipeline", "run", "run.yaml", "--set", f"publish.endpoint={endpoint}", cwd=cwd)
    return proc, endpoint


def _session_summary(stdout: str, session: str) -> tuple[int, dict[str, int]]:
    """Windows and published embeddings per modality from the summary line of ``session``."""
    m = re.search(rf"^  {re.escape(session)}: (\d+) windows; embeddings: (.*?); ", stdout, re.MULTILINE)
    assert m, f"no summary line for session {session!r} in:\n{stdout}"
    counts = {} if m.group(2) == "none" else {k: int(v) for k, v in (c.rsplit(" ", 1) for c in m.group(2).split(", "))}
    return int(m.group(1)), counts


def test_wheel_installs_every_package_outside_the_source_tree(fresh_venv, tmp_path):
    packages = _source_packages()
    assert "sources.live" in packages
    probe = "import importlib, sys\nfor name in sys.argv[1:]:\n    print(name, importlib.import_module(name).__file__)\n"
    proc = fresh_venv.run("-c", probe, *packages, cwd=tmp_path)
    assert proc.returncode == 0, f"a package of the source tree is missing from the wheel:\n{proc.stderr}"
    files = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    for name in packages:
        assert Path(files[name]).is_relative_to(fresh_venv.site_packages), \
            f"{name} was imported from {files[name]}, not from the wheel installed in {fresh_venv.site_packages}"


@pytest.mark.skipif("lavfi" not in av.formats_available, reason="this FFmpeg has no lavfi input device")
def test_live_device_session_runs_from_the_wheel(fresh_venv, tmp_path):
    proc, endpoint = _run_config(fresh_venv, tmp_path, """\
        sessions:
          - name: cam
            streams:
              - {id: cam, modality: vision, kind: device, format: lavfi,
                 device: "testsrc2=size=320x240:rate=20,realtime"}
        stop_after: 4
        """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"published on {endpoint}" in proc.stdout
    assert "FAILED" not in proc.stdout, proc.stdout
    windows, counts = _session_summary(proc.stdout, "cam")
    assert windows >= 1 and counts.get("vision", 0) >= 1, proc.stdout


def test_replay_of_a_recorded_session_runs_from_the_wheel(fresh_venv, tmp_path):
    made = fresh_venv.run("-m", "pipeline", "demo-session", "rec", "--seconds", "3", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    proc, endpoint = _run_config(fresh_venv, tmp_path, """\
        sessions: [rec]
        replay: {rate: 0}
        """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"published on {endpoint}" in proc.stdout
    assert "FAILED" not in proc.stdout, proc.stdout
    windows, counts = _session_summary(proc.stdout, "demo-ego")
    assert windows >= 2, proc.stdout
    # Every modality of the demo session is embedded, each in at least one window and at most in
    # all; the video covers every window.
    assert set(counts) == {"vision", "audio", "imu", "depth", "thermal", "text"}, proc.stdout
    assert all(1 <= n <= windows for n in counts.values()) and counts["vision"] == windows, proc.stdout
