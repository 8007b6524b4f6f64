"""Decode-side frame selection (pipeline.selection.FrameSelector): the windows made from the frames
it keeps are the windows made from every frame, on random timelines, with far fewer frames."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.align import AlignConfig, Aligner, ModalitySpan
from pipeline.selection import frame_selector
from sources.demo import write_demo_session
from pipeline.inprocess import session_windows
from sources.session import load_session
from sources.base import Chunk


def _windows(modality: str, cfg: AlignConfig, t: np.ndarray, size: int, select: bool):
    """Windows of one stream pushed in chunks of ``size`` frames, as a stream reader does: with
    ``select`` each frame goes through the selector first, which learns the origin from the
    aligner after each push (the push reply). Also returns the selector's keep mask."""
    al = Aligner("s", {"x": modality}, cfg, clock=lambda: 0.0)
    sel = frame_selector(modality, cfg) if select else None
    data = np.arange(len(t), dtype=np.int64)[:, None]
    keep = np.ones(len(t), dtype=bool)
    out, pending = [], []
    for i in range(len(t)):
        if sel is not None:
            keep[i] = sel.keep(float(t[i]), float(t[i + 1]) if i + 1 < len(t) else None)
        if keep[i]:
            pending.append(i)
        if pending and (len(pending) == size or i == len(t) - 1):
            out += al.push(Chunk("x", modality, t[pending], data[pending]))
            pending = []
            if sel is not None:
                sel.origin = al.origin
    out += al.end_stream("x")
    if sel is not None:
        assert sel.kept == keep.sum() and sel.skipped == len(t) - keep.sum()
    return [(w.index, [(it.t_start, it.t_end, np.asarray(it.payload).tolist()) for it in w.items]) for w in out], keep


def _timeline(rng: np.random.Generator, kind: str) -> np.ndarray:
    n = int(rng.integers(20, 400))
    if kind == "regular":
        fps = float(rng.choice([5.0, 10.0, 15.0, 29.97, 30.0, 60.0]))
        return float(rng.uniform(-3, 3)) + np.arange(n) / fps
    dt = rng.exponential(float(rng.uniform(0.01, 0.3)), n)
    t = float(rng.uniform(-3, 3)) + np.cumsum(dt)
    for _ in range(int(rng.integers(1, 6)) if kind == "messy" else 0):
        i = int(rng.integers(1, n))
        if rng.integers(0, 2):
            t[i] = t[i - 1]  # equal times
        else:
            t[i:] += float(rng.uniform(1.0, 5.0))  # a jump ahead
    return t


@pytest.mark.parametrize("modality", ["vision", "depth"])
@pytest.mark.parametrize("kind", ["regular", "irregular", "messy"])
def test_windows_from_the_kept_frames_equal_the_windows_from_all_frames(modality, kind):
    """``messy``: equal times and jumps ahead. Chunks end at different frames in the two runs
    (every ``size`` frames read vs every ``size`` frames kept), as in the stream readers."""
    kinds = ["regular", "irregular", "messy"]
    rng = np.random.default_rng(["vision", "depth"].index(modality) * 10 + kinds.index(kind))
    skipped = kept = 0
    for trial in range(60):
        t = _timeline(rng, kind)
        spans = {"vision": ModalitySpan(span=float(rng.choice([0.5, 1.0, 2.0, 2.5])), frames=int(rng.choice([1, 2]))),
                 "depth": ModalitySpan(tolerance=float(rng.choice([0.05, 0.2, 0.5])))}
        cfg = AlignConfig(hop=float(rng.choice([0.25, 0.5, 1.0, 1.5, 3.0])), spans=spans,
                          allowed_lateness=float(rng.choice([0.0, 0.3])),
                          origin=None if trial % 3 else float(rng.uniform(-4, 2)))
        size = int(rng.integers(1, 20))
        every, _ = _windows(modality, cfg, t, size, select=False)
        some, keep = _windows(modality, cfg, t, size, select=True)
        assert some == every, f"trial {trial}: kept {keep.sum()} of {len(t)}"
        kept += int(keep.sum())
        skipped += int((~keep).sum())
    if kind == "regular":
        # The point of it: at a 1 s hop a 30 fps camera needs ~2 frames a second.
        assert skipped > kept


def test_a_30fps_camera_at_the_default_windows_keeps_about_two_frames_a_second():
    cfg = AlignConfig()
    t = np.arange(30 * 60) / 30.0
    some, keep = _windows("vision", cfg, t, 15, select=True)
    # 60 windows: the first and the last frame of each 2 s span, plus the first chunk (sent
    # before the origin is known).
    assert 120 <= keep.sum() <= 140, keep.sum()
    assert some == _windows("vision", cfg, t, 15, select=False)[0]


def test_after_the_times_go_back_every_frame_is_kept():
    cfg = AlignConfig()
    t = np.arange(300) / 30.0
    t[150] = t[149] - 0.2
    _, keep = _windows("vision", cfg, t, 15, select=True)
    assert not keep[:149].all() and keep[149:].all()


def test_everything_is_kept_until_the_origin_is_known_and_where_selection_does_not_apply():
    cfg = AlignConfig()
    sel = frame_selector("vision", cfg)
    assert all(sel.keep(i / 30, (i + 1) / 30) for i in range(90))  # origin not set yet
    assert frame_selector("audio", cfg) is None and frame_selector("imu", cfg) is None
    assert frame_selector("vision", AlignConfig(spans={"vision": ModalitySpan(span=2.0, frames=8)})) is None


SHARED = Path(__file__).resolve().parents[2] / "shared"


def _same_windows(a, b) -> None:
    assert [(w.index, w.missing) for w in a] == [(w.index, w.missing) for w in b]
    for wa, wb in zip(a, b):
        for x, y in zip(wa.items, wb.items, strict=True):
            assert (x.stream, x.t_start, x.t_end) == (y.stream, y.t_start, y.t_end)
            np.testing.assert_array_equal(np.asarray(x.payload), np.asarray(y.payload))


def test_a_selected_video_sends_its_first_frame_alone_so_the_rest_is_selected(tmp_path):
    """Before the grid is known a selector keeps every frame; the grid is fixed from every
    stream's first sample. So a selected source's first chunk is that one frame, and the
    frames after it, read once the grid is known (as paced replay's read-ahead does), are
    selected from the first chunk length on."""
    from sources.replay import open_source

    sess = load_session(write_demo_session(tmp_path / "d", seconds=6.0, seed=3, name="first"))
    cam = next(s for s in sess.streams if s.modality == "vision")
    cfg = AlignConfig()
    sel = frame_selector("vision", cfg)
    chunks = iter(open_source(cam, chunk_seconds=1.0, select=sel))
    first = next(chunks)
    assert len(first) == 1  # the head alone, before the grid exists
    sel.origin = float(first.t[0])  # what the aligner replies (this stream starts the session)
    rest = list(chunks)
    frames = 1 + sum(len(c) for c in rest)
    assert sel.skipped > 0 and frames == sel.kept
    every = list(open_source(cam, chunk_seconds=1.0))
    assert not any(len(c) == 1 for c in every[:-1])  # plain reading: no one-frame first chunk


def test_decoded_sessions_give_the_same_windows_with_and_without_selection(tmp_path):
    """Real decoding: the demo session (H.264 camera, 16-bit depth and 8-bit thermal PNGs)."""
    sess = load_session(write_demo_session(tmp_path / "d", seconds=6.0, seed=2, name="sel"))
    every = session_windows(sess, chunk_seconds=0.5)
    some = session_windows(sess, chunk_seconds=0.5, select_frames=True)
    assert len(every) >= 6
    _same_windows(every, some)


@pytest.mark.skipif(not (SHARED / "fixtures" / "real" / "realshort.mp4").is_file(),
                    reason="../shared/fixtures/real/realshort.mp4 is absent")
def test_a_real_phone_video_gives_the_same_windows_with_and_without_selection(tmp_path):
    shutil.copy(SHARED / "fixtures" / "real" / "realshort.mp4", tmp_path / "v.mp4")
    (tmp_path / "session.yaml").write_text(
        "format: bindstream.session/1\nname: phone\nstreams:\n  - {id: cam, modality: vision, source: v.mp4}\n")
    sess = load_session(tmp_path)
    cfg = AlignConfig(hop=0.25)
    every = session_windows(sess, cfg, chunk_seconds=0.5)
    some = session_windows(sess, cfg, chunk_seconds=0.5, select_frames=True)
    assert len(every) >= 4
    _same_windows(every, some)


def test_a_truncated_video_still_emits_its_last_good_frame_with_selection(tmp_path):
    from media_files import faststart_cut

    from sources.errors import SourceError
    from sources.replay import open_source

    d = write_demo_session(tmp_path / "d", seconds=4.0, seed=4, name="cut")
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "v.mp4").write_bytes(faststart_cut(d / "video.mp4", tmp_path / "fs.mp4"))
    (cut / "session.yaml").write_text(
        "format: bindstream.session/1\nname: cut\nstreams:\n  - {id: cam, modality: vision, source: v.mp4}\n")
    (cam,) = load_session(cut).streams

    def read(select):
        times = []
        with pytest.raises(SourceError, match="truncated"):
            for chunk in open_source(cam, chunk_seconds=0.5, select=select):
                times += chunk.t.tolist()
        return times

    every = read(None)
    some = read(frame_selector("vision", AlignConfig(origin=0.0)))
    assert len(every) > 10 and set(some) < set(every)
    assert some[-1] == every[-1]  # the last good frame goes out before the error
