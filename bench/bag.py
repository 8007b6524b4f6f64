"""Bag streams: read throughput against the same frames in a plain session, and peak memory
against bag size.

    PYTHONPATH=. python bench/bag.py [--mb 200] [--out /tmp/bagbench]
    PYTHONPATH=. python bench/bag.py --memory [--gb 2] [--out /tmp/bagmem]

Throughput (default): writes, from realshort.mp4's frames (../shared/fixtures/real) cycled at
30 fps, a ROS 1 bag of raw rgb8 Images (about ``--mb`` MB) and one of a tenth of that, a ROS 2
MCAP bag of the same frames as JPEG CompressedImages, and the plain equivalents (an H.264 mp4,
an MJPEG mkv, a lossless FFV1 mkv); and depth: the real 16-bit depth map as a ROS 1 bag of 16UC1
Images and as a folder of 16-bit PNGs. Each is read by its replay source (every frame decoded
and scaled to 224, no frame selection) in a child process, which reports frames/s and its peak
RSS.

Memory (``--memory``): the same frames scaled to 640x480 as raw rgb8 Images in a ROS 1 bag and in
a ROS 2 MCAP bag, each about ``--gb`` GB and about 100 MB. rosbags' writers write each ~1 MB
chunk to disk as it fills, so the writer's memory stays flat too (its peak RSS is printed). Each
is replayed to the end in a child; the verdict is the big bag's peak RSS over the small one's.
The bags are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import fractions
import json
import shutil
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


def _bag(path: Path, frames: list, n: int, ros1: bool, jpegs: list[bytes] | None = None) -> None:
    """``n`` frames at 30 fps on /camera/image: raw rgb8 Images, or JPEG CompressedImages when
    ``jpegs`` is given; a ROS 1 bag, or a ROS 2 MCAP bag folder."""
    from rosbags.rosbag1 import Writer as W1
    from rosbags.rosbag2 import StoragePlugin, Writer as W2
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
    T = ts.types
    w = W1(path) if ros1 else W2(path, version=9, storage_plugin=StoragePlugin.MCAP)
    serialize = ts.serialize_ros1 if ros1 else ts.serialize_cdr
    with w:
        msgtype = "sensor_msgs/msg/CompressedImage" if jpegs else "sensor_msgs/msg/Image"
        conn = w.add_connection("/camera/image", msgtype, typestore=ts)
        for i in range(n):
            ms = round(i * 1000 / 30)
            stamp = T["builtin_interfaces/msg/Time"](sec=ms // 1000, nanosec=(ms % 1000) * 1_000_000)
            header = T["std_msgs/msg/Header"](**({"seq": i} if ros1 else {}), stamp=stamp, frame_id="cam")
            if jpegs:
                msg = T[msgtype](header=header, format="jpeg", data=np.frombuffer(jpegs[i % len(jpegs)], np.uint8))
            else:
                a = frames[i % len(frames)]
                msg = T[msgtype](header=header, height=a.shape[0], width=a.shape[1], encoding="rgb8", is_bigendian=0,
                                 step=a.shape[1] * 3, data=a.reshape(-1))
            w.write(conn, ms * 1_000_000, bytes(serialize(msg, msgtype)))


def _depth(out: Path, n: int) -> dict[str, Path]:
    """``n`` 16-bit depth frames at 30 fps (the real depth map, shifted a pixel per frame) as a
    ROS 1 bag of 16UC1 Images and as a PNG folder with its timestamps file."""
    from rosbags.rosbag1 import Writer as W1
    from rosbags.typesys import Stores, get_typestore

    with av.open(str(REAL / "motorcycle_depth_mm_u16.png")) as c:
        depth = next(c.decode(video=0)).to_ndarray(format="gray16le")
    paths = {"depth-bag": out / "depth-bag", "depth-png": out / "depth-png"}
    if paths["depth-bag"].exists():
        return paths
    for d in paths.values():
        d.mkdir()
    ts = get_typestore(Stores.ROS1_NOETIC)
    T = ts.types
    (paths["depth-png"] / "frames").mkdir()
    with W1(paths["depth-bag"] / "rec.bag") as w:
        conn = w.add_connection("/depth", "sensor_msgs/msg/Image", typestore=ts)
        for i in range(n):
            a = np.ascontiguousarray(np.roll(depth, i, axis=1))
            ms = round(i * 1000 / 30)
            stamp = T["builtin_interfaces/msg/Time"](sec=ms // 1000, nanosec=(ms % 1000) * 1_000_000)
            msg = T["sensor_msgs/msg/Image"](header=T["std_msgs/msg/Header"](seq=i, stamp=stamp, frame_id="d"),
                                             height=a.shape[0], width=a.shape[1], encoding="16UC1", is_bigendian=0,
                                             step=a.shape[1] * 2, data=a.view(np.uint8).reshape(-1))
            w.write(conn, ms * 1_000_000, bytes(ts.serialize_ros1(msg, "sensor_msgs/msg/Image")))
            frame = av.VideoFrame.from_ndarray(a, format="gray16le")
            ctx = av.CodecContext.create("png", "w")
            ctx.width, ctx.height, ctx.pix_fmt = a.shape[1], a.shape[0], "gray16be"
            (paths["depth-png"] / "frames" / f"{i:05d}.png").write_bytes(
                b"".join(bytes(p) for p in ctx.encode(frame.reformat(format="gray16be"))))
    (paths["depth-png"] / "t.csv").write_text("t\n" + "".join(f"{round(i * 1000 / 30) / 1000!r}\n" for i in range(n)))
    (paths["depth-bag"] / "session.yaml").write_text(
        "format: bindstream.session/1\nname: depth-bag\nstreams:\n"
        "  - {id: d, modality: depth, source: rec.bag, topic: /depth}\n")
    (paths["depth-png"] / "session.yaml").write_text(
        "format: bindstream.session/1\nname: depth-png\nstreams:\n"
        "  - {id: d, modality: depth, source: frames/, timestamps: t.csv}\n")
    return paths


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
            _bag(d / "rec.bag", frames, n, ros1=True)
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
        _bag(d / "rec", frames, n_big, ros1=False, jpegs=jpegs)
        (d / "session.yaml").write_text(_yaml("mcap-jpeg", "rec", True))
    paths["mcap-jpeg"] = d
    paths.update(_depth(out, 300))
    return paths


def build_memory(out: Path, gb: float) -> dict[str, Path]:
    """Raw rgb8 640x480 bags, ROS 1 and ROS 2 MCAP, of about ``gb`` GB and about 100 MB."""
    out.mkdir(parents=True, exist_ok=True)
    frames = [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(width=640, height=480).to_ndarray()
              for f in _frames()]
    paths = {}
    for container in ("ros1", "mcap"):
        for name, mb in (("small", 100.0), ("big", gb * 1000)):
            d = out / f"{container}-{name}"
            source = "rec.bag" if container == "ros1" else "rec"
            if not d.exists():
                d.mkdir()
                _bag(d / source, frames, int(mb * 1e6 / frames[0].nbytes), ros1=container == "ros1")
                (d / "session.yaml").write_text(_yaml(f"{container}-{name}", source, True))
            paths[f"{container}-{name}"] = d
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
            "rss_before_mb": before, "peak_rss_mb": _rss_mb("VmHWM")}


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set (``VmRSS``) or its peak (``VmHWM``), MB. The peak is read from
    /proc, not getrusage: ``ru_maxrss`` survives exec, so a child would report its parent's."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _child(path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _row(name: str, r: dict) -> None:
    print(f"{name:11s} {r['mb']:8.1f} MB {r['frames']:6d} frames {r['fps']:7.1f} frames/s "
          f"(cpu {r['cpu_s']:.2f} s) RSS {r['rss_before_mb']:.0f} MB before reading, peak {r['peak_rss_mb']:.0f} MB",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=200.0)
    ap.add_argument("--memory", action="store_true", help="multi-GB bags: peak RSS against a ~100 MB bag")
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--keep", action="store_true", help="--memory: keep the bags it wrote")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(read_one(Path(args.child))))
        return
    rows = {}
    if args.memory:
        out = Path(args.out or "/tmp/bagmem")
        t0 = time.perf_counter()
        paths = build_memory(out, args.gb)
        print(f"wrote {len(paths)} bags in {time.perf_counter() - t0:.0f} s; writer peak RSS {_rss_mb('VmHWM'):.0f} MB",
              flush=True)
        try:
            for name in ("ros1-small", "ros1-big", "mcap-small", "mcap-big"):
                rows[name] = _child(paths[name])
                _row(name, rows[name])
        finally:
            if not args.keep:
                shutil.rmtree(out)
        for c in ("ros1", "mcap"):
            big, small = rows[f"{c}-big"], rows[f"{c}-small"]
            print(f"{c}: RSS big/small bag {big['peak_rss_mb'] / small['peak_rss_mb']:.2f}x "
                  f"for {big['mb'] / small['mb']:.1f}x the size")
        return
    paths = build(Path(args.out or "/tmp/bagbench"), args.mb)
    for name in ("ros1-small", "ros1-big", "ffv1", "mp4", "mcap-jpeg", "mjpeg", "depth-bag", "depth-png"):
        rows[name] = _child(paths[name])
        _row(name, rows[name])
    print(f"RSS big/small bag: {rows['ros1-big']['peak_rss_mb'] / rows['ros1-small']['peak_rss_mb']:.2f}x "
          f"for {rows['ros1-big']['mb'] / rows['ros1-small']['mb']:.1f}x the size")


if __name__ == "__main__":
    main()
