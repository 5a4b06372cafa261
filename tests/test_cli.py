"""The command line: help without torch, batches, exit codes."""

import subprocess
import sys

import av
from typer.testing import CliRunner

from cinefx import __version__
from cinefx.cli import app

runner = CliRunner()


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from cinefx.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(app, ['stylize', '--help']); assert r.exit_code == 0; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "cinefx", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "stylize" in r.stdout


def test_batch_carries_on_past_a_bad_file(tmp_path, clips):
    footage = tmp_path / "footage"
    footage.mkdir()
    for name in ("a.mp4", "c.mkv"):
        (footage / name).write_bytes(clips["mp4" if name.endswith("mp4") else "mkv_opus"].read_bytes())
    (footage / "b.mp4").write_text("not a video")
    (footage / "notes.txt").write_text("ignored: not a video extension")
    out = tmp_path / "out"
    r = runner.invoke(app, ["stylize", str(footage), "-o", str(out), "--engine", "grade", "--no-metrics",
                            "--preset", "noir"])
    assert r.exit_code == 1, r.output
    assert "2 done, 0 skipped, 1 failed of 3" in r.output and "b.mp4" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "c.mkv"]
    first = (out / "a.mp4").stat().st_mtime_ns
    r = runner.invoke(app, ["stylize", str(footage / "a.mp4"), str(footage / "c.mkv"), "-o", str(out),
                            "--engine", "grade", "--skip-existing", "--no-metrics"])
    assert r.exit_code == 0, r.output
    assert "0 done, 2 skipped, 0 failed of 2" in r.output
    assert (out / "a.mp4").stat().st_mtime_ns == first


def test_batch_into_the_footage_folder_and_rerun(tmp_path, clips):
    """Outputs written beside their inputs get the preset in their name, carry the source's tags,
    and a later run over the same folder neither restyles them nor counts them as inputs."""
    footage = tmp_path / "footage"
    footage.mkdir()
    src = footage / "a.mp4"
    with av.open(str(clips["mp4"])) as cin, av.open(str(src), "w") as cout:
        cout.metadata.update({"title": "Take 3", "comment": "from the B camera"})
        streams = {s.index: cout.add_stream_from_template(s) for s in cin.streams}
        for pkt in cin.demux():
            if pkt.dts is not None:
                pkt.stream = streams[pkt.stream.index]
                cout.mux(pkt)
    args = ["stylize", str(footage), "-o", str(footage), "--engine", "grade", "--no-metrics"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "1 done, 0 skipped, 0 failed of 1" in r.output, r.output
    assert sorted(p.name for p in footage.iterdir()) == ["a.epic.mp4", "a.mp4"]
    with av.open(str(footage / "a.epic.mp4")) as c:
        assert c.metadata["title"] == "Take 3"
        assert c.metadata["comment"] == f"rendered by cinefx {__version__}, preset epic; from the B camera"
    r = runner.invoke(app, [*args, "--skip-existing"])
    assert r.exit_code == 0 and "0 done, 1 skipped, 0 failed of 1" in r.output, r.output
    r = runner.invoke(app, [*args, "--preset", "noir"])
    assert r.exit_code == 0 and "1 done, 0 skipped, 0 failed of 1" in r.output, r.output
    assert sorted(p.name for p in footage.iterdir()) == ["a.epic.mp4", "a.mp4", "a.noir.mp4"]
    graded = tmp_path / "graded"
    graded.mkdir()
    (footage / "a.epic.mp4").rename(graded / "a.epic.mp4")
    r = runner.invoke(app, ["stylize", str(graded), "-o", str(tmp_path / "again"), "--engine", "grade"])
    assert r.exit_code == 1 and "(1 written by cinefx itself" in r.output, r.output


def test_default_output_name_and_quiet(tmp_path, clips):
    src = tmp_path / "clip.mp4"
    src.write_bytes(clips["mp4"].read_bytes())
    r = runner.invoke(app, ["stylize", str(src), "--preset", "golden-hour", "--engine", "grade", "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "clip.golden-hour.mp4").exists()
    assert r.output.strip() == ""


def test_same_seed_same_grade(tmp_path, clips, monkeypatch):
    """The frames handed to the encoder are identical run to run. (Multi-threaded libx264 itself
    is not bit-exact between runs on this build, so the encoded files may differ by rounding.)"""
    import cinefx.video.writer as writer

    seen = []
    real = writer.VideoWriter.write
    monkeypatch.setattr(writer.VideoWriter, "write", lambda self, rgb, *a: (seen.append(rgb.tobytes()), real(self, rgb, *a)))
    outs = []
    for i in range(2):
        o = tmp_path / f"o{i}.mp4"
        r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(o), "--engine", "grade", "--seed", "7",
                                "--no-metrics"])
        assert r.exit_code == 0, r.output
        outs.append(b"".join(seen))
        seen.clear()
    assert outs[0] == outs[1]
