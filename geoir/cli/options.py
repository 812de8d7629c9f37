"""Options and parameter types shared by several subcommands (compare ``rasterio/rio/options.py``).

Values are parsed in ``ParamType.convert`` so a bad value fails with exit code 2 and names the option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


class BandsType(click.ParamType):
    """Comma-separated 1-based band indexes, e.g. ``4,3,2`` or ``1``."""

    name = "BANDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            bands = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of band numbers like 4,3,2", param, ctx)
        if not 1 <= len(bands) <= 3 or any(b < 1 for b in bands):
            self.fail(f"{value!r}: give 1 to 3 band numbers, each >= 1 (e.g. 4,3,2)", param, ctx)
        return bands


class FractionType(click.ParamType):
    """A number in [low, high) or [low, high]."""

    name = "FRACTION"

    def __init__(self, low: float = 0.0, high: float = 1.0, high_open: bool = False):
        self.low, self.high, self.high_open = low, high, high_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        ok = self.low <= v < self.high if self.high_open else self.low <= v <= self.high
        if not ok:
            bracket = ")" if self.high_open else "]"
            self.fail(f"{v:g} is outside [{self.low:g}, {self.high:g}{bracket}", param, ctx)
        return v


class PositiveFloat(click.ParamType):
    name = "FLOAT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not v > 0:
            self.fail(f"must be > 0, got {v:g}", param, ctx)
        return v


def index_option(f: F) -> F:
    """``--index DIR``: the bundle directory (default ./geoir-index, or $GEOIR_INDEX)."""
    return click.option(
        "--index",
        "index_dir",
        type=click.Path(file_okay=False, path_type=str),
        default="geoir-index",
        envvar="GEOIR_INDEX",
        show_default=True,
        help="Index bundle directory (env: GEOIR_INDEX).",
    )(f)


def overwrite_option(f: F) -> F:
    return click.option("--overwrite", is_flag=True, help="Replace existing output files.")(f)


def progress_enabled(ctx: click.Context) -> bool:
    """Progress bars are on unless -q was given."""
    obj = ctx.find_root().obj or {}
    return obj.get("verbosity", 0) >= 0


def tqdm_progress(enabled: bool) -> Callable[[int, str], Any]:
    """A progress factory making one tqdm bar per unit of work on stderr (items per second)."""
    from tqdm import tqdm

    def make(total: int, label: str, unit: str = "tile") -> tqdm:
        return tqdm(total=total, desc=label, unit=unit, disable=not enabled, dynamic_ncols=True)

    return make
