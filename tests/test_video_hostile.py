"""Inputs a hostile tester made: one damaged audio timestamp in a transport stream, transport
streams joined byte for byte (the clock restarts), and paths that are not files at all."""

import os
from fractions import Fraction
import socket
import tempfile
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.errors import InputFileError
from cinefx.presets import load_preset
from cinefx.stylize import StylizeOptions, stylize_file
from cinefx.testing.clips import Move, render_move, tone, write_clip
from cinefx.video.probe import probe
from cinefx.video.reader import read_frames

SIZE = (160, 90)


def grade(src, dst):
    return stylize_file(src, dst, load_preset("epic"), StylizeOptions(engine="grade", metrics=False))


def packet_times(path, kind):
    """Presentation times (seconds) of `kind`'s packets, in file order."""
    with av.open(str(path)) as c:
        s = getattr(c.streams, kind)[0]
        return [float(p.pts * s.time_base) for p in c.demux(s) if p.size]


def undecodable_audio(path):
    """Indices of the audio packets FFmpeg's decoder refuses."""
    with av.open(str(path)) as c:
        bad = []
        for i, p in enumerate(p for p in c.demux(c.streams.audio[0]) if p.size):
            try:
                p.decode()
            except av.error.InvalidDataError:
                bad.append(i)
        return bad


def decoded_audio(path):
    """Every sample of the first audio stream, decoded by FFmpeg: (channels, samples)."""
    with av.open(str(path)) as c:
        return np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)


# -- 1. damaged timestamps -------------------------------------------------------------------------

def damaged_clip(tmp_path):
    return write_clip(tmp_path / "t48.ts", render_move(Move("astronaut", 48), SIZE), options={"g": "12"})


def xor_damage(src, dst, seed):
    """The tester's recipe: 0xFF XORed into 40 random bytes of the middle half."""
    data = bytearray(Path(src).read_bytes())
    for i in np.random.default_rng(seed).integers(len(data) // 4, 3 * len(data) // 4, 40):
        data[i] ^= 0xFF
    Path(dst).write_bytes(bytes(data))


def audio_jump(path):
    """The index of the one audio packet whose time jumps over 40 s ahead and back, else None."""
    times = packet_times(path, "audio")
    back = [i for i, (a, b) in enumerate(zip(times, times[1:])) if b < a]
    return back[0] if len(back) == 1 and times[back[0]] > 40 else None


def xor_damage_with_the_fault(src, dst):
    """The tester's recipe, with the first seed that gives the fault the tester met: one audio
    timestamp over 40 s ahead. What the recipe hits depends on the clip's exact bytes, and a CI
    machine encoded other bytes than ours (the seed fixed here once gave no such fault there), so
    the seed is looked for rather than fixed; about one seed in twenty-five gives the fault."""
    for seed in range(400):
        xor_damage(src, dst, seed)
        if audio_jump(dst) is not None:
            return
    raise AssertionError(f"{src}: no seed below 400 damages an audio timestamp")


def pes_damage(src, dst, nth, pts=None, dts=None, stream_id=0xC0):
    """The same faults made on purpose: the `nth` PES header of `stream_id` (0xC0 the first audio
    stream, 0xE0 the first video stream) given the timestamps `pts` and/or `dts` (90 kHz ticks),
    as a damaged byte there does. A decode time needs a header that carries one."""
    data = bytearray(Path(src).read_bytes())
    seen = 0
    for at in range(0, len(data), 188):
        if data[at + 1] & 0x40 == 0:  # no PES starts in this TS packet
            continue
        start = at + 4 + (1 + data[at + 4] if data[at + 3] & 0x20 else 0)  # past the adaptation field
        if data[start:start + 4] != bytes([0, 0, 1, stream_id]):
            continue
        has_dts = data[start + 7] & 0x40
        if seen == nth:
            for field, value in ((0, pts), (1, dts)):
                if value is None:
                    continue
                assert field == 0 or has_dts, f"{src}: PES header {nth} carries no decode time"
                p = start + 9 + 5 * field
                data[p] = (data[p] & 0xF0) | ((value >> 29) & 0x0E) | 1
                data[p + 1:p + 5] = bytes([(value >> 22) & 0xFF, ((value >> 14) & 0xFE) | 1,
                                           (value >> 7) & 0xFF, ((value << 1) & 0xFE) | 1])
            Path(dst).write_bytes(bytes(data))
            return
        seen += 1
    raise AssertionError(f"{src}: fewer than {nth + 1} PES headers of stream {stream_id:#x}")


@pytest.mark.parametrize("damage", [xor_damage_with_the_fault,
                                    lambda src, dst: pes_damage(src, dst, nth=26, pts=4151500)],
                         ids=["xor", "pts"])
def test_a_damaged_audio_timestamp_drops_that_packet_not_the_whole_output(tmp_path, damage):
    """An audio packet whose timestamp jumps 46 s ahead and back made the copy fail to mux, after
    the whole encode, with a message naming neither the input nor the cause. Now that packet is
    dropped with a note naming the input, and the output's audio decodes and keeps its timing: the
    random bytes also hit the data of a few packets, which are dropped too, as the decoder refuses
    them."""
    src = damaged_clip(tmp_path)
    bad = tmp_path / "t48_flip.ts"
    damage(src, bad)
    before = packet_times(bad, "audio")
    jump = audio_jump(bad)
    assert jump is not None  # the fault the tester met
    out = tmp_path / "r_flip.mp4"
    r = CliRunner().invoke(app, ["stylize", str(bad), "-o", str(out), "--engine", "grade", "--no-metrics"])
    assert r.exit_code == 0, r.output
    assert "t48_flip.ts: 1 audio packet with broken timestamps dropped" in r.output
    refused = set(undecodable_audio(bad)) - {jump}
    n = len(refused)
    assert (f"{n} damaged audio packet{'s' if n != 1 else ''} the decoder refuses dropped" in r.output) == bool(n)
    after = packet_times(out, "audio")
    assert after == sorted(after) and max(after) < 2.2
    kept = [t for i, t in enumerate(before) if i not in refused and i != jump]
    assert len(after) == len(kept)
    assert np.allclose(np.array(after) - after[0], np.array(kept) - kept[0], atol=1e-3)
    samples = decoded_audio(out)
    assert samples.shape[1] >= (len(after) - 2) * 1024 and np.abs(samples).max() > 0.1


def test_an_audio_timestamp_damaged_by_less_than_a_second_is_dropped_not_followed(tmp_path):
    """A packet 0.25 s ahead is within a second of the clock, so it was kept, and the packet after
    it, stepping back, was taken for a restart: the rest of the sound came 0.25 s late. Now the
    packet after it, following on from the one before, shows it damaged: only it goes."""
    src = damaged_clip(tmp_path)
    bad = tmp_path / "bad.ts"
    before = packet_times(src, "audio")
    pes_damage(src, bad, nth=34, pts=round((before[34] + 0.25) * 90000))
    res = grade(bad, tmp_path / "out.mp4")
    assert any(n.startswith("1 audio packet with broken timestamps dropped") for n in res.notes), res.notes
    after = packet_times(tmp_path / "out.mp4", "audio")
    shift = after[0] - before[0]  # the output starts at its own zero
    assert np.allclose(np.array(after) - shift, before[:34] + before[35:], atol=1e-3)


def test_audio_streams_named_but_empty_are_left_out_with_a_note(tmp_path):
    """A transport stream whose program table names audio that never comes (a recorder that
    declared a track and got no sound, or a table damaged into naming one: the tester's recipe made
    such a stream) has streams with no channels and no sample rate. Re-encoding them failed with
    "unexpected ValueError: Invalid layout: 0 channels"; now they are left out, said in a note."""
    src = tmp_path / "declared.ts"
    with av.open(str(src), "w") as out:
        video = out.add_stream("libx264", rate=24)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        for codec in ("aac", "mp2"):
            out.add_stream(codec, rate=48000).layout = "stereo"
        for i, rgb in enumerate(render_move(Move("coffee", 24), (64, 48))):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    assert [s.codec_context.channels for s in av.open(str(src)).streams.audio] == [0, 0]
    res = grade(src, tmp_path / "out.mp4")
    assert res.frames == 24
    for n, codec in ((1, "aac"), (2, "mp3float")):
        assert f"audio stream {n} ({codec}) has no channels or sample rate FFmpeg can find: left out" in res.notes
    with av.open(str(tmp_path / "out.mp4")) as c:
        assert not c.streams.audio and c.streams.video[0].frames == 24


def video_times(path):
    """(pts, dts) of the first video stream's packets, in file order."""
    with av.open(str(path)) as c:
        return [(p.pts, p.dts) for p in c.demux(c.streams.video[0]) if p.size]


# Damage to one video PES header, as the tester's random bytes made it (the packet numbers are
# those of the 48-frame clip: x264 with B-frames, so most headers carry both times):
VIDEO_TIMES_DAMAGE = {
    # the decode time alone far off: it was taken for two clock restarts, and a frame made up
    "dts far": dict(nth=25, dts=4124214),
    # the decode time after the presentation time, both within a second of the clock: FFmpeg then
    # guesses 240 fps, and every frame seemed to have nine lost beside it (the file was refused)
    "dts late": dict(nth=18, dts=96300),
    # a header with one time (FFmpeg copies it to the other) moved 45 s: two restarts
    "both far": dict(nth=27, pts=4066178),
    # a header with one time moved 0.3 s ahead, still on the clock: the packets after it looked
    # like a restart back
    "both near": dict(nth=19, pts=92626),
    # the presentation time alone 45 s ahead: the frame went to the end of the clip, and the
    # finished file was refused as "incomplete (the disk may be full)"
    "pts far": dict(nth=29, pts=4084928),
}


@pytest.mark.parametrize("case", VIDEO_TIMES_DAMAGE)
def test_a_damaged_video_timestamp_is_not_a_clock_restart(tmp_path, case):
    """One video packet's damaged timestamps cost nothing: all 48 frames come out once each at
    their own times (the decoder's order times the damaged one), with no restart noted, and the
    frames match the undamaged file's. Each case failed before: a frame stood in and another
    added, the clock said to restart twice, or the file refused."""
    src = damaged_clip(tmp_path)
    bad = tmp_path / "bad.ts"
    pes_damage(src, bad, stream_id=0xE0, **VIDEO_TIMES_DAMAGE[case])
    good, damaged = video_times(src), video_times(bad)
    assert len(damaged) == 48 and sum(a != b for a, b in zip(good, damaged)) == 1  # the damage, and only it
    info = probe(bad)
    assert info.fps == 24
    notes = []
    frames = list(read_frames(info, notes=notes))
    reference = list(read_frames(probe(src)))
    assert [f.pts for f in frames] == [f.pts for f in reference] and notes == []
    assert not any(f.concealed for f in frames)
    assert all(np.array_equal(f.rgb, g.rgb) for f, g in zip(frames, reference))
    res = grade(bad, tmp_path / "out.mp4")
    assert res.frames == 48 and not any("restart" in n for n in res.notes), res.notes
    assert np.allclose(packet_times(tmp_path / "out.mp4", "video"), packet_times(grade_ref(tmp_path, src), "video"))


def grade_ref(tmp_path, src):
    out = tmp_path / "ref.mp4"
    if not out.exists():
        grade(src, out)
    return out


def test_the_testers_random_damage_renders_or_is_refused_in_one_line(tmp_path):
    """The tester's recipe over 100 seeds: each damaged file either renders (every frame written
    reads back, the audio in order and within the clip) or is refused as too damaged, naming the
    input. Before, one file in fifteen failed otherwise: PyAV's IndexError when damage announced a
    new stream, "encoding failed" naming the output when a damaged AAC packet spelt an odd error
    code or MP4's ADTS filter refused it, a frame rate of 240 (454 of 502 frames "lost"), or
    "incomplete, the disk may be full"."""
    src = damaged_clip(tmp_path)
    bad, out = tmp_path / "bad.ts", tmp_path / "out.mp4"
    outcomes = []
    for seed in range(100):
        xor_damage(src, bad, seed)
        try:
            res = stylize_file(bad, out, load_preset("epic"),
                               StylizeOptions(engine="grade", metrics=False, overwrite=True))
        except InputFileError as ex:
            assert str(ex).startswith(f"{bad}: ") and "frames cannot be decoded (damaged data)" in str(ex), \
                f"seed {seed}: {ex}"
            outcomes.append("refused")
            continue
        except Exception as ex:
            raise AssertionError(f"seed {seed}: {type(ex).__name__}: {ex}") from ex
        assert len(packet_times(out, "video")) == res.frames >= 48 - res.concealed_frames, seed
        audio = packet_times(out, "audio")
        assert audio == sorted(audio) and max(audio) < 2.2, seed
        outcomes.append("rendered")
    assert outcomes.count("rendered") >= 90, outcomes  # 40 bytes in 100 KB: most files stay usable


# -- 2. transport streams joined byte for byte ------------------------------------------------------

def joined(tmp_path, second_size=SIZE, audio="aac"):
    """Two 24-frame clips written separately (each clock starts again) and joined with `cat`."""
    a = write_clip(tmp_path / "a.ts", render_move(Move("astronaut", 24), SIZE), audio=audio)
    b = write_clip(tmp_path / "b.ts", render_move(Move("coffee", 24), second_size), audio=audio)
    src = tmp_path / "cat.ts"
    src.write_bytes(a.read_bytes() + b.read_bytes())
    return a, b, src


def test_joined_transport_streams_keep_every_frame_and_the_audio_in_sync(tmp_path):
    """The clock restarting at the join is not damage: all 48 frames come out, those of the second
    clip following the first at 1/24 s, and its audio moves with them, so each clip's sound keeps
    its place against its own pictures. The output starts at 0, as a transport stream's clock
    starts anywhere: its times are the source's less the source's start."""
    a, b, src = joined(tmp_path)
    va, vb = packet_times(a, "video"), packet_times(b, "video")
    assert min(vb) < max(va)  # the restart
    res = grade(src, tmp_path / "out.mp4")
    assert res.frames == 48 and res.concealed_frames == 0
    assert any(n == "timestamps restart at 1.00 s (joined files?): frames after it are timed to follow on"
               for n in res.notes), res.notes
    zero = min(packet_times(src, "video") + packet_times(src, "audio"))
    written = packet_times(tmp_path / "out.mp4", "video"), packet_times(tmp_path / "out.mp4", "audio")
    assert abs(min(min(t) for t in written)) < 1e-6
    times = sorted(t + zero for t in written[0])
    assert np.allclose(np.diff(times), 1 / 24, atol=1e-4)
    shift = times[24] - min(vb)  # where the second clip's pictures went
    aa, ab = packet_times(a, "audio"), packet_times(b, "audio")
    out = [t + zero for t in written[1]]
    assert out == sorted(out)
    # each output packet is one of the first clip's, or one of the second's moved with its frames
    # (where the two overlap at the join, a packet or two goes)
    moved = [t + shift for t in ab]
    assert all(min(abs(np.subtract(aa + moved, t))) < 1e-3 for t in out)
    assert len(out) >= len(aa) + len(ab) - 3
    assert abs(out[0] - aa[0]) < 1e-3 and abs(out[-1] - moved[-1]) < 1e-3
    assert decoded_audio(tmp_path / "out.mp4").shape[1] >= (len(out) - 2) * 1024


def test_joined_transport_streams_of_two_sizes_render(tmp_path):
    """The tester's reschange.ts: a size change and a clock restart at once."""
    _, _, src = joined(tmp_path, second_size=(128, 72), audio=None)
    res = grade(src, tmp_path / "out.mp4")
    assert res.frames == 48 and res.concealed_frames == 0
    assert any("picture size changes from 160x90 to 128x72 at 1.00s" in n for n in res.notes), res.notes
    assert probe(tmp_path / "out.mp4").display_size == SIZE


@pytest.mark.parametrize("first", [2 ** 33 - 90000, 2 ** 33 - 10 * 90000, 10 * 3600 * 90000],
                         ids=["wraps-inside", "just-before-the-wrap", "10-hours-in"])
def test_a_transport_streams_clock_starts_its_output_at_0(tmp_path, first):
    """A transport stream's clock starts anywhere and counts 2^33 ticks (26.5 hours) before it
    starts again. A recording crossing that point (one broadcast hour in 26 does) has FFmpeg make
    the times continuous by starting them below 0: MP4's edit list drops what lies before 0, so
    the render of a file crossing it failed as 'incomplete, the disk may be full', and one wholly
    before it played nothing though the run passed. A recording 10 hours into the clock gave an
    MP4 opening on a 10-hour empty edit. The output now starts at 0, sound moved with the pictures."""
    tb = Fraction(1, 90000)
    # the muxer keeps the low 33 bits of each time, as a broadcast encoder's clock does
    src = write_clip(tmp_path / "wrap.ts", render_move(Move("astronaut", 48), SIZE), time_base=tb,
                     pts=[first + i * 3750 for i in range(48)], audio_start=float(first * tb))
    with av.open(str(src)) as c:
        assert (c.start_time < 0) == (first > 2 ** 32)  # near the wrap: FFmpeg's continuous times, below 0
    res = grade(src, tmp_path / "out.mp4")
    assert res.frames == 48
    with av.open(str(tmp_path / "out.mp4")) as c:
        shown = [float(f.pts * f.time_base) for f in c.decode(video=0)]
    assert len(shown) == 48 and 0 <= min(shown) < 0.05 and np.allclose(np.diff(shown), 1 / 24, atol=1e-4)
    video, audio = packet_times(src, "video"), packet_times(src, "audio")
    out_video, out_audio = packet_times(tmp_path / "out.mp4", "video"), packet_times(tmp_path / "out.mp4", "audio")
    assert len(out_audio) == len(audio)
    assert abs((min(out_audio) - min(out_video)) - (min(audio) - min(video))) < 1e-3  # in sync as in the source


def test_a_gap_in_the_sound_of_a_transport_stream_stays_a_gap(tmp_path):
    """A broadcast that lost its audio for 1.5 s while the pictures went on: the sound's jump ahead
    was taken for a clock restart with no video restart to follow, and every later packet moved
    1.5 s early (out of sync to the end, with a note claiming the opposite). The sound after the
    gap now keeps its time; the restarts of joined files are matched by where the video's clock
    restarted (the joined-files tests above)."""
    src = tmp_path / "gap.ts"
    with av.open(str(src), "w") as out:
        video = out.add_stream("libx264", rate=24, options={"g": "12"})
        video.width, video.height, video.pix_fmt = 160, 90, "yuv420p"
        sound = out.add_stream("aac", rate=48000)
        sound.layout = "stereo"
        done = 0
        for i, rgb in enumerate(render_move(Move("astronaut", 96), SIZE)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
            while (done + 1024) / 48000 <= (i + 1) / 24:
                if not 1.0 <= done / 48000 < 2.5:  # the gap
                    chunk = av.AudioFrame.from_ndarray(tone((done + np.arange(1024)) / 48000), format="fltp",
                                                       layout="stereo")
                    chunk.sample_rate, chunk.pts, chunk.time_base = 48000, done, Fraction(1, 48000)
                    out.mux(sound.encode(chunk))
                done += 1024
        out.mux(video.encode(None))
        out.mux(sound.encode(None))
    before = packet_times(src, "audio")
    assert max(b - a for a, b in zip(before, before[1:])) > 1.4  # the gap
    res = grade(src, tmp_path / "out.mp4")
    assert not any("restart" in n for n in res.notes), res.notes
    after = packet_times(tmp_path / "out.mp4", "audio")
    video_shift = packet_times(tmp_path / "out.mp4", "video")[0] - packet_times(src, "video")[0]
    assert len(after) == len(before)
    assert np.allclose(np.array(after) - video_shift, before, atol=1e-3)


# -- 3. paths that are not files ----------------------------------------------------------------

@pytest.fixture
def special(request):
    """A character device, a named pipe or a listening socket."""
    if request.param == "device":
        yield Path("/dev/zero"), "a character device"
        return
    with tempfile.TemporaryDirectory(prefix="cfx") as d:  # short: socket paths are limited to 108 bytes
        path = Path(d) / request.param
        if request.param == "pipe":
            os.mkfifo(path)
            yield path, "a named pipe"
        else:
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(str(path))
                s.listen()
                yield path, "a socket"


@pytest.mark.parametrize("special", ["device", "pipe", "socket"], indirect=True)
def test_a_device_pipe_or_socket_is_not_called_empty(special):
    """`/dev/zero` was 'empty (0 bytes)'; a pipe would be opened and block. Said as what it is, and
    never read (nobody writes to the pipe, so a read would hang)."""
    path, kind = special
    with pytest.raises(InputFileError, match=rf"^{path}: is not a regular file \({kind}\)"):
        probe(path)
