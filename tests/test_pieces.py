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
