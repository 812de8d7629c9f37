"""Small file-system helpers shared by every writer: atomic text writes and writable-directory checks."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from geoir.errors import GeoirError


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same directory, fsync, then a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
