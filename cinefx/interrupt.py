"""Ctrl-C, SIGTERM and SIGHUP that cannot get lost.

All stop a run the same way: a KeyboardInterrupt (`Terminated` for SIGTERM, which is what a batch
scheduler, `timeout` or `kill` sends, and for SIGHUP, which a closed terminal or a dropped ssh
connection sends), so every cleanup path that removes a temporary output or a lock runs. Left to
Python's default, those signals end the process on the spot and leave the hidden temporary file
behind. A SIGHUP that is ignored when the run starts (`nohup`) stays ignored.

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
    """SIGTERM or SIGHUP (`signum`): stop as for Ctrl-C, and exit with 128 + its number rather than 130."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


def _raise() -> None:
    raise KeyboardInterrupt if _signum == signal.SIGINT else Terminated(_signum)


def check() -> None:
    """Raise KeyboardInterrupt (or `Terminated`) if a stop was requested since `install()`."""
    if _requested.is_set():
        _raise()


def _handler(signum, frame) -> None:
    global _signum
    _signum = signum
    _requested.set()
    _raise()


def stopped_by(ex: BaseException | None = None) -> signal.Signals:
    """The signal that stopped the run: `ex`'s, else the last one handled, else SIGINT."""
    if isinstance(ex, Terminated):
        return signal.Signals(ex.signum)
    return signal.Signals(_signum) if _requested.is_set() else signal.SIGINT


def exit_code(ex: BaseException | None = None) -> int:
    """What a shell reports for the signal that stopped the run: 128 + its number (130 for
    Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""
    return 128 + stopped_by(ex)


def install() -> None:
    """Handle SIGINT, SIGTERM and SIGHUP as above (main thread only, as Python requires)."""
    if threading.current_thread() is threading.main_thread():
        _requested.clear()
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            signal.signal(signal.SIGHUP, _handler)
