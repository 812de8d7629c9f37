"""The ``geoir`` command line: a click group whose subcommands live one per module.

Subcommand modules are imported only when a command runs (or ``--help`` lists them), and heavy
libraries (torch, timm, faiss, geopandas) only inside command bodies, so ``geoir --help`` is instant.
Plugins add commands through the ``geoir.commands`` entry-point group.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import signal
import sys
from importlib.metadata import entry_points

import click

from geoir import __version__
from geoir.cli.options import set_verbosity
from geoir.errors import GeoirError, user_message

#: Ceiling of GDAL's block cache for geoir commands, in MB (users can set another with GDAL_CACHEMAX).
#: Reading a scene lowers the cache to what a row of its tiles needs (:func:`geoir.io.scene.fit_block_cache`).
GDAL_CACHE_MB = 256

#: The only extension GDAL's network file systems may fetch in a geoir command: none that exists.
NO_NETWORK_EXTENSION = ".geoir-reads-local-files-only"

#: Built-in subcommands: name -> "module:attribute".
COMMANDS = {
    "tile": "geoir.cli.tile:tile",
    "search": "geoir.cli.search:search",
    "encode": "geoir.cli.encode:encode",
    "info": "geoir.cli.info:info",
    "remove": "geoir.cli.remove:remove",
    "train": "geoir.cli.train:train",
    "eval": "geoir.cli.eval:evaluate",
}


#: Fixes for the file-system errors a command may meet, by errno (others keep their traceback: a bug's).
_OS_FIXES = {
    errno.ENOSPC: "free space there, or write somewhere else",
    errno.EDQUOT: "your disk quota is used up: free space there, or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: "check its permissions (and its folder's)",
    errno.EPERM: "check its permissions (and its folder's)",
    # (A folder removed while a command ran, or a target GDAL or the OS cannot create.)
    errno.ENOENT: "the file or its folder is gone: check the path",
}


class GeoirGroup(click.Group):
    """Lazily loaded subcommands; :class:`GeoirError` becomes a one-line message and exit code 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *(ep.name for ep in entry_points(group="geoir.commands"))})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            eps = [ep for ep in entry_points(group="geoir.commands") if ep.name == cmd_name]
            return eps[0].load() if eps else None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None:
            _refuse_empty_arguments(f"{ctx.info_name} {name}", cmd, rest)
        return name, cmd, rest

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except GeoirError as exc:
            raise click.ClickException(user_message(exc)) from exc
        except OSError as exc:
            # The file system refused (a full or read-only disk, a permission), where no writer or reader turned
            # it into a GeoirError first: one line naming the file and what to do, not a traceback (writers
            # remove their temp files as they unwind).
            fix = _OS_FIXES.get(exc.errno or 0)
            if fix is None:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror}; {fix}") from exc
        except KeyboardInterrupt:
            # Ctrl-C, once the command has unwound (new bundles, temp files, half-made outputs removed): the
            # shell's 130 (128 + SIGINT), as for a process the signal killed, not click's 1 for an error.
            click.echo("\nAborted!", err=True)
            raise SystemExit(128 + signal.SIGINT) from None


def _refuse_empty_arguments(prog: str, cmd: click.Command, args: list[str]) -> None:
    """Refuse an empty argument before the command parses it: to a path option or argument "" is the current
    folder, so ``geoir tile "$SCENES"`` with the variable unset tiled every raster below it; no geoir option
    takes an empty value."""
    takes_value = {
        opt
        for p in cmd.params
        if isinstance(p, click.Option) and not p.is_flag and not p.count
        for opt in (*p.opts, *p.secondary_opts)
    }
    arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
    for i, arg in enumerate(args):
        if arg.startswith("--") and arg.endswith("=") and arg[:-1] in takes_value:
            what = arg[:-1]
        elif arg == "" and i and args[i - 1] in takes_value:
            what = args[i - 1]
        elif arg == "":
            what = " or ".join(p.human_readable_name for p in arguments) or "an argument"
        else:
            continue
        raise click.UsageError(
            f"{what} is given an empty value (an unset shell variable?); name a file, folder or value. "
            f"Try '{prog} -h' for help."
        )


class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return msg if record.levelno == logging.INFO else f"{record.levelname.lower()}: {msg}"


class _BarSafeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each message above any progress bar on the stream (tqdm's ``write``), so a message logged while
    a bar runs (``-v`` prints one per training epoch) does not break the bar into copies."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


@click.group(cls=GeoirGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoir")
@click.option("-v", "--verbose", count=True, help="More messages on stderr (repeatable).")
@click.option("-q", "--quiet", count=True, help="Fewer messages and no progress bars (repeatable).")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Find places that look alike in satellite and aerial imagery.

    \b
    $ geoir tile scene.tif                      # tile, encode and index into ./geoir-index
    $ geoir search query.png --out hits.gpkg    # top-k similar tiles as polygons for QGIS
    """
    # GDAL's block cache defaults to 5% of RAM. Tiles are read in row order, so one or two rows of blocks
    # suffice: this sets a ceiling before any GDAL call, and each scene's reader lowers the cache to what
    # its block layout needs, so memory follows a scene's width, not its area.
    os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MB))
    # geoir reads local files only: GDAL's network file systems (/vsicurl/, /vsis3/ and the others built on
    # it) are shut, so that a received VRT, vector file or catalog naming a URL cannot make this machine
    # fetch it. GDAL then finds no file of any other extension there. Set the variable yourself to open them.
    os.environ.setdefault("CPL_VSIL_CURL_ALLOWED_EXTENSIONS", NO_NETWORK_EXTENSION)
    handler = _BarSafeHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter("%(message)s"))
    log = logging.getLogger("geoir")
    log.handlers[:] = [handler]
    log.propagate = False
    set_verbosity(ctx, verbose - quiet)


def _exit_on_termination() -> None:
    """Turn SIGTERM and SIGHUP (``timeout``, ``kill``, a batch scheduler, a closed terminal) into an exit that
    unwinds like Ctrl-C does, so a new bundle without tiles, temp files and half-made outputs are removed
    (exit status 128 + the signal's number, as the shell reports a killed process). Signals a parent set to
    be ignored (``nohup``) stay ignored."""

    def stop(signum: int, frame: object) -> None:
        sys.stderr.write(f"\nStopped by {signal.Signals(signum).name}.\n")
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, stop)


def main() -> None:
    """The ``geoir`` console script.

    A reader that closes the pipe early (``geoir search ... --out - | head``) ends the command with 141 (128 +
    SIGPIPE), as the shell reports for a process killed by that signal, not click's 1 for bad data."""
    _exit_on_termination()
    stdout = sys.stdout
    try:
        cli()
    except SystemExit as exc:
        # click swaps stdout for a wrapper that ignores flushes when a write met a closed pipe, and exits 1.
        if exc.code == 1 and sys.stdout is not stdout:
            raise SystemExit(128 + signal.SIGPIPE) from None
        raise
    finally:
        # The command is over: a SIGTERM now (while the interpreter shuts down) ends the process as the signal
        # does, not with "Stopped by SIGTERM." and a traceback from an exit handler.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) not in (signal.SIG_IGN, None):
                signal.signal(sig, signal.SIG_DFL)
