"""What --cluster ray costs and gives, on this machine.

    .venv/bin/python bench/bench_scale.py [--model DIR] [--frames 24] [--steps 2]

Without --model, the tiny random-weight bundle (written to a temporary folder) stands in, on the CPU.
1. Overhead: `stylize_file` against `stylize_on_ray` with one worker on the same clip (three
   scenes); goal: Ray's time ≤ 1.10× the local time. Ray itself is started beforehand.
2. Scale: two inputs rendered by two plain cinefx processes side by side, against `stylize_on_ray`
   with two workers on the same two inputs; goal: Ray's throughput ≥ 0.9× theirs.
Each worker and each process uses one torch thread.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from cinefx.testing.clips import Move, cut, write_clip  # noqa: E402

ONE = """
import sys, torch
torch.set_num_threads(1)
from cinefx.diffusion.models import ModelSpec
from cinefx.presets import load_preset, override
from cinefx.stylize import StylizeOptions, stylize_file
p = override(load_preset("epic"), "diffusion", steps={steps}, chunk=4)
stylize_file(sys.argv[1], sys.argv[2], p, StylizeOptions(engine="diffusion", models=ModelSpec(base={model!r}),
             metrics=False, overwrite=True))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="base model folder (default: the tiny bundle)")
    ap.add_argument("--frames", type=int, default=24, help="frames per scene (three scenes per clip)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, nargs=2, default=(96, 64))
    args = ap.parse_args()

    import ray
    import torch

    from cinefx import cluster
    from cinefx.diffusion.models import ModelSpec
    from cinefx.presets import load_preset, override
    from cinefx.stylize import StylizeOptions

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="cinefx-bench-scale-"))
    model = args.model
    if model is None:
        from cinefx.testing.tiny import write_tiny_bundle

        model = str(write_tiny_bundle(tmp / "bundle"))
    n = args.frames
    clips = [write_clip(tmp / f"in{k}.mp4", cut(Move("astronaut", n), Move("coffee", n), Move("rocket", n),
                                                 size=tuple(args.size)), fps=24, audio="aac") for k in (1, 2)]
    preset = override(load_preset("epic"), "diffusion", steps=args.steps, chunk=4)
    opts = StylizeOptions(engine="diffusion", models=ModelSpec(base=model), metrics=False, overwrite=True)
    script = ONE.format(steps=args.steps, model=model)
    ray.init(num_cpus=os.cpu_count(), num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    (tmp / "o").mkdir()
    local = timed(lambda: subprocess.run([sys.executable, "-c", script, clips[0], tmp / "local.mp4"], check=True))
    one = timed(lambda: cluster.stylize_on_ray(clips[:1], [tmp / "o" / "one.mp4"], preset, opts, workers=1))
    print(f"1. one clip, {3 * n} frames: local process {local:.1f} s, Ray one worker {one:.1f} s: "
          f"ratio {one / local:.2f} (goal <= 1.10)")

    def side_by_side():
        procs = [subprocess.Popen([sys.executable, "-c", script, c, tmp / f"p{k}.mp4"]) for k, c in enumerate(clips)]
        assert all(p.wait() == 0 for p in procs)

    two_procs = timed(side_by_side)
    two_ray = timed(lambda: cluster.stylize_on_ray(clips, tmp / "o", preset, opts, workers=2))
    print(f"2. two clips, {6 * n} frames: two processes {two_procs:.1f} s, Ray two workers {two_ray:.1f} s: "
          f"throughput ratio {two_procs / two_ray:.2f} (goal >= 0.90)")
    ray.shutdown()


if __name__ == "__main__":
    main()
