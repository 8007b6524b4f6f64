"""ImageBind, re-implemented batch-first, loading Meta's reference checkpoints unchanged.

Module and parameter names follow the reference ``ImageBindModel.state_dict()`` exactly
(``modality_preprocessors.<m>...``, ``modality_trunks.<m>...``, ``modality_heads.<m>...``,
``modality_postprocessors.<m>...``), so :func:`from_reference` is a strict
``load_state_dict`` after checking every key and shape.

Public entry points:

- :func:`from_reference` - build from a config and a reference state dict (meta tensors allowed).
- :func:`load` - registry name + checkpoint ("auto", a path, or "none" for seeded random weights),
  device, precision and optional ``torch.compile``.
- :class:`ImageBind` - ``model({m: x})`` has the reference forward's semantics;
  ``model.encode(m, x)`` returns unit-norm embeddings for one modality.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from encoders.config import VIDEO_PAD_FRAMES, ImageBindConfig, TowerConfig, get_config
from encoders.layers import ATTN_IMPLS, Attention, Transformer

__all__ = ["ImageBind", "PRECISIONS", "from_reference", "load", "check_state_dict"]

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Stem attribute name inside each preprocessor, as the reference names it.
_STEM_NAMES = {"vision": "rgbt_stem", "audio": "rgbt_stem", "thermal": "rgbt_stem", "depth": "depth_stem",
               "imu": "imu_stem"}


# --------------------------------------------------------------------------------------------
# Preprocessors (stems + class token + position embedding)
# --------------------------------------------------------------------------------------------


class _RepeatFrames(nn.Module):
    """Turn an image ``(B, C, H, W)`` or one-frame clip into a ``VIDEO_PAD_FRAMES``-frame clip."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)  # (B, C, 1, H, W)
        if x.shape[2] == 1:
            x = x.expand(-1, -1, VIDEO_PAD_FRAMES, -1, -1)  # (B, C, T, H, W)
        return x


class _PatchStem(nn.Module):
    """Conv patchify (2-D, or 3-D for video) -> tokens ``(B, P, D)`` -> optional LayerNorm."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        c, d = cfg.input_shape[0], cfg.embed_dim
        if cfg.stem == "video":
            # Sequential so the conv is ``proj.1`` as in the reference (index 0 is the frame padding).
            self.proj = nn.Sequential(
                _RepeatFrames(), nn.Conv3d(c, d, kernel_size=cfg.kernel_size, stride=cfg.stride, bias=False)
            )
        else:
            self.proj = nn.Conv2d(c, d, kernel_size=cfg.kernel_size, stride=cfg.stride, bias=False)
        self.norm_layer = nn.LayerNorm(d, eps=cfg.stem_ln_eps) if cfg.stem_ln else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, D, *grid) -> (B, P, D)
        return self.norm_layer(x) if self.norm_layer is not None else x


class _PosEmbed(nn.Module):
    """Holder so the parameter is named ``pos_embedding_helper.pos_embed`` as in the reference."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, dim))


class _PatchPreprocessor(nn.Module):
    """Vision / audio / depth / thermal: patch tokens, a class token in front, learned positions."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.modality = cfg.modality
        self.in_channels = cfg.input_shape[0]
        self.spatial = tuple(cfg.input_shape[-2:])  # (H, W) the position embedding was trained for
        self.stem_name = _STEM_NAMES[cfg.modality]
        setattr(self, self.stem_name, _PatchStem(cfg))
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.embed_dim))
        self.pos_embedding_helper = _PosEmbed(cfg.num_tokens, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim not in (4, 5) or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.spatial:
            video = " or [B, 3, T, 224, 224] (multi-clip video is 6-D [B, S, 3, T, H, W])" if self.modality == "vision" else ""
            h, w = self.spatial
            raise ValueError(
                f"modality '{self.modality}': expected input [B, {self.in_channels}, {h}, {w}]{video}, got {list(x.shape)}"
            )
        tokens = getattr(self, self.stem_name)(x)  # (B, P, D)
        pos = self.pos_embedding_helper.pos_embed  # (1, P+1, D)
        if tokens.shape[1] + 1 != pos.shape[1]:
            # The reference would interpolate the position embedding; we only serve the trained size.
            raise ValueError(
                f"modality '{self.modality}': input {list(x.shape)} gives {tokens.shape[1]} patches, "
                f"the model expects {pos.shape[1] - 1} (train-time input size)"
            )
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, tokens], dim=1) + pos  # (B, P+1, D)


class _ImuStem(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.patch_dim, cfg.embed_dim, bias=False)
        self.norm_layer = nn.LayerNorm(cfg.embed_dim, eps=cfg.stem_ln_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_layer(self.proj(x))


class _ImuPreprocessor(nn.Module):
    """IMU ``(B, 6, 2000)``: 250 patches of 8 samples, each flattened channel-major (c * 8 + k)."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.input_shape = tuple(cfg.input_shape)
        self.kernel = cfg.kernel_size[0]
        self.imu_stem = _ImuStem(cfg)
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_tokens, cfg.embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"modality 'imu': expected input [B, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}")
        b = x.shape[0]
        patches = x.unfold(-1, self.kernel, self.kernel)  # (B, C, P, k)
        patches = patches.permute(0, 2, 1, 3).reshape(b, patches.shape[2], -1)  # (B, P, C*k), channel-major
        tokens = self.imu_stem(patches)  # (B, P, D)
        cls = self.cls_token.expand(b, -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed  # (B, P+1, D)


def _causal_mask(n: int) -> torch.Tensor:
    """The reference's additive mask: 0 on and below the diagonal, -inf above."""
    return torch.full((n, n), float("-inf")).triu(1)


class _TextPreprocessor(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.context_length = cfg.input_shape[0]
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.empty(1, self.context_length, cfg.embed_dim))
        # Kept (and checked on load) because reference checkpoints carry it; attention applies
        # causality itself (SDPA is_causal), which is what this mask encodes.
        self.register_buffer("mask", _causal_mask(self.context_length))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] != self.context_length or ids.is_floating_point():
            raise ValueError(
                f"modality 'text': expected integer token ids [B, {self.context_length}], "
                f"got {ids.dtype} {list(ids.shape)}"
            )
        return self.token_embedding(ids) + self.pos_embed  # (B, L, D)


# --------------------------------------------------------------------------------------------
# Heads and postprocessors
# --------------------------------------------------------------------------------------------


class _SelectCls(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]  # (B, D)


class _EosHead(nn.Module):
    """Text pooling: the token at the end-of-text position (the largest id) -> LN -> projection."""

    def __init__(self, cfg: TowerConfig, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps),
                                  nn.Linear(cfg.embed_dim, out_dim, bias=False))

    def forward(self, x: torch.Tensor, eos_idx: torch.Tensor) -> torch.Tensor:
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eos_idx])  # (B, out)


def _build_head(cfg: TowerConfig, out_dim: int) -> nn.Module:
    if cfg.causal:
        return _EosHead(cfg, out_dim)
    layers: list[nn.Module] = [nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps), _SelectCls()]
    if cfg.modality == "imu":
        # The reference has Dropout(0.5) here; an Identity keeps the projection at index 3.
        layers.append(nn.Identity())
    layers.append(nn.Linear(cfg.embed_dim, out_dim, bias=False))
    return nn.Sequential(*layers)


class _Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, p=2)


class _LogitScale(nn.Module):
    """Multiply by ``min(exp(log_logit_scale), max_logit_scale)``."""

    def __init__(self, init: float, learnable: bool, max_scale: float) -> None:
        super().__init__()
        self.init = init
        self.max_scale = max_scale
        value = torch.full((), math.log(init))
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.max_scale) * x


def _build_postprocessor(cfg: TowerConfig) -> nn.Module:
    if cfg.logit_scale_init is None:
        return _Normalize()
    return nn.Sequential(_Normalize(), _LogitScale(cfg.logit_scale_init, cfg.logit_scale_learnable, cfg.max_logit_scale))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class ImageBind(nn.Module):
    """Six towers mapping vision, text, audio, depth, thermal and IMU into one embedding space.

    ``model({modality: x})`` follows the reference forward: inputs with ``ndim >= 5`` are
    multi-clip ``[B, S, ...]`` whose S postprocessed embeddings are averaged; outputs carry the
    per-modality logit scale (none for vision). :meth:`encode` gives unit-norm embeddings.
    """

    def __init__(self, config: ImageBindConfig) -> None:
        super().__init__()
        self.config = config
        pre, trunks, heads, post = {}, {}, {}, {}
        for m, cfg in config.towers.items():
            if cfg.stem == "text":
                pre[m] = _TextPreprocessor(cfg)
            elif cfg.stem == "imu":
                pre[m] = _ImuPreprocessor(cfg)
            else:
                pre[m] = _PatchPreprocessor(cfg)
            trunks[m] = Transformer(cfg, impl=config.attn_impl)
            heads[m] = _build_head(cfg, config.out_dim)
            post[m] = _build_postprocessor(cfg)
        self.modality_preprocessors = nn.ModuleDict(pre)
        self.modality_trunks = nn.ModuleDict(trunks)
        self.modality_heads = nn.ModuleDict(heads)
        self.modality_postprocessors = nn.ModuleDict(post)
        self.eval()

    # ---- introspection -------------------------------------------------------------------
    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.config.towers)

    @property
    def dtype(self) -> torch.dtype:
        return self.modality_heads["vision"][-1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.modality_heads["vision"][-1].weight.device

    def set_attn_impl(self, impl: str) -> None:
        """Switch every tower between ``"sdpa"`` and the ``"manual"`` reference path."""
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        for mod in self.modules():
            if isinstance(mod, Attention):
                mod.impl = impl

    # ---- forward -------------------------------------------------------------------------
    def _prepare(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        if modality not in self.modality_trunks:
            raise ValueError(f"unknown modality {modality!r}: expected one of {self.modalities}")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"modality '{modality}': expected a torch.Tensor, got {type(x).__name__}")
        if modality == "text":
            return x.to(device=self.device, dtype=torch.long)
        return x.to(device=self.device, dtype=self.dtype)

    def _tower(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """One clip per row -> head output ``(B, out_dim)`` before normalisation."""
        tokens = self.modality_preprocessors[modality](x)  # (B, L, D)
        tokens = self.modality_trunks[modality](tokens)
        if modality == "text":
            return self.modality_heads[modality](tokens, x.argmax(dim=-1))
        return self.modality_heads[modality](tokens)

    def forward_heads(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Head outputs before postprocessing; multi-clip inputs give ``B*S`` rows (row = b*S + s)."""
        out = {}
        for m, x in inputs.items():
            x = self._prepare(m, x)
            if x.ndim >= 5:
                x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
            out[m] = self._tower(m, x)
        return out

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for m, x in inputs.items():
            x = self._prepare(m, x)
            multi_clip = x.ndim >= 5  # the reference's rule: audio and video come as [B, S, ...]
            if multi_clip:
                b, s = x.shape[:2]
                x = x.reshape(b * s, *x.shape[2:])
            y = self.modality_postprocessors[m](self._tower(m, x))  # (B*S | B, out)
            if multi_clip:
                y = y.reshape(b, s, -1).mean(dim=1)
            out[m] = y
        return out

    @torch.inference_mode()
    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings ``(B, out_dim)`` of one clip per row, in the model's dtype and device.

        Shapes: vision ``[B,3,224,224]`` images or ``[B,3,T,224,224]`` clips; audio
        ``[B,1,128,204]``; depth/thermal ``[B,1,224,224]``; imu ``[B,6,2000]``; text ``[B,77]`` ids.
        """
        x = self._prepare(modality, x)
        return F.normalize(self._tower(modality, x), dim=-1)

    # ---- initialisation ------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Seeded random weights (ViT/CLIP-style init); the model must be on a CPU device."""
        g = torch.Generator(device="cpu").manual_seed(seed)

        def normal_(t: torch.Tensor, std: float) -> None:
            t.copy_(torch.randn(t.shape, generator=g) * std)

        def xavier_(t: torch.Tensor) -> None:
            bound = math.sqrt(6.0 / (t.shape[0] + t.shape[1]))
            t.copy_((torch.rand(t.shape, generator=g) * 2 - 1) * bound)

        for mod in self.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
            elif isinstance(mod, nn.Linear):
                xavier_(mod.weight)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, (nn.Conv2d, nn.Conv3d)):
                normal_(mod.weight, 1 / math.sqrt(mod.weight[0].numel()))
            elif isinstance(mod, nn.Embedding):
                normal_(mod.weight, 0.02)
            elif isinstance(mod, Attention):
                xavier_(mod.in_proj_weight)
                mod.in_proj_bias.zero_()
                if mod.bias_k is not None:
                    normal_(mod.bias_k, 0.02)
                    normal_(mod.bias_v, 0.02)
            elif isinstance(mod, _LogitScale):
                mod.log_logit_scale.fill_(math.log(mod.init))
            elif isinstance(mod, _TextPreprocessor):
                mod.mask.copy_(_causal_mask(mod.context_length))
                normal_(mod.pos_embed, 0.01)
        for name, p in self.named_parameters():
            if name.endswith("cls_token") or name.endswith("pos_embedding_helper.pos_embed") or name.endswith("imu.pos_embed"):
                normal_(p, p.shape[-1] ** -0.5)


# --------------------------------------------------------------------------------------------
# Checkpoint compatibility
# --------------------------------------------------------------------------------------------


def _fmt_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Any], what: str) -> None:
    """Raise ``ValueError`` listing missing, unexpected and mis-shaped keys of ``state_dict``."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [
        f"{k} (checkpoint {list(state_dict[k].shape)}, model {list(expected[k])})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_fmt_keys(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped key(s): {_fmt_keys(misshaped)}")
    if problems:
        raise ValueError(f"{what}: state dict does not match the model: " + "; ".join(problems))


def from_reference(config: str | Mapping[str, Any] | ImageBindConfig | Path,
                   state_dict: Mapping[str, torch.Tensor]) -> ImageBind:
    """Build an :class:`ImageBind` in eval mode from a reference ``ImageBindModel`` state dict.

    ``config`` is a registry name, a dict of reference constructor kwargs, a JSON path or an
    :class:`ImageBindConfig`. Key names must be exactly the reference's. The model is built on
    the ``meta`` device and takes the checkpoint's tensors as its own (``assign=True``), so it ends
    up on their device and dtype; meta tensors give a meta model (a free layout check).
    """
    cfg = get_config(config)
    with torch.device("meta"):
        model = ImageBind(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(expected, state_dict, f"model '{cfg.name}'")
    mask = state_dict["modality_preprocessors.text.mask"]
    if not mask.is_meta and not torch.equal(mask.float().cpu(), _causal_mask(mask.shape[0])):
        raise ValueError(
            f"model '{cfg.name}': modality_preprocessors.text.mask is not the causal mask "
            "(0 on and below the diagonal, -inf above) this implementation applies"
        )
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    return model.eval()


def load(config: str | Mapping[str, Any] | ImageBindConfig = "imagebind_huge", checkpoint: str | Path | None = "auto",
         *, device: str | torch.device = "cpu", precision: str = "fp32", compile: bool = False,
         seed: int = 0) -> ImageBind:
    """Build a ready-to-run model.

    ``checkpoint``: ``"auto"`` or a path is resolved by :func:`encoders.weights.resolve` and read
    by :func:`encoders.weights.load_state_dict`; ``"none"`` gives seeded random weights.
    ``precision`` is one of ``fp32``, ``bf16``, ``fp16``; ``compile`` wraps each trunk with
    ``torch.compile`` (parameter names are unchanged).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    cfg = get_config(config)
    if checkpoint is None or str(checkpoint) == "none":
        log.warning(
            "ImageBind '%s' built with RANDOM weights (checkpoint='none', seed=%d): embeddings are meaningless",
            cfg.name, seed,
        )
        with torch.device("meta"):
            model = ImageBind(cfg)
        model = model.to_empty(device="cpu")
        # Initialise on the CPU so a seed gives the same weights on every device.
        model.reset_parameters(seed)
    else:
        from encoders import weights  # lazy: only needed when reading a checkpoint

        path = weights.resolve(checkpoint, cfg.name)
        log.info("loading ImageBind '%s' weights from %s", cfg.name, path)
        model = from_reference(cfg, weights.load_state_dict(path))
    model = model.to(device=device, dtype=PRECISIONS[precision]).eval()
    if compile:
        for trunk in model.modality_trunks.values():
            trunk.compile()
    return model
