"""Monocular depth through transformers' `AutoModelForDepthEstimation` (DPT, Depth Anything).

Preprocessing runs batched on the model's device (resize, normalise) rather than through the
PIL-based image processor, which would be the bottleneck on a GPU.
"""

from __future__ import annotations

import numpy as np


class DepthExtractor:
    kind = "depth"

    def __init__(self, device="cpu", model=None, **_):
        if model is None:
            raise ValueError("DepthExtractor needs a loaded depth model (see cinefx.diffusion.models)")
        self.model, self.mean, self.std, self.side = model
        self.device = device
        self.range: tuple[float, float] | None = None

    def reset(self, state: tuple[float, float] | None = None) -> None:
        self.range = state

    def state(self) -> tuple[float, float] | None:
        return self.range

    def __call__(self, frames: np.ndarray):
        """(F, H, W, 3) uint8 → (F, 3, H, W) float32 tensor in [0, 1], near = bright (as MiDaS)."""
        import torch
        import torch.nn.functional as F

        model = self.model
        dtype = next(model.parameters()).dtype
        n, h, w, _ = frames.shape
        x = torch.from_numpy(frames).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        side = self.side
        # Depth Anything's own inference scales the short side to 518 (its "lower_bound" resize);
        # transformers' DPTImageProcessor picks the scale nearest 1 instead, which differs for
        # frames with a short side under 518. At SD1.5's render size (short side 512) they agree.
        scale = side / min(h, w)
        cfg = getattr(model.config, "patch_size", 14) or 14
        mult = cfg if getattr(model.config, "model_type", "") != "dpt" else 1
        size = (side, side) if mult == 1 else (max(mult, round(h * scale / mult) * mult),
                                               max(mult, round(w * scale / mult) * mult))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp_(0, 1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        with torch.inference_mode():
            pred = model(pixel_values=((x - mean) / std).to(dtype)).predicted_depth
        pred = F.interpolate(pred[:, None].float(), size=(h, w), mode="bicubic", align_corners=False)
        # One range per scene, fixed by its first chunk: normalising each chunk (or frame) on its
        # own would make the depth map pulse, and the ControlNet would follow.
        if self.range is None:
            lo, hi = torch.quantile(pred.flatten()[:: max(1, pred.numel() // 1_000_000)],
                                    torch.tensor([0.01, 0.99], device=pred.device)).tolist()
            self.range = (lo, hi if hi > lo else lo + 1e-6)
        lo, hi = self.range
        d = ((pred - lo) / (hi - lo)).clamp_(0, 1)
        return d.expand(-1, 3, -1, -1).contiguous()
