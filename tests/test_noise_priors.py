"""The noise priors against known motion and against Control-A-Video's own residual algorithm.

Clips are real photographs moved by a known amount, so the noise's motion is checked against the
content's, not against our own flow.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cinefx.diffusion.noise import initial_noise
from cinefx.testing.clips import photo

SCALE = 8  # image pixels per latent pixel, as SD's VAE


def pan(speed: float, n: int, size: int = 256, name: str = "coffee") -> np.ndarray:
    """(n, size, size, 3) uint8: the photo slides right by `speed` latent pixels a frame."""
    img = photo(name)
    step = speed * SCALE
    x0 = (img.shape[1] - size) / 2 + step * n / 2
    y0 = (img.shape[0] - size) / 2
    return np.stack([cv2.warpAffine(img, np.float32([[1, 0, -x0 + i * step], [0, 1, -y0]]), (size, size),
                                    flags=cv2.INTER_LINEAR) for i in range(n)])


def zoom(n: int, rate: float, size: int = 256, name: str = "astronaut") -> np.ndarray:
    """(n, size, size, 3) uint8: the camera pushes in on the photo's centre (rate > 1: magnification
    a frame) or pulls back (rate < 1; black outside the photo)."""
    img = photo(name)
    base = size / min(img.shape[:2])
    cx, cy = img.shape[1] / 2, img.shape[0] / 2
    out = []
    for i in range(n):
        s = base * rate ** i
        m = np.float32([[s, 0, size / 2 - s * cx], [0, s, size / 2 - s * cy]])
        out.append(cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR))
    return np.stack(out)


def latent_shape(frames: np.ndarray) -> tuple[int, int, int]:
    return (4, frames.shape[1] // SCALE, frames.shape[2] // SCALE)


def noise_shift(a: torch.Tensor, b: torch.Tensor, largest: int) -> float:
    """Horizontal shift (latent pixels, sub-pixel) that carries noise `a` (C, h, w) onto `b`.

    A value shifted by s + f (0 ≤ f < 1) is the normalised sum of sub-pixels from the pixels s and
    s + 1 behind it, so its correlation with them is 1 - f and f: the centroid of the correlation
    around its peak is the shift, fraction included.
    """
    w = a.shape[-1]
    margin = 2
    shifts = np.arange(-2, largest + 3)
    corr = []
    for s in shifts:
        lo, hi = max(margin, margin - s), min(w - margin, w - margin - s)
        corr.append(float((a[..., margin:-margin, lo:hi] * b[..., margin:-margin, lo + s:hi + s]).mean()))
    corr = np.clip(np.array(corr), 0, None)
    k = int(corr.argmax())
    near = slice(max(0, k - 1), k + 2)
    return float((shifts[near] * corr[near]).sum() / corr[near].sum())


def neighbour_correlation(z: torch.Tensor) -> float:
    """Largest correlation of horizontally or vertically adjacent values of noise (C, h, w)."""
    z = (z - z.mean()) / z.std()
    return max(float((z[:, :, 1:] * z[:, :, :-1]).mean()), float((z[:, 1:] * z[:, :-1]).mean()))


# -- flow prior ------------------------------------------------------------------------------------

# (latent pixels a frame, frames): below and above one latent pixel, never exactly one
PANS = [(0.25, 13), (0.6, 8), (1.5, 4), (2.3, 4)]


@pytest.mark.parametrize("speed,n", PANS)
def test_flow_noise_moves_as_far_as_the_content(speed, n):
    """The noise of the last frame is the first frame's, shifted as far as the picture moved —
    including motion under a latent pixel a frame, which nearest-neighbour warping rounds away."""
    frames = pan(speed, n)
    noise, _ = initial_noise("flow", frames, latent_shape(frames), torch.Generator().manual_seed(0))
    content = speed * (n - 1)
    moved = noise_shift(noise[0], noise[-1], int(content) + 2)
    assert abs(moved - content) < 0.15, (speed, moved, content)


def test_flow_noise_stays_white_under_zoom():
    """A push-in stretches the content: every frame's noise is still white N(0, 1), not values
    duplicated into their neighbours. A pull-back squeezes it (samples merge): white too."""
    for rate in (1.04, 0.94):
        frames = zoom(10, rate, size=320)  # 40² latents: a frame's neighbour correlation is ±0.013 by chance
        noise, _ = initial_noise("flow", frames, latent_shape(frames), torch.Generator().manual_seed(0))
        for i, z in enumerate(noise[1:], 1):
            assert abs(neighbour_correlation(z)) < 0.05, (rate, i, neighbour_correlation(z))
        rest = noise[1:]
        assert abs(float(rest.mean())) < 0.05 and abs(float(rest.std()) - 1) < 0.05, rate
        # and it still follows the content: the centre, which barely moves, keeps its noise
        centre = (slice(None), slice(18, 22), slice(18, 22))
        assert float((noise[1][centre] * noise[0][centre]).mean()) > 0.5, rate


def test_flow_noise_chunked_equals_one_shot():
    """Rendering a scene in chunks gives the noise of one call, sub-pixel motion included: the
    carry holds everything the next chunk needs."""
    frames = pan(0.25, 9)
    shape = latent_shape(frames)
    whole, _ = initial_noise("flow", frames, shape, torch.Generator().manual_seed(3))
    gen, carry, parts = torch.Generator().manual_seed(3), None, []
    for a, b in ((0, 1), (1, 3), (3, 4), (4, 9)):
        part, carry = initial_noise("flow", frames[a:b], shape, gen, carry)
        parts.append(part)
    assert torch.equal(torch.cat(parts), whole)
    assert abs(noise_shift(whole[0], whole[-1], 4) - 2.0) < 0.15


def test_initial_noise_draws_f_values_whatever_the_prior():
    frames = pan(0.6, 4)
    shape = latent_shape(frames)
    ref = torch.Generator().manual_seed(5)
    torch.randn((4, *shape), generator=ref)
    for prior in ("independent", "shared", "residual", "flow"):
        gen = torch.Generator().manual_seed(5)
        initial_noise(prior, frames, shape, gen)
        assert torch.equal(gen.get_state(), ref.get_state()), prior


# -- residual prior --------------------------------------------------------------------------------

def control_a_video_masks(frames: np.ndarray, latent: tuple[int, int], tau: float = 0.1) -> torch.Tensor:
    """Control-A-Video's residual mask, written from its description: r_f = |I_f − I_{f−1}| on
    frames in [0, 1], divided by its maximum over the clip, resized (bilinear) to the latent size,
    averaged over RGB, thresholded at τ. Returns (F-1, h, w) bool: m_f for frames 1…F-1."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).double() / 255
    r = (x[1:] - x[:-1]).abs()
    r = r / r.max()
    r = torch.nn.functional.interpolate(r, size=latent, mode="bilinear", align_corners=False).mean(1)
    return r > tau


def test_residual_prior_marks_what_control_a_video_marks():
    frames = zoom(8, 1.03)
    shape = latent_shape(frames)
    noise, _ = initial_noise("residual", frames, shape, torch.Generator().manual_seed(0))
    ours = (noise[1:] != noise[:-1]).any(1)  # fresh noise where the frame moved, copied where still
    ref = control_a_video_masks(frames, shape[1:])
    assert 0.02 < float(ref.float().mean()) < 0.5  # the clip has still and moving parts
    assert abs(float(ours.float().mean()) - float(ref.float().mean())) < 0.003
    assert float((ours == ref).float().mean()) > 0.997
    # A still shot whose only change is sensor noise stays still; the reference, scaling by the
    # noise's own peak, would call much of it motion.
    rng = np.random.default_rng(0)
    still = np.clip(frames[:1].astype(np.float32) + rng.normal(0, 2, (6, *frames.shape[1:])), 0, 255).astype(np.uint8)
    noise, _ = initial_noise("residual", still, shape, torch.Generator().manual_seed(0))
    assert float((noise[1:] != noise[:-1]).any(1).float().mean()) < 0.005
    assert float(control_a_video_masks(still, shape[1:]).float().mean()) > 0.5
