"""Presets validate, the grade really grades without flicker, the metrics match scikit-image."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.errors import LutError, PresetError
from cinefx.grade import lut as lutlib
from cinefx.grade.grader import Grader
from cinefx.metrics import psnr, ssim
from cinefx.presets import GradeConfig, combine, list_presets, load_preset, override
from cinefx.testing.clips import Move, render_move

runner = CliRunner()
REQUIRED = {"epic", "noir", "golden-hour", "blockbuster", "vintage-film", "bleach-bypass", "day-for-night",
            "close-shot", "medium-shot", "long-shot"}


def test_bundled_presets_all_load():
    names = {n for n, _ in list_presets()}
    assert REQUIRED <= names
    for n in names:
        assert load_preset(n).name == n


@pytest.mark.parametrize("body,needle", [
    ('[grade]\ncontrast = 5\n', "grade.contrast = 5"),
    ('[grade]\nbrightness = 1\n', "unknown key grade.brightness"),
    ('[grade]\nsaturation = "lots"\n', "must be a number"),
    ('[grade]\nlut = "missing.cube"\n', "file not found"),
    ('[diffusion]\ntemporal = "sideways"\n', "must be one of full, anchor, none"),
    ('[diffusion]\nsteps = 2.5\n', "whole number"),
    ('[diffusion.controls]\nsketch = 1\n', "unknown control"),
    ('colour = 1\n', "unknown key 'colour'"),
    ('[grade\n', "not valid TOML"),
])
def test_malformed_preset_errors_name_file_key_value(tmp_path, body, needle):
    p = tmp_path / "mine.toml"
    p.write_text(body)
    with pytest.raises(PresetError) as ex:
        load_preset(str(p))
    assert str(p) in str(ex.value) and needle in str(ex.value)


def test_user_presets_folder_and_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("CINEFX_PRESETS_DIR", str(tmp_path))
    (tmp_path / "mylook.toml").write_text('description = "mine"\n[grade]\nsaturation = 0.5\n')
    assert load_preset("mylook").grade.saturation == 0.5
    r = runner.invoke(app, ["presets"])
    assert r.exit_code == 0 and "mylook" in r.output and "epic" in r.output
    r = runner.invoke(app, ["presets", "show", "mylook"])
    assert r.exit_code == 0 and "saturation = 0.5" in r.output
    r = runner.invoke(app, ["presets", "show", "nothing-here"])
    assert r.exit_code == 1 and "unknown preset" in r.output


def test_combine_and_override():
    p = combine([load_preset("epic"), load_preset("long-shot")])
    assert "epic cinematic" in p.prompt.positive and "establishing" in p.prompt.positive
    assert p.grade.vignette == load_preset("long-shot").grade.vignette
    assert p.grade.letterbox == 2.39  # long-shot does not set it, epic's stays
    q = override(p, "grade", letterbox=0.0, grain=None)
    assert q.grade.letterbox == 0 and q.grade.grain == p.grade.grain and p.grade.letterbox == 2.39
    with pytest.raises(PresetError, match="--grain"):
        override(p, "grade", grain=7)


def frames(n=6, size=(128, 72)):
    return np.stack(list(render_move(Move("coffee", n, (0.5, 0.5, 1.0), (0.5, 0.5, 0.9)), size)))


def test_identity_grade_is_identity():
    f = frames()
    assert np.array_equal(Grader(GradeConfig(), (128, 72))(f), f)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_preset_changes_the_picture(name):
    f = frames(2)
    out = Grader(load_preset(name).grade, (128, 72))(f)
    assert out.shape == f.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - f).mean() > 2


def test_noir_is_black_and_white_and_epic_is_scope():
    out = Grader(load_preset("noir").grade, (128, 72))(frames(1))[0].astype(int)
    assert np.abs(out[..., 0] - out[..., 1]).max() <= 2
    out = Grader(load_preset("epic").grade, (128, 72))(frames(1))[0]
    rows = np.flatnonzero(out.max(axis=(1, 2)) > 0)
    visible = rows[-1] - rows[0] + 1
    assert out[0].max() == 0 and out[-1].max() == 0
    assert abs(128 / visible - 2.39) < 0.1


def test_day_for_night_is_dark_and_blue_and_bleach_bypass_is_muted():
    import cv2

    f = frames(1)
    night = Grader(load_preset("day-for-night").grade, (128, 72))(f)[0].astype(float)
    picture = night.max(axis=2) > 0  # inside the letterbox bars
    blue_over_red = lambda x: x[..., 2].mean() / x[..., 0].mean()  # noqa: E731
    assert night[picture].mean() < 0.75 * f[0][picture].mean()
    assert blue_over_red(night[picture]) > 2 * blue_over_red(f[0][picture].astype(float))  # moonlight
    bleach = Grader(load_preset("bleach-bypass").grade, (128, 72))(f)[0]
    sat = lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2HSV)[..., 1].mean()  # noqa: E731
    assert sat(bleach) < 0.7 * sat(f[0])
    luma = lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[bleach.max(axis=2) > 0].std()  # noqa: E731
    assert luma(bleach) > 1.05 * luma(f[0])  # harder contrast


def test_grade_adds_no_flicker_and_grain_is_seeded():
    still = np.repeat(frames(1), 8, axis=0)
    no_grain = Grader(load_preset("epic").grade.__class__(**{**load_preset("epic").grade.__dict__, "grain": 0.0}), (128, 72))
    out = no_grain(still)
    assert all(np.array_equal(out[0], o) for o in out)  # a still stays still
    g = load_preset("epic").grade
    a = Grader(g, (128, 72), seed=3)(still, 0)
    b = Grader(g, (128, 72), seed=3)(still, 0)
    c = Grader(g, (128, 72), seed=4)(still, 0)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # grain moves every frame
    # chunking does not change grain: frame 5 graded alone equals frame 5 graded in a batch
    assert np.array_equal(Grader(g, (128, 72), seed=3)(still[5:6], 5)[0], a[5])


def test_cube_roundtrip_and_errors(tmp_path):
    ident = lutlib.identity(9)
    p = lutlib.write_cube(tmp_path / "i.cube", ident)
    back = lutlib.read_cube(p)
    assert np.allclose(back, ident, atol=1e-5)
    rgb = np.random.default_rng(0).random((50, 3)).astype(np.float32)
    assert np.allclose(lutlib.apply(back, rgb), rgb, atol=1e-5)
    bad = tmp_path / "bad.cube"
    for text, needle in (("LUT_3D_SIZE 2\n0 0 0\n", ":2: the table stops after 1 of 8 rows"),
                         ("0 0 0\n", "no LUT_3D_SIZE"), ("LUT_3D_SIZE 2\nfoo bar baz\n", ":2: unknown keyword")):
        bad.write_text(text)
        with pytest.raises(LutError, match=needle):
            lutlib.read_cube(bad)


def test_1d_cube_with_thousands_of_entries(tmp_path):
    """Colourists' 1D LUTs (shapers, film curves) have 1024-4096 entries per channel: kept as
    curves, not expanded to a 3D grid, and usable as a preset's LUT."""
    x = np.linspace(0, 1, 4096)
    curves = np.stack([x ** 0.8, x ** 1.0, x ** 1.25], -1)
    lines = ["TITLE \"curves\"", "LUT_1D_SIZE 4096"] + [f"{r:.6f} {g:.6f} {b:.6f}" for r, g, b in curves]
    p = tmp_path / "curves.cube"
    p.write_text("\n".join(lines) + "\n")
    lut = lutlib.read_cube(p)
    assert lut.shape == (4096, 3)
    rgb = np.array([[0.25, 0.25, 0.25], [0.5, 0.1, 0.9]], np.float32)
    assert np.allclose(lutlib.apply(lut, rgb), [[0.25 ** 0.8, 0.25, 0.25 ** 1.25], [0.5 ** 0.8, 0.1, 0.9 ** 1.25]], atol=1e-4)
    grey = np.full((1, 72, 128, 3), 64, np.uint8)
    out = Grader(GradeConfig(lut=str(p)), (128, 72))(grey)[0]
    assert out[0, 0, 0] > 64 + 10 and abs(int(out[0, 0, 1]) - 64) <= 1 and out[0, 0, 2] < 64 - 10
    for text, needle in (("LUT_1D_SIZE 70000\n", "out of range"),
                         ("LUT_1D_SIZE 2\nLUT_3D_SIZE 2\n", ":2: a second LUT size line")):
        p.write_text(text)
        with pytest.raises(LutError, match=needle):
            lutlib.read_cube(p)


def test_bundled_lut_matches_reference_lookup():
    """The engine applies LUTs through a dense 8-bit table; check it against the float trilinear lookup."""
    g = GradeConfig(lut=load_preset("blockbuster").grade.lut)
    f = frames(1)
    out = Grader(g, (128, 72))(f)[0].astype(np.float32)
    ref = lutlib.apply(lutlib.read_cube(g.lut), f[0].astype(np.float32) / 255) * 255
    assert np.abs(out - ref).mean() < 1.0
    assert np.abs(out - ref).max() <= 1.0  # rounding only: the table is exact trilinear interpolation


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    f = frames(3, (200, 120))
    for a, b in ((f[0], f[2]), (f[1], f[1])):
        ref = structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False)
        assert ssim(a, b) == pytest.approx(ref, abs=1e-4)
    assert psnr(f[0], f[0]) == float("inf")


def test_report_json_and_plot(tmp_path, clips):
    out = tmp_path / "o.mp4"
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(out), "--engine", "grade",
                            "--report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["scenes"]) == 2 and data["engine"] == "grade"
    s = data["scenes"][1]
    assert s["pairs"] == s["end_frame"] - s["start_frame"] - 1  # the pair across the cut is excluded
    assert 0 < s["input"]["tssim"] <= 1 and s["delta_tssim"] is not None
    assert (tmp_path / "p.png").stat().st_size > 5000
    assert "Temporal consistency" in r.output and "engine: grade" in r.output
    # epic's grain is new every frame: the report says it lowers output PSNR, and how to leave it out
    assert data["grain"] == 0.25 and "film grain" in data["notes"] and "film grain (strength 0.25)" in r.output
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(out), "--engine", "grade", "--overwrite",
                            "--grain", "0", "--report", str(tmp_path / "r0.json")])
    data0 = json.loads((tmp_path / "r0.json").read_text())
    assert data0["grain"] == 0 and "film grain" not in data0["notes"] and "film grain" not in r.output
    assert data0["overall_output"]["psnr"] > data["overall_output"]["psnr"]


def test_ssim_of_frames_smaller_than_its_window():
    """A 2×2 or 6×200 video still gets a finite T-SSIM (scikit-image would refuse the size)."""
    rng = np.random.default_rng(0)
    for shape in ((2, 2, 3), (6, 200, 3)):
        a = rng.integers(0, 255, shape, dtype=np.uint8)
        b = rng.integers(0, 255, shape, dtype=np.uint8)
        assert ssim(a, a) == pytest.approx(1.0)
        assert np.isfinite(ssim(a, b)) and ssim(a, b) < 0.5


def test_grading_on_several_threads_gives_the_same_frames():
    g = load_preset("epic").grade
    f = frames(7)
    serial = list(Grader(g, (128, 72), seed=2, workers=1).grade_many(zip(f, range(10, 17))))
    threaded = Grader(g, (128, 72), seed=2, workers=3)
    try:
        out = list(threaded.grade_many(zip(f, range(10, 17))))
    finally:
        threaded.close()
    assert len(out) == 7 and all(np.array_equal(a, b) for a, b in zip(serial, out))
    assert not np.array_equal(out[0], out[1])  # frame order kept: each frame has its own grain


def test_background_meter_measures_the_same():
    from cinefx.metrics import TemporalMeter

    f = frames(6)
    out = Grader(load_preset("epic").grade, (128, 72))(f)
    sync, bg = TemporalMeter(64), TemporalMeter(64, background=True)
    for m in (sync, bg):
        for i, (a, b) in enumerate(zip(f, out)):
            m.add(0 if i < 3 else 1, a, b)
    bg.finish()
    assert bg.series.keys() == sync.series.keys() == {0, 1}
    for k in sync.series:
        for s1, s2 in zip(sync.series[k], bg.series[k]):
            assert s1.psnr == s2.psnr and s1.tssim == s2.tssim and len(s1.tssim) == 2
