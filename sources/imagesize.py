"""Frame sizes checked before anything is decoded or scaled.

A few bytes can declare a frame of gigabytes (a PNG's IHDR, a JPEG's SOF marker), and a
frame of sane pixel count but extreme shape (4000x2) becomes enormous once its short side is
scaled to the model's input size. Every image source asks :func:`frame_size_problem` first.
"""

from __future__ import annotations

__all__ = ["MAX_ASPECT", "frame_size_problem", "png_size", "jpeg_size"]

# Long side over short side. ImageBind looks at a centred square of the frame, so a wider frame
# loses most of its pixels anyway; 16:1 admits every camera and panorama format in use.
MAX_ASPECT = 16.0

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are
# other segments in the same range.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def frame_size_problem(width: int, height: int, max_pixels: int) -> str | None:
    """Why a ``width`` x ``height`` frame is refused, or None when it is acceptable."""
    if width <= 0 or height <= 0:
        return f"{width}x{height}, no pixels"
    if width * height > max_pixels:
        return f"{width}x{height}, over the limit of {max_pixels} pixels (sources.max_pixels)"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"{width}x{height}, more elongated than {MAX_ASPECT:g}:1"
    return None


def png_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first 24 bytes of a PNG, or None when they are not a PNG's
    signature followed by its IHDR chunk (the PNG specification requires IHDR first; a file with
    another chunk first is refused rather than handed to a decoder that might accept it)."""
    if len(head) < 24 or head[:8] != _PNG_MAGIC or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's first start-of-frame marker, or None when ``data`` is not a
    JPEG or ends before one (walks segment headers only: no pixel is decoded)."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # segments without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF:
            if i + 9 > len(data):
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            return None
        i += 2 + length
    return None
