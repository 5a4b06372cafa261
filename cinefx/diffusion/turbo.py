"""Turbo: a few-step distilled LoRA on top of the base model, with the sampler it was distilled for.

Kinds (all for SD1.5; each LoRA is an ordinary adapter, so ControlNets, cross-frame attention,
noise priors, chunks, keyframes and a preset's own LoRAs work as before):

- ``lcm``: LCM-LoRA (Luo et al. 2023), ``latent-consistency/lcm-lora-sdv1-5``, LCMScheduler.
- ``hyper-sd``: Hyper-SD's N-step LoRAs (Ren et al. 2024), ``ByteDance/Hyper-SD`` file
  ``Hyper-SD15-{N}steps-lora.safetensors`` for N = 2, 4 or 8, with DDIM on trailing timesteps as
  its model card documents; deterministic.
- ``tcd``: TCD-LoRA (Zheng et al. 2024), ``h1t/TCD-SD15-LoRA``, TCDScheduler at γ = 0.3.

Each runs 2-8 steps without classifier-free guidance (guidance 1: the unconditional batch is not
run, half the UNet work of a guided step). LCM and TCD put fresh noise back at every step; it is
drawn through the scene's noise prior (`StepNoise`), correlated across frames as the initial noise
is, or the sampler would undo the prior at every step and the frames flicker.

The LoRA is found like the other weights (`models.resolve`): a local .safetensors file, a folder
holding the kind's file, or a hub id in the Hugging Face cache (downloaded when online). It loads
under its own adapter name, `TURBO_ADAPTER`, beside the preset's ``cinefx_{i}`` adapters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cinefx.errors import OptionError

TURBO_ADAPTER = "cinefx_turbo"
TURBO_GUIDANCE = 1.0  # guidance ≤ 1 runs no unconditional batch; these LoRAs were distilled without it


@dataclass(frozen=True)
class TurboKind:
    repo: str  # hub id of the LoRA
    weight: str  # its file, "{steps}" filled in for LoRAs distilled per step count
    sampler: str  # a `pipeline.FEW_STEP_SCHEDULERS` name
    steps: int  # default step count
    step_choices: tuple[int, ...]  # step counts it runs at


TURBO_KINDS = {
    "lcm": TurboKind("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors", "lcm", 4,
                     tuple(range(2, 9))),
    "hyper-sd": TurboKind("ByteDance/Hyper-SD", "Hyper-SD15-{steps}steps-lora.safetensors", "ddim-trailing", 4,
                          (2, 4, 8)),
    "tcd": TurboKind("h1t/TCD-SD15-LoRA", "pytorch_lora_weights.safetensors", "tcd", 4, tuple(range(2, 9))),
}


@dataclass(frozen=True)
class TurboLoRA:
    """A turbo LoRA found on disk or on the hub, for `kind` at `steps` steps."""

    kind: str
    steps: int
    source: object  # models.Resolved
    weight: str  # the file name inside a folder, cache snapshot or hub repo

    @property
    def sampler(self) -> str:
        return TURBO_KINDS[self.kind].sampler

    @property
    def file(self) -> Path | None:
        """The local file, or None when it is still to be downloaded."""
        r = self.source
        return r.path if r.how == "file" else None if r.how == "hub" else r.path / self.weight


def resolve_turbo(kind: str, steps: int | None = None, where: str | None = None, allow_pickle: bool = False):
    """(`models.Resolved` with role "turbo-lora", file name): where the `kind` LoRA for `steps`
    (default: the kind's) would load from: `where` (a file, a folder holding the kind's file, or a
    hub id) or the kind's hub repo. Never imports torch, never downloads. Raises OptionError for an
    unknown kind or a step count the kind was not distilled for."""
    from cinefx.diffusion.models import resolve

    spec = TURBO_KINDS.get(kind)
    if spec is None:
        raise OptionError(f"--turbo {str(kind)[:40]!r}: must be one of {', '.join(TURBO_KINDS)}")
    steps = spec.steps if steps is None else steps
    if steps not in spec.step_choices:
        choices = ", ".join(map(str, spec.step_choices))
        raise OptionError(f"--turbo-steps {steps} with --turbo {kind}: it runs at {choices} steps")
    weight = spec.weight.format(steps=steps)
    target = where or spec.repo
    if Path(target).expanduser().is_file():
        return resolve("turbo-lora", target, allow_pickle), weight
    return resolve("turbo-lora", target, allow_pickle, marker=weight), weight


def turbo_lora(kind: str, steps: int | None = None, where: str | None = None, allow_pickle: bool = False) -> TurboLoRA:
    """The `kind` LoRA, found (see `resolve_turbo`). Raises ModelError, one line naming the file to
    get, when it is nowhere to be had (offline and not cached, a missing path)."""
    from cinefx.diffusion.models import check_resolved

    found, weight = resolve_turbo(kind, steps, where, allow_pickle)
    check_resolved([found])
    return TurboLoRA(kind, TURBO_KINDS[kind].steps if steps is None else steps, found, weight)


def apply_turbo(host, lora: TurboLoRA | None) -> None:
    """Put `lora` on `host` (a diffusers SD pipeline) as the adapter `TURBO_ADAPTER` at scale 1,
    active together with whatever adapters are active (a preset's LoRAs keep their own scales), or
    take it off for None. A no-op when it is there already, so it may run before every render.

    Call it after `adapters.apply_adapters`, whose `set_adapters` activates the preset's adapters
    only. The LoRA is loaded again when something unloaded it (apply_adapters unloads every LoRA
    when the preset's change)."""
    from cinefx.diffusion.adapters import inspect_file
    from cinefx.diffusion.models import loading
    from cinefx.errors import AdapterError

    unet = host.unet
    loaded = TURBO_ADAPTER in getattr(unet, "peft_config", {})
    if loaded and getattr(host, "_cinefx_turbo", None) != lora:
        host.delete_adapters(TURBO_ADAPTER)
        loaded = False
    if lora is None:
        host._cinefx_turbo = None
        return
    active = _active(host)
    want = [*(a for a in active if a != TURBO_ADAPTER), TURBO_ADAPTER]  # loading activates the new one alone
    if loaded and active == want:
        return
    if not loaded:
        host._cinefx_turbo = None
        if lora.file is not None:  # the resolver already refused a pickle not allowed
            if inspect_file(lora.file, allow_pickle=True)[0] not in ("lora", "unknown"):
                raise AdapterError(f"{lora.file}: --turbo {lora.kind} needs a LoRA file, not an embedding")
        r = lora.source
        with loading(r):
            if r.how == "file":
                host.load_lora_weights(str(r.path), adapter_name=TURBO_ADAPTER)
            else:
                host.load_lora_weights(r.where, weight_name=lora.weight, adapter_name=TURBO_ADAPTER,
                                       local_files_only=r.how != "hub")
        host._cinefx_turbo = lora
    for m in _lora_layers(host):
        m.set_adapter(want)  # a layer without one of them skips it, as with diffusers' set_adapters
        m.set_scale(TURBO_ADAPTER, 1.0)  # the others' scales stay as the preset set them


def _lora_layers(host):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for model in (host.unet, host.text_encoder) for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _active(host) -> list[str]:
    """The adapters active on `host`, in order (diffusers activates the same ones on every layer)."""
    names = []
    for m in _lora_layers(host):
        names += [a for a in m.active_adapters if a not in names]
    return names


def step_seed(seed: int, step: int) -> int:
    """Seed of step `step`'s noise generator in a scene seeded `seed`: independent of the initial
    noise's stream and of the other steps'."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest(), "little") >> 1


class StepNoise:
    """The noise LCM and TCD add after each step but the last, drawn through the scene's noise
    prior: a stream per step, each with its own generator and carry, advanced batch after batch as
    the initial noise is (`noise.initial_noise`). Frames that share initial noise share their step
    noise too, and a scene rendered in chunks gets the noise it would get at once.

    Make one per scene (`seed`: the scene's seed) for a run of `steps` steps."""

    def __init__(self, prior: str, seed: int, steps: int):
        import torch

        self.prior = prior
        self.generators = [torch.Generator().manual_seed(step_seed(seed, k)) for k in range(steps - 1)]
        self.carries = [None] * (steps - 1)

    def draw(self, frames, shape: tuple[int, int, int]) -> Callable[[int], object]:
        """Every step's noise for `frames` (F, H, W, 3) uint8, the next batch of the scene; returns
        `step_noise(i)` → (F, C, h, w) float32 for the pipeline (`shape` = (C, h, w))."""
        from cinefx.diffusion.noise import initial_noise

        noises = []
        for k, g in enumerate(self.generators):
            n, self.carries[k] = initial_noise(self.prior, frames, shape, g, self.carries[k])
            noises.append(n)
        return noises.__getitem__
