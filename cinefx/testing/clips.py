"""Honest test footage: camera moves over real photographs (scikit-image ships them), with cuts,
dissolves, fades and flashes where asked, written through PyAV with any codec, pixel format,
timing, rotation or audio a test needs. Used by the tests, the benchmarks and `samples/`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import islice
from pathlib import Path

import av
import cv2
import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "motorcycle_left")


def photo(name: str) -> np.ndarray:
    """A real photograph from scikit-image as (H, W, 3) uint8 RGB."""
    from skimage import data

    if name == "motorcycle_left":
        img = data.stereo_motorcycle()[0]
    else:
        img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return np.ascontiguousarray(img[..., :3])


@dataclass(frozen=True)
class Move:
    """A camera move over one photograph: the crop window goes from `start` to `end`.

    Windows are (cx, cy, zoom) in fractions of the photo: centre, and the window's size as a share
    of the largest window of the output's aspect ratio that fits in the photo (1.0 = that window).
    """

    photo: str
    frames: int
    start: tuple[float, float, float] = (0.5, 0.5, 1.0)
    end: tuple[float, float, float] = (0.5, 0.5, 0.8)


def render_move(move: Move, size: tuple[int, int], image: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Yield `move.frames` frames of (H, W, 3) uint8 at `size` = (width, height), eased in and out."""
    img = photo(move.photo) if image is None else image
    ph, pw = img.shape[:2]
    w, h = size
    aspect = w / h
    for i in range(move.frames):
        t = i / max(1, move.frames - 1)
        t = t * t * (3 - 2 * t)  # smoothstep: a camera operator eases in and out
        cx, cy, zoom = (a + (b - a) * t for a, b in zip(move.start, move.end))
        win_h = min(ph, pw / aspect) * zoom
        win_w = win_h * aspect
        x0 = np.clip(cx * pw - win_w / 2, 0, pw - win_w)
        y0 = np.clip(cy * ph - win_h / 2, 0, ph - win_h)
        s = w / win_w
        m = np.array([[s, 0, -x0 * s], [0, s, -y0 * s]], np.float32)
        yield cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)


def cut(*moves: Move, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Moves joined by hard cuts."""
    for m in moves:
        yield from render_move(m, size)


def dissolve(a: Sequence[np.ndarray], b: Sequence[np.ndarray], length: int) -> list[np.ndarray]:
    """`a` then `b`, overlapping by `length` frames with a linear cross-fade."""
    out = list(a[:-length]) if length else list(a)
    for i in range(length):
        alpha = (i + 1) / (length + 1)
        out.append(cv2.addWeighted(a[len(a) - length + i], 1 - alpha, b[i], alpha, 0))
    out.extend(b[length:])
    return out


def fade_through_black(a: Sequence[np.ndarray], b: Sequence[np.ndarray], out_len: int, in_len: int,
                       hold: int = 2) -> list[np.ndarray]:
    """`a` fades to black over its last `out_len` frames, `hold` black frames, `b` fades in."""
    res = list(a[:-out_len])
    for i in range(out_len):
        res.append((a[len(a) - out_len + i] * (1 - (i + 1) / out_len)).astype(np.uint8))
    res.extend(np.zeros_like(a[0]) for _ in range(hold))
    for i in range(in_len):
        res.append((b[i] * ((i + 1) / (in_len + 1))).astype(np.uint8))
    res.extend(b[in_len:])
    return res


def flash(frames: list[np.ndarray], at: int, length: int = 2, gain: float = 2.2) -> list[np.ndarray]:
    """A camera flash: `length` frames from `at` brighten strongly, then the shot carries on."""
    out = list(frames)
    for i in range(at, min(at + length, len(out))):
        f = out[i].astype(np.float32) * gain + 40
        out[i] = np.clip(f, 0, 255).astype(np.uint8)
    return out


def tone(t: np.ndarray, channels: int = 2) -> np.ndarray:
    """A soft chord progression (two seconds a chord) sampled at times `t` (seconds):
    (channels, len(t)) float32 in [-1, 1]. Audible, so a dropped or shifted track shows."""
    chords = np.array([(220.0, 277.2, 329.6), (196.0, 246.9, 293.7), (174.6, 220.0, 261.6),
                       (164.8, 207.7, 246.9)])
    idx = (t // 2).astype(int) % len(chords)
    sig = sum(np.sin(2 * np.pi * chords[idx, j] * t) for j in range(3)) * 0.12
    return np.stack([sig * (1 - 0.2 * c) for c in range(channels)]).astype(np.float32)


_AUDIO_ENCODERS = {"aac": ("aac", "fltp"), "mp3": ("libmp3lame", "fltp"), "ac3": ("ac3", "fltp"),
                   "opus": ("libopus", "flt"), "pcm": ("pcm_s16le", "s16"), "flac": ("flac", "s16")}


def write_clip(path: str | Path, frames: Iterable[np.ndarray], fps: Fraction | int = 24,
               codec: str = "libx264", pix_fmt: str = "yuv420p", audio: str | None = "aac",
               time_base: Fraction | None = None, pts: Sequence[int] | None = None,
               rotation: int = 0, colorspace: str = "ITU709", color_range: str = "MPEG",
               tag_colour: bool = True, options: dict | None = None, audio_start: float = 0.0) -> Path:
    """Encode `frames` ((H, W, 3) uint8 RGB) to `path`, with `tone()` audio of the same length.

    pts: explicit presentation times in `time_base` (variable frame rate, offset starts); default
    is one frame per 1/fps from 0. audio: a key of `_AUDIO_ENCODERS` or None; it starts at
    `audio_start` seconds (a clip whose clock starts late has its sound start with its pictures).
    """
    path = Path(path)
    fps = Fraction(fps)
    # AVI counts frames, not ticks: at 1/90000 its header would claim thousands of frames
    tb = time_base or (1 / fps if fps.numerator == 1 or codec != "libx264" or path.suffix == ".avi"
                       else Fraction(1, 90000))
    opts = {"movie_timescale": str(tb.denominator)} if path.suffix in (".mp4", ".mov") else {}
    container = av.open(str(path), mode="w", options=opts)
    vopts = {"crf": "20", "preset": "veryfast"} if codec == "libx264" else {}
    vopts.update(options or {})
    stream = container.add_stream(codec, rate=fps, options=vopts)
    stream.pix_fmt = pix_fmt
    stream.time_base = tb
    stream.codec_context.time_base = tb
    if tag_colour:
        stream.codec_context.colorspace = int(getattr(av.video.reformatter.Colorspace, colorspace))
        stream.codec_context.color_range = int(getattr(av.video.reformatter.ColorRange, color_range))
    if rotation:
        stream.set_display_rotation(rotation)
    sound = _AudioTrack(container, audio, start=audio_start) if audio else None
    k = (rotation // 90) % 4
    for i, rgb in enumerate(frames):
        if k:
            rgb = np.ascontiguousarray(np.rot90(rgb, -k))
        if i == 0:
            stream.height, stream.width = rgb.shape[:2]
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
            format=pix_fmt, dst_colorspace=colorspace, src_colorspace=colorspace,
            src_color_range="JPEG", dst_color_range=color_range)
        frame.pts = pts[i] if pts is not None else round(i / fps / tb)
        frame.time_base = tb
        for packet in stream.encode(frame):
            container.mux(packet)
        if sound:
            sound.write_until(float(frame.pts * tb) + float(1 / fps))
    for packet in stream.encode(None):
        container.mux(packet)
    if sound:
        sound.flush()
    container.close()
    return path


class _AudioTrack:
    """`tone()` encoded as the clip goes, so long clips never sit in memory."""

    def __init__(self, container, kind: str, rate: int = 48000, start: float = 0.0):
        codec, self.fmt = _AUDIO_ENCODERS[kind]
        self.start = round(start * rate)  # in samples
        self.stream = container.add_stream(codec, rate=rate)
        self.stream.layout = "stereo"
        self.container, self.rate, self.done = container, rate, 0
        self.frame_size = 1152 if codec == "libmp3lame" else 960 if codec == "libopus" else 1024

    def write_until(self, seconds: float) -> None:
        while (self.start + self.done + self.frame_size) / self.rate <= seconds:
            t = (self.done + np.arange(self.frame_size)) / self.rate
            sig = tone(t)
            if self.fmt == "s16":
                arr = (np.clip(sig.T, -1, 1) * 32767).astype(np.int16).reshape(1, -1)
            elif self.fmt == "flt":
                arr = np.ascontiguousarray(sig.T).reshape(1, -1)
            else:
                arr = sig
            frame = av.AudioFrame.from_ndarray(arr, format=self.fmt, layout="stereo")
            frame.sample_rate = self.rate
            frame.pts = self.start + self.done
            frame.time_base = Fraction(1, self.rate)
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
            self.done += self.frame_size

    def flush(self) -> None:
        for packet in self.stream.encode(None):
            self.container.mux(packet)


def events_clip(size: tuple[int, int] = (160, 90), shot: int = 40) -> tuple[list[np.ndarray], dict[str, int]]:
    """Four shots joined by a hard cut, a dissolve and a fade, with a camera flash inside the
    second shot. Returns the frames and where each event is (frame index of the new scene:
    the cut frame, the dissolve's middle, the fade's darkest point; the flash's first frame)."""
    a = list(render_move(Move("astronaut", shot, (0.45, 0.4, 0.9), (0.55, 0.45, 0.7)), size))
    b = list(render_move(Move("coffee", shot, (0.4, 0.5, 1.0), (0.6, 0.5, 0.85)), size))
    c = list(render_move(Move("chelsea", shot, (0.5, 0.5, 0.75), (0.45, 0.45, 0.95)), size))
    d = list(render_move(Move("rocket", shot, (0.5, 0.6, 0.9), (0.5, 0.4, 0.9)), size))
    b = flash(b, at=shot // 2, length=2)
    dis = 12
    frames = a + dissolve(b, c, dis)
    events = {"cut": shot, "flash": shot + shot // 2, "dissolve": 2 * shot - dis // 2}
    before = len(frames)
    frames = fade_through_black(frames, d, out_len=8, in_len=8, hold=3)
    events["fade"] = before - 8 + 8 + 1  # mid of the black hold
    return frames, events


# Action-scene editing: (photo, frames, camera start, camera end) per shot, brisk moves, shots of
# 2 to 10 frames. Where `frames` is a list it holds an insert: [host frames, (another Move's
# arguments), host frames]; the host's move carries on under the insert, as when an editor cuts
# away and back.
FAST_SHOTS = (
    ("astronaut", 8, (0.40, 0.40, 0.9), (0.55, 0.35, 0.7)),
    ("coffee", 5, (0.35, 0.5, 1.0), (0.5, 0.5, 0.85)),
    ("chelsea", [4, ("rocket", 2, (0.5, 0.7, 0.8), (0.5, 0.6, 0.8)), 4], (0.45, 0.5, 1.0), (0.55, 0.45, 0.75)),
    ("camera", 3, (0.5, 0.4, 0.9), (0.45, 0.45, 0.8)),
    ("rocket", 6, (0.5, 0.3, 0.7), (0.5, 0.5, 0.75)),
    ("coffee", 9, (0.7, 0.5, 0.8), (0.4, 0.45, 0.8)),
    ("astronaut", [3, ("camera", 3, (0.4, 0.5, 0.9), (0.6, 0.5, 0.8)), 4], (0.5, 0.3, 0.8), (0.45, 0.4, 0.6)),
    ("chelsea", 2, (0.3, 0.4, 0.8), (0.35, 0.4, 0.8)),
    ("rocket", 7, (0.5, 0.6, 1.0), (0.5, 0.4, 0.8)),
    ("camera", 4, (0.5, 0.5, 1.0), (0.5, 0.5, 0.7)),
    ("astronaut", 10, (0.6, 0.45, 0.9), (0.45, 0.4, 0.9)),
)


def fast_cut_clip(size: tuple[int, int] = (160, 90), shots=FAST_SHOTS) -> tuple[Iterator[np.ndarray], list[int]]:
    """Hard cuts between short shots (trailers, music videos, action scenes); the default holds a
    2-frame and a 3-frame insert of another photograph inside a shot. Returns the frames, rendered
    as they are consumed so long clips never sit in memory, and the cut frames (the first frame
    of each new shot; an insert makes two)."""
    cuts, n = [], 0
    for _, length, _, _ in shots:
        for part in length if isinstance(length, list) else [length]:
            cuts.append(n)
            n += part if isinstance(part, int) else part[1]

    def frames() -> Iterator[np.ndarray]:
        for name, length, start, end in shots:
            parts = length if isinstance(length, list) else [length]
            host = render_move(Move(name, sum(p if isinstance(p, int) else p[1] for p in parts), start, end), size)
            for part in parts:
                if isinstance(part, int):
                    yield from islice(host, part)
                else:
                    yield from render_move(Move(*part), size)
                    for _ in range(part[1]):
                        next(host)  # the host's camera keeps moving under the insert

    return frames(), cuts[1:]


def fast_shots(n: int, seed: int = 0) -> tuple:
    """`n` random shots in the form of FAST_SHOTS: 2 to 10 frames, each photograph unlike the one
    before, camera moves of up to 1.5 % of the photograph per frame (across it in three seconds),
    every seventh shot with a 2- or 3-frame insert of another photograph."""
    rng = np.random.default_rng(seed)
    shots, last = [], None

    def move(start: tuple[float, ...], frames: int) -> tuple[float, ...]:
        return tuple(float(v) for v in np.clip(np.add(start, rng.uniform(-0.015, 0.015, 3) * (frames - 1)), 0.3, 1.0))

    for i in range(n):
        name = str(rng.choice([p for p in PHOTOS if p != last]))
        start = tuple(float(v) for v in rng.uniform((0.35, 0.35, 0.75), (0.65, 0.65, 1.0)))
        if i % 7 == 3:
            other = str(rng.choice([p for p in PHOTOS if p != name]))
            spot = (float(rng.uniform(0.4, 0.6)), float(rng.uniform(0.4, 0.6)), 0.9)
            before, ins, after = (int(k) for k in rng.integers((2, 2, 2), (5, 4, 5)))
            shots.append((name, [before, (other, ins, spot, move(spot, ins)), after], start,
                          move(start, before + ins + after)))
        else:
            length = int(rng.integers(2, 11))
            shots.append((name, length, start, move(start, length)))
        last = name
    return tuple(shots)
