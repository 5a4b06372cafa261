"""The temporal img2img ControlNet pipeline: SD1.5 + ControlNets over a batch of frames at once.

One call renders F frames of one scene (Control-A-Video, Chen et al. 2023):
  1. check inputs
  2. encode the prompt (cached), for classifier-free guidance
  3. pick the timesteps img2img `strength` leaves
  4. encode the frames to latents (VAE, in slices)
  5. noise the latents with the frames' prior noise; prepend the anchor frames
  6. denoise with spatial-temporal attention installed on UNet and ControlNets; anchors are
     re-imposed at every step from their already-rendered clean latents, so the batch is drawn
     towards frames the viewer has already seen (no seam between chunks). Classifier-free
     guidance runs the unconditional batch only when guidance > 1.
  7. decode the new frames (VAE, in slices), or leave that to a `BatchDecoder`, which decodes
     a batch while the caller denoises the next (that needs only this batch's latents, as anchors)

Few-step samplers for distilled LoRAs (`cinefx.diffusion.turbo`): LCM and TCD put fresh noise
back at every step but the last. The pipeline takes that noise from the caller (`step_noise`), who
draws it through the scene's noise prior as the initial noise is: noise drawn per frame would
make frames that should agree differ at every step, i.e. flicker.

Anchors are rendered frames of the same scene (its first frame, the previous chunk's last ones)
given as clean latents with their noise and control maps: they are never changed, only attended to.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from cinefx.diffusion.attention import TemporalState, temporal_attention


@dataclass(frozen=True)
class Anchors:
    """Frames already rendered, as conditioning: latents (A, 4, h, w), noise (A, 4, h, w),
    controls kind → (A, 3, H, W)."""

    latents: torch.Tensor
    noise: torch.Tensor
    controls: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.latents.shape[0]


@dataclass(frozen=True)
class RenderOutput:
    images: torch.Tensor | None  # (F, 3, H, W) float in [0, 1]; None when called with decode=False
    latents: torch.Tensor  # (F, 4, h, w) clean latents, for the next call's anchors


SCHEDULERS = ("dpm++", "ddim", "euler", "unipc")
# Samplers of the distilled few-step LoRAs: Latent Consistency Models (Luo et al. 2023), Trajectory
# Consistency Distillation (Zheng et al. 2024), and DDIM with trailing timesteps, which Hyper-SD's
# N-step LoRAs document (Ren et al. 2024). The first two re-noise at every step.
FEW_STEP_SCHEDULERS = ("lcm", "tcd", "ddim-trailing")
NOISY_SCHEDULERS = ("lcm", "tcd")
TCD_ETA = 0.3  # TCD's γ: how far back each step re-noises (its paper's and diffusers' default)


# What SD1.5's own scheduler config sets, for configs that leave the keys out (one written by
# another scheduler family; diffusers' defaults for a single-file checkpoint). DDIM's own defaults
# are for pixel-space models: clipping its predicted clean latents to [-1, 1] cuts SD's latents,
# which reach well beyond it.
SD_SCHEDULER_DEFAULTS = {"clip_sample": False, "set_alpha_to_one": False}


def make_scheduler(name: str, config):
    """A fresh scheduler of the named family (`SCHEDULERS`, `FEW_STEP_SCHEDULERS`) from the model's
    scheduler config. The families draw no noise of their own (LCM and TCD take theirs from the
    caller, see `consistency_step`), which `--seed` reproducibility relies on."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler,
                           TCDScheduler, UniPCMultistepScheduler)

    classes = {"dpm++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
               "unipc": UniPCMultistepScheduler, "lcm": LCMScheduler, "tcd": TCDScheduler,
               "ddim-trailing": DDIMScheduler}
    extra = {"timestep_spacing": "trailing"} if name == "ddim-trailing" else {}
    return classes[name].from_config({**SD_SCHEDULER_DEFAULTS, **config, **extra})


def img2img_timesteps(scheduler, steps: int, strength: float, device=None) -> torch.Tensor:
    """The timesteps img2img at `strength` runs, out of `steps`: the last ⌊steps·strength⌋, as
    diffusers' img2img pipelines count them (`get_timesteps`), but at least one for any strength
    > 0. Sets the scheduler's timesteps and begin index.

    LCM and TCD instead place `steps` timesteps on the part of their distillation schedule that
    `strength` leaves, as diffusers' LatentConsistencyModelImg2ImgPipeline does, so a 4-step run
    keeps its 4 steps (fewer only where that part has fewer entries)."""
    origin = getattr(scheduler.config, "original_inference_steps", None)
    if origin is not None:
        strength = max(strength, 1 / origin)  # at least one entry of the schedule
        scheduler.set_timesteps(min(steps, int(origin * strength)), device=device, strength=strength)
        return scheduler.timesteps
    scheduler.set_timesteps(steps, device=device)
    keep = min(max(1, int(steps * strength)), steps)
    start = (steps - keep) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def consistency_step(name: str, scheduler, eps: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor | None,
                     x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """One LCM or TCD step from latents `x` (B, 4, h, w) at timestep `t` to `t_next`, re-noised
    with the given `noise` (B, 4, h, w); on the last step (`t_next` None) no noise is added.
    The same arithmetic as diffusers' LCMScheduler.step / TCDScheduler.step (epsilon prediction),
    which draw the noise themselves from a generator instead."""
    ac = scheduler.alphas_cumprod.to(x.device)
    a_t = ac[t]
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if name == "lcm":
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        denoised = c_out * x0 + c_skip * x
        if t_next is None:
            return denoised
        return ac[t_next].sqrt() * denoised + (1 - ac[t_next]).sqrt() * noise
    prev = t_next if t_next is not None else torch.zeros_like(t)
    s = torch.floor((1 - TCD_ETA) * prev).long()  # in float32, as diffusers rounds it
    x_s = ac[s].sqrt() * x0 + (1 - ac[s]).sqrt() * eps
    if t_next is None:
        return x_s
    keep = ac[prev] / ac[s]
    return keep.sqrt() * x_s + (1 - keep).sqrt() * noise


class TemporalControlPipeline:
    """Holds the loaded modules; `__call__` renders one batch of frames of one scene."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config, controlnets: dict,
                 scheduler: str = "dpm++", vae_batch: int = 8, convert_prompt=None, speed=None):
        # convert_prompt: expands multi-vector textual-inversion tokens (diffusers' loader mixin);
        # speed: the `models.SpeedOptions` the modules run with (`models.apply_speed`), or None
        self.convert_prompt = convert_prompt or (lambda text, tokenizer: text)
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.controlnets = controlnets
        self.scheduler_config = scheduler_config
        self.scheduler_name = scheduler
        self.vae_batch = vae_batch
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.state = TemporalState()
        self.compiled = bool(speed and speed.compile)  # see `models.apply_speed`
        # whether the engine decodes batch k (`BatchDecoder`) while it denoises batch k+1
        self.overlap_decode = bool(speed and speed.overlap_decode)
        self._side_stream = None  # the CUDA stream decodes overlap on: one per pipeline, see `side_stream`
        self._prompt_cache: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def from_components(cls, comps, scheduler: str = "dpm++") -> TemporalControlPipeline:
        host = comps.host
        return cls(host.unet, host.vae, host.text_encoder, host.tokenizer, host.scheduler.config,
                   comps.controlnets, scheduler, convert_prompt=getattr(host, "maybe_convert_prompt", None),
                   speed=comps.speed)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def size_multiple(self) -> int:
        """Frame sides must be multiples of this: the VAE factor × the UNet's downsampling."""
        return self.vae_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The short side the base model was trained at (512 for SD1.5)."""
        sample = self.unet.config.sample_size
        return self.vae_scale * (sample if isinstance(sample, int) else min(sample))

    # -- steps -----------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, negative: str) -> torch.Tensor:
        """(2, L, D) text embeddings: [negative, positive]. Cached: a scene's chunks share them."""
        key = (prompt, negative)
        if key not in self._prompt_cache:
            texts = [self.convert_prompt(t, self.tokenizer) for t in (negative, prompt)]
            tok = self.tokenizer(texts, padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt")
            with torch.inference_mode():
                emb = self.text_encoder(tok.input_ids.to(self.device))[0]
            self._prompt_cache = {key: emb.to(self.dtype)}
        return self._prompt_cache[key]

    def clear_prompt_cache(self) -> None:
        """Adapters (LoRA, textual inversion) change the text encoder: cached embeddings go stale."""
        self._prompt_cache = {}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(F, 3, H, W) in [0, 1] → (F, 4, H/8, W/8) latents. The posterior mean, not a sample:
        sampling would add per-frame noise to every frame, i.e. flicker."""
        out = []
        for part in images.split(self.vae_batch):
            x = part.to(self.device, self.dtype) * 2 - 1
            out.append(self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor)
        # one memory layout whatever the VAE's (channels-last): a compiled UNet guards on strides
        return torch.cat(out).contiguous()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(F, 4, h, w) → (F, 3, H, W) float32 in [0, 1]."""
        out = []
        for part in latents.split(self.vae_batch):
            x = self.vae.decode(part / self.vae.config.scaling_factor).sample
            out.append(((x.float() + 1) / 2).clamp_(0, 1))
        return torch.cat(out)

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, conds: dict[str, torch.Tensor],
                      scales: dict[str, float]) -> torch.Tensor:
        """One UNet evaluation guided by every ControlNet (their residuals summed): x (B, 4, h, w)
        latents, text (B, L, D), conds kind → (B, 3, H, W); returns the predicted noise (B, 4, h, w)."""
        self._dynamic_batch(x, text, *conds.values())
        down, mid = None, None
        for kind, net in self.controlnets.items():
            d, md = net(x, t, encoder_hidden_states=text, controlnet_cond=conds[kind],
                        conditioning_scale=scales.get(kind, 1.0), return_dict=False)
            down = d if down is None else [p + q for p, q in zip(down, d)]
            mid = md if mid is None else mid + md
        if down is not None:
            self._dynamic_batch(*down, mid)  # the UNet adds them to its own activations
        return self.unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]

    def _dynamic_batch(self, *tensors: torch.Tensor) -> None:
        """Compiled modules: trace the batch size as a symbol, so one graph serves every batch of a
        scene (with or without anchors, a short last chunk) instead of one compile per size."""
        if self.compiled:
            for t in tensors:
                torch._dynamo.maybe_mark_dynamic(t, 0)

    def frame_memory(self, width: int, height: int, cfg: bool, temporal: str) -> int:
        """Peak CUDA bytes one more frame costs in a denoising step, measured: a UNet + ControlNets
        evaluation at batch 1 and 2 (× CFG), whose difference is the per-frame cost."""
        torch.cuda.synchronize(self.device)
        peaks = []
        for frames in (1, 2):
            rows = frames * (2 if cfg else 1)
            x = torch.randn(rows, 4, height // self.vae_scale, width // self.vae_scale, device=self.device, dtype=self.dtype)
            text = torch.zeros(rows, self.tokenizer.model_max_length, self.text_encoder.config.hidden_size,
                               device=self.device, dtype=self.dtype)
            cond = torch.zeros(rows, 3, height, width, device=self.device, dtype=self.dtype)
            t = torch.tensor(500, device=self.device)
            self.state.mode, self.state.frames, self.state.groups = temporal, frames, 2 if cfg else 1
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            with torch.inference_mode(), temporal_attention([self.unet, *self.controlnets.values()], self.state):
                self.predict_noise(x, t, text, {k: cond for k in self.controlnets}, {})
            peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
            del x, text, cond
        return max(peaks[1] - peaks[0], peaks[0] // 2)

    def decode_memory(self, width: int, height: int, frames: int) -> int:
        """Peak CUDA bytes a decode of up to `frames` frames in flight (`BatchDecoder`) holds
        beside the denoising; 0 without `overlap_decode`, where the decode runs after the denoising
        has freed its memory. Measured: the VAE decoding one slice (≤ `vae_batch` frames), plus the
        float32 images of the other frames twice (the slices' and their concatenation)."""
        if not self.overlap_decode:
            return 0
        s = self.vae_scale
        part = min(frames, self.vae_batch)
        torch.cuda.synchronize(self.device)
        latents = torch.zeros(part, 4, height // s, width // s, device=self.device, dtype=self.dtype)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        with torch.inference_mode():
            self.decode_latents(latents)
        return torch.cuda.max_memory_allocated(self.device) - base + 2 * (frames - part) * 3 * width * height * 4

    def side_stream(self) -> torch.cuda.Stream:
        """The CUDA stream overlapped decodes run on. One for the pipeline's life: the caching
        allocator keeps a stream's freed blocks for that stream, so a stream per render would
        strand a decode's worth of cached memory on each."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return self._side_stream

    # -- the call --------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor, controls: dict[str, torch.Tensor], noise: torch.Tensor, *,
                 prompt: str, negative: str = "", scales: dict[str, float] | None = None,
                 strength: float = 0.55, steps: int = 20, guidance: float = 7.5, temporal: str = "full",
                 anchors: Anchors | None = None, step_noise=None, decode: bool = True) -> RenderOutput:
        """Render `frames` (F, 3, H, W) in [0, 1] with control maps kind → (F, 3, H, W) and initial
        noise (F, 4, H/8, W/8); see the module docstring for the steps. `step_noise(i)` gives the
        noise (F, 4, H/8, W/8) the LCM and TCD samplers add after step i (0-based, all but the last
        step of the run); other samplers add none. With `decode` False the images are left to the
        caller (`BatchDecoder`) and `images` is None."""
        # 1. check inputs
        n, _, h, w = frames.shape
        m = self.size_multiple
        if h % m or w % m:
            raise ValueError(f"frames are {w}x{h}: both sides must be multiples of {m}")
        if noise.shape != (n, 4, h // self.vae_scale, w // self.vae_scale):
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {(n, 4, h // self.vae_scale, w // self.vae_scale)}")
        missing = set(self.controlnets) - set(controls)
        if missing:
            raise ValueError(f"no control maps given for {sorted(missing)}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength {strength}: must be in (0, 1]")
        scales = {k: (scales or {}).get(k, 1.0) for k in self.controlnets}
        noisy = self.scheduler_name in NOISY_SCHEDULERS
        if noisy and step_noise is None:
            raise ValueError(f"the {self.scheduler_name} sampler adds noise at every step: pass step_noise")
        cfg = guidance > 1.0
        # 2. encode the prompt
        emb = self.encode_prompt(prompt, negative)
        if not cfg:
            emb = emb[1:]
        # 3. timesteps
        scheduler = make_scheduler(self.scheduler_name, self.scheduler_config)
        timesteps = img2img_timesteps(scheduler, steps, strength, self.device)
        # 4. encode frames
        clean = self.encode_images(frames)
        noise = noise.to(self.device, self.dtype)
        # 5. initial latents, anchors in front
        a = len(anchors) if anchors is not None else 0
        latents = scheduler.add_noise(clean, noise, timesteps[:1])
        conds = {k: controls[k].to(self.device, self.dtype) for k in self.controlnets}
        if a:
            a_clean, a_noise = anchors.latents.to(self.device, self.dtype), anchors.noise.to(self.device, self.dtype)
            latents = torch.cat([scheduler.add_noise(a_clean, a_noise, timesteps[:1]), latents])
            conds = {k: torch.cat([anchors.controls[k].to(self.device, self.dtype), c]) for k, c in conds.items()}
        total = n + a
        groups = 2 if cfg else 1
        text = emb.repeat_interleave(total, dim=0)  # (G·F, L, D): rows grouped [uncond…, cond…]
        conds = {k: c.repeat(groups, 1, 1, 1) for k, c in conds.items()}
        # 6. denoise
        self.state.mode, self.state.frames, self.state.groups = temporal, total, groups
        with temporal_attention([self.unet, *self.controlnets.values()], self.state):
            for i, t in enumerate(timesteps):
                if a:
                    latents[:a] = scheduler.add_noise(a_clean, a_noise, t.reshape(1))
                x = scheduler.scale_model_input(torch.cat([latents] * groups), t)
                eps = self.predict_noise(x, t, text, conds, scales)
                if cfg:
                    uncond, cond = eps.chunk(2)
                    eps = uncond + guidance * (cond - uncond)
                if not noisy:
                    latents = scheduler.step(eps, t, latents, return_dict=False)[0]
                elif i == len(timesteps) - 1:
                    latents = consistency_step(self.scheduler_name, scheduler, eps, t, None, latents, None)
                else:
                    z = self._step_noise(step_noise(i), latents, a)
                    latents = consistency_step(self.scheduler_name, scheduler, eps, t, timesteps[i + 1], latents, z)
        # 7. decode the new frames
        latents = latents[a:]
        return RenderOutput(images=self.decode_latents(latents) if decode else None, latents=latents)

    def _step_noise(self, noise: torch.Tensor, latents: torch.Tensor, a: int) -> torch.Tensor:
        """The caller's step noise (F, 4, h, w) for the new frames, behind zeros for the `a` anchors
        (re-imposed from their clean latents before the next step, so theirs is never used)."""
        want = (latents.shape[0] - a, *latents.shape[1:])
        if tuple(noise.shape) != want:
            raise ValueError(f"step noise has shape {tuple(noise.shape)}; expected {want}")
        noise = noise.to(latents.device, latents.dtype)
        return torch.cat([noise.new_zeros((a, *want[1:])), noise]) if a else noise


class BatchDecoder:
    """Decodes the batches a caller denoises, with the pipeline's VAE. With `pipe.overlap_decode` a
    batch decodes on a thread of its own while the caller denoises the next, which needs only this
    one's latents: on a GPU the decode's kernels run on a side stream beside the denoising's, and
    the host keeps launching the denoising's meanwhile. The images are copied to host memory on
    that thread too, so the caller never waits for its own stream to collect them. On a CPU the
    same thread runs, without a stream. Without `overlap_decode`, `submit` decodes in line, so the
    caller's loop is the same both ways, and the values are those of `decode_latents` either way.

    Memory: the one thread decodes one batch at a time, and a decoded batch leaves the GPU, so
    beside the denoising the GPU holds one batch's decode at most (and the latents of batches
    waiting their turn): `TemporalControlPipeline.decode_memory`, which the engine leaves free when
    it sizes batches. `close()` (or leaving a `with` block) waits for a decode that is running,
    drops those not yet started, and ends the thread."""

    def __init__(self, pipe: TemporalControlPipeline):
        self.pipe = pipe
        overlap = pipe.overlap_decode
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cinefx-decode") if overlap else None
        self._stream = pipe.side_stream() if overlap and pipe.device.type == "cuda" else None

    def submit(self, latents: torch.Tensor) -> Future:
        """Decode `latents` (F, 4, h, w), which the caller's current stream produced. The future's
        result is the images (F, 3, H, W) float32 in [0, 1] in host memory; an exception raised
        while decoding is raised by its `result()`."""
        if self._pool is None:
            done = Future()
            done.set_result(self._decode(latents, None))
            return done
        ready = None
        if self._stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.pipe.device))  # now, not when the thread starts
        return self._pool.submit(self._decode, latents, ready)

    def _decode(self, latents: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
        with torch.inference_mode():  # grad mode is per thread: the caller's does not reach here
            if self._stream is None:
                return self.pipe.decode_latents(latents).cpu()
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                # made on the caller's stream: keep its memory from reuse there until this decode has read it
                latents.record_stream(self._stream)
                return self.pipe.decode_latents(latents).cpu()  # waits for this stream only

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
