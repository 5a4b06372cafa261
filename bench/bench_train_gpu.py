"""LoRA training speed on a GPU: steps/s of `cinefx train-preset` at 512² on SD1.5-shaped models.

The models are built from the published SD1.5 configs with random weights (no download), saved as
a diffusers folder and trained through the same `train()` users run, on 20 real photographs from
scikit-image. Steps after a warm-up are timed; with and without gradient checkpointing. Each row is
appended to train_rows.jsonl under --out ($OUT when set) as soon as it is measured.

    python bench/bench_train_gpu.py --out $OUT         # 512², batch 1, rank 16
    python bench/bench_train_gpu.py --tiny --device cpu --steps 6 --resolution 64   # smoke test anywhere
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", help="folder for train_rows.jsonl (default: $OUT, else none)")
    args = ap.parse_args()
    out = args.out or os.environ.get("OUT")

    from bench_diffusion_gpu import sd15_components

    from cinefx.testing.clips import PHOTOS, photo
    from cinefx.train.data import scan_dataset
    from cinefx.train.loop import TrainConfig, train

    tmp = Path(tempfile.mkdtemp(prefix="cinefx-train-bench-"))
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    comps = sd15_components(args.device, dtype, args.tiny)
    model = tmp / "model"
    comps.host.save_pretrained(model, safe_serialization=True)
    stills = tmp / "stills"
    stills.mkdir()
    for i in range(20):
        img = photo(PHOTOS[i % len(PHOTOS)])
        side = min(img.shape[:2]) * (10 - i // len(PHOTOS)) // 10  # a different square crop each round
        y0, x0 = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
        crop = img[y0:y0 + side, x0:x0 + side]
        cv2.imwrite(str(stills / f"{i:02d}.png"), cv2.resize(crop, (args.resolution, args.resolution))[..., ::-1])
    data = scan_dataset(stills, "<bench>", min_side=min(256, args.resolution))
    print(f"# {time.strftime('%Y-%m-%d')} device={torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'} "
          f"dtype={dtype} resolution={args.resolution} batch={args.batch} rank=16 "
          f"models={'tiny' if args.tiny else 'SD1.5-shaped random'} torch={torch.__version__}")
    base = TrainConfig(model=str(model), trigger="<bench>", steps=args.warmup + args.steps, batch=args.batch,
                       resolution=args.resolution, precision="auto" if args.device == "cuda" else "fp32")
    for checkpointing in (False, True):
        cfg = dataclasses.replace(base, gradient_checkpointing=checkpointing)
        stamps = []

        def tick(done, total, loss):
            if args.device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train(cfg, data, tmp / f"work{checkpointing}", progress=tick)
        timed = stamps[args.warmup:]
        rate = (len(timed) - 1) / (timed[-1] - timed[0])
        gib = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
        mem = f", peak {gib:.1f} GiB" if gib is not None else ""
        print(f"LoRA step, gradient checkpointing {'on ' if checkpointing else 'off'}: {rate:.2f} steps/s "
              f"({1000 / rate:.0f} ms/step){mem}", flush=True)
        if out:
            row = dict(gradient_checkpointing=checkpointing, steps_per_s=rate, resolution=args.resolution,
                       batch=args.batch, rank=cfg.rank, peak_mem_gib=gib, tiny=args.tiny)
            Path(out).mkdir(parents=True, exist_ok=True)
            with open(Path(out) / "train_rows.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
