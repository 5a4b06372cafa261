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


def choose_engine(requested: str, models=None, controls: tuple[str, ...] = ("canny",)) -> EngineChoice:
    """Decide the engine; raises `EngineUnavailableError` / `ModelError` for an explicit diffusion
    request that cannot run, with what is missing and how to get it."""
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
    if not why:  # only now import torch (hundreds of MB): a grade run without weights never needs it
        import torch

        if not torch.cuda.is_available():
            why.append("no CUDA GPU (diffusion on a CPU is very slow; force it with --engine diffusion)")
    if why:
        return EngineChoice("grade", "diffusion not usable: " + "; ".join(why))
    return EngineChoice("diffusion", "GPU and model weights found")


class ModelCache:
    """Loaded model sets keyed by what was loaded: (models, controls, device, dtype). A batch over
    many files, or several engines in one process, load a set once. Adapters are not part of the
    key: every engine sharing a set puts its own adapters on it before each render
    (`DiffusionEngine.render`), so engines may alternate in any order with one copy of the weights.
    `keep` sets are held; loading another frees the oldest first."""

    def __init__(self, keep: int = 1):
        self.keep = keep
        self.sets: dict = {}

    def get(self, models, controls: tuple[str, ...], device, dtype):
        from cinefx.diffusion.models import load_components

        key = (models, controls, str(device), str(dtype))
        if key not in self.sets:
            while len(self.sets) >= self.keep:
                self.sets.pop(next(iter(self.sets)))
            self.sets[key] = load_components(models, controls, device, dtype)
        return self.sets[key]

    def clear(self) -> None:
        self.sets.clear()


MODELS = ModelCache()


def build_diffusion_engine(preset, models, settings: EngineSettings, cache: ModelCache | None = None):
    """Load (or reuse from `cache`) the models the preset's controls need, apply its adapters (so a
    bad adapter file fails here, before any rendering), and return a `DiffusionEngine` for it.
    `models` is used as given: the caller has resolved it with the config file (`with_user_defaults`)."""
    from cinefx.diffusion.adapters import apply_adapters
    from cinefx.diffusion.engine import DiffusionEngine
    from cinefx.diffusion.models import pick_device_dtype
    from cinefx.diffusion.pipeline import SCHEDULERS, TemporalControlPipeline

    if settings.scheduler not in SCHEDULERS:
        raise OptionError(f"--scheduler {settings.scheduler!r}: must be one of {', '.join(SCHEDULERS)}")
    device, dtype = pick_device_dtype(settings.precision)
    comps = (cache or MODELS).get(models, tuple(k for k, _ in preset.diffusion.controls), device, dtype)
    apply_adapters(comps.host, preset.diffusion.adapters, models.allow_pickle)
    pipe = TemporalControlPipeline.from_components(comps, settings.scheduler)
    return DiffusionEngine(pipe, preset, settings, control_models=comps.control_models, host=comps.host,
                           allow_pickle=models.allow_pickle)


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
