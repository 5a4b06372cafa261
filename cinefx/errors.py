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
