"""Per-scene noise priors: the initial noise of each frame, chosen so frames that show the same
thing start from the same noise.

Every prior keeps each latent value N(0, 1) — it only decides which values are shared — so the
sampler sees noise of the right statistics whatever the prior. Functions are pure: frames, a
generator and the carry from the previous chunk of the same scene in; noise and the new carry out.

- ``independent``: fresh noise per frame (the per-frame baseline).
- ``shared``: one noise for the whole scene (Text2Video-Zero, ControlVideo).
- ``residual``: Control-A-Video's residual-based prior (§3.3): where the input frame barely changes
  from the previous one, copy the previous frame's noise; where it moves, draw fresh noise.
- ``flow``: the motion-based prior the Control-A-Video paper describes: carry the previous frame's
  noise along the input's optical flow (nearest-neighbour, so values stay N(0, 1) samples), with
  fresh noise where the flow is occluded or leaves the frame.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class NoiseCarry:
    """What the next chunk of the same scene needs: the last input frame and its noise."""

    frame: np.ndarray  # (H, W, 3) uint8
    noise: torch.Tensor  # (C, h, w)


def initial_noise(prior: str, frames: np.ndarray, shape: tuple[int, int, int], generator: torch.Generator,
                  carry: NoiseCarry | None = None) -> tuple[torch.Tensor, NoiseCarry]:
    """Noise for `frames` (F, H, W, 3) uint8 as (F, C, h, w) float32 on the CPU (`shape` = (C, h, w)).

    The generator is advanced by exactly F draws of `shape` whatever the prior, so a scene's noise
    does not depend on which prior an earlier chunk used.
    """
    if prior not in NOISE_PRIORS:
        raise ValueError(f"noise prior {prior!r}: must be one of {', '.join(NOISE_PRIORS)}")
    n = len(frames)
    fresh = torch.randn((n, *shape), generator=generator, dtype=torch.float32)
    if prior == "independent":
        out = fresh
    elif prior == "shared":
        base = carry.noise if carry is not None else fresh[0]
        out = base.expand(n, *shape).clone()
    else:
        out = fresh.clone()
        prev_frame = carry.frame if carry is not None else None
        prev_noise = carry.noise if carry is not None else None
        masks = _residual_masks(frames, prev_frame, shape[1:]) if prior == "residual" else None
        for i in range(n):
            if prev_noise is not None:
                if prior == "residual":
                    still = torch.from_numpy(~masks[i])
                    out[i] = torch.where(still, prev_noise, fresh[i])
                else:
                    out[i] = _flow_noise(frames[i], prev_frame, prev_noise, fresh[i])
            prev_frame, prev_noise = frames[i], out[i]
    return out, NoiseCarry(frame=frames[-1].copy(), noise=out[-1].clone())


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


def _flow_noise(frame: np.ndarray, prev_frame: np.ndarray, prev_noise: torch.Tensor,
                fresh: torch.Tensor) -> torch.Tensor:
    from cinefx.diffusion.flow import backward_flow, consistent, warp

    c, h, w = prev_noise.shape
    fwd = backward_flow(frame, prev_frame, (w, h))  # where each latent pixel of `frame` was before
    bwd = backward_flow(prev_frame, frame, (w, h))
    carried, inside = warp(prev_noise.permute(1, 2, 0).numpy(), fwd, nearest=True)
    keep = torch.from_numpy(inside & consistent(fwd, bwd))
    return torch.where(keep, torch.from_numpy(carried.reshape(h, w, c)).permute(2, 0, 1), fresh)
