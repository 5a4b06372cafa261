"""A long take renders as pieces (`DiffusionConfig.part`): piece k depends only on the scene's
first batch (`scene_state`) and the frame before it, so a piece rendered elsewhere — a cluster's
worker, a resumed run — is byte-identical to the one-machine run's."""

import numpy as np
import pytest

from cinefx.diffusion.models import ModelSpec
from cinefx.engines import build_diffusion_engine
from cinefx.presets import load_preset, override
from cinefx.renderers import EngineSettings, part_frames
from cinefx.testing.clips import Move, render_move

RUN = 48  # runs (and so pieces) are whole multiples of this for a chunk of 4


@pytest.fixture(scope="module")
def take():
    """100 frames of one take, a push-in and pan over a real photograph (no cut), 96x64."""
    return np.stack(list(render_move(Move("astronaut", 100, (0.45, 0.4, 0.9), (0.55, 0.5, 0.6)), (96, 64))))


def engine(bundle, **diffusion):
    cfg = dict(chunk=4, steps=2, strength=0.8, part=RUN, noise_prior="residual", **diffusion)
    return build_diffusion_engine(override(load_preset("epic"), "diffusion", **cfg), ModelSpec(base=str(bundle)),
                                  EngineSettings(seed=5))


def test_part_is_rounded_up_to_whole_runs():
    assert part_frames(48, 4) == 48 and part_frames(49, 4) == 96 and part_frames(0, 4) == 0
    assert part_frames(100, 50) == 100 and part_frames(120, 7) == 126  # runs of 7·6 = 42


@pytest.mark.parametrize("temporal", ["full", "none"])
def test_pieces_rendered_apart_equal_the_one_machine_run(tiny_bundle, take, temporal):
    one = engine(tiny_bundle, temporal=temporal)
    whole = np.concatenate([one.render(take[i:i + RUN], 3) for i in range(0, len(take), RUN)])
    state = one.scene_state().to_bytes()  # fixed by the scene's first batch
    for at in (48, 96):  # pieces 1 and 2 (the last one 4 frames)
        apart = engine(tiny_bundle, temporal=temporal)
        apart.prime(3, at, state, take[at - 1])
        assert np.array_equal(apart.render(take[at:at + RUN], 3), whole[at:at + RUN]), at
    # one call across both boundaries is cut into the same pieces
    assert np.array_equal(engine(tiny_bundle, temporal=temporal).render(take, 3), whole)


def test_a_piece_depends_on_its_lead_in_and_the_scenes_first_batch(tiny_bundle, take):
    one = engine(tiny_bundle)
    whole = np.concatenate([one.render(take[i:i + RUN], 0) for i in range(0, len(take), RUN)])
    state = one.scene_state().to_bytes()

    def piece1(lead, state):
        e = engine(tiny_bundle)
        e.prime(0, 48, state, lead)
        return e.render(take[48:96], 0)

    assert np.array_equal(piece1(take[47], state), whole[48:96])
    # another lead-in frame changes the piece: the previous batch's anchor is that frame's render
    assert np.abs(piece1(take[10], state).astype(int) - whole[48:96]).mean() > 0.5
    # so does another scene's first batch
    other = engine(tiny_bundle)
    other.render(take[60:64], 0)
    assert np.abs(piece1(take[47], other.scene_state().to_bytes()).astype(int) - whole[48:96]).mean() > 0.5


def test_a_long_take_resumes_piece_by_piece_to_the_same_bytes(tiny_bundle, tmp_path, monkeypatch):
    """Killed in the third piece, the re-run reads the first two back and renders the third from the
    kept scene state and the frame before it: the file is the uninterrupted run's."""
    import hashlib

    from cinefx.diffusion import engine as E
    from cinefx.stylize import StylizeOptions, stylize_file
    from cinefx.testing.clips import write_clip

    src = write_clip(tmp_path / "take.mp4", render_move(Move("astronaut", 110, (0.45, 0.4, 0.9), (0.55, 0.5, 0.6)),
                                                        (96, 64)), fps=24, audio="aac")
    preset = override(load_preset("epic"), "diffusion", chunk=4, steps=2, strength=0.8, part=RUN)
    opts = StylizeOptions(engine="diffusion", models=ModelSpec(base=str(tiny_bundle)), metrics=False)
    whole = stylize_file(src, tmp_path / "whole.mp4", preset, opts)
    assert len(whole.scenes) == 1 and whole.frames == 110

    real, calls = E.DiffusionEngine.render, []

    def killed_in_piece_3(self, frames, scene):
        if self._at >= 2 * RUN:
            raise KeyboardInterrupt
        calls.append(self._at)
        return real(self, frames, scene)

    monkeypatch.setattr(E.DiffusionEngine, "render", killed_in_piece_3)
    with pytest.raises(KeyboardInterrupt):
        stylize_file(src, tmp_path / "resumed.mp4", preset, opts)
    work = tmp_path / ".resumed.mp4.cinefx-work"
    assert sorted(p.name for p in work.glob("scene-*")) == ["scene-00000.mkv", "scene-00000.p001.mkv",
                                                            "scene-00000.state.pt"]
    monkeypatch.setattr(E.DiffusionEngine, "render", lambda self, frames, scene: (calls.append(self._at),
                                                                                 real(self, frames, scene))[1])
    calls.clear()
    res = stylize_file(src, tmp_path / "resumed.mp4", preset, opts)
    assert calls == [2 * RUN]  # only the third piece, primed from what was kept
    assert any("resumed: 2 finished pieces of 1 scene(s)" in n for n in res.notes), res.notes
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "whole.mp4", tmp_path / "resumed.mp4")]
    assert digest[0] == digest[1]


def test_a_later_piece_seeks_to_the_keyframe_before_its_lead_in(tiny_bundle, tmp_path, monkeypatch):
    """A worker given the pts of the frame before its piece decodes from the keyframe before that
    frame, not from the file's start, and renders the same frames."""
    import av

    from cinefx.engines import build_renderer
    from cinefx.scenes import Scene
    from cinefx.stylize import SceneTask, StylizeOptions, resolve_options, run_scene_task
    from cinefx.testing.clips import write_clip
    from cinefx.video.probe import probe
    from cinefx.video.reader import read_frames

    src = write_clip(tmp_path / "take.mp4", render_move(Move("coffee", 110, (0.45, 0.4, 0.9), (0.55, 0.5, 0.6)),
                                                        (96, 64)), fps=24, audio=None, options={"g": "12"})
    preset = override(load_preset("epic"), "diffusion", chunk=4, steps=1, part=RUN)
    opts, _ = resolve_options(preset, StylizeOptions(engine="diffusion", models=ModelSpec(base=str(tiny_bundle)),
                                                     metrics=False))
    info = probe(src)
    pts = [f.pts for f in read_frames(info)]
    scene = Scene(0, 0, 110, "start")

    def renderer():
        return build_renderer("diffusion", preset, info.display_size, opts.seed, opts.models, opts.diffusion)

    first = renderer()
    list(run_scene_task(SceneTask(src, scene, preset, opts), first))
    state = first.scene_state()
    real, decoded = av.packet.Packet.decode, []
    monkeypatch.setattr(av.packet.Packet, "decode", lambda p: decoded.append(p.pts) or real(p))
    plain = np.concatenate(list(run_scene_task(SceneTask(src, scene, preset, opts, part=2), renderer(), state)))
    from_start = len(decoded)
    decoded.clear()
    sought = np.concatenate(list(run_scene_task(SceneTask(src, scene, preset, opts, part=2, pts=pts[95]),
                                                renderer(), state)))
    assert plain.shape == (14, 64, 96, 3) and np.array_equal(sought, plain)
    # keyframes every 12 frames: the piece's lead-in is frame 95, so decoding starts at frame 84 (the
    # probe looks at the first few frames either way)
    skipped = [p for p in decoded if p is not None and pts[8] < p < pts[84]]
    assert from_start >= 110 and not skipped and pts[84] in decoded
