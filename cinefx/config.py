"""The user's config file: where their weights live, set once instead of on every command line.

``$CINEFX_CONFIG`` or ``~/.config/cinefx/config.toml`` (``$XDG_CONFIG_HOME`` respected)::

    [models]
    base = "/models/sd15"                      # folder, .safetensors file or hub id
    depth = "/models/depth-anything-small"
    annotators = "/models/annotators"
    allow_pickle = false
    [models.controlnets]
    canny = "/models/control_v11p_sd15_canny"
    [models.turbo_lora]                        # --turbo's few-step LoRAs (file, folder or hub id)
    lcm = "/models/lcm-lora-sdv1-5"
    [models.eval]                              # `cinefx eval`'s models (folders or hub ids)
    captioner = "/models/vit-gpt2-image-captioning"
    sentence = "/models/all-MiniLM-L6-v2"
    dino = "/models/dino-vits16"
    clip = "/models/clip-vit-large-patch14"

Precedence, highest first: the command line, ``$CINEFX_MODEL`` (base model only), this file,
companions found inside a local base model folder, the well-known hub ids. Relative paths are
relative to the config file. A missing file is an empty config; a malformed one is an error naming
the file, the key and the value.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from cinefx.errors import ConfigError
from cinefx.presets import clip_path, clip_text, is_file, read_toml


EVAL_ROLES = ("captioner", "sentence", "dino", "clip")  # `cinefx eval`'s models (cinefx.eval.models)


@dataclass(frozen=True)
class ModelDefaults:
    base: str | None = None
    controlnets: tuple[tuple[str, str], ...] = ()
    depth: str | None = None
    annotators: str | None = None
    allow_pickle: bool = False
    eval: tuple[tuple[str, str], ...] = ()  # role → folder or hub id, for `cinefx eval`
    turbo_lora: tuple[tuple[str, str], ...] = ()  # turbo kind → file, folder or hub id


def field_default(module: str, cls: str, name: str):
    """The default of field `name` of dataclass `cls` in `module`, read from its source without
    importing it: the CLI takes its defaults from the dataclasses (one place) while `cinefx --help`
    imports neither torch nor PyAV. Only literal defaults can be read; tests check each against the
    imported field."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    stmt = next(n for n in body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", None) == name)
    return ast.literal_eval(stmt.value)


def config_path() -> Path:
    if os.environ.get("CINEFX_CONFIG"):
        return Path(os.environ["CINEFX_CONFIG"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "cinefx" / "config.toml"


def model_defaults() -> ModelDefaults:
    """The ``[models]`` section of the config file (empty when there is no file)."""
    path = config_path()
    at = clip_path(path)
    if not is_file(path):
        if os.environ.get("CINEFX_CONFIG"):
            raise ConfigError(f"{at}: config file not found (named by $CINEFX_CONFIG)")
        return ModelDefaults()
    data = read_toml(path, ConfigError)
    for key in data:
        if key != "models":
            raise ConfigError(f"{at}: unknown section [{clip_text(key)}] (expected [models])")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"{at}: models must be a table")

    def where(key: str, value) -> str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{at}: models.{key} = {clip_text(repr(value))}: "
                              "must be a path or hub id (a string)")
        p = Path(value).expanduser()
        local = p if p.is_absolute() else path.parent / p
        try:
            found = local.exists()
        except OSError:  # a name the system refuses (too long): not a local model
            found = False
        return str(local) if found else value  # a hub id stays as written

    out = {}
    for key, value in models.items():
        if key in ("base", "depth", "annotators"):
            out[key] = where(key, value)
        elif key == "allow_pickle":
            if not isinstance(value, bool):
                raise ConfigError(f"{at}: models.allow_pickle = {clip_text(repr(value))}: "
                                  "must be true or false")
            out[key] = value
        elif key in ("controlnets", "eval", "turbo_lora"):
            from cinefx.controls import CONTROLNETS
            from cinefx.presets import TURBO_MODES

            known, what = {"controlnets": (CONTROLNETS, "control"), "eval": (EVAL_ROLES, "model"),
                           "turbo_lora": (TURBO_MODES[1:], "turbo kind")}[key]
            if not isinstance(value, dict):
                raise ConfigError(f"{at}: models.{key} must be a table of {what} = path or hub id")
            for name in value:
                if name not in known:
                    raise ConfigError(f"{at}: models.{key}.{clip_text(name)}: unknown {what} "
                                      f"(known: {', '.join(known)})")
            out[key] = tuple((k, where(f"{key}.{k}", v)) for k, v in value.items())
        else:
            raise ConfigError(f"{at}: unknown key models.{clip_text(key)} (expected base, controlnets, depth, "
                              "annotators, allow_pickle, eval, turbo_lora)")
    return ModelDefaults(**out)
