"""cinefx against references outside it: diffusers' own img2img step count, SD1.5's published
scheduler config, and the package docstring's example."""

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cinefx.diffusion.models import ModelSpec
from cinefx.engines import EngineSettings, build_diffusion_engine
from cinefx.presets import load_preset, override
from cinefx.testing.clips import Move, render_move, write_clip

# stable-diffusion-v1-5's scheduler/scheduler_config.json, copied key for key from the hub.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False}
FAMILIES = {"dpm++": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
            "unipc": "UniPCMultistepScheduler"}


@pytest.fixture(scope="module")
def frames():
    return np.stack(list(render_move(Move("astronaut", 2), (64, 64))))


def _timesteps_run(bundle, frames, scheduler, steps, strength, monkeypatch):
    """The timesteps the UNet is evaluated at when cinefx renders `frames` (guidance off: one
    evaluation per step)."""
    from cinefx.diffusion.pipeline import TemporalControlPipeline

    seen = []
    real = TemporalControlPipeline.predict_noise

    def spy(self, x, t, *args):
        seen.append(float(t))
        return real(self, x, t, *args)

    preset = override(load_preset("epic"), "diffusion", steps=steps, strength=strength, guidance=1.0,
                      controls={"canny": 0.8})
    engine = build_diffusion_engine(preset, ModelSpec(base=str(bundle)), EngineSettings(scheduler=scheduler))
    with monkeypatch.context() as m:
        m.setattr(TemporalControlPipeline, "predict_noise", spy)
        engine.render(frames, 0)
    return seen


@pytest.mark.parametrize("scheduler", list(FAMILIES))
def test_img2img_runs_the_steps_diffusers_runs(tiny_bundle, frames, scheduler, monkeypatch):
    """Strength keeps ⌊steps·strength⌋ steps in diffusers' img2img pipelines; products with a
    fraction ≥ .5 (10 × 0.55 = 5.5) used to round up, one step more than diffusers."""
    import diffusers
    from diffusers import StableDiffusionControlNetImg2ImgPipeline as Reference

    cls = getattr(diffusers, FAMILIES[scheduler])
    for steps, strength in ((10, 0.55), (7, 0.5), (9, 0.75), (25, 0.3)):
        ref = cls.from_pretrained(tiny_bundle, subfolder="scheduler")
        ref.set_timesteps(steps)
        expected, count = Reference.get_timesteps(SimpleNamespace(scheduler=ref), steps, strength, "cpu")
        assert count == int(steps * strength)
        assert _timesteps_run(tiny_bundle, frames, scheduler, steps, strength, monkeypatch) == \
            expected.float().tolist(), (steps, strength)
    # where diffusers would run no step at all, cinefx runs the last one: strength > 0 changes the frame
    ref = cls.from_pretrained(tiny_bundle, subfolder="scheduler")
    ref.set_timesteps(4)
    assert Reference.get_timesteps(SimpleNamespace(scheduler=ref), 4, 0.2, "cpu")[1] == 0
    assert _timesteps_run(tiny_bundle, frames, scheduler, 4, 0.2, monkeypatch) == ref.timesteps[-1:].float().tolist()


def test_ddim_matches_diffusers_on_the_sd15_config(tiny_bundle):
    """The tiny bundle's scheduler config is SD1.5's, and DDIM built through cinefx from it equals
    diffusers' DDIM from the published file: no clipping of the predicted latents (SD1.5 sets
    clip_sample false; DDIM's own default is true), final alpha not set to one."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from cinefx.diffusion.pipeline import make_scheduler

    assert json.loads((tiny_bundle / "scheduler" / "scheduler_config.json").read_text()) == SD15_SCHEDULER
    engine = build_diffusion_engine(load_preset("epic"), ModelSpec(base=str(tiny_bundle)),
                                    EngineSettings(scheduler="ddim"))
    ours = make_scheduler("ddim", engine.pipe.scheduler_config)
    ref = DDIMScheduler.from_config(SD15_SCHEDULER)
    public = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert {k: ours.config[k] for k in public} == public
    assert ours.config.clip_sample is False and ours.config.set_alpha_to_one is False
    for s in (ours, ref):
        s.set_timesteps(10)
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.final_alpha_cumprod == ref.final_alpha_cumprod
    # a config that leaves the keys out (another family's, a single-file checkpoint's) does not turn clipping on
    bare = dict(DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config)
    assert "clip_sample" not in bare
    ddim = make_scheduler("ddim", bare)
    assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False


def test_package_docstring_example_runs(tmp_path, monkeypatch):
    """`import cinefx` stays light, and the example the package docstring shows runs as written."""
    import cinefx

    code = subprocess.run([sys.executable, "-c", "import cinefx, sys; print(sorted(m for m in sys.modules "
                           "if m.startswith(('cinefx.', 'torch', 'av', 'numpy'))))"],
                          capture_output=True, text=True, check=True)
    assert code.stdout.strip() == "[]", code.stdout
    example = "\n".join(line[4:] for line in re.search(r"::\n\n((?:    .*\n)+)", cinefx.__doc__).group(1).splitlines())
    assert "load_preset(" in example
    write_clip(tmp_path / "in.mp4", render_move(Move("coffee", 12), (96, 64)), fps=24, audio=None)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(example, ns)
    assert ns["result"].frames == 12 and (tmp_path / "out.mp4").stat().st_size > 1000
