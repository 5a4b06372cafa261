"""Scene tasks on a Ray cluster: `cinefx stylize … --cluster ray`.

Ray is imported here only, and only when a cluster run is asked for (`pip install 'cinefx[ray]'`).
The classes that do the work (`SceneWorker`, `check_node`) are plain Python; they become Ray
actors and tasks where they are scheduled (`ray.remote(...).options(...)`).

Diffusion: one long-lived worker per GPU (or, without GPUs, per core) keeps its models loaded. The
scenes of every input go into one queue, longest first, each input's found (a decode of it all)
once the workers have taken every scene found before, so that they render meanwhile; a take longer than a piece
(`DiffusionConfig.part`) goes in as its pieces, the first one first, the others as soon as it is
done (they start from the state it leaves in the work folder, see `cinefx.diffusion.engine`), so a
single long take still spreads over the workers. A worker decodes its scene or piece from the input
itself (frames never travel through Ray's object store) and writes it into the output's work folder
(`cinefx.resume.WorkFolder`), on storage every node sees. The driver alone
keeps the folder's manifest, and assembles an output as soon as all its scenes are in, through
`stylize_file`, which then reads every scene back instead of rendering it: the audio, timing,
colour tags, report and the atomic write are the one-machine run's. Because a scene's pixels depend
only on its `SceneTask` (noise seeded by scene), the file is the one a local run writes.

Grade: whole files are the tasks (the encoder dominates).

A worker that dies mid-scene is restarted and its scene retried (`MAX_RETRIES`), as is a scene
whose result was lost with its node or whose worker was out of reach for a while; finished scenes
are never redone, also after the driver itself was stopped (the work folder resumes); Ctrl-C ends
the cluster's work and leaves no output half written.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import shutil
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cinefx import __version__
from cinefx.errors import CinefxError, ClusterError, MissingFileError, OptionError, OutputError, unforeseen
from cinefx.fsutil import host_name, remove_quietly, temp_path_for
from cinefx.resume import OutputLock, WorkFolder
from cinefx.scenes import Scene, SceneStream
from cinefx.stylize import (BatchItem, PieceMeasures, Progress, SceneTask, StylizeOptions, decode, not_done,
                            plan_outputs, resolve_options, run_scene_task, stylize_file, work_folder)

PREFLIGHT = ("strict", "skip-bad")
MAX_RETRIES = 3  # restarts of a dead worker, and retries of the scene it was rendering (or whose result was lost)
IN_FLIGHT = 2  # scenes queued per worker, so none idles while the driver assembles an output
PREFLIGHT_WAIT = 20  # seconds a node's worker has to answer the preflight before a task asks instead


@dataclass(frozen=True)
class SceneDone:
    """A scene (or piece of one) a worker finished (what progress and tests see)."""

    input: Path
    scene: int  # 0-based
    part: int  # the piece of a long take, 0 for the first (or the whole scene)
    frames: int
    seconds: float
    node: str
    pid: int


def connect(cluster: str):
    """The `ray` module, connected: "ray" joins the instance running on this machine (`ray start
    --head`, or RAY_ADDRESS) or starts one with its GPUs; "ray://HOST:10001" or a GCS address joins
    that cluster. Returns (ray, started): whether this call started the connection."""
    try:
        import ray
    except ImportError:
        raise ClusterError("--cluster: Ray is not installed; pip install 'cinefx[ray]'") from None
    if ray.is_initialized():
        return ray, False
    try:
        ray.init(address=None if cluster == "ray" else cluster, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as ex:
        raise ClusterError(f"--cluster {cluster[:100]!r}: cannot connect to Ray ({str(ex)[:100]}); "
                                     "check the address, or start it with `ray start --head`") from ex
    return ray, True


def versions() -> dict[str, str]:
    """The versions every node must share with the driver."""
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {"cinefx": __version__, "torch": version("torch")}


def check_node(inputs: Sequence[str], folders: Sequence[str], options: StylizeOptions, controls: tuple[str, ...],
               engine: str) -> dict:
    """Run on a node: what it cannot do of this run (inputs it cannot read, folders it cannot write,
    weights it cannot find), its host name and its versions."""
    problems = [f"cannot read input {p[:100]}" for p in inputs if not os.access(p, os.R_OK)]
    for folder in folders:
        try:
            remove_quietly(temp_path_for(Path(folder) / "preflight"))
        except OSError as ex:
            problems.append(f"cannot write {folder[:100]} ({ex.strerror or str(ex)[:200]})")
    if engine == "diffusion":
        from cinefx.diffusion.models import check_resolved, resolve_models

        try:
            check_resolved(resolve_models(options.models, controls))
        except CinefxError as ex:
            problems.append(str(ex))
    return {"host": host_name(), "versions": versions(), "problems": problems}


def preflight(ray, inputs: Sequence[Path], folders: Sequence[Path], options: StylizeOptions, controls, engine: str,
              mode: str, workers: dict | None = None) -> tuple[list[str], list[str]]:
    """Check every alive node (`check_node`, and the driver's versions): in a worker already there
    (`workers`: node id → `SceneWorker` actor) if it answers within `PREFLIGHT_WAIT` seconds (it
    cannot while its GPU is another job's), or else in a task. Returns (good node ids, one line
    per bad node). `mode` "strict" raises on the first bad node; "skip-bad" leaves it out, and
    raises only when none is left."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    check = ray.remote(check_node)
    want = versions()
    args = ([str(p) for p in inputs], [str(f) for f in folders], options, controls, engine)

    def task(node: str):
        where = NodeAffinitySchedulingStrategy(node, soft=False)
        return check.options(num_cpus=0, scheduling_strategy=where).remote(*args)

    workers = workers or {}
    refs = [workers[n["NodeID"]].check.remote(*args) if n["NodeID"] in workers else task(n["NodeID"]) for n in nodes]
    if workers:
        _, late = ray.wait(refs, num_returns=len(refs), timeout=PREFLIGHT_WAIT)
        refs = [task(n["NodeID"]) if ref in late and n["NodeID"] in workers else ref for n, ref in zip(nodes, refs)]
    good, bad = [], []
    for node, ref in zip(nodes, refs):
        try:
            found = ray.get(ref, timeout=120)
        except Exception as ex:  # a node that cannot even run the check
            found = {"host": node.get("NodeManagerAddress", "?"), "versions": want,
                     "problems": [f"check failed: {type(ex).__name__}"]}
        problems = found["problems"] + [f"{k} {found['versions'][k]} (this machine: {v})"
                                        for k, v in want.items() if found["versions"][k] != v]
        if not problems:
            good.append(node["NodeID"])
            continue
        bad.append(f"node {found['host']} ({node.get('NodeManagerAddress', '?')}): {'; '.join(problems)}")
        if mode == "strict":
            raise ClusterError(f"--cluster preflight: {bad[-1]}; fix it, or pass --preflight skip-bad "
                                         "to run without it")
    if not good:
        raise ClusterError(f"--cluster preflight: no node can run this ({bad[0] if bad else 'no nodes'})")
    return good, bad


class SceneWorker:
    """Renders scene tasks one after another, keeping its renderer (and the loaded models, through
    `cinefx.engines.MODELS`) across tasks. One thread for torch, so every worker computes alike."""

    def __init__(self, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self._renderer, self._for = None, None

    def pid(self) -> int:
        return os.getpid()

    def check(self, *args) -> dict:
        """`check_node` in this worker's process (the preflight, at no extra process start)."""
        return check_node(*args)

    def warm(self, preset, options: StylizeOptions) -> None:
        """Load the models now (into `cinefx.engines.MODELS`, where the first task's renderer finds
        them), while the driver is still finding the scenes: a worker whose first task comes late
        (a long take's later piece) does not start loading only then."""
        from cinefx.engines import build_diffusion_engine

        build_diffusion_engine(preset, options.models, options.diffusion)

    def render(self, task: SceneTask, folder: str, key: str) -> tuple[SceneDone, dict]:
        """Render `task` into the work folder `folder` (keyed `key`), a later piece from the state its
        scene's first piece left there. Returns what was done and the file's record for the
        manifest (`adopt`); the file is complete when this returns."""
        from cinefx.stylize import renderer_for
        from cinefx.video.probe import probe

        t0 = time.perf_counter()
        size = probe(task.input).display_size
        # one renderer per input: its per-scene state resets when the scene number changes, which
        # scene 0 of the next input would not do
        if self._for != (task.input, size):
            if self._renderer is not None:
                self._renderer.close()
            self._renderer, self._for = None, None
            self._renderer = renderer_for(task.preset, task.options, _Choice(task.engine), size)
            self._for = (task.input, size)
        files = WorkFolder.at(Path(folder), key, manifest=False)
        scene, part, frames = task.scene.index, task.part, 0
        # the report's measures of this piece, so that the driver does not measure every frame again
        measures = PieceMeasures(task.options, task.engine) if task.options.metrics else None
        try:
            for out in run_scene_task(task, self._renderer, files.extra(scene, "state") if part else None, measures):
                files.record(scene, out, part)
                frames += len(out)
            if part == 0 and task.scene.frames > frames:  # the later pieces start from this
                files.keep("state", self._renderer.scene_state())
            if measures is not None:
                files.keep("measures", measures.to_bytes())
            files.finish()
        finally:
            files.abandon()
        return SceneDone(task.input, scene, part, frames, time.perf_counter() - t0, host_name(),
                         os.getpid()), files.kept(scene, part)


@dataclass(frozen=True)
class _Choice:
    name: str


@dataclass
class _Output:
    """One input being rendered scene by scene."""

    src: Path
    dst: Path
    lock: OutputLock
    work: WorkFolder
    scenes: list[Scene]
    pts: list[int]  # of every frame
    pieces: dict[int, int]  # scene → how many pieces it renders as
    left: set[tuple[int, int]]  # (scene, piece) not yet in the work folder
    failed: str = ""


def _pieces(scene: Scene, piece: int) -> list[int]:
    """Frames of each piece `scene` renders as, pieces being `piece` frames (0: the whole scene)."""
    if not piece:
        return [scene.frames]
    return [min(piece, scene.frames - k) for k in range(0, scene.frames, piece)]


def _scenes(src: Path, options: StylizeOptions) -> tuple[list[Scene], object, list[int]]:
    """The input's scenes, found as `stylize_file` finds them (the same frames, the same detector),
    and every frame's pts (where workers seek to)."""
    from cinefx.video.probe import probe

    info = probe(src)
    pts: list[int] = []

    def noted(frames):
        for f in frames:
            pts.append(f.pts)
            yield f

    stream = SceneStream(noted(decode(info, options)), 48, options.detector)
    for _ in stream:
        pass
    if not stream.count:
        from cinefx.errors import InputFileError

        raise InputFileError(f"{src}: contains no decodable video frames")
    return stream.scenes, info, pts


def _open_output(src: Path, dst: Path, preset, options: StylizeOptions, choice, work_dir: Path | None,
                 piece: int) -> _Output:
    """Lock `dst`, find the scenes and open the work folder (finished scenes and pieces of an
    earlier run count); scenes longer than `piece` frames render as pieces."""
    from cinefx.grade import ocio
    from cinefx.video.writer import check_output_path

    check_output_path(dst, options.overwrite, options.encode.codec)
    lock = OutputLock(dst).acquire()
    try:
        if dst.exists() and dst.resolve() == src.resolve():
            raise OutputError(f"{dst}: output would overwrite the input")
        scenes, info, pts = _scenes(src, options)
        colour = (ocio.choose_input(options.input_colorspace, info.colour).space,
                  ocio.resolve(options.output_colorspace, "--output-colorspace"))
        # in a shared --work-dir, outputs of one name in other folders (another batch's) keep apart
        at = WorkFolder.beside(work_dir / f"{dst.name}.{hashlib.sha256(str(dst.resolve()).encode()).hexdigest()[:8]}"
                               if work_dir else dst)
        if not options.resume:
            shutil.rmtree(at, ignore_errors=True)
        work = work_folder(src, dst, info, preset, dataclasses.replace(options, resume=True), choice, [], colour, at)
        if work is None:
            raise OutputError(f"{at.parent}: too little free space to keep the rendered scenes a cluster run "
                              "needs; free some, or pass --work-dir on a larger disk every node sees")
    except BaseException:
        lock.release()
        raise
    pieces = {s.index: len(_pieces(s, piece)) for s in scenes}
    return _Output(src, dst, lock, work, scenes, pts, pieces,
                   {(s.index, k) for s in scenes for k in range(pieces[s.index]) if not work.has(s.index, k)})


def _assemble(out: _Output, preset, options: StylizeOptions, progress: Progress | None):
    """The output from its finished scenes: `stylize_file` reads each one back where it is kept
    (none is rendered)."""
    out.lock.release()  # stylize_file takes it again
    return stylize_file(out.src, out.dst, preset, dataclasses.replace(options, resume=True), progress,
                        out.work.path)


def pinned(preset, options: StylizeOptions) -> StylizeOptions:
    """Options every worker renders alike with: the batch fixed at the preset's chunk where it was
    left to each GPU's free memory, and one torch thread (which matters on the CPU)."""
    return dataclasses.replace(options, diffusion=dataclasses.replace(
        options.diffusion, batch=options.diffusion.batch or preset.diffusion.chunk, threads=1))


def _failure(ex: BaseException, out: _Output | None = None, scene: int | None = None, part: int = 0) -> str:
    """One line naming the input, the scene (and piece) and the node where a task failed."""
    cause = getattr(ex, "cause", None) or ex
    where = f" (node {getattr(ex, 'ip', '?')}, pid {getattr(ex, 'pid', '?')})" if cause is not ex else ""
    what = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else type(cause).__name__
    if not isinstance(cause, CinefxError):
        what = f"unexpected {type(cause).__name__}: {what}"
    return f"{_named(out, scene, part)}{where}: {what}" if out is not None and scene is not None else f"{what}{where}"


def _named(out: _Output, scene: int, part: int) -> str:
    """The input and the scene (and piece) a failure names."""
    return f"{out.src}: scene {scene + 1}{f' piece {part + 1}' if part else ''}"


def stylize_on_ray(inputs: Sequence[Path], outputs: Path | Sequence[Path], preset, options: StylizeOptions = StylizeOptions(),
                   cluster: str = "ray", workers: int | None = None, work_dir: Path | None = None,
                   preflight_mode: str = "strict", skip_existing: bool = False,
                   on_item: Callable[[BatchItem], None] | None = None, progress: Progress | None = None,
                   on_scene: Callable[[SceneDone], None] | None = None) -> list[BatchItem]:
    """Stylize `inputs` into `outputs` (a folder, or one path per input) on a Ray cluster; the
    files are those `stylize_batch` writes. Returns one `BatchItem` per input, in order; a bad input
    fails alone. `workers` caps the workers (default: one per GPU; without GPUs, one per core, each
    with one torch thread). `work_dir` keeps finished scenes (default: beside each output); every
    node must see it and the inputs. `progress(done, total, message)` counts frames over the whole
    batch, the message giving each worker's frames per second."""
    if preflight_mode not in PREFLIGHT:
        raise OptionError(f"--preflight {preflight_mode[:40]!r}: must be one of {', '.join(PREFLIGHT)}")
    if workers is not None and workers < 1:
        raise OptionError(f"--workers {workers}: must be 1 or more")
    if work_dir is not None and not Path(work_dir).is_dir():
        raise MissingFileError(f"--work-dir {str(work_dir)[:100]}: folder does not exist")
    inputs, clashes = [Path(p) for p in inputs], {}
    if isinstance(outputs, (str, os.PathLike)):
        if not Path(outputs).is_dir():
            raise MissingFileError(f"{outputs}: output folder does not exist")
        planned = plan_outputs(inputs, Path(outputs), preset.name)
        # inputs that would share an output fail alone, in the summary; the rest go to the cluster
        clashes = {i: BatchItem(inputs[i], dst, "failed", why) for i, (dst, why) in enumerate(planned) if why}
        for item in clashes.values():
            (on_item or (lambda item: None))(item)
        inputs = [src for i, src in enumerate(inputs) if i not in clashes]
        outputs = [dst for i, (dst, _) in enumerate(planned) if i not in clashes]
    outputs = [Path(p) for p in outputs]
    if not inputs:
        return list(clashes.values())
    ray, started = connect(cluster)
    try:
        # --engine auto counts the cluster's GPUs, not this machine's; the workers and the assembly
        # then run the engine chosen here
        gpus = int(ray.cluster_resources().get("GPU", 0))
        options, choice = resolve_options(preset, options, f"{gpus} GPU(s) in the cluster" if gpus else "")
        options = dataclasses.replace(options, engine=choice.name)
        options = pinned(preset, options) if choice.name == "diffusion" else options
        folders = sorted({work_dir} if work_dir else {d.parent for d in outputs})
        # diffusion workers start first (a process and torch each), so that the preflight runs in
        # them rather than in processes of its own
        slots = _start_workers(ray, workers) if choice.name == "diffusion" else []
        try:
            nodes, bad = preflight(ray, inputs, folders, options, tuple(k for k, _ in preset.diffusion.controls),
                                   choice.name, preflight_mode, {n: w for n, w in reversed(slots)})
            if any(node not in nodes for node, _ in slots):  # skip-bad: those nodes' GPUs go back, and
                for node, w in slots:                      # the nodes that passed take the slots left
                    if node not in nodes:
                        ray.kill(w, no_restart=True)
                slots = [(node, w) for node, w in slots if node in nodes]
                slots += _start_workers(ray, workers, nodes, [node for node, _ in slots])
                if not slots:
                    raise ClusterError(f"--cluster preflight: no node that passed it has a {'GPU' if gpus else 'CPU'} "
                                       f"for a worker{'; ' + bad[0] if bad else ''}")
            pool = [w for _, w in slots]
            for w in pool:
                w.warm.remote(preset, options)  # not waited for: a failure shows again in the first task
            run = _grade_files if choice.name == "grade" else functools.partial(_render_scenes, pool=pool)
            items = iter(run(ray, nodes, inputs, outputs, preset, options, choice, workers,
                             work_dir and Path(work_dir), skip_existing, on_item or (lambda item: None), progress,
                             on_scene))
        finally:
            for _, w in slots:
                ray.kill(w, no_restart=True)
        return [clashes[i] if i in clashes else next(items) for i in range(len(inputs) + len(clashes))]
    finally:
        if started:
            ray.shutdown()


def _start_workers(ray, workers: int | None, good: Sequence[str] | None = None,
                   have: Sequence[str] = ()) -> list[tuple[str, object]]:
    """(node id, `SceneWorker` actor) for the worker slots of the alive nodes (`_placements`), at
    most `workers` in all; with `good`, on those nodes only, besides the workers already on the
    nodes `have` (a node id per worker)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(SceneWorker)
    slots = _placements(ray, [n["NodeID"] for n in ray.nodes() if n.get("Alive")])
    for node in have:
        slots.remove(next(s for s in slots if s[0] == node))
    slots = [s for s in slots if good is None or s[0] in good][:workers - len(have) if workers else None]
    # interrupted half way, this needs no cleanup: Ray ends an actor once its last handle is gone, and
    # the partial list's go with the exception (a traceback kept in a notebook does not hold them)
    return [(node, actor.options(**res, max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES,
                                 scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(1))
            for node, res in slots]


def _placements(ray, nodes: list[str]) -> list[tuple[str, dict]]:
    """(node id, resources) per worker: one per GPU of each good node; on a cluster without GPUs,
    one per CPU."""
    info = {n["NodeID"]: n.get("Resources", {}) for n in ray.nodes()}
    gpus = any(info[n].get("GPU", 0) >= 1 for n in nodes)
    res = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": 1}
    counts = {n: int(info[n].get("GPU" if gpus else "CPU", 0)) for n in nodes}
    # spread over nodes first: node A's worker 1, node B's worker 1, …
    return [(n, res) for k in range(max(counts.values(), default=0)) for n in nodes if k < counts[n]]


def _render_scenes(ray, nodes, inputs, outputs, preset, options, choice, workers, work_dir, skip_existing, on_item,
                   progress, on_scene, pool: list) -> list[BatchItem]:
    """Every input's scenes (and pieces) on the workers of `pool`, which the caller kills after."""
    from cinefx.renderers import lengths

    items: dict[int, BatchItem] = {}
    opened: dict[int, _Output] = {}
    piece = lengths(choice.name, preset, options.diffusion)[1]  # the workers' renderers' (the batch is pinned)

    def done(i: int, item: BatchItem) -> None:
        items[i] = item
        on_item(item)

    def frames(scene: Scene, part: int) -> int:
        return _pieces(scene, piece)[part]

    pool = list(pool)
    queue: deque = deque()  # (input, scene, piece) to render
    flight: dict = {}  # ref → (worker, input, scene, piece)
    rates: dict[str, list[float]] = {}  # "host:pid" → [frames, seconds]
    tries: Counter = Counter()  # (input, scene, piece) → results lost

    def feed() -> None:
        """Queue work on the least busy workers first, up to `IN_FLIGHT` each."""
        while queue and pool:
            load, worker = min(((sum(w is p for w, *_ in flight.values()), k), p) for k, p in enumerate(pool))
            if load[0] >= IN_FLIGHT:
                return
            i, scene, part = queue.popleft()
            o = opened.get(i)
            if o is None or o.failed:  # its input failed (and may be finished already)
                continue
            first = scene.start + part * piece - (1 if part else 0)  # a later piece decodes its lead-in too
            task = SceneTask(o.src, scene, preset, options, choice.name, part, o.pts[first])
            flight[worker.render.remote(task, str(o.work.path), o.work.key)] = (worker, i, scene, part)

    def finish(i: int) -> None:
        o = opened.pop(i)
        if o.failed:
            o.work.abandon()  # the folder goes if no scene of it is finished
            o.lock.release()
            done(i, BatchItem(o.src, o.dst, "failed", o.failed))
            return
        try:
            done(i, BatchItem(o.src, o.dst, "done", result=_assemble(o, preset, options, None)))
        except CinefxError as ex:
            done(i, BatchItem(o.src, o.dst, "failed", str(ex)))
        except Exception as ex:
            done(i, BatchItem(o.src, o.dst, "failed", unforeseen(ex, o.src), traceback=traceback.format_exc()))

    todo = deque(enumerate(zip(inputs, outputs)))
    total = finished = 0

    def open_next() -> None:
        """Find the next input's scenes and queue them (a take's later pieces wait for its first:
        they start from the state it leaves), longest first."""
        nonlocal total, finished
        i, (src, dst) = todo.popleft()
        if skip_existing and dst.exists():
            done(i, BatchItem(src, dst, "skipped", "output exists"))
            return
        try:
            o = opened[i] = _open_output(src, dst, preset, options, choice, work_dir, piece)
        except OptionError:
            raise
        except CinefxError as ex:
            done(i, not_done(src, dst, ex, str(ex), skip_existing))
            return
        except Exception as ex:
            done(i, BatchItem(src, dst, "failed", unforeseen(ex, src), traceback=traceback.format_exc()))
            return
        queue.extend(sorted(((i, s, k) for s in o.scenes for k in range(o.pieces[s.index])
                             if (s.index, k) in o.left and (k == 0 or (s.index, 0) not in o.left)),
                            key=lambda t: -frames(t[1], t[2])))
        total += sum(s.frames for s in o.scenes)
        finished += sum(frames(s, k) for s in o.scenes for k in range(o.pieces[s.index]) if (s.index, k) not in o.left)
        feed()  # before assembling what an earlier run finished, so that no worker waits for it
        if not o.left:  # every scene kept by an earlier run
            finish(i)

    try:
        while todo or flight:
            # the next input's scenes are found (a decode of it all) only once every scene found so
            # far is under way: the workers render meanwhile
            while todo and not queue:
                open_next()
            if not flight:
                continue
            ready, _ = ray.wait(list(flight), num_returns=1)
            worker, i, scene, part = flight.pop(ready[0])
            o = opened[i]
            try:
                scene_done, record = ray.get(ready[0])
            except (ray.exceptions.ObjectLostError, ray.exceptions.ActorUnavailableError) as ex:
                # the result went with its node, or the worker is restarting (a RayActorError, yet it
                # stays in the pool): the scene goes again, up to MAX_RETRIES times
                tries[i, scene.index, part] += 1
                if tries[i, scene.index, part] <= MAX_RETRIES:
                    queue.appendleft((i, scene, part))
                else:
                    o.failed = o.failed or (f"{_named(o, scene.index, part)}: its result did not come back in "
                                            f"{tries[i, scene.index, part]} tries ({type(ex).__name__}); check the "
                                            "cluster's nodes, then run again (finished scenes are kept)")
                    o.left.clear()
            except ray.exceptions.RayActorError:  # died past its restarts: another worker takes the scene
                if worker in pool:  # every task it held fails so
                    pool.remove(worker)
                if not pool:
                    raise ClusterError(f"--cluster: every worker died; the last while rendering "
                                       f"{o.src} scene {scene.index + 1}") from None
                queue.appendleft((i, scene, part))
            except ray.exceptions.RayTaskError as ex:
                o.failed = o.failed or _failure(ex, o, scene.index, part)
                o.left.clear()  # nothing more of this input is rendered; what is in flight drains
            else:
                o.work.adopt(scene.index, record, part)
                o.left.discard((scene.index, part))
                if part == 0:  # the take's later pieces can start now, ahead of whole scenes
                    queue.extendleft((i, scene, k) for k in reversed(range(1, o.pieces[scene.index]))
                                     if (scene.index, k) in o.left)
                finished += scene_done.frames
                r = rates.setdefault(f"{scene_done.node}:{scene_done.pid}", [0, 0.0])
                r[0], r[1] = r[0] + scene_done.frames, r[1] + scene_done.seconds
                if on_scene:
                    on_scene(scene_done)
                if progress:
                    progress(finished, total, ", ".join(f"{k} {f / max(s, 1e-9):.1f} fps" for k, (f, s) in rates.items()))
            feed()  # a first piece may have made work for idle workers too
            if not o.left and not any(j == i for _, j, _, _ in flight.values()):
                finish(i)
    except BaseException:
        for o in opened.values():  # finished scenes stay in the work folder for the next run
            o.work.abandon()
            o.lock.release()
        raise
    return [items[i] for i in range(len(inputs))]


def _grade_files(ray, nodes, inputs, outputs, preset, options, choice, workers, work_dir, skip_existing, on_item,
                 progress, on_scene) -> list[BatchItem]:
    """Whole files as tasks, spread over the good nodes."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(stylize_file)
    items: dict[int, BatchItem] = {}
    refs = {}
    for i, (src, dst) in enumerate(zip(inputs, outputs)):
        if skip_existing and dst.exists():
            items[i] = BatchItem(src, dst, "skipped", "output exists")
            on_item(items[i])
            continue
        node = nodes[len(refs) % len(nodes)]
        refs[task.options(num_cpus=1, max_retries=MAX_RETRIES, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote(src, dst, preset, options)] = i
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            i = refs.pop(ready[0])
            src, dst = inputs[i], outputs[i]
            try:
                items[i] = BatchItem(src, dst, "done", result=ray.get(ready[0]))
            except ray.exceptions.RayTaskError as ex:
                if isinstance(ex.cause, OptionError):
                    raise ex.cause from None
                cinefx = isinstance(ex.cause, CinefxError)  # its message names the file already
                items[i] = not_done(src, dst, ex.cause, _failure(ex) if cinefx else f"{src}: {_failure(ex)}",
                                     skip_existing and cinefx)
            on_item(items[i])
            if progress:
                progress(len(items), len(inputs), f"{src.name} {items[i].status}")
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)  # stylize_file writes atomically: a cancelled file leaves nothing
        raise
    return [items[i] for i in range(len(inputs))]
