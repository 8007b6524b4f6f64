"""Recording a live session as a session v1 folder that replays to the same windows.

What each modality becomes (``DIR/<session>/``), chosen so a replay reads back exactly the
samples and times the live run used:

=========  ==============================================================================
vision     ``<id>.nut``: FFV1 (lossless) RGB, pts in microseconds (live video times are
           rounded to whole microseconds, so the times come back exactly)
audio      ``<id>.wav``: 32-bit float PCM, 16 kHz mono; ``offset`` = the first sample's time;
           a gap (a ``url``/``device`` reconnect) is written as silence
imu        ``<id>.csv``: ``t,ax,ay,az,gx,gy,gz`` in s, m/s^2, rad/s, full float precision
depth      ``<id>/NNNNNN.png`` 16-bit millimetres + ``<id>/timestamps.csv`` (exact for depth
           that arrived in mm; metres are rounded to the millimetre)
thermal    ``<id>.npy`` float32 ``[N, H, W]`` + ``<id>_t.npy`` times
=========  ==============================================================================

Times are written on the session clock (clock offsets already applied), so every stream's
``offset`` is 0 (audio: its start time); ``session.yaml``'s ``description`` lists the device
clock offsets that were applied.

A recording is written into a partial folder (:func:`partial_folder`) and becomes
``DIR/<session>/`` only when :func:`finish_recording` has written its ``session.yaml``: a run
that records nothing, or fails to write, never removes or overwrites an existing recording.
A stream whose files cannot be written (a full disk) stops recording, keeps the error naming
the file (:attr:`StreamRecorder.error`), and goes on being embedded and published.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import yaml

from sources.session import FORMAT
from sources.base import AUDIO_RATE, Chunk, frame_values

__all__ = ["StreamRecorder", "RecordingError", "partial_folder", "finish_recording"]

log = logging.getLogger(__name__)

_US = Fraction(1, 1_000_000)


_FILES = {"vision": "{}.nut", "audio": "{}.wav", "imu": "{}.csv", "depth": "{}/", "thermal": "{}.f32"}


class RecordingError(RuntimeError):
    """A recording could not be finished; the message names the folder or file."""


class StreamRecorder:
    """Writes the chunks of one live stream; :meth:`close` returns its ``session.yaml`` entry
    (``None`` when nothing was recorded, or when writing failed: then :attr:`error` says why)."""

    def __init__(self, folder: str | Path, stream: str, modality: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stream = stream
        self.modality = modality
        self.samples = 0
        self._container: Any = None
        self._vstream: Any = None
        self._csv: Any = None
        self._writer: Any = None
        self._times: list[float] = []
        self._raw: Any = None
        self._shape: tuple[int, ...] | None = None
        self._audio_t0: float | None = None
        self._audio_written = 0  # samples in the WAV so far, silence of gaps included
        self._closed = False
        self.error: str | None = None
        self.not_recorded = 0  # samples that arrived after writing failed

    def write(self, chunk: Chunk) -> None:
        if len(chunk) == 0:
            return
        if self.error is not None:
            self.not_recorded += len(chunk)
            return
        try:
            getattr(self, f"_write_{self.modality}")(chunk)
        except OSError as e:
            self._failed(e)
            self.not_recorded += len(chunk)
            return
        self.samples += len(chunk)

    def _failed(self, e: OSError) -> None:
        name = Path(e.filename).name if getattr(e, "filename", None) else _FILES[self.modality].format(self.stream)
        self.error = f"recording stream '{self.stream}': writing {self.folder / name} failed: {e.strerror or e}"
        log.error("%s; the stream goes on without recording", self.error)
        self._close_files()

    def _close_files(self) -> None:
        for f in (self._csv, self._raw):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        try:
            if self._container is not None:
                self._container.close()
        except (OSError, av.FFmpegError):
            pass
        self._csv = self._raw = self._container = None

    # -- per modality ---------------------------------------------------------------------
    def _write_vision(self, chunk: Chunk) -> None:
        for t, img in zip(chunk.t, chunk.data):
            if self._container is None:
                self._container = av.open(str(self.folder / f"{self.stream}.nut"), "w")
                s = self._container.add_stream("ffv1")
                s.width, s.height = int(img.shape[1]), int(img.shape[0])
                s.pix_fmt = "bgr0"
                s.time_base = _US
                s.codec_context.time_base = _US
                self._vstream = s
            if (img.shape[1], img.shape[0]) != (self._vstream.width, self._vstream.height):
                log.warning("recording '%s': frame size changed; frame at %.6f s rescaled", self.stream, t)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            if (frame.width, frame.height) != (self._vstream.width, self._vstream.height):
                frame = frame.reformat(width=self._vstream.width, height=self._vstream.height)
            frame.pts = int(np.rint(float(t) * 1e6))
            frame.time_base = _US
            for p in self._vstream.encode(frame):
                self._container.mux(p)

    def _write_audio(self, chunk: Chunk) -> None:
        if self._container is None:
            self._container = av.open(str(self.folder / f"{self.stream}.wav"), "w", format="wav")
            s = self._container.add_stream("pcm_f32le", rate=AUDIO_RATE)
            s.layout = "mono"
            self._vstream = s
            self._audio_t0 = float(chunk.t[0])
            self._audio_written = 0
        # A WAV has no timestamps: sample i replays at t0 + i / 16000. Live audio stays on that
        # grid across a reconnect (sources/live/av_input.py) and skips the samples of the gap,
        # so the gap is written as silence; otherwise every later sample would replay early.
        assert self._audio_t0 is not None
        at = np.rint((np.asarray(chunk.t, dtype=np.float64) - self._audio_t0) * AUDIO_RATE).astype(np.int64)
        pcm_all = np.ascontiguousarray(chunk.data, dtype=np.float32).reshape(-1)
        cuts = np.flatnonzero(np.diff(at) != 1) + 1
        for start, end in zip(np.r_[0, cuts], np.r_[cuts, at.size]):
            gap = int(at[start]) - self._audio_written
            if gap > 0:
                log.info("recording '%s': %.3f s gap in the audio at %.3f s written as silence",
                         self.stream, gap / AUDIO_RATE, float(chunk.t[start]))
                for n in range(0, gap, AUDIO_RATE):  # a long outage: one second of silence at a time
                    self._encode_audio(np.zeros(min(AUDIO_RATE, gap - n), dtype=np.float32))
            self._encode_audio(pcm_all[start:end])

    def _encode_audio(self, pcm: np.ndarray) -> None:
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = AUDIO_RATE
        for p in self._vstream.encode(frame):
            self._container.mux(p)
        self._audio_written += pcm.size

    def _write_imu(self, chunk: Chunk) -> None:
        if self._csv is None:
            self._csv = open(self.folder / f"{self.stream}.csv", "w", newline="")
            self._writer = csv.writer(self._csv)
            self._writer.writerow(["t", "ax", "ay", "az", "gx", "gy", "gz"])
        for t, row in zip(chunk.t, np.asarray(chunk.data, dtype=np.float32)):
            self._writer.writerow([repr(float(t))] + [repr(float(v)) for v in row])

    def _write_depth(self, chunk: Chunk) -> None:
        d = self.folder / self.stream
        if self._csv is None:
            d.mkdir(exist_ok=True)
            self._csv = open(d / "timestamps.csv", "w", newline="")
            self._writer = csv.writer(self._csv)
            self._writer.writerow(["frame", "t"])
        for t, img in zip(chunk.t, chunk.data):
            if img.dtype == np.uint16:
                mm = img  # millimetres as the source read them: written as they are
            else:
                mm = np.where(np.isfinite(img), np.rint(np.asarray(img, np.float64) * 1000.0), 0)
                mm = np.clip(mm, 0, 65535).astype(np.uint16)
            name = f"{len(self._times):06d}.png"
            _write_png16(d / name, mm)
            self._times.append(float(t))
            self._writer.writerow([name, repr(float(t))])

    def _write_thermal(self, chunk: Chunk) -> None:
        if self._raw is None:
            self._raw = open(self.folder / f"{self.stream}.f32", "wb")
            self._shape = tuple(chunk.data.shape[1:])
        for t, img in zip(chunk.t, chunk.data):
            if tuple(img.shape) != self._shape:
                log.warning("recording '%s': thermal frame size changed; frame at %.6f s skipped", self.stream, t)
                continue
            self._raw.write(np.ascontiguousarray(frame_values("thermal", img)).tobytes())
            self._times.append(float(t))

    # -- end ------------------------------------------------------------------------------
    def close(self) -> dict[str, Any] | None:
        """Finish the files; the stream's entry for ``session.yaml``, or ``None`` when it recorded
        nothing or writing failed (:attr:`error`)."""
        if self._closed or self.error is not None:
            self._closed = True
            return None
        self._closed = True
        try:
            return self._finish()
        except OSError as e:
            self._failed(e)
            return None

    def _finish(self) -> dict[str, Any] | None:
        entry: dict[str, Any] = {"id": self.stream, "modality": self.modality}
        if self._container is not None:
            for p in self._vstream.encode(None):
                self._container.mux(p)
            self._container.close()
        if self._csv is not None:
            self._csv.close()
        if self.samples == 0:
            return None
        if self.modality == "vision":
            entry["source"] = f"{self.stream}.nut"
        elif self.modality == "audio":
            entry.update(source=f"{self.stream}.wav", offset=self._audio_t0)
        elif self.modality == "imu":
            entry.update(source=f"{self.stream}.csv",
                         columns={r: r for r in ("t", "ax", "ay", "az", "gx", "gy", "gz")}, time_unit="s")
        elif self.modality == "depth":
            entry.update(source=f"{self.stream}/", timestamps=f"{self.stream}/timestamps.csv", depth_unit="mm")
        elif self.modality == "thermal":
            assert self._raw is not None and self._shape is not None
            self._raw.close()
            raw = self.folder / f"{self.stream}.f32"
            arr = np.fromfile(raw, dtype=np.float32).reshape((-1, *self._shape))
            np.save(self.folder / f"{self.stream}.npy", arr)
            np.save(self.folder / f"{self.stream}_t.npy", np.asarray(self._times, dtype=np.float64))
            raw.unlink()
            entry.update(source=f"{self.stream}.npy", timestamps=f"{self.stream}_t.npy")
        return entry


def _write_png16(path: Path, mm: np.ndarray) -> None:
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height = int(mm.shape[1]), int(mm.shape[0])
    ctx.pix_fmt = "gray16be"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(mm), format="gray16le").reformat(format="gray16be")
    path.write_bytes(b"".join(bytes(p) for p in ctx.encode(frame) + ctx.encode(None)))


def partial_folder(out: str | Path, name: str) -> Path:
    """Where session ``name``'s recording is written until it is finished: a hidden folder in
    ``out`` that no earlier run's recording can be."""
    return Path(out) / f".{name}.recording-{os.getpid()}-{os.urandom(3).hex()}"


def _final_folder(out: Path, name: str) -> Path:
    """``out/<name>``, or ``out/<name>.1``, ``.2``, ... when that folder exists already."""
    target, n = out / name, 0
    while target.exists():
        n += 1
        target = out / f"{name}.{n}"
    return target


def _description(clock_offsets: dict[str, list[float]] | None, clock_mappings: dict[str, str] | None) -> str:
    lines = ["Recorded live by bindstream. Times are on the session clock (offsets applied)."]
    how = {"rtcp": " (from RTCP sender reports)", "estimated": " (estimated from arrival times)"}
    for sid, offs in sorted((clock_offsets or {}).items()):
        if offs:
            lines.append(f"stream {sid}: device clock offset applied {offs[0]:.6f} s at start, {offs[-1]:.6f} s at end"
                         + how.get((clock_mappings or {}).get(sid, ""), ""))
    return "\n".join(lines)


def finish_recording(partial: str | Path, name: str, entries: list[dict[str, Any]],
                     clock_offsets: dict[str, list[float]] | None = None,
                     clock_mappings: dict[str, str] | None = None) -> Path | None:
    """Write ``session.yaml`` for the recorded ``entries`` (file order) into ``partial``, then
    move the folder to ``<partial's parent>/<name>`` (or ``<name>.N`` beside an existing
    recording) and return that folder. ``None``, and only ``partial`` removed, when no stream
    recorded anything. RecordingError naming the file when writing fails: ``partial`` is left
    in place with what was written. ``clock_mappings``: how a ``url``/``device`` stream's times
    were mapped (``rtcp``, ``estimated``, ``arrival``), noted with its offsets."""
    partial = Path(partial)
    entries = [e for e in entries if e]
    if not entries:
        log.warning("recording of session '%s' is empty; nothing written", name)
        shutil.rmtree(partial, ignore_errors=True)
        return None
    doc = {"format": FORMAT, "name": name, "description": _description(clock_offsets, clock_mappings),
           "streams": entries}
    path = partial / "session.yaml"
    try:
        tmp = partial / ".session.yaml.tmp"
        with open(tmp, "w") as f:
            f.write(yaml.safe_dump(doc, sort_keys=False))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        final = _final_folder(partial.parent, name)
        os.rename(partial, final)
    except OSError as e:
        where = e.filename or path
        raise RecordingError(f"recording of session '{name}': writing {where} failed: {e.strerror or e}; "
                             f"what was written is in {partial}") from None
    if final.name != name:
        log.warning("recording of session '%s' went to %s: %s holds an earlier recording", name, final,
                    partial.parent / name)
    return final
