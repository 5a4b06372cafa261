"""Renderers: one interface for every engine, `render(frames, scene, start) -> frames`.

`frames` are one run of a scene in display order ((F, H, W, 3) uint8, or a sequence of (H, W, 3)
uint8 frames), `scene` the scene's 0-based index and `start` the index of `frames[0]` in the video;
the result has the same count and shape. State that must not cross a cut (diffusion anchors, the
noise prior's carry) resets when `scene` changes. `run_length` is how many frames a renderer wants
per call: the scene stream cuts runs of that length from each scene's first frame, so a scene's
result never depends on how much memory the caller has. The registry (`cinefx.engines.RENDERERS`)
maps engine names to these classes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cinefx.errors import OptionError
from cinefx.grade.grader import Grader
from cinefx.presets import Preset

# Frames per run for a renderer that has no preference of its own: bounds memory to one run.
RUN_FRAMES = 48
# Beyond these a render only exhausts memory (a 100000-pixel render asks cv2 for 53 GB): SD1.5
# renders near 512 and degrades well before 2048; a batch's frames share one attention call.
MAX_SIZE, MAX_BATCH = 2048, 1024


def run_frames(batch: int) -> int:
    """Frames per run of a diffusion renderer batching `batch` frames: whole batches, at least
    `RUN_FRAMES` when the batch is smaller, so batches fall at the same frames however runs are cut."""
    return batch * max(1, RUN_FRAMES // batch)


def lengths(name: str, preset: Preset, settings: EngineSettings) -> tuple[int, int]:
    """(run_length, part) of the renderer `name` would build for `preset` and `settings`, without
    building it (which, for diffusion, loads the models)."""
    if name != "diffusion":
        return RUN_FRAMES, 0
    batch = settings.batch or preset.diffusion.chunk  # the engine's nominal batch
    return run_frames(batch), part_frames(preset.diffusion.part, batch)


def part_frames(part: int, batch: int) -> int:
    """Frames per piece of a long scene (a preset's `part`, 0 = a scene is one piece), rounded up
    to whole runs so that pieces begin where runs do."""
    run = run_frames(batch)
    return -(-part // run) * run


@dataclass(frozen=True)
class EngineSettings:
    """How the diffusion engine runs, as opposed to the look the preset asks for."""

    seed: int = 0
    size: int = 0  # short side of the render in pixels; 0 = the model's native size (512 for SD1.5)
    batch: int = 0  # frames per pipeline call; 0 = the preset's chunk, capped by free GPU memory
    scheduler: str = "dpm++"
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    turbo_lora: str | None = None  # the preset's turbo LoRA: file, folder or hub id (None = config file, else hub)
    compile: bool = False  # torch.compile the UNet, ControlNets and VAE decoder (models.SpeedOptions.compile)
    # torch threads for a render on the CPU (0 = torch's default): float sums on the CPU can round
    # differently with another count, so it is part of the resume key; a cluster pins it to 1
    threads: int = 0

    def __post_init__(self):
        if not 0 <= self.size <= MAX_SIZE:
            raise OptionError(f"--size {str(self.size)[:24]}: must be 0 (the model's native size) or a short side of "
                              f"up to {MAX_SIZE} pixels (SD1.5 renders near 512)")
        if not 0 <= self.batch <= MAX_BATCH:
            raise OptionError(f"--batch {str(self.batch)[:24]}: must be 0 (the preset's chunk) or up to {MAX_BATCH} frames")


class Renderer(Protocol):
    name: str
    run_length: int
    part: int  # frames per piece of a scene (0: a scene is one piece); see `DiffusionRenderer`

    def render(self, frames: Sequence[np.ndarray], scene: int, start: int) -> Sequence[np.ndarray]: ...

    def scene_state(self) -> bytes | None: ...

    def prime(self, scene: int, at: int, state: bytes | None, lead: np.ndarray | None) -> None: ...

    def close(self) -> None: ...


class GradeRenderer:
    """The preset's grade, frame by frame: frames are neither stacked nor copied on the way in,
    and come back as an iterator, graded a few frames ahead on worker threads (`Grader.grade_many`).
    An identity grade hands the frames back as they are."""

    name = "grade"
    needs_model = False

    def __init__(self, preset: Preset, size: tuple[int, int], seed: int, engine=None):
        self.grader = Grader(preset.grade, size, seed=seed)
        self.run_length, self.part = RUN_FRAMES, 0

    def scene_state(self) -> bytes | None:
        return None  # frames are graded on their own: nothing carries from one to the next

    def prime(self, scene: int, at: int, state: bytes | None, lead: np.ndarray | None) -> None:
        pass

    def render(self, frames: Sequence[np.ndarray], scene: int, start: int) -> Iterator[np.ndarray] | Sequence[np.ndarray]:
        if self.grader.is_identity:
            return frames
        return self.grader.grade_many(zip(frames, range(start, start + len(frames))))

    def close(self) -> None:
        self.grader.close()


class DiffusionRenderer(GradeRenderer):
    """The diffusion engine (`cinefx.diffusion.engine.DiffusionEngine`), then the preset's grade.
    Runs are `run_frames` of the engine's batch, so a preset's chunk is never capped by the run
    length. A scene longer than `part` frames renders as pieces (see the engine): piece k can be
    rendered anywhere once the scene's first batch is known, given `scene_state()` and the frame
    before the piece (`prime`)."""

    name = "diffusion"
    needs_model = True

    def __init__(self, preset: Preset, size: tuple[int, int], seed: int, engine=None):
        super().__init__(preset, size, seed)
        self.engine = engine
        self.run_length, self.part = lengths(self.name, preset, engine.settings)

    def scene_state(self) -> bytes | None:
        """What the current scene's later pieces start from (`SceneState`, as bytes), once its first
        batch is rendered."""
        state = self.engine.scene_state()
        return None if state is None else state.to_bytes()

    def prime(self, scene: int, at: int, state: bytes | None, lead: np.ndarray | None) -> None:
        """Render scene `scene` from frame `at` (0, afresh; or a piece's first frame) on: `state`
        from `scene_state()` of whoever rendered its first batch, `lead` (H, W, 3) uint8 the input
        frame before `at`."""
        self.engine.prime(scene, at, state, lead)

    def render(self, frames: Sequence[np.ndarray], scene: int, start: int) -> Sequence[np.ndarray]:
        stacked = frames if isinstance(frames, np.ndarray) else np.stack(frames)
        return super().render(self.engine.render(stacked, scene), scene, start)
