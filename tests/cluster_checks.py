"""--cluster ray on one local Ray instance (CPU only: the two GPUs are logical, so workers that ask
for one run on the CPU): the same bytes as the one-machine run, a killed worker, a stopped driver
resuming, a bad input in a batch, the grade engine over a folder, and preflight.

Not collected with the other tests: `tests/test_cluster.py` runs this file in a pytest of its own,
so that no other test shares a process with Ray."""

import hashlib
import os
from dataclasses import replace
import signal
import subprocess
import sys

import pytest

import ray  # the `ray` extra, which scripts/setup.sh installs for the tests

from cinefx import cluster
from cinefx.diffusion.models import ModelSpec
from cinefx.errors import ClusterError
from cinefx.presets import load_preset, override
from cinefx.stylize import StylizeOptions, stylize_file
from cinefx.testing.clips import Move, cut, write_clip


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def three_scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster-clips")
    return write_clip(d / "three.mp4", cut(Move("astronaut", 8), Move("coffee", 10), Move("rocket", 6), size=(96, 64)),
                      fps=24, audio="aac")


@pytest.fixture(scope="module")
def three_local(tiny_bundle, three_scenes, tmp_path_factory):
    """The one-machine render of `three_scenes`, which the cluster's must match byte for byte."""
    return stylize_file(three_scenes, tmp_path_factory.mktemp("cluster-local") / "local.mp4", *diffusion(tiny_bundle))


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def diffusion(bundle):
    preset = override(load_preset("epic"), "diffusion", steps=2, chunk=4)
    return preset, StylizeOptions(engine="diffusion", models=ModelSpec(base=str(bundle)), metrics=False)


def test_importing_the_cli_does_not_import_ray():
    code = "import sys, cinefx.stylize, cinefx.cli; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_same_bytes_as_one_machine_and_a_killed_worker_is_retried(local_ray, tiny_bundle, three_scenes, three_local,
                                                                  tmp_path):
    preset, opts = diffusion(tiny_bundle)
    assert len(three_local.scenes) == 3
    (tmp_path / "ray").mkdir()
    seen, killed = [], []

    def kill_first_worker(done):
        seen.append(done)
        if not killed:  # that worker has its next scene under way: kill it mid-scene
            killed.append(done.pid)
            os.kill(done.pid, signal.SIGKILL)

    items = cluster.stylize_on_ray([three_scenes], [tmp_path / "ray" / "local.mp4"], preset, opts,
                                   on_scene=kill_first_worker)
    assert [i.status for i in items] == ["done"], items
    assert sha(tmp_path / "ray" / "local.mp4") == sha(three_local.output)
    assert sorted(d.scene for d in seen) == [0, 1, 2]  # every scene once, the killed one retried
    assert not list((tmp_path / "ray").glob(".*cinefx-*"))  # no work folder or lock left


def test_a_long_take_spreads_over_workers_in_pieces_with_the_same_bytes(local_ray, tiny_bundle, tmp_path,
                                                                         monkeypatch):
    """One take of 110 frames in pieces of 48: the first piece, then the other two side by side on
    both workers, each from the state the first left in the work folder. The driver, which reads
    every piece back to assemble the file, never loads the models. `--engine auto` looks at the
    cluster's GPUs, not the driver's."""
    from cinefx import engines
    from cinefx.eval import warp

    from cinefx.testing.clips import render_move

    src = write_clip(tmp_path / "take.mp4", render_move(Move("astronaut", 110, (0.45, 0.4, 0.9), (0.55, 0.5, 0.6)),
                                                        (96, 64)), fps=24, audio="aac")
    preset, opts = diffusion(tiny_bundle)
    preset, opts = override(preset, "diffusion", part=48), replace(opts, metrics=True)  # warp error too
    local = stylize_file(src, tmp_path / "local.mp4", preset, opts)
    assert len(local.scenes) == 1 and local.report.warped

    def no_models(*args, **kwargs):
        raise AssertionError("the driver loaded the models")

    monkeypatch.setattr(engines, "build_diffusion_engine", no_models)
    flows, real_flow = [], warp.FlowEstimator.__call__
    monkeypatch.setattr(warp.FlowEstimator, "__call__", lambda self, a, b: flows.append(1) or real_flow(self, a, b))
    (tmp_path / "ray").mkdir()
    seen = []
    # --engine auto: this machine has no CUDA GPU, the cluster has two (logical) ones, which count
    items = cluster.stylize_on_ray([src], [tmp_path / "ray" / "local.mp4"], preset, replace(opts, engine="auto"),
                                   workers=2, on_scene=seen.append)
    assert [i.status for i in items] == ["done"], items
    assert items[0].result.engine == "diffusion"
    assert sha(tmp_path / "ray" / "local.mp4") == sha(tmp_path / "local.mp4")
    assert [(d.scene, d.part, d.frames) for d in seen][:1] == [(0, 0, 48)]
    assert sorted((d.part, d.frames) for d in seen[1:]) == [(1, 48), (2, 14)]
    assert len({d.pid for d in seen[1:]}) == 2  # the later pieces went to both workers
    # the report's measures came back with the pieces: the driver measured the two seams alone
    ours = items[0].result.report
    assert (ours.scenes, ours.per_pair, ours.warp_output) == (local.report.scenes, local.report.per_pair,
                                                            local.report.warp_output)
    assert len(ours.per_pair) == 109 and len(flows) == 2


def test_a_stopped_driver_resumes_with_finished_scenes(local_ray, tiny_bundle, three_scenes, three_local, tmp_path):
    preset, opts = diffusion(tiny_bundle)
    out = tmp_path / "out" / "three.mp4"
    out.parent.mkdir()

    def ctrl_c(done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cluster.stylize_on_ray([three_scenes], [out], preset, opts, workers=1, on_scene=ctrl_c)
    assert not out.exists()  # no half-written output
    kept = sorted(p.name for p in (out.parent / ".three.mp4.cinefx-work").glob("scene-*"))
    assert kept == ["scene-00001.mkv"]  # the longest scene went first and stays

    again = []
    items = cluster.stylize_on_ray([three_scenes], [out], preset, opts, on_scene=again.append)
    assert [i.status for i in items] == ["done"]
    assert sorted(d.scene for d in again) == [0, 2]  # the finished scene was not rendered again
    assert sha(out) == sha(three_local.output)


def test_a_bad_input_fails_alone(local_ray, tiny_bundle, three_scenes, tmp_path, monkeypatch):
    """The bad input fails alone; and the driver finds an input's scenes (a decode of all of it)
    only once the scenes found before are all under way, so that the workers are not kept waiting."""
    preset, opts = diffusion(tiny_bundle)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 100)
    (tmp_path / "o").mkdir()
    events, real_open = [], cluster._open_output
    monkeypatch.setattr(cluster, "_open_output", lambda src, *a: events.append(f"open {src.name}") or real_open(src, *a))
    items = cluster.stylize_on_ray([three_scenes, bad], tmp_path / "o", preset, opts, workers=1,
                                   on_scene=lambda done: events.append("scene done"))
    assert [i.status for i in items] == ["done", "failed"]
    assert "bad.mp4" in items[1].error and "\n" not in items[1].error
    assert (tmp_path / "o" / "three.mp4").exists() and not (tmp_path / "o" / "bad.mp4").exists()
    # one worker holds two scenes at a time: the third was queued, so bad.mp4 waited for a scene
    assert events == ["open three.mp4", "scene done", "open bad.mp4", "scene done", "scene done"], events


def test_grade_engine_over_a_folder_from_the_command_line(local_ray, tmp_path):
    from typer.testing import CliRunner

    from cinefx.cli import app

    src = tmp_path / "in"
    src.mkdir()
    for name, move in (("a", Move("astronaut", 10)), ("b", Move("coffee", 12))):
        write_clip(src / f"{name}.mp4", cut(move, size=(96, 64)), fps=24, audio="aac")
    res = CliRunner().invoke(app, ["stylize", str(src), "-o", str(tmp_path / "o"), "--cluster", "ray",
                                   "--engine", "grade", "--preset", "epic", "--no-metrics", "-q"])
    assert res.exit_code == 0 and "2 done" in res.output, res.output
    preset, opts = load_preset("epic"), StylizeOptions(engine="grade", metrics=False)
    for name in ("a", "b"):
        stylize_file(src / f"{name}.mp4", tmp_path / f"{name}.mp4", preset, opts)
        assert sha(tmp_path / "o" / f"{name}.mp4") == sha(tmp_path / f"{name}.mp4")
    res = CliRunner().invoke(app, ["stylize", str(src), "-o", str(tmp_path / "p"), "--workers", "2"])
    assert res.exit_code == 2 and "--cluster" in res.output


def test_preflight_names_the_node_and_the_reason(local_ray, tiny_bundle, three_scenes, tmp_path, monkeypatch):
    preset, opts = diffusion(tiny_bundle)
    (tmp_path / "o").mkdir()
    real = cluster.versions()
    monkeypatch.setattr(cluster, "versions", lambda: {**real, "cinefx": "9.9"})  # the driver only: nodes differ
    with pytest.raises(ClusterError, match=r"preflight: node .*cinefx .* \(this machine: 9\.9\).*skip-bad"):
        cluster.stylize_on_ray([three_scenes], tmp_path / "o", preset, opts)
    with pytest.raises(ClusterError, match="no node can run this"):
        cluster.stylize_on_ray([three_scenes], tmp_path / "o", preset, opts, preflight_mode="skip-bad")
    assert not list((tmp_path / "o").iterdir())


def test_a_worker_dead_for_good_hands_on_every_scene_it_held(local_ray, tiny_bundle, tmp_path, monkeypatch):
    """A worker that dies past its restarts fails each task it held, the one it was rendering and the
    one queued behind it: both go to the other worker, and the batch's frames are all counted."""
    monkeypatch.setattr(cluster, "MAX_RETRIES", 0)  # the first death is for good
    src = write_clip(tmp_path / "five.mp4", cut(Move("astronaut", 7), Move("coffee", 6), Move("rocket", 5),
                                                 Move("chelsea", 5), Move("camera", 4), size=(96, 64)), fps=24)
    preset, opts = diffusion(tiny_bundle)
    (tmp_path / "o").mkdir()
    seen, counts = [], []

    def kill_the_first(done):  # the driver then queues one more on it, which fails too
        seen.append(done)
        if len(seen) == 1:
            os.kill(done.pid, signal.SIGKILL)

    items = cluster.stylize_on_ray([src], tmp_path / "o", preset, opts, workers=2, on_scene=kill_the_first,
                                   progress=lambda done, total, msg: counts.append((done, total)))
    assert [i.status for i in items] == ["done"], items
    assert sorted(d.scene for d in seen) == [0, 1, 2, 3, 4] and counts[-1] == (27, 27)


def test_a_lost_result_or_a_worker_out_of_reach_renders_the_scene_again(local_ray, tiny_bundle, three_scenes,
                                                                         three_local, tmp_path, monkeypatch):
    """A result lost with its node (ObjectLostError), or a worker out of reach while it restarts
    (ActorUnavailableError, which is a RayActorError: the only worker was dropped as dead and the
    batch ended), sends the scene back to the queue, up to MAX_RETRIES times; then its input fails
    alone, in one line, while the batch's other input renders on (the lost result ended the batch)."""
    monkeypatch.setattr(cluster, "MAX_RETRIES", 1)
    one = write_clip(tmp_path / "one.mp4", cut(Move("coffee", 4), size=(96, 64)), fps=24)
    lost = ray.exceptions.ObjectLostError("00" * 28, None, "")
    faults = {0: lost, 1: ray.exceptions.ActorUnavailableError("restarting", None)}  # three.mp4's, once per scene
    get, got = ray.get, []

    def flaky(ref, *args, **kwargs):  # the driver's: the worker rendered and kept the scene all the same
        out = get(ref, *args, **kwargs)
        if isinstance(out, tuple) and isinstance(out[0], cluster.SceneDone):
            got.append((out[0].input.name, out[0].scene))
            if out[0].input == one:
                raise lost
            if out[0].scene in faults:
                raise faults.pop(out[0].scene)
        return out

    monkeypatch.setattr(ray, "get", flaky)
    (tmp_path / "o").mkdir()
    items = cluster.stylize_on_ray([one, three_scenes], tmp_path / "o", *diffusion(tiny_bundle), workers=1)
    assert [i.status for i in items] == ["failed", "done"], items
    assert items[0].error.startswith(f"{one}: scene 1: ") and "2 tries (ObjectLostError)" in items[0].error
    assert "\n" not in items[0].error
    assert got.count(("one.mp4", 0)) == 2
    assert sorted(s for name, s in got if name == "three.mp4") == [0, 0, 1, 1, 2]
    assert sha(tmp_path / "o" / "three.mp4") == sha(three_local.output)


def test_an_input_whose_task_fails_fails_alone_while_other_scenes_were_queued_between_its_own(
        local_ray, tiny_bundle, three_scenes, tmp_path, monkeypatch):
    """x's file goes once the driver has found its scenes: its longest scene fails on the worker,
    while z's scenes are queued between x's (10, 9, 8, 7, 6 frames). x fails alone, in one line
    naming it and the scene, leaving nothing in the folder; z is the one-machine file."""
    import shutil

    preset, opts = diffusion(tiny_bundle)
    x = tmp_path / "x.mp4"
    shutil.copy(three_scenes, x)
    z = write_clip(tmp_path / "z.mp4", cut(Move("chelsea", 9), Move("camera", 7), size=(96, 64)), fps=24)
    real = cluster._open_output

    def then_gone(src, *args):
        out = real(src, *args)
        if src == x:
            x.unlink()
        return out

    monkeypatch.setattr(cluster, "_open_output", then_gone)
    (tmp_path / "o").mkdir()
    items = cluster.stylize_on_ray([x, z], tmp_path / "o", preset, opts, workers=1)
    assert [i.status for i in items] == ["failed", "done"], items
    assert "x.mp4: scene 2 " in items[0].error and "\n" not in items[0].error
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["z.mp4"]  # no lock, no work folder of x
    assert sha(tmp_path / "o" / "z.mp4") == sha(stylize_file(z, tmp_path / "z-local.mp4", preset, opts).output)


def test_ctrl_c_while_the_driver_finds_scenes_leaves_no_lock(local_ray, tiny_bundle, three_scenes, tmp_path,
                                                              monkeypatch):
    preset, opts = diffusion(tiny_bundle)
    real, calls = cluster._scenes, []

    def ctrl_c_on_the_second(src, options):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, options)

    monkeypatch.setattr(cluster, "_scenes", ctrl_c_on_the_second)
    (tmp_path / "o").mkdir()
    with pytest.raises(KeyboardInterrupt):
        cluster.stylize_on_ray([three_scenes, three_scenes], [tmp_path / "o" / "a.mp4", tmp_path / "o" / "b.mp4"],
                               preset, opts)
    assert not list((tmp_path / "o").iterdir())  # a.mp4's lock and work folder are gone


def test_skip_existing_skips_an_output_another_run_is_writing(local_ray, tiny_bundle, three_scenes, tmp_path):
    """As `stylize_batch` does (batches started twice over one folder share the work), with either engine."""
    from cinefx.resume import OutputLock
    from cinefx.stylize import stylize_batch

    (tmp_path / "o").mkdir()
    with OutputLock(tmp_path / "o" / "three.mp4"):
        for preset, opts in (diffusion(tiny_bundle), (load_preset("epic"), StylizeOptions(engine="grade"))):
            one = stylize_batch([three_scenes], tmp_path / "o", preset, opts, skip_existing=True)
            assert [(i.status, i.error) for i in one] == [("skipped", "being written by another run")]
            items = cluster.stylize_on_ray([three_scenes], tmp_path / "o", preset, opts, skip_existing=True)
            assert [(i.status, i.error) for i in items] == [(i.status, i.error) for i in one], items


def test_an_output_its_codec_cannot_be_written_into_fails_before_any_scene_renders(local_ray, tiny_bundle,
                                                                                    three_scenes, tmp_path):
    from cinefx.video.writer import EncodeOptions

    preset, opts = diffusion(tiny_bundle)
    (tmp_path / "o").mkdir()
    seen = []
    prores = replace(opts, encode=EncodeOptions(codec="prores"))
    items = cluster.stylize_on_ray([three_scenes], tmp_path / "o", preset, prores, on_scene=seen.append)
    assert [i.status for i in items] == ["failed"] and "ProRes" in items[0].error
    assert seen == [] and not list((tmp_path / "o").iterdir())


def test_outputs_of_one_name_keep_their_scenes_apart_in_a_shared_work_dir(tiny_bundle, three_scenes, tmp_path):
    """Two drivers (or one batch given two paths) writing a/clip.mp4 and b/clip.mp4 with one --work-dir:
    the second must not take over, and so clear, the first's work folder."""
    import json

    from cinefx.stylize import resolve_options

    preset, opts = diffusion(tiny_bundle)
    opts, choice = resolve_options(preset, opts)
    other = write_clip(tmp_path / "other.mp4", cut(Move("chelsea", 6), size=(96, 64)), fps=24)
    for d in ("w", "a", "b"):
        (tmp_path / d).mkdir()
    a = cluster._open_output(three_scenes, tmp_path / "a" / "clip.mp4", preset, opts, choice, tmp_path / "w", 48)
    try:
        b = cluster._open_output(other, tmp_path / "b" / "clip.mp4", preset, opts, choice, tmp_path / "w", 48)
        b.lock.release()
        assert json.loads((a.work.path / "run.json").read_text())["key"] == a.work.key
        assert a.work.path != b.work.path
    finally:
        a.lock.release()


def test_the_assembly_reads_the_scenes_back_on_a_disk_just_large_enough(local_ray, tiny_bundle, three_scenes, tmp_path,
                                                                        monkeypatch):
    """Disks (fake sizes, real files) with room for the work folder when the run begins, and no more:
    beside the output, the scenes kept there are the folder's own, not space it lacks (resume went
    off at the assembly, and the driver rendered every scene again); with --work-dir on a larger
    disk, the output's disk never holds them (they were moved there, with the same result)."""
    import collections
    import shutil
    from pathlib import Path

    from cinefx import engines
    from cinefx.resume import space_needed

    def no_models(*args, **kwargs):
        raise AssertionError("the driver loaded the models")

    monkeypatch.setattr(engines, "build_diffusion_engine", no_models)
    room = space_needed(24, 96, 64) * 5 // 4  # what the check asks of the work folder's disk
    usage = collections.namedtuple("usage", "total used free")
    disks = {tmp_path / "o": room + 4096, tmp_path / "p": room - 1, tmp_path / "w": 1 << 40}  # 4096: the lock's

    def disk_usage(path):
        root = next(d for d in disks if Path(path).resolve().is_relative_to(d))
        used = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        return usage(disks[root], used, disks[root] - used)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    preset, opts = diffusion(tiny_bundle)
    for d in disks:
        d.mkdir()
    for out, work_dir in ((tmp_path / "o", None), (tmp_path / "p", tmp_path / "w")):
        (item,) = cluster.stylize_on_ray([three_scenes], out, preset, opts, work_dir=work_dir)
        assert item.status == "done" and not [n for n in item.result.notes if "resume off" in n], item
        assert [p.name for p in out.iterdir()] == ["three.mp4"]
    assert not list((tmp_path / "w").iterdir())


def test_gpus_another_job_holds_are_waited_for_not_a_failed_preflight(local_ray, tiny_bundle, tmp_path, monkeypatch):
    """Workers start before the preflight and answer it, but one whose GPU is busy (another job's,
    another batch's) cannot start: its node is asked in a task instead, and the run waits for the
    GPU (the preflight failed after 120 s: "check failed: GetTimeoutError")."""
    class Job:
        def ready(self):
            return True

    monkeypatch.setattr(cluster, "PREFLIGHT_WAIT", 1)
    job = ray.remote(num_gpus=2, num_cpus=0)(Job).remote()
    ray.get(job.ready.remote())
    render = cluster._render_scenes

    def job_done(*args, **kwargs):  # the preflight has passed: the other job ends
        ray.kill(job)
        return render(*args, **kwargs)

    monkeypatch.setattr(cluster, "_render_scenes", job_done)
    src = write_clip(tmp_path / "one.mp4", cut(Move("coffee", 4), size=(96, 64)), fps=24)
    (tmp_path / "o").mkdir()
    try:
        items = cluster.stylize_on_ray([src], tmp_path / "o", *diffusion(tiny_bundle), workers=1)
    finally:
        ray.kill(job)
    assert [i.status for i in items] == ["done"], items


def test_workers_started_on_a_node_that_fails_the_preflight_move_to_one_that_passed(local_ray, tiny_bundle, tmp_path,
                                                                                   monkeypatch):
    """--preflight skip-bad where every worker, started before the preflight, went to a node that
    fails it (a node id no live node has stands in for it): they give their GPUs back, and workers
    start on the node that passed (none did: the run ended in KeyError with the output still locked)."""
    start = cluster._start_workers

    def first_on_a_bad_node(ray, workers, *good):
        slots = start(ray, workers, *good)
        return slots if good else [("a node that fails", w) for _, w in slots]

    monkeypatch.setattr(cluster, "_start_workers", first_on_a_bad_node)
    src = write_clip(tmp_path / "one.mp4", cut(Move("coffee", 4), size=(96, 64)), fps=24)
    (tmp_path / "o").mkdir()
    items = cluster.stylize_on_ray([src], tmp_path / "o", *diffusion(tiny_bundle), workers=1, preflight_mode="skip-bad")
    assert [i.status for i in items] == ["done"], items
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["one.mp4"]
