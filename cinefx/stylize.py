"""The orchestrator: probe → scene stream → renderer → encode → metrics → report.

One streaming pass over the input. The scene stream (`cinefx.scenes.SceneStream`) hands on runs
of a scene's frames once the detector has settled them, so memory holds at most one run plus the
detector's lookahead, however long the video. Every engine is a renderer from the registry
(`cinefx.engines.RENDERERS`); a scene is a task (`SceneTask`) whose result depends only on the
input, the scene's frames, the preset and the options, so a resumed run writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import av
import numpy as np

from cinefx import __version__, interrupt, resume
from cinefx.diffusion.models import ModelSpec, with_user_defaults
from cinefx.engines import EngineChoice, EngineSettings, build_renderer, choose_engine, speed_key
from cinefx.renderers import lengths
from cinefx.errors import (CinefxError, InputFileError, MissingFileError, OptionError, OutputBusyError, OutputError,
                           PresetError, unforeseen)
from cinefx.grade import ocio
from cinefx.metrics import DEFAULT_METRIC_WIDTH, TemporalMeter
from cinefx.presets import Preset, clip_path, prompt_text
from cinefx.report import Report, build_report
from cinefx.resume import OutputLock, ResumingRenderer, WorkFolder, file_identity, run_key, space_needed
from cinefx.scenelists import Timing
from cinefx.scenes import DetectorOptions, Scene, SceneStream, scene_rows, thumbnail_size
from cinefx.video.probe import VideoInfo, probe
from cinefx.video.reader import Frame, read_frames
from cinefx.video.writer import EncodeOptions, VideoWriter, check_output_path

LOG_HINT_FRAMES = 8  # frames across a clip `ocio.log_hint` looks at

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".m4v", ".webm", ".mts", ".m2ts", ".ts",
                    ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".mxf"}
OUTPUT_EXTENSIONS = {".mp4", ".mov", ".m4v", ".mkv"}

# progress(frames done, frames expected or 0, message or None)
Progress = Callable[[int, int, str | None], None]


@dataclass(frozen=True)
class StylizeOptions:
    """Everything a run depends on besides the preset; the CLI's defaults are these fields'.
    How many frames go to the renderer at once is the renderer's `run_length`, not an option."""

    engine: str = "auto"
    models: ModelSpec = ModelSpec()
    diffusion: EngineSettings = EngineSettings()  # its seed is replaced by `seed` below
    encode: EncodeOptions = EncodeOptions()
    overwrite: bool = False
    seed: int = 0
    metrics: bool = True
    # flow warping error in the report: None = the engine's default (on for diffusion, whose
    # renders it judges; off for the grade engine, where DIS flow costs more than the grade itself)
    warp_error: bool | None = None
    thumbnails: bool = False  # keep an input/output thumbnail per scene (for the HTML report)
    metric_width: int = DEFAULT_METRIC_WIDTH
    audio: bool = True
    resume: bool = True  # diffusion: keep finished scenes beside the output and reuse them on a re-run
    detector: DetectorOptions = DetectorOptions()
    # colour space of the inputs ("auto": from the stream's tags) and of the output file; see
    # cinefx.grade.ocio. Anything but Rec.709 is converted to / from Rec.709, which the grade works in
    input_colorspace: str = "auto"
    output_colorspace: str = "rec709"

    def __post_init__(self):
        if self.seed < 0:
            raise OptionError(f"--seed {self.seed}: must be 0 or more")


def default(cls, name: str):
    """The default of field `name` of dataclass `cls` (the CLI's defaults come from here)."""
    return cls.__dataclass_fields__[name].default


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
    thumbs: dict | None = None  # scene index → `cinefx.htmlreport.SceneThumb`, with `thumbnails`


def resolve_options(preset: Preset, options: StylizeOptions, gpus: str | None = None) -> tuple[StylizeOptions, EngineChoice]:
    """Options with every default filled in once (the base model a preset was trained on unless
    --model names one; the config file's models unless the grade engine is asked for, which reads
    no weights), and the engine chosen for them (`gpus`: see `choose_engine`)."""
    if preset.diffusion.base_model and not options.models.base:
        options = dataclasses.replace(options, models=dataclasses.replace(options.models, base=preset.diffusion.base_model))
    if options.engine != "grade":
        options = dataclasses.replace(options, models=with_user_defaults(options.models))
    return options, choose_engine(options.engine, options.models, tuple(k for k, _ in preset.diffusion.controls), gpus)


def renderer_for(preset: Preset, options: StylizeOptions, choice: EngineChoice, size: tuple[int, int]):
    """The registered renderer for `choice`, for frames of `size` (width, height)."""
    return build_renderer(choice.name, preset, size, options.seed, options.models, options.diffusion)


@dataclass(frozen=True)
class SceneTask:
    """One scene of one input to render, or piece `part` of a long one (`Renderer.part` frames from
    the scene's first frame on; piece 0 of a scene no longer than that is the whole scene): its
    result depends on these fields alone, so any worker (this process, a resumed run, another
    machine) renders the same frames. `options` are resolved (`resolve_options`); `options.seed`
    seeds the scene's noise with the scene's index."""

    input: Path
    scene: Scene
    preset: Preset
    options: StylizeOptions
    engine: str = "diffusion"
    part: int = 0
    # the pts of the first frame the task decodes (a later piece's: the frame before it), where the
    # caller knows it: the worker then seeks to the keyframe before it instead of decoding the input
    # from its start. The frames, and so the result, are the same either way.
    pts: int | None = None


def decode(info: VideoInfo, options: StylizeOptions, notes: list[str] | None = None, start: int = 0,
           start_pts: int | None = None) -> Iterator[Frame]:
    """`read_frames(info)` in the grade's working space, Rec.709: frames in another colour space
    (`options.input_colorspace`, or the stream's tags) are converted in float before the one
    rounding to 8 bits, from 16-bit RGB for sources over 8 bits. Rec.709 frames pass as decoded.
    From frame `start` on, seeking to the keyframe before it where its pts `start_pts` is known."""
    conv = ocio.input_conversion(ocio.choose_input(options.input_colorspace, info.colour).space)
    if conv is None:
        return read_frames(info, notes=notes, start=start, start_pts=start_pts)
    return (dataclasses.replace(f, rgb=conv(f.rgb))
            for f in read_frames(info, notes=notes, depth=16 if info.bit_depth > 8 else 8, start=start,
                                 start_pts=start_pts))


def run_scene_task(task: SceneTask, renderer=None, state: bytes | None = None,
                   measures: PieceMeasures | None = None) -> Iterator[np.ndarray]:
    """The task's scene (or piece) rendered, run by run ((F, H, W, 3) uint8 each): decodes its frames
    of the input and renders them with fresh per-scene state, or for a later piece, from `state`
    (`Renderer.scene_state()` after the scene's first batch) and the frame before the piece.
    `renderer` may be one built for the same preset and options (a worker keeps its renderer, and
    the models, across tasks); `measures`, if given, measures the frames as the report would."""
    info = probe(task.input)
    renderer = renderer or build_renderer(task.engine, task.preset, info.display_size, task.options.seed,
                                          task.options.models, task.options.diffusion)
    at = task.part * renderer.part
    start = task.scene.start + at
    end = min(task.scene.end, start + renderer.part) if renderer.part else task.scene.end
    first = start - (1 if at else 0)
    frames = islice((f.rgb for f in decode(info, task.options, start=first, start_pts=task.pts)), end - first)
    renderer.prime(task.scene.index, at, state, next(frames) if at else None)
    for run in iter(lambda: list(islice(frames, renderer.run_length)), []):
        out = np.stack(list(renderer.render(np.stack(run), task.scene.index, start)))
        if measures is not None:
            measures.add(run, out)
        yield out
        start += len(run)


class PieceMeasures:
    """The report's measures (`_Measures`) of the pairs within one scene task's frames, made where
    the task renders (a cluster's worker), so that the assembly splices them in rather than measuring
    every frame again on one machine. `to_bytes` keeps the settings they were made with; `_Measures`
    uses them only where its own are the same."""

    def __init__(self, options: StylizeOptions, engine: str):
        self.settings = _measure_settings(options, engine)
        self.meter = TemporalMeter(options.metric_width)
        self.warp = _warp_meter(options, engine)

    def add(self, sources: Iterable[np.ndarray], outputs: Iterable[np.ndarray]) -> None:
        for src, out in zip(sources, outputs):
            for m in (self.meter, self.warp):
                if m is not None:
                    m.add(0, src, out)

    def to_bytes(self) -> bytes:
        return json.dumps({"settings": self.settings, "temporal": self.meter.export(0),
                           "warp": self.warp.export(0) if self.warp is not None else None}).encode()


def _notes(info: VideoInfo, choice: EngineChoice, colour: ocio.InputChoice) -> list[str]:
    notes = [f"engine: {choice.name} ({choice.reason})", f"input colour: {colour.space} ({colour.reason})"]
    if info.field_order != "progressive" and choice.name == "diffusion":
        notes.append("interlaced source: diffusion sees whole frames, whose two fields are different "
                     "moments; deinterlace it first (e.g. ffmpeg -vf bwdif) for clean results")
    if info.colour.assumed:
        notes.append(f"colour {'/'.join(info.colour.assumed)} untagged: assumed "
                     f"{info.colour.matrix_name} {'full' if info.colour.full_range else 'limited'} range")
    return notes


def work_folder(src: Path, dst: Path, info: VideoInfo, preset: Preset, options: StylizeOptions,
                 choice: EngineChoice, notes: list[str], colour: tuple[str, str],
                 at: Path | None = None) -> WorkFolder | None:
    """The folder that keeps finished scenes for resume (beside the output, or `at`): for the engines
    worth resuming (diffusion), when --no-resume is not given and its disk can hold every scene (if
    not, say so and run without resume rather than fill the disk half way through). It is keyed by
    every field of `SceneTask` but the scene, and the (input, output) colour spaces."""
    if choice.name == "grade" or not options.resume:
        return None
    at = at or resume.WorkFolder.beside(dst)
    frames = info.frame_count or round(info.duration * float(info.fps or 0))
    need = space_needed(frames, *info.display_size)
    # what the folder holds already is its own (a resumed run's scenes; all of them at a cluster's
    # assembly), not space it lacks
    free = shutil.disk_usage(at.parent).free + sum(f.stat().st_size for f in at.glob("*") if f.is_file())
    if need > 0.8 * free:
        notes.append(f"resume off: keeping finished scenes would take about {need / 1e9:.1f} GB and "
                     f"{at.parent} has {free / 1e9:.1f} GB free (a crash would mean starting over)")
        return None
    work = WorkFolder.at(at, run_key(input=file_identity(src), prompt=preset.prompt, diffusion=preset.diffusion,
                                   grade=preset.grade, engine=choice.name, models=options.models,
                                   settings=options.diffusion, seed=options.seed, detector=options.detector,
                                   colour=colour, **speed_key(preset, options.diffusion, options.models.allow_pickle)))
    work.open()
    return work


def stylize_file(src: str | os.PathLike, dst: str | os.PathLike, preset: Preset,
                 options: StylizeOptions = StylizeOptions(), progress: Progress | None = None,
                 work_at: Path | None = None) -> StylizeResult:
    """Render `src` in the look of `preset` to `dst`. The input is only read; `dst` appears only
    when complete (see `VideoWriter`). While it runs, `dst` (and its work folder, beside it or
    `work_at`) is locked: another run on it raises `OutputBusyError`."""
    t0, src, dst = time.perf_counter(), Path(src), Path(dst)
    if not os.path.exists(src):  # before the output's checks: without an input, they are beside the point
        raise MissingFileError(f"{src}: no such file")
    check_output_path(dst, options.overwrite, options.encode.codec)  # the folder must exist to hold the lock
    with OutputLock(dst) as lock:
        # 1. check inputs before any work (the output again: another run may have finished it meanwhile)
        check_output_path(dst, options.overwrite, options.encode.codec)
        if dst.exists() and dst.resolve() == src.resolve():
            raise OutputError(f"{dst}: output would overwrite the input")
        info = probe(src)
        colour = ocio.choose_input(options.input_colorspace, info.colour)
        out_space = ocio.resolve(options.output_colorspace, "--output-colorspace")
        # 2. resolve options once, choose the renderer, keep finished scenes where it pays
        options, choice = resolve_options(preset, options)
        notes = _notes(info, choice, colour)
        work = work_folder(src, dst, info, preset, options, choice, notes, (colour.space, out_space), work_at)
        make = functools.partial(renderer_for, preset, options, choice, info.display_size)
        if work is None:
            resume.WorkFolder.remove_if_empty(dst)  # a killed diffusion run's, which nothing will resume
            renderer = make()
        else:  # the models load once a scene is left to render: not in a cluster's assembly
            renderer = ResumingRenderer(make, work, choice.name, *lengths(choice.name, preset, options.diffusion))
        seen = _Measures(options, choice, info, colour, work and functools.partial(_kept_measures, work), renderer.part)
        stream = SceneStream(decode(info, options, notes), renderer.run_length, options.detector)
        back = ocio.output_conversion(out_space)
        # the tags say what is written: the source's when nothing was converted
        tags = ocio.output_tags(out_space) if colour.converts or back is not None else None
        # 3. one streaming pass: scene runs → renderer → writer (and the measures)
        try:
            with VideoWriter(dst, info, options.encode, overwrite=options.overwrite, audio=options.audio,
                             comment=output_comment(preset), colour=tags) as writer:
                for run in stream:
                    out = renderer.render([f.rgb for f in run.items], run.scene, run.start)
                    lock.check()
                    for f, o in zip(run.items, out):
                        interrupt.check()
                        writer.write(back(o, depth=16) if back is not None else o, f.pts, f.duration)
                        seen.add(run.scene, f, o)
                    if progress:
                        progress(len(seen.times), info.frame_count, None)
                if not seen.times:
                    raise InputFileError(f"{src}: contains no decodable video frames")
                if work is not None:
                    work.finish()
                writer.commit()
                notes += writer.notes + seen.log_hint()
        except BaseException:
            if work is not None:
                work.abandon()  # finished scenes stay for the next run; the unfinished one goes
            raise
        finally:
            renderer.close()
            seen.close()  # also after a failure: the measuring threads must not outlive the run
        if work is not None:
            notes += work.close()
    # 4. report
    return StylizeResult(input=src, output=dst, engine=choice.name, engine_reason=choice.reason,
                         frames=len(seen.times), scenes=tuple(stream.scenes),
                         report=seen.report(stream.scenes, src, dst, preset), notes=tuple(notes),
                         seconds=time.perf_counter() - t0, concealed_frames=seen.concealed,
                         warnings=seen.warnings(src), thumbs=seen.thumbnails())


class _Measures:
    """What a run measures beside the writer, frame by frame: the report's meters (adjacent-frame
    PSNR/T-SSIM, and warp error where asked for), scene thumbnails for the HTML page, frames for
    the log hint, the frame times and the concealed-frame count."""

    def __init__(self, options: StylizeOptions, choice: EngineChoice, info: VideoInfo, colour,
                 kept: Callable[[int, int], bytes | None] | None = None, part: int = 0):
        """`kept(scene, piece)`: a `PieceMeasures` of a kept piece (`part` frames; 0: scenes are one
        piece) or None; its pairs are spliced in, and only the pair that ends at its first frame is
        measured here."""
        self.info, self.choice = info, choice
        self.meter = TemporalMeter(options.metric_width, background=True) if options.metrics else None
        self.warp = _warp_meter(options, choice.name, background=True)
        self.settings, self.kept, self.part = _measure_settings(options, choice.name), kept, part
        self._scene, self._at, self._spliced = None, 0, False
        self.thumbs = None
        if options.thumbnails:
            from cinefx.htmlreport import SceneThumbs

            self.thumbs = SceneThumbs()
        # untagged camera log looks like Rec.709 to `auto`: keep frames across the clip for `log_hint`
        auto = options.input_colorspace.strip().lower() == "auto"
        self.hint = [] if auto and not colour.converts else None
        self.every = max(1, (info.frame_count or 240) // LOG_HINT_FRAMES)
        self.times: list[float] = []
        self.concealed = 0

    def add(self, scene: int, f, out) -> None:
        """`f`: the source `Frame`; `out`: (H, W, 3) uint8, the frame as rendered and graded."""
        if scene != self._scene:
            self._scene, self._at = scene, 0
        values = None
        if self._at == 0 or self.part and self._at % self.part == 0:  # a piece begins: measured already?
            values = self._kept(scene, self._at // self.part if self.part else 0)
            self._spliced = values is not None
        for m in (self.meter, self.warp):
            if m is not None:
                m.add(scene, f.rgb, out, pair=values is not None or not self._spliced)
        if values is not None:
            self.meter.splice(scene, values["temporal"])
            if self.warp is not None:
                self.warp.splice(scene, values["warp"])
        self._at += 1
        if self.thumbs is not None:
            self.thumbs.add(scene, f.rgb, out)
        if self.hint is not None and f.index % self.every == 0 and len(self.hint) < LOG_HINT_FRAMES:
            self.hint.append(f.rgb)
        self.times.append(float(f.pts * self.info.time_base))
        self.concealed += f.concealed

    def _kept(self, scene: int, piece: int) -> dict | None:
        data = self.kept(scene, piece) if self.kept is not None and self.meter is not None else None
        values = json.loads(data) if data else None
        return values if values and values["settings"] == self.settings else None

    def close(self) -> None:
        for m in (self.meter, self.warp):
            if m is not None:
                m.close()

    def log_hint(self) -> list[str]:
        note = ocio.log_hint(self.hint) if self.hint else None
        return [note] if note else []

    def report(self, scenes, src: Path, dst: Path, preset: Preset) -> Report | None:
        if self.meter is None:
            return None
        self.meter.finish()
        if self.warp is not None:
            self.warp.finish()
        diffusion = self.choice.name == "diffusion"
        return build_report(self.meter, scenes, self.times, _end(self.times, self.info), str(src), str(dst),
                            self.choice.name, preset.name, grain=preset.grade.grain, concealed_frames=self.concealed,
                            warp=self.warp, prompt=prompt_text(preset) if diffusion else "")

    def warnings(self, src: Path) -> tuple[str, ...]:
        n = self.concealed
        if not n:
            return ()
        return (f"{src}: {n} frame{'s' if n > 1 else ''} could not be decoded and "
                f"{'were' if n > 1 else 'was'} replaced by the previous frame",)

    def thumbnails(self):
        return self.thumbs.finish() if self.thumbs is not None else None


def _kept_measures(work: WorkFolder, scene: int, piece: int) -> bytes | None:
    return work.extra(scene, "measures", piece) if work.has(scene, piece) else None


def _warp_meter(options: StylizeOptions, engine: str, background: bool = False):
    """A flow-warping-error meter when the report wants one (see `warp_error`)."""
    if not _measure_settings(options, engine)["warp"]:
        return None
    from cinefx.eval.warp import WarpMeter

    return WarpMeter(options.metric_width, background=background)


def _measure_settings(options: StylizeOptions, engine: str) -> dict:
    """What the report's measures depend on besides the frames."""
    warp = options.warp_error if options.warp_error is not None else engine == "diffusion"
    return {"metric_width": options.metric_width, "warp": bool(options.metrics and warp)}


def _end(times: list[float], info: VideoInfo) -> float:
    """The video's end: its last frame's time plus one frame step."""
    if not times:
        return 0.0
    return times[-1] + ((times[-1] - times[-2]) if len(times) > 1 else float(1 / info.fps))


# -- scenes and preview ------------------------------------------------------------------------

@dataclass(frozen=True)
class SceneList:
    input: Path
    frames: int
    scenes: tuple[Scene, ...]
    rows: tuple[dict, ...]  # `cinefx.scenes.scene_rows`: what `cinefx scenes` prints, 1-based
    timing: Timing  # the frames' times and the source's start timecode, for scene lists


def list_scenes(src: str | os.PathLike, options: DetectorOptions = DetectorOptions()) -> SceneList:
    """The scenes of `src`, found by the same scene stream as a render (on thumbnails: swscale
    shrinks while converting, far cheaper than full RGB)."""
    src = Path(src)
    info = probe(src)
    frames = read_frames(info, size=thumbnail_size(info.width, info.height), exact=False)
    stream = SceneStream(frames, 1, options)
    items = [f for run in stream for f in run.items]
    times = [float(f.pts * info.time_base) for f in items]
    end_pts = items[-1].pts + (items[-1].duration or info.frame_step) if items else 0
    timing = Timing.from_pts(info.fps, info.time_base, [f.pts for f in items], end_pts, info.timecode)
    return SceneList(src, len(times), tuple(stream.scenes), tuple(scene_rows(stream.scenes, times, _end(times, info))),
                     timing)


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

    t0, src, png = time.perf_counter(), Path(src), Path(png)
    if png.suffix.lower() != ".png":
        raise OutputError(f"{png}: the preview is a PNG contact sheet; name it .png")
    if png.exists() and not options.overwrite:
        raise OutputError(f"{png}: exists; pass --overwrite to replace it")
    info = probe(src)
    options, choice = resolve_options(preset, options)
    renderer = renderer_for(preset, options, choice, info.display_size)
    offset = max(0, round(float(info.fps) / 2))
    stream = SceneStream(decode(info, options), renderer.run_length, options.detector)
    images, captions = [], []
    try:
        for run in stream:
            k = min(offset - run.at, len(run.items) - 1)
            if k < 0 or (k < offset - run.at and not run.last):
                continue  # the scene's pick is in an earlier run, or a later one
            f = run.items[k]
            images.append(next(iter(renderer.render(f.rgb[None], run.scene, f.index))))
            captions.append(f"scene {run.scene + 1} - {float(f.pts * info.time_base):.2f}s - {run.kind}")
    finally:
        renderer.close()
    if not stream.count:
        raise InputFileError(f"{src}: contains no decodable video frames")
    write_png(contact_sheet(images, captions), png)
    return PreviewResult(src, png, choice.name, tuple(stream.scenes), (f"engine: {choice.name} ({choice.reason})",),
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
    takes the name of a `clip.mp4` beside it; nor does one whose extension differs in case only
    (`clip.MP4` → `clip.MP4.mp4`). This depends on the input alone: names stay the same when files
    are added to a folder, as `--skip-existing` needs. The output is always inside `out_dir`."""
    own = src.suffix.lower()
    ext = suffix or (own if own in OUTPUT_EXTENSIONS else ".mp4")
    name = src.stem if suffix or src.suffix == ext else src.name
    same = out_dir.resolve() == src.parent.resolve()
    out = out_dir / (f"{name}.{preset_name.replace('+', '-')}{ext}" if same else f"{name}{ext}")
    if out.parent != out_dir:  # a preset name from a file is checked when it is loaded; one made in code may not be
        raise PresetError(f"preset name {preset_name[:100]!r}: the output {clip_path(out)} would leave {out_dir}")
    return out


def plan_outputs(inputs: list[Path], out_dir: Path, preset_name: str) -> list[tuple[Path, str]]:
    """(`output_for` the input, why it cannot be written or "") for each input: inputs that would
    share an output (the same name in two folders) cannot, and are named, so a batch fails them
    alone rather than letting one overwrite the other."""
    outputs = [output_for(src, out_dir, preset_name) for src in inputs]
    sharing: dict[Path, list[Path]] = {}
    for src, dst in zip(inputs, outputs):
        sharing.setdefault(dst, []).append(src)

    def clash(dst: Path) -> str:
        srcs = sharing[dst]
        return "" if len(srcs) == 1 else (f"{' and '.join(map(str, srcs))} would {'both' if len(srcs) == 2 else 'all'} "
                                          f"be written to {dst}; rename one, or stylize them into separate -o folders")

    return [(dst, clash(dst)) for dst in outputs]


def not_done(src: Path, dst: Path, ex: BaseException, why: str, skip_existing: bool) -> BatchItem:
    """A failed input as a batch counts it (`stylize_batch`, and the cluster's): with
    `skip_existing`, an output another run is writing, or has just written, is skipped."""
    if skip_existing and isinstance(ex, OutputBusyError):
        return BatchItem(src, dst, "skipped", "being written by another run")
    if skip_existing and dst.exists():
        return BatchItem(src, dst, "skipped", "output exists")
    return BatchItem(src, dst, "failed", why)


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
    for src, (dst, clash) in zip(inputs, plan_outputs(inputs, out_dir, preset.name)):
        if clash:
            item = BatchItem(src, dst, "failed", clash)
        elif skip_existing and dst.exists():
            item = BatchItem(src, dst, "skipped", "output exists")
        else:
            try:
                res = stylize_file(src, dst, preset, options, progress_for(src) if progress_for else None)
                item = BatchItem(src, dst, "done", result=res)
            except OptionError:
                raise  # the same for every file
            except CinefxError as ex:
                item = not_done(src, dst, ex, str(ex), skip_existing)
            except Exception as ex:
                item = BatchItem(src, dst, "failed", unforeseen(ex, src), traceback=traceback.format_exc())
        items.append(item)
        if on_item:
            on_item(item)
    return items
