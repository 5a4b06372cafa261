"""Undamaged files read as they were written. The reader's rules for damaged timestamps (a packet
out of the line its neighbours keep, a decode time off the clock, a presentation time far from its
decode time) and its notes about restarts and missing frames must leave legitimate files alone:
every frame in display order, at the time its muxer wrote, and nothing said."""

from fractions import Fraction

import av
import numpy as np
import pytest

from cinefx.errors import InputFileError
from cinefx.testing.clips import Move, render_move, write_clip
from cinefx.video.probe import probe
from cinefx.video.reader import read_frames

SIZE = (96, 64)
TICK = Fraction(1, 90000)


def numbered(n, photo="astronaut", first=0):
    """A camera move whose frames carry their number (`first` on) in seven black or white blocks
    along the top, so each decoded frame names the source frame it is."""
    frames = []
    for i, rgb in enumerate(render_move(Move(photo, n, (0.45, 0.4, 0.95), (0.55, 0.5, 0.6)), SIZE), first):
        for bit in range(7):
            rgb[:10, bit * 9:(bit + 1) * 9] = 255 if (i >> bit) & 1 else 0
        frames.append(rgb)
    return frames


def number(rgb):
    return sum(1 << bit for bit in range(7) if rgb[2:8, bit * 9 + 2:bit * 9 + 7].mean() > 127)


def shown_times(path):
    """Presentation times of the video packets a player shows (an edit list's discarded ones left
    out), in display order: FFmpeg's own reading of the file."""
    with av.open(str(path)) as c:
        return sorted(p.pts for p in c.demux(c.streams.video[0]) if p.size and not p.is_discard)


X264_B = {"x264-params": "bframes=3:b-pyramid=strict:keyint=12:open-gop=1"}


def legit(kind, d):
    """(file, the number of its first shown frame): each a way real files are made."""
    if kind == "ts_bpyramid_opengop":
        return write_clip(d / "a.ts", numbered(36), fps=24, audio="aac", options=X264_B), 0
    if kind == "mpg_mpeg2":  # a program stream, as DVDs and capture cards write
        return write_clip(d / "a.mpg", numbered(36), fps=25, codec="mpeg2video", audio=None,
                          options={"bf": "2", "g": "12"}), 0
    if kind == "ts_33bit_wrap":  # the 90 kHz clock wraps after 26.5 h, here one second in
        start = 2 ** 33 - 90000
        return write_clip(d / "a.ts", numbered(48), fps=24, time_base=TICK, audio=None, options=X264_B,
                          pts=[start + 3750 * i for i in range(48)]), 0
    if kind == "ts_1fps_10h":  # a slideshow or time lapse on a broadcast clock: B-frames 2 to 4 s late
        return write_clip(d / "a.ts", numbered(12), fps=1, time_base=TICK, audio=None, options=X264_B,
                          pts=[(36000 + i) * 90000 for i in range(12)]), 0
    if kind == "avi_h264_b":  # AVI stores no presentation times
        return write_clip(d / "a.avi", numbered(30), fps=25, audio=None, options=X264_B), 0
    if kind == "avi_h264_mp3":  # FFmpeg shifts the video a frame for the sound's delay: an empty chunk
        return write_clip(d / "a.avi", numbered(30), fps=25, audio="mp3", options={"x264-params": "bframes=0"}), 0
    if kind == "mp4_edit_list":  # four frames before the edit's start: decoded, never shown
        return write_clip(d / "a.mp4", numbered(30), fps=24, time_base=Fraction(1, 12288), audio=None,
                          pts=[(i - 4) * 512 for i in range(30)], options=X264_B), 4
    if kind == "mkv_2997":  # Matroska's milliseconds round 29.97 fps to steps of 33 and 34
        return write_clip(d / "a.mkv", numbered(36), fps=Fraction(30000, 1001), time_base=Fraction(1, 1000),
                          pts=[round(i * 1001 / 30) for i in range(36)], audio=None), 0
    if kind == "mkv_phone_vfr":  # a phone's clock: steps of 30 to 36 ms, and a pause of 30 of them
        steps = [30 + (5 * i) % 7 if i != 20 else 990 for i in range(1, 36)]
        return write_clip(d / "a.mkv", numbered(36), fps=30, time_base=Fraction(1, 1000), audio=None,
                          pts=np.cumsum([0, *steps]).tolist()), 0
    raise ValueError(kind)


KINDS = ["ts_bpyramid_opengop", "mpg_mpeg2", "ts_33bit_wrap", "ts_1fps_10h", "avi_h264_b", "avi_h264_mp3",
         "mp4_edit_list", "mkv_2997", "mkv_phone_vfr"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_legitimate_file_reads_as_written(tmp_path, kind):
    """Every frame the file shows, in display order, at the time FFmpeg reads for it, none stood
    in for, and no note. At 1 fps, x264's B-frames put a frame's presentation time up to 4 s after
    its decode time: the reader took that for damage and timed the first frame by the decoder's
    order, at 0 instead of 10 hours (the render then failed: 'encoding failed'). The AVI of
    H.264 without B-frames was refused as truncated (see below)."""
    src, first = legit(kind, tmp_path)
    notes = []
    frames = list(read_frames(probe(src), notes=notes))
    assert [number(f.rgb) for f in frames] == list(range(first, first + len(frames)))
    assert [f.pts for f in frames] == shown_times(src)
    assert not any(f.concealed for f in frames)
    assert notes == []


@pytest.mark.parametrize("back", [0, 1])
def test_transport_streams_joined_where_the_clock_steps_back_by_a_frame_are_a_restart(tmp_path, back):
    """Two clips cut from one timeline and joined byte for byte, the second starting its clock
    where the first ends, less `back` frames: each cut's decode times start two frames before its
    first picture (x264's B-frame delay), so they step back at the join by one to three frames,
    and the packets after the step are still on the clock before it. The reader took the first
    packet after the join, or the last before it, for damage and kept the second clip's times:
    its first frames fell among the first clip's last ones, shuffled and nudged by a tick."""
    n = 24
    a = write_clip(tmp_path / "a.ts", numbered(n), fps=24, audio=None)
    b = write_clip(tmp_path / "b.ts", numbered(n, "coffee", first=n), fps=24, time_base=TICK, audio=None,
                   pts=[(n - back + i) * 3750 for i in range(n)])
    src = tmp_path / "joined.ts"
    src.write_bytes(a.read_bytes() + b.read_bytes())
    notes = []
    frames = list(read_frames(probe(src), notes=notes))
    assert [number(f.rgb) for f in frames] == list(range(2 * n))
    assert set(np.diff([f.pts for f in frames])) == {3750}
    assert len(notes) == 1 and "timestamps restart" in notes[0], notes


def test_an_avi_whose_recorder_dropped_a_frame_is_read_not_refused_as_truncated(tmp_path):
    """AVI counts a dropped frame as an empty chunk, which its header counts and FFmpeg's demuxer
    passes over: the file was refused ('truncated: the container lists 21 frames, only 20 are
    present'). Its frames are read at their times and the gap is said; a file really cut short
    is still refused."""
    src = write_clip(tmp_path / "drop.avi", numbered(20), fps=25, codec="mjpeg", pix_fmt="yuvj420p", audio=None,
                     pts=[i + (i >= 10) for i in range(20)])
    notes = []
    frames = list(read_frames(probe(src), notes=notes))
    assert [number(f.rgb) for f in frames] == list(range(20))
    assert [f.pts for f in frames] == shown_times(src) == [i + (i >= 10) for i in range(20)]
    assert len(notes) == 1 and notes[0].startswith("1 frame missing from the source"), notes
    cut = tmp_path / "cut.avi"
    cut.write_bytes(src.read_bytes()[:src.stat().st_size * 6 // 10])
    with pytest.raises(InputFileError, match=r"truncated: the container lists 21 frames, only \d+ are present"):
        list(read_frames(probe(cut)))
