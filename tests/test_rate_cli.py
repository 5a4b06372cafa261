"""`cinefx rate` and `stylize --html` through the command line users type (the pages themselves are
tested in a browser in test_rate.py and test_html_report.py)."""

import json

import pytest
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.rate.page import ANSWERS_FORMAT
from cinefx.testing.clips import Move, cut, render_move, write_clip

runner = CliRunner()


@pytest.fixture(scope="module")
def systems(tmp_path_factory):
    root = tmp_path_factory.mktemp("rate-cli")
    frames = list(render_move(Move("astronaut", 12), (128, 72)))
    out = []
    for name, gain in (("warm", 1.1), ("cold", 0.8)):
        d = root / name
        d.mkdir()
        for clip in ("a", "b"):
            write_clip(d / f"{clip}.mp4", [(f * gain).clip(0, 255).astype("uint8") for f in frames], audio=None)
        out.append(d)
    return out


def test_rate_makes_a_study_and_tallies_answer_files(systems, tmp_path):
    study = tmp_path / "study"
    res = runner.invoke(app, ["rate", *map(str, systems), "-o", str(study), "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert (study / "index.html").is_file() and "--serve" in res.output
    key = json.loads((study / "key.json").read_text())
    trials = list(key["trials"])
    assert len(trials) == 2  # two sources, one pair of systems
    # a rater prefers the warm render every time, whichever side it was shown on
    warm = {t: {"cinematic": "A" if key["trials"][t]["a"] == "warm" else "B"} for t in trials}
    answers = tmp_path / "ann.json"
    answers.write_text(json.dumps({"format": ANSWERS_FORMAT, "study": key["study"], "rater": "ann",
                                   "seq": 2, "answers": warm}))
    res = runner.invoke(app, ["rate", "--tally", str(study), str(answers), "--json", str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    pair = json.loads((tmp_path / "t.json").read_text())["questions"][0]["pairs"][0]
    first = pair["systems"][0]
    assert pair["counts"] == ({"first": 2, "second": 0, "neither": 0} if first == "warm"
                              else {"first": 0, "second": 2, "neither": 0})


def test_rate_usage_errors(systems, tmp_path):
    for args in (["rate", *map(str, systems)], ["rate", "--tally", "--serve", str(tmp_path)],
                 ["rate", "--tally", str(tmp_path), "-o", str(tmp_path / "x")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, (args, res.output)
    res = runner.invoke(app, ["rate", "--tally", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "missing" in res.output


def test_stylize_html_report_and_batch_index(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("one", "two"):
        write_clip(src / f"{name}.mp4", cut(Move("astronaut", 10), Move("coffee", 10), size=(128, 72)), audio=None)
    page = tmp_path / "one.html"
    res = runner.invoke(app, ["stylize", str(src / "one.mp4"), "-o", str(tmp_path / "one.out.mp4"),
                              "--preset", "noir", "--html", str(page), "-q"])
    assert res.exit_code == 0, res.output
    text = page.read_text()
    assert text.count('<tr class="scene"') == 2 and text.count("data:image/") >= 4  # in and out per scene
    res = runner.invoke(app, ["stylize", str(src), "-o", str(tmp_path / "out"), "--preset", "noir",
                              "--html", str(tmp_path / "pages"), "-q"])
    assert res.exit_code == 0, res.output
    index = (tmp_path / "pages" / "index.html").read_text()
    assert 'href="one.mp4.html"' in index and 'href="two.mp4.html"' in index
    assert (tmp_path / "pages" / "two.mp4.html").is_file()
    res = runner.invoke(app, ["stylize", str(src / "one.mp4"), "--html", str(page), "--no-metrics"])
    assert res.exit_code == 2
