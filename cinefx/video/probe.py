"""What a video file is: size, timing, rotation, colour and audio, read once before any work.

`probe` opens the file, checks that it is a usable video and decodes its first frame, because
several facts (colour tags, rotation, whether anything decodes at all) only show on a frame.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from cinefx.errors import InputFileError, MissingFileError

# Demuxers that hand a single picture to FFmpeg as a one-frame "video".
_IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "tiff_pipe",
                  "gif_pipe", "j2k_pipe", "pgm_pipe", "ppm_pipe", "qoi_pipe", "jpegxl_pipe"}

# Damaged packets skipped while looking for the first frame before the file counts as undecodable.
_MAX_REFUSED_FIRST = 32

# Where FFmpeg finds no average rate, the rate is measured from this many packets' timestamps.
_RATE_PACKETS = 48
# Rates cameras and editors use: a measured rate this close to one of them is that one.
_COMMON_RATES = tuple(Fraction(r) for r in ("24000/1001", "24", "25", "30000/1001", "30", "48",
                                            "50", "60000/1001", "60", "100", "120000/1001", "120"))

# Colour matrix codes (H.273) that swscale converts, mapped to PyAV's names.
_MATRIX_NAMES = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "ITU601", 7: "SMPTE240M", 9: "BT2020"}


@dataclass(frozen=True)
class AudioInfo:
    index: int
    codec: str
    sample_rate: int
    channels: int


@dataclass(frozen=True)
class ColourInfo:
    """Colour of the source as used for YUV → RGB. `assumed` lists what was not tagged. Primaries
    and transfer (PQ, HLG, …) are what `cinefx.grade.ocio.choose_input` reads."""

    matrix: int  # H.273 matrix coefficients actually used
    full_range: bool
    primaries: int  # H.273 code, 2 = unspecified
    transfer: int  # H.273 code, 2 = unspecified
    assumed: tuple[str, ...] = ()

    @property
    def matrix_name(self) -> str:
        return _MATRIX_NAMES.get(self.matrix, "ITU709")


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    container: str
    codec: str
    width: int  # display orientation (after rotation)
    height: int
    coded_width: int  # as stored in the stream
    coded_height: int
    rotation: int  # counter-clockwise degrees, as PyAV's `VideoFrame.rotation`
    time_base: Fraction
    fps: Fraction  # average rate; the per-frame times are what the output keeps
    frame_count: int  # declared by the container, 0 when unknown
    duration: float  # seconds, 0.0 when unknown
    start_time: float  # display time of the first frame, seconds
    pix_fmt: str
    bit_depth: int
    colour: ColourInfo
    sample_aspect_ratio: Fraction | None
    audio: tuple[AudioInfo, ...]
    field_order: str = "progressive"  # or "tff" / "bff": interlaced, top or bottom field first
    timecode: str = ""  # start timecode "HH:MM:SS:FF" (";" before the frames: drop-frame), "" if none

    @property
    def display_size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def frame_step(self) -> int:
        """One frame at the average rate, in time-base ticks (at least 1)."""
        return max(1, round(1 / (self.fps * self.time_base))) if self.fps else 1


_NOT_FILES = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))


def _fail(path: Path, what: str) -> InputFileError:
    return InputFileError(f"{path}: {what}")


def open_container(path: Path) -> av.container.InputContainer:
    """Open `path` for reading or raise a one-line typed error naming it."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such file")
    if path.is_dir():
        raise _fail(path, "is a folder, not a video file")
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):  # a device or pipe: stat says 0 bytes, and reading may never end
        kind = next((k for test, k in _NOT_FILES if test(mode)), "a special file")
        raise _fail(path, f"is not a regular file ({kind}); give a video file")
    if not os.access(path, os.R_OK):
        raise _fail(path, "cannot be read (permission denied)")
    if path.stat().st_size == 0:
        raise _fail(path, "is empty (0 bytes)")
    try:
        return av.open(str(path), mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as ex:
        raise _fail(path, f"is not a readable video ({_ffmpeg_reason(ex)})") from ex


def demux(container: av.container.InputContainer, *streams) -> Iterator[av.Packet]:
    """`container.demux(*streams)`, for files whose damage announces a new stream as they play.

    An MPEG transport stream's program table can be damaged into naming a stream the header did
    not: FFmpeg adds it while reading, and PyAV, flushing every stream at the end, looks it up in
    its list of the first ones and raises IndexError. The flush reaches the new streams last, after
    the ones asked for, so that error is the end of their packets."""
    try:
        yield from container.demux(*streams)
    except IndexError:
        return


def _ffmpeg_reason(ex: Exception) -> str:
    text = getattr(ex, "strerror", None) or str(ex)
    return text.split(":")[0].strip().rstrip(".") if text else type(ex).__name__


def _colour(path: Path, stream, frame) -> ColourInfo:
    ctx = stream.codec_context
    assumed = []
    matrix = int(frame.colorspace or 0) or int(ctx.colorspace or 0)
    if matrix in (0, 2) or matrix not in _MATRIX_NAMES:
        # Untagged: the convention players follow is BT.709 for HD, BT.601 below it.
        matrix = 1 if max(stream.codec_context.height, stream.codec_context.width) >= 1280 \
            or stream.codec_context.height >= 720 else 5
        assumed.append("matrix")
    rng = int(frame.color_range or 0) or int(ctx.color_range or 0)
    fmt = frame.format.name
    if rng == 0:
        rng = 2 if fmt.startswith("yuvj") or not fmt.startswith("yuv") else 1
        assumed.append("range")
    primaries = int(frame.color_primaries or 0) or int(ctx.color_primaries or 0) or 2
    transfer = int(frame.color_trc or 0) or int(ctx.color_trc or 0) or 2
    return ColourInfo(matrix=matrix, full_range=rng == 2, primaries=primaries, transfer=transfer,
                      assumed=tuple(assumed))


def _bit_depth(fmt) -> int:
    try:
        return max(c.bits for c in fmt.components)
    except Exception:
        return 8


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read what cinefx needs to know about `path`; raise `InputFileError` if it is not a usable video."""
    path = Path(path)
    with open_container(path) as container:
        fmt_name = container.format.name
        if fmt_name in _IMAGE_FORMATS or fmt_name.endswith("_pipe"):
            raise _fail(path, "is a still image, not a video")
        if not container.streams.video:
            kind = "an audio-only file" if container.streams.audio else "a file with no video stream"
            raise _fail(path, f"has no video stream ({kind})")
        stream = container.streams.video[0]
        if stream.codec_context.codec.name in ("png", "mjpeg", "bmp", "tiff", "webp") and \
                (stream.frames or 0) <= 1 and stream.average_rate is None:
            raise _fail(path, "is a still image, not a video")
        first = None
        refused = 0
        packets = demux(container, stream)
        times = []
        try:
            for packet in packets:
                times.append(packet.pts)
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    # a damaged packet before the first frame comes out: the reader stands in for
                    # its frame; only a file that refuses many is unusable
                    refused += 1
                    if refused <= _MAX_REFUSED_FIRST:
                        continue
                    raise
                if frames:
                    first = frames[0]
                    break
        except av.error.FFmpegError as ex:
            raise _fail(path, f"cannot be decoded ({_ffmpeg_reason(ex)})") from ex
        if first is None:
            raise _fail(path, "contains no decodable video frames (empty or truncated)")
        ctx = stream.codec_context
        rotation = int(getattr(first, "rotation", 0) or 0) % 360
        if rotation % 90:
            raise _fail(path, f"has a display rotation of {rotation}°, only multiples of 90° are supported")
        cw, ch = first.width, first.height
        w, h = (ch, cw) if rotation in (90, 270) else (cw, ch)
        tb = stream.time_base or Fraction(1, 90000)
        fps = stream.average_rate
        if fps is None:
            times += [p.pts for _, p in zip(range(_RATE_PACKETS), packets)]
            fps = _measured_rate(times, tb)
        fps = fps or stream.guessed_rate or stream.base_rate or Fraction(25)
        duration = float(stream.duration * tb) if stream.duration else (
            container.duration / 1e6 if container.duration else 0.0)
        start = float(first.pts * tb) if first.pts is not None else 0.0
        audio = tuple(AudioInfo(index=a.index, codec=a.codec_context.name,
                                sample_rate=a.codec_context.sample_rate or 0,
                                channels=a.codec_context.channels or 0)
                      for a in container.streams.audio)
        sar = ctx.sample_aspect_ratio
        return VideoInfo(
            path=path, container=fmt_name, codec=ctx.name, width=w, height=h,
            coded_width=cw, coded_height=ch, rotation=rotation, time_base=tb, fps=Fraction(fps),
            frame_count=int(stream.frames or 0), duration=duration, start_time=start,
            pix_fmt=first.format.name, bit_depth=_bit_depth(first.format),
            colour=_colour(path, stream, first),
            sample_aspect_ratio=Fraction(sar) if sar and sar != 1 and sar.numerator else None,
            audio=audio, field_order=_field_order(ctx, first), timecode=_timecode(container),
        )


def _measured_rate(times: list[int | None], tb: Fraction) -> Fraction | None:
    """The frame rate the packets' presentation times (in `tb`) keep, or None if they do not say.

    FFmpeg leaves the average rate unknown where one damaged timestamp spoils its estimate (its
    guess can then be ten times the rate, and every frame would seem to have nine lost beside
    it). The median step between sorted times ignores the odd damaged one."""
    steps = np.diff(np.sort([t for t in times if t is not None]))
    steps = steps[steps > 0]
    if len(steps) < 2:
        return None
    step = typical_step(steps) * tb
    near = min(_COMMON_RATES, key=lambda r: abs(r * step - 1))
    return near if abs(near * step - 1) < 0.002 else Fraction(1 / step).limit_denominator(1001)


def typical_step(steps: np.ndarray) -> float:
    """The one-frame step of (F,) steps between frame times: the mean of those within 10 % of
    the median, so a damaged time or a gap does not pull it, and rounded times (41 and 42 ms for
    24 fps at 1/1000 s) give the exact step."""
    median = np.median(steps)
    return float(steps[np.abs(steps - median) <= 0.1 * median].mean())


def _timecode(container) -> str:
    """The start timecode editors conform by: on the video or a timecode (data) track, as cameras
    and MOV/MP4 muxers put it, else the container's tag."""
    for st in (*container.streams.video, *container.streams.data):
        for k, v in st.metadata.items():
            if k.lower() == "timecode":
                return str(v)
    return next((str(v) for k, v in container.metadata.items() if k.lower() == "timecode"), "")


# FFmpeg's AVFieldOrder: 2 and 4 code the top field first, 3 and 5 the bottom field.
_BOTTOM_FIRST = {3, 5}


def _field_order(ctx, first) -> str:
    if not getattr(first, "interlaced_frame", False):
        return "progressive"
    return "bff" if int(getattr(ctx, "field_order", 0) or 0) in _BOTTOM_FIRST else "tff"
