"""`train-preset --caption auto`: captions from the eval captioner, loaded through the users' path."""

import cv2
import pytest
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.testing.clips import photo

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("caption-stills")
    for name in ("astronaut", "coffee", "chelsea"):
        cv2.imwrite(str(d / f"{name}.png"), cv2.resize(photo(name), (300, 260))[..., ::-1])
    (d / "astronaut.txt").write_text("a woman in a space suit")
    return d


def test_auto_captions_come_from_the_captioner_and_are_saved_on_request(folder, tmp_path):
    from cinefx.eval import caption_images
    from cinefx.testing.eval_models import write_eval_models
    from cinefx.train.data import save_captions, scan_dataset

    captioner = write_eval_models(tmp_path / "m")["captioner"]
    expected = dict(zip(("chelsea", "coffee"),
                        caption_images([folder / "chelsea.png", folder / "coffee.png"], str(captioner))))
    assert all(expected.values())  # the tiny captioner writes something
    data = scan_dataset(folder, "<look>", min_side=64, captioner=lambda ps: caption_images(ps, str(captioner)))
    caps = {i.path.stem: i.caption for i in data.items}
    assert caps["astronaut"] == "<look>, a woman in a space suit"  # an own caption file wins
    for stem, text in expected.items():
        assert caps[stem] == f"<look>, {text}"
    assert any("captioned automatically" in n for n in data.notes)
    assert not (folder / "coffee.txt").exists()  # nothing written unless asked
    written = save_captions(data)
    try:
        assert sorted(p.name for p in written) == ["chelsea.txt", "coffee.txt"]
        assert (folder / "coffee.txt").read_text().strip() == caps["coffee"]
        assert (folder / "astronaut.txt").read_text() == "a woman in a space suit"
    finally:
        for p in written:
            p.unlink()


def test_train_preset_checks_name_and_caption_options_before_training(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("CINEFX_PRESETS_DIR", str(tmp_path / "presets"))
    r = runner.invoke(app, ["train-preset", str(folder), "--name", "../escape"])
    assert r.exit_code != 0 and "preset name" in r.output
    assert not (tmp_path / "escape").exists() and not (tmp_path / "presets").exists()
    r = runner.invoke(app, ["train-preset", str(folder), "--name", "Noir"])  # would hide the bundled noir
    assert r.exit_code == 2 and "bundled" in r.output and not (tmp_path / "presets").exists()
    r = runner.invoke(app, ["train-preset", str(folder), "--name", "look", "--save-captions"])
    assert r.exit_code == 2 and "--caption auto" in r.output
