"""``geoir search``: the tiles most like a query, as map layers."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from geoir.cli.options import (
    BBoxType,
    LonLatType,
    expand_option,
    index_option,
    model_options,
    refuse_existing,
    refuse_missing_images,
    verbosity_options,
)
from geoir.io.vectors import VectorPathType

log = logging.getLogger("geoir")


@click.command(short_help="Find the tiles most like a query.")
@click.argument("queries", nargs=-1, metavar="QUERY...")
@index_option
@click.option(
    "--out",
    "-o",
    required=True,
    metavar="FILE|-",
    help="Output file (.gpkg, .geojson, .fgb) or - for GeoJSON on stdout. GeoJSON and FlatGeobuf hold one "
    "layer each: the hits go to FILE, the other layers beside it (NAME.hits_merged.EXT, NAME.query.EXT), "
    "each with its QGIS style as NAME.qml; - writes the hits only.",
)
@click.option(
    "--layer",
    default="hits",
    show_default=True,
    metavar="NAME",
    help="GeoPackage only: name the layers NAME, NAME_merged and NAME_query (hits, hits_merged and query by "
    "default). An existing GeoPackage keeps its other layers, so several searches can share one file.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["gpkg", "geojson", "fgb"]),
    default=None,
    help="Output format [default: from the --out suffix].",
)
@click.option(
    "-k", "--top-k", "k", type=click.IntRange(min=1), default=10, show_default=True, metavar="N", help="Number of hits."
)
@click.option(
    "--point",
    "points",
    type=LonLatType(),
    multiple=True,
    help="Query with the tile(s) under LON,LAT (on an edge: the tiles on both sides).",
)
@click.option(
    "--examples",
    type=VectorPathType(),
    default=None,
    help="Vector file (FILE or FILE:LAYER) of example points/polygons; a `negative` column (true/false, "
    "yes/no, 1/0; empty: positive) marks negatives.",
)
@click.option(
    "--negative",
    "negatives",
    multiple=True,
    metavar="QUERY",
    help="A negative example (image or tile:ID): results move away from it. Repeatable.",
)
@click.option(
    "--bbox",
    type=BBoxType(),
    default=None,
    help="Only tiles sharing ground with this lon/lat box (not those that only touch it; WEST > EAST: a box "
    "across the antimeridian).",
)
@click.option(
    "--aoi",
    type=VectorPathType(),
    default=None,
    help="Only tiles sharing ground with the geometries of this vector file (FILE or FILE:LAYER; not those "
    "that only touch them).",
)
@click.option("--scene", "scenes", multiple=True, help="Only tiles of this scene (id, path or file name). Repeatable.")
@click.option(
    "--include-query-overlap", is_flag=True, help="Keep tiles that overlap a georeferenced query (left out by default)."
)
@click.option(
    "--rotations/--no-rotations",
    default=True,
    show_default=True,
    help="Match image queries in any of their four quarter turns (--no-rotations: only as given).",
)
@expand_option(
    "Query expansion: search, add the first N hits to the query, search again (0: off). Finds more "
    "places of the query's kind, and ranks the query's own place lower."
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace existing output files; in a GeoPackage, replace this search's layers and keep the others.",
)
@model_options
@verbosity_options
def search(
    queries: tuple[str, ...],
    index_dir: str,
    out: str,
    layer: str,
    fmt: str | None,
    k: int,
    points: tuple[tuple[float, float], ...],
    examples: Path | None,
    negatives: tuple[str, ...],
    bbox: tuple[float, float, float, float] | None,
    aoi: Path | None,
    scenes: tuple[str, ...],
    include_query_overlap: bool,
    rotations: bool,
    expand: int,
    overwrite: bool,
    model: str | None,
    backbone: str | None,
    weights: str | None,
    download: bool,
    device: str,
) -> None:
    """Find the tiles of the bundle that look most like QUERY.

    QUERY is an image file (PNG, JPEG, GeoTIFF of any size) or tile:ID. Several queries (and --point,
    --examples) are averaged, each counting once however many tiles it covers (an example polygon counts as
    the mean of its tiles); --negative examples push the results away. Writes the layers `hits` (tile
    footprints with rank, score, distance, hamming), `hits_merged` (hits that overlap or share an edge
    dissolved into regions) and `query` (the query's footprint where it is georeferenced), styled for QGIS in a
    GeoPackage; --layer NAME adds them to a GeoPackage as NAME, NAME_merged and NAME_query beside its other layers.
    Image queries match tiles in any of their four quarter turns unless --no-rotations is given. --expand N
    searches twice, the second time with the first N hits averaged into the query: more tiles of the query's
    kind, but a crop's own place comes first less often (docs/results.md), so it is for "more like this", not
    "where is this". -v also lists the hits on stderr: rank, score, tile id, centre (lon,lat), scene.

    \b
    Examples:
      $ geoir search query.png --out hits.gpkg
      $ geoir search crop.tif -k 50 --bbox -75.8,37.5,-75.4,37.9 --out hits.gpkg
      $ geoir search --point -75.61,37.70 --negative tile:123456 --out - | jq -r '.features[0].properties.tile'
      $ geoir search query.png -k 100 --expand 5 --out hits.gpkg
      $ geoir search -v tile:123456 -k 5 --out hits.gpkg
      $ geoir search quarry.png --out project.gpkg --layer quarries
    """
    if not (queries or points or examples):
        raise click.UsageError("give a QUERY image or tile:ID, --point, or --examples")
    from geoir.output.writers import format_conflict, side_paths, suffix_format, write_layers

    conflict = format_conflict(out, fmt)
    if conflict:
        raise click.BadParameter(conflict, param_hint="'--format'")
    fmt = fmt or suffix_format(out)
    if fmt is None:
        raise click.BadParameter(
            f"cannot tell the format of {out} from its suffix; use .gpkg, .geojson or .fgb, or --format",
            param_hint="'--out'",
        )
    from geoir.cli.options import resolve_model
    from geoir.index.bundle import Bundle
    from geoir.retrieval.engine import QueryParts, Searcher, merge_hits, tile_ref

    if layer != "hits" and fmt != "gpkg":
        raise click.BadParameter(f"names the layers of a GeoPackage, and --out {out} is {fmt}", param_hint="'--layer'")
    from geoir.errors import QueryError
    from geoir.output.writers import gpkg_layer_names

    try:
        gpkg_layer_names(layer)
    except QueryError as exc:
        raise click.BadParameter(str(exc).removeprefix("--layer "), param_hint="'--layer'") from None
    if fmt == "gpkg":
        from geoir.output.writers import check_gpkg_target

        refuse_existing(out, overwrite=True)  # only whether it can be written: a GeoPackage may take more layers
        check_gpkg_target(Path(out), layer, overwrite)
    else:
        from geoir.output.writers import sidecar_is_ours, style_sidecar

        for kind, written in [("hits", Path(out)), *side_paths(out, fmt).items()] if out != "-" else []:
            refuse_existing(written, overwrite)
            sidecar = style_sidecar(written)
            if sidecar is not None and not sidecar_is_ours(sidecar, kind):
                refuse_existing(sidecar, overwrite)
    try:
        refs = {q: tile_ref(q) for q in (*queries, *negatives)}
    except QueryError as exc:
        raise click.BadParameter(str(exc), param_hint="'QUERY'") from None
    images = [q for q, tid in refs.items() if tid is None]
    refuse_missing_images(images, " (or use tile:ID for an indexed tile)")
    bundle = Bundle.open(index_dir)
    # Queries by tile, point or example polygon run the head on stored features: the backbone (timm, its
    # weights: most of a search's start-up) is created only when an image is to be encoded.
    encoder = resolve_model(model, backbone, weights, download, device, bundle.model, backbone_on_demand=not images)
    searcher = Searcher(bundle, encoder, rotations=rotations)
    parts = QueryParts()
    for q, negative in [(q, False) for q in queries] + [(q, True) for q in negatives]:
        if (tid := refs[q]) is not None:
            searcher.add_tiles(parts, [tid], q, negative)
        else:
            searcher.add_image(parts, q, negative)
    for lon, lat in points:
        searcher.add_point(parts, lon, lat)
    if examples is not None:
        searcher.add_examples(parts, examples)
    aoi_geom = None
    if aoi is not None:
        import shapely

        from geoir.io.vectors import read_vectors

        aoi_df = read_vectors(aoi, "--aoi", QueryError, "pass a GeoPackage or GeoJSON")
        if not (aoi_df.geometry.notna() & ~aoi_df.geometry.is_empty).any():
            raise click.ClickException(f"--aoi {aoi} has no geometries; draw the area of interest in it")
        from geoir.tiling.grid import off_the_globe, to_lonlat

        aoi_df = to_lonlat(aoi_df)
        off = off_the_globe(aoi_df)
        if off.any():
            raise click.ClickException(
                f"--aoi {aoi}: geometry {int(off.argmax())} has coordinates that its CRS cannot place in lon/lat; "
                "check them"
            )
        aoi_geom = shapely.union_all(aoi_df.geometry.values)
    allowed = searcher.allowed_ids(bbox=bbox, aoi=aoi_geom, scenes=scenes)
    result = searcher.search(parts, k=k, allowed=allowed, include_query_overlap=include_query_overlap, expand=expand)
    layers = {"hits": result.hits, "hits_merged": merge_hits(result.hits)}
    if not result.query.empty:
        layers["query"] = result.query
    write_layers(layers, out, fmt, overwrite=overwrite, layer=layer)
    if out != "-":
        top = result.hits.iloc[0] if len(result.hits) else None
        log.info(
            "%s: %d hits%s",
            out,
            len(result.hits),
            f"; best tile {top.tile_id} (score {top.score:.3f}) in {Path(top.scene).name}" if top is not None else "",
        )
        sides = [p for name, p in side_paths(out, fmt, layers).items() if name != "hits"]
        if sides:
            log.info("%s holds the hits; beside it: %s", out, ", ".join(str(p) for p in sides))
    if result.left_out and len(result.hits) == k:
        log.info(
            "left out: %d tile(s) of the query's own place that ranked among the %d best (--include-query-overlap "
            "keeps them)",
            result.left_out,
            k,
        )
    if len(result.hits) < k:
        why = []
        n_tiles = bundle.n_tiles()  # one catalog read, and only for a short result
        if n_tiles < k:
            why.append(f"{index_dir} holds {n_tiles} tiles")
        if allowed is not None:
            why.append(f"{len(allowed)} pass the filters")
        if result.own_place:
            why.append(f"{result.own_place} are the query's own place (--include-query-overlap keeps them)")
        log.info("%d of the %d hits asked for: %s", len(result.hits), k, "; ".join(why) or "no more tiles")
    if log.isEnabledFor(logging.DEBUG) and len(result.hits):
        import shapely

        # -v: the ranking on the terminal (plain lines, not debug records), each hit's centre in lon/lat.
        centres = shapely.centroid(result.hits.geometry.values)
        for hit, c in zip(result.hits.itertuples(), centres, strict=True):
            log.info(
                "%4d  score %.3f  tile %-20s %.5f,%.5f  %s",
                hit.rank,
                hit.score,
                hit.tile_id,
                c.x,
                c.y,
                Path(hit.scene).name,
            )
