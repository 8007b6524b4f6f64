"""Media files for tests, written with PyAV."""

from __future__ import annotations

from pathlib import Path

import av


def faststart_cut(src: Path, dst: Path, fraction: float = 0.6) -> bytes:
    """The first ``fraction`` of ``src``'s video track remuxed with the index first (faststart):
    a file that opens, then ends early. ``dst`` holds the whole remux."""
    with av.open(str(src)) as i, av.open(str(dst), "w", format="mp4", options={"movflags": "+faststart"}) as o:
        vin = i.streams.video[0]
        vout = o.add_stream_from_template(vin)
        for p in i.demux(vin):
            if p.dts is not None:
                p.stream = vout
                o.mux(p)
    data = dst.read_bytes()
    return data[: int(len(data) * fraction)]
