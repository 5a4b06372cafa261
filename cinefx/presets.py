"""Presets: the look of a render, as TOML files validated into frozen dataclasses.

This module is the one place preset defaults live. A preset file has three optional sections::

    description = "Big, warm, high-contrast"

    [prompt]      # what the diffusion engine is asked for
    positive = "epic cinematic film still"
    [diffusion]   # how hard it is asked (and which adapters change the model)
    strength = 0.55
    [diffusion.controls]
    canny = 0.8
    [[diffusion.adapters]]
    kind = "lora"
    path = "weights/my-look.safetensors"
    [grade]       # the colour grade, applied by every engine
    contrast = 0.25

Lookup order for a name: an existing path → the user presets folder (``$CINEFX_PRESETS_DIR`` or
``~/.config/cinefx/presets``) → the presets bundled with cinefx. Relative file paths inside a
preset are relative to the preset file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cinefx.controls import CONTROLNETS
from cinefx.errors import PresetError

MAX_TOML_BYTES = 1 << 20  # presets and the config file are a few hundred bytes
# A preset's name becomes part of file names (its outputs beside the input, its folder in the
# presets folder): nothing that leaves a folder ('..', '/'), hides (a leading '.'), drives the
# terminal (ESC) or that file systems store differently (ASCII only)
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
NAME_RULE = "letters, digits, '-', '_' and '.', not starting with '.', at most 64 characters"


def clip_text(text: str, limit: int = 80) -> str:
    """`text` short enough for a one-line error: at most `limit` characters, the middle elided
    (so the end of a path, its file name, is kept)."""
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[:limit - tail - 1]}…{text[-tail:]}"


def clip_path(path: str | os.PathLike) -> str:
    """A path for an error message: whole unless it is absurdly long."""
    return clip_text(str(path), 160)


def _shown(value: Any) -> str:
    return clip_text(repr(value))


def is_name(name: object) -> bool:
    """Whether `name` is a safe preset name (see `NAME_RULE`)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def is_file(path: Path) -> bool:
    """`path.is_file()`, but False for a name the system refuses (one too long, say), not OSError."""
    try:
        return path.is_file()
    except OSError:
        return False


def _num(default: float, lo: float, hi: float, doc: str, off: float | None = None):
    """A number in [lo, hi], or exactly `off` (the value that turns the effect off) where given."""
    return field(default=default, metadata={"range": (lo, hi), "off": off, "doc": doc})


def _choice(default: str, choices: tuple[str, ...], doc: str):
    return field(default=default, metadata={"choices": choices, "doc": doc})


@dataclass(frozen=True)
class PromptConfig:
    positive: str = field(default="", metadata={"doc": "what every frame should look like"})
    negative: str = field(default="blurry, lowres, watermark, text, jpeg artifacts, deformed",
                          metadata={"doc": "what to steer away from"})
    trigger: tuple[str, ...] = field(default=(), metadata={"doc": "trigger words of the preset's adapters"})


@dataclass(frozen=True)
class Adapter:
    """A weight file that changes the model: a LoRA or a textual-inversion embedding."""

    kind: str = _choice("lora", ("lora", "textual-inversion"), "adapter type")
    path: Path = field(default=Path(), metadata={"doc": "safetensors file, relative to the preset"})
    scale: float = _num(1.0, -4.0, 4.0, "strength of the adapter")
    token: str = field(default="", metadata={"doc": "token a textual inversion binds to"})


TEMPORAL_MODES = ("full", "anchor", "none")
NOISE_PRIORS = ("independent", "shared", "residual", "flow")
TURBO_MODES = ("", "lcm", "hyper-sd", "tcd")  # "" = off; the others are cinefx.diffusion.turbo.TURBO_KINDS
CONTROL_KINDS = tuple(CONTROLNETS)  # canny, depth, and the controlnet-aux annotators


@dataclass(frozen=True)
class DiffusionConfig:
    controls: tuple[tuple[str, float], ...] = field(
        default=(("canny", 0.8), ("depth", 0.5)),
        metadata={"doc": "ControlNets and their conditioning scales"})
    strength: float = _num(0.55, 0.0, 1.0, "img2img strength: 0 keeps the source, 1 ignores it")
    steps: int = _num(20, 1, 200, "denoising steps")
    guidance: float = _num(7.5, 0.0, 30.0, "classifier-free guidance scale")
    temporal: str = _choice("full", TEMPORAL_MODES, "spatial-temporal attention mode")
    noise_prior: str = _choice("residual", NOISE_PRIORS, "how initial noise is shared across frames")
    chunk: int = _num(8, 1, 256, "frames diffused together")
    keyframes: int = _num(0, 0, 1000, "diffuse every K-th frame and propagate (0 = every frame)")
    # A take longer than this is rendered as pieces that share the scene's first frame as anchor,
    # so they can render side by side on a cluster (cinefx.diffusion.engine explains the cost).
    part: int = _num(192, 48, 100_000, "frames of a long take rendered as one piece (0 = never split)", off=0)
    colour_anchor: float = _num(0.5, 0.0, 1.0, "hold colour to the scene's first stylized frame")
    detail: float = _num(0.7, 0.0, 1.0, "source detail finer than the render size, added back to its luma")
    adapters: tuple[Adapter, ...] = field(default=(), metadata={"doc": "LoRA / textual-inversion files"})
    # A few-step distilled LoRA and its sampler (cinefx.diffusion.turbo): turbo_steps steps without
    # guidance replace `steps` and `guidance`.
    turbo: str = _choice("", TURBO_MODES, "few-step LoRA: lcm, hyper-sd or tcd (\"\" = off)")
    turbo_steps: int = _num(0, 0, 8, "steps with turbo (0 = the kind's default, 4)")
    base_model: str = field(default="", metadata={"doc": "base model the adapters were trained on (used when --model is not given)"})


@dataclass(frozen=True)
class GradeConfig:
    """A colour grade. Every value at its default leaves the picture unchanged."""

    lut: Path | None = field(default=None, metadata={"doc": ".cube LUT (3D or 1D), relative to the preset"})
    lut_strength: float = _num(1.0, 0.0, 1.0, "mix of the LUT over the ungraded colour")
    exposure: float = _num(0.0, -4.0, 4.0, "exposure in stops")
    contrast: float = _num(0.0, -0.9, 1.0, "S-curve amount around the pivot (negative flattens)")
    pivot: float = _num(0.45, 0.05, 0.95, "contrast pivot, display-referred")
    black_lift: float = _num(0.0, 0.0, 0.5, "raised blacks, the faded-print look")
    highlight_rolloff: float = _num(0.0, 0.0, 1.0, "soft shoulder compressing highlights")
    temperature: float = _num(0.0, -1.0, 1.0, "white balance: positive warms, negative cools")
    tint: float = _num(0.0, -1.0, 1.0, "white balance: positive magenta, negative green")
    saturation: float = _num(1.0, 0.0, 3.0, "colourfulness; 0 is black and white")
    split_amount: float = _num(0.0, 0.0, 1.0, "split-toning strength")
    shadows_hue: float = _num(190.0, 0.0, 360.0, "hue pushed into the shadows (degrees; 190 = teal)")
    highlights_hue: float = _num(35.0, 0.0, 360.0, "hue pushed into the highlights (35 = orange)")
    split_balance: float = _num(0.0, -1.0, 1.0, "where shadows end and highlights begin")
    vignette: float = _num(0.0, 0.0, 1.0, "edge darkening")
    bloom: float = _num(0.0, 0.0, 2.0, "glow around highlights")
    bloom_threshold: float = _num(0.75, 0.0, 1.0, "brightness where the glow starts")
    bloom_radius: float = _num(0.02, 0.001, 0.2, "glow radius as a share of frame height")
    halation: float = _num(0.0, 0.0, 2.0, "red-orange film halation around highlights")
    grain: float = _num(0.0, 0.0, 1.0, "film grain strength")
    grain_size: float = _num(1.0, 0.5, 4.0, "grain size in pixels at 1080 lines")
    letterbox: float = _num(0.0, 1.0, 4.0, "bars to this aspect ratio, e.g. 2.39 (0 = none)", off=0.0)

    @property
    def is_identity(self) -> bool:
        return self == GradeConfig()


@dataclass(frozen=True)
class Preset:
    name: str
    description: str = ""
    prompt: PromptConfig = PromptConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    grade: GradeConfig = GradeConfig()
    source: Path | None = None  # the file it was read from
    explicit: frozenset[str] = frozenset()  # "section.key" set in the file, for combining presets


_SECTIONS = {"prompt": PromptConfig, "diffusion": DiffusionConfig, "grade": GradeConfig}
_TOP_KEYS = {"name", "description", *_SECTIONS}


def prompt_text(preset: Preset) -> str:
    """The positive prompt the preset renders with: its trigger words, the tokens its textual
    inversions bind to (which must appear to take effect), then its prompt."""
    words = list(preset.prompt.trigger)
    words += [a.token for a in preset.diffusion.adapters
              if a.kind == "textual-inversion" and a.token and a.token not in words]
    return ", ".join(w for w in (*words, preset.prompt.positive) if w)


# -- lookup ------------------------------------------------------------------------------------

def bundled_dir() -> Path:
    """The presets shipped with cinefx: inside the wheel, or `presets/` of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_presets", here.parent / "presets"):
        if candidate.is_dir():
            return candidate
    return here / "_presets"


def user_dir() -> Path:
    if os.environ.get("CINEFX_PRESETS_DIR"):
        return Path(os.environ["CINEFX_PRESETS_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "cinefx" / "presets"


def _candidates(folder: Path, name: str) -> list[Path]:
    return [folder / f"{name}.toml", folder / name / "preset.toml"]


def find_preset(name: str) -> Path:
    """Resolve a preset name or path to its TOML file (see module docstring for the order)."""
    p = Path(name).expanduser()
    looks_like_path = p.suffix == ".toml" or os.sep in name or "/" in name
    if is_file(p):
        return p
    if is_file(p / "preset.toml"):
        return p / "preset.toml"
    if looks_like_path:
        raise PresetError(f"{clip_path(p)}: preset file not found")
    for folder in (user_dir(), bundled_dir()):
        for c in _candidates(folder, name):
            if is_file(c):
                return c
    known = ", ".join(n for n, _ in list_presets())
    raise PresetError(f"unknown preset {_shown(name)} (known: {known}; or give a path to a .toml file)")


def bundled_names() -> set[str]:
    """The names of the presets shipped with cinefx, casefolded (as a case-insensitive disk sees them)."""
    folder = bundled_dir()
    return {f.stem.casefold() for f in folder.glob("*.toml")} | {f.parent.name.casefold()
                                                              for f in folder.glob("*/preset.toml")}


def list_presets() -> list[tuple[str, Path]]:
    """(name, file) of every preset found, user presets shadowing bundled ones of the same name."""
    found: dict[str, Path] = {}
    for folder in (bundled_dir(), user_dir()):
        if not folder.is_dir():
            continue
        for f in sorted(folder.glob("*.toml")):
            found[f.stem] = f
        for f in sorted(folder.glob("*/preset.toml")):
            found[f.parent.name] = f
    return sorted(found.items())


# -- parsing and validation --------------------------------------------------------------------

def load_preset(name_or_path: str | os.PathLike) -> Preset:
    """Find, parse and validate a preset. Raises `PresetError` naming the file, key and value."""
    path = find_preset(str(name_or_path))
    return parse_preset(read_toml(path, PresetError), path)


def read_toml(path: Path, error: type[Exception]) -> dict[str, Any]:
    """A TOML file of cinefx's (a preset, the config) as a dict; a malformed, unreadable or
    oversized (over `MAX_TOML_BYTES`, refused before reading) file raises `error` naming it."""
    where = clip_path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{where}: not a regular file")
        size = st.st_size
        if size <= MAX_TOML_BYTES:
            with open(path, "rb") as f:
                data = f.read(MAX_TOML_BYTES + 1)
            size = len(data)  # it may have grown since
    except OSError as ex:
        raise error(f"{where}: cannot be read ({ex.strerror or type(ex).__name__})") from None
    if size > MAX_TOML_BYTES:
        raise error(f"{where}: {size / 2**20:.1f} MiB is too large for a cinefx TOML file "
                    f"(the limit is {MAX_TOML_BYTES >> 20} MiB)")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{where}: not UTF-8 text") from None
    except (ValueError, RecursionError) as ex:  # tomllib's own errors, and what it lets through
        raise error(f"{where}: not valid TOML ({clip_text(str(ex))})") from None


def parse_preset(raw: dict[str, Any], path: Path) -> Preset:
    for key in raw:
        if key not in _TOP_KEYS:
            raise PresetError(f"{clip_path(path)}: unknown key {_shown(key)} "
                              f"(expected one of {', '.join(sorted(_TOP_KEYS))})")
    name = raw.get("name", path.stem if path.name != "preset.toml" else path.parent.name)
    description = raw.get("description", "")
    for key, value in (("name", name), ("description", description)):
        if not isinstance(value, str):
            raise PresetError(f"{clip_path(path)}: {key} = {_shown(value)}: must be a string")
    if not is_name(name):
        what, fix = ("name =", "change it") if "name" in raw else ("preset name (from the file name)", "set name")
        raise PresetError(f"{clip_path(path)}: {what} {_shown(name)}: use only {NAME_RULE}; {fix}")
    explicit: set[str] = set()
    sections = {}
    for section, cls in _SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise PresetError(f"{clip_path(path)}: [{section}] must be a table, got {_shown(table)}")
        sections[section] = _build(cls, table, path, section)
        explicit.update(f"{section}.{k}" for k in table)
    return Preset(name=name, description=description, source=path, explicit=frozenset(explicit),
                  **sections)


def _exists(path: Path) -> bool:
    """Whether anything is at `path` (a folder, a FIFO, a device): a dangling link is nothing."""
    try:
        return path.exists()
    except OSError:
        return False


def _build(cls, table: dict[str, Any], path: Path, where: str):
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            raise PresetError(f"{clip_path(path)}: unknown key {where}.{clip_text(key)} = {_shown(value)} "
                              f"(known: {', '.join(known)})")
        values[key] = _check(known[key], value, path, f"{where}.{key}")
    return cls(**values)


def _check(f: dataclasses.Field, value: Any, path: Path, key: str) -> Any:
    def bad(why: str) -> PresetError:
        return PresetError(f"{clip_path(path)}: {key} = {_shown(value)}: {why}")

    meta = f.metadata
    if "range" in meta:
        lo, hi = meta["range"]
        want_int = isinstance(f.default, int) and not isinstance(f.default, bool)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("must be a number")
        if want_int and not float(value).is_integer():
            raise bad("must be a whole number")
        if not math.isfinite(value) or not (lo <= value <= hi or value == meta["off"]):
            off = "" if meta["off"] is None else f"{meta['off']:g} (none) or "
            raise bad(f"must be {off}between {lo:g} and {hi:g}")
        return int(value) if want_int else float(value)
    if "choices" in meta:
        if value not in meta["choices"]:
            raise bad(f"must be one of {', '.join(meta['choices'])}")
        return value
    if f.name in ("lut", "path"):
        if not isinstance(value, str) or not value:
            raise bad("must be a file path")
        if f.name == "lut" and Path(value).suffix.lower() != ".cube":
            raise bad("must be a .cube file")
        file = (path.parent / value).expanduser()
        if not is_file(file):
            raise bad(f"{'not a regular file' if _exists(file) else 'file not found'} ({clip_path(file)})")
        return file
    if f.name == "trigger":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("must be a string or a list of strings")
        return tuple(value)
    if f.name == "controls":
        if not isinstance(value, dict):
            raise bad("must be a table of control = scale")
        out = []
        for kind, scale in value.items():
            if kind not in CONTROL_KINDS:
                raise PresetError(f"{clip_path(path)}: {key}.{clip_text(kind)}: unknown control "
                                  f"(known: {', '.join(CONTROL_KINDS)})")
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 2:
                raise PresetError(f"{clip_path(path)}: {key}.{kind} = {_shown(scale)}: "
                                  "must be a number between 0 and 2")
            out.append((kind, float(scale)))
        return tuple(out)
    if f.name == "adapters":
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise bad("must be an array of tables ([[diffusion.adapters]])")
        adapters = tuple(_build(Adapter, v, path, f"{key}[{i}]") for i, v in enumerate(value))
        for i, a in enumerate(adapters):
            if a.path == Path():
                raise PresetError(f"{clip_path(path)}: {key}[{i}].path is missing")
        return adapters
    if isinstance(f.default, str) and not isinstance(value, str):
        raise bad("must be a string")
    return value


# -- combining and overriding ------------------------------------------------------------------

def combine(presets: list[Preset]) -> Preset:
    """Layer presets left to right (`--preset epic --preset long-shot`).

    A later preset overrides only the keys its file sets; prompts and negative prompts are joined,
    trigger words and adapters accumulate, controls merge.
    """
    if not presets:
        raise PresetError("no preset given")
    out = presets[0]
    for p in presets[1:]:
        sections = {}
        for section in _SECTIONS:
            base, top = getattr(out, section), getattr(p, section)
            changes = {}
            for f in fields(base):
                if f"{section}.{f.name}" not in p.explicit:
                    continue
                old, new = getattr(base, f.name), getattr(top, f.name)
                if f.name in ("positive", "negative") and old:
                    new = f"{old}, {new}" if new else old
                elif f.name in ("trigger", "adapters"):
                    new = tuple(old) + tuple(x for x in new if x not in old)
                elif f.name == "controls":
                    new = tuple({**dict(old), **dict(new)}.items())
                changes[f.name] = new
            sections[section] = dataclasses.replace(base, **changes)
        out = Preset(name=f"{out.name}+{p.name}", description=out.description or p.description,
                     source=p.source, explicit=out.explicit | p.explicit, **sections)
    return out


def override(preset: Preset, section: str, **values: Any) -> Preset:
    """A new preset with `values` replacing keys of `section`, validated like file values.

    Values of None are ignored, so CLI options left unset change nothing.
    """
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return preset
    cls = _SECTIONS[section]
    known = {f.name: f for f in fields(cls)}
    checked = {}
    for k, v in values.items():
        try:
            checked[k] = _check(known[k], v, Path("."), f"{section}.{k}")
        except PresetError as ex:
            raise PresetError(f"--{k.replace('_', '-')} {_shown(v)}: {str(ex).split(': ', 2)[-1]}") from None
    new_section = dataclasses.replace(getattr(preset, section), **checked)
    return dataclasses.replace(preset, **{section: new_section},
                               explicit=preset.explicit | {f"{section}.{k}" for k in checked})


def describe(preset: Preset) -> str:
    """The preset as TOML-like text (what `cinefx presets show` prints)."""
    lines = [f'name = "{preset.name}"']
    if preset.description:
        lines.append(f'description = "{preset.description}"')
    for section in _SECTIONS:
        lines.append(f"\n[{section}]")
        obj = getattr(preset, section)
        for f in fields(obj):
            v = getattr(obj, f.name)
            mark = "" if f"{section}.{f.name}" in preset.explicit else "   # default"
            if f.name == "controls":
                v = "{ " + ", ".join(f"{k} = {s:g}" for k, s in v) + " }"
            elif f.name == "adapters":
                v = "[" + ", ".join(f"{a.kind}:{a.path}@{a.scale:g}" for a in v) + "]"
            elif isinstance(v, float):
                v = f"{v:g}"
            elif isinstance(v, (str, Path)):
                v = f'"{v}"'
            elif v is None:
                v = '""'
            lines.append(f"{f.name} = {v}{mark}")
    return "\n".join(lines)
