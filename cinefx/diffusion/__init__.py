"""The diffusion engine: SD1.5 + ControlNet made temporally consistent (Control-A-Video style).

Modules: `models` (find and load weights), `adapters` (LoRA / textual inversion), `attention`
(spatial-temporal attention processors), `noise` (per-scene noise priors), `flow` (optical flow and
warping), `pipeline` (the temporal img2img ControlNet pipeline), `keyframes` (propagation between
diffused frames), `engine` (scene-by-scene state: anchors, chunks, resets at cuts).
Importing this package does not import torch.
"""
