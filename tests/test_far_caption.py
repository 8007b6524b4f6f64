"""A caption far beyond the rest of its session (a stray time, or captions in milliseconds read
as seconds) in a paced replay, through the Ray graph: the replay does not wait until its clock
reaches the caption, and publishes what the same session publishes at rate 0."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from sources.demo import write_demo_session
from test_pipeline_e2e import _embeddings, _replay

pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("ray_cluster")  # one Ray per module: tests/conftest.py

FAR_T = 100000.5  # seconds; the demo's other streams end before 3 s
FAR_WINDOW = 100000  # the window whose caption span [e - 1, e) holds it: origin 0, hop 1 s


@pytest.fixture(scope="module")
def far_session(tmp_path_factory):
    d = write_demo_session(tmp_path_factory.mktemp("sessions") / "far", seconds=3.0, seed=0, name="far-caption")
    with open(d / "captions.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"t": FAR_T, "text": "a caption whose time is in the wrong unit"}) + "\n")
    return d


def _replay_within(timeout_s: float, session, **over):
    """``_replay`` in a thread, failing the test if it has not ended within ``timeout_s``."""
    out: dict = {}

    def go() -> None:
        try:
            out["result"] = _replay([session], **over)
        except BaseException as exc:  # surfaced below
            out["error"] = exc

    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(timeout_s)
    assert not th.is_alive(), f"the replay did not end within {timeout_s} s"
    if "error" in out:
        raise out["error"]
    return out["result"]


def test_paced_replay_sends_a_caption_far_beyond_the_other_streams_at_once_and_publishes_it(far_session, capfd):
    paced, paced_msgs = _replay_within(180, far_session, replay={"rate": 1.0, "chunk_seconds": 0.5})
    assert paced.exit_code == 0
    fast, fast_msgs = _replay_within(180, far_session)  # rate 0
    assert fast.exit_code == 0

    got, ref = _embeddings(paced_msgs), _embeddings(fast_msgs)
    assert ("far-caption", "text", FAR_WINDOW) in ref  # the far caption is published at rate 0 ...
    assert got.keys() == ref.keys()  # ... and paced, with every other window
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5, err_msg=str(k))

    # The caption stream stopped waiting at the far caption (the run's source stats say so); no
    # other stream did, and nothing was dropped.
    unpaced = {s["stream"]: s["unpaced_from"] for s in paced.source_stats}
    assert unpaced == {"cam": None, "mic": None, "imu": None, "depth": None, "thermal": None, "captions": FAR_T}
    assert {s["stream"]: s["unpaced_from"] for s in fast.source_stats}["captions"] is None
    ends = [next(m.payload for m in msgs if m.topic.startswith("ctl/") and m.payload["event"] == "end")
            for msgs in (paced_msgs, fast_msgs)]
    assert ends[0]["windows"] == ends[1]["windows"] > FAR_WINDOW
    # The empty windows between the streams' end and the caption are skipped in bounded steps
    # (counted as <stream>:empty_windows), as at rate 0; no sample is lost.
    lost = {k: n for k, n in ends[0]["dropped"].items() if not k.endswith(":empty_windows")}
    assert lost == {}, ends[0]["dropped"]

    # The warning, logged in the session's process: Ray forwards its log lines to this one.
    deadline, err = time.monotonic() + 15.0, ""
    while "caption at t=100000.500 s" not in err and time.monotonic() < deadline:
        err += capfd.readouterr().err
        time.sleep(0.2)
    line = next((ln for ln in err.splitlines() if "caption at t=100000.500 s" in ln), "")
    for part in ("session 'far-caption'", "stream 'captions'", "captions.jsonl", "time_unit"):
        assert part in line, (part, line or err[-2000:])
