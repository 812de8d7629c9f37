"""Progress bars of training and evaluation: a thin holder of one bar from a progress factory, which may be
absent (no bar) and may not show notes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: ``progress(total, label, unit)`` makes a bar with ``update(n)`` and ``close()``, and optionally
#: ``set_postfix_str(text)`` (tqdm's, from :func:`geoir.cli.options.tqdm_progress`).
Progress = Callable[..., Any]


class Bar:
    """One bar over ``total`` steps labelled ``label``; does nothing without a factory. A context manager
    that closes the bar."""

    def __init__(self, progress: Progress | None, total: int, label: str, unit: str) -> None:
        self.bar = progress(total, label, unit) if progress is not None else None

    def note(self, text: str) -> None:
        """Show ``text`` beside the bar, where the bar can show a note (tqdm's can)."""
        if self.bar is not None and hasattr(self.bar, "set_postfix_str"):
            self.bar.set_postfix_str(text)

    def tick(self, note: str | None = None) -> None:
        """Advance by one step, showing ``note`` beside the bar (when given)."""
        if self.bar is None:
            return
        if note is not None:
            self.note(note)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def relabelled(progress: Progress | None, what: str) -> Progress | None:
    """``progress`` with ``what`` appended to every bar's label (a probe's or a refit's bars)."""
    if progress is None:
        return None
    return lambda total, label, unit: progress(total, f"{label}, {what}", unit)
