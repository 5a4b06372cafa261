"""The `cinefx` command: a thin Typer shell over the library.

It parses options, calls `cinefx.stylize` and friends, and turns `CinefxError` into one line on
stderr and an exit code. Heavy modules are imported inside the commands, so `cinefx --help` starts
fast and never imports torch.

Exit codes: 0 success · 1 a file could not be processed (bad input, preset, output) or some
inputs of a batch failed · 2 bad command-line usage (an impossible option value included) ·
130 interrupted (Ctrl-C) · 143 terminated (SIGTERM) · 129 hung up (SIGHUP: terminal closed).

Every line it prints shows control characters in names and messages as escapes (`_printable`): one
message stays one line, and a file name cannot drive the terminal.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from cinefx.config import field_default

_S, _E, _W, _T = (("cinefx.stylize", "StylizeOptions"), ("cinefx.renderers", "EngineSettings"),
                  ("cinefx.video.writer", "EncodeOptions"), ("cinefx.train.loop", "TrainConfig"))

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# upper bounds of counts, past any real use: a bigger one is a typo, refused before any work
MAX_WORKERS, MAX_EVERY, MAX_TRIALS = 1024, 10_000, 1_000_000

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make existing footage look cinematic: colour grade or diffusion re-render, "
                       "scene by scene, with audio, timing and colour kept.")
presets_app = typer.Typer(help="List bundled and user presets, or show one.", invoke_without_command=True)
app.add_typer(presets_app, name="presets")

_state = {"debug": False, "quiet": False}


def _flag(*decls, **kw):
    """A flag's option, shown as the flag alone (no value placeholder) in the help."""
    return typer.Option(*decls, metavar="", **kw)


def _one_of(*values: str) -> str:
    """The help's placeholder for an option with a fixed set of values; the library checks the
    value, so a wrong one is its one-line error rather than click's usage box."""
    return f"[{'|'.join(values)}]"


# the fixed sets the help lists (tests check them against the library's)
ENGINES = ("auto", "grade", "diffusion")
CODECS = ("h264", "hevc", "prores")
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")
TEMPORAL = ("full", "anchor", "none")
NOISE_PRIORS = ("independent", "shared", "residual", "flow")
SCHEDULERS = ("dpm++", "ddim", "euler", "unipc")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
TURBO = ("lcm", "hyper-sd", "tcd")
METHODS = ("lora", "ti", "dreambooth-lora", "pivotal")


def _console(stderr: bool = True):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # piped output (logs, batch scripts) would otherwise be squeezed to 80 columns
    width = None if stream.isatty() else 132
    # emoji=False: rich would turn ":x:" in a file name into an emoji (escape() covers markup only)
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width, emoji=False)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# C0, DEL, C1, and the surrogates Python decodes a file name's undecodable bytes to
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(m: re.Match) -> str:
    c = ord(m.group())
    if 0xDC80 <= c <= 0xDCFF:  # an undecodable byte of a file name: the byte
        c -= 0xDC00
    return _NAMED.get(m.group()) or (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")


def _printable(text: object) -> str:
    """`text` with control characters shown as escapes (`\\n`, `\\x1b`): what every line printed
    goes through, since names and messages carry user data."""
    return _CONTROL.sub(_escape_one, str(text))


def _say(text: str, stderr: bool = True) -> None:
    """Print one plain line (no markup)."""
    _console(stderr).print(_printable(text), markup=False)


def _show(table) -> None:
    """Print a rich Table on stdout, its title, caption and text cells (file names, prompts,
    questions from a study's files) made printable."""
    def lines(text):  # a caption or a cell may have lines of its own; a title is one line
        return "\n".join(_printable(line) for line in text.split("\n")) if isinstance(text, str) else text

    if isinstance(table.title, str):
        table.title = _printable(table.title)
    table.caption = lines(table.caption)
    for column in table.columns:
        # rich keeps a column's cells in `_cells`, and offers no public way to change them
        column._cells[:] = [lines(c) for c in column._cells]
    _console(stderr=False).print(table)


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    _console().print(f"[bold red]cinefx: error:[/] {escape(_printable(message))}", markup=True)
    return typer.Exit(code)


def _run(fn):
    """Call `fn`; typed errors become one line and exit 1 (2 for an impossible option), as does
    any other exception (its traceback with --debug); Ctrl-C exits 130, SIGTERM 143, SIGHUP 129."""
    import click

    from cinefx import interrupt
    from cinefx.errors import CinefxError, OptionError, unforeseen

    try:
        return fn()
    except CinefxError as ex:
        if _state["debug"]:
            raise
        raise _fail(str(ex), EXIT_USAGE if isinstance(ex, OptionError) else EXIT_FAILED) from None
    except OSError as ex:  # what the library did not foresee (a disk filling up, a file vanishing)
        if _state["debug"]:
            raise
        where = f"{ex.filename}: " if ex.filename else ""
        raise _fail(f"{where}{ex.strerror or ex}") from None
    except KeyboardInterrupt as ex:
        sig = interrupt.stopped_by(ex)
        what = "interrupted" if sig == interrupt.signal.SIGINT else f"terminated ({sig.name})"
        _say(f"cinefx: {what}; no partial output was left behind")
        raise typer.Exit(interrupt.exit_code(ex)) from None
    except (typer.Exit, typer.Abort, click.ClickException):  # RuntimeErrors, but ours to pass on
        raise
    except Exception as ex:
        if _state["debug"]:
            raise
        raise _fail(unforeseen(ex)) from None


def _info(text: str) -> None:
    if not _state["quiet"]:
        _say(text)


def _warn(text: str) -> None:
    """Something to look at in a finished output: shown even with --quiet."""
    _console().print(f"[bold yellow]cinefx: warning:[/] {escape(_printable(text))}", markup=True)


def _check_range(flag: str, value: int | None, low: int, high: int, why: str = "") -> None:
    """Refuse `value` outside low..high before any work: a huge one would only fail (or exhaust
    memory) deep inside a run."""
    from cinefx.errors import OptionError

    if value is not None and not low <= value <= high:
        raise OptionError(f"{flag} {str(value)[:24]}: must be {low}–{high}{why}")


class _Progress:
    """A rich progress bar on a terminal; plain log lines every few seconds otherwise."""

    def __init__(self, label: str, total: int, unit: str = "frames"):
        self.label, self.total, self.unit = _printable(label), total, unit
        self.tty = sys.stderr.isatty() and not _state["quiet"]
        self.t0 = self.last_log = time.monotonic()
        self.bar = None
        if self.tty:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[fps]:.1f} " + ("fps" if unit == "frames" else f"{unit}/s")), TimeRemainingColumn(),
                                TextColumn("{task.fields[note]}"),
                                console=_console(), transient=True)
            self.task = self.bar.add_task(escape(self.label), total=total or None, fps=0.0, note="")
            self.bar.start()

    def __call__(self, done: int, total: int, message: str | None) -> None:
        fps = done / max(1e-6, time.monotonic() - self.t0)
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total or None, fps=fps, note=escape(_printable(message or "")))
        elif not _state["quiet"] and time.monotonic() - self.last_log >= 5:
            self.last_log = time.monotonic()
            pct = f" ({100 * done / total:.0f}%)" if total else ""
            rate = "fps" if self.unit == "frames" else f"{self.unit}/s"
            extra = f", {message}" if message else ""
            _say(f"{self.label}: {done}/{total or '?'} {self.unit}{pct}, {fps:.1f} {rate}{extra}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.callback()
def _main(
    debug: Annotated[bool, _flag("--debug", help="Show tracebacks for errors.")] = False,
):
    _state.update(debug=debug, quiet=False)  # per invocation: a test's runner makes many in one process


@app.command()
def stylize(
    inputs: Annotated[list[Path], typer.Argument(help="Video files or folders of videos.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output file (one input) or folder (several inputs or a folder). Default: IN.<preset>.mp4 beside the input.")] = None,
    preset: Annotated[list[str], typer.Option("--preset", "-p", help="Preset name or .toml path; repeat to combine (later ones override).")] = ["epic"],
    engine: Annotated[str, typer.Option(metavar=_one_of(*ENGINES), help="auto: diffusion only where weights and a GPU are usable, else grade.")] = field_default(*_S, "engine"),
    model: Annotated[Optional[str], typer.Option(help="Diffusion base model: folder, .safetensors or hub id (default $CINEFX_MODEL, the config file, else SD1.5).", rich_help_panel="Models")] = None,
    controlnet: Annotated[list[str], typer.Option(help="ControlNet for a control, KIND=folder|file|hub-id; repeatable.", rich_help_panel="Models")] = [],
    depth_model: Annotated[Optional[str], typer.Option(help="Depth estimator (transformers folder or hub id).", rich_help_panel="Models")] = None,
    annotators: Annotated[Optional[str], typer.Option(help="controlnet-aux annotator weights for lineart, softedge, openpose, normal, mlsd (folder or hub id; default lllyasviel/Annotators).", rich_help_panel="Models")] = None,
    allow_pickle: Annotated[bool, _flag("--allow-pickle", help="Allow pickled .ckpt/.pt/.bin weights (they can run code).", rich_help_panel="Models")] = False,
    strength: Annotated[Optional[float], typer.Option(help="Diffusion: img2img strength 0-1 (0 keeps the source).", rich_help_panel="Diffusion")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Diffusion: denoising steps.", rich_help_panel="Diffusion")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Diffusion: classifier-free guidance scale.", rich_help_panel="Diffusion")] = None,
    temporal: Annotated[Optional[str], typer.Option(metavar=_one_of(*TEMPORAL), help="Diffusion: cross-frame attention.", rich_help_panel="Diffusion")] = None,
    noise_prior: Annotated[Optional[str], typer.Option(metavar=_one_of(*NOISE_PRIORS), help="Diffusion: initial noise.", rich_help_panel="Diffusion")] = None,
    chunk: Annotated[Optional[int], typer.Option(help="Diffusion: frames rendered together (attention span).", rich_help_panel="Diffusion")] = None,
    keyframes: Annotated[Optional[int], typer.Option(help="Diffusion: render every K-th frame, propagate along optical flow between (0 = all).", rich_help_panel="Diffusion")] = None,
    detail: Annotated[Optional[float], typer.Option(help="Diffusion: source detail finer than the render added back, 0-1.", rich_help_panel="Diffusion")] = None,
    size: Annotated[int, typer.Option(help="Diffusion: short side of the render in pixels (0 = the model's native size).", rich_help_panel="Diffusion")] = field_default(*_E, "size"),
    batch: Annotated[int, typer.Option(help="Diffusion: frames per GPU call (0 = chunk, capped by free memory).", rich_help_panel="Diffusion")] = field_default(*_E, "batch"),
    scheduler: Annotated[str, typer.Option(metavar=_one_of(*SCHEDULERS), help="Diffusion: sampler.", rich_help_panel="Diffusion")] = field_default(*_E, "scheduler"),
    precision: Annotated[str, typer.Option(metavar=_one_of(*PRECISIONS), help="Diffusion: weights' precision.", rich_help_panel="Diffusion")] = field_default(*_E, "precision"),
    turbo: Annotated[Optional[str], typer.Option(metavar=_one_of(*TURBO), help="Diffusion: a few-step distilled LoRA and its sampler, in place of the preset's steps and guidance (overrides its turbo): at strength 0.55, 4 UNet passes a frame against 22 for 20 guided steps; the look changes. Weights: see --turbo-lora.", rich_help_panel="Diffusion")] = None,
    turbo_steps: Annotated[Optional[int], typer.Option(help="Diffusion: steps with --turbo (0 = the kind's default, 4; hyper-sd runs at 2, 4 or 8).", rich_help_panel="Diffusion")] = None,
    turbo_lora: Annotated[Optional[str], typer.Option(help="Diffusion: the --turbo LoRA: .safetensors file, folder or hub id (default the config file's \\[models.turbo_lora], else the kind's hub repo).", rich_help_panel="Models")] = None,
    compile: Annotated[bool, _flag("--compile/--no-compile", help="Diffusion: torch.compile the UNet, ControlNets and VAE decoder: minutes before the first frame, faster frames after (worth it for long runs on a GPU).", rich_help_panel="Diffusion")] = field_default(*_E, "compile"),
    preview: Annotated[Optional[Path], typer.Option(help="Write one stylized frame per scene as a contact-sheet PNG instead of the video.")] = None,
    crf: Annotated[float, typer.Option(help="x264 quality, 0-51, lower is better.")] = field_default(*_W, "crf"),
    x264_preset: Annotated[str, typer.Option("--x264-preset", metavar=_one_of(*X264_PRESETS), help="x264 (and x265) speed preset.")] = field_default(*_W, "x264_preset"),
    codec: Annotated[str, typer.Option(metavar=_one_of(*CODECS), help="Output codec: h264; hevc (10-bit with a log or HDR --output-colorspace); prores (422 HQ, 10-bit, .mov only; ignores --crf and --x264-preset).", rich_help_panel="Colour")] = field_default(*_W, "codec"),
    seed: Annotated[int, typer.Option(help="Seed for grain (and diffusion noise): same seed, same file.")] = field_default(*_S, "seed"),
    letterbox: Annotated[Optional[float], typer.Option(help="Override the preset's letterbox aspect (0 = none).")] = None,
    grain: Annotated[Optional[float], typer.Option(help="Override the preset's grain strength (0-1).")] = None,
    overwrite: Annotated[bool, _flag("--overwrite", help="Replace an existing output.")] = False,
    skip_existing: Annotated[bool, _flag("--skip-existing", help="Skip inputs whose output exists (or another run is writing).")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Write the temporal report as JSON (a folder in batch mode).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a per-frame PSNR / T-SSIM plot PNG (a folder in batch mode).")] = None,
    html: Annotated[Optional[Path], typer.Option(help="Write the report as one self-contained HTML page with input/output thumbnails per scene (a folder with an index in batch mode).")] = None,
    no_metrics: Annotated[bool, _flag("--no-metrics", help="Skip the temporal report (faster).")] = False,
    warp_error: Annotated[Optional[bool], _flag("--warp-error/--no-warp-error", help="Add flow warping error to the report (default: on for diffusion; off for grade, where the optical flow costs more than the grade).", show_default=False)] = None,
    no_resume: Annotated[bool, _flag("--no-resume", help="Diffusion: keep no finished scenes beside the output (no disk used; a crash starts over).", rich_help_panel="Diffusion")] = False,
    input_colorspace: Annotated[str, typer.Option(help="Colour space of the footage: auto (from the stream's tags: Rec.709, BT.2020, PQ, HLG; camera log is rarely tagged) or a name or alias from `cinefx colorspaces` (slog3, logc4, applelog, …). Log and HDR are rendered to Rec.709 before the look.", rich_help_panel="Colour")] = field_default(*_S, "input_colorspace"),
    output_colorspace: Annotated[str, typer.Option(help="Write the output in this colour space (10-bit H.264, tagged) for grading downstream: log, pq, hlg, rec2020, …. It re-encodes the Rec.709 render and adds no latitude or highlights the render did not have.", rich_help_panel="Colour")] = field_default(*_S, "output_colorspace"),
    cluster: Annotated[Optional[str], typer.Option(help="Render on Ray: 'ray' (this machine's instance or $RAY_ADDRESS, started if none) or ray://HOST:10001. Needs Ray (the cinefx ray extra).", rich_help_panel="Cluster")] = None,
    workers: Annotated[Optional[int], typer.Option(help="--cluster: workers at most (default: one per GPU; without GPUs one per core).", rich_help_panel="Cluster")] = None,
    work_dir: Annotated[Optional[Path], typer.Option(help="--cluster: a folder every node sees for finished scenes (default: beside each output).", rich_help_panel="Cluster")] = None,
    preflight: Annotated[str, typer.Option(help="--cluster: strict stops when a node fails its check; skip-bad runs without it.", metavar=_one_of("strict", "skip-bad"), rich_help_panel="Cluster")] = "strict",
    quiet: Annotated[bool, _flag("--quiet", "-q", help="Only errors and the batch summary.")] = False,
):
    """Render videos in a preset's cinematic look."""
    _state["quiet"] = quiet

    def run():
        from cinefx import presets as P
        from cinefx.engines import EngineSettings
        from cinefx.errors import OptionError, PresetError
        from cinefx.stylize import StylizeOptions
        from cinefx.video.writer import EncodeOptions

        look = P.combine([P.load_preset(n) for n in preset])
        try:  # these name the option: a usage error, not a broken preset
            look = P.override(look, "grade", letterbox=letterbox, grain=grain)
            look = P.override(look, "diffusion", strength=strength, steps=steps, guidance=guidance, temporal=temporal,
                              noise_prior=noise_prior, chunk=chunk, keyframes=keyframes, detail=detail,
                              turbo=turbo, turbo_steps=turbo_steps)
        except PresetError as ex:
            raise OptionError(str(ex)) from None
        if overwrite and skip_existing:
            raise OptionError("--overwrite and --skip-existing contradict each other: give one of them")
        if (report or plot or html) and no_metrics:
            raise OptionError("--report/--plot/--html need the metrics; drop --no-metrics")
        _check_colorspaces(input_colorspace, output_colorspace)
        options = StylizeOptions(
            engine=engine, models=_model_spec(model, controlnet, depth_model, annotators, allow_pickle),
            diffusion=EngineSettings(size=size, batch=batch, scheduler=scheduler, precision=precision,
                                     turbo_lora=turbo_lora, compile=compile),
            encode=EncodeOptions(crf=crf, x264_preset=x264_preset, codec=codec), overwrite=overwrite, seed=seed,
            metrics=not no_metrics, warp_error=warp_error, thumbnails=html is not None, resume=not no_resume,
            input_colorspace=input_colorspace, output_colorspace=output_colorspace)
        if preview is not None:
            _preview(inputs, preview, look, options)
        else:
            if cluster is None and (workers is not None or work_dir is not None or preflight != "strict"):
                raise OptionError("--workers, --work-dir and --preflight go with --cluster")
            _check_range("--workers", workers, 1, MAX_WORKERS)
            ray = _Cluster(cluster, workers, work_dir, preflight) if cluster else None
            _stylize(inputs, output, look, options, skip_existing, _Outputs(report, plot, html), ray)

    _run(run)


def _check_colorspaces(input_colorspace: str, output_colorspace: str | None = None) -> None:
    """Refuse an unknown colour space name before any work (Rec.709 never imports OpenColorIO)."""
    from cinefx.grade import ocio

    if input_colorspace.strip().lower() != "auto":
        ocio.resolve(input_colorspace, "--input-colorspace")
    if output_colorspace is not None:
        ocio.resolve(output_colorspace, "--output-colorspace")


def _model_spec(model, controlnet, depth_model, annotators, allow_pickle):
    from cinefx.diffusion.models import ModelSpec

    pairs = []
    for item in controlnet:
        kind, sep, spec = item.partition("=")
        if not sep or not kind or not spec:
            raise _fail(f"--controlnet {item!r}: expected KIND=MODEL, e.g. canny=./controlnet-canny", EXIT_USAGE)
        pairs.append((kind.strip(), spec.strip()))
    return ModelSpec(base=model, controlnets=tuple(pairs), depth=depth_model, annotators=annotators,
                     allow_pickle=allow_pickle)


def _preview(inputs, sheet, preset, options):
    from cinefx.errors import OptionError
    from cinefx.stylize import preview_file

    if len(inputs) != 1 or inputs[0].is_dir():
        raise OptionError("--preview takes one input file")
    res = preview_file(inputs[0], sheet, preset, options)
    for note in res.notes:
        _info(f"{inputs[0].name}: {note}")
    _info(f"{inputs[0].name} → {sheet}: {_count(len(res.scenes), 'scene')} previewed in {res.seconds:.1f}s")


@dataclass(frozen=True)
class _Outputs:
    """Where a run's report, plot and HTML page go: files for one input, folders for a batch."""

    report: Path | None
    plot: Path | None
    html: Path | None

    def _given(self):
        return [(flag, path) for flag, path in (("--report", self.report), ("--plot", self.plot),
                                                ("--html", self.html)) if path is not None]

    def check_files(self) -> None:
        """One input: each path must be a file name in a writable folder, checked before rendering."""
        from cinefx.errors import OptionError

        for flag, path in self._given():
            if path.is_dir():
                raise OptionError(f"{flag} {path}: is a folder; name a file (a folder is for several inputs)")
            _check_folder(flag, path, path.parent)

    def folders(self) -> None:
        """Several inputs: each path is a folder, made now if missing."""
        from cinefx.errors import OptionError

        for flag, folder in self._given():
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise OptionError(f"{flag} {folder}: is a file; several inputs need a folder") from None
            except OSError as ex:
                raise OptionError(f"{flag} {folder}: cannot make the folder ({ex.strerror or ex})") from None
            _check_folder(flag, folder, folder)

    def inside(self, output: Path) -> "_Outputs":
        """An input's files in the batch folders, named for its output, which no other input shares."""
        at = lambda folder, ext: folder / f"{output.name}{ext}" if folder else None  # noqa: E731
        return _Outputs(at(self.report, ".json"), at(self.plot, ".png"), at(self.html, ".html"))


def _check_folder(flag: str, path: Path, folder: Path) -> None:
    from cinefx.errors import OptionError

    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise OptionError(f"{flag} {path}: {folder} {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionError(f"{flag} {path}: folder {folder} is not writable")


@dataclass(frozen=True)
class _Cluster:
    """--cluster and its options: where `cinefx.cluster.stylize_on_ray` runs the work."""

    address: str
    workers: int | None
    work_dir: Path | None
    preflight: str

    def run(self, files, outputs, preset, options, skip_existing=False, on_item=None, progress=None):
        from cinefx.cluster import stylize_on_ray  # Ray is imported only here

        return stylize_on_ray(files, outputs, preset, options, cluster=self.address, workers=self.workers,
                              work_dir=self.work_dir, preflight_mode=self.preflight, skip_existing=skip_existing,
                              on_item=on_item, progress=progress)


def _stylize(inputs, output, preset, options, skip_existing, outs: _Outputs, cluster: _Cluster | None = None):
    """One input to one file, or several (or a folder) to a folder with a summary; on a Ray
    cluster with `cluster`."""
    from cinefx.errors import CinefxError, InputFileError, OptionError, OutputBusyError, unforeseen
    from cinefx.stylize import expand_inputs, is_cinefx_output, output_for, stylize_batch, stylize_file

    files = expand_inputs(inputs)
    batch = len(inputs) > 1 or any(p.is_dir() for p in inputs)
    if not batch:
        src = files[0]
        dst = output or output_for(src, src.parent, preset.name, ".mp4")
        if dst.is_dir():
            dst = output_for(src, dst, preset.name, ".mp4")
        if skip_existing and dst.exists():
            _info(f"{src}: skipped ({dst} exists)")
            return
        outs.check_files()
        progress = _Progress(src.name, 0)
        try:
            if cluster is None:
                res = stylize_file(src, dst, preset, options, progress)
            else:
                (item,) = cluster.run([src], [dst], preset, options, skip_existing, progress=progress)
                if item.status == "skipped":
                    _info(f"{src}: skipped ({item.error})")
                    return
                if item.status != "done":
                    raise typer.Exit(_fail_item(item))
                res = item.result
        except OutputBusyError:
            if not skip_existing:
                raise
            _info(f"{src}: skipped (being written by another run)")
            return
        except Exception as ex:
            if isinstance(ex, (CinefxError, OSError, typer.Exit)) or _state["debug"]:
                raise
            raise _fail(unforeseen(ex, src)) from None
        finally:
            progress.close()
        _finish_one(res, outs)
        return
    if not files:
        ours = sum(1 for d in inputs if d.is_dir() for f in d.iterdir() if f.is_file() and is_cinefx_output(f))
        raise InputFileError(f"no video files found in {', '.join(map(str, inputs))}"
                          + (f" ({ours} written by cinefx itself, which folder scans leave out)" if ours else ""))
    if output is None:
        raise OptionError("several inputs need -o/--output FOLDER")
    if output.exists() and not output.is_dir():
        raise OptionError(f"-o {output}: several inputs need a folder, not a file")
    output.mkdir(parents=True, exist_ok=True)
    outs.folders()

    unreported = []  # done, but a report, plot or page of theirs could not be written

    def on_item(item):
        if item.status == "done":
            try:
                _finish_one(item.result, outs.inside(item.output))
            except (CinefxError, OSError) as ex:  # one input's report must not stop the batch
                _fail(str(ex) if isinstance(ex, CinefxError) else f"{item.input}: its report: {ex}")
                unreported.append(item.input)
        elif item.status == "skipped":
            _info(f"{item.input}: skipped ({item.error})")
        else:
            _fail_item(item)

    progress_holder = []

    def progress_for(src):
        if progress_holder:
            progress_holder.pop().close()
        p = _Progress(src.name, 0)
        progress_holder.append(p)
        return p

    try:
        if cluster is None:
            items = stylize_batch(files, output, preset, options, skip_existing, on_item, progress_for)
        else:
            items = cluster.run(files, output, preset, options, skip_existing, on_item, progress_for(Path("cluster")))
    finally:
        if progress_holder:
            progress_holder.pop().close()
    if outs.html:
        _html_index(items, outs)
    counts = {s: sum(1 for i in items if i.status == s) for s in ("done", "skipped", "failed")}
    concealed = sum(1 for i in items if i.result is not None and i.result.concealed_frames)
    _say(f"cinefx: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed of {len(items)}"
         + (f"; {concealed} with undecodable frames replaced (see the warnings)" if concealed else ""))
    for i in items:
        if i.status == "failed":
            _say(f"  failed: {i.input}")
    for src in unreported:
        _say(f"  rendered, report not written: {src}")
    if counts["failed"] or unreported:
        raise typer.Exit(EXIT_FAILED)


def _fail_item(item) -> int:
    """Print a failed input's one line (and its traceback with --debug); the exit code."""
    _fail(str(item.error))
    if _state["debug"] and item.traceback:
        sys.stderr.write(item.traceback)
    return EXIT_FAILED


def _html_index(items, outs: _Outputs) -> None:
    from cinefx.htmlreport import IndexItem, write_html_index

    rows = []
    for i in items:
        res = i.result
        done = i.status == "done" and res is not None and res.report is not None
        first = res.thumbs.get(min(res.thumbs)) if done and res.thumbs else None
        rows.append(IndexItem(str(i.input), outs.inside(i.output).html if done else None,
                              res.report if done else None, first,
                              "" if i.status == "done" else f"{i.status}: {i.error}"))
    index = write_html_index(rows, outs.html / "index.html")
    _info(f"HTML report: {index}")


def _finish_one(res, outs: _Outputs):
    from cinefx.report import render_table, write_plot

    for note in res.notes:
        _info(f"{res.input.name}: {note}")
    for warning in res.warnings:
        _warn(warning)
    if res.report is not None and not _state["quiet"]:
        _show(render_table(res.report))
    if res.report is not None and outs.report:
        res.report.write_json(outs.report)
    if res.report is not None and outs.plot:
        write_plot(res.report, outs.plot)
    if res.report is not None and outs.html:
        from cinefx.htmlreport import write_html_report

        write_html_report(res.report, res.thumbs or {}, outs.html)
    fps = res.frames / max(res.seconds, 1e-6)
    _info(f"{res.input.name} → {res.output}: {_count(res.frames, 'frame')}, {_count(len(res.scenes), 'scene')}, "
          f"{res.seconds:.1f}s ({fps:.1f} fps)")


@app.command()
def scenes(
    input: Annotated[Path, typer.Argument(help="Video file.")],
    as_json: Annotated[bool, _flag("--json", help="Print JSON instead of a table.")] = False,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write PySceneDetect's scene-list CSV.")] = None,
    edl: Annotated[Optional[Path], typer.Option("--edl", help="Also write a CMX 3600 EDL at the source's start timecode.")] = None,
    otio: Annotated[Optional[Path], typer.Option("--otio", help="Also write an OpenTimelineIO timeline.")] = None,
):
    """List the scenes of a video: hard cuts, dissolves and fades (flashes are not cuts)."""
    _run(lambda: _scenes(input, as_json, {".csv": csv, ".edl": edl, ".otio": otio}))


def _scenes(path: Path, as_json: bool, lists: dict[str, Optional[Path]]):
    from cinefx.errors import OptionError
    from cinefx.scenelists import write_scene_list
    from cinefx.stylize import list_scenes

    for kind, target in lists.items():
        if target is not None and target.suffix.lower() != kind:
            raise OptionError(f"--{kind[1:]} {target}: name the file …{kind}")
    found = list_scenes(path)
    rows, frames = found.rows, found.frames
    for target in filter(None, lists.values()):
        _info(f"{path.name}: scene list written to {write_scene_list(target, found.scenes, found.timing, path)}")
    if as_json:
        print(json.dumps({"input": str(path), "frames": frames, "scenes": list(rows)}, indent=2))
        return
    from rich.table import Table

    t = Table(title=escape(f"{path.name}: {_count(len(rows), 'scene')}, {_count(frames, 'frame')}"))
    for col in ("scene", "begins with", "frames", "start", "end"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["scene"]), r["kind"], f"{r['start_frame']}–{r['end_frame'] - 1}",
                  f"{r['start_time']:.3f}s", f"{r['end_time']:.3f}s")
    _show(t)


@app.command()
def colorspaces():
    """List the colour spaces --input-colorspace and --output-colorspace take: cinefx's aliases, then OpenColorIO's ACES studio config names."""

    def run():
        from rich.table import Table

        from cinefx.grade import ocio

        t = Table(title="cinefx colour spaces (OpenColorIO ACES studio config)")
        for col in ("alias", "name", "family", "encoding"):
            t.add_column(col)
        for c in ocio.colorspaces():
            t.add_row(c.alias, escape(c.name), escape(c.family), c.encoding)
        _show(t)

    _run(run)


@app.command("eval")
def eval_(
    source: Annotated[Path, typer.Argument(help="The source video (or, with --stills, the folder of generated images).")],
    renders: Annotated[Optional[list[Path]], typer.Argument(help="Renders of the source: same frames, same timing.", show_default=False)] = None,
    stills: Annotated[bool, _flag("--stills", help="Score a folder of images (CLIP-T, DINO) as DreamShot does, instead of videos.")] = False,
    reference: Annotated[Optional[Path], typer.Option(help="--stills: folder of real images DINO compares against.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="--stills: prompts (metadata.jsonl, or one prompt for all) — default each image's .txt.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt for CLIP-T (default: the one in each render's --report).")] = None,
    report: Annotated[Optional[list[Path]], typer.Option(help="A render's stylize report JSON, once per render, in order.")] = None,
    every: Annotated[int, typer.Option(help="Measure adjacent pairs (t, t+1) every N frames (a long clip on a CPU: 8-12).")] = 1,
    no_models: Annotated[bool, _flag("--no-models", help="Only the measures that need no weights (warp error, PSNR, T-SSIM).")] = False,
    captioner: Annotated[Optional[str], typer.Option(help="Captioner (default nlpconnect/vit-gpt2-image-captioning).", rich_help_panel="Models")] = None,
    sentence_model: Annotated[Optional[str], typer.Option(help="Sentence encoder (default sentence-transformers/all-MiniLM-L6-v2).", rich_help_panel="Models")] = None,
    dino: Annotated[Optional[str], typer.Option(help="DINO model (default facebook/dino-vits16).", rich_help_panel="Models")] = None,
    clip: Annotated[Optional[str], typer.Option(help="CLIP model (default openai/clip-vit-large-patch14).", rich_help_panel="Models")] = None,
    allow_pickle: Annotated[bool, _flag("--allow-pickle", help="Allow pickled weights (they can run code).", rich_help_panel="Models")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    as_json: Annotated[Optional[Path], typer.Option("--json", help="Write every figure as JSON.")] = None,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Write per-scene rows as CSV.")] = None,
):
    """Measure renders against their source: warp error, PSNR/T-SSIM Δ, CLIP consistency, content similarity, DINO, CLIP-T."""

    def run():
        from cinefx.config import model_defaults
        from cinefx.errors import OptionError

        _check_range("--every", every, 1, MAX_EVERY)
        cfg = model_defaults()
        given = {"captioner": captioner, "sentence": sentence_model, "dino": dino, "clip": clip}
        from cinefx.eval import EvalModelSpec

        spec = EvalModelSpec(**{**dict(cfg.eval), **{k: v for k, v in given.items() if v}},
                             allow_pickle=allow_pickle or cfg.allow_pickle)
        if stills:
            if renders:
                raise OptionError("--stills takes one folder of images, not renders")
            _eval_stills(source, reference, prompts, spec, device, as_json, csv)
        else:
            if not renders:
                raise OptionError("name one or more renders of the source (or use --stills for images)")
            _eval_videos(source, renders, prompt, report, every, None if no_models else spec, device, as_json, csv)

    _run(run)


def _eval_videos(source, renders, prompt, reports, every, spec, device, as_json, csv):
    from cinefx.eval import evaluate
    from cinefx.eval.table import render_table, write_csv, write_json

    progress = _Progress(source.name, 0)
    try:
        ev = evaluate(source, renders, prompt=prompt, reports=reports or None, models=spec, every=every,
                      device=device, progress=progress)
    finally:
        progress.close()
    _present(ev, render_table, write_json, write_csv, as_json, csv)


def _eval_stills(folder, reference, prompts, spec, device, as_json, csv):
    from cinefx.eval import evaluate_stills
    from cinefx.eval.table import render_stills_table, write_stills_csv, write_stills_json

    ev = evaluate_stills(folder, reference, prompts, models=spec, device=device)
    _present(ev, render_stills_table, write_stills_json, write_stills_csv, as_json, csv)


def _present(ev, table, to_json, to_csv, as_json, csv):
    """Print an evaluation's notes and table; write its JSON and CSV where asked."""
    for note in ev.notes:
        _info(note)
    _show(table(ev))
    if as_json:
        to_json(ev, as_json)
    if csv:
        to_csv(ev, csv)


@app.command()
def rate(
    paths: Annotated[list[Path], typer.Argument(help="Systems to compare (one folder of renders each, matched by name; or one file each); with --tally or --serve, the study folder (then answer files).", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="The study folder to make (must not exist).")] = None,
    questions: Annotated[str, typer.Option(help="seed: 'Which is more cinematic?' | dreamshot: DreamShot's three questions.", metavar=_one_of("seed", "dreamshot"))] = "seed",
    seed: Annotated[int, typer.Option(help="Seed of the pairs' order and sides.")] = 0,
    trials: Annotated[Optional[int], typer.Option(help="How many (source, pair) trials to draw (default: all).")] = None,
    tally: Annotated[bool, _flag("--tally", help="Tally the answers of the study folder (and answer files given after it).")] = False,
    serve: Annotated[bool, _flag("--serve", help="Serve the study on 127.0.0.1 and save each answer as it is given.")] = False,
    port: Annotated[int, typer.Option(help="--serve: the port.")] = 8765,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="--tally: write the tally as JSON (default STUDY/tally.json).")] = None,
):
    """A blinded pairwise preference study of renders, as the seed papers ran: make it, serve it, tally it."""

    def run():
        from cinefx.errors import OptionError

        _check_range("--port", port, 1, 65535)
        _check_range("--trials", trials, 1, MAX_TRIALS)
        if tally and serve:
            raise OptionError("--tally and --serve: give one of them")
        if tally or serve:
            if output is not None:
                raise OptionError("-o makes a new study; --tally and --serve take the study folder as the argument")
            return _rate_tally(paths[0], paths[1:], as_json) if tally else _rate_serve(paths, port)
        if output is None:
            raise OptionError("-o STUDY: name the study folder to make")
        from cinefx.rate import StudyOptions, make_study

        study = make_study(paths, output, StudyOptions(questions=questions, seed=seed, trials=trials))
        for note in study.notes:
            _info(note)
        _info(f"study of {_count(study.trials, 'trial')} written to {study.folder}: open {study.page} in a "
              f"browser (answers download as JSON), or run `cinefx rate --serve {study.folder}`; then "
              f"`cinefx rate --tally {study.folder} [ANSWER FILES]`")

    _run(run)


def _rate_tally(folder: Path, files: list[Path], as_json: Path | None) -> None:
    from cinefx.rate import render_table, tally_study

    t = tally_study(folder, files)
    _show(render_table(t))
    _info(f"tally written to {t.write_json(as_json or folder / 'tally.json')}")


def _rate_serve(paths: list[Path], port: int) -> None:
    from cinefx.errors import OptionError
    from cinefx.rate import StudyServer

    if len(paths) != 1:
        raise OptionError("--serve takes one study folder")
    server = StudyServer(paths[0], port)
    _info(f"serving {paths[0]} at {server.url} (this machine only); answers go to {paths[0] / 'answers'}; "
          "Ctrl-C stops")
    try:
        server.serve_forever()
    finally:
        server.server_close()


@app.command()
def models(
    model: Annotated[Optional[str], typer.Option(help="Base model: folder, .safetensors or hub id (default $CINEFX_MODEL, else SD1.5).")] = None,
    controlnet: Annotated[list[str], typer.Option(help="ControlNet for a control, KIND=folder|file|hub-id; repeatable.")] = [],
    depth_model: Annotated[Optional[str], typer.Option(help="Depth estimator (transformers folder or hub id).")] = None,
    annotators: Annotated[Optional[str], typer.Option(help="controlnet-aux annotator weights (folder or hub id).")] = None,
    control: Annotated[list[str], typer.Option(help="Control kinds to check (default canny and depth; also lineart, softedge, openpose, normal, mlsd).")] = [],
    allow_pickle: Annotated[bool, _flag("--allow-pickle", help="Accept pickled .ckpt/.pt/.bin weights.")] = False,
    turbo: Annotated[Optional[str], typer.Option(metavar=_one_of(*TURBO), help="Turbo LoRA to check (default: list every kind's, missing ones not counted as failures).")] = None,
    turbo_lora: Annotated[Optional[str], typer.Option(help="Where --turbo's LoRA is: .safetensors file, folder or hub id.")] = None,
):
    """Show which diffusion weights resolve, from where, and what is missing (nothing is loaded)."""

    def run():
        from rich.table import Table

        from dataclasses import replace

        from cinefx.config import config_path, model_defaults
        from cinefx.controls import BUILTIN_KINDS, CONTROLNETS
        from cinefx.diffusion.models import resolve_models
        from cinefx.diffusion.turbo import TURBO_KINDS, resolve_turbo
        from cinefx.errors import OptionError

        for kind in control:
            if kind not in CONTROLNETS:
                raise _fail(f"--control {kind!r}: unknown control (known: {', '.join(CONTROLNETS)})", EXIT_USAGE)
        spec = _model_spec(model, controlnet, depth_model, annotators, allow_pickle)
        found = resolve_models(spec, tuple(control) or BUILTIN_KINDS)
        if turbo_lora and not turbo:
            raise OptionError("--turbo-lora needs --turbo KIND (the kind whose LoRA it is)")
        where = dict(model_defaults().turbo_lora)
        loras = [replace(resolve_turbo(k, None, turbo_lora or where.get(k), allow_pickle)[0], role=f"turbo-lora {k}")
                 for k in ([turbo] if turbo else TURBO_KINDS)]
        t = Table(title="cinefx diffusion models")
        for col in ("role", "model", "status", "where / what to do"):
            t.add_column(col)
        status = {"folder": "[green]local folder[/]", "file": "[green]local file[/]", "cache": "[green]HF cache[/]",
                  "hub": "[yellow]to download[/]", "missing": "[red]missing[/]"}
        for r in (*found, *loras):
            t.add_row(r.role, escape(_printable(r.spec)), status[r.how],
                      escape(_printable(r.path if r.path and r.ok else r.detail)))
        if config_path().is_file():
            t.caption = escape(f"defaults from {config_path()}")
        _show(t)
        if not all(r.ok for r in (*found, *(loras if turbo else ()))):  # turbo is optional unless asked for
            raise typer.Exit(EXIT_FAILED)

    _run(run)


@app.command("train-preset")
def train_preset(
    stills: Annotated[Path, typer.Argument(help="Folder of images (+ .txt captions), kohya N_name/ folders, or metadata.jsonl.")],
    name: Annotated[str, typer.Option(help="Preset name (also the output folder's name).")],
    method: Annotated[str, typer.Option(metavar=_one_of(*METHODS), help="ti: textual inversion; dreambooth-lora: with prior preservation; pivotal: ti + lora.")] = field_default(*_T, "method"),
    model: Annotated[Optional[str], typer.Option(help="Base model: folder, .safetensors or hub id (default $CINEFX_MODEL, else SD1.5).")] = None,
    trigger: Annotated[Optional[str], typer.Option(help="Trigger word the look binds to (default <NAME>).")] = None,
    caption: Annotated[str, typer.Option(help="Caption for images without a caption file; {trigger} is replaced. 'auto' captions them with the eval captioner ([models.eval] captioner), the trigger prepended.")] = "{trigger}, film still",
    save_captions: Annotated[bool, _flag("--save-captions", help="With --caption auto: write the captions beside the images as NAME.txt.")] = False,
    captioner: Annotated[Optional[str], typer.Option(help="With --caption auto: captioner folder or hub id (default nlpconnect/vit-gpt2-image-captioning).")] = None,
    allow_pickle: Annotated[bool, _flag("--allow-pickle", help="Allow pickled captioner weights (they can run code).")] = False,
    steps: Annotated[int, typer.Option(help="Training steps (0 = images × repeats × epochs ÷ batch).")] = field_default(*_T, "steps"),
    epochs: Annotated[int, typer.Option(help="Passes over the (repeated) images.")] = field_default(*_T, "epochs"),
    repeats: Annotated[int, typer.Option(help="Repeats per image per epoch (0 = the kohya folder's number, else 1).")] = field_default(*_T, "repeats"),
    batch: Annotated[int, typer.Option(help="Images per step.")] = field_default(*_T, "batch"),
    resolution: Annotated[int, typer.Option(help="Training resolution (aspect-ratio buckets of about this squared).")] = field_default(*_T, "resolution"),
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = field_default(*_T, "rank"),
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scale = alpha / rank).")] = field_default(*_T, "alpha"),
    vectors: Annotated[int, typer.Option(help="Textual inversion: vectors behind the trigger.")] = field_default(*_T, "vectors"),
    lr: Annotated[float, typer.Option(help="Learning rate (0 = 1e-4 LoRA, 5e-4 TI).")] = field_default(*_T, "lr"),
    min_snr: Annotated[float, typer.Option("--min-snr", help="Min-SNR loss weighting gamma (0 = off).")] = field_default(*_T, "min_snr_gamma"),
    noise_offset: Annotated[float, typer.Option(help="Offset noise (e.g. 0.05) for deeper blacks and brighter whites.")] = field_default(*_T, "noise_offset"),
    class_prompt: Annotated[str, typer.Option(help="DreamBooth: the class the look belongs to.")] = field_default(*_T, "class_prompt"),
    class_images: Annotated[int, typer.Option(help="DreamBooth: class images generated for prior preservation.")] = field_default(*_T, "class_images"),
    prior_loss_weight: Annotated[float, typer.Option(help="DreamBooth: weight of the prior-preservation loss.")] = field_default(*_T, "prior_loss_weight"),
    no_flip: Annotated[bool, _flag("--no-flip", help="Do not add mirrored copies.")] = False,
    random_crop: Annotated[bool, _flag("--random-crop", help="Random crops each step instead of cached centre crops (slower).")] = False,
    gradient_checkpointing: Annotated[bool, _flag("--gradient-checkpointing", help="Trade speed for memory.")] = False,
    min_side: Annotated[int, typer.Option(help="Skip images whose short side is below this.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same weights.")] = field_default(*_T, "seed"),
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps (0 = only when stopped).")] = field_default(*_T, "checkpoint_every"),
    resume: Annotated[bool, _flag("--resume", help="Continue from the last checkpoint in the output folder.")] = False,
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Preset folder to write (default: the user presets folder / NAME).")] = None,
    precision: Annotated[str, typer.Option(metavar=_one_of(*PRECISIONS), help="Training precision.")] = field_default(*_T, "precision"),
    validation: Annotated[bool, _flag(help="Render the base-vs-preset validation sheet.")] = True,
):
    """Train a preset (LoRA, textual inversion, DreamBooth-LoRA or pivotal) on your own stills."""

    def run():
        import dataclasses

        from cinefx.diffusion.models import ModelSpec, with_user_defaults
        from cinefx.errors import OptionError
        from cinefx.presets import user_dir
        from cinefx.train.data import save_captions as write_captions
        from cinefx.train.data import scan_dataset
        from cinefx.train.export import check_name, export_preset, validation_sheet
        from cinefx.train.loop import TrainConfig, total_steps, train

        check_name(name)  # before anything is written under the presets folder
        from cinefx.presets import bundled_names

        if out is None and name.casefold() in bundled_names():
            raise OptionError(f"--name {name!r}: a bundled preset has that name and yours would hide it; "
                              f"choose another (e.g. {name}-mine) or write it elsewhere with -o")
        if save_captions and caption != "auto":
            raise OptionError("--save-captions writes the captions of --caption auto; add --caption auto")
        word = trigger or f"<{name}>"
        # the preset records the base it was trained on, also when it came from $CINEFX_MODEL or the config
        base = with_user_defaults(ModelSpec(base=model)).base or ""
        cfg = TrainConfig(method=method, model=base, trigger=word, steps=steps, epochs=epochs,
                          repeats=repeats, batch=batch, resolution=resolution, rank=rank, alpha=alpha,
                          vectors=vectors, lr=lr, min_snr_gamma=min_snr, noise_offset=noise_offset,
                          flip=not no_flip, random_crop=random_crop, gradient_checkpointing=gradient_checkpointing,
                          seed=seed, checkpoint_every=checkpoint_every, precision=precision,
                          class_prompt=class_prompt, class_images=class_images, prior_loss_weight=prior_loss_weight)
        cfg.check()
        auto = _captioner(captioner, allow_pickle) if caption == "auto" else None
        data = scan_dataset(stills, word, caption, min_side=min_side, captioner=auto)
        for note in data.notes:
            _info(f"{stills}: {note}")
        if save_captions:
            _info(f"{stills}: {_count(len(write_captions(data)), 'caption')} written beside the images")
        n = total_steps(cfg, data)
        per_epoch = sum(cfg.repeats or i.repeats for i in data.items)
        natural = total_steps(dataclasses.replace(cfg, steps=0), data)
        _info(f"steps: {len(data.items)} images → {per_epoch} samples per epoch × {epochs} epochs ÷ batch {batch} "
              f"= {natural} steps" + (f"; --steps {steps} used instead" if steps else ""))
        folder = out or user_dir() / name
        work = folder / ".train"
        progress = _Progress(f"train {name}", n, unit="steps")
        try:
            host, state = train(cfg, data, work, resume=resume,
                                progress=lambda done, total, loss: progress(done, total, f"loss {loss:.4f}"))
        except KeyboardInterrupt:  # the loop saved a checkpoint at the stop: say how to go on
            progress.close()
            _say(f"cinefx: training stopped; its checkpoint is kept in {work} — run the same command "
                 "with --resume to continue")
            raise
        finally:
            progress.close()
        toml = export_preset(host, cfg, state, folder, name)
        if validation:
            validation_sheet(host, word, folder / "validation.png", size=min(resolution, host.vae_scale_factor
                             * host.unet.config.sample_size))
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        _info(f"preset {name!r} written to {toml} ({state.step} steps, final loss "
              f"{state.losses[-1] if state.losses else float('nan'):.4f}); use it with --preset "
              f"{name if out is None else toml}")

    _run(run)


def _captioner(model, allow_pickle):
    """paths → captions, with the eval captioner (`--captioner`, else the config's, else the default)."""
    from cinefx.config import model_defaults
    from cinefx.eval import caption_images

    cfg = model_defaults()
    chosen = model or dict(cfg.eval).get("captioner")
    return lambda paths: caption_images(paths, chosen, allow_pickle=allow_pickle or cfg.allow_pickle)


@presets_app.callback()
def _presets(ctx: typer.Context):
    """List presets (bundled and user)."""
    if ctx.invoked_subcommand:
        return

    def run():
        from rich.table import Table

        from cinefx.presets import list_presets, load_preset, user_dir

        t = Table(title="cinefx presets", caption=f"user presets folder: {user_dir()}")
        t.add_column("name")
        t.add_column("description")
        t.add_column("file")
        for name, path in list_presets():
            try:
                desc = load_preset(path).description
            except Exception as ex:  # one broken user preset must not hide the others
                desc = f"[invalid: {ex}]"
            t.add_row(*(escape(_printable(v)) for v in (name, desc, path)))
        _show(t)

    _run(run)


@presets_app.command("show")
def presets_show(name: Annotated[str, typer.Argument(help="Preset name or path.")]):
    """Print a preset with every value (defaults marked)."""

    def run():
        from cinefx.presets import describe, load_preset

        p = load_preset(name)
        print(f"# {_printable(p.source)}")
        print(describe(p))

    _run(run)


@presets_app.command("export-lut")
def presets_export_lut(
    name: Annotated[str, typer.Argument(help="Preset name or path.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The .cube file to write.")],
    size: Annotated[int, typer.Option(metavar="[17|33|65]", help="Points a side; 65 follows cinefx within a level.")] = 65,
    input_colorspace: Annotated[Optional[str], typer.Option(help="Make the LUT start from this camera's or display's code values (`cinefx colorspaces`), conversion included.")] = None,
):
    """Write a preset's colour grade as a .cube LUT for Resolve, Premiere or FFmpeg (grain, bloom, vignette and letterbox are not colour and stay out)."""

    def run():
        from cinefx.grade.export import export_look_lut
        from cinefx.presets import load_preset

        if input_colorspace is not None:
            _check_colorspaces(input_colorspace)
        path = export_look_lut(load_preset(name), output, size, input_colorspace)
        _info(f"{name}: {size}³ look LUT written to {path}")

    _run(run)


@presets_app.command("import")
def presets_import(
    file: Annotated[Path, typer.Argument(help="A LoRA (.safetensors, diffusers or kohya/A1111) or textual-inversion embedding.")],
    name: Annotated[Optional[str], typer.Option(help="Preset name (default: the file's stem).")] = None,
    trigger: Annotated[str, typer.Option(help="Trigger word(s) the LoRA was trained with.")] = "",
    token: Annotated[str, typer.Option(help="Token an embedding binds to (default <NAME>).")] = "",
    scale: Annotated[float, typer.Option(help="Recommended scale (default 0.8 LoRA, 1.0 embedding).")] = 0.0,
    base_model: Annotated[str, typer.Option(help="Base model it was trained on (folder or hub id).")] = "",
    kind: Annotated[str, typer.Option(help="lora | textual-inversion: needed for pickles, whose contents cannot be checked.")] = "",
    allow_pickle: Annotated[bool, _flag("--allow-pickle", help="Accept .pt/.ckpt/.bin pickles (they can run code).")] = False,
):
    """Wrap a downloaded LoRA or embedding into a preset in the user presets folder."""

    def run():
        from cinefx.presets import load_preset, user_dir
        from cinefx.train.export import import_adapter

        preset_name = file.stem if name is None else name
        toml = import_adapter(file, preset_name, user_dir() / preset_name, token=token, trigger=trigger,
                              scale=scale, base_model=base_model, allow_pickle=allow_pickle, kind=kind)
        load_preset(toml)  # what was written must load
        _info(f"preset {preset_name!r} written to {toml}; use it with --preset {preset_name}")

    _run(run)


@app.command()
def storyboard(
    shots: Annotated[Path, typer.Argument(help="Text file: one shot description per line.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Contact sheet PNG; each still is written beside it.")],
    preset: Annotated[list[str], typer.Option("--preset", "-p", help="Preset(s), combined as in stylize.")] = ["medium-shot"],
    model: Annotated[Optional[str], typer.Option(help="Base model (default: the preset's, $CINEFX_MODEL, else SD1.5).")] = None,
    size: Annotated[int, typer.Option(help="Short side of each still (0 = the model's native size).")] = 0,
    aspect: Annotated[float, typer.Option(help="Width ÷ height of each still.")] = 16 / 9,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 25,
    seed: Annotated[int, typer.Option(help="Seed of the first still (the next shots use the following seeds).")] = 0,
    overwrite: Annotated[bool, _flag("--overwrite", help="Replace existing files.")] = False,
    allow_pickle: Annotated[bool, _flag("--allow-pickle")] = False,
):
    """Turn shot descriptions into stills in a preset's look, and a contact sheet."""

    def run():
        from cinefx import presets as P
        from cinefx.errors import OptionError
        from cinefx.storyboard import render_storyboard

        for flag, value, least in (("--steps", steps, 1), ("--size", size, 0), ("--seed", seed, 0)):
            if value < least:
                raise OptionError(f"{flag} {value}: must be {least} or more")
        look = P.combine([P.load_preset(n) for n in preset])
        written = render_storyboard(shots, output, look, model=model, size=size, aspect=aspect, steps=steps,
                                    seed=seed, overwrite=overwrite, allow_pickle=allow_pickle)
        _info(f"{shots.name} → {output}: {len(written)} stills")

    _run(run)


def main() -> None:
    from cinefx import interrupt

    interrupt.install()
    try:
        app()
    except KeyboardInterrupt as ex:
        sys.stderr.write("cinefx: interrupted\n")
        sys.exit(interrupt.exit_code(ex))


if __name__ == "__main__":
    main()
