"""Small file-system helpers shared by every writer: atomic text writes and writable-directory checks."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from geoir.errors import GeoirError


def file_mode(path: str | os.PathLike[str]) -> int:
    """The permissions a file written to ``path`` gets: those of the file it replaces, else what the umask
    leaves of 0666, as for a file opened anew (temp files, made 0600 by ``mkstemp``, are set to it)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``os.umask`` can only set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_target(path: Path, ext: str | None = None) -> Iterator[Path]:
    """Yield a fresh temp path beside ``path`` to write; rename it onto ``path`` when the block succeeds.

    The temp name ends with ``ext`` (default: ``path``'s own suffix), since writers such as ``np.save``
    and GDAL's drivers pick their behaviour from it; it does not exist when the block starts. Folders
    missing above ``path`` are created first, and on failure (or interruption) the temp file (with any SQLite
    journal beside it) and every folder created here are removed again, so a failed write leaves nothing
    behind. The file keeps the permissions of the one it replaces; a new one gets the umask's (0644 under the
    usual 022, 0600 under 077), as any file the user creates.
    """
    path = Path(path)
    tail = f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix if ext is None else ext}"
    # A name near the 255-byte limit leaves no room for the temp name's tail: shorten its own part.
    room = 255 - len(tail.encode()) - 1
    stem = "." + path.name.encode()[:room].decode(errors="ignore")
    tmp = path.with_name(stem + tail)
    if path.parent.is_dir():
        _remove_stale_temps(path.parent, stem)
    with made_folder(path.parent):
        try:
            yield tmp
            if tmp.is_file():
                os.chmod(tmp, file_mode(path))
            os.replace(tmp, path)
        except BaseException as exc:
            # With the file, its SQLite sidecars: a GeoPackage's journal outlives a write that failed (older GDAL).
            for leftover in (tmp, *(tmp.with_name(tmp.name + s) for s in ("-journal", "-wal", "-shm"))):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
            if isinstance(exc, OSError) and exc.filename in (None, str(tmp), tmp):
                exc.filename = str(path)  # the file the user asked for, not its temp name (or none: a full disk)
            raise


@contextlib.contextmanager
def made_folder(folder: Path) -> Iterator[Path]:
    """Create ``folder`` and the folders missing above it; if the block fails (or is interrupted), remove
    again those created here that are still empty."""
    folder = Path(folder)
    missing = []
    d = folder
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    created: list[Path] = []
    try:
        for m in reversed(missing):
            try:
                m.mkdir()
                created.append(m)
            except FileExistsError:
                pass
        yield folder
    except BaseException:
        for m in reversed(created):
            with contextlib.suppress(OSError):
                m.rmdir()
        raise


#: A temp file untouched this long, whose writer's pid is not running here, is a killed run's left-over.
STALE_AFTER_S = 60.0


def pid_is_running(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (another user's counts; a number no pid can be, too)."""
    if not 0 < pid < 2**22:  # Linux's largest pid_max
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    return True


def _remove_stale_temps(folder: Path, stem: str) -> None:
    """Remove the temp files of earlier writes of the same target (``STEM.PID.XXXXXXXX.tmp*``) left by a killed
    process (SIGKILL, power loss): its pid no longer runs and the file has not changed for a minute. The age
    check spares a writer on another machine sharing the folder, whose pid means nothing here."""
    pattern = re.compile(re.escape(stem) + r"\.(\d+)\.[0-9a-f]{8}\.tmp")
    now = time.time()
    try:
        names = [n for n in os.listdir(folder) if n.startswith(stem)]
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if m is None or pid_is_running(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            f = folder / name
            if f.is_file() and now - f.stat().st_mtime > STALE_AFTER_S:
                f.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory, fsync, then a rename."""
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same directory, fsync, then a rename."""
    atomic_write_bytes(path, text.encode())


def check_writable_target(path: Path, what: str, error: type[GeoirError] = GeoirError) -> None:
    """Check that the file ``path`` could be written, creating nothing (the writer creates missing folders).

    Raises:
        error: See :func:`check_writable_folder` (for ``path``'s folder).
    """
    check_writable_folder(Path(os.path.abspath(path)).parent, what, error)


def check_writable_folder(folder: Path, what: str, error: type[GeoirError] = GeoirError) -> None:
    """Check that files could be written in ``folder``, creating nothing (it may not exist yet).

    Raises:
        error: The nearest existing folder at or above ``folder`` is a file or cannot be written; the
            message names ``what`` and the folder.
    """
    folder = Path(os.path.abspath(folder))
    d = folder
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise error(f"cannot write {what} {folder} ({d} is not a folder); pick a writable directory")
    if not os.access(d, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(d) else "permission denied"
        raise error(f"cannot write {what} {folder} ({reason} at {d}); pick a writable directory")


def _read_only_fs(d: Path) -> bool:
    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def ensure_writable_dir(path: Path, what: str, error: type[GeoirError] = GeoirError) -> None:
    """Create ``path`` if needed and check a file can be written there.

    Raises:
        error: The directory cannot be created or written; the message names ``what`` and the path.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A fresh name of its own (not a fixed one, which a link put there would redirect to another file).
        fd, probe = tempfile.mkstemp(dir=path, prefix=".geoir-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise error(f"cannot write {what} {path} ({exc.strerror}); pick a writable directory") from exc


def write_reason(exc: BaseException) -> str:
    """Why a write failed, in a few words: an OSError's ``strerror``, and GDAL's or SQLite's reason without the
    SQL it ran (a failed ``sqlite3_exec(...)`` quotes the whole GeoPackage schema, 5,000 characters, before
    "database or disk is full")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return re.sub(r"sqlite3_exec\(.*\) failed:", "SQLite:", text, flags=re.S).strip()
