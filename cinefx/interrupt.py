"""Ctrl-C that cannot get lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when the signal is handled.
If that is inside a callback C code made into Python (PyAV's FFmpeg log callback is one), the
exception is printed as "ignored" and dropped, and the run carries on to the end as if nothing had
happened. So the CLI's handler also records the request, and the long loops (frames, training
steps) call `check()`, which raises it again at a safe place.

The library never installs a handler itself: embedding applications keep their own.
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed since `install()`."""
    if _requested.is_set():
        raise KeyboardInterrupt


def _handler(signum, frame) -> None:
    _requested.set()
    raise KeyboardInterrupt


def install() -> None:
    """Handle SIGINT as above (main thread only, as Python requires)."""
    if threading.current_thread() is threading.main_thread():
        _requested.clear()
        signal.signal(signal.SIGINT, _handler)
