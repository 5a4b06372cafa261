"""cinefx: make existing footage look cinematic.

The library is usable without the CLI::

    from cinefx import stylize, load_preset
    result = stylize.stylize_file("in.mp4", "out.mp4", load_preset("epic"))

Importing ``cinefx`` is cheap: `load_preset` and the `stylize` module are imported on first use,
and heavy modules (torch, diffusers) only when an engine needs them.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # PEP 562: `cinefx.load_preset` imports the preset module on first access, not with the package
    if name == "load_preset":
        from cinefx.presets import load_preset

        return load_preset
    raise AttributeError(f"module 'cinefx' has no attribute {name!r}")
