"""Ctrl-C and SIGTERM that cannot get lost.

Both stop a run the same way: a KeyboardInterrupt (`Terminated` for SIGTERM, which is what a batch
scheduler, `timeout` or `kill` sends), so every cleanup path that removes a temporary output runs.
Left to Python's default, SIGTERM ends the process on the spot and leaves the hidden temporary
file behind.

Python raises the exception wherever the main thread happens to be when the signal is handled. If
that is inside a callback C code made into Python (PyAV's FFmpeg log callback is one), the
exception is printed as "ignored" and dropped, and the run carries on to the end as if nothing had
happened. So the CLI's handler also records the request, and the long loops (frames, training
steps) call `check()`, which raises it again at a safe place.

The library never installs a handler itself: embedding applications keep their own.
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()
_signum = signal.SIGINT  # the signal behind `_requested`


class Terminated(KeyboardInterrupt):
    """SIGTERM: stop as for Ctrl-C, and exit with 143 rather than 130."""


def _raise() -> None:
    raise Terminated if _signum == signal.SIGTERM else KeyboardInterrupt


def check() -> None:
    """Raise KeyboardInterrupt (or `Terminated`) if a stop was requested since `install()`."""
    if _requested.is_set():
        _raise()


def _handler(signum, frame) -> None:
    global _signum
    _signum = signum
    _requested.set()
    _raise()


def exit_code(ex: BaseException | None = None) -> int:
    """What a shell reports for the signal that stopped the run: 128 + its number (130 for
    Ctrl-C, 143 for SIGTERM)."""
    term = isinstance(ex, Terminated) or (_requested.is_set() and _signum == signal.SIGTERM)
    return 128 + (signal.SIGTERM if term else signal.SIGINT)


def install() -> None:
    """Handle SIGINT and SIGTERM as above (main thread only, as Python requires)."""
    if threading.current_thread() is threading.main_thread():
        _requested.clear()
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)
