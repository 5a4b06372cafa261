"""A blinded pairwise preference study of two or more renders of the same sources.

The seed paper's human study shows raters two renders side by side and asks which is more
cinematic (Control-A-Video, Chen et al. 2023: 67.4 % for it against 49.7 % for per-frame
ControlNet); DreamShot (Massaglia et al. 2024) asks three questions of 36 pairs, each answered
"A", "B" or "neither/same". `make_study` builds such a study as a folder a rater opens in a browser:

    study/index.html      the page: no system or source names, nothing loaded from elsewhere
    study/media/*.webm    clips transcoded to VP9 WebM (what Debian's Chromium plays), stills to JPEG,
                          under random names, without the renders' tags
    study/key.json        which system sits on which side of each trial: never loaded by the page,
                          never served by `cinefx rate --serve`
    study/answers/        one file per rater, written by the server (or put there by hand)
"""

from __future__ import annotations

import itertools
import json
import os
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cinefx.errors import InputFileError, MissingFileError, OptionError, OutputError
from cinefx.fsutil import atomic_dir, write_bytes, write_text
from cinefx.stylize import VIDEO_EXTENSIONS
from cinefx.train.data import IMAGE_SUFFIXES

# What raters are asked. The seed's question is the paper's. DreamShot's wording could not be
# retrieved here: these three paraphrase the criteria its survey compares (the shot asked for,
# image quality, agreement with the description), to be checked against the paper before results
# are published as a replication of it.
QUESTIONS = {
    "seed": (("cinematic", "Which is more cinematic?"),),
    "dreamshot": (
        ("shot", "Which better shows the kind of shot intended (close-up, medium or long shot)?"),
        ("quality", "Which has the better image quality?"),
        ("prompt", "Which better matches the description it was made from?"),
    ),
}
ANSWERS = ("A", "B", "N")  # left, right, neither / same
FORMAT = "cinefx-rate/1"



@dataclass(frozen=True)
class StudyOptions:
    questions: str = "seed"  # a key of QUESTIONS
    seed: int = 0  # draws the trials and their sides
    trials: int | None = None  # how many (source, system pair) trials to draw; None: all of them
    video_box: tuple[int, int] = (640, 360)  # clips are scaled to fit, for two side by side on a laptop
    still_box: tuple[int, int] = (960, 540)
    crf: int = 32  # VP9 quality: visually close to the renders at these sizes, small files

    def __post_init__(self):
        if self.questions not in QUESTIONS:
            raise OptionError(f"--questions {self.questions[:40]!r}: choose one of {', '.join(QUESTIONS)}")
        if self.trials is not None and self.trials < 1:
            raise OptionError(f"--trials {self.trials}: must be at least 1")


@dataclass(frozen=True)
class Study:
    folder: Path
    page: Path
    key: Path
    systems: tuple[str, ...]
    sources: tuple[str, ...]
    trials: int
    notes: tuple[str, ...] = ()


def source_key(path: Path) -> str:
    """The name renders of one source share: the file name up to its first dot, so `clip.mp4`,
    `clip.epic.mp4` (stylize's NAME.PRESET.mp4) and `clip.png` match."""
    return path.name.split(".", 1)[0]


def _media_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in VIDEO_EXTENSIONS | IMAGE_SUFFIXES:
            continue
        key = source_key(p)
        if key in found:
            raise OptionError(f"{folder}: {found[key].name!r} and {p.name!r} are both renders of {key!r}; "
                              "keep one render per source in each system's folder")
        found[key] = p
    return found


def collect(systems: list[str | os.PathLike]) -> tuple[tuple[str, ...], dict[str, list[Path]], list[str]]:
    """System names, {source: [its render in each system]} for the sources every system has, notes."""
    paths = [Path(s) for s in systems]
    if len(paths) < 2:
        raise OptionError("cinefx rate: give at least two systems (folders of renders) to compare")
    for p in paths:
        if not p.exists():
            raise MissingFileError(f"{p}: no such file or folder")
    if all(p.is_file() for p in paths):
        files = [{"": p} for p in paths]
    elif all(p.is_dir() for p in paths):
        files = [_media_files(p) for p in paths]
    else:
        raise OptionError("cinefx rate: give either one folder of renders per system or one file per system")
    names = [p.name if p.is_dir() else p.stem for p in paths]
    if len(set(names)) < len(names) or "" in names:
        names = [str(p) for p in paths]
    if len(set(names)) < len(names):
        raise OptionError(f"cinefx rate: {next(n for n in names if names.count(n) > 1)[:80]!r} is given twice")
    common = sorted(set.intersection(*(set(f) for f in files)))
    if not common:
        raise OptionError(f"cinefx rate: no source has a render in every system ({', '.join(n[:40] for n in names)}); "
                          "renders are matched by file name up to the first dot")
    notes = [f"{p}: {len(f) - len(common)} render(s) without a counterpart in every system left out"
             for p, f in zip(paths, files) if len(f) > len(common)]
    return tuple(names), {k: [f[k] for f in files] for k in common}, notes


def _fit(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """`size` scaled down (never up) to fit `box`, aspect kept, both sides even (4:2:0 chroma)."""
    w, h = size
    s = min(1.0, box[0] / w, box[1] / h)
    return max(2, round(w * s / 2) * 2), max(2, round(h * s / 2) * 2)


def transcode_video(src: Path, dst: Path, box: tuple[int, int], crf: int) -> None:
    """Re-encode `src` as silent VP9 WebM fitting `box`, with its frame times and nothing of its
    tags (a render's comment names its preset). libvpx-vp9 in realtime mode at cpu-used 8: about
    140 frames/s at 640x360 on two cores, so a study of a few minutes of footage builds in minutes."""
    import av

    from cinefx.video.probe import probe
    from cinefx.video.reader import read_frames

    info = probe(src)
    size = _fit(info.display_size, box)
    tb = info.time_base
    try:
        with av.open(str(dst), "w", format="webm") as out:
            stream = out.add_stream("libvpx-vp9", rate=info.fps, options={
                "crf": str(crf), "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1"})
            stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
            stream.codec_context.time_base = tb
            first = None
            for f in read_frames(info, size=size):
                first = f.pts if first is None else first
                frame = av.VideoFrame.from_ndarray(f.rgb, format="rgb24")
                frame.pts, frame.time_base = f.pts - first, tb
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    except av.error.FFmpegError as ex:
        raise InputFileError(f"{src}: cannot be transcoded for the study ({ex})") from ex


def transcode_still(src: Path, dst: Path, box: tuple[int, int]) -> None:
    import cv2

    img = cv2.imread(str(src), cv2.IMREAD_COLOR)  # applies EXIF orientation; drops every tag
    if img is None:
        raise InputFileError(f"{src}: cannot be read as an image")
    w, h = _fit((img.shape[1], img.shape[0]), box)
    if (w, h) != (img.shape[1], img.shape[0]):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    write_bytes(dst, cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes())


def draw_trials(sources: list[str], systems: int, options: StudyOptions) -> list[tuple[str, int, int]]:
    """(source, left system, right system) per trial, in page order. Every source meets every pair
    of systems once; with `options.trials` a seeded random subset is kept. Sides are balanced: each
    system of a pair is on the left in half the trials (one more where their number is odd)."""
    rng = random.Random(options.seed)
    combos = [(s, i, j) for s in sources for i, j in itertools.combinations(range(systems), 2)]
    rng.shuffle(combos)
    combos = combos[:options.trials]
    flips = [k % 2 == 1 for k in range(len(combos))]
    rng.shuffle(flips)
    return [(s, j, i) if flip else (s, i, j) for (s, i, j), flip in zip(combos, flips)]


def make_study(systems: list[str | os.PathLike], folder: str | os.PathLike,
               options: StudyOptions = StudyOptions()) -> Study:
    """Build the study of `systems` (one folder of renders each, or one file each) in `folder`,
    which must not exist or be empty. The folder appears complete or not at all: it is built
    beside its target under a hidden name and renamed into place."""
    from cinefx.rate.page import page_html

    folder = Path(folder)
    names, sources, notes = collect(systems)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise OutputError(f"{folder}: exists and is not an empty folder; a study needs a folder of its own")
    if not folder.parent.is_dir():
        raise OutputError(f"{folder}: folder {folder.parent} does not exist")
    trials = draw_trials(list(sources), len(names), options)
    questions = QUESTIONS[options.questions]
    study_id = secrets.token_hex(8)
    with atomic_dir(folder) as tmp:  # replaces an empty folder too
        (tmp / "media").mkdir()
        media: dict[tuple[str, int], str] = {}
        for source, *pair in trials:
            for system in pair:
                if (source, system) in media:
                    continue
                src = sources[source][system]
                still = src.suffix.lower() in IMAGE_SUFFIXES
                name = f"media/{secrets.token_hex(8)}{'.jpg' if still else '.webm'}"
                if still:
                    transcode_still(src, tmp / name, options.still_box)
                else:
                    transcode_video(src, tmp / name, options.video_box, options.crf)
                media[source, system] = name
        public = {
            "format": FORMAT, "study": study_id,
            "questions": [{"id": q, "text": t} for q, t in questions],
            "trials": [{"id": f"t{n}", "kind": "image" if media[s, a].endswith(".jpg") else "video",
                        "a": media[s, a], "b": media[s, b]} for n, (s, a, b) in enumerate(trials, 1)],
        }
        key = {
            "format": FORMAT, "study": study_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seed": options.seed, "question_set": options.questions,
            "questions": public["questions"],
            "systems": [{"name": n, "path": str(Path(p).resolve())} for n, p in zip(names, systems)],
            "sources": {s: [str(p) for p in sources[s]] for s in sources},
            "trials": {f"t{n}": {"source": s, "a": names[a], "b": names[b]} for n, (s, a, b) in enumerate(trials, 1)},
        }
        write_text(tmp / "key.json", json.dumps(key, indent=2))
        write_text(tmp / "index.html", page_html(public))
    return Study(folder=folder, page=folder / "index.html", key=folder / "key.json", systems=names,
                 sources=tuple(sources), trials=len(trials), notes=tuple(notes))


def load_key(folder: str | os.PathLike) -> dict:
    """The study's key (`key.json`), checked enough that tallies and the server can trust it."""
    path = Path(folder) / "key.json"
    if not path.is_file():
        raise MissingFileError(f"{path}: not found; give the folder `cinefx rate -o` made")
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
        assert key["format"] == FORMAT and key["trials"] and key["questions"]
    except (ValueError, KeyError, TypeError, AssertionError) as ex:
        raise InputFileError(f"{path}: not a cinefx study key ({type(ex).__name__})") from ex
    return key

