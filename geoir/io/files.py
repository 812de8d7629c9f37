"""Small file-system helpers shared by every writer: atomic text writes and writable-directory checks."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from geoir.errors import GeoirError


@contextlib.contextmanager
def atomic_target(path: Path, ext: str | None = None) -> Iterator[Path]:
    """Yield a fresh temp path beside ``path`` to write; rename it onto ``path`` when the block succeeds.

    The temp name ends with ``ext`` (default: ``path``'s own suffix), since writers such as ``np.save``
    and GDAL's drivers pick their behaviour from it; it does not exist when the block starts. Folders
    missing above ``path`` are created first, and on failure (or interruption) the temp file and every
    folder created here are removed again, so a failed write leaves nothing behind. The file is 0644.
    """
    path = Path(path)
    created: list[Path] = []
    missing = []
    d = path.parent
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    tail = f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix if ext is None else ext}"
    # A name near the 255-byte limit leaves no room for the temp name's tail: shorten its own part.
    room = 255 - len(tail.encode()) - 1
    tmp = path.with_name("." + path.name.encode()[:room].decode(errors="ignore") + tail)
    try:
        for m in reversed(missing):
            try:
                m.mkdir()
                created.append(m)
            except FileExistsError:
                pass
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        for m in reversed(created):
            with contextlib.suppress(OSError):
                m.rmdir()
        raise


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
        probe = path / ".geoir-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise error(f"cannot write {what} {path} ({exc.strerror}); pick a writable directory") from exc
