"""Every kind of bad input: one line naming the file, exit 1, nothing at the output path."""

import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.testing.clips import write_clip

runner = CliRunner()


def make_bad(kind, d, clips):
    p = d / f"bad_{kind}"
    if kind == "empty":
        p = p.with_suffix(".mp4"); p.write_bytes(b"")
    elif kind == "text":
        p = p.with_suffix(".mp4"); p.write_text("this is not a video\n" * 50)
    elif kind == "random":
        p = p.with_suffix(".mp4"); p.write_bytes(np.random.default_rng(1).bytes(20000))
    elif kind == "truncated":  # moov at the end, cut off
        data = clips["mp4"].read_bytes()
        p = p.with_suffix(".mp4"); p.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_faststart":  # index first, media data cut off
        src = write_clip(d / "fs.mp4", (np.full((90, 160, 3), i * 5, np.uint8) for i in range(48)),
                         audio=None)
        import av

        with av.open(str(src)) as c_in, av.open(str(d / "fs2.mp4"), "w", options={"movflags": "faststart"}) as c_out:
            s = c_out.add_stream_from_template(c_in.streams.video[0])
            for pkt in c_in.demux(c_in.streams.video[0]):
                if pkt.size:
                    pkt.stream = s
                    c_out.mux(pkt)
        data = (d / "fs2.mp4").read_bytes()
        p = p.with_suffix(".mp4"); p.write_bytes(data[: int(len(data) * 0.6)])
    elif kind == "header_only":
        data = clips["mp4"].read_bytes()
        p = p.with_suffix(".mp4"); p.write_bytes(data[:64])
    elif kind == "audio_only":
        import av

        p = p.with_suffix(".m4a")
        with av.open(str(p), "w") as c:
            s = c.add_stream("aac", rate=48000)
            for i in range(20):
                fr = av.AudioFrame.from_ndarray(np.zeros((2, 1024), np.float32), format="fltp", layout="stereo")
                fr.sample_rate = 48000
                fr.pts = i * 1024
                for pkt in s.encode(fr):
                    c.mux(pkt)
            for pkt in s.encode(None):
                c.mux(pkt)
    elif kind == "image":
        import cv2

        p = p.with_suffix(".png")
        cv2.imwrite(str(p), np.zeros((90, 160, 3), np.uint8))
    elif kind == "missing":
        p = d / "does_not_exist.mp4"
    return p


KINDS = ["empty", "text", "random", "truncated", "truncated_faststart", "header_only", "audio_only",
         "image", "missing"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_gives_one_line_error(kind, tmp_path, clips):
    src = make_bad(kind, tmp_path, clips)
    before = src.read_bytes() if src.exists() else None
    out = tmp_path / "out" / "result.mp4"
    out.parent.mkdir()
    r = runner.invoke(app, ["stylize", str(src), "-o", str(out), "--engine", "grade"])
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and src.name in lines[0], r.output
    assert "Traceback" not in r.output
    assert list(out.parent.iterdir()) == []  # no output, no temporary file
    if before is not None:
        assert src.read_bytes() == before


def test_unwritable_output_folder(tmp_path, clips, monkeypatch):
    # CI runs as root, for whom folder modes mean nothing; pretend the OS said no
    import cinefx.video.writer as writer

    folder = tmp_path / "ro"
    folder.mkdir()
    real = os.access
    monkeypatch.setattr(writer.os, "access", lambda p, m: False if str(p) == str(folder) else real(p, m))
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(folder / "o.mp4")])
    assert r.exit_code == 1 and "not writable" in r.output and "ro" in r.output
    assert list(folder.iterdir()) == []


def test_output_folder_that_is_a_file(tmp_path, clips):
    (tmp_path / "file").write_text("x")
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(tmp_path / "file" / "o.mp4")])
    assert r.exit_code == 1 and "not a folder" in r.output


def test_missing_output_folder(tmp_path, clips):
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(tmp_path / "nope" / "o.mp4")])
    assert r.exit_code == 1 and "does not exist" in r.output and "nope" in r.output


def test_names_with_brackets_survive_in_messages(tmp_path):
    """Editors name takes "shot [v2].mp4"; the terminal's markup must not eat the brackets."""
    bad = tmp_path / "shot [v2] [bold].mp4"
    bad.write_text("not a video")
    r = runner.invoke(app, ["stylize", str(bad), "-o", str(tmp_path / "o.mp4")])
    assert r.exit_code == 1 and str(bad) in r.output, r.output


def test_existing_output_needs_overwrite(tmp_path, clips):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"keep me")
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(out), "--engine", "grade"])
    assert r.exit_code == 1 and "--overwrite" in r.output
    assert out.read_bytes() == b"keep me"
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(out), "--engine", "grade", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 1000


def test_unknown_preset_and_impossible_options(tmp_path, clips):
    """What cannot be used is exit 1; an impossible option value is bad usage, exit 2 (as the
    README's table says); both are one line, never a traceback."""
    out = tmp_path / "o.mp4"
    for args, code, needle in ((["--preset", "nope"], 1, "unknown preset 'nope'"),
                               (["--engine", "diffusion"], 1, "not in the Hugging Face cache"),
                               (["--crf", "99"], 2, "--crf 99.0: must be between 0 and 51"),
                               (["--crf", "-1"], 2, "--crf -1.0: must be between 0 and 51"),
                               (["--seed", "-1"], 2, "--seed -1: must be 0 or more"),
                               (["--x264-preset", "warp"], 2, "--x264-preset"),
                               (["--letterbox", "-1"], 2, "--letterbox"),
                               (["--engine", "magic"], 2, "--engine"),
                               (["--size", "-8"], 2, "--size"),
                               (["--steps", "0"], 2, "--steps 0: must be between 1"),
                               (["--temporal", "sideways"], 2, "--temporal 'sideways': must be one of full"),
                               (["--strength", "1.5"], 2, "--strength 1.5: must be between 0 and 1"),
                               (["--detail", "2"], 2, "--detail 2.0: must be between 0 and 1")):
        r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(out), *args])
        assert r.exit_code == code, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, r.output)
        assert not out.exists()
    for args, needle in ((["--steps", "0"], "--steps 0: must be 1 or more"),
                         (["--seed", "-1"], "--seed -1: must be 0 or more")):
        r = runner.invoke(app, ["storyboard", str(clips["mp4"]), "-o", str(tmp_path / "b.png"), *args])
        assert r.exit_code == 2 and needle in r.output, (args, r.output)


def test_interrupted_run_leaves_nothing(tmp_path, clips, monkeypatch):
    """Ctrl-C in the middle of encoding: no output, no temporary file, exit 130."""
    import cinefx.video.writer as writer

    real = writer.VideoWriter.write
    calls = {"n": 0}

    def interrupt(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(writer.VideoWriter, "write", interrupt)
    out = tmp_path / "o.mp4"
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(out), "--engine", "grade"])
    assert r.exit_code == 130
    assert list(tmp_path.iterdir()) == []


def test_encoder_failure_reaches_the_caller(tmp_path, clips, monkeypatch):
    """The encoder runs on its own thread: an error there (here, a full disk) still ends the run
    with a one-line message naming the output, exit 1, and nothing left behind."""
    import cinefx.video.writer as writer

    real = writer.VideoWriter._encode
    calls = {"n": 0}

    def full_disk(self, frame):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(self, frame)

    monkeypatch.setattr(writer.VideoWriter, "_encode", full_disk)
    out = tmp_path / "o.mp4"
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(out), "--engine", "grade"])
    assert r.exit_code == 1, r.output
    assert f"{out}: encoding failed: [Errno 28] No space left on device" in r.output
    assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_swallowed_by_a_c_callback_still_stops_the_run(tmp_path, clips, monkeypatch):
    """A KeyboardInterrupt raised while the main thread runs a callback from C (PyAV's log callback)
    is printed as "ignored" and dropped. The CLI's handler also records the request, and the frame
    loop raises it again: exit 130, nothing left behind."""
    import cinefx.video.writer as writer
    from cinefx import interrupt

    real = writer.VideoWriter.write
    calls = {"n": 0}

    def swallowed(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 10:
            try:
                interrupt._handler(2, None)  # what SIGINT runs...
            except KeyboardInterrupt:
                pass  # ...and what a C callback does with the exception
        return real(self, *a, **k)

    monkeypatch.setattr(writer.VideoWriter, "write", swallowed)
    monkeypatch.setattr(interrupt, "_requested", __import__("threading").Event())
    out = tmp_path / "o.mp4"
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(out), "--engine", "grade"])
    assert r.exit_code == 130, r.output
    assert calls["n"] == 10  # stopped at the next frame
    assert list(tmp_path.iterdir()) == []


def test_killed_process_leaves_no_output(tmp_path, clips):
    """A real SIGINT to a real process, mid-run."""
    import signal
    import time

    out = tmp_path / "o.mp4"
    big = write_clip(tmp_path / "long.mp4", (np.full((360, 640, 3), i % 255, np.uint8) for i in range(400)),
                     audio="aac")
    proc = subprocess.Popen([sys.executable, "-m", "cinefx", "stylize", str(big), "-o", str(out),
                             "--engine", "grade", "--x264-preset", "slow"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not any(".cinefx-tmp" in p.name for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode == 130, proc.stderr.read()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["long.mp4"]
