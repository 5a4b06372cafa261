"""Generate the LUTs bundled with cinefx. Run from anywhere: `python presets/luts/make_luts.py`.

Each LUT is built from a few lines of colour math (no third-party LUT is copied):
- teal_orange.cube: skin tones and highlights pushed to orange, shadows and cool hues to teal,
  the blockbuster complementary look.
- film_print.cube: a print-film emulation: soft toe and shoulder per channel, slightly different
  channel gammas (warm mids, cool-green shadows), dye crosstalk that desaturates the extremes.
"""

from pathlib import Path

import numpy as np

from cinefx.grade import lut as lutlib
from cinefx.grade.colour import luma

HERE = Path(__file__).resolve().parent
SIZE = 33


def teal_orange(rgb: np.ndarray) -> np.ndarray:
    y = luma(rgb)[..., None]
    chroma = rgb - y
    teal = np.array([-0.55, 0.1, 0.45], np.float32)
    orange = np.array([0.6, 0.05, -0.65], np.float32)
    # how "warm" a colour already is decides which way it is pushed
    warmth = np.clip((rgb[..., :1] - rgb[..., 2:3]) * 3 + 0.2, -1, 1)
    push = np.where(warmth > 0, warmth * orange, -warmth * teal)
    tone = np.clip(1.2 * (y - 0.5), -0.5, 0.5)  # shadows lean teal, highlights orange
    out = y + chroma * 1.1 + 0.12 * push + 0.06 * (tone * orange * (tone > 0) - tone * teal * (tone < 0))
    return np.clip(out, 0, 1)


def film_print(rgb: np.ndarray) -> np.ndarray:
    def curve(x, gamma):
        x = np.clip(x, 0, 1) ** gamma
        return 0.02 + 0.96 * (x * x * (3 - 2 * x) * 0.6 + x * 0.4)

    out = np.stack([curve(rgb[..., 0], 0.95), curve(rgb[..., 1], 1.0), curve(rgb[..., 2], 1.07)], -1)
    y = luma(out)[..., None]
    extremes = np.abs(y - 0.5) * 2
    return np.clip(y + (out - y) * (1.05 - 0.35 * extremes), 0, 1)


if __name__ == "__main__":
    for name, fn in (("teal_orange", teal_orange), ("film_print", film_print)):
        lutlib.write_cube(HERE / f"{name}.cube", fn(lutlib.identity(SIZE)), title=f"cinefx {name}")
        print("wrote", HERE / f"{name}.cube")
