"""LUTs: read and write Adobe/Resolve `.cube` files, and evaluate a LUT on float colours.

A 3D LUT here is a (N, N, N, 3) float32 array indexed [b, g, r] — the order `.cube` files store
(red changes fastest) — mapping colours in [0, 1] to colours in [0, 1]. A 1D LUT (a curve per
channel, such as a log-to-display shaper) stays (N, 3): colourists' 1D files have thousands of
entries, which no 3D grid could hold.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from cinefx.errors import LutError

MAX_SIZE = 256  # a 3D LUT's side
MAX_SIZE_1D = 65536


def read_cube(path: str | Path) -> np.ndarray:
    """Parse a `.cube` file: (N, N, N, 3) for a 3D LUT, (N, 3) for a 1D one, on a [0, 1] domain.
    Raises `LutError` naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as ex:
        raise LutError(f"{path}: cannot be read as a .cube text file ({ex})") from None
    size3 = size1 = 0
    dmin, dmax = np.zeros(3), np.ones(3)
    rows: list[tuple[float, float, float]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        head, *rest = line.split()
        try:
            if head == "TITLE":
                continue
            if head == "LUT_3D_SIZE":
                size3 = int(rest[0])
            elif head == "LUT_1D_SIZE":
                size1 = int(rest[0])
            elif head == "DOMAIN_MIN":
                dmin = np.array([float(v) for v in rest[:3]])
            elif head == "DOMAIN_MAX":
                dmax = np.array([float(v) for v in rest[:3]])
            elif head in ("LUT_3D_INPUT_RANGE", "LUT_1D_INPUT_RANGE"):
                dmin, dmax = np.full(3, float(rest[0])), np.full(3, float(rest[1]))
            elif head[0].isalpha() and head[0] not in "eE":
                raise LutError(f"{path}:{lineno}: unknown keyword {head!r}")
            else:
                vals = [float(v) for v in [head, *rest]]
                if len(vals) != 3:
                    raise LutError(f"{path}:{lineno}: expected 3 numbers, got {len(vals)}")
                rows.append((vals[0], vals[1], vals[2]))
        except (ValueError, IndexError):
            raise LutError(f"{path}:{lineno}: cannot parse {line!r}") from None
    if not size3 and not size1:
        raise LutError(f"{path}: no LUT_3D_SIZE or LUT_1D_SIZE line: not a .cube LUT")
    if size3 and size1:
        raise LutError(f"{path}: has both LUT_1D_SIZE and LUT_3D_SIZE (shaper + cube files are not supported)")
    size = size3 or size1
    limit = MAX_SIZE if size3 else MAX_SIZE_1D
    if not 2 <= size <= limit:
        raise LutError(f"{path}: LUT size {size} out of range (2 to {limit})")
    expected = size**3 if size3 else size
    if len(rows) != expected:
        raise LutError(f"{path}: has {len(rows)} entries, LUT size {size} needs {expected} (truncated?)")
    if np.any(dmax <= dmin):
        raise LutError(f"{path}: DOMAIN_MAX must be above DOMAIN_MIN")
    data = np.asarray(rows, np.float32)
    if not np.all(np.isfinite(data)):
        raise LutError(f"{path}: contains non-finite values")
    lut = data.reshape(size, size, size, 3) if size3 else data
    if np.any(dmin != 0) or np.any(dmax != 1):
        # Re-sample onto a [0, 1] domain so every LUT is applied the same way.
        grid = identity(size) if size3 else np.repeat(np.linspace(0, 1, size, dtype=np.float32)[:, None], 3, 1)
        lut = apply(lut, np.clip((grid - dmin) / (dmax - dmin), 0, 1).astype(np.float32))
    return np.clip(lut, 0.0, 1.0).astype(np.float32)


def write_cube(path: str | Path, lut: np.ndarray, title: str = "cinefx") -> Path:
    path = Path(path)
    n = lut.shape[0]
    kind = "3D" if lut.ndim == 4 else "1D"
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'TITLE "{title}"\nLUT_{kind}_SIZE {n}\nDOMAIN_MIN 0 0 0\nDOMAIN_MAX 1 1 1\n')
        np.savetxt(f, lut.reshape(-1, 3), fmt="%.6f")
    return path


def identity(n: int) -> np.ndarray:
    """(n, n, n, 3) grid whose entry [b, g, r] is the colour (r, g, b)/(n-1)."""
    g = np.linspace(0.0, 1.0, n, dtype=np.float32)
    b, gg, r = np.meshgrid(g, g, g, indexing="ij")
    return np.stack([r, gg, b], -1)


def apply(lut: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Trilinear lookup of float colours `rgb` (..., 3) in [0, 1] through `lut`; same shape out.

    Exact but slow on whole frames: cinefx uses it to bake LUTs, and `apply_dense` on frames.
    A 1D `lut` (N, 3) maps each channel through its own curve, linearly interpolated.
    """
    n = lut.shape[0]
    if lut.ndim == 2:
        nodes = np.linspace(0.0, 1.0, n)
        return np.stack([np.interp(rgb[..., c], nodes, lut[:, c]) for c in range(3)], -1).astype(np.float32)
    x = np.clip(rgb, 0, 1) * (n - 1)
    i0 = np.minimum(np.floor(x).astype(np.int32), n - 2)
    f = x - i0
    r0, g0, b0 = i0[..., 0], i0[..., 1], i0[..., 2]
    fr, fg, fb = f[..., 0:1], f[..., 1:2], f[..., 2:3]
    out = 0
    for db, wb in ((0, 1 - fb), (1, fb)):
        for dg, wg in ((0, 1 - fg), (1, fg)):
            for dr, wr in ((0, 1 - fr), (1, fr)):
                out = out + lut[b0 + db, g0 + dg, r0 + dr] * (wb * wg * wr)
    return out.astype(np.float32)


# -- the dense table the grader applies ---------------------------------------------------------

def _linear_weights(n: int) -> np.ndarray:
    """(256, n) matrix: row x holds the linear-interpolation weights of 8-bit level x on n nodes."""
    pos = np.arange(256, dtype=np.float64) * (n - 1) / 255.0
    i0 = np.minimum(np.floor(pos).astype(int), n - 2)
    f = pos - i0
    w = np.zeros((256, n), np.float32)
    w[np.arange(256), i0] = 1 - f
    w[np.arange(256), i0 + 1] = f
    return w


def dense_table(lut: np.ndarray) -> np.ndarray:
    """The result of `lut` ((n, n, n, 3), indexed [b, g, r] as `identity`) for every 8-bit colour.

    Trilinear interpolation on a regular grid is separable, so the 256³ table is three small matrix
    products rather than 16.7 million lookups. Returned as (256³,) uint32, each entry the output
    colour packed as the bytes r, g, b, 0, at index b·65536 + g·256 + r: the same packing as an RGBA
    pixel read as one little-endian uint32 (see `apply_dense`). 64 MiB.
    """
    if sys.byteorder != "little":
        raise RuntimeError("dense LUT tables assume a little-endian machine")
    w = _linear_weights(lut.shape[0])
    t = np.einsum("bgrc,xr->bgxc", lut.astype(np.float32), w, optimize=True)
    t = np.einsum("bgxc,yg->byxc", t, w, optimize=True)
    out = np.empty(256 ** 3, np.uint32)
    step = 32  # blue slices, to keep the float intermediate near 25 MiB
    for b0 in range(0, 256, step):
        part = np.einsum("byxc,zb->zyxc", t, w[b0:b0 + step], optimize=True)
        q = (np.clip(part, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint32)
        out[b0 * 65536:(b0 + step) * 65536] = (q[..., 0] | (q[..., 1] << 8) | (q[..., 2] << 16)).ravel()
    return out


def apply_dense(table: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Look every pixel of `rgb` (H, W, 3) uint8 up in a `dense_table`; returns (H, W, 3) uint8.
    One gather per pixel, a few milliseconds per HD frame."""
    rgba = cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA)
    idx = rgba.view(np.uint32)[..., 0]
    np.bitwise_and(idx, 0xFFFFFF, out=idx)  # drop the alpha byte
    out = table[idx]
    return cv2.cvtColor(out.view(np.uint8).reshape(rgb.shape[0], rgb.shape[1], 4), cv2.COLOR_RGBA2RGB)
