"""Encode RGB frames with libx264, libx265 or ProRes, copy the source's audio, and put the file in
place atomically.

Rec.709 output is 8-bit 4:2:0 with the source's primaries and transfer (the grade does not convert
them); output in another colour space (`cinefx.grade.ocio.output_tags`: log, HDR, BT.2020 for
grading downstream) is 10-bit H.264 (High 10) or HEVC (Main 10) from 16-bit RGB, tagged as that
space. ProRes is always 422 HQ (10-bit 4:2:2) in a .mov, tagged the same way.

The output is written to a hidden temporary file beside the target (named by `fsutil`, so a later
run removes it if this one is killed) and renamed over it only when everything succeeded and the
finished file reads back whole; any failure or interruption removes the temporary file, so the
output path holds either the finished file or whatever was there before.
"""

from __future__ import annotations

import errno
import functools
import io
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
from av.video.reformatter import Interpolation

from cinefx import fsutil
from cinefx.errors import OptionError, OutputError
from cinefx.video.probe import VideoInfo, demux, open_container
from cinefx.video.reader import NO_INDEX, restart_offsets
from cinefx.worker import Worker

if TYPE_CHECKING:
    from cinefx.grade.ocio import OutputTags

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
                "slower", "veryslow", "placebo")

# Containers whose muxer takes `movie_timescale`: without it the first frame's time is rounded to
# whole milliseconds in the edit list and every frame shifts by up to 1 ms.
_MOV_FAMILY = {"mp4", "mov"}
# What MP4 players actually decode; the muxer would also take PCM (ISO 23003-5), which few play.
_MP4_AUDIO = {"aac", "mp3", "mp3float", "ac3", "eac3", "opus", "alac", "flac"}
_MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
# --codec: the FFmpeg encoder for each choice
ENCODERS = {"h264": "libx264", "hevc": "libx265", "prores": "prores_ks"}
# x265 made byte-reproducible: the same bytes from run to run and from machine to machine. Its
# thread pool's size changes the stream (measured at 640x368: pools of 1-2 threads give one file,
# of 4 or more another; by default the pool has one thread per core), x265 would also pick its
# frame threads by the cores (more of them narrow the motion search, says its manual), and info=0
# drops the SEI that lists all of these settings.
_X265_PARAMS = "log-level=error:info=0:frame-threads=1:pools=4"
_PRORES_HQ = "3"  # prores_ks profile 3: 422 HQ
_INTERLACED_DCT = 0x40000  # AV_CODEC_FLAG_INTERLACED_DCT: ProRes codes the two fields apart
_FIELD_ORDER = {"tff": 2, "bff": 3}  # FFmpeg's AVFieldOrder: AV_FIELD_TT, AV_FIELD_BB
# Container tags that describe the file's encoding rather than its content: not carried over.
_MUXER_TAGS = {"major_brand", "minor_version", "compatible_brands", "encoder", "duration"}


@dataclass(frozen=True)
class EncodeOptions:
    crf: float = 18.0  # x264/x265 constant quality; 18 is visually transparent for graded material
    x264_preset: str = "medium"  # x265's presets have the same names; ProRes has neither
    codec: str = "h264"  # h264 (libx264), hevc (libx265) or prores (ProRes 422 HQ, .mov only)

    def __post_init__(self):
        if self.codec not in ENCODERS:
            raise OptionError(f"--codec {self.codec[:100]!r}: must be one of {', '.join(ENCODERS)}")
        if not 0 <= self.crf <= 51:
            raise OptionError(f"--crf {self.crf}: must be between 0 and 51 (lower is better quality)")
        if self.x264_preset not in X264_PRESETS:
            raise OptionError(f"--x264-preset {self.x264_preset!r}: must be one of {', '.join(X264_PRESETS)}")


# x264's names for the CPU features it has SIMD code for, and the /proc/cpuinfo flags that show them.
_X264_CPU = (("MMX2", "mmxext"), ("SSE", "sse"), ("SSE2", "sse2"), ("SSE3", "pni"), ("SSSE3", "ssse3"),
             ("SSE4.1", "sse4_1"), ("SSE4.2", "sse4_2"), ("LZCNT", "abm"), ("AVX", "avx"), ("FMA3", "fma"),
             ("BMI1", "bmi1"), ("BMI2", "bmi2"), ("AVX2", "avx2"))


@functools.cache
def x264_cpu_flags() -> str | None:
    """The x264 `asm` setting to use: every SIMD level the CPU has except AVX-512, or None (x264's
    own detection) on CPUs without AVX-512.

    Measured with the x264 in PyAV 18's wheels on an AVX-512 machine: its AVX-512 code makes the
    same frames encode to different bits now and then (2 variants in 24 runs; 0 in 24 with AVX-512
    left out, threads or not). Without this, the same command would not give the same file, and a
    resumed diffusion run would not match an uninterrupted one.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if "avx512f" not in flags:
        return None
    if "sse" in flags:
        flags.add("mmxext")  # every SSE CPU has the MMX extensions; Intel's cpuinfo does not list them
    return ",".join(name for name, flag in _X264_CPU if flag in flags)


@dataclass
class AudioPlan:
    """What happens to each source audio stream: copied packet for packet, or re-encoded to AAC."""

    copied: list[int] = field(default_factory=list)
    reencoded: list[tuple[int, str]] = field(default_factory=list)  # (stream index, source codec)


def _check_free(target: Path, overwrite: bool) -> None:
    # lexists: a dangling symlink is something the user put there, though exists() says False
    if os.path.lexists(target) and not overwrite:
        what = "is a symbolic link to a missing file" if not target.exists() else "already exists"
        raise OutputError(f"{target}: {what} (use --overwrite to replace it)")


# What a failed write means to the user, by errno.
_WRITE_HINTS = {errno.ENOSPC: "disk full while writing: free some space and run again",
                errno.EDQUOT: "disk quota exceeded while writing: free some space and run again",
                errno.EFBIG: "file size limit reached while writing (see `ulimit -f`, or the file "
                             "system's largest file)"}


def write_error(target: Path, stage: str, ex: BaseException) -> OutputError:
    """One line for a failure while writing `target`: what failed, errno's text (never the
    temporary file's name) and what a full disk or a size limit means."""
    if isinstance(ex, OutputError):
        return ex
    strerror = getattr(ex, "strerror", None)  # PyAV's errors put the file name apart, as OSError does
    if isinstance(ex, OSError) and ex.errno and strerror:
        reason = f"[Errno {ex.errno}] {strerror}"
    else:
        reason = strerror or (str(ex).splitlines() or [type(ex).__name__])[0][:200]
    hint = _WRITE_HINTS.get(getattr(ex, "errno", None))
    err = OutputError(f"{target}: {stage} failed: {reason}" + (f" — {hint}" if hint else ""))
    err.__cause__ = ex
    return err


def check_output_path(target: Path, overwrite: bool, codec: str = "h264") -> None:
    """Fail early, before any decoding, if `target` cannot be written (in `codec`)."""
    folder = target.parent
    if not folder.exists():
        raise OutputError(f"{folder}: output folder does not exist")
    if not folder.is_dir():
        raise OutputError(f"{folder}: output folder is not a folder")
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; give a file name for the output")
    _check_free(target, overwrite)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: output folder is not writable")
    if target.suffix.lower() not in _MUXERS:
        raise OutputError(f"{target}: unsupported output extension {target.suffix!r} "
                          "(use .mp4, .mov, .m4v or .mkv)")
    if codec == "prores" and target.suffix.lower() != ".mov":
        raise OutputError(f"{target}: ProRes is written only into QuickTime .mov files; name the output "
                          ".mov, or use --codec h264 or hevc")


class VideoWriter:
    """Write frames of `info`'s geometry and timing to `target`, with the source's audio.

    Use as a context manager; `commit()` renames the finished file into place. Frames come in as
    (H, W, 3) uint8 RGB in display orientation with their source pts (uint16, full 16-bit scale,
    when `colour` asks for more than 8 bits); they are rotated back and the source's display
    rotation is tagged, so players show them as the source. `colour`: the tags of what is written
    when the frames are not in the source's colour space (None: BT.709 matrix, source's primaries
    and transfer, 8 bits); its `note` joins the comment. `options.codec` chooses the encoder
    (`ENCODERS`); ProRes is 10-bit 4:2:2 whatever the frames' depth.

    Colour conversion, encoding and muxing run on a thread of their own, a few frames behind
    `write`: PyAV lets go of the GIL inside x264, so the caller grades (or renders) the next frames
    while x264 waits on its own threads, which on a small machine leave a core partly idle. The
    file is the same as a serial encode's: one thread feeds x264 the frames in order.
    """

    QUEUE_FRAMES = 4  # frames waiting for the encoder thread: enough to ride out uneven frames

    def __init__(self, target: str | os.PathLike, info: VideoInfo,
                 options: EncodeOptions = EncodeOptions(), overwrite: bool = False,
                 audio: bool = True, comment: str | None = None, colour: OutputTags | None = None):
        self.target = Path(target)
        self.colour = colour
        self.comment = "; ".join(t for t in (comment, colour.note if colour else "") if t) or None
        self.info = info
        self.options = options
        self.overwrite = overwrite
        self.audio_plan = AudioPlan()
        self.notes: list[str] = []
        self.frames_written = 0
        check_output_path(self.target, overwrite, options.codec)
        fsutil.clean_stale_temps(self.target)  # a killed run's leftovers of this same output
        self._tmp = fsutil.temp_path_for(self.target)
        self._span: tuple[int, int] | None = None  # (first pts, last pts + its duration) written
        self._container = None
        self._audio_in = None
        self._audio_map: dict[int, tuple] = {}
        self._pending_audio = None
        self._damaged_audio = 0  # packets dropped because the decoder refuses them
        self._done = False
        self._encoder: Worker | None = None
        self._durations: dict[int, int] = {}  # pts → source frame duration, until its packet is muxed
        self._fields = False  # interlaced output: 4:2:0 chroma is made field by field
        self._field_graph = None  # interlaced ProRes: marks each frame with its field order
        try:
            self._open(audio)
            self._encoder = Worker(self._encode, self.QUEUE_FRAMES, "cinefx-encode", on_error=self._encoding_failed)
        except BaseException:  # Ctrl-C included: the temporary file must not stay behind
            self.abort()
            raise

    # -- setup -----------------------------------------------------------------------------
    def _open(self, audio: bool) -> None:
        info = self.info
        # A transport or program stream's clock starts anywhere (a broadcast's at any point of its
        # 26.5-hour cycle: its MP4 would open on an empty edit of hours, which QuickTime plays as
        # such), so its output starts at 0, as FFmpeg's does, sound moved with the pictures. Other
        # files keep their times (a late start is part of the timing), but none below 0, which MP4's
        # edit list drops: players skip those frames, and a file wholly before 0 plays nothing.
        with open_container(info.path) as src:
            starts = [s.start_time * s.time_base for s in (*src.streams.video[:1], *src.streams.audio)
                      if s.start_time is not None and s.time_base]
            tags, timecode = self._source_tags(src)
        first = min(starts, default=Fraction(0))
        self._shift = -first if info.container in NO_INDEX else max(Fraction(0), -first)  # seconds added
        self._video_ticks = self._ticks(info.time_base)
        fmt_opts = {}
        muxer = _MUXERS[self.target.suffix.lower()]
        if muxer in _MOV_FAMILY and info.time_base.denominator <= 2**31 - 1:
            fmt_opts["movie_timescale"] = str(info.time_base.denominator)
        self._container = av.open(str(self._tmp), mode="w", format=muxer, options=fmt_opts)
        self._container.metadata.update(tags)
        even = info.coded_width % 2 == 0 and info.coded_height % 2 == 0
        c = self.colour
        codec = self.options.codec
        self._bits = c.bits if c else 8  # of the frames given to `write`
        if codec == "prores":  # 4:2:2 keeps odd sizes exact: swscale and ProRes round the chroma up
            self._pix_fmt, bits = "yuv422p10le", 10
        else:
            self._pix_fmt, bits = ("yuv420p" if even else "yuv444p") + ("10le" if self._bits > 8 else ""), self._bits
            if not even:
                self.notes.append(f"odd frame size {info.coded_width}x{info.coded_height}: encoded as 4:4:4 "
                                  "(4:2:0 needs even sizes) so the size stays exact")
        self._matrix = "BT2020" if c and c.matrix == 9 else "ITU709"
        if info.bit_depth > bits:
            self.notes.append(f"{info.bit_depth}-bit source written as {bits}-bit {self._pix_fmt}")
        options = {"h264": self._x264_options, "hevc": self._x265_options, "prores": self._prores_options}[codec]()
        stream = self._container.add_stream(ENCODERS[codec], rate=info.fps, options=options)
        stream.width, stream.height = info.coded_width, info.coded_height
        stream.pix_fmt = self._pix_fmt
        stream.time_base = info.time_base
        ctx = stream.codec_context
        ctx.time_base = info.time_base
        ctx.framerate = info.fps
        ctx.color_range = 1  # limited range, what players expect of H.264
        if c:
            ctx.colorspace, ctx.color_primaries, ctx.color_trc = c.matrix, c.primaries, c.transfer
        else:
            ctx.colorspace = 1  # BT.709 matrix: every frame is converted to it below
            # Primaries and transfer are not converted, so they keep the source's tags (709 if untagged).
            src = info.colour
            ctx.color_primaries = src.primaries if src.primaries != 2 else 1
            ctx.color_trc = src.transfer if src.transfer != 2 else 1
        if info.sample_aspect_ratio:
            ctx.sample_aspect_ratio = info.sample_aspect_ratio
        if codec == "hevc" and muxer in _MOV_FAMILY:
            ctx.codec_tag = "hvc1"  # parameter sets in the header only: what Apple's players open
        if codec != "h264" and info.field_order != "progressive":
            ctx.field_order = _FIELD_ORDER[info.field_order]  # the container's field tag (MOV fiel, Matroska)
            if codec == "prores":
                ctx.flags |= _INTERLACED_DCT
                self._field_graph = self._field_marker(info.field_order)
        if info.rotation:
            stream.set_display_rotation(info.rotation)
        if timecode:
            stream.metadata["timecode"] = timecode  # MOV/MP4 write it as a timecode track, as cameras do
        self._video = stream
        if audio and info.audio:
            self._open_audio(muxer)

    def _x264_options(self) -> dict[str, str]:
        info = self.info
        x264 = {"crf": f"{self.options.crf:g}", "preset": self.options.x264_preset}
        params = [f"asm={cpu}"] if (cpu := x264_cpu_flags()) else []
        if info.field_order != "progressive" and info.coded_height % 4 == 0:  # fields of whole MB pairs
            # interlaced footage stays interlaced, in its field order, so players and editors
            # deinterlace it as they did the source
            params += ["interlaced=1", f"{info.field_order}=1"]
            self._fields = self._pix_fmt == "yuv420p"  # 4:4:4 has no chroma rows to keep apart (10-bit: swscale)
            self.notes.append(f"interlaced source ({'top' if info.field_order == 'tff' else 'bottom'} field "
                              "first): encoded interlaced like the source")
        elif info.field_order != "progressive":
            self.notes.append(f"interlaced source {info.coded_width}x{info.coded_height}: encoded progressive "
                              "(H.264 codes interlaced frames only at heights that are multiples of 4)")
        if params:
            x264["x264-params"] = ":".join(params)
        return x264

    def _x265_options(self) -> dict[str, str]:
        info = self.info
        if info.field_order != "progressive":
            # HEVC has no interlaced frames, only field pictures, which decoders hand out one by one
            self._fields = self._pix_fmt == "yuv420p" and info.coded_height % 4 == 0
            self.notes.append(f"interlaced source ({'top' if info.field_order == 'tff' else 'bottom'} field "
                              "first): HEVC codes it as whole frames, tagged interlaced in the container so "
                              "players deinterlace it like the source")
        return {"crf": f"{self.options.crf:g}", "preset": self.options.x264_preset, "x265-params": _X265_PARAMS}

    def _prores_options(self) -> dict[str, str]:
        if self.info.field_order != "progressive":
            self.notes.append(f"interlaced source ({'top' if self.info.field_order == 'tff' else 'bottom'} "
                              "field first): encoded interlaced like the source")
        return {"profile": _PRORES_HQ}

    def _field_marker(self, order: str):
        """A filter graph that flags frames as interlaced in `order`, which PyAV frames cannot be
        told directly and ProRes codes into each frame's header."""
        from av.filter import Graph

        info = self.info
        graph = Graph()
        chain = [graph.add_buffer(width=info.coded_width, height=info.coded_height, format=self._pix_fmt,
                                  time_base=info.time_base),
                 graph.add("setfield", order), graph.add("buffersink")]
        chain[0].link_to(chain[1])
        chain[1].link_to(chain[2])
        graph.configure()
        return graph

    def _source_tags(self, src) -> tuple[dict[str, str], str]:
        """The source's (`src`, open) container tags (title, creation time, …: what an editor's bin
        sorts by), less the muxer's own, with `comment` put first in the comment; and the source's
        start timecode (`VideoInfo.timecode`), which editors conform by."""
        tags = {k: v for k, v in src.metadata.items() if k.lower() not in _MUXER_TAGS}
        if self.comment:
            key = next((k for k in tags if k.lower() == "comment"), "comment")
            tags[key] = f"{self.comment}; {tags[key]}" if tags.get(key) else self.comment
        return tags, self.info.timecode

    def _open_audio(self, muxer: str) -> None:
        self._audio_in = open_container(self.info.path)
        streams = []
        for in_stream in self._audio_in.streams.audio:
            ctx = in_stream.codec_context
            if not ctx.channels or not ctx.sample_rate:
                # FFmpeg found no sound in it: in a transport stream, a program table damaged into
                # naming a stream that is not there
                self.notes.append(f"audio stream {in_stream.index} ({ctx.name}) has no channels or sample "
                                  "rate FFmpeg can find: left out")
                continue
            streams.append(in_stream)
            if _can_copy(in_stream, muxer):
                out_stream = self._container.add_stream_from_template(in_stream)
                self._audio_map[in_stream.index] = ("copy", out_stream, None)
                self.audio_plan.copied.append(in_stream.index)
            else:
                out_stream, resampler = self._aac_stream(in_stream)
                self._audio_map[in_stream.index] = ("aac", out_stream, resampler)
                self.audio_plan.reencoded.append((in_stream.index, in_stream.codec_context.name))
                self.notes.append(f"audio stream {in_stream.index} ({in_stream.codec_context.name}) cannot "
                                  f"be stored in {self.target.suffix}: re-encoded to AAC")
        restarts = restart_offsets(self.info) if streams else []  # without an index: where, and seconds moved
        self._audio_times = {s.index: _AudioTimes(s.time_base, restarts, self.info.container in NO_INDEX)
                             for s in streams}
        self._audio_packets = self._timed(demux(self._audio_in, *streams)) if streams else iter(())

    def _ticks(self, time_base: Fraction) -> int:
        """`_shift` in ticks of `time_base`, rounded up, so that nothing lands below 0."""
        return -(-self._shift // time_base)

    def _timed(self, packets):
        """The source's audio packets with their timestamps made fit to mux (see `_AudioTimes`),
        moved as the video is (`_shift`)."""
        def moved(packet):
            if self._shift:
                ticks = self._ticks(packet.time_base)
                packet.pts = None if packet.pts is None else packet.pts + ticks
                packet.dts = None if packet.dts is None else packet.dts + ticks
            return packet

        for packet in packets:
            if not packet.size:
                continue
            if packet.dts is None:
                yield moved(packet)  # copying skips it; re-encoding decodes it
                continue
            yield from map(moved, self._audio_times[packet.stream.index].take(packet))
        for times in self._audio_times.values():
            yield from map(moved, times.finish())

    def _audio_notes(self) -> None:
        times = self._audio_times.values()
        broken, runs, overlap = (sum(getattr(t, k) for t in times) for k in ("broken", "runs", "overlap"))
        if not runs:
            broken, overlap = broken + overlap, 0  # with no restart, an overlap is a packet out of order
        damaged = self._damaged_audio
        if broken or damaged:
            said = [f"{broken} audio packet{'s' if broken != 1 else ''} with broken timestamps dropped "
                    "(out of order, or far outside the stream's span)"] if broken else []
            if damaged:
                said.append(f"{damaged} damaged audio packet{'s' if damaged != 1 else ''} the decoder refuses "
                            "dropped")
            self.notes.append(", and ".join(said))
        if runs:
            self.notes.append("audio moved with the frames at each timestamp restart, so it stays in sync"
                              + (f" ({overlap} packet{'s' if overlap != 1 else ''} overlapping a join dropped)"
                                 if overlap else ""))

    def _aac_stream(self, in_stream):
        """An AAC stream for `in_stream`'s audio, its encoder opened now so a refusal names the cause."""
        ctx = in_stream.codec_context
        rate = ctx.sample_rate or 48000
        layout = _aac_layout(ctx.layout, ctx.channels)
        what = f"audio stream {in_stream.index} ({ctx.name}, {ctx.channels} channels)"
        if layout is None:
            raise OutputError(f"{self.target}: {what} has more channels than AAC takes (8); write .mkv "
                              "or .mov, which keep the audio as it is")
        out_stream = self._container.add_stream("aac", rate=rate)
        out_stream.layout = layout
        try:
            out_stream.codec_context.open()
        except av.error.FFmpegError as ex:
            raise OutputError(f"{self.target}: {what} cannot be encoded to AAC as {layout} ({ex}); write "
                              ".mkv or .mov, which keep the audio as it is") from ex
        return out_stream, av.AudioResampler(format="fltp", layout=layout, rate=rate)

    # -- writing ---------------------------------------------------------------------------
    def write(self, rgb: np.ndarray, pts: int, duration: int = 0) -> None:
        """Queue one frame for encoding: `rgb` (H, W, 3) uint8 (uint16 for output over 8 bits) in
        display orientation; `pts` and `duration` in the source time base (the duration matters for
        the last frame of variable-rate video). The array may be reused as soon as this returns."""
        dtype = np.uint16 if self._bits > 8 else np.uint8
        if rgb.shape != (self.info.height, self.info.width, 3) or rgb.dtype != dtype:
            raise ValueError(f"frame of shape {rgb.shape} {rgb.dtype}, expected "
                             f"{(self.info.height, self.info.width, 3)} {np.dtype(dtype)}")
        self._encoder.check()
        k = (self.info.rotation // 90) % 4
        if k:
            rgb = np.ascontiguousarray(np.rot90(rgb, -k))
        # a copy: the caller keeps `rgb`
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb48le" if self._bits > 8 else "rgb24")
        pts += self._video_ticks
        frame.pts = pts
        frame.time_base = self.info.time_base
        if duration:
            frame.duration = duration
        self._encoder.put(frame)
        self.frames_written += 1
        end = pts + (duration or self.info.frame_step)
        self._span = (pts, end) if self._span is None else (min(self._span[0], pts), max(self._span[1], end))

    def _encoding_failed(self, ex: Exception) -> OutputError:
        # a full disk, a muxer refusing a timestamp: handed to the caller as one line
        return write_error(self.target, "encoding", ex)

    def _to_yuv(self, frame: av.VideoFrame) -> av.VideoFrame:
        return frame.reformat(format=self._pix_fmt, src_colorspace=self._matrix, dst_colorspace=self._matrix,
                              src_color_range="JPEG", dst_color_range="MPEG",
                              interpolation=Interpolation.BICUBIC | Interpolation.ACCURATE_RND)

    def _to_yuv_by_field(self, frame: av.VideoFrame) -> av.VideoFrame:
        """4:2:0 of an interlaced frame: each field converted on its own and the rows interleaved,
        since a chroma row mixing both fields would blend two moments' colours."""
        rgb = frame.to_ndarray()
        h, w = rgb.shape[:2]
        hf = h // 2
        y = np.empty((h, w), np.uint8)
        u, v = np.empty((h // 2, w // 2), np.uint8), np.empty((h // 2, w // 2), np.uint8)
        for parity in (0, 1):
            packed = self._to_yuv(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[parity::2]), format="rgb24"))
            packed = packed.to_ndarray()  # (hf·3/2, w): Y, then U and V
            y[parity::2] = packed[:hf]
            u[parity::2] = packed[hf:hf + hf // 4].reshape(hf // 2, w // 2)
            v[parity::2] = packed[hf + hf // 4:].reshape(hf // 2, w // 2)
        return av.VideoFrame.from_ndarray(np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(-1, w),
                                          format="yuv420p")

    def _encode(self, frame: av.VideoFrame) -> None:
        """On the encoder thread: convert, encode and mux one frame, with the audio up to it."""
        yuv = self._to_yuv_by_field(frame) if self._fields else self._to_yuv(frame)
        yuv.pts, yuv.time_base = frame.pts, frame.time_base
        if self._field_graph is not None:
            self._field_graph.push(yuv)
            yuv = self._field_graph.pull()
        if self.options.codec == "prores":  # ProRes writes each frame's own colour tags into its header
            ctx = self._video.codec_context
            yuv.color_primaries, yuv.color_trc, yuv.colorspace = ctx.color_primaries, ctx.color_trc, ctx.colorspace
            yuv.color_range = ctx.color_range
        if frame.duration:
            yuv.duration = frame.duration
            self._durations[frame.pts] = frame.duration
        for packet in self._video.encode(yuv):
            self._mux_video(packet)
        self._feed_audio(float(frame.pts * frame.time_base))

    def _mux_video(self, packet) -> None:
        # x264's packets last one frame at the average rate; give each its frame's own duration, or
        # the last frame of variable-rate video (the sample the muxer times by it) runs long
        duration = self._durations.pop(packet.pts, 0)
        if duration:
            packet.duration = duration
        self._container.mux(packet)

    def _feed_audio(self, until: float | None) -> None:
        """Mux source audio up to `until` seconds (None: to the end) so the file stays interleaved."""
        if self._audio_in is None:
            return
        while True:
            packet = self._pending_audio
            self._pending_audio = None
            if packet is None:
                packet = next(self._audio_packets, None)
                if packet is None:
                    return
            if until is not None and packet.pts is not None and packet.time_base is not None \
                    and float(packet.pts * packet.time_base) > until + 0.5:
                self._pending_audio = packet  # hold it: video has not caught up yet
                return
            self._mux_audio(packet)

    def _mux_audio(self, packet) -> None:
        mode, out_stream, resampler = self._audio_map[packet.stream.index]
        try:
            # copied packets too: one the decoder refuses is damaged data, which players would stumble on
            frames = packet.decode()
        except av.error.FFmpegError:
            # not only "invalid data": damaged AAC comes back as any error code its bits happen to spell
            self._damaged_audio += 1
            return
        if mode == "copy":
            if packet.dts is not None:
                packet.stream = out_stream
                try:
                    self._container.mux(packet)
                except av.error.InvalidDataError:
                    # a header the decoder lets pass but MP4's ADTS-to-raw filter refuses: damage too
                    self._damaged_audio += 1
            return
        for frame in frames:
            for res in resampler.resample(frame):
                for out in out_stream.encode(res):
                    self._container.mux(out)

    # -- finishing -------------------------------------------------------------------------
    def commit(self) -> Path:
        """Flush the encoders, close the file, check that it reads back whole, and rename it over
        the target. Any failure raises `OutputError` naming the target, with the temporary file
        removed and whatever was at the target left as it was."""
        try:
            self._encoder.finish()
            try:
                self._flush()
            except Exception as ex:
                raise write_error(self.target, "encoding", ex) from ex
            if self._audio_in is not None:
                self._audio_notes()
            # Closing writes the trailer (MP4's index, Matroska's cues) and the bytes still
            # buffered: a full disk very often shows only here, so its error must not be dropped.
            container, self._container = self._container, None
            try:
                container.close()
            except Exception as ex:
                raise write_error(self.target, "finishing the file", ex) from ex
            self._close()  # the source, open for its audio
            self._verify()
            _check_free(self.target, self.overwrite)  # it may have appeared while we were writing
            fsutil.commit(self._tmp, self.target)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.target

    def _flush(self) -> None:
        for packet in self._video.encode(None):
            self._mux_video(packet)
        self._feed_audio(None)
        for mode, out_stream, resampler in self._audio_map.values():
            if mode == "aac":
                for res in resampler.resample(None):
                    for out in out_stream.encode(res):
                        self._container.mux(out)
                for out in out_stream.encode(None):
                    self._container.mux(out)

    def _verify(self) -> None:
        """Read the closed temporary file back: its video must hold every frame written and last
        as long (to half a frame). Then flush it to disk, where a network file system or a quota
        may still refuse it. MP4 and MOV list their frames in the index; Matroska's header does
        not, so its packets are counted, which reads the file (a small cost beside encoding it)."""
        try:
            with av.open(str(self._tmp)) as c:
                stream = c.streams.video[0]
                frames, ticks = stream.frames, stream.duration or 0
                if not frames:
                    times = [(p.pts, p.pts + (p.duration or 0)) for p in demux(c, stream)
                             if p.size and p.pts is not None]
                    frames = len(times)
                    ticks = max(end for _, end in times) - min(start for start, _ in times) if times else 0
                seconds = float(ticks * stream.time_base)
            fd = os.open(self._tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except (OSError, av.error.FFmpegError, IndexError) as ex:
            raise write_error(self.target, "reading the finished file back", ex) from ex
        written = float((self._span[1] - self._span[0]) * self.info.time_base) if self._span else 0.0
        half_frame = float(self.info.frame_step * self.info.time_base) / 2
        if frames != self.frames_written or abs(seconds - written) > half_frame:
            raise OutputError(f"{self.target}: the finished file is incomplete ({frames} of "
                              f"{self.frames_written} frames, {seconds:.3f} of {written:.3f} s); "
                              "the disk may be full or failing — nothing was replaced")

    def _close(self) -> None:
        """Close whatever is still open, quietly: the source (read for its audio), and the output
        only when a write is abandoned (`commit` closes it itself, since its errors matter)."""
        for c in (self._container, self._audio_in):
            if c is not None:
                try:
                    c.close()
                except Exception:
                    pass
        self._container = self._audio_in = None

    def abort(self) -> None:
        """Drop everything written so far; the target is left as it was."""
        if self._encoder is not None:
            self._encoder.close(drop=True)  # queued frames are dropped, not encoded first
        self._close()
        if not self._done:
            fsutil.remove_quietly(self._tmp)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()


class _AudioTimes:
    """One audio stream's packets, timed to mux: a muxer refuses a packet that steps back in time,
    and the copy used to fail only when the file was finished.

    Each packet waits for the next one, which says what its time is. A packet out of the line that
    the packets before and after it keep (the one after following on from the one before) had its
    timestamp damaged (a PES header hit by bad data): dropped. A packet that jumps (back, or
    forward by over a second) and is followed on from is where the clock restarted, or where the
    sound has a gap. In a file without an index (`restarts`), whose video frames were moved to
    follow on at each restart of their own (`cinefx.video.reader.Restarts`), a jump near where the
    video's clock restarted is that restart: it and the packets after it are moved by the video's
    offset, so sound and picture stay in sync; a jump back with no video restart near is the
    sound's own restart, and follows on from the last packet; a jump ahead with none is a gap in
    the sound (a transmission that lost its audio for a while): kept where it is, with the
    pictures. A jump nothing follows on from is damage too. Packets that would still not step
    forward (the two sides of a join overlapping) are dropped."""

    def __init__(self, time_base: Fraction, video_restarts: list[tuple[Fraction, Fraction]], restarts: bool):
        self.time_base = time_base
        # (source time where the video's clock restarted, ticks its frames were moved)
        self.video_restarts = [(round(at / time_base), round(o / time_base)) for at, o in video_restarts]
        self.matched: set[int] = set()
        self.restarts = restarts
        self.limit = round(1 / time_base)  # one second
        self.offset = 0
        self.last: tuple[int, int] | None = None  # (dts, duration) of the last packet kept, as read
        self.held = None
        self.end: int | None = None  # moved dts + duration of the last packet given out
        self.muxed: int | None = None  # moved dts of the last packet given out
        self.broken = self.runs = self.overlap = 0

    def _jumps(self, dts: int, duration: int, packet) -> bool:
        return packet.dts < dts or packet.dts > dts + duration + self.limit

    def take(self, packet):
        held, self.held = self.held, packet
        if held is not None:
            yield from self._judge(held, packet)

    def finish(self):
        """At the end: a first packet with none after it stays; a jump nothing confirmed goes."""
        held, self.held = self.held, None
        if held is not None:
            yield from self._judge(held, None)

    def _judge(self, packet, following):
        """Give out `packet`, moved, or drop it, as `following` (None at the end) shows."""
        duration = packet.duration or 0
        if self.last is None:  # the first packet: kept unless the next does not follow on from it
            if following is not None and self._jumps(packet.dts, duration, following):
                self.broken += 1
            else:
                yield from self._out(packet)
            return
        dts, last_duration = self.last
        if (following is not None and not self._jumps(dts, last_duration, following)
                and not dts <= packet.dts <= following.dts
                # of two packets out of order, the one further from where the stream goes on
                and abs(following.dts - dts - last_duration) <= abs(packet.dts - dts - last_duration)):
            self.broken += 1
        elif not self._jumps(dts, last_duration, packet):
            yield from self._out(packet)
        elif following is None or self._jumps(packet.dts, duration, following):
            self.broken += 1
        else:
            if self.restarts:
                video = next((k for k, (at, _) in enumerate(self.video_restarts)
                              if k not in self.matched and abs(packet.dts - at) <= 2 * self.limit), None)
                if video is not None:
                    self.matched.add(video)
                    self.offset, self.runs = self.video_restarts[video][1], self.runs + 1
                elif packet.dts < dts:
                    self.offset, self.runs = self.end - packet.dts, self.runs + 1
            yield from self._out(packet)

    def _out(self, packet):
        self.last = (packet.dts, packet.duration or 0)
        if self.offset:
            packet.dts += self.offset
            packet.pts = None if packet.pts is None else packet.pts + self.offset
        if self.muxed is not None and packet.dts <= self.muxed:
            self.overlap += 1
            return
        self.muxed, self.end = packet.dts, packet.dts + (packet.duration or 0)
        yield packet


# The usual order for audio that does not name its channels (PCM in Matroska, many WAVs: FFmpeg
# calls such a layout "2 channels"), as WAVE assumes without a channel mask.
_DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def _aac_layout(layout, channels: int) -> str | None:
    """A channel layout FFmpeg's AAC encoder accepts for this audio: its own where it names its
    channels, else the usual one for the count (the encoder rejects "2 channels"); None beyond 8."""
    n = layout.nb_channels if layout is not None else channels
    if layout is not None and all(c.name != "NONE" for c in layout.channels) and n <= 8:
        return layout.name
    return _DEFAULT_LAYOUTS.get(n or 2)


def _can_copy(in_stream, muxer: str) -> bool:
    """Whether `muxer` accepts `in_stream`'s codec as is: try writing a header into memory."""
    if muxer == "mp4" and in_stream.codec_context.name not in _MP4_AUDIO:
        return False
    try:
        probe = av.open(io.BytesIO(), mode="w", format=muxer)
        try:
            probe.add_stream_from_template(in_stream)
            probe.start_encoding()
        finally:
            try:
                probe.close()
            except Exception:
                pass
        return True
    except Exception:
        return False

