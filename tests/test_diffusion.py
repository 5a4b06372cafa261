"""The diffusion engine on the tiny random-weight bundle: loading, temporal modes, noise priors,
chunks and cuts, adapters, determinism, resume and error messages.

Random weights say nothing about quality; these tests prove mechanics (see the brief)."""

import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.diffusion.models import ModelSpec
from cinefx.engines import EngineSettings, build_diffusion_engine
from cinefx.metrics import ssim
from cinefx.presets import load_preset, override
from cinefx.testing.clips import Move, render_move, write_clip

runner = CliRunner()


@pytest.fixture(scope="module")
def slow_frames():
    """16 frames of a slow push-in over a real photograph, 160x90."""
    return np.stack(list(render_move(Move("astronaut", 16, (0.5, 0.45, 0.9), (0.52, 0.46, 0.86)), (160, 90))))


def preset_with(**diffusion):
    return override(load_preset("epic"), "diffusion", **diffusion)


def engine(bundle, seed=0, **diffusion):
    return build_diffusion_engine(preset_with(**diffusion), ModelSpec(base=str(bundle)), EngineSettings(seed=seed))


def t_ssim(frames):
    return float(np.mean([ssim(a, b) for a, b in zip(frames, frames[1:])]))


# -- loading and the CLI --------------------------------------------------------------------------

def test_tiny_bundle_loads_and_models_command(tiny_bundle):
    for sub in ("model_index.json", "unet/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "controlnet-canny/diffusion_pytorch_model.safetensors", "depth-estimator/model.safetensors"):
        assert (tiny_bundle / sub).is_file(), sub
    r = runner.invoke(app, ["models", "--model", str(tiny_bundle)])
    assert r.exit_code == 0, r.output
    assert r.output.count("local folder") == 4


def test_cli_diffusion_writes_full_output_with_audio(tiny_bundle, clips, tmp_path):
    out = tmp_path / "d.mp4"
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "--engine", "diffusion", "--model", str(tiny_bundle),
                            "-o", str(out), "--steps", "4", "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "engine: diffusion" in r.output
    with av.open(str(clips["mp4"])) as a, av.open(str(out)) as b:
        pin = [p.pts for p in a.demux(video=0) if p.size]
        pout = [p.pts for p in b.demux(video=0) if p.size]
        assert len(pin) == len(pout) == 48
        aud_in = [bytes(p) for p in a.demux(audio=0) if p.size]
        aud_out = [bytes(p) for p in b.demux(audio=0) if p.size]
        assert aud_in == aud_out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["engine"] == "diffusion" and len(report["scenes"]) == 2
    assert not list(tmp_path.glob(".*cinefx-work"))  # work folder removed on completion


def test_preview_contact_sheet(tiny_bundle, clips, tmp_path):
    png = tmp_path / "p.png"
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "--engine", "diffusion", "--model", str(tiny_bundle),
                            "--preview", str(png), "--steps", "2"])
    assert r.exit_code == 0, r.output
    import cv2

    sheet = cv2.imread(str(png))
    assert sheet is not None and sheet.shape[1] > 2 * 320  # two scenes side by side


@pytest.mark.parametrize("args, needle, code", [
    (["--model", "/nonexistent/sd15"], "no such file or folder", 1),
    (["--model", "{tmp}"], "no model_index.json", 1),
    (["--model", "{tmp}/weights.ckpt"], "pickles", 1),
    (["--model", "{bundle}", "--controlnet", "canny=org/not-cached"], "not in the Hugging Face cache", 1),
    (["--model", "{bundle}", "--controlnet", "sketch=x"], "unknown control kind", 2),  # an impossible option
])
def test_bad_model_messages(tiny_bundle, clips, tmp_path, args, needle, code):
    (tmp_path / "weights.ckpt").write_bytes(b"not really")
    args = [a.format(tmp=tmp_path, bundle=tiny_bundle) for a in args]
    out = tmp_path / "o.mp4"
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "--engine", "diffusion", "-o", str(out), *args])
    assert r.exit_code == code, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_broken_weights_file_is_a_one_line_error(tiny_bundle, tmp_path, clips):
    import shutil

    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100)
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "--engine", "diffusion", "--model", str(bad),
                            "-o", str(tmp_path / "o.mp4")])
    assert r.exit_code == 1 and "base" in r.output and "cannot be loaded" in r.output, r.output


@pytest.mark.parametrize("folder, safetensors, pickle_name", [
    ("text_encoder", "model.safetensors", "pytorch_model.bin"),
    ("depth-estimator", "model.safetensors", "pytorch_model.bin"),
    ("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
])
def test_refused_pickle_weights_are_one_quiet_line(tiny_bundle, tmp_path, capfd, caplog, folder, safetensors,
                                                    pickle_name):
    """A .bin that torch's weights-only loader refuses (it holds an object besides tensors, as old
    training scripts saved), loaded with --allow-pickle: one ModelError naming the file, and
    nothing from the libraries on the terminal (diffusers logs its fallback to the pickle as an
    error, torch warns about the pickle protocol)."""
    import collections
    import logging
    import pickle
    import shutil
    import warnings

    from cinefx.diffusion.models import load_components
    from cinefx.errors import ModelError

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / folder / safetensors).unlink()
    (bundle / folder / pickle_name).write_bytes(pickle.dumps({"step": collections.Counter(a=1)}))
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ModelError) as err:
        warnings.simplefilter("always")
        load_components(ModelSpec(base=str(bundle), allow_pickle=True), ("depth",), "cpu", torch.float32)
    assert capfd.readouterr() == ("", "")
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not caught, [str(w.message) for w in caught]
    msg = str(err.value)
    assert folder in msg and pickle_name in msg, msg
    assert "\n" not in msg and len(msg) < 400 and ".safetensors" in msg, msg


# -- the temporal machinery -----------------------------------------------------------------------

def test_temporal_attention_and_residual_prior_raise_consistency(tiny_bundle, slow_frames):
    """Even with random weights, shared attention and shared noise make frames agree: the margin
    is the mechanism working, not image quality."""
    base = t_ssim(engine(tiny_bundle, temporal="none", noise_prior="independent").render(slow_frames, 0))
    ours = t_ssim(engine(tiny_bundle, temporal="full", noise_prior="residual").render(slow_frames, 0))
    print(f"T-SSIM per-frame baseline {base:.3f}, full+residual {ours:.3f}")
    assert ours > base + 0.2


@pytest.mark.parametrize("temporal", ["full", "anchor", "none"])
@pytest.mark.parametrize("prior", ["independent", "shared", "residual", "flow"])
def test_every_mode_and_prior_renders(tiny_bundle, slow_frames, temporal, prior):
    out = engine(tiny_bundle, temporal=temporal, noise_prior=prior, steps=4, chunk=6).render(slow_frames[:10], 0)
    assert out.shape == slow_frames[:10].shape and out.dtype == np.uint8
    assert out.std() > 1  # a picture, not a constant


def test_each_option_changes_the_output(tiny_bundle, slow_frames):
    frames = slow_frames[:8]
    ref = engine(tiny_bundle, steps=4).render(frames, 0)
    for change in ({"temporal": "anchor"}, {"temporal": "none"}, {"noise_prior": "independent"},
                   {"noise_prior": "flow"}, {"strength": 0.8}, {"guidance": 2.0}, {"keyframes": 3}):
        other = engine(tiny_bundle, steps=4, **change).render(frames, 0)
        assert np.abs(other.astype(int) - ref).mean() > 0.3, change  # the residual prior shares most noise on this slow move, so attention changes less


def test_seed_determinism(tiny_bundle, slow_frames):
    frames = slow_frames[:6]
    a = engine(tiny_bundle, seed=3, steps=4).render(frames, 0)
    b = engine(tiny_bundle, seed=3, steps=4).render(frames, 0)
    c = engine(tiny_bundle, seed=4, steps=4).render(frames, 0)
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 0.5


def test_cut_resets_scene_state(tiny_bundle, slow_frames):
    """A scene renders the same whether or not another scene ran before it: nothing carries over."""
    other = np.stack(list(render_move(Move("coffee", 6), (160, 90))))
    e = engine(tiny_bundle, steps=4)
    e.render(other, 0)
    after_cut = e.render(slow_frames[:6], 1)
    alone = engine(tiny_bundle, steps=4).render(slow_frames[:6], 1)
    assert np.array_equal(after_cut, alone)


def test_colour_anchor_applies_without_temporal_attention(tiny_bundle, slow_frames):
    """`colour_anchor` holds each frame's colour offset from its source to the scene's first
    frame's (Lab means) with `temporal = "none"` too: it needs no attention between frames."""
    import cv2

    frames = slow_frames[:8]

    def drift(anchor):
        out = engine(tiny_bundle, temporal="none", noise_prior="independent", colour_anchor=anchor, detail=0.0,
                     steps=4, chunk=3, strength=0.8).render(frames, 0)
        mean = [np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2LAB).reshape(-1, 3).mean(0) for f in x]) for x in (out, frames)]
        offset = mean[0] - mean[1]
        return out, np.abs(offset - offset[0]).max()

    held, held_drift = drift(1.0)
    free, free_drift = drift(0.0)
    print(f"largest Lab drift from frame 0: anchored {held_drift:.2f}, free {free_drift:.2f}")
    assert np.abs(held.astype(int) - free).mean() > 0.2
    assert held_drift < 0.5 < free_drift


def test_chunks_carry_anchors_without_seams(tiny_bundle, slow_frames, monkeypatch):
    """With chunk 4, calls 2+ get the scene's first frame and the previous chunk's last frame as
    anchors, and the frame pair across a seam is about as consistent as pairs inside a chunk."""
    from cinefx.diffusion.pipeline import TemporalControlPipeline

    seen = []
    call = TemporalControlPipeline.__call__

    def spy(self, frames, controls, noise, **kw):
        seen.append(0 if kw.get("anchors") is None else len(kw["anchors"]))
        return call(self, frames, controls, noise, **kw)

    monkeypatch.setattr(TemporalControlPipeline, "__call__", spy)
    out = engine(tiny_bundle, chunk=4, temporal="full", noise_prior="residual").render(slow_frames, 0)
    assert seen == [0, 2, 2, 2]
    pairs = [ssim(a, b) for a, b in zip(out, out[1:])]
    seams = [pairs[i] for i in (3, 7, 11)]
    inside = [p for i, p in enumerate(pairs) if i not in (3, 7, 11)]
    print(f"seam T-SSIM {np.mean(seams):.3f}, inside {np.mean(inside):.3f}")
    assert np.mean(seams) > 0.8 * np.mean(inside)


def test_attention_processors_restored(tiny_bundle, slow_frames):
    e = engine(tiny_bundle, steps=2)
    unet = e.pipe.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    e.render(slow_frames[:4], 0)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    from cinefx.diffusion.attention import TemporalState, temporal_attention

    with pytest.raises(RuntimeError):
        with temporal_attention([unet], TemporalState("full", 4)):
            assert any("SpatialTemporal" in type(v).__name__ for v in unet.attn_processors.values())
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_full_attention_over_identical_frames_equals_per_frame(tiny_bundle):
    """Keys repeated for every frame leave softmax weights unchanged: a check of the reshaping."""
    from diffusers.models.attention_processor import Attention

    from cinefx.diffusion.attention import SpatialTemporalAttnProcessor, TemporalState

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    x = torch.randn(1, 10, 16).repeat(2 * 3, 1, 1)  # G=2 groups × 3 identical frames
    plain = SpatialTemporalAttnProcessor(TemporalState("none", 3))(attn, x)
    for mode in ("full", "anchor"):
        joined = SpatialTemporalAttnProcessor(TemporalState(mode, 3))(attn, x)
        assert torch.allclose(plain, joined, atol=1e-5), mode
    y = torch.randn(6, 10, 16)
    assert not torch.allclose(SpatialTemporalAttnProcessor(TemporalState("full", 3))(attn, y),
                              SpatialTemporalAttnProcessor(TemporalState("none", 3))(attn, y))


# -- noise priors ---------------------------------------------------------------------------------

def test_noise_priors():
    from cinefx.diffusion.noise import initial_noise

    rng = np.random.default_rng(0)
    still = np.repeat(rng.integers(0, 255, (1, 64, 96, 3), dtype=np.uint8), 4, axis=0)
    moving = still.copy()
    moving[2:, :32, :32] = 255 - moving[2:, :32, :32]  # top-left block changes at frame 2
    shape = (4, 8, 12)

    def gen():
        return torch.Generator().manual_seed(0)

    ind, _ = initial_noise("independent", still, shape, gen())
    assert not torch.equal(ind[0], ind[1])
    shared, _ = initial_noise("shared", moving, shape, gen())
    assert all(torch.equal(shared[0], s) for s in shared)
    res, carry = initial_noise("residual", moving, shape, gen())
    assert torch.equal(res[1], res[0])  # nothing moved
    assert not torch.equal(res[2][:, :4, :4], res[1][:, :4, :4])  # the changed block: fresh noise
    assert torch.equal(res[2][:, 5:, 5:], res[1][:, 5:, 5:])  # the rest: copied
    # a following chunk continues from the carry
    more, _ = initial_noise("residual", still[:2], shape, gen(), carry)
    assert torch.equal(more[0][:, 5:, 5:], res[3][:, 5:, 5:])
    # every prior keeps values N(0, 1)
    big = np.repeat(rng.integers(0, 255, (1, 256, 256, 3), dtype=np.uint8), 6, axis=0)
    for prior in ("independent", "shared", "residual", "flow"):
        n, _ = initial_noise(prior, big, (4, 32, 32), gen())
        assert abs(float(n.mean())) < 0.05 and abs(float(n.std()) - 1) < 0.05, prior


def test_flow_prior_follows_motion():
    """A picture panning 8 px right per frame: the flow prior's noise pans with it."""
    from cinefx.diffusion.noise import initial_noise
    from cinefx.testing.clips import photo

    import cv2

    img = cv2.resize(photo("astronaut"), (400, 200))
    frames = np.stack([img[:, 100 - 8 * i:356 - 8 * i] for i in range(3)])  # content moves right
    n, _ = initial_noise("flow", frames, (4, 25, 32), torch.Generator().manual_seed(0))
    # one latent pixel = 8 image pixels: frame 1's noise is frame 0's shifted one to the right
    inner = (slice(None), slice(4, 20), slice(6, 26))
    shifted = n[0][:, 4:20, 5:25]
    assert (n[1][inner] == shifted).float().mean() > 0.9
    assert (n[1][inner] == n[0][inner]).float().mean() < 0.3


# -- adapters ---------------------------------------------------------------------------------------

def _write_kohya_lora(unet_config, path, rank=4, alpha=None):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    tensors = {}
    for block, ch in ((0, 32), (1, 64)):
        for proj in ("to_q", "to_k", "to_v"):
            stem = f"lora_unet_down_blocks_{block}_attentions_0_transformer_blocks_0_attn1_{proj}"
            tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, ch, generator=g) * 0.5
            tensors[f"{stem}.lora_up.weight"] = torch.randn(ch, rank, generator=g) * 0.5
            tensors[f"{stem}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    save_file(tensors, str(path))


def _write_embedding(path, token="<cinefx-look>"):
    from safetensors.torch import save_file

    save_file({token: torch.randn(1, 32, generator=torch.Generator().manual_seed(2)) * 2}, str(path))


def _preset_file(tmp_path, adapters):
    lines = ['description = "test look"', "[prompt]", 'positive = "cinematic film still"', "[diffusion]",
             "steps = 4"]
    for kind, file, extra in adapters:
        lines += ["[[diffusion.adapters]]", f'kind = "{kind}"', f'path = "{file}"', *extra]
    p = tmp_path / "look.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_lora_and_textual_inversion_load_and_change_output(tiny_bundle, slow_frames, tmp_path):
    _write_kohya_lora(None, tmp_path / "look_kohya.safetensors")
    _write_embedding(tmp_path / "look_ti.safetensors")
    frames = slow_frames[:4]
    spec = ModelSpec(base=str(tiny_bundle))
    plain = build_diffusion_engine(load_preset(_preset_file(tmp_path, [])), spec, EngineSettings()).render(frames, 0)
    lora = build_diffusion_engine(load_preset(_preset_file(tmp_path, [("lora", "look_kohya.safetensors", ["scale = 1.0"])])),
                                  spec, EngineSettings()).render(frames, 0)
    ti_preset = load_preset(_preset_file(tmp_path, [("textual-inversion", "look_ti.safetensors",
                                                     ['token = "<cinefx-look>"'])]))
    ti_engine = build_diffusion_engine(ti_preset, spec, EngineSettings())
    assert "<cinefx-look>" in ti_engine.prompt
    ti = ti_engine.render(frames, 0)
    assert np.abs(lora.astype(int) - plain).mean() > 0.5
    assert np.abs(ti.astype(int) - plain).mean() > 0.5
    # back to no adapters on the same loaded models: the original output returns
    again = build_diffusion_engine(load_preset(_preset_file(tmp_path, [])), spec, EngineSettings()).render(frames, 0)
    assert np.array_equal(again, plain)


def test_engines_sharing_loaded_models_keep_their_own_adapters(tiny_bundle, slow_frames, tmp_path, monkeypatch):
    """Engines built in one process share the loaded models (a batch with two presets, a library
    user): engine A with a LoRA (alpha ≠ rank) and a textual inversion, engine B with neither,
    rendered A, B, A. B renders as on a freshly loaded model, A twice the same and as alone."""
    import cinefx.engines as E

    _write_kohya_lora(None, tmp_path / "look_kohya.safetensors", rank=4, alpha=1.0)
    _write_embedding(tmp_path / "look_ti.safetensors")
    with_look = load_preset(_preset_file(tmp_path, [("lora", "look_kohya.safetensors", ["scale = 0.8"]),
                                                    ("textual-inversion", "look_ti.safetensors",
                                                     ['token = "<cinefx-look>"'])]))
    plain = load_preset(_preset_file(tmp_path, []))
    spec = ModelSpec(base=str(tiny_bundle))
    frames = slow_frames[:3]
    a = build_diffusion_engine(with_look, spec, EngineSettings())
    b = build_diffusion_engine(plain, spec, EngineSettings())
    assert a.pipe.unet is b.pipe.unet  # one copy of the weights
    a1 = a.render(frames, 0)
    b1 = b.render(frames, 0)
    a.start_scene(0)
    a2 = a.render(frames, 0)

    def alone(preset):
        monkeypatch.setattr(E, "MODELS", E.ModelCache())  # a fresh load from disk
        return build_diffusion_engine(preset, spec, EngineSettings()).render(frames, 0)

    assert np.array_equal(b1, alone(plain))
    assert np.array_equal(a1, alone(with_look))
    assert np.array_equal(a2, a1)
    assert np.abs(a1.astype(int) - b1).mean() > 0.5


def test_pickled_embedding_in_a_preset_follows_allow_pickle(tiny_bundle, slow_frames, tmp_path):
    """An A1111 `.pt` embedding named by a preset loads only with allow_pickle (--allow-pickle or
    the config file), which must reach the adapters, not only the model weights."""
    from cinefx.errors import AdapterError

    torch.save({"string_to_param": {"*": torch.randn(2, 32, generator=torch.Generator().manual_seed(6)) * 2},
                "name": "pt-look", "step": 500}, tmp_path / "look.pt")
    preset = load_preset(_preset_file(tmp_path, [("textual-inversion", "look.pt", ['token = "<pt-look>"'])]))
    with pytest.raises(AdapterError, match="look.pt: .pt files are pickles"):
        build_diffusion_engine(preset, ModelSpec(base=str(tiny_bundle)), EngineSettings())
    spec = ModelSpec(base=str(tiny_bundle), allow_pickle=True)
    e = build_diffusion_engine(preset, spec, EngineSettings())
    plain = build_diffusion_engine(load_preset(_preset_file(tmp_path, [])), spec, EngineSettings())
    assert "<pt-look>" in e.prompt
    assert np.abs(e.render(slow_frames[:3], 0).astype(int) - plain.render(slow_frames[:3], 0)).mean() > 0.5


def test_diffusers_format_lora_loads(tiny_bundle, slow_frames, tmp_path):
    """A LoRA saved by peft/diffusers (as train-preset writes them) loads and changes the output."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_bundle / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
                                              weight_name="look.safetensors")
    from cinefx.diffusion.adapters import inspect_file

    assert inspect_file(tmp_path / "look.safetensors") == ("lora", "diffusers")
    spec = ModelSpec(base=str(tiny_bundle))
    plain = build_diffusion_engine(load_preset(_preset_file(tmp_path, [])), spec, EngineSettings()).render(slow_frames[:4], 0)
    lora = build_diffusion_engine(load_preset(_preset_file(tmp_path, [("lora", "look.safetensors", ["scale = 0.8"])])),
                                  spec, EngineSettings()).render(slow_frames[:4], 0)
    assert np.abs(lora.astype(int) - plain).mean() > 0.5


def test_bad_adapter_files(tiny_bundle, clips, tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00garbage")
    (tmp_path / "old.pt").write_bytes(b"\x80\x04pickle")
    for file, needle in (("loha.safetensors", "LoHa/LoKr"), ("garbage.safetensors", "not a readable safetensors"),
                         ("old.pt", "pickles")):
        preset = _preset_file(tmp_path, [("lora", file, [])])
        r = runner.invoke(app, ["stylize", str(clips["mp4"]), "--engine", "diffusion", "--model", str(tiny_bundle),
                                "--preset", str(preset), "-o", str(tmp_path / "o.mp4")])
        assert r.exit_code == 1 and needle in r.output and file in r.output, r.output
        assert not (tmp_path / "o.mp4").exists()


# -- resume -----------------------------------------------------------------------------------------

def test_resume_after_kill_gives_the_same_file(tiny_bundle, tmp_path, monkeypatch):
    from cinefx.diffusion import engine as E
    from cinefx.stylize import StylizeOptions, stylize_file
    from cinefx.testing.clips import cut

    src = write_clip(tmp_path / "three.mp4", cut(Move("astronaut", 12), Move("coffee", 12), Move("rocket", 12),
                                                 size=(96, 64)), fps=24, audio="aac")
    opts = StylizeOptions(engine="diffusion", models=ModelSpec(base=str(tiny_bundle)), metrics=False)
    preset = preset_with(steps=3)
    whole = stylize_file(src, tmp_path / "whole.mp4", preset, opts)
    assert len(whole.scenes) == 3

    real = E.DiffusionEngine.render
    rendered = []

    def killed_in_scene_2(self, frames, scene):
        rendered.append(scene)
        if scene == 2:
            raise KeyboardInterrupt
        return real(self, frames, scene)

    monkeypatch.setattr(E.DiffusionEngine, "render", killed_in_scene_2)
    with pytest.raises(KeyboardInterrupt):
        stylize_file(src, tmp_path / "resumed.mp4", preset, opts)
    assert not (tmp_path / "resumed.mp4").exists()
    work = tmp_path / ".resumed.mp4.cinefx-work"
    assert sorted(p.name for p in work.glob("scene-*")) == ["scene-00000.mkv", "scene-00001.mkv"]

    monkeypatch.setattr(E.DiffusionEngine, "render", lambda self, frames, scene: (rendered.append(scene), real(self, frames, scene))[1])
    rendered.clear()
    res = stylize_file(src, tmp_path / "resumed.mp4", preset, opts)
    assert rendered == [2]  # only the unfinished scene was rendered again
    assert any("resumed: 2" in n for n in res.notes)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "whole.mp4", tmp_path / "resumed.mp4")]
    assert digest[0] == digest[1]
    assert not work.exists()

    # a changed option starts afresh: the stored scenes are not reused
    monkeypatch.setattr(E.DiffusionEngine, "render", killed_in_scene_2)
    with pytest.raises(KeyboardInterrupt):
        stylize_file(src, tmp_path / "again.mp4", preset, opts)
    rendered.clear()
    monkeypatch.setattr(E.DiffusionEngine, "render", lambda self, frames, scene: (rendered.append(scene), real(self, frames, scene))[1])
    stylize_file(src, tmp_path / "again.mp4", preset_with(steps=3, strength=0.6), opts)
    assert rendered == [0, 1, 2]


def test_resume_is_turned_off_when_the_disk_is_too_small(tiny_bundle, clips, tmp_path, monkeypatch):
    """Lossless scenes of a long 4K clip take tens of GB: with too little room, run without resume
    and say so, instead of filling the disk half way; --no-resume keeps no work folder at all."""
    import collections

    import cinefx.stylize as S

    class NoWorkFolder:
        def __init__(self, *a, **k):
            raise AssertionError("no work folder expected")

    monkeypatch.setattr(S, "WorkFolder", NoWorkFolder)
    monkeypatch.setattr(S.shutil, "disk_usage", lambda p: collections.namedtuple("U", "total used free")(10**6, 0, 10**6))
    args = ["stylize", str(clips["mp4"]), "--engine", "diffusion", "--model", str(tiny_bundle), "--steps", "1",
            "--no-metrics"]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "a.mp4")])
    assert r.exit_code == 0, r.output
    assert "resume off: keeping finished scenes would take about" in r.output
    monkeypatch.undo()
    monkeypatch.setattr(S, "WorkFolder", NoWorkFolder)
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "b.mp4"), "--no-resume"])
    assert r.exit_code == 0 and "resume off" not in r.output, r.output
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_hub_id_loads_from_the_huggingface_cache(tiny_bundle, clips, tmp_path):
    """A hub id resolves to the local cache (offline) and loads through the same path."""
    import os
    import shutil

    repo = Path(os.environ["HF_HUB_CACHE"]) / "models--cinefx-test--tiny-sd15"
    snap = repo / "snapshots" / ("0" * 40)
    if not snap.exists():
        shutil.copytree(tiny_bundle, snap, ignore=shutil.ignore_patterns("controlnet-*", "depth-estimator"))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text("0" * 40)
    local = ["--controlnet", f"canny={tiny_bundle / 'controlnet-canny'}", "--controlnet",
             f"depth={tiny_bundle / 'controlnet-depth'}", "--depth-model", str(tiny_bundle / "depth-estimator")]
    r = runner.invoke(app, ["models", "--model", "cinefx-test/tiny-sd15", *local])
    assert r.exit_code == 0 and "HF cache" in r.output, r.output
    out = tmp_path / "hub.mp4"
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "--engine", "diffusion", "--model", "cinefx-test/tiny-sd15",
                            *local, "--steps", "2", "--no-metrics", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 1000


def test_a1111_embedding_needs_a_token_and_loads(tiny_bundle, slow_frames, tmp_path):
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(5)) * 2},
              str(tmp_path / "a1111.safetensors"))
    from cinefx.errors import AdapterError

    spec = ModelSpec(base=str(tiny_bundle))
    with pytest.raises(AdapterError, match="needs token"):
        build_diffusion_engine(load_preset(_preset_file(tmp_path, [("textual-inversion", "a1111.safetensors", [])])),
                               spec, EngineSettings())
    e = build_diffusion_engine(load_preset(_preset_file(tmp_path, [("textual-inversion", "a1111.safetensors",
                                                                    ['token = "<a1111-look>"'])])), spec, EngineSettings())
    plain = build_diffusion_engine(load_preset(_preset_file(tmp_path, [])), spec, EngineSettings())
    assert np.abs(e.render(slow_frames[:4], 0).astype(int) - plain.render(slow_frames[:4], 0)).mean() > 0.5


@pytest.mark.parametrize("scheduler", ["dpm++", "ddim", "euler", "unipc"])
def test_every_scheduler_renders(tiny_bundle, slow_frames, scheduler):
    preset = preset_with(steps=3)
    e = build_diffusion_engine(preset, ModelSpec(base=str(tiny_bundle)), EngineSettings(scheduler=scheduler))
    out = e.render(slow_frames[:3], 0)
    assert out.shape == slow_frames[:3].shape and out.std() > 1


@pytest.mark.parametrize("kind", ["odd", "portrait", "10bit"])
def test_diffusion_keeps_odd_sizes_rotation_and_10bit(tiny_bundle, clips, tmp_path, kind):
    from cinefx.video.probe import probe

    out = tmp_path / f"{kind}.mp4"
    r = runner.invoke(app, ["stylize", str(clips[kind]), "--engine", "diffusion", "--model", str(tiny_bundle),
                            "--steps", "2", "--no-metrics", "-o", str(out)])
    assert r.exit_code == 0, r.output
    a, b = probe(clips[kind]), probe(out)
    assert (b.display_size, b.rotation, b.frame_count) == (a.display_size, a.rotation, a.frame_count)


def test_single_file_checkpoint_offline_says_what_it_needs(tiny_bundle, clips, tmp_path):
    """Companions are found beside a single-file checkpoint; offline, its missing hub config is
    named in one line with the way out."""
    import shutil

    for sub in ("controlnet-canny", "controlnet-depth", "depth-estimator"):
        shutil.copytree(tiny_bundle / sub, tmp_path / sub)
    ckpt = tmp_path / "model.safetensors"
    shutil.copy(tiny_bundle / "unet" / "diffusion_pytorch_model.safetensors", ckpt)
    r = runner.invoke(app, ["models", "--model", str(ckpt)])
    assert r.exit_code == 0 and r.output.count("local folder") == 3 and "local file" in r.output, r.output
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "--engine", "diffusion", "--model", str(ckpt),
                            "-o", str(tmp_path / "o.mp4")])
    assert r.exit_code == 1 and "single-file checkpoint" in r.output and len(r.output.strip().splitlines()) == 1


def test_depth_anything_estimator(tiny_bundle, slow_frames, tmp_path):
    """The default depth estimator's family (Depth Anything: DINOv2 backbone, sides a multiple of 14,
    aspect kept), tiny and random, through --depth-model: a depth map per frame in [0, 1], with
    one range per scene."""
    import json

    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    from cinefx.controls import DepthExtractor
    from cinefx.diffusion.models import load_components

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                            image_size=28, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    model = DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
        reassemble_hidden_size=32, patch_size=14))
    model.save_pretrained(tmp_path / "da", safe_serialization=True)
    (tmp_path / "da" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "DPTImageProcessor", "size": {"height": 28, "width": 28}, "keep_aspect_ratio": True,
        "ensure_multiple_of": 14, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    comps = load_components(ModelSpec(base=str(tiny_bundle), depth=str(tmp_path / "da")), ("depth",), "cpu",
                            torch.float32)
    ex = DepthExtractor(model=comps.control_models["depth"])
    maps = ex(slow_frames[:4])
    assert maps.shape == (4, 3, 90, 160) and 0 <= float(maps.min()) and float(maps.max()) <= 1
    first_range = ex.range
    ex(slow_frames[4:8])
    assert ex.range == first_range  # one range per scene
    ex.reset()
    assert ex.range is None


def test_strength_edges(tiny_bundle, slow_frames):
    frames = slow_frames[:3]
    assert np.array_equal(engine(tiny_bundle, strength=0.0).render(frames, 0), frames)
    out = engine(tiny_bundle, strength=0.05, steps=2).render(frames, 0)  # rounds to zero steps: still one
    assert out.shape == frames.shape


# -- controlnet-aux annotators (an optional extra) ----------------------------------------------

FAKE_AUX = '''
"""A stand-in for controlnet-aux with its LineartDetector's interface: controlnet-aux itself cannot
be installed on the test machines (its torchvision wheels need CUDA)."""
import os
import cv2
import numpy as np


class LineartDetector:
    def __init__(self, path):
        self.path, self.device = path, "cpu"

    @classmethod
    def from_pretrained(cls, where, local_files_only=False):
        if not os.path.isfile(os.path.join(where, "sk_model.pth")):
            raise OSError(f"{where} has no sk_model.pth")
        return cls(where)

    def to(self, device):
        self.device = device
        return self

    def __call__(self, image, detect_resolution=512, image_resolution=512, output_type="pil", coarse=False):
        assert output_type == "np" and not coarse
        h, w = image.shape[:2]
        k = image_resolution / min(h, w)
        size = (max(64, round(w * k / 64) * 64), max(64, round(h * k / 64) * 64))  # as controlnet-aux rounds
        lines = 255 - cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 40, 120)
        return cv2.resize(lines, size, interpolation=cv2.INTER_LINEAR)
'''


@pytest.fixture
def lineart(tmp_path, tiny_bundle):
    """A preset using only the lineart control, an annotators folder, and the CLI arguments."""
    preset = tmp_path / "lines.toml"
    preset.write_text('[diffusion]\ncontrols = { lineart = 0.9 }\nsteps = 2\n')
    ann = tmp_path / "annotators"
    ann.mkdir()
    (ann / "sk_model.pth").write_bytes(b"pickled weights")
    args = ["--engine", "diffusion", "--model", str(tiny_bundle), "--preset", str(preset),
            "--controlnet", f"lineart={tiny_bundle / 'controlnet-canny'}", "--annotators", str(ann)]
    return args


def test_annotator_controls_need_the_extra_and_allow_pickle(clips, tmp_path, lineart):
    out = tmp_path / "o.mp4"
    for extra, needle in (([], "are a pickle"), (["--allow-pickle"], "pip install 'cinefx[aux]'")):
        r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(out), *lineart, *extra])
        assert r.exit_code == 1, r.output
        assert "annotator-lineart" in r.output and needle in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
        assert not out.exists()
    # --engine auto falls back to the grade engine and says why
    auto = [a if a != "diffusion" else "auto" for a in lineart]
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(out), *auto, "--allow-pickle"])
    assert r.exit_code == 0 and "engine: grade" in r.output and "controlnet-aux" in r.output, r.output


def test_annotator_control_renders_through_controlnet_aux(clips, tmp_path, lineart, monkeypatch):
    pkg = tmp_path / "site" / "controlnet_aux"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_AUX)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    r = runner.invoke(app, ["models", "--control", "lineart", "--annotators", str(tmp_path / "annotators"),
                            "--controlnet", f"lineart={lineart[lineart.index('--model') + 1]}/controlnet-canny",
                            "--model", lineart[lineart.index("--model") + 1], "--allow-pickle"])
    assert r.exit_code == 0 and "annotator-lineart" in r.output, r.output
    out = tmp_path / "o.mp4"
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(out), *lineart, "--allow-pickle"])
    assert r.exit_code == 0, r.output
    assert "engine: diffusion" in r.output
    with av.open(str(out)) as c:
        assert c.streams.video[0].frames == 48


def test_annotator_extractor_maps_match_the_frames(monkeypatch, tmp_path, slow_frames):
    from cinefx.controls import EXTRACTORS

    ns: dict = {}
    exec(FAKE_AUX, ns)
    ann = tmp_path / "a"
    ann.mkdir()
    (ann / "sk_model.pth").write_bytes(b"x")
    ex = EXTRACTORS["lineart"](device="cpu", model=ns["LineartDetector"].from_pretrained(str(ann)))
    maps = ex(slow_frames[:3])
    assert maps.shape == (3, 3, 90, 160) and maps.dtype == torch.float32
    assert 0 <= float(maps.min()) and float(maps.max()) <= 1
    # white lines on black, where the image has edges: what the lineart ControlNet was trained on
    assert 0.0 < float((maps < 0.5).float().mean()) < 0.5


# -- the user's config file ----------------------------------------------------------------------

def test_config_file_sets_the_models(tiny_bundle, clips, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_bundle, tmp_path / "weights" / "sd15")
    cfg = tmp_path / "config.toml"
    cfg.write_text('[models]\nbase = "weights/sd15"\n'
                   f'[models.controlnets]\ncanny = "{tiny_bundle / "controlnet-canny"}"\n')
    monkeypatch.setenv("CINEFX_CONFIG", str(cfg))
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0, r.output
    assert r.output.count("local folder") == 4 and "defaults from" in r.output
    # the command line wins over the config, the config over the defaults
    r = runner.invoke(app, ["models", "--model", "/nonexistent/sd15"])
    assert r.exit_code == 1 and "no such file or folder" in r.output
    out = tmp_path / "o.mp4"
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "--engine", "diffusion", "--steps", "1", "-o", str(out),
                            "--no-metrics"])
    assert r.exit_code == 0 and "engine: diffusion" in r.output, r.output


@pytest.mark.parametrize("body, needle", [
    ("[models]\nbase = 3\n", "models.base = 3: must be a path or hub id"),
    ("[models]\nmodel = 'x'\n", "unknown key models.model"),
    ("[render]\nsteps = 3\n", "unknown section [render]"),
    ("[models.controlnets]\nsketch = 'x'\n", "models.controlnets.sketch: unknown control"),
    ("[models]\nallow_pickle = 'yes'\n", "models.allow_pickle = 'yes': must be true or false"),
    ("[models\n", "not valid TOML"),
])
def test_malformed_config_is_a_one_line_error(clips, tmp_path, monkeypatch, body, needle):
    cfg = tmp_path / "config.toml"
    cfg.write_text(body)
    monkeypatch.setenv("CINEFX_CONFIG", str(cfg))
    out = tmp_path / "o.mp4"
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "--engine", "diffusion", "-o", str(out)])
    assert r.exit_code == 1, r.output
    assert str(cfg) in r.output and needle in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()
    # the grade engine reads no weights, so a broken config does not stop it
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "--engine", "grade", "-o", str(out), "--no-metrics"])
    assert r.exit_code == 0, r.output


def test_config_named_by_env_must_exist(clips, tmp_path, monkeypatch):
    monkeypatch.setenv("CINEFX_CONFIG", str(tmp_path / "nope.toml"))
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 1 and "nope.toml: config file not found" in r.output, r.output


# -- GPU-only paths, run on the CPU for their mechanics -------------------------------------------

def test_half_precision_path_runs(tiny_bundle, slow_frames, monkeypatch):
    """bf16 is what a GPU gets by default; the CPU refuses it for speed, not correctness, so run
    the same code in bf16 here: every dtype hand-over (control maps, noise, anchors, flow warps,
    VAE decode) must agree, in each temporal mode, with keyframes too."""
    import cinefx.diffusion.models as M

    monkeypatch.setattr(M, "pick_device_dtype", lambda precision="auto": ("cpu", torch.bfloat16))
    for temporal, prior, keyframes in (("full", "residual", 0), ("anchor", "flow", 0), ("none", "shared", 3)):
        eng = engine(tiny_bundle, steps=2, temporal=temporal, noise_prior=prior, keyframes=keyframes, chunk=4)
        assert eng.pipe.dtype == torch.bfloat16
        out = eng.render(slow_frames[:6], 0)
        assert out.shape == (6, 90, 160, 3) and out.dtype == np.uint8


def test_frame_memory_probe_mechanics(tiny_bundle, monkeypatch):
    """The automatic batch size measures one UNet + ControlNet step at batch 1 and 2 on the GPU.
    With CUDA's memory counters faked, the same calls run here: shapes, CFG rows, temporal state."""
    eng = engine(tiny_bundle)
    calls = []
    real = eng.pipe.predict_noise

    def spy(x, t, text, conds, scales):
        calls.append((x.shape[0], eng.pipe.state.frames, eng.pipe.state.mode))
        return real(x, t, text, conds, scales)

    monkeypatch.setattr(eng.pipe, "predict_noise", spy)
    peak = iter([0, 3_000, 0, 5_000])  # memory_allocated, then max_memory_allocated, per batch
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: next(peak))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: next(peak))
    per_frame = eng.pipe.frame_memory(64, 64, cfg=True, temporal="full")
    assert calls == [(2, 1, "full"), (4, 2, "full")]  # CFG doubles the rows; the state knows the frames
    assert per_frame == 2_000


# -- detail beyond the render's resolution -----------------------------------------------------

def test_add_detail_restores_fine_source_detail_and_keeps_colour():
    from cinefx.diffusion.engine import add_detail
    from cinefx.testing.clips import photo

    import cv2

    src = cv2.resize(photo("astronaut"), (640, 360))
    small = cv2.resize(src, (160, 90), interpolation=cv2.INTER_AREA)
    tinted = np.clip(small.astype(int) + [0, 0, 40], 0, 255).astype(np.uint8)  # a "stylized" render
    up = cv2.resize(tinted, (640, 360), interpolation=cv2.INTER_CUBIC)
    out = add_detail(up, src, (160, 90), 1.0)
    def hp(x):  # detail finer than 160×90
        y = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float32)
        return (y - cv2.resize(cv2.resize(y, (160, 90), interpolation=cv2.INTER_AREA), (640, 360),
                               interpolation=cv2.INTER_CUBIC)).astype(float)

    # the output's fine detail follows the source's; the plain upscale has little of it
    assert np.corrcoef(hp(out).ravel(), hp(src).ravel())[0, 1] > 0.8
    assert np.corrcoef(hp(up).ravel(), hp(src).ravel())[0, 1] < 0.6
    # colour is the render's: the blue tint survives
    assert abs((out[..., 2].astype(int) - out[..., 0]).mean() - (up[..., 2].astype(int) - up[..., 0]).mean()) < 2
    assert np.array_equal(add_detail(up, src, (160, 90), 0.0), up)


def test_detail_applies_only_above_the_render_size(tiny_bundle, slow_frames):
    big = np.stack([cv2_resize(f, (320, 180)) for f in slow_frames[:4]])
    a = engine(tiny_bundle, steps=2, detail=0.0).render(big, 0)
    b = engine(tiny_bundle, steps=2, detail=1.0).render(big, 0)
    assert np.abs(a.astype(int) - b).mean() > 0.5  # 320×180 is above the tiny model's render size
    small = slow_frames[:4]
    from cinefx.engines import EngineSettings

    def at_own_size(detail):
        return build_diffusion_engine(preset_with(steps=2, detail=detail), ModelSpec(base=str(tiny_bundle)),
                                      EngineSettings(size=90)).render(small, 0)

    assert np.array_equal(at_own_size(0.0), at_own_size(1.0))


def cv2_resize(frame, size):
    import cv2

    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def test_full_disk_in_the_work_folder_is_a_one_line_error(tiny_bundle, clips, tmp_path, monkeypatch):
    from cinefx.resume import WorkFolder

    def full(self, scene, frames, part=0):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(WorkFolder, "record", full)
    out = tmp_path / "o.mp4"
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "--engine", "diffusion", "--model", str(tiny_bundle),
                            "--steps", "1", "-o", str(out)])
    assert r.exit_code == 1, r.output
    assert "cannot keep finished scenes for resume" in r.output and "--no-resume" in r.output
    assert "Traceback" not in r.output and not out.exists()
