"""Drop-in replacements for the reference ``imagebind.data`` loaders.

Same names, positional order and keyword arguments as ``imagebind/data.py`` (with ``device``
defaulting to ``"cpu"``), so migrating code changes only its import::

    from encoders.compat import load_and_transform_vision_data, load_and_transform_text

They reproduce the reference numerics, quirks included (see docs/preprocessing.md):

* vision: PIL bicubic resize of the short side (not a tensor resize: that differs by up to 0.08);
* audio: every clip's mean is subtracted *in place on the resampled waveform*, and clips
  overlap, so later clips see samples already shifted by earlier clips' means; for stereo
  files the mean is taken over both channels and the filter bank reads channel 0 only;
* video: frames decoded with PyAV instead of decord, the reference's frame choice
  (ConstantClipsPerVideoSampler, decord's frame rate/count, first and last frame of each
  clip), bilinear short-side scale without antialiasing and 3 spatial crops
  (left/centre/right or top/centre/bottom); only the chosen frames are kept in memory.

These loaders are for offline use and migration; the streaming pipeline uses
:mod:`encoders.preprocess`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .preprocess import (
    AUDIO_MEAN,
    AUDIO_STD,
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_SIZE,
    _FBANK_KW,
    _pad_or_crop_frames,
)
from .text import tokenize

__all__ = [
    "load_and_transform_vision_data",
    "load_and_transform_text",
    "load_and_transform_audio_data",
    "load_and_transform_video_data",
    "clip_timepoints",
]

logger = logging.getLogger(__name__)

_VIDEO_FRAMES_PER_CLIP = 2  # reference: UniformTemporalSubsample(num_samples=clip_duration)


def _normalise_chw(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(3, *([1] * (x.ndim - 1)))
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(3, *([1] * (x.ndim - 1)))
    return (x - mean) / std


def load_and_transform_vision_data(
    image_paths: Sequence[str | Path] | None, device: str | torch.device = "cpu"
) -> torch.Tensor | None:
    """Images -> ``float32 [B, 3, 224, 224]``, identical to the reference loader."""
    if image_paths is None:
        return None
    from PIL import Image

    outputs = []
    for path in image_paths:
        with open(path, "rb") as fh:
            img = Image.open(fh).convert("RGB")
        w, h = img.size
        # torchvision Resize(224) on a PIL image: short side 224, long side int(224*long/short).
        if w <= h:
            nw, nh = IMAGE_SIZE, int(IMAGE_SIZE * h / w)
        else:
            nw, nh = int(IMAGE_SIZE * w / h), IMAGE_SIZE
        img = img.resize((nw, nh), Image.BICUBIC)
        top = int(round((nh - IMAGE_SIZE) / 2.0))
        left = int(round((nw - IMAGE_SIZE) / 2.0))
        img = img.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32) / 255.0
        outputs.append(_normalise_chw(x).to(device))
    return torch.stack(outputs, dim=0)


def load_and_transform_text(text: Sequence[str] | None, device: str | torch.device = "cpu") -> torch.Tensor | None:
    """Strings -> token ids ``int64 [B, 77]``, identical to the reference loader."""
    if text is None:
        return None
    return tokenize(list(text)).to(device)


def clip_timepoints(duration: float, clip_duration: float, clips_per_video: int) -> list[tuple[Fraction, Fraction]]:
    """Clip (start, end) seconds as the pinned pytorchvideo ``ConstantClipsPerVideoSampler`` gives.

    Starts are ``k * max(duration - clip_duration, 0) / (clips_per_video - 1)`` as exact
    Fractions of the float difference (pytorchvideo commit 6cdc929, which ImageBind pins; the
    PyPI 0.1.5 release divides by ``clips_per_video`` instead).
    """
    if clips_per_video < 1:
        raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}")
    length = Fraction(clip_duration)
    max_start = Fraction(max(duration - length, 0))
    step = max_start / (clips_per_video - 1) if clips_per_video > 1 else Fraction(0)
    points = []
    for k in range(clips_per_video):
        start = step * k
        points.append((start, start + length))
        # The sampler stops early only when the next start would pass the last possible one.
        if step * (k + 1) > max_start:
            break
    return points


def _decode_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Decode with PyAV to float32 ``[channels, samples]`` in [-1, 1] and its sample rate."""
    import av

    chunks: list[np.ndarray] = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        rate = stream.rate
        channels = stream.channels
        for frame in container.decode(stream):
            arr = frame.to_ndarray()
            if not frame.format.is_planar:
                arr = arr.reshape(-1, channels).T  # packed: interleaved samples
            chunks.append(arr)
    if not chunks:
        raise ValueError(f"{path}: audio stream holds no samples")
    data = np.concatenate(chunks, axis=1)
    # Integer PCM scaled by a power of two, as libsndfile/torchaudio do (int16 / 32768).
    if data.dtype == np.int16:
        wave = data.astype(np.float32) / 32768.0
    elif data.dtype == np.int32:
        wave = (data.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif data.dtype == np.uint8:
        wave = (data.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.floating):
        wave = data.astype(np.float32)
    else:
        raise ValueError(f"{path}: unsupported sample format {data.dtype}")
    return torch.from_numpy(np.ascontiguousarray(wave)), rate


def load_and_transform_audio_data(
    audio_paths: Sequence[str | Path] | None,
    device: str | torch.device = "cpu",
    num_mel_bins: int = 128,
    target_length: int = 204,
    sample_rate: int = 16000,
    clip_duration: float = 2,
    clips_per_video: int = 3,
    mean: float = AUDIO_MEAN,
    std: float = AUDIO_STD,
) -> torch.Tensor | None:
    """Audio files -> ``float32 [B, clips_per_video, 1, num_mel_bins, target_length]``.

    The same float32 torch/torchaudio calls as the reference, in its order. Matches the fixture
    within 1e-4 wherever a mel bin's log energy is >= -13; in bins near the fbank floor the
    result carries the rounding of this CPU's FFT/convolution kernels (up to ~3e-4 between
    CPUs), see docs/preprocessing.md.
    """
    if audio_paths is None:
        return None
    import torchaudio

    fbank_kw = dict(_FBANK_KW, num_mel_bins=num_mel_bins, sample_frequency=sample_rate)
    outputs = []
    for path in audio_paths:
        wave, sr = _decode_audio(path)
        if sr != sample_rate:
            wave = torchaudio.functional.resample(wave, orig_freq=sr, new_freq=sample_rate)
        clips = []
        for start, end in clip_timepoints(wave.shape[1] / sample_rate, clip_duration, clips_per_video):
            # A view, deliberately: the reference subtracts each clip's mean in place, and
            # overlapping clips then see the earlier shift. Needed to match it within 1e-4.
            view = wave[:, int(start * sample_rate) : int(end * sample_rate)]
            view -= view.mean()
            fb = torchaudio.compliance.kaldi.fbank(view, **fbank_kw).transpose(0, 1)  # (mel, frames)
            fb = _pad_or_crop_frames(fb, target_length).unsqueeze(0)
            clips.append(((fb - mean) / std).to(device))
        outputs.append(torch.stack(clips, dim=0))
    return torch.stack(outputs, dim=0)


def _video_meta(stream, container, path: str | Path) -> tuple[float, int]:
    """Average frame rate and frame count as decord (behind pytorchvideo's EncodedVideo) reports them.

    decord's ``get_avg_fps`` is the stream's ``avg_frame_rate`` and ``len(reader)`` is the
    container's ``nb_frames``, estimated as ``avg_frame_rate * duration`` when absent.
    """
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise ValueError(f"{path}: video stream has no frame rate")
    fps = float(rate)
    n = int(stream.frames or 0)
    if n < 1 and container.duration:
        n = int(fps * container.duration / 1_000_000)
    return fps, n


def _clip_frame_indices(
    fps: float, n: int, clip_duration: float, clips_per_video: int, path: str | Path
) -> list[list[int]]:
    """Per temporal clip, the 2 frame indices the reference keeps.

    pytorchvideo ``EncodedVideoDecord.get_clip(start, end)`` returns frames
    ``ceil(fps * start)`` .. ``min(ceil(fps * end), n) - 1``; ``UniformTemporalSubsample(2)``
    then keeps ``linspace(0, t - 1, 2).long()`` of those t frames, i.e. the first and the last.
    """
    clips = []
    for start, end in clip_timepoints(n / fps, clip_duration, clips_per_video):
        first = math.ceil(fps * start)
        stop = min(math.ceil(fps * end), n)
        if stop <= first:
            raise ValueError(f"{path}: no frames between {float(start):.3f} s and {float(end):.3f} s")
        t = stop - first
        sub = torch.linspace(0, t - 1, _VIDEO_FRAMES_PER_CLIP).clamp(0, t - 1).long() + first
        clips.append(sub.tolist())
    return clips


def _decode_frames(path: str | Path, clip_duration: float, clips_per_video: int) -> list[torch.Tensor]:
    """The reference's frames per temporal clip, each uint8 ``[2, H, W, 3]``.

    Only the selected frames are converted to RGB and kept, so memory does not grow with the
    length of the video (decord also decodes only what ``get_batch`` asks for).
    """
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps, n = _video_meta(stream, container, path)
        if n < 1:
            raise ValueError(f"{path}: video stream holds no frames")
        clips = _clip_frame_indices(fps, n, clip_duration, clips_per_video, path)
        wanted = {i for clip in clips for i in clip}
        last_wanted = max(wanted)
        got: dict[int, np.ndarray] = {}
        last = None
        for i, frame in enumerate(container.decode(stream)):
            last = frame
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last_wanted:
                break
        else:
            # Fewer decodable frames than the container declares: repeat the last decoded one.
            if last is None:
                raise ValueError(f"{path}: video stream holds no decodable frames")
            missing = sorted(wanted - set(got))
            logger.warning("%s: frames %s not decodable (container declares %d); repeating the last one",
                           path, missing, n)
            tail = last.to_ndarray(format="rgb24")
            for i in missing:
                got[i] = tail
    return [torch.from_numpy(np.stack([got[i] for i in clip])) for clip in clips]


def _short_side_scale(x: torch.Tensor, size: int) -> torch.Tensor:
    # pytorchvideo ShortSideScale: (C, T, H, W), bilinear, floor of the long side, no antialias.
    _, _, h, w = x.shape
    if w < h:
        nh, nw = int(math.floor(h / w * size)), size
    else:
        nh, nw = size, int(math.floor(w / h * size))
    return F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)


def _uniform_crop(x: torch.Tensor, size: int, spatial_idx: int) -> torch.Tensor:
    # (C, T, H, W): 0/1/2 = left/centre/right for landscape, top/centre/bottom for portrait.
    h, w = x.shape[-2:]
    y = int(math.ceil((h - size) / 2))
    xo = int(math.ceil((w - size) / 2))
    if h > w:
        y = {0: 0, 1: y, 2: h - size}[spatial_idx]
    else:
        xo = {0: 0, 1: xo, 2: w - size}[spatial_idx]
    return x[..., y : y + size, xo : xo + size]


def load_and_transform_video_data(
    video_paths: Sequence[str | Path] | None,
    device: str | torch.device = "cpu",
    clip_duration: float = 2,
    clips_per_video: int = 5,
    sample_rate: int = 16000,
) -> torch.Tensor | None:
    """Videos -> ``float32 [B, clips_per_video * 3, 3, 2, 224, 224]`` (3 spatial crops per clip).

    ``sample_rate`` is accepted for signature compatibility (the reference passes it to the
    decoder for the audio track it does not decode) and otherwise unused.
    """
    if video_paths is None:
        return None
    del sample_rate
    outputs = []
    for path in video_paths:
        crops = []
        for frames in _decode_frames(path, clip_duration, clips_per_video):
            x = frames.permute(3, 0, 1, 2).to(torch.float32) / 255.0  # (C, T, H, W)
            x = _normalise_chw(_short_side_scale(x, IMAGE_SIZE))
            crops.extend(_uniform_crop(x, IMAGE_SIZE, k) for k in range(3))
        outputs.append(torch.stack(crops, dim=0))
    return torch.stack(outputs, dim=0).to(device)
