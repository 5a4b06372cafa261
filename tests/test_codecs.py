"""--codec hevc and prores: 10-bit HEVC or ProRes 422 HQ, tagged as the colour output asks,
timed and with audio as the source, and the same bytes from run to run."""

import hashlib

import av
import pytest

from cinefx.errors import OptionError, OutputError
from cinefx.presets import load_preset
from cinefx.stylize import StylizeOptions, stylize_file
from cinefx.testing.clips import Move, cut, write_clip
from cinefx.video.probe import probe
from cinefx.video.writer import EncodeOptions

SIZE = (64, 36)
# H.273 codes of what each --output-colorspace writes; the source is tagged BT.709 (matrix only, the
# rest untagged, which the Rec.709 output writes as 709)
TAGS = {"rec709": (1, 1, 1), "pq": (9, 16, 9), "slog3": (2, 2, 1)}
CODECS = {"hevc": ("hevc", ".mp4", "hvc1"), "prores": ("prores", ".mov", "apch")}  # name, container, tag


def shots(n, size=SIZE):
    return cut(Move("astronaut", n, (0.45, 0.4, 0.9), (0.55, 0.45, 0.7)),
               Move("coffee", n, (0.4, 0.5, 1.0), (0.6, 0.5, 0.8)), size=size)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("src") / "clip.mp4", shots(6), fps=24, audio="aac")


@pytest.fixture(scope="module")
def neutral(tmp_path_factory):
    p = tmp_path_factory.mktemp("presets") / "neutral.toml"
    p.write_text('description = "no grade"\n')
    return load_preset(p)


def render(src, dst, preset, codec, space="rec709"):
    options = StylizeOptions(engine="grade", metrics=False, encode=EncodeOptions(codec=codec),
                             output_colorspace=space)
    return stylize_file(src, dst, preset, options)


def streams(path):
    """(video codec, pix_fmt, codec tag, (primaries, transfer, matrix), range, frame times in s,
    audio codecs, audio packets) as PyAV reads them."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = list(c.decode(v))
        f = frames[0]
        tags = (int(f.color_primaries), int(f.color_trc), int(f.colorspace))
        audio = [a.codec_context.name for a in c.streams.audio]
        return (v.codec_context.name, f.format.name, v.codec_tag, tags, int(f.color_range),
                [round(float(x.pts * x.time_base), 4) for x in frames], audio)


def audio_packets(path):
    with av.open(str(path)) as c:
        return sum(1 for p in c.demux(audio=0) if p.size)


@pytest.mark.parametrize("space", list(TAGS))
@pytest.mark.parametrize("codec", list(CODECS))
def test_codec_is_tagged_timed_and_reproducible(tmp_path, source, neutral, codec, space):
    name, ext, tag = CODECS[codec]
    outs = [tmp_path / f"{n}{ext}" for n in (1, 2)]
    for dst in outs:
        render(source, dst, neutral, codec, space)
    assert hashlib.sha256(outs[0].read_bytes()).digest() == hashlib.sha256(outs[1].read_bytes()).digest()
    got, want = streams(outs[0]), streams(source)
    ten_bit = codec == "prores" or space != "rec709"
    pix_fmt = "yuv422p10le" if codec == "prores" else "yuv420p10le" if ten_bit else "yuv420p"
    assert got[:5] == (name, pix_fmt, tag, TAGS[space], 1)  # limited range
    assert probe(outs[0]).bit_depth == (10 if ten_bit else 8)
    assert got[5] == want[5] and len(got[5]) == 12  # every frame, at the source's times
    assert got[6] == want[6] == ["aac"] and audio_packets(outs[0]) == audio_packets(source)


@pytest.mark.parametrize("codec", list(CODECS))
def test_odd_size_rotation_and_fields_as_the_source(tmp_path, neutral, codec):
    _, ext, _ = CODECS[codec]
    odd = write_clip(tmp_path / "odd.mp4", shots(2, (63, 35)), pix_fmt="yuv444p", rotation=90, audio=None)
    render(odd, tmp_path / f"odd.out{ext}", neutral, codec)
    info = probe(tmp_path / f"odd.out{ext}")
    assert (info.width, info.height, info.rotation) == (63, 35, 90)
    for order in ("tff", "bff"):
        src = write_clip(tmp_path / f"{order}.mp4", shots(3, (64, 48)), fps=25, audio=None,
                         options={"x264-params": f"interlaced=1:{order}=1"})
        res = render(src, tmp_path / f"{order}.out{ext}", neutral, codec)
        assert any("interlaced source" in n for n in res.notes)
        with av.open(str(tmp_path / f"{order}.out{ext}")) as c:
            assert c.streams.video[0].codec_context.field_order == {"tff": 2, "bff": 3}[order]
        if codec == "prores":  # coded interlaced, field by field, as editors expect of ProRes
            assert probe(tmp_path / f"{order}.out{ext}").field_order == order


def test_prores_outside_mov_is_one_line_and_leaves_nothing(tmp_path, source, neutral):
    for ext in (".mp4", ".mkv"):
        with pytest.raises(OutputError) as err:
            render(source, tmp_path / f"out{ext}", neutral, "prores")
        msg = str(err.value)
        assert "\n" not in msg and f"out{ext}" in msg and ".mov" in msg and "--codec" in msg, msg
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OptionError, match="--codec 'av1': must be one of h264, hevc, prores"):
        EncodeOptions(codec="av1")


def test_codec_from_the_command_line(tmp_path):
    """--codec reaches the writer, and ProRes outside .mov is refused before any work."""
    from typer.testing import CliRunner

    from cinefx.cli import app
    from cinefx.testing.clips import Move, render_move, write_clip

    src = write_clip(tmp_path / "in.mp4", list(render_move(Move("coffee", 8), (64, 36))), audio=None)
    r = CliRunner().invoke(app, ["stylize", str(src), "-o", str(tmp_path / "out.mov"), "--codec", "prores",
                                 "--preset", "noir", "-q"])
    assert r.exit_code == 0, r.output
    with av.open(str(tmp_path / "out.mov")) as c:
        assert c.streams.video[0].codec_context.name == "prores"
    r = CliRunner().invoke(app, ["stylize", str(src), "-o", str(tmp_path / "out.mp4"), "--codec", "prores"])
    assert r.exit_code == 1 and ".mov" in r.output and not (tmp_path / "out.mp4").exists()
    r = CliRunner().invoke(app, ["stylize", str(src), "-o", str(tmp_path / "x.mp4"), "--codec", "av1"])
    assert r.exit_code == 2 and "--codec 'av1'" in r.output
