"""Which engine renders — `grade` (no model), `diffusion` (SD1.5 + ControlNet), or `auto` — the
renderer registry (name → class) and the model cache.

`auto` picks diffusion only when it can really run well: torch importable, a CUDA GPU, and every
model weight present locally (a folder, a file or the Hugging Face cache; `auto` never starts a
multi-gigabyte download). Otherwise it grades, and the run says why. `--engine diffusion` is
honoured on a CPU too (slowly), and downloads missing hub weights where a network exists.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from cinefx.errors import EngineUnavailableError, OptionError
from cinefx.renderers import DiffusionRenderer, EngineSettings, GradeRenderer

RENDERERS = {"grade": GradeRenderer, "diffusion": DiffusionRenderer}
ENGINES = ("auto", *RENDERERS)


@dataclass(frozen=True)
class EngineChoice:
    name: str  # "grade" or "diffusion"
    reason: str


def _missing_packages() -> list[str]:
    return [f"python package {p!r} is not installed (pip install 'cinefx[diffusion]')"
            for p in ("torch", "diffusers", "transformers") if importlib.util.find_spec(p) is None]


def choose_engine(requested: str, models=None, controls: tuple[str, ...] = ("canny",),
                  gpus: str | None = None) -> EngineChoice:
    """Decide the engine; raises `EngineUnavailableError` / `ModelError` for an explicit diffusion
    request that cannot run, with what is missing and how to get it. `gpus` says where the GPUs
    that count are, when not on this machine (a cluster's: "the cluster has 4 GPUs"); None asks
    torch here."""
    from cinefx.diffusion.models import ModelSpec, check_resolved, resolve_models

    if requested not in ENGINES:
        raise OptionError(f"--engine {requested!r}: must be one of {', '.join(ENGINES)}")
    if requested == "grade":
        return EngineChoice("grade", "requested with --engine grade")
    models = models or ModelSpec()
    missing = _missing_packages()
    if requested == "diffusion":
        if missing:
            raise EngineUnavailableError(f"--engine diffusion: {missing[0]}; or use --engine grade")
        check_resolved(resolve_models(models, controls))
        import torch

        where = "GPU" if torch.cuda.is_available() else "CPU (no CUDA GPU: slow)"
        return EngineChoice("diffusion", f"requested with --engine diffusion, on the {where}")
    why = list(missing)
    if not why:
        found = resolve_models(models, controls)
        absent = [r.role for r in found if r.how == "hub"]
        if absent:
            why.append(f"model weights not downloaded ({', '.join(absent)}; see `cinefx models`)")
        why += [f"{r.role} {r.spec!r}: {r.detail}" for r in found if r.how == "missing"]
    if not why and gpus is None:  # only now import torch (hundreds of MB): a grade run without weights never needs it
        import torch

        gpus = "GPU" if torch.cuda.is_available() else ""
    if not why and not gpus:
        why.append("no CUDA GPU (diffusion on a CPU is very slow; force it with --engine diffusion)")
    if why:
        return EngineChoice("grade", "diffusion not usable: " + "; ".join(why))
    return EngineChoice("diffusion", f"{gpus} and model weights found")


class ModelCache:
    """Loaded model sets keyed by what was loaded and how it runs: (models, controls, device, dtype,
    `SpeedOptions`; a compiled set cannot be uncompiled, so other options get another set). A batch over
    many files, or several engines in one process, load a set once. Adapters are not part of the
    key: every engine sharing a set puts its own adapters on it before each render
    (`DiffusionEngine.render`), so engines may alternate in any order with one copy of the weights.
    `keep` sets are held; loading another frees the oldest first."""

    def __init__(self, keep: int = 1):
        self.keep = keep
        self.sets: dict = {}

    def get(self, models, controls: tuple[str, ...], device, dtype, speed=None):
        """The set for these, loaded once and run with `speed` (`models.SpeedOptions()` when None)."""
        from cinefx.diffusion.models import SpeedOptions, apply_speed, load_components

        speed = speed or SpeedOptions()
        key = (models, controls, str(device), str(dtype), speed)
        if key not in self.sets:
            while len(self.sets) >= self.keep:
                self.sets.pop(next(iter(self.sets)))
            comps = load_components(models, controls, device, dtype)
            apply_speed(comps, speed)
            self.sets[key] = comps
        return self.sets[key]

    def clear(self) -> None:
        self.sets.clear()


MODELS = ModelCache()


def turbo_for(preset, settings: EngineSettings, allow_pickle: bool = False):
    """The preset's turbo LoRA (`turbo.TurboLoRA`), or None without turbo: from --turbo-lora, else
    the config file's ``[models.turbo_lora]`` entry for the kind, else the kind's hub repo. Raises
    OptionError for a step count the kind does not run at, ModelError when the weights are nowhere."""
    cfg = preset.diffusion
    if not cfg.turbo:
        return None
    from cinefx.config import model_defaults
    from cinefx.diffusion.turbo import turbo_lora

    where = settings.turbo_lora or dict(model_defaults().turbo_lora).get(cfg.turbo)
    return turbo_lora(cfg.turbo, cfg.turbo_steps or None, where, allow_pickle)


def speed_key(preset, settings: EngineSettings, allow_pickle: bool = False) -> dict:
    """What the turbo LoRA and the way the engine runs add to a resume key (`resume.run_key`): the
    kind, its steps, where it loads from and the local file's identity (a replaced file renders
    anew); every `SpeedOptions` field (compiled kernels round differently); the device kind and
    precision; and on the CPU, the torch thread count."""
    import torch

    from cinefx.diffusion.models import SpeedOptions, pick_device_dtype
    from cinefx.resume import file_identity

    lora = turbo_for(preset, settings, allow_pickle)
    turbo = lora and {"kind": lora.kind, "steps": lora.steps, "source": lora.source.spec, "weight": lora.weight,
                      "file": file_identity(lora.file) if lora.file else None}
    device, dtype = pick_device_dtype(settings.precision)
    threads = (settings.threads or torch.get_num_threads()) if device == "cpu" else None
    return {"turbo": turbo, "speed": SpeedOptions(compile=settings.compile), "device": device, "dtype": str(dtype),
            "threads": threads}


def build_diffusion_engine(preset, models, settings: EngineSettings, cache: ModelCache | None = None):
    """Load (or reuse from `cache`) the models the preset's controls need, apply its adapters (so a
    bad adapter file fails here, before any rendering), and return a `DiffusionEngine` for it.
    `models` is used as given: the caller has resolved it with the config file (`with_user_defaults`)."""
    from cinefx.diffusion.adapters import apply_adapters
    from cinefx.diffusion.engine import DiffusionEngine
    from cinefx.diffusion.models import SpeedOptions, pick_device_dtype
    from cinefx.diffusion.pipeline import SCHEDULERS, TemporalControlPipeline
    from cinefx.diffusion.turbo import apply_turbo

    if settings.scheduler not in SCHEDULERS:
        raise OptionError(f"--scheduler {settings.scheduler!r}: must be one of {', '.join(SCHEDULERS)}")
    lora = turbo_for(preset, settings, models.allow_pickle)  # before loading: a missing LoRA fails at once
    device, dtype = pick_device_dtype(settings.precision)
    if settings.threads and device == "cpu":
        import torch

        torch.set_num_threads(settings.threads)
    comps = (cache or MODELS).get(models, tuple(k for k, _ in preset.diffusion.controls), device, dtype,
                                  SpeedOptions(compile=settings.compile))
    apply_adapters(comps.host, preset.diffusion.adapters, models.allow_pickle)
    apply_turbo(comps.host, lora)
    pipe = TemporalControlPipeline.from_components(comps, lora.sampler if lora else settings.scheduler)
    return DiffusionEngine(pipe, preset, settings, control_models=comps.control_models, host=comps.host,
                           allow_pickle=models.allow_pickle, turbo=lora)


def build_renderer(name: str, preset, size: tuple[int, int], seed: int, models=None,
                   settings: EngineSettings = EngineSettings()):
    """The registered renderer `name` for frames of `size` (width, height); one that needs a model
    gets a diffusion engine whose noise is seeded by `seed`."""
    cls = RENDERERS[name]
    engine = None
    if cls.needs_model:
        from dataclasses import replace

        engine = build_diffusion_engine(preset, models, replace(settings, seed=seed))
    return cls(preset, size, seed, engine)
