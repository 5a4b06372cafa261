"""Scene lists load back in the tools editors use and give the same cuts: PySceneDetect (its own
CSV writer and its `load-scenes` reader), the CMX 3600 EDL reader of OpenTimelineIO's adapter, and
OpenTimelineIO itself; timecode agrees with OpenTimelineIO's, drop-frame included."""

import csv
import io
import random
import subprocess
import sys
from fractions import Fraction

import opentimelineio as otio
import pytest

from cinefx.errors import OptionError
from cinefx.scenelists import (CSV_COLUMNS, Timing, format_timecode, parse_timecode, scene_csv,
                               write_scene_list)
from cinefx.scenes import Scene
from cinefx.testing.clips import Move, cut, write_clip

NTSC = Fraction(24000, 1001)
# uneven scenes with every kind of boundary; 24000/1001 so frame times are not whole milliseconds
SCENES = [Scene(0, 0, 20, "start"), Scene(1, 20, 35, "cut"), Scene(2, 35, 36 + 61, "dissolve"),
          Scene(3, 97, 140, "fade")]


def starts(scenes):
    return [s.start for s in scenes]


@pytest.mark.parametrize("fps", [NTSC, Fraction(25), Fraction(30000, 1001)])
def test_csv_is_pyscenedetects_own(fps):
    from scenedetect import FrameTimecode
    from scenedetect.output import write_scene_list as theirs

    pairs = [(FrameTimecode(s.start, fps=fps), FrameTimecode(s.end, fps=fps)) for s in SCENES]
    expected = io.StringIO()
    theirs(expected, pairs, include_cut_list=True, cut_list=[a for a, _ in pairs[1:]])
    assert scene_csv(SCENES, Timing(fps)) == expected.getvalue()


def test_pyscenedetect_loads_our_csv(tmp_path):
    frames = cut(Move("astronaut", 20), Move("coffee", 15), Move("rocket", 13), size=(96, 54))
    clip = write_clip(tmp_path / "a.mp4", frames, fps=NTSC, audio=None)
    scenes = [Scene(0, 0, 20, "start"), Scene(1, 20, 35, "cut"), Scene(2, 35, 48, "cut")]
    write_scene_list(tmp_path / "ours.csv", scenes, Timing(NTSC))
    run = subprocess.run([sys.executable, "-m", "scenedetect", "-i", str(clip), "-o", str(tmp_path),
                          "load-scenes", "-i", str(tmp_path / "ours.csv"), "list-scenes", "-f", "theirs.csv"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "theirs.csv").read_text().splitlines()[1:]))
    assert [int(r["Start Frame"]) - 1 for r in rows] == starts(scenes)
    assert [int(r["End Frame"]) for r in rows] == [s.end for s in scenes]


def test_csv_times_follow_variable_frame_rate():
    # frames alternately 1/24 and 1/12 s long: scene times come from the frames, not frame / fps
    pts, t = [], 0
    for i in range(140):
        pts.append(t)
        t += 512 if i % 2 else 1024
    timing = Timing.from_pts(Fraction(24), Fraction(1, 12288), pts, t)
    rows = list(csv.DictReader(scene_csv(SCENES, timing).splitlines()[1:]))
    assert list(rows[0]) == list(CSV_COLUMNS)
    for r, s in zip(rows, SCENES):
        assert float(r["Start Time (seconds)"]) == pytest.approx(pts[s.start] / 12288, abs=5e-4)
    assert float(rows[-1]["End Time (seconds)"]) == pytest.approx(t / 12288, abs=5e-4)
    assert float(rows[1]["Start Time (seconds)"]) != pytest.approx(20 / 24, abs=0.01)


@pytest.mark.parametrize("fps,tc", [(NTSC, "01:00:00:00"), (Fraction(30000, 1001), "00:59:59;28"),
                                    (Fraction(25), "10:00:00:00")])
def test_edl_loads_in_otio_cmx_adapter(tmp_path, fps, tc):
    path = write_scene_list(tmp_path / "scenes.edl", SCENES, Timing(fps, start_timecode=tc), tmp_path / "clip.mov")
    text = path.read_text()
    assert ("FCM: DROP FRAME" in text) == (";" in tc)
    timeline = otio.adapters.read_from_file(str(path), "cmx_3600", rate=float(fps))
    clips = list(timeline.find_clips())
    first = otio.opentime.from_timecode(tc, float(fps)).to_frames()
    assert [c.source_range.start_time.to_frames() - first for c in clips] == starts(SCENES)
    assert [c.source_range.duration.to_frames() for c in clips] == [s.frames for s in SCENES]
    assert clips[0].name == "clip.mov"
    assert [c.metadata["cmx_3600"]["comments"][0].split(": ")[1] for c in clips] == [s.kind for s in SCENES]


def test_otio_loads_back_with_kinds(tmp_path):
    source = tmp_path / "clip.mov"
    path = write_scene_list(tmp_path / "scenes.otio", SCENES, Timing(NTSC, start_timecode="01:00:00:00"), source)
    timeline = otio.adapters.read_from_file(str(path))
    clips = list(timeline.find_clips())
    assert [c.source_range.start_time.to_frames() - 86400 for c in clips] == starts(SCENES)
    assert [c.range_in_parent().start_time.to_frames() for c in clips] == starts(SCENES)
    assert [c.metadata["cinefx"]["kind"] for c in clips] == [s.kind for s in SCENES]
    assert clips[0].media_reference.target_url == source.absolute().as_uri()
    assert timeline.global_start_time.to_timecode() == "01:00:00:00"


def test_timecode_agrees_with_opentimelineio_drop_frame_included():
    ot = otio.opentime
    rng = random.Random(3)
    rates = [(Fraction(30000, 1001), True), (Fraction(60000, 1001), True), (NTSC, False), (Fraction(25), False)]
    for fps, drop in rates:
        # minute and ten-minute edges, where drop-frame skips (or does not skip) labels
        for n in [0, 1, 1799, 1800, 17981, 17982, 17983, 107892] + [rng.randrange(2_000_000) for _ in range(300)]:
            tc = format_timecode(n, fps, drop)
            assert tc == ot.to_timecode(ot.RationalTime(n, float(fps)), float(fps), drop)
            assert parse_timecode(tc, fps) == (n, drop)


@pytest.mark.parametrize("bad", ["1:00:00", "01:00:00:30", "01:61:00:00", "00:01:00;00", "xx:00:00:00"])
def test_bad_timecode_is_one_line_error(bad):
    with pytest.raises(OptionError) as e:
        parse_timecode(bad, Fraction(30000, 1001))
    assert "\n" not in str(e.value) and "timecode" in str(e.value)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(OptionError, match=r"\.csv.*\.edl.*\.otio"):
        write_scene_list(tmp_path / "scenes.xml", SCENES, Timing(NTSC))
    assert not list(tmp_path.iterdir())
