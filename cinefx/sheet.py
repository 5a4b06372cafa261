"""Contact sheets: a grid of captioned stills written as one PNG (previews, validation sheets)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from cinefx.errors import OutputError
from cinefx.fsutil import write_bytes


def contact_sheet(images: list[np.ndarray], captions: list[str], tile_width: int = 320,
                  columns: int = 4) -> np.ndarray:
    """Tile (H, W, 3) uint8 RGB images, each scaled to `tile_width`, with a caption strip under
    each. Returns the sheet as (H, W, 3) uint8 RGB."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    tiles = []
    for img, text in zip(images, captions):
        h = max(1, round(img.shape[0] * tile_width / img.shape[1]))
        tile = cv2.resize(img, (tile_width, h), interpolation=cv2.INTER_AREA)
        strip = np.full((24, tile_width, 3), 24, np.uint8)
        cv2.putText(strip, text[:48], (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (235, 235, 235), 1, cv2.LINE_AA)
        tiles.append(np.concatenate([tile, strip]))
    cell_h = max(t.shape[0] for t in tiles)
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    gap = 4
    sheet = np.full((rows * (cell_h + gap) + gap, columns * (tile_width + gap) + gap, 3), 12, np.uint8)
    for i, t in enumerate(tiles):
        y, x = gap + (i // columns) * (cell_h + gap), gap + (i % columns) * (tile_width + gap)
        sheet[y:y + t.shape[0], x:x + tile_width] = t
    return sheet


def write_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an RGB image as PNG, whole or not at all (see `cinefx.fsutil`)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"{path}: folder {path.parent} does not exist")
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OutputError(f"{path}: PNG encoding failed")
    return write_bytes(path, buf.tobytes())
