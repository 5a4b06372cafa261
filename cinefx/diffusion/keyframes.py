"""Keyframe propagation: diffuse every K-th frame, carry the look to the frames between.

Rerender-A-Video's idea in its simplest honest form: frame j between rendered keyframes a < j < b
pulls both along the *input's* optical flow (j → a, j → b), and blends them by temporal distance,
each weighted by where its flow is trustworthy (inside the frame, forward-backward consistent).
Where neither is, the nearer keyframe's warp is used as it stands.
"""

from __future__ import annotations

import numpy as np

from cinefx.diffusion.flow import backward_flow, consistent, warp


def propagate(src: np.ndarray, out: np.ndarray, keys: list[int]) -> np.ndarray:
    """Fill `out` (F, H, W, 3) uint8 at the non-key positions from the rendered keys, guided by
    the input frames `src` (F, H, W, 3) uint8. `keys` must include 0 and F-1. Returns `out`."""
    for a, b in zip(keys, keys[1:]):
        for j in range(a + 1, b):
            warped, weights = [], []
            for k in (a, b):
                fwd = backward_flow(src[j], src[k])
                bwd = backward_flow(src[k], src[j])
                img, inside = warp(out[k], fwd)
                trust = (inside & consistent(fwd, bwd)).astype(np.float32)
                near = 1.0 - abs(j - k) / (b - a)
                warped.append(img.astype(np.float32))
                weights.append(trust * near + 1e-4 * near)  # the tiny term picks the nearer one where neither is trusted
            wsum = weights[0] + weights[1]
            mix = (warped[0] * weights[0][..., None] + warped[1] * weights[1][..., None]) / wsum[..., None]
            out[j] = np.clip(mix + 0.5, 0, 255).astype(np.uint8)
    return out
