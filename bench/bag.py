"""Bag streams: read throughput against the same frames in a plain session, and peak memory
against bag size.

    PYTHONPATH=. python bench/bag.py [--mb 200] [--out /tmp/bagbench]

Writes, from realshort.mp4's frames (../shared/fixtures/real) cycled at 30 fps: a ROS 1 bag of
raw rgb8 Images (about ``--mb`` MB) and one of a tenth of that, a ROS 2 MCAP bag of the same
frames as JPEG CompressedImages, and the plain equivalents (an H.264 mp4, an MJPEG mkv, a
lossless FFV1 mkv). Each is read by its replay source (every frame decoded and scaled to 224,
no frame selection) in a child process, which reports frames/s and its peak RSS.
"""

from __future__ import annotations

import argparse
import fractions
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real"


def _frames() -> list[np.ndarray]:
    with av.open(str(REAL / "realshort.mp4")) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _video(path: Path, codec: str, pix_fmt: str, frames: list, n: int) -> None:
    tb = fractions.Fraction(1, 1000)
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec)
        s.width, s.height, s.pix_fmt, s.time_base = frames[0].shape[1], frames[0].shape[0], pix_fmt, tb
        s.codec_context.time_base = tb
        for i in range(n):
            f = av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")
            f.pts, f.time_base = round(i * 1000 / 30), tb
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def _bag(path: Path, frames: list, n: int, jpegs: list[bytes] | None) -> None:
    from rosbags.rosbag1 import Writer as W1
    from rosbags.rosbag2 import StoragePlugin, Writer as W2
    from rosbags.typesys import Stores, get_typestore

    ros1 = jpegs is None
    ts = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
    T = ts.types
    w = W1(path) if ros1 else W2(path, version=9, storage_plugin=StoragePlugin.MCAP)
    with w:
        msgtype = "sensor_msgs/msg/Image" if ros1 else "sensor_msgs/msg/CompressedImage"
        conn = w.add_connection("/camera/image", msgtype, typestore=ts)
        for i in range(n):
            ms = round(i * 1000 / 30)
            stamp = T["builtin_interfaces/msg/Time"](sec=ms // 1000, nanosec=(ms % 1000) * 1_000_000)
            header = T["std_msgs/msg/Header"](**({"seq": i} if ros1 else {}), stamp=stamp, frame_id="cam")
            a = frames[i % len(frames)]
            if ros1:
                msg = T[msgtype](header=header, height=a.shape[0], width=a.shape[1], encoding="rgb8", is_bigendian=0,
                                 step=a.shape[1] * 3, data=a.reshape(-1))
                raw = ts.serialize_ros1(msg, msgtype)
            else:
                msg = T[msgtype](header=header, format="jpeg", data=np.frombuffer(jpegs[i % len(jpegs)], np.uint8))
                raw = ts.serialize_cdr(msg, msgtype)
            w.write(conn, ms * 1_000_000, bytes(raw))


def build(out: Path, mb: float) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    frames = _frames()
    n_big = max(len(frames), int(mb * 1e6 / frames[0].nbytes))
    n_small = max(len(frames), n_big // 10)
    paths = {}
    for name, n in (("big", n_big), ("small", n_small)):
        d = out / f"ros1-{name}"
        if not d.exists():
            d.mkdir()
            _bag(d / "rec.bag", frames, n, None)
            (d / "session.yaml").write_text(_yaml(f"ros1-{name}", "rec.bag", True))
        paths[f"ros1-{name}"] = d
    for name, codec, pix in (("mp4", "h264", "yuv420p"), ("mjpeg", "mjpeg", "yuvj420p"), ("ffv1", "ffv1", "bgr0")):
        d = out / name
        if not d.exists():
            d.mkdir()
            _video(d / ("cam.mp4" if name == "mp4" else "cam.mkv"), codec, pix, frames, n_big)
            (d / "session.yaml").write_text(_yaml(name, "cam.mp4" if name == "mp4" else "cam.mkv", False))
        paths[name] = d
    d = out / "mcap-jpeg"
    if not d.exists():
        d.mkdir()
        with av.open(str(out / "mjpeg" / "cam.mkv")) as c:
            jpegs = [bytes(p) for p in c.demux(video=0) if p.size][:len(frames)]
        _bag(d / "rec", frames, n_big, jpegs)
        (d / "session.yaml").write_text(_yaml("mcap-jpeg", "rec", True))
    paths["mcap-jpeg"] = d
    return paths


def _yaml(name: str, source: str, bag: bool) -> str:
    topic = ", topic: /camera/image" if bag else ""
    return (f"format: bindstream.session/1\nname: {name}\nstreams:\n"
            f"  - {{id: cam, modality: vision, source: {source}{topic}}}\n")


def read_one(session: Path) -> dict:
    """Child: read the session's one stream to the end; frames/s, peak RSS."""
    from sources.replay import open_source
    from sources.session import load_session

    spec = load_session(session).streams[0]
    before = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    frames = sum(len(c) for c in open_source(spec, chunk_seconds=0.5))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    size = sum(p.stat().st_size for p in (spec.source.rglob("*") if spec.source.is_dir() else [spec.source]))
    return {"frames": frames, "wall_s": wall, "cpu_s": cpu, "fps": frames / wall, "mb": size / 1e6,
            "rss_before_mb": before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=200.0)
    ap.add_argument("--out", default="/tmp/bagbench")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(read_one(Path(args.child))))
        return
    paths = build(Path(args.out), args.mb)
    rows = {}
    for name in ("ros1-small", "ros1-big", "ffv1", "mp4", "mcap-jpeg", "mjpeg"):
        out = subprocess.run([sys.executable, __file__, "--child", str(paths[name])], check=True,
                             capture_output=True, text=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
        r = rows[name]
        print(f"{name:11s} {r['mb']:8.1f} MB {r['frames']:6d} frames {r['fps']:7.1f} frames/s "
              f"(cpu {r['cpu_s']:.2f} s) RSS {r['rss_before_mb']:.0f} MB before reading, peak {r['peak_rss_mb']:.0f} MB",
              flush=True)
    print(f"RSS big/small bag: {rows['ros1-big']['peak_rss_mb'] / rows['ros1-small']['peak_rss_mb']:.2f}x "
          f"for {rows['ros1-big']['mb'] / rows['ros1-small']['mb']:.1f}x the size")


if __name__ == "__main__":
    main()
