"""The noise priors against known motion and against Control-A-Video's own residual algorithm."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from cinefx.diffusion.noise import initial_noise
from cinefx.testing.clips import photo

SCALE = 8  # image pixels per latent pixel, as SD's VAE


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
