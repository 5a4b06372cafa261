"""The reader and writer when things go wrong: a disk that fills, damaged packets, a picture size
that changes, audio without a channel order, leftovers of killed runs, modes and links at the
output path."""

import os
import signal
import stat
import struct
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from cinefx import fsutil
from cinefx.errors import InputFileError, OutputError
from cinefx.stylize import StylizeOptions, stylize_file
from cinefx.presets import load_preset
from cinefx.testing.clips import Move, render_move, write_clip
from cinefx.video.probe import probe
from cinefx.video.reader import read_frames
from cinefx.video.writer import VideoWriter, check_output_path
from tests.conftest import two_shots

ROOT = Path(__file__).resolve().parents[1]


def video_packets(path):
    """(pos, size, pts, keyframe) of every video packet, in file order."""
    with av.open(str(path)) as c:
        return [(p.pos, p.size, p.pts, p.is_keyframe) for p in c.demux(c.streams.video[0]) if p.size]


def frame_times(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return [f.pts * s.time_base for f in c.decode(s)]


def damage(src, dst, packets, nbytes=300):
    """Copy `src` to `dst` with `nbytes` random bytes written over the start of each of `packets`
    (file positions inside the media data, not the header or the index)."""
    data = bytearray(Path(src).read_bytes())
    rng = np.random.default_rng(7)
    for pos in packets:
        data[pos:pos + nbytes] = rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    Path(dst).write_bytes(bytes(data))
    return dst


def grade(src, dst, **kw):
    return stylize_file(src, dst, load_preset("epic"), StylizeOptions(engine="grade", metrics=False, **kw))


# -- 1. a disk that fills -----------------------------------------------------------------------

def cli_with_size_limit(args, limit, cwd):
    """`cinefx ARGS` in a child process that may write files of at most `limit` bytes: FFmpeg's own
    writes then fail with EFBIG (SIGXFSZ ignored), as they fail with ENOSPC on a full disk."""
    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cinefx", "stylize", *map(str, args)], cwd=cwd, env=env,
                          preexec_fn=None if limit is None else limit_files, capture_output=True, text=True,
                          timeout=120)


def trailer_offset(path: Path) -> int:
    """Where the part a muxer writes only when the file is closed begins: MP4's `moov` box (after
    the media data), Matroska's cues."""
    data = path.read_bytes()
    if path.suffix == ".mkv":
        return data.rfind(b"\x1c\x53\xbb\x6b")  # Cues element ID
    pos = 0
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"moov":
            return pos
        pos += size
    raise AssertionError("no moov box")


@pytest.mark.parametrize("ext,where,existing", [(".mp4", "data", False), (".mp4", "trailer", True),
                                                (".mkv", "data", True), (".mkv", "trailer", False)])
def test_full_disk_fails_cleanly_and_keeps_the_old_file(tmp_path, ext, where, existing):
    """The limit is hit in the media data, or only in the trailer written at close (MP4's index):
    exit 1, one line naming the output and the cause, no temporary file left, and the file that
    was at the output path (with --overwrite) byte for byte as it was."""
    src = write_clip(tmp_path / "src.mp4", two_shots(24), fps=24, audio="aac")
    ref = tmp_path / f"ref{ext}"
    r = cli_with_size_limit([src, "-o", ref, "--engine", "grade", "--no-metrics"], None, tmp_path)
    assert r.returncode == 0, r.stderr
    limit = ref.stat().st_size // 2 if where == "data" else trailer_offset(ref) + 4
    assert 0 < limit < ref.stat().st_size
    out = tmp_path / f"out{ext}"
    old = b""
    if existing:
        old = src.read_bytes()
        out.write_bytes(old)
        out.chmod(0o640)
    args = [src, "-o", out, "--engine", "grade", "--no-metrics"] + (["--overwrite"] if existing else [])
    r = cli_with_size_limit(args, limit, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{out}: " in lines[0] and "file size limit reached while writing" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["src.mp4", ref.name] + ([out.name] if existing else []))
    if existing:
        assert out.read_bytes() == old and stat.S_IMODE(out.stat().st_mode) == 0o640


def test_a_file_that_reads_back_short_is_not_put_in_place(tmp_path, monkeypatch):
    """A muxer that loses a packet without an error: the check after closing finds one frame
    missing, and the good file already at the output path stays."""
    import cinefx.video.writer as writer

    src = write_clip(tmp_path / "src.mp4", two_shots(12), fps=24, audio=None)
    out = tmp_path / "out.mp4"
    out.write_bytes(src.read_bytes())
    real, seen = writer.VideoWriter._mux_video, []

    def lossy(self, packet):
        seen.append(packet.pts)
        if len(seen) != 5:
            real(self, packet)

    monkeypatch.setattr(writer.VideoWriter, "_mux_video", lossy)
    with pytest.raises(OutputError, match=r"out\.mp4: the finished file is incomplete \(23 of 24 frames"):
        grade(src, out, overwrite=True)
    assert out.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "src.mp4"]


# -- 2. damaged packets -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    return {ext: write_clip(d / f"clean{ext}", two_shots(24), fps=24, audio=None) for ext in (".mp4", ".ts")}


@pytest.mark.parametrize("ext", [".mp4", ".ts"])
def test_damaged_packets_are_stood_in_for_at_their_own_time(clean, tmp_path, ext):
    """A few hundred random bytes over two frames' data (not keyframes): the decoder refuses or
    loses them (the transport stream loses their timestamps too). The reader still gives every
    frame of the source at its time, the lost ones as copies of the frame before, marked; the
    grade keeps the source's frame count and times, and the cut where it was."""
    src = clean[ext]
    packets = video_packets(src)
    hit = [i for i in (9, 33) if not packets[i][3]]
    assert len(hit) == 2
    bad = damage(src, tmp_path / f"bad{ext}", [packets[i][0] for i in hit])
    frames = list(read_frames(probe(bad)))
    assert [f.pts for f in frames] == sorted(p[2] for p in packets)  # all 48, at the source's times
    concealed = [i for i, f in enumerate(frames) if f.concealed]
    assert 1 <= len(concealed) <= 4, concealed
    for i in concealed:
        j = max(k for k in range(i) if not frames[k].concealed)
        assert np.array_equal(frames[i].rgb, frames[j].rgb)
    res = grade(bad, tmp_path / "out.mp4")
    # frames decoded from references the damage took away carry its marks, and may look like cuts,
    # but the real cut stays at the second shot's first frame
    assert res.frames == 48 and 24 in [s.start for s in res.scenes]
    zero = frame_times(src)[0] if ext == ".ts" else 0  # a transport stream's output starts at 0
    assert frame_times(tmp_path / "out.mp4") == [t - zero for t in frame_times(src)]


@pytest.mark.parametrize("ext", [".mkv", ".mp4"])
def test_frames_missing_from_a_regular_cadence_are_said(clips, tmp_path, ext):
    """Matroska loses damaged blocks without a trace (the tester's random bytes took 22 of 48
    frames of one file, and the render said nothing); a recorder that drops frames leaves the same
    gaps. The frames are not made up (the output keeps the source's times, each gap holding the
    frame before it), but the run says how many are missing and where. A variable frame rate
    (no regular cadence) is no gap."""
    frames = list(render_move(Move("astronaut", 48), (160, 90)))
    kept = [i for i in range(48) if not 20 <= i < 26 and i != 40]
    src = write_clip(tmp_path / f"gaps{ext}", [frames[i] for i in kept], fps=24, time_base=Fraction(1, 1000),
                     pts=[round(i * 1000 / 24) for i in kept], audio=None)
    res = grade(src, tmp_path / "out.mp4")
    assert res.frames == 41
    assert ("7 frames missing from the source (gaps in its otherwise regular timestamps, the first after "
            "0.79 s): damaged data, or frames the recorder dropped; each gap holds the frame before it") in res.notes
    assert frame_times(tmp_path / "out.mp4") == frame_times(src)
    res = grade(clips["vfr"], tmp_path / "vfr.mp4")
    assert not any("missing" in n for n in res.notes), res.notes


def test_a_damaged_file_decodes_to_the_same_pixels_on_a_machine_with_fewer_cores(tmp_path):
    """FFmpeg conceals damaged data one way with one decoding thread and another with several,
    and chose its thread count by the cores it may use: a damaged file rendered to other bytes on
    a one-core node of a cluster (or a resume there) than on a larger one. The reader now decodes
    with the same threads everywhere. The process is pinned to one core for a moment to be that
    machine (FFmpeg counts the cores the process may run on)."""
    src = write_clip(tmp_path / "clean.mp4", render_move(Move("astronaut", 60), (320, 180)), audio=None,
                     options={"g": "12", "bf": "3"})
    packets = video_packets(src)

    def pixels(**kw):
        return [f.rgb for f in read_frames(info, **kw)]

    # damage whose concealment differs between one thread and three (what FFmpeg picks with one
    # core, and with two); nearly any does, but the clip's bytes differ between CPUs, so look
    for at in (30, 15, 45, 60, 20, 40):
        info = probe(damage(src, tmp_path / "bad.mp4", [packets[i][0] + at for i in (5, 20, 33)], nbytes=40))
        if any(not np.array_equal(a, b) for a, b in zip(pixels(threads=1), pixels(threads=3))):
            break
    else:
        raise AssertionError("no damage found whose concealment depends on the thread count")
    cores = os.sched_getaffinity(0)
    assert len(cores) > 1
    here = pixels()
    try:
        os.sched_setaffinity(0, {min(cores)})
        there = pixels()
    finally:
        os.sched_setaffinity(0, cores)
    assert all(np.array_equal(a, b) for a, b in zip(here, there))


def test_a_damaged_transport_stream_decodes_to_the_same_pixels_run_after_run(tmp_path):
    """With several frame threads FFmpeg's concealment of damaged data also depends on how frames
    were shared among the threads as they came: the same damaged file decoded to other pixels from
    one run to the next (a resume's pieces would not match). One thread is the same every time."""
    from tests.test_video_hostile import xor_damage

    src = write_clip(tmp_path / "t.ts", render_move(Move("astronaut", 48), (160, 90)), options={"g": "12"})
    for seed in range(4):  # with four threads, about nine damaged files in ten varied over three runs
        bad = tmp_path / f"bad{seed}.ts"
        xor_damage(src, bad, seed)
        info = probe(bad)
        runs = [[f.rgb for f in read_frames(info)] for _ in range(3)]
        assert all(len(r) == len(runs[0]) and all(np.array_equal(a, b) for a, b in zip(r, runs[0])) for r in runs)


@pytest.mark.parametrize("ext", [".mp4", ".ts"])
def test_a_file_with_too_many_lost_frames_is_refused(clean, tmp_path, ext):
    """A fifth of the frames damaged is a broken file, not a few bad packets: one line naming it."""
    src = clean[ext]
    packets = video_packets(src)
    bad = damage(src, tmp_path / f"bad{ext}", [p[0] for i, p in enumerate(packets) if i % 5 == 2 and not p[3]])
    with pytest.raises(InputFileError, match=rf"bad\{ext}: \d+ of \d+ frames cannot be decoded"):
        list(read_frames(probe(bad)))


# -- 3. a picture size that changes -------------------------------------------------------------

def test_picture_size_change_in_a_transport_stream_is_fitted_with_bars(tmp_path):
    """Two MPEG-TS segments joined byte for byte, the second square: its frames are fitted into the
    first size with the aspect kept (pillarbox) instead of ending in a traceback."""
    first = write_clip(tmp_path / "a.ts", render_move(Move("astronaut", 24), (160, 90)), fps=24, audio=None)
    end = max(p[2] for p in video_packets(first)) + 3750  # times carry on where the first ends
    second = write_clip(tmp_path / "b.ts", render_move(Move("coffee", 24), (120, 120)), fps=24, audio=None,
                        pts=[end + i * 3750 for i in range(24)])
    src = tmp_path / "joined.ts"
    src.write_bytes(first.read_bytes() + second.read_bytes())
    with av.open(str(src)) as c:
        decoded = [(f.pts, f.width, f.height) for f in c.decode(video=0)]
    assert {d[1:] for d in decoded} == {(160, 90), (120, 120)}
    assert {b[0] - a[0] for a, b in zip(decoded, decoded[1:])} == {3750}  # one stream, no gap
    frames = list(read_frames(probe(src)))
    assert len(frames) == 48 and {f.rgb.shape for f in frames} == {(90, 160, 3)}
    assert not any(f.concealed for f in frames)
    square = frames[-1].rgb.astype(int)
    assert square[:, :30].max() == 0 and square[:, -30:].max() == 0  # bars of (160 - 90) / 2 = 35
    assert square[:, 40:120].mean() > 40
    notes = []
    thumbs = list(read_frames(probe(src), size=(80, 45), notes=notes))
    assert {t.rgb.shape for t in thumbs} == {(45, 80, 3)}
    assert notes == ["picture size changes from 160x90 to 120x120 at 1.00s: scaled to fit the first size, "
                     "with black bars"]
    res = grade(src, tmp_path / "out.mp4")
    assert res.frames == 48 and probe(tmp_path / "out.mp4").display_size == (160, 90)


# -- 5. PCM audio without a channel order -------------------------------------------------------

@pytest.mark.parametrize("layout", ["stereo", "mono", "5.1"])
def test_pcm_in_matroska_goes_to_mp4_as_aac(tmp_path, layout):
    """Matroska stores PCM without a channel order ("2 channels"), which the AAC encoder refused."""
    video = write_clip(tmp_path / "v.mkv", two_shots(12), fps=24, audio=None)
    src = tmp_path / "pcm.mkv"
    channels = av.AudioLayout(layout).nb_channels
    with av.open(str(video)) as vin, av.open(str(src), "w") as out:
        v = out.add_stream_from_template(vin.streams.video[0])
        a = out.add_stream("pcm_s16le", rate=48000, layout=layout)
        for p in vin.demux(vin.streams.video[0]):
            if p.size:
                p.stream = v
                out.mux(p)
        for k in range(47):  # 1.0027 s
            samples = np.random.default_rng(k).normal(0, 3000, (1, 1024 * channels)).astype(np.int16)
            f = av.AudioFrame.from_ndarray(samples, format="s16", layout=layout)
            f.sample_rate, f.pts = 48000, k * 1024
            for p in a.encode(f):
                out.mux(p)
    with av.open(str(src)) as c:
        assert c.streams.audio[0].codec_context.layout.name == f"{channels} channels"
    res = grade(src, tmp_path / "out.mp4")
    assert any("re-encoded to AAC" in n for n in res.notes)
    with av.open(str(tmp_path / "out.mp4")) as c:
        ctx = c.streams.audio[0].codec_context
        samples = sum(f.samples for f in c.decode(audio=0))
        assert (ctx.name, ctx.channels) == ("aac", channels)
    assert abs(samples / 48000 - 47 * 1024 / 48000) < 1024 / 48000  # AAC's last frame is padded


# -- 8, 11, 13a. the output path ----------------------------------------------------------------

def test_stale_temporaries_of_the_output_are_removed_and_nothing_else(tmp_path):
    """A temporary left by a killed run (its pid gone) goes when the next writer of the same output
    opens; one of a live run, a user's file with a like name and another output's stay."""
    src = write_clip(tmp_path / "src.mp4", two_shots(6), fps=24, audio=None)
    host = fsutil.host_name()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {"dead": f".out.cinefx-tmp-{host}-{dead.pid}-0123abcd.mp4",
                 "alive": f".out.cinefx-tmp-{host}-{alive.pid}-0123abcd.mp4",
                 "user": ".out.cinefx-tmp-my-notes.mp4",
                 "other": f".other.cinefx-tmp-{host}-{dead.pid}-0123abcd.mp4",
                 "remote": f".out.cinefx-tmp-{host}x-{dead.pid}-0123abcd.mp4"}
        for n in names.values():
            (tmp_path / n).write_bytes(b"partial")
        info = probe(src)
        with VideoWriter(tmp_path / "out.mp4", info) as w:
            ours = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".out.cinefx-tmp-{host}-{os.getpid()}-")]
            assert len(ours) == 1  # its own temporary, named so a later run can tell
            for f in read_frames(info):
                w.write(f.rgb, f.pts, f.duration)
            w.commit()
        left = {p.name for p in tmp_path.iterdir()}
        assert names["dead"] not in left
        assert left == {"src.mp4", "out.mp4", *(n for k, n in names.items() if k != "dead")}
    finally:
        alive.kill()
        alive.wait()


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def write_copy(info, out, overwrite=False):
    with VideoWriter(out, info, overwrite=overwrite) as w:
        for f in read_frames(info):
            w.write(f.rgb, f.pts, f.duration)
        w.commit()


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_get_the_mode_the_umask_gives(tmp_path, umask, mask, mode):
    info = probe(write_clip(tmp_path / "src.mp4", two_shots(6), fps=24, audio=None))
    umask(mask)
    write_copy(info, tmp_path / "new.mp4")
    assert stat.S_IMODE((tmp_path / "new.mp4").stat().st_mode) == mode


def test_overwriting_keeps_the_files_mode(tmp_path, umask):
    info = probe(write_clip(tmp_path / "src.mp4", two_shots(6), fps=24, audio=None))
    out = tmp_path / "out.mp4"
    out.write_bytes(b"old")
    out.chmod(0o640)
    write_copy(info, out, overwrite=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and out.read_bytes() != b"old"


def test_a_dangling_symlink_at_the_output_is_not_replaced_without_overwrite(tmp_path):
    info = probe(write_clip(tmp_path / "src.mp4", two_shots(6), fps=24, audio=None))
    out = tmp_path / "out.mp4"
    out.symlink_to(tmp_path / "missing.mp4")
    for attempt in (lambda: check_output_path(out, False), lambda: write_copy(info, out),
                    lambda: grade(tmp_path / "src.mp4", out)):
        with pytest.raises(OutputError, match=r"out\.mp4: is a symbolic link to a missing file \(use --overwrite"):
            attempt()
        assert out.is_symlink() and os.readlink(out) == str(tmp_path / "missing.mp4")
    write_copy(info, out, overwrite=True)  # replaces the link itself, not a file where it pointed
    assert not out.is_symlink() and not (tmp_path / "missing.mp4").exists()
    assert len(frame_times(out)) == 12
