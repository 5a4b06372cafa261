"""The orchestrator: probe → decode → scenes → engine → grade → encode → metrics → report.

One streaming pass over the input. Frames wait in a buffer only until the scene detector has
settled them (its lookahead) and a chunk is full, so memory holds at most one chunk plus the
lookahead, however long the video.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import shutil
import time
import traceback
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from cinefx import __version__, interrupt
from cinefx.diffusion.models import ModelSpec, with_user_defaults
from cinefx.engines import EngineSettings, build_diffusion_engine, choose_engine
from cinefx.errors import CinefxError, InputFileError, MissingFileError, OptionError, OutputBusyError, OutputError
from cinefx.grade.grader import Grader
from cinefx.metrics import DEFAULT_METRIC_WIDTH, TemporalMeter
from cinefx.presets import Preset
from cinefx.report import Report, build_report
from cinefx.resume import OutputLock, WorkFolder, file_identity, run_key, space_needed
from cinefx.scenes import DetectorOptions, Scene, SceneDetector, scenes_from_boundaries
from cinefx.video.probe import VideoInfo, probe
from cinefx.video.reader import Frame, read_frames
from cinefx.video.writer import EncodeOptions, VideoWriter, check_output_path

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".m4v", ".webm", ".mts", ".m2ts", ".ts",
                    ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".mxf"}
OUTPUT_EXTENSIONS = {".mp4", ".mov", ".m4v", ".mkv"}

# progress(frames done, frames expected or 0, message or None)
Progress = Callable[[int, int, str | None], None]


@dataclass(frozen=True)
class StylizeOptions:
    engine: str = "auto"
    models: ModelSpec = ModelSpec()
    diffusion: EngineSettings = EngineSettings()  # its seed is replaced by `seed` below
    encode: EncodeOptions = EncodeOptions()
    overwrite: bool = False
    seed: int = 0
    chunk: int = 48  # frames per chunk: bounds memory, and is the diffusion batch upper limit
    metrics: bool = True
    metric_width: int = DEFAULT_METRIC_WIDTH
    audio: bool = True
    resume: bool = True  # diffusion: keep finished scenes beside the output and reuse them on a re-run
    detector: DetectorOptions = DetectorOptions()

    def __post_init__(self):
        if self.seed < 0:
            raise OptionError(f"--seed {self.seed}: must be 0 or more")


@dataclass(frozen=True)
class StylizeResult:
    input: Path
    output: Path
    engine: str
    engine_reason: str
    frames: int
    scenes: tuple[Scene, ...]
    report: Report | None
    notes: tuple[str, ...]
    seconds: float
    concealed_frames: int = 0  # frames that could not be decoded, replaced by the previous one
    warnings: tuple[str, ...] = ()  # what the user should look at in the output


def _prepare_engine(preset: Preset, options: StylizeOptions):
    """(options, choice, engine): the engine chosen for `preset`, built when it is diffusion (None
    for the grade engine). A preset trained on a particular base model names it; --model wins."""
    if preset.diffusion.base_model and not options.models.base:
        options = dataclasses.replace(options, models=dataclasses.replace(options.models, base=preset.diffusion.base_model))
    if options.engine != "grade":  # the grade engine reads no weights, so no config either
        options = dataclasses.replace(options, models=with_user_defaults(options.models))
    choice = choose_engine(options.engine, options.models, tuple(k for k, _ in preset.diffusion.controls))
    engine = None
    if choice.name == "diffusion":
        settings = dataclasses.replace(options.diffusion, seed=options.seed)
        engine = build_diffusion_engine(preset, options.models, settings)
    return options, choice, engine


def _room_for_resume(info: VideoInfo, dst: Path, notes: list[str]) -> bool:
    """Whether the output's disk can hold every finished scene (lossless) beside the output; if
    not, say so and run without resume rather than fill the disk half way through."""
    frames = info.frame_count or round(info.duration * float(info.fps or 0))
    need = space_needed(frames, *info.display_size)
    free = shutil.disk_usage(dst.parent).free
    if need <= 0.8 * free:
        return True
    notes.append(f"resume off: keeping finished scenes would take about {need / 1e9:.1f} GB and "
                 f"{dst.parent} has {free / 1e9:.1f} GB free (a crash would mean starting over)")
    return False


def stylize_file(src: str | os.PathLike, dst: str | os.PathLike, preset: Preset,
                 options: StylizeOptions = StylizeOptions(), progress: Progress | None = None) -> StylizeResult:
    """Render `src` in the look of `preset` to `dst`. The input is only read; `dst` appears only
    when complete (see `VideoWriter`). While it runs, `dst` (and its work folder) is locked:
    another run on it raises `OutputBusyError`."""
    src, dst = Path(src), Path(dst)
    check_output_path(dst, options.overwrite)  # the folder must exist to hold the lock
    with OutputLock(dst) as lock:
        return _stylize_locked(src, dst, preset, options, progress, lock)


def _stylize_locked(src: Path, dst: Path, preset: Preset, options: StylizeOptions, progress: Progress | None,
                    lock: OutputLock) -> StylizeResult:
    t0 = time.perf_counter()
    # 1. check inputs before any work (the output again: another run may have finished it meanwhile)
    check_output_path(dst, options.overwrite)
    if dst.exists() and dst.resolve() == src.resolve():
        raise OutputError(f"{dst}: output would overwrite the input")
    info = probe(src)
    options, choice, engine = _prepare_engine(preset, options)
    notes = [f"engine: {choice.name} ({choice.reason})"]
    if info.field_order != "progressive" and choice.name == "diffusion":
        notes.append("interlaced source: diffusion sees whole frames, whose two fields are different "
                      "moments; deinterlace it first (e.g. ffmpeg -vf bwdif) for clean results")
    if info.colour.assumed:
        notes.append(f"colour {'/'.join(info.colour.assumed)} untagged: assumed "
                     f"{info.colour.matrix_name} {'full' if info.colour.full_range else 'limited'} range")
    # 2. prepare stages
    work = None
    if engine is not None and options.resume and _room_for_resume(info, dst, notes):
        work = WorkFolder(dst, run_key(input=file_identity(src), prompt=preset.prompt,
                                       diffusion=preset.diffusion, models=options.models,
                                       settings=engine.settings, detector=options.detector))
        work.open()
    grader = Grader(preset.grade, info.display_size, seed=options.seed)
    detector = SceneDetector(options.detector)
    meter = TemporalMeter(options.metric_width, background=True) if options.metrics else None
    boundaries: list = []
    pts = array("q")
    pending: deque[Frame] = deque()
    done = concealed = 0

    starts: list[int] = []  # boundary frames; the detector emits them in increasing order

    def found(new: list) -> None:
        boundaries.extend(new)
        starts.extend(b.frame for b in new)

    def scene_of(index: int) -> int:
        return bisect.bisect_right(starts, index)

    def render(chunk: list[Frame], scene: int, writer: VideoWriter) -> None:
        nonlocal done
        if work is not None:
            work.begin(scene)
        if work is not None and work.has(scene):
            out = work.read(scene, len(chunk))
        elif engine is not None:
            out = engine.render(np.stack([f.rgb for f in chunk]), scene)
            if work is not None:
                try:
                    work.record(scene, out)
                except OSError as ex:  # a full disk, mostly: say where, and how to run without it
                    raise OutputError(f"{work.path}: cannot keep finished scenes for resume ({ex}); "
                                      "free some space or use --no-resume") from ex
        else:
            out = [f.rgb for f in chunk]  # the grade engine streams frame by frame: no copies
        if not grader.is_identity:
            out = grader.grade_many(zip(out, (f.index for f in chunk)))
        lock.check()
        for f, o in zip(chunk, out):
            interrupt.check()
            writer.write(o, f.pts, f.duration)
            if meter is not None:
                meter.add(scene, f.rgb, o)
        done += len(chunk)
        if progress:
            progress(done, info.frame_count, None)

    def flush(writer: VideoWriter, settled: int, final: bool) -> None:
        """Hand settled frames on in chunks that never cross a scene boundary."""
        while pending and pending[0].index < settled:
            scene = scene_of(pending[0].index)
            run = []
            for f in pending:
                if f.index >= settled or scene_of(f.index) != scene or len(run) == options.chunk:
                    break
                run.append(f)
            scene_ends = len(run) < len(pending) and scene_of(pending[len(run)].index) != scene
            if len(run) < options.chunk and not scene_ends and not final:
                return  # wait for a full chunk
            for _ in run:
                pending.popleft()
            render(run, scene, writer)

    # 3. one streaming pass
    try:
        with VideoWriter(dst, info, options.encode, overwrite=options.overwrite, audio=options.audio,
                         comment=output_comment(preset)) as writer:
            for frame in read_frames(info, notes=notes):
                interrupt.check()
                concealed += frame.concealed
                pending.append(frame)
                pts.append(frame.pts)
                found(detector.push(frame.rgb))
                flush(writer, detector.settled, final=False)
            found(detector.finish())
            flush(writer, len(pts), final=True)
            if not pts:
                raise InputFileError(f"{src}: contains no decodable video frames")
            if work is not None:
                work.finish()
            writer.commit()
            notes += writer.notes
    except BaseException:
        if work is not None:
            work.abandon()  # finished scenes stay for the next run; the unfinished one goes
        raise
    finally:
        grader.close()
        if meter is not None:
            meter.close()  # also after a failure: the measuring thread must not outlive the run
    if work is not None:
        if work.damaged:
            notes.append(f"resume: kept scene(s) {', '.join(str(k + 1) for k in work.damaged)} failed their "
                         "checksum and were rendered again")
        if work.reused:
            notes.append(f"resumed: {len(work.reused)} finished scene(s) reused from {work.path.name}")
        work.remove()
    # 4. report
    scenes = scenes_from_boundaries(boundaries, len(pts))
    tb = info.time_base
    times = [float(p * tb) for p in pts]
    step = (times[-1] - times[-2]) if len(times) > 1 else float(1 / info.fps)
    report = None
    if meter is not None:
        meter.finish()
        report = build_report(meter, scenes, times, times[-1] + step, str(src), str(dst),
                              choice.name, preset.name, grain=preset.grade.grain, concealed_frames=concealed)
    warnings = ()
    if concealed:
        warnings = (f"{src}: {concealed} frame{'s' if concealed > 1 else ''} could not be decoded and "
                    f"{'were' if concealed > 1 else 'was'} replaced by the previous frame",)
    return StylizeResult(input=src, output=dst, engine=choice.name, engine_reason=choice.reason,
                         frames=len(pts), scenes=tuple(scenes), report=report, notes=tuple(notes),
                         seconds=time.perf_counter() - t0, concealed_frames=concealed, warnings=warnings)


# -- preview ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreviewResult:
    input: Path
    output: Path
    engine: str
    scenes: tuple[Scene, ...]
    notes: tuple[str, ...]
    seconds: float


def preview_file(src: str | os.PathLike, png: str | os.PathLike, preset: Preset,
                 options: StylizeOptions = StylizeOptions()) -> PreviewResult:
    """One stylized frame per scene (half a second in, or its last frame if shorter) as a
    contact-sheet PNG: a look check in seconds instead of a full render."""
    from cinefx.sheet import contact_sheet, write_png

    t0 = time.perf_counter()
    src, png = Path(src), Path(png)
    if png.suffix.lower() != ".png":
        raise OutputError(f"{png}: the preview is a PNG contact sheet; name it .png")
    if png.exists() and not options.overwrite:
        raise OutputError(f"{png}: exists; pass --overwrite to replace it")
    info = probe(src)
    options, choice, engine = _prepare_engine(preset, options)
    grader = Grader(preset.grade, info.display_size, seed=options.seed)
    offset = max(0, round(float(info.fps) / 2))
    detector = SceneDetector(options.detector)
    boundaries, starts, times = [], [0], []
    waiting: deque[Frame] = deque()  # decoded, scene not yet settled (the detector's lookahead)
    pick: dict[int, Frame] = {}  # the open scene → its frame nearest `offset` so far
    images, captions = [], []

    def kind_of(scene: int) -> str:
        return "start" if scene == 0 else boundaries[scene - 1].kind

    def shoot(scene: int) -> None:
        f = pick.pop(scene)
        out = f.rgb[None]
        if engine is not None:
            out = engine.render(out, scene)
        out = out if grader.is_identity else grader(out, f.index)
        images.append(out[0])
        captions.append(f"scene {scene + 1} - {times[f.index]:.2f}s - {kind_of(scene)}")

    def settle(upto: int) -> None:
        while waiting and waiting[0].index < upto:
            f = waiting.popleft()
            scene = bisect.bisect_right(starts, f.index) - 1
            for done in [k for k in pick if k < scene]:
                shoot(done)
            if f.index - starts[scene] <= offset:
                pick[scene] = f

    try:
        for frame in read_frames(info):
            times.append(float(frame.pts * info.time_base))
            waiting.append(frame)
            for b in detector.push(frame.rgb):
                starts.append(b.frame)
                boundaries.append(b)
            settle(detector.settled)
        for b in detector.finish():
            starts.append(b.frame)
            boundaries.append(b)
        settle(len(times))
        if not times:
            raise InputFileError(f"{src}: contains no decodable video frames")
        for k in sorted(pick):
            shoot(k)
    finally:
        grader.close()
    scenes = scenes_from_boundaries(boundaries, len(times))
    write_png(contact_sheet(images, captions), png)
    return PreviewResult(src, png, choice.name, tuple(scenes), (f"engine: {choice.name} ({choice.reason})",),
                         time.perf_counter() - t0)


# -- many inputs -------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchItem:
    input: Path
    output: Path
    status: str  # "done", "skipped" or "failed"
    error: str = ""  # one line: why it failed or was skipped
    result: StylizeResult | None = None
    traceback: str = ""  # of a failure cinefx did not foresee (shown with --debug)


def output_comment(preset: Preset) -> str:
    """The comment tag of every file cinefx writes; `is_cinefx_output` looks for it."""
    return f"{_OUTPUT_TAG}{__version__}, preset {preset.name}"


_OUTPUT_TAG = "rendered by cinefx "


def is_cinefx_output(path: Path) -> bool:
    try:
        with av.open(str(path), metadata_errors="ignore") as c:
            return any(k.lower() == "comment" and str(v).startswith(_OUTPUT_TAG) for k, v in c.metadata.items())
    except (av.error.FFmpegError, OSError, UnicodeDecodeError):
        return False  # not ours to judge: the run itself will say what is wrong with it


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders expand to the videos directly inside them (sorted), less the files
    cinefx itself wrote, so a batch re-run over a folder that holds its outputs does not restyle
    them. A file named explicitly is always taken."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS
                          and not f.name.startswith(".") and not is_cinefx_output(f))
        else:
            out.append(p)
    return out


def output_for(src: Path, out_dir: Path, preset_name: str, suffix: str | None = None) -> Path:
    """`out_dir/NAME.ext`, or `NAME.PRESET.ext` when `out_dir` is the input's own folder.

    Without `suffix` (batches) the input's own extension is kept where an output can have it;
    where it cannot (`.ts`, `.avi`), NAME keeps it (`clip.ts` → `clip.ts.mp4`), so the output never
    takes the name of a `clip.mp4` beside it. This depends on the input alone: names stay the same
    when files are added to a folder, as `--skip-existing` needs."""
    own = src.suffix.lower()
    ext = suffix or (own if own in OUTPUT_EXTENSIONS else ".mp4")
    name = src.stem if suffix or own == ext else src.name
    same = out_dir.resolve() == src.parent.resolve()
    return out_dir / (f"{name}.{preset_name.replace('+', '-')}{ext}" if same else f"{name}{ext}")


def batch_outputs(inputs: list[Path], out_dir: Path, preset_name: str) -> list[Path]:
    """`output_for` each input; two inputs that would still share an output (the same name in two
    folders, `clip.MP4` beside `clip.mp4`) are refused before anything is rendered."""
    outputs = [output_for(src, out_dir, preset_name) for src in inputs]
    first: dict[Path, int] = {}
    for i, dst in enumerate(outputs):
        if first.setdefault(dst, i) != i:
            raise OptionError(f"{inputs[first[dst]]} and {inputs[i]} would both be written to {dst}; "
                              "rename one, or stylize them into separate -o folders")
    return outputs


def _unforeseen(src: Path, ex: Exception) -> str:
    """One line for an exception cinefx did not raise on purpose: its type and first line."""
    first = (str(ex).strip().splitlines() or [""])[0]
    return f"{src}: unexpected {type(ex).__name__}" + (f": {first[:200]}" if first else "")


def stylize_batch(inputs: list[Path], out_dir: Path, preset: Preset, options: StylizeOptions,
                  skip_existing: bool = False, on_item: Callable[[BatchItem], None] | None = None,
                  progress_for: Callable[[Path], Progress | None] | None = None) -> list[BatchItem]:
    """Stylize every input into `out_dir`, carrying on past any failure of one file (Ctrl-C and
    impossible options stop it). Returns one item per input.

    With `skip_existing`, an output that exists, or that another run is writing (batches started
    twice over one folder share the work), is skipped."""
    if not out_dir.is_dir():
        raise MissingFileError(f"{out_dir}: output folder does not exist")
    items = []
    for src, dst in zip(inputs, batch_outputs(inputs, out_dir, preset.name)):
        if skip_existing and dst.exists():
            item = BatchItem(src, dst, "skipped", "output exists")
        else:
            try:
                res = stylize_file(src, dst, preset, options, progress_for(src) if progress_for else None)
                item = BatchItem(src, dst, "done", result=res)
            except OptionError:
                raise  # the same for every file
            except OutputBusyError as ex:
                item = BatchItem(src, dst, *(("skipped", "being written by another run") if skip_existing
                                             else ("failed", str(ex))))
            except CinefxError as ex:
                item = (BatchItem(src, dst, "skipped", "output exists") if skip_existing and dst.exists()
                        else BatchItem(src, dst, "failed", str(ex)))  # exists: another run just finished it
            except Exception as ex:
                item = BatchItem(src, dst, "failed", _unforeseen(src, ex), traceback=traceback.format_exc())
        items.append(item)
        if on_item:
            on_item(item)
    return items
