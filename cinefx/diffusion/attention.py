"""Spatial-temporal self-attention, installed as a diffusers attention processor for one call.

Control-A-Video (Chen et al. 2023, §3.2) makes SD's self-attention span frames: each frame's
queries attend to keys and values gathered from several frames of the clip, so every frame draws
its appearance from the same source and textures stop boiling. Modes:

- ``full``: keys/values of all F frames of the batch (Control-A-Video). Cost grows with F².
- ``anchor``: frame i attends to frame 0 (the scene anchor), frame i-1 and itself, the sparse
  causal variant (Tune-A-Video, Text2Video-Zero). Cost grows with F.
- ``none``: plain per-frame self-attention, the baseline.

Only self-attention (``attn1``) changes; cross-attention to the prompt stays per frame. The batch
seen by a processor is ``G × F`` rows (G = 2 with classifier-free guidance: unconditional, then
conditional), and frames only attend within their own group.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TEMPORAL_MODES = ("full", "anchor", "none")


@dataclass
class TemporalState:
    """Shared by every installed processor; the pipeline sets `frames` before each UNet call."""

    mode: str = "full"
    frames: int = 1


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
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)

        frames = self.state.frames
        mode = "none" if cross or attention_mask is not None else self.state.mode
        if frames <= 1 or q.shape[0] % frames:
            mode = "none"
        if mode == "full":
            out = _attend(attn, *_join_frames(q, k, v, frames))
            out = out.reshape(q.shape)
        elif mode == "anchor":
            out = _anchor_attention(attn, q, k, v, frames)
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


def _join_frames(q, k, v, frames: int):
    """(G·F, N, C) → (G, F·N, C): one long sequence per group, so every query sees every frame."""
    g = q.shape[0] // frames
    return (t.reshape(g, frames * t.shape[1], t.shape[2]) for t in (q, k, v))


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


def _anchor_attention(attn, q, k, v, frames: int):
    """Frame i's queries against keys/values of frames [0, i-1, i] (all (G·F, N, C))."""
    bf, n, c = k.shape
    g = bf // frames
    prev = torch.clamp(torch.arange(frames, device=k.device) - 1, min=0)

    def gather(t):
        t = t.view(g, frames, n, c)
        first = t[:, :1].expand(g, frames, n, c)
        return torch.cat([first, t[:, prev], t], dim=2).reshape(bf, 3 * n, c)

    # Frame 1's "first" and "previous" are the same frame; counting it twice would double its
    # weight, so its second copy is masked. (Frame 0 sees itself three times: uniform, harmless.)
    mask = torch.zeros(frames, 1, 1, 3 * n, device=q.device, dtype=q.dtype)
    if frames > 1:
        mask[1, ..., n:2 * n] = float("-inf")
    mask = mask.repeat(g, 1, 1, 1)
    return _attend(attn, q, gather(k), gather(v), mask)


@contextmanager
def temporal_attention(modules: Iterable, state: TemporalState) -> Iterator[SpatialTemporalAttnProcessor]:
    """Install the spatial-temporal processor on the self-attention layers of `modules` (UNet,
    ControlNets) for the duration of the block; the processors found there are put back after,
    even on error."""
    modules = list(modules)
    saved = [(m, dict(m.attn_processors)) for m in modules]
    proc = SpatialTemporalAttnProcessor(state)
    try:
        for m, procs in saved:
            m.set_attn_processor({name: proc if name.endswith("attn1.processor") else p
                                  for name, p in procs.items()})
        yield proc
    finally:
        for m, procs in saved:
            m.set_attn_processor(procs)
