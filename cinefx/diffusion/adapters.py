"""Preset adapters: LoRA files and textual-inversion embeddings, loaded into the base model.

Formats are recognised from the keys inside the file, before anything is loaded, so a bad file
fails with its name and the reason rather than deep inside diffusers:

- LoRA: diffusers/peft (``unet.….lora_A.weight``), kohya / A1111 (``lora_unet_…lora_down.weight``
  with optional ``.alpha``). LoHa / LoKr (``hada_``, ``lokr_``) are refused: diffusers cannot apply them.
- Textual inversion: diffusers (``{token: vector}``), A1111 safetensors (``emb_params``); A1111
  ``.pt`` files are pickles and need ``allow_pickle``.

Loading goes through diffusers' own loaders on the host pipeline, which convert kohya keys.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from cinefx.errors import AdapterError

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin"}
# safetensors metadata of a LoRA `cinefx train-preset` wrote with alpha/rank folded into lora_B
FOLDED_ALPHA_KEY = "cinefx_lora_alpha_folded"


def inspect_file(path: Path, allow_pickle: bool = False) -> tuple[str, str]:
    """(kind, format) of a weight file: kind "lora" or "textual-inversion", format "diffusers",
    "kohya", "a1111" or "pickle". Raises `AdapterError` naming the file and the problem."""
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise AdapterError(f"{path}: {suffix} files are pickles, which can run code when loaded; "
                               "convert it to .safetensors or pass --allow-pickle if you trust it")
        return "unknown", "pickle"
    if suffix != ".safetensors":
        raise AdapterError(f"{path}: unknown adapter file type {suffix!r} (expected .safetensors)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as ex:  # safetensors raises its own error types for a damaged header
        raise AdapterError(f"{path}: not a readable safetensors file ({str(ex).splitlines()[0]})") from None
    if not keys:
        raise AdapterError(f"{path}: the file holds no tensors")
    if any("hada_" in k or "lokr_" in k for k in keys):
        raise AdapterError(f"{path}: LoHa/LoKr (LyCORIS) adapters are not supported; use a LoRA file")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in keys):
        return "lora", "kohya"
    if any("lora_A" in k or "lora_B" in k or "lora.down" in k or "lora_linear_layer" in k for k in keys):
        return "lora", "diffusers"
    if keys == ["emb_params"] or "string_to_param" in keys:
        return "textual-inversion", "a1111"
    if len(keys) <= 8:  # diffusers embeddings: one tensor per token name
        return "textual-inversion", "diffusers"
    raise AdapterError(f"{path}: not a LoRA or textual-inversion file (keys like {keys[0]!r})")


def apply_adapters(host, adapters, allow_pickle: bool = False) -> None:
    """Load `adapters` (preset `Adapter`s) into `host`, a diffusers SD pipeline, replacing any
    loaded before; other adapters (the turbo LoRA, `turbo.TURBO_ADAPTER`) stay loaded. LoRA scales are set per adapter (times alpha/rank for an older train-preset
    export, see `_unfolded_alpha`); a textual inversion's scale multiplies its embedding rows."""
    adapters = tuple(adapters)
    current = getattr(host, "_cinefx_adapters", ())
    if current == adapters:
        return
    if current != ():  # a tuple of adapters, or None after a load that failed half-way
        loaded = {n for m in (host.unet, host.text_encoder) for n in getattr(m, "peft_config", {})}
        mine = sorted(n for n in loaded if n.startswith("cinefx_") and n[7:].isdigit())
        if mine:
            host.delete_adapters(mine)
        if hasattr(host, "unload_textual_inversion"):
            host.unload_textual_inversion()
    host._cinefx_adapters = None
    names, weights = [], []
    for i, a in enumerate(adapters):
        kind, fmt = inspect_file(Path(a.path), allow_pickle)
        if kind not in (a.kind, "unknown"):
            raise AdapterError(f"{a.path}: the preset says kind = {a.kind!r} but the file holds a {kind}")
        try:
            if a.kind == "lora":
                name = f"cinefx_{i}"
                with warnings.catch_warnings():  # peft's note on a second adapter beside the first
                    warnings.filterwarnings("ignore", "Already found a `peft_config`")
                    host.load_lora_weights(str(a.path), adapter_name=name)
                names.append(name)
                weights.append(a.scale * (_unfolded_alpha(Path(a.path)) if fmt == "diffusers" else 1.0))
            else:
                _load_embedding(host, a, fmt)
        except AdapterError:
            raise
        except Exception as ex:  # diffusers raises ValueError/KeyError/RuntimeError for mismatched shapes
            first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
            raise AdapterError(f"{a.path}: cannot be loaded into this base model ({first[:300]})") from None
    if names:
        host.set_adapters(names, adapter_weights=weights)
    host._cinefx_adapters = adapters


def _unfolded_alpha(path: Path) -> float:
    """alpha / rank for a `lora.safetensors` that `cinefx train-preset` wrote before it folded that
    factor into lora_B, else 1. A diffusers-format file carries no alpha, so diffusers applies it
    at alpha = rank (scale 1.0 where training used alpha/rank, e.g. 8/4 = 2: half the look); such
    an export is known by its train_config.json beside it and no fold mark in its metadata."""
    from safetensors import safe_open

    record = path.with_name("train_config.json")
    if path.name != "lora.safetensors" or not record.is_file():
        return 1.0
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if FOLDED_ALPHA_KEY in meta or "lora_adapter_metadata" in meta:  # diffusers' metadata carries alpha itself
        return 1.0
    try:
        cfg = json.loads(record.read_text(encoding="utf-8"))
        return float(cfg["alpha"]) / int(cfg["rank"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as ex:
        raise AdapterError(f"{record}: cannot read the LoRA's alpha and rank ({type(ex).__name__}: "
                           f"{str(ex)[:100]}); restore its \"alpha\" and \"rank\" or train the preset again") from None


def _load_embedding(host, a, fmt: str) -> None:
    import torch

    token = a.token or None
    if fmt == "a1111" and not token:
        raise AdapterError(f"{a.path}: an A1111 embedding needs token = \"…\" in the preset's adapter entry")
    before = len(host.tokenizer)
    host.load_textual_inversion(str(a.path), token=token)
    if a.scale != 1.0:
        with torch.no_grad():
            rows = host.text_encoder.get_input_embeddings().weight
            rows[before:len(host.tokenizer)] *= a.scale
