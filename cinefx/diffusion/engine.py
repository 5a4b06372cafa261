"""The diffusion engine: renders a scene chunk by chunk, carrying what keeps frames consistent.

Per scene it keeps the anchors (the scene's first rendered frame and the previous batch's last
frame, as clean latents), the noise prior's carry and the control extractors' state; all of it is
dropped at a cut, so frames agree within a scene and not across scenes. Noise comes from a
generator seeded by (seed, scene number): a scene renders the same whichever scenes ran before it,
which resume relies on.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from cinefx import interrupt
from cinefx.controls import EXTRACTORS
from cinefx.diffusion.adapters import apply_adapters
from cinefx.diffusion.noise import NoiseCarry, initial_noise
from cinefx.diffusion.pipeline import NOISY_SCHEDULERS, Anchors, TemporalControlPipeline
from cinefx.diffusion.turbo import TURBO_GUIDANCE, StepNoise, TurboLoRA, apply_turbo
from cinefx.renderers import EngineSettings
from cinefx.presets import Preset, prompt_text


def scene_seed(seed: int, scene: int) -> int:
    # A fixed mix of the two, so scene k's noise depends on nothing but the seed and k.
    return (seed * 1_000_003 + scene * 7_919 + 12_345) % (2 ** 63)


def render_size(width: int, height: int, short: int, multiple: int) -> tuple[int, int]:
    """(w, h) with the short side near `short`, the aspect kept and both sides multiples of `multiple`."""
    scale = short / min(width, height)
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))


def add_detail(render: np.ndarray, source: np.ndarray, size: tuple[int, int], amount: float) -> np.ndarray:
    """`render` (H, W, 3) uint8, upscaled from `size`, with `amount` of the source's luma detail
    finer than `size` added back: what the render could not carry at its resolution. SD1.5 renders
    near 512 lines, so a 4K frame would otherwise be a 4× upscale. The structure is the source's
    (the ControlNets hold it), so the detail lands on the render's own edges; it is the source's
    own, so it is as steady from frame to frame as the footage. Colour stays the render's."""
    h, w = source.shape[:2]
    luma = cv2.cvtColor(source, cv2.COLOR_RGB2GRAY).astype(np.float32)
    seen = cv2.resize(cv2.resize(luma, size, interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_CUBIC)
    fine = (luma - seen) * amount
    return np.clip(render.astype(np.float32) + fine[..., None], 0, 255).astype(np.uint8)


class DiffusionEngine:
    """`render(frames, scene)` → frames of the same shape; call in order, scene by scene.

    `host` is the diffusers pipeline whose modules `pipe` uses, given when other engines may share
    them: each render first puts this preset's adapters and turbo LoRA on it (a no-op when they are
    there), so engines built in one process render the same interleaved as alone.

    With `turbo` (`turbo.TurboLoRA`, whose sampler `pipe` runs) the engine renders its steps
    without guidance instead of the preset's steps and guidance."""

    name = "diffusion"

    def __init__(self, pipe: TemporalControlPipeline, preset: Preset, settings: EngineSettings,
                 control_models: dict | None = None, host=None, allow_pickle: bool = False,
                 turbo: TurboLoRA | None = None):
        self.pipe, self.preset, self.settings = pipe, preset, settings
        self.host, self.allow_pickle, self.turbo = host, allow_pickle, turbo
        self.cfg = preset.diffusion
        self.steps = turbo.steps if turbo else self.cfg.steps
        self.guidance = TURBO_GUIDANCE if turbo else self.cfg.guidance
        kinds = [k for k, _ in self.cfg.controls]
        models = control_models or {}
        self.extractors = {k: EXTRACTORS[k](device=pipe.device, model=models.get(k)) for k in kinds}
        self.scales = dict(self.cfg.controls)
        self.prompt = prompt_text(preset)
        self.batch = settings.batch or self.cfg.chunk
        self._scene: int | None = None
        self._fitted: tuple[int, int] | None = None

    def _fit(self, rw: int, rh: int) -> None:
        """Size choices that depend on the render size: VAE tiling for large frames, and on a GPU
        with `batch` left automatic, the largest batch (≤ chunk) that fits in free memory."""
        self._fitted = (rw, rh)
        if rw * rh > 1024 * 1024:
            self.pipe.vae.enable_tiling()  # the VAE decoder's memory grows with the square of the side
        if self.settings.batch or self.pipe.device.type != "cuda":
            return
        per_frame = self.pipe.frame_memory(rw, rh, self.guidance > 1.0, self.cfg.temporal)
        free, _ = torch.cuda.mem_get_info(self.pipe.device)
        anchors = 0 if self.temporal_off else 2
        fits = int(0.85 * free // max(per_frame, 1)) - anchors
        self.batch = max(1, min(self.cfg.chunk, fits))

    # -- per-scene state -------------------------------------------------------------------------

    def start_scene(self, scene: int) -> None:
        self._scene = scene
        self.generator = torch.Generator().manual_seed(scene_seed(self.settings.seed, scene))
        # LCM and TCD add noise at every step: drawn through the prior too, or it undoes the prior
        noisy = self.pipe.scheduler_name in NOISY_SCHEDULERS
        self.step_noise = StepNoise(self.cfg.noise_prior, scene_seed(self.settings.seed, scene),
                                    self.steps) if noisy else None
        self.carry: NoiseCarry | None = None
        self.first: Anchors | None = None  # the scene's first rendered frame
        self.last: Anchors | None = None  # the previous batch's last rendered frame
        self.colour_ref: tuple[np.ndarray, np.ndarray] | None = None
        for ex in self.extractors.values():
            ex.reset()

    def render(self, frames: np.ndarray, scene: int) -> np.ndarray:
        """(F, H, W, 3) uint8 display-size frames of scene `scene` → the same, stylized."""
        if scene != self._scene:
            self.start_scene(scene)
        if self.cfg.strength == 0:
            return frames.copy()  # img2img at strength 0 is the source itself
        if self.host is not None:
            apply_adapters(self.host, self.cfg.adapters, self.allow_pickle)
            apply_turbo(self.host, self.turbo)  # with None too: takes another engine's turbo off the shared set
        h, w = frames.shape[1:3]
        rw, rh = render_size(w, h, self.settings.size or self.pipe.native_size, self.pipe.size_multiple)
        if self._fitted != (rw, rh):
            self._fit(rw, rh)
        small = np.stack([cv2.resize(f, (rw, rh), interpolation=cv2.INTER_AREA) for f in frames])
        keys = self._keyframe_positions(len(frames))
        out_small = np.empty_like(small)
        for start in range(0, len(keys), self.batch):
            interrupt.check()  # a batch can take minutes: stop between batches if Ctrl-C was lost
            idx = keys[start:start + self.batch]
            out_small[idx] = self._render_batch(small[idx])
        if len(keys) < len(frames):
            from cinefx.diffusion.keyframes import propagate

            out_small = propagate(small, out_small, keys)
        out = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_CUBIC) for f in out_small])
        if self.cfg.detail and (rw < w or rh < h):
            out = np.stack([add_detail(o, f, (rw, rh), self.cfg.detail) for o, f in zip(out, frames)])
        return out

    def _keyframe_positions(self, n: int) -> list[int]:
        k = self.cfg.keyframes
        if k <= 1:
            return list(range(n))
        # Every k-th frame of the chunk and always its last, so every in-between frame has a
        # rendered frame on each side within the chunk.
        return sorted(set(range(0, n, k)) | {n - 1})

    def _render_batch(self, small: np.ndarray) -> np.ndarray:
        """(B, h, w, 3) uint8 at render size → stylized, same shape."""
        pipe = self.pipe
        scale = pipe.vae_scale
        shape = (4, small.shape[1] // scale, small.shape[2] // scale)
        noise, self.carry = initial_noise(self.cfg.noise_prior, small, shape, self.generator, self.carry)
        controls = {k: ex(small) for k, ex in self.extractors.items()}
        images = torch.from_numpy(small).permute(0, 3, 1, 2).float().div_(255)
        anchors = self._anchors()
        res = pipe(images, controls, noise, prompt=self.prompt, negative=self.preset.prompt.negative,
                   scales=self.scales, strength=self.cfg.strength, steps=self.steps, guidance=self.guidance,
                   temporal=self.cfg.temporal, anchors=anchors,
                   step_noise=self.step_noise.draw(small, shape) if self.step_noise else None)
        mine = Anchors(res.latents[-1:], noise[-1:].to(res.latents.device),
                       {k: c[-1:] for k, c in controls.items()})
        if self.first is None:
            self.first = mine if len(small) == 1 else Anchors(
                res.latents[:1], noise[:1].to(res.latents.device), {k: c[:1] for k, c in controls.items()})
        self.last = mine
        out = (res.images.permute(0, 2, 3, 1).float().cpu().numpy() * 255 + 0.5).astype(np.uint8)
        return self._anchor_colour(out, small)

    def _anchors(self) -> Anchors | None:
        if self.temporal_off:
            return None
        parts = [p for p in (self.first, self.last) if p is not None]
        if not parts:
            return None
        if len(parts) == 2 and parts[0] is parts[1]:
            parts = parts[:1]
        return Anchors(torch.cat([p.latents for p in parts]), torch.cat([p.noise for p in parts]),
                       {k: torch.cat([p.controls[k] for p in parts]) for k in parts[0].controls})

    @property
    def temporal_off(self) -> bool:
        return self.cfg.temporal == "none"

    def _anchor_colour(self, out: np.ndarray, src: np.ndarray) -> np.ndarray:
        """Colour anchoring: hold each frame's Lab mean/std to the scene's first stylized frame,
        moved by how much the *input* changed since then, so lighting changes in the source still
        come through while the render's own colour drift does not (Rerender-A-Video's AdaIN idea).
        It needs no attention between frames, so it applies with `temporal = "none"` too."""
        amount = self.cfg.colour_anchor
        if amount <= 0:
            return out
        lab = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2LAB) for f in out]).astype(np.float32)
        src_lab = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2LAB) for f in src]).astype(np.float32)
        mean, std = lab.mean((1, 2)), lab.std((1, 2)) + 1e-3
        s_mean, s_std = src_lab.mean((1, 2)), src_lab.std((1, 2)) + 1e-3
        if self.colour_ref is None:
            self.colour_ref = (mean[0] - s_mean[0], std[0] / s_std[0])
        d_mean, r_std = self.colour_ref
        t_mean, t_std = s_mean + d_mean, s_std * r_std
        mix_mean = mean + amount * (t_mean - mean)
        mix_std = std + amount * (t_std - std)
        lab = (lab - mean[:, None, None]) / std[:, None, None] * mix_std[:, None, None] + mix_mean[:, None, None]
        lab = np.clip(lab + 0.5, 0, 255).astype(np.uint8)
        return np.stack([cv2.cvtColor(f, cv2.COLOR_LAB2RGB) for f in lab])
