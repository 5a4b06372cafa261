"""Write a trained look as a preset folder that `cinefx stylize --preset NAME` uses at once.

    NAME/preset.toml            names the weight files, trigger, recommended scales, base model
    NAME/lora.safetensors       LoRA, diffusers/peft format, alpha/rank folded into lora_B (method lora)
    NAME/lora_kohya.safetensors the same LoRA in kohya/A1111 format with explicit alpha
    NAME/embedding.safetensors  textual-inversion vectors, diffusers format (method ti)
    NAME/train_config.json      the training settings, for the record
    NAME/loss.png               the loss curve
    NAME/validation.png         base model vs preset on fixed prompts and seeds

Every file is written whole or not at all (`cinefx.fsutil`), preset.toml last and only once it
parses: a folder is a preset only when everything it names is complete.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cinefx.diffusion.adapters import FOLDED_ALPHA_KEY
from cinefx.errors import OutputError, PresetError
from cinefx.fsutil import atomic_dir, atomic_path, write_text
from cinefx.presets import NAME_RULE, bundled_names, is_name
from cinefx.train.loop import LORA_TARGETS, TrainConfig, TrainState, config_dict

VALIDATION_PROMPTS = ("a city street at night", "a portrait of a woman by a window", "a wide landscape at dusk")
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_NOT_IN_COMMENT = re.compile("[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


def check_name(name: str) -> str:
    """`name` if it is a safe preset name (the rule every preset file's name follows), else
    `PresetError` naming it and the rule."""
    if not is_name(name):
        raise PresetError(f"preset name {name[:100]!r}: use only {NAME_RULE} (choose one with --name)")
    return name


def toml_string(text: str) -> str:
    """`text` as a TOML basic string. Quote, backslash and control characters are escaped; every
    other character is written as itself: json.dumps would write an emoji as a UTF-16 surrogate
    pair, which TOML refuses. An unpaired surrogate (an undecodable file name) becomes U+FFFD."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\u{o:04X}")
        else:
            out.append("\ufffd" if 0xD800 <= o <= 0xDFFF else ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: str | float) -> str:
    return toml_string(value) if isinstance(value, str) else repr(float(value))


def kohya_state_dict(peft_sd: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft UNet LoRA keys (``down_blocks.0….to_q.lora_A.weight``) → kohya
    (``lora_unet_down_blocks_0_…_to_q.lora_down.weight`` + ``.alpha``)."""
    out = {}
    for key, value in peft_sd.items():
        module, _, kind = key.rpartition(".lora_")
        module = module.removeprefix("unet.").removeprefix("base_model.model.")
        stem = "lora_unet_" + module.replace(".", "_")
        part = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[kind]
        out[f"{stem}.{part}"] = value.detach().cpu().contiguous()
        out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def save_lora(path: Path, peft_sd: dict[str, torch.Tensor], alpha: float, rank: int) -> Path:
    """The UNet LoRA in diffusers/peft format, as diffusers' own `save_lora_weights` lays it out,
    with alpha/rank multiplied into lora_B. The format has no alpha, so loaders apply B·A as it
    stands (diffusers: alpha = rank); folded, that is the trained change ΔW = (α/r)·B·A in every
    one of them, where diffusers' optional adapter metadata would reach only recent diffusers.
    The file's metadata marks the fold, so older exports can be told apart (see adapters.py)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    factor = alpha / rank
    folded = {k: v * factor if ".lora_B." in k else v for k, v in peft_sd.items()}

    def save(weights: dict[str, torch.Tensor], filename: str) -> None:
        with atomic_path(filename) as tmp:
            save_file(weights, str(tmp), metadata={"format": "pt", FOLDED_ALPHA_KEY: repr(factor)})

    StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=folded, weight_name=path.name,
                                              save_function=save)
    return path


def export_preset(host, cfg: TrainConfig, state: TrainState, out: Path, name: str,
                  description: str = "") -> Path:
    """Write the preset folder `out` (created) and return its preset.toml."""
    from safetensors.torch import save_file

    check_name(name)
    out.mkdir(parents=True, exist_ok=True)
    adapters = []
    if cfg.trains_lora:
        from peft.utils import get_peft_model_state_dict

        sd = get_peft_model_state_dict(host.unet)
        save_lora(out / "lora.safetensors", sd, cfg.alpha, cfg.rank)
        with atomic_path(out / "lora_kohya.safetensors") as tmp:
            save_file(kohya_state_dict(sd, cfg.alpha), str(tmp))
        adapters.append({"kind": "lora", "path": "lora.safetensors", "scale": 0.8})
    if cfg.trains_tokens:
        tok, enc = host.tokenizer, host.text_encoder
        rows = enc.get_input_embeddings().weight[tok.convert_tokens_to_ids(cfg.tokens)].detach().float().cpu()
        with atomic_path(out / "embedding.safetensors") as tmp:
            save_file({cfg.trigger: rows.contiguous()}, str(tmp))
        adapters.append({"kind": "textual-inversion", "path": "embedding.safetensors", "token": cfg.trigger,
                         "scale": 1.0})
    write_text(out / "train_config.json", json.dumps({**config_dict(cfg), "steps_done": state.step,
                                                      "lora_targets": list(LORA_TARGETS)}, indent=2))
    _loss_plot(state.losses, out / "loss.png")
    return write_preset_toml(out, name, description or f"{cfg.method} look trained on your stills", cfg.trigger,
                             cfg.model, adapters, f"Trained by `cinefx train-preset` ({cfg.method}, {state.step} "
                             f"steps) on base model {cfg.model or '(the default)'}.")


def write_preset_toml(out: Path, name: str, description: str, trigger: str, base_model: str,
                      adapters: list[dict[str, str | float]], comment: str) -> Path:
    """preset.toml for a folder holding the weights `adapters` name (one dict per
    [[diffusion.adapters]] table). Checked by the preset parser before it is written, so a
    preset.toml that does not load is never left behind."""
    from cinefx.presets import parse_preset

    lines = [f"# {_NOT_IN_COMMENT.sub('?', comment)}", f"name = {toml_string(name)}",
             f"description = {toml_string(description)}", "", "[prompt]", 'positive = "cinematic film still"']
    if trigger:
        lines.append(f"trigger = [{toml_string(trigger)}]")
    lines += ["", "[diffusion]"]
    if base_model:
        lines.append(f"base_model = {toml_string(base_model)}")
    for table in adapters:
        lines += ["", "[[diffusion.adapters]]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    text = "\n".join([*lines, ""])
    path = out / "preset.toml"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as ex:  # pragma: no cover - toml_string escapes what TOML refuses
        raise PresetError(f"{path}: would not be valid TOML ({ex})") from None
    parse_preset(raw, path)
    return write_text(path, text)


@contextlib.contextmanager
def _folder_in_place(folder: Path) -> Iterator[Path]:
    """`fsutil.atomic_dir`, its rename refused (a folder of that name holding files) said as the
    user's fix; a failed import leaves nothing, nor anything in the way of the next try."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(folder) as tmp:
            yield tmp
    except OSError as ex:
        if ex.filename2 != str(folder):  # not the rename into place
            raise
        raise OutputError(f"{folder}: cannot be written ({ex.strerror}); pick another --name or remove it") from None


def import_adapter(file: Path, name: str, folder: Path, token: str = "", trigger: str = "", scale: float = 0.0,
                   base_model: str = "", allow_pickle: bool = False, kind: str = "") -> Path:
    """Wrap a downloaded LoRA or embedding file into a preset folder `folder` (created whole, or not
    at all): the file is copied in as NAME.suffix, its format detected (`inspect_file`), and
    preset.toml written. Returns the TOML."""
    from cinefx.diffusion.adapters import inspect_file
    from cinefx.errors import AdapterError

    check_name(name)
    if name.casefold() in bundled_names():  # a user preset of that name would replace the bundled one
        raise PresetError(f"preset name {name!r}: cinefx has a bundled preset of that name; "
                          f"choose another with --name (e.g. {name}-lora)")
    file = Path(file)
    found, fmt = inspect_file(file, allow_pickle)
    if found == "unknown":
        if kind not in ("lora", "textual-inversion"):
            raise AdapterError(f"{file}: a pickle's contents cannot be checked before loading; "
                               "say what it is with --kind lora or --kind textual-inversion")
        found = kind
    if found == "textual-inversion" and not token:
        token = f"<{name}>"
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise OutputError(f"{folder}: already exists; pick another --name or remove it")
    with _folder_in_place(folder) as tmp:
        # named after the checked preset name: the user's file name may hold anything
        dest = tmp / f"{name}{file.suffix.lower()}"
        shutil.copy2(file, dest)
        entry: dict[str, str | float] = {"kind": found, "path": dest.name,
                                         "scale": scale or (0.8 if found == "lora" else 1.0)}
        if found == "textual-inversion":
            entry["token"] = token
        write_preset_toml(tmp, name, f"imported {found} ({fmt} format) from {file.name}", trigger or token,
                          base_model, [entry], f"Imported by `cinefx presets import` from {file}.")
    return folder / "preset.toml"


def _loss_plot(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    if losses:
        ax.plot(losses, lw=0.6, alpha=0.5, label="loss")
        k = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k - 1, smooth, lw=1.5, label=f"mean of {k}")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def validation_sheet(host, trigger: str, path: Path, size: int, steps: int = 20, seeds=(1, 2)) -> Path:
    """Base model vs trained preset on fixed prompts and seeds, as a contact sheet."""
    from cinefx.sheet import contact_sheet, write_png

    host.text_encoder.to(host.unet.dtype)  # training may have kept it in fp32; sampling wants one dtype
    images, captions = [], []
    for prompt in VALIDATION_PROMPTS:
        for seed in seeds:
            for label, text, adapters in (("base", prompt, False), ("preset", f"{trigger}, {prompt}", True)):
                if getattr(host.unet, "peft_config", None):
                    (host.unet.enable_adapters if adapters else host.unet.disable_adapters)()
                g = torch.Generator(host.device).manual_seed(seed)
                img = host(text, num_inference_steps=steps, height=size, width=size, generator=g,
                           output_type="np").images[0]
                images.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
                captions.append(f"{label} - seed {seed} - {prompt[:28]}")
    if getattr(host.unet, "peft_config", None):
        host.unet.enable_adapters()
    return write_png(contact_sheet(images, captions, tile_width=192, columns=4), path)
