"""Batched, device-agnostic preprocessing from aligned windows to ImageBind inputs.

Every function works on the device of its input tensor and never moves data on its own; only
:func:`prepare` (the dispatcher the encoder actors call) moves the raw payloads to the target
device, before the heavy work, so resizing and filter banks run on the GPU when there is one.

Sizes, statistics, rates and durations come from a tower's preprocessing contract
(``TowerConfig.preprocess`` in ``encoders/config.py``); every function takes the reference one
when given none. ``docs/preprocessing.md`` lists each value and where it comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import (
    AudioPreprocess,
    DepthPreprocess,
    ImageBindConfig,
    ImuPreprocess,
    TextPreprocess,
    ThermalPreprocess,
    VisionPreprocess,
)
from .text import tokenize

__all__ = [
    "IMAGE_SIZE",
    "CLIP_MEAN",
    "CLIP_STD",
    "AUDIO_SAMPLE_RATE",
    "AUDIO_CLIP_SAMPLES",
    "AUDIO_MEL_BINS",
    "AUDIO_TARGET_FRAMES",
    "AUDIO_MEAN",
    "AUDIO_STD",
    "DEPTH_BASELINE_M",
    "DEPTH_FOCAL_PX",
    "DEPTH_MIN_M",
    "DEPTH_MAX_M",
    "DISPARITY_MIN",
    "DISPARITY_MAX",
    "IMU_SAMPLES",
    "IMU_DURATION_S",
    "IMU_MAX_ABS",
    "AUDIO_MAX_ABS",
    "resize_short_side",
    "center_crop",
    "image",
    "clip",
    "audio",
    "depth",
    "thermal",
    "imu",
    "imu_batch",
    "text",
    "prepare",
    "without_bad_values",
]

# The reference contract of each tower (encoders/config.py): what every function below uses when
# it is not given a tower's own. The module-level names are aliases of those defaults.
_VISION = VisionPreprocess()
_AUDIO = AudioPreprocess()
_DEPTH = DepthPreprocess()
_THERMAL = ThermalPreprocess()
_IMU = ImuPreprocess()
_TEXT = TextPreprocess()
_DEFAULTS = {"vision": _VISION, "audio": _AUDIO, "depth": _DEPTH, "thermal": _THERMAL, "imu": _IMU, "text": _TEXT}

IMAGE_SIZE = _VISION.size
CLIP_MEAN = _VISION.mean
CLIP_STD = _VISION.std
AUDIO_SAMPLE_RATE = _AUDIO.sample_rate
AUDIO_CLIP_SAMPLES = _AUDIO.clip_samples
AUDIO_MEL_BINS = _AUDIO.mel_bins
AUDIO_TARGET_FRAMES = _AUDIO.target_frames
AUDIO_MEAN = _AUDIO.mean
AUDIO_STD = _AUDIO.std
DEPTH_BASELINE_M = _DEPTH.baseline_m
DEPTH_FOCAL_PX = _DEPTH.focal_px
DEPTH_MIN_M = _DEPTH.min_m
DEPTH_MAX_M = _DEPTH.max_m
DISPARITY_MIN = _DEPTH.disparity_min
DISPARITY_MAX = _DEPTH.disparity_max
IMU_SAMPLES = _IMU.samples
IMU_DURATION_S = _IMU.duration_s

# The largest magnitude a sample may have and reach a tower (see without_bad_values). IMU: in
# m/s^2 and rad/s, about 1000 g and 570 000 deg/s, beyond any IMU the tower was trained on; the
# IMU stem is linear on raw values, so a value near float32's limit (3e37 g) overflows its
# first layer and makes the whole embedding NaN. Audio: full scale is 1; 1e4 is 80 dB above
# it, no waveform, and past about 1e16 the log-mel's power spectrum overflows float32.
IMU_MAX_ABS = 1e4
AUDIO_MAX_ABS = 1e4


def _fbank_kw(cfg: AudioPreprocess) -> dict[str, Any]:
    """Kaldi fbank options of the reference ``waveform2melspec``."""
    return {
        "htk_compat": True,
        "sample_frequency": cfg.sample_rate,
        "use_energy": False,
        "window_type": "hanning",
        "num_mel_bins": cfg.mel_bins,
        "dither": 0.0,
        "frame_length": cfg.frame_length_ms,
        "frame_shift": cfg.frame_shift_ms,  # DEFAULT_AUDIO_FRAME_SHIFT_MS
    }


_FBANK_KW = _fbank_kw(_AUDIO)


def _mean_std(device: torch.device, dtype: torch.dtype,
              cfg: VisionPreprocess = _VISION) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(cfg.mean, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=device, dtype=dtype).view(1, 3, 1, 1)
    return mean, std


def _resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision Resize(int): short side -> size, long side truncated like int(size*long/short).
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def resize_short_side(x: torch.Tensor, size: int = IMAGE_SIZE, mode: str = "bicubic") -> torch.Tensor:
    """Resize float ``[B, C, H, W]`` so the short side is ``size`` (antialiased)."""
    if x.ndim != 4:
        raise ValueError(f"resize_short_side: expected [B, C, H, W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    nh, nw = _resized_hw(h, w, size)
    if (nh, nw) == (h, w):
        return x
    return F.interpolate(x, size=(nh, nw), mode=mode, antialias=True, align_corners=False)


def _crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    if h < size or w < size:
        raise ValueError(f"center_crop: image {h}x{w} is smaller than the {size}x{size} crop")
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def center_crop(x: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Centre crop the last two dims to ``size`` (torchvision CenterCrop offsets)."""
    top, left = _crop_offsets(*x.shape[-2:], size)
    return x[..., top : top + size, left : left + size]


def _to_unit_float(frames: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if frames.dtype == torch.uint8:
        return frames.to(torch.float32), True  # still 0..255; divided after the resize
    if not frames.is_floating_point():
        raise TypeError(f"expected uint8 or float frames, got {frames.dtype}")
    return frames.to(torch.float32), False


def image(frames: torch.Tensor, *, cfg: VisionPreprocess = _VISION) -> torch.Tensor:
    """RGB frames ``[B, H, W, 3]`` (uint8 0..255, or float in [0, 1]) -> ``float32 [B, 3, 224, 224]``.

    Short side to 224 with antialiased bicubic, centre crop, CLIP mean/std. For uint8 input the
    resized values are clamped and rounded to 0..255 first, as PIL's uint8 resize in the
    reference does, which keeps us within a few 1e-2 of the reference on real photos. ``cfg``:
    the vision tower's contract (size, mean, std); the sizes above are the reference one's.
    """
    return _image(frames, cfg).contiguous()


def _image(frames: torch.Tensor, cfg: VisionPreprocess = _VISION) -> torch.Tensor:
    """:func:`image` without the final copy: the result keeps the channels-last strides of the
    input (:func:`clip` permutes it once more, so it copies once, not twice)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"image: expected frames [B, H, W, 3], got shape {tuple(frames.shape)}")
    h, w = frames.shape[1:3]
    size = cfg.size
    at_size = _resized_hw(h, w, size) == (h, w)
    if at_size:
        # Already at the model's size (the sources decode to a 224 short side): the resize is
        # the identity and every step below acts per pixel, so cropping first gives the same
        # values and converts ~40 % fewer pixels of a 16:9 frame.
        top, left = _crop_offsets(h, w, size)
        frames = frames[:, top : top + size, left : left + size]
    x, is_uint8 = _to_unit_float(frames)
    x = x.permute(0, 3, 1, 2)  # (B, 3, H, W)
    # From here on x is a tensor of this function's own (a uint8 input's float copy, or the
    # resize's or the clamp's result), so the per-pixel steps run in place: the same values as
    # out of place, without a new batch-sized tensor for each step.
    if is_uint8 and at_size:
        x = x.div_(255.0)  # whole numbers in 0..255, not resized: the clamp and round are no-ops
    else:
        x = resize_short_side(x, size)
        x = x.clamp_(0.0, 255.0).round_().div_(255.0) if is_uint8 else x.clamp(0.0, 1.0)
        x = center_crop(x, size)
    mean, std = _mean_std(x.device, x.dtype, cfg)
    return x.sub_(mean).div_(std)


def clip(frames: torch.Tensor, *, cfg: VisionPreprocess = _VISION) -> torch.Tensor:
    """Video clips ``[B, T, H, W, 3]`` -> ``float32 [B, 3, T, 224, 224]`` (per-frame :func:`image`)."""
    if frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"clip: expected frames [B, T, H, W, 3], got shape {tuple(frames.shape)}")
    b, t = frames.shape[:2]
    x = _image(frames.reshape(b * t, *frames.shape[2:]), cfg)  # (B*T, 3, 224, 224)
    return x.reshape(b, t, 3, cfg.size, cfg.size).permute(0, 2, 1, 3, 4).contiguous()


def _fbank_one(wave: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    import torchaudio

    fb = torchaudio.compliance.kaldi.fbank(wave.unsqueeze(0), **kw)  # (frames, mel)
    return fb.transpose(0, 1)  # (mel, frames)


def _pad_or_crop_frames(fb: torch.Tensor, target: int) -> torch.Tensor:
    n = fb.shape[-1]
    if n < target:
        return F.pad(fb, (0, target - n))
    return fb[..., :target]


def audio(wave: torch.Tensor, *, cfg: AudioPreprocess = _AUDIO) -> torch.Tensor:
    """Mono 16 kHz clips ``float32 [B, 32000]`` -> log-mel ``[B, 1, 128, 204]``.

    Per clip: subtract its mean (on a copy: the streaming form has no overlapping clips),
    Kaldi fbank with the reference options, zero-pad 198 -> 204 frames, ``(x + 4.268) / 9.138``.
    Shorter or longer clips are accepted; the frame axis is padded/cropped to 204. ``cfg``: the
    audio tower's contract (rate, mel bins, frames, statistics); the numbers above are the reference one's.
    """
    if wave.ndim != 2:
        raise ValueError(f"audio: expected waveforms [B, samples], got shape {tuple(wave.shape)}")
    frame = int(cfg.sample_rate * cfg.frame_length_ms / 1000)
    if wave.shape[1] < frame:
        raise ValueError(f"audio: clips of {wave.shape[1]} samples are shorter than one {cfg.frame_length_ms:g} ms frame")
    x = wave.to(torch.float32)
    x = x - x.mean(dim=1, keepdim=True)
    # kaldi.fbank takes one waveform at a time; the per-clip cost is dominated by its FFT anyway.
    kw = _FBANK_KW if cfg == _AUDIO else _fbank_kw(cfg)
    fb = torch.stack([_fbank_one(row, kw) for row in x])  # (B, mel, frames)
    fb = _pad_or_crop_frames(fb, cfg.target_frames)
    return ((fb - cfg.mean) / cfg.std).unsqueeze(1)


def _resize_crop_single_channel(x: torch.Tensor, size: int) -> torch.Tensor:
    # x: (B, 1, H, W) float -> (B, 1, size, size)
    return center_crop(resize_short_side(x, size), size)


def depth(
    depth_m: torch.Tensor,
    *,
    focal_px: float | None = None,
    baseline_m: float | None = None,
    cfg: DepthPreprocess = _DEPTH,
) -> torch.Tensor:
    """Depth in metres ``[B, H, W]`` -> normalised disparity ``float32 [B, 1, 224, 224]``.

    ``disparity = baseline * focal / clip(depth, 0.01, 50)``, then Omnivore's DepthNorm
    ``clip(disparity, 0.01, 75) / 75`` so values lie in (0, 1], near = large. Zero, negative
    or non-finite depth means "no reading" and becomes disparity 0 (as far as infinity), so
    holes do not look like very near surfaces. Resized at full resolution after the
    conversion (short side 224, antialiased bicubic, clamped to [0, 1]), then centre cropped.
    ``cfg``: the depth tower's contract (the numbers above); ``focal_px`` and ``baseline_m``
    override its sensor for other cameras.
    """
    if depth_m.ndim != 3:
        raise ValueError(f"depth: expected depth maps [B, H, W] in metres, got shape {tuple(depth_m.shape)}")
    return _disparity_input(_disparity(depth_m, cfg, focal_px=focal_px, baseline_m=baseline_m), cfg)


def _disparity(
    depth_m: torch.Tensor, cfg: DepthPreprocess = _DEPTH, *, focal_px: float | None = None,
    baseline_m: float | None = None,
) -> torch.Tensor:
    """The per-pixel part of :func:`depth`: metres (any shape) -> normalised disparity."""
    focal = cfg.focal_px if focal_px is None else focal_px
    baseline = cfg.baseline_m if baseline_m is None else baseline_m
    d = depth_m.to(torch.float32)
    valid = torch.isfinite(d) & (d > 0)
    d = torch.where(valid, d, torch.ones_like(d)).clamp(cfg.min_m, cfg.max_m)
    disp = (baseline * focal) / d
    disp = disp.clamp(cfg.disparity_min, cfg.disparity_max) / cfg.disparity_max
    return torch.where(valid, disp, torch.zeros_like(disp))


def _disparity_input(disp: torch.Tensor, cfg: DepthPreprocess = _DEPTH) -> torch.Tensor:
    """The spatial part of :func:`depth`: disparity ``[B, H, W]`` -> ``[B, 1, size, size]``."""
    out = _resize_crop_single_channel(disp.unsqueeze(1), cfg.size)
    return out.clamp_(0.0, 1.0).contiguous()


_MM_TABLES: dict[tuple[torch.device, DepthPreprocess], torch.Tensor] = {}


def _disparity_from_mm(mm: torch.Tensor, cfg: DepthPreprocess = _DEPTH) -> torch.Tensor:
    """uint16 millimetres -> :func:`_disparity` of ``mm / 1000``, looked up in a table of all
    65536 values made with that same arithmetic (so bit-identical), one gather instead of
    eight passes over the frame (about 4x faster on a CPU)."""
    table = _MM_TABLES.get((mm.device, cfg))
    if table is None:
        every = torch.arange(65536, device=mm.device, dtype=torch.int32).to(torch.float32) / 1000.0
        table = _MM_TABLES[(mm.device, cfg)] = _disparity(every, cfg)
    return torch.take(table, mm.to(torch.int64))


def thermal(x: torch.Tensor, *, cfg: ThermalPreprocess = _THERMAL) -> torch.Tensor:
    """Thermal frames ``[B, H, W]`` in [0, 1] -> ``float32 [B, 1, 224, 224]``.

    No mean/std normalisation: ImageBind published no thermal loader, and a single-channel
    ``ToTensor`` image in [0, 1] is the input the public ImageBind thermal examples use; we
    keep the [0, 1] range (see docs/preprocessing.md). Non-finite values become 0.
    """
    if x.ndim != 3:
        raise ValueError(f"thermal: expected frames [B, H, W] in [0, 1], got shape {tuple(x.shape)}")
    t = torch.nan_to_num(x.to(torch.float32), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    out = _resize_crop_single_channel(t.unsqueeze(1), cfg.size)
    return out.clamp_(0.0, 1.0).contiguous()


def imu(samples: torch.Tensor, duration: float | None = None, n: int | None = None, *,
        cfg: ImuPreprocess = _IMU) -> torch.Tensor:
    """IMU samples ``[N, 7]`` (t s from window start, ax, ay, az m/s^2, gx, gy, gz rad/s) -> ``[6, n]``.

    Linear interpolation onto ``n`` evenly spaced times ``k * duration / n`` covering
    ``[0, duration)``; before the first and after the last sample the edge value is held.
    Samples need not be sorted; duplicate timestamps keep the later sample. ``n`` defaults to
    the IMU tower's ``samples`` (``cfg``), ``duration`` to its ``duration_s``; a window of
    another length passes its own span as ``duration``.
    """
    duration = cfg.duration_s if duration is None else duration
    n = cfg.samples if n is None else n
    if samples.ndim != 2 or samples.shape[1] != 7:
        raise ValueError(f"imu: expected samples [N, 7] (t, ax, ay, az, gx, gy, gz), got shape {tuple(samples.shape)}")
    if samples.shape[0] == 0:
        raise ValueError("imu: window holds no samples")
    if not duration > 0 or n < 1:
        raise ValueError(f"imu: duration must be > 0 and n >= 1, got duration={duration}, n={n}")
    s = samples.to(torch.float64)  # float64 time keeps sub-ms spacing exact over long sessions
    order = torch.argsort(s[:, 0], stable=True)
    s = s[order]
    t, v = s[:, 0].contiguous(), s[:, 1:]  # (N,), (N, 6)
    grid = torch.arange(n, device=s.device, dtype=torch.float64) * (duration / n)
    # Index of the first sample strictly after each grid time; ties resolve to the later one.
    hi = torch.searchsorted(t, grid, right=True).clamp(1, max(t.numel() - 1, 1))
    lo = hi - 1
    if t.numel() == 1:
        return v[0].unsqueeze(1).expand(6, n).to(torch.float32).contiguous()
    t0, t1 = t[lo], t[hi]
    span = t1 - t0
    w = torch.where(span > 0, (grid - t0) / torch.where(span > 0, span, torch.ones_like(span)), torch.ones_like(span))
    w = w.clamp(0.0, 1.0).unsqueeze(1)  # clamping = edge hold outside [t_first, t_last]
    out = v[lo] * (1 - w) + v[hi] * w  # (n, 6)
    return out.t().to(torch.float32).contiguous()


def imu_batch(
    list_of_samples: Sequence[torch.Tensor], duration: float | None = None, n: int | None = None, *,
    cfg: ImuPreprocess = _IMU,
) -> torch.Tensor:
    """:func:`imu` over a list of windows -> ``[B, 6, n]``."""
    if len(list_of_samples) == 0:
        raise ValueError("imu_batch: empty batch")
    return torch.stack([imu(s, duration, n, cfg=cfg) for s in list_of_samples])


def text(texts: list[str], *, cfg: TextPreprocess = _TEXT) -> torch.Tensor:
    """Token ids ``LongTensor [B, context_length]`` (the reference CLIP tokenizer; 77 positions)."""
    return tokenize(texts, context_length=cfg.context_length)


# ---------------------------------------------------------------------------------------------
# Dispatcher for the encoder actors
# ---------------------------------------------------------------------------------------------

_EXPECTED = {
    "vision": "uint8 [2, H, W, 3] (2-frame clip)",
    "audio": f"float32 [{AUDIO_CLIP_SAMPLES}] mono at 16 kHz",
    "imu": "float [N, 7] (t, ax, ay, az, gx, gy, gz)",
    "depth": "uint16 [H, W] millimetres or float32 [H, W] metres",
    "thermal": "uint8 / uint16 [H, W] (full range) or float32 [H, W] in [0, 1]",
    "text": "str",
}


def _to_device(arr: Any, device: torch.device, modality: str, index: int) -> torch.Tensor:
    if isinstance(arr, torch.Tensor):
        t = arr
    else:
        try:
            a = np.ascontiguousarray(arr)
            if not a.flags.writeable:
                a = a.copy()  # torch cannot wrap read-only memory (e.g. Ray object store)
            t = torch.from_numpy(a)
        except TypeError as exc:
            raise TypeError(
                f"{modality} payload {index}: expected {_EXPECTED[modality]}, got {type(arr).__name__}"
            ) from exc
    if device.type == "cuda":
        # Pinned host memory lets the copy overlap with compute on the current stream.
        if t.device.type == "cpu":
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


def _grouped(items: list[torch.Tensor], fn) -> torch.Tensor:
    """Apply batched ``fn`` to items stacked by spatial shape, restoring the input order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(tuple(it.shape), []).append(i)
    if len(groups) == 1:  # the usual batch: one shape, already in order
        return fn(torch.stack(items))
    results: list[torch.Tensor | None] = [None] * len(items)
    for idx in groups.values():
        out = fn(torch.stack([items[i] for i in idx]))
        for j, i in enumerate(idx):
            results[i] = out[j]
    return torch.stack(results)  # type: ignore[arg-type]


def _check_shape(t: torch.Tensor, modality: str, index: int, ok: bool) -> None:
    if not ok:
        raise ValueError(
            f"{modality} payload {index}: expected {_EXPECTED[modality]}, got shape {tuple(t.shape)} {t.dtype}"
        )


def prepare(modality: str, payloads: list, device: str | torch.device = "cpu", *,
            config: ImageBindConfig | None = None, imu_duration: float | None = None) -> torch.Tensor:
    """Turn a batch of aligner payloads into the model input for ``modality`` on ``device``.

    ===========  =================================  ==========================
    modality     payload (one per window)           returns (reference towers)
    ===========  =================================  ==========================
    vision       uint8 ``[2, H, W, 3]``             ``[B, 3, 2, 224, 224]``
    audio        float32 ``[32000]``                ``[B, 1, 128, 204]``
    imu          float ``[N, 7]``                   ``[B, 6, 2000]``
    depth        uint16 mm / float32 m ``[H, W]``   ``[B, 1, 224, 224]``
    thermal      uint8, uint16, float ``[H, W]``    ``[B, 1, 224, 224]``
    text         ``str``                            int64 ``[B, 77]``
    ===========  =================================  ==========================

    ``config``: the model's config; its tower for ``modality`` gives the preprocessing contract
    (``TowerConfig.preprocess``). ``None``: the reference contract, which every registry model
    shares. ``imu_duration``: the seconds an IMU window spans (its samples' times run from 0 to
    that), resampled into the tower's ``samples``; ``None``: the tower's ``duration_s`` (5 s).

    Payloads of one batch may differ in H, W (different sessions): they are grouped by shape
    and each group is processed as one batch. Integer depth (millimetres) and thermal frames
    (full range = [0, 1]) are converted to float on ``device``, with the same arithmetic as
    ``sources.base.frame_values``.
    """
    if not payloads:
        raise ValueError(f"prepare: empty batch for modality '{modality}'")
    if modality not in _EXPECTED:
        raise ValueError(f"prepare: unknown modality '{modality}', expected one of {sorted(_EXPECTED)}")
    pp = config.towers[modality].preprocess if config is not None else _DEFAULTS[modality]
    dev = torch.device(device)
    if modality == "text":
        for i, p in enumerate(payloads):
            if not isinstance(p, str):
                raise TypeError(f"text payload {i}: expected str, got {type(p).__name__}")
        ids = text(list(payloads), cfg=pp)
        return ids.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else ids.to(dev)
    items = [_to_device(p, dev, modality, i) for i, p in enumerate(payloads)]
    if modality == "vision":
        for i, t in enumerate(items):
            _check_shape(t, modality, i, t.ndim == 4 and t.shape[-1] == 3)
        return _grouped(items, lambda x: clip(x, cfg=pp))
    if modality == "audio":
        for i, t in enumerate(items):
            _check_shape(t, modality, i, t.ndim == 1)
        return _grouped(items, lambda x: audio(x, cfg=pp))
    if modality == "imu":
        for i, t in enumerate(items):
            _check_shape(t, modality, i, t.ndim == 2 and t.shape[1] == 7)
        return imu_batch(items, duration=imu_duration, cfg=pp)
    for i, t in enumerate(items):
        _check_shape(t, modality, i, t.ndim == 2)
    if modality == "depth":
        # Per frame to disparity (a table lookup for 16-bit millimetres), then by shape through
        # the resize: the same values as depth() on the float metres (tests/test_preprocess.py).
        maps = [_disparity_from_mm(t, pp) if t.dtype == torch.uint16 else _disparity(t, pp) for t in items]
        return _grouped(maps, lambda x: _disparity_input(x, pp))
    return _grouped([_thermal_unit(t) for t in items], lambda x: thermal(x, cfg=pp))


def without_bad_values(modality: str, payload: Any) -> tuple[Any, int]:
    """``payload`` without the samples its tower cannot take, and how many there were.

    A sample is bad when it is not finite or its magnitude exceeds :data:`IMU_MAX_ABS` /
    :data:`AUDIO_MAX_ABS`. IMU (``[N, 7]``): rows holding a bad value are removed (resampling
    interpolates across them, as across any gap); ``None`` in place of the payload when no row
    is left. Audio (``[samples]``): bad samples become 0, as the aligner fills gaps. Other
    modalities come back as they are: their preprocessing maps every value into range (depth:
    no reading; thermal: clamped) or they hold none (uint8 video, text). Numbers only: a
    payload of the wrong type or shape is left to :func:`prepare` to refuse.
    """
    limit = {"imu": IMU_MAX_ABS, "audio": AUDIO_MAX_ABS}.get(modality)
    if limit is None or not isinstance(payload, np.ndarray) or payload.dtype.kind != "f":
        return payload, 0
    with np.errstate(invalid="ignore"):
        if payload.size == 0 or float(np.abs(payload).max()) <= limit:  # NaN compares False
            return payload, 0
        bad = ~(np.abs(payload) <= limit)
    if modality == "imu" and payload.ndim == 2:
        rows = bad.any(axis=1)
        kept = payload[~rows]
        return (kept if len(kept) else None), int(rows.sum())
    if modality == "audio" and payload.ndim == 1:
        return np.where(bad, np.zeros((), payload.dtype), payload), int(bad.sum())
    return payload, 0


def _thermal_unit(t: torch.Tensor) -> torch.Tensor:
    """A thermal frame in [0, 1] from the type it travelled in (integers: their full range)."""
    if t.dtype in (torch.uint8, torch.uint16):
        return t.to(torch.float32) / (255.0 if t.dtype == torch.uint8 else 65535.0)
    return t
