"""The stylize report as one self-contained HTML page: per-scene input and output thumbnails, the
metrics table and the per-frame plot, every image inside the file as a data: URI, so the page can
be mailed or archived alone. In batch mode an index page links one page per input.

The orchestrator feeds `SceneThumbs` the frames it already has, beside the metrics meter:

    thumbs = SceneThumbs()
    ... thumbs.add(scene.index, src_frame, out_frame)      # every frame, in order
    write_html_report(report, thumbs.finish(), "out.html")
"""

from __future__ import annotations

import base64
import html
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cinefx.fsutil import write_text
from cinefx.report import Measure, Report, write_plot


@dataclass(frozen=True)
class SceneThumb:
    input: bytes  # JPEG
    output: bytes  # JPEG
    offset: int  # the frame shown, counted from the scene's first frame


class SceneThumbs:
    """One input/output thumbnail pair per scene, taken from the middle of the scene.

    Frames come one at a time and a scene's length is known only at its end, so each scene keeps
    at most `keep` evenly spaced samples: every `stride`-th frame, the stride doubling (and every
    other sample dropped) whenever the samples overflow. At the scene's end the sample nearest
    its middle is kept as JPEG, away from the dissolve or fade that may open or close it. Memory:
    `keep` thumbnail pairs, whatever the scene's length."""

    def __init__(self, width: int = 320, keep: int = 16, quality: int = 85):
        self.width, self.keep, self.quality = width, keep, quality
        self._done: dict[int, SceneThumb] = {}
        self._scene: int | None = None
        self._count = 0
        self._stride = 1
        self._samples: list[tuple[int, np.ndarray, np.ndarray]] = []

    def add(self, scene: int, src: np.ndarray, out: np.ndarray) -> None:
        """src, out: (H, W, 3) uint8 RGB, one frame of `scene` before and after cinefx."""
        if scene != self._scene:
            self._close()
            self._scene, self._count, self._stride, self._samples = scene, 0, 1, []
        if self._count % self._stride == 0:
            self._samples.append((self._count, self._small(src), self._small(out)))
            if len(self._samples) > self.keep:
                self._samples = self._samples[::2]
                self._stride *= 2
        self._count += 1

    def finish(self) -> dict[int, SceneThumb]:
        """scene index → its thumbnails, for every scene seen."""
        self._close()
        self._scene = None
        return dict(self._done)

    def _small(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        if w <= self.width:
            return frame.copy()
        return cv2.resize(frame, (self.width, max(1, round(h * self.width / w))), interpolation=cv2.INTER_AREA)

    def _jpeg(self, rgb: np.ndarray) -> bytes:
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, self.quality])[1].tobytes()

    def _close(self) -> None:
        if self._scene is None or not self._samples:
            return
        offset, src, out = min(self._samples, key=lambda s: abs(s[0] - (self._count - 1) / 2))
        self._done[self._scene] = SceneThumb(self._jpeg(src), self._jpeg(out), offset)
        self._samples = []


def _uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _num(v: float | None, digits: int = 2, signed: bool = False, none: str = "–") -> str:
    if v is None or not math.isfinite(v):
        return none
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _cells(*values: object) -> str:
    return "".join(f"<td class=\"n\">{v}</td>" for v in values)


def _figures(i: Measure, o: Measure) -> str:
    """PSNR in, out, Δ and T-SSIM in, out, Δ as table cells (∞: every pair identical)."""
    return _cells(_num(i.psnr, none="∞"), _num(o.psnr, none="∞"), _num(_sub(o.psnr, i.psnr), signed=True),
                  _num(i.tssim, 3), _num(o.tssim, 3), _num(_sub(o.tssim, i.tssim), 3, signed=True))


_STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
h1 { font-size: 1.3rem; margin: 0 0 .3rem; } .meta, .note { color: #666; }
table { border-collapse: collapse; margin: 1rem 0; } td, th { padding: .3rem .5rem; border-bottom: 1px solid #ddd; }
th { text-align: left; background: #eee; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
td img { display: block; width: 200px; height: auto; background: #000; }
tr.all td { font-weight: bold; } img.plot { max-width: 100%; height: auto; }
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><link rel=\"icon\" href=\"data:,\"><style>{_STYLE}</style>"
            f"</head>\n<body>\n{body}\n</body></html>\n")


def _plot_png(report: Report) -> bytes:
    with tempfile.TemporaryDirectory(prefix="cinefx-plot-") as d:
        return write_plot(report, Path(d) / "plot.png").read_bytes()


def write_html_report(report: Report, thumbs: Mapping[int, SceneThumb], path: str | os.PathLike,
                      plot: bool = True) -> Path:
    """Write `report` as one self-contained page: a row per scene with its input and output
    thumbnails (from `SceneThumbs.finish()`; a scene without one says so) and its adjacent-frame
    PSNR and T-SSIM, input vs output; the overall row; the per-frame plot unless `plot` is False."""
    e = html.escape
    name = Path(report.output).name
    rows = []
    for s in report.scenes:
        n, t = s.index + 1, thumbs.get(s.index)
        pics = (f"<td><img alt=\"scene {n} input\" src=\"{_uri(t.input, 'image/jpeg')}\"></td>"
                f"<td><img alt=\"scene {n} output\" src=\"{_uri(t.output, 'image/jpeg')}\"></td>"
                if t else "<td colspan=\"2\" class=\"note\">no thumbnail</td>")
        rows.append(f"<tr class=\"scene\" data-scene=\"{n}\">{_cells(n)}<td>{e(s.kind)}</td>"
                    f"<td>{s.start_time:.2f}–{s.end_time:.2f} s</td>{_cells(s.end_frame - s.start_frame)}{pics}"
                    f"{_figures(s.input, s.output)}</tr>")
    frames = sum(s.end_frame - s.start_frame for s in report.scenes)
    rows.append(f"<tr class=\"all\"><td>all</td><td></td><td></td>{_cells(frames)}<td colspan=\"2\"></td>"
                f"{_figures(report.overall_input, report.overall_output)}</tr>")
    notes = ["adjacent-frame PSNR (dB) and T-SSIM within scenes; Δ = output − input, ≈ 0 is ideal"]
    if report.grain:
        notes.append(report.grain_note)
    if report.concealed_frames:
        notes.append(f"{report.concealed_frames} input frame(s) could not be decoded and were replaced by "
                     "the previous one")
    plot_html = (f"<h2>Per frame</h2><img class=\"plot\" alt=\"per-frame PSNR and T-SSIM\" "
                 f"src=\"{_uri(_plot_png(report), 'image/png')}\">" if plot and report.per_pair else "")
    body = (f"<h1>{e(name)}</h1>\n<p class=\"meta\">{e(report.input)} → {e(report.output)} · "
            f"engine {e(report.engine)} · preset {e(report.preset)} · {len(report.scenes)} scene(s)</p>\n"
            "<table><thead><tr><th>scene</th><th>kind</th><th>time</th><th>frames</th><th>input</th><th>output</th>"
            "<th>PSNR in</th><th>PSNR out</th><th>Δ</th><th>T-SSIM in</th><th>T-SSIM out</th><th>Δ</th>"
            "</tr></thead>\n"
            f"<tbody>\n{chr(10).join(rows)}\n</tbody></table>\n"
            + "".join(f"<p class=\"note\">{e(n)}</p>\n" for n in notes) + plot_html)
    return write_text(path, _page(f"{name}: cinefx report", body))


@dataclass(frozen=True)
class IndexItem:
    input: str  # the source, as the batch named it
    page: Path | None = None  # its report page; None when the input has none (failed, skipped)
    report: Report | None = None  # for the overall figures on the index
    thumb: SceneThumb | None = None  # shown beside the link (e.g. its first scene's)
    status: str = ""  # "failed: …", "skipped: …"; empty when done


def write_html_index(items: Sequence[IndexItem], path: str | os.PathLike) -> Path:
    """Write the batch index: one row per input, linking its report page (relative to the index,
    so the folder can move) with its overall ΔPSNR and ΔT-SSIM, or saying why it has none."""
    e, path = html.escape, Path(path)
    rows = []
    for it in items:
        link = e(Path(it.input).name)
        if it.page is not None:
            href = Path(os.path.relpath(Path(it.page).resolve(), path.resolve().parent)).as_posix()
            link = f"<a href=\"{e(href)}\">{link}</a>"
        pic = f"<img alt=\"\" src=\"{_uri(it.thumb.output, 'image/jpeg')}\">" if it.thumb else ""
        r = it.report
        figures = _cells(_num(_sub(r.overall_output.psnr, r.overall_input.psnr), signed=True),
                         _num(_sub(r.overall_output.tssim, r.overall_input.tssim), 3, signed=True),
                         len(r.scenes)) if r else "<td></td>" * 3
        rows.append(f"<tr class=\"item\"><td>{pic}</td><td>{link}</td>{figures}<td>{e(it.status)}</td></tr>")
    body = (f"<h1>cinefx batch: {len(items)} input(s)</h1>\n"
            "<table><thead><tr><th></th><th>input</th><th>ΔPSNR (dB)</th><th>ΔT-SSIM</th><th>scenes</th>"
            f"<th></th></tr></thead>\n<tbody>\n{chr(10).join(rows)}\n</tbody></table>\n"
            "<p class=\"note\">Δ = output − input of adjacent-frame PSNR and T-SSIM within scenes; "
            "≈ 0 is ideal</p>")
    return write_text(path, _page("cinefx batch report", body))
