"""Options and parameter types shared by several subcommands (compare ``rasterio/rio/options.py``).

Values are parsed in ``ParamType.convert`` so a bad value fails with exit code 2 and names the option.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


class IntListType(click.ParamType):
    """Comma-separated whole numbers, e.g. ``4,3,2``; subclasses say what a valid list is (:meth:`problem`)."""

    name = "INTS"
    #: What the numbers are, for messages ("band numbers"), and an example list.
    what, example = "whole numbers", "1,2,3"

    def problem(self, values: tuple[int, ...]) -> str | None:
        """Why ``values`` is not a valid list (None when it is)."""
        return None

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            values = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.what} like {self.example}", param, ctx)
        problem = self.problem(values)
        if problem:
            self.fail(f"{value!r}: {problem} (e.g. {self.example})", param, ctx)
        return values


class BandsType(IntListType):
    """Comma-separated 1-based band indexes, e.g. ``4,3,2`` or ``1``."""

    name = "BANDS"
    what, example = "band numbers", "4,3,2"

    def problem(self, values: tuple[int, ...]) -> str | None:
        return None if 1 <= len(values) <= 3 and all(b >= 1 for b in values) else "give 1 to 3 band numbers, each >= 1"


class StretchType(click.ParamType):
    """``--stretch``: LOW,HIGH for every channel, or LOW,HIGH per channel (6 numbers), in the data's values."""

    name = "LOW,HIGH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, ...]:
        from geoir.errors import TilingError
        from geoir.io.scene import stretch_scaling

        if isinstance(value, tuple):
            return value
        usage = "give LOW,HIGH in the data's values (e.g. 0,3000), or a pair per channel (0,3000,0,2800,0,2600)"
        try:
            values = tuple(float(v) for v in str(value).split(","))
            stretch_scaling(values)
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers; {usage}", param, ctx)
        except TilingError as exc:
            problem = "each HIGH must be above its LOW" if "above its LOW" in str(exc) else "not 2 or 6 finite numbers"
            self.fail(f"{value!r}: {problem}; {usage}", param, ctx)
        return values


class SeedsType(IntListType):
    """Comma-separated seeds (whole numbers >= 0, each once), e.g. ``0,1,2``."""

    name = "SEEDS"
    what, example = "seeds", "0,1,2"

    def problem(self, values: tuple[int, ...]) -> str | None:
        ok = all(0 <= s < 2**32 for s in values) and len(set(values)) == len(values)
        return None if ok else "give each seed once, as a whole number in [0, 2^32)"


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


def refuse_existing(path: str | Path, overwrite: bool, stdout_ok: bool = False) -> None:
    """Fail before any work when an output exists without --overwrite, or cannot be written (``-`` is stdout
    where ``stdout_ok``; elsewhere a file of that name)."""
    if stdout_ok and str(path) == "-":
        return
    p = Path(path)
    try:
        exists = p.exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise click.ClickException(f"{path}: {exc.strerror}; pick another name") from exc
    if exists and p.is_dir():
        raise click.ClickException(f"{path} is a folder; give the output a file name")
    if exists and not overwrite:
        raise click.ClickException(f"{path} exists; pass --overwrite to replace it")
    from geoir.io.files import check_writable_target

    # Nothing is created here: the writer creates missing folders and removes them again if it fails.
    check_writable_target(p, f"the folder of {p.name},")


def refuse_missing_images(paths: tuple[str, ...] | list[str], hint: str = "") -> None:
    """Name the first image path that does not exist before any model or bundle is opened (exit 1)."""
    for path in paths:
        if not Path(path).exists():
            raise click.ClickException(f"{path}: no such image; check the path{hint}")


def set_verbosity(ctx: click.Context, verbosity: int) -> None:
    """Record ``verbosity`` (-v count minus -q count) on the root context and set the ``geoir`` logger's
    level from it: INFO at 0, DEBUG from 1, WARNING at -1, ERROR at -2."""
    root = ctx.find_root()
    if root.obj is None:
        root.obj = {}
    root.obj["verbosity"] = verbosity
    logging.getLogger("geoir").setLevel(max(logging.DEBUG, logging.INFO - 10 * verbosity))


def _more_or_less(ctx: click.Context, param: click.Parameter, value: int) -> None:
    if value:
        step = value if param.name == "verbose" else -value
        set_verbosity(ctx, (ctx.find_root().obj or {}).get("verbosity", 0) + step)


def verbosity_options(f: F) -> F:
    """``-v/--verbose`` and ``-q/--quiet`` on a subcommand too (``geoir tile -q ...``), adding to any given
    before the command name."""
    f = click.option(
        "-q",
        "--quiet",
        count=True,
        expose_value=False,
        callback=_more_or_less,
        help="Fewer messages and no progress bars (repeatable).",
    )(f)
    return click.option(
        "-v",
        "--verbose",
        count=True,
        expose_value=False,
        callback=_more_or_less,
        help="More messages on stderr (repeatable).",
    )(f)


def progress_enabled(ctx: click.Context) -> bool:
    """Progress bars are on unless -q was given."""
    obj = ctx.find_root().obj or {}
    return obj.get("verbosity", 0) >= 0


class LogLines:
    """Where progress bars go when stderr is not a terminal (a log file, a batch job's output, a pipe).

    A bar redraws itself with carriage returns, which a log keeps: a long run became one line of thousands
    of redraws. Here each redraw the bar makes (at most every ``LOG_INTERVAL`` seconds) is a line of its
    own, and the redraw that only repeats the last line's count (the one a bar makes as it closes) is
    dropped.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        count = line.split(" [", 1)[0]  # the label, percentage, bar and n/total, without the times and rate
        if line and count != self.last:
            self.stream.write(line + "\n")
            self.last = count

    def flush(self) -> None:
        self.stream.flush()


#: Seconds between progress lines when stderr is not a terminal.
LOG_INTERVAL = 30.0


def tqdm_progress(enabled: bool) -> Callable[..., Any]:
    """A progress factory making one tqdm bar per unit of work on stderr (items per second); where stderr is
    not a terminal, a plain line every ``LOG_INTERVAL`` seconds instead (:class:`LogLines`)."""
    import sys

    from tqdm import tqdm

    def make(total: int, label: str, unit: str = "tile") -> tqdm:
        common = {"total": total, "desc": label, "unit": unit, "disable": not enabled}
        if sys.stderr.isatty():
            return tqdm(**common, dynamic_ncols=True)
        return tqdm(**common, file=LogLines(sys.stderr), mininterval=LOG_INTERVAL, ascii=True)

    return make


def model_options(f: F) -> F:
    """``--model``, ``--backbone``, ``--weights``, ``--download``, ``--device``: which encoder, and where."""
    model = click.option(
        "--model",
        "model",
        default=None,
        metavar="FILE|default|backbone",
        help="Model file from `geoir train`; 'default' (the shipped model) or 'backbone' (no head). "
        "[default: the bundle's model, else 'default']",
    )
    return _apply(
        f,
        model,
        *_backbone_option_list(
            "timm backbone name with --model backbone [default: tf_efficientnet_lite0].", "the model"
        ),
    )


def backbone_options(f: F) -> F:
    """``--backbone``, ``--weights``, ``--download``, ``--device``: the backbone a head is trained on."""
    return _apply(
        f,
        *_backbone_option_list(
            "timm backbone to train on [default: tf_efficientnet_lite0; with --index, the bundle's].", "the backbone"
        ),
    )


def _backbone_option_list(backbone_help: str, runs: str) -> list[Callable[[F], F]]:
    return [
        click.option("--backbone", default=None, metavar="NAME", help=backbone_help),
        *_weights_option_list(),
        device_option(f"Where {runs} runs (cuda uses bf16 and channels-last)."),
    ]


def _apply(f: F, *options: Callable[[F], F]) -> F:
    """Decorate ``f`` with ``options``, listed in --help in the order given."""
    for option in reversed(options):
        f = option(f)
    return f


def device_option(help: str) -> Callable[[F], F]:
    """``--device auto|cpu|cuda``."""
    return click.option(
        "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help=help
    )


def weights_options(f: F) -> F:
    """``--weights`` and ``--download``: where a backbone's pretrained weights come from (a model file on a
    backbone whose weights are not packaged loads with them)."""
    return _apply(f, *_weights_option_list())


def _weights_option_list() -> list[Callable[[F], F]]:
    return [
        click.option(
            "--weights",
            type=click.Path(dir_okay=False, path_type=str),
            default=None,
            help="Local backbone weights file (state dict or timm checkpoint).",
        ),
        click.option("--download", is_flag=True, help="Allow timm to download pretrained backbone weights."),
    ]


def batch_options(f: F) -> F:
    """``--batch-size`` and ``--workers``."""
    f = click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=None,
        help="Processes reading scenes for the model (not IMAGE files, read one by one) [default: CPU cores - 1, "
        "at most 8; none without a model].",
    )(f)
    f = click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=64,
        show_default=True,
        help="Tiles (or images of one size) per model batch (a speed setting: vectors differ in their last "
        "digits, about 1e-7).",
    )(f)
    return f


def default_workers() -> int:
    import os

    return max(0, min(8, (os.cpu_count() or 1) - 1))


def tta_option(help: str) -> Callable[[F], F]:
    """``--tta``: encode every tile or image as the mean features of its 8 flips and quarter turns."""
    return click.option("--tta", is_flag=True, help=help)


def expand_option(help: str) -> Callable[[F], F]:
    """``--expand N``: average query expansion with the first N hits or items (0: off)."""
    return click.option("--expand", type=click.IntRange(min=0), default=0, show_default=True, metavar="N", help=help)


def refuse_tta_change(index: object, described: dict | None, tta: bool) -> None:
    """A bundle is encoded one way: --tta cannot be asked of one whose tiles were encoded without it."""
    if tta and described is not None and not described.get("backbone_tta"):
        raise click.UsageError(f"{index} was encoded without --tta; drop --tta, or use another --index")


def resolve_model(
    model: str | None,
    backbone: str | None,
    weights: str | None,
    download: bool,
    device: str,
    bundle_model: dict | None = None,
    tta: bool | None = None,
    backbone_on_demand: bool = False,
):  # type: ignore[no-untyped-def]
    """Load the model a command asked for; with no --model, the bundle's own model, else the default. Test-time
    averaging (``tta``) follows the bundle unless given; ``backbone_on_demand``: see
    :func:`geoir.encoding.model.load_model`."""
    from geoir.encoding.model import model_for_bundle

    loaded = model_for_bundle(
        bundle_model,
        model,
        backbone=backbone,
        weights=weights,
        download=download,
        device=device,
        tta=tta,
        backbone_on_demand=backbone_on_demand,
    )
    d = loaded.describe()
    if (loaded.meta.get("data") or {}).get("features_tta") and not loaded.backbone.tta:
        logging.getLogger("geoir").warning(
            "%s was trained on a --tta bundle's features (each the mean of a tile's 8 flips and quarter turns); "
            "pass --tta to encode as it was trained (in a new --index: a bundle is encoded one way)",
            d["name"],
        )
    logging.getLogger("geoir").debug(
        "model %s (%s): backbone %s, %s-d embedding, %s, test-time averaging %s, on %s",
        d["name"] or "(none)",
        d["fingerprint"][:12],
        d["backbone"],
        d["embedding_dim"],
        f"{d['bits']}-bit code" if d["bits"] else "no code",
        "on" if d["backbone_tta"] else "off",
        loaded.backbone.device,
    )
    return loaded


class BBoxType(click.ParamType):
    """``WEST,SOUTH,EAST,NORTH`` in degrees (EPSG:4326)."""

    name = "WEST,SOUTH,EAST,NORTH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            w, s, e, n = (float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not WEST,SOUTH,EAST,NORTH in degrees, e.g. -75.7,37.6,-75.5,37.8", param, ctx)
        from geoir.errors import QueryError
        from geoir.retrieval.engine import check_bbox

        try:
            return check_bbox((w, s, e, n))
        except QueryError as exc:
            self.fail(f"{value!r}: {str(exc).split(': ', 1)[1]}", param, ctx)


class LonLatType(click.ParamType):
    """``LON,LAT`` in degrees (EPSG:4326)."""

    name = "LON,LAT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, float]:
        if isinstance(value, tuple):
            return value
        try:
            lon, lat = (float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not LON,LAT in degrees, e.g. -75.6,37.7", param, ctx)
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            self.fail(
                f"{value!r}: longitude must be in [-180, 180] and latitude in [-90, 90] (LON,LAT order)", param, ctx
            )
        return (lon, lat)
