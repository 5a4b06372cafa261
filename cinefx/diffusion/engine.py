"""The diffusion engine: renders a scene chunk by chunk, carrying what keeps frames consistent.

Per scene it keeps the anchors (the scene's first rendered frame and the previous batch's last
frame, as clean latents), the noise prior's carry and the control extractors' state; all of it is
dropped at a cut, so frames agree within a scene and not across scenes. Noise comes from a
generator seeded by (seed, scene number): a scene renders the same whichever scenes ran before it,
which resume relies on.

A long take is rendered as pieces of `part` frames. Within a piece everything chains as above;
piece k > 0 starts afresh except for what the scene's first batch fixed (`SceneState`: the first
frame's anchor, the colour reference, the depth range), with noise seeded by (seed, scene, k) and,
in place of the previous batch's last frame, the frame before the piece rendered alone against the
first frame (one extra frame per piece). The noise prior (and a turbo sampler's step noise) goes on
from the first frame's noise, the frame before the piece standing for the frame before: where the
take holds still, every piece has the first frame's noise, as one piece would. So piece k depends
on the scene's first batch and its own frames only: the pieces of one take render side by side on
a cluster, and a one-machine run renders them the same way, so both write the same file. The price
is a seam every `part` frames where what moved has fresh noise; the lead-in frame keeps the content
on both sides of it alike.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from cinefx import interrupt
from cinefx.controls import EXTRACTORS
from cinefx.diffusion.adapters import apply_adapters
from cinefx.diffusion.noise import NoiseCarry, initial_noise
from cinefx.diffusion.pipeline import NOISY_SCHEDULERS, Anchors, BatchDecoder, TemporalControlPipeline
from cinefx.diffusion.turbo import TURBO_GUIDANCE, StepNoise, TurboLoRA, apply_turbo
from cinefx.renderers import EngineSettings, lengths
from cinefx.presets import Preset, prompt_text


def scene_seed(seed: int, scene: int, piece: int = 0) -> int:
    # A fixed mix, so a scene's (and a piece's) noise depends on nothing but the seed and its numbers.
    base = (seed * 1_000_003 + scene * 7_919 + 12_345) % (2 ** 63)
    return base if piece == 0 else (base * 6_364_136_223 + piece * 1_442_695_041) % (2 ** 63)


@dataclass(frozen=True)
class SceneState:
    """What a scene's first batch fixes for the rest of the scene, so that a later piece can be
    rendered elsewhere: the first frame as anchor (whose noise the later pieces' noise prior goes on
    from), the colour reference (Lab mean offset and std ratio, (3,) each), each control extractor's
    state and, with a turbo sampler, the first frame's noise of each step but the last ((C, h, w) each)."""

    first: Anchors
    colour_ref: tuple[np.ndarray, np.ndarray] | None
    extractors: dict
    steps: tuple[torch.Tensor, ...] = ()

    def to_bytes(self) -> bytes:
        import io

        def own(x: torch.Tensor) -> torch.Tensor:  # a frame's view would save its whole batch's storage
            return x.cpu().clone()

        a, ref = self.first, self.colour_ref
        blob = {"latents": own(a.latents), "noise": own(a.noise), "controls": {k: own(c) for k, c in a.controls.items()},
                "colour_ref": None if ref is None else [torch.from_numpy(np.asarray(x)) for x in ref],
                "extractors": self.extractors, "steps": [own(x) for x in self.steps]}
        buf = io.BytesIO()
        torch.save(blob, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, device) -> "SceneState":
        import io

        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        first = Anchors(blob["latents"].to(device), blob["noise"].to(device),
                        {k: c.to(device) for k, c in blob["controls"].items()})
        ref = blob["colour_ref"]
        return cls(first, None if ref is None else tuple(x.numpy() for x in ref), blob["extractors"],
                   tuple(blob["steps"]))


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
        self.part = lengths(self.name, preset, settings)[1]  # as its renderer's
        self._scene: int | None = None
        self._at = 0  # frames of the scene rendered so far
        self._lead: np.ndarray | None = None  # the last frame rendered, for the next piece's lead-in
        self._state: SceneState | None = None
        self._fitted: tuple[int, int] | None = None

    def _fit(self, rw: int, rh: int) -> None:
        """Size choices that depend on the render size: VAE tiling for large frames, and on a GPU
        with `batch` left automatic, the largest batch (≤ chunk) that fits in free memory beside
        the previous batch's decode, when decodes overlap the denoising."""
        self._fitted = (rw, rh)
        if rw * rh > 1024 * 1024:
            self.pipe.vae.enable_tiling()  # the VAE decoder's memory grows with the square of the side
        if self.settings.batch or self.pipe.device.type != "cuda":
            return
        per_frame = self.pipe.frame_memory(rw, rh, self.guidance > 1.0, self.cfg.temporal)
        free, _ = torch.cuda.mem_get_info(self.pipe.device)
        free -= self.pipe.decode_memory(rw, rh, self.cfg.chunk)
        anchors = 0 if self.temporal_off else 2
        fits = int(0.85 * free // max(per_frame, 1)) - anchors
        self.batch = max(1, min(self.cfg.chunk, fits))

    # -- per-scene state -------------------------------------------------------------------------

    def start_scene(self, scene: int) -> None:
        self._scene, self._at, self._lead, self._state = scene, 0, None, None
        self.first: Anchors | None = None  # the scene's first rendered frame
        self._opening: dict | None = None  # the extractors' state after the scene's first batch
        self._first_steps: tuple[torch.Tensor, ...] | None = None  # the first frame's step noise (turbo)
        self.colour_ref: tuple[np.ndarray, np.ndarray] | None = None
        self._start_piece(0)
        for ex in self.extractors.values():
            ex.reset()

    def _start_piece(self, piece: int) -> None:
        seed = scene_seed(self.settings.seed, self._scene, piece)
        self.generator = torch.Generator().manual_seed(seed)
        # LCM and TCD add noise at every step: drawn through the prior too, or it undoes the prior
        noisy = self.pipe.scheduler_name in NOISY_SCHEDULERS
        self.step_noise = StepNoise(self.cfg.noise_prior, seed, self.steps) if noisy else None
        self.carry: NoiseCarry | None = None
        self.last: Anchors | None = None  # the previous batch's last rendered frame

    def scene_state(self) -> SceneState | None:
        """What later pieces of the current scene need (None before its first batch)."""
        return self._state

    def prime(self, scene: int, at: int, state: bytes | None, lead: np.ndarray | None) -> None:
        """Get ready to render scene `scene` from frame `at` (0, or a piece's first frame) without
        having rendered what comes before: `state` is the scene's (`scene_state().to_bytes()` of
        whoever rendered its first batch), `lead` (H, W, 3) uint8 the input frame before `at`.
        At frame 0 the scene starts afresh, even if it is the one rendered last. At strength 0 no
        state is needed (nor made: frames pass as they are)."""
        self.start_scene(scene)
        if at == 0:
            return
        if not self.part or at % self.part or at < 0:
            raise ValueError(f"frame {at} of a scene: pieces of {self.part} frames begin only at their multiples")
        self._at, self._lead = at, lead
        self._state = None if state is None else SceneState.from_bytes(state, self.pipe.device)

    def render(self, frames: np.ndarray, scene: int) -> np.ndarray:
        """(F, H, W, 3) uint8 display-size frames of scene `scene`, following those of the last
        call for that scene (or, for a new scene, its first frames) → the same, stylized."""
        if scene != self._scene:
            self.start_scene(scene)
        if self.cfg.strength == 0:
            self._at += len(frames)
            return frames.copy()  # img2img at strength 0 is the source itself
        if self.host is not None:
            apply_adapters(self.host, self.cfg.adapters, self.allow_pickle)
            apply_turbo(self.host, self.turbo)  # with None too: takes another engine's turbo off the shared set
        out, i = [], 0
        while i < len(frames):  # a call that crosses into a new piece renders as two
            n = len(frames) - i
            if self.part:
                if self._at and self._at % self.part == 0:
                    self._enter_piece()
                n = min(n, self.part - self._at % self.part)
            out.append(self._render_piece(frames[i:i + n]))
            self._at, self._lead, i = self._at + n, frames[i + n - 1], i + n
        return np.concatenate(out)

    def _enter_piece(self) -> None:
        """Begin piece `_at // part` of the scene from `_state` and `_lead` (see the module docstring)."""
        state = self._state
        if state is None or self._lead is None:
            raise RuntimeError(f"piece {self._at // self.part} of scene {self._scene + 1}: its scene's first "
                               "batch and the frame before it are needed (DiffusionEngine.prime)")
        self._start_piece(self._at // self.part)
        self.first, self.colour_ref = state.first, state.colour_ref
        for k, ex in self.extractors.items():
            ex.reset(state.extractors.get(k))
        lead = self._small(self._lead[None])
        self.carry = NoiseCarry(lead[0], state.first.noise[0].cpu())
        if self.step_noise:
            self.step_noise.carries = [NoiseCarry(lead[0], n) for n in state.steps]
        if not self.temporal_off:
            self.last = self._diffuse(lead)[2]

    def _small(self, frames: np.ndarray) -> np.ndarray:
        """(F, H, W, 3) uint8 display-size frames → at render size."""
        h, w = frames.shape[1:3]
        rw, rh = render_size(w, h, self.settings.size or self.pipe.native_size, self.pipe.size_multiple)
        if self._fitted != (rw, rh):
            self._fit(rw, rh)
        return np.stack([cv2.resize(f, (rw, rh), interpolation=cv2.INTER_AREA) for f in frames])

    def _render_piece(self, frames: np.ndarray) -> np.ndarray:
        """Frames within one piece of the current scene → stylized, batch by batch; with the speed
        option `overlap_decode` each batch decodes while the next one denoises (`BatchDecoder`)."""
        h, w = frames.shape[1:3]
        small = self._small(frames)
        rh, rw = small.shape[1:3]
        keys = self._keyframe_positions(len(frames))
        out_small = np.empty_like(small)
        with BatchDecoder(self.pipe) as decoder:  # closed on errors too: no decode thread outlives the call
            decoding = None  # (positions, decode) of the batch decoding while the next one denoises
            for start in range(0, len(keys), self.batch):
                interrupt.check()  # a batch can take minutes: stop between batches if Ctrl-C was lost
                idx = keys[start:start + self.batch]
                latents = self._denoise(small[idx])  # while the batch before decodes
                if decoding is not None:
                    self._collect(out_small, small, *decoding)
                decoding = idx, decoder.submit(latents)
            self._collect(out_small, small, *decoding)
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

    def _denoise(self, small: np.ndarray) -> torch.Tensor:
        """(B, h, w, 3) uint8 at render size → clean latents (B, 4, h/8, w/8) to decode; keeps the
        anchors they yield, which is all the next batch needs of them."""
        latents, head, self.last = self._diffuse(small)
        if self.first is None:  # the scene's first batch: its extractors' state goes in the scene state
            self.first, self._opening = head, {k: ex.state() for k, ex in self.extractors.items()}
        return latents

    def _collect(self, out_small: np.ndarray, small: np.ndarray, idx: list[int], decoded: Future) -> None:
        """Put a batch's decoded frames (`decoded`, of the frames `small[idx]`) at `idx` of
        `out_small`, colour-anchored, in batch order (the scene's first batch sets the colour reference)."""
        out = (decoded.result().permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
        out_small[idx] = self._anchor_colour(out, small[idx])
        if self._state is None:  # the scene's first batch: what its later pieces start from
            self._state = SceneState(self.first, self.colour_ref, self._opening, self._first_steps or ())

    def _diffuse(self, small: np.ndarray) -> tuple[torch.Tensor, Anchors, Anchors]:
        """(B, h, w, 3) uint8 at render size → the clean latents (B, 4, h/8, w/8), not decoded,
        and the first and last frames as anchors."""
        pipe = self.pipe
        scale = pipe.vae_scale
        shape = (4, small.shape[1] // scale, small.shape[2] // scale)
        noise, self.carry = initial_noise(self.cfg.noise_prior, small, shape, self.generator, self.carry)
        controls = {k: ex(small) for k, ex in self.extractors.items()}
        images = torch.from_numpy(small).permute(0, 3, 1, 2).float().div_(255)
        steps = self.step_noise.draw(small, shape) if self.step_noise else None
        if steps is not None and self._first_steps is None:  # the scene's first frame
            self._first_steps = tuple(steps(k)[0] for k in range(self.steps - 1))
        res = pipe(images, controls, noise, prompt=self.prompt, negative=self.preset.prompt.negative,
                   scales=self.scales, strength=self.cfg.strength, steps=self.steps, guidance=self.guidance,
                   temporal=self.cfg.temporal, anchors=self._anchors(),
                   step_noise=steps,
                   decode=False)  # the caller's `BatchDecoder` decodes
        noise = noise.to(res.latents.device)

        def anchor(i: int) -> Anchors:
            return Anchors(res.latents[i:i + 1], noise[i:i + 1], {k: c[i:i + 1] for k, c in controls.items()})

        last = anchor(len(small) - 1)
        return res.latents, anchor(0) if len(small) > 1 else last, last  # one frame: one anchor, not two alike

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
