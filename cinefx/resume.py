"""Resume for long diffusion runs: finished scenes are kept in a work folder beside the output.

``.<output name>.cinefx-work/`` holds ``run.json`` (a key over everything that decides the
rendered pixels: the input file, the preset's prompt and diffusion sections, seed, models, engine
settings, scene detection) and one lossless FFV1 file per finished scene. A re-run with the same
key reads finished scenes back instead of rendering them, and renders the rest; because every scene
is rendered from its own seed (see `cinefx.diffusion.engine.scene_seed`), the result is the same
as an uninterrupted run. A different key clears the folder. The folder is removed once the output
is complete. Stored frames are the engine's output before the grade, which is cheap and re-run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from cinefx import __version__


def run_key(**parts) -> str:
    """A stable hash of `parts` (dataclasses, paths, numbers, strings)."""

    def plain(x):
        if is_dataclass(x):
            return plain(asdict(x))
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
        if isinstance(x, (list, tuple, frozenset, set)):
            items = [plain(v) for v in x]
            return sorted(items, key=repr) if isinstance(x, (set, frozenset)) else items
        if isinstance(x, Path):
            return str(x)
        return x if isinstance(x, (int, float, str, bool, type(None))) else repr(x)

    blob = json.dumps({"cinefx": __version__, **plain(parts)}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# FFV1 keeps natural frames in about half their raw bgr0 size; rendered frames, with their fine
# detail, rarely do better.
FFV1_BYTES_PER_PIXEL = 2.0


def space_needed(frames: int, width: int, height: int) -> int:
    """Bytes a work folder needs to hold `frames` frames of (width, height), all scenes kept."""
    return int(frames * width * height * FFV1_BYTES_PER_PIXEL)


def file_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class WorkFolder:
    """Finished scenes of one run (see module docstring). Scenes are recorded in order."""

    def __init__(self, output: Path, key: str):
        self.path = output.parent / f".{output.name}.cinefx-work"
        self.key = key
        self._recording: tuple[int, av.container.OutputContainer, av.video.stream.VideoStream, Path] | None = None
        self._reading: tuple[int, Iterator[np.ndarray]] | None = None
        self.reused: list[int] = []

    def open(self) -> None:
        manifest = self.path / "run.json"
        if self.path.is_dir():
            try:
                same = json.loads(manifest.read_text()).get("key") == self.key
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.path)
        self.path.mkdir(exist_ok=True)
        manifest.write_text(json.dumps({"key": self.key, "cinefx": __version__}))
        for stale in self.path.glob("*.partial.mkv"):
            stale.unlink()

    def _file(self, scene: int) -> Path:
        return self.path / f"scene-{scene:05d}.mkv"

    def has(self, scene: int) -> bool:
        return self._file(scene).is_file()

    def read(self, scene: int, count: int) -> np.ndarray:
        """The next `count` stored frames of `scene`, (count, H, W, 3) uint8."""
        if self._reading is None or self._reading[0] != scene:
            self._reading = (scene, self._frames(scene))
            self.reused.append(scene)
        frames = [next(self._reading[1]) for _ in range(count)]
        return np.stack(frames)

    def _frames(self, scene: int) -> Iterator[np.ndarray]:
        with av.open(str(self._file(scene))) as c:
            for f in c.decode(video=0):
                yield f.to_ndarray(format="rgb24")

    def begin(self, scene: int) -> None:
        """Frames of `scene` come next: the scene recorded so far is complete, so finish it now
        (before the new scene's render, which may be interrupted)."""
        if self._recording is not None and self._recording[0] != scene:
            self.finish()

    def record(self, scene: int, frames: np.ndarray) -> None:
        """Append rendered frames (F, H, W, 3) uint8 to `scene`'s file."""
        self.begin(scene)
        if self._recording is None:
            part = self.path / f"scene-{scene:05d}.partial.mkv"
            c = av.open(str(part), "w")
            s = c.add_stream("ffv1", rate=Fraction(24))
            s.width, s.height = frames.shape[2], frames.shape[1]
            s.pix_fmt = "bgr0"  # RGB with a pad byte: lossless, no colour conversion either way
            self._recording = (scene, c, s, part)
        _, c, s, _ = self._recording
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="bgr0")):
                c.mux(p)

    def finish(self) -> None:
        """Close the scene being recorded and move it into place: only now does it count as done."""
        if self._recording is None:
            return
        scene, c, s, part = self._recording
        self._recording = None
        for p in s.encode(None):
            c.mux(p)
        c.close()
        os.replace(part, self._file(scene))

    def abandon(self) -> None:
        """Stop recording without keeping the unfinished scene (the run was interrupted)."""
        if self._recording is not None:
            _, c, _, part = self._recording
            self._recording = None
            try:
                c.close()
            finally:
                part.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
