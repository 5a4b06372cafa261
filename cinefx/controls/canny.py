"""Canny edges (OpenCV), the control the SD1.5 canny ControlNet was trained on."""

from __future__ import annotations

import cv2
import numpy as np


class CannyExtractor:
    kind = "canny"

    def __init__(self, device="cpu", low: int = 100, high: int = 200, **_):
        # 100/200 are the thresholds the lllyasviel canny ControlNet's training maps used.
        self.device, self.low, self.high = device, low, high

    def reset(self, state=None) -> None:
        pass

    def state(self):
        return None

    def __call__(self, frames: np.ndarray):
        """(F, H, W, 3) uint8 → (F, 3, H, W) float32 tensor in {0, 1}."""
        import torch

        edges = np.stack([cv2.Canny(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), self.low, self.high) for f in frames])
        t = torch.from_numpy(edges).to(self.device, non_blocking=True).float().div_(255)
        return t[:, None].expand(-1, 3, -1, -1).contiguous()
