"""Files that appear whole or not at all.

Every file cinefx writes (outputs, reports, plots, `.cube` files, presets, checkpoints, finished
scenes kept for resume) is written under a hidden temporary name beside its target and renamed
over it only when complete, so a crash, a full disk or Ctrl-C never leaves a half-written file
where a good one was, or where a script would take it for finished.

Temporary names say whose they are: ``.NAME.cinefx-tmp-HOST-PID-RANDOM.EXT``. The extension stays
last so muxers are chosen from it as for the target. The host and pid let a later run remove the
leftovers of a killed one (SIGKILL runs no cleanup) without touching a file a live run still
writes — including a run on another machine sharing the folder, whose files are left alone.

A renamed file gets the mode any file the user writes would get (0666 less the umask), or, when
it replaces a file, that file's permission bits (never setuid, setgid or sticky: a rendered file is
not the program that was there) and, as root, its owner: mkstemp's 0600 must not leak into outputs.

Names that would pass the file system's limit (255 bytes) with cinefx's marks added keep a prefix
of the stem and a hash of all of it (`fit_stem`), so a target whose own name fits always works.
Whatever fails while writing is an `OutputError` naming the target, never the temporary.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from cinefx.errors import CinefxError, OutputError

TEMP_MARK = ".cinefx-tmp-"
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
_TEMP_RE = re.compile(re.escape(TEMP_MARK) + r"(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]+")


def host_name() -> str:
    """This machine's name as temporary files and locks record it."""
    return _HOST


def cannot_write(target: str | os.PathLike, ex: OSError) -> OutputError:
    """`ex`, met while writing `target` (or its temporary), as one line naming `target`."""
    err = OutputError(f"{target}: cannot be written ({ex.strerror or ex})")
    err.errno = ex.errno  # a caller can still tell a full disk (ENOSPC) from the rest
    return err


def fit_stem(folder: str | os.PathLike, stem: str, marks: int) -> str:
    """`stem`, or, when it and `marks` more bytes would pass `folder`'s name limit, as much of it as
    fits with a hash of all of it: the same every time for one stem, different for two."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    raw = os.fsencode(stem)
    if len(raw) + marks <= limit:
        return stem
    digest = hashlib.sha256(raw).hexdigest()[:12]
    # a cut inside a UTF-8 sequence drops that character rather than leaving half of it
    return raw[:max(0, limit - marks - len(digest) - 1)].decode("utf-8", "ignore") + "~" + digest


def _temp_stem(target: Path) -> str:
    # room for the longest pid Linux hands out (pid_max <= 2^22: 7 digits) and then some
    marks = len(f".{TEMP_MARK}{_HOST}-{'0' * 10}-{'0' * 8}") + len(os.fsencode(target.suffix))
    return fit_stem(target.parent, target.stem, marks)


def _temp_name(target: Path) -> Path:
    """A fresh name beside `target` for this process's temporary file or folder of it (what
    `stale_temps` finds when the process is gone)."""
    return target.with_name(f".{_temp_stem(target)}{TEMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
                            f"{target.suffix}")


def temp_path_for(target: str | os.PathLike) -> Path:
    """A new, empty, hidden file beside `target`, named as this process's temporary for it."""
    target = Path(target)
    for _ in range(100):
        path = _temp_name(target)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            continue
        except OSError as ex:
            raise cannot_write(target, ex) from ex
        os.close(fd)
        return path
    raise OutputError(f"{target}: cannot create a temporary file beside it")  # pragma: no cover


def umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """0666 less the process's umask: the mode `open(path, "w")` would give a new file."""
    return 0o666 & ~umask()


def commit(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Give `tmp` the mode the target should have and rename it over `target` (atomic on one file
    system). An existing target keeps its permission bits, and as root its owner and group, as a
    write in place would; a symlink at `target` is replaced, not followed."""
    tmp, target = Path(tmp), Path(target)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        st = None
    mode = default_mode()
    if st is not None and stat.S_ISREG(st.st_mode):
        mode = st.st_mode & 0o777
        if os.geteuid() == 0:
            with contextlib.suppress(OSError):  # file systems without owners (FAT, some mounts)
                os.chown(tmp, st.st_uid, st.st_gid)
    os.chmod(tmp, mode)
    os.replace(tmp, target)
    return target


def remove_quietly(path: str | os.PathLike | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for `target`; on a clean exit it is renamed over `target`, on any
    exception (Ctrl-C included) it is removed and `target` is untouched.

    For writers that take a path (matplotlib, PIL, safetensors, torch.save). An `OSError` on the
    way (a full disk, a folder in the target's place) becomes `OutputError` naming `target`."""
    tmp = temp_path_for(target)
    try:
        yield tmp
        commit(tmp, target)
    except BaseException as ex:
        remove_quietly(tmp)
        if isinstance(ex, OSError) and not isinstance(ex, CinefxError):
            raise cannot_write(target, ex) from ex
        raise


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """`open()` for writing, through `atomic_path`. The data is flushed to disk before the rename,
    so a power cut cannot leave a renamed but empty file."""
    if "b" in mode:
        encoding = None
    with atomic_path(target) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new hidden folder beside `target` to fill; on a clean exit it gets the mode a new
    folder would (0777 less the umask) and is renamed to `target` (which may be an empty folder;
    a full one is refused with `OSError`); on any exception it is removed. A folder appears whole
    or not at all (a preset, a study)."""
    target = Path(target)
    for stale in stale_temps(target, folders=True):  # a killed run's half-made folder
        shutil.rmtree(stale, ignore_errors=True)
    tmp = _temp_name(target)
    tmp.mkdir()
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(target, "wb") as f:
        f.write(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    with atomic_open(target, "w") as f:
        f.write(text)
    return Path(target)


def alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def stale_temps(target: str | os.PathLike, folders: bool = False) -> list[Path]:
    """Temporary files (with `folders`, the folders of `atomic_dir`) of `target` left by runs on this
    machine that are no longer alive.

    Only names cinefx's own naming marks as a temporary of `target` are considered; files of a
    live process, or of another machine (whose processes cannot be checked from here), are not."""
    target = Path(target)
    stem = _temp_stem(target)
    prefix = f".{stem}{TEMP_MARK}"
    out = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        if not p.name.startswith(prefix) or not p.name.endswith(target.suffix):
            continue
        m = _TEMP_RE.search(p.name[len(stem) + 1:])
        if m is None or m.group("host") != _HOST:
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and not alive(pid) and (p.is_dir() if folders else p.is_file()) and not p.is_symlink():
            out.append(p)
    return out


def clean_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove `stale_temps(target)`; returns what was removed."""
    gone = []
    for p in stale_temps(target):
        with contextlib.suppress(OSError):
            p.unlink()
            gone.append(p)
    return gone
