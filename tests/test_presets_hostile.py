"""What a hostile tester found: preset names that leave the output folder or drive the terminal,
batches stopped by inputs whose names differ in case, imports that replace a bundled preset, work
folders left behind, absurd letterbox ratios, and messages that blamed the wrong thing."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.errors import LutError, MissingFileError, PresetError
from cinefx.presets import Preset, combine, load_preset, override
from cinefx.resume import WorkFolder
from cinefx.stylize import StylizeOptions, output_for, stylize_file
from cinefx.testing.clips import Move, cut, write_clip

runner = CliRunner()
GRADE = ["--engine", "grade", "--x264-preset", "ultrafast", "--no-metrics"]


def clip(path: Path, frames: int) -> Path:
    return write_clip(path, cut(Move("rocket", frames), size=(96, 64)), fps=24, audio=None)


def one_line(ex) -> str:
    text = str(ex.value)
    assert "\n" not in text and "\x1b" not in text, text
    return text


# -- 1. a preset's name becomes part of file names -------------------------------------------------

def test_a_preset_name_that_leaves_the_folder_or_drives_the_terminal_is_refused_on_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nb" / "good2.x").mkdir(parents=True)
    src = clip(tmp_path / "nb" / "good2.mp4", 3)
    for stem, name in (("trav", "x/../../escaped"), ("ansi", "\x1b[2Jx"), ("hidden", ".x"), ("long", "x" * 65)):
        f = tmp_path / f"{stem}.toml"
        f.write_text(f"name = {json.dumps(name)}\n")  # JSON's escapes are TOML's
        with pytest.raises(PresetError, match="letters, digits") as ex:
            load_preset(f)
        assert str(f) in one_line(ex)
    # the hostile tester's run: refused before any work, nothing written anywhere
    r = runner.invoke(app, ["stylize", "nb/good2.mp4", "--preset", "trav.toml", *GRADE])
    assert r.exit_code == 1 and "trav.toml: name = 'x/../../escaped'" in r.output, r.output
    assert sorted(p.name for p in tmp_path.rglob("*.mp4")) == ["good2.mp4"]
    # a preset file named like no preset may be, without a name key, is refused for its file name
    odd = tmp_path / "my look.toml"
    odd.write_text("")
    with pytest.raises(PresetError, match="from the file name"):
        load_preset(odd)

    good = tmp_path / "v1.2_ok-look.toml"
    good.write_text("[grade]\ncontrast = 0.2\n")
    both = combine([load_preset(good), load_preset("epic")])
    assert both.name == "v1.2_ok-look+epic"
    assert output_for(src, src.parent, both.name) == src.parent / "good2.v1.2_ok-look-epic.mp4"
    # a name made in code is never trusted to stay in the folder either
    with pytest.raises(PresetError, match="would leave"):
        output_for(src, src.parent, Preset(name="x/../../escaped").name)


# -- 2. no input stops a batch ----------------------------------------------------------------------

def test_inputs_differing_in_case_render_under_stable_names_and_clashes_fail_alone(tmp_path):
    footage, other, out = tmp_path / "footage", tmp_path / "other", tmp_path / "out"
    footage.mkdir(), other.mkdir()
    clip(footage / "clip.MP4", 4)
    args = ["stylize", str(footage), "-o", str(out), *GRADE, "--skip-existing"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "1 done, 0 skipped, 0 failed of 1" in r.output, r.output
    clip(footage / "clip.mp4", 3)  # added later: the first output keeps its name, and is skipped
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "1 done, 1 skipped, 0 failed of 2" in r.output, r.output
    assert sorted(p.name for p in out.iterdir()) == ["clip.MP4.mp4", "clip.mp4"]

    # the same name in two folders: those two fail in the summary, the rest renders
    clip(other / "clip.mp4", 3)
    fresh = tmp_path / "fresh"
    r = runner.invoke(app, ["stylize", str(footage), str(other), "-o", str(fresh), *GRADE])
    assert r.exit_code == 1 and "1 done, 0 skipped, 2 failed of 3" in r.output, r.output
    assert f"{footage / 'clip.mp4'} and {other / 'clip.mp4'} would both be written to" in r.output
    assert sorted(p.name for p in fresh.iterdir()) == ["clip.MP4.mp4"]


# -- 3. an import never replaces a bundled preset ---------------------------------------------------

def test_presets_import_refuses_a_bundled_presets_name(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    user = tmp_path / "user"
    monkeypatch.setenv("CINEFX_PRESETS_DIR", str(user))
    emb = tmp_path / "look.safetensors"
    save_file({"<look>": torch.randn(2, 32)}, str(emb))
    bundled = load_preset("epic")
    for name in ("epic", "Noir"):
        r = runner.invoke(app, ["presets", "import", str(emb), "--name", name])
        assert r.exit_code == 1 and f"preset name {name!r}" in r.output and "bundled" in r.output, r.output
        assert f"--name (e.g. {name}-lora)" in r.output, r.output
    assert not user.exists() and load_preset("epic") == bundled
    r = runner.invoke(app, ["presets", "import", str(emb), "--name", "epic-lora"])
    assert r.exit_code == 0 and load_preset("epic-lora").diffusion.adapters, r.output


# -- 4. work folders that hold no finished scene go ---------------------------------------------------

def test_a_work_folder_with_no_finished_scene_is_removed(tmp_path):
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    out = tmp_path / "o.mp4"
    work = WorkFolder(out, "key")
    work.open()
    work.record(0, frames)
    work.abandon()  # the run failed in its first scene
    assert not work.path.exists()

    work = WorkFolder(out, "key")
    work.open()
    work.record(0, frames)
    work.record(1, frames)  # scene 0 is finished now
    work.abandon()
    assert sorted(p.name for p in work.path.iterdir()) == ["run.json", "scene-00000.mkv"]
    WorkFolder(out, "key").abandon()  # a later run that fails before rendering keeps it too
    assert (work.path / "scene-00000.mkv").is_file()


def test_a_later_grade_run_removes_a_killed_runs_empty_work_folder(tmp_path):
    src = clip(tmp_path / "in.mp4", 3)
    options = StylizeOptions(engine="grade", metrics=False)
    for name, finished in (("empty.mp4", False), ("kept.mp4", True)):
        work = WorkFolder(tmp_path / name, "diffusion key")
        work.open()  # a killed diffusion run: run.json and, maybe, finished scenes
        if finished:
            work.record(0, np.zeros((1, 16, 16, 3), np.uint8))
            work.finish()
        stylize_file(src, tmp_path / name, load_preset("epic"), options)
        assert work.path.is_dir() == finished  # finished scenes stay for the diffusion run to resume


# -- 5. letterbox is an aspect ratio -----------------------------------------------------------------

def test_letterbox_must_be_none_or_a_sensible_aspect_ratio(tmp_path):
    epic = load_preset("epic")
    for value in (0, 1.0, 2.39, 4):
        assert override(epic, "grade", letterbox=value).grade.letterbox == value
    f = tmp_path / "tiny.toml"
    for value in (1e-300, 0.5, 4.5, -1):
        f.write_text(f"[grade]\nletterbox = {value!r}\n")
        with pytest.raises(PresetError, match=r"letterbox = .*: must be 0 \(none\) or between 1 and 4") as ex:
            load_preset(f)
        one_line(ex)
        with pytest.raises(PresetError, match="must be 0"):
            override(epic, "grade", letterbox=value)
    r = runner.invoke(app, ["stylize", str(tmp_path / "missing.mp4"), "--letterbox", "1e-300", *GRADE])
    assert r.exit_code == 2 and "--letterbox 1e-300: must be 0 (none) or between 1 and 4" in r.output, r.output


# -- 6. messages that name the real problem -----------------------------------------------------------

def test_a_lut_that_is_not_a_regular_file_says_so(tmp_path):
    from cinefx.grade.lut import read_cube

    os.mkfifo(tmp_path / "fifo.cube")
    (tmp_path / "dir.cube").mkdir()
    (tmp_path / "zero.cube").symlink_to("/dev/zero")
    (tmp_path / "dangling.cube").symlink_to(tmp_path / "nowhere.cube")
    for name, why in (("fifo", "not a regular file"), ("dir", "not a regular file"), ("zero", "not a regular file"),
                      ("dangling", "file not found")):
        f = tmp_path / f"p_{name}.toml"
        f.write_text(f'[grade]\nlut = "{name}.cube"\n')
        with pytest.raises(PresetError, match=f"grade.lut = '{name}.cube': {why}") as ex:
            load_preset(f)
        one_line(ex)
        if why != "file not found":
            with pytest.raises(LutError, match="not a regular file"):
                read_cube(tmp_path / f"{name}.cube")


def test_a_missing_input_is_named_before_an_existing_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("s.mp4").write_bytes(b"an earlier render")
    with pytest.raises(MissingFileError, match="nonexist.mp4: no such file"):
        stylize_file("nonexist.mp4", "s.mp4", load_preset("epic"), StylizeOptions(engine="grade"))
    r = runner.invoke(app, ["stylize", "nonexist.mp4", "-o", "s.mp4", *GRADE])
    assert r.exit_code == 1 and "nonexist.mp4: no such file" in r.output and "exists" not in r.output, r.output
