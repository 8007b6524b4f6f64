"""ImageBind architectures as data.

A model is an :class:`ImageBindConfig`: one frozen :class:`TowerConfig` per modality plus the shared
output width. Variants live in :data:`REGISTRY` as the keyword arguments the reference
``ImageBindModel(**kwargs)`` takes, so a reference config file (e.g. the fixtures'
``tiny_config.json``) and a registry entry are the same kind of thing and go through the same
:func:`config_from_reference_kwargs`.

Every token count is computed here with arithmetic (no dummy forward pass), so a model can be
built on the ``meta`` device and its parameter shapes checked without allocating memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "MODALITIES",
    "VIDEO_PAD_FRAMES",
    "VisionPreprocess",
    "AudioPreprocess",
    "DepthPreprocess",
    "ThermalPreprocess",
    "ImuPreprocess",
    "TextPreprocess",
    "PreprocessConfig",
    "input_shape_for",
    "TowerConfig",
    "ImageBindConfig",
    "REGISTRY",
    "REFERENCE_DEFAULTS",
    "config_from_reference_kwargs",
    "get_config",
    "list_configs",
]

# Same order as the reference model's ModuleDicts (and as sources.base.MODALITIES).
MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")

# The reference ``ImageBindModel.__init__`` defaults. Note ``depth_embed_dim`` is 384 here while
# the reference's private helper defaults say 768: the constructor's value is what builds the model.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "video_frames": 2,
    "kernel_size": (2, 14, 14),
    "audio_kernel_size": 16,
    "audio_stride": 10,
    "out_embed_dim": 768,
    "vision_embed_dim": 1024,
    "vision_num_blocks": 24,
    "vision_num_heads": 16,
    "audio_embed_dim": 768,
    "audio_num_blocks": 12,
    "audio_num_heads": 12,
    "audio_num_mel_bins": 128,
    "audio_target_len": 204,
    "audio_drop_path": 0.1,
    "text_embed_dim": 768,
    "text_num_blocks": 12,
    "text_num_heads": 12,
    "depth_embed_dim": 384,
    "depth_kernel_size": 16,
    "depth_num_blocks": 12,
    "depth_num_heads": 8,
    "depth_drop_path": 0.0,
    "thermal_embed_dim": 768,
    "thermal_kernel_size": 16,
    "thermal_num_blocks": 12,
    "thermal_num_heads": 12,
    "thermal_drop_path": 0.0,
    "imu_embed_dim": 512,
    "imu_kernel_size": 8,
    "imu_num_blocks": 6,
    "imu_num_heads": 8,
    "imu_drop_path": 0.7,
}

_STEMS = ("video", "text", "image", "imu")

# The reference vision stem (PadIm2Video, ntimes=2) repeats a still image to 2 frames, whatever
# video_frames says.
VIDEO_PAD_FRAMES = 2


# -- preprocessing contracts --------------------------------------------------------------------
# What a tower's input means, as timm's ``pretrained_cfg`` and open_clip's ``PreprocessCfg`` carry
# it: ``encoders.preprocess`` reads its sizes, statistics, rates and durations from here, and the
# pipeline checks its window spans against them (docs/preprocessing.md lists the sources).


@dataclass(frozen=True)
class VisionPreprocess:
    """Reference ``load_and_transform_vision_data``: ``Resize(224, BICUBIC)``, ``CenterCrop(224)``,
    ``Normalize`` with OpenAI CLIP's statistics; clips of ``frames`` frames (``video_frames``)."""

    size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    frames: int = 2


@dataclass(frozen=True)
class AudioPreprocess:
    """Reference ``load_and_transform_audio_data`` defaults and ``waveform2melspec``: 2 s mono
    clips at 16 kHz, Kaldi fbank (25 ms frames, 10 ms shift, 128 mel bins) zero padded to 204
    frames, then ``(x - mean) / std`` with AudioSet's statistics (from AST)."""

    sample_rate: int = 16_000  # Hz
    clip_duration_s: float = 2.0
    mel_bins: int = 128
    target_frames: int = 204  # 2 s at a 10 ms shift gives 198 frames, zero padded
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    mean: float = -4.268
    std: float = 9.138

    @property
    def clip_samples(self) -> int:
        return round(self.sample_rate * self.clip_duration_s)


@dataclass(frozen=True)
class DepthPreprocess:
    """Depth in metres to Omnivore's normalised disparity (ImageBind published no depth loader):
    ``baseline * focal / clip(depth, min_m, max_m)`` (Omnivore issue #12, Kinect), then DepthNorm
    ``clip(disparity, disparity_min, disparity_max) / disparity_max``; short side to ``size``,
    centre crop."""

    size: int = 224
    baseline_m: float = 0.075  # Kinect v1/v2 baseline used for SUN RGB-D "kv1"/"kv2" sensors
    focal_px: float = 518.857901  # Kinect v1 fx (NYU Depth v2 / SUN RGB-D kv1 intrinsics)
    min_m: float = 0.01  # convert_depth_to_disparity(min_depth=0.01)
    max_m: float = 50.0  # convert_depth_to_disparity(max_depth=50)
    disparity_min: float = 0.01  # DepthNorm min_depth (applied to disparity)
    disparity_max: float = 75.0  # DepthNorm max_depth, clamp before scaling


@dataclass(frozen=True)
class ThermalPreprocess:
    """One channel in [0, 1], short side to ``size``, centre crop; no mean/std (ImageBind
    published no thermal loader; docs/preprocessing.md)."""

    size: int = 224


@dataclass(frozen=True)
class ImuPreprocess:
    """``samples`` per channel covering ``duration_s``: the reference tower takes ``(6, 2000)``
    and the ImageBind paper feeds it 5 s Ego4D windows (400 Hz). No IMU loader was published."""

    samples: int = 2000
    duration_s: float = 5.0


@dataclass(frozen=True)
class TextPreprocess:
    """The reference CLIP tokenizer's ids, padded to ``context_length`` positions."""

    context_length: int = 77


PreprocessConfig = (
    VisionPreprocess | AudioPreprocess | DepthPreprocess | ThermalPreprocess | ImuPreprocess | TextPreprocess
)

# The preprocessing type of each modality's tower, and the reference contract (its defaults).
_PREPROCESS_TYPES: dict[str, type] = {
    "vision": VisionPreprocess, "text": TextPreprocess, "audio": AudioPreprocess,
    "depth": DepthPreprocess, "thermal": ThermalPreprocess, "imu": ImuPreprocess,
}


def input_shape_for(modality: str, pp: PreprocessConfig) -> tuple[int, ...]:
    """The shape of one clip (no batch dimension) that ``pp`` produces for ``modality``."""
    if modality == "vision":
        return (3, pp.frames, pp.size, pp.size)
    if modality == "audio":
        return (1, pp.mel_bins, pp.target_frames)
    if modality in ("depth", "thermal"):
        return (1, pp.size, pp.size)
    if modality == "imu":
        return (6, pp.samples)
    return (pp.context_length,)


@dataclass(frozen=True)
class TowerConfig:
    """One modality's stem, transformer trunk, head and postprocessor.

    ``input_shape`` is the shape of one clip without the batch dimension: ``(C, T, H, W)`` for
    video, ``(C, H, W)`` for image-like stems, ``(channels, samples)`` for IMU and
    ``(context_length,)`` for text. ``preprocess`` is the contract that produces that input
    (sizes, statistics, rates, durations); ``input_shape`` must agree with it.
    """

    modality: str
    stem: str  # "video" | "text" | "image" | "imu"
    embed_dim: int
    num_blocks: int
    num_heads: int
    input_shape: tuple[int, ...]
    preprocess: PreprocessConfig
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    mlp_ratio: int = 4
    add_bias_kv: bool = False  # learned key/value tokens appended after projection
    pre_ln: bool = False  # LayerNorm before the first block (vision only in ImageBind)
    causal: bool = False  # causal self-attention and EOS pooling (text)
    stem_ln: bool = False  # LayerNorm on the stem's tokens (audio/depth/thermal/imu)
    ln_eps: float = 1e-6  # trunk, pre-trunk and head LayerNorms
    stem_ln_eps: float = 1e-5  # the reference builds stem LayerNorms with torch's default eps
    vocab_size: int = 0  # text only
    logit_scale_init: float | None = None  # None: no logit scaling (vision)
    logit_scale_learnable: bool = False
    max_logit_scale: float = 100.0
    # Kept only so a reference config round-trips; inference never builds drop-path.
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"tower config: unknown modality {self.modality!r}, expected one of {MODALITIES}")
        if self.stem not in _STEMS:
            raise ValueError(f"tower '{self.modality}': unknown stem {self.stem!r}, expected one of {_STEMS}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"tower '{self.modality}': embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        kind = _PREPROCESS_TYPES[self.modality]
        if not isinstance(self.preprocess, kind):
            raise TypeError(f"tower '{self.modality}': preprocess must be a {kind.__name__}, got {self.preprocess!r}")
        if tuple(self.input_shape) != input_shape_for(self.modality, self.preprocess):
            raise ValueError(
                f"tower '{self.modality}': input_shape {tuple(self.input_shape)} disagrees with its preprocessing, "
                f"which makes {input_shape_for(self.modality, self.preprocess)}"
            )
        if self.causal and self.add_bias_kv:
            # SDPA's is_causal assumes as many keys as queries; bias tokens would break that.
            raise ValueError(f"tower '{self.modality}': causal attention with add_bias_kv is not supported")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_grid(self) -> tuple[int, ...]:
        """Patches per axis after the stem, e.g. ``(1, 16, 16)`` for the vision stem."""
        if self.stem == "text":
            return (self.input_shape[0],)
        if self.stem == "imu":
            return (self.input_shape[1] // self.kernel_size[0],)
        spatial = self.input_shape[1:]
        if self.stem == "video" and spatial[0] == 1:
            # A single frame is repeated to VIDEO_PAD_FRAMES frames before the Conv3d.
            spatial = (VIDEO_PAD_FRAMES,) + tuple(spatial[1:])
        return tuple((n - k) // s + 1 for n, k, s in zip(spatial, self.kernel_size, self.stride))

    @property
    def num_patches(self) -> int:
        return math.prod(self.patch_grid)

    @property
    def num_tokens(self) -> int:
        """Sequence length seen by the trunk (text has no class token)."""
        return self.num_patches + (0 if self.stem == "text" else 1)

    @property
    def patch_dim(self) -> int:
        """Values per IMU patch (channels x kernel), the input width of the IMU linear stem."""
        return self.input_shape[0] * self.kernel_size[0]


@dataclass(frozen=True)
class ImageBindConfig:
    """A whole ImageBind model: six towers projecting into one ``out_dim`` space."""

    name: str
    out_dim: int
    vision: TowerConfig
    text: TowerConfig
    audio: TowerConfig
    depth: TowerConfig
    thermal: TowerConfig
    imu: TowerConfig
    attn_impl: str = "sdpa"  # "sdpa" | "manual"; the manual path exists for tests

    def __post_init__(self) -> None:
        for m in MODALITIES:
            tower = getattr(self, m)
            if tower.modality != m:
                raise ValueError(f"config '{self.name}': field '{m}' holds a tower for '{tower.modality}'")
        if self.attn_impl not in ("sdpa", "manual"):
            raise ValueError(f"config '{self.name}': attn_impl must be 'sdpa' or 'manual', got {self.attn_impl!r}")

    @property
    def towers(self) -> dict[str, TowerConfig]:
        return {m: getattr(self, m) for m in MODALITIES}


def _as_tuple(value: Any, n: int, key: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)
    if len(out) != n:
        raise ValueError(f"reference kwarg '{key}': expected {n} values, got {list(value)}")
    return out


def _reference_kwargs(kwargs: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``kwargs`` over the reference defaults, refusing what the reference would not build."""
    unknown = sorted(set(kwargs) - set(REFERENCE_DEFAULTS))
    if unknown:
        raise ValueError(
            f"config '{name}': unknown reference ImageBindModel kwargs {unknown}; "
            f"expected a subset of {sorted(REFERENCE_DEFAULTS)}"
        )
    k = {**REFERENCE_DEFAULTS, **kwargs}
    if k["imu_kernel_size"] != 8:
        # The reference ignores imu_kernel_size (its IMU stem is hard-wired to 8-sample patches);
        # accepting another value silently would build a model the checkpoint does not describe.
        raise ValueError(f"config '{name}': imu_kernel_size must be 8 (the reference hard-wires it), got {k['imu_kernel_size']}")
    return k


def _reference_preprocess(k: Mapping[str, Any]) -> dict[str, PreprocessConfig]:
    """Each tower's preprocessing contract. Of it, only the clip's frame count and the audio
    spectrogram's size are reference kwargs; the rest is what the reference loaders hard-code."""
    return {
        "vision": VisionPreprocess(frames=int(k["video_frames"])),
        "text": TextPreprocess(),
        "audio": AudioPreprocess(mel_bins=int(k["audio_num_mel_bins"]), target_frames=int(k["audio_target_len"])),
        "depth": DepthPreprocess(),
        "thermal": ThermalPreprocess(),
        "imu": ImuPreprocess(),
    }


def config_from_reference_kwargs(kwargs: Mapping[str, Any], name: str = "custom") -> ImageBindConfig:
    """Build a config from the keyword arguments of the reference ``ImageBindModel(**kwargs)``.

    Missing arguments take the reference constructor defaults; an unknown argument raises
    ``ValueError``. ``kernel_size`` may be a list (as JSON stores it).
    """
    k = _reference_kwargs(kwargs, name)
    pp = _reference_preprocess(k)

    def io(m: str) -> dict[str, Any]:
        return {"input_shape": input_shape_for(m, pp[m]), "preprocess": pp[m]}

    vision_kernel = _as_tuple(k["kernel_size"], 3, "kernel_size")
    audio_kernel = _as_tuple(k["audio_kernel_size"], 2, "audio_kernel_size")
    return ImageBindConfig(
        name=name,
        out_dim=int(k["out_embed_dim"]),
        vision=TowerConfig(
            modality="vision", stem="video", embed_dim=k["vision_embed_dim"], num_blocks=k["vision_num_blocks"],
            num_heads=k["vision_num_heads"], **io("vision"),
            kernel_size=vision_kernel, stride=vision_kernel, pre_ln=True,
        ),
        text=TowerConfig(
            modality="text", stem="text", embed_dim=k["text_embed_dim"], num_blocks=k["text_num_blocks"],
            num_heads=k["text_num_heads"], **io("text"), causal=True, vocab_size=49408,
            logit_scale_init=1 / 0.07, logit_scale_learnable=True,
        ),
        audio=TowerConfig(
            modality="audio", stem="image", embed_dim=k["audio_embed_dim"], num_blocks=k["audio_num_blocks"],
            num_heads=k["audio_num_heads"], **io("audio"),
            kernel_size=audio_kernel, stride=_as_tuple(k["audio_stride"], 2, "audio_stride"),
            add_bias_kv=True, stem_ln=True, logit_scale_init=20.0, drop_path=float(k["audio_drop_path"]),
        ),
        depth=TowerConfig(
            modality="depth", stem="image", embed_dim=k["depth_embed_dim"], num_blocks=k["depth_num_blocks"],
            num_heads=k["depth_num_heads"], **io("depth"),
            kernel_size=_as_tuple(k["depth_kernel_size"], 2, "depth_kernel_size"),
            stride=_as_tuple(k["depth_kernel_size"], 2, "depth_kernel_size"),
            add_bias_kv=True, stem_ln=True, logit_scale_init=5.0, drop_path=float(k["depth_drop_path"]),
        ),
        thermal=TowerConfig(
            modality="thermal", stem="image", embed_dim=k["thermal_embed_dim"], num_blocks=k["thermal_num_blocks"],
            num_heads=k["thermal_num_heads"], **io("thermal"),
            kernel_size=_as_tuple(k["thermal_kernel_size"], 2, "thermal_kernel_size"),
            stride=_as_tuple(k["thermal_kernel_size"], 2, "thermal_kernel_size"),
            add_bias_kv=True, stem_ln=True, logit_scale_init=10.0, drop_path=float(k["thermal_drop_path"]),
        ),
        imu=TowerConfig(
            modality="imu", stem="imu", embed_dim=k["imu_embed_dim"], num_blocks=k["imu_num_blocks"],
            num_heads=k["imu_num_heads"], **io("imu"), kernel_size=(8,), stride=(8,),
            add_bias_kv=True, stem_ln=True, logit_scale_init=5.0, drop_path=float(k["imu_drop_path"]),
        ),
    )


# Variants as data: the reference constructor kwargs of each named model.
REGISTRY: dict[str, dict[str, Any]] = {
    # imagebind_huge() in the reference: everything not listed takes the constructor default.
    "imagebind_huge": {
        "vision_embed_dim": 1280,
        "vision_num_blocks": 32,
        "vision_num_heads": 16,
        "text_embed_dim": 1024,
        "text_num_blocks": 24,
        "text_num_heads": 16,
        "out_embed_dim": 1024,
        "audio_drop_path": 0.1,
        "imu_drop_path": 0.7,
    },
    # Exactly ../shared/fixtures/imagebind/tiny_config.json, so the tiny fixture weights load.
    "imagebind_tiny": {
        "video_frames": 2, "kernel_size": [2, 14, 14], "out_embed_dim": 32,
        "vision_embed_dim": 64, "vision_num_blocks": 2, "vision_num_heads": 4,
        "text_embed_dim": 32, "text_num_blocks": 2, "text_num_heads": 4,
        "audio_embed_dim": 64, "audio_num_blocks": 2, "audio_num_heads": 4, "audio_drop_path": 0.1,
        "audio_kernel_size": 16, "audio_stride": 10, "audio_num_mel_bins": 128, "audio_target_len": 204,
        "depth_embed_dim": 32, "depth_num_blocks": 2, "depth_num_heads": 4, "depth_drop_path": 0.0,
        "depth_kernel_size": 16,
        "thermal_embed_dim": 64, "thermal_num_blocks": 2, "thermal_num_heads": 4, "thermal_drop_path": 0.0,
        "thermal_kernel_size": 16,
        "imu_embed_dim": 64, "imu_num_blocks": 2, "imu_num_heads": 4, "imu_drop_path": 0.7, "imu_kernel_size": 8,
    },
}


def list_configs() -> list[str]:
    """Names accepted by :func:`get_config`."""
    return sorted(REGISTRY)


def get_config(spec: str | Path | Mapping[str, Any] | ImageBindConfig) -> ImageBindConfig:
    """Resolve a registry name, a dict of reference kwargs, a JSON file of them, or a config."""
    if isinstance(spec, ImageBindConfig):
        return spec
    if isinstance(spec, Mapping):
        return config_from_reference_kwargs(spec)
    if isinstance(spec, str) and spec in REGISTRY:
        return config_from_reference_kwargs(REGISTRY[spec], name=spec)
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        try:
            kwargs = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"model config file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"model config file {path}: not valid JSON ({exc})") from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"model config file {path}: expected a JSON object of ImageBindModel kwargs")
        return config_from_reference_kwargs(kwargs, name=path.stem)
    raise ValueError(f"unknown model config {spec!r}: expected one of {list_configs()}, a dict, or a .json path")
