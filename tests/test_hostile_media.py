"""Crafted image headers and frame shapes cannot make a source allocate beyond its limits:
sizes are read from headers before decoding, and elongated frames are refused before scaling."""

from __future__ import annotations

import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from sources.errors import SourceError
from sources.frames import FrameFolderSource
from sources.imagesize import MAX_ASPECT, frame_size_problem, jpeg_size, png_size
from sources.session import StreamSpec
from sources.video import VideoSource


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png16(width: int, height: int, text_first: bool = False) -> bytes:
    """A 16-bit grayscale PNG; with ``text_first`` a tEXt chunk precedes IHDR (invalid, but
    FFmpeg decodes such files)."""
    raw = b"".join(b"\x00" + b"\x01\x00" * width for _ in range(height))
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
    text = _chunk(b"tEXt", b"Comment\x00crafted") if text_first else b""
    return b"\x89PNG\r\n\x1a\n" + text + ihdr + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _depth_folder(tmp_path: Path, pngs: list[bytes]) -> StreamSpec:
    folder = tmp_path / "depth"
    folder.mkdir()
    for i, data in enumerate(pngs):
        (folder / f"{i:03d}.png").write_bytes(data)
    (tmp_path / "ts.csv").write_text("".join(f"{i * 0.1}\n" for i in range(len(pngs))))
    return StreamSpec(id="depth", modality="depth", source=folder, session="h", timestamps=tmp_path / "ts.csv")


def _jpeg(width: int, height: int) -> bytes:
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt, codec.time_base = width, height, "yuvj420p", Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in codec.encode(frame) + codec.encode(None))


def test_header_parsers_read_real_files() -> None:
    assert png_size(_png16(7, 5)) == (7, 5)
    assert jpeg_size(_jpeg(64, 48)) == (64, 48)
    assert png_size(b"not a png at all, 24 bytes") is None and jpeg_size(b"\xff\xd8\xff\xda") is None


def test_a_png_with_a_chunk_before_its_header_is_refused_not_decoded(tmp_path: Path) -> None:
    spec = _depth_folder(tmp_path, [_png16(8, 6), _png16(16000, 16000, text_first=True)[:200]])
    got = []
    with pytest.raises(SourceError, match=r"001\.png is not a PNG .*not decoded"):
        for chunk in FrameFolderSource(spec, chunk_seconds=0.05):
            got.append(chunk)
    assert sum(len(c) for c in got) == 1, "the good frame before the crafted one still goes out"


def test_a_png_declaring_a_huge_frame_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = _png16(8, 6)[:16] + struct.pack(">II", 16000, 16000) + _png16(8, 6)[24:]
    spec = _depth_folder(tmp_path, [bomb])
    with pytest.raises(SourceError, match="16000x16000, over the limit"):
        list(FrameFolderSource(spec, max_pixels=4096 * 4096))


def test_a_jpeg_declaring_a_huge_frame_is_caught_before_decoding() -> None:
    data = bytearray(_jpeg(64, 48))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", 60000, 60000)
    assert jpeg_size(bytes(data)) == (60000, 60000)
    assert "over the limit" in frame_size_problem(60000, 60000, 8192 * 8192)


def test_an_elongated_video_is_refused_before_its_frames_are_scaled(tmp_path: Path) -> None:
    path = tmp_path / "thin.mkv"
    with av.open(str(path), "w") as out:
        s = out.add_stream("ffv1", rate=10)
        s.width, s.height, s.pix_fmt = 4000, 2, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((2, 4000, 3), np.uint8), format="rgb24")
            for p in s.encode(frame.reformat(format="yuv420p")):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    spec = StreamSpec(id="cam", modality="vision", source=path, session="h")
    with pytest.raises(SourceError, match=f"4000x2, more elongated than {MAX_ASPECT:g}:1"):
        list(VideoSource(spec))


@pytest.mark.parametrize(("w", "h", "ok"), [(1920, 1080, True), (3840, 240, True), (3000, 1, False),
                                            (1, 3000, False), (0, 10, False), (9000, 9000, False)])
def test_frame_size_limits(w: int, h: int, ok: bool) -> None:
    assert (frame_size_problem(w, h, 8192 * 8192) is None) == ok




def test_a_file_that_is_not_media_is_named_in_words_without_ffmpegs_errno(tmp_path: Path) -> None:
    path = tmp_path / "garbage.mp4"
    path.write_bytes(b"\x00garbage" * 100)
    spec = StreamSpec(id="cam", modality="vision", source=path, session="h")
    with pytest.raises(SourceError) as exc:
        list(VideoSource(spec))
    msg = str(exc.value)
    assert f"stream 'cam': cannot open {path}: Invalid data found when processing input" in msg
    assert "Errno" not in msg


def test_a_video_whose_frames_grow_mid_file_drops_the_oversized_frames_and_counts_them(tmp_path: Path) -> None:
    """Frames over max_pixels after the first are dropped one by one (counted as frame_size),
    never scaled; the frames before and after them still come."""
    path = tmp_path / "grow.mjpeg"  # concatenated JPEGs: FFmpeg's mjpeg demuxer takes any size per frame
    path.write_bytes(_jpeg(64, 48) * 3 + _jpeg(640, 480) * 2 + _jpeg(64, 48) * 3)
    spec = StreamSpec(id="cam", modality="vision", source=path, session="h")
    source = VideoSource(spec, max_pixels=64 * 48 * 4, chunk_seconds=10.0)
    frames = sum(len(c) for c in source)
    assert frames == 6
    assert source.dropped == {"frame_size": 2}
