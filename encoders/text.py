"""CLIP byte-level BPE tokenizer producing the same ids as the reference ImageBind.

The reference (ImageBind ``SimpleTokenizer`` after commit 1125e1e) cleans the text, splits it
with a Unicode-aware pattern, maps every UTF-8 byte to a printable character, merges pairs in
rank order, and lays the ids out as ``([SOT] + bpe)[:76] + [EOT]`` zero-padded to 77.

The merges file is the one OpenAI published with CLIP. We do not ship it: the PyPI package
``open_clip_torch`` (a declared dependency) carries it as ``open_clip/bpe_simple_vocab_16e6.txt.gz``.
We locate that file through the import system *without importing open_clip*, because importing
it pulls in timm, torchvision and huggingface_hub and costs seconds per Ray actor.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.metadata
import importlib.util
import threading
from pathlib import Path

import ftfy
import regex
import torch

__all__ = [
    "CONTEXT_LENGTH",
    "SOT_ID",
    "EOT_ID",
    "VocabularyNotFound",
    "bpe_vocab_path",
    "Tokenizer",
    "get_tokenizer",
    "tokenize",
]

CONTEXT_LENGTH = 77  # ImageBind text tower: 77 positions (reference imagebind_model.py)
SOT_ID = 49406  # "<|startoftext|>": index after 256 bytes x2 + 48894 merges
EOT_ID = 49407  # "<|endoftext|>"

_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The merges file has a header line, then merges; CLIP keeps 49152 - 256 - 2 of them so that
# bytes (256) + bytes with </w> (256) + merges + 2 specials = 49408 ids.
_N_MERGES = 49152 - 256 - 2
# Pre-split pattern of the reference: contractions, letter runs, single digits, other runs.
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


class VocabularyNotFound(RuntimeError):
    """The CLIP BPE merges file could not be located."""


def bpe_vocab_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip_torch``.

    Looks it up with ``importlib.util.find_spec`` (does not execute open_clip's ``__init__``)
    and falls back to the distribution's file list.
    """
    tried: list[str] = []
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / _VOCAB_FILE
            tried.append(str(candidate))
            if candidate.is_file():
                return candidate
    try:
        files = importlib.metadata.files("open_clip_torch") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == _VOCAB_FILE:
            candidate = Path(str(f.locate()))
            tried.append(str(candidate))
            if candidate.is_file():
                return candidate
    raise VocabularyNotFound(
        f"CLIP BPE vocabulary '{_VOCAB_FILE}' not found (looked in: {tried or 'nowhere'}); "
        "install the PyPI package open_clip_torch (pip install open_clip_torch), which ships it"
    )


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """Reversible map from every byte to a printable, non-whitespace character.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes are moved to code points
    256.. in byte order, so the BPE never sees whitespace or control characters.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    kept = set(keep)
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in kept:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _clean(text: str) -> str:
    text = ftfy.fix_text(text)
    # Twice, as the reference does, so "&amp;amp;" becomes "&".
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class Tokenizer:
    """CLIP BPE over a merges file; call :meth:`encode` for ids without specials."""

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        path = Path(vocab_path) if vocab_path is not None else bpe_vocab_path()
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
        if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
            raise VocabularyNotFound(
                f"{path}: expected {_N_MERGES} merge lines of two symbols after the header"
            )
        self._byte_enc = _byte_to_unicode()
        symbols = list(self._byte_enc.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self._ids: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self._ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}  # type: ignore[misc]
        self._cache: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        if self._ids["<|startoftext|>"] != SOT_ID or self._ids["<|endoftext|>"] != EOT_ID:
            raise VocabularyNotFound(f"{path}: special token ids differ from CLIP's 49406/49407")

    def _bpe(self, word: str) -> tuple[str, ...]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        # The last symbol carries the end-of-word marker so suffix merges differ from infix.
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = self._ranks
        while len(parts) > 1:
            best_rank, best = None, None
            for pair in zip(parts, parts[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, pair
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        result = tuple(parts)
        with self._lock:
            self._cache[word] = result
        return result

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` after the reference cleaning, without start/end tokens."""
        ids: list[int] = []
        for piece in _PATTERN.findall(_clean(text)):
            word = "".join(self._byte_enc[b] for b in piece.encode("utf-8"))
            ids.extend(self._ids[sym] for sym in self._bpe(word))
        return ids

    def __call__(self, texts: list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """LongTensor ``[N, context_length]``: ``([SOT] + bpe)[:L-1] + [EOT]``, zero padded."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings, got a single str")
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text item {row}: expected str, got {type(text).__name__}")
            ids = ([SOT_ID] + self.encode(text))[: context_length - 1] + [EOT_ID]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


_TOKENIZER: Tokenizer | None = None
_TOKENIZER_LOCK = threading.Lock()


def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer, built on first use (reading the merges takes ~0.5 s)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        with _TOKENIZER_LOCK:
            if _TOKENIZER is None:
                _TOKENIZER = Tokenizer()
    return _TOKENIZER


def tokenize(texts: list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Token ids ``LongTensor [N, context_length]`` (77: the text tower's), identical to the
    reference ImageBind tokenizer."""
    return get_tokenizer()(list(texts) if not isinstance(texts, str) else texts, context_length)
