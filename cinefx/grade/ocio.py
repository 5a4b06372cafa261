"""Colour management: camera log, HDR and wide-gamut video into the display space the grade works
in, and back out, through OpenColorIO's built-in ACES studio config (`ocio://studio-config-latest`).

The grade works on BT.709 video as a player shows it: the config's "Rec.1886 Rec.709 - Display".
Footage already there is never touched (no OpenColorIO import, no cost). Anything else is converted
in float, before the one rounding to 8 bits:

- scene-referred encodings (camera log, ACEScct): the ACES 2.0 SDR output transform, view
  `SDR_VIEW` on the Rec.1886 display (a DisplayViewTransform), which tone-maps highlights into the
  display's range instead of clipping them and compresses colours outside Rec.709 into it;
- HDR video (PQ, HLG): the inverse of the config's ACES 1000-nit HDR output transform for that
  display takes the pictures back to the scene-referred ACES values an ACES HDR master was made
  from, and the SDR output transform renders those. Highlights up to the 1000-nit peak roll off
  into SDR white instead of clipping at 100 nits, and the HDR and SDR renderings are the ones ACES
  itself pairs, so going the other way (SDR grade → HDR output) is the exact inverse. HDR reference
  white (203 nits, BT.2408) lands at 83 % of SDR code values; content above 1000 nits clips;
- other SDR displays (BT.2020 SDR, Display P3, sRGB): a colorimetric conversion between the two
  displays (no tone mapping; colours outside Rec.709 clip).

An ACES output transform costs 1-2.5 s per 1080p frame on one core, so it is baked once into a
`LUT_SIZE`³ 3D LUT, applied by OpenColorIO's CPU processor with tetrahedral interpolation in float:
about 30 ms per 1080p frame on one core, reading uint8, uint16 (10-bit sources keep their
precision) or float32 and rounding once into the output depth. Display-to-display conversions are
cheap enough to run exactly. bench/bench_colour.py measures both against the exact transform.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cinefx.errors import EngineUnavailableError, OptionError
from cinefx.presets import clip_text

CONFIG = "ocio://studio-config-latest"
REC709 = "Rec.1886 Rec.709 - Display"  # the grade's working space: BT.709 video as players show it
SDR_VIEW = "ACES 2.0 - SDR 100 nits (Rec.709)"
REC2020 = "Rec.1886 Rec.2020 - Display"  # BT.2020 SDR video, added to the config (see `config`)
PQ = "Rec.2100-PQ - Display"
HLG = "Rec.2100-HLG - Display"
# The HDR output transforms an HDR display's pictures are taken back through: the 1000-nit master,
# the most common grade of HDR video. HLG's display offers it only limited to P3.
HDR_VIEWS = ("ACES 2.0 - HDR 1000 nits (Rec.2020)", "ACES 2.0 - HDR 1000 nits (P3 D65)")
LUT_SIZE = 65  # 65³ tetrahedral: 0.1-0.3 levels mean error on log footage, 0.5 s to bake

# Short names, each for exactly one colour space of the config. Every one is checked against its
# maker's published 18 % grey code value in tests/test_colour_management.py.
ALIASES = {
    "rec709": REC709,
    "rec2020": REC2020,
    "pq": PQ,
    "hlg": HLG,
    "applelog": "Apple Log",
    "applelog2": "Apple Log 2",
    "slog3": "S-Log3 S-Gamut3.Cine",
    "slog3-sgamut3": "S-Log3 S-Gamut3",
    "logc3": "ARRI LogC3 (EI800)",
    "logc4": "ARRI LogC4",
    "vlog": "V-Log V-Gamut",
    "dlog": "D-Log D-Gamut",
    "clog3": "CanonLog3 CinemaGamut D55",
    "log3g10": "Log3G10 REDWideGamutRGB",
    "davinci": "DaVinci Intermediate WideGamut",
    "acescct": "ACEScct",
}

# Encodings video files carry; linear light and data are not among them.
_VIDEO_ENCODINGS = ("log", "sdr-video", "hdr-video", "edr-video")
_HDR_ENCODINGS = ("hdr-video", "edr-video")

# H.273 codes of the stream tags (VideoInfo.colour).
_PQ_TRC, _HLG_TRC, _BT2020 = 16, 18, 9


@dataclass(frozen=True)
class ColourSpace:
    """One entry of `colorspaces()`: `name` is the config's, `alias` cinefx's short one (or "")."""

    name: str
    alias: str
    family: str  # the config's family, e.g. "Input/Sony" or "Display"
    encoding: str  # "log", "sdr-video", "hdr-video", …


@dataclass(frozen=True)
class InputChoice:
    """The colour space frames are read in, and why (one line for the CLI to print)."""

    space: str
    reason: str

    @property
    def converts(self) -> bool:
        return self.space != REC709


@dataclass(frozen=True)
class OutputTags:
    """What the writer sets on a stream in `space`: H.273 codes (2 = unspecified) and bit depth.

    Camera log has no H.273 transfer code: like the cameras' own files, the curve is left
    unspecified (a player that guesses BT.709 shows it flat, as log should look) and `note` names
    it for the file's comment."""

    primaries: int
    transfer: int
    matrix: int
    bits: int
    note: str


# -- the config ----------------------------------------------------------------------------

def _ocio():
    """PyOpenColorIO, imported only when a conversion is needed."""
    try:
        import PyOpenColorIO
    except ImportError:
        raise EngineUnavailableError("colour management needs OpenColorIO, which is not installed: "
                                     "pip install opencolorio (a cinefx dependency: reinstall cinefx)") from None
    return PyOpenColorIO


@functools.lru_cache(maxsize=1)
def config():
    """OpenColorIO's built-in studio config, plus a BT.2020 SDR display space.

    The ACES 2.0 configs dropped "Rec.1886 Rec.2020 - Display", which BT.2020 SDR video (tagged
    primaries 9 with an SDR transfer) needs; it is added with the definition the ACES 1.3 studio
    configs gave it (OpenColorIO's built-in display transform). The processor cache is off: it
    keys an in-memory Lut3DTransform by its size, so every LUT baked after the first of a size came
    back as that first one."""
    ocio = _ocio()
    cfg = ocio.Config.CreateFromFile(CONFIG)
    cfg.setProcessorCacheFlags(ocio.PROCESSOR_CACHE_OFF)
    if cfg.getColorSpace(REC2020) is None:
        cs = ocio.ColorSpace(ocio.REFERENCE_SPACE_DISPLAY, name=REC2020, family="Display",
                             encoding="sdr-video", description="Rec.1886 (gamma 2.4) with BT.2020 primaries",
                             aliases=["rec1886_rec2020_display"])
        cs.setTransform(ocio.BuiltinTransform("DISPLAY - CIE-XYZ-D65_to_REC.1886-REC.2020"),
                        ocio.COLORSPACE_DIR_FROM_REFERENCE)
        cfg.addColorSpace(cs)
    missing = [v for v in (SDR_VIEW,) if v not in cfg.getViews(REC709)]
    if missing or not any(v in cfg.getViews(PQ) for v in HDR_VIEWS):
        raise EngineUnavailableError(f"OpenColorIO {ocio.__version__}'s studio config has no ACES 2.0 views "
                                     "(needs OpenColorIO 2.5 or later): pip install -U opencolorio")
    return cfg


def colorspaces() -> list[ColourSpace]:
    """Every colour space `--input-colorspace` / `--output-colorspace` accept: cinefx's aliases
    first, then the rest of the config's video encodings, for `cinefx colorspaces`."""
    cfg = config()
    ocio = _ocio()
    alias_of = {name: alias for alias, name in ALIASES.items()}
    out = []
    for cs in cfg.getColorSpaces(ocio.SEARCH_REFERENCE_SPACE_ALL, ocio.COLORSPACE_ACTIVE):
        if cs.getEncoding() in _VIDEO_ENCODINGS:
            out.append(ColourSpace(cs.getName(), alias_of.get(cs.getName(), ""), cs.getFamily(), cs.getEncoding()))
    return sorted(out, key=lambda c: (not c.alias, list(ALIASES).index(c.alias) if c.alias else 0, c.name))


def resolve(name: str, option: str = "--input-colorspace") -> str:
    """The config's name of colour space `name` (an alias of `ALIASES`, a config name or one of its
    aliases, any case). Rec.709 resolves without importing OpenColorIO.

    Raises `OptionError` naming close names for a name it does not know, and for linear-light or
    data spaces, which no video file carries."""
    key = name.strip()
    if ALIASES.get(key.lower()) == REC709 or key.lower() == REC709.lower():
        return REC709
    cfg = config()
    cs = cfg.getColorSpace(ALIASES.get(key.lower(), key))
    if cs is None:
        known = {k.lower(): (k, v) for k, v in ALIASES.items()}
        known.update((c.name.lower(), (c.name, c.name)) for c in colorspaces() if c.name.lower() not in known)
        hits, spaces = [], set()
        for c in difflib.get_close_matches(key.lower(), list(known), n=8, cutoff=0.5):
            shown, space = known[c]
            if space not in spaces:  # an alias and its space are one suggestion
                spaces.add(space)
                hits.append(repr(shown))
        hint = ", ".join(hits[:4])
        raise OptionError(f"{option}: unknown colour space {clip_text(key)!r}"
                          f"{f'; close: {hint}' if hint else ''} (`cinefx colorspaces` lists them)")
    if cs.getEncoding() not in _VIDEO_ENCODINGS:
        raise OptionError(f"{option}: {cs.getName()!r} is {cs.getEncoding() or 'not an image encoding'}, which "
                          "video files do not carry; name the camera's log or video encoding")
    return cs.getName()


def choose_input(option: str, colour) -> InputChoice:
    """The colour space of a source: `option` is `--input-colorspace` ("auto" or a name), `colour`
    the stream's tags (`cinefx.video.probe.ColourInfo`). "auto" follows the tags: PQ or HLG
    transfer → that HDR display, BT.2020 primaries → BT.2020 SDR, anything else → Rec.709 (camera
    log is almost never tagged: see `log_hint`)."""
    if option.strip().lower() != "auto":
        return InputChoice(resolve(option), "--input-colorspace")
    if colour.transfer == _PQ_TRC:
        return InputChoice(PQ, "auto: the stream is tagged PQ (transfer 16); rendered to SDR through ACES")
    if colour.transfer == _HLG_TRC:
        return InputChoice(HLG, "auto: the stream is tagged HLG (transfer 18); rendered to SDR through ACES")
    if colour.primaries == _BT2020:
        return InputChoice(REC2020, "auto: the stream is tagged BT.2020 primaries with an SDR transfer")
    if colour.primaries == 2 and colour.transfer == 2:
        return InputChoice(REC709, "auto: the stream has no colour tags; Rec.709 assumed")
    what = "BT.709" if colour.primaries in (1, 2) else f"SDR video (primaries {colour.primaries})"
    return InputChoice(REC709, f"auto: the stream is tagged {what}; no conversion")


def output_tags(space: str) -> OutputTags:
    """Stream tags for output written in `space` (a `resolve`d name)."""
    if space == REC709:
        return OutputTags(1, 1, 1, 8, "")
    if space == REC2020:
        return OutputTags(_BT2020, 14, _BT2020, 10, "")
    if space == PQ:
        return OutputTags(_BT2020, _PQ_TRC, _BT2020, 10, "")
    if space == HLG:
        return OutputTags(_BT2020, _HLG_TRC, _BT2020, 10, "")
    # Apple's log files carry the BT.2020 matrix (and Apple Log, BT.2020 primaries)
    primaries, matrix = {"Apple Log": (_BT2020, _BT2020), "Apple Log 2": (2, _BT2020)}.get(space, (2, 1))
    return OutputTags(primaries, 2, matrix, 10, f"colour space: {space}")


# -- conversions ---------------------------------------------------------------------------

def _to_working(space: str):
    """The OpenColorIO transform from `space` to `REC709` (see the module docstring)."""
    ocio = _ocio()
    cs = config().getColorSpace(space)
    if cs.getReferenceSpaceType() == ocio.REFERENCE_SPACE_SCENE:
        return ocio.DisplayViewTransform(src=space, display=REC709, view=SDR_VIEW)
    if cs.getEncoding() in _HDR_ENCODINGS:
        view = next(v for v in HDR_VIEWS if v in config().getViews(space))
        back = ocio.DisplayViewTransform(src="ACES2065-1", display=space, view=view,
                                         direction=ocio.TRANSFORM_DIR_INVERSE)
        return ocio.GroupTransform([back, ocio.DisplayViewTransform(src="ACES2065-1", display=REC709, view=SDR_VIEW)])
    return ocio.ColorSpaceTransform(src=space, dst=REC709)


_DEPTHS = {np.dtype(np.uint8): "BIT_DEPTH_UINT8", np.dtype(np.uint16): "BIT_DEPTH_UINT16",
           np.dtype(np.float32): "BIT_DEPTH_F32"}


def convert_exact(rgb: np.ndarray, source: str, target: str = REC709) -> np.ndarray:
    """`rgb` (..., 3) float in [0, 1] from `source` to `target` (`resolve`d names, one of them
    Rec.709) through the unbaked OpenColorIO transform: a new float32 array, not clipped. Slow
    (1-2.5 s per 1080p frame through an ACES output transform): for baking combined LUTs and
    measuring a `Conversion`'s accuracy."""
    out = np.array(rgb, np.float32, order="C", copy=True)
    _processor(source, target).getDefaultCPUProcessor().applyRGB(out)
    return out


def _processor(source: str, target: str):
    """The exact OpenColorIO processor from `source` to `target`, one of which is `REC709`."""
    ocio = _ocio()
    if target == REC709:
        return config().getProcessor(_to_working(source), ocio.TRANSFORM_DIR_FORWARD)
    return config().getProcessor(_to_working(target), ocio.TRANSFORM_DIR_INVERSE)


class Conversion:
    """Frames from `source` to `target` (one of them Rec.709), rounded once into the output depth.

    Through an ACES output transform (log, ACEScct, HDR) the exact transform is baked into a
    size³ 3D LUT applied in float with tetrahedral interpolation; between two SDR displays (a
    matrix and two curves, as cheap as the LUT) it runs exactly and `size` is 0.

    Call with a frame (H, W, 3) uint8, uint16 (full 16-bit scale, as swscale's rgb48 gives 10-bit
    video) or float32 in [0, 1]; returns (H, W, 3) uint8, or uint16 with `depth=16`. Thread-safe:
    OpenColorIO's CPU processors are, and they release the GIL while they work."""

    def __init__(self, source: str, target: str, size: int = LUT_SIZE):
        ocio = _ocio()
        self.source, self.target = source, target
        cs = config().getColorSpace(source if target == REC709 else target)
        tone_mapped = cs.getReferenceSpaceType() == ocio.REFERENCE_SPACE_SCENE or cs.getEncoding() in _HDR_ENCODINGS
        self.size = size if tone_mapped else 0
        if not tone_mapped:
            self._processor = _processor(source, target)
        else:
            grid = np.linspace(0.0, 1.0, size, dtype=np.float32)
            r, g, b = np.meshgrid(grid, grid, grid, indexing="ij")  # OpenColorIO's order: blue fastest
            table = convert_exact(np.stack([r, g, b], -1).reshape(-1, 3), source, target)
            lut = ocio.Lut3DTransform(gridSize=size)
            lut.setData(table.ravel())
            lut.setInterpolation(ocio.INTERP_TETRAHEDRAL)
            self._processor = config().getProcessor(lut)
        self._cpu: dict[tuple, object] = {}

    def __call__(self, frame: np.ndarray, depth: int = 8) -> np.ndarray:
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype not in _DEPTHS or depth not in (8, 16):
            raise ValueError(f"frame of shape {frame.shape} {frame.dtype} (depth {depth}), expected (H, W, 3) "
                             "uint8, uint16 or float32 and depth 8 or 16")
        frame = np.ascontiguousarray(frame)
        out = np.empty(frame.shape, np.uint8 if depth == 8 else np.uint16)
        key = (frame.dtype, out.dtype)
        cpu = self._cpu.get(key)
        if cpu is None:
            ocio = _ocio()
            cpu = self._cpu[key] = self._processor.getOptimizedCPUProcessor(
                getattr(ocio, _DEPTHS[frame.dtype]), getattr(ocio, _DEPTHS[out.dtype]), ocio.OPTIMIZATION_DEFAULT)
        cpu.apply(_image(frame), _image(out))
        return out


def _image(a: np.ndarray):
    ocio = _ocio()
    h, w, _ = a.shape
    size = a.itemsize
    return ocio.PackedImageDesc(a, w, h, 3, getattr(ocio, _DEPTHS[a.dtype]), size, 3 * size, 3 * size * w)


@functools.lru_cache(maxsize=4)
def input_conversion(space: str, size: int = LUT_SIZE) -> Conversion | None:
    """Frames in `space` (a `resolve`d name) to the grade's working space, or None for Rec.709
    (nothing to do). Baking takes about half a second; kept for the next file of a batch."""
    return None if space == REC709 else Conversion(space, REC709, size)


@functools.lru_cache(maxsize=4)
def output_conversion(space: str, size: int = LUT_SIZE) -> Conversion | None:
    """Graded frames (Rec.709) to `space`, the exact inverse of `input_conversion(space)`; call it
    with `depth=16` for the 10-bit output `output_tags(space)` asks for. None for Rec.709."""
    return None if space == REC709 else Conversion(REC709, space, size)


# -- log footage that is not tagged --------------------------------------------------------

# Log encodings put black on a pedestal (S-Log3, LogC3/4, D-Log: code 95 of 1023; V-Log 128;
# Apple Log and Canon Log 3 higher), keep highlights below about 94 % and desaturate; BT.709
# video from a camera reaches near black somewhere in a shot and is more colourful.
LOG_FLOOR = 0.085  # 0.5th luma percentile at or above this: no black anywhere
LOG_TOP = 0.99  # 99.5th luma percentile below this: no clipped white
LOG_SATURATION = 0.22  # mean (max - min) of RGB below this: drab colours


def log_hint(frames: Iterable[np.ndarray]) -> str | None:
    """A one-line note when frames (H, W, 3) uint8 sampled across a video (a few per scene) look
    like untagged camera log: lifted blacks, no white, low saturation; else None. A heuristic for
    suggesting `--input-colorspace`, never applied on its own."""
    import cv2

    lumas, sats = [], []
    for rgb in frames:
        small = cv2.resize(rgb, (96, max(1, round(96 * rgb.shape[0] / rgb.shape[1]))), interpolation=cv2.INTER_AREA)
        x = small.reshape(-1, 3).astype(np.float32) / 255
        lumas.append(x @ np.array([0.2126, 0.7152, 0.0722], np.float32))
        sats.append(x.max(1) - x.min(1))
    if not lumas:
        return None
    y, sat = np.concatenate(lumas), float(np.concatenate(sats).mean())
    floor, top = np.percentile(y, [0.5, 99.5])
    if floor < LOG_FLOOR or top >= LOG_TOP or sat >= LOG_SATURATION:
        return None
    return (f"the picture looks like camera log (blacks lifted to {floor:.0%}, nothing above {top:.0%}, "
            f"low saturation): if the camera recorded log, pass --input-colorspace (e.g. slog3, logc4, applelog)")
