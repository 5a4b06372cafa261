"""The look as a LUT: a preset's colour grade as a `.cube` file that DaVinci Resolve, Premiere and
FFmpeg's `lut3d` filter load, so an editor can apply cinefx's look to footage it never saw.

A LUT holds what depends on a pixel's colour alone: the whole colour pipeline of
`cinefx.grade.colour` (white balance, contrast, roll-off, the preset's own LUT, saturation, split
toning, black lift). Bloom, halation, vignette, grain and letterbox depend on where a pixel is or
on its neighbours, so no LUT can hold them; they stay cinefx's. With an input colour space the LUT
starts from the camera's code values (log, HDR) and includes the conversion cinefx would make.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cinefx.errors import OptionError
from cinefx.grade import lut as lutlib
from cinefx.grade.colour import colour_transform
from cinefx.presets import GradeConfig, Preset, clip_path

SIZES = (17, 33, 65)  # the sizes every editor loads; 65³ follows cinefx within a level


def look_table(grade: GradeConfig, size: int = 65, input_colorspace: str | None = None) -> np.ndarray:
    """The colour part of `grade` sampled on a size³ grid: (size, size, size, 3) float32 indexed
    [b, g, r] like `lut.identity`, values in [0, 1]. With `input_colorspace` (a name or alias, see
    `cinefx.grade.ocio.resolve`) the grid is in that space's code values and runs through the exact
    conversion to Rec.709 first."""
    grid = lutlib.identity(size)
    if input_colorspace is not None:
        from cinefx.grade import ocio

        space = ocio.resolve(input_colorspace)
        if space != ocio.REC709:
            grid = np.clip(ocio.convert_exact(grid, space), 0.0, 1.0)
    return colour_transform(grade)(grid)


def export_look_lut(preset: Preset, path: str | os.PathLike, size: int = 65,
                    input_colorspace: str | None = None) -> Path:
    """Write `preset`'s colour grade (see the module docstring) as a 3D `.cube` LUT at `path`,
    atomically. Returns the path. Raises `OptionError` for a size editors do not load or a path
    that is not a `.cube` file, `LutError` if the preset's own LUT is malformed."""
    path = Path(path)
    if size not in SIZES:
        raise OptionError(f"--size {clip_path(str(size))}: a look LUT is {', '.join(map(str, SIZES))} points a side")
    if path.suffix.lower() != ".cube":
        raise OptionError(f"{clip_path(path)}: a look LUT is written as a .cube file (name it …/{path.stem}.cube)")
    table = look_table(preset.grade, size, input_colorspace)
    title = f"cinefx {preset.name}" + (f" from {input_colorspace}" if input_colorspace else "")
    return lutlib.write_cube(path, table, title=title)
