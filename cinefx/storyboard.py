"""`cinefx storyboard`: shot descriptions → stills in a preset's look, and a contact sheet.

The DreamShot use of cinematic presets: a shot type (close / medium / long) or a trained look
turns a line of script into a frame. Each still is text-to-image with the preset's prompt,
trigger words and adapters, then its grade, seeded per shot so a re-run gives the same board.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cinefx.errors import InputFileError, MissingFileError, OutputError
from cinefx.presets import Preset, prompt_text


def read_shots(path: Path) -> list[str]:
    if not path.is_file():
        raise MissingFileError(f"{path}: shot list not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputFileError(f"{path}: not a UTF-8 text file (one shot description per line)") from None
    shots = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not shots:
        raise InputFileError(f"{path}: no shot descriptions (one per line; # starts a comment)")
    return shots


def render_storyboard(shots_file: str | Path, output: str | Path, preset: Preset, model: str | None = None,
                      size: int = 0, aspect: float = 16 / 9, steps: int = 25, seed: int = 0,
                      overwrite: bool = False, allow_pickle: bool = False) -> list[Path]:
    """Write one PNG per shot beside `output` (``NAME_01.png`` …) and the contact sheet `output`.
    Returns the stills' paths."""
    import torch

    from cinefx.diffusion.adapters import apply_adapters
    from cinefx.diffusion.engine import render_size
    from cinefx.diffusion.models import ModelSpec, load_components, pick_device_dtype
    from cinefx.grade.grader import Grader
    from cinefx.sheet import contact_sheet, write_png

    shots = read_shots(Path(shots_file))
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise OutputError(f"{output}: the storyboard is a PNG contact sheet; name it .png")
    stills = [output.with_name(f"{output.stem}_{i + 1:02d}.png") for i in range(len(shots))]
    for p in [output, *stills]:
        if p.exists() and not overwrite:
            raise OutputError(f"{p}: exists; pass --overwrite to replace it")
    if not 0.25 <= aspect <= 4:
        raise OutputError(f"--aspect {aspect:g}: must be between 0.25 and 4")
    device, dtype = pick_device_dtype()
    spec = ModelSpec(base=model or preset.diffusion.base_model or None, allow_pickle=allow_pickle)
    host = load_components(spec, (), device, dtype).host
    apply_adapters(host, preset.diffusion.adapters, allow_pickle)
    vae_scale = host.vae_scale_factor
    native = vae_scale * host.unet.config.sample_size
    multiple = vae_scale * 2 ** (len(host.unet.config.block_out_channels) - 1)
    w, h = render_size(round(1000 * aspect), 1000, size or native, multiple)
    style = prompt_text(preset)
    grader = Grader(preset.grade, (w, h), seed=seed)
    images = []
    try:
        for i, (shot, path) in enumerate(zip(shots, stills)):
            g = torch.Generator(device).manual_seed(seed + i)
            img = host(f"{shot}, {style}" if style else shot, negative_prompt=preset.prompt.negative,
                       num_inference_steps=steps, guidance_scale=preset.diffusion.guidance, height=h, width=w,
                       generator=g, output_type="np").images[0]
            rgb = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
            if not grader.is_identity:
                rgb = grader(rgb[None], i)[0]
            write_png(rgb, path)
            images.append(rgb)
    finally:
        grader.close()
    write_png(contact_sheet(images, [f"{i + 1}. {s}" for i, s in enumerate(shots)]), output)
    return stills
