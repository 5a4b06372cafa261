"""LUTs: read and write Adobe/Resolve `.cube` files, and evaluate a LUT on float colours.

A 3D LUT here is a (N, N, N, 3) float32 array indexed [b, g, r] — the order `.cube` files store
(red changes fastest) — mapping colours in [0, 1] to colours in [0, 1]. A 1D LUT (a curve per
channel, such as a log-to-display shaper) stays (N, 3): colourists' 1D files have thousands of
entries, which no 3D grid could hold.

A LUT path can come from a downloaded preset, so reading one is bounded and says nothing of the
file's content: only `.cube` names are opened, files over `MAX_FILE_BYTES` are refused before a
byte is read, the table is parsed by NumPy into float32 (no Python float per value), and errors
give the line number and the kind of problem, never the text of the line.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import cv2
import numpy as np

from cinefx.errors import LutError
from cinefx.fsutil import atomic_open
from cinefx.presets import clip_path

MAX_SIZE = 256  # a 3D LUT's side, the limit of Adobe's specification
MAX_SIZE_1D = 65536
# A 65³ LUT at 6 decimals is 7.1 MiB, a 65536-entry 1D LUT 1.8 MiB; 16 MiB leaves room for more
# digits and bounds what a hostile file costs (its table is then at most ~35 MB of float32).
MAX_FILE_BYTES = 16 << 20
MAX_LINE_BYTES = 1024  # far above a row of three numbers or a sensible TITLE
MAX_HEADER_LINES = 10_000  # keywords and comments before the table, read one by one in Python
CHUNK_LINES = 1 << 16  # table lines NumPy parses at a time
# a number, matched one way only (so a long run of digits cannot make the regex backtrack)
_NUMBER = re.compile(r"[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?|nan|inf(?:inity)?)",
                     re.ASCII | re.IGNORECASE)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def read_cube(path: str | os.PathLike) -> np.ndarray:
    """Parse a `.cube` file: (N, N, N, 3) for a 3D LUT, (N, 3) for a 1D one, on a [0, 1] domain.

    Raises `LutError` naming the file, the line and what is wrong with it (never the line's text).
    """
    path = Path(path)
    where = clip_path(path)

    def fail(what: str, line: int = 0) -> LutError:
        return LutError(f"{where}:{line}: {what}" if line else f"{where}: {what}")

    if path.suffix.lower() != ".cube":
        raise fail("not a .cube file (cinefx reads LUTs in the Adobe/Resolve .cube format)")
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise fail("not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise fail(f"{st.st_size / 2**20:.1f} MiB is too large for a LUT (the limit is "
                       f"{MAX_FILE_BYTES >> 20} MiB; a 65³ LUT is about 7 MiB)")
        with open(path, "rb") as f:
            return _parse(f, fail)
    except OSError as ex:
        raise fail(f"cannot be read ({ex.strerror or type(ex).__name__})") from None


def _parse(f, fail) -> np.ndarray:
    """The header line by line, then the table (`_table`)."""
    size3 = size1 = lineno = domain_line = 0
    dmin, dmax = np.zeros(3), np.ones(3)
    while True:
        table_at = f.tell()
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            break
        lineno += 1
        if lineno > MAX_HEADER_LINES:
            raise fail(f"no table in the first {MAX_HEADER_LINES} lines: not a .cube LUT", lineno)
        line = _content(raw, lineno, fail)
        if not line:
            continue
        head, *rest = line.split()
        if _NUMBER.fullmatch(head):
            lineno -= 1  # the table starts on this line, which _table counts again
            break
        if head == "TITLE":
            continue
        if head in ("LUT_3D_SIZE", "LUT_1D_SIZE"):
            if size3 or size1:
                raise fail("a second LUT size line (a file holds one LUT; shaper + cube files are not "
                           "supported)", lineno)
            limit = MAX_SIZE if head == "LUT_3D_SIZE" else MAX_SIZE_1D
            n = int(rest[0]) if len(rest) == 1 and rest[0].isascii() and rest[0].isdigit() else 0
            if not 2 <= n <= limit:
                raise fail(f"{head} out of range (a whole number from 2 to {limit})", lineno)
            size3, size1 = (n, 0) if head == "LUT_3D_SIZE" else (0, n)
        elif head in ("DOMAIN_MIN", "DOMAIN_MAX", "LUT_3D_INPUT_RANGE", "LUT_1D_INPUT_RANGE"):
            count = 3 if head.startswith("DOMAIN") else 2
            values = _finite(rest)
            if values is None or len(values) != count:
                raise fail(f"{head} needs {count} finite numbers", lineno)
            if head == "DOMAIN_MIN":
                dmin = np.array(values)
            elif head == "DOMAIN_MAX":
                dmax = np.array(values)
            else:
                dmin, dmax = np.full(3, values[0]), np.full(3, values[1])
            domain_line = lineno
        else:
            raise fail("unknown keyword (a .cube file has TITLE, LUT_3D_SIZE or LUT_1D_SIZE, DOMAIN_MIN, "
                       "DOMAIN_MAX, then rows of 3 numbers)", lineno)
    if not size3 and not size1:
        raise fail("no LUT_3D_SIZE or LUT_1D_SIZE line before the table: not a .cube LUT")
    if np.any(dmax <= dmin):
        raise fail("DOMAIN_MAX must be above DOMAIN_MIN in every channel", domain_line)
    size = size3 or size1
    f.seek(table_at)
    data = _table(f, lineno, size**3 if size3 else size, fail)
    lut = data.reshape(size, size, size, 3) if size3 else data
    if np.any(dmin != 0) or np.any(dmax != 1):
        lut = _on_unit_domain(lut, dmin, dmax)  # so every LUT is applied the same way
    return np.clip(lut, 0.0, 1.0, out=lut)


def _on_unit_domain(lut: np.ndarray, dmin: np.ndarray, dmax: np.ndarray) -> np.ndarray:
    """`lut`, defined on [dmin, dmax] per channel, re-sampled on [0, 1] (colours outside its domain
    clamp to the edge, as `apply` does). Trilinear interpolation is separable, so a 3D LUT is
    re-sampled axis by axis (small matrix products, no per-entry lookups)."""
    n = lut.shape[0]
    nodes = np.linspace(0.0, 1.0, n)
    pos = [np.clip((nodes - lo) / (hi - lo), 0, 1) for lo, hi in zip(dmin, dmax)]  # r, g, b
    if lut.ndim == 2:
        return np.stack([np.interp(pos[c], nodes, lut[:, c]) for c in range(3)], -1).astype(np.float32)
    wr, wg, wb = (_weights(p * (n - 1), n) for p in pos)
    t = wr @ lut  # along red: [b, g, r, c] -> [b, g, x, c]
    t = (wg @ t.reshape(n, n, -1)).reshape(n, n, n, 3)  # along green
    return (wb @ t.reshape(n, -1)).reshape(n, n, n, 3)  # along blue


def _content(raw: bytes, lineno: int, fail) -> str:
    """A line without its comment and surrounding blanks; refuses what no `.cube` file holds."""
    if len(raw) > MAX_LINE_BYTES:
        raise fail(f"line longer than {MAX_LINE_BYTES} bytes: not a .cube file", lineno)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise fail("not UTF-8 text: not a .cube file", lineno) from None
    return text.removeprefix("\ufeff").split("#", 1)[0].strip()


def _table(f, lineno: int, rows: int, fail) -> np.ndarray:
    """The table from `f` as (rows, 3) float32, parsed by NumPy `CHUNK_LINES` lines at a time
    (`lineno`: the line before it). A chunk NumPy refuses is read again line by line, only to say
    which line is wrong and why."""
    parts, seen = [], 0
    while chunk := list(itertools.islice(f, CHUNK_LINES)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NumPy warns of a chunk of comments only
                part = np.loadtxt(_lines(chunk), dtype=np.float32, comments=None, ndmin=2, encoding="utf-8")
            part = part.reshape(0, 3) if part.size == 0 else part
            good = part.shape[1] == 3 and seen + len(part) <= rows and bool(np.isfinite(part).all())
        except ValueError:
            good = False
        if not good:
            _diagnose(chunk, lineno, seen, rows, fail)
        parts.append(part)
        seen += len(part)
        lineno += len(chunk)
    if seen < rows:
        raise fail(f"the table stops after {seen} of {rows} rows (truncated?)", lineno)
    return np.concatenate(parts)


def _lines(chunk: list[bytes]):
    """Table lines for NumPy, comments cut; a line too long for a row stops the parse."""
    for raw in chunk:
        if len(raw) > MAX_LINE_BYTES:
            raise ValueError("line too long")
        yield raw.split(b"#", 1)[0]


def _finite(tokens: list[str]) -> list[float] | None:
    """`tokens` as numbers that float32 can hold (no NaN or infinity), or None."""
    if not all(_NUMBER.fullmatch(t) for t in tokens):
        return None
    values = [float(t) for t in tokens]
    return values if all(abs(v) <= _FLOAT32_MAX for v in values) else None


def _diagnose(chunk: list[bytes], lineno: int, seen: int, rows: int, fail) -> NoReturn:
    """Raise for the first line of `chunk` that is not a row of 3 finite numbers, or is a row too
    many (`lineno`: the line before it; `seen`: rows before it)."""
    first = lineno + 1
    for raw in chunk:
        lineno += 1
        line = _content(raw, lineno, fail)
        if not line:
            continue
        tokens = line.split()
        if len(tokens) != 3:
            raise fail(f"a table row needs 3 numbers, this line has {len(tokens)} values", lineno)
        if _finite(tokens) is None:
            raise fail("a table value is not a finite number", lineno)
        seen += 1
        if seen > rows:
            raise fail(f"more table rows than the {rows} the LUT size needs", lineno)
    raise fail(f"lines {first}-{lineno}: the table cannot be read as rows of 3 numbers")


def write_cube(path: str | os.PathLike, lut: np.ndarray, title: str = "cinefx") -> Path:
    """Write `lut` ((N, N, N, 3) or (N, 3), as `read_cube` returns) as a `.cube` file. Atomic: a
    crash leaves the previous file or none, never half a table."""
    path = Path(path)
    kind = "3D" if lut.ndim == 4 else "1D"
    title = " ".join(title.replace('"', "'").split())  # one line, and no quote to end it early
    with atomic_open(path) as f:
        f.write(f'TITLE "{title}"\nLUT_{kind}_SIZE {lut.shape[0]}\nDOMAIN_MIN 0 0 0\nDOMAIN_MAX 1 1 1\n')
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

def _weights(pos: np.ndarray, n: int) -> np.ndarray:
    """(len(pos), n) matrix: row k holds the linear-interpolation weights of position pos[k], in
    [0, n - 1], on n nodes."""
    i0 = np.minimum(np.floor(pos).astype(int), n - 2)
    f = pos - i0
    w = np.zeros((len(pos), n), np.float32)
    w[np.arange(len(pos)), i0] = 1 - f
    w[np.arange(len(pos)), i0 + 1] = f
    return w


def _linear_weights(n: int) -> np.ndarray:
    """(256, n) matrix: row x holds the linear-interpolation weights of 8-bit level x on n nodes."""
    return _weights(np.arange(256, dtype=np.float64) * (n - 1) / 255.0, n)


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
