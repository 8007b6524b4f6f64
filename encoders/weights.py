"""Locate, download and read ImageBind checkpoints.

Resolution order for :func:`resolve`:

1. ``checkpoint`` is an existing file path -> that file;
2. the cache (``$BINDSTREAM_CACHE``, default ``~/.cache/bindstream``) holds ``<name>.pth``
   (or ``.safetensors``) -> that file;
3. ``checkpoint == "auto"`` -> download from the official URL into the cache, through a
   temporary file in the same directory that is renamed (``os.replace``, atomic on POSIX) only
   after its size matched the server's ``Content-Length``. A crash or a truncated transfer
   therefore never leaves a partial file where the next run would trust it.

Nothing is ever written to the working directory.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_URL",
    "WeightsUnavailable",
    "cache_dir",
    "weights_url",
    "resolve",
    "download",
    "load_state_dict",
    "CheckpointMissing",
    "verify",
]

log = logging.getLogger(__name__)

# Official checkpoint published by Meta in the ImageBind README (about 4.5 GB).
DEFAULT_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
_KNOWN_URLS = {"imagebind_huge": DEFAULT_URL}
_SUFFIXES = (".pth", ".pt", ".safetensors")
_CHUNK = 1 << 20  # 1 MiB reads: small enough for a smooth progress bar, large enough to be fast
_TIMEOUT_S = 60.0


class WeightsUnavailable(RuntimeError):
    """The checkpoint is neither on disk nor downloadable, or the file there cannot be read."""


class CheckpointMissing(WeightsUnavailable, FileNotFoundError):
    """A checkpoint path given explicitly does not exist."""


def cache_dir() -> Path:
    """``$BINDSTREAM_CACHE`` or ``~/.cache/bindstream`` (read at call time, so tests can set it)."""
    env = os.environ.get("BINDSTREAM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bindstream"


def weights_url(name: str = "imagebind_huge") -> str:
    """Download URL for ``name``; ``$BINDSTREAM_WEIGHTS_URL`` overrides it (mirrors, tests)."""
    env = os.environ.get("BINDSTREAM_WEIGHTS_URL")
    if env:
        return env
    try:
        return _KNOWN_URLS[name]
    except KeyError:
        raise WeightsUnavailable(
            f"no download URL known for checkpoint '{name}' (known: {sorted(_KNOWN_URLS)}); "
            "pass a local file path or set BINDSTREAM_WEIGHTS_URL"
        ) from None


def _cached(name: str) -> Path | None:
    root = cache_dir()
    for suffix in _SUFFIXES:
        p = root / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def _unavailable_message(url: str, target: Path, why: str) -> str:
    return (
        f"ImageBind weights '{target.stem}' are not available: {why}. "
        f"Download {url} on a machine with internet access and put the file at {target} "
        "(or pass its path as the checkpoint, or set BINDSTREAM_CACHE to the folder holding it). "
        "To run without any download, use configs/demo.yaml (tiny model, no weights needed)."
    )


def download(url: str, target: Path) -> Path:
    """Download ``url`` to ``target`` atomically, checking the size against Content-Length."""
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=_TIMEOUT_S)  # noqa: S310
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise WeightsUnavailable(
                    _unavailable_message(url, target, f"download failed ({reason})")
                ) from exc
            with response:
                header = response.headers.get("Content-Length")
                expected = int(header) if header is not None else None
                received = 0
                with tqdm(
                    total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=f"downloading {target.name}",
                ) as bar:
                    while True:
                        try:
                            block = response.read(_CHUNK)
                        except (OSError, http.client.HTTPException) as exc:
                            # IncompleteRead (an HTTPException) when the server closes early.
                            raise WeightsUnavailable(
                                _unavailable_message(url, target, f"transfer interrupted ({exc!r})")
                            ) from exc
                        if not block:
                            break
                        out.write(block)
                        received += len(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and received != expected:
            raise WeightsUnavailable(
                _unavailable_message(
                    url, target,
                    f"transfer truncated: got {received} bytes, Content-Length said {expected}",
                )
            )
        if received == 0:
            raise WeightsUnavailable(_unavailable_message(url, target, "server sent 0 bytes"))
        os.replace(tmp, target)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a stray .part file in the cache.
        tmp.unlink(missing_ok=True)
        raise
    log.info("downloaded %s (%d bytes) to %s", url, received, target)
    return target


def resolve(checkpoint: str | Path, name: str = "imagebind_huge") -> Path:
    """Path of a readable checkpoint for ``checkpoint`` (a file path or ``"auto"``).

    Raises :class:`WeightsUnavailable` naming the URL and where to put the file when the
    weights are missing and cannot be downloaded, and ``FileNotFoundError`` for a path that
    does not exist (:class:`CheckpointMissing`, a ``FileNotFoundError`` too).
    """
    if str(checkpoint) != "auto":
        path = Path(checkpoint).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            raise CheckpointMissing(f"checkpoint {path.resolve()} is a folder; pass the .pth/.safetensors file in it, "
                                    f"or 'auto' to use {cache_dir() / (name + '.pth')} (downloaded if missing)")
        cached = _cached(name) if str(checkpoint) in ("", name) else None
        if cached is not None:
            return cached
        raise CheckpointMissing(
            f"checkpoint file {path.resolve()} does not exist; pass an existing .pth/.safetensors file, "
            f"or 'auto' to use {cache_dir() / (name + '.pth')} (downloaded if missing)"
        )
    cached = _cached(name)
    if cached is not None:
        log.debug("using cached checkpoint %s", cached)
        return cached
    return download(weights_url(name), cache_dir() / f"{name}.pth")


def _unreadable(path: Path, why: str) -> WeightsUnavailable:
    cached = path.parent == cache_dir()
    fix = (f"delete {path} and run again to download it afresh" if cached
           else "pass a complete checkpoint file (model.checkpoint), or 'auto' to use the cache")
    return WeightsUnavailable(f"checkpoint {path} cannot be read ({why}); it is truncated or corrupt: {fix}")


def verify(path: str | Path) -> None:
    """Cheap readability check, before any actor starts: a ``.pth``/``.pt`` must be a complete
    zip archive (torch's format; a truncated download loses the directory at its end), a
    ``.safetensors`` file must hold the bytes its header declares. WeightsUnavailable if not."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            _verify_safetensors(path)
        elif suffix in (".pth", ".pt", ".bin"):
            with zipfile.ZipFile(path) as z:
                if not z.namelist():
                    raise ValueError("empty archive")
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise _unreadable(path, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}") from None


def _verify_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"header length {n} exceeds the file")
        header = json.loads(f.read(n))
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"tensors end at byte {8 + n + end}, the file has {size}")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a CPU state dict (memory-mapped for ``.pth``/``.pt``).

    ``weights_only=True`` refuses pickled code; a top-level ``"model"`` or ``"state_dict"``
    wrapper, as training checkpoints often have, is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES + (".bin",):
        raise ValueError(f"checkpoint {path}: unknown format '{suffix}', expected .pth, .pt or .safetensors")
    verify(path)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            inner = state.get(key)
            if isinstance(inner, dict) and inner:
                state = inner
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path}: expected a mapping of parameter names to tensors")
    return dict(state)
