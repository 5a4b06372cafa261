"""Spatial-temporal self-attention, installed as a diffusers attention processor for one call.

Control-A-Video (Chen et al. 2023, §3.2) makes SD's self-attention span frames: each frame's
queries attend to keys and values gathered from several frames of the clip, so every frame draws
its appearance from the same source and textures stop boiling. Modes:

- ``full``: keys/values of all F frames of the batch (Control-A-Video). Cost grows with F².
- ``anchor``: frame i attends to frame 0 (the scene anchor), frame i-1 and itself, the sparse
  causal variant (Tune-A-Video, Text2Video-Zero). Cost grows with F.
- ``none``: plain per-frame self-attention, the baseline.

Only self-attention (``attn1``) spans frames; cross-attention to the prompt stays per frame. The
batch seen by a processor is ``G × F`` rows (G = 2 with classifier-free guidance: unconditional,
then conditional), and frames only attend within their own group.

Every attention call goes through PyTorch's ``scaled_dot_product_attention`` without a mask, so
long cross-frame sequences get its flash / memory-efficient kernels on a GPU. Projections fused by
diffusers' ``Attention.fuse_projections`` (one QKV matrix product instead of three) are used where
no LoRA wraps the separate ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

TEMPORAL_MODES = ("full", "anchor", "none")


@dataclass
class TemporalState:
    """Shared by every installed processor; the pipeline sets it before each UNet call.

    `groups` (G), when set, makes the processors read the frame count off the batch (rows / G)
    rather than `frames`: a compiled UNet then sees the count only as a tensor size, so batches
    with and without anchors, and a scene's short last chunk, reuse one compiled graph."""

    mode: str = "full"
    frames: int = 1
    groups: int = 0
    processor: SpatialTemporalAttnProcessor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # One processor object per state: a compiled module guards on the processor it traced, so
        # installing a new one for every call would compile again every call.
        self.processor = SpatialTemporalAttnProcessor(self)


class SpatialTemporalAttnProcessor:
    """Self-attention over frames (see module docstring). Cross-attention calls are passed through
    as ordinary attention, so it may be installed on any attention layer."""

    def __init__(self, state: TemporalState):
        self.state = state

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        cross = encoder_hidden_states is not None
        context = hidden_states
        if cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        elif cross:
            context = encoder_hidden_states
        q, k, v = _project(attn, hidden_states, context, cross)

        state, rows = self.state, q.shape[0]
        groups = state.groups or rows // max(state.frames, 1)
        frames = rows // groups if state.groups else state.frames
        mode = "none" if cross or attention_mask is not None else state.mode
        if frames <= 1 or rows != groups * frames:
            mode = "none"
        if mode == "full":  # (G·F, N, C) → (G, F·N, C): every query sees every frame of its group
            out = _attend(attn, *(t.reshape(groups, frames * t.shape[1], t.shape[2]) for t in (q, k, v)))
            out = out.reshape(q.shape)
        elif mode == "anchor":
            out = _anchor_attention(attn, q, k, v, groups, frames)
        else:
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, k.shape[1], q.shape[0])
                mask = mask.view(q.shape[0], attn.heads, -1, mask.shape[-1])
            out = _attend(attn, q, k, v, mask)

        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _project(attn, hidden_states, context, cross: bool):
    """Queries, keys and values (B, N, C). Fused projections are copies of the separate weights
    made when they were fused, so they are used only where no LoRA wraps the separate layers
    (a peft layer keeps the original as `base_layer`): adapters loaded later stay in effect."""
    fused = getattr(attn, "fused_projections", False) and not any(
        hasattr(m, "base_layer") for m in (attn.to_q, attn.to_k, attn.to_v))
    if fused and not cross:
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    if fused:
        return (attn.to_q(hidden_states), *attn.to_kv(context).chunk(2, dim=-1))
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def _attend(attn, q, k, v, mask=None):
    """Multi-head SDPA on (B, L, C) tensors; returns (B, L, C)."""
    b, heads = q.shape[0], attn.heads
    d = q.shape[-1] // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


def _anchor_attention(attn, q, k, v, g: int, frames: int):
    """Frame i's queries against keys/values of frames 0, i-1 and i (all (G·F, N, C)), each frame
    counted once: frame 0 sees itself, frame 1 frames 0 and 1, later frames all three. Three
    unmasked attention calls rather than one masked one, so the fast SDPA kernels apply (flash
    attention takes no mask; a masked call falls back to slower ones)."""
    bf, n, c = k.shape
    q, k, v = (t.view(g, frames, n, c) for t in (q, k, v))

    out = [_attend(attn, q[:, 0], k[:, 0], v[:, 0])[:, None]]
    if frames > 1:
        k1, v1 = (t[:, :2].reshape(g, 2 * n, c) for t in (k, v))
        out.append(_attend(attn, q[:, 1], k1, v1)[:, None])
    if frames > 2:
        rest = frames - 2
        first = (t[:, :1].expand(g, rest, n, c) for t in (k, v))
        kk, vv = (torch.cat([f, t[:, 1:-1], t[:, 2:]], dim=2).reshape(g * rest, 3 * n, c)
                  for f, t in zip(first, (k, v)))
        out.append(_attend(attn, q[:, 2:].reshape(g * rest, n, c), kk, vv).view(g, rest, n, c))
    return torch.cat(out, dim=1).reshape(bf, n, c)


@contextmanager
def temporal_attention(modules: Iterable, state: TemporalState) -> Iterator[SpatialTemporalAttnProcessor]:
    """Install the state's spatial-temporal processor on the self-attention layers of `modules`
    (UNet, ControlNets), and on their cross-attention layers whose projections are fused (diffusers'
    own processors would use the fused copies even under a LoRA), for the duration of the block;
    the processors found there are put back after, even on error."""
    modules = list(modules)
    saved = [(m, dict(m.attn_processors)) for m in modules]
    proc = state.processor

    def ours(m, name: str) -> bool:
        return name.endswith("attn1.processor") or getattr(
            m.get_submodule(name.removesuffix(".processor")), "fused_projections", False)

    try:
        for m, procs in saved:
            m.set_attn_processor({name: proc if ours(m, name) else p for name, p in procs.items()})
        yield proc
    finally:
        for m, procs in saved:
            m.set_attn_processor(procs)
