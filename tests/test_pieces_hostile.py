"""A long take's pieces (`DiffusionConfig.part`) against what users do to them: a still take (no
seam where pieces meet, for every noise prior and for turbo), strength 0 (nothing to prime from),
damaged work folders, an engine reused across pieces. The reference is always the one-machine run."""

import hashlib

import numpy as np
import pytest

from cinefx.diffusion.models import ModelSpec
from cinefx.engines import build_diffusion_engine
from cinefx.presets import load_preset, override
from cinefx.renderers import EngineSettings
from cinefx.testing.clips import Move, render_move, write_clip

PART = 48  # pieces (and runs) of 48 frames for a chunk of 4


@pytest.fixture(scope="module")
def still():
    """A locked-off shot: one photograph held for 52 frames (a piece of 48, then 4), 96x64."""
    frame = next(iter(render_move(Move("astronaut", 1, (0.5, 0.5, 0.8), (0.5, 0.5, 0.8)), (96, 64))))
    return np.repeat(frame[None], PART + 4, axis=0)


@pytest.fixture(scope="module")
def lora(tiny_bundle, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from cinefx.testing.tiny import write_turbo_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_bundle / "unet")
    return write_turbo_lora(unet, tmp_path_factory.mktemp("turbo") / "lcm.safetensors")


def engine(bundle, lora=None, **diffusion):
    cfg = dict(chunk=4, steps=1, strength=0.8, part=PART, noise_prior="residual") | diffusion
    if lora:
        cfg.update(turbo="lcm", turbo_steps=2)  # one step noise besides the initial noise
    return build_diffusion_engine(override(load_preset("epic"), "diffusion", **cfg), ModelSpec(base=str(bundle)),
                                  EngineSettings(seed=5, turbo_lora=str(lora) if lora else None))


def in_runs(e, frames, scene=0):
    return np.concatenate([e.render(frames[i:i + PART], scene) for i in range(0, len(frames), PART)])


@pytest.mark.parametrize("prior, temporal, turbo", [("residual", "none", False), ("shared", "none", False),
                                                     ("flow", "none", False), ("residual", "none", True),
                                                     ("residual", "full", False)])
def test_a_still_take_has_no_seam_where_pieces_meet(tiny_bundle, lora, still, prior, temporal, turbo):
    """Frames of a still take share their noise within a piece (the prior's point, and turbo's step
    noise is drawn through it), so they come out alike. The next piece's noise went on from fresh
    noise, so the picture jumped every `part` frames: 42.7 levels of 255 on average from frame 47 to
    48 with each of these priors (38.6 with turbo; 42.8 with full attention, against at most 0.8
    between frames of one piece). Rendered apart, the piece is still the one-machine run's."""
    kw = dict(noise_prior=prior, temporal=temporal, lora=lora if turbo else None)
    one = engine(tiny_bundle, **kw)
    out = in_runs(one, still)
    step = np.abs(np.diff(out.astype(int), axis=0)).mean((1, 2, 3))
    within = np.delete(step, PART - 1).max()
    # (the flow prior's split of the first noise sums back to it but for float rounding)
    assert within < 1 and step[PART - 1] <= max(within, 0.01), (step[PART - 1], within)
    apart = engine(tiny_bundle, **kw)
    apart.prime(0, PART, one.scene_state().to_bytes(), still[PART - 1])
    assert np.array_equal(apart.render(still[PART:], 0), out[PART:])


def test_the_scene_state_holds_its_first_frame_not_its_first_batch(tiny_bundle, still):
    """The state keeps the first frame's tensors; saving views of them kept the whole first batch's
    storage (4x the bytes here with a chunk of 4; 8x at the default chunk)."""
    e = engine(tiny_bundle)
    e.render(still[:4], 0)
    state = e.scene_state()
    tensors = [state.first.latents, state.first.noise, *state.first.controls.values()]
    assert len(state.to_bytes()) < 1.5 * sum(t.numel() * t.element_size() for t in tensors) + 8192


def test_an_engine_reused_across_pieces_renders_each_as_if_alone(tiny_bundle):
    """A cluster's worker keeps one engine: a later piece twice, then the scene's first piece
    (prime at frame 0 starts afresh), each as the one-machine run rendered it."""
    take = np.stack(list(render_move(Move("coffee", PART + 8, (0.45, 0.4, 0.9), (0.55, 0.5, 0.6)), (96, 64))))
    one = engine(tiny_bundle)
    whole = in_runs(one, take, 3)
    state = one.scene_state().to_bytes()
    for _ in range(2):
        one.prime(3, PART, state, take[PART - 1])
        assert np.array_equal(one.render(take[PART:], 3), whole[PART:])
    one.prime(3, 0, None, None)
    assert np.array_equal(one.render(take[:PART], 3), whole[:PART])
    assert one.scene_state().to_bytes() == state


def test_strength_0_long_take_renders_apart_resumes_and_runs_on_a_worker(tiny_bundle, tmp_path, monkeypatch):
    """At strength 0 frames pass as they are and no scene state is made. A later piece primed
    without one raised EOFError (the engine read None as a state's bytes), so a resumed long take
    failed, and a cluster's worker failed writing None as the first piece's state file (TypeError)."""
    from cinefx.cluster import SceneWorker
    from cinefx.diffusion import engine as E
    from cinefx.scenes import Scene
    from cinefx.stylize import SceneTask, StylizeOptions, resolve_options, stylize_file

    src = write_clip(tmp_path / "take.mp4", render_move(Move("astronaut", 110, (0.45, 0.4, 0.9), (0.55, 0.5, 0.6)),
                                                        (96, 64)), fps=24, audio=None)
    preset = override(load_preset("epic"), "diffusion", chunk=4, strength=0.0, part=PART)
    opts = StylizeOptions(engine="diffusion", models=ModelSpec(base=str(tiny_bundle)), metrics=False)
    stylize_file(src, tmp_path / "whole.mp4", preset, opts)

    real = E.DiffusionEngine.render

    def killed_in_piece_3(self, frames, scene):
        if self._at >= 2 * PART:
            raise KeyboardInterrupt
        return real(self, frames, scene)

    monkeypatch.setattr(E.DiffusionEngine, "render", killed_in_piece_3)
    with pytest.raises(KeyboardInterrupt):
        stylize_file(src, tmp_path / "resumed.mp4", preset, opts)
    monkeypatch.setattr(E.DiffusionEngine, "render", real)
    res = stylize_file(src, tmp_path / "resumed.mp4", preset, opts)
    assert any("resumed: 2" in n for n in res.notes)
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("whole.mp4", "resumed.mp4")]
    assert digest[0] == digest[1]

    # a cluster's worker: the first piece, then the second from what the first left
    resolved, _ = resolve_options(preset, opts)
    folder = tmp_path / "work"
    folder.mkdir()
    worker = SceneWorker()
    for part in (0, 1, 2):
        done, _ = worker.render(SceneTask(src, Scene(0, 0, 110, "start"), preset, resolved, "diffusion", part),
                                str(folder), "key")
        assert done.frames == [PART, PART, 14][part]
    assert sorted(p.name for p in folder.iterdir()) == ["scene-00000.mkv", "scene-00000.p001.mkv",
                                                        "scene-00000.p002.mkv"]


class _Counting:
    """A stand-in renderer with what a piece needs: frames + 1, primed from a state it made."""

    name, run_length, part = "diffusion", PART, PART

    def __init__(self, log):
        self.log = log

    def prime(self, scene, at, state, lead):
        self.log.append(("prime", at, state, int(lead[0, 0, 0])))

    def render(self, frames, scene, start):
        self.log.append(("render", start))
        return np.stack(frames) + 1

    def scene_state(self):
        return b"state of the first batch"

    def close(self):
        pass


@pytest.mark.parametrize("damage", ["flipped", "missing", "empty"])
def test_a_damaged_state_renders_the_first_piece_again(tmp_path, damage):
    """A guard (passes before and after): the state file fails its check like the piece it goes
    with, so the first piece is rendered again (making the state again) and a later one is primed
    from that, never from the damaged file, nor crashes."""
    from cinefx.resume import ResumingRenderer, WorkFolder

    frames = [np.full((8, 8, 3), i % 250, np.uint8) for i in range(3 * PART)]

    def run(stop=None):
        log = []
        work = WorkFolder(tmp_path / "out.mp4", "key")
        work.open()
        r = ResumingRenderer(lambda: _Counting(log), work, "diffusion", PART, PART)
        for at in range(0, len(frames), PART):
            if at == stop:  # killed in the third piece: the first two are kept
                work.begin(0, 2)
                work.abandon()
                return work, log
            r.render(frames[at:at + PART], 0, at)
        work.finish()
        return work, log

    work, _ = run(stop=2 * PART)
    state = work.path / "scene-00000.state.pt"
    if damage == "flipped":
        data = bytearray(state.read_bytes())
        data[3] ^= 1
        state.write_bytes(bytes(data))
    elif damage == "missing":
        state.unlink()
    else:
        state.write_bytes(b"")
    work, log = run()
    assert log == [("render", 0), ("prime", 2 * PART, b"state of the first batch", 2 * PART - 1),
                   ("render", 2 * PART)]
    assert work.damaged == ["0"] and work.reused == ["0.1"]
