"""A scene task decodes only its scene's range: `read_frames(start=, start_pts=)` seeks to the
keyframe at or before the scene's first frame and yields exactly what a full decode yields from
there (issue 16). Clips are a photograph panned 2 pixels a frame, so every frame differs and frame
i is known to show the window at 2 * i."""

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from cinefx.testing.clips import photo, write_clip
from cinefx.video.probe import probe
from cinefx.video.reader import read_frames

W, H, PAN = 64, 48, 2
GOP = {"g": "12", "keyint_min": "12", "sc_threshold": "0"}  # no extra keyframes at cuts
MPEG4 = {"g": "12", "bf": "2", "qmax": "4"}  # MPEG-4 part 2 at a quality where frames tell apart


def pan(n: int) -> list[np.ndarray]:
    """`n` frames (H, W, 3) uint8 of the astronaut, the window moving PAN pixels right a frame."""
    img = cv2.resize(photo("astronaut"), (384, 384), interpolation=cv2.INTER_AREA)
    return [np.ascontiguousarray(img[100:100 + H, PAN * i:PAN * i + W]) for i in range(n)]


def packets(path: Path) -> list[tuple[int | None, bool]]:
    """(pts, keyframe) of each video packet, in decode order."""
    with av.open(str(path)) as c:
        return [(p.pts, p.is_keyframe) for p in c.demux(c.streams.video[0]) if p.size]


def keyframes(path: Path) -> list[int]:
    """Display positions of the keyframes, as FFmpeg's decoder reports them."""
    with av.open(str(path)) as c:
        return [i for i, f in enumerate(c.decode(video=0)) if f.key_frame]


def damage(src: Path, dst: Path, which: list[int], at: int = 0, length: int = 60) -> Path:
    """`src` with `length` random bytes from `at` bytes into each of the `which`-th video packets
    (decode order)."""
    with av.open(str(src)) as c:
        pos = [p.pos for p in c.demux(c.streams.video[0]) if p.size]
    data, rng = bytearray(src.read_bytes()), np.random.default_rng(3)
    for i in which:
        data[pos[i] + at:pos[i] + at + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("seek")
    frames = pan(60)
    h264 = {**GOP, "bf": "3"}
    made = {
        "h264.mp4": write_clip(d / "h264.mp4", frames, audio=None, options=h264),
        # MPEG-4 part 2 with B-frames: open GOPs, the B-frames after each keyframe shown before it
        "mpeg4.mkv": write_clip(d / "mpeg4.mkv", frames, audio=None, codec="mpeg4", options=MPEG4),
        # AVI indexes decode times: a seek to a B-frame's time lands on the keyframe decoded then,
        # shown after it
        "mpeg4.avi": write_clip(d / "mpeg4.avi", frames, audio=None, codec="mpeg4", options=MPEG4),
        "long-gop.mp4": write_clip(d / "long-gop.mp4", frames, audio=None, options={"g": "1000", "bf": "3"}),
        # H.264 with B-frames in AVI, which stores no presentation times: FFmpeg numbers the
        # packets in decode order, and the frames came out in that order (shuffled in time)
        "h264.avi": write_clip(d / "h264.avi", frames, audio=None, options=h264),
    }
    tb, pts = Fraction(1, 12288), [512]
    for i in range(1, 60):  # variable frame rate: a long frame every third
        pts.append(pts[-1] + (512 if i % 3 else 1024))
    made["vfr.mp4"] = write_clip(d / "vfr.mp4", frames, audio=None, time_base=tb, pts=pts, options=h264)
    # two transport streams joined byte for byte: the clock restarts at frame 30
    a = write_clip(d / "a.ts", frames[:30], audio=None, options=h264)
    b = write_clip(d / "b.ts", frames[30:], audio=None, options=h264)
    made["joined.ts"] = d / "joined.ts"
    made["joined.ts"].write_bytes(a.read_bytes() + b.read_bytes())
    return made


def assert_tail(full: list, got: list, start: int):
    assert len(got) == len(full) - start
    for a, b in zip(full[start:], got):
        assert (b.index, b.pts, b.duration, b.concealed) == (a.index, a.pts, a.duration, a.concealed)
        assert np.array_equal(b.rgb, a.rgb), b.index


STARTS = [0, 1, 11, 12, 13, 23, 29, 30, 31, 59]  # keyframes at 0, 12, 24, ... (the joined stream: 30 too)


@pytest.mark.parametrize("name", ["h264.mp4", "mpeg4.mkv", "mpeg4.avi", "h264.avi", "vfr.mp4", "joined.ts",
                                  "long-gop.mp4"])
def test_a_decode_from_a_frame_equals_the_tail_of_a_full_decode(clips, name):
    info = probe(clips[name])
    full = list(read_frames(info))
    assert len(full) == 60
    assert all(not np.array_equal(a.rgb, b.rgb) for a, b in zip(full, full[1:]))  # every frame differs
    source = pan(60)
    for i, frame in enumerate(full):  # in display order: frame i is nearest the pan's frame i
        err = {j: np.abs(frame.rgb.astype(int) - source[j]).mean() for j in range(max(0, i - 3), min(60, i + 4))}
        assert min(err, key=err.get) == i, (i, err)
    assert [f.pts for f in full] == sorted(f.pts for f in full)
    for start in STARTS:
        got = list(read_frames(info, start=start, start_pts=full[start].pts))
        assert_tail(full, got, start)
        # and the first frame shows the pan where frame `start` has it (within the codec's error),
        # not where a neighbour has it
        near = range(max(0, start - 1), min(60, start + 2))
        err = {i: np.abs(got[0].rgb.astype(int) - source[i]).mean() for i in near}
        assert all(err[start] < e / 2 for i, e in err.items() if i != start), (start, err)


@pytest.mark.parametrize("name", ["h264.mp4", "mpeg4.mkv", "mpeg4.avi", "h264.avi", "vfr.mp4", "joined.ts"])
def test_only_the_packets_from_the_keyframe_before_the_start_are_decoded(clips, name, monkeypatch):
    """The decoder sees the packets from the last keyframe at or before the start, none before it;
    all of them where frames are timed by the decoder's order (H.264 in AVI), since a seek there
    cannot be checked by the times of the frames it gives."""
    info = probe(clips[name])
    full = list(read_frames(info))
    stream, keys = packets(clips[name]), keyframes(clips[name])
    assert keys[:3] == [0, 12, 24]
    real, decoded = av.packet.Packet.decode, []

    def counting(packet):
        decoded.append(packet.size)
        return real(packet)

    monkeypatch.setattr(av.packet.Packet, "decode", counting)
    for start in (23, 29, 59):
        decoded.clear()
        assert len(list(read_frames(info, start=start, start_pts=full[start].pts))) == 60 - start
        key = sum(k <= start for k in keys) - 1  # which keyframe, counted in display order ...
        first = [i for i, (_, is_key) in enumerate(stream) if is_key][key]  # ... is this packet
        if name == "h264.avi":
            first = 0
        assert sum(1 for size in decoded if size) == len(stream) - first, start


def test_a_stream_without_timestamps_is_decoded_from_its_start(clips, tmp_path, monkeypatch):
    """A raw H.264 stream has no timestamps to seek by: every packet is decoded, the frames from the
    start are still the full decode's."""
    raw = tmp_path / "raw.h264"
    with av.open(str(clips["h264.mp4"])) as src, av.open(str(raw), "w", format="h264") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for p in src.demux(src.streams.video[0]):
            if p.size:
                p.stream = out
                dst.mux(p)
    info = probe(raw)
    full = list(read_frames(info))
    real, decoded = av.packet.Packet.decode, []
    monkeypatch.setattr(av.packet.Packet, "decode", lambda p: decoded.append(p.size) or real(p))
    got = list(read_frames(info, start=29, start_pts=full[29].pts))
    assert_tail(full, got, 29)
    assert sum(1 for size in decoded if size) == 60


@pytest.mark.parametrize("ext", [".mp4", ".ts"])
def test_frames_lost_before_the_start_do_not_shift_the_numbering(tmp_path, ext):
    """Damaged packets in the GOP before the start's and in the start's own, before it: the full
    decode stands in for their frames, and the frames from the start keep the full decode's indices,
    times and stand-ins. One decoding thread: the pixels FFmpeg conceals damage with depend on how
    frames were shared among threads."""
    clean = write_clip(tmp_path / f"clean{ext}", pan(96), audio=None, options={**GOP, "bf": "3"})
    stream = packets(clean)
    hit = [i for i in (16, 27) if not stream[i][1]]
    info = probe(damage(clean, tmp_path / f"bad{ext}", hit))
    full = list(read_frames(info, threads=1))
    assert len(full) == 96 and any(f.concealed for f in full[:29])
    for start in (29, 31):
        assert_tail(full, list(read_frames(info, threads=1, start=start, start_pts=full[start].pts)), start)


@pytest.mark.parametrize("at,length", [(0, 100), (40, 30)])
def test_a_damaged_keyframe_before_the_start_falls_back_to_the_full_decode(tmp_path, at, length):
    """The keyframe a seek would start from is damaged: lost outright (the full decode stands in for
    its GOP with the frame before it, which a decode from that keyframe never sees) or decoded with
    FFmpeg's error concealment (drawing on frames before it). The frames are still the full
    decode's."""
    clean = write_clip(tmp_path / "clean.mp4", pan(144), audio=None, options={**GOP, "bf": "3"})
    key = [i for i, (_, is_key) in enumerate(packets(clean)) if is_key][5]
    info = probe(damage(clean, tmp_path / "bad.mp4", [key], at, length))
    full = list(read_frames(info, threads=1))
    assert len(full) == 144 and full[60].concealed == (at == 0)
    for start in (60, 61, 65, 71, 72):
        assert_tail(full, list(read_frames(info, threads=1, start=start, start_pts=full[start].pts)), start)


@pytest.mark.parametrize("dropped,starts", [(range(24, 25), (24, 25)), (range(132, 144), (132, 133, 143))])
def test_frames_the_decoder_drops_without_a_word_after_the_keyframe(tmp_path, monkeypatch, dropped, starts):
    """H.264 drops a frame whose slice header is damaged without an error. Where that is the keyframe
    a seek starts from, the full decode stands in for it with the frame before, which a decode from
    the keyframe never saw; where it is every frame after the keyframe, such a decode has nothing at
    all. Either way the frames are the full decode's."""
    clean = write_clip(tmp_path / "clean.mp4", pan(144), audio=None, options={**GOP, "bf": "3"})
    info = probe(clean)
    gone = {f.pts for f in read_frames(info) if f.index in dropped}
    real = av.packet.Packet.decode
    monkeypatch.setattr(av.packet.Packet, "decode", lambda p: [f for f in real(p) if f.pts not in gone])
    full = list(read_frames(info))
    assert [f.index for f in full if f.concealed] == list(dropped)
    for start in starts:
        assert_tail(full, list(read_frames(info, start=start, start_pts=full[start].pts)), start)


def test_a_time_no_frame_has_leaves_the_index_to_decide(clips):
    """A `start_pts` that is no frame's (a caller's slip): the decode from the first frame, numbered,
    decides which frames come, rather than the frame after that time being taken for `start`."""
    info = probe(clips["h264.mp4"])
    full = list(read_frames(info))
    assert_tail(full, list(read_frames(info, start=29, start_pts=full[29].pts + 1)), 29)


def test_start_without_its_time_decodes_from_the_first_frame(clips):
    info = probe(clips["h264.mp4"])
    assert_tail(list(read_frames(info)), list(read_frames(info, start=29)), 29)
