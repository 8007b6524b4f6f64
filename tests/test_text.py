"""Tokenizer parity with the reference ImageBind ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from encoders import text as text_mod
from encoders.text import EOT_ID, SOT_ID, bpe_vocab_path, get_tokenizer, tokenize

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "imagebind" / "tokenizer.json"


def _cases() -> list[dict]:
    if not FIXTURE.is_file():
        pytest.skip(f"shared fixtures not found at {FIXTURE}")
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_every_reference_case_is_identical() -> None:
    cases = _cases()
    ids = tokenize([c["text"] for c in cases])
    expected = torch.tensor([c["ids"] for c in cases], dtype=torch.long)
    assert ids.dtype == torch.long and ids.shape == (len(cases), 77)
    mismatched = [c["text"][:40] for c, a, b in zip(cases, ids, expected) if not torch.equal(a, b)]
    assert mismatched == []


def test_layout_start_end_and_padding() -> None:
    ids = tokenize(["a photo of a dog", ""])
    assert ids[0, 0] == SOT_ID
    end = int((ids[0] == EOT_ID).nonzero()[0])
    assert torch.all(ids[0, end + 1 :] == 0)
    assert ids[1, :2].tolist() == [SOT_ID, EOT_ID] and torch.all(ids[1, 2:] == 0)


def test_long_text_is_cut_and_still_ends_with_eot() -> None:
    ids = tokenize(["word " * 200])
    assert ids.shape == (1, 77)
    assert ids[0, 76] == EOT_ID and torch.all(ids[0] != 0)


def test_cleaning_makes_case_whitespace_and_entities_irrelevant() -> None:
    a, b = tokenize(["Rock &amp; Roll\n\n  NOW", "rock & roll now"])
    assert torch.equal(a, b)


def test_tokenizer_is_built_once() -> None:
    assert get_tokenizer() is get_tokenizer()


def test_vocabulary_comes_from_open_clip_package_without_importing_it() -> None:
    # A fresh interpreter, so modules imported by other tests cannot hide an import.
    code = (
        "import sys; from encoders.text import tokenize, bpe_vocab_path; tokenize(['x']); "
        "p = bpe_vocab_path(); print(p.name, 'open_clip' in p.parts, 'open_clip' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["bpe_simple_vocab_16e6.txt.gz", "True", "False"]


def test_missing_vocabulary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_mod.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(text_mod.importlib.metadata, "files", lambda name: [])
    with pytest.raises(text_mod.VocabularyNotFound, match="open_clip_torch"):
        bpe_vocab_path()


def test_single_string_is_rejected() -> None:
    with pytest.raises(TypeError, match="list of strings"):
        tokenize("a dog")  # type: ignore[arg-type]
