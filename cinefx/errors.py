"""Typed errors. Each also subclasses the matching builtin so callers can catch either.

The library raises these; only the CLI turns them into one-line messages and exit codes.
Every message names the file (or option) and says what is wrong with it.
"""

from __future__ import annotations


class CinefxError(Exception):
    """Base class of every error cinefx raises on purpose."""


class InputFileError(CinefxError, ValueError):
    """An input file cannot be used: not a video, broken, truncated, unsupported colour."""


class MissingFileError(CinefxError, FileNotFoundError):
    """A named file or folder does not exist."""


class PresetError(CinefxError, ValueError):
    """A preset is unknown or its TOML is malformed (names file, key and value)."""


class LutError(CinefxError, ValueError):
    """A `.cube` LUT file is malformed."""


class OutputError(CinefxError, OSError):
    """The output cannot be written (folder missing or unwritable, exists without --overwrite)."""


class OutputBusyError(OutputError):
    """Another cinefx run (on this machine or another one sharing the folder) is writing the output."""


class OptionError(CinefxError, ValueError):
    """An option value is impossible (names the option, the value and what is allowed)."""


class EngineUnavailableError(CinefxError, RuntimeError):
    """The requested engine cannot run here (no GPU, no weights, missing package)."""


class ModelError(CinefxError, OSError):
    """Model weights are missing, refused (pickles) or cannot be loaded (names the model and the fix)."""


class AdapterError(CinefxError, ValueError):
    """A LoRA or textual-inversion file is malformed, unsupported (LoHa/LoKr) or refused (pickle)."""


class ConfigError(CinefxError, ValueError):
    """The user's config file is malformed (names the file, the key and the value)."""


class ClusterError(CinefxError, RuntimeError):
    """A Ray cluster cannot be used or run the work (not installed, unreachable, a node failing its
    preflight, every worker lost); names the node and the scene where one is known."""


def unforeseen(ex: BaseException, src=None) -> str:
    """One line for an exception cinefx did not raise on purpose: its type and first line, after
    the file it happened to (`src`) if known; running out of memory says what to ask less of."""
    first = (str(ex).strip().splitlines() or [""])[0][:200]
    where = f"{src}: " if src is not None else ""
    if isinstance(ex, MemoryError) or type(ex).__name__ == "OutOfMemoryError":  # torch's is a RuntimeError
        return (f"{where}out of memory ({first or type(ex).__name__}): try a smaller --size or --batch "
                "(diffusion), fewer or smaller frames, or free memory")
    return f"{where}unexpected {type(ex).__name__}" + (f": {first}" if first else "")
