"""Temporal consistency: adjacent-frame PSNR and T-SSIM, per scene, for input and output.

PSNR_t = 10 log10(255² / MSE(F_t, F_t+1)); T-SSIM_t = SSIM(F_t, F_t+1) with scikit-image's
Gaussian-window SSIM at the Wang et al. (2004) settings (σ = 1.5, no sample covariance,
data_range 255). Both reward stillness, so the report shows output − input: ≈ 0 means the
render flickers no more and no less than the footage. Pairs that straddle a scene boundary are
never measured; identical frames (PSNR = ∞) are counted, not averaged.

Frames are measured at `metric_width` (area-downscaled) — the resolution diffusion works at —
which keeps SSIM affordable on 4K footage; the size used is written in the report.

SSIM is computed with OpenCV's Gaussian blur rather than by calling scikit-image: the same
formula and window (11 taps, σ = 1.5, 5-pixel border cropped), about 20× faster, and each
frame's means and variances are computed once and reused for both pairs it belongs to. A test
holds it to `skimage.metrics.structural_similarity` within 1e-4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from cinefx.worker import Meter

DEFAULT_METRIC_WIDTH = 512


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """a, b: (H, W, 3) uint8. Returns inf for identical frames."""
    mse = cv2.norm(a, b, cv2.NORM_L2SQR) / a.size
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


_K1, _K2, _RANGE = 0.01, 0.03, 255.0
_C1, _C2 = (_K1 * _RANGE) ** 2, (_K2 * _RANGE) ** 2
_SIGMA, _TAPS = 1.5, 11  # skimage: radius int(3.5 σ + 0.5) = 5
_PAD = (_TAPS - 1) // 2


class FrameStats:
    """Local Gaussian mean and variance of one frame, reusable across the pairs it is in."""

    __slots__ = ("x", "mu", "mu2", "var")

    def __init__(self, frame: np.ndarray):
        self.x = frame.astype(np.float32)
        self.mu = _blur(self.x)
        self.mu2 = self.mu * self.mu
        self.var = _blur(self.x * self.x) - self.mu2


def _blur(x: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(x, (_TAPS, _TAPS), _SIGMA, borderType=cv2.BORDER_REFLECT)


def ssim_stats(a: FrameStats, b: FrameStats) -> float:
    """Mean SSIM of two frames (averaged over channels), Wang et al. 2004 with a Gaussian window."""
    mu_ab = a.mu * b.mu
    cov = _blur(a.x * b.x) - mu_ab
    s = ((2 * mu_ab + _C1) * (2 * cov + _C2)) / ((a.mu2 + b.mu2 + _C1) * (a.var + b.var + _C2))
    if min(s.shape[:2]) > 2 * _PAD:
        s = s[_PAD:-_PAD, _PAD:-_PAD]  # as scikit-image: drop the border the window overhangs
    # (frames narrower than the window, which scikit-image refuses, are averaged whole)
    return float(s.mean())


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """a, b: (H, W, 3) uint8."""
    return ssim_stats(FrameStats(a), FrameStats(b))


@dataclass
class Series:
    """Per-pair values of one video (input or output) within one scene."""

    psnr: list[float] = field(default_factory=list)
    tssim: list[float] = field(default_factory=list)

    @property
    def identical(self) -> int:
        return sum(1 for v in self.psnr if math.isinf(v))

    @property
    def mean_psnr(self) -> float | None:
        finite = [v for v in self.psnr if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else None

    @property
    def mean_tssim(self) -> float | None:
        return sum(self.tssim) / len(self.tssim) if self.tssim else None


class TemporalMeter(Meter):
    """Feed frames (input and output side by side) scene by scene; read `series` after `finish()`.

    series[scene index] = (input Series, output Series).

    With `background`, frames are shrunk to the metric size in the caller's thread and measured on
    a thread of its own (OpenCV releases the GIL), a few frames behind: where encoding is cheap (a
    fast x264 preset, many cores) the measuring would otherwise set the pace.
    """

    def __init__(self, metric_width: int = DEFAULT_METRIC_WIDTH, background: bool = False):
        self.metric_width = metric_width
        self.series: dict[int, tuple[Series, Series]] = {}
        self._prev: tuple[int, np.ndarray, np.ndarray, tuple[FrameStats, FrameStats] | None] | None = None
        self.size: tuple[int, int] | None = None
        super().__init__(background, "cinefx-metrics")

    def _small(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        if not self.metric_width or w <= self.metric_width:
            self.size = (w, h)
            return frame
        size = (self.metric_width, max(8, round(h * self.metric_width / w)))
        self.size = size
        return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)

    def add(self, scene: int, src: np.ndarray, out: np.ndarray, pair: bool = True) -> None:
        """src, out: (H, W, 3) uint8, the same frame before and after cinefx. `pair` False: the pair
        this frame ends is not measured (its values are spliced in, see `splice`)."""
        s, o = self._small(src), self._small(out)
        self._submit(scene, s, o, pair)

    def export(self, scene: int) -> dict:
        """The scene's values so far, as `splice` takes them (after `finish()`)."""
        si, so = self.series.get(scene, (Series(), Series()))
        return {"in_psnr": si.psnr, "in_tssim": si.tssim, "out_psnr": so.psnr, "out_tssim": so.tssim}

    def _splice(self, scene: int, values: dict) -> None:
        si, so = self.series.setdefault(scene, (Series(), Series()))
        si.psnr += values["in_psnr"]
        si.tssim += values["in_tssim"]
        so.psnr += values["out_psnr"]
        so.tssim += values["out_tssim"]

    def _measure(self, scene: int, s: np.ndarray, o: np.ndarray, pair: bool) -> None:
        stats = None  # a frame's statistics, made only when a pair needs them (spliced pieces need none)
        if pair and self._prev is not None and self._prev[0] == scene:
            si, so = self.series.setdefault(scene, (Series(), Series()))
            _, ps, po, prev = self._prev
            pss, pso = prev or (FrameStats(ps), FrameStats(po))
            stats = ss, so_ = FrameStats(s), FrameStats(o)
            for series, a, b, sa, sb in ((si, ps, s, pss, ss), (so, po, o, pso, so_)):
                series.psnr.append(psnr(a, b))
                series.tssim.append(ssim_stats(sa, sb))
        else:
            self.series.setdefault(scene, (Series(), Series()))
        self._prev = (scene, s, o, stats)

