"""Runs that must not lose or mix up work: damaged frames, batches that meet anything, outputs
that share a name, SIGTERM, file names rich would rewrite, concurrent runs (the output lock) and
kept scenes that are damaged between runs."""

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.fsutil import host_name
from cinefx.testing.clips import Move, cut, write_clip

runner = CliRunner()
GRADE = ["--engine", "grade", "--x264-preset", "ultrafast"]


def frame_count(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def damage(src: Path, dst: Path, packets: set[int]) -> Path:
    """A copy of `src` with the payload of the given video packets (decode order) replaced by
    noise: what a bad sector or a dropped network chunk does to a file."""
    with av.open(str(src)) as cin, av.open(str(dst), "w") as cout:
        video = cin.streams.video[0].index
        streams = {s.index: cout.add_stream_from_template(s) for s in cin.streams}
        n = 0
        for pkt in cin.demux():
            if pkt.dts is None:
                continue
            index = pkt.stream.index
            if index == video:
                if n in packets:
                    junk = av.Packet(np.random.default_rng(n).integers(0, 256, pkt.size, np.uint8).tobytes())
                    junk.pts, junk.dts, junk.duration, junk.time_base = pkt.pts, pkt.dts, pkt.duration, pkt.time_base
                    pkt = junk
                n += 1
            pkt.stream = streams[index]
            cout.mux(pkt)
    return dst


def lock_file(output: Path, host: str, pid: int, heartbeat: float) -> Path:
    path = output.parent / f".{output.name}.cinefx-lock"
    path.write_text(json.dumps({"host": host, "pid": pid, "heartbeat": heartbeat, "token": "someone-else"}))
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".cinefx-" in p.name)


# -- damaged packets: a warning, a report field, a count in the batch summary -----------------------

def test_concealed_frames_are_reported(tmp_path, clips):
    bad = damage(clips["mp4"], tmp_path / "bad.mp4", {10, 11})
    out, report = tmp_path / "o.mp4", tmp_path / "r.json"
    r = runner.invoke(app, ["stylize", str(bad), "-o", str(out), *GRADE, "--report", str(report), "-q"])
    assert r.exit_code == 0, r.output
    assert f"warning: {bad}: 2 frames could not be decoded and were replaced by the previous frame" in r.output
    assert json.loads(report.read_text())["concealed_frames"] == 2
    assert frame_count(out) == frame_count(clips["mp4"])

    footage = tmp_path / "footage"
    footage.mkdir()
    bad.rename(footage / "bad.mp4")
    (footage / "good.mp4").write_bytes(clips["mp4"].read_bytes())
    r = runner.invoke(app, ["stylize", str(footage), "-o", str(tmp_path / "out"), *GRADE, "--no-metrics"])
    assert r.exit_code == 0, r.output
    assert r.output.count("could not be decoded") == 1
    assert "2 done, 0 skipped, 0 failed of 2; 1 with undecodable frames replaced" in r.output


# -- a batch survives anything one file does, except Ctrl-C -------------------------------------------

@pytest.fixture
def footage(tmp_path, clips):
    d = tmp_path / "footage"
    d.mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (d / name).write_bytes(clips["mkv_opus"].read_bytes() if name != "b.mp4" else clips["mp4"].read_bytes())
    return d


def test_an_unforeseen_error_fails_one_file_not_the_batch(footage, tmp_path, monkeypatch):
    import cinefx.stylize as S

    real = S.probe

    def probe(path):
        if Path(path).name == "b.mp4":
            raise RuntimeError("codec state went wrong\nsecond line of detail")
        return real(path)

    monkeypatch.setattr(S, "probe", probe)
    out = tmp_path / "out"
    r = runner.invoke(app, ["stylize", str(footage), "-o", str(out), *GRADE, "--no-metrics"])
    assert r.exit_code == 1, r.output
    assert f"{footage / 'b.mp4'}: unexpected RuntimeError: codec state went wrong" in r.output
    assert "second line" not in r.output and "Traceback" not in r.output
    assert "2 done, 0 skipped, 1 failed of 3" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "c.mp4"]

    def interrupted(path):
        if Path(path).name == "b.mp4":
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(S, "probe", interrupted)
    out = tmp_path / "out2"
    r = runner.invoke(app, ["stylize", str(footage), "-o", str(out), *GRADE, "--no-metrics"])
    assert r.exit_code == 130, r.output
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4"]  # c was never started


# -- batch outputs never share a name ------------------------------------------------------------------

def test_inputs_that_would_share_an_output_name(tmp_path, clips):
    footage, out, reports = tmp_path / "footage", tmp_path / "out", tmp_path / "reports"
    footage.mkdir()
    write_clip(footage / "clip.ts", cut(Move("rocket", 10), size=(96, 64)), fps=24, audio=None)
    args = ["stylize", str(footage), "-o", str(out), *GRADE, "--skip-existing"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "1 done, 0 skipped, 0 failed of 1" in r.output, r.output
    assert sorted(p.name for p in out.iterdir()) == ["clip.ts.mp4"]

    (footage / "clip.mp4").write_bytes(clips["mp4"].read_bytes())  # 48 frames; clip.ts has 10
    r = runner.invoke(app, [*args, "--report", str(reports)])
    assert r.exit_code == 0 and "1 done, 1 skipped, 0 failed of 2" in r.output, r.output
    assert sorted(p.name for p in out.iterdir()) == ["clip.mp4", "clip.ts.mp4"]
    assert frame_count(out / "clip.mp4") == 48 and frame_count(out / "clip.ts.mp4") == 10
    assert sorted(p.name for p in reports.iterdir()) == ["clip.mp4.json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "0 done, 2 skipped, 0 failed of 2" in r.output, r.output

    # the same name in two folders cannot be told apart by its extension: those two fail in the
    # summary, the rest renders (no input stops a batch)
    other = tmp_path / "other"
    other.mkdir()
    (other / "clip.mp4").write_bytes(clips["mp4"].read_bytes())
    fresh = tmp_path / "fresh"
    r = runner.invoke(app, ["stylize", str(footage), str(other), "-o", str(fresh), *GRADE])
    assert r.exit_code == 1 and "1 done, 0 skipped, 2 failed of 3" in r.output, r.output
    assert f"{footage / 'clip.mp4'} and {other / 'clip.mp4'} would both be written to {fresh / 'clip.mp4'}" in r.output
    assert sorted(p.name for p in fresh.iterdir()) == ["clip.ts.mp4"]


# -- SIGTERM stops a run as Ctrl-C does ------------------------------------------------------------

def test_sigterm_leaves_no_output_and_exits_143(tmp_path):
    big = write_clip(tmp_path / "long.mp4", (np.full((360, 640, 3), i % 255, np.uint8) for i in range(400)),
                     audio="aac")
    before = hashlib.sha256(big.read_bytes()).hexdigest()
    out = tmp_path / "o.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "cinefx", "stylize", str(big), "-o", str(out),
                             "--engine", "grade", "--x264-preset", "slow"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(".cinefx-tmp" in p.name for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["long.mp4"]  # no output, temporary or lock
    assert hashlib.sha256(big.read_bytes()).hexdigest() == before


# -- file names reach the terminal as they are ---------------------------------------------------------

def test_emoji_codes_in_file_names_stay_verbatim(tmp_path):
    name = "a :x: b :thumbs_up:.mp4"
    r = runner.invoke(app, ["stylize", str(tmp_path / name), "-o", str(tmp_path / "o.mp4")])
    assert r.exit_code == 1 and f"{tmp_path / name}: " in r.output, r.output
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / name).write_text("not a video")
    r = runner.invoke(app, ["stylize", str(folder), "-o", str(tmp_path / "out"), *GRADE])
    assert r.exit_code == 1
    assert f"error: {folder / name}: " in r.output and f"failed: {folder / name}\n" in r.output, r.output


# -- one run per output ----------------------------------------------------------------------------

def test_a_locked_output_is_refused_until_its_run_is_gone(tmp_path, clips):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        out = tmp_path / "o.mp4"
        lock = lock_file(out, host_name(), holder.pid, time.time())
        r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(out), *GRADE])
        assert r.exit_code == 1, r.output
        assert r.output.strip() == (f"cinefx: error: another cinefx run is writing {out} (host {host_name()}, "
                                    f"pid {holder.pid}); wait for it to finish, or write elsewhere")
        assert not out.exists() and lock.exists()

        # in a batch: skipped with --skip-existing (that run will finish it), failed without
        footage = tmp_path / "footage"
        footage.mkdir()
        (footage / "o.mp4").write_bytes(clips["mkv_opus"].read_bytes())
        (footage / "p.mp4").write_bytes(clips["mkv_opus"].read_bytes())
        args = ["stylize", str(footage), "-o", str(tmp_path), *GRADE, "--no-metrics"]
        r = runner.invoke(app, [*args, "--skip-existing"])
        assert r.exit_code == 0, r.output
        assert "o.mp4: skipped (being written by another run)" in r.output
        assert "1 done, 1 skipped, 0 failed of 2" in r.output
        (tmp_path / "p.mp4").unlink()
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and "1 done, 0 skipped, 1 failed of 2" in r.output, r.output
        assert f"another cinefx run is writing {out}" in r.output
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up (SIGKILL): its lock is stale and taken over
    r = runner.invoke(app, ["stylize", str(clips["mp4"]), "-o", str(out), *GRADE, "--no-metrics"])
    assert r.exit_code == 0, r.output
    assert out.exists() and not lock.exists()


def test_locks_of_other_hosts_go_stale_by_their_heartbeat(tmp_path):
    from cinefx.errors import OutputBusyError
    from cinefx.resume import OutputLock

    out = tmp_path / "o.mp4"
    lock = lock_file(out, "render-node-7", 1, time.time() - 5)  # pid 1 lives here, but that is another machine
    with pytest.raises(OutputBusyError, match=r"\(host render-node-7, pid 1\)"):
        OutputLock(out).acquire()
    lock_file(out, "render-node-7", 1, time.time() - 3600)
    with OutputLock(out, beat=0.05) as held:
        first = json.loads(lock.read_text())
        assert (first["host"], first["pid"]) == (host_name(), os.getpid())
        deadline = time.time() + 10
        while json.loads(lock.read_text())["heartbeat"] == first["heartbeat"] and time.time() < deadline:
            time.sleep(0.02)
        assert json.loads(lock.read_text())["heartbeat"] > first["heartbeat"]  # the heartbeat thread runs
        with pytest.raises(OutputBusyError):
            OutputLock(out).acquire()  # another run, in this process too
        # a run that saw this one as stalled (here: one that calls any lock stale) takes it over,
        # and this one must stop rather than write on
        with OutputLock(out, stale=-1) as taker:
            deadline = time.time() + 10
            while held._lost is None and time.time() < deadline:
                time.sleep(0.02)
            with pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"):
                held.check()
            assert json.loads(lock.read_text())["token"] == taker.token
    assert leftovers(tmp_path) == []


def test_two_batches_over_one_folder_share_the_work(tmp_path, clips):
    footage, out = tmp_path / "footage", tmp_path / "out"
    footage.mkdir()
    for i in range(4):
        (footage / f"c{i}.mp4").write_bytes(clips["mp4"].read_bytes())
    cmd = [sys.executable, "-m", "cinefx", "stylize", str(footage), "-o", str(out), *GRADE, "--no-metrics",
           "--skip-existing"]
    out.mkdir()
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in runs]
    for p, err in zip(runs, errs):
        assert p.returncode == 0 and "0 failed of 4" in err, err
    assert sorted(p.name for p in out.iterdir()) == [f"c{i}.mp4" for i in range(4)]
    assert all(frame_count(out / f"c{i}.mp4") == 48 for i in range(4))


# -- every file cinefx writes appears whole --------------------------------------------------------

def test_plots_and_sheets_are_written_whole(tmp_path, monkeypatch):
    import matplotlib.figure

    from cinefx.report import Measure, Report, write_plot
    from cinefx.sheet import write_png

    png = write_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "sheet.png")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(png.stat().st_mode) == 0o666 & ~mask  # not mkstemp's private 0600

    m = Measure(30.0, 0.9, 0)
    report = Report("in.mp4", "out.mp4", "grade", "epic", (64, 36), (), m, m, ((1, 30.0, 31.0, 0.9, 0.91),))
    plot = write_plot(report, tmp_path / "plot.png")
    good = plot.read_bytes()

    def full_disk(self, fname, **kw):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(OSError):
        write_plot(report, plot)
    assert plot.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "sheet.png"]


# -- resume checks what it kept ------------------------------------------------------------------------

def test_a_damaged_kept_scene_is_rendered_again(tiny_bundle, tmp_path, monkeypatch):
    from cinefx.diffusion import engine as E
    from cinefx.diffusion.models import ModelSpec
    from cinefx.presets import load_preset, override
    from cinefx.stylize import StylizeOptions, stylize_file

    src = write_clip(tmp_path / "three.mp4", cut(Move("astronaut", 6), Move("coffee", 12), Move("rocket", 6),
                                                 size=(64, 64)), fps=24, audio="aac")
    opts = StylizeOptions(engine="diffusion", models=ModelSpec(base=str(tiny_bundle)), metrics=False)
    preset = override(load_preset("epic"), "diffusion", steps=1)
    assert len(stylize_file(src, tmp_path / "whole.mp4", preset, opts).scenes) == 3

    real, rendered = E.DiffusionEngine.render, []

    def render(self, frames, scene):
        rendered.append(scene)
        if scene == kill_at:
            raise KeyboardInterrupt
        return real(self, frames, scene)

    monkeypatch.setattr(E.DiffusionEngine, "render", render)
    kill_at = 2
    with pytest.raises(KeyboardInterrupt):
        stylize_file(src, tmp_path / "resumed.mp4", preset, opts)
    kept = tmp_path / ".resumed.mp4.cinefx-work" / "scene-00000.mkv"
    kept.write_bytes(kept.read_bytes()[: kept.stat().st_size // 2])  # a truncated copy, a bad sector

    rendered.clear()
    kill_at = None
    res = stylize_file(src, tmp_path / "resumed.mp4", preset, opts)
    assert rendered == [0, 2]  # the damaged scene 0 rendered again, not read; scene 1 reused
    assert any("kept scene(s) 1 failed their checksum" in n for n in res.notes)
    assert (tmp_path / "whole.mp4").read_bytes() == (tmp_path / "resumed.mp4").read_bytes()
    assert leftovers(tmp_path) == []
