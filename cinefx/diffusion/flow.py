"""Optical flow (OpenCV DIS) and warping, for the flow noise prior and keyframe propagation.

Convention: ``flow = backward_flow(a, b)`` gives, for every pixel x of `a`, the offset to where it
is in `b`: a(x) ≈ b(x + flow(x)). `warp(b, flow)` then pulls `b` into `a`'s geometry.
"""

from __future__ import annotations

import cv2
import numpy as np

FLOW_WIDTH = 320  # DIS is fast and accurate enough for noise/propagation at this width


def _grey(img: np.ndarray, width: int) -> np.ndarray:
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img
    if g.shape[1] > width:
        g = cv2.resize(g, (width, round(g.shape[0] * width / g.shape[1])), interpolation=cv2.INTER_AREA)
    return g


def backward_flow(a: np.ndarray, b: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Flow from `a` to `b` as (h, w, 2) float32 pixels at `size` = (w, h) (default: a's size).

    Computed at `FLOW_WIDTH` and rescaled, vectors included.
    """
    ga, gb = _grey(a, FLOW_WIDTH), _grey(b, FLOW_WIDTH)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    flow = dis.calc(ga, gb, None)
    w, h = size or (a.shape[1], a.shape[0])
    sx, sy = w / ga.shape[1], h / ga.shape[0]
    flow = cv2.resize(flow, (w, h), interpolation=cv2.INTER_LINEAR)
    flow[..., 0] *= sx
    flow[..., 1] *= sy
    return flow


def warp(img: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pull `img` (h, w, ...) along `flow` (h, w, 2). Returns (warped, valid) where `valid` marks
    pixels whose source lies inside the image."""
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mx, my = gx + flow[..., 0], gy + flow[..., 1]
    valid = (mx >= -0.5) & (mx <= w - 0.5) & (my >= -0.5) & (my <= h - 0.5)
    out = cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out, valid


def consistent(fwd: np.ndarray, bwd: np.ndarray) -> np.ndarray:
    """Forward-backward check (Lai et al. 2018): True where `fwd` (a→b) and `bwd` (b→a) agree,
    i.e. the pixel is not occluded. |w_f + w_b(x + w_f)|² ≤ 0.01(|w_f|² + |w_b(x + w_f)|²) + 0.5."""
    bw, _ = warp(bwd, fwd)
    diff = ((fwd + bw) ** 2).sum(-1)
    return diff <= 0.01 * ((fwd ** 2).sum(-1) + (bw ** 2).sum(-1)) + 0.5
