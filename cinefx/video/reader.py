"""Streaming decode: RGB frames in display order with their presentation times.

Frames are produced one at a time from a generator; nothing here holds more than a small reorder
buffer, so memory does not grow with the length of the file.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import cv2
import numpy as np
from av.video.reformatter import Interpolation

from cinefx.errors import InputFileError
from cinefx.video.probe import VideoInfo, demux, open_container, typical_step

# Some demuxers (AVI with packed B-frames, badly muxed MKV) hand out frames whose timestamps are
# out of order; a small heap puts them back in display order. Real files stay within a GOP's
# worth of reordering, and 16 frames covers x264's largest B-pyramid.
REORDER_DEPTH = 16

# Decoder threads: one. FFmpeg conceals damaged data differently with one frame thread than with
# several, and with several differently from run to run (frames shared among threads as they come),
# so a damaged file would decode to other pixels on a resume or on another node. Decoding is a
# small part of a frame's time beside the conversion to RGB (1080p H.264 here: 47 fps with one
# thread, 55 with four).
DECODE_THREADS = 1

# Frames that cannot be decoded are stood in for (see `read_frames`); losing more than this share
# of a file's frames means the file itself is broken.
MAX_LOST_SHARE = 0.10

# Formats whose timestamps travel inside the data that can be damaged (MPEG transport and program
# streams): a lost packet takes its timestamp with it, so losses show only as gaps in time.
NO_INDEX = frozenset({"mpegts", "mpeg"})


class Restarts:
    """Timestamp restarts in a stream without an index: MPEG-TS discontinuities, where joined files,
    a splice or a restarted encoder start the clock again. A packet whose decode time steps back,
    or forward by more than `limit` ticks, and which the packet after it goes on from, begins a new
    run (one that stands alone had its times damaged, see `fix`); `fix` moves it and the packets after it
    to follow the last frame before the jump at the nominal step (as players do on the
    discontinuity flag), so no frame counts as lost and time stays continuous for the writer.

    Both the reader (on the packets it decodes) and the writer (on the same packets, to move the
    audio with the video) run it, so they agree to the tick."""

    def __init__(self, step: int, limit: int):
        self.step, self.limit = step, limit
        # how far a presentation time may lie from its decode time: a second, or at low rates the
        # deepest reordering (x264's B-frames at 1 fps put a P-frame's two times 4 s apart)
        self.reach = max(limit, REORDER_DEPTH * step)
        # each run after the first: the source's time (not moved) where it begins, ticks added to it
        self.runs: list[tuple[int, int]] = []
        self._offset = 0
        self._last: int | None = None  # decode time of the last packet, moved
        self._end: int | None = None  # latest presentation time so far, moved, plus a step

    def timeline(self, packets: Iterable[av.Packet]) -> Iterator[tuple[av.Packet, bool]]:
        """`packets`, in order, with their timestamps moved (see `fix`), each with whether a restart
        begins at it. Each packet waits for the next one, which says whether its jump is a restart."""
        held = None
        for packet in packets:
            if not packet.size:  # the flush at the end
                if held is not None:
                    yield held, self.fix(held)
                    held = None
                yield packet, False
                continue
            if held is not None:
                yield held, self.fix(held, packet)
            held = packet
        if held is not None:
            yield held, self.fix(held)

    def fix(self, packet, following=None) -> bool:
        """Move `packet`'s timestamps into the continuous timeline; True if a restart begins at it.
        `following`: the packet after it, not yet moved, where there is one.

        A packet whose decode time is out of the line that the packets before and after it keep,
        and further from it than the packet after, had its timestamps damaged: both are dropped,
        and the decoder's order times its frame. A restart carries the packets after it along, so
        where the next packet goes on from this one, this one begins a restart.

        A clock that restarts moves both of a packet's times, and keeps its decode time no later
        than its presentation time. One damaged byte moves only one of them: a decode time off
        the clock, or after the presentation time, beside a presentation time on the clock is
        damage, not a restart (it would time every later frame a jump away and count frames that
        never were), and is not taken as the clock, unless the next packet goes on from it; a
        presentation time further from the decode time on the clock than reordering puts it
        (`reach`) is dropped, so the frame is timed by its place in the decoder's order."""
        pts, dts = packet.pts, packet.dts
        t = dts if dts is not None else pts
        if t is None or not packet.size:
            return False
        restart = False
        carried = self._carries(dts, following)
        if (self._last is not None and dts is not None and following is not None and not carried
                and following.dts is not None and self._on_clock(following.dts)
                and not self._last <= dts + self._offset <= following.dts + self._offset
                # of the two out of order, the one further from the line: at a join whose clock
                # steps back a frame, the last packet before it is in line, the first after it is not
                and self._off_line(dts, 1) > self._off_line(following.dts, 2)):
            packet.pts = packet.dts = None
            return False
        if self._last is not None and dts is not None and pts is not None and dts > pts:
            if self._on_clock(pts) or not self._on_clock(dts):
                t = None  # the decode time is the damaged one, or both are: no clock to follow
        elif self._last is not None and not self._on_clock(t):
            if dts is not None and pts is not None and self._on_clock(pts) and not carried:
                t = None  # a damaged decode time
            else:
                restart = True
        if restart:
            self._offset = self._end - (pts if pts is not None else t)
            self.runs.append((pts if pts is not None else t, self._offset))
        if self._offset:
            packet.pts = None if pts is None else pts + self._offset
            packet.dts = None if dts is None else dts + self._offset
        if t is None:
            return False
        self._last = t + self._offset
        if packet.pts is not None and abs(packet.pts - self._last) > self.reach:
            packet.pts = None  # a damaged presentation time: the decoder's order times the frame
        shown = self._last if packet.pts is None else packet.pts
        self._end = shown + self.step if self._end is None else max(self._end, shown + self.step)
        return restart

    def _on_clock(self, t: int) -> bool:
        return self._last <= t + self._offset <= self._last + self.limit

    def _carries(self, dts: int | None, following) -> bool:
        """Whether the packet after one decoded at `dts` goes on from it rather than from the last
        decode time: a clock that steps back by less than the B-frames' delay (streams cut apart
        and joined, each cut starting its decode times that much before its first frame) leaves
        the packets after the step on the clock before it, and only this tells it from damage."""
        if self._last is None or dts is None or following is None or following.dts is None:
            return False
        return abs(following.dts - dts - self.step) < self._off_line(following.dts, 1)

    def _off_line(self, dts: int, n: int) -> int:
        """How far `dts` (not yet moved) is from the `n`-th decode time after the last one."""
        return abs(dts + self._offset - self._last - n * self.step)


def restart_offsets(info: VideoInfo) -> list[tuple[Fraction, Fraction]]:
    """For each timestamp restart of `info`'s video: the source's time where it begins and the
    seconds added to the frames after it, as `read_frames` times them (empty for files with an
    index, whose timestamps are kept)."""
    if info.container not in NO_INDEX:
        return []
    restarts = _restarts(info)
    with open_container(info.path) as container:
        for _ in restarts.timeline(demux(container, container.streams.video[0])):
            pass
    return [(at * info.time_base, o * info.time_base) for at, o in restarts.runs]


def _restarts(info: VideoInfo) -> Restarts:
    # a jump of more than a second is no run of lost packets (MAX_LOST_SHARE refuses less)
    return Restarts(info.frame_step, max(1, round(info.fps)) * info.frame_step)


@dataclass(frozen=True)
class Frame:
    """One decoded frame. `rgb`: (H, W, 3) uint8 (uint16 from `read_frames(depth=16)`) in display
    orientation; `pts` in the stream's time base."""

    index: int
    pts: int
    rgb: np.ndarray
    duration: int = 0  # in the stream's time base; 0 when the container does not say
    concealed: bool = False  # could not be decoded: a copy of the last good frame stands in for it


# Formats that store no presentation times (AVI): FFmpeg's parser finds them for some codecs
# (MPEG-4 part 2) but not for others (H.264), whose packets it numbers in decode order, so where the
# decoder reorders, display-order frames come out carrying decode-order times (see `_output_order`).
NO_PRESENTATION_TIMES = frozenset({"avi"})

# Packets `_output_order` looks at: a reordering codec shows its first B-frame well within them.
_ORDER_PACKETS = 32

# Seeks to a time before the one that landed after `start_pts` (demuxers that index decode times,
# like AVI's, land on the keyframe whose decode time is at or before it).
_SEEK_TRIES = 3


class _Cadence:
    """Frames missing from a stream that keeps a regular cadence: steps of whole frames where at
    least four steps in five are one frame (the stream's own median step; damage nearby leaves a few
    odd ones). Matroska loses damaged blocks without a trace (no index lists them, and the blocks
    after them keep their times), so such gaps are all that shows; a recorder that dropped frames leaves the same gaps. Nothing is
    stood in for them (the output's frames keep their times, so each gap holds the frame before
    it); they are said."""

    def __init__(self):
        self.times: list[int] = []

    def see(self, pts: int) -> None:
        self.times.append(pts)

    def missing(self) -> list[tuple[int, int]]:
        """(time before the gap, frames missing in it) for each gap; none if the cadence is not regular."""
        steps = np.diff(self.times)
        if len(steps) < 10:
            return []
        step = typical_step(steps)  # 41.67 ms, of steps of 41 and 42
        whole = np.round(steps / step)
        # a time base of 1/1000 rounds each time, so the tolerance grows with nothing but the rounding
        on_beat = (whole >= 1) & (np.abs(steps - whole * step) <= max(1.0, step / 50))
        if np.mean(on_beat & (whole == 1)) < 0.8:
            return []  # a variable frame rate
        return [(self.times[i], int(whole[i]) - 1) for i in np.flatnonzero(on_beat & (whole > 1))]


class _Missed(Exception):
    """Decoding from the keyframe a seek found cannot be shown to give a full decode's frames;
    raised before any frame is yielded, so `read_frames` decodes from the start instead."""


def read_frames(info: VideoInfo, size: tuple[int, int] | None = None, threads: int = DECODE_THREADS,
                exact: bool = True, notes: list[str] | None = None, depth: int = 8,
                start: int = 0, start_pts: int | None = None) -> Iterator[Frame]:
    """Yield the frames of `info.path` in display order, from frame `start` on.

    size: (width, height) in display orientation to scale to while converting (swscale, area
    filter), or None for the source size. The colour matrix and range come from `info.colour`
    explicitly, so untagged or BT.601 sources convert without a shift.
    threads: decoder threads (0: FFmpeg's choice, by the machine's cores); see `DECODE_THREADS`.
    exact: False for analysis thumbnails: approximate colour and no deblocking, much cheaper.
    notes: if given, a line is appended for each picture size change and timestamp restart met
    (see below), and, after a full decode, one for frames missing from a regular cadence.
    depth: 16 for uint16 frames on the full 16-bit scale (swscale's rgb48), so 10- and 12-bit
    sources keep their precision through a colour conversion (`cinefx.grade.ocio`); 8 for uint8.
    Either way the stream's range tag is honoured: limited-range code values are expanded to full
    range, as players and editors (DaVinci Resolve's "auto" levels) read camera log files too, so
    a curve defined on code/1023 sees the values the camera's own conversion would.
    start: the index of the first frame to yield, as a full decode numbers them (stand-ins
    included); frames before it are decoded only as far as needed, and never converted.
    start_pts: that frame's `Frame.pts` in a full decode (a scene task knows both from the
    driver's decode). Given, decoding begins at the last keyframe at or before it instead of the
    first frame: the demuxer seeks there, or, in MPEG transport and program streams (whose clock
    can restart, so a time names no place in the file), the packets before it are demuxed but not
    decoded. The frames yielded are the full decode's: pixels, times, durations, indices (frames
    lost before `start` do not shift them) and stand-ins. Where that cannot be made certain (no
    timestamps, as in raw streams, or frames timed by decoder order, as in H.264 in AVI; no
    keyframe found at or before `start_pts`; damaged data between that keyframe and `start`; no
    frame at exactly `start_pts`), the file is decoded from
    its first frame instead: slower, never different. Without `start_pts` that is always done.
    Damage after `start` is stood in for as below, but the pixels FFmpeg conceals it with may
    differ from a full decode's, as they differ between decodes with different thread counts.

    Damaged data: a frame that cannot be decoded (the decoder refuses its packet, or drops it
    without a word, as H.264 does when a slice header is damaged) is replaced by a copy of the last
    good frame (of the first one, for losses at the very start), marked `concealed`, at the lost
    frame's own time and duration, so the output keeps the source's frame count and timing and
    scenes do not merge. Lost frames are found from their packets' timestamps where the container
    indexes them (MP4, MOV, MKV, AVI); in MPEG transport and program streams, whose timestamps are
    lost with the data, from gaps of more than 1.5 frames at the nominal rate between decoded
    frames.
    When more than `MAX_LOST_SHARE` (10 %) of the frames are lost, or none decodes, the file is
    refused with `InputFileError`: as soon as that is certain where the container lists its frame
    count, otherwise after the last frame, before a caller has finished its output. (Decoding from
    `start_pts` counts the losses it sees; checking the whole file is the full decode's job.)

    Timestamp restarts in MPEG transport and program streams (joined files, splices: the clock
    steps back, or forward by over a second) are discontinuities, not losses: every frame is kept,
    and those after a restart are timed to follow the frame before it at the nominal rate (see
    `Restarts`; the writer moves the audio with them).

    Picture size changes part way (concatenated clips, TV captures): later frames are scaled to
    fit the first frame's size with their aspect kept, centred on black bars (letterbox or
    pillarbox), so every frame has one size and nothing is stretched.

    Raises `InputFileError` if the file turns out truncated or corrupt part way.
    """
    by_order = _output_order(info)
    # a seek is checked by the times of the frames it gives, which frames timed by order do not have
    if start and start_pts is not None and not by_order:
        noted = len(notes) if notes is not None else 0
        try:
            yield from _decode(info, size, threads, exact, notes, depth, start, start_pts, by_order)
            return
        except _Missed:
            if notes is not None:
                del notes[noted:]  # the decode from the start notes them again
    yield from _decode(info, size, threads, exact, notes, depth, start, None, by_order)


def _decode(info: VideoInfo, size: tuple[int, int] | None, threads: int, exact: bool, notes: list[str] | None,
            depth: int, start: int, start_pts: int | None, by_order: bool) -> Iterator[Frame]:
    """`read_frames`: decoding from the keyframe before `start_pts` (raising `_Missed` where that
    cannot be trusted, before yielding anything), or from the first frame where it is None.
    by_order: frames are timed by the order the decoder hands them out (`_output_order`)."""
    path = info.path
    k = (info.rotation // 90) % 4
    if size is not None and k % 2:
        size = (size[1], size[0])  # scale in coded orientation, rotate after
    # swscale's default fast path shifts colours by 1-2 levels (more for 10-bit input); accurate
    # rounding with full horizontal chroma interpolation keeps it within a fraction of a level.
    flags = Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT if exact else Interpolation(0)
    convert = dict(format="rgb48le" if depth == 16 else "rgb24", src_colorspace=info.colour.matrix_name,
                   src_color_range="JPEG" if info.colour.full_range else "MPEG",
                   dst_color_range="JPEG", interpolation=Interpolation.BICUBIC | flags)
    shrink = (Interpolation.AREA if exact else Interpolation.FAST_BILINEAR) | flags
    if size is not None:
        convert.update(width=size[0], height=size[1], interpolation=shrink)

    matrix = _fast_matrix(info.colour.matrix_name, info.colour.full_range)
    # our own conversion for exact full-size frames and for cheap thumbnails; swscale otherwise
    own = matrix is not None and (size is None) == exact and depth == 8
    fields = info.field_order != "progressive" and size is None
    step = info.frame_step
    source_size = (info.coded_width, info.coded_height)
    sizes_seen = {source_size}
    gaps = info.container in NO_INDEX
    restarts = _restarts(info) if gaps else None
    seeking = start_pts is not None
    # frames wait in the heap as decoded pictures when some will not be yielded, converted on release
    heap: list[tuple[int, int, np.ndarray | av.VideoFrame, int]] = []
    expected: list[tuple[int, int]] = []  # (pts, duration) of packets whose frame is not out yet
    seq = itertools.count()
    emitted = itertools.count(start if seeking else 0)
    last_pts: int | None = None  # last pts pushed into the heap
    last_out: int | None = None  # last pts handed out
    good: np.ndarray | av.VideoFrame | None = None  # the last frame decoded, which stands in for lost ones
    started = False  # a frame has been numbered
    lost = 0
    cadence = _Cadence() if not gaps and not seeking and notes is not None else None

    def to_rgb(frame: av.VideoFrame) -> np.ndarray:
        if (frame.width, frame.height) != source_size:
            rgb = _fit(frame, size or source_size, {**convert, "interpolation": shrink})
        elif own and frame.format.name == "yuv420p":
            rgb = _yuv420_to_rgb(frame, matrix, size, fields)
        else:
            rgb = frame.to_ndarray(**convert)
        return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb

    def out(pts: int, picture, duration: int, concealed: bool = False) -> Frame | None:
        """The frame at `pts`, numbered, or None for one before `start`."""
        nonlocal last_out, started, lost
        if last_out is not None and pts <= last_out:
            pts = last_out + 1  # duplicate timestamps: keep order, nudge by one tick
        last_out = pts
        if seeking and not started:
            if pts < start_pts:
                return None
            # not the full decode's frame at start_pts, or a stand-in that would copy a later frame
            # where the full decode copies one from before the keyframe
            if pts != start_pts or (concealed and good is None):
                raise _Missed
        started = True
        index = next(emitted)
        if cadence is not None:
            cadence.see(pts)
        lost += concealed
        if index < start:
            return None
        rgb = picture if isinstance(picture, np.ndarray) else to_rgb(picture)
        return Frame(index, pts, rgb.copy() if concealed else rgb, duration, concealed)

    def stand_in(missing: list[tuple[int, int]], picture) -> Iterator[Frame]:
        made = [out(pts, picture, duration, concealed=True) for pts, duration in missing]
        if info.frame_count and lost > MAX_LOST_SHARE * info.frame_count:
            raise _too_damaged(path, lost, info.frame_count)
        yield from (f for f in made if f)

    def release() -> Iterator[Frame]:
        """The next decoded frame in display order, after stand-ins for the frames lost before it."""
        nonlocal good
        pts, _, picture, duration = heapq.heappop(heap)
        missing = []
        while expected and expected[0][0] < pts:
            missing.append(heapq.heappop(expected))
        if expected and expected[0][0] == pts:
            heapq.heappop(expected)
        if gaps and last_out is not None:  # timestamps lost with the data: fill gaps at the nominal rate
            filled, prev = [], last_out
            for t, d in [*missing, (pts, duration)]:
                if 1.5 * step < t - prev <= max(1, round(info.fps)) * step:
                    filled += [(prev + i * step, step) for i in range(1, round((t - prev) / step))]
                filled.append((t, d))
                prev = t
            missing = filled[:-1]
        yield from stand_in(missing, picture if good is None else good)
        frame = out(pts, picture, duration)
        good = picture if frame is None else frame.rgb
        if frame is not None:
            yield frame

    packets = 0
    first_dts = last_dts = None
    with open_container(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if not exact:
            # analysis thumbnails cannot show deblocking, and skipping it saves a sixth of the
            # decode, which is most of a scene split's time
            stream.codec_context.options = {**stream.codec_context.options, "skip_loop_filter": "all"}
        stream.codec_context.thread_count = threads
        demuxed, skip = demux(container, stream), 0
        if seeking and gaps:
            skip = _packets_before_keyframe(info, start_pts)
        elif seeking:
            demuxed = _seek(container, stream, start_pts)
        timed = restarts.timeline(demuxed) if restarts is not None else ((p, False) for p in demuxed)
        try:
            for packet, restart in timed:
                if packet.size:
                    packets += 1
                    if packet.dts is not None:
                        first_dts = packet.dts if first_dts is None else first_dts
                        last_dts = packet.dts
                    if restart and notes is not None:
                        moved = packet.pts if packet.pts is not None else packet.dts
                        at = float(moved * info.time_base) - info.start_time
                        notes.append(f"timestamps restart at {at:.2f} s (joined files?): frames after it are "
                                     "timed to follow on")
                    if packets <= skip:
                        continue
                    if packet.pts is not None and not packet.is_discard:  # discard: before an edit list's start
                        heapq.heappush(expected, (packet.pts, packet.duration or step))
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    if seeking and not started:
                        raise _Missed from None  # how a decoder gets over damage may depend on what came before
                    continue  # its frame is missed, and stood in for, by its timestamp
                for frame in frames:
                    pts = frame.pts
                    if by_order and expected:
                        pts = heapq.heappop(expected)[0]
                    elif pts is None:
                        pts = (last_pts + step) if last_pts is not None else 0
                    last_pts = pts
                    if seeking and not started and frame.is_corrupt:
                        raise _Missed  # error concealment may have drawn on frames before the keyframe
                    coded = (frame.width, frame.height)
                    if coded != source_size:
                        if notes is not None and coded not in sizes_seen:
                            at = float(pts * info.time_base) - info.start_time
                            notes.append(f"picture size changes from {source_size[0]}x{source_size[1]} to "
                                         f"{coded[0]}x{coded[1]} at {at:.2f}s: scaled to fit the first size, "
                                         "with black bars")
                        sizes_seen.add(coded)
                    heapq.heappush(heap, (pts, next(seq), frame if start else to_rgb(frame), int(frame.duration or 0)))
                    if len(heap) > REORDER_DEPTH:
                        yield from release()
        except av.error.FFmpegError as ex:
            raise InputFileError(f"{path}: cannot be decoded past packet {packets} ({ex})") from ex
    while heap:
        yield from release()
    present = packets
    if info.container in NO_PRESENTATION_TIMES and last_dts is not None:
        # AVI numbers its chunks by decode time, and counts the empty ones of frames its recorder
        # dropped (FFmpeg writes one for each gap in time), which the demuxer passes over
        present = max(packets, last_dts - first_dts + 1)
    if not seeking and info.frame_count and present < info.frame_count:  # a seek skips packets
        raise InputFileError(f"{path}: truncated: the container lists {info.frame_count} frames, "
                             f"only {present} are present")
    if good is None:
        if seeking:
            raise _Missed
        raise InputFileError(f"{path}: contains no decodable video frames ({packets} damaged packets)")
    yield from stand_in([e for e in sorted(expected) if e[0] > last_out], good)  # lost at the end
    if seeking and not started:
        raise _Missed
    total = next(emitted)
    if lost > MAX_LOST_SHARE * total:
        raise _too_damaged(path, lost, total)
    missing = cadence.missing() if cadence is not None else []
    if missing:
        n = sum(k for _, k in missing)
        at = float(missing[0][0] * info.time_base) - info.start_time
        notes.append(f"{n} frame{'s' if n != 1 else ''} missing from the source (gaps in its otherwise regular "
                     f"timestamps, the first after {at:.2f} s): damaged data, or frames the recorder dropped; "
                     "each gap holds the frame before it")


def _seek(container, stream, start_pts: int) -> Iterator[av.Packet]:
    """`stream`'s packets from the last keyframe at or before `start_pts` on. (FFmpeg's decoders
    drop the pictures of an open GOP shown before its keyframe when decoding starts there.)"""
    target, landed = start_pts, None
    for _ in range(_SEEK_TRIES):
        try:
            container.seek(target, backward=True, stream=stream)
            demuxed = demux(container, stream)
            key = next((p for p in demuxed if p.size), None)
        except av.error.FFmpegError:
            raise _Missed from None
        if key is None or key.pts is None or not key.is_keyframe or key.pts == landed:
            raise _Missed  # no timestamps (raw streams), no keyframe, or no earlier keyframe
        if key.pts <= start_pts:
            return itertools.chain([key], demuxed)
        landed, target = key.pts, min(target, key.pts if key.dts is None else key.dts) - 1
    raise _Missed


def _output_order(info: VideoInfo) -> bool:
    """Whether `info`'s frames must be timed by the order the decoder hands them out: in a format
    without presentation times, packets timed in decode order (their two times a constant apart)
    of a codec that reorders. Each frame then takes the earliest time of the packets not yet shown;
    the set of times is right, only FFmpeg's pairing of times with pictures is not."""
    if info.container not in NO_PRESENTATION_TIMES:
        return False
    with open_container(info.path) as container:
        stream = container.streams.video[0]
        if not stream.codec_context.has_b_frames:
            return False
        packets = (p for p in demux(container, stream) if p.size and p.pts is not None and p.dts is not None)
        return len({p.pts - p.dts for _, p in zip(range(_ORDER_PACKETS), packets)}) == 1


def _packets_before_keyframe(info: VideoInfo, start_pts: int) -> int:
    """In a stream without an index: how many packets come before the last keyframe at or before
    `start_pts`, times moved as `Restarts` moves them. Demuxing costs little beside decoding."""
    restarts, found = _restarts(info), None
    with open_container(info.path) as container:
        try:
            packets = demux(container, container.streams.video[0])
            for n, (packet, _) in enumerate(t for t in restarts.timeline(packets) if t[0].size):
                if packet.is_keyframe and packet.pts is not None:
                    if packet.pts > start_pts:
                        break
                    found = n
        except av.error.FFmpegError:
            found = None  # the decode from the start says what is wrong
    if found is None:
        raise _Missed
    return found


def _too_damaged(path, lost: int, total: int) -> InputFileError:
    return InputFileError(f"{path}: {lost} of {total} frames cannot be decoded (damaged data); more than "
                          f"{MAX_LOST_SHARE:.0%} lost means the file itself is broken: copy or export it again")


def _fit(frame: av.VideoFrame, size: tuple[int, int], convert: dict) -> np.ndarray:
    """`frame` as RGB (H, W, 3) (uint8, or uint16 for rgb48) at `size` = (W, H): scaled to fit with its aspect kept and
    centred on black, for streams whose picture size changes part way."""
    w, h = size
    s = min(w / frame.width, h / frame.height)
    fw, fh = max(1, min(w, round(frame.width * s))), max(1, min(h, round(frame.height * s)))
    canvas = np.zeros((h, w, 3), np.uint16 if convert["format"] == "rgb48le" else np.uint8)
    x, y = (w - fw) // 2, (h - fh) // 2
    canvas[y:y + fh, x:x + fw] = frame.to_ndarray(**{**convert, "width": fw, "height": fh})
    return canvas


# Luma weights (Kr, Kb) of the matrices the fast path handles.
_KR_KB = {"ITU709": (0.2126, 0.0722), "ITU601": (0.299, 0.114)}


def _fast_matrix(name: str, full_range: bool) -> np.ndarray | None:
    """3×4 float32 matrix taking [Y, Cb, Cr, 1] (8-bit code values) to R'G'B' + 0.5, or None
    where only swscale handles the matrix."""
    if name not in _KR_KB:
        return None
    kr, kb = _KR_KB[name]
    kg = 1 - kr - kb
    ys, cs, y0 = (1.0, 1.0, 0.0) if full_range else (255 / 219, 255 / 224, 16.0)
    a = np.array([[1, 0, 2 * (1 - kr)],
                  [1, -2 * (1 - kb) * kb / kg, -2 * (1 - kr) * kr / kg],
                  [1, 2 * (1 - kb), 0]], np.float64) @ np.diag([ys, cs, cs])
    offset = -a @ np.array([y0, 128.0, 128.0]) + 0.5  # + 0.5 so the truncation below rounds
    return np.hstack([a, offset[:, None]]).astype(np.float32)


def _plane(p, width: int, height: int) -> np.ndarray:
    return np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:height, :width]


def _upsample_chroma(c: np.ndarray, w: int, h: int, fields: bool) -> np.ndarray:
    """A 4:2:0 chroma plane to (h, w). In interlaced frames alternate chroma rows belong to the
    two fields, so each field's rows are upsampled on their own: mixing them would smear one
    moment's colour into the other's lines (chroma combing on motion)."""
    if not fields or h % 4:
        return cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR)
    out = np.empty((h, w), c.dtype)
    for parity in (0, 1):
        out[parity::2] = cv2.resize(c[parity::2], (w, h // 2), interpolation=cv2.INTER_LINEAR)
    return out


def _yuv420_to_rgb(frame: av.VideoFrame, m: np.ndarray, size: tuple[int, int] | None = None,
                   fields: bool = False) -> np.ndarray:
    """8-bit 4:2:0 → RGB through the float matrix `m` (see `_fast_matrix`), with exact rounding.

    At full size (`size` None) this costs a third of swscale's accurate path (whose fast path is
    off by 1–2 levels): flat colours come out identical to the accurate path; chroma is upsampled
    bilinearly rather than bicubically, so at sharp colour edges the two differ by a few levels.
    With `size` (analysis thumbnails) every plane is shrunk first, and the conversion runs on a few
    thousand pixels instead of millions. `fields`: an interlaced frame, whose chroma is upsampled
    field by field.
    """
    w, h = frame.width, frame.height
    cw, ch = (w + 1) // 2, (h + 1) // 2
    y = _plane(frame.planes[0], w, h)
    u, v = _plane(frame.planes[1], cw, ch), _plane(frame.planes[2], cw, ch)
    if size is None:
        u, v = (_upsample_chroma(c, w, h, fields) for c in (u, v))
    else:
        y, u, v = (cv2.resize(c, size, interpolation=cv2.INTER_AREA) for c in (y, u, v))
    rgb = cv2.transform(cv2.merge([y, u, v]).astype(np.float32), m)
    np.clip(rgb, 0, 255, out=rgb)
    return rgb.astype(np.uint8)

