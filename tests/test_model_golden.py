"""Our ImageBind reproduces Meta's reference numbers and accepts its checkpoints' exact layout.

Fixtures: ../shared/fixtures/imagebind (see its README): a tiny reference model's state dict,
inputs, reference outputs and head outputs, and the key/shape manifest of imagebind_huge.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from encoders import from_reference, get_config

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "imagebind"

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"shared ImageBind fixtures not found at {FIXTURES}")

# inputs.safetensors entry -> modality it is fed as (README: "fed to the model as").
ENTRIES = {
    "vision_image": "vision",
    "vision_video": "vision",
    "text": "text",
    "audio": "audio",
    "depth": "depth",
    "thermal": "thermal",
    "imu": "imu",
}
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_config() -> dict:
    return json.loads((FIXTURES / "tiny_config.json").read_text())


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(FIXTURES / "tiny_model.safetensors")


@pytest.fixture(scope="module")
def io() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return load_file(FIXTURES / "inputs.safetensors"), load_file(FIXTURES / "outputs.safetensors")


@pytest.fixture(scope="module")
def huge_layout() -> dict[str, torch.Tensor]:
    manifest = json.loads((FIXTURES / "huge_manifest.json").read_text())
    return {e["key"]: torch.empty(e["shape"], device="meta") for e in manifest["keys"]}


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_tiny_model_reproduces_reference_outputs_and_heads(entry, impl, tiny_config, tiny_state_dict, io):
    inputs, outputs = io
    modality = ENTRIES[entry]
    model = from_reference(tiny_config, tiny_state_dict)
    model.set_attn_impl(impl)
    captured = []
    # A hook on modality_heads[m], exactly as the fixture captured its __head entries.
    hook = model.modality_heads[modality].register_forward_hook(lambda mod, args, out: captured.append(out))
    with torch.no_grad():
        got = model({modality: inputs[entry]})[modality]
    hook.remove()

    assert got.shape == outputs[entry].shape
    assert (got - outputs[entry]).abs().max().item() <= TOL
    head = outputs[f"{entry}__head"]
    assert (captured[0] - head).abs().max().item() <= TOL
    with torch.no_grad():
        assert (model.forward_heads({modality: inputs[entry]})[modality] - head).abs().max().item() <= TOL


def test_registry_tiny_config_is_the_fixture_config(tiny_config):
    from_json = get_config(tiny_config)
    assert dataclasses.replace(from_json, name="imagebind_tiny") == get_config("imagebind_tiny")


def test_reference_eos_pooling_positions_are_argmax_of_ids(io):
    inputs, _ = io
    assert inputs["text"].argmax(dim=-1).tolist() == [4, 16, 10]


def test_huge_checkpoint_layout_is_accepted_on_meta(huge_layout):
    model = from_reference("imagebind_huge", huge_layout)
    assert model.device.type == "meta"
    assert model.out_dim == 1024
    manifest = json.loads((FIXTURES / "huge_manifest.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == manifest["total_parameters"]
    for m, counts in manifest["per_modality"].items():
        ours = sum(p.numel() for k, p in model.named_parameters() if k.split(".")[1] == m)
        assert ours == counts["parameters"], m


@pytest.mark.parametrize(
    "change, key",
    [
        ("missing", "modality_trunks.imu.blocks.3.attn.bias_k"),
        ("unexpected", "modality_trunks.vision.blocks.0.attn.bias_k"),
        ("misshaped", "modality_heads.text.proj.1.weight"),
    ],
)
def test_huge_layout_with_a_wrong_key_is_rejected_naming_it(change, key, huge_layout):
    sd = dict(huge_layout)
    if change == "missing":
        del sd[key]
    elif change == "unexpected":
        sd[key] = torch.empty(1, 1, 1280, device="meta")
    else:
        sd[key] = torch.empty(1024, 1023, device="meta")
    label = "mis-shaped" if change == "misshaped" else change
    with pytest.raises(ValueError, match=f"{label}.*{re.escape(key)}"):
        from_reference("imagebind_huge", sd)


def test_tiny_checkpoint_with_a_non_causal_text_mask_is_rejected(tiny_config, tiny_state_dict):
    sd = dict(tiny_state_dict)
    sd["modality_preprocessors.text.mask"] = torch.zeros(77, 77)
    with pytest.raises(ValueError, match="text.mask"):
        from_reference(tiny_config, sd)


def test_load_with_a_checkpoint_path_reproduces_reference_embeddings(io):
    from encoders import load

    inputs, outputs = io
    model = load("imagebind_tiny", FIXTURES / "tiny_model.safetensors")
    emb = model.encode("depth", inputs["depth"])
    expected = torch.nn.functional.normalize(outputs["depth__head"], dim=-1)
    assert (emb - expected).abs().max().item() <= TOL
