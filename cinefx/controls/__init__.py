"""Control maps for ControlNet: small extractor classes chosen from a registry dict.

An extractor turns a chunk of frames into the conditioning images its ControlNet was trained on:
``extractor(frames) -> (F, 3, H, W)`` float tensor in [0, 1] on the extractor's device, from
``frames`` (F, H, W, 3) uint8 RGB at the render size. `reset()` is called at every scene start, so
an extractor may keep per-scene state (the depth range) and never carries it across a cut;
`state()` returns that state and `reset(state)` restores it (a long take's later pieces start from
what its first batch fixed, see `cinefx.diffusion.engine`). To add a kind, write a class with those
three methods, add it to `EXTRACTORS` and name the SD1.5
ControlNet trained on its maps in `CONTROLNETS`.

canny and depth are built in; the other kinds are controlnet-aux's annotators, used when that
optional package is installed (see `cinefx.controls.annotators`).
"""

from __future__ import annotations

import functools

from cinefx.controls.annotators import AUX_KINDS, AnnotatorExtractor
from cinefx.controls.canny import CannyExtractor
from cinefx.controls.depth import DepthExtractor

EXTRACTORS = {"canny": CannyExtractor, "depth": DepthExtractor,
              **{kind: functools.partial(AnnotatorExtractor, kind) for kind in AUX_KINDS}}

# The ControlNet each kind uses unless --controlnet KIND=… names another.
CONTROLNETS = {"canny": "lllyasviel/control_v11p_sd15_canny",
               "depth": "lllyasviel/control_v11f1p_sd15_depth",
               **{kind: k.controlnet for kind, k in AUX_KINDS.items()}}

BUILTIN_KINDS = ("canny", "depth")  # need nothing beyond the diffusion extra

__all__ = ["AUX_KINDS", "BUILTIN_KINDS", "CONTROLNETS", "EXTRACTORS", "AnnotatorExtractor", "CannyExtractor",
           "DepthExtractor"]
