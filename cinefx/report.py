"""The temporal-consistency report: a frozen summary, a rich table, JSON and a per-frame plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from cinefx.fsutil import atomic_path, write_text
from cinefx.metrics import Series, TemporalMeter
from cinefx.scenes import Scene


@dataclass(frozen=True)
class Measure:
    psnr: float | None  # mean adjacent-frame PSNR in dB over non-identical pairs; None if all identical
    tssim: float | None
    identical_pairs: int


@dataclass(frozen=True)
class SceneReport:
    index: int
    kind: str
    start_frame: int
    end_frame: int  # exclusive
    start_time: float
    end_time: float
    pairs: int
    input: Measure
    output: Measure
    warp_input: float | None = None  # flow warping error (Lai et al. 2018), when measured
    warp_output: float | None = None

    @property
    def delta_psnr(self) -> float | None:
        return _sub(self.output.psnr, self.input.psnr)

    @property
    def delta_tssim(self) -> float | None:
        return _sub(self.output.tssim, self.input.tssim)

    @property
    def delta_warp(self) -> float | None:
        return _sub(self.warp_output, self.warp_input)


@dataclass(frozen=True)
class Report:
    input: str
    output: str
    engine: str
    preset: str
    metric_size: tuple[int, int] | None
    scenes: tuple[SceneReport, ...]
    overall_input: Measure
    overall_output: Measure
    per_pair: tuple[tuple[int, float, float, float, float], ...]  # (frame, in psnr, out psnr, in ssim, out ssim)
    grain: float = 0.0  # the grade's film grain strength: new noise every frame, so it lowers output PSNR
    concealed_frames: int = 0  # input frames that could not be decoded, replaced by the previous one
    warp_input: float | None = None  # overall flow warping error; None when not measured (--warp-error)
    warp_output: float | None = None
    prompt: str = ""  # the diffusion prompt (what `cinefx eval` scores CLIP-T against)

    @property
    def warped(self) -> bool:
        return self.warp_input is not None

    @property
    def grain_note(self) -> str:
        if not self.grain:
            return ""
        return (f"the output's film grain (strength {self.grain:g}) is new in every frame, as on film, and "
                "lowers its PSNR and raises its warp error by design; --grain 0 measures the render without it")

    def to_json(self) -> dict:
        d = asdict(self)
        for s, sr in zip(d["scenes"], self.scenes):
            s["delta_psnr"], s["delta_tssim"], s["delta_warp"] = sr.delta_psnr, sr.delta_tssim, sr.delta_warp
        d["delta_warp"] = _sub(self.warp_output, self.warp_input)
        d["per_pair"] = [[f, _finite(a), _finite(b), c, e] for f, a, b, c, e in self.per_pair]
        d["notes"] = ("PSNR in dB over adjacent frames within a scene, identical pairs excluded and "
                      "counted; T-SSIM: Gaussian-window SSIM (sigma 1.5, data_range 255) of adjacent frames; "
                      "warp: flow warping error (Lai et al. 2018) along the input's DIS flow, intensities in [0, 1], "
                      "occluded pixels excluded; lower is better, null when not measured"
                      + (f"; {self.grain_note}" if self.grain else ""))
        return d

    def write_json(self, path: str | Path) -> Path:
        return write_text(path, json.dumps(self.to_json(), indent=2, allow_nan=False))


def _sub(a, b):
    return None if a is None or b is None else a - b


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _measure(series: list[Series]) -> Measure:
    psnrs = [v for s in series for v in s.psnr if math.isfinite(v)]
    ssims = [v for s in series for v in s.tssim]
    return Measure(psnr=sum(psnrs) / len(psnrs) if psnrs else None,
                   tssim=sum(ssims) / len(ssims) if ssims else None,
                   identical_pairs=sum(s.identical for s in series))


def build_report(meter: TemporalMeter, scenes: list[Scene], times: list[float], end_time: float,
                 input: str, output: str, engine: str, preset: str, grain: float = 0.0,
                 concealed_frames: int = 0, warp=None, prompt: str = "") -> Report:
    """times[i]: display time of frame i in seconds; end_time: when the last frame ends; `warp`:
    a finished `cinefx.eval.warp.WarpMeter` fed the same frames, or None."""
    rows, per_pair = [], []
    warps = warp.scenes() if warp is not None else {}
    for sc in scenes:
        si, so = meter.series.get(sc.index, (Series(), Series()))
        w = warps.get(sc.index)
        rows.append(SceneReport(
            index=sc.index, kind=sc.kind, start_frame=sc.start, end_frame=sc.end,
            start_time=times[sc.start], end_time=times[sc.end] if sc.end < len(times) else end_time,
            pairs=len(si.psnr), input=_measure([si]), output=_measure([so]),
            warp_input=w.source if w else None, warp_output=w.output if w else None))
        for k in range(len(si.psnr)):
            per_pair.append((sc.start + k + 1, si.psnr[k], so.psnr[k], si.tssim[k], so.tssim[k]))
    overall = warp.overall([s.index for s in scenes]) if warp is not None else None
    all_in = [meter.series[s.index][0] for s in scenes if s.index in meter.series]
    all_out = [meter.series[s.index][1] for s in scenes if s.index in meter.series]
    return Report(input=input, output=output, engine=engine, preset=preset, metric_size=meter.size,
                  scenes=tuple(rows), overall_input=_measure(all_in), overall_output=_measure(all_out),
                  per_pair=tuple(per_pair), grain=grain, concealed_frames=concealed_frames,
                  warp_input=overall.source if overall else None, warp_output=overall.output if overall else None,
                  prompt=prompt)


def _fmt(v: float | None, digits: int = 2, signed: bool = False) -> str:
    if v is None:
        return "∞" if not signed else "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def render_table(report: Report):
    """A rich Table: per scene and overall, input vs output and their difference."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"Temporal consistency — {Path(report.output).name} ({report.engine}, {report.preset})"),
              caption=("adjacent-frame PSNR (dB) and T-SSIM within scenes"
                       + ("; warp: flow warping error ×1000, lower is better" if report.warped else "")
                       + "; Δ = output − input, ≈ 0 is ideal"
                       + (f"\n{escape(report.grain_note)}" if report.grain else "")))
    columns = (("scene", "right"), ("kind", "left"), ("time", "left"), ("frames", "right"),
               ("PSNR in", "right"), ("PSNR out", "right"), ("Δ", "right"),
               ("T-SSIM in", "right"), ("T-SSIM out", "right"), ("Δ", "right"))
    if report.warped:
        columns += (("warp in", "right"), ("warp out", "right"), ("Δ", "right"))
    for col, just in columns:
        t.add_column(col, justify=just)

    def warp_cells(a, b):
        if not report.warped:
            return ()
        cell = lambda v, sign="": "–" if v is None else f"{v * 1000:{sign}.2f}"  # noqa: E731
        return cell(a), cell(b), cell(_sub(b, a), "+")

    for s in report.scenes:
        t.add_row(str(s.index + 1), s.kind, f"{s.start_time:6.2f}–{s.end_time:.2f}s",
                  str(s.end_frame - s.start_frame), _fmt(s.input.psnr), _fmt(s.output.psnr),
                  _fmt(s.delta_psnr, signed=True), _fmt(s.input.tssim, 3), _fmt(s.output.tssim, 3),
                  _fmt(s.delta_tssim, 3, signed=True), *warp_cells(s.warp_input, s.warp_output))
    i, o = report.overall_input, report.overall_output
    t.add_row("all", "", "", str(sum(s.end_frame - s.start_frame for s in report.scenes)),
              _fmt(i.psnr), _fmt(o.psnr), _fmt(_sub(o.psnr, i.psnr), signed=True),
              _fmt(i.tssim, 3), _fmt(o.tssim, 3), _fmt(_sub(o.tssim, i.tssim), 3, signed=True),
              *warp_cells(report.warp_input, report.warp_output), style="bold")
    return t


def write_plot(report: Report, path: str | Path) -> Path:
    """Per-frame PSNR and T-SSIM of input and output, with scene boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    frames = [p[0] for p in report.per_pair]
    cap = lambda v: v if math.isfinite(v) else float("nan")  # noqa: E731
    ax1.plot(frames, [cap(p[1]) for p in report.per_pair], ".", ms=3, label="input")
    ax1.plot(frames, [cap(p[2]) for p in report.per_pair], ".", ms=3, label="output")
    ax2.plot(frames, [p[3] for p in report.per_pair], ".", ms=3, label="input")
    ax2.plot(frames, [p[4] for p in report.per_pair], ".", ms=3, label="output")
    for s in report.scenes[1:]:
        for ax in (ax1, ax2):
            ax.axvline(s.start_frame, color="grey", lw=0.8, ls="--")
    ax1.set_ylabel("adjacent PSNR (dB)")
    ax2.set_ylabel("T-SSIM")
    ax2.set_xlabel("frame")
    ax1.legend(loc="lower right")
    ax1.set_title(f"{Path(report.output).name}: temporal consistency per frame (dashed: scene boundaries)")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)  # the temporary keeps the suffix, which picks the format
    finally:
        plt.close(fig)
    return path
