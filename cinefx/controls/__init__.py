"""Control maps for ControlNet: small extractor classes chosen from a registry dict.

An extractor turns a chunk of frames into the conditioning images its ControlNet was trained on:
``extractor(frames) -> (F, 3, H, W)`` float tensor in [0, 1] on the extractor's device, from
``frames`` (F, H, W, 3) uint8 RGB at the render size. `reset()` is called at every scene start, so
an extractor may keep per-scene state (the depth range) and never carries it across a cut.
To add a kind, write a class with those two methods and add it to `EXTRACTORS`.
"""

from __future__ import annotations

from cinefx.controls.canny import CannyExtractor
from cinefx.controls.depth import DepthExtractor

EXTRACTORS = {"canny": CannyExtractor, "depth": DepthExtractor}

__all__ = ["EXTRACTORS", "CannyExtractor", "DepthExtractor"]
