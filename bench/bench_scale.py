"""What --cluster ray costs and gives, on this machine.

    .venv/bin/python bench/bench_scale.py [--model DIR] [--frames 24] [--steps 2] [--sections 123]

Without --model, the tiny random-weight bundle (written to a temporary folder) stands in, on the CPU.
1. Overhead: `stylize_file` against `stylize_on_ray` with one worker on the same clip (three
   scenes); goal: Ray's time ≤ 1.10× the local time. Ray itself is started beforehand.
2. Scale: two inputs rendered by two plain cinefx processes side by side, against `stylize_on_ray`
   with two workers on the same two inputs; goal: Ray's throughput ≥ 0.9× theirs.
3. Pieces: one long take (a slow push-in, no cut; `--take` frames in pieces of `--part`, at
   `--take-steps`) by `stylize_on_ray` with one worker and with two; goal: a speed-up well above 1,
   ideally n / (1 + (n - 1) / 2) for n pieces, the first rendering alone and the others side by
   side. Also the time from the first piece's end to the last's, which worker rendered which
   piece, and the machine's idle CPU share during each Ray run (others' work on shared cores). The
   two outputs and a local process's must be the same bytes (the bench fails otherwise).
Each worker and each process uses one torch thread.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from cinefx.testing.clips import Move, cut, render_move, write_clip  # noqa: E402

ONE = """
import sys, torch
torch.set_num_threads(1)
from cinefx.diffusion.models import ModelSpec
from cinefx.presets import load_preset, override
from cinefx.stylize import StylizeOptions, stylize_file
p = override(load_preset("epic"), "diffusion", steps={steps}, chunk=4, part={part!r})
stylize_file(sys.argv[1], sys.argv[2], p, StylizeOptions(engine="diffusion", models=ModelSpec(base={model!r}),
             metrics=False, overwrite=True))
"""


def cpu_ticks() -> tuple[int, int] | None:
    """(idle, total) CPU ticks of the whole machine since boot (Linux), or None."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    return ticks[3] + ticks[4], sum(ticks)


def idle_share(a, b) -> str:
    """The machine's idle CPU share between two `cpu_ticks()`: on shared cores, what another
    worker could have had."""
    return f"{(b[0] - a[0]) / max(1, b[1] - a[1]):.0%}" if a and b else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="base model folder (default: the tiny bundle)")
    ap.add_argument("--frames", type=int, default=24, help="frames per scene (three scenes per clip)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, nargs=2, default=(96, 64))
    ap.add_argument("--sections", default="123", help="which comparisons to run, e.g. 3")
    ap.add_argument("--take", type=int, default=144, help="frames of the long take (3.)")
    ap.add_argument("--part", type=int, default=48, help="the preset's [diffusion] part for the long take (3.)")
    # more than --steps: on the tiny bundle a 48-frame piece renders in 2-3 s at 4 steps, less than a
    # worker takes to start and load its models, which would hide what the pieces buy
    ap.add_argument("--take-steps", type=int, default=16, help="denoising steps for the long take (3.)")
    args = ap.parse_args()

    import ray
    import torch

    from cinefx import cluster
    from cinefx.diffusion.models import ModelSpec
    from cinefx.presets import load_preset, override
    from cinefx.renderers import part_frames
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
    script = ONE.format(steps=args.steps, model=model, part=None)
    ray.init(num_cpus=os.cpu_count(), num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    if "1" in args.sections:
        (tmp / "o").mkdir()
        local = timed(lambda: subprocess.run([sys.executable, "-c", script, clips[0], tmp / "local.mp4"], check=True))
        one = timed(lambda: cluster.stylize_on_ray(clips[:1], [tmp / "o" / "one.mp4"], preset, opts, workers=1))
        print(f"1. one clip, {3 * n} frames: local process {local:.1f} s, Ray one worker {one:.1f} s: "
              f"ratio {one / local:.2f} (goal <= 1.10)")

    def side_by_side():
        procs = [subprocess.Popen([sys.executable, "-c", script, c, tmp / f"p{k}.mp4"]) for k, c in enumerate(clips)]
        assert all(p.wait() == 0 for p in procs)

    if "2" in args.sections:
        (tmp / "o2").mkdir()
        two_procs = timed(side_by_side)
        two_ray = timed(lambda: cluster.stylize_on_ray(clips, tmp / "o2", preset, opts, workers=2))
        print(f"2. two clips, {6 * n} frames: two processes {two_procs:.1f} s, Ray two workers {two_ray:.1f} s: "
              f"throughput ratio {two_procs / two_ray:.2f} (goal >= 0.90)")

    same = True
    if "3" in args.sections:
        piece = part_frames(args.part, 4)  # the cluster pins the batch at the chunk
        sizes = [min(piece, args.take - k) for k in range(0, args.take, piece)]
        src = write_clip(tmp / "take.mp4", render_move(Move("coffee", args.take, (0.5, 0.5, 1.0), (0.55, 0.45, 0.5)),
                                                       tuple(args.size)), fps=24, audio="aac")
        take = override(preset, "diffusion", steps=args.take_steps, part=args.part)
        # one file name in three folders: the outputs are compared byte for byte
        outs = {k: tmp / k / "take.mp4" for k in ("local", "ray1", "ray2")}
        for out in outs.values():
            out.parent.mkdir()
        local = timed(lambda: subprocess.run([sys.executable, "-c", ONE.format(steps=args.take_steps, model=model,
                                                                                part=args.part), src, outs["local"]],
                                             check=True))
        log, items = {1: [], 2: []}, {}  # workers → [(when, SceneDone)]

        def on_ray(w):
            items[w] = cluster.stylize_on_ray([src], [outs[f"ray{w}"]], take, opts, workers=w,
                                              on_scene=lambda d: log[w].append((time.perf_counter(), d)))

        secs, idle = {}, {}
        for w in (1, 2):
            before = cpu_ticks()
            secs[w] = timed(lambda: on_ray(w))
            idle[w] = idle_share(before, cpu_ticks())
        scenes = len(items[2][0].result.scenes)
        if scenes != 1:
            raise SystemExit(f"3. the take was cut into {scenes} scenes; pick another --take")
        # the first piece alone, then the others handed in order to the less busy of the two workers
        loads = [0, 0]
        for f in sizes[1:]:
            loads[loads.index(min(loads))] += f
        k = len(sizes)
        ideal, whole = k / (1 + (k - 1) / 2), args.take / (sizes[0] + max(loads))
        print(f"3. one take, {args.take} frames in {k} pieces of {piece}, {args.take_steps} steps: local process "
              f"{local:.1f} s, Ray one worker {secs[1]:.1f} s, two workers {secs[2]:.1f} s: speed-up "
              f"{secs[1] / secs[2]:.2f} (goal well above 1; ideal {ideal:.2f} = {k} / (1 + {k - 1}/2)"
              f"{f', {whole:.2f} in whole pieces' if abs(whole - ideal) > 0.005 else ''})")
        after = {w: log[w][-1][0] - next(t for t, d in log[w] if d.part == 0) for w in (1, 2)}
        names = {pid: "AB"[i] for i, pid in enumerate(dict.fromkeys(d.pid for _, d in log[2]))}
        pieces = ", ".join(f"{d.part + 1} {names[d.pid]} {d.seconds:.1f}" for _, d in log[2])
        print(f"   after the first piece: one worker {after[1]:.1f} s, two workers {after[2]:.1f} s; "
              f"two workers' pieces (worker, own seconds): {pieces}; machine idle {idle[1]} / {idle[2]}")
        digests = {name: hashlib.sha256(out.read_bytes()).hexdigest() for name, out in outs.items()}
        same = len(set(digests.values())) == 1
        print(f"   bytes: Ray one worker, Ray two workers and the local process "
              f"{'identical' if same else 'DIFFER: ' + ', '.join(f'{k} {d[:12]}' for k, d in digests.items())}")
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
