"""What warp error costs, alone and inside a grade-engine run.

    .venv/bin/python bench/bench_warp.py [--seconds 5]

1. `WarpMeter` per 720p frame pair: shrink to the report's analysis width (512), forward and
   backward DIS flow (MEDIUM), the occlusion check and one warp — frames decoded beforehand.
2. `stylize_file` (grade engine, epic preset, metrics on) on a 720p clip from
   `cinefx.testing.clips`, then the warp meter alone over the same input and output frames:
   (grade + warp) / grade is the ratio if it ran in line.
3. The same run with `--warp-error` (a warp meter on its own thread beside the report's): the
   ratio as users see it.
Recommendation: off by default behind --warp-error if it costs the grade engine more than 10 %.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cinefx.testing.clips import Move, render_move, write_clip  # noqa: E402


def clip(path, seconds, size=(1280, 720), fps=24):
    moves = [Move(p, fps * 2, (0.4, 0.45, 0.95), (0.6, 0.5, 0.7)) for p in ("astronaut", "coffee", "chelsea", "rocket")]
    frames = (f for _ in range(seconds) for m in moves for f in render_move(m, size))
    n = seconds * fps
    return write_clip(path, (f for f, _ in zip(frames, range(n))), fps=fps, audio="aac",
                      options={"crf": "23", "preset": "veryfast"})


def decode(path):
    from cinefx.video.probe import probe
    from cinefx.video.reader import read_frames

    return [f.rgb for f in read_frames(probe(path))]


def grade(src, dst, warp_error=False):
    from cinefx.presets import load_preset
    from cinefx.stylize import StylizeOptions, stylize_file

    t = time.perf_counter()
    res = stylize_file(src, dst, load_preset("epic"),
                       StylizeOptions(engine="grade", overwrite=True, metrics=True, warp_error=warp_error))
    return time.perf_counter() - t, res


def warp_alone(inputs, outputs, scenes):
    from cinefx.eval.warp import WarpMeter

    meter = WarpMeter()
    t = time.perf_counter()
    for i, (a, b) in enumerate(zip(inputs, outputs)):
        meter.add(scenes(i), a, b)
    meter.finish()
    return time.perf_counter() - t, meter.overall()


def grade_with_warp(src, dst):
    """The grade run with `--warp-error`: a background WarpMeter beside the report's."""
    return grade(src, dst, warp_error=True)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5, help="length of the 720p test clip")
    ap.add_argument("--runs", type=int, default=2, help="best of this many runs per figure")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cinefx-bench-warp-"))
    src = clip(tmp / "hd720.mp4", args.seconds)
    print(f"# cinefx warp-error bench — {time.strftime('%Y-%m-%d')} — {os.cpu_count()} cores, "
          f"720p, {args.seconds * 24} frames")
    runs = [grade(src, tmp / "graded.mp4") for _ in range(args.runs)]
    g = min(t for t, _ in runs)
    scenes = runs[0][1].scenes
    starts = [s.start for s in scenes]

    def scene_of(i):
        return sum(1 for s in starts if s <= i) - 1

    inputs, outputs = decode(src), decode(tmp / "graded.mp4")
    w, overall = min((warp_alone(inputs, outputs, scene_of) for _ in range(args.runs)), key=lambda r: r[0])
    n = len(inputs)
    print(f"\n## 1. warp meter alone: {1000 * w / n:.1f} ms per 720p frame ({n} frames, {len(scenes)} scenes; "
          f"input {overall.source:.5f}, graded {overall.output:.5f}, kept {overall.kept:.1%} of pixels)")
    print(f"\n## 2. grade engine (epic, metrics on): {g:.2f}s | + warp in line {g + w:.2f}s → ratio {(g + w) / g:.2f}")
    gw = min(grade_with_warp(src, tmp / "graded.mp4") for _ in range(args.runs))
    print(f"\n## 3. grade engine with a background warp meter: {gw:.2f}s → ratio {gw / g:.2f}")
    cost = gw / g - 1
    print(f"\nrecommendation: {'off by default, behind --warp-error' if cost > 0.10 else 'on by default'} "
          f"(it adds {cost:.0%} to a grade-engine run here)")


if __name__ == "__main__":
    main()
