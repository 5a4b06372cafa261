"""Scene detection on real-photo clips with a hard cut, a flash, a dissolve and a fade, and on
fast cutting (shots of 2 to 10 frames, inserts)."""

import numpy as np
import pytest
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.scenes import DetectorOptions, SceneDetector, detect_scenes
from cinefx.testing.clips import Move, events_clip, fast_cut_clip, fast_shots, flash, render_move, write_clip

QUICK = ((0.4, 0.4, 0.9), (0.6, 0.5, 0.7))  # a quick push-in and pan: the whole frame in about a second


@pytest.mark.parametrize("size,shot", [((160, 90), 40), ((320, 180), 60)])
def test_cut_dissolve_fade_found_flash_ignored(size, shot):
    frames, ev = events_clip(size=size, shot=shot)
    found = detect_scenes(frames)
    starts = {s.kind: s.start for s in found[1:]}
    assert [s.kind for s in found] == ["start", "cut", "dissolve", "fade"], found
    assert starts["cut"] == ev["cut"]
    assert abs(starts["dissolve"] - ev["dissolve"]) <= 3
    assert abs(starts["fade"] - ev["fade"]) <= 2
    assert all(abs(s.start - ev["flash"]) > 3 for s in found)


def test_one_moving_shot_is_one_scene():
    frames = list(render_move(Move("rocket", 90, (0.3, 0.7, 1.0), (0.7, 0.3, 0.5)), (160, 90)))
    assert len(detect_scenes(frames)) == 1


def test_flash_alone_is_not_a_cut():
    frames = flash(list(render_move(Move("chelsea", 60), (160, 90))), at=30, length=3)
    assert len(detect_scenes(frames)) == 1


def test_scenes_command_json(tmp_path):
    import json

    frames, ev = events_clip(size=(160, 90), shot=40)
    src = write_clip(tmp_path / "ev.mp4", frames, fps=24, audio=None)
    r = CliRunner().invoke(app, ["scenes", str(src), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert [s["kind"] for s in data["scenes"]] == ["start", "cut", "dissolve", "fade"]
    assert data["scenes"][1]["start_time"] == pytest.approx(40 / 24)
    r = CliRunner().invoke(app, ["scenes", str(src)])
    assert r.exit_code == 0 and "dissolve" in r.output


def test_matches_pyscenedetect_adaptive_on_hard_cuts(tmp_path):
    """Where AdaptiveDetector finds hard cuts, so do we; where it mistakes the flash, we do not."""
    import scenedetect

    frames, ev = events_clip(size=(320, 180), shot=60)
    src = write_clip(tmp_path / "ev.mp4", frames, fps=24, audio=None)
    theirs = scenedetect.detect(str(src), scenedetect.AdaptiveDetector())
    their_cuts = {s[0].frame_num for s in theirs[1:]}
    ours = {s.start for s in detect_scenes(frames)[1:]}
    assert ev["cut"] in their_cuts and ev["cut"] in ours
    near_flash = lambda cuts: any(abs(c - ev["flash"]) <= 3 for c in cuts)  # noqa: E731
    assert not near_flash(ours)


def test_fast_thumbnails_find_the_same_scenes_as_full_frames():
    """`cinefx scenes` reads cheap thumbnails (no deblocking, shrunk before colour conversion);
    stylize sees full frames. Both must split the shipped sample (cut, dissolve, fade) alike."""
    from pathlib import Path

    from cinefx.scenes import detect_scenes, thumbnail_size
    from cinefx.video.probe import probe
    from cinefx.video.reader import read_frames

    info = probe(Path(__file__).resolve().parents[1] / "samples" / "sample.mp4")
    fast = detect_scenes(f.rgb for f in read_frames(info, size=thumbnail_size(info.width, info.height), exact=False))
    full = detect_scenes(f.rgb for f in read_frames(info))
    assert [(s.start, s.kind) for s in fast] == [(s.start, s.kind) for s in full]
    assert {s.kind for s in full} >= {"cut", "dissolve", "fade"}


@pytest.mark.parametrize("size", [(160, 90), (320, 180)])
def test_fast_cutting_every_cut_found(size):
    """Trailer-style editing: every cut at its own frame (F1 1.0), none extra. The clip's inserts
    (2 frames of the rocket inside a shot of the cat, 3 of the camera man inside the astronaut) are
    two cuts each; the rocket is ~60 levels darker than the cat, as a dark flash would be, but has
    none of its structure. Before: a cut hid any other for 11 frames and scenes under 6 frames
    were dropped, so 5 of the 14 cuts were found."""
    frames, cuts = fast_cut_clip(size)
    frames = list(frames)
    shots = np.diff([0, *cuts, len(frames)])
    assert shots.min() == 2 and shots.max() == 10 and len(set(shots)) >= 6
    found = detect_scenes(frames)
    assert [s.start for s in found[1:]] == cuts
    assert {s.kind for s in found[1:]} == {"cut"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_cutting_random_edits(seed):
    """40 random shots of 2-10 frames, every seventh with a 2- or 3-frame insert: every cut at its
    own frame, none extra."""
    frames, cuts = fast_cut_clip((160, 90), fast_shots(40, seed))
    assert [s.start for s in detect_scenes(frames)[1:]] == cuts


@pytest.mark.parametrize("length", [1, 2, 3])
def test_flash_in_fast_cutting_is_not_a_cut(length):
    frames, cuts = fast_cut_clip()
    frames = flash(list(frames), at=cuts[-1] + 3, length=length)  # inside the last shot (10 frames)
    assert [s.start for s in detect_scenes(frames)[1:]] == cuts


@pytest.mark.parametrize("photo", ["astronaut", "chelsea", "motorcycle_left"])
@pytest.mark.parametrize("length", [1, 2, 3])
def test_flash_during_a_quick_camera_move_is_not_a_cut(photo, length):
    """The camera moves on during the flash, so the frame after it is not the frame before it; it
    is still the same shot. Before: a 3-frame flash over the astronaut or the motorcycle was
    taken for a cut."""
    frames = flash(list(render_move(Move(photo, 30, *QUICK), (160, 90))), at=12, length=length)
    assert len(detect_scenes(frames)) == 1


@pytest.mark.parametrize("length", [2, 3])
def test_dark_frames_inside_a_shot_are_not_a_cut(length):
    """A flash may be darker than both sides (a strobe's off frames, a lamp failing)."""
    frames = list(render_move(Move("coffee", 30, *QUICK), (160, 90)))
    frames[12:12 + length] = [(f * 0.3).astype(np.uint8) for f in frames[12:12 + length]]
    assert len(detect_scenes(frames)) == 1


@pytest.mark.parametrize("back", [False, True])
def test_lone_frame_between_shots(back):
    """One frame of other content between two shots is one cut, not a one-frame scene; between
    two frames of one shot it is a stray frame, no cut."""
    a = list(render_move(Move("chelsea", 12), (160, 90)))
    b = list(render_move(Move("chelsea" if back else "coffee", 12), (160, 90)))
    odd = next(render_move(Move("rocket", 1), (160, 90)))
    starts = [s.start for s in detect_scenes(a + [odd] + b)[1:]]
    assert starts == ([] if back else [12]) or (not back and starts == [13])


def test_fast_cutting_through_scenes_command(tmp_path):
    """`cinefx scenes` on the encoded clip (decoder thumbnails, x264 artefacts) lists every shot,
    each at least two frames long. PySceneDetect's ContentDetector with min_scene_len=1, an
    independent detector, also finds every one of these cuts (it adds some inside quick moves)."""
    import json

    import scenedetect

    frames, cuts = fast_cut_clip((320, 180))
    src = write_clip(tmp_path / "fast.mp4", frames, fps=24, audio=None)
    r = CliRunner().invoke(app, ["scenes", str(src), "--json"])
    assert r.exit_code == 0, r.output
    scenes = json.loads(r.output)["scenes"]
    assert [s["start_frame"] for s in scenes[1:]] == cuts
    assert all(s["end_frame"] - s["start_frame"] >= 2 for s in scenes)
    assert scenes[3]["start_time"] == pytest.approx(cuts[2] / 24)
    theirs = {s[0].frame_num for s in scenedetect.detect(str(src), scenedetect.ContentDetector(min_scene_len=1))}
    assert set(cuts) <= theirs


def test_settled_frames_never_get_a_boundary_later():
    """stylize renders frames below `settled` as soon as it may; a boundary landing there later would
    render the first frames of a scene with the scene before. `settled` also trails the input by a
    bounded amount, so a long black run never piles up frames. Before: the fade's boundary came
    4 frames below `settled`, and 100 black frames held back 110."""
    ev, _ = events_clip()
    fast, _ = fast_cut_clip()
    black = [np.zeros_like(ev[0])] * 100
    bound = SceneDetector().lookahead + DetectorOptions().fade_hold
    for clip in (ev, list(fast), ev[:60] + black + ev[60:]):
        det, settled = SceneDetector(), 0
        for i, f in enumerate(clip):
            assert all(b.frame >= settled for b in det.push(f))
            settled = det.settled
            assert i + 1 - settled <= bound
        assert all(b.frame >= settled for b in det.finish())
