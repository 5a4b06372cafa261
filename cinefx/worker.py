"""A thread that works a few items behind its caller (the encoder and the meters use one each), and
the meters' base class.

OpenCV, NumPy and PyAV (inside x264) let go of the GIL, so work handed to such a thread overlaps
the caller's next frame.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class Worker:
    """Calls `fn(item)` for each `put(item)`, in order, on a thread of its own, at most `depth`
    items behind. An exception in `fn` is kept (passed through `on_error` first) and raised at the
    caller's next `put()` or at `finish()`; after it, queued items are dropped, so `put()` never
    blocks on a thread that has given up."""

    def __init__(self, fn: Callable[[Any], None], depth: int, name: str,
                 on_error: Callable[[Exception], BaseException] = lambda ex: ex):
        self._fn, self._on_error = fn, on_error
        self._queue: queue.Queue = queue.Queue(depth)
        self._failure: BaseException | None = None
        self._dropping = False
        self._thread: threading.Thread | None = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, item) -> None:
        while True:  # a bounded wait, so a thread that died some other way is an error, not a hang
            self.check()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                pass

    def check(self) -> None:
        """Raise the thread's failure, if it had one."""
        if self._failure is not None:
            raise self._failure
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the worker thread has stopped")

    def finish(self) -> None:
        """Wait for the items already put, then raise the thread's failure, if any."""
        self.close()
        if self._failure is not None:
            raise self._failure

    def close(self, drop: bool = False) -> None:
        """Stop the thread after the items already put (or dropping them); raises nothing."""
        self._dropping = self._dropping or drop
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._thread = None

    def _loop(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._failure is not None or self._dropping:
                continue
            try:
                self._fn(item)
            except Exception as ex:
                self._failure = self._on_error(ex)


class Meter:
    """Base of the report's meters: `_measure(*item)` runs in the caller's thread, or, with
    `background`, on a `Worker` of its own a few frames behind (OpenCV lets go of the GIL, so the
    measuring overlaps the caller's next frame)."""

    QUEUE_FRAMES = 8

    def __init__(self, background: bool, name: str):
        self._worker = Worker(lambda call: call[0](*call[1:]), self.QUEUE_FRAMES, name) if background else None

    def _measure(self, *item) -> None:  # pragma: no cover - every meter defines it
        raise NotImplementedError

    def _splice(self, scene: int, values: dict) -> None:  # pragma: no cover - every meter defines it
        raise NotImplementedError

    def _submit(self, *item) -> None:
        self._in_order(self._measure, *item)

    def splice(self, scene: int, values: dict) -> None:
        """Append pairs measured elsewhere (`export` of another meter over the frames that follow),
        by the subclass's `_splice`."""
        self._in_order(self._splice, scene, values)

    def _in_order(self, fn, *args) -> None:
        """Call `fn(*args)` after the frames submitted before it are measured."""
        if self._worker is None:
            fn(*args)
        else:
            self._worker.put((fn, *args))

    def finish(self) -> None:
        """Wait for the frames still being measured; the results are complete afterwards."""
        if self._worker is not None:
            self._worker.finish()

    def close(self) -> None:
        """Stop the measuring thread (after the frames already queued); raises nothing."""
        if self._worker is not None:
            self._worker.close()
