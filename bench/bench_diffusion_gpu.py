"""Diffusion engine speed on a GPU: cinefx in each temporal mode vs diffusers' per-frame pipeline.

Both run the same SD1.5-shaped models (built from the real SD1.5 / ControlNet configs with random
weights: no download), at the same size, steps and guidance, in one process, so the ratio is
measured in one run. Output: frames/s for each, the ratio to the per-frame pipeline, and achieved
TFLOP/s counting 1.09 TFLOP per UNet + ControlNet evaluation at 512² (scaled by pixel count for
other sizes).

    python bench/bench_diffusion_gpu.py                 # 512², 20 steps, CFG 7.5, 16 frames, H200 goal ≥ 9 fps, ≥ 5×
    python bench/bench_diffusion_gpu.py --tiny --device cpu --frames 2 --steps 1   # smoke test anywhere
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TFLOP_PER_EVAL_512 = 1.09  # UNet (≈0.80) + one ControlNet (≈0.28) at 64×64 latents, batch 1


# SD1.5's published shapes (runwayml/stable-diffusion-v1-5 unet/vae/text_encoder config.json), and
# the same architecture narrowed for a smoke run anywhere: one construction path for both.
SHAPES = {
    "sd15": dict(blocks=(320, 640, 1280, 1280), vae=(128, 256, 512, 512), text=768, text_ff=3072,
                 text_layers=12, text_heads=12, head_dim=8),
    "tiny": dict(blocks=(32, 64, 64, 64), vae=(32, 32, 64, 64), text=32, text_ff=64,
                 text_layers=2, text_heads=2, head_dim=8),
}


def sd15_components(device, dtype, tiny: bool):
    """A `Components` set in SD1.5's architecture (narrowed with `tiny`), randomly initialised."""
    from diffusers import (AutoencoderKL, ControlNetModel, DPMSolverMultistepScheduler,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from cinefx.diffusion.models import Components, quiet_libraries
    from cinefx.testing.tiny import write_tokenizer

    quiet_libraries()
    torch.manual_seed(0)
    shape = SHAPES["tiny" if tiny else "sd15"]
    tok_dir = Path(tempfile.mkdtemp()) / "tokenizer"
    vocab = write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=shape["blocks"],
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=shape["text"], attention_head_dim=shape["head_dim"])
    vae = AutoencoderKL(block_out_channels=shape["vae"], down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=shape["text"],
                                        intermediate_size=shape["text_ff"], num_hidden_layers=shape["text_layers"],
                                        num_attention_heads=shape["text_heads"], max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                        pad_token_id=vocab - 1))
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1)
    host = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    host.to(device, dtype)
    cn = ControlNetModel.from_unet(unet).to(device, dtype).eval()
    return Components(host=host, controlnets={"canny": cn}, control_models={}, device=torch.device(device), dtype=dtype)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny bundle instead of SD1.5 shapes (smoke test)")
    ap.add_argument("--baseline-frames", type=int, default=0, help="frames for the per-frame pipeline (default: --frames)")
    args = ap.parse_args()

    from cinefx.diffusion.models import quiet_libraries

    quiet_libraries()
    from diffusers import StableDiffusionControlNetImg2ImgPipeline
    from PIL import Image

    from cinefx.controls import CannyExtractor
    from cinefx.diffusion.engine import DiffusionEngine
    from cinefx.diffusion.pipeline import TemporalControlPipeline
    from cinefx.engines import EngineSettings
    from cinefx.presets import load_preset, override
    from cinefx.testing.clips import Move, render_move

    dtype = torch.float32 if args.device == "cpu" else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    comps = sd15_components(args.device, dtype, args.tiny)
    size = args.size if not args.tiny else 64
    frames = np.stack(list(render_move(Move("astronaut", args.frames, (0.5, 0.45, 0.9), (0.53, 0.46, 0.8)), (size, size))))
    evals_per_frame = args.steps * (2 if args.guidance > 1 else 1)
    tflop = TFLOP_PER_EVAL_512 * (size * size) / (512 * 512)
    print(f"# {time.strftime('%Y-%m-%d')} device={torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'} "
          f"dtype={dtype} size={size} frames={args.frames} steps={args.steps} cfg={args.guidance} "
          f"models={'tiny' if args.tiny else 'SD1.5-shaped random'} torch={torch.__version__}")
    rows = []

    # cinefx, each temporal mode (strength 1: every one of the steps runs, as in the baseline)
    for mode in ("full", "anchor", "none"):
        preset = override(load_preset("epic"), "diffusion", temporal=mode, strength=1.0, steps=args.steps,
                          guidance=args.guidance, chunk=min(args.frames, 16), noise_prior="residual")
        preset = dataclasses.replace(preset, diffusion=dataclasses.replace(preset.diffusion, controls=(("canny", 1.0),)))
        pipe = TemporalControlPipeline.from_components(comps)
        engine = DiffusionEngine(pipe, preset, EngineSettings(size=size))
        engine.render(frames[: min(4, len(frames))], 0)  # warm-up: kernels, allocator, prompt cache
        sync(args.device)
        t0 = time.perf_counter()
        engine.render(frames, 1)
        sync(args.device)
        dt = time.perf_counter() - t0
        rows.append((f"cinefx --temporal {mode} (batch {engine.batch})", args.frames / dt))

    # diffusers' stock pipeline, one frame per call
    host = comps.host
    stock = StableDiffusionControlNetImg2ImgPipeline(
        vae=host.vae, text_encoder=host.text_encoder, tokenizer=host.tokenizer, unet=host.unet,
        controlnet=comps.controlnets["canny"], scheduler=host.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    canny = CannyExtractor()
    n_base = args.baseline_frames or args.frames
    images = [Image.fromarray(f) for f in frames[:n_base]]
    controls = [Image.fromarray((canny(f[None])[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for f in frames[:n_base]]
    gen = torch.Generator(args.device).manual_seed(0)

    def one(i):
        stock(prompt="epic cinematic film still", image=images[i], control_image=controls[i], strength=1.0,
              num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gen, height=size, width=size)

    one(0)
    sync(args.device)
    t0 = time.perf_counter()
    for i in range(n_base):
        one(i)
    sync(args.device)
    base_fps = n_base / (time.perf_counter() - t0)
    rows.append(("diffusers StableDiffusionControlNetImg2ImgPipeline, per frame", base_fps))

    print(f"{'run':<64} {'frames/s':>9} {'× per-frame':>12} {'TFLOP/s':>9}")
    for name, fps in rows:
        rate = "n/a" if args.tiny else f"{fps * evals_per_frame * tflop:.1f}"  # the FLOP count is SD1.5's
        print(f"{name:<64} {fps:9.2f} {fps / base_fps:12.2f} {rate:>9}")


if __name__ == "__main__":
    main()
