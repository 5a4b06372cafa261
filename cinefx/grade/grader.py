"""The grade engine: a real colour grade of frames, no model needed.

Per frame, in order: colour (baked 3D LUT, expanded to a table of every 8-bit colour) → bloom
and halation → vignette → grain → letterbox. Everything but grain is a fixed function of the pixel
and its neighbourhood, so a still shot stays still; grain changes every frame, seeded by (seed,
frame index), so a re-run or a resumed run gives the same file.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from cinefx.grade import lut as lutlib
from cinefx.grade.colour import bake, colour_is_identity
from cinefx.presets import GradeConfig

LUT_SIZE = 33
GRAIN_PLATES = 4
GRAIN_STD_LEVELS = 14.0  # 8-bit levels of grain noise at grain = 1 in the midtones
GLOW_BLUR_PX = 3.0  # bloom is blurred at the size where its Gaussian is this many pixels wide


class Grader:
    """Grades frames of one size with one grade.

    grade: the preset's grade; size: (width, height) of the frames; seed: grain seed.
    Call with frames (F, H, W, 3) uint8 and the index of the first frame in the video; returns a
    new array of the same shape (the input is not modified).
    """

    def __init__(self, grade: GradeConfig, size: tuple[int, int], seed: int = 0, workers: int = 0):
        self.grade = grade
        self.width, self.height = size
        self.seed = seed
        self.workers = workers or default_workers()
        self._pool: ThreadPoolExecutor | None = None
        self._table = None if colour_is_identity(grade) else _colour_table(grade)
        self._vignette = self._vignette_mask() if grade.vignette else None
        self._grain = self._grain_plates() if grade.grain else None
        # film grain shows most in the midtones and least in deep shadow and clipped highlights;
        # the weight is in 1/128 level, so noise × weight ÷ 32768 is the grain in whole levels
        self._grain_weight = np.rint(_GRAIN_CURVE * (GRAIN_STD_LEVELS * grade.grain * _WEIGHT_UNIT)).astype(np.int16)
        self._bars = self._letterbox_rows() if grade.letterbox else (0, 0)

    @property
    def is_identity(self) -> bool:
        return self.grade.is_identity

    def __call__(self, frames: np.ndarray, start_index: int = 0) -> np.ndarray:
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(f"frames of shape {frames.shape} {frames.dtype}, expected "
                             f"(F, {self.height}, {self.width}, 3) uint8")
        return np.stack(list(self.grade_many(zip(frames, range(start_index, start_index + len(frames))))))

    def grade_many(self, frames: Iterable[tuple[np.ndarray, int]]) -> Iterator[np.ndarray]:
        """Grade (frame, index) pairs, yielding results in order. With several workers, frames are
        graded on threads a few ahead of the consumer (OpenCV and NumPy release the GIL); each
        frame's result depends only on the frame and its index, so it is the same either way."""
        if self.workers <= 1:
            for frame, index in frames:
                yield self.grade_frame(frame, index)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cinefx-grade")
        ahead: deque = deque()
        for frame, index in frames:
            ahead.append(self._pool.submit(self.grade_frame, frame, index))
            if len(ahead) >= 2 * self.workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()

    def grade_frame(self, frame: np.ndarray, index: int) -> np.ndarray:
        g = self.grade
        x = lutlib.apply_dense(self._table, frame) if self._table is not None else frame.copy()
        if g.bloom or g.halation:
            x = self._glow(x)
        if self._vignette is not None:
            x = cv2.multiply(x, self._vignette, scale=1 / 255)
        if self._grain is not None:
            x = self._add_grain(x, index)
        top, bottom = self._bars
        if top:
            x[:top] = 0
        if bottom:
            x[self.height - bottom:] = 0
        return x

    # -- stages ---------------------------------------------------------------------------
    def _glow(self, x: np.ndarray) -> np.ndarray:
        """Bloom (highlights glow in their own colour) and halation (a red-orange fringe, as light
        scattered back through the film base). Both are wide blurs of the highlights, so they are
        computed small: highlights are found at quarter resolution (small ones still count, since
        area averaging keeps their energy), then shrunk until the blur is a few pixels wide. A blur's
        cost grows with the cube of the frame's side at a fixed relative radius; this keeps it flat."""
        g = self.grade
        sw, sh = max(1, self.width // 4), max(1, self.height // 4)
        small = cv2.resize(x, (sw, sh), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        y = small @ np.array([0.2126, 0.7152, 0.0722], np.float32)
        mask = np.clip((y - g.bloom_threshold) / max(1e-3, 1 - g.bloom_threshold), 0, 1)
        sigma = max(0.5, g.bloom_radius * sh)
        shrink = max(1.0, sigma / GLOW_BLUR_PX)
        ww, wh = max(1, round(sw / shrink)), max(1, round(sh / shrink))
        hi = small * mask[..., None]
        if (ww, wh) != (sw, sh):
            hi = cv2.resize(hi, (ww, wh), interpolation=cv2.INTER_AREA)
            mask = cv2.resize(mask, (ww, wh), interpolation=cv2.INTER_AREA)
            sigma *= wh / sh
        glow = np.zeros_like(hi)
        if g.bloom:
            glow += g.bloom * cv2.GaussianBlur(hi, (0, 0), sigma)
        if g.halation:
            hal = cv2.GaussianBlur(mask, (0, 0), sigma * 0.6)
            glow += g.halation * 0.6 * hal[..., None] * np.array([1.0, 0.32, 0.08], np.float32)
        glow8 = np.clip(glow * 255, 0, 255).astype(np.uint8)
        glow8 = cv2.resize(glow8, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
        # screen blend, a + b(1 - a): highlights approach white without clipping hard
        return cv2.add(x, cv2.multiply(glow8, cv2.bitwise_not(x), scale=1 / 255))

    def _vignette_mask(self) -> np.ndarray:
        h, w = self.height, self.width
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r = np.hypot((xx - (w - 1) / 2) / (w / 2), (yy - (h - 1) / 2) / (h / 2)) / np.sqrt(2)
        t = np.clip((r - 0.35) / 0.65, 0, 1)
        fall = 1 - 0.85 * self.grade.vignette * (t * t * (3 - 2 * t))
        return np.repeat((fall * 255).astype(np.uint8)[..., None], 3, axis=2)

    def _grain_plates(self) -> np.ndarray:
        """A few noise plates larger than the frame; each frame takes a seeded crop of one, which is
        as random to the eye as fresh noise at a fraction of the cost. Stored as int16 in units of
        1/256 σ: half the memory of float32 (70 MB at 4K) and integer arithmetic per frame."""
        rng = np.random.default_rng([self.seed, 0x6A11])
        pad = 64
        plates = rng.standard_normal((GRAIN_PLATES, self.height + pad, self.width + pad), np.float32)
        sigma = 0.5 * self.grade.grain_size * self.height / 1080
        if sigma > 0.3:
            for p in plates:
                cv2.GaussianBlur(p, (0, 0), sigma, dst=p)
            plates /= plates.std()
        return np.clip(np.rint(plates * _NOISE_UNIT), -32767, 32767).astype(np.int16)

    def _add_grain(self, x: np.ndarray, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        p, dy, dx = rng.integers(0, [GRAIN_PLATES, 64, 64])
        noise = self._grain[p, dy:dy + self.height, dx:dx + self.width]
        y = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)
        delta = cv2.multiply(noise, cv2.LUT(y, self._grain_weight), scale=1 / (_NOISE_UNIT * _WEIGHT_UNIT), dtype=cv2.CV_16S)
        # x is whole levels, so adding whole-level grain in integers equals adding it in float
        return cv2.add(x, cv2.merge([delta, delta, delta]), dtype=cv2.CV_8U)

    def _letterbox_rows(self) -> tuple[int, int]:
        target = self.grade.letterbox
        visible = self.width / target
        if visible >= self.height:
            return 0, 0
        bars = self.height - int(round(visible))
        top = (bars // 2) & ~1  # even rows keep 4:2:0 chroma from bleeding into the bars
        return top, bars - top

    def close(self) -> None:
        self._table = None
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def default_workers() -> int:
    """Grading threads: one per four cores, at most four. x264 takes the rest; on a small machine
    its threads already leave no core idle, and a second grading thread only contends with them."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


@functools.lru_cache(maxsize=1)
def _colour_table(grade: GradeConfig) -> np.ndarray:
    """The grade's colour as a table of every 8-bit colour: 0.5 s to build, then one gather per
    pixel, about 9× cheaper per frame than FFmpeg's lut3d. Kept for the next file of a batch,
    which almost always has the same grade."""
    return lutlib.dense_table(bake(grade, LUT_SIZE))


_NOISE_UNIT, _WEIGHT_UNIT = 256, 128  # fixed-point scales of the grain plates and weights
_v = np.arange(256, dtype=np.float32) / 255
_GRAIN_CURVE = (0.25 + 3.0 * _v * (1 - _v)).reshape(1, 256).astype(np.float32)
