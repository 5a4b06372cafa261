"""Inputs a hostile tester made: one damaged audio timestamp in a transport stream, transport
streams joined byte for byte (the clock restarts), and paths that are not files at all."""

import os
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
from cinefx.testing.clips import Move, render_move, write_clip
from cinefx.video.probe import probe

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


# -- 1. one damaged audio timestamp ---------------------------------------------------------------

def xor_damage(src, dst):
    """The tester's recipe: 0xFF XORed into 40 random bytes of the middle half."""
    data = bytearray(Path(src).read_bytes())
    for i in np.random.default_rng(5).integers(len(data) // 4, 3 * len(data) // 4, 40):
        data[i] ^= 0xFF
    Path(dst).write_bytes(bytes(data))


def pts_damage(src, dst, nth=26, pts=4151500):
    """The same fault made on purpose: the `nth` audio PES header's timestamp set to `pts` (90 kHz),
    as a damaged byte there does."""
    data = bytearray(Path(src).read_bytes())
    seen = 0
    for at in range(0, len(data), 188):
        if data[at + 1] & 0x40 == 0:  # no PES starts in this TS packet
            continue
        start = at + 4 + (1 + data[at + 4] if data[at + 3] & 0x20 else 0)  # past the adaptation field
        if data[start:start + 4] != b"\x00\x00\x01\xc0":
            continue
        if seen == nth:
            p = start + 9
            data[p] = (data[p] & 0xF0) | ((pts >> 29) & 0x0E) | 1
            data[p + 1:p + 5] = bytes([(pts >> 22) & 0xFF, ((pts >> 14) & 0xFE) | 1,
                                       (pts >> 7) & 0xFF, ((pts << 1) & 0xFE) | 1])
            Path(dst).write_bytes(bytes(data))
            return
        seen += 1
    raise AssertionError(f"{src}: fewer than {nth + 1} audio PES headers")


@pytest.mark.parametrize("damage", [xor_damage, pts_damage])
def test_a_damaged_audio_timestamp_drops_that_packet_not_the_whole_output(tmp_path, damage):
    """An audio packet whose timestamp jumps 46 s ahead and back made the copy fail to mux, after
    the whole encode, with a message naming neither the input nor the cause. Now that packet is
    dropped with a note naming the input, and the output's audio decodes and keeps its timing: the
    random bytes also hit the data of a few packets, which are dropped too, as the decoder refuses
    them."""
    src = write_clip(tmp_path / "t48.ts", render_move(Move("astronaut", 48), SIZE), options={"g": "12"})
    bad = tmp_path / "t48_flip.ts"
    damage(src, bad)
    before = packet_times(bad, "audio")
    out_of_order = [i for i, (a, b) in enumerate(zip(before, before[1:])) if b < a]
    assert len(out_of_order) == 1 and before[out_of_order[0]] > 40  # the fault the tester met
    out = tmp_path / "r_flip.mp4"
    r = CliRunner().invoke(app, ["stylize", str(bad), "-o", str(out), "--engine", "grade", "--no-metrics"])
    assert r.exit_code == 0, r.output
    assert "t48_flip.ts: 1 audio packet with broken timestamps dropped" in r.output
    refused = set(undecodable_audio(bad)) - set(out_of_order)
    n = len(refused)
    assert (f"{n} damaged audio packet{'s' if n != 1 else ''} the decoder refuses dropped" in r.output) == bool(n)
    after = packet_times(out, "audio")
    assert after == sorted(after) and max(after) < 2.2
    kept = [t for i, t in enumerate(before) if i not in refused and i != out_of_order[0]]
    assert len(after) == len(kept)
    assert np.allclose(np.array(after) - after[0], np.array(kept) - kept[0], atol=1e-3)
    samples = decoded_audio(out)
    assert samples.shape[1] >= (len(after) - 2) * 1024 and np.abs(samples).max() > 0.1


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
    its place against its own pictures."""
    a, b, src = joined(tmp_path)
    va, vb = packet_times(a, "video"), packet_times(b, "video")
    assert min(vb) < max(va)  # the restart
    res = grade(src, tmp_path / "out.mp4")
    assert res.frames == 48 and res.concealed_frames == 0
    assert any(n == "timestamps restart at 1.00 s (joined files?): frames after it are timed to follow on"
               for n in res.notes), res.notes
    times = sorted(packet_times(tmp_path / "out.mp4", "video"))
    assert np.allclose(np.diff(times), 1 / 24, atol=1e-4)
    shift = times[24] - min(vb)  # where the second clip's pictures went
    aa, ab = packet_times(a, "audio"), packet_times(b, "audio")
    out = packet_times(tmp_path / "out.mp4", "audio")
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
