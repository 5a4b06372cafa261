"""Flow warping error (Lai et al. 2018, "Learning Blind Video Temporal Consistency", §5.1).

For each adjacent pair (t, t+1) within a scene, optical flow is computed on the INPUT (OpenCV DIS,
MEDIUM preset, on grey levels): forward w_f (t → t+1) and backward w_b (t+1 → t). A pixel x of
frame t is occluded when the two flows disagree (Ruder et al. 2016):

    |w_f(x) + w_b(x + w_f(x))|² > 0.01 (|w_f(x)|² + |w_b(x + w_f(x))|²) + 0.5

or when x + w_f(x) leaves the frame. Frame t+1 of a video is warped back to t along w_f and

    E_warp(t) = Σ_x M(x) ‖V_t(x) − V_{t+1}(x + w_f(x))‖² / (3 Σ_x M(x)),   M = not occluded,

with intensities in [0, 1]; a video's figure is the mean over its pairs. The input's own warp
error (noise, motion blur, lighting the flow cannot explain) is measured beside the output's, so
Δ = output − input ≈ 0 means the render is as coherent along the real motion as the footage.
Unlike adjacent-frame PSNR it does not reward stillness: a frozen or shuffled render scores worse.

Frames are measured at the report's analysis width (`cinefx.metrics.DEFAULT_METRIC_WIDTH`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import cv2
import numpy as np

from cinefx.errors import OptionError
from cinefx.metrics import DEFAULT_METRIC_WIDTH
from cinefx.worker import Meter

OCCLUSION_SCALE, OCCLUSION_FLOOR = 0.01, 0.5  # Ruder et al. 2016's forward-backward check


def sampled(position: int, every: int) -> tuple[bool, bool]:
    """Whether frame `position` (frames into its scene) is the first, and whether it is the second,
    of a measured pair, when pairs (t, t+1) are taken every `every` frames from the scene's start."""
    return position % every == 0, position > 0 and (position - 1) % every == 0


def metric_size(width: int, height: int, metric_width: int = DEFAULT_METRIC_WIDTH) -> tuple[int, int]:
    """(width, height) frames are measured at: `metric_width` wide, as the report's metrics."""
    if not metric_width or width <= metric_width:
        return width, height
    return metric_width, max(8, round(height * metric_width / width))


def shrink(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """frame: (H, W, 3) uint8 → (size[1], size[0], 3), area-averaged (a no-op at that size)."""
    if (frame.shape[1], frame.shape[0]) == size:
        return frame
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class PairFlow:
    """Where each pixel of frame t is found in frame t+1, and which pixels to count.

    map_x, map_y: (H, W) float32 sample positions x + w_f(x) for `cv2.remap`; keep: (H, W) bool,
    True where the pixel is neither occluded nor carried out of the frame."""

    map_x: np.ndarray
    map_y: np.ndarray
    keep: np.ndarray

    @property
    def kept(self) -> float:
        return float(self.keep.mean())


class FlowEstimator:
    """Forward and backward DIS flow between two frames, with the occlusion check. Not thread-safe
    (DIS keeps buffers): one per thread."""

    def __init__(self):
        self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        self._grid: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, a: np.ndarray, b: np.ndarray) -> PairFlow:
        """a, b: (H, W) uint8 grey frames t and t+1 of the input."""
        fw = self._dis.calc(a, b, None)
        bw = self._dis.calc(b, a, None)
        h, w = a.shape
        if self._grid is None or self._grid[0].shape != (h, w):
            self._grid = tuple(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)))
        map_x, map_y = self._grid[0] + fw[..., 0], self._grid[1] + fw[..., 1]
        bw_there = cv2.remap(bw, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        disagree = np.square(fw + bw_there).sum(-1)
        bound = OCCLUSION_SCALE * (np.square(fw).sum(-1) + np.square(bw_there).sum(-1)) + OCCLUSION_FLOOR
        inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
        return PairFlow(map_x, map_y, (disagree <= bound) & inside)


def grey(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def warp_error(a: np.ndarray, b: np.ndarray, flow: PairFlow) -> float | None:
    """a, b: (H, W, 3) uint8 frames t and t+1 of one video; `flow` from the input's frames t, t+1.
    Mean squared difference (intensities in [0, 1]) between a and b warped back to t, over the
    kept pixels; None when the check keeps none."""
    n = int(flow.keep.sum())
    if not n:
        return None
    back = cv2.remap(b.astype(np.float32), flow.map_x, flow.map_y, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)
    diff = np.square(back - a.astype(np.float32)).sum(-1)
    return float(diff[flow.keep].sum()) / (3 * n * 255.0**2)


@dataclass(frozen=True)
class WarpScene:
    """Warp errors of one scene (or the whole video: index -1): the input's and each output's, as
    means over the measured pairs; None where no pair was measured."""

    index: int
    pairs: int
    source: float | None
    renders: tuple[float | None, ...]
    kept: float | None  # mean share of pixels the occlusion check keeps

    @property
    def output(self) -> float | None:
        """The first (for the stylize report, the only) output's warp error."""
        return self.renders[0] if self.renders else None

    def delta(self, render: int = 0) -> float | None:
        """Output − input: > 0 means the render is less coherent along the motion than the footage."""
        r = self.renders[render]
        return None if r is None or self.source is None else r - self.source


@dataclass
class _Series:
    source: list[float] = field(default_factory=list)
    renders: list[list[float]] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class WarpMeter(Meter):
    """Feed the input and its output(s) frame by frame, scene by scene; read `scenes()` and
    `overall()` after `finish()`. Pairs never straddle a scene change; with `every` = N only the
    pairs (t, t+1) whose t is a multiple of N frames into its scene are measured.

    `add(scene, src, *outs)`: (H, W, 3) uint8 frames, any size (shrunk to the metric width; frames
    already that size pass through, so a caller that has shrunk them pays nothing). With
    `background`, measuring runs on a thread of its own a few frames behind, as `TemporalMeter`.
    """

    def __init__(self, metric_width: int = DEFAULT_METRIC_WIDTH, every: int = 1, background: bool = False):
        if every < 1:
            raise OptionError(f"--every {every}: must be 1 or more (measure every Nth pair)")
        self.metric_width, self.every = metric_width, every
        self.size: tuple[int, int] | None = None
        self._flow = FlowEstimator()
        self._series: dict[int, _Series] = {}
        self._scene: int | None = None
        self._position = 0  # frames into the current scene
        self._prev: tuple | None = None  # (scene, grey input, input, outputs) of a pair's first frame
        super().__init__(background, "cinefx-warp")

    def add(self, scene: int, src: np.ndarray, *outs: np.ndarray, pair: bool = True) -> None:
        """`pair` False: the pair this frame ends is not measured (its values are spliced in)."""
        if scene != self._scene:
            self._scene, self._position = scene, 0
        first, second = sampled(self._position, self.every)
        second = second and pair
        self._position += 1
        if not (first or second):
            return
        if self.size is None:
            self.size = metric_size(src.shape[1], src.shape[0], self.metric_width)
        item = (scene, first, second, shrink(src, self.size), tuple(shrink(o, self.size) for o in outs))
        self._submit(*item)

    def _measure(self, scene: int, first: bool, second: bool, src: np.ndarray, outs: tuple) -> None:
        series = self._series.setdefault(scene, _Series(renders=[[] for _ in outs]))
        g = grey(src)
        if second and self._prev is not None and self._prev[0] == scene:
            _, pg, psrc, pouts = self._prev
            flow = self._flow(pg, g)
            s = warp_error(psrc, src, flow)
            if s is not None:  # (the outputs share the mask: all measured or none)
                series.source.append(s)
                series.kept.append(flow.kept)
                for values, a, b in zip(series.renders, pouts, outs):
                    values.append(warp_error(a, b, flow))
        self._prev = (scene, g, src, outs) if first else None

    def export(self, scene: int) -> dict:
        """The scene's values so far, as `splice` takes them (after `finish()`)."""
        series = self._series.get(scene, _Series())
        return {"source": series.source, "kept": series.kept, "renders": series.renders}

    def _splice(self, scene: int, values: dict) -> None:
        series = self._series.setdefault(scene, _Series(renders=[[] for _ in values["renders"]]))
        series.source += values["source"]
        series.kept += values["kept"]
        for mine, more in zip(series.renders, values["renders"]):
            mine += more

    def scenes(self) -> dict[int, WarpScene]:
        """Per scene index, the scenes seen so far (a scene of one frame has no pairs)."""
        return {k: _summary(k, [s]) for k, s in sorted(self._series.items())}

    def overall(self, scenes: Iterable[int] | None = None) -> WarpScene:
        """Means over every measured pair (of `scenes` only, if given): long scenes weigh more."""
        keep = self._series if scenes is None else {k: self._series[k] for k in scenes if k in self._series}
        return _summary(-1, list(keep.values()))


def _summary(index: int, series: list[_Series]) -> WarpScene:
    outputs = max((len(s.renders) for s in series), default=0)
    return WarpScene(index=index, pairs=sum(len(s.source) for s in series),
                     source=_mean([v for s in series for v in s.source]),
                     renders=tuple(_mean([v for s in series for v in s.renders[k]])
                                   for k in range(outputs)),
                     kept=_mean([v for s in series for v in s.kept]))
