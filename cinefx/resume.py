"""Resume for long diffusion runs, and the lock that keeps two runs off one output.

Finished scenes are kept in a work folder beside the output (a cluster's ``--work-dir`` holds it as
``.<output name>.<8 hex of its path's hash>.cinefx-work/`` instead): ``.<output name>.cinefx-work/`` holds
``run.json`` (a key over everything that decides the rendered pixels: the input file, the preset's
prompt and diffusion sections, seed, models, engine settings, scene detection; and the size and
SHA-256 of every finished scene) and one lossless FFV1 file per finished scene (per piece of a long
take: ``scene-00003.p001.mkv``, and beside the first piece what the later ones start from,
``scene-00003.state.pt``, see `cinefx.diffusion.engine`; a cluster's worker also keeps the report's
measures of its frames, ``scene-00003.p001.measures.json``). A re-run with the
same key reads finished scenes back instead of rendering them, and renders the rest; because every
scene is rendered from its own seed (see `cinefx.diffusion.engine.scene_seed`), the result is the
same as an uninterrupted run. A kept scene whose size or checksum no longer matches (a truncated
copy, a bad disk) is rendered again, never reused. A different key clears the folder. The folder
is removed once the output is complete. Stored frames are the renderer's output (graded), so a
kept scene is written as it was rendered; the grade is part of the key.

Why lossless FFV1 rather than each scene encoded with the output's settings as a closed segment,
joined by stream copy: the kept scene is exactly what the renderer returned, so a resumed run (or a
cluster's assembly, `cinefx.cluster`) feeds the one final encoder the same frames an uninterrupted
run does, and the output is byte-identical whatever was resumed, wherever scenes were rendered, and
whatever codec or colour space the output is written in (changing --crf or --codec on a re-run
reuses every scene). The price is disk: FFV1 measured 1.03 bytes a pixel on natural footage, about
3.1 GB per minute of 1080p at 24 fps (the planning figure in `space_needed` is 2 bytes a pixel, 6 GB),
against about 0.06 GB for x264 crf 18 segments. Where the disk cannot hold it, resume turns itself
off and says so. Segments joined by stream copy remain the way to bring disk use near the output's
size (and to take the final encode off one process in a cluster).

The lock (`OutputLock`) is ``.<output name>.cinefx-lock`` beside the output, created exclusively
and holding the run's host, pid and a heartbeat time a thread refreshes. It works where the folder
is shared by several machines (a pid means nothing on another host, so their locks go stale by the
heartbeat alone).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from cinefx import __version__
from cinefx.errors import OutputBusyError, OutputError
from cinefx.fsutil import (TEMP_MARK, alive, cannot_write, commit, fit_stem, host_name, remove_quietly,
                           temp_path_for, write_bytes, write_text)


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# files kept with a piece, by kind (see `WorkFolder.keep`): their suffix
EXTRAS = {"state": ".state.pt", "measures": ".measures.json"}


def _piece(scene: int, part: int) -> str:
    """A kept unit's name in the manifest: "3" for scene 3 (or its first piece), "3.1" for its second."""
    return f"{scene}.{part}" if part else str(scene)


def _shown(piece: str) -> str:
    """A piece as users count: scene 4, or scene 4 piece 2."""
    scene, _, part = piece.partition(".")
    return f"{int(scene) + 1}" + (f" (piece {int(part) + 1})" if part else "")


def _intact(path: Path, rec: dict) -> bool:
    return path.is_file() and path.stat().st_size == rec["size"] and _sha256(path) == rec["sha256"]


class WorkFolder:
    """Finished scenes of one run (see module docstring). Scenes are recorded in order. The caller
    holds the output's `OutputLock`, so no other run uses the folder meanwhile."""

    def __init__(self, output: Path, key: str, manifest: bool = True):
        self.path = self.beside(output)
        self.key = key
        # False: a worker's view of a folder another process (the cluster's driver) keeps: it writes
        # scene files and hands their records back; the driver enters them (`adopt`)
        self.manifest = manifest
        self._recording: tuple[str, av.container.OutputContainer, av.video.stream.VideoStream, Path] | None = None
        self._reading: tuple[str, Iterator[np.ndarray]] | None = None
        # piece ("3", or "3.1" for a long take's second piece) → {"size", "sha256"} as recorded when
        # it was kept, and the same for each file kept with it (`EXTRAS`) under the file's kind
        self._kept: dict[str, dict] = {}
        self._intact: dict[str, bool] = {}
        self._extras: dict[str, bytes] = {}  # kind → data, to keep with the piece being recorded
        self.reused: list[str] = []
        self.damaged: list[str] = []  # kept pieces that failed their check and were rendered again

    def open(self) -> None:
        manifest = self.path / "run.json"
        if self.path.is_dir():
            try:
                found = json.loads(manifest.read_text())
            except (OSError, ValueError):
                found = {}
            if found.get("key") == self.key:
                self._kept = found.get("scenes", {})
            else:
                shutil.rmtree(self.path)
        self.path.mkdir(exist_ok=True)
        for stale in self.path.glob(f".*{TEMP_MARK}*"):  # a killed run's unfinished scene
            remove_quietly(stale)
        self._save()

    @staticmethod
    def beside(output: Path) -> Path:
        """The work folder of `output` (its name shortened with a hash where the output's name is
        near the file system's limit)."""
        return output.parent / f".{fit_stem(output.parent, output.name, len('..cinefx-work'))}.cinefx-work"

    @classmethod
    def remove_if_empty(cls, output: Path) -> None:
        """Remove the work folder of `output` if it holds no finished scene: what a killed run left
        before it finished one (a run that fails removes its own, see `abandon`). Call it holding
        the output's lock, from a run of any engine."""
        cls._remove_if_empty(cls.beside(output))

    @staticmethod
    def _remove_if_empty(folder: Path) -> None:
        if folder.is_dir() and not any(folder.glob("scene-*.mkv")):  # a scene file is there once finished
            shutil.rmtree(folder, ignore_errors=True)

    @classmethod
    def at(cls, folder: Path, key: str, manifest: bool = True) -> "WorkFolder":
        """The work folder `folder` itself (a shared --work-dir), rather than the one beside an output."""
        work = cls(folder / "unused", key, manifest)
        work.path = folder
        return work

    def kept(self, scene: int, part: int = 0) -> dict:
        """The record (size, sha256) of a kept scene (or piece of one), as `adopt` takes it."""
        return self._kept[_piece(scene, part)]

    def adopt(self, scene: int, record: dict, part: int = 0) -> None:
        """Enter a scene (or piece) another process wrote into this folder: only now does it count as done."""
        self._kept[_piece(scene, part)] = record
        self._intact.pop(_piece(scene, part), None)
        self._save()

    def _save(self) -> None:
        if not self.manifest:
            return
        write_text(self.path / "run.json", json.dumps({"key": self.key, "cinefx": __version__, "scenes": self._kept}))

    def _file(self, piece: str) -> Path:
        scene, _, part = piece.partition(".")
        return self.path / f"scene-{int(scene):05d}{f'.p{int(part):03d}' if part else ''}.mkv"

    def _extra_file(self, piece: str, kind: str) -> Path:
        return self._file(piece).with_suffix(EXTRAS[kind])

    def has(self, scene: int, part: int = 0) -> bool:
        """Whether the scene (or its piece `part`) is kept intact: its file, and each file kept
        with it (`EXTRAS`: state, measures), have the size and SHA-256 recorded when it was kept. A
        damaged one is deleted, to be rendered again."""
        piece = _piece(scene, part)
        if piece not in self._intact:
            rec, f = self._kept.get(piece), self._file(piece)
            ok = rec is not None and _intact(f, rec) and all(
                _intact(self._extra_file(piece, kind), rec[kind]) for kind in EXTRAS if kind in rec)
            if not ok and rec is not None:
                self.damaged.append(piece)
                del self._kept[piece]
                remove_quietly(f)
            self._intact[piece] = ok
        return self._intact[piece]

    def extra(self, scene: int, kind: str, part: int = 0) -> bytes | None:
        """What was kept with a kept piece under `kind` (see `keep`), or None. A worker's view (no
        manifest) reads what is there: its driver hands out only work whose inputs it adopted."""
        piece = _piece(scene, part)
        f = self._extra_file(piece, kind)
        if self.manifest and kind not in self._kept.get(piece, {}) or not f.is_file():
            return None
        return f.read_bytes()

    def read(self, scene: int, count: int, part: int = 0) -> np.ndarray:
        """The next `count` stored frames of the scene (or piece), (count, H, W, 3) uint8."""
        piece = _piece(scene, part)
        if self._reading is None or self._reading[0] != piece:
            self._reading = (piece, self._frames(piece))
            self.reused.append(piece)
        frames = [next(self._reading[1]) for _ in range(count)]
        return np.stack(frames)

    def _frames(self, piece: str) -> Iterator[np.ndarray]:
        with av.open(str(self._file(piece))) as c:
            for f in c.decode(video=0):
                yield f.to_ndarray(format="rgb24")

    def begin(self, scene: int, part: int = 0) -> None:
        """Frames of the scene (or piece) come next: the one recorded so far is complete, so
        finish it now (before the new one's render, which may be interrupted)."""
        if self._recording is not None and self._recording[0] != _piece(scene, part):
            self.finish()

    def keep(self, kind: str, data: bytes | None) -> None:
        """Keep `data` with the piece being recorded, as a file of its own checked with it (`EXTRAS`):
        a first piece's "state" (a renderer's `scene_state()`: what the later pieces start from,
        wherever they render), a piece's "measures" (`stylize.PieceMeasures`). None keeps nothing
        (a renderer with no state: diffusion at strength 0)."""
        if data is not None:
            self._extras[kind] = data

    def record(self, scene: int, frames: np.ndarray, part: int = 0) -> None:
        """Append rendered frames (F, H, W, 3) uint8 to the scene's (or piece's) file."""
        piece = _piece(scene, part)
        self.begin(scene, part)
        if self._recording is None:
            tmp = temp_path_for(self._file(piece))
            c = av.open(str(tmp), "w")
            s = c.add_stream("ffv1", rate=Fraction(24))
            s.width, s.height = frames.shape[2], frames.shape[1]
            s.pix_fmt = "bgr0"  # RGB with a pad byte: lossless, no colour conversion either way
            self._recording = (piece, c, s, tmp)
        _, c, s, _ = self._recording
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="bgr0")):
                c.mux(p)

    def finish(self) -> None:
        """Close the scene (or piece) being recorded, move it into place and record its size and
        checksum: only now does it count as done. The files kept with it (`keep`: a first piece's
        state, a piece's measures) are in place before it."""
        if self._recording is None:
            return
        piece, c, s, tmp = self._recording
        self._recording = None
        for p in s.encode(None):
            c.mux(p)
        c.close()
        rec = {"size": tmp.stat().st_size, "sha256": _sha256(tmp)}
        extras, self._extras = self._extras, {}
        for kind, data in extras.items():
            write_bytes(self._extra_file(piece, kind), data)
            rec[kind] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        commit(tmp, self._file(piece))
        self._kept[piece] = rec
        self._save()

    def abandon(self) -> None:
        """Stop recording without keeping the unfinished scene (the run was interrupted); the
        folder goes too if no scene in it is finished, as nothing in it could be reused."""
        self._extras = {}
        try:
            if self._recording is not None:
                _, c, _, tmp = self._recording
                self._recording = None
                try:
                    c.close()
                finally:
                    remove_quietly(tmp)
        finally:
            if self.manifest:  # a worker's view leaves the folder to the driver
                self._remove_if_empty(self.path)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> list[str]:
        """Remove the folder of a complete run; returns what to tell the user about it."""
        notes = []
        if self.damaged:
            notes.append(f"resume: kept scene(s) {', '.join(_shown(p) for p in self.damaged)} failed their "
                         "checksum and were rendered again")
        if self.reused:
            scenes = len({p.partition(".")[0] for p in self.reused})
            what = "scene(s)" if scenes == len(self.reused) else f"pieces of {scenes} scene(s)"
            notes.append(f"resumed: {len(self.reused)} finished {what} reused from {self.path.name}")
        self.remove()
        return notes


class ResumingRenderer:
    """A renderer (see `cinefx.renderers`) whose finished scenes (and pieces of long takes) are kept
    in `work` and read back, instead of rendered, on a re-run with the same key. Where a piece must
    be rendered after pieces that were read back, the renderer is primed with the scene's kept state
    and the frame before the piece, as a cluster's worker is."""

    def __init__(self, make, work: WorkFolder, name: str, run_length: int, part: int):
        """`make()` builds the renderer (named `name`, with that `run_length` and `part`) the first
        time a scene must be rendered: a run that reads every scene back (a cluster's assembly, a
        finished resume) never loads the models."""
        self.make, self.work = make, work
        self.name, self.run_length, self.part = name, run_length, part
        self._renderer = None
        self._scene: int | None = None
        self._at = 0  # frames of the scene so far
        self._lead: np.ndarray | None = None  # its last frame
        self._rendered = False  # whether the renderer itself rendered them

    def render(self, frames, scene: int, start: int) -> np.ndarray:
        if scene != self._scene:
            self._scene, self._at, self._rendered = scene, 0, False
        at = self._at
        part = at // self.part if self.part else 0
        self.work.begin(scene, part)
        if self.work.has(scene, part):
            out, rendered = self.work.read(scene, len(frames), part), False
        else:
            if at and not self._rendered:  # what came before was read back: start the renderer here
                self.renderer.prime(scene, at, self.work.extra(scene, "state"), self._lead)
            out, rendered = np.stack(list(self.renderer.render(frames, scene, start))), True
            try:
                self.work.record(scene, out, part)
                if part == 0 and self.part and at + len(frames) == self.part:  # the take goes on
                    state = self.renderer.scene_state()
                    if state is not None:
                        self.work.keep("state", state)
            except OSError as ex:  # a full disk, mostly: say where, and how to run without it
                raise OutputError(f"{self.work.path}: cannot keep finished scenes for resume ({ex}); "
                                  "free some space or use --no-resume") from ex
        self._at, self._lead, self._rendered = at + len(frames), frames[-1], rendered
        return out

    @property
    def renderer(self):
        if self._renderer is None:
            self._renderer = self.make()
        return self._renderer

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()


# -- one run per output ------------------------------------------------------------------------

LOCK_BEAT = 5.0  # seconds between heartbeats
LOCK_STALE = 60.0  # a heartbeat older than this: the run is gone (a killed machine, a lost mount)


def lock_path(output: Path) -> Path:
    """`.NAME.cinefx-lock` beside `output`; a name too long for that keeps a prefix and a hash."""
    return output.parent / f".{fit_stem(output.parent, output.name, len('..cinefx-lock'))}.cinefx-lock"


def _fields(text: str) -> dict:
    try:
        fields = json.loads(text)
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


class OutputLock:
    """While held, no other cinefx run (on this machine or another sharing the folder) writes
    `output` or its work folder. A context manager.

    The lock file is created with O_EXCL. A lock is stale when its run is gone: on this host, its
    pid is dead; on any host, its heartbeat is older than `stale` seconds (clocks of machines that
    share storage agree to well within that). A stale lock is renamed away, atomically, so of two
    runs taking it over only one succeeds, and then created afresh. A run whose lock was taken
    over meanwhile (it stalled past `stale`) finds out at its next `check()`.
    """

    def __init__(self, output: str | os.PathLike, beat: float = LOCK_BEAT, stale: float = LOCK_STALE):
        self.output = Path(output)
        self.path = lock_path(self.output)
        self.beat, self.stale = beat, stale
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: dict | None = None  # the run that took the lock over from us

    def _record(self) -> bytes:
        # The heartbeat is rewritten in place (see `_heartbeat`); written with a fixed number of
        # digits, the record keeps its length, so a reader meeting a half-done rewrite still
        # reads valid JSON.
        fields = json.dumps({"host": host_name(), "pid": os.getpid(), "token": self.token, "output": str(self.output)})
        return f'{fields[:-1]}, "heartbeat": {time.time():.3f}}}'.encode()

    def _read(self) -> tuple[str, dict] | None:
        """The lock file's text and fields, or None when there is none. A lock its creator has not
        written yet has the file's time as its heartbeat."""
        try:
            text = self.path.read_text(errors="replace")
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        return text, {"heartbeat": mtime, **_fields(text)}

    @staticmethod
    def _pid(holder: dict) -> int | None:
        """The holder's pid if it can be one (0 or below would make `alive` ask about process groups)."""
        pid = holder.get("pid")
        return pid if type(pid) is int and 0 < pid < 1 << 31 else None

    def _is_stale(self, holder: dict) -> bool:
        pid = self._pid(holder)
        if holder.get("host") == host_name() and pid is not None and not alive(pid):
            return True
        beat = holder.get("heartbeat")
        return not isinstance(beat, (int, float)) or time.time() - beat > self.stale

    def _busy(self, holder: dict) -> OutputBusyError:
        # anyone who can write the folder wrote these fields: only a host name's characters pass
        host = re.sub(r"[^A-Za-z0-9_.-]", "?", str(holder.get("host", "?")))[:64]
        return OutputBusyError(f"another cinefx run is writing {self.output} (host {host}, "
                               f"pid {self._pid(holder) or '?'}); wait for it to finish, or write elsewhere")

    def acquire(self) -> OutputLock:
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = self._read()
                if found is not None:
                    if not self._is_stale(found[1]):
                        raise self._busy(found[1]) from None
                    self._take_over(found[0])
                continue
            except OSError as ex:  # the lock is ours, the output is what the user knows
                raise cannot_write(self.output, ex) from ex
            try:
                os.write(fd, self._record())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._thread = threading.Thread(target=self._heartbeat, name="cinefx-lock", daemon=True)
            self._thread.start()
            return self
        raise OutputError(f"{self.output}: cannot take its lock (it keeps changing hands)")  # pragma: no cover

    def _take_over(self, seen: str) -> None:
        """Remove the stale lock whose text is `seen`, unless another run replaced it meanwhile."""
        grave = self.path.with_name(f"{self.path.name}.stale-{host_name()}-{os.getpid()}-{self.token}")
        try:
            os.rename(self.path, grave)  # of several runs doing this at once, one gets the file
        except FileNotFoundError:
            return
        try:
            if grave.read_text(errors="replace") != seen:  # its run beat, or a fresh lock: put it back
                try:
                    os.link(grave, self.path)
                except FileExistsError:
                    pass
        finally:
            remove_quietly(grave)

    def _heartbeat(self) -> None:
        """Refresh the heartbeat in the lock file itself, not by replacing it: a run that took the
        lock over renamed this file away, so checking the token and writing through one open file
        can never overwrite the new holder's lock."""
        while not self._stop.wait(self.beat):
            try:
                fd = os.open(self.path, os.O_RDWR)
            except OSError:
                continue  # network storage hiccup (or a takeover half done): the next beat sees
            try:
                found = _fields(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
                if found.get("token") != self.token:
                    self._lost = found
                    return
                os.pwrite(fd, self._record(), 0)
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)

    def check(self) -> None:
        """Raise `OutputBusyError` if another run took the lock over while this one stalled."""
        if self._lost is not None:
            raise self._busy(self._lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            found = self._read()
            if found is not None and found[1].get("token") == self.token:
                remove_quietly(self.path)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
