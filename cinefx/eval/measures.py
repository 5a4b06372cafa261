"""`evaluate`: how a render compares with its source, per scene and overall; `evaluate_stills`.

Weight-free, per adjacent pair (t, t+1) within a scene, at the report's analysis width:
  - warp error (`cinefx.eval.warp`, Lai et al. 2018), the render's and the source's;
  - PSNR / T-SSIM Δ: render − source of `cinefx.metrics`' adjacent-frame figures.
With model weights (`cinefx.eval.models`):
  - CLIP frame consistency: mean cosine of adjacent frames' CLIP image embeddings (the source's beside it);
  - content similarity (Cinematic Frame Generation): frame t of source and render captioned by ViT-GPT2,
    cosine of the captions' all-MiniLM-L6-v2 embeddings;
  - DINO (DreamShot): cosine of the ViT-S/16 DINO embeddings of frame t of render and source;
  - CLIP-T: cosine of frame t's CLIP image embedding and the prompt's text embedding.
`every` = N measures the pairs (t, t+1) and frames t that lie a multiple of N frames into their scene.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cinefx.errors import InputFileError, MissingFileError, ModelError, OptionError, PresetError
from cinefx.eval.models import BATCH, NEEDS, EvalModels, EvalModelSpec, missing_note, read_image, resolve_eval_models
from cinefx.eval.warp import WarpMeter, metric_size, sampled
from cinefx.metrics import DEFAULT_METRIC_WIDTH, FrameStats, psnr, ssim_stats
from cinefx.scenes import DetectorOptions, Scene, SceneDetector, scenes_from_boundaries, thumbnail_size
from cinefx.video.probe import VideoInfo, probe
from cinefx.video.reader import read_frames

# progress(frames done, frames in all, message or None), as `cinefx.stylize.Progress`
Progress = Callable[[int, int, str | None], None]

MODEL_KEYS = ("clip_consistency", "source_clip_consistency", "content_similarity", "dino", "clip_t", "source_clip_t")
KEYS = ("warp_error", "source_warp_error", "psnr_delta", "tssim_delta", *MODEL_KEYS)  # as in the JSON and CSV


@dataclass(frozen=True)
class Figures:
    """One render's measures over a span (a scene, or the whole video); None where nothing was
    measured (no pair in the span, the model it needs is missing, or no prompt for CLIP-T)."""

    pairs: int  # adjacent pairs measured
    frames: int  # frames measured by the per-frame measures
    warp_error: float | None = None  # the render's: mean squared intensity error in [0, 1]
    source_warp_error: float | None = None  # the source's own, under the same flow and mask
    psnr_delta: float | None = None  # dB, render − source adjacent-frame PSNR, over pairs finite in both
    tssim_delta: float | None = None
    clip_consistency: float | None = None
    source_clip_consistency: float | None = None
    content_similarity: float | None = None
    dino: float | None = None
    clip_t: float | None = None
    source_clip_t: float | None = None  # the source against the same prompt

    @property
    def warp_error_delta(self) -> float | None:
        return _sub(self.warp_error, self.source_warp_error)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in KEYS}
        d["warp_error_delta"] = self.warp_error_delta
        return {"pairs": self.pairs, "frames": self.frames, **d}


@dataclass(frozen=True)
class RenderResult:
    path: Path
    prompt: str | None  # what CLIP-T measured against
    overall: Figures
    scenes: tuple[Figures, ...]  # one per `Evaluation.scenes`


@dataclass(frozen=True)
class Evaluation:
    source: Path
    frames: int
    scenes: tuple[Scene, ...]
    times: tuple[float, ...]  # display time of each scene's first frame, seconds
    renders: tuple[RenderResult, ...]
    models: tuple[tuple[str, str], ...]  # (role, id) of the models used
    every: int
    metric_size: tuple[int, int]
    notes: tuple[str, ...] = ()


def _sub(a, b):
    return None if a is None or b is None else a - b


def _mean(values) -> float | None:
    return sum(values) / len(values) if values else None


# -- inputs ------------------------------------------------------------------------------------

def _prompt_from_report(path: Path) -> str | None:
    """The prompt a stylize report JSON records, else its preset's prompt."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFileError(f"{path}: report JSON not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as ex:
        raise InputFileError(f"{path}: not a cinefx report JSON ({str(ex)[:100]})") from ex
    if not isinstance(data, dict):
        raise InputFileError(f"{path}: not a cinefx report JSON (expected an object)")
    if isinstance(data.get("prompt"), str):
        return data["prompt"]
    if isinstance(data.get("preset"), str) and data["preset"]:
        from cinefx.presets import combine, load_preset, prompt_text

        try:
            return prompt_text(combine([load_preset(n) for n in data["preset"].split("+")])) or None
        except PresetError:  # a preset file that is not installed here: the caller notes no prompt
            return None
    return None


def _check_same_timing(src: VideoInfo, render: VideoInfo) -> None:
    if src.frame_count and render.frame_count and src.frame_count != render.frame_count:
        raise InputFileError(f"{render.path}: {render.frame_count} frames, the source {src.path.name} has "
                             f"{src.frame_count}: evaluate compares a render with its own source, frame for frame")
    if src.fps and render.fps and abs(float(render.fps / src.fps) - 1) > 0.01:
        raise InputFileError(f"{render.path}: {float(render.fps):.3f} fps, the source {src.path.name} "
                             f"{float(src.fps):.3f}: evaluate needs the same timing as the source")
    a, b = src.width / src.height, render.width / render.height
    if abs(a / b - 1) > 0.01:
        raise InputFileError(f"{render.path}: {render.width}x{render.height} has another shape than the source's "
                             f"{src.width}x{src.height}: evaluate compares a render with its own source")


def _scenes(info: VideoInfo, options: DetectorOptions) -> tuple[list[Scene], list[float]]:
    """The source's scenes and frame times, from a cheap thumbnail decode (as `cinefx scenes`)."""
    det = SceneDetector(options)
    bounds, times = [], []
    for f in read_frames(info, size=thumbnail_size(info.width, info.height), exact=False):
        times.append(float(f.pts * info.time_base))
        bounds += det.push(f.rgb)
    bounds += det.finish()
    if not times:
        raise InputFileError(f"{info.path}: contains no decodable video frames")
    return scenes_from_boundaries(bounds, len(times)), times


def _models_for(models: EvalModelSpec | EvalModels | None, device: str, notes: list[str]) -> EvalModels | None:
    """Load what is there; a default model that is missing is a note, a named one an error."""
    if models is None or isinstance(models, EvalModels):
        return models
    found = resolve_eval_models(models)
    for role, r in found.items():
        if not r.ok and getattr(models, role) is not None:
            raise ModelError(f"{role} model {r.spec!r}: {r.detail}")
    if note := missing_note(found):
        notes.append(note)
    # a measure runs only when every model it needs is there
    roles = [role for role in found if any(role in need and all(found[k].ok for k in need) for need in NEEDS.values())]
    return EvalModels(models, roles, device) if roles else None


# -- evaluate ----------------------------------------------------------------------------------

@dataclass
class _Span:
    """Per-pair and per-frame values of one render within one scene."""

    psnr: list[tuple[float, float]] = field(default_factory=list)  # (source, render), finite pairs only
    tssim: list[tuple[float, float]] = field(default_factory=list)
    pairs: int = 0
    frames: int = 0
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)


def _figures(spans: list[_Span], warp) -> Figures:
    """Means over the pairs and frames of `spans`; warp: (source, render) warp errors."""
    def mean(key):
        return _mean([v for s in spans for v in s.values.get(key, ())])

    def delta(attr):
        pairs = [p for s in spans for p in getattr(s, attr)]
        return None if not pairs else _mean([r for _, r in pairs]) - _mean([s for s, _ in pairs])

    return Figures(pairs=sum(s.pairs for s in spans), frames=sum(s.frames for s in spans),
                   warp_error=warp[1], source_warp_error=warp[0], psnr_delta=delta("psnr"),
                   tssim_delta=delta("tssim"), **{k: mean(k) for k in MODEL_KEYS})


class _ModelBatch:
    """Frames waiting for the models, measured BATCH at a time in display order. Pair measures
    carry the previous frame's embedding across batches."""

    def __init__(self, models: EvalModels, prompts: list[str | None], spans: dict):
        self.m, self.spans = models, spans
        self.queue: list[tuple[int, int, bool, bool, list[np.ndarray]]] = []
        self.prev: tuple[int, np.ndarray] | None = None  # (frame, CLIP embeddings of all videos)
        self.clip = "clip" in models.roles
        self.content = "captioner" in models.roles and "sentence" in models.roles
        self.dino = "dino" in models.roles
        known = [p for p in prompts if p is not None]
        text = dict(zip(known, models.embed_clip_texts(known))) if self.clip and known else {}
        self.prompts = [text.get(p) for p in prompts]

    def add(self, index: int, scene: int, first: bool, second: bool, frames: list[np.ndarray]) -> None:
        self.queue.append((index, scene, first, second, frames))
        if len(self.queue) >= BATCH:
            self.flush()

    def _embed(self, fn, entries) -> np.ndarray:
        """fn over every video's frame of each entry in one batched call: (entries, videos, D)."""
        return fn([f for q in entries for f in q[4]]).reshape(len(entries), len(entries[0][4]), -1)

    def flush(self) -> None:
        if not self.queue:
            return
        queue, self.queue = self.queue, []
        firsts = [q for q in queue if q[2]]  # the per-frame measures take the first frame of each pair
        if self.clip:
            clip = self._embed(self.m.embed_clip_images, queue)
        if self.dino and firsts:
            dino = self._embed(self.m.embed_dino, firsts)
        if self.content and firsts:
            captions = self.m.caption([f for q in firsts for f in q[4]])
            said = self.m.embed_sentences(captions).reshape(len(firsts), len(firsts[0][4]), -1)
        k = 0  # position among `firsts`
        for j, (index, scene, first, second, frames) in enumerate(queue):
            for r in range(len(frames) - 1):  # video 0 is the source, r + 1 the render
                span = self.spans[r, scene]
                if self.clip and second and self.prev is not None and self.prev[0] == index - 1:
                    span.add("clip_consistency", float(self.prev[1][r + 1] @ clip[j, r + 1]))
                    span.add("source_clip_consistency", float(self.prev[1][0] @ clip[j, 0]))
                if not first:
                    continue
                if self.clip and self.prompts[r] is not None:
                    span.add("clip_t", float(clip[j, r + 1] @ self.prompts[r]))
                    span.add("source_clip_t", float(clip[j, 0] @ self.prompts[r]))
                if self.dino:
                    span.add("dino", float(dino[k, r + 1] @ dino[k, 0]))
                if self.content:
                    span.add("content_similarity", float(said[k, r + 1] @ said[k, 0]))
            if self.clip:
                self.prev = (index, clip[j]) if first else None
            k += first


def _in_step(src: VideoInfo, renders: list[VideoInfo], times: list[float], size: tuple[int, int]):
    """Yield [source frame, each render's frame] at `size`, frame by frame. Refuses a render whose
    frames run out or run on, or are shown at other times (relative to its first frame) than the
    source's by more than a quarter frame."""
    n = len(times)
    step = (times[1] - times[0]) if n > 1 else float(1 / src.fps)
    readers = [read_frames(info, size=size) for info in (src, *renders)]
    origins: list[float] = []
    for index in range(n + 1):
        got = [next(it, None) for it in readers]
        if index == n:
            if late := [info for info, f in zip(renders, got[1:]) if f is not None]:
                raise InputFileError(f"{late[0].path}: more frames than the source's {n}: evaluate compares "
                                     "a render with its own source, frame for frame")
            return
        for info, f in zip((src, *renders), got):
            if f is None:
                raise InputFileError(f"{info.path}: ends after {index} frames, the source has {n}: evaluate "
                                     "compares a render with its own source, frame for frame")
        t = [float(f.pts * info.time_base) for f, info in zip(got, (src, *renders))]
        origins = origins or t
        for info, ti, o in zip(renders, t[1:], origins[1:]):
            if abs((ti - o) - (t[0] - origins[0])) > max(0.25 * step, 0.002):
                raise InputFileError(f"{info.path}: frame {index} is shown at {ti - o:.3f}s, the source's at "
                                     f"{t[0] - origins[0]:.3f}s: evaluate needs the same timing as the source")
        yield [f.rgb if f.rgb.shape[1::-1] == size else _resize(f.rgb, size) for f in got]


def evaluate(source: str | os.PathLike, renders: Sequence[str | os.PathLike], *,
             prompt: str | None = None, reports: Sequence[str | os.PathLike | None] | None = None,
             models: EvalModelSpec | EvalModels | None = EvalModelSpec(), every: int = 1,
             metric_width: int = DEFAULT_METRIC_WIDTH, device: str = "cpu",
             detector: DetectorOptions = DetectorOptions(), progress: Progress | None = None) -> Evaluation:
    """Measure each render of `source` (same frames, same timing), per source scene and overall.

    prompt: what CLIP-T measures against; default each render's prompt from its stylize report
    JSON in `reports` (same order as `renders`; the recorded prompt, else its preset's).
    models: a spec (missing default weights are skipped with a note), loaded models, or None for
    the weight-free measures only. Renders whose frame count or timing differ are refused
    (`InputFileError`) before or while they are read.
    """
    # 1. check inputs
    if every < 1:
        raise OptionError(f"--every {every}: must be 1 or more (measure every Nth pair)")
    if not renders:
        raise OptionError("no render given: name one or more renders of the source")
    if reports is not None and len(reports) != len(renders):
        raise OptionError(f"{len(reports)} report(s) for {len(renders)} render(s): give one per render, or none")
    src_info = probe(source)
    infos = [probe(r) for r in renders]
    for info in infos:
        _check_same_timing(src_info, info)
    prompts = [prompt if prompt is not None else _prompt_from_report(Path(rep)) if rep else None
               for rep in (reports or [None] * len(renders))]
    # 2. scenes of the source
    scenes, times = _scenes(src_info, detector)
    n = len(times)
    notes: list[str] = []
    # 3. models
    if progress and models is not None:
        progress(0, n, "loading models")
    loaded = _models_for(models, device, notes)
    if loaded is not None and "clip" in loaded.roles:
        for path, p in zip(renders, prompts):
            if p is None:
                notes.append(f"no CLIP-T for {Path(path).name}: give a prompt, or the report JSON of the run "
                             "that made it (which names its preset)")
    # 4. one pass over source and renders in step, at the metric size
    size = metric_size(src_info.width, src_info.height, metric_width)
    spans = {(r, s.index): _Span() for r in range(len(renders)) for s in scenes}
    warp = WarpMeter(metric_width, every)
    batch = _ModelBatch(loaded, prompts, spans) if loaded is not None else None
    scene_of = np.zeros(n, np.int64)
    for s in scenes:
        scene_of[s.start:s.end] = s.index
    prev = None  # (frames, FrameStats) of a pair's first frame, every video
    for index, frames in enumerate(_in_step(src_info, infos, times, size)):
        scene = int(scene_of[index])
        first, second = sampled(index - scenes[scene].start, every)
        warp.add(scene, frames[0], *frames[1:])
        if first or second:
            stats = [FrameStats(f) for f in frames]
            for r in range(len(renders)):
                span = spans[r, scene]
                span.frames += first
                if second and prev is not None:
                    span.pairs += 1
                    ps, pr = psnr(prev[0][0], frames[0]), psnr(prev[0][r + 1], frames[r + 1])
                    if math.isfinite(ps) and math.isfinite(pr):  # identical frames have no PSNR
                        span.psnr.append((ps, pr))
                    span.tssim.append((ssim_stats(prev[1][0], stats[0]), ssim_stats(prev[1][r + 1], stats[r + 1])))
            prev = (frames, stats) if first and index + 1 < scenes[scene].end else None
            if batch is not None:
                batch.add(index, scene, first, second, frames)
        if progress and (index % 8 == 7 or index == n - 1):
            progress(index + 1, n, None)
    if batch is not None:
        batch.flush()
    # 5. summaries
    warp_rows = warp.scenes()

    def figures(r: int, chosen: list[Scene], w) -> Figures:
        return _figures([spans[r, s.index] for s in chosen],
                        (w.source, w.renders[r]) if w is not None and w.renders else (None, None))

    results = tuple(RenderResult(Path(path), prompts[r], figures(r, scenes, warp.overall()),
                                 tuple(figures(r, [s], warp_rows.get(s.index)) for s in scenes))
                    for r, path in enumerate(renders))
    ids = tuple((role, loaded.spec.id(role)) for role in loaded.roles) if loaded is not None else ()
    return Evaluation(source=Path(source), frames=n, scenes=tuple(scenes), times=tuple(times[s.start] for s in scenes),
                      renders=results, models=ids, every=every, metric_size=size, notes=tuple(notes))


def _resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


# -- stills ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StillScore:
    path: Path
    prompt: str | None
    clip_t: float | None  # cosine of the image's CLIP embedding and its prompt's
    dino: float | None  # mean cosine of its DINO embedding and each reference image's


@dataclass(frozen=True)
class StillsEvaluation:
    generated: Path
    reference: Path | None
    images: tuple[StillScore, ...]
    clip_t: float | None  # means over the images that have the measure
    dino: float | None
    models: tuple[tuple[str, str], ...]
    notes: tuple[str, ...] = ()


def _image_files(folder: Path) -> list[Path]:
    from cinefx.train.data import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise MissingFileError(f"{folder}: no such folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise InputFileError(f"{folder}: holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _still_prompts(files: list[Path], prompts_file: Path | None) -> list[str | None]:
    """From `prompts_file`: JSON Lines of {"file_name", "text"} (Hugging Face imagefolder metadata),
    or any other text file, whose text is the prompt of every image. Without it, each image's
    same-name .txt file."""
    if prompts_file is None:
        return [f.with_suffix(".txt").read_text(encoding="utf-8").strip() or None
                if f.with_suffix(".txt").is_file() else None for f in files]
    try:
        text = Path(prompts_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingFileError(f"{prompts_file}: prompts file not found") from None
    except (OSError, UnicodeDecodeError) as ex:
        raise InputFileError(f"{prompts_file}: cannot be read ({str(ex)[:100]})") from ex
    if Path(prompts_file).suffix.lower() != ".jsonl":
        return [text.strip() or None] * len(files)
    by_name = {}
    for k, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_name[str(row["file_name"])] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as ex:
            raise InputFileError(f"{prompts_file}: line {k} is not {{\"file_name\": …, \"text\": …}} "
                                 f"({line[:60]!r})") from ex
    return [by_name.get(f.name) for f in files]


def evaluate_stills(generated_dir: str | os.PathLike, reference_dir: str | os.PathLike | None = None,
                    prompts_file: str | os.PathLike | None = None,
                    models: EvalModelSpec | EvalModels = EvalModelSpec(), device: str = "cpu") -> StillsEvaluation:
    """CLIP-T of each generated image against its prompt, and DINO similarity to the reference
    images (DreamBooth's measure: the mean over generated × reference pairs), per image and averaged."""
    files = _image_files(Path(generated_dir))
    refs = _image_files(Path(reference_dir)) if reference_dir is not None else []
    prompts = _still_prompts(files, Path(prompts_file) if prompts_file is not None else None)
    notes: list[str] = []
    if isinstance(models, EvalModels):
        loaded = models
    else:
        wanted = EvalModelSpec(**{k: getattr(models, k) for k in ("clip", "dino", "allow_pickle")})
        found = resolve_eval_models(wanted, ("clip", "dino") if refs else ("clip",))
        for role, r in found.items():
            if not r.ok and getattr(models, role) is not None:
                raise ModelError(f"{role} model {r.spec!r}: {r.detail}")
        if note := missing_note(found):
            notes.append(note)
        roles = [role for role, r in found.items() if r.ok]
        loaded = EvalModels(wanted, roles, device) if roles else None
    roles = [r for r in (loaded.roles if loaded is not None else ()) if r == "clip" or (r == "dino" and refs)]
    clip_t = [None] * len(files)
    dino = [None] * len(files)
    if "clip" in roles:
        have = [i for i, p in enumerate(prompts) if p is not None]
        if len(have) < len(files):
            notes.append(f"no CLIP-T for {len(files) - len(have)} image(s) without a prompt")
        if have:
            img = loaded.embed_clip_images([read_image(files[i]) for i in have])
            txt = loaded.embed_clip_texts([prompts[i] for i in have])
            for k, i in enumerate(have):
                clip_t[i] = float(img[k] @ txt[k])
    if "dino" in roles and refs:
        ref = loaded.embed_dino([read_image(p) for p in refs])
        gen = loaded.embed_dino([read_image(p) for p in files])
        dino = [float((ref @ g).mean()) for g in gen]
    ids = tuple((role, loaded.spec.id(role)) for role in roles)
    return StillsEvaluation(
        generated=Path(generated_dir), reference=Path(reference_dir) if reference_dir is not None else None,
        images=tuple(StillScore(f, p, c, d) for f, p, c, d in zip(files, prompts, clip_t, dino)),
        clip_t=_mean([v for v in clip_t if v is not None]), dino=_mean([v for v in dino if v is not None]),
        models=ids, notes=tuple(notes))
