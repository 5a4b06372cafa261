"""Training images: find them, caption them, check them, and cut them into aspect-ratio buckets.

Accepted layouts (checked in this order):
  - ``metadata.jsonl`` in the folder: one ``{"file_name": …, "text": …}`` per line (Hugging Face
    imagefolder);
  - kohya-style ``N_name/`` subfolders, N being the repeat count, given as the parent or the leaf;
  - a plain folder of images.
A caption comes from a same-name ``.txt`` or ``.caption`` file, else from a captioner when one is
given (``train-preset --caption auto``: the eval captioner, as DreamShot built its data set), else
from the template (which names the trigger word); the summary says how many came from where.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cinefx.errors import InputFileError, MissingFileError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
_KOHYA = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str
    repeats: int = 1
    size: tuple[int, int] = (0, 0)  # (width, height)


@dataclass(frozen=True)
class Dataset:
    items: tuple[Item, ...]
    notes: tuple[str, ...] = field(default=())
    generated: tuple[Item, ...] = ()  # items whose caption the captioner wrote (`save_captions` keeps them)

    @property
    def samples_per_epoch(self) -> int:
        return sum(i.repeats for i in self.items)


def _caption_for(img: Path, template: str, trigger: str) -> tuple[str, bool]:
    for suffix in (".txt", ".caption"):
        f = img.with_suffix(suffix)
        if f.is_file():
            text = f.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                return text, True
    return template.format(trigger=trigger), False


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def scan_dataset(folder: str | Path, trigger: str, template: str = "{trigger}, film still",
                 min_side: int = 256, captioner: Callable[[Sequence[Path]], list[str]] | None = None) -> Dataset:
    """Find, caption and check every training image. `captioner` (paths → one caption each)
    captions the images that have none, instead of `template`. Raises `InputFileError` naming the
    folder or file when nothing usable is left."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: training folder not found")
    found: list[tuple[Path, int, str | None]] = []  # (image, repeats, caption from metadata)
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                found.append((folder / row["file_name"], 1, str(row.get("text") or "") or None))
            except (ValueError, KeyError, TypeError):
                raise InputFileError(f"{meta}: line {n} is not {{\"file_name\": …, \"text\": …}}") from None
    else:
        leaf = _KOHYA.match(folder.name)
        subs = [d for d in sorted(folder.iterdir()) if d.is_dir() and _KOHYA.match(d.name)]
        groups = [(folder, int(leaf.group(1)))] if leaf else [(d, int(_KOHYA.match(d.name).group(1))) for d in subs]
        if not groups:
            groups = [(folder, 1)]
        for d, repeats in groups:
            found += [(p, max(1, repeats), None) for p in _images(d)]
    if not found:
        raise InputFileError(f"{folder}: no training images found ({', '.join(sorted(IMAGE_SUFFIXES))})")

    items, unreadable, small, dupes, templated = [], [], [], [], []
    seen: dict[str, Path] = {}
    for path, repeats, meta_caption in found:
        data = path.read_bytes() if path.is_file() else b""
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if img is None:
            unreadable.append(path)
            continue
        h, w = img.shape[:2]
        if min(h, w) < min_side:
            small.append(path)
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            dupes.append(path)
            continue
        seen[digest] = path
        if meta_caption is not None:
            caption = meta_caption
        else:
            caption, own = _caption_for(path, template, trigger)
            if not own:
                templated.append(len(items))
        if trigger and trigger not in caption:
            caption = f"{trigger}, {caption}"
        items.append(Item(path, caption, repeats, (w, h)))
    generated = []
    if captioner is not None and templated:
        auto = captioner([items[k].path for k in templated])
        for k, text in zip(templated, auto):
            items[k] = dataclasses.replace(items[k], caption=f"{trigger}, {text}" if trigger else text)
            generated.append(items[k])
    notes = [f"{len(items)} images used"]
    for what, paths in (("unreadable", unreadable), (f"smaller than {min_side} px", small), ("duplicates", dupes)):
        if paths:
            notes.append(f"{len(paths)} skipped as {what}: {', '.join(p.name for p in paths[:5])}"
                         + (" …" if len(paths) > 5 else ""))
    if generated:
        notes.append(f"{len(generated)} without a caption file captioned automatically, e.g. "
                     + "; ".join(repr(i.caption) for i in generated[:3]))
    elif templated:
        notes.append(f"{len(templated)} without a caption file: captioned {template.format(trigger=trigger)!r}")
    if not items:
        raise InputFileError(f"{folder}: no usable training images ({'; '.join(notes[1:])})")
    return Dataset(tuple(items), tuple(notes), tuple(generated))


def save_captions(data: Dataset) -> list[Path]:
    """Write each generated caption beside its image as NAME.txt (where none exists), so the user
    can read and correct them and the next run uses them as written."""
    from cinefx.fsutil import write_text

    out = []
    for item in data.generated:
        txt = item.path.with_suffix(".txt")
        if not txt.exists():
            out.append(write_text(txt, item.caption + "\n"))
    return out


def bucket_sizes(resolution: int, multiple: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(w, h) buckets of about `resolution`² pixels, sides multiples of `multiple`, aspect ≤ max_ratio."""
    out = set()
    area = resolution * resolution
    w = multiple
    while w <= resolution * max_ratio:
        h = int(area / w) // multiple * multiple
        if h >= multiple and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
        w += multiple
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: abs(np.log(b[0] / b[1]) - np.log(ratio)))


def load_image(item: Item, bucket: tuple[int, int], rng: np.random.Generator, random_crop: bool,
               flip: bool) -> np.ndarray:
    """The image scaled to cover `bucket` and cropped to it: (h, w, 3) float32 in [-1, 1]."""
    img = cv2.cvtColor(cv2.imread(str(item.path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    bw, bh = bucket
    h, w = img.shape[:2]
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    x0 = int(rng.integers(0, nw - bw + 1)) if random_crop else (nw - bw) // 2
    y0 = int(rng.integers(0, nh - bh + 1)) if random_crop else (nh - bh) // 2
    img = img[y0:y0 + bh, x0:x0 + bw]
    if flip and rng.random() < 0.5:
        img = img[:, ::-1]
    return np.ascontiguousarray(img, dtype=np.float32) / 127.5 - 1.0
