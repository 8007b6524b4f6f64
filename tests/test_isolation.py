"""One bad value costs only its own item: never another stream's, another session's or the rest
of its batch's embeddings.

The layers, each tested on its own and then through the real Ray graph: bad samples are left
out of a payload before it reaches a batch (``encoders.preprocess.without_bad_values``); a
batch that still fails is tried again item by item (``pipeline.batching.TowerBatcher``); the
real encoder actor answers item by item (``TowerRows``); the session counts what it says.
"""

from __future__ import annotations

import asyncio
import collections
import shutil

import numpy as np
import pytest

from encoders.preprocess import AUDIO_MAX_ABS, IMU_MAX_ABS, without_bad_values
from pipeline.batching import TowerBatcher
from pipeline.dispatch import EncoderDispatch
from sources.demo import write_demo_session

ray = pytest.importorskip("ray")

BIG = 3e37  # finite in float32; times 9.80665 (g -> m/s^2) it is still finite, then the IMU stem overflows


def _imu_window(rows: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([np.linspace(0.0, 5.0, rows)[:, None], rng.standard_normal((rows, 6))], axis=1)


# -- leaving bad samples out -----------------------------------------------------------------

def test_imu_rows_holding_a_bad_value_are_removed_and_counted():
    w = _imu_window()
    w[10, 1] = BIG * 9.80665
    w[20, 6] = np.nan
    w[30, 3] = -2 * IMU_MAX_ABS
    w[40, 2] = IMU_MAX_ABS  # at the limit: kept
    out, n = without_bad_values("imu", w)
    assert n == 3 and out.shape == (397, 7)
    np.testing.assert_array_equal(out, np.delete(w, [10, 20, 30], axis=0))
    clean = _imu_window()
    assert without_bad_values("imu", clean) == (clean, 0)  # the same object: nothing copied


def test_an_imu_window_with_no_row_left_is_not_encoded():
    w = _imu_window(rows=3)
    w[:, 4] = np.inf
    assert without_bad_values("imu", w) == (None, 3)


def test_bad_audio_samples_become_silence_and_the_rest_is_untouched():
    a = np.random.default_rng(1).uniform(-1, 1, 32000).astype(np.float32)
    a[[5, 6, 7]] = [1e30, np.nan, -AUDIO_MAX_ABS * 10]
    out, n = without_bad_values("audio", a)
    assert n == 3 and out.dtype == np.float32 and out[[5, 6, 7]].tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_array_equal(np.delete(out, [5, 6, 7]), np.delete(a, [5, 6, 7]))


def test_modalities_whose_preprocessing_takes_any_value_are_left_as_they_are():
    depth = np.full((4, 4), np.nan, np.float32)  # NaN depth = no reading, by design
    thermal = np.full((4, 4), 1e38, np.float32)  # clamped to [0, 1] by its preprocessing
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    for modality, p in (("depth", depth), ("thermal", thermal), ("vision", frames), ("text", "a dog")):
        assert without_bad_values(modality, p) == (p, 0), modality


# -- a batch that fails is tried item by item ---------------------------------------------------

class Picky:
    """A batch function refusing any batch that holds ``"bad"`` (as a model refuses a batch
    whose one item overflows); ``prepare`` refuses ``"unpreparable"`` the same way."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    async def prepare(self, tower: str, items: list) -> list:
        if "unpreparable" in items:
            raise ValueError("payload cannot be prepared")
        return list(items)

    async def run(self, tower: str, items: list) -> list:
        self.batches.append(list(items))
        await asyncio.sleep(0.01)
        if "bad" in items:
            raise FloatingPointError(f"{tower}: embeddings are not finite")
        return [f"row of {x}" for x in items]


@pytest.mark.parametrize("staged", [False, True], ids=["inline", "prepare_ahead"])
def test_a_failed_batch_costs_only_the_item_that_fails_alone(staged):
    async def main():
        p = Picky()
        b = TowerBatcher(p.run, max_batch=8, max_wait_s=0.05, prepare=p.prepare if staged else None)
        # two sessions' items meet in one batch; a third caller's bad item sits among them
        return p, await asyncio.gather(
            b.submit_many("imu", ["a1", "a2"], return_exceptions=True),
            b.submit_many("imu", ["bad", "b1", "unpreparable" if staged else "b2"], return_exceptions=True),
        )

    p, (a, b) = asyncio.run(main())
    assert a == ["row of a1", "row of a2"]
    assert isinstance(b[0], FloatingPointError) and b[1] == "row of b1"
    if staged:  # prepare refused the whole batch; each item was prepared and run alone
        assert isinstance(b[2], ValueError)  # could not be prepared, even alone
        assert p.batches == [["a1"], ["a2"], ["bad"], ["b1"]]
    else:  # the model refused the whole batch; each item ran alone
        assert b[2] == "row of b2"
        assert p.batches == [["a1", "a2", "bad", "b1", "b2"], ["a1"], ["a2"], ["bad"], ["b1"], ["b2"]]


def test_an_exception_in_place_of_a_result_goes_to_that_item_alone():
    async def run(tower, items):
        return [ValueError("not finite") if x == "bad" else x.upper() for x in items]

    async def main():
        b = TowerBatcher(run, max_batch=8, max_wait_s=0.0)
        return await b.submit_many("audio", ["a", "bad", "c"], return_exceptions=True), b.batch_sizes

    (a, bad, c), sizes = asyncio.run(main())
    assert (a, c) == ("A", "C") and isinstance(bad, ValueError)
    assert sizes == {"audio": [3]}  # no retry needed: the batch ran once


def test_the_session_counts_bad_windows_per_stream_and_lone_failures_per_modality():
    d = EncoderDispatch(1)
    assert d.bad_values("imu") is True and d.bad_values("imu") is False and d.bad_values("wrist") is True
    d.failed("audio", 1)
    d.failed("audio", 0)
    assert d.dropped() == {"imu:bad_values": 2, "wrist:bad_values": 1, "audio:encoder_error": 1}


# -- the real encoder actor ---------------------------------------------------------------------

@pytest.mark.usefixtures("ray_cluster")
def test_the_encoder_answers_item_by_item_and_a_bad_item_spares_its_batch():
    from pipeline.actors import EncoderActor

    enc = EncoderActor.remote({"config": "imagebind_tiny", "checkpoint": "none", "device": "cpu",
                               "precision": "fp32", "threads": 1}, 8, 50.0)
    good = [_imu_window(seed=s) for s in range(3)]
    spiked = _imu_window(seed=9)
    spiked[100:105, 1] = BIG * 9.80665
    nothing_left = _imu_window(rows=4)
    nothing_left[:, 2] = BIG
    wrong_shape = np.zeros((10, 5))  # refused by prepare: the batch fails, then only this item
    try:
        alone = ray.get(enc.encode_timed.remote("imu", good)).rows
        cleaned = ray.get(enc.encode_timed.remote("imu", [np.delete(spiked, range(100, 105), axis=0)])).rows
        out = ray.get(enc.encode_many.remote({"imu": [good[0], spiked, good[1], nothing_left, wrong_shape, good[2]],
                                              "text": ["a dog"]}))
    finally:
        ray.kill(enc)
    got = out["imu"]
    for j, ref in ((0, alone[0]), (2, alone[1]), (5, alone[2]), (1, cleaned[0])):
        np.testing.assert_allclose(got.rows[j], ref, atol=1e-6)
    assert got.rows[3] is None and got.rows[4] is None
    assert got.bad == {1: 5, 3: 4}
    assert list(got.errors) == [4] and "expected float [N, 7]" in got.errors[4]
    assert [s is None for s in got.spans] == [False, False, False, True, True, False]
    assert len(out["text"].rows) == 1


# -- end to end: a bad session beside a clean one ---------------------------------------------------

def _with_huge_imu_rows(src, dst) -> int:
    """A copy of session ``src`` whose IMU CSV has rows of 3e37 g; returns how many."""
    shutil.copytree(src, dst)
    csv = dst / "imu.csv"
    lines = csv.read_text().splitlines()
    n = 0
    for i in range(300, 700, 37):  # 1.5 s .. 3.5 s into the session, accel and gyro
        fields = lines[i].split(",")
        if fields[1] == "imu":
            fields[2 + n % 6] = "3e37"
            lines[i] = ",".join(fields)
            n += 1
    csv.write_text("\n".join(lines) + "\n")
    (dst / "session.yaml").write_text((dst / "session.yaml").read_text().replace("name: good", "name: bad"))
    return n


def _keys(session_dir, cfg):
    """(modality, window) of every item the aligner makes of the session, and of those the IMU
    windows holding a bad row."""
    from test_pipeline_e2e import _expected_windows

    _, windows = _expected_windows(session_dir, cfg)
    every = {(it.modality, it.window) for w in windows for it in w.items}
    bad = {it.window for w in windows for it in w.items if without_bad_values(it.modality, it.payload)[1]}
    return every, bad


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    from test_pipeline_e2e import _embeddings, _replay

    root = tmp_path_factory.mktemp("isolation")
    good = write_demo_session(root / "good", seconds=4.0, seed=3, name="good")
    rows = _with_huge_imu_rows(good, root / "bad")
    result, messages = _replay([good])
    assert result.exit_code == 0
    return good, root / "bad", rows, _embeddings(messages)


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("rate", [0, 1])
def test_a_session_of_huge_imu_values_costs_a_clean_session_nothing(sessions, rate):
    from test_pipeline_e2e import _config, _embeddings, _replay

    good, bad, rows, baseline = sessions
    assert rows >= 6
    result, messages = _replay([good, bad], replay={"rate": rate})
    assert result.exit_code == 0  # dropped values are counted, not errors (README: exit codes)
    summary = {s["session"]: s for s in result.sessions}
    emb = _embeddings(messages)

    clean = {k: v for k, v in emb.items() if k[0] == "good"}
    assert clean.keys() == baseline.keys()
    for k, v in baseline.items():
        np.testing.assert_allclose(clean[k], v, atol=1e-6, err_msg=str(k))
    assert summary["good"]["dropped"] == {} and summary["good"]["errors"] == {}

    # The bad session loses nothing valid: every window of every stream is published (its IMU
    # windows without the huge rows), and nothing non-finite reaches a subscriber.
    every, bad_windows = _keys(bad, _config([bad]))
    published = collections.Counter((m, w) for s, m, w in emb if s == "bad")
    assert set(published) == every and max(published.values()) == 1
    assert all(np.isfinite(v).all() for v in emb.values())
    assert bad_windows and summary["bad"]["dropped"] == {"imu:bad_values": len(bad_windows)}
    assert summary["bad"]["errors"] == {}
