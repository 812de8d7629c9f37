"""``geoir tile``: cut scenes into georeferenced tiles and record them in an index bundle."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
from pathlib import Path

import click

from geoir.cli.options import (
    BandsType,
    FractionType,
    PositiveFloat,
    StretchType,
    batch_options,
    default_workers,
    index_option,
    model_options,
    progress_enabled,
    refuse_tta_change,
    resolve_model,
    tqdm_progress,
    tta_option,
    verbosity_options,
)
from geoir.errors import GeoirError


@click.command(short_help="Cut scenes into tiles and index them.")
@click.argument("scenes", nargs=-1, required=True, metavar="SCENE...")
@index_option
@click.option("--size", type=click.IntRange(min=1), default=None, help="Tile size in pixels [default: 256].")
@click.option(
    "--overlap",
    type=FractionType(0.0, 1.0, high_open=True),
    default=None,
    help="Overlap between neighbouring tiles as a fraction of --size, in [0, 1) [default: 0].",
)
@click.option(
    "--stride", type=click.IntRange(min=1), default=None, help="Step between tiles in pixels (instead of --overlap)."
)
@click.option(
    "--gsd",
    type=PositiveFloat(),
    default=None,
    help="Target metres per pixel: scenes are resampled so tiles cover the same ground size.",
)
@click.option(
    "--bands",
    type=BandsType(),
    default=None,
    help="Bands for red,green,blue, e.g. 4,3,2 [default: RGB by colour interpretation, else 1,2,3].",
)
@click.option("--nodata", type=float, default=None, help="Treat this value as nodata (overrides the file's).")
@click.option(
    "--stretch",
    type=StretchType(),
    default=None,
    help="Map LOW..HIGH of the data's values to 0-255, e.g. 0,3000 (or LOW,HIGH per channel, red, green, blue), "
    "the same for every scene, instead of each file's own 2-98% stretch: for scenes of one sensor at several "
    "dates or in several files.",
)
@click.option(
    "--max-nodata",
    type=FractionType(0.0, 1.0),
    default=None,
    help="Skip tiles with a larger fraction of nodata pixels [default: 0.5].",
)
@click.option(
    "--export-chips",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write every kept tile as a small GeoTIFF into this directory (later runs over a folder above it "
    "leave the chips out; name the directory itself to tile them).",
)
@model_options
@batch_options
@click.option(
    "--no-encode",
    is_flag=True,
    help="Only cut and catalog tiles; `geoir encode`, or `geoir tile` on the same scenes, encodes them later.",
)
@click.option(
    "--skip-unreadable",
    is_flag=True,
    help="Leave out, with a warning, files that cannot be read (not a raster, no CRS, damaged pixels, bands "
    "out of range) and tile the rest, exiting 0; without it the first such file stops the run.",
)
@tta_option(
    "Encode every tile as the mean features of its 8 flips and quarter turns: better search by kind of "
    "place, worse for the same place at another date (docs/results.md), 8 backbone passes per tile. "
    "Recorded in a new bundle; queries follow it."
)
@click.option(
    "--index-kind",
    "index_kinds",
    multiple=True,
    metavar="FACTORY",
    help="FAISS factory string for a new bundle, e.g. HNSW32 or IVF1024,PQ32 (floats), BIVF256 or BHNSW32 "
    "(binary codes) [default: exact flat search]. IVF and PQ kinds train on the tiles of the bundle's first "
    "scene, which needs enough of them (e.g. 1024 for IVF1024). Repeatable.",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="tcp://HOST:PORT",
    help="Tile and encode on this Dask distributed scheduler (pip install 'geoir[dist]').",
)
@click.option(
    "--cluster",
    default=None,
    metavar="local:N",
    help="Start a local Dask cluster of N worker processes. With --device cuda the workers take the GPUs in "
    "turn; several workers per GPU feed it better than one.",
)
@click.pass_context
@verbosity_options
def tile(
    ctx: click.Context,
    scenes: tuple[str, ...],
    index_dir: str,
    size: int | None,
    overlap: float | None,
    stride: int | None,
    gsd: float | None,
    bands: tuple[int, ...] | None,
    nodata: float | None,
    stretch: tuple[float, ...] | None,
    max_nodata: float | None,
    export_chips: Path | None,
    model: str | None,
    backbone: str | None,
    weights: str | None,
    download: bool,
    device: str,
    batch_size: int,
    workers: int | None,
    no_encode: bool,
    skip_unreadable: bool,
    tta: bool,
    index_kinds: tuple[str, ...],
    scheduler: str | None,
    cluster: str | None,
) -> None:
    """Cut SCENE rasters into tiles and record them in the index bundle.

    SCENE is a raster file (GeoTIFF, COG, JP2, any GDAL format with a CRS), a glob, or a directory.
    Every kept tile is encoded by the model and indexed with FAISS. Scenes already in the bundle are
    skipped; new ones are appended; a file indexed before whose content has changed replaces its earlier
    tiles. The tiling options and the model are fixed when the bundle is
    created; later runs reuse them.

    \b
    Examples:
      $ geoir tile scene.tif
      $ geoir tile scenes/ --index naip-index --size 224 --overlap 0.5
      $ geoir tile s2.tif --bands 1,2,3 --gsd 10 --export-chips chips/
      $ geoir tile s2_dates/*.tif --bands 1,2,3 --stretch 0,3000 --index s2-dates
      $ geoir tile big/*.tif --index-kind BHNSW32 --device cuda --batch-size 256
      $ geoir tile scene.tif --index tta-index --tta --device cuda
      $ geoir tile archive/ --skip-unreadable
    """
    from geoir.index.bundle import Bundle, discard_if_unused
    from geoir.io.files import check_writable_folder
    from geoir.tiling.grid import TilingParams, tile_count
    from geoir.tiling.run import check_chip_names, chips_folder, nothing_readable, prepare_scenes, tile_scenes
    from geoir.tiling.tiler import check_grid

    if overlap is not None and stride is not None:
        raise click.UsageError("give --overlap or --stride, not both")
    if scheduler and cluster:
        raise click.UsageError("give --scheduler or --cluster, not both")
    if export_chips is not None and (scheduler or cluster):
        raise click.UsageError("--export-chips runs on one machine; drop --scheduler/--cluster")
    if cluster is not None and not re.fullmatch(r"local:[1-9][0-9]*", cluster):
        raise click.BadParameter(f"{cluster!r}: use local:N with N >= 1 worker processes", param_hint="'--cluster'")
    if tta and (scheduler or cluster):
        raise click.UsageError("--tta encodes on one machine; drop --scheduler/--cluster")
    if tta and no_encode:
        raise click.UsageError("--tta is a way of encoding; drop --no-encode")
    if (scheduler or cluster) and importlib.util.find_spec("distributed") is None:
        raise click.ClickException("--scheduler/--cluster need Dask: pip install 'geoir[dist]'")
    index = Path(index_dir)
    # Options left out fall back to the bundle's own parameters (or the defaults for a new bundle);
    # options that contradict an existing bundle are refused by Bundle.open_or_create.
    base = Bundle.open(index).params if (index / "manifest.json").exists() else TilingParams()
    size_ = size if size is not None else base.size
    if stride is not None:
        stride_ = stride
    elif overlap is not None:
        stride_ = TilingParams.from_overlap(size_, overlap).stride
    else:
        # A new --size alone means tiles without overlap; the bundle's own size keeps its stride.
        stride_ = size_ if size is not None and size != base.size else base.stride
    params = TilingParams(
        size=size_,
        stride=stride_,
        gsd=gsd if gsd is not None else base.gsd,
        max_nodata=max_nodata if max_nodata is not None else base.max_nodata,
    )
    # Chips written into a folder being tiled are not scenes for the next run.
    unreadable: list[tuple[str, str]] = []
    prepared = prepare_scenes(
        scenes,
        bands=bands,
        nodata=nodata,
        stretch=stretch,
        exclude=[export_chips] if export_chips else [],
        unreadable=unreadable if skip_unreadable else None,
    )
    if not prepared and unreadable:
        raise nothing_readable(unreadable)
    for scene in prepared:
        check_grid(scene, params)  # before a model is loaded or a tile listed
    if export_chips is not None:
        # Checked now, made once every check has passed (a refused run leaves no chips folder behind).
        check_writable_folder(export_chips, "the chips directory")
        for scene in prepared:
            check_chip_names(scene, params)
    existing = Bundle.open(index) if (index / "manifest.json").exists() else None
    if existing is None:
        Bundle.check_new_location(index)
    elif not {s.id for s in prepared} <= existing.scene_ids():
        existing.check_writable()  # before minutes of reading and encoding, not at the first commit
    encoder = None
    described = existing.model if existing else None
    if not no_encode:
        refuse_tta_change(index, described, tta)
    # A re-run whose every scene is already encoded, with the bundle's own model, has nothing to encode:
    # it skips loading the model (seconds, and a GB of memory, for nothing).
    all_encoded = (
        existing is not None
        and described is not None
        and model is None
        and backbone is None
        and {s.id for s in prepared} <= set(existing.encoded_scene_ids())
    )
    if all_encoded:
        logging.getLogger("geoir").debug("every scene given is already encoded in %s: the model is not loaded", index)
    if not no_encode and not all_encoded:
        # On a cluster the workers encode (each on its own GPU with --device cuda); the client's copy of the
        # model only describes it and merges vectors, so it stays on the CPU.
        client_device = "cpu" if (scheduler or cluster) else device
        encoder = resolve_model(model, backbone, weights, download, client_device, described, tta=tta or None)
        if existing is not None:
            existing.check_model(
                encoder.fingerprint, encoder.meta.get("name"), encoder.backbone.tta, encoder.meta.get("path")
            )
    kinds = parse_index_kinds(index_kinds)
    if encoder is not None:
        # An approximate index trains on the tiles of the first scene that a bundle without tiles gets.
        trains_on = None
        if existing is None or existing.manifest["counts"]["tiles"] == 0:
            have = existing.scene_ids() if existing is not None else set()
            first = next((s for s in prepared if s.id not in have), None)
            trains_on = (first, tile_count(*first.grid(params.gsd)[1:], params.size, params.stride)) if first else None
        check_index_kinds(kinds, encoder, trains_on)
    with discard_if_unused(index), contextlib.ExitStack() as stack:
        bundle = Bundle.open_or_create(index, params)
        if export_chips is not None:
            # Made after the bundle (it may go inside it); removed again if the run fails before its first chip.
            stack.enter_context(chips_folder(export_chips))
        if kinds and bundle.model is None:
            bundle.manifest["index"] = {**bundle.manifest.get("index", {}), **kinds}
        elif kinds and kinds != {k: v for k, v in bundle.manifest.get("index", {}).items() if k in kinds}:
            raise click.UsageError(
                f"{index} already uses index kinds {bundle.manifest.get('index')}; drop --index-kind"
            )
        if scheduler or cluster:
            from geoir.distributed import dask_client, gpu_worker_threads, spec_for, tile_scenes_distributed

            spec = spec_for(encoder, weights, device) if encoder is not None else None
            # A CPU worker encodes with its one thread; a GPU worker reads blocks in several threads.
            threads = 1
            if cluster is not None and encoder is not None and wants_gpu(device):
                threads = gpu_worker_threads(int(cluster.partition(":")[2]))
            with dask_client(scheduler, cluster, threads_per_worker=threads) as client, bundle.lock():
                report = tile_scenes_distributed(
                    bundle,
                    prepared,
                    client,
                    model=encoder,
                    spec=spec,
                    progress=tqdm_progress(progress_enabled(ctx)),
                    batch_size=batch_size,
                    skip_unreadable=skip_unreadable,
                )
        else:
            with bundle.lock():
                report = tile_scenes(
                    bundle,
                    prepared,
                    model=encoder,
                    chips_dir=export_chips,
                    progress=tqdm_progress(progress_enabled(ctx)),
                    batch_size=batch_size,
                    # Without a model, reader processes only add start-up and copies: the main process reads
                    # with GDAL's own read-ahead threads.
                    workers=(default_workers() if encoder is not None else 0) if workers is None else workers,
                    skip_unreadable=skip_unreadable,
                )
        report.unreadable[:0] = unreadable
        if report.unreadable and not (report.added_scenes or report.skipped_scenes or report.encoded_scenes):
            raise nothing_readable(report.unreadable)
        if bundle.manifest["counts"]["tiles"] == 0 and report.added_scenes:
            # Nothing to search: refuse rather than leave an empty bundle that re-runs would skip over.
            raise click.ClickException(
                f"no tile of {', '.join(Path(s.path).name for s in prepared)} passed the nodata limit "
                f"(--max-nodata {params.max_nodata:g}, tiles of {params.size} px): is --size larger than the scene, "
                "or the scene mostly nodata? Use a smaller --size or a larger --max-nodata"
            )
        logging.getLogger("geoir").info(
            "%s: %d scene(s) added%s, %s%d already indexed, %d tiles added; %d tiles in total%s",
            index,
            len(report.added_scenes),
            f" ({len(report.replaced_scenes)} replacing a changed file)" if report.replaced_scenes else "",
            f"{len(report.encoded_scenes)} catalogued earlier encoded, " if report.encoded_scenes else "",
            len(report.skipped_scenes),
            report.tiles_added,
            bundle.manifest["counts"]["tiles"],
            f"; {len(report.unreadable)} unreadable file(s) left out: "
            + ", ".join(Path(p).name for p, _ in report.unreadable)
            if report.unreadable
            else "",
        )


def wants_gpu(device: str) -> bool:
    """Whether ``--device`` means the GPU on this host (``auto`` with a GPU visible)."""
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def check_index_kinds(kinds: dict[str, str], model, trains_on=None) -> None:  # type: ignore[no-untyped-def]
    """Refuse ``--index-kind`` factory strings FAISS cannot build for this model, or cannot train on the
    tiles of ``trains_on`` (``(scene, its number of tiles)``: the scene the index trains on), before any
    tile is read."""
    from geoir.index.vectors import VectorIndex

    for kind, factory in kinds.items():
        if kind == "binary" and not model.bits:
            raise click.BadParameter(
                f"{factory!r} is a binary index, and model {model.meta.get('name')} gives no hash codes",
                param_hint="'--index-kind'",
            )
        dim = int(model.bits) if kind == "binary" else int(model.embedding_dim)
        try:
            need = VectorIndex(dim, kind=kind, factory=factory).min_train  # type: ignore[arg-type]
        except GeoirError as exc:
            raise click.BadParameter(str(exc), param_hint="'--index-kind'") from None
        if trains_on is not None and trains_on[1] < need:
            scene, n = trains_on
            raise click.BadParameter(
                f"{factory!r} trains on the tiles of the bundle's first scene and needs at least {need}, but "
                f"{Path(scene.path).name} gives at most {n}; pick a kind with fewer lists/centroids, or leave "
                "--index-kind out (exact search, best for bundles of this size)",
                param_hint="'--index-kind'",
            )


def parse_index_kinds(values: tuple[str, ...]) -> dict[str, str]:
    """Split FAISS factory strings into the float and binary ones (binary factories start with B)."""
    out: dict[str, str] = {}
    for v in values:
        kind = "binary" if v.startswith("B") else "float"
        if kind in out:
            raise click.BadParameter(f"two {kind} index kinds given ({out[kind]}, {v})", param_hint="'--index-kind'")
        out[kind] = v
    return out
