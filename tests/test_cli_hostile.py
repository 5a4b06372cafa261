"""What a hostile tester threw at the command line: absurd sizes and counts, running out of memory,
--skip-existing on one file, report paths that cannot be written, SIGHUP, names at the file
system's length limit, control characters in names, and setuid bits on --overwrite."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cinefx import fsutil
from cinefx.cli import _Progress, app
from cinefx.errors import OutputError
from cinefx.resume import OutputLock, lock_path
from cinefx.testing.clips import write_clip

runner = CliRunner()
GRADE = ["--engine", "grade", "--x264-preset", "ultrafast"]


def one_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".cinefx-" in p.name)


@pytest.fixture
def clip(tmp_path, clips):
    src = tmp_path / "in.mp4"
    src.write_bytes(clips["mkv_opus"].read_bytes())
    return src


# -- 1. sizes and counts past any real use: refused before anything is allocated ---------------------

@pytest.mark.parametrize("args, flag", [
    (["--size", "100000"], "--size 100000"),
    (["--size", "-8"], "--size -8"),
    (["--batch", "5000"], "--batch 5000"),
    (["--cluster", "ray", "--workers", "5000"], "--workers 5000"),
])
def test_stylize_refuses_absurd_sizes_before_any_work(tmp_path, clip, monkeypatch, args, flag):
    def no_ray(*a, **k):
        raise AssertionError("Ray was started for an impossible option")

    monkeypatch.setattr("cinefx.cli._Cluster.run", no_ray)
    r = runner.invoke(app, ["stylize", str(clip), "-o", str(tmp_path / "o.mp4"), *GRADE, *args])
    assert r.exit_code == 2, r.output
    assert one_line(r.output).startswith(f"cinefx: error: {flag}: must be ")
    assert [p.name for p in tmp_path.iterdir()] == ["in.mp4"]  # no output, lock or work folder


@pytest.mark.parametrize("args, flag", [
    (["eval", "SRC", "SRC", "--no-models", "--every", "99999999999999999999"], "--every 99999999999999999999"),
    (["rate", "--serve", "STUDY", "--port", "70000"], "--port 70000"),
    (["rate", "--serve", "STUDY", "--port", "0"], "--port 0"),
    (["rate", "SRC", "SRC", "-o", "STUDY/new", "--trials", "10000000"], "--trials 10000000"),
])
def test_other_counts_past_any_use_are_usage_errors(tmp_path, clip, args, flag):
    args = [a.replace("SRC", str(clip)).replace("STUDY", str(tmp_path)) for a in args]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert one_line(r.output).startswith(f"cinefx: error: {flag}: must be 1–")


# -- 2. an exception cinefx did not foresee, on one file: one line, not a traceback ------------------

def test_running_out_of_memory_on_one_file_is_one_line(tmp_path, clip, monkeypatch):
    def oom(*a, **k):  # numpy's _ArrayMemoryError is a MemoryError
        raise MemoryError("Unable to allocate 183. GiB for an array with shape (8000, 8000, 3) and data type uint8")

    monkeypatch.setattr("cinefx.stylize.probe", oom)
    out = tmp_path / "o.mp4"
    r = runner.invoke(app, ["stylize", str(clip), "-o", str(out), *GRADE])
    assert r.exit_code == 1
    line = one_line(r.output)
    assert line.startswith(f"cinefx: error: {clip}: out of memory (Unable to allocate 183. GiB"), line
    assert "--size" in line
    assert leftovers(tmp_path) == [] and not out.exists()


def test_an_unforeseen_exception_is_one_line_and_its_traceback_with_debug(tmp_path, clip, monkeypatch):
    def broken(*a, **k):
        raise ValueError("first line\nsecond line")

    monkeypatch.setattr("cinefx.stylize.probe", broken)
    args = ["stylize", str(clip), "-o", str(tmp_path / "o.mp4"), *GRADE]
    r = runner.invoke(app, args)
    assert r.exit_code == 1
    assert one_line(r.output) == f"cinefx: error: {clip}: unexpected ValueError: first line"
    r = runner.invoke(app, ["--debug", *args])
    assert r.exit_code == 1 and isinstance(r.exception, ValueError)  # raised on: Python prints the traceback
    # any other command: the same line without a file
    monkeypatch.setattr("cinefx.presets.load_preset", broken)
    r = runner.invoke(app, ["presets", "show", "epic"])
    assert r.exit_code == 1 and one_line(r.output) == "cinefx: error: unexpected ValueError: first line"


# -- 3. --skip-existing on one file ----------------------------------------------------------------

def test_skip_existing_skips_one_file(tmp_path, clip):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"an earlier render")
    r = runner.invoke(app, ["stylize", str(clip), "-o", str(out), *GRADE, "--skip-existing"])
    assert r.exit_code == 0, r.output
    assert one_line(r.output) == f"{clip}: skipped ({out} exists)"
    assert out.read_bytes() == b"an earlier render"
    r = runner.invoke(app, ["stylize", str(clip), "-o", str(out), *GRADE, "--skip-existing", "--overwrite"])
    assert r.exit_code == 2 and "--overwrite and --skip-existing" in one_line(r.output)
    # another run writing it (on another machine, heartbeat fresh): it will finish it
    out.unlink()
    lock = lock_path(out)
    lock.write_text(json.dumps({"host": "render-node-7", "pid": 7, "heartbeat": time.time(), "token": "x"}))
    r = runner.invoke(app, ["stylize", str(clip), "-o", str(out), *GRADE, "--skip-existing"])
    assert r.exit_code == 0 and one_line(r.output) == f"{clip}: skipped (being written by another run)"
    assert not out.exists() and lock.exists()


# -- 4. report, plot and HTML paths: checked before rendering; a failed write names the file ---------

def test_report_paths_are_checked_before_rendering(tmp_path, clip):
    out = tmp_path / "o.mp4"
    for flag, path, why in (("--report", clip / "r.json", f"{clip} is not a folder"),
                            ("--plot", tmp_path / "missing" / "p.png", f"{tmp_path / 'missing'} does not exist"),
                            ("--html", tmp_path, "is a folder")):
        r = runner.invoke(app, ["stylize", str(clip), "-o", str(out), *GRADE, flag, str(path)])
        assert r.exit_code == 2, r.output
        line = one_line(r.output)
        assert line.startswith(f"cinefx: error: {flag} {path}: ") and why in line, line
        assert not out.exists() and leftovers(tmp_path) == []
    # several inputs: the paths are folders, and a file there is refused before any work
    r = runner.invoke(app, ["stylize", str(clip), str(clip), "-o", str(tmp_path / "out"), *GRADE,
                            "--report", str(clip)])
    assert r.exit_code == 2 and one_line(r.output).startswith(f"cinefx: error: --report {clip}: is a file")


def test_a_full_disk_names_the_file_not_its_temporary(tmp_path, clip, monkeypatch):
    fsync = os.fsync

    def full_for_json(fd):  # the disk fills up as the report is written, after the video
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_for_json)
    out, report = tmp_path / "o.mp4", tmp_path / "r.json"
    r = runner.invoke(app, ["stylize", str(clip), "-o", str(out), *GRADE, "--report", str(report)])
    assert r.exit_code == 1
    assert f"cinefx: error: {report}: cannot be written (No space left on device)\n" in r.output, r.output
    assert out.exists() and not report.exists() and leftovers(tmp_path) == []
    # the library's own error, typed, whichever step fails
    with pytest.raises(OutputError, match=f"^{clip / 'x.json'}: cannot be written \\(Not a directory\\)$"):
        fsutil.write_text(clip / "x.json", "{}")


# -- 5. SIGHUP: a closed terminal cleans up as SIGTERM does --------------------------------------------

def test_sighup_leaves_no_output_and_exits_129(tmp_path):
    src = write_clip(tmp_path / "long.mp4", (np.full((180, 320, 3), i * 2 % 255, np.uint8) for i in range(120)),
                     audio=None)
    out = tmp_path / "o.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "cinefx", "stylize", str(src), "-o", str(out),
                             "--engine", "grade", "--x264-preset", "placebo", "--no-metrics"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(".cinefx-tmp" in p.name for p in tmp_path.iterdir()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 129, err
    assert "terminated (SIGHUP)" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["long.mp4"]  # no output, temporary or lock
    # under nohup SIGHUP stays ignored: the run outlives the terminal
    code = ("import signal; from cinefx import interrupt; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
            "interrupt.install(); assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- 6. names near the file system's limit ----------------------------------------------------------

NEAR_LIMIT = "é" * 123  # + ".mp4": 250 bytes, which fits, but not with cinefx's marks around it


def test_lock_and_temporary_names_fit_the_limit(tmp_path):
    out, other = tmp_path / f"{NEAR_LIMIT}.mp4", tmp_path / f"{NEAR_LIMIT}.mkv"
    # short enough, stable, and different for names that differ only at the end
    locks = {lock_path(out), lock_path(out), lock_path(other)}
    assert len(locks) == 2 and all(len(os.fsencode(p.name)) <= 255 for p in locks)
    with OutputLock(out):
        tmp = fsutil.temp_path_for(out)
    assert len(os.fsencode(tmp.name)) <= 255 and fsutil.stale_temps(out) == []
    dead = tmp.rename(tmp.with_name(tmp.name.replace(f"-{os.getpid()}-", "-999999999-")))
    assert fsutil.stale_temps(out) == [dead]  # a killed run's temporary is still recognised


def test_an_output_name_near_the_limit_renders(tmp_path, clip):
    out = tmp_path / f"{NEAR_LIMIT}.mp4"
    r = runner.invoke(app, ["stylize", str(clip), "-o", str(out), *GRADE, "--no-metrics"])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 0 and sorted(tmp_path.iterdir()) == sorted([clip, out])


# -- 7. control characters never reach the terminal raw -----------------------------------------------

def test_control_characters_in_names_are_escaped(tmp_path, clip, capsys):
    r = runner.invoke(app, ["stylize", str(tmp_path / "new\nx.mp4")])
    assert r.exit_code == 1
    assert one_line(r.output).startswith(f"cinefx: error: {tmp_path}/new\\nx.mp4: ")

    evil = clip.rename(tmp_path / "a\x1b[2Jb\x9b.mp4")
    r = runner.invoke(app, ["stylize", str(evil), "-o", str(tmp_path / "o\x07.mp4"), *GRADE])
    assert r.exit_code == 0, r.output
    assert not any(c in r.output for c in "\x1b\x07\x9b"), r.output
    assert "a\\x1b[2Jb\\x9b.mp4: engine: grade" in r.output  # a note
    assert "Temporal consistency — o\\x07.mp4" in r.output  # the metrics table's title
    assert "\\n" not in r.output  # the caption's own line breaks stay line breaks

    progress = _Progress("a\x1b]0;PWNED\x07.mp4", 24)
    progress.last_log -= 10
    progress(12, 24, "scene\r2")
    assert capsys.readouterr().err.startswith("a\\x1b]0;PWNED\\x07.mp4: 12/24 frames (50%), ")

    # a lock file anyone could have written names the run holding the output
    out = tmp_path / "locked.mp4"
    lock_path(out).write_text(json.dumps({"host": "node\x1b[31m\nfake", "pid": "1\n2", "heartbeat": time.time()}))
    r = runner.invoke(app, ["stylize", str(tmp_path / "o\x07.mp4"), "-o", str(out), *GRADE])
    assert r.exit_code == 1
    assert one_line(r.output) == (f"cinefx: error: another cinefx run is writing {out} (host node??31m?fake, "
                                  "pid ?); wait for it to finish, or write elsewhere")


# -- 8. --overwrite keeps permission bits, not setuid --------------------------------------------------

def test_overwrite_keeps_the_permission_bits_only(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"old")
    target.chmod(0o4755)
    fsutil.write_bytes(target, b"new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o755 and target.read_bytes() == b"new"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_overwrite_as_root_keeps_the_owner(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"old")
    os.chown(target, 1234, 5678)
    fsutil.write_bytes(target, b"new")
    assert (target.stat().st_uid, target.stat().st_gid) == (1234, 5678)


def test_quiet_does_not_outlive_its_command(tmp_path):
    runner.invoke(app, ["stylize", str(tmp_path / "missing.mp4"), "-q"])
    r = runner.invoke(app, ["presets", "export-lut", "epic", "-o", str(tmp_path / "epic.cube"), "--size", "17"])
    assert r.exit_code == 0 and "look LUT written to" in r.output, r.output


@pytest.mark.parametrize("name", ["my-look", "study.v2", NEAR_LIMIT])
def test_a_killed_runs_half_made_folder_is_removed_by_the_next(tmp_path, name):
    """`atomic_dir` (a preset import, a rating study) builds its folder under a temporary name; a run
    killed meanwhile left it for good. The next one removes this host's dead runs' folders only."""
    target = tmp_path / name
    with pytest.raises(KeyboardInterrupt), fsutil.atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("x")
        taken = tmp.rename(tmp.with_name(tmp.name.replace(f"-{os.getpid()}-", "-999999999-")))  # its run died
        raise KeyboardInterrupt
    live = taken.with_name(taken.name.replace("-999999999-", f"-{os.getppid()}-"))
    live.mkdir()  # a run still going
    assert len(os.fsencode(taken.name)) <= 255 and taken.is_dir()
    with fsutil.atomic_dir(target) as tmp:
        (tmp / "whole.txt").write_text("y")
    assert not taken.exists() and live.is_dir() and (target / "whole.txt").is_file()


def test_a_report_that_cannot_be_written_fails_its_input_not_the_batch(tmp_path, clip):
    """In a batch, the first input's report path is taken by a folder: that input's one line names
    the report, the next input still renders and reports, and the exit code says something failed."""
    from cinefx.stylize import output_for

    second = tmp_path / "in2.mp4"
    second.write_bytes(clip.read_bytes())
    out, reports = tmp_path / "out", tmp_path / "reports"
    blocked = reports / f"{output_for(clip, out, 'epic').name}.json"
    blocked.mkdir(parents=True)
    r = runner.invoke(app, ["stylize", str(clip), str(second), "-o", str(out), "--report", str(reports), *GRADE])
    assert r.exit_code == 1, r.output
    assert str(blocked) in r.output and "rendered, report not written" in r.output and "Traceback" not in r.output
    assert (reports / f"{output_for(second, out, 'epic').name}.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted([output_for(clip, out, "epic").name,
                                                           output_for(second, out, "epic").name])
