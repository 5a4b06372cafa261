"""`cinefx eval` and warp error in the stylize report, through the command line users type."""

import json

import pytest
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.testing.clips import Move, cut, write_clip

runner = CliRunner()


@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    """A two-shot clip, a grade of it with its report, a frozen render and a short one."""
    d = tmp_path_factory.mktemp("eval-cli")
    frames = list(cut(Move("astronaut", 14, (0.45, 0.4, 0.9), (0.55, 0.45, 0.7)),
                      Move("coffee", 12, (0.4, 0.5, 1.0), (0.6, 0.5, 0.8)), size=(160, 90)))
    src = write_clip(d / "src.mp4", frames, audio=None)
    graded, report = d / "graded.mp4", d / "graded.json"
    res = runner.invoke(app, ["stylize", str(src), "-o", str(graded), "--preset", "noir", "--report", str(report),
                              "--warp-error", "-q"])
    assert res.exit_code == 0, res.output
    frozen = write_clip(d / "frozen.mp4", [frames[0]] * len(frames), audio=None)
    short = write_clip(d / "short.mp4", frames[:-2], audio=None)
    return {"dir": d, "src": src, "graded": graded, "report": report, "frozen": frozen, "short": short}


def test_stylize_report_carries_warp_error_only_when_asked(footage, tmp_path):
    with_warp = json.loads(footage["report"].read_text())
    assert with_warp["warp_input"] > 0 and with_warp["warp_output"] > 0
    assert with_warp["delta_warp"] == pytest.approx(with_warp["warp_output"] - with_warp["warp_input"])
    assert all(s["warp_input"] is not None for s in with_warp["scenes"])
    out, rep = tmp_path / "plain.mp4", tmp_path / "plain.json"
    res = runner.invoke(app, ["stylize", str(footage["src"]), "-o", str(out), "--preset", "noir", "--report", str(rep), "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(rep.read_text())["warp_input"] is None  # off by default for the grade engine


def test_diffusion_measures_warp_error_by_default():
    from cinefx.stylize import StylizeOptions, _warp_meter

    diffusion, grade = "diffusion", "grade"
    assert _warp_meter(StylizeOptions(), diffusion) is not None
    assert _warp_meter(StylizeOptions(), grade) is None
    assert _warp_meter(StylizeOptions(warp_error=True), grade) is not None
    assert _warp_meter(StylizeOptions(warp_error=False), diffusion) is None
    assert _warp_meter(StylizeOptions(metrics=False, warp_error=True), diffusion) is None


def test_eval_command_ranks_renders_with_models_from_the_config(footage, tmp_path, monkeypatch):
    from cinefx.testing.eval_models import write_eval_models

    models = write_eval_models(tmp_path / "m")
    cfg = tmp_path / "config.toml"
    cfg.write_text("[models.eval]\n" + "".join(f'{k} = "{v}"\n' for k, v in models.items()))
    monkeypatch.setenv("CINEFX_CONFIG", str(cfg))
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", str(footage["src"]), str(footage["graded"]), str(footage["frozen"]),
                              "--json", str(out), "--csv", str(tmp_path / "eval.csv"), "--prompt", "a film still"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["models"] == {k: str(v) for k, v in models.items()}  # every JSON records the models used
    graded, frozen = data["renders"]
    for key in ("warp_error", "psnr_delta", "tssim_delta", "clip_consistency", "content_similarity", "dino", "clip_t"):
        assert graded[key] is not None and frozen[key] is not None, key
    # a frozen render is "smoother" by PSNR but far worse along the real motion
    assert frozen["psnr_delta"] > graded["psnr_delta"]
    assert frozen["warp_error"] > 5 * graded["warp_error"]
    assert (tmp_path / "eval.csv").read_text().count("\n") >= 2 * 2  # per-scene rows of both renders


def test_eval_without_weights_and_refusals(footage, tmp_path):
    res = runner.invoke(app, ["eval", str(footage["src"]), str(footage["graded"]), "--no-models",
                              "--json", str(tmp_path / "e.json"), "--every", "3"])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "e.json").read_text())["renders"][0]
    assert r["warp_error"] is not None and r["clip_t"] is None
    res = runner.invoke(app, ["eval", str(footage["src"]), str(footage["short"])])
    assert res.exit_code == 1
    assert "short.mp4" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["eval", str(footage["src"])])
    assert res.exit_code == 2 and "render" in res.output
    res = runner.invoke(app, ["eval", str(footage["src"]), str(footage["graded"]), "--every", "0"])
    assert res.exit_code == 2 and "--every" in res.output


def test_config_eval_table_is_checked(footage, tmp_path, monkeypatch):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[models.eval]\nclipp = "x"\n')
    monkeypatch.setenv("CINEFX_CONFIG", str(cfg))
    res = runner.invoke(app, ["eval", str(footage["src"]), str(footage["graded"])])
    assert res.exit_code == 1 and "models.eval.clipp: unknown model (known: captioner, sentence, dino, clip)" in res.output


def test_eval_table_cells_show_control_characters_as_escapes(footage, tmp_path):
    """A render's file name is a cell of the eval table, which rich printed as it was: a name with
    an escape sequence cleared the user's terminal (titles and messages were already escaped)."""
    evil = tmp_path / "gr\x1b[2Jaded\x07.mp4"
    evil.write_bytes(footage["graded"].read_bytes())
    res = runner.invoke(app, ["eval", str(footage["src"]), str(evil), "--no-models", "--every", "3"])
    assert res.exit_code == 0, res.output
    assert not any(c in res.output for c in "\x1b\x07"), res.output
    assert "gr\\x1b[2Jaded\\x07.mp4" in res.output.replace("\n", "")
