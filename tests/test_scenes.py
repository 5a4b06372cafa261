"""Scene detection on real-photo clips with a hard cut, a flash, a dissolve and a fade."""

import pytest
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.scenes import detect_scenes
from cinefx.testing.clips import Move, events_clip, flash, render_move, write_clip


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
