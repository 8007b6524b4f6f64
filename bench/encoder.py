"""Throughput of our batch-first SDPA towers vs a reference-style ``nn.MultiheadAttention`` trunk.

For each tower and batch size it times the whole tower (stem, trunk, head, normalisation) twice
with the same weights: once through our :class:`encoders.layers.Transformer` and once through a
sequence-first trunk built like the reference's (``nn.MultiheadAttention`` blocks on ``(L, B, D)``
tensors, additive float mask for text), whose weights are copied from ours. It prints items/s of
both, their ratio, and the largest difference between the two paths' embeddings.

    python bench/encoder.py                         # CPU defaults: 1 block per tower
    python bench/encoder.py --device cuda --precision bf16 --blocks 0   # full depth
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# bench/pipeline.py would shadow the pipeline package, here and in Ray workers (Ray copies the
# script directory to workers only while it is on sys.path): take it off, put the repo root first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders.config import MODALITIES, ImageBindConfig, TowerConfig, get_config  # noqa: E402
from encoders.imagebind import PRECISIONS, ImageBind  # noqa: E402
from encoders.layers import Mlp, Transformer  # noqa: E402

__all__ = ["main"]


class _RefBlock(nn.Module):
    """The reference's BlockWithMasking: sequence-first ``nn.MultiheadAttention``."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm_1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.attn = nn.MultiheadAttention(d, cfg.num_heads, bias=True, add_bias_kv=cfg.add_bias_kv)
        self.norm_2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.mlp = Mlp(d, cfg.mlp_ratio * d)  # same as ours: the difference under test is attention

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.norm_2(x))


class _RefTrunk(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)) if cfg.pre_ln else None
        self.blocks = nn.ModuleList(_RefBlock(cfg) for _ in range(cfg.num_blocks))
        n = cfg.num_tokens
        self.register_buffer("mask", torch.full((n, n), float("-inf")).triu(1) if cfg.causal else None,
                             persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens if self.pre_transformer_layer is None else self.pre_transformer_layer(tokens)
        x = x.transpose(0, 1)  # (L, B, D), as the reference's EinOpsRearrange("b l d -> l b d")
        for blk in self.blocks:
            x = blk(x, self.mask)
        return x.transpose(0, 1)  # (B, L, D)


def _example(tower: TowerConfig, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if tower.stem == "text":
        ids = torch.randint(1, 49000, (batch, tower.input_shape[0]), generator=g)
        ids[:, 20] = 49407  # end token: where the text head pools
        return ids.to(device)
    shape = (3, 224, 224) if tower.stem == "video" else tower.input_shape  # vision: still images
    return torch.randn((batch, *shape), generator=g).to(device=device, dtype=dtype)


def _ref_tower(model: ImageBind, ref: _RefTrunk, m: str, x: torch.Tensor) -> torch.Tensor:
    tokens = ref(model.modality_preprocessors[m](x))
    head = model.modality_heads[m]
    out = head(tokens, x.argmax(dim=-1)) if m == "text" else head(tokens)
    return F.normalize(out, dim=-1)


def _time(fn, device: torch.device, min_time: float, warmup: int) -> float:
    """Seconds per call: ``warmup`` untimed calls, then repeat until ``min_time`` has passed."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def _reduced(cfg: ImageBindConfig, blocks: int) -> ImageBindConfig:
    if blocks <= 0:
        return cfg
    towers = {m: dataclasses.replace(t, num_blocks=min(blocks, t.num_blocks)) for m, t in cfg.towers.items()}
    return dataclasses.replace(cfg, **towers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="imagebind_huge")
    p.add_argument("--blocks", type=int, default=None,
                   help="blocks per tower (0 = full depth); default 1 on CPU, full depth elsewhere")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    p.add_argument("--towers", nargs="+", choices=MODALITIES, default=list(MODALITIES))
    p.add_argument("--min-time", type=float, default=None, help="seconds timed per measurement (default 0.3 CPU, 1.0 GPU)")
    p.add_argument("--json", action="store_true", help="print results as JSON instead of a table")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = PRECISIONS[args.precision]
    blocks = args.blocks if args.blocks is not None else (1 if device.type == "cpu" else 0)
    min_time = args.min_time if args.min_time is not None else (0.3 if device.type == "cpu" else 1.0)
    warmup = 1 if device.type == "cpu" else 3
    full = get_config(args.model)
    cfg = _reduced(full, blocks)

    with torch.device("meta"):
        model = ImageBind(cfg)
    model = model.to_empty(device="cpu")
    model.reset_parameters(0)
    model = model.to(device=device, dtype=dtype).eval()

    rows = []
    for m in args.towers:
        tower = cfg.towers[m]
        ours: Transformer = model.modality_trunks[m]
        ref = _RefTrunk(tower).to(device=device, dtype=dtype).eval()
        # Same parameter names as ours (and the reference's), so the weights copy over directly.
        ref.load_state_dict(ours.state_dict(), strict=True)
        for batch in args.batch:
            x = _example(tower, batch, device, dtype)
            with torch.inference_mode():
                diff = (model.encode(m, x).float() - _ref_tower(model, ref, m, x).float()).abs().max().item()
                t_ours = _time(lambda m=m, x=x: model.encode(m, x), device, min_time, warmup)
                t_ref = _time(lambda m=m, x=x, ref=ref: _ref_tower(model, ref, m, x), device, min_time, warmup)
            rows.append({
                "tower": m, "batch": batch, "blocks": tower.num_blocks, "full_blocks": full.towers[m].num_blocks,
                "ours_items_s": batch / t_ours, "ref_items_s": batch / t_ref, "speedup": t_ref / t_ours,
                "max_abs_diff": diff,
            })

    if args.json:
        print(json.dumps({"model": args.model, "device": str(device), "precision": args.precision,
                          "torch": torch.__version__, "rows": rows}, indent=2))
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"model {args.model}  device {name}  precision {args.precision}  torch {torch.__version__}")
    if blocks > 0:
        print(f"NOTE: trunks cut to {blocks} block(s) per tower (--blocks); throughput is NOT that of the full model")
    print(f"{'tower':8} {'batch':>5} {'blocks':>6} {'ours it/s':>10} {'ref it/s':>10} {'ours/ref':>8} {'max|diff|':>10}")
    for r in rows:
        print(f"{r['tower']:8} {r['batch']:5d} {r['blocks']:3d}/{r['full_blocks']:<2d} {r['ours_items_s']:10.2f} "
              f"{r['ref_items_s']:10.2f} {r['speedup']:8.2f} {r['max_abs_diff']:10.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
