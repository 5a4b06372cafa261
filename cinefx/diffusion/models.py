"""Find and load the diffusion engine's weights: SD1.5 base, ControlNets, a depth estimator.

A model is named by any of
  - a local diffusers folder (``model_index.json`` for a base model, ``config.json`` otherwise),
  - a single-file checkpoint (``.safetensors``; pickled ``.ckpt``/``.pt``/``.bin`` only with
    ``allow_pickle``, since loading a pickle can run code),
  - a Hugging Face hub id (``org/name``), taken from the local cache, or downloaded when the machine
    is online and ``HF_HUB_OFFLINE`` is not set.

Companions default to what sits in a local base model folder or beside a single-file checkpoint
(``controlnet-canny/``, ``controlnet-depth/``, ``depth-estimator/``, ``annotators/``: the layout of
the tiny test bundle and of a bundle a user assembles), else to well-known hub ids. `resolve_models` answers "what would load, from
where" without importing torch; `load_components` loads.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from cinefx.controls import CONTROLNETS
from cinefx.controls.annotators import AUX_KINDS, DEFAULT_ANNOTATORS, INSTALL_HINT
from cinefx.errors import CinefxError, ModelError, OptionError

DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_DEPTH = "depth-anything/Depth-Anything-V2-Small-hf"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for; unset companions fall back as the module docstring says."""

    base: str | None = None
    controlnets: tuple[tuple[str, str], ...] = ()  # (kind, spec) overrides
    depth: str | None = None
    annotators: str | None = None  # controlnet-aux's weights: a folder or hub id
    allow_pickle: bool = False


@dataclass(frozen=True)
class Resolved:
    role: str  # "base", "controlnet-canny", "depth-estimator", ...
    spec: str
    how: str  # "folder", "file", "cache", "hub" (will download) or "missing"
    path: Path | None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.how != "missing"

    @property
    def where(self) -> str:
        """What to hand `from_pretrained`: the hub id to download, else the local path."""
        return self.spec if self.how == "hub" else str(self.path)


def with_user_defaults(spec: ModelSpec) -> ModelSpec:
    """`spec` with what the user left unset filled from ``$CINEFX_MODEL`` and the config file
    (`cinefx.config`), so the result names everything a run depends on (resume keys on it)."""
    from cinefx.config import model_defaults

    cfg = model_defaults()
    return ModelSpec(base=spec.base or os.environ.get("CINEFX_MODEL") or cfg.base,
                     controlnets=tuple({**dict(cfg.controlnets), **dict(spec.controlnets)}.items()),
                     depth=spec.depth or cfg.depth, annotators=spec.annotators or cfg.annotators,
                     allow_pickle=spec.allow_pickle or cfg.allow_pickle)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~", "/")) and "\\" not in spec


def resolve(role: str, spec: str, allow_pickle: bool = False, marker: str | None = None) -> Resolved:
    """Where `spec` would load from, or why it cannot. Never imports torch, never downloads.
    `marker`: the file a folder or hub repo must hold (default: the diffusers/transformers config)."""
    path = Path(spec).expanduser()
    what = "a file cinefx needs" if marker else "not a diffusers/transformers model folder"
    marker = marker or ("model_index.json" if role == "base" else "config.json")
    if path.is_dir():
        if (path / marker).is_file():
            return Resolved(role, spec, "folder", path)
        return Resolved(role, spec, "missing", path, f"folder has no {marker}: {what}")
    if path.is_file():
        suffix = path.suffix.lower()
        if role.startswith(("depth", "annotator")):
            return Resolved(role, spec, "missing", path, f"the {role} must be a folder or hub id, not a file")
        if suffix == ".safetensors":
            return Resolved(role, spec, "file", path)
        if suffix in PICKLE_SUFFIXES:
            if allow_pickle:
                return Resolved(role, spec, "file", path, "pickle file (allowed by --allow-pickle)")
            return Resolved(role, spec, "missing", path,
                            f"{suffix} files are pickles, which can run code when loaded; use a .safetensors "
                            "file or pass --allow-pickle if you trust it")
        return Resolved(role, spec, "missing", path, f"unknown weight file type {suffix!r} (expected .safetensors)")
    if not _looks_like_hub_id(spec):
        return Resolved(role, spec, "missing", None, "no such file or folder")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, marker)
    if isinstance(cached, str):
        return Resolved(role, spec, "cache", Path(cached).parent)
    if _offline():
        # naming the file a marker asks for downloads that file only, not a whole repository
        # (Hyper-SD's holds 30 GB of LoRAs and UNets)
        what = f"{spec} {marker}" if marker not in ("model_index.json", "config.json") else spec
        return Resolved(role, spec, "missing", None,
                        f"not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it on a machine "
                        f"with a network (`huggingface-cli download {what}`) or give a local copy")
    return Resolved(role, spec, "hub", None, "not cached: will be downloaded on first use")


def resolve_models(spec: ModelSpec, controls: tuple[str, ...]) -> list[Resolved]:
    """Resolve the base model, one ControlNet per control kind, and the depth estimator if needed."""
    spec = with_user_defaults(spec)
    base = spec.base or DEFAULT_BASE
    out = [resolve("base", base, spec.allow_pickle)]
    base_path = Path(base).expanduser()
    # companions sit inside a base model folder, or beside a single-file checkpoint
    base_dir = base_path if base_path.is_dir() else base_path.parent if base_path.is_file() else None
    overrides = dict(spec.controlnets)
    unknown = set(overrides) - set(CONTROLNETS)
    if unknown:
        raise OptionError(f"--controlnet {sorted(unknown)[0]}=…: unknown control kind "
                          f"(known: {', '.join(CONTROLNETS)})")
    for kind in controls:
        local = base_dir / f"controlnet-{kind}" if base_dir else None
        cn = overrides.get(kind) or (str(local) if local and local.is_dir() else CONTROLNETS[kind])
        out.append(resolve(f"controlnet-{kind}", cn, spec.allow_pickle))
    if "depth" in controls:
        local = base_dir / "depth-estimator" if base_dir else None
        depth = spec.depth or (str(local) if local and local.is_dir() else DEFAULT_DEPTH)
        out.append(resolve("depth-estimator", depth, spec.allow_pickle))
    local = base_dir / "annotators" if base_dir else None
    annotators = spec.annotators or (str(local) if local and local.is_dir() else DEFAULT_ANNOTATORS)
    for kind in controls:
        if kind in AUX_KINDS:
            out.append(_resolve_annotator(kind, annotators, spec.allow_pickle))
    return out


def _resolve_annotator(kind: str, spec: str, allow_pickle: bool) -> Resolved:
    """controlnet-aux's weights for `kind`: installed package, file present, pickles allowed."""
    role = f"annotator-{kind}"
    weights = AUX_KINDS[kind].weights
    r = resolve(role, spec, allow_pickle, marker=weights)
    if not r.ok:
        return r
    if not allow_pickle:
        return Resolved(role, spec, "missing", r.path,
                        f"the {kind} annotator's weights ({weights}) are a pickle, which can run code when "
                        "loaded; pass --allow-pickle if you trust them")
    import importlib.util

    if importlib.util.find_spec("controlnet_aux") is None:
        return Resolved(role, spec, "missing", r.path, f"the {kind} control needs controlnet-aux: {INSTALL_HINT}")
    return r


def check_resolved(found: list[Resolved]) -> None:
    """Raise one `ModelError` naming the first thing that cannot load and what to do."""
    for r in found:
        if not r.ok:
            hint = " (see `cinefx models`)" if r.role != "base" else ""
            raise ModelError(f"{r.role} {r.spec!r}: {r.detail}{hint}")


# -- loading -----------------------------------------------------------------------------------

@dataclass
class Components:
    """Loaded modules, on their device and dtype. `host` is a stock diffusers pipeline holding the
    base model; adapters load through it (its LoRA and textual-inversion loaders)."""

    host: object  # diffusers StableDiffusionPipeline
    controlnets: dict[str, object]  # kind -> ControlNetModel
    # what each kind's extractor needs, by kind: (model, mean, std, size) for depth, a
    # controlnet-aux detector for the annotator kinds
    control_models: dict[str, object]
    device: object
    dtype: object
    speed: SpeedOptions | None = None  # set by `apply_speed`


WEIGHT_SUFFIXES = {".safetensors", *PICKLE_SUFFIXES}


def _file_being_read(ex: BaseException) -> Path | None:
    """The weight file a loader was reading when it raised `ex` (or the error `ex` wraps): the
    innermost frame with a local naming an existing weight file. Loaders' own messages often leave
    it out (torch's unpickler, safetensors' header parser), and a model folder holds several."""
    found = None
    for e in _chain(ex):
        tb = e.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                if isinstance(value, (str, Path)) and Path(value).suffix.lower() in WEIGHT_SUFFIXES \
                        and Path(value).is_file():
                    found = Path(value)
            tb = tb.tb_next
    return found


def _chain(ex: BaseException | None):
    """`ex` and the errors it was raised from, outermost first."""
    while ex is not None:
        yield ex
        ex = ex.__cause__ or ex.__context__


def _load_error(r: Resolved, ex: Exception) -> ModelError:
    import pickle

    first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
    if r.how == "hub":
        return ModelError(f"{r.role} {r.spec!r}: could not be downloaded ({first}); check the network, or "
                          f"download it elsewhere with `huggingface-cli download {r.spec}` and copy the cache")
    hint = ""
    if any(isinstance(e, pickle.UnpicklingError) for e in _chain(ex)):  # torch's message: a paragraph on its defaults
        first = "a pickle holding more than tensors, which torch's safe loader refuses"
        hint = "; if you trust it, convert it to .safetensors"
    elif r.how == "file" and r.role == "base":
        hint = ("; a single-file checkpoint also needs its architecture's config from the Hugging Face hub "
                "(cached, or online once), or use a diffusers folder")
    file, what = _file_being_read(ex), ""
    if file is not None and file != r.path and str(file) not in first:
        what = f" {file.relative_to(r.path) if r.path and file.is_relative_to(r.path) else file}"
    return ModelError(f"{r.role} {r.spec!r}:{what} cannot be loaded ({first[:300]}){hint}")


@contextlib.contextmanager
def loading(r: Resolved):
    """Around a library's load of `r`: its warnings silenced (cinefx reports problems itself) and
    any failure turned into one `ModelError` naming the model and the file. Loaders raise many
    types (OSError, SafetensorError, UnpicklingError, NotImplementedError for weights missing from
    a file), so every Exception counts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        except CinefxError:
            raise
        except Exception as ex:
            raise _load_error(r, ex) from ex


def _load(cls, r: Resolved, allow_pickle: bool, device: str, **kwargs):
    """`cls` (a diffusers pipeline or model class, or a transformers model class) from a single file
    or a folder / hub id, on `device`, with failures turned into one `ModelError` naming the model.
    A weight file lacking tensors the model needs is one: diffusers leaves those on the meta device,
    transformers fills them with random values and only logs it, so its loading report is asked
    for (it leaves out what transformers itself expects to be absent, such as CLIP's position_ids)."""
    import torch
    from diffusers import DiffusionPipeline

    report = cls.__module__.startswith("transformers.") and r.how != "file"
    with loading(r):
        if r.how == "file":
            model = cls.from_single_file(str(r.path), local_files_only=True, **kwargs)
        else:
            model = cls.from_pretrained(r.where, local_files_only=r.how != "hub",
                                        use_safetensors=None if allow_pickle else True,
                                        **({"output_loading_info": True} if report else {}), **kwargs)
        part = kwargs.get("subfolder", "")
        if report:
            model, info = model
            complete(r, part, info["missing_keys"])
        for name, m in model.components.items() if isinstance(model, DiffusionPipeline) else [(part, model)]:
            if isinstance(m, torch.nn.Module):
                complete(r, name, [k for k, t in (*m.named_parameters(), *m.named_buffers()) if t.is_meta])
        return model.to(device)


def _transformers_parts(r: Resolved, allow_pickle: bool, device: str, dtype, given: dict) -> dict:
    """The base model's transformers models that `given` leaves out (SD1.5: its text encoder),
    loaded by `_load` for the pipeline to take, which checks them for missing tensors. A single
    file has none: diffusers builds every model from it on the meta device."""
    if r.how == "file":
        return {}
    import json

    import transformers
    from transformers.utils import cached_file

    with loading(r):
        index = json.loads(Path(cached_file(r.where, "model_index.json", local_files_only=r.how != "hub")).read_text())
    classes = {name: getattr(transformers, entry[1], None) for name, entry in index.items()
               if name not in given and isinstance(entry, list) and entry[0] == "transformers"}
    return {name: _load(cls, r, allow_pickle, device, subfolder=name, dtype=dtype) for name, cls in classes.items()
            if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)}


def complete(r: Resolved, part: str, missing) -> None:
    """Raise one `ModelError` when `missing` (names of tensors `r`'s component `part` needs that
    its weight file lacks) is not empty: a download or export cut short."""
    if not missing:
        return
    names, file = sorted(missing), "the file"
    if r.how != "file":
        if r.path is None:  # a download: now in the cache
            r = resolve(r.role, r.spec)
        folder = r.path / part if r.path else None
        files = [f"{stem}{ext}" for ext in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
                 for stem in ("model", "diffusion_pytorch_model")]  # transformers' and diffusers' names
        found = next((f for f in files if folder and (folder / f).is_file()), None)
        file = "/".join(filter(None, (part, found))) or "the weight file"
    n, whose = len(names), f"its {part}" if r.how == "file" and part else "the model"
    shown = ", ".join(names[:2])[:100] + (", …" if n > 2 else "")
    raise ModelError(f"{r.role} {r.spec!r}: {file} lacks {n} tensor{'s' if n > 1 else ''} {whose} needs ({shown}): "
                     "a download or export cut short; download or export the model again")


def load_components(spec: ModelSpec, controls: tuple[str, ...], device: str, dtype) -> Components:
    """Load everything `controls` needs. Raises `ModelError` with the role, spec and the fix."""
    quiet_libraries()
    import torch
    from diffusers import ControlNetModel, StableDiffusionPipeline

    spec = with_user_defaults(spec)
    found = resolve_models(spec, controls)
    check_resolved(found)
    by_role = {r.role: r for r in found}
    base = by_role["base"]
    given = dict(safety_checker=None, feature_extractor=None)
    given.update(_transformers_parts(base, spec.allow_pickle, device, dtype, given))
    host = _load(StableDiffusionPipeline, base, spec.allow_pickle, device, requires_safety_checker=False,
                 dtype=dtype, **given)
    host.set_progress_bar_config(disable=True)
    controlnets = {kind: _load(ControlNetModel, by_role[f"controlnet-{kind}"], spec.allow_pickle, device,
                               dtype=dtype).eval() for kind in controls}
    control_models = {}
    if "depth" in controls:
        control_models["depth"] = _load_depth(by_role["depth-estimator"], spec.allow_pickle, device, dtype)
    for kind in controls:
        if kind in AUX_KINDS:
            control_models[kind] = _load_annotator(kind, by_role[f"annotator-{kind}"], device)
    return Components(host=host, controlnets=controlnets, control_models=control_models,
                      device=torch.device(device), dtype=dtype)


def quiet_libraries() -> None:
    """Silence the logging and progress bars of diffusers, transformers and huggingface_hub:
    cinefx reports progress and problems itself, so a failed load prints cinefx's one line and
    not the library's log of the same failure before it (nor advice such as torchvision being
    absent, which cinefx does not need)."""
    import logging

    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging, hub_logging):
        lib.set_verbosity(logging.CRITICAL)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _load_depth(r: Resolved, allow_pickle: bool, device: str, dtype):
    import json

    from transformers import AutoModelForDepthEstimation
    from transformers.utils import cached_file

    model = _load(AutoModelForDepthEstimation, r, allow_pickle, device, dtype=dtype)  # a folder or hub id, never a file
    with loading(r):
        # The preprocessing numbers only: resizing and normalising happen on the GPU in batches,
        # not through the (PIL-based) image processor class.
        cfg = json.loads(Path(cached_file(r.where, "preprocessor_config.json",
                                          local_files_only=r.how != "hub")).read_text())
    size = cfg.get("size", {})
    side = int(size.get("height") or size.get("shortest_edge") or 518)
    return (model.eval(), tuple(cfg.get("image_mean", (0.5,) * 3)), tuple(cfg.get("image_std", (0.5,) * 3)), side)


def _load_annotator(kind: str, r: Resolved, device: str):
    from cinefx.controls.annotators import load_annotator

    with loading(r):
        try:
            return load_annotator(kind, r.where, r.how != "hub", device)
        except ImportError as ex:  # installed but broken, typically a CUDA torchvision without a driver
            raise ModelError(f"{r.role}: controlnet-aux cannot be imported ({str(ex).splitlines()[0]}); "
                             f"{INSTALL_HINT}") from ex


@dataclass(frozen=True)
class SpeedOptions:
    """How the loaded modules run; none of these changes the output beyond float rounding. The
    precision is chosen apart (`pick_device_dtype`: bf16 on GPUs that have it)."""

    # torch.compile the UNet, the ControlNets and the VAE decoder. The batch size is traced as a
    # symbol (`TemporalControlPipeline._dynamic_batch`), so a render size compiles once per temporal
    # mode and guidance on/off. Off by default: compiling takes minutes of CPU before the first frame
    # (bench/bench_diffusion_gpu.py reports how long, and what it gains).
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend ("eager" checks the tracing alone)
    # NHWC weights and activations: the layout tensor-core convolutions use without transposes.
    channels_last: bool = True
    # One QKV (self-attention) or KV (cross-attention) matrix product instead of three or two,
    # through diffusers' Attention.fuse_projections; layers a LoRA wraps keep their own.
    fuse_qkv: bool = True
    # Decode a batch with the VAE (on a thread and, on a GPU, a CUDA stream of its own) while the
    # next batch denoises (`pipeline.BatchDecoder`); the bytes are those of decoding in line.
    # Costs one batch's decode of GPU memory beside the denoising, which the automatic batch size
    # leaves free (`TemporalControlPipeline.decode_memory`).
    overlap_decode: bool = True


def apply_speed(comps: Components, options: SpeedOptions) -> None:
    """Apply `options` to the modules of `comps`, in place, once: a set shared by several engines
    must not get different options (a compiled module cannot be uncompiled), and fused
    projections must be made before compiling. Raises ValueError when `comps` already has others."""
    if comps.speed is not None:
        if comps.speed != options:
            raise ValueError(f"this model set already runs with {comps.speed}; load another for {options}")
        return
    import torch
    from diffusers.models.attention_processor import Attention

    host = comps.host
    nets = [host.unet, *comps.controlnets.values()]
    if options.channels_last:
        for m in (*nets, host.vae):
            m.to(memory_format=torch.channels_last)
    if options.fuse_qkv:
        for m in nets:
            for a in m.modules():
                if isinstance(a, Attention) and not getattr(a, "fused_projections", False):
                    a.fuse_projections()  # processors untouched: cinefx's own use the fused layers
    if options.compile:
        # The UNet's and the ControlNets' forwards are one code object (diffusers' LoRA-scale
        # wrapper), so their graphs for every render size, temporal mode and guidance setting count
        # against one limit, torch's default of 8: past it they would run uncompiled.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for m in nets:
            m.compile(backend=options.compile_backend)
        # the decoder's input is made inside diffusers (post_quant_conv), where the pipeline
        # cannot mark its batch as a symbol: trace every size as one
        host.vae.decoder.compile(backend=options.compile_backend, dynamic=True)
    comps.speed = options


def pick_device_dtype(precision: str = "auto"):
    """(device, dtype): CUDA with bf16 (fp16 on GPUs without bf16), else CPU with fp32."""
    import torch

    choices = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in ("auto", *choices):
        raise OptionError(f"--precision {precision!r}: must be auto, fp32, fp16 or bf16")
    if torch.cuda.is_available():
        if precision == "auto":
            return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return "cuda", choices[precision]
    if precision in ("fp16", "bf16"):
        raise OptionError(f"--precision {precision}: half precision needs a CUDA GPU; on CPU use fp32")
    return "cpu", torch.float32
