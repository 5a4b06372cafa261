"""Scene boundaries: hard cuts, dissolves and fades; flashes and lighting changes are not cuts.

The detector is online: frames are pushed one by one and boundaries come out a few frames later
(`lookahead`), so a whole video never has to be in memory. It works on 64-pixel-wide Lab
thumbnails, which is why it costs less than decoding.

- Hard cut (the AdaptiveDetector idea of PySceneDetect): the frame difference at t stands out from
  the motion on both sides (ratio ≥ `cut_ratio` to the adjacent differences) and is large in
  absolute terms. Only the adjacent differences count, so the next cut may come two frames later
  (fast cutting: trailers, music videos, action scenes); a lone frame between two shots (a blended
  or stray frame) makes two adjacent large differences, and the larger is the cut.
- Flash / lighting change: a cut candidate is dropped when the luminance structure is unchanged
  (high correlation), which brightness alone cannot break, or when it starts or ends a short run
  after which the picture returns to the frame before it, and that run is a flash: much brighter
  or darker than both sides and keeping the shot's structure. A run of other content is an insert:
  two cuts. A lone returning frame is a glitch, no cut.
- Dissolve: a cross-fade is linear in time, so the middle frame of a window spanning it equals the
  average of the window's ends, while a camera move does not (twin comparison would also fire on
  pans). Ends must differ in structure, not only in brightness.
- Fade: a run of flat (low-contrast) frames between two shots; the boundary goes mid-run.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterable, Iterator
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
    cut_ratio: float = 3.0  # frame difference over the mean of the two adjacent ones
    cut_min: float = 9.0  # and at least this mean Lab difference (0-255)
    flash_frames: int = 6  # a flash lasts at most this long
    flash_light: float = 30.0  # a flash's mean lightness (Lab L, 0-255) differs this much from both sides
    flash_corr: float = 0.45  # and keeps the shot's structure: luma correlation (other photos: < 0.4)
    same_shot_corr: float = 0.9  # luma correlation above which two frames are the same shot
    dissolve_half: tuple[int, ...] = (4, 7, 11)  # half-lengths of dissolve windows tried
    dissolve_min: float = 14.0  # Lab difference between the ends of a dissolve
    dissolve_linearity: float = 0.3  # max residual from the linear blend, as a share of the change
    flat_std: float = 7.0  # luma std (0-255) below which a frame is flat (black, white, solid)
    fade_hold: int = 24  # a longer flat run gets its boundary here, so buffers stay bounded
    min_scene: int = 2  # frames; closer boundaries are dropped (a lone frame is no scene)


class _Features:
    __slots__ = ("lab", "luma", "mean_l", "std", "flat", "flats", "coarse")

    def __init__(self, small_rgb: np.ndarray, flat_std: float):
        self.lab = cv2.cvtColor(small_rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
        lum = self.lab[..., 0]
        mean, std = cv2.meanStdDev(lum)
        self.mean_l, self.std = float(mean[0, 0]), float(std[0, 0])
        self.luma = (lum - self.mean_l) / (self.std + 1e-3)
        self.flat = self.std < flat_std
        self.flats = 0  # flat frames up to and including this one, so a window's count is one subtraction
        self.coarse: tuple[np.ndarray, np.ndarray] | None = None


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two equal-shape arrays (OpenCV: one pass, no temporaries)."""
    return cv2.norm(a, b, cv2.NORM_L1) / a.size


def _coarse(f: _Features) -> tuple[np.ndarray, np.ndarray]:
    """(h, 16, 3) float32 Lab and its normalised luma, flat (h * 16,), made only for the few
    frames around a cut candidate. At this size a few frames of camera motion change little,
    while a flash or other content still changes much."""
    if f.coarse is None:
        lab = cv2.resize(f.lab, (16, max(2, round(16 * f.lab.shape[0] / f.lab.shape[1]))), interpolation=cv2.INTER_AREA)
        lum = lab[..., 0].ravel()
        mean, std = cv2.meanStdDev(lum)
        f.coarse = lab, (lum - float(mean[0, 0])) / (float(std[0, 0]) + 1e-3)
    return f.coarse


def _coarse_mad(a: _Features, b: _Features) -> float:
    return _mad(_coarse(a)[0], _coarse(b)[0])


def _coarse_corr(a: _Features, b: _Features) -> float:
    """Luma correlation (-1..1) on 16-pixel-wide thumbnails, where a shot a few frames on still
    correlates with itself under a quick camera move."""
    x, y = _coarse(a)[1], _coarse(b)[1]
    return float(x @ y) / x.size


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
        self.lookahead = max(2 * max(options.dissolve_half), options.flash_frames + 1)
        keep = 3 * max(options.dissolve_half) + options.flash_frames + 6
        self._feat: deque[_Features] = deque(maxlen=keep)
        self._diff: dict[int, float] = {}  # diff[t] between frames t-1 and t
        self.n = 0  # frames pushed
        self._next = 1  # next position to decide
        self._last = 0  # last boundary frame; no dissolve window reaches back past it
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
            f.flats = self._feat[-1].flats
        f.flats += f.flat
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
        # an open flat run may still end as a fade with its boundary mid-run
        if self._flat_start is not None and not self._fade_done:
            return min(self._next, self._flat_start)
        return self._next

    # -- internals ------------------------------------------------------------------------
    def _f(self, t: int) -> _Features | None:
        k = t - (self.n - len(self._feat))
        return self._feat[k] if 0 <= k < len(self._feat) else None

    def _emit(self, frame: int, kind: str) -> list[Boundary]:
        if frame - self._last < self.o.min_scene or frame <= 0:
            return []
        self._last = frame
        return [Boundary(frame, kind)]

    def _d(self, t: int) -> float:
        return self._diff.get(t, 0.0)

    def _decide(self, p: int, final: bool) -> list[Boundary]:
        self._diff.pop(p - 3 * max(self.o.dissolve_half) - 4, None)
        f = self._f(p)
        out = self._fade(p, f)
        if f.flat or p < self._skip_until:
            return out
        if self._is_cut(p):
            return out + self._emit(p, "cut")
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
        before = self._f(a - 1)
        if run <= o.flash_frames and before is not None:
            back, close = self._comes_back(before, self._f(a), range(p, a + o.flash_frames + 1))
            if back is not None and self._flash(a - 1, a, back, close):
                return []  # a white or black flash inside one shot
        self._skip_until = p + 1
        return self._emit(a + run // 2, "fade")

    @staticmethod
    def _corr(a: _Features, b: _Features) -> float:
        """Luma correlation (-1..1) of two thumbnails."""
        return float(a.luma.ravel() @ b.luma.ravel()) / a.luma.size

    def _same_shot(self, a: _Features, b: _Features) -> bool:
        return self._corr(a, b) >= self.o.same_shot_corr

    def _motion(self, k: int, away: int) -> float:
        """The step into frame k as a measure of camera motion. A step that mostly changes the
        lightness (a flash beginning or ending, maybe right beside a cut) tells nothing about
        motion: the next step out, in direction `away`, stands in for it."""
        for _ in range(self.o.flash_frames + 1):
            f, g = self._f(k - 1), self._f(k)
            if f is None or g is None or abs(f.mean_l - g.mean_l) < self.o.flash_light:
                break
            k += away
        return self._d(k)

    def _stands_out(self, t: int, d: float) -> bool:
        """The step into frame t is larger than camera motion explains: compared with the
        adjacent steps only, since in fast cutting the step two frames away may be a cut too."""
        r = self.o.cut_ratio / 2
        if d >= r * (self._motion(t - 1, -1) + self._motion(t + 1, 1)) + 1e-3:
            return True
        # a lone frame between two shots makes two adjacent large steps; the larger is the cut
        before, after = self._d(t - 1), self._d(t + 1)
        if self.o.cut_min <= after <= d:
            return after >= r * (before + self._d(t + 2)) + 1e-3
        if self.o.cut_min <= before < d:
            return before >= r * (self._d(t - 2) + after) + 1e-3
        return False

    def _is_cut(self, t: int) -> bool:
        o = self.o
        d = self._d(t)
        if d < o.cut_min or not self._stands_out(t, d):
            return False
        prev, cur = self._f(t - 1), self._f(t)
        if prev is None or cur is None:
            return True
        if self._same_shot(prev, cur):
            return False  # brightness changed, structure did not: a light change, not a cut
        # t starts a run [t, ahead) or ends a run (behind, t): the one whose shot comes back
        # close, else the shorter
        ahead, close_ahead = self._comes_back(prev, cur, range(t + 1, t + o.flash_frames + 1))
        behind, close_behind = self._comes_back(cur, prev, range(t - 2, t - o.flash_frames - 2, -1))
        if ahead is not None and (behind is None or (close_ahead, t - 1 - behind) >= (close_behind, ahead - t)):
            return not self._flash(t - 1, t, ahead, close_ahead)
        if behind is not None:
            return not self._flash(behind, behind + 1, t, close_behind)
        return True

    def _comes_back(self, shot: _Features, run: _Features, frames: range) -> tuple[int | None, bool]:
        """The first of `frames` that is `shot`'s picture again after `run` left it, and whether
        it is close (within a third of the step from `shot` to `run`). Judged loosely, since the
        camera may move on fast during a flash, but with the shot's structure kept."""
        step = _coarse_mad(shot, run)
        for k in frames:
            f = self._f(k)
            if f is None:
                continue
            gap = _coarse_mad(f, shot)
            if gap < 0.8 * step and gap < _coarse_mad(f, run) and _coarse_corr(f, shot) >= self.o.flash_corr:
                return k, gap < 0.35 * step
        return None, False

    def _flash(self, before: int, start: int, after: int, close: bool) -> bool:
        """Whether frames [start, after), between frames `before` and `after` of one shot, are a
        flash rather than other content (an insert: two cuts, or a plain cut): each is flat or
        much lighter or darker than both sides, and the run keeps the shot's structure at both
        its ends (compared with the nearest shot frame, since the camera may move meanwhile).
        A lone frame whose shot comes back `close` to where it was is a stray frame: no cut."""
        if close and after - start == 1:
            return True
        o, a, b = self.o, self._f(before), self._f(after)
        for k in range(start, after):
            f = self._f(k)
            lighter, darker = f.mean_l - max(a.mean_l, b.mean_l), min(a.mean_l, b.mean_l) - f.mean_l
            if not f.flat and max(lighter, darker) < o.flash_light:
                return False
        first, last = self._f(start), self._f(after - 1)
        return ((first.flat or self._corr(first, a) >= o.flash_corr)
                and (last.flat or self._corr(last, b) >= o.flash_corr))

    def _dissolve(self, c: int) -> tuple[int, float]:
        """(half-length, change) of the widest dissolve window centred on frame c, or (0, 0)."""
        o = self.o
        for h in sorted(o.dissolve_half, reverse=True):
            if c - h < self._last:
                continue  # the window would reach back across the last boundary
            a, b = self._f(c - h), self._f(c + h)
            if a is None or b is None or b.flats - a.flats + a.flat:
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


@dataclass(frozen=True)
class SceneRun:
    """Consecutive frames of one scene, as the scene stream hands them on.

    `items` are what the caller streamed (decoded frames, arrays) in display order; `start` is the
    index of `items[0]` in the video and `at` its position in the scene (runs are cut at multiples
    of the run length from the scene's first frame). `first` / `last`: the run begins / ends its
    scene."""

    scene: int  # 0-based; what users see is 1-based
    kind: str  # how the scene begins: "start", "cut", "dissolve" or "fade"
    start: int
    at: int
    items: list
    first: bool
    last: bool


class SceneStream:
    """Iterate over `items` (frames in display order) as `SceneRun`s that never cross a scene
    boundary, each at most `run_length` frames. A run is handed on once the detector has settled
    its frames, so memory holds at most the detector's lookahead and one run, however long the
    video. After the iteration, `scenes` lists every scene and `count` the frames seen.

    `pixels(item)` gives the (H, W, 3) uint8 picture the detector looks at (default: `item.rgb`,
    or the item itself when it is an array)."""

    def __init__(self, items: Iterable, run_length: int, options: DetectorOptions = DetectorOptions(),
                 pixels: Callable | None = None):
        if run_length < 1:
            raise ValueError(f"run_length {run_length}: must be 1 or more")
        self.items, self.run_length, self.options = items, run_length, options
        self.pixels = pixels or (lambda x: x if isinstance(x, np.ndarray) else x.rgb)
        self.scenes: list[Scene] = []
        self.count = 0
        self._starts, self._kinds = [0], ["start"]
        self._pending: deque = deque()
        self._done = 0  # frames handed on

    def __iter__(self) -> Iterator[SceneRun]:
        det = SceneDetector(self.options)
        for item in self.items:
            self._pending.append(item)
            self.count += 1
            self._found(det.push(self.pixels(item)))
            yield from self._runs(det.settled, final=False)
        self._found(det.finish())
        yield from self._runs(self.count, final=True)
        ends = self._starts[1:] + [self.count]
        self.scenes = [Scene(i, s, e, k) for i, (s, e, k) in enumerate(zip(self._starts, ends, self._kinds))
                       if self.count]

    def _found(self, boundaries: list[Boundary]) -> None:
        for b in boundaries:
            if b.frame > self._starts[-1]:  # the detector emits them in increasing order
                self._starts.append(b.frame)
                self._kinds.append(b.kind)

    def _runs(self, settled: int, final: bool) -> Iterator[SceneRun]:
        while self._pending:
            p = self._done
            s = bisect.bisect_right(self._starts, p) - 1
            e = self._starts[s + 1] if s + 1 < len(self._starts) else (self.count if final else None)
            end = p + self.run_length if e is None else min(e, p + self.run_length)
            # frame `end` settled: a boundary there would be known by now
            if not (final or end == e or end < settled):
                return
            items = [self._pending.popleft() for _ in range(end - p)]
            self._done = end
            yield SceneRun(s, self._kinds[s], p, p - self._starts[s], items, p == self._starts[s], end == e)


def scene_rows(scenes: list[Scene], times: list[float], end: float) -> list[dict]:
    """What `cinefx scenes` shows of each scene: 1-based number, kind, frames [start, end) and
    times in seconds (`times[i]`: frame i's display time; `end`: the video's end)."""
    return [{"scene": s.index + 1, "kind": s.kind, "start_frame": s.start, "end_frame": s.end,
             "start_time": round(times[s.start], 6),
             "end_time": round(times[s.end] if s.end < len(times) else end, 6)} for s in scenes]


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
    stream = SceneStream(frames, 1, options)
    for _ in stream:
        pass
    return stream.scenes
