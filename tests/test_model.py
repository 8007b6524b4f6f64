"""Behaviour of the ImageBind model on the tiny config with seeded random weights (no fixtures)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from encoders import ImageBind, get_config, load
from encoders.config import config_from_reference_kwargs

MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")


def _perturbed_tiny(seed: int = 0) -> ImageBind:
    """Tiny model whose every parameter (incl. LN, biases, bias_k/v) is non-trivial."""
    model = load("imagebind_tiny", "none", seed=seed)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("log_logit_scale"):
                continue
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else 0.02))
    return model


def _inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(batch, 77, dtype=torch.long)
    for i in range(batch):
        n = 3 + 2 * i
        text[i, 0] = 49406
        text[i, 1:n] = torch.randint(1, 49000, (n - 1,), generator=g)
        text[i, n] = 49407  # end token: the largest id, where the text head pools
    return {
        "vision": torch.randn(batch, 3, 224, 224, generator=g),
        "text": text,
        "audio": torch.randn(batch, 1, 128, 204, generator=g),
        "depth": torch.randn(batch, 1, 224, 224, generator=g),
        "thermal": torch.randn(batch, 1, 224, 224, generator=g),
        "imu": torch.randn(batch, 6, 2000, generator=g),
    }


@pytest.fixture(scope="module")
def model() -> ImageBind:
    return _perturbed_tiny()


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return _inputs(3)


@pytest.mark.parametrize("modality", MODALITIES)
def test_sdpa_and_manual_attention_give_the_same_embeddings(modality, model, inputs):
    model.set_attn_impl("manual")
    manual = model.encode(modality, inputs[modality])
    model.set_attn_impl("sdpa")
    sdpa = model.encode(modality, inputs[modality])
    assert (sdpa - manual).abs().max().item() <= 1e-5


def test_bf16_embeddings_point_where_fp32_ones_do(model, inputs):
    bf16 = _perturbed_tiny().to(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    for m in MODALITIES:
        ref = model.encode(m, inputs[m])
        low = bf16.encode(m, inputs[m])  # float inputs are cast to the model's dtype
        assert low.dtype == torch.bfloat16
        cos = torch.nn.functional.cosine_similarity(low.float(), ref, dim=-1)
        assert cos.min().item() >= 0.99, m


@pytest.mark.parametrize("modality", MODALITIES)
def test_encode_returns_unit_norm_rows_of_out_dim(modality, model, inputs):
    emb = model.encode(modality, inputs[modality])
    assert emb.shape == (3, model.out_dim)
    assert emb.dtype == model.dtype and emb.device == model.device
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not emb.requires_grad


@pytest.mark.parametrize("modality", MODALITIES)
def test_a_batch_equals_items_encoded_one_at_a_time(modality, model, inputs):
    batch = model.encode(modality, inputs[modality])
    single = torch.cat([model.encode(modality, inputs[modality][i : i + 1]) for i in range(3)])
    assert (batch - single).abs().max().item() <= 1e-5


def test_random_weights_are_deterministic_for_a_seed():
    a, b, c = (load("imagebind_tiny", "none", seed=s).state_dict() for s in (7, 7, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["modality_heads.vision.2.weight"], c["modality_heads.vision.2.weight"])


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level("WARNING", logger="encoders.imagebind"):
        load("imagebind_tiny", "none")
    assert any("RANDOM weights" in r.getMessage() for r in caplog.records)


def test_multi_clip_inputs_average_the_postprocessed_clip_embeddings(model):
    g = torch.Generator().manual_seed(5)
    audio = torch.randn(2, 3, 1, 128, 204, generator=g)  # [B, S, 1, mel, time]
    video = torch.randn(2, 2, 3, 2, 224, 224, generator=g)  # [B, S, C, T, H, W]
    with torch.no_grad():
        for m, x in (("audio", audio), ("vision", video)):
            out = model({m: x})[m]
            flat = x.reshape(-1, *x.shape[2:])
            # Each clip alone, as a one-clip multi-clip input [1, 1, ...].
            per_clip = torch.cat([model({m: flat[i : i + 1].unsqueeze(1)})[m] for i in range(len(flat))])
            expected = per_clip.reshape(2, x.shape[1], -1).mean(dim=1)
            assert out.shape == (2, model.out_dim)
            assert (out - expected).abs().max().item() <= 1e-5
            # Heads keep one row per clip, sample-major (row = b * S + s).
            heads = model.forward_heads({m: x})[m]
            assert heads.shape == (len(flat), model.out_dim)
            assert torch.allclose(torch.nn.functional.normalize(heads[1:2], dim=-1), model.encode(m, flat[1:2]), atol=1e-5)


def test_forward_scales_by_the_logit_scale_but_not_vision(model, inputs):
    with torch.no_grad():
        out = model({m: inputs[m][:1] for m in MODALITIES})
    assert math.isclose(out["vision"].norm().item(), 1.0, rel_tol=1e-5)
    for m in ("text", "audio", "depth", "thermal", "imu"):
        scale = model.modality_postprocessors[m][1].log_logit_scale.exp().item()
        assert math.isclose(out[m].norm().item(), scale, rel_tol=1e-5), m


def test_text_logit_scale_is_clamped_at_100(inputs):
    model = load("imagebind_tiny", "none")
    with torch.no_grad():
        model.modality_postprocessors["text"][1].log_logit_scale.fill_(math.log(250.0))
        out = model({"text": inputs["text"][:1]})["text"]
    assert math.isclose(out.norm().item(), 100.0, rel_tol=1e-5)


def test_an_image_is_a_clip_of_two_identical_frames(model, inputs):
    image = inputs["vision"][:2]
    clip = image.unsqueeze(2).repeat(1, 1, 2, 1, 1)  # [B, 3, 2, H, W]
    assert (model.encode("vision", image) - model.encode("vision", clip)).abs().max().item() <= 1e-6


def test_text_pools_at_the_end_token(model, inputs):
    ids = inputs["text"][:1].clone()
    before = model.encode("text", ids)
    ids[0, 60] = 123  # after the end token: causal attention keeps it out of the pooled token
    assert torch.allclose(model.encode("text", ids), before, atol=1e-6)
    ids[0, 1] = 124  # before the end token: changes the embedding
    assert not torch.allclose(model.encode("text", ids), before, atol=1e-4)


@pytest.mark.parametrize(
    "modality, shape",
    [("audio", (2, 1, 128, 200)), ("imu", (2, 2000, 6)), ("depth", (2, 3, 224, 224)), ("vision", (2, 3, 112, 112))],
)
def test_wrongly_shaped_input_raises_naming_the_modality(modality, shape, model):
    with pytest.raises(ValueError, match=f"'{modality}'"):
        model.encode(modality, torch.zeros(shape))


def test_five_dimensional_vision_in_forward_is_multi_clip_and_rejected_clearly(model):
    with pytest.raises(ValueError, match="6-D"):
        model({"vision": torch.zeros(1, 3, 2, 224, 224)})


def test_unknown_modality_is_rejected(model):
    with pytest.raises(ValueError, match="'smell'"):
        model.encode("smell", torch.zeros(1, 3))


def test_load_rejects_unknown_precision():
    with pytest.raises(ValueError, match="precision"):
        load("imagebind_tiny", "none", precision="int4")


def test_load_bf16_gives_bf16_embeddings():
    model = load("imagebind_tiny", "none", precision="bf16")
    emb = model.encode("imu", torch.randn(2, 6, 2000))
    assert model.dtype == emb.dtype == torch.bfloat16


def test_huge_config_token_counts_and_shapes_follow_the_reference():
    cfg = get_config("imagebind_huge")
    assert cfg.out_dim == 1024
    assert {m: t.num_tokens for m, t in cfg.towers.items()} == {
        "vision": 257, "text": 77, "audio": 229, "depth": 197, "thermal": 197, "imu": 251,
    }
    assert (cfg.vision.embed_dim, cfg.vision.num_blocks, cfg.text.num_blocks, cfg.depth.embed_dim) == (1280, 32, 24, 384)
    assert [m for m, t in cfg.towers.items() if t.add_bias_kv] == ["audio", "depth", "thermal", "imu"]


def test_config_from_json_file_and_unknown_kwarg(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"kernel_size": [2, 14, 14], "out_embed_dim": 16}))
    cfg = get_config(path)
    assert cfg.name == "mine" and cfg.out_dim == 16 and cfg.vision.kernel_size == (2, 14, 14)
    with pytest.raises(ValueError, match="vision_width"):
        config_from_reference_kwargs({"vision_width": 3})
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("imagebind_gigantic")
