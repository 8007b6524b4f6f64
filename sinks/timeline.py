"""The session timeline: one self-contained HTML file that shows what happened in a session.

One zoomable session-time axis with a lane per modality: each trigger's score on each window
(a line per trigger and stream), its ``on`` threshold, event spans (shaded) with one marker per
event, captions (text lane) and vision thumbnails (hover or click a vision point). Clicking an
event marker shows its trigger, stream and time range.

Nothing is fetched: the chart library is the ``plotly.min.js`` bundled in the ``plotly``
package, inlined with the data; thumbnails are base64 JPEGs inside the data. The data is what
:class:`pipeline.session_triggers.TimelineTrace` gathers (``render_timeline(data)``).
"""

from __future__ import annotations

import contextlib
import errno
import html
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

__all__ = ["render_timeline", "write_timeline_html", "page_path_problem", "plotly_js"]

MODALITY_ORDER = ("vision", "audio", "imu", "depth", "thermal", "text")


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """The plotly.js bundle shipped inside the ``plotly`` Python package."""
    return (resources.files("plotly") / "package_data" / "plotly.min.js").read_text(encoding="utf-8")


def _script_json(data: Any) -> str:
    """``data`` as JSON that is safe inside a ``<script>`` element (no ``</script>``, no ``<!--``)."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 0; color: #222; }
header { padding: 10px 16px; border-bottom: 1px solid #ddd; }
header h1 { font-size: 18px; margin: 0 0 4px; }
header p { margin: 2px 0; color: #555; }
main { display: flex; }
#chart { flex: 1; min-width: 0; }
aside { width: 260px; padding: 12px; border-left: 1px solid #ddd; }
aside img { width: 100%; image-rendering: auto; border: 1px solid #ccc; min-height: 20px; }
#info { margin-top: 8px; white-space: pre-line; }
"""

# Builds the figure from DATA: lanes (one y axis each, stacked, one shared x axis), traces,
# event shapes and markers; wires hover and click to the side panel.
_SCRIPT = r"""
(function () {
  const D = DATA, order = ORDER;
  const lanes = order.filter(m => Object.values(D.lanes).some(l => l.modality === m));
  const n = Math.max(lanes.length, 1), gap = 0.03, h = (1 - gap * (n - 1)) / n;
  const axis = i => (i === 0 ? "y" : "y" + (i + 1));
  const colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];
  const color = {}; D.triggers.forEach((t, i) => { color[t.name] = colors[i % colors.length]; });
  const layout = { height: 140 + 170 * n, margin: { l: 70, r: 20, t: 10, b: 40 }, hovermode: "closest",
                   showlegend: true, legend: { orientation: "h", y: -0.08 }, shapes: [],
                   xaxis: { title: { text: "session time (s)" }, anchor: axis(n - 1) } };
  const traces = [];
  lanes.forEach((m, i) => {
    const ya = "yaxis" + (i === 0 ? "" : i + 1);
    layout[ya] = { domain: [Math.max(0, 1 - (i + 1) * h - i * gap), 1 - i * (h + gap)], title: { text: m },
                   zeroline: false };
    for (const [stream, lane] of Object.entries(D.lanes)) {
      if (lane.modality !== m) continue;
      const custom = lane.window.map((w, k) => [w, lane.t_start[k], stream]);
      const names = Object.keys(lane.scores);
      names.forEach(tr => traces.push({ type: "scatter", mode: "lines+markers", x: lane.t, y: lane.scores[tr],
        yaxis: axis(i), name: tr + " · " + stream, customdata: custom, marker: { size: 4, color: color[tr] },
        line: { color: color[tr], width: 1.5 }, meta: { lane: m, kind: "score" },
        hovertemplate: tr + " · " + stream + "<br>window %{customdata[0]}: %{customdata[1]:.2f}–%{x:.2f} s" +
                       "<br>score %{y:.3f}<extra></extra>" }));
      if (!names.length) traces.push({ type: "scatter", mode: "markers", x: lane.t, y: lane.t.map(() => 0),
        yaxis: axis(i), name: stream + " windows", customdata: custom, marker: { size: 5, color: "#999" },
        meta: { lane: m, kind: "window" },
        hovertemplate: stream + " window %{customdata[0]}: %{customdata[1]:.2f}–%{x:.2f} s<extra></extra>" });
    }
    D.triggers.filter(t => Object.values(D.lanes).some(l => l.modality === m && t.name in l.scores))
      .forEach(t => layout.shapes.push({ type: "line", xref: "x domain", x0: 0, x1: 1, yref: axis(i),
        y0: t.on, y1: t.on, line: { color: color[t.name], width: 1, dash: "dot" } }));
    const ev = D.events.map((e, k) => [e, k]).filter(([e]) => e.modality === m);
    ev.forEach(([e]) => layout.shapes.push({ type: "rect", xref: "x", x0: e.t_start, x1: e.t_end,
      yref: axis(i) + " domain", y0: 0, y1: 1, fillcolor: color[e.trigger], opacity: 0.18, line: { width: 0 } }));
    if (ev.length) traces.push({ type: "scatter", mode: "markers", name: "events (" + m + ")", yaxis: axis(i),
      x: ev.map(([e]) => (e.t_start + e.t_end) / 2), y: ev.map(([e]) => e.score), customdata: ev.map(([, k]) => k),
      marker: { symbol: "diamond", size: 14, color: ev.map(([e]) => color[e.trigger]), line: { color: "#000", width: 1 } },
      meta: { lane: m, kind: "event" },
      hovertemplate: "event: click for its time range<extra></extra>" });
    if (m === "text" && D.captions.length) traces.push({ type: "scatter", mode: "markers", name: "captions",
      yaxis: axis(i), x: D.captions.map(c => c.t), y: D.captions.map(() => 0), text: D.captions.map(c => c.text),
      marker: { symbol: "square", size: 8, color: "#555" }, meta: { lane: m, kind: "caption" },
      hovertemplate: "%{text}<extra></extra>" });
  });
  const info = document.getElementById("info"), img = document.getElementById("thumb");
  function thumbAt(stream, t) {
    const list = (D.thumbs[stream] || []); let best = null;
    for (const th of list) if (th.t <= t + 1e-6 && (!best || th.t > best.t)) best = th;
    return best || list[0] || null;
  }
  function showPoint(p) {
    const meta = p.data.meta || {};
    if (meta.kind === "event") {
      const e = D.events[p.customdata];
      info.textContent = "event " + e.trigger + " on " + e.stream + " (" + e.modality + ")\n" +
        e.t_start.toFixed(2) + " – " + e.t_end.toFixed(2) + " s, peak score " + e.score.toFixed(3) +
        (e.reason === "stream_end" ? "\n(still on when the stream ended)" : "");
      info.dataset.range = e.t_start.toFixed(2) + "-" + e.t_end.toFixed(2);
      return;
    }
    if (meta.lane === "vision" && p.customdata) {
      const th = thumbAt(p.customdata[2], p.x);
      if (th) { img.src = "data:image/jpeg;base64," + th.jpeg; img.alt = "window " + th.window; }
    }
    if (p.customdata && meta.kind !== "caption")
      info.textContent = p.data.name + "\nwindow " + p.customdata[0] + ": " + Number(p.customdata[1]).toFixed(2) +
        " – " + p.x.toFixed(2) + " s" + (meta.kind === "score" ? "\nscore " + p.y.toFixed(3) : "");
    else if (meta.kind === "caption") info.textContent = "caption at " + p.x.toFixed(2) + " s\n" + p.text;
  }
  const first = Object.values(D.thumbs).find(l => l.length);
  if (first) { img.src = "data:image/jpeg;base64," + first[0].jpeg; img.alt = "window " + first[0].window; }
  const gd = document.getElementById("chart");
  Plotly.newPlot(gd, traces, layout, { responsive: true, displaylogo: false, scrollZoom: true }).then(() => {
    gd.on("plotly_click", ev => showPoint(ev.points[0]));
    gd.on("plotly_hover", ev => { const p = ev.points[0]; if ((p.data.meta || {}).lane === "vision") showPoint(p); });
    document.body.dataset.ready = "1";
  });
})();
"""


def render_timeline(data: Mapping[str, Any]) -> str:
    """The timeline page for one session's ``data`` (see the module docstring)."""
    session = html.escape(str(data.get("session", "")))
    triggers = data.get("triggers") or []
    listed = "; ".join(f"<b>{html.escape(t['name'])}</b> ({html.escape(t.get('prompt', ''))}, {html.escape(t['score'])}"
                       + (f", on {t['on']:g} / off {t['off']:g})" if t.get("on") is not None else ")")
                       for t in triggers) or "none"
    n_events = len(data.get("events") or [])
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f"<title>bindstream timeline: {session}</title>\n<style>{_STYLE}</style>\n"
            f"<script>{plotly_js()}</script>\n</head><body>\n"
            f"<header><h1>Session {session}</h1><p>Triggers: {listed}</p><p>{n_events} event(s). Drag to zoom, "
            f"double-click to reset; hover or click a vision point for its frame, an event marker for its time range.</p>"
            f"</header>\n<main><div id=\"chart\"></div><aside><img id=\"thumb\" alt=\"\">"
            f"<div id=\"info\">Click an event marker or a point.</div></aside></main>\n"
            f"<script>const DATA = {_script_json(dict(data))}; const ORDER = {json.dumps(MODALITY_ORDER)};\n"
            f"{_SCRIPT}</script>\n</body></html>\n")


def page_path_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot take the timeline page, or ``None``: it is empty, a folder, or below a
    file (no folder can be made there). Whether the folder is writable only the write says."""
    if not str(path).strip():
        return "empty, expected the HTML file to write, e.g. timeline.html"
    p = Path(path)
    if not p.name or p.is_dir():
        return f"is a folder, expected the HTML file to write, e.g. {p / 'timeline.html'}"
    for parent in p.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is a file, so no folder can be made there"
    return None


def write_timeline_html(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write the timeline page of ``data`` to ``path`` (folders created); returns the path.

    The page goes to a hidden temporary file beside ``path`` first and is moved onto it once
    complete; on any failure (a full disk, a folder in the way) the temporary file is removed and
    the :class:`OSError` raised. A folder as ``path`` is refused (:class:`IsADirectoryError`)
    before anything is written."""
    path = Path(path)
    if not path.name or path.is_dir():
        raise IsADirectoryError(errno.EISDIR, page_path_problem(path), str(path))
    page = render_timeline(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path
