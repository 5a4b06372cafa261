"""The evaluation models: a captioner, a sentence encoder, DINO and CLIP, found as the diffusion
weights are (`cinefx.diffusion.models.resolve`: a local transformers folder, the Hugging Face cache,
or a hub id downloaded when online; safetensors only unless `allow_pickle`).

- captioner (content similarity, the Cinematic Frame Generation seed): ViT-GPT2, greedy decoding,
  at most 16 new tokens;
- sentence encoder: all-MiniLM-L6-v2 — mean of the token embeddings over the attention mask, then
  L2-normalised (the model card's recipe, which sentence-transformers' Pooling + Normalize apply);
- DINO (DreamShot; Caron et al. 2021): ViT-S/16, the final [CLS] token;
- CLIP (CLIP-T, frame consistency; Radford et al. 2021): `get_image_features` / `get_text_features`.

Preprocessing is each model's own transformers processor. Nothing here imports torch at module
level.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from cinefx.diffusion.models import PICKLE_SUFFIXES, Resolved, complete, resolve
from cinefx.errors import InputFileError, ModelError

DEFAULTS = {"captioner": "nlpconnect/vit-gpt2-image-captioning",
            "sentence": "sentence-transformers/all-MiniLM-L6-v2",
            "dino": "facebook/dino-vits16",
            "clip": "openai/clip-vit-large-patch14"}
CAPTION_TOKENS = 16  # new tokens per caption, greedy
BATCH = 16  # images per forward pass

# the models each model-based measure needs, by the measures' names in notes
NEEDS = {"content similarity": ("captioner", "sentence"), "DINO": ("dino",),
         "CLIP consistency/CLIP-T": ("clip",)}


@dataclass(frozen=True)
class EvalModelSpec:
    """A folder or hub id per model; None takes `DEFAULTS` (config file: ``[models.eval]``)."""

    captioner: str | None = None
    sentence: str | None = None
    dino: str | None = None
    clip: str | None = None
    allow_pickle: bool = False

    def id(self, role: str) -> str:
        return getattr(self, role) or DEFAULTS[role]

    def ids(self) -> dict[str, str]:
        """role → the model id or folder used: every result records these."""
        return {f.name: self.id(f.name) for f in fields(self) if f.name in DEFAULTS}


def resolve_eval_models(spec: EvalModelSpec, roles: Sequence[str] = tuple(DEFAULTS)) -> dict[str, Resolved]:
    """Where each model would load from, or why not. Never imports torch, never downloads."""
    out = {}
    for role in roles:
        r = resolve(role, spec.id(role), spec.allow_pickle)
        if r.how == "file":  # a weights file alone lacks the tokenizer and processor
            r = Resolved(role, r.spec, "missing", r.path, "must be a transformers model folder or hub id, not a file")
        elif r.how in ("folder", "cache") and not spec.allow_pickle and not any(r.path.glob("*.safetensors*")) \
                and any(r.path.glob(f"*{suffix}") for suffix in PICKLE_SUFFIXES):
            r = Resolved(role, r.spec, "missing", r.path,
                         "holds only pickled weights, which can run code when loaded; pass --allow-pickle "
                         "(allow_pickle = true under [models]) if you trust them")
        out[role] = r
    return out


def missing_note(found: dict[str, Resolved]) -> str | None:
    """One line: which measures are skipped for want of which weights, and how to get them."""
    lacking = [r for r in found.values() if not r.ok]
    if not lacking:
        return None
    skipped = [f"{label} needs {' and '.join(found[k].spec for k in need if not found[k].ok)}"
               for label, need in NEEDS.items() if any(k in found and not found[k].ok for k in need)]
    return (f"weight-free measures only: {'; '.join(skipped)} ({lacking[0].detail}); or name local folders "
            "under [models.eval] in the config file")


def _features(out):
    """transformers 4 returns the projected embeddings, 5 an output whose pooler_output holds them."""
    return out if hasattr(out, "shape") else out.pooler_output


def _unit(x) -> np.ndarray:
    """(N, D) torch tensor → L2-normalised float32 numpy, so a dot product is the cosine."""
    x = x.float()
    return (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy()


def quiet_transformers() -> None:
    """Silence transformers' and huggingface_hub's logs and progress bars: a failed load prints
    cinefx's one line, not the library's log of it first, nor advice such as torchvision being
    absent (the image processors fall back to PIL, which is all cinefx needs)."""
    import logging

    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    for lib in (transformers_logging, hub_logging):
        lib.set_verbosity(logging.CRITICAL)
    transformers_logging.disable_progress_bar()


def _load(loader, r: Resolved, allow_pickle: bool, weights: bool = True, **kwargs):
    """`loader.from_pretrained` on a resolved model, failures as one `ModelError` naming it."""
    if weights:
        kwargs["use_safetensors"] = None if allow_pickle else True
    try:
        with warnings.catch_warnings():  # e.g. torch's note on pickles: the error below says it all
            warnings.simplefilter("ignore")
            return loader.from_pretrained(r.where, local_files_only=r.how != "hub", **kwargs)
    except Exception as ex:  # libraries raise many kinds (SafetensorError, OSError, …): each is one line here
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        hint = ""
        if weights and not allow_pickle and "safetensors" in first:
            hint = ("; it may ship only pickled weights, which can run code when loaded: pass --allow-pickle "
                    "(allow_pickle = true under [models]) if you trust it")
        elif r.how == "hub":
            hint = f"; check the network, or download it elsewhere with `huggingface-cli download {r.spec}`"
        raise ModelError(f"{r.role} model {r.spec!r}: cannot be loaded ({first[:200]}){hint}") from ex


class EvalModels:
    """The evaluation models named by `spec` for `roles`, loaded on `device` in `dtype` (default
    float32). Raises `ModelError` when one is missing or broken; `resolve_eval_models` says which
    are there without loading anything.

    Every method takes images as (H, W, 3) uint8 RGB arrays and returns (N, D) float32 unit
    vectors (captions: N strings), computed BATCH images at a time."""

    def __init__(self, spec: EvalModelSpec = EvalModelSpec(), roles: Sequence[str] = tuple(DEFAULTS),
                 device: str = "cpu", dtype=None):
        quiet_transformers()
        import torch
        from transformers import (AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer, CLIPModel,
                                  ViTModel, VisionEncoderDecoderModel)

        found = resolve_eval_models(spec, roles)
        for r in found.values():
            if not r.ok:
                raise ModelError(f"{r.role} model {r.spec!r}: {r.detail}")
        self.spec, self.roles, self.device = spec, tuple(roles), torch.device(device)
        self.dtype = dtype or torch.float32
        place = dict(dtype=self.dtype)

        def model(cls, role, **kw):
            # transformers fills tensors missing from a file with random values and only logs it;
            # a pooler (which checkpoints often leave out) is never used here: every embedding
            # comes from the last hidden states
            loaded, info = _load(cls, found[role], spec.allow_pickle, output_loading_info=True, **place, **kw)
            complete(found[role], "", [k for k in info["missing_keys"] if ".pooler." not in f".{k}"])
            return loaded.to(self.device).eval()

        def companion(cls, role):
            return _load(cls, found[role], spec.allow_pickle, weights=False)

        if "captioner" in roles:
            self._captioner = model(VisionEncoderDecoderModel, "captioner")
            self._caption_images = companion(AutoImageProcessor, "captioner")
            self._caption_tokens = companion(AutoTokenizer, "captioner")
        if "sentence" in roles:
            self._sentence = model(AutoModel, "sentence")
            self._sentence_tokens = companion(AutoTokenizer, "sentence")
        if "dino" in roles:
            # DINO checkpoints have no trained pooler: the [CLS] token is the image embedding
            self._dino = model(ViTModel, "dino", add_pooling_layer=False)
            self._dino_images = companion(AutoImageProcessor, "dino")
        if "clip" in roles:
            self._clip = model(CLIPModel, "clip")
            self._clip_processor = companion(AutoProcessor, "clip")

    def _pixels(self, processor, images: Sequence[np.ndarray]):
        return processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device, self.dtype)

    def _batched(self, fn, items: Sequence) -> list:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(items), BATCH):
                out.append(fn(items[i:i + BATCH]))
        return out

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        """One caption per image: greedy, at most CAPTION_TOKENS new tokens."""
        def run(batch):
            ids = self._captioner.generate(pixel_values=self._pixels(self._caption_images, batch),
                                           max_new_tokens=CAPTION_TOKENS, num_beams=1, do_sample=False)
            return [t.strip() for t in self._caption_tokens.batch_decode(ids, skip_special_tokens=True)]

        return [c for part in self._batched(run, images) for c in part]

    def embed_sentences(self, texts: Sequence[str]) -> np.ndarray:
        """Mean-pooled, normalised sentence embeddings (N, D)."""
        def run(batch):
            enc = self._sentence_tokens(list(batch), padding=True, truncation=True, return_tensors="pt").to(self.device)
            tokens = self._sentence(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            return _unit((tokens * mask).sum(1) / mask.sum(1).clamp_min(1e-9))

        return np.concatenate(self._batched(run, texts)) if texts else np.zeros((0, 0), np.float32)

    def embed_dino(self, images: Sequence[np.ndarray]) -> np.ndarray:
        def run(batch):
            return _unit(self._dino(pixel_values=self._pixels(self._dino_images, batch)).last_hidden_state[:, 0])

        return np.concatenate(self._batched(run, images))

    def embed_clip_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        def run(batch):
            return _unit(_features(self._clip.get_image_features(
                pixel_values=self._pixels(self._clip_processor.image_processor, batch))))

        return np.concatenate(self._batched(run, images))

    def embed_clip_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts longer than CLIP's 77 tokens are truncated, as CLIP was trained."""
        def run(batch):
            enc = self._clip_processor.tokenizer(list(batch), padding=True, truncation=True,
                                                 return_tensors="pt").to(self.device)
            return _unit(_features(self._clip.get_text_features(**enc)))

        return np.concatenate(self._batched(run, texts))


def read_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; `InputFileError` if it cannot be decoded."""
    import cv2

    path = Path(path)
    try:
        data = np.fromfile(path, np.uint8)  # imread cannot open some non-ASCII paths on Windows
    except OSError as ex:
        raise InputFileError(f"{path}: cannot be read ({ex.strerror or ex})") from ex
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise InputFileError(f"{path}: not a readable image (PNG, JPEG, WebP, BMP or TIFF expected)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def caption_images(paths: Sequence[str | Path], model: str | EvalModels | None = None,
                   allow_pickle: bool = False, device: str = "cpu") -> list[str]:
    """A caption for each image file (ViT-GPT2 by default), for `train-preset --caption auto`: the
    caller prepends the trigger word. `model`: a folder, hub id or already loaded `EvalModels`."""
    models = model if isinstance(model, EvalModels) else \
        EvalModels(EvalModelSpec(captioner=model, allow_pickle=allow_pickle), ("captioner",), device)
    paths = list(paths)
    return [c for i in range(0, len(paths), BATCH)
            for c in models.caption([read_image(p) for p in paths[i:i + BATCH]])]
