"""Per-scene noise priors: the initial noise of each frame, chosen so frames that show the same
thing start from the same noise.

Every prior keeps each frame's noise white N(0, 1) — it only decides which values are shared — so
the sampler sees noise of the right statistics whatever the prior. Functions are pure: frames, a
generator and the carry from the previous chunk of the same scene in; noise and the new carry out.

- ``independent``: fresh noise per frame (the per-frame baseline).
- ``shared``: one noise for the whole scene (Text2Video-Zero, ControlVideo).
- ``residual``: Control-A-Video's residual-based prior (§3.3): where the input frame barely changes
  from the previous one, copy the previous frame's noise; where it moves, draw fresh noise.
- ``flow``: the motion-based prior the Control-A-Video paper describes, done as integral noise
  warping (Chang et al., "How I Warped Your Noise", ICLR 2024): the noise moves with the input's
  optical flow at sub-pixel precision, and each latent value stays an exact N(0, 1) sample however
  the content stretches or shrinks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np
import torch

NOISE_PRIORS = ("independent", "shared", "residual", "flow")
RESIDUAL_THRESHOLD = 0.1  # τ of Control-A-Video: share of the largest change over the frames rendered together
# Absolute floor on the change that counts as motion (about 5 of 255 levels). It only binds when the
# largest change is under RESIDUAL_FLOOR / τ (51 levels): a still shot, whose largest change is
# sensor noise, would otherwise call its own noise "motion".
RESIDUAL_FLOOR = 0.02
SUBPIXELS = 8  # the flow prior's noise field has SUBPIXELS² samples per latent pixel
# A latent pixel left with fewer than half its samples (the content stretched, or arrived from
# outside or from behind something) gets fresh samples in its empty sub-cells; one holding more than
# twice as many (the content shrank) has the samples that share a sub-cell merged into one. The field
# neither thins out to single samples nor grows without bound.
_SPARSE, _CROWDED = SUBPIXELS ** 2 // 2, 2 * SUBPIXELS ** 2


@dataclass(frozen=True)
class SubpixelNoise:
    """The flow prior's noise field: independent N(0, 1) samples that travel with the content.

    A latent value is the sum of the samples inside its pixel over the square root of their count,
    so it is N(0, 1) and independent of every other latent value whatever the motion did.
    """

    samples: torch.Tensor  # (2 + C, N) float32: x, y in latent pixels (within [0, w) × [0, h)), C values
    rng: torch.Tensor  # state of the generator that draws the samples (see `initial_noise`)


@dataclass(frozen=True)
class NoiseCarry:
    """What the next chunk of the same scene needs: the last input frame, its noise and, for the
    flow prior, the sub-pixel noise field."""

    frame: np.ndarray  # (H, W, 3) uint8
    noise: torch.Tensor  # (C, h, w)
    field: SubpixelNoise | None = None


def initial_noise(prior: str, frames: np.ndarray, shape: tuple[int, int, int], generator: torch.Generator,
                  carry: NoiseCarry | None = None) -> tuple[torch.Tensor, NoiseCarry]:
    """Noise for `frames` (F, H, W, 3) uint8 as (F, C, h, w) float32 on the CPU (`shape` = (C, h, w)).

    The generator is advanced by exactly F draws of `shape` whatever the prior, so a scene's noise
    does not depend on which prior an earlier chunk used. The flow prior needs more randomness (the
    sub-pixel samples): it draws them from a second generator seeded, at the scene's first chunk,
    with a hash of `generator`'s state before its draws, and carries that generator's state in the
    carry. Rendering a scene in chunks therefore gives the same noise as rendering it at once.
    """
    if prior not in NOISE_PRIORS:
        raise ValueError(f"noise prior {prior!r}: must be one of {', '.join(NOISE_PRIORS)}")
    n = len(frames)
    state = generator.get_state()
    fresh = torch.randn((n, *shape), generator=generator, dtype=torch.float32)
    field = None
    if prior == "independent":
        out = fresh
    elif prior == "shared":
        base = carry.noise if carry is not None else fresh[0]
        out = base.expand(n, *shape).clone()
    elif prior == "residual":
        moving = torch.from_numpy(_residual_masks(frames, carry.frame if carry else None, shape[1:]))
        out, prev = fresh.clone(), carry.noise if carry else None
        for i in range(n):
            if prev is not None:
                out[i] = torch.where(moving[i], fresh[i], prev)
            prev = out[i]
    else:
        out, field = _flow_noise(frames, shape, fresh[0], state, carry)
    return out, NoiseCarry(frame=frames[-1].copy(), noise=out[-1].clone(), field=field)


def _residual_masks(frames: np.ndarray, prev: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
    """(F, h, w) bool: True where frame i moved against frame i-1 (frame 0 against `prev`).

    Control-A-Video's mask: r_f = |I_f − I_{f−1}| on [0, 1], over its largest value at full
    resolution, resized bilinearly (no antialiasing) to latent size, averaged over RGB, > τ. It
    differs in two places. The largest value is taken over the frames rendered together (this call,
    with the carried frame before them), which is the reference's clip; a scene rendered in several
    chunks normalises each by its own. And the threshold never drops under RESIDUAL_FLOOR, which only
    changes chunks whose largest change is under 51 levels: still shots, where the reference would
    scale sensor noise up to motion (and divide by zero on a perfectly still clip).
    """
    h, w = size
    seq = np.concatenate([prev[None] if prev is not None else frames[:1], frames])
    small, peak = [], 0
    for a, b in zip(seq[:-1], seq[1:]):
        d = cv2.absdiff(a, b)
        peak = max(peak, int(d.max()))
        # averaging RGB before resizing, not after: both are linear, and this resizes one plane
        small.append(cv2.resize(d.mean(-1, dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR))
    return np.stack(small) / 255 > max(RESIDUAL_THRESHOLD * peak / 255, RESIDUAL_FLOOR)


# -- flow prior -------------------------------------------------------------------------------------

def _flow_noise(frames: np.ndarray, shape: tuple[int, int, int], first: torch.Tensor, state: torch.Tensor,
                carry: NoiseCarry | None) -> tuple[torch.Tensor, SubpixelNoise]:
    """Integral noise warping along the input's optical flow (Chang et al. 2024), in a form cheap
    enough to run every frame (Go-with-the-Flow's aim, Burgert et al. 2025): the sub-pixel samples
    themselves travel from frame to frame. Returns the noise (F, C, h, w) and the field.

    The scene's first noise is split into SUBPIXELS² samples per latent pixel, drawn conditionally so
    each pixel's samples sum back to it. The samples then ride the forward flow with unrounded
    positions, so motion under a latent pixel a frame accumulates instead of rounding away. Samples
    whose flow fails the forward-backward check (occluded) or that leave the frame are dropped;
    empty or crowded pixels are rebalanced (see `_SPARSE`). Each frame's noise is per pixel the sum
    of the samples in it over sqrt(count): samples are independent N(0, 1) and no sample is in two
    pixels, so the noise is white N(0, 1) under any motion, stretch included.
    """
    prev = carry.frame if carry is not None else None
    if carry is not None and carry.field is not None:
        field = carry.field
    else:
        digest = hashlib.blake2b(state.numpy().tobytes(), digest_size=8).digest()
        rng = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        field = _split(carry.noise if carry is not None else first, rng)
    rng = torch.Generator()
    rng.set_state(field.rng)
    samples = field.samples.clone()  # advanced in place; the carry stays as it was
    cell = _cells(samples, shape[2])
    out = torch.empty((len(frames), *shape))
    for i, frame in enumerate(frames):
        if prev is not None:
            samples, cell = _advance(samples, prev, frame, shape[1:], rng)
        sums = torch.zeros((shape[0], shape[1] * shape[2])).index_add_(1, cell, samples[2:])
        out[i] = (sums / torch.bincount(cell, minlength=sums.shape[1]).sqrt()).reshape(shape)
        prev = frame
    return out, SubpixelNoise(samples, rng.get_state())


def _split(noise: torch.Tensor, rng: torch.Generator) -> SubpixelNoise:
    """Conditional upsampling of `noise` (C, h, w): k² independent N(0, 1) samples per pixel, given
    that their sum over k equals the pixel (Chang et al. 2024, §3.2): the pixel's share z/k plus
    zero-mean white noise, e − mean(e)."""
    c, h, w = noise.shape
    k = SUBPIXELS
    e = torch.randn((c, h, k, w, k), generator=rng)
    e = e - e.mean((2, 4), keepdim=True) + noise[:, :, None, :, None] / k
    ys, xs = torch.meshgrid(torch.arange(h * k), torch.arange(w * k), indexing="ij")
    pos = (torch.stack([xs.ravel(), ys.ravel()]).float() + 0.5) / k
    return SubpixelNoise(torch.cat([pos, e.reshape(c, -1)]), rng.get_state())


def _cells(samples: torch.Tensor, w: int, k: int = 1) -> torch.Tensor:
    """(N,) int64: the cell holding each sample, on a grid of k × k cells per latent pixel."""
    sub = (samples[:2] * k).long()  # positions are ≥ 0, so truncating floors them
    return sub[1] * (w * k) + sub[0]


def _advance(samples: torch.Tensor, prev: np.ndarray, frame: np.ndarray, size: tuple[int, int],
             rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry the samples from `prev` to `frame` along the forward flow, sampled bilinearly at each
    sample's own position; drop the occluded and departed ones, rebalance. Returns the samples and
    their latent pixels (N,)."""
    from cinefx.diffusion.flow import backward_flow, consistent

    h, w = size
    # Flow on a grid of half latent pixels: DIS's patch-wise flow has no finer detail to lose, the
    # samples read it bilinearly at their own positions, occlusion edges land within half a latent
    # pixel, and the forward-backward check costs a sixth of what it does at DIS's 320 (64² latents).
    fwd = backward_flow(prev, frame, (2 * w, 2 * h))  # where each pixel of `prev` is in `frame`
    bwd = backward_flow(frame, prev, (2 * w, 2 * h))
    planes = np.stack([fwd[..., 0] / 2, fwd[..., 1] / 2, consistent(fwd, bwd)]).astype(np.float32)
    grid = (samples[:2].T * torch.tensor([2 / w, 2 / h]) - 1)[None, None]
    at = torch.nn.functional.grid_sample(torch.from_numpy(planes)[None], grid, mode="bilinear",
                                         padding_mode="border", align_corners=False)[0, :, 0]
    pos = samples[:2].add_(at[:2])
    keep = (at[2] > 0.5) & (pos.amin(0) >= 0) & (pos[0] < w) & (pos[1] < h)
    if not keep.all():
        samples = samples.index_select(1, keep.nonzero()[:, 0])
    return _rebalance(samples, size, rng)


def _rebalance(samples: torch.Tensor, size: tuple[int, int], rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the samples sharing a sub-cell in crowded pixels (sum over sqrt(count): still N(0, 1),
    at the sub-cell's centre), then give the empty sub-cells of sparse pixels fresh samples."""
    h, w = size
    k = SUBPIXELS
    cell = _cells(samples, w)
    count = torch.bincount(cell, minlength=h * w)
    if count.max() > _CROWDED:
        crowded = count[cell] > _CROWDED
        ids, group, m = torch.unique(_cells(samples[:, crowded], w, k), return_inverse=True, return_counts=True)
        merged = torch.zeros((samples.shape[0] - 2, len(m))).index_add_(1, group, samples[2:, crowded])
        merged = torch.cat([_centres(ids, w), merged / m.float().sqrt()])
        samples = torch.cat([samples[:, ~crowded], merged], 1)
        cell = _cells(samples, w)
        count = torch.bincount(cell, minlength=h * w)
    sparse = count < _SPARSE
    if sparse.any():
        empty = sparse.reshape(h, w).repeat_interleave(k, 0).repeat_interleave(k, 1).ravel()
        empty[_cells(samples, w, k)] = False
        pos = _centres(empty.nonzero()[:, 0], w)
        fresh = torch.randn((samples.shape[0] - 2, pos.shape[1]), generator=rng)
        samples = torch.cat([samples, torch.cat([pos, fresh])], 1)
        cell = torch.cat([cell, _cells(pos, w)])
    return samples, cell


def _centres(ids: torch.Tensor, w: int) -> torch.Tensor:
    """(2, n): the centres of sub-cells `ids` (n,) in latent pixels."""
    k = SUBPIXELS
    return (torch.stack([ids % (w * k), ids // (w * k)]).float() + 0.5) / k
