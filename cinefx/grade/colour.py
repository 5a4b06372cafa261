"""The per-pixel colour part of a grade, as one function of a colour.

`colour_transform(grade)` returns f: (..., 3) float32 RGB in [0, 1] → same. Because it depends on
nothing but the pixel's own colour, the grader bakes it once into a 33³ 3D LUT, expands that to
every 8-bit colour (`lut.dense_table`) and looks frames up in it: one pass per frame whatever the
grade, and no frame-to-frame state, so the grade cannot introduce flicker.

Order, as a colourist's node tree: balance (exposure, white balance, in linear light) → contrast →
highlight roll-off → look LUT → saturation → split toning → black lift.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable

import numpy as np

from cinefx.grade import lut as lutlib
from cinefx.presets import GradeConfig

REC709_LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)

ColourFn = Callable[[np.ndarray], np.ndarray]


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.maximum(x, 0)
    return np.where(x <= 0.0031308, x * 12.92, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ REC709_LUMA


def _hue_offset(hue_deg: float) -> np.ndarray:
    """A colour direction of zero luma for `hue_deg`: adding it tints without changing brightness."""
    rgb = np.array(colorsys.hsv_to_rgb(hue_deg / 360.0, 1.0, 1.0), np.float32)
    d = rgb - luma(rgb)
    return d / (np.abs(d).max() + 1e-6)


def _contrast(x: np.ndarray, amount: float, pivot: float) -> np.ndarray:
    """S-curve with slope 1 + amount at the pivot; ends fixed at 0 and 1, monotonic."""
    k = 1.0 + amount
    lo = pivot * np.power(np.clip(x / pivot, 0, None), k)
    hi = 1 - (1 - pivot) * np.power(np.clip((1 - x) / (1 - pivot), 0, None), k)
    return np.where(x < pivot, lo, hi)


def _rolloff(x: np.ndarray, amount: float) -> np.ndarray:
    knee = 1.0 - 0.6 * amount
    over = np.clip(x - knee, 0, None)
    width = 1.0 - knee
    # tanh shoulder normalised so 1.0 still maps to (just below) 1.0
    soft = knee + width * np.tanh(over / width) / np.tanh(1.0)
    return np.where(x > knee, soft, x)


def colour_transform(grade: GradeConfig) -> ColourFn:
    """Build the colour function of `grade`; the identity when every colour value is at default."""
    look = lutlib.read_cube(grade.lut) if grade.lut else None
    wb = np.array([1 + 0.12 * grade.temperature, 1 - 0.08 * grade.tint, 1 - 0.12 * grade.temperature],
                  np.float32) * (2.0 ** grade.exposure)
    wb_needed = grade.exposure != 0 or grade.temperature != 0 or grade.tint != 0
    shadow_dir = _hue_offset(grade.shadows_hue)
    light_dir = _hue_offset(grade.highlights_hue)
    split_mid = 0.5 + 0.3 * grade.split_balance

    def f(rgb: np.ndarray) -> np.ndarray:
        x = rgb.astype(np.float32)
        if wb_needed:
            x = linear_to_srgb(srgb_to_linear(x) * wb)
        if grade.contrast:
            x = _contrast(np.clip(x, 0, 1), grade.contrast, grade.pivot)
        if grade.highlight_rolloff:
            x = _rolloff(x, grade.highlight_rolloff)
        x = np.clip(x, 0, 1)
        if look is not None:
            x = x + grade.lut_strength * (lutlib.apply(look, x) - x)
        if grade.saturation != 1:
            y = luma(x)[..., None]
            x = y + grade.saturation * (x - y)
        if grade.split_amount:
            y = np.clip(luma(x), 0, 1)[..., None]
            w_shadow = np.clip(1 - y / split_mid, 0, 1) ** 1.5
            w_light = np.clip((y - split_mid) / (1 - split_mid), 0, 1) ** 1.5
            x = x + 0.18 * grade.split_amount * (w_shadow * shadow_dir + w_light * light_dir)
        if grade.black_lift:
            x = grade.black_lift + (1 - grade.black_lift) * x
        return np.clip(x, 0, 1).astype(np.float32)

    return f


def colour_is_identity(grade: GradeConfig) -> bool:
    d = GradeConfig()
    keys = ("lut", "exposure", "contrast", "highlight_rolloff", "temperature", "tint", "saturation",
            "split_amount", "black_lift")
    return all(getattr(grade, k) == getattr(d, k) for k in keys)


def bake(grade: GradeConfig, size: int = 33) -> np.ndarray:
    """The colour transform of `grade` sampled on a size³ grid: a LUT for `lutlib.write_cube`."""
    return colour_transform(grade)(lutlib.identity(size))
