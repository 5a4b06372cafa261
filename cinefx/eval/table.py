"""Evaluation results as JSON, CSV and a rich table (the CLI prints the table; nothing here prints).

JSON (`to_json`): the source, the models used (role → id), `every`, the metric size, the notes, the
scenes, and for each render its path, prompt, overall figures under the stable keys of
`cinefx.eval.measures.KEYS` (+ `warp_error_delta`, `pairs`, `frames`) and one row per scene with the
same keys. CSV: one row per render and scene, plus an `all` row per render. Stills: the same three
forms of `evaluate_stills`' result.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from cinefx.eval.measures import KEYS, Evaluation, Figures, StillsEvaluation
from cinefx.fsutil import write_text

NOTE = ("warp error: mean squared intensity difference (0-1 scale) between frame t and frame t+1 warped "
        "back along the source's DIS flow, occluded pixels excluded (Lai et al. 2018), lower is better; "
        "PSNR/T-SSIM delta: render minus source adjacent-frame figures; clip_consistency: mean CLIP cosine of "
        "adjacent frames; content_similarity: cosine of MiniLM embeddings of ViT-GPT2 captions of source and "
        "render frame t; dino: cosine of DINO ViT-S/16 embeddings of source and render frame t; clip_t: CLIP "
        "cosine of render frame t and the prompt")


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def to_json(ev: Evaluation) -> dict:
    scenes = [{"scene": s.index, "kind": s.kind, "start_frame": s.start, "end_frame": s.end,
               "start_time": round(t, 6)} for s, t in zip(ev.scenes, ev.times)]
    renders = []
    for r in ev.renders:
        rows = [{"scene": s.index, **{k: _clean(v) for k, v in f.as_dict().items()}}
                for s, f in zip(ev.scenes, r.scenes)]
        renders.append({"path": str(r.path), "prompt": r.prompt,
                        **{k: _clean(v) for k, v in r.overall.as_dict().items()}, "scenes": rows})
    return {"source": str(ev.source), "frames": ev.frames, "every": ev.every,
            "metric_size": list(ev.metric_size), "models": dict(ev.models), "scenes": scenes,
            "renders": renders, "notes": list(ev.notes), "measures": NOTE}


def write_json(ev: Evaluation, path: str | Path) -> Path:
    return write_text(path, json.dumps(to_json(ev), indent=2, allow_nan=False) + "\n")


COLUMNS = ("render", "scene", "kind", "start_frame", "end_frame", "pairs", "frames", *KEYS, "warp_error_delta")


def to_csv(ev: Evaluation) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(COLUMNS)

    def row(render, scene, kind, start, end, f: Figures):
        d = f.as_dict()
        w.writerow([render, scene, kind, start, end, d["pairs"], d["frames"],
                    *("" if _clean(d[k]) is None else f"{d[k]:.6g}" for k in (*KEYS, "warp_error_delta"))])

    for r in ev.renders:
        for s, f in zip(ev.scenes, r.scenes):
            row(r.path, s.index, s.kind, s.start, s.end, f)
        row(r.path, "all", "", 0, ev.frames, r.overall)
    return out.getvalue()


def write_csv(ev: Evaluation, path: str | Path) -> Path:
    return write_text(path, to_csv(ev))


def _fmt(v: float | None, digits: int = 3, signed: bool = False, scale: float = 1.0) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v * scale:+.{digits}f}" if signed else f"{v * scale:.{digits}f}"


def render_table(ev: Evaluation):
    """A rich Table: per render, per scene and overall."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"{ev.source.name}: {len(ev.renders)} render(s), {len(ev.scenes)} scene(s)"
                           + (f", every {ev.every}th pair" if ev.every > 1 else "")),
              caption=escape("warp error ×1000 (render, Δ vs source; lower is better) · PSNR Δ dB · T-SSIM Δ · "
                             "CLIP consistency · content similarity · DINO · CLIP-T"
                             + "".join(f"\n{n}" for n in ev.notes)))
    for col in ("render", "scene", "warp ×1e3", "Δ", "PSNR Δ", "T-SSIM Δ", "CLIP cons.", "content", "DINO",
                "CLIP-T"):
        t.add_column(col, justify="left" if col == "render" else "right")

    def add(name, scene, f: Figures, **style):
        t.add_row(name, scene, _fmt(f.warp_error, 2, scale=1e3), _fmt(f.warp_error_delta, 2, True, 1e3),
                  _fmt(f.psnr_delta, 2, True), _fmt(f.tssim_delta, 3, True), _fmt(f.clip_consistency),
                  _fmt(f.content_similarity), _fmt(f.dino), _fmt(f.clip_t), **style)

    for r in ev.renders:
        for s, f in zip(ev.scenes, r.scenes):
            add(escape(r.path.name) if s.index == 0 else "", str(s.index + 1), f)
        add("", "all", r.overall, style="bold", end_section=True)
    return t


# -- stills ------------------------------------------------------------------------------------

def stills_to_json(ev: StillsEvaluation) -> dict:
    return {"generated": str(ev.generated), "reference": str(ev.reference) if ev.reference else None,
            "models": dict(ev.models), "clip_t": ev.clip_t, "dino": ev.dino,
            "images": [{"path": str(s.path), "prompt": s.prompt, "clip_t": s.clip_t, "dino": s.dino}
                       for s in ev.images], "notes": list(ev.notes)}


def write_stills_json(ev: StillsEvaluation, path: str | Path) -> Path:
    return write_text(path, json.dumps(stills_to_json(ev), indent=2, allow_nan=False) + "\n")


def render_stills_table(ev: StillsEvaluation):
    """A rich Table: CLIP-T and DINO per image, and their means."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"{ev.generated.name}: {len(ev.images)} image(s)"
                           + (f" against {ev.reference.name}" if ev.reference else "")),
              caption=escape("CLIP-T: CLIP cosine of image and prompt · DINO: mean DINO cosine to the reference images"
                             + "".join(f"\n{n}" for n in ev.notes)))
    for col in ("image", "CLIP-T", "DINO", "prompt"):
        t.add_column(col, justify="right" if col in ("CLIP-T", "DINO") else "left")
    for s in ev.images:
        t.add_row(escape(s.path.name), _fmt(s.clip_t), _fmt(s.dino), escape((s.prompt or "")[:60]))
    t.add_row("all", _fmt(ev.clip_t), _fmt(ev.dino), "", style="bold")
    return t


def write_stills_csv(ev: StillsEvaluation, path: str | Path) -> Path:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(("image", "clip_t", "dino", "prompt"))
    for s in ev.images:
        w.writerow((s.path.name, "" if s.clip_t is None else f"{s.clip_t:.6g}",
                    "" if s.dino is None else f"{s.dino:.6g}", s.prompt or ""))
    w.writerow(("all", "" if ev.clip_t is None else f"{ev.clip_t:.6g}", "" if ev.dino is None else f"{ev.dino:.6g}", ""))
    return write_text(path, out.getvalue())
