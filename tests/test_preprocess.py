"""Streaming preprocessing: shapes, reference parity where one exists, and real inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders import preprocess as P

SHARED = Path(__file__).resolve().parents[2] / "shared"
IB = SHARED / "fixtures" / "imagebind"
REAL = SHARED / "fixtures" / "real"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared fixture not found at {path}")
    return path


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def test_image_matches_reference_loader_closely_on_real_photos() -> None:
    from safetensors.torch import load_file

    ref = load_file(str(_need(IB / "vision_preproc.safetensors")))["vision"]
    for i, name in enumerate(["bird", "car", "dog"]):
        frames = torch.from_numpy(_rgb(IB / "assets" / f"{name}_image.jpg"))[None]
        out = P.image(frames)
        assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
        # Tensor bicubic vs the reference's PIL bicubic: the fixture README measured 0.045.
        assert (out[0] - ref[i]).abs().max() < 0.05
        assert (out[0] - ref[i]).abs().mean() < 5e-3


@pytest.mark.parametrize("hw", [(120, 160), (224, 398)])  # resized, and at size as the sources send
def test_clip_is_the_per_frame_image_transform(hw) -> None:
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 256, (2, 2, *hw, 3), dtype=np.uint8))
    out = P.clip(frames)
    assert out.shape == (2, 3, 2, 224, 224) and out.is_contiguous()
    assert torch.equal(out[1, :, 0], P.image(frames[1, :1])[0])
    assert torch.equal(out[0, :, 1], P.image(frames[0, 1:2])[0])


@pytest.mark.parametrize("hw", [(224, 398), (398, 224), (224, 224)])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_frames_already_at_224_are_cropped_first_with_the_same_values(hw, dtype) -> None:
    # The sources decode to a 224 short side; image() then crops before converting. The values
    # must be those of the general path (identity resize, per-pixel steps, then the crop).
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (3, *hw, 3), dtype=np.uint8)
    frames = torch.from_numpy(u8 if dtype == "uint8" else (u8 / 255.0).astype(np.float32))
    x, is_uint8 = P._to_unit_float(frames)
    x = P.resize_short_side(x.permute(0, 3, 1, 2))
    x = x.clamp(0.0, 255.0).round().div(255.0) if is_uint8 else x.clamp(0.0, 1.0)
    mean, std = P._mean_std(x.device, x.dtype)
    general = (P.center_crop(x) - mean) / std
    out = P.image(frames)
    assert out.shape == (3, 3, 224, 224)
    assert torch.equal(out, general)


def test_float_frames_in_unit_range_match_uint8_frames() -> None:
    rng = np.random.default_rng(1)
    u8 = torch.from_numpy(rng.integers(0, 256, (1, 300, 240, 3), dtype=np.uint8))
    a = P.image(u8)
    b = P.image(u8.float() / 255.0)
    assert (a - b).abs().max() < 0.02  # differ only by the uint8 rounding after the resize


def test_audio_matches_reference_padding_and_normalisation() -> None:
    t = torch.arange(32000) / 16000.0
    wave = torch.stack([0.3 * torch.sin(2 * math.pi * 440 * t), 0.1 * torch.randn(32000)])
    out = P.audio(wave)
    assert out.shape == (2, 1, 128, 204)
    # 198 real frames, then zero padding normalised: (0 + 4.268) / 9.138.
    assert torch.allclose(out[:, :, :, 198:], torch.full_like(out[:, :, :, 198:], 4.268 / 9.138))
    # A 440 Hz tone puts its energy in one low mel band; noise is flat.
    tone = out[0, 0, :, :198].mean(dim=1)
    assert int(tone.argmax()) < 40


def test_audio_ignores_dc_offset() -> None:
    wave = 0.1 * torch.randn(1, 32000)
    assert torch.allclose(P.audio(wave), P.audio(wave + 0.25), atol=1e-3)


def test_audio_on_real_speech_recording() -> None:
    import av
    import torchaudio

    with av.open(str(_need(REAL / "speech_front_center.wav"))) as c:
        s = c.streams.audio[0]
        rate = s.rate
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(s)])
    wave = torch.from_numpy(pcm.astype(np.float32) / 32768.0)
    wave = torchaudio.functional.resample(wave, rate, 16000)
    clip = torch.zeros(32000)
    clip[: min(32000, wave.numel())] = wave[:32000]
    out = P.audio(clip[None])
    assert torch.isfinite(out).all()
    # Speech frames are louder than the trailing silence the clip is padded with.
    n = min(wave.numel(), 32000) // 160
    assert out[0, 0, :, : n // 2].mean() > out[0, 0, :, n + 5 : 198].mean() + 0.5


def test_depth_turns_metres_into_normalised_disparity() -> None:
    d = torch.full((1, 240, 320), 2.0)
    d[0, :, 160:] = 4.0
    out = P.depth(d)
    assert out.shape == (1, 1, 224, 224)
    near, far = out[0, 0, 112, 5].item(), out[0, 0, 112, 218].item()
    expected_near = 0.075 * 518.857901 / 2.0 / 75.0
    assert near == pytest.approx(expected_near, rel=1e-4)
    assert far == pytest.approx(expected_near / 2, rel=1e-4)


def test_depth_holes_become_zero_disparity() -> None:
    d = torch.full((1, 224, 224), 3.0)
    d[0, :100] = 0.0
    d[0, 100:110] = float("nan")
    d[0, 110:120] = float("inf")
    out = P.depth(d)
    assert torch.isfinite(out).all()
    assert out[0, 0, :95].abs().max() == 0  # away from the resize's edge support
    assert out[0, 0, 130:].min() > 0.1


def test_depth_on_real_middlebury_map() -> None:
    from PIL import Image

    with Image.open(_need(REAL / "motorcycle_depth_mm_u16.png")) as im:
        mm = np.array(im).astype(np.float32)
    out = P.depth(torch.from_numpy(mm / 1000.0)[None])
    assert out.shape == (1, 1, 224, 224)
    # 2.1-5.0 m -> disparity 38.9/d / 75 in about [0.10, 0.25]; resizing blends the edges of
    # holes (0) with their neighbours, so only the bulk of the valid pixels is checked.
    valid = out[out > 0.05]
    lo, hi = torch.quantile(valid, torch.tensor([0.1, 1.0])).tolist()
    assert 0.09 < lo and hi < 0.27  # bicubic overshoots the 0.246 peak slightly
    assert valid.numel() > 0.5 * out.numel()
    assert (out == 0).float().mean() < 0.5


def test_integer_depth_and_thermal_give_exactly_the_floats_they_stand_for() -> None:
    """Sources send 16-bit depth (mm) and 8/16-bit thermal as read; the encoder's conversion is
    bit-identical to the float path (the real Middlebury map and every 16-bit value)."""
    from PIL import Image

    from sources.base import frame_values

    with Image.open(_need(REAL / "motorcycle_depth_mm_u16.png")) as im:
        mm = np.array(im).astype(np.uint16)
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    for frame in (mm, every):
        as_int = P.prepare("depth", [frame, frame[::-1].copy()])
        as_float = P.prepare("depth", [frame_values("depth", frame), frame_values("depth", frame[::-1].copy())])
        assert torch.equal(as_int, as_float)
    # the lookup table holds, for every 16-bit value, the disparity of the metres it stands for
    table = P._disparity_from_mm(torch.from_numpy(every))
    assert torch.equal(table, P._disparity(torch.from_numpy(frame_values("depth", every))))
    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.uint16):
        t = rng.integers(0, np.iinfo(dtype).max, size=(90, 120), endpoint=True).astype(dtype)
        assert torch.equal(P.prepare("thermal", [t]), P.prepare("thermal", [frame_values("thermal", t)]))
        assert np.array_equal(P._thermal_unit(torch.from_numpy(t)).numpy(), frame_values("thermal", t))
    # one batch may mix sessions sending integers and floats
    mixed = P.prepare("depth", [mm, frame_values("depth", mm)])
    assert torch.equal(mixed[0], mixed[1])


def test_thermal_keeps_unit_range() -> None:
    x = torch.linspace(0, 1, 480 * 640).reshape(1, 480, 640)
    out = P.thermal(x)
    assert out.shape == (1, 1, 224, 224)
    assert 0 <= out.min() and out.max() <= 1
    assert out[0, 0, :, 0].mean() < out[0, 0, :, -1].mean()


def test_imu_resamples_linearly_with_edge_hold() -> None:
    t = torch.tensor([0.5, 1.5, 2.5])
    vals = torch.tensor([0.0, 10.0, 20.0])
    samples = torch.stack([t] + [vals * (c + 1) for c in range(6)], dim=1)
    out = P.imu(samples, duration=5.0, n=2000)
    assert out.shape == (6, 2000) and out.dtype == torch.float32
    grid = torch.arange(2000) * 5.0 / 2000
    expected = torch.clamp((grid - 0.5) * 10.0, 0.0, 20.0)
    assert torch.allclose(out[0], expected, atol=1e-4)
    assert torch.allclose(out[5], 6 * expected, atol=1e-3)


def test_imu_accepts_unsorted_samples_and_single_sample() -> None:
    s = torch.tensor([[1.0, 1, 1, 1, 1, 1, 1], [0.0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    assert torch.allclose(P.imu(s, 1.0, 4)[0], torch.tensor([0.0, 0.25, 0.5, 0.75]))
    one = P.imu(torch.tensor([[0.2, 1, 2, 3, 4, 5, 6]]))
    assert torch.equal(one[:, 0], torch.tensor([1.0, 2, 3, 4, 5, 6])) and torch.equal(one[:, 0], one[:, -1])


def test_imu_on_real_xio3_recording() -> None:
    raw = np.loadtxt(_need(REAL / "imu_xio3_50hz.csv"), delimiter=",", skiprows=1)
    t = (raw[:, 0] - raw[0, 0]) * 1e-6
    gyro = np.deg2rad(raw[:, 1:4])
    acc = raw[:, 4:7] * 9.80665
    window = t < 5.0
    samples = torch.from_numpy(np.column_stack([t, acc, gyro])[window])
    out = P.imu(samples)
    assert out.shape == (6, 2000)
    assert torch.isfinite(out).all()
    # Gravity shows up on the accelerometer: |a| about 9.8 m/s^2 at rest.
    assert 8.0 < out[:3].norm(dim=0).median() < 11.5
    batch = P.imu_batch([samples, samples[::2]])
    assert batch.shape == (2, 6, 2000)


def test_imu_rejects_wrong_columns() -> None:
    with pytest.raises(ValueError, match=r"\[N, 7\]"):
        P.imu(torch.zeros(10, 6))


def test_prepare_mixed_sizes_keeps_order() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (2, 240, 320, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 100, 200, 3), dtype=np.uint8)
    out = P.prepare("vision", [a, b, a], "cpu")
    assert out.shape == (3, 3, 2, 224, 224)
    assert torch.equal(out[0], out[2])
    assert torch.allclose(out[1], P.clip(torch.from_numpy(b)[None])[0])


def test_prepare_every_modality() -> None:
    rng = np.random.default_rng(3)
    shapes = {
        "audio": ([rng.standard_normal(32000).astype(np.float32) * 0.1] * 2, (2, 1, 128, 204)),
        "imu": ([np.column_stack([np.linspace(0, 5, 50), rng.standard_normal((50, 6))])], (1, 6, 2000)),
        "depth": ([np.full((120, 160), 2.0, np.float32), np.full((60, 90), 1.0, np.float32)], (2, 1, 224, 224)),
        "thermal": ([rng.random((120, 160), dtype=np.float32)], (1, 1, 224, 224)),
        "text": (["a dog", "a car"], (2, 77)),
    }
    for modality, (payloads, shape) in shapes.items():
        out = P.prepare(modality, payloads, torch.device("cpu"))
        assert tuple(out.shape) == shape, modality
    ro = np.zeros((2, 50, 60, 3), np.uint8)
    ro.flags.writeable = False
    assert P.prepare("vision", [ro], "cpu").shape == (1, 3, 2, 224, 224)


def test_prepare_errors_name_modality_and_expectation() -> None:
    with pytest.raises(ValueError, match="vision payload 1: expected uint8 \\[2, H, W, 3\\]"):
        P.prepare("vision", [np.zeros((2, 8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)], "cpu")
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        P.prepare("smell", [1], "cpu")
    with pytest.raises(TypeError, match="text payload 0: expected str"):
        P.prepare("text", [3], "cpu")


def test_prepare_makes_the_input_each_towers_contract_describes() -> None:
    """Every registry tower's input shape is what prepare makes for it, and a tower with another
    spectrogram size gets that size: the numbers come from the tower's config."""
    from encoders.config import get_config, input_shape_for

    rng = np.random.default_rng(4)
    payloads = {
        "vision": [rng.integers(0, 256, (2, 240, 320, 3), dtype=np.uint8)],
        "audio": [rng.standard_normal(32000).astype(np.float32) * 0.1],
        "imu": [np.column_stack([np.linspace(0, 5, 50), rng.standard_normal((50, 6))])],
        "depth": [np.full((120, 160), 2.0, np.float32)],
        "thermal": [rng.random((120, 160), dtype=np.float32)],
        "text": ["a dog"],
    }
    for name in ("imagebind_tiny", "imagebind_huge"):
        cfg = get_config(name)
        for modality, tower in cfg.towers.items():
            out = P.prepare(modality, payloads[modality], config=cfg)
            assert tuple(out.shape[1:]) == tower.input_shape == input_shape_for(modality, tower.preprocess)
    small = get_config({"audio_num_mel_bins": 64, "audio_target_len": 300})
    assert P.prepare("audio", payloads["audio"], config=small).shape == (1, 1, 64, 300)


def test_a_tower_whose_input_disagrees_with_its_preprocessing_is_refused() -> None:
    import dataclasses

    from encoders.config import get_config

    audio = get_config("imagebind_tiny").audio
    with pytest.raises(ValueError, match=r"tower 'audio': input_shape \(1, 128, 300\) disagrees"):
        dataclasses.replace(audio, input_shape=(1, 128, 300))
