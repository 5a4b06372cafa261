"""cinefx: make existing footage look cinematic.

The library is usable without the CLI::

    from cinefx import stylize, load_preset
    result = stylize.stylize_file("in.mp4", "out.mp4", load_preset("epic"))

Importing ``cinefx`` is cheap: heavy modules (torch, diffusers) load only when an engine needs them.
"""

__version__ = "0.1.0"
