"""Moment search: a session with one clip (image and sound) planted at known times among other
material, replayed through the real Ray graph into a store; querying with that clip's image and
its sound finds the planted moments first. The tiny random model suffices: identical inputs give
identical embeddings. Bad queries exit 2 with a message and no traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from pipeline.search import Store, merge_moments
from test_store import _replay
from test_pipeline_e2e import _config

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
FPS, RATE, SECONDS, SIZE = 10, 16_000, 20, 224
PLANTED_VISION = [(4.0, 8.0), (14.0, 18.0)]  # the clip's image fills these spans
PLANTED_AUDIO = [(4.0, 6.0), (14.0, 16.0)]  # the clip's 2 s sound plays here


def _image(rng: np.random.Generator) -> np.ndarray:
    """A blocky random RGB picture (8x8 blocks of 28 px)."""
    return np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), np.ones((28, 28, 1), dtype=np.uint8))


def _write_video(path: Path, frames: list[np.ndarray]) -> None:
    with av.open(str(path), "w") as out:  # PNG in MOV: lossless, so the planted frames decode exactly
        st = out.add_stream("png", rate=FPS)
        st.width, st.height, st.pix_fmt = SIZE, SIZE, "rgb24"
        for img in frames:
            for packet in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in st.encode(None):
            out.mux(packet)


def _write_wav(path: Path, wave: np.ndarray) -> None:
    pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2")
    with av.open(str(path), "w") as out:
        st = out.add_stream("pcm_s16le", rate=RATE, layout="mono")
        for i in range(0, pcm.size, 1600):
            frame = av.AudioFrame.from_ndarray(pcm[None, i:i + 1600], format="s16", layout="mono")
            frame.sample_rate = RATE
            for packet in st.encode(frame):
                out.mux(packet)
        for packet in st.encode(None):
            out.mux(packet)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The session folder and the clip's image (PNG) and sound (WAV)."""
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(7)
    clip_img = _image(rng)
    t = np.arange(2 * RATE) / RATE
    clip_wave = 0.5 * np.sin(2 * np.pi * (300 + 400 * t) * t) * np.sin(np.pi * t / 2)  # a rising chirp
    backgrounds = [_image(rng) for _ in range(SECONDS)]
    frames = [clip_img if any(a <= i / FPS < b for a, b in PLANTED_VISION) else backgrounds[i // FPS]
              for i in range(SECONDS * FPS)]
    session = root / "session"
    session.mkdir()
    _write_video(session / "video.mov", frames)
    wave = np.zeros(SECONDS * RATE)
    for s in range(SECONDS):  # other material: a different tone with noise each second
        seg = slice(s * RATE, (s + 1) * RATE)
        wave[seg] = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t[:RATE]) + 0.05 * rng.standard_normal(RATE)
    for a, _ in PLANTED_AUDIO:
        wave[int(a * RATE):int(a * RATE) + clip_wave.size] = clip_wave
    _write_wav(session / "audio.wav", wave)
    (session / "session.yaml").write_text(yaml.safe_dump({
        "format": "bindstream.session/1", "name": "planted",
        "streams": [{"id": "cam", "modality": "vision", "source": "video.mov"},
                    {"id": "mic", "modality": "audio", "source": "audio.wav"}]}))
    av_img = av.VideoFrame.from_ndarray(clip_img, format="rgb24")
    with av.open(str(root / "clip.png"), "w", format="image2") as out:
        st = out.add_stream("png")
        st.width, st.height, st.pix_fmt = SIZE, SIZE, "rgb24"
        for packet in list(st.encode(av_img)) + list(st.encode(None)):
            out.mux(packet)
    _write_wav(root / "clip.wav", clip_wave)
    return session, root / "clip.png", root / "clip.wav"


@pytest.fixture(scope="module")
def store_uri(planted, tmp_path_factory, ray_cluster):
    uri = str(tmp_path_factory.mktemp("planted-store") / "store")
    result, _ = _replay(_config([planted[0]], store={"uri": uri}))
    assert result.exit_code == 0, result.sessions
    return uri


def _covers(moment, span) -> bool:
    """The moment's span overlaps the planted span and contains its middle."""
    return moment.t_start <= (span[0] + span[1]) / 2 <= moment.t_end


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_query_with_the_planted_clip_finds_every_planted_moment_first(planted, store_uri, kind):
    _, image, sound = planted
    modality, spans = ("vision", PLANTED_VISION) if kind == "image" else ("audio", PLANTED_AUDIO)
    query = {"image": image} if kind == "image" else {"audio": sound}
    moments = Store(store_uri).search(**query, modality=[modality], k=5)
    assert all(m.modality == modality and m.session == "planted" for m in moments)
    for span in spans:
        assert any(_covers(m, span) for m in moments[:len(spans)]), (span, moments)
    assert moments[0].score > 0.999 and moments[1].score > 0.999, moments[:2]


def test_search_command_prints_json_lines_best_first(planted, store_uri):
    out = subprocess.run([sys.executable, "-m", "pipeline", "search", store_uri, "--image", str(planted[1]),
                          "--modality", "vision", "-k", "3", "--json"], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True) and len(rows) == 3
    assert {"session", "modality", "t_start", "t_end", "score"} <= set(rows[0])


def test_search_filters_by_session_time_and_modality(store_uri):
    store = Store(store_uri)
    assert store.search(text="a chirp", session=["other"]) == []
    moments = store.search(text="a chirp", between=(10.0, 12.0), modality=["audio"], k=20)
    assert moments and all(m.modality == "audio" and m.t_end >= 10.0 and m.t_start <= 12.0 for m in moments)


@pytest.mark.parametrize("args, says", [
    (["--image", "missing.png"], "no such file"),
    (["--audio", "{junk}"], "cannot be decoded"),
    (["--text", "  "], "empty query"),
    (["--image", "{wav}"], "has no image stream"),
])
def test_bad_query_exits_2_with_a_message_and_no_traceback(store_uri, planted, tmp_path, args, says):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not really a wav file" * 10)
    args = [a.format(junk=junk, wav=planted[2]) for a in args]
    out = subprocess.run([sys.executable, "-m", "pipeline", "search", store_uri, *args], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr


def test_a_folder_that_is_not_a_store_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline", "search", str(tmp_path), "--text", "a dog"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2 and "not a bindstream store" in out.stderr and "Traceback" not in out.stderr


def _hit(window, score, session="s", modality="vision"):
    return {"model": "m", "session": session, "modality": modality, "stream": "cam", "window": window,
            "t_start": window - 1.0, "t_end": float(window), "score": score}


def test_adjacent_windows_within_the_margin_merge_into_one_moment():
    hits = [_hit(5, 0.99), _hit(6, 0.97), _hit(7, 0.90), _hit(4, 0.95), _hit(9, 0.96), _hit(6, 0.98, session="t")]
    moments = merge_moments(hits, k=10, margin=0.05)
    assert [(m.session, m.windows, m.window) for m in moments] == [
        ("s", (4, 6), 5), ("t", (6, 6), 6), ("s", (9, 9), 9), ("s", (7, 7), 7)]
    assert (moments[0].t_start, moments[0].t_end) == (3.0, 6.0)
    assert len(merge_moments(hits, k=2)) == 2


def test_ray_data_reads_the_store(store_uri):
    ds = ray.data.read_lance(str(Path(store_uri) / "embeddings.lance"), columns=["session", "modality", "window", "vector"])
    rows = ds.take_all()
    assert len(rows) == Store(store_uri).store.count() and {r["session"] for r in rows} == {"planted"}
    assert len(rows[0]["vector"]) == Store(store_uri).store.dim
