"""`cinefx train-preset` on the tiny bundle: each method trains a few steps on real photographs, its
preset loads back through the stylize path and changes the output; resume gives the same weights."""

import cv2
import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.testing.clips import Move, photo, render_move

runner = CliRunner()
SMALL = ["--resolution", "64", "--min-side", "64", "--no-validation"]


@pytest.fixture(scope="module")
def stills(tmp_path_factory):
    """A kohya-style folder (5 repeats) of four real photographs, one with its own caption."""
    d = tmp_path_factory.mktemp("stills")
    leaf = d / "5_look"
    leaf.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        cv2.imwrite(str(leaf / f"{name}.png"), cv2.resize(photo(name), (128, 96))[..., ::-1])
    (leaf / "astronaut.txt").write_text("a woman in a space suit")
    return d


def train(stills, out, bundle, *extra):
    return runner.invoke(app, ["train-preset", str(stills), "--name", "look", "--model", str(bundle),
                               "-o", str(out), *SMALL, *extra])


def stylize_with(bundle, preset_toml, tmp_path):
    from cinefx.diffusion.models import ModelSpec
    from cinefx.engines import EngineSettings, build_diffusion_engine
    from cinefx.presets import load_preset, override

    frames = np.stack(list(render_move(Move("astronaut", 3), (96, 64))))
    preset = override(load_preset(preset_toml), "diffusion", steps=3)
    return build_diffusion_engine(preset, ModelSpec(base=str(bundle)), EngineSettings()).render(frames, 0)


@pytest.mark.parametrize("method", ["lora", "ti"])
def test_method_trains_and_its_preset_changes_the_output(tiny_bundle, stills, tmp_path, method):
    out = tmp_path / method
    r = train(stills, out, tiny_bundle, "--method", method, "--steps", "4")
    assert r.exit_code == 0, r.output
    assert "4 images used" in r.output and "3 without a caption file" in r.output
    assert "20 samples per epoch" in r.output  # 4 images × 5 repeats
    toml = out / "preset.toml"
    assert toml.is_file() and (out / "loss.png").is_file() and (out / "train_config.json").is_file()
    if method == "lora":
        kohya = load_file(str(out / "lora_kohya.safetensors"))
        assert any(k.startswith("lora_unet_") and k.endswith(".alpha") for k in kohya)
        from cinefx.diffusion.adapters import inspect_file

        assert inspect_file(out / "lora_kohya.safetensors") == ("lora", "kohya")
        assert inspect_file(out / "lora.safetensors") == ("lora", "diffusers")
    else:
        emb = load_file(str(out / "embedding.safetensors"))
        assert list(emb) == ["<look>"] and emb["<look>"].shape == (4, 32)
    # the preset goes through the stylize path (it names its base model) and changes the output
    from cinefx.presets import load_preset

    assert load_preset(toml).diffusion.base_model == str(tiny_bundle)
    plain = stylize_with(tiny_bundle, "epic", tmp_path)
    styled = stylize_with(tiny_bundle, str(toml), tmp_path)
    assert np.abs(styled.astype(int) - plain).mean() > 0.5


def test_resumed_training_gives_the_same_weights(tiny_bundle, stills, tmp_path):
    from cinefx.train.data import scan_dataset
    from cinefx.train.export import export_preset
    from cinefx.train.loop import TrainConfig, train as run

    cfg = TrainConfig(model=str(tiny_bundle), trigger="<look>", steps=6, resolution=64, checkpoint_every=2, seed=3)
    data = scan_dataset(stills, "<look>", min_side=64)
    host, state = run(cfg, data, tmp_path / "a")
    export_preset(host, cfg, state, tmp_path / "a", "a")
    _, stopped = run(cfg, data, tmp_path / "b", stop_after=3)  # "killed" after step 3
    assert stopped.step == 3
    host, state = run(cfg, data, tmp_path / "b", resume=True)
    assert state.step == 6
    export_preset(host, cfg, state, tmp_path / "b", "b")
    a, b = load_file(str(tmp_path / "a" / "lora.safetensors")), load_file(str(tmp_path / "b" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_bad_training_folders(tiny_bundle, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = train(empty, tmp_path / "o", tiny_bundle)
    assert r.exit_code == 1 and "no training images found" in r.output and str(empty) in r.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    r = train(broken, tmp_path / "o", tiny_bundle)
    assert r.exit_code == 1 and "no usable training images" in r.output and "unreadable" in r.output, r.output
    r = train(tmp_path / "missing", tmp_path / "o", tiny_bundle)
    assert r.exit_code == 1 and "not found" in r.output
    assert not (tmp_path / "o").exists()
