"""Diffusion engine speed on a GPU: cinefx eager and compiled in each temporal mode, and turbo,
against diffusers' per-frame ControlNet img2img pipeline, in one process.

Every row runs SD1.5-shaped models (the published SD1.5 / ControlNet configs with random weights:
no download) at 512², strength 1 (every step runs), 16 frames, 20 steps with CFG 7.5 (turbo: 4
steps, guidance 1, a random LoRA of LCM-LoRA's rank through Hyper-SD's trailing-DDIM sampler),
the batch as users get it (the engine's: the preset's chunk, capped by free memory). Per row:

- frames/s end to end (`DiffusionEngine.render`: controls, VAE, denoising, colour anchoring) and
  for the denoising alone (the UNet + ControlNet evaluations, timed with CUDA events);
- achieved TFLOP/s, the FLOPs counted once per configuration by FlopCounterMode over a whole
  render, and the denoising's share of 790 TFLOP/s (the H200's measured bf16 matrix rate);
- peak GPU memory of the timed render, and time to first frame: a fresh engine's first batch
  (its memory probe and, compiled, the compilation; `compile_s` is that minus the eager row's).

Every cinefx row decodes each batch while the next one denoises (`SpeedOptions.overlap_decode`,
the default) but one, `--temporal full` eager with the decode in line after each batch's
denoising: the two `full` eager rows show what the overlap buys, in frames/s and in memory.

Each row is appended to diffusion_rows.jsonl under --out ($OUT when set) as soon as it is
measured; a row that would not end within --budget seconds of the start is written as skipped.

    python bench/bench_diffusion_gpu.py --out $OUT      # the H200 run, under 8 minutes with compilation
    python bench/bench_diffusion_gpu.py --tiny --device cpu --frames 2 --steps 1 --compile-backend eager
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PEAK_TFLOPS = 790  # bf16 matrix products on one H200, measured (see /work/.library/device/KINDS.md)
TURBO_STEPS = 4
TURBO_RANK = 64  # LCM-LoRA SD1.5's rank

# SD1.5's published shapes (runwayml/stable-diffusion-v1-5 unet/vae/text_encoder config.json), and
# the same architecture narrowed for a smoke run anywhere: one construction path for both.
SHAPES = {
    "sd15": dict(blocks=(320, 640, 1280, 1280), vae=(128, 256, 512, 512), text=768, text_ff=3072,
                 text_layers=12, text_heads=12, head_dim=8),
    "tiny": dict(blocks=(32, 64, 64, 64), vae=(32, 32, 64, 64), text=32, text_ff=64,
                 text_layers=2, text_heads=2, head_dim=8),
}


@dataclasses.dataclass(frozen=True)
class Row:
    temporal: str
    compiled: bool = False
    turbo: bool = False
    overlap: bool = True  # decode a batch while the next denoises

    @property
    def name(self) -> str:
        return (f"cinefx --temporal {self.temporal}" + (" --turbo" if self.turbo else "")
                + (" --compile" if self.compiled else "") + ("" if self.overlap else ", decode in line"))

    @property
    def key(self) -> str:  # for --rows
        return (self.temporal + ("+turbo" if self.turbo else "") + ("+compile" if self.compiled else "")
                + ("" if self.overlap else "+inline"))


# In the order they run: the per-frame baseline first (on the modules as loaded), every eager row
# before the compiled ones, which take minutes to compile and are the ones a budget cuts; of those,
# the two the goals are about (full, and full with turbo) first.
ROWS = (Row("none"), Row("anchor"), Row("full"), Row("full", overlap=False), Row("full", turbo=True),
        Row("full", True), Row("full", True, True), Row("none", True), Row("anchor", True))
BASELINE = "diffusers StableDiffusionControlNetImg2ImgPipeline, per frame"


def sd15_components(device, dtype, tiny: bool):
    """A `Components` set in SD1.5's architecture (narrowed with `tiny`), randomly initialised
    (seeded: two calls give the same weights) directly on `device`."""
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
    with torch.device(device):  # initialising 1.3 G parameters on the CPU would take a minute
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
        cn = ControlNetModel.from_unet(unet)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1)
    host = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    host.to(device, dtype)
    cn = cn.to(device, dtype).eval()
    return Components(host=host, controlnets={"canny": cn}, control_models={}, device=torch.device(device), dtype=dtype)


class Span:
    """Time spent inside wrapped calls: CUDA events on a GPU (nothing waits inside the loop), the
    wall clock on a CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.reset()

    def reset(self) -> None:
        self.marks, self.cpu = [], 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if not self.cuda:
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                self.cpu += time.perf_counter() - t
                return out
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self.marks.append((start, end))
            return out
        return timed

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return self.cpu + sum(s.elapsed_time(e) for s, e in self.marks) / 1000


def count_flops(fn) -> tuple[float, float]:
    """(all FLOPs, the UNet's and ControlNets' FLOPs) of `fn()`, by FlopCounterMode's module tree."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    per_module = counter.get_flop_counts()
    denoise = sum(sum(per_module.get(name, {}).values()) for name in ("UNet2DConditionModel", "ControlNetModel"))
    return float(counter.get_total_flops()), float(denoise)


class Bench:
    def __init__(self, args):
        self.args, self.start = args, time.monotonic()
        self.device = args.device
        self.dtype = torch.float32 if args.device == "cpu" else (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        self.size = 64 if args.tiny else args.size
        out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="cinefx-bench-"))
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = out / "diffusion_rows.jsonl"
        self.flops: dict[tuple, tuple[float, float]] = {}  # (temporal, turbo) → counted once
        self.first: dict[tuple, float] = {}  # eager time to first frame, for compile_s
        self.took = {False: 30.0, True: 150.0}  # guess of a row's seconds, eager / compiled; then measured
        self.rows: list[dict] = []

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def write(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(json.dumps(row), flush=True)

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def result(self, name: str, n: int, e2e: float, denoise: float, flops: tuple[float, float], first: float,
               **extra) -> dict:
        total, den = flops
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if self.device == "cuda" else None
        peak = PEAK_TFLOPS if self.device == "cuda" else None
        return dict(name=name, frames=n, size=self.size, fps=n / e2e, fps_denoise=n / denoise,
                    tflop=total / 1e12, tflops=total / e2e / 1e12, tflops_denoise=den / denoise / 1e12,
                    pct_peak_denoise=(100 * den / denoise / 1e12 / peak) if peak else None,
                    peak_mem_gib=mem, first_frame_s=first, **extra)

    # -- rows --------------------------------------------------------------------------------

    def baseline(self, comps, frames: np.ndarray) -> dict:
        """diffusers' own pipeline, one frame per call, on the modules as loaded."""
        from diffusers import StableDiffusionControlNetImg2ImgPipeline
        from PIL import Image

        from cinefx.controls import CannyExtractor

        a, host = self.args, comps.host
        stock = StableDiffusionControlNetImg2ImgPipeline(
            vae=host.vae, text_encoder=host.text_encoder, tokenizer=host.tokenizer, unet=host.unet,
            controlnet=comps.controlnets["canny"], scheduler=host.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        stock.set_progress_bar_config(disable=True)
        canny = CannyExtractor()
        images = [Image.fromarray(f) for f in frames]
        controls = [Image.fromarray((canny(f[None])[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
                    for f in frames]
        span = Span(self.device)
        for m in (stock.unet, stock.controlnet):
            m.forward = span.wrap(m.forward)  # eager modules: the instance attribute is what a call runs
        gen = torch.Generator(self.device).manual_seed(0)

        def one(i):
            stock(prompt="epic cinematic film still", image=images[i], control_image=controls[i], strength=1.0,
                  num_inference_steps=a.steps, guidance_scale=a.guidance, generator=gen, height=self.size,
                  width=self.size)

        t = time.perf_counter()
        one(0)
        self.sync()
        first = time.perf_counter() - t
        total, den = count_flops(lambda: one(0))
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        span.reset()
        t = time.perf_counter()
        for i in range(len(frames)):
            one(i)
        self.sync()
        e2e = time.perf_counter() - t
        n = len(frames)
        del stock.unet.forward, stock.controlnet.forward  # back to the classes' own
        return self.result(BASELINE, n, e2e, span.seconds(), (total * n, den * n), first, batch=1,
                           steps=a.steps, guidance=a.guidance)

    def engine(self, row: Row, comps, lora):
        """The `DiffusionEngine` a row renders with, on `comps`."""
        from cinefx.diffusion.engine import DiffusionEngine
        from cinefx.diffusion.pipeline import TemporalControlPipeline
        from cinefx.diffusion.turbo import TURBO_GUIDANCE, TURBO_KINDS, apply_turbo
        from cinefx.presets import load_preset, override
        from cinefx.renderers import EngineSettings

        a = self.args
        steps, guidance = (TURBO_STEPS, TURBO_GUIDANCE) if row.turbo else (a.steps, a.guidance)
        preset = override(load_preset("epic"), "diffusion", temporal=row.temporal, strength=1.0, steps=steps,
                          guidance=guidance, noise_prior="residual")
        preset = dataclasses.replace(preset, diffusion=dataclasses.replace(preset.diffusion,
                                                                           controls=(("canny", 1.0),)))
        apply_turbo(comps.host, lora if row.turbo else None)
        pipe = TemporalControlPipeline.from_components(
            comps, TURBO_KINDS[lora.kind].sampler if row.turbo else "dpm++")
        pipe.overlap_decode = row.overlap
        return DiffusionEngine(pipe, preset, EngineSettings(size=self.size))

    def precision(self, row: Row, comps, lora, frames: np.ndarray) -> dict:
        """Mean absolute difference, in levels of 255, between a render on `comps` (the bench's
        precision, compiled for a compiled row) and eager fp32 on the same weights and inputs; the
        issue's goal is at most 2. Random weights amplify rounding more than trained ones may."""
        from cinefx.diffusion.models import SpeedOptions, apply_speed

        ref = sd15_components(self.device, torch.float32, self.args.tiny)
        apply_speed(ref, SpeedOptions())
        fast = self.engine(row, comps, lora).render(frames, 0)
        exact = self.engine(row, ref, lora).render(frames, 0)
        del ref
        return dict(name=f"precision: {row.name}, {self.dtype} against eager fp32", frames=len(frames),
                    levels=float(np.abs(fast.astype(np.int16) - exact).mean()), goal_levels=2.0)

    def cinefx(self, row: Row, comps, frames: np.ndarray, lora) -> dict:
        engine = self.engine(row, comps, lora)
        steps, guidance = engine.steps, engine.guidance
        pipe = engine.pipe
        span = Span(self.device)
        pipe.predict_noise = span.wrap(pipe.predict_noise)
        t = time.perf_counter()
        engine.render(frames[:engine.batch], 0)  # sizes the batch to free memory, compiles
        self.sync()
        first = time.perf_counter() - t
        key = (row.temporal, row.turbo)
        if row.compiled or key in self.flops:
            engine.render(frames, 1)  # the shapes the first batch did not meet (anchors)
        else:  # decoding in line: FlopCounterMode counts the calling thread's work only
            pipe.overlap_decode = False
            self.flops[key] = count_flops(lambda: engine.render(frames, 1))
            pipe.overlap_decode = row.overlap
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        span.reset()
        self.sync()
        t = time.perf_counter()
        engine.render(frames, 2)
        self.sync()
        e2e = time.perf_counter() - t
        extra = dict(batch=engine.batch, steps=steps, guidance=guidance, temporal=row.temporal, compiled=row.compiled,
                     turbo=row.turbo, overlap_decode=row.overlap)
        if row.compiled and key in self.first:
            extra["compile_s"] = first - self.first[key]
        elif not row.compiled:
            self.first.setdefault(key, first)
        return self.result(row.name, len(frames), e2e, span.seconds(), self.flops[key], first, **extra)


def overlap_check(comps, device: str, size: int) -> dict:
    """The decode overlap (`pipeline.BatchDecoder`: a thread, on a GPU its side stream) against the
    in-line decode, while the caller's stream is busy and allocating and the latents are freed at
    once: the same bytes, or the event / record_stream discipline is wrong."""
    from cinefx.diffusion.pipeline import BatchDecoder, TemporalControlPipeline

    pipe = TemporalControlPipeline.from_components(comps, "ddim")
    x = torch.randn(5, 4, size // 8, size // 8, device=device, dtype=pipe.dtype)
    with torch.inference_mode():
        inline = pipe.decode_latents(x).cpu()
    with BatchDecoder(pipe) as decoder:
        busy = torch.randn(2048, 2048, device=device)
        y = x * 1  # made on the caller's stream just before
        job = decoder.submit(y)
        del y
        for _ in range(20):
            busy = busy @ busy / 2048 + torch.zeros_like(busy)
        images = job.result()
    return dict(name="decode overlap: side-stream decode equals in-line", identical=bool(torch.equal(images, inline)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="SD1.5's architecture narrowed, 64² (smoke test)")
    ap.add_argument("--out", help="folder for diffusion_rows.jsonl (default: $OUT, else a temporary folder)")
    ap.add_argument("--rows", default=",".join(r.key for r in ROWS),
                    help="cinefx rows to run, by key (the baseline always runs): %(default)s")
    ap.add_argument("--budget", type=float, default=420, help="seconds from the start after which no row begins")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: tracing only)")
    args = ap.parse_args()

    from cinefx.diffusion.models import SpeedOptions, apply_speed, quiet_libraries
    from cinefx.diffusion.turbo import turbo_lora
    from cinefx.testing.clips import Move, render_move
    from cinefx.testing.tiny import write_turbo_lora

    quiet_libraries()
    bench = Bench(args)
    size = bench.size
    frames = np.stack(list(render_move(Move("astronaut", args.frames, (0.5, 0.45, 0.9), (0.53, 0.46, 0.8)),
                                       (size, size))))
    print(f"# {time.strftime('%Y-%m-%d')} device={torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'} "
          f"dtype={bench.dtype} size={size} frames={args.frames} steps={args.steps} cfg={args.guidance} "
          f"turbo={TURBO_STEPS} steps models={'tiny' if args.tiny else 'SD1.5-shaped random'} "
          f"torch={torch.__version__} → {bench.jsonl}", flush=True)
    eager = sd15_components(args.device, bench.dtype, args.tiny)
    bench.write(bench.baseline(eager, frames))
    apply_speed(eager, SpeedOptions())
    check = overlap_check(eager, args.device, size)
    bench.write(check)
    lora = turbo_lora("hyper-sd", TURBO_STEPS, str(write_turbo_lora(
        eager.host.unet, Path(tempfile.mkdtemp()) / "turbo.safetensors", rank=TURBO_RANK, alpha=8)))
    compiled, ran = None, set()
    for row in (r for r in ROWS if r.key in args.rows.split(",")):
        if bench.left() < bench.took[row.compiled]:
            bench.write(dict(name=row.name, skipped=f"--budget {args.budget:.0f} s: {bench.left():.0f} s left, "
                                                    f"a row takes about {bench.took[row.compiled]:.0f} s"))
            continue
        if row.compiled and compiled is None:
            compiled = sd15_components(args.device, bench.dtype, args.tiny)
            apply_speed(compiled, SpeedOptions(compile=True, compile_backend=args.compile_backend))
        t = time.monotonic()
        bench.write(bench.cinefx(row, compiled if row.compiled else eager, frames, lora))
        bench.took[row.compiled] = time.monotonic() - t
        ran.add(row.key)

    checks = [check]
    # compiled where that compiled row ran (its graphs are traced), else eager: never a new compile
    for row in (Row("full", "full+compile" in ran), Row("full", "full+turbo+compile" in ran, True)):
        if bench.left() < bench.took[False]:
            bench.write(dict(name=f"precision: {row.name}", skipped=f"--budget {args.budget:.0f} s"))
            continue
        checks.append(bench.precision(row, compiled if row.compiled else eager, lora, frames[:4]))
        bench.write(checks[-1])
    base = bench.rows[0]["fps"]
    for c in checks[1:]:
        print(f"\n{c['name']}: {c['levels']:.2f} levels mean absolute (goal <= {c['goal_levels']:.0f})", end="")
    print(f"\n{check['name']}: {'yes' if check['identical'] else 'NO: the overlap is unsafe on this device'}")
    print(f"\n{'run':<62} {'frames/s':>8} {'denoise':>8} {'× base':>7} {'TFLOP/s':>8} {'% peak':>7} "
          f"{'GiB':>6} {'1st s':>6}")
    for r in bench.rows:
        if "identical" in r or "levels" in r or r["name"].startswith("precision"):
            continue
        if "skipped" in r:
            print(f"{r['name']:<62} skipped ({r['skipped']})")
            continue
        pct = f"{r['pct_peak_denoise']:.1f}" if r["pct_peak_denoise"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        print(f"{r['name']:<62} {r['fps']:8.2f} {r['fps_denoise']:8.2f} {r['fps'] / base:7.2f} "
              f"{r['tflops_denoise']:8.1f} {pct:>7} {mem:>6} {r['first_frame_s']:6.1f}")


if __name__ == "__main__":
    main()
