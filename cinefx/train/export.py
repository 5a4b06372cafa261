"""Write a trained look as a preset folder that `cinefx stylize --preset NAME` uses at once.

    NAME/preset.toml            names the weight files, trigger, recommended scales, base model
    NAME/lora.safetensors       LoRA, diffusers/peft format            (method lora)
    NAME/lora_kohya.safetensors the same LoRA in kohya/A1111 format with explicit alpha
    NAME/embedding.safetensors  textual-inversion vectors, diffusers format (method ti)
    NAME/train_config.json      the training settings, for the record
    NAME/loss.png               the loss curve
    NAME/validation.png         base model vs preset on fixed prompts and seeds
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cinefx.train.loop import LORA_TARGETS, TrainConfig, TrainState, config_dict

VALIDATION_PROMPTS = ("a city street at night", "a portrait of a woman by a window", "a wide landscape at dusk")


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


def export_preset(host, cfg: TrainConfig, state: TrainState, out: Path, name: str,
                  description: str = "") -> Path:
    """Write the preset folder `out` (created) and return its preset.toml."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    adapters = []
    if cfg.trains_lora:
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        sd = get_peft_model_state_dict(host.unet)
        StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=sd, weight_name="lora.safetensors")
        save_file(kohya_state_dict(sd, cfg.alpha), str(out / "lora_kohya.safetensors"))
        adapters.append('[[diffusion.adapters]]\nkind = "lora"\npath = "lora.safetensors"\nscale = 0.8')
    if cfg.trains_tokens:
        tok, enc = host.tokenizer, host.text_encoder
        rows = enc.get_input_embeddings().weight[tok.convert_tokens_to_ids(cfg.tokens)].detach().float().cpu()
        save_file({cfg.trigger: rows.contiguous()}, str(out / "embedding.safetensors"))
        adapters.append(f'[[diffusion.adapters]]\nkind = "textual-inversion"\npath = "embedding.safetensors"\n'
                        f'token = "{cfg.trigger}"\nscale = 1.0')
    write_preset_toml(out, name, description or f"{cfg.method} look trained on your stills", cfg.trigger,
                      cfg.model, adapters, f"Trained by `cinefx train-preset` ({cfg.method}, {state.step} steps) "
                      f"on base model {cfg.model or '(the default)'}.")
    (out / "train_config.json").write_text(json.dumps({**config_dict(cfg), "steps_done": state.step,
                                                       "lora_targets": list(LORA_TARGETS)}, indent=2))
    _loss_plot(state.losses, out / "loss.png")
    return out / "preset.toml"


def write_preset_toml(out: Path, name: str, description: str, trigger: str, base_model: str,
                      adapters: list[str], comment: str) -> Path:
    """preset.toml for a folder of weights; `adapters` are ready [[diffusion.adapters]] tables."""
    def q(text: str) -> str:
        return json.dumps(text)  # a JSON string is a valid TOML basic string

    lines = [f"# {comment}", f"name = {q(name)}", f"description = {q(description)}", "", "[prompt]",
             'positive = "cinematic film still"']
    if trigger:
        lines.append(f"trigger = [{q(trigger)}]")
    lines += ["", "[diffusion]"]
    if base_model:
        lines.append(f"base_model = {q(base_model)}")
    lines += ["", *adapters, ""]
    path = out / "preset.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def import_adapter(file: Path, name: str, folder: Path, token: str = "", trigger: str = "", scale: float = 0.0,
                   base_model: str = "", allow_pickle: bool = False, kind: str = "") -> Path:
    """Wrap a downloaded LoRA or embedding file into a preset folder `folder` (created): the file
    is copied in, its format detected (`inspect_file`), and preset.toml written. Returns the TOML."""
    import shutil

    from cinefx.diffusion.adapters import inspect_file
    from cinefx.errors import AdapterError, OutputError

    found, fmt = inspect_file(Path(file), allow_pickle)
    if found == "unknown":
        if kind not in ("lora", "textual-inversion"):
            raise AdapterError(f"{file}: a pickle's contents cannot be checked before loading; "
                               "say what it is with --kind lora or --kind textual-inversion")
        found = kind
    if found == "textual-inversion" and not token:
        token = f"<{name}>"
    if folder.exists() and any(folder.iterdir()):
        raise OutputError(f"{folder}: already exists; pick another --name or remove it")
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / Path(file).name
    shutil.copy2(file, dest)
    entry = [f'[[diffusion.adapters]]', f'kind = "{found}"', f"path = {json.dumps(dest.name)}",
             f"scale = {scale or (0.8 if found == 'lora' else 1.0):g}"]
    if found == "textual-inversion":
        entry.append(f"token = {json.dumps(token)}")
    return write_preset_toml(folder, name, f"imported {found} ({fmt} format) from {Path(file).name}",
                             trigger or token, base_model, ["\n".join(entry)],
                             f"Imported by `cinefx presets import` from {file}.")


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
    fig.savefig(path)
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
