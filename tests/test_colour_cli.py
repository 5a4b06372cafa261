"""Camera log and HDR through the command line: colour spaces in and out, the look as a LUT,
scene lists for editors, and help that lists the choices."""

import csv
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import opentimelineio as otio
import pytest
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.grade import lut as lutlib
from cinefx.grade import ocio
from cinefx.testing.clips import photo
from cinefx.video.probe import probe

runner = CliRunner()
SIZE = (192, 108)
FRAMES = 4


@pytest.fixture(scope="module")
def photos():
    import cv2

    # smooth pictures: 4:2:0 chroma of fine detail, not the colour conversion, would dominate the error
    return [cv2.resize(cv2.resize(photo(n), (40, 22), interpolation=cv2.INTER_AREA), SIZE,
                       interpolation=cv2.INTER_CUBIC) for n in ("astronaut", "coffee")]


def ten_bit_clip(path, frames, primaries=1, transfer=2, matrix=1, timecode=None):
    """10-bit H.264 of (H, W, 3) uint16 frames (full 16-bit scale), tagged as given."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=24, options={"crf": "0", "preset": "ultrafast"})
        s.width, s.height, s.pix_fmt = SIZE[0], SIZE[1], "yuv444p10le"
        ctx = s.codec_context
        ctx.color_primaries, ctx.color_trc, ctx.colorspace, ctx.color_range = primaries, transfer, matrix, 1
        if timecode:
            s.metadata["timecode"] = timecode
        name = "BT2020" if matrix == 9 else "ITU709"
        for i, rgb in enumerate(frames):
            f = av.VideoFrame.from_ndarray(rgb, format="rgb48le").reformat(
                format="yuv444p10le", src_colorspace=name, dst_colorspace=name, src_color_range="JPEG",
                dst_color_range="MPEG")
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode())
    return path


def encode(img, space):
    """A photo as a camera would record it in `space`: the exact inverse of cinefx's conversion, at 10 bits."""
    x = np.clip(ocio.convert_exact(img.astype(np.float32) / 255, ocio.REC709, space), 0, 1)
    return np.rint(np.rint(x * 1023) * (65535 / 1023)).astype(np.uint16)


def decoded(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24", src_colorspace="ITU709", src_color_range="MPEG", dst_color_range="JPEG")
                for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def neutral(tmp_path_factory):
    p = tmp_path_factory.mktemp("presets") / "neutral.toml"
    p.write_text('description = "no grade"\n')
    return p


def stylize(src, dst, *args):
    return runner.invoke(app, ["stylize", str(src), "-o", str(dst), "--engine", "grade", "--no-metrics",
                               "--crf", "0", *map(str, args)])


@pytest.mark.parametrize("alias,transfer,says", [("hlg", 18, "HLG"), ("pq", 16, "PQ")])
def test_hdr_renders_to_sdr_and_auto_says_so(tmp_path, photos, neutral, alias, transfer, says):
    space = ocio.resolve(alias)
    src = ten_bit_clip(tmp_path / f"{alias}.mp4", [encode(photos[i % 2], space) for i in range(FRAMES)],
                       primaries=9, transfer=transfer, matrix=9)
    r = stylize(src, tmp_path / "out.mp4", "--preset", neutral)
    assert r.exit_code == 0, r.output
    assert f"auto: the stream is tagged {says}" in r.output
    out = decoded(tmp_path / "out.mp4")
    assert len(out) == FRAMES
    err = [np.abs(o.astype(int) - photos[i % 2]).mean() for i, o in enumerate(out)]
    assert max(err) < 2.5, err  # the HDR master of a photo renders back to it (measured 1.7-2.1 levels)
    c = probe(tmp_path / "out.mp4").colour  # the tags describe what was written: Rec.709
    assert (c.primaries, c.transfer, c.matrix) == (1, 1, 1)


@pytest.mark.parametrize("alias", ["slog3", "logc4"])
def test_log_footage_comes_back_through_the_cli(tmp_path, photos, neutral, alias):
    space = ocio.resolve(alias)
    src = ten_bit_clip(tmp_path / "log.mp4", [encode(photos[i % 2], space) for i in range(FRAMES)])
    r = stylize(src, tmp_path / "out.mp4", "--preset", neutral, "--input-colorspace", alias)
    assert r.exit_code == 0, r.output
    err = [np.abs(o.astype(int) - photos[i % 2]).mean() for i, o in enumerate(decoded(tmp_path / "out.mp4"))]
    assert max(err) < 2.5, err  # measured 1.7-2.2 levels, most of it the 8-bit 4:2:0 output's rounding
    # the same footage without the flag: kept as it is, and the run suggests the flag
    r = stylize(src, tmp_path / "flat.mp4", "--preset", neutral)
    assert r.exit_code == 0 and "looks like camera log" in r.output, r.output
    flat = decoded(tmp_path / "flat.mp4")
    assert np.abs(flat[0].astype(int) - photos[0]).mean() > 10


def test_rec709_stylize_never_imports_opencolorio(tmp_path, neutral):
    from cinefx.testing.clips import write_clip

    src = write_clip(tmp_path / "c.mp4", [np.full((90, 160, 3), 100, np.uint8)] * 3)
    code = ("import sys; from cinefx.stylize import stylize_file, StylizeOptions; from cinefx.presets import load_preset\n"
            f"stylize_file({str(src)!r}, {str(tmp_path / 'o.mp4')!r}, load_preset({str(neutral)!r}), "
            "StylizeOptions(engine='grade', metrics=False))\n"
            "assert 'PyOpenColorIO' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_output_colorspace_is_tagged_and_reproducible(tmp_path, photos, neutral):
    from cinefx.testing.clips import write_clip

    src = write_clip(tmp_path / "c.mp4", [photos[i % 2] for i in range(FRAMES)])
    assert stylize(src, tmp_path / "render.mp4", "--preset", neutral).exit_code == 0
    render = decoded(tmp_path / "render.mp4")
    for alias, want in (("hlg", (9, 18, 9)), ("slog3", (2, 2, 1))):
        outs = []
        for n in (1, 2):
            dst = tmp_path / f"{alias}{n}.mov"
            r = stylize(src, dst, "--preset", neutral, "--output-colorspace", alias)
            assert r.exit_code == 0, r.output
            outs.append(dst.read_bytes())
        info = probe(dst)
        assert (info.colour.primaries, info.colour.transfer, info.colour.matrix) == want
        assert info.bit_depth == 10 and outs[0] == outs[1]
        with av.open(str(dst)) as c:
            comment = c.metadata.get("comment", "")
        assert "rendered by cinefx" in comment and (alias != "slog3" or "S-Log3" in comment)
        # read back through the inverse, the file is the Rec.709 render
        r = stylize(dst, tmp_path / f"{alias}.back.mp4", "--preset", neutral, "--input-colorspace", alias)
        assert r.exit_code == 0, r.output
        back = decoded(tmp_path / f"{alias}.back.mp4")
        assert max(np.abs(b.astype(int) - r).mean() for b, r in zip(back, render)) < 2.5


def test_wrong_colorspace_is_one_line_listing_close_names(tmp_path, photos):
    from cinefx.testing.clips import write_clip

    src = write_clip(tmp_path / "c.mp4", photos)
    for opt in ("--input-colorspace", "--output-colorspace"):
        r = stylize(src, tmp_path / "o.mp4", opt, "slog")
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and opt in lines[0] and "'slog3'" in lines[0], r.output
    assert not (tmp_path / "o.mp4").exists()


def test_colorspaces_lists_aliases():
    r = runner.invoke(app, ["colorspaces"])
    assert r.exit_code == 0
    for alias in ocio.ALIASES:
        assert alias in r.output


def test_presets_export_lut(tmp_path):
    r = runner.invoke(app, ["presets", "export-lut", "epic", "-o", str(tmp_path / "epic.cube"), "--size", "33"])
    assert r.exit_code == 0, r.output
    assert lutlib.read_cube(tmp_path / "epic.cube").shape[:3] == (33, 33, 33)
    r = runner.invoke(app, ["presets", "export-lut", "epic", "-o", str(tmp_path / "log.cube"),
                            "--input-colorspace", "logc4"])
    assert r.exit_code == 0 and lutlib.read_cube(tmp_path / "log.cube").shape[0] == 65, r.output
    r = runner.invoke(app, ["presets", "export-lut", "epic", "-o", str(tmp_path / "x.cube"), "--size", "20"])
    assert r.exit_code == 2 and "--size" in r.output


def test_scene_lists_load_back(tmp_path, photos):

    frames = [p.astype(np.uint16) * 257 for p in [photos[0]] * 12 + [photos[1]] * 12]
    with_tc = ten_bit_clip(tmp_path / "cut_tc.mov", frames, timecode="01:00:00:00")  # a camera's start timecode
    assert probe(with_tc).timecode == "01:00:00:00"
    r = runner.invoke(app, ["scenes", str(with_tc), "--csv", str(tmp_path / "s.csv"), "--edl",
                            str(tmp_path / "s.edl"), "--otio", str(tmp_path / "s.otio")])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((tmp_path / "s.csv").read_text().splitlines()[1:]))
    assert [int(x["Start Frame"]) for x in rows] == [1, 13]
    assert probe(with_tc).fps == Fraction(24)
    edl = otio.adapters.read_from_file(str(tmp_path / "s.edl"), "cmx_3600", rate=24)
    assert [c.source_range.start_time.to_frames() for c in edl.find_clips()] == [86400, 86412]  # 01:00:00:00 on
    tl = otio.adapters.read_from_file(str(tmp_path / "s.otio"))
    assert [c.range_in_parent().start_time.to_frames() for c in tl.find_clips()] == [0, 12]
    r = runner.invoke(app, ["scenes", str(with_tc), "--csv", str(tmp_path / "s.edl")])
    assert r.exit_code == 2 and "--csv" in r.output


def test_help_lists_choices_and_flags():
    r = runner.invoke(app, ["stylize", "--help"], env={"COLUMNS": "200"})
    assert "[auto|grade|diffusion]" in r.output and "<bool>" not in r.output.split("--help")[0]
    assert "latitude" in r.output
    from cinefx import cli
    from cinefx.video.writer import ENCODERS, X264_PRESETS

    assert cli.X264_PRESETS == X264_PRESETS and cli.CODECS == tuple(ENCODERS)
    assert "[h264|hevc|prores]" in r.output
    assert "<bool>" not in runner.invoke(app, ["scenes", "--help"], env={"COLUMNS": "200"}).output.split("--help")[0]
