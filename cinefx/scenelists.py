"""Scene lists editors read: PySceneDetect's CSV, a CMX 3600 EDL and an OpenTimelineIO timeline.

Each lists the scenes of one source as events of that source, so an editor can cut the original
(or cinefx's output, which keeps its frames and timing) at the same frames:

- CSV: PySceneDetect's `list-scenes` columns, so scripts and `scenedetect load-scenes` read it;
  times come from the frames' own timestamps when given (variable frame rate), else frame / fps.
- EDL: CMX 3600 cuts, source and record timecode starting at the source's own start timecode
  (from its timecode track), counted at the nominal rate; drop-frame when that timecode is
  (";" before the frames). A dissolve or fade cinefx found is already in the picture, so every
  event is a cut and the kind of boundary is a comment.
- OTIO: one clip per scene on a video track, the kind of boundary in the clip's metadata
  (`metadata["cinefx"]`), the source as the media reference. Needs `opentimelineio`.

Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from cinefx.errors import OptionError
from cinefx.fsutil import write_text
from cinefx.presets import clip_path, clip_text
from cinefx.scenes import Scene

FORMATS = (".csv", ".edl", ".otio")

# PySceneDetect's `write_scene_list` header, column for column.
CSV_COLUMNS = ("Scene Number", "Start Frame", "Start Timecode", "Start Time (seconds)", "End Frame",
               "End Timecode", "End Time (seconds)", "Length (frames)", "Length (timecode)",
               "Length (seconds)")


@dataclass(frozen=True)
class Timing:
    """When a source's frames are.

    fps: nominal frame rate, which timecode counts (VideoInfo.fps).
    times: seconds from the first frame to the start of each frame, then to the end of the last
        (frames + 1 values; see `from_pts`), for variable frame rate; empty: frame / fps.
    start_timecode: the source's timecode at its first frame, "HH:MM:SS:FF" (";" before the
        frames: drop-frame); empty: 00:00:00:00.
    """

    fps: Fraction
    times: tuple[float, ...] = ()
    start_timecode: str = ""

    @classmethod
    def from_pts(cls, fps: Fraction, time_base: Fraction, pts: Sequence[int], end_pts: int,
                 start_timecode: str = "") -> "Timing":
        """From the frames' timestamps (`Frame.pts`) and the end of the last frame (its pts plus
        its duration), in `time_base` units."""
        first = pts[0] if pts else 0
        return cls(Fraction(fps), tuple(float((p - first) * time_base) for p in (*pts, end_pts)), start_timecode)

    def seconds(self, frame: int) -> float:
        """Start of frame `frame` (or the end of the last, at `frames`) from the first frame."""
        return self.times[frame] if self.times else float(frame / Fraction(self.fps))

    def length(self, scene: Scene) -> float:
        return self.seconds(scene.end) - self.seconds(scene.start) if self.times else self.seconds(scene.frames)

    def clock(self, frames: int, start: int = 0) -> str:
        """HH:MM:SS.mmm of `frames` frames after frame `start`. At a constant rate computed as
        PySceneDetect does (a float division, not the exact fraction), so its columns match ours
        to the last digit."""
        if self.times:
            return _clock(self.times[start + frames] - self.times[start])
        return _clock(frames / float(self.fps))


def write_scene_list(path: str | os.PathLike, scenes: Sequence[Scene], timing: Timing,
                     source: str | os.PathLike | None = None) -> Path:
    """Write `scenes` of `source` in the format `path`'s suffix names (.csv, .edl or .otio).

    Raises `OptionError` for another suffix or a malformed start timecode."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind == ".csv":
        text = scene_csv(scenes, timing)
    elif kind == ".edl":
        text = scene_edl(scenes, timing, source)
    elif kind == ".otio":
        text = scene_otio(scenes, timing, source)
    else:
        raise OptionError(f"{clip_path(path)}: a scene list is a .csv (PySceneDetect), .edl (CMX 3600) "
                          "or .otio (OpenTimelineIO) file")
    return write_text(path, text)


def scene_csv(scenes: Sequence[Scene], timing: Timing) -> str:
    """PySceneDetect's scene-list CSV: a row of cut timecodes, the header, one row per scene
    (frames numbered from 1, the end frame inclusive)."""
    out = io.StringIO()
    rows = csv.writer(out, lineterminator="\n")
    rows.writerow(["Timecode List:", *(timing.clock(s.start) for s in scenes[1:])])
    rows.writerow(CSV_COLUMNS)
    for n, s in enumerate(scenes, 1):
        rows.writerow([n, s.start + 1, timing.clock(s.start), f"{timing.seconds(s.start):.3f}", s.end,
                       timing.clock(s.end), f"{timing.seconds(s.end):.3f}", s.frames,
                       timing.clock(s.frames, s.start), f"{timing.length(s):.3f}"])
    return out.getvalue()


def scene_edl(scenes: Sequence[Scene], timing: Timing, source: str | os.PathLike | None = None,
              title: str = "", reel: str = "AX") -> str:
    """A CMX 3600 EDL cutting `source` into `scenes`, both sides at the source's timecode."""
    first, drop = parse_timecode(timing.start_timecode, timing.fps)
    name = Path(source).name if source else ""
    title = " ".join((title or Path(name).stem or "cinefx scenes").split())
    lines = [f"TITLE: {clip_text(title, 70)}", f"FCM: {'DROP FRAME' if drop else 'NON-DROP FRAME'}", ""]
    for n, s in enumerate(scenes, 1):
        tc_in, tc_out = (format_timecode(first + f, timing.fps, drop) for f in (s.start, s.end))
        lines.append(f"{n:03d}  {reel[:8]:<8} V     C        {tc_in} {tc_out} {tc_in} {tc_out}")
        if name:
            lines.append(f"* FROM CLIP NAME: {name}")
        lines.append(f"* CINEFX SCENE {s.index + 1}: {s.kind}")
    return "\n".join(lines) + "\n"


def scene_otio(scenes: Sequence[Scene], timing: Timing, source: str | os.PathLike | None = None,
               name: str = "") -> str:
    """An OpenTimelineIO timeline (JSON): one clip per scene, all from `source`."""
    try:
        import opentimelineio as otio
    except ImportError:
        raise OptionError("an .otio scene list needs OpenTimelineIO: pip install opentimelineio (a cinefx dependency: reinstall cinefx)") from None
    rate = float(timing.fps)
    first, _ = parse_timecode(timing.start_timecode, timing.fps)
    stem = Path(source).stem if source else "scenes"
    total = scenes[-1].end if scenes else 0
    url = Path(source).absolute().as_uri() if source else ""

    def span(start: int, frames: int):
        return otio.opentime.TimeRange(otio.opentime.RationalTime(first + start, rate),
                                       otio.opentime.RationalTime(frames, rate))

    timeline = otio.schema.Timeline(name=name or stem, global_start_time=otio.opentime.RationalTime(first, rate))
    track = otio.schema.Track(name="Video 1", kind=otio.schema.TrackKind.Video)
    for s in scenes:
        media = (otio.schema.ExternalReference(target_url=url, available_range=span(0, total)) if url
                 else otio.schema.MissingReference())
        track.append(otio.schema.Clip(
            name=f"{stem} scene {s.index + 1}", media_reference=media, source_range=span(s.start, s.frames),
            metadata={"cinefx": {"scene": s.index, "kind": s.kind, "start_frame": s.start, "end_frame": s.end,
                                 "start_seconds": timing.seconds(s.start), "end_seconds": timing.seconds(s.end)}}))
    timeline.tracks.append(track)
    return otio.adapters.write_to_string(timeline, "otio_json")


# -- timecode ------------------------------------------------------------------------------

def _clock(seconds: float) -> str:
    """HH:MM:SS.mmm, as PySceneDetect writes times."""
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    return f"{h:02d}:{m:02d}:{ms // 1000:02d}.{ms % 1000:03d}"


def _counting(fps: Fraction) -> tuple[int, int]:
    """(frames a timecode second counts, frames dropped a minute in drop-frame): 29.97 counts
    30 and drops 2, 59.94 counts 60 and drops 4 (SMPTE ST 12-1)."""
    base = round(fps)
    return base, 2 * base // 30


def parse_timecode(text: str, fps: Fraction) -> tuple[int, bool]:
    """(frame count, drop-frame) of timecode "HH:MM:SS:FF" ("HH:MM:SS;FF" or "." before the
    frames: drop-frame) at `fps`; ("", fps) is (0, False). Raises `OptionError` if malformed."""
    text = text.strip()
    if not text:
        return 0, False
    base, dropped = _counting(fps)
    drop = text[-3:-2] in (";", ".") and dropped > 0 and Fraction(fps).denominator != 1
    parts = text.replace(";", ":").replace(".", ":").split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise OptionError(f"start timecode {clip_text(text, 20)!r}: expected HH:MM:SS:FF")
    hh, mm, ss, ff = map(int, parts)
    if mm > 59 or ss > 59 or ff >= base or (drop and ss == 0 and ff < dropped and mm % 10):
        raise OptionError(f"start timecode {clip_text(text, 20)!r}: not a timecode at {float(fps):g} fps")
    minutes = 60 * hh + mm
    frames = (3600 * hh + 60 * mm + ss) * base + ff
    return frames - (dropped * (minutes - minutes // 10) if drop else 0), drop


def format_timecode(frames: int, fps: Fraction, drop: bool = False) -> str:
    """Timecode of frame count `frames` at `fps` (24-hour wrap), ";" before drop-frame frames."""
    base, dropped = _counting(fps)
    if drop:
        per10 = 600 * base - 9 * dropped  # frames in ten minutes: the tenth minute drops none
        tens, rest = divmod(frames, per10)
        frames += 9 * dropped * tens + (dropped * ((rest - dropped) // (60 * base - dropped)) if rest > dropped else 0)
    ff, secs = frames % base, frames // base
    sep = ";" if drop else ":"
    return f"{secs // 3600 % 24:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}{sep}{ff:02d}"
