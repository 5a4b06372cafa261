"""Colour management: what the baked LUT costs and how closely it follows OpenColorIO's exact
transform, per colour space, on real photographs made into camera footage.

    .venv/bin/python bench/bench_colour.py [--quick] [--size 65] [--spaces slog3,logc4,...]

For each alias of cinefx.grade.ocio (Rec.709 is the identity and costs nothing):
- bake: seconds to bake the size³ LUT from the exact transform (once per run; 0 where the
  conversion, display to display, runs exactly);
- 1080p frame: milliseconds of one core to convert a 1920x1080 frame through the LUT, 10-bit
  (uint16) and 8-bit input to 8-bit output, and 8-bit to 10-bit output (--output-colorspace);
  and through the exact transform, for comparison;
- LUT vs exact: 8-bit levels between the LUT's 16-bit output and the exact transform's, mean /
  99th percentile / max, on 10-bit footage made from photos by the exact inverse;
- round trip: mean 8-bit levels between the photos and what cinefx makes of that footage.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cinefx.grade import ocio  # noqa: E402
from cinefx.testing.clips import PHOTOS, photo  # noqa: E402


def cpu_ms(fn, repeat: int) -> float:
    """Best of `repeat` runs, in milliseconds of this process's CPU time (the machine is shared,
    so wall time says more about the neighbours than about the code)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best * 1000


def ten_bit(img: np.ndarray, space: str) -> np.ndarray:
    x = ocio.convert_exact(img.astype(np.float32) / 255, ocio.REC709, space)
    return np.rint(np.rint(np.clip(x, 0, 1) * 1023) * (65535 / 1023)).astype(np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two photos at half size, one timing run")
    ap.add_argument("--size", type=int, default=ocio.LUT_SIZE, help="LUT points a side")
    ap.add_argument("--spaces", default="", help="comma-separated aliases (default: all)")
    args = ap.parse_args()
    aliases = [a for a in (args.spaces.split(",") if args.spaces else ocio.ALIASES) if a != "rec709"]
    names = PHOTOS[:2] if args.quick else PHOTOS
    photos = [photo(n)[::2, ::2] if args.quick else photo(n) for n in names]
    repeat = 1 if args.quick else 3
    rng = np.random.default_rng(0)
    hd16 = rng.integers(0, 65536, (1080, 1920, 3), dtype=np.uint16)
    hd8 = (hd16 >> 8).astype(np.uint8)
    exact_rows = hd16[:108].astype(np.float32) / 65535  # a tenth of a frame: the exact path is slow

    print(f"LUT {args.size}³ tetrahedral; photos: {', '.join(names)}; CPU ms of one core per 1920x1080 frame")
    print(f"{'alias':14s} {'bake s':>7s} {'16→8 ms':>8s} {'8→8 ms':>7s} {'8→16 ms':>8s} {'exact ms':>9s}"
          f" {'LUT vs exact mean/p99/max':>27s} {'round trip':>11s}")
    for alias in aliases:
        space = ocio.resolve(alias)
        t = time.process_time()
        conv = ocio.Conversion(space, ocio.REC709, args.size)
        bake = time.process_time() - t
        back = ocio.Conversion(ocio.REC709, space, args.size)
        in16, in8 = cpu_ms(lambda: conv(hd16), repeat), cpu_ms(lambda: conv(hd8), repeat)
        out16 = cpu_ms(lambda: back(hd8, depth=16), repeat)
        exact = cpu_ms(lambda: ocio.convert_exact(exact_rows, space), 1) * 10
        errs, trips = [], []
        for img in photos:
            frame = ten_bit(img, space)
            truth = np.clip(ocio.convert_exact(frame.astype(np.float32) / 65535, space), 0, 1) * 255
            errs.append(np.abs(conv(frame, depth=16) / 257 - truth).ravel())
            trips.append(np.abs(conv(frame).astype(int) - img).mean())
        e = np.concatenate(errs)
        print(f"{alias:14s} {bake:7.2f} {in16:8.0f} {in8:7.0f} {out16:8.0f} {exact:9.0f}"
              f" {e.mean():9.2f} / {np.percentile(e, 99):4.2f} / {e.max():5.1f} {max(trips):11.2f}")


if __name__ == "__main__":
    main()
