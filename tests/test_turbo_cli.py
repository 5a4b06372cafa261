"""Turbo and compile as users get them: `cinefx stylize --turbo/--turbo-steps/--turbo-lora/--compile`,
the preset's `turbo`, `cinefx models`, the engine, the resume key. Tiny bundle, tiny turbo LoRA
(`cinefx.testing.tiny.write_turbo_lora`); the pipeline-level mechanics are tests/test_turbo.py's."""

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.diffusion.models import ModelSpec
from cinefx.engines import EngineChoice, EngineSettings, ModelCache, build_diffusion_engine
from cinefx.errors import PresetError
from cinefx.presets import load_preset, override
from cinefx.testing.clips import Move, cut, render_move, write_clip
from cinefx.testing.tiny import write_turbo_lora

runner = CliRunner()


@pytest.fixture(scope="module")
def turbo_file(tiny_bundle, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_bundle / "unet")
    return write_turbo_lora(unet, tmp_path_factory.mktemp("turbo") / "lcm.safetensors")


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory):
    """Two 4-frame shots at 96x64 with AAC audio."""
    shots = cut(Move("astronaut", 4, (0.45, 0.4, 0.9), (0.55, 0.45, 0.7)),
                Move("coffee", 4, (0.4, 0.5, 1.0), (0.6, 0.5, 0.8)), size=(96, 64))
    return write_clip(tmp_path_factory.mktemp("clip") / "short.mp4", shots, fps=24, audio="aac")


def preset(**diffusion):
    return override(load_preset("epic"), "diffusion", chunk=4, **diffusion)


def decoded(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_cli_turbo_renders_with_audio_and_differs_from_plain(tiny_bundle, turbo_file, short_clip, tmp_path):
    common = ["stylize", str(short_clip), "--engine", "diffusion", "--model", str(tiny_bundle), "--no-metrics",
              "--chunk", "4"]
    r = runner.invoke(app, [*common, "-o", str(tmp_path / "t.mp4"), "--turbo", "lcm", "--turbo-lora", str(turbo_file)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*common, "-o", str(tmp_path / "p.mp4"), "--steps", "4"])
    assert r.exit_code == 0, r.output
    with av.open(str(short_clip)) as a, av.open(str(tmp_path / "t.mp4")) as b:
        assert [bytes(p) for p in a.demux(audio=0) if p.size] == [bytes(p) for p in b.demux(audio=0) if p.size]
    turbo, plain = decoded(tmp_path / "t.mp4"), decoded(tmp_path / "p.mp4")
    assert turbo.shape == plain.shape == (8, 64, 96, 3)
    assert np.abs(turbo.astype(int) - plain.astype(int)).mean() > 1.0


def test_turbo_keeps_a_still_clip_still(tiny_bundle, turbo_file):
    """Identical frames under LCM with the residual prior render identically: its per-step noise
    is drawn through the prior, as the initial noise is."""
    frame = next(iter(render_move(Move("astronaut", 1, (0.5, 0.45, 0.9), (0.5, 0.45, 0.9)), (96, 64))))
    frames = np.stack([frame] * 3)
    e = build_diffusion_engine(preset(turbo="lcm", noise_prior="residual"), ModelSpec(base=str(tiny_bundle)),
                               EngineSettings(turbo_lora=str(turbo_file)), cache=ModelCache())
    assert e.pipe.scheduler_name == "lcm" and e.steps == 4 and e.guidance <= 1.0
    out = e.render(frames, 0)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])


def test_turbo_and_plain_engines_alternate_on_one_model_set(tiny_bundle, turbo_file):
    """A plain engine and a turbo one share the loaded models (the turbo one built last, so its
    LoRA is on), rendered P, T, P: each renders as a fresh engine of its own (the turbo LoRA comes
    off for P and back on for T)."""
    frames = np.stack(list(render_move(Move("coffee", 3, (0.5, 0.5, 0.9), (0.52, 0.5, 0.85)), (96, 64))))
    spec, cache = ModelSpec(base=str(tiny_bundle)), ModelCache()
    looks = [(preset(steps=2), EngineSettings()), (preset(turbo="lcm"), EngineSettings(turbo_lora=str(turbo_file)))]
    p, t = (build_diffusion_engine(look, spec, settings, cache=cache) for look, settings in looks)
    assert t.pipe.unet is p.pipe.unet
    p1 = p.render(frames, 0)
    t1 = t.render(frames, 0)
    p.start_scene(0)
    p2 = p.render(frames, 0)
    fresh_p, fresh_t = (build_diffusion_engine(look, spec, settings, cache=ModelCache()).render(frames, 0)
                        for look, settings in looks)
    assert np.array_equal(p1, fresh_p) and np.array_equal(p2, fresh_p)
    assert np.array_equal(t1, fresh_t) and not np.array_equal(t1, p1)


def test_turbo_without_weights_offline_names_the_download(tiny_bundle, short_clip, tmp_path):
    r = runner.invoke(app, ["stylize", str(short_clip), "--engine", "diffusion", "--model", str(tiny_bundle),
                            "-o", str(tmp_path / "o.mp4"), "--turbo", "lcm"])
    assert r.exit_code == 1, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert "latent-consistency/lcm-lora-sdv1-5" in r.output and "download" in r.output
    assert not (tmp_path / "o.mp4").exists()


def test_turbo_steps_the_kind_does_not_run_at_is_one_line(tiny_bundle, short_clip, tmp_path):
    r = runner.invoke(app, ["stylize", str(short_clip), "--engine", "diffusion", "--model", str(tiny_bundle),
                            "-o", str(tmp_path / "o.mp4"), "--turbo", "hyper-sd", "--turbo-steps", "3"])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1, r.output
    assert "hyper-sd" in r.output and "2, 4, 8" in r.output


def test_preset_file_turbo_is_checked(tmp_path):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('name = "good"\n[diffusion]\nturbo = "lcm"\nturbo_steps = 6\n')
    bad.write_text('name = "bad"\n[diffusion]\nturbo = "x"\n')
    cfg = load_preset(str(good)).diffusion
    assert (cfg.turbo, cfg.turbo_steps) == ("lcm", 6)
    with pytest.raises(PresetError, match="turbo"):
        load_preset(str(bad))


def test_resume_key_follows_turbo_and_compile(turbo_file, short_clip, tmp_path):
    """The work folder's key changes with turbo on/off, its steps, the LoRA file's contents, and
    --compile: finished scenes of one never pass for the other's."""
    import shutil

    from cinefx.stylize import StylizeOptions, work_folder
    from cinefx.video.probe import probe

    lora = tmp_path / "lcm.safetensors"
    shutil.copy(turbo_file, lora)
    info = probe(short_clip)

    def key(look, **settings):
        options = StylizeOptions(diffusion=EngineSettings(**settings))
        work = work_folder(short_clip, tmp_path / "o.mp4", info, look, options, EngineChoice("diffusion", ""), [],
                           ("rec709", "rec709"))
        shutil.rmtree(work.path)
        return work.key

    plain, turbo = key(preset()), key(preset(turbo="lcm"), turbo_lora=str(lora))
    keys = {plain, turbo, key(preset(), compile=True), key(preset(turbo="lcm", turbo_steps=6), turbo_lora=str(lora))}
    assert len(keys) == 4
    assert key(preset(turbo="lcm"), turbo_lora=str(lora)) == turbo  # stable
    lora.write_bytes(lora.read_bytes() + b"\0")
    assert key(preset(turbo="lcm"), turbo_lora=str(lora)) != turbo


def test_models_lists_turbo_weights(turbo_file, tiny_bundle):
    r = runner.invoke(app, ["models", "--model", str(tiny_bundle)])
    assert r.exit_code == 0, r.output  # turbo weights are optional unless asked for
    for kind in ("lcm", "hyper-sd", "tcd"):
        assert f"turbo-lora {kind}" in r.output
    r = runner.invoke(app, ["models", "--model", str(tiny_bundle), "--turbo", "lcm", "--turbo-lora", str(turbo_file)])
    assert r.exit_code == 0 and "local file" in r.output, r.output
    r = runner.invoke(app, ["models", "--model", str(tiny_bundle), "--turbo", "tcd"])
    assert r.exit_code == 1, r.output


def test_turbo_choices_agree_and_config_table(tiny_bundle, turbo_file, tmp_path, monkeypatch):
    """The preset's, the CLI's and the config file's turbo kinds are the library's; the config
    file's [models.turbo_lora] entry is where --turbo finds its LoRA without --turbo-lora."""
    from cinefx import cli
    from cinefx.config import model_defaults
    from cinefx.diffusion.turbo import TURBO_KINDS
    from cinefx.engines import turbo_for
    from cinefx.errors import ConfigError
    from cinefx.presets import TURBO_MODES

    assert TURBO_MODES == ("", *TURBO_KINDS) and cli.TURBO == tuple(TURBO_KINDS)
    config = tmp_path / "config.toml"
    monkeypatch.setenv("CINEFX_CONFIG", str(config))
    config.write_text(f'[models.turbo_lora]\nlcm = "{turbo_file}"\n')
    assert model_defaults().turbo_lora == (("lcm", str(turbo_file)),)
    assert turbo_for(preset(turbo="lcm"), EngineSettings()).file == turbo_file
    config.write_text('[models.turbo_lora]\nsdxl = "x"\n')
    with pytest.raises(ConfigError, match="turbo_lora.sdxl"):
        model_defaults()
