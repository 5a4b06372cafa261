"""`cinefx train-preset` on the tiny bundle: each method trains a few steps on real photographs, its
preset loads back through the stylize path at the trained strength and changes the output; an
interrupted run resumes to the same weights; preset names and TOML strings are checked."""

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


@pytest.mark.parametrize("method", ["lora", "ti", "dreambooth-lora", "pivotal"])
def test_method_trains_and_its_preset_changes_the_output(tiny_bundle, stills, tmp_path, method):
    out = tmp_path / method
    r = train(stills, out, tiny_bundle, "--method", method, "--steps", "4", "--class-images", "2")
    assert r.exit_code == 0, r.output
    assert "4 images used" in r.output and "3 without a caption file" in r.output
    assert "20 samples per epoch" in r.output  # 4 images × 5 repeats
    toml = out / "preset.toml"
    assert toml.is_file() and (out / "loss.png").is_file() and (out / "train_config.json").is_file()
    if method in ("pivotal", "ti"):
        emb = load_file(str(out / "embedding.safetensors"))
        assert list(emb) == ["<look>"] and emb["<look>"].shape == (4, 32)
    if method != "ti":
        kohya = load_file(str(out / "lora_kohya.safetensors"))
        assert any(k.startswith("lora_unet_") and k.endswith(".alpha") for k in kohya)
        from cinefx.diffusion.adapters import inspect_file

        assert inspect_file(out / "lora_kohya.safetensors") == ("lora", "kohya")
        assert inspect_file(out / "lora.safetensors") == ("lora", "diffusers")
    # the preset goes through the stylize path (it names its base model) and changes the output
    from cinefx.presets import load_preset

    assert load_preset(toml).diffusion.base_model == str(tiny_bundle)
    plain = stylize_with(tiny_bundle, "epic", tmp_path)
    styled = stylize_with(tiny_bundle, str(toml), tmp_path)
    assert np.abs(styled.astype(int) - plain).mean() > 0.5


def _stop_at(step):
    """A progress callback that presses Ctrl-C once step `step` is done."""
    def progress(done, total, loss):
        if done == step:
            raise KeyboardInterrupt
    return progress


def test_interrupted_training_saves_and_resumes_to_the_same_weights(tiny_bundle, stills, tmp_path):
    """Ctrl-C at step 3 (no periodic checkpoint there) saves that step; resumed, the run ends with
    the weights of a run never stopped, bit for bit."""
    from cinefx.train.data import scan_dataset
    from cinefx.train.export import export_preset
    from cinefx.train.loop import TrainConfig, train as run

    cfg = TrainConfig(model=str(tiny_bundle), trigger="<look>", steps=6, resolution=64, checkpoint_every=4, seed=3)
    data = scan_dataset(stills, "<look>", min_side=64)
    host, state = run(cfg, data, tmp_path / "a")
    export_preset(host, cfg, state, tmp_path / "a", "a")
    with pytest.raises(KeyboardInterrupt):
        run(cfg, data, tmp_path / "b", progress=_stop_at(3))
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["checkpoint.pt"]  # whole, no temporaries left
    steps = []
    host, state = run(cfg, data, tmp_path / "b", resume=True, progress=lambda done, *_: steps.append(done))
    assert steps == [4, 5, 6] and state.step == 6
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


def test_presets_import(tiny_bundle, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    monkeypatch.setenv("CINEFX_PRESETS_DIR", str(tmp_path / "user"))
    emb = tmp_path / "grainy.safetensors"
    save_file({"<grainy>": torch.randn(2, 32)}, str(emb))
    r = runner.invoke(app, ["presets", "import", str(emb)])
    assert r.exit_code == 0, r.output
    from cinefx.presets import load_preset

    p = load_preset("grainy")
    assert p.diffusion.adapters[0].kind == "textual-inversion" and p.diffusion.adapters[0].token == "<grainy>"
    assert (tmp_path / "user" / "grainy" / "grainy.safetensors").is_file()
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_a.hada_w1_a": torch.zeros(2, 2)}, str(loha))
    pt = tmp_path / "old.pt"
    pt.write_bytes(b"\x80\x04pickle")
    for args, needle in (([str(loha)], "LoHa/LoKr"), ([str(pt)], "pickles"),
                         ([str(pt), "--allow-pickle"], "--kind lora"), ([str(emb)], "already exists")):
        r = runner.invoke(app, ["presets", "import", *args])
        assert r.exit_code == 1 and needle in r.output, (args, r.output)


def test_storyboard(tiny_bundle, tmp_path):
    shots = tmp_path / "shots.txt"
    shots.write_text("# scene one\na detective in the rain\n\nclose on her eyes, neon reflections\n")
    board = tmp_path / "board.png"
    r = runner.invoke(app, ["storyboard", str(shots), "-o", str(board), "--model", str(tiny_bundle), "--steps", "2",
                            "--preset", "noir"])
    assert r.exit_code == 0, r.output
    stills = [cv2.imread(str(tmp_path / f"board_{i:02d}.png")) for i in (1, 2)]
    assert all(s is not None and s.shape[1] > s.shape[0] for s in stills)  # 16:9 frames
    assert np.abs(stills[0].astype(int) - stills[1]).mean() > 0.5  # each shot is its own picture
    assert cv2.imread(str(board)) is not None
    (tmp_path / "empty.txt").write_text("# nothing\n")
    r = runner.invoke(app, ["storyboard", str(tmp_path / "empty.txt"), "-o", str(tmp_path / "b2.png"),
                            "--model", str(tiny_bundle)])
    assert r.exit_code == 1 and "no shot descriptions" in r.output


def test_dreambooth_prior_preservation_changes_training(tiny_bundle, stills, tmp_path):
    """Same seed, same steps: the class (prior) loss makes DreamBooth-LoRA's weights differ from
    plain LoRA's, and the class images are generated by the base model into the work folder."""
    from peft.utils import get_peft_model_state_dict

    from cinefx.train.data import scan_dataset
    from cinefx.train.loop import TrainConfig, train as run

    data = scan_dataset(stills, "<look>", min_side=64)
    weights = {}
    for method in ("lora", "dreambooth-lora"):
        cfg = TrainConfig(method=method, model=str(tiny_bundle), trigger="<look>", steps=2, resolution=64,
                          class_images=2, seed=1)
        host, _ = run(cfg, data, tmp_path / method)
        weights[method] = get_peft_model_state_dict(host.unet)
    assert len(list((tmp_path / "dreambooth-lora" / "class_images").glob("*.png"))) == 2
    assert any(not np.array_equal(weights["lora"][k].numpy(), weights["dreambooth-lora"][k].numpy())
               for k in weights["lora"])


def test_random_crop_interrupted_mid_step_resumes_exactly(tiny_bundle, stills, tmp_path, monkeypatch):
    """Random crops are drawn from the checkpointed generator. Ctrl-C inside step 3, after its crop
    and noise were drawn, saves step 2 with the generators as they were before step 3 drew: the
    resumed run still matches a run never stopped."""
    import torch.nn.functional as F

    from cinefx.train import loop
    from cinefx.train.data import scan_dataset
    from peft.utils import get_peft_model_state_dict

    cfg = loop.TrainConfig(model=str(tiny_bundle), trigger="<look>", steps=4, resolution=64, random_crop=True,
                           checkpoint_every=0, seed=2)
    data = scan_dataset(stills, "<look>", min_side=64)
    whole, _ = loop.train(cfg, data, tmp_path / "a")
    a = {k: v.clone() for k, v in get_peft_model_state_dict(whole.unet).items()}
    calls = []

    def loss_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return F.mse_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "F", type("F", (), {"mse_loss": staticmethod(loss_then_ctrl_c)}))
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, data, tmp_path / "b")
    monkeypatch.undo()
    resumed, state = loop.train(cfg, data, tmp_path / "b", resume=True)
    b = get_peft_model_state_dict(resumed.unet)
    assert state.step == 4 and len(state.losses) == 4 and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_default_output_is_usable_by_name_with_validation_sheet(tiny_bundle, stills, clips, tmp_path, monkeypatch):
    """Without -o the preset lands in the user presets folder, so `stylize --preset NAME` finds it;
    the validation sheet (base vs preset, fixed prompts and seeds) is written beside it."""
    monkeypatch.setenv("CINEFX_PRESETS_DIR", str(tmp_path / "user"))
    r = runner.invoke(app, ["train-preset", str(stills), "--name", "my-look", "--model", str(tiny_bundle),
                            "--resolution", "64", "--min-side", "64", "--steps", "2"])
    assert r.exit_code == 0, r.output
    folder = tmp_path / "user" / "my-look"
    sheet = cv2.imread(str(folder / "validation.png"))
    assert sheet is not None and sheet.shape[0] > 3 * 64  # 3 prompts × 2 seeds × (base, preset)
    assert not (folder / ".train").exists()  # checkpoints removed once the preset is complete
    out = tmp_path / "styled.mp4"
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "--engine", "diffusion", "--preset", "my-look",
                            "--steps", "2", "--no-metrics", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file()


def test_nan_guard_stops_a_diverging_run(tiny_bundle, stills, tmp_path, monkeypatch):
    import torch.nn.functional as F

    from cinefx.train import loop
    from cinefx.train.data import scan_dataset

    real = F.mse_loss
    monkeypatch.setattr(loop.F, "mse_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    cfg = loop.TrainConfig(model=str(tiny_bundle), trigger="<look>", steps=10, resolution=64)
    with pytest.raises(loop.TrainingDiverged, match="5 steps running"):
        loop.train(cfg, scan_dataset(stills, "<look>", min_side=64), tmp_path / "w")


@pytest.mark.parametrize("method", ["lora", "pivotal"])
def test_half_precision_training_path_runs(tiny_bundle, stills, tmp_path, monkeypatch, method):
    """A GPU trains with a bf16 base model (trainable weights in fp32, the text encoder in fp32 for
    textual inversion). The CPU refuses bf16 for speed only, so run that path here, with the
    validation sheet, whose generation also runs in the model's dtype."""
    import torch

    import cinefx.diffusion.models as M

    monkeypatch.setattr(M, "pick_device_dtype", lambda precision="auto": ("cpu", torch.bfloat16))
    out = tmp_path / method
    r = runner.invoke(app, ["train-preset", str(stills), "--name", "look", "--model", str(tiny_bundle),
                            "-o", str(out), "--resolution", "64", "--min-side", "64", "--method", method,
                            "--steps", "3"])
    assert r.exit_code == 0, r.output
    weights = load_file(str(out / "lora.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    assert (out / "validation.png").is_file()


@pytest.fixture(scope="module")
def lora_r4_a8(tiny_bundle, stills, tmp_path_factory):
    """A LoRA trained at rank 4, alpha 8 (scale α/r = 2: alpha ≠ rank, or a lost alpha would not
    show), exported; the trained peft UNet kept as the reference."""
    from cinefx.train.data import scan_dataset
    from cinefx.train.export import export_preset
    from cinefx.train.loop import TrainConfig, train as run

    out = tmp_path_factory.mktemp("lora_r4_a8")
    cfg = TrainConfig(model=str(tiny_bundle), trigger="<look>", steps=2, resolution=64, rank=4, alpha=8.0, lr=1e-2)
    host, state = run(cfg, scan_dataset(stills, "<look>", min_side=64), out / ".train")
    export_preset(host, cfg, state, out, "look")
    return host, cfg, out


def _lora_deltas(unet, adapter):
    """ΔW = scaling·B·A of every LoRA layer, as peft applies it."""
    return {name: m.get_delta_weight(adapter).detach().clone() for name, m in unet.named_modules()
            if adapter in getattr(m, "lora_A", {})}


def _unet_out(unet):
    import torch

    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(z, torch.tensor([500]), encoder_hidden_states=text).sample


@pytest.mark.parametrize("export", ["current", "legacy"])
def test_lora_preset_loads_at_the_trained_strength(tiny_bundle, lora_r4_a8, tmp_path, export):
    """The preset's lora.safetensors, loaded by diffusers' load_lora_weights through the stylize
    path's apply_adapters into a fresh pipeline, gives the trained UNet exactly. `legacy`: a file
    written as train-preset did before alpha/rank was folded in (diffusers' own save_lora_weights,
    no alpha) loads right too, from the alpha and rank in the train_config.json beside it."""
    import shutil

    import torch
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from cinefx.diffusion.adapters import apply_adapters
    from cinefx.diffusion.models import ModelSpec, load_components
    from cinefx.presets import Adapter

    trained, _, out = lora_r4_a8
    if export == "legacy":
        StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(trained.unet),
                                                  weight_name="lora.safetensors")
        shutil.copy(out / "train_config.json", tmp_path)
        out = tmp_path
    fresh = load_components(ModelSpec(base=str(tiny_bundle)), (), "cpu", torch.float32).host
    base = _unet_out(fresh.unet)
    apply_adapters(fresh, [Adapter(kind="lora", path=out / "lora.safetensors", scale=1.0)])
    want, got = _lora_deltas(trained.unet, "default"), _lora_deltas(fresh.unet, "cinefx_0")
    assert want.keys() == got.keys() and len(want) > 10
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-8)
    trained_change, loaded_change = _unet_out(trained.unet) - base, _unet_out(fresh.unet) - base
    assert loaded_change.abs().mean() > 1e-3
    torch.testing.assert_close(loaded_change, trained_change, rtol=1e-4, atol=1e-5)


def test_multi_vector_textual_inversion_trains_every_vector(tiny_bundle, stills, tmp_path, monkeypatch):
    """Three vectors behind the trigger: training reads the trigger as diffusers' inference expands
    it (<look> <look>_1 <look>_2), so each vector moves from its starting embedding, and the
    exported embedding, loaded by diffusers into a fresh pipeline, tokenizes captions as training did."""
    import torch
    from transformers import CLIPTextModel

    from cinefx.diffusion.adapters import apply_adapters
    from cinefx.diffusion.models import ModelSpec, load_components
    from cinefx.presets import Adapter
    from cinefx.train.data import scan_dataset
    from cinefx.train.export import export_preset
    from cinefx.train.loop import TrainConfig, train as run

    seen = []
    forward = CLIPTextModel.forward
    monkeypatch.setattr(CLIPTextModel, "forward", lambda self, ids, *a, **k: seen.append(ids) or forward(self, ids, *a, **k))
    cfg = TrainConfig(method="ti", model=str(tiny_bundle), trigger="<look>", vectors=3, steps=3, resolution=64)
    host, state = run(cfg, scan_dataset(stills, "<look>", min_side=64), tmp_path / ".train")
    export_preset(host, cfg, state, tmp_path, "look")
    monkeypatch.undo()

    fresh = load_components(ModelSpec(base=str(tiny_bundle)), (), "cpu", torch.float32).host
    tok = fresh.tokenizer
    start = fresh.text_encoder.get_input_embeddings().weight[tok.encode("film", add_special_tokens=False)[0]]
    vectors = load_file(str(tmp_path / "embedding.safetensors"))["<look>"]
    moved = (vectors - start).abs().max(dim=1).values
    assert vectors.shape == (3, 32) and (moved > 1e-4).all(), moved

    apply_adapters(fresh, [Adapter(kind="textual-inversion", path=tmp_path / "embedding.safetensors", token="<look>")])
    caption = "<look>, film still"
    expanded = fresh.maybe_convert_prompt(caption, tok)
    assert expanded == "<look> <look>_1 <look>_2, film still"
    ids = tok(expanded, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    assert any(torch.equal(ids[0], row) for batch in seen for row in batch)  # training saw this very caption
    assert all(row.tolist().count(tok.convert_tokens_to_ids(t)) == 1 for batch in seen for row in batch
               for t in cfg.tokens)  # every caption holds every vector, once


def test_failed_export_leaves_no_preset_toml(lora_r4_a8, tmp_path, monkeypatch):
    """Every file is written whole, preset.toml last: an export stopped part-way leaves a folder
    that is not a preset, and no temporaries."""
    from cinefx.train import export
    from cinefx.train.loop import TrainState

    host, cfg, _ = lora_r4_a8

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_loss_plot", full_disk)
    with pytest.raises(OSError, match="No space"):
        export.export_preset(host, cfg, TrainState(2, [0.5, 0.4]), tmp_path, "look")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "lora_kohya.safetensors",
                                                          "train_config.json"]


@pytest.mark.parametrize("text", ["a \"quoted\" back\\slash", "tab\tnew\nline\r\x00\x1f\x7f", "film 😀 still",
                                  "ünïcødé ✓", "\ud83d lone surrogate"])
def test_toml_strings_round_trip(text):
    """Checked against Python's own TOML reader; json.dumps, used before, writes 😀 as a surrogate
    pair TOML refuses. A lone surrogate (an undecodable file name) cannot be stored: it reads back as U+FFFD."""
    import tomllib

    from cinefx.train.export import toml_string

    assert tomllib.loads(f"x = {toml_string(text)}")["x"] == text.replace("\ud83d", "\ufffd")


def test_presets_import_refuses_unsafe_names_and_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    """A name that leaves the presets folder or that TOML and file systems cannot hold is refused
    before anything is written; a file named with an emoji imports under a plain --name; an import
    that fails (here a scale out of range) leaves no folder in the way of the next try."""
    import torch
    from safetensors.torch import save_file

    from cinefx.presets import load_preset

    user = tmp_path / "presets" / "user"
    monkeypatch.setenv("CINEFX_PRESETS_DIR", str(user))
    emb = tmp_path / "grain 😀.safetensors"
    save_file({"<grain>": torch.randn(2, 32)}, str(emb))
    for name in ("../../escaped", str(tmp_path / "absolute"), ".hidden", "look 😀", "x" * 65, "a/b", ""):
        r = runner.invoke(app, ["presets", "import", str(emb), "--name", name])
        assert r.exit_code == 1 and "preset name" in r.output and "letters, digits" in r.output, (name, r.output)
    r = runner.invoke(app, ["presets", "import", str(emb)])  # the file's stem is the default name
    assert r.exit_code == 1 and "--name" in r.output, r.output
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "absolute").exists() and not user.exists()

    r = runner.invoke(app, ["presets", "import", str(emb), "--name", "grain", "--scale", "9"])
    assert r.exit_code == 1 and "scale" in r.output, r.output
    assert list(user.iterdir()) == []  # no folder, no temporary
    r = runner.invoke(app, ["presets", "import", str(emb), "--name", "grain", "--trigger", 'film "grain" 😀\\'])
    assert r.exit_code == 0, r.output
    p = load_preset("grain")
    assert p.prompt.trigger == ('film "grain" 😀\\',) and "grain 😀.safetensors" in p.description
    assert sorted(f.name for f in (user / "grain").iterdir()) == ["grain.safetensors", "preset.toml"]


def test_train_preset_refuses_an_unsafe_name(tmp_path):
    """export_preset checks the name before it writes anything (the CLI checks it before training)."""
    from cinefx.errors import PresetError
    from cinefx.train.export import export_preset
    from cinefx.train.loop import TrainConfig, TrainState

    for name in ("look 😀", "../look", ".look"):
        with pytest.raises(PresetError, match="preset name"):
            export_preset(None, TrainConfig(), TrainState(), tmp_path / "out", name)
    assert not (tmp_path / "out").exists()
