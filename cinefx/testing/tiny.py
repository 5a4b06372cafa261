"""A tiny, randomly initialised SD1.5-shaped model bundle, written in the formats real weights use.

Tests and smoke runs load it through exactly the path users' weights take (diffusers folders,
safetensors files, a CLIP tokenizer from vocab/merges files, a transformers depth estimator), so
the loading code is exercised without a download. Its pictures are noise-driven and say nothing
about quality; they prove mechanics.

Layout written by `write_tiny_bundle(DIR)` (the same layout `cinefx.diffusion.models` looks for
beside a user's base model)::

    DIR/model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/   (SD1.5 pipeline folder)
    DIR/controlnet-canny/, DIR/controlnet-depth/                                 (ControlNetModel)
    DIR/depth-estimator/                                                         (DPTForDepthEstimation)
"""

from __future__ import annotations

import json
from pathlib import Path

# Words the tiny tokenizer merges into single tokens, so prompts tokenize like real ones would:
# a handful of whole-word tokens and the rest as characters.
_WORDS = ("cinematic", "film", "still", "epic", "noir", "shot", "close", "medium", "long", "light",
          "dark", "golden", "hour", "the", "a", "of", "and", "blurry", "lowres", "<cinefx-look>")

TEXT_DIM = 32
SAMPLE_SIZE = 8  # latent side: with the VAE's factor 8 the bundle renders natively at 64 px
# SD1.5's scheduler/scheduler_config.json as published, key for key: schedulers built from the
# bundle's config see exactly what they see with the real model (no clipping, alpha not set to one).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False}


def _bytes_to_unicode() -> dict[int, str]:
    """The byte → printable character table byte-level BPE tokenizers (GPT-2, CLIP) use."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def write_tokenizer(folder: Path) -> int:
    """Write CLIP tokenizer files (vocab.json, merges.txt, configs). Returns the vocabulary size."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in base + [c + "</w>" for c in base]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: every merge's parts are already tokens
            a, b = pieces[0], pieces[1]
            merged = a + b
            if f"{a} {b}" not in merges:
                merges.append(f"{a} {b}")
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    return len(vocab)


def write_tiny_bundle(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny bundle into `folder` (created) and return it."""
    from cinefx.diffusion.models import quiet_libraries

    quiet_libraries()  # before the imports below, which print advice about torchvision
    import torch
    from diffusers import (AutoencoderKL, ControlNetModel, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, DPTConfig,
                              DPTForDepthEstimation, DPTImageProcessor)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab_size = write_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    # SD1.5's shapes scaled down: two resolution levels with cross-attention; two heads (diffusers
    # reads attention_head_dim as the head count here), which keeps CPU attention cheap.
    unet = UNet2DConditionModel(
        sample_size=SAMPLE_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
        attention_head_dim=2, norm_num_groups=8)
    # Four blocks, as SD1.5's VAE, so that one latent pixel is 8 image pixels.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=SAMPLE_SIZE * 8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=TEXT_DIM))
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    # save_pretrained adds keys the published file lacks (timestep_spacing): a scheduler of another
    # family built from the published file takes its own defaults for them
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2) + "\n")
    for kind in ("canny", "depth"):
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
        # from_unet zero-initialises the output convolutions (as ControlNet training starts); give
        # them small random values so each control visibly changes the result.
        for name, p in cn.named_parameters():
            if "zero_conv" in name or "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                torch.nn.init.normal_(p, std=0.02)
        cn.save_pretrained(folder / f"controlnet-{kind}", safe_serialization=True)
    depth = DPTForDepthEstimation(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, head_in_index=-1, is_hybrid=False))
    depth.save_pretrained(folder / "depth-estimator", safe_serialization=True)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(
        folder / "depth-estimator")
    (folder / "README.txt").write_text(
        "cinefx tiny test bundle: random weights in SD1.5 + ControlNet shapes. Renders noise; "
        "for tests and smoke runs only.\n", encoding="utf-8")
    return folder


def write_turbo_lora(unet, path: str | Path, rank: int = 8, alpha: float = 4.0, seed: int = 0) -> Path:
    """A random LoRA over the layers the distilled few-step LoRAs adapt (LCM-LoRA, Hyper-SD, TCD:
    attention projections, feed-forward, resnet convolutions and time projections, resamplers),
    for `unet`'s shapes, in kohya's format with alpha ≠ rank as their published files are, so it
    loads through the path theirs take. Its pictures mean nothing; tests and benches only."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in unet.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        adapted = leaf in ("to_q", "to_k", "to_v", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj",
                           "conv_shortcut", "conv") or name.endswith(("to_out.0", "ff.net.0.proj", "ff.net.2"))
        if not adapted or not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        fan_in = m.weight[0].numel()
        down = torch.randn((rank, *m.weight.shape[1:]), generator=gen) / fan_in ** 0.5
        up = torch.randn((m.weight.shape[0], rank, *(1,) * (m.weight.ndim - 2)), generator=gen) * 0.1
        tensors.update({f"{key}.lora_down.weight": down.contiguous(), f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(float(alpha))})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
