"""Colour management (cinefx.grade.ocio) and the look as a LUT (cinefx.grade.export).

Aliases are checked against their makers' published code values, not against OpenColorIO alone;
synthetic log and HDR footage is made from real photographs through the exact inverse of what
cinefx applies and must come back; the exported .cube is applied by FFmpeg's own lut3d filter."""

import dataclasses
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from cinefx.errors import CinefxError, OptionError
from cinefx.grade import lut as lutlib
from cinefx.grade import ocio
from cinefx.grade.colour import colour_transform
from cinefx.grade.export import export_look_lut, look_table
from cinefx.presets import load_preset
from cinefx.testing.clips import photo
from cinefx.video.probe import ColourInfo

# 18 % grey (scene-linear 0.18) as each maker publishes it, normalised code value (code / 1023):
GREY = {
    # Sony, Technical Summary for S-Gamut3.Cine/S-Log3 and S-Gamut3/S-Log3: 10-bit code 420
    "slog3": 420 / 1023,
    "slog3-sgamut3": 420 / 1023,
    # ARRI, ALEXA Log C curve (camera manuals): 18 % grey at code 400 of 1023 at every EI
    "logc3": 400 / 1023,
    # ARRI LogC4 Specification (Cooper & Brendel, 2022): LogC4(0.18) = 0.2784
    "logc4": 0.2784,
    # Apple Log Profile white paper (2023): 0.18 encodes to 0.4883; Apple Log 2 keeps the curve
    # and changes the primaries to Apple Wide Gamut (OpenColorIO-Config-ACES #163)
    "applelog": 0.4883,
    "applelog2": 0.4883,
    # Panasonic, V-Log/V-Gamut Reference Manual rev. 1.0, fig. 2.2: 10-bit code 433
    "vlog": 433 / 1023,
    # DJI, White Paper on D-Log and D-Gamut (2017): log10(0.18·0.9892 + 0.0108)·0.256663 + 0.584555
    "dlog": 0.3988,
    # Canon, Canon Log Gamma Curves white paper (2018), Canon Log 3: 18 % grey at 34.3 % (full range)
    "clog3": 0.343,
    # RED, Log3G10 white paper: "3G" is 18 % grey mapped to 1/3
    "log3g10": 1 / 3,
    # Blackmagic Design, DaVinci Wide Gamut Intermediate (2020): 0.18 encodes to 0.336
    "davinci": 0.336,
    # Academy S-2016-001 (ACEScct): (log2(0.18) + 9.72) / 17.52
    "acescct": 0.4136,
}
# Display encodings, as light relative to 100 cd/m² (the config's display reference):
DISPLAY = {
    # SMPTE ST 2084: code 0.5081 is 100 cd/m²
    "pq": (0.5081, 1.0),
    # ITU-R BT.2408: HLG 75 % is reference white, 203 cd/m² on a 1000 cd/m² display
    "hlg": (0.75, 2.03),
    # ITU-R BT.1886 (black 0, white 100 cd/m²): L = V^2.4
    "rec709": (0.5, 0.5 ** 2.4),
    "rec2020": (0.5, 0.5 ** 2.4),
}


def test_every_alias_is_checked_against_a_published_value():
    assert set(GREY) | set(DISPLAY) == set(ocio.ALIASES)


@pytest.mark.parametrize("alias", sorted(GREY))
def test_alias_decodes_its_makers_18_percent_grey(alias):
    space = ocio.resolve(alias)
    to_aces = ocio.config().getProcessor(space, "ACES2065-1").getDefaultCPUProcessor()
    assert to_aces.applyRGB([GREY[alias]] * 3) == pytest.approx([0.18] * 3, rel=0.015)


@pytest.mark.parametrize("alias", sorted(DISPLAY))
def test_display_alias_decodes_its_published_light(alias):
    code, light = DISPLAY[alias]
    to_xyz = ocio.config().getProcessor(ocio.resolve(alias), "CIE XYZ-D65 - Display-referred").getDefaultCPUProcessor()
    assert to_xyz.applyRGB([code] * 3)[1] == pytest.approx(light, rel=0.01)


def test_every_camera_shows_its_grey_alike():
    # one grey card, fourteen cameras: the same display level through cinefx's conversion
    shown = {a: int(ocio.input_conversion(ocio.resolve(a))(np.full((1, 1, 3), g, np.float32))[0, 0, 1])
             for a, g in GREY.items()}
    assert max(shown.values()) - min(shown.values()) <= 1, shown


PHOTOS = ("astronaut", "coffee")


@pytest.fixture(scope="module")
def photos():
    return [photo(n)[::2, ::2].copy() for n in PHOTOS]


def encode(img: np.ndarray, space: str, bits: int = 10) -> np.ndarray:
    """A photo as a camera would have recorded it in `space`: the exact inverse of cinefx's
    conversion, quantised to `bits` and scaled to 16 bits as swscale's rgb48 delivers it."""
    x = ocio.convert_exact(img.astype(np.float32) / 255, ocio.REC709, space)
    levels = (1 << bits) - 1
    return np.rint(np.rint(np.clip(x, 0, 1) * levels) * (65535 / levels)).astype(np.uint16)


@pytest.mark.parametrize("alias", sorted(set(ocio.ALIASES) - {"rec709"}))
def test_synthetic_footage_comes_back(alias, photos):
    space = ocio.resolve(alias)
    conv = ocio.input_conversion(space)
    errors = [np.abs(conv(encode(img, space)).astype(int) - img).mean() for img in photos]
    assert max(errors) < 2.0, errors  # measured 0.01-0.52 levels (bench/bench_colour.py)


def test_rec709_costs_nothing_and_never_imports_opencolorio():
    code = ("import sys; from cinefx.grade import ocio; from cinefx.video.probe import ColourInfo\n"
            "for tags in [(1, True, 1, 1), (1, False, 2, 2)]:\n"
            "    c = ocio.choose_input('auto', ColourInfo(*tags)); assert not c.converts, c\n"
            "    assert ocio.input_conversion(c.space) is None\n"
            "assert ocio.input_conversion(ocio.resolve('rec709')) is None\n"
            "assert 'PyOpenColorIO' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("tags,space,says", [
    ((9, False, 9, 16), ocio.PQ, "PQ"), ((9, False, 9, 18), ocio.HLG, "HLG"),
    ((9, False, 9, 14), ocio.REC2020, "BT.2020"), ((1, False, 1, 1), ocio.REC709, "BT.709"),
    ((1, False, 2, 2), ocio.REC709, "assumed"), ((5, False, 6, 6), ocio.REC709, "no conversion")])
def test_auto_follows_the_stream_tags(tags, space, says):
    choice = ocio.choose_input("auto", ColourInfo(*tags))
    assert choice.space == space and says in choice.reason and choice.converts == (space != ocio.REC709)
    assert ocio.choose_input("SLog3", ColourInfo(*tags)).space == "S-Log3 S-Gamut3.Cine"


def test_wrong_name_is_one_line_listing_close_names():
    with pytest.raises(OptionError) as e:
        ocio.resolve("slog", "--input-colorspace")
    msg = str(e.value)
    assert "\n" not in msg and "--input-colorspace" in msg and "'slog3'" in msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, CinefxError)
    with pytest.raises(OptionError, match="scene-linear"):
        ocio.resolve("ACES2065-1")
    with pytest.raises(OptionError) as e:
        ocio.resolve("x" * 5000)
    assert len(str(e.value)) < 250


def test_colorspaces_lists_aliases_first_and_studio_config_names():
    listed = ocio.colorspaces()
    assert [c.alias for c in listed[:len(ocio.ALIASES)]] == list(ocio.ALIASES)
    names = {c.name for c in listed}
    assert {"Apple Log", "S-Log3 S-Gamut3.Cine", "ARRI LogC4", "ARRI LogC3 (EI800)", "D-Log D-Gamut",
            "V-Log V-Gamut", "CanonLog3 CinemaGamut D55", "ACEScct", ocio.PQ, ocio.HLG} <= names
    assert all(c.encoding in ("log", "sdr-video", "hdr-video", "edr-video") for c in listed)


def test_lut_follows_the_exact_transform(photos):
    # LogC4 is the hardest alias for a 65³ grid: 0.28 levels mean, 2.5 at the 99th percentile
    # (ACES 2.0's gamut compression bends sharply near the display gamut's edges)
    space = ocio.resolve("logc4")
    conv = ocio.input_conversion(space)
    frames = [encode(img, space) for img in photos]
    err = np.concatenate([
        np.abs(conv(f, depth=16) / 257 - np.clip(ocio.convert_exact(f.astype(np.float32) / 65535, space), 0, 1) * 255)
        .ravel() for f in frames])
    assert err.mean() < 0.4 and np.percentile(err, 99) < 4, (err.mean(), np.percentile(err, 99))


def test_ten_bit_sources_keep_their_precision():
    # a shallow S-Log3 ramp, a tenth of the code range in 1023 steps: read as 8 bits it has ~26
    # steps, as 16 bits all of them; in 16-bit output the difference is not rounded away
    space = ocio.resolve("slog3")
    conv = ocio.input_conversion(space)
    ramp = np.repeat(np.linspace(0.35, 0.45, 1023, dtype=np.float32)[None, :, None], 3, axis=2)
    exact = np.clip(ocio.convert_exact(ramp, space), 0, 1) * 255
    ten = conv(np.rint(ramp * 65535).astype(np.uint16), depth=16) / 257
    eight = conv(np.rint(ramp * 255).astype(np.uint8), depth=16) / 257
    assert np.abs(ten - exact).mean() < 0.1 < np.abs(eight - exact).mean()
    assert len(np.unique(ten[..., 1])) > 4 * len(np.unique(eight[..., 1]))
    assert np.abs(conv(ramp).astype(int) - conv(np.rint(ramp * 65535).astype(np.uint16))).max() <= 1


def pq_code(nits: np.ndarray) -> np.ndarray:
    """SMPTE ST 2084 inverse EOTF: cd/m² → code value."""
    m1, m2 = 2610 / 16384, 2523 / 4096 * 128
    c1, c2, c3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
    y = (np.asarray(nits, np.float64) / 10000) ** m1
    return ((c1 + c2 * y) / (1 + c3 * y)) ** m2


def test_hdr_highlights_roll_off_instead_of_clipping():
    nits = np.array([50, 100, 200, 400, 700, 1000, 4000])
    frame = np.repeat(pq_code(nits).astype(np.float32)[None, :, None], 3, axis=2)
    sdr = ocio.input_conversion(ocio.PQ)(frame)[0, :, 1].astype(int)
    assert np.all(np.diff(sdr[:-1]) > 0) and sdr[-3] < 255, sdr  # 100-700 nits all distinct, below white
    assert sdr[-2] >= 254 and sdr[-1] == 255  # the 1000-nit peak is SDR white; above it clips


def test_log_highlights_roll_off_instead_of_clipping():
    # Sony's S-Log3 formula: grey and 1-5 stops over stay distinct below white
    x = 0.18 * 2.0 ** np.arange(6)
    code = (420 + np.log10((x + 0.01) / 0.19) * 261.5) / 1023
    frame = np.repeat(code.astype(np.float32)[None, :, None], 3, axis=2)
    shown = ocio.input_conversion(ocio.resolve("slog3"))(frame)[0, :, 1].astype(int)
    assert np.all(np.diff(shown) > 0) and shown[-1] < 255, shown


@pytest.mark.parametrize("alias", ["slog3", "pq", "hlg", "applelog"])
def test_output_conversion_is_the_inverse(alias, photos):
    space = ocio.resolve(alias)
    out, back = ocio.output_conversion(space), ocio.input_conversion(space)
    for img in photos:
        ten_bit = np.rint(out(img, depth=16) / (65535 / 1023)) * (65535 / 1023)
        assert np.abs(back(ten_bit.astype(np.uint16)).astype(int) - img).mean() < 1.0


def test_output_tags():
    assert ocio.output_tags(ocio.REC709) == ocio.OutputTags(1, 1, 1, 8, "")
    assert dataclasses.astuple(ocio.output_tags(ocio.PQ))[:4] == (9, 16, 9, 10)
    assert dataclasses.astuple(ocio.output_tags(ocio.HLG))[:4] == (9, 18, 9, 10)
    tags = ocio.output_tags(ocio.resolve("logc4"))
    assert tags.transfer == 2 and tags.bits == 10 and "ARRI LogC4" in tags.note


def log_frames(space: str) -> list[np.ndarray]:
    return [np.rint(np.clip(ocio.convert_exact(photo(n).astype(np.float32) / 255, ocio.REC709, space), 0, 1)
                    * 255).astype(np.uint8) for n in ("astronaut", "rocket", "camera")]


def test_log_hint_notices_untagged_log_only():
    for alias in ("slog3", "logc4", "vlog"):
        assert "--input-colorspace" in ocio.log_hint(log_frames(ocio.resolve(alias)))
    video = [photo(n) for n in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left")]
    assert ocio.log_hint(video) is None
    assert ocio.log_hint([(f * 0.35).astype(np.uint8) for f in video]) is None  # dark is not log
    assert ocio.log_hint([]) is None


# -- the look as a LUT ---------------------------------------------------------------------

def lut3d(frame: np.ndarray, cube, interp="tetrahedral") -> np.ndarray:
    """`frame` through FFmpeg's lut3d filter, in 16 bits: FFmpeg truncates 8-bit output, which
    would bias the comparison by half a level. Returns float levels (0-255)."""
    h, w = frame.shape[:2]
    graph = av.filter.Graph()
    src = graph.add_buffer(width=w, height=h, format="rgb48le", time_base=Fraction(1, 25))
    lut = graph.add("lut3d", file=str(cube), interp=interp)
    src.link_to(lut)
    lut.link_to(graph.add("buffersink"))
    graph.configure()
    data = frame if frame.dtype == np.uint16 else frame.astype(np.uint16) * 257
    vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(data), format="rgb48le")
    vf.pts = 0
    graph.push(vf)
    return graph.pull().to_ndarray(format="rgb48le") / 257.0


@pytest.mark.parametrize("name", ["blockbuster", "golden-hour", "vintage-film"])
def test_exported_look_matches_the_colour_stage_in_ffmpeg(name, tmp_path, photos):
    preset = load_preset(name)
    path = export_look_lut(preset, tmp_path / f"{name}.cube", size=65)
    assert lutlib.read_cube(path).shape == (65, 65, 65, 3)
    stage = colour_transform(preset.grade)
    for img in photos + [photo("rocket")]:
        ours = np.rint(stage(img.astype(np.float32) / 255) * 255)
        theirs = np.rint(lut3d(img, path))
        off = np.abs(theirs - ours)
        # within one level; 0.05 % of values two off, where the look's own LUT or a clip bends
        assert (off > 1).mean() < 0.001 and off.max() <= 2, ((off > 1).mean(), off.max())


def test_exported_look_from_log_matches_cinefx(tmp_path, photos):
    preset = load_preset("blockbuster")
    space = ocio.resolve("slog3")
    path = export_look_lut(preset, tmp_path / "look.cube", size=65, input_colorspace="slog3")
    stage = colour_transform(preset.grade)
    for img in photos:
        frame = encode(img, space)
        ours = stage(ocio.input_conversion(space)(frame).astype(np.float32) / 255) * 255
        off = np.abs(lut3d(frame, path) - ours)
        assert off.mean() < 0.6 and np.percentile(off, 99) < 3, (off.mean(), np.percentile(off, 99))


def test_look_lut_holds_colour_only(tmp_path):
    grade = load_preset("vintage-film").grade
    assert grade.vignette and grade.grain and grade.halation and grade.letterbox
    plain = dataclasses.replace(grade, vignette=0, grain=0, halation=0, bloom=0, letterbox=0)
    assert np.array_equal(look_table(grade, 17), look_table(plain, 17))
    neutral = dataclasses.replace(load_preset("noir"), grade=type(grade)())
    path = export_look_lut(neutral, tmp_path / "id.cube", size=17)
    assert np.abs(lutlib.read_cube(path) - lutlib.identity(17)).max() < 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["id.cube"]  # written whole, no temporary left


@pytest.mark.parametrize("size,name,says", [(64, "a.cube", "17, 33, 65"), (33, "a.3dl", ".cube")])
def test_export_refuses_what_editors_do_not_load(tmp_path, size, name, says):
    with pytest.raises(OptionError, match=says):
        export_look_lut(load_preset("noir"), tmp_path / name, size=size)
    assert not list(tmp_path.iterdir())


def test_bench_runs():
    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_colour.py"
    run = subprocess.run([sys.executable, str(bench), "--quick", "--spaces", "slog3"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.splitlines()[-1].startswith("slog3"), run.stdout + run.stderr
