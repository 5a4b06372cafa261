"""Scene boundaries: hard cuts, dissolves and fades; flashes and lighting changes are not cuts.

The detector is online: frames are pushed one by one and boundaries come out a few frames later
(`lookahead`), so a whole video never has to be in memory. It works on 64-pixel-wide Lab
thumbnails, which is why it costs less than decoding.

- Hard cut (the AdaptiveDetector idea of PySceneDetect): the frame difference at t stands out from
  its neighbours' (ratio ≥ `cut_ratio`) and is large in absolute terms.
- Flash / lighting change: a cut candidate is dropped when the picture returns to the pre-flash
  frame within `flash_frames`, or when the luminance structure is unchanged (high correlation),
  which brightness alone cannot break.
- Dissolve: a cross-fade is linear in time, so the middle frame of a window spanning it equals the
  average of the window's ends, while a camera move does not (twin comparison would also fire on
  pans). Ends must differ in structure, not only in brightness.
- Fade: a run of flat (low-contrast) frames between two shots; the boundary goes mid-run.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

THUMB_WIDTH = 64


@dataclass(frozen=True)
class Scene:
    """Frames [start, end) of a video; `kind` says how the scene begins."""

    index: int
    start: int
    end: int
    kind: str  # "start", "cut", "dissolve" or "fade"

    @property
    def frames(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Boundary:
    frame: int  # first frame of the new scene
    kind: str


@dataclass(frozen=True)
class DetectorOptions:
    cut_ratio: float = 3.0  # frame difference over its neighbours' mean
    cut_min: float = 9.0  # and at least this mean Lab difference (0-255)
    window: int = 2  # neighbours each side for the ratio
    flash_frames: int = 6  # a flash lasts at most this long
    same_shot_corr: float = 0.9  # luma correlation above which two frames are the same shot
    dissolve_half: tuple[int, ...] = (4, 7, 11)  # half-lengths of dissolve windows tried
    dissolve_min: float = 14.0  # Lab difference between the ends of a dissolve
    dissolve_linearity: float = 0.3  # max residual from the linear blend, as a share of the change
    flat_std: float = 7.0  # luma std (0-255) below which a frame is flat (black, white, solid)
    fade_hold: int = 24  # a longer flat run gets its boundary here, so buffers stay bounded
    min_scene: int = 6  # frames; closer boundaries are dropped


class _Features:
    __slots__ = ("lab", "luma", "mean_l", "std", "flat")

    def __init__(self, small_rgb: np.ndarray, flat_std: float):
        self.lab = cv2.cvtColor(small_rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
        lum = self.lab[..., 0]
        mean, std = cv2.meanStdDev(lum)
        self.mean_l, self.std = float(mean[0, 0]), float(std[0, 0])
        self.luma = (lum - self.mean_l) / (self.std + 1e-3)
        self.flat = self.std < flat_std


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two equal-shape arrays (OpenCV: one pass, no temporaries)."""
    return cv2.norm(a, b, cv2.NORM_L1) / a.size


def thumbnail_size(width: int, height: int) -> tuple[int, int]:
    return THUMB_WIDTH, max(8, round(THUMB_WIDTH * height / max(1, width)))


class SceneDetector:
    """Push RGB frames in display order; get `Boundary`s back once they are certain.

    `settled` is the index below which no further boundary can appear, so a caller may hand frames
    before it on to the next stage.
    """

    def __init__(self, options: DetectorOptions = DetectorOptions()):
        self.o = options
        # a dissolve found at p is re-centred on the best window among p .. p + max half-length
        self.lookahead = max(2 * max(options.dissolve_half), options.flash_frames + 1, options.window)
        keep = 3 * max(options.dissolve_half) + options.flash_frames + options.window + 4
        self._feat: deque[_Features] = deque(maxlen=keep)
        self._diff: dict[int, float] = {}  # diff[t] between frames t-1 and t
        self.n = 0  # frames pushed
        self._next = 1  # next position to decide
        self._last = 0  # last boundary frame
        self._flat_start: int | None = None
        self._fade_done = False
        self._skip_until = 0
        self._size: tuple[int, int] | None = None

    # -- public ---------------------------------------------------------------------------
    def push(self, rgb: np.ndarray) -> list[Boundary]:
        """rgb: (H, W, 3) uint8 frame, or an already small one. Returns boundaries now decided."""
        if self._size is None:
            self._size = thumbnail_size(rgb.shape[1], rgb.shape[0])
        small = rgb if rgb.shape[1] == self._size[0] else cv2.resize(rgb, self._size, interpolation=cv2.INTER_AREA)
        f = _Features(small, self.o.flat_std)
        if self._feat:
            self._diff[self.n] = _mad(f.lab, self._feat[-1].lab)
        self._feat.append(f)
        self.n += 1
        out = []
        while self._next <= self.n - 1 - self.lookahead:
            out += self._decide(self._next, final=False)
            self._next += 1
        return out

    def finish(self) -> list[Boundary]:
        """Decide the remaining frames at the end of the video."""
        out = []
        while self._next < self.n:
            out += self._decide(self._next, final=True)
            self._next += 1
        self._diff.clear()
        return out

    @property
    def settled(self) -> int:
        s = self._next
        if self._flat_start is not None:
            s = min(s, self._flat_start + self.o.fade_hold // 2)
        return s

    # -- internals ------------------------------------------------------------------------
    def _f(self, t: int) -> _Features | None:
        k = t - (self.n - len(self._feat))
        return self._feat[k] if 0 <= k < len(self._feat) else None

    def _emit(self, frame: int, kind: str) -> list[Boundary]:
        if frame - self._last < self.o.min_scene or frame <= 0:
            return []
        self._last = frame
        return [Boundary(frame, kind)]

    def _decide(self, p: int, final: bool) -> list[Boundary]:
        for t in [k for k in self._diff if k < p - 3 * max(self.o.dissolve_half) - self.o.window - 2]:
            del self._diff[t]
        f = self._f(p)
        out = self._fade(p, f)
        if f.flat or p < self._skip_until:
            return out
        if self._is_cut(p):
            out += self._emit(p, "cut")
            self._skip_until = p + max(self.o.dissolve_half)
            return out
        if not final and self._dissolve(p)[0]:
            # the first window that fits lies at the dissolve's start; the true middle is where
            # the widest change is still a linear blend
            best = max(range(p, p + max(self.o.dissolve_half) + 1), key=lambda c: self._dissolve(c)[1])
            h, _ = self._dissolve(best)
            out += self._emit(best, "dissolve")
            self._skip_until = best + h
        return out

    def _fade(self, p: int, f: _Features) -> list[Boundary]:
        o = self.o
        if f.flat:
            if self._flat_start is None:
                self._flat_start, self._fade_done = p, False
            run = p - self._flat_start + 1
            if run >= o.fade_hold and not self._fade_done:
                self._fade_done = True
                return self._emit(self._flat_start + o.fade_hold // 2, "fade")
            return []
        if self._flat_start is None:
            return []
        a, self._flat_start = self._flat_start, None
        if self._fade_done or a == 0:
            return []
        run = p - a
        before, after = self._f(a - 1), f
        if run <= o.flash_frames and before is not None and self._same_shot(before, after):
            return []  # a white or black flash inside one shot
        self._skip_until = p + 1
        return self._emit(a + run // 2, "fade")

    def _same_shot(self, a: _Features, b: _Features) -> bool:
        corr = float((a.luma * b.luma).mean())
        return corr >= self.o.same_shot_corr

    def _is_cut(self, t: int) -> bool:
        o = self.o
        d = self._diff.get(t, 0.0)
        if d < o.cut_min:
            return False
        around = [self._diff[k] for k in range(t - o.window, t + o.window + 1) if k != t and k in self._diff]
        if around and d < o.cut_ratio * (sum(around) / len(around) + 1e-3):
            return False
        prev, cur = self._f(t - 1), self._f(t)
        if prev is None or cur is None:
            return True
        if self._same_shot(prev, cur):
            return False  # brightness changed, structure did not: a light change, not a cut
        for k in range(t + 1, t + o.flash_frames + 1):
            nxt = self._f(k)
            if nxt is not None and _mad(nxt.lab, prev.lab) < 0.35 * d:
                return False  # the picture comes back after t: t starts a flash
        for k in range(t - 2, t - o.flash_frames - 2, -1):
            old = self._f(k)
            if old is not None and _mad(cur.lab, old.lab) < 0.35 * d:
                return False  # the picture is back to what it was before: t ends a flash
        return True

    def _dissolve(self, c: int) -> tuple[int, float]:
        """(half-length, change) of the widest dissolve window centred on frame c, or (0, 0)."""
        o = self.o
        for h in sorted(o.dissolve_half, reverse=True):
            a, m, b = self._f(c - h), self._f(c), self._f(c + h)
            if a is None or b is None or any(self._f(k).flat for k in range(c - h, c + h + 1)):
                continue  # a flat frame inside: that is a fade, handled by _fade
            la, lb = a.mean_l, b.mean_l
            if min(la, lb) < 0.4 * max(la, lb):
                continue  # one end much darker: a fade to or from black, not a cross-dissolve
            change = _mad(a.lab, b.lab)
            if change < o.dissolve_min or self._same_shot(a, b):
                continue
            if any(self._diff.get(k, 0) > 0.6 * change for k in range(c - h + 1, c + h + 1)):
                continue  # one step carries most of the change: a cut, not a dissolve
            worst = 0.0
            for frac in (0.25, 0.5, 0.75):
                q = self._f(c - h + round(2 * h * frac))
                blend = (1 - frac) * a.lab + frac * b.lab
                worst = max(worst, _mad(q.lab, blend))
            if worst <= o.dissolve_linearity * change:
                return h, change
        return 0, 0.0


def scenes_from_boundaries(boundaries: list[Boundary], frame_count: int) -> list[Scene]:
    scenes, start, kind = [], 0, "start"
    for b in boundaries:
        if b.frame <= start or b.frame >= frame_count:
            continue
        scenes.append(Scene(len(scenes), start, b.frame, kind))
        start, kind = b.frame, b.kind
    if frame_count > start:
        scenes.append(Scene(len(scenes), start, frame_count, kind))
    return scenes


def detect_scenes(frames, options: DetectorOptions = DetectorOptions()) -> list[Scene]:
    """All scenes of an iterable of (H, W, 3) uint8 frames (small frames are fine)."""
    det = SceneDetector(options)
    bounds = []
    n = 0
    for rgb in frames:
        bounds += det.push(rgb)
        n += 1
    bounds += det.finish()
    return scenes_from_boundaries(bounds, n)
