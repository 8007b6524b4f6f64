"""One attention, one block, one trunk: shared by all six ImageBind towers.

Everything here is batch-first ``(B, L, D)``. The towers differ only through
:class:`~encoders.config.TowerConfig` fields: width, depth, heads, a LayerNorm before the first
block (``pre_ln``), learned key/value bias tokens (``add_bias_kv``) and causal masking.

Parameter names match the reference checkpoint (which uses ``nn.MultiheadAttention`` inside
``BlockWithMasking``), so reference state dicts load without renaming: ``attn.in_proj_weight``,
``attn.in_proj_bias``, ``attn.bias_k``, ``attn.bias_v``, ``attn.out_proj``, ``norm_1``, ``norm_2``,
``mlp.fc1``, ``mlp.fc2``, ``pre_transformer_layer.0``.

Dropout and drop-path are never built: this code is inference-only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from encoders.config import TowerConfig

__all__ = ["ATTN_IMPLS", "Attention", "Mlp", "Block", "Transformer"]

ATTN_IMPLS = ("sdpa", "manual")


class Attention(nn.Module):
    """Multi-head self-attention with optional learned key/value bias tokens and causal mask.

    Semantics equal ``nn.MultiheadAttention(dim, heads, bias=True, add_bias_kv=...)`` called as
    ``mha(x, x, x)`` on sequence-first input: ``bias_k``/``bias_v`` are appended to the projected
    keys and values along the sequence (one extra key every query attends to).

    ``impl`` selects ``F.scaled_dot_product_attention`` ("sdpa") or an explicit softmax
    ("manual", float32 softmax) that tests compare against.
    """

    def __init__(self, dim: int, num_heads: int, *, add_bias_kv: bool = False, causal: bool = False,
                 impl: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.impl = impl
        # torch.empty: values always come from a checkpoint or ImageBind.reset_parameters().
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, dim))
            self.bias_v = nn.Parameter(torch.empty(1, 1, dim))
        else:
            self.bias_k = self.bias_v = None

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in ATTN_IMPLS:
            raise ValueError(f"attention impl must be one of {ATTN_IMPLS}, got {value!r}")
        self._impl = value

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # (B, L, D)
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, L, D)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(b, 1, d)], dim=1)  # (B, L+1, D)
            v = torch.cat([v, self.bias_v.expand(b, 1, d)], dim=1)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)  # (B, H, L|L+1, hd)
        if self._impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            out = self._manual(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, d)  # (B, L, D)
        return self.out_proj(out)

    def _manual(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, L, Lk)
        if self.causal:
            lq, lk = scores.shape[-2:]
            future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)  # (B, H, L, hd)


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm_1(x))`` then ``x + mlp(norm_2(x))``."""

    def __init__(self, cfg: TowerConfig, impl: str = "sdpa") -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm_1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.attn = Attention(d, cfg.num_heads, add_bias_kv=cfg.add_bias_kv, causal=cfg.causal, impl=impl)
        self.norm_2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.mlp = Mlp(d, cfg.mlp_ratio * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class Transformer(nn.Module):
    """A tower's trunk: optional pre-LayerNorm, then ``num_blocks`` blocks, batch-first."""

    def __init__(self, cfg: TowerConfig, impl: str = "sdpa") -> None:
        super().__init__()
        if cfg.pre_ln:
            # A Sequential only so the parameter is named ``pre_transformer_layer.0`` as in the reference.
            self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps))
        else:
            self.pre_transformer_layer = None
        self.blocks = nn.ModuleList(Block(cfg, impl) for _ in range(cfg.num_blocks))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens  # (B, L, D)
        if self.pre_transformer_layer is not None:
            x = self.pre_transformer_layer(x)
        for blk in self.blocks:
            x = blk(x)
        return x
