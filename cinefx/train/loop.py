"""The training loop for `cinefx train-preset`: LoRA or textual inversion on SD1.5.

Read it top to bottom: models → what trains → cached latents → optimizer → steps → checkpoint.
Everything a resumed run needs (trainable weights, optimizer, LR schedule, both RNG states, the
step) is in each checkpoint, so `resume` continues exactly where the run stopped.

Defaults (`TrainConfig`) follow what the kohya sd-scripts and diffusers training examples use for
a style from 20–50 images: LoRA rank 16, alpha 16, learning rate 1e-4, AdamW; textual inversion
learning rate 5e-4 over 4 vectors; Min-SNR weighting γ = 5 (Hang et al. 2023); 10 repeats per
image per epoch, as kohya folders usually say.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cinefx.errors import CinefxError, OptionError
from cinefx.train.data import Dataset, bucket_sizes, load_image, nearest_bucket

METHODS = ("lora", "ti")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")


@dataclass(frozen=True)
class TrainConfig:
    method: str = "lora"
    model: str = ""  # base model spec (see cinefx.diffusion.models); "" = the default
    trigger: str = "<cinefx-look>"
    steps: int = 0  # 0 = images × repeats × epochs ÷ batch
    epochs: int = 10
    repeats: int = 0  # 0 = the dataset's own (kohya folder numbers), else this for every image
    batch: int = 1
    resolution: int = 512
    rank: int = 16
    alpha: float = 16.0
    vectors: int = 4  # textual inversion: embedding vectors behind the trigger token
    lr: float = 0.0  # 0 = 1e-4 for LoRA, 5e-4 for textual inversion
    warmup: int = 0
    min_snr_gamma: float = 5.0  # 0 turns Min-SNR weighting off
    noise_offset: float = 0.0
    flip: bool = True
    random_crop: bool = False
    seed: int = 0
    checkpoint_every: int = 0  # 0 = only at the end
    precision: str = "auto"
    gradient_checkpointing: bool = False

    def learning_rate(self) -> float:
        return self.lr or (1e-4 if self.method == "lora" else 5e-4)

    def check(self) -> None:
        if self.method not in METHODS:
            raise OptionError(f"--method {self.method!r}: must be one of {', '.join(METHODS)}")
        for name in ("epochs", "batch", "rank", "vectors"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.resolution % 64 or self.resolution < 64:
            raise OptionError(f"--resolution {self.resolution}: must be a multiple of 64")


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)


class TrainingDiverged(CinefxError, FloatingPointError):
    """The loss went NaN/inf for several steps running."""


def total_steps(cfg: TrainConfig, data: Dataset) -> int:
    per_epoch = sum(cfg.repeats or i.repeats for i in data.items)
    return cfg.steps or max(1, math.ceil(per_epoch * cfg.epochs / cfg.batch))


def train(cfg: TrainConfig, data: Dataset, work: Path, resume: bool = False,
          progress: Callable[[int, int, float], None] | None = None, stop_after: int | None = None):
    """Train and return (host pipeline with the trained adapter in it, TrainState).
    `stop_after` ends the run early at that step (as an interruption would), for tests."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from cinefx.diffusion.models import ModelSpec, load_components, pick_device_dtype

    cfg.check()
    # 1. models, frozen; precision chosen once: weights in bf16/fp16 on a GPU, trained ones in fp32
    device, dtype = pick_device_dtype(cfg.precision)
    host = load_components(ModelSpec(base=cfg.model or None), (), device, dtype).host
    unet, vae, text_encoder, tokenizer = host.unet, host.vae, host.text_encoder, host.tokenizer
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(host.scheduler.config)
    torch.manual_seed(cfg.seed)

    # 2. what trains
    if cfg.method == "lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                    target_modules=list(LORA_TARGETS)))
        params = [p for p in unet.parameters() if p.requires_grad]
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
    else:
        tokens = [cfg.trigger] + [f"{cfg.trigger}_{i}" for i in range(1, cfg.vectors)]
        if tokenizer.add_tokens(tokens) != len(tokens):
            raise OptionError(f"--trigger {cfg.trigger!r}: already a word of the tokenizer; pick a new one like <my-look>")
        text_encoder.resize_token_embeddings(len(tokenizer))
        ids = tokenizer.convert_tokens_to_ids(tokens)
        emb = text_encoder.get_input_embeddings().weight
        with torch.no_grad():  # start from a real word's embedding rather than noise
            seed_id = tokenizer.encode("film", add_special_tokens=False)[:1] or [0]
            emb[ids] = emb[seed_id[0]].clone()
        emb.requires_grad_(True)
        frozen_rows = emb.detach().clone()
        new_rows = torch.zeros(emb.shape[0], dtype=torch.bool, device=emb.device)
        new_rows[ids] = True
        params = [emb]
    for p in params:
        p.data = p.data.float()  # trainable weights stay fp32 whatever the model's precision

    # 3. cached latents: every image (and its mirror when flipping) encoded once, centre-cropped
    buckets = bucket_sizes(cfg.resolution)
    rng = np.random.default_rng(cfg.seed)
    cache: list[tuple[torch.Tensor, str, tuple[int, int]]] = []
    with torch.no_grad():
        for item in data.items:
            bucket = nearest_bucket(item.size, buckets)
            for flip in ((False, True) if cfg.flip else (False,)):
                img = load_image(item, bucket, rng, random_crop=False, flip=False)
                if flip:
                    img = img[:, ::-1].copy()
                x = torch.from_numpy(img).permute(2, 0, 1)[None].to(device, dtype)
                z = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
                for _ in range(cfg.repeats or item.repeats):
                    cache.append((z[0].float().cpu(), item.caption, bucket))

    # 4. optimizer and schedule (constant after a linear warm-up)
    steps = total_steps(cfg, data)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate(), weight_decay=0.0 if cfg.method == "ti" else 1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    gen = torch.Generator().manual_seed(cfg.seed)
    state = TrainState()
    if resume:
        state = _load_checkpoint(work, params, opt, sched, gen, rng)

    # 5. the steps
    bad = 0
    unet.train()
    while state.step < steps and (stop_after is None or state.step < stop_after):
        pick = _batch(cache, cfg.batch, rng)
        z0 = torch.stack([cache[i][0] for i in pick]).to(device)
        noise = torch.randn(z0.shape, generator=gen)
        if cfg.noise_offset:  # brighter brights, darker darks (Guttenberg's offset noise)
            noise += cfg.noise_offset * torch.randn((z0.shape[0], z0.shape[1], 1, 1), generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (z0.shape[0],), generator=gen)
        noise, t = noise.to(device), t.to(device)
        zt = noise_scheduler.add_noise(z0, noise, t).to(dtype)
        ids = tokenizer([cache[i][1] for i in pick], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
        with torch.set_grad_enabled(cfg.method == "ti"):
            text = text_encoder(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=text.to(dtype)).sample.float()
        target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
            noise_scheduler.get_velocity(z0, noise, t)
        loss = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            snr = compute_snr(noise_scheduler, t)
            weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
            if noise_scheduler.config.prediction_type == "v_prediction":
                weight = torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1)
            loss = loss * weight
        loss = loss.mean()
        if not torch.isfinite(loss):  # NaN guard: skip the step; give up if it keeps happening
            bad += 1
            opt.zero_grad(set_to_none=True)
            if bad >= 5:
                raise TrainingDiverged(f"loss is {loss.item()} for 5 steps running at step {state.step}; "
                                       "lower --lr or use --precision fp32")
            continue
        bad = 0
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if cfg.method == "ti":  # only the new tokens' rows may change
            with torch.no_grad():
                emb[~new_rows] = frozen_rows[~new_rows].to(emb.dtype)
        state.step += 1
        state.losses.append(loss.item())
        if progress:
            progress(state.step, steps, state.losses[-1])
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            _save_checkpoint(work, state, params, opt, sched, gen, rng)
    unet.eval()
    if state.step < steps:
        _save_checkpoint(work, state, params, opt, sched, gen, rng)
    return host, state


def _batch(cache, size: int, rng: np.random.Generator) -> list[int]:
    """`size` samples of one bucket (latents of different shapes cannot stack)."""
    first = int(rng.integers(len(cache)))
    same = [i for i, c in enumerate(cache) if c[2] == cache[first][2]]
    return [first] + [int(i) for i in rng.choice(same, size - 1)] if size > 1 else [first]


def _save_checkpoint(work: Path, state: TrainState, params, opt, sched, gen, rng) -> None:
    from safetensors.torch import save_file

    d = work / "checkpoint"
    tmp = work / "checkpoint.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({f"p{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}, str(tmp / "params.safetensors"))
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": state.step, "losses": state.losses,
                                                "rng": rng.bit_generator.state}, default=int))
    if d.exists():
        import shutil

        shutil.rmtree(d)
    tmp.rename(d)


def _load_checkpoint(work: Path, params, opt, sched, gen, rng) -> TrainState:
    from safetensors.torch import load_file

    d = work / "checkpoint"
    if not (d / "state.json").is_file():
        raise OptionError(f"--resume: no checkpoint in {work}")
    saved = load_file(str(d / "params.safetensors"))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(saved[f"p{i}"].to(p.device, p.dtype))
    # our own file, written above; weights_only keeps torch.load from running arbitrary code anyway
    blob = torch.load(d / "optimizer.pt", weights_only=True)
    opt.load_state_dict(blob["opt"])
    sched.load_state_dict(blob["sched"])
    gen.set_state(blob["gen"])
    meta = json.loads((d / "state.json").read_text())
    rng.bit_generator.state = meta["rng"]
    return TrainState(step=meta["step"], losses=list(meta["losses"]))


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
