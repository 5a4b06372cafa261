"""Turbo (few-step distilled LoRAs) and the speed options, on the tiny bundle.

References are diffusers' own: its LCM/TCD scheduler steps, its LCM img2img timesteps, its
`set_adapters` for stacked LoRAs. Random weights say nothing about quality; these prove mechanics."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cinefx.diffusion.models import ModelSpec, SpeedOptions, apply_speed, load_components
from cinefx.diffusion.pipeline import (Anchors, TemporalControlPipeline, consistency_step, img2img_timesteps,
                                       make_scheduler)
from cinefx.diffusion.turbo import TURBO_ADAPTER, StepNoise, apply_turbo, turbo_lora
from cinefx.errors import ModelError, OptionError
from cinefx.testing.tiny import SD15_SCHEDULER_CONFIG, write_turbo_lora

SIZE = 64  # the tiny bundle's native side: 8×8 latents


@pytest.fixture(scope="module")
def lora_files(tiny_bundle, tmp_path_factory):
    """A turbo LoRA (rank 8, alpha 4) and a preset-style LoRA (rank 4, alpha 1) for the tiny UNet."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_bundle / "unet")
    d = tmp_path_factory.mktemp("loras")
    return write_turbo_lora(unet, d / "turbo.safetensors"), write_turbo_lora(unet, d / "look.safetensors", 4, 1.0, 1)


def components(bundle, dtype=torch.float32):
    return load_components(ModelSpec(base=str(bundle)), ("canny",), "cpu", dtype)


def inputs(n, seed=0, still=False):
    """Frames (F, 3, 64, 64) in [0, 1] (the same frame F times with `still`), canny maps, noise."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(1 if still else n, 3, SIZE, SIZE, generator=g).expand(n, -1, -1, -1)
    return frames, {"canny": (frames > 0.5).float()}, torch.randn(n, 4, 8, 8, generator=g)


# -- samplers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_consistency_steps_match_diffusers(name):
    """Every step of an img2img run equals diffusers' own scheduler step fed the same noise (its
    step draws it from a generator; ours takes it as given)."""
    ours, ref = make_scheduler(name, SD15_SCHEDULER_CONFIG), make_scheduler(name, SD15_SCHEDULER_CONFIG)
    timesteps = img2img_timesteps(ours, 4, 0.6)
    img2img_timesteps(ref, 4, 0.6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    for i, t in enumerate(timesteps):
        eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10 + i))
        last = i == len(timesteps) - 1
        noise = None if last else torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(100 + i))
        x = consistency_step(name, ours, eps, t, None if last else timesteps[i + 1], x, noise)
        y = ref.step(eps, t, y, generator=torch.Generator().manual_seed(100 + i), return_dict=False)[0]
        assert torch.allclose(x, y, atol=1e-6), (name, i)


def test_few_step_timesteps_follow_diffusers():
    """LCM keeps its 4 steps at strength 0.55, placed as diffusers' LCM img2img pipeline places
    them; Hyper-SD's trailing DDIM keeps ⌊4·0.55⌋ of its trained 999/749/499/249, as diffusers'
    img2img pipelines cut them; a tiny strength still runs one step."""
    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_img2img import \
        retrieve_timesteps

    lcm = make_scheduler("lcm", SD15_SCHEDULER_CONFIG)
    ref = make_scheduler("lcm", SD15_SCHEDULER_CONFIG)
    expected, _ = retrieve_timesteps(ref, 4, strength=0.55)
    assert img2img_timesteps(lcm, 4, 0.55).tolist() == expected.tolist() and len(expected) == 4
    assert img2img_timesteps(make_scheduler("ddim-trailing", SD15_SCHEDULER_CONFIG), 4, 0.55).tolist() == [499, 249]
    assert len(img2img_timesteps(make_scheduler("lcm", SD15_SCHEDULER_CONFIG), 4, 0.01)) == 1


# -- the turbo LoRA beside a preset's ----------------------------------------------------------------

def unet_out(host):
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.inference_mode():
        return host.unet(x, torch.tensor(500), encoder_hidden_states=text).sample


def test_turbo_lora_stacks_with_the_presets_lora(tiny_bundle, lora_files):
    """The turbo LoRA loads under its own adapter name and is active beside the preset's LoRA at
    the preset's scale: the UNet equals diffusers' set_adapters over both. Taking it off leaves the
    preset's; a preset change (which unloads every LoRA) followed by apply_turbo brings it back."""
    from cinefx.diffusion.adapters import apply_adapters
    from cinefx.presets import Adapter

    turbo_file, look_file = lora_files
    host = components(tiny_bundle).host
    look = (Adapter(kind="lora", path=look_file, scale=0.7),)
    apply_adapters(host, look)
    preset_only = unet_out(host)
    lora = turbo_lora("lcm", 4, str(turbo_file))
    apply_turbo(host, lora)
    stacked = unet_out(host)
    assert (stacked - preset_only).abs().mean() > 1e-3
    apply_turbo(host, lora)  # the engine calls it before every render: a no-op now
    apply_adapters(host, look)
    apply_turbo(host, lora)
    assert torch.equal(unet_out(host), stacked)
    host.set_adapters(["cinefx_0", TURBO_ADAPTER], adapter_weights=[0.7, 1.0])
    assert torch.allclose(unet_out(host), stacked, atol=1e-6)

    apply_turbo(host, None)
    assert torch.equal(unet_out(host), preset_only)
    apply_adapters(host, (Adapter(kind="lora", path=look_file, scale=0.3),))
    apply_turbo(host, lora)
    host2 = components(tiny_bundle).host
    host2.load_lora_weights(str(look_file), adapter_name="a")
    host2.load_lora_weights(str(turbo_file), adapter_name="b")
    host2.set_adapters(["a", "b"], adapter_weights=[0.3, 1.0])
    assert torch.allclose(unet_out(host), unet_out(host2), atol=1e-6)


def test_turbo_lora_is_found_like_other_weights(tiny_bundle, lora_files, tmp_path):
    turbo_file, _ = lora_files
    # offline and not cached: one line naming the one file to download
    with pytest.raises(ModelError) as err:
        turbo_lora("hyper-sd", 4)
    msg = str(err.value)
    assert "huggingface-cli download ByteDance/Hyper-SD Hyper-SD15-4steps-lora.safetensors" in msg
    assert "\n" not in msg and len(msg) < 300
    with pytest.raises(OptionError, match="2, 4, 8"):
        turbo_lora("hyper-sd", 3)
    with pytest.raises(OptionError, match="lcm, hyper-sd, tcd"):
        turbo_lora("lightning")
    folder = tmp_path / "lcm"
    folder.mkdir()
    with pytest.raises(ModelError, match="pytorch_lora_weights.safetensors"):
        turbo_lora("lcm", 4, str(folder))
    # the hub id, from the Hugging Face cache as `huggingface-cli download` leaves it
    snap = Path(os.environ["HF_HUB_CACHE"]) / "models--h1t--TCD-SD15-LoRA" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    shutil.copy(turbo_file, snap / "pytorch_lora_weights.safetensors")
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    try:
        lora = turbo_lora("tcd")
        assert lora.source.how == "cache" and lora.file == snap / "pytorch_lora_weights.safetensors" and lora.steps == 4
        host = components(tiny_bundle).host
        before = unet_out(host)
        apply_turbo(host, lora)
        assert (unet_out(host) - before).abs().mean() > 1e-3
    finally:  # the cache is the session's: later tests expect the turbo weights absent
        shutil.rmtree(snap.parents[1])


# -- the pipeline with a few-step sampler -------------------------------------------------------------

@pytest.fixture(scope="module")
def turbo_pipe(tiny_bundle, lora_files):
    comps = components(tiny_bundle)
    apply_turbo(comps.host, turbo_lora("lcm", 4, str(lora_files[0])))
    return TemporalControlPipeline.from_components(comps, "lcm")


def test_step_noise_through_the_prior_keeps_a_still_clip_still(turbo_pipe):
    """LCM re-noises at every step. With the step noise drawn through the residual or shared
    prior, two identical adjacent frames of a still clip render identically, as their initial
    noise is identical; with per-frame step noise they differ."""
    from cinefx.diffusion.noise import initial_noise

    still = np.full((3, SIZE, SIZE, 3), 120, np.uint8)
    frames, controls, _ = inputs(3, still=True)
    spread = {}
    for prior in ("residual", "shared", "independent"):
        noise, _ = initial_noise("shared", still, (4, 8, 8), torch.Generator().manual_seed(0))
        step_noise = StepNoise(prior, 7, 4).draw(still, (4, 8, 8))
        out = turbo_pipe(frames, controls, noise, prompt="epic film still", strength=1.0, steps=4, guidance=1.0,
                         temporal="none", step_noise=step_noise).images
        spread[prior] = float((out[1:] - out[:1]).abs().max()) * 255
    print("largest difference between the two still frames, levels:", {k: round(v, 1) for k, v in spread.items()})
    assert spread["residual"] == spread["shared"] == 0, spread
    assert spread["independent"] > 1, spread


@pytest.mark.parametrize("prior", ["independent", "shared"])
def test_step_noise_in_chunks_equals_at_once(prior):
    """Each step's stream carries across a scene's batches as the initial noise does (the priors
    whose noise does not depend on how a scene is cut)."""
    frames = np.zeros((6, SIZE, SIZE, 3), np.uint8)
    whole = StepNoise(prior, 5, 4).draw(frames, (4, 8, 8))
    parts = StepNoise(prior, 5, 4)
    first, second = parts.draw(frames[:3], (4, 8, 8)), parts.draw(frames[3:], (4, 8, 8))
    for i in range(3):
        assert torch.equal(whole(i), torch.cat([first(i), second(i)]))
    assert not torch.equal(whole(0), whole(1))  # a stream per step


def test_turbo_with_anchors_runs_no_unconditional_batch(turbo_pipe, monkeypatch):
    """Guidance 1 runs the conditional batch alone (half a guided step's rows); anchors ride along
    with zeros for step noise, and the few-step sampler needs its noise."""
    frames, controls, noise = inputs(3)
    anchors = Anchors(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), {"canny": torch.rand(2, 3, SIZE, SIZE)})
    rows, real = [], turbo_pipe.predict_noise
    monkeypatch.setattr(turbo_pipe, "predict_noise", lambda x, *a: rows.append(x.shape[0]) or real(x, *a))
    step_noise = StepNoise("residual", 1, 4).draw(np.zeros((3, SIZE, SIZE, 3), np.uint8), (4, 8, 8))
    out = turbo_pipe(frames, controls, noise, prompt="film", strength=0.7, steps=4, guidance=1.0, anchors=anchors,
                     step_noise=step_noise)
    assert rows == [5] * 4 and out.images.shape == (3, 3, SIZE, SIZE)
    rows.clear()
    turbo_pipe(frames, controls, noise, prompt="film", strength=0.7, steps=4, guidance=1.5, step_noise=step_noise)
    assert rows == [6] * 4
    with pytest.raises(ValueError, match="step_noise"):
        turbo_pipe(frames, controls, noise, prompt="film", steps=4, guidance=1.0)


# -- speed options ------------------------------------------------------------------------------------

def render(pipe, n=4, mode="full", **kw):
    frames, controls, noise = inputs(n)
    with torch.inference_mode():
        return pipe(frames, controls, noise, prompt="epic film still", strength=0.8, steps=3, temporal=mode,
                    **kw).images


def test_channels_last_and_fused_projections_agree_with_eager(tiny_bundle, lora_files):
    """The default speed options (channels-last layout, fused QKV) change nothing beyond float
    rounding, in each temporal mode, and the fused projections are the ones used; a LoRA loaded
    after the fusion still takes effect (the layers it wraps keep their own projections)."""
    plain_comps, comps = components(tiny_bundle), components(tiny_bundle)
    plain = TemporalControlPipeline.from_components(plain_comps, "ddim")
    apply_speed(comps, SpeedOptions())
    fast = TemporalControlPipeline.from_components(comps, "ddim")
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    used = []
    qkv = fast.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_qkv
    qkv.register_forward_hook(lambda *a: used.append(1))
    for mode in ("full", "anchor", "none"):
        assert torch.allclose(render(plain, mode=mode), render(fast, mode=mode), atol=1e-5), mode
    assert used
    before = render(fast)
    for c in (plain_comps, comps):
        apply_turbo(c.host, turbo_lora("lcm", 4, str(lora_files[0])))
    after = render(fast)
    assert (after - before).abs().mean() > 1e-3 and torch.allclose(render(plain), after, atol=1e-5)
    with pytest.raises(ValueError, match="already runs with"):
        apply_speed(comps, SpeedOptions(compile=True))


def test_anchor_attention_needs_no_mask_and_equals_attention_over_its_frames(monkeypatch):
    """Anchor mode's attention (frame i over frames 0, i-1, i, each once) equals per-frame
    attention over exactly those frames' keys, computed here one frame at a time, and passes no
    mask to SDPA: a masked call cannot use flash attention."""
    import torch.nn.functional as F
    from diffusers.models.attention_processor import Attention

    from cinefx.diffusion.attention import SpatialTemporalAttnProcessor, TemporalState

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    frames, n = 5, 6
    x = torch.randn(2 * frames, n, 16)  # two groups (guidance) of 5 frames
    masks, real = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    out = SpatialTemporalAttnProcessor(TemporalState("anchor", frames))(attn, x)
    assert masks and all(m is None for m in masks)
    monkeypatch.setattr(F, "scaled_dot_product_attention", real)
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    for g in range(2):
        for i in range(frames):
            seen = sorted({0, max(i - 1, 0), i})
            rows = [g * frames + j for j in seen]
            qh = q[g * frames + i].view(n, 2, 8).transpose(0, 1)
            kh, vh = (t[rows].reshape(-1, 2, 8).transpose(0, 1) for t in (k, v))
            ref = torch.softmax(qh @ kh.transpose(1, 2) / 8 ** 0.5, -1) @ vh
            ref = attn.to_out[0](ref.transpose(0, 1).reshape(n, 16))
            assert torch.allclose(out[g * frames + i], ref, atol=1e-5), (g, i)


def test_compiled_pipeline_traces_once_and_agrees(tiny_bundle):
    """With compile on, the UNet, ControlNet and VAE decoder run compiled (backend "eager": the
    tracing without inductor's minutes of CPU code generation) and give the eager result; a
    scene's batches with and without anchors (other batch sizes) reuse the graphs."""
    from torch._dynamo.utils import counters

    plain = TemporalControlPipeline.from_components(components(tiny_bundle), "ddim")
    comps = components(tiny_bundle)
    apply_speed(comps, SpeedOptions(compile=True, compile_backend="eager"))
    fast = TemporalControlPipeline.from_components(comps, "ddim")
    assert all(m._compiled_call_impl is not None for m in (fast.unet, *fast.controlnets.values(), fast.vae.decoder))
    assert torch.allclose(render(plain), render(fast), atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    for a in (2, 1):
        anchors = Anchors(torch.randn(a, 4, 8, 8), torch.randn(a, 4, 8, 8), {"canny": torch.rand(a, 3, SIZE, SIZE)})
        assert torch.allclose(render(plain, anchors=anchors), render(fast, anchors=anchors), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("turbo", [False, True])
def test_bf16_within_two_levels_of_fp32(tiny_bundle, lora_files, turbo):
    """bf16 (what a GPU gets by default) renders within 2 levels of 255 (mean) of fp32, for a
    guided 20-step render and a turbo one."""
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        comps = components(tiny_bundle, dtype)
        apply_speed(comps, SpeedOptions())
        if turbo:
            apply_turbo(comps.host, turbo_lora("lcm", 4, str(lora_files[0])))
        pipe = TemporalControlPipeline.from_components(comps, "lcm" if turbo else "dpm++")
        frames, controls, noise = inputs(4)
        kw = dict(steps=4, guidance=1.0, step_noise=StepNoise("residual", 0, 4).draw(
            np.zeros((4, SIZE, SIZE, 3), np.uint8), (4, 8, 8))) if turbo else dict(steps=20, guidance=7.5)
        outs.append(pipe(frames, controls, noise, prompt="epic film still", strength=0.8, **kw).images * 255)
    diff = float((outs[0] - outs[1]).abs().mean())
    print(f"bf16 vs fp32, {'turbo' if turbo else 'quality'}: {diff:.2f} levels")
    assert diff < 2
