"""The Python API: the same jobs as the CLI, as functions.

>>> import geoir
>>> geoir.tile(["scene.tif"], index="geoir-index")            # doctest: +SKIP
>>> hits = geoir.search("query.png", index="geoir-index", k=10)  # doctest: +SKIP
>>> hits.hits[["rank", "score", "tile_id"]]                     # doctest: +SKIP
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from geoir.encoding.model import Model, load_model, model_for_bundle
from geoir.errors import GeoirError, ModelError, QueryError, TilingError
from geoir.index.bundle import DEFAULT_INDEX, Bundle, discard_if_unused
from geoir.retrieval.engine import Hits, QueryParts, Searcher, check_bbox, check_counts, tile_ref
from geoir.tiling.grid import TilingParams
from geoir.tiling.run import TileReport, nothing_readable, prepare_scenes, tile_scenes

__all__ = ["GeoirError", "Hits", "Model", "encode_images", "load_model", "search", "tile"]

PathLike = str | os.PathLike[str]
#: One query part: an image file, a uint8 RGB array (3, H, W), or a tile id (numpy integers too).
QueryPart = PathLike | np.ndarray | int | np.integer


def tile(
    scenes: Sequence[PathLike] | PathLike,
    index: PathLike = DEFAULT_INDEX,
    params: TilingParams | None = None,
    model: Model | str | None = None,
    encode: bool = True,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    batch_size: int = 64,
    workers: int = 0,
    tta: bool | None = None,
    skip_unreadable: bool = False,
    stretch: Sequence[float] | None = None,
) -> TileReport:
    """Tile, encode and index scenes into a bundle (``geoir tile``).

    Args:
        scenes: Raster files, globs or directories (one of them, or a list).
        index: Bundle directory, created when missing.
        params: Tiling parameters of a new bundle (default 256 px, no overlap).
        model: A loaded model, a model file, ``"default"`` or ``"backbone"`` (default: the bundle's model,
            else the shipped model).
        encode: False to only cut and catalog the tiles.
        bands: 1-based bands for red, green, blue.
        nodata: Nodata value overriding the files'.
        batch_size: Tiles per model batch.
        workers: Reader processes.
        tta: Encode every tile as the mean features of its 8 flips and quarter turns (``geoir tile
            --tta``); None: as the bundle was encoded (off for a new one). For a loaded ``model``, give
            it to :func:`load_model` instead.
        skip_unreadable: Leave out, with a warning, files that cannot be read (not a raster, no CRS, damaged
            pixels) and tile the rest; the report's ``unreadable`` lists them. Default: the first one raises.
        stretch: ``(low, high)`` in the data's values mapped to 0-255 for every scene (or a pair per channel, 6
            numbers), instead of each file's own 2-98% stretch (``geoir tile --stretch``).
    """
    _flag(encode, "encode", TilingError)
    _flag(skip_unreadable, "skip_unreadable", TilingError)
    _flag(tta, "tta", ModelError, none=True)
    if nodata is not None and (not isinstance(nodata, numbers.Real) or isinstance(nodata, bool)):
        raise TilingError(f"nodata must be a number (the value of the files' fill pixels) or None, got {nodata!r:.60}")
    _check_tta(model, tta)
    if tta and not encode:
        raise ModelError("tta is a way of encoding; leave it out with encode=False")
    batch_size = _whole(batch_size, "batch_size", 1, "a positive number of tiles", TilingError)
    workers = _whole(workers, "workers", 0, "0 (read in this process) or a number of processes", TilingError)
    if params is not None and not isinstance(params, TilingParams):
        raise TilingError(f"params must be a TilingParams, e.g. TilingParams(size=256, gsd=1.0), got {params!r:.60}")
    index = _path_arg(index, "index")
    paths = _paths(scenes, "scenes")
    if not paths:
        raise TilingError("no scenes given; pass raster files, globs or folders")
    unreadable: list[tuple[str, str]] = []
    prepared = prepare_scenes(
        [str(s) for s in paths],
        bands=bands,
        nodata=nodata,
        unreadable=unreadable if skip_unreadable else None,
        stretch=stretch,
    )
    if not prepared and unreadable:
        raise nothing_readable(unreadable)
    existing = Bundle.open(index) if (Path(index) / "manifest.json").exists() else None
    encoder = None
    if encode:
        described = existing.model if existing else None
        if tta and described is not None and not described.get("backbone_tta"):
            raise ModelError(f"{index} was encoded without tta; leave tta out, or use another index")
        encoder = model if isinstance(model, Model) else model_for_bundle(described, model, tta=tta)
    # A new bundle whose run fails before its first tile is removed again (as `geoir tile` does).
    with discard_if_unused(index):
        bundle = Bundle.open_or_create(index, params)
        with bundle.lock():
            report = tile_scenes(
                bundle, prepared, model=encoder, batch_size=batch_size, workers=workers, skip_unreadable=skip_unreadable
            )
        report.unreadable[:0] = unreadable
        if report.unreadable and not (report.added_scenes or report.skipped_scenes or report.encoded_scenes):
            raise nothing_readable(report.unreadable)
        if bundle.manifest["counts"]["tiles"] == 0 and report.added_scenes:
            # Nothing to search, and re-runs would skip the scenes: refused (and the new bundle removed).
            p = bundle.params
            raise TilingError(
                f"no tile of {', '.join(Path(s.path).name for s in prepared)} passed the nodata limit (max_nodata "
                f"{p.max_nodata:g}, tiles of {p.size} px): use a smaller tile size or a larger max_nodata"
            )
        return report


def search(
    query: QueryPart | Sequence[QueryPart],
    index: PathLike = DEFAULT_INDEX,
    k: int = 10,
    model: Model | str | None = None,
    negatives: QueryPart | Sequence[QueryPart] = (),
    bbox: tuple[float, float, float, float] | None = None,
    include_query_overlap: bool = False,
    rotations: bool = True,
    expand: int = 0,
) -> Hits:
    """The ``k`` tiles most like the query (``geoir search``).

    Args:
        query: An image file, a uint8 RGB array ``(3, H, W)``, a tile id (an integer, or a ``"tile:ID"``
            string), or a list or integer array of them (averaged).
        index: Bundle directory.
        k: Number of hits.
        model: The bundle's model (when None, the model file its manifest names, loaded once and kept for
            the next search with the same file: pass a model from :func:`load_model` to choose it yourself).
        negatives: Examples the results should move away from.
        bbox: Only tiles sharing ground with ``(west, south, east, north)`` in degrees (not those that only
            touch it; west > east: a box across the antimeridian).
        include_query_overlap: Keep tiles overlapping a georeferenced query.
        rotations: Match image queries in any of their four quarter turns (False: only as given).
        expand: Query expansion (``geoir search --expand``): search again with the first ``expand`` hits
            averaged into the query (0: off).

    Returns:
        :class:`~geoir.retrieval.engine.Hits` with GeoDataFrames ``hits`` and ``query`` (EPSG:4326).
    """
    if query is None:
        raise QueryError(f"no query given; {_QUERY_KINDS}")
    items = _query_items(query, "query")
    negs = [] if negatives is None else _query_items(negatives, "negatives")
    # Every argument is checked before the bundle is opened and the query encoded (seconds of work).
    check_counts(k, expand)
    if bbox is not None:
        bbox = check_bbox(bbox)
    _flag(include_query_overlap, "include_query_overlap", QueryError)
    _flag(rotations, "rotations", QueryError)
    bundle = Bundle.open(_path_arg(index, "index"))
    if not isinstance(model, Model):
        model = _bundle_model(bundle, model)
    searcher = Searcher(bundle, model, rotations=rotations)
    parts = QueryParts()
    for negative, group in ((False, items), (True, negs)):
        for i, q in enumerate(group):
            if isinstance(q, np.ndarray):
                searcher.add_pixels(parts, q, f"array{i}", negative)
            elif isinstance(q, int):
                searcher.add_tiles(parts, [q], f"tile:{q}", negative)
            else:
                searcher.add_image(parts, Path(q), negative)
    allowed = searcher.allowed_ids(bbox=bbox)
    return searcher.search(parts, k=k, allowed=allowed, include_query_overlap=include_query_overlap, expand=expand)


def encode_images(
    images: Sequence[PathLike] | PathLike,
    model: Model | str | None = None,
    tta: bool | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Embeddings of image files, one row each (``geoir encode IMAGE... --out``); ``tta``: each image as the
    mean features of its 8 flips and quarter turns (``geoir encode --tta``), for a loaded ``model`` given to
    :func:`load_model` instead; ``batch_size``: consecutive images of one size encoded together."""
    from geoir.io.images import read_image

    _flag(tta, "tta", ModelError, none=True)
    _check_tta(model, tta)
    batch_size = _whole(batch_size, "batch_size", 1, "a positive number of images", ModelError)
    paths = _paths(images, "images")
    m = model if isinstance(model, Model) else load_model(model, tta=bool(tta))
    return m.encode_images((read_image(p).rgb for p in paths), batch_size).embedding


#: The model the last search loaded for its bundle, by what identifies it: a notebook searching in a loop
#: loads it once (1 to 4 s each time before), and a changed model file is loaded again.
_LAST_MODEL: tuple[tuple[object, ...], Model] | None = None


def _bundle_model(bundle: Bundle, model: str | os.PathLike[str] | None) -> Model:
    global _LAST_MODEL
    described = bundle.model or {}
    chosen = model if model is not None else described.get("path") or described.get("name")
    where = Path(str(chosen)) if chosen is not None else None
    st = where.stat() if where is not None and where.is_file() else None
    stamp = (where.resolve(), st.st_mtime_ns, st.st_size) if where is not None and st is not None else None
    key = (str(chosen), stamp, described.get("fingerprint"), described.get("backbone_tta"))
    if _LAST_MODEL is not None and _LAST_MODEL[0] == key:
        return _LAST_MODEL[1]
    loaded = model_for_bundle(bundle.model, model)
    _LAST_MODEL = (key, loaded)
    return loaded


_QUERY_KINDS = "pass an image file, a uint8 RGB array (3, H, W), a tile id (or 'tile:ID'), or a list of them"


def _query_items(value: object, name: str) -> list[str | os.PathLike | np.ndarray | int]:
    """Query parts as a list of paths, pixel arrays and tile ids (ints): a ``tile:ID`` string or an integer
    array of ids (``hits.tile_id.to_numpy()``) gives ids; anything else is refused by name."""
    single = (str, os.PathLike, np.ndarray, int, np.integer)
    if isinstance(value, Mapping):
        raise QueryError(f"{name} {value!r:.60} is a mapping, not a query; {_QUERY_KINDS}")
    if isinstance(value, np.ndarray) and value.ndim == 1 and np.issubdtype(value.dtype, np.integer):
        values: list = value.tolist()  # tile ids, e.g. hits.tile_id.to_numpy()
    elif isinstance(value, single) and not isinstance(value, bool):
        values = [value]
    elif isinstance(value, Iterable) and not isinstance(value, str | bytes):
        values = list(value)
    else:
        raise QueryError(f"{name} {value!r:.60} is not a query; {_QUERY_KINDS}")
    out: list[str | os.PathLike | np.ndarray | int] = []
    for v in values:
        if isinstance(v, int | np.integer) and not isinstance(v, bool):
            out.append(int(v))
        elif isinstance(v, str) and (tid := tile_ref(v)) is not None:
            out.append(tid)
        elif isinstance(v, str | os.PathLike) and _empty_path(v):
            raise QueryError(f"{name} holds an empty path; {_QUERY_KINDS}")
        elif isinstance(v, str | os.PathLike | np.ndarray):
            out.append(v)
        else:
            raise QueryError(f"{name} holds {v!r:.60}, which is not a query; {_QUERY_KINDS}")
    if not out and name == "query":
        raise QueryError(f"no query given; {_QUERY_KINDS}")
    return out


def _path_arg(value: object, name: str) -> PathLike:
    """A path argument (str or os.PathLike), or a GeoirError naming it."""
    if not isinstance(value, str | os.PathLike):
        raise GeoirError(f"{name} must be a path (str or pathlib.Path), got {value!r:.60}")
    if _empty_path(value):
        raise GeoirError(f"{name} is an empty path; name the bundle's folder")
    return value


def _whole(value: object, name: str, least: int, what: str, error: type[GeoirError]) -> int:
    """An integer argument of at least ``least`` (numpy integers too, not bools), or ``error`` naming it."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < least:
        raise error(f"{name} must be {what}, got {value!r:.40}")
    return int(value)


def _empty_path(value: str | os.PathLike) -> bool:
    """Whether a path is the empty string: pathlib reads it as the current folder (``Path("") == Path(".")``),
    which would tile every raster below it."""
    return os.fspath(value) == ""


def _paths(scenes: Sequence[PathLike] | PathLike, name: str) -> list[PathLike]:
    """One path given alone is a list of one (a str is a sequence of characters, not of paths); anything
    but paths is refused, naming the argument ``name``."""
    if not isinstance(scenes, str | os.PathLike | Iterable) or isinstance(scenes, bytes | np.ndarray | Mapping):
        raise GeoirError(f"{name} must be a path or a list of paths (str or pathlib.Path), got {_short(scenes)}")
    out = [scenes] if isinstance(scenes, str | os.PathLike) else list(scenes)
    for p in out:
        if not isinstance(p, str | os.PathLike):
            raise GeoirError(f"{name} must hold paths (str or pathlib.Path), not {_short(p)}")
        if _empty_path(p):
            raise GeoirError(f"{name} holds an empty path; name files, globs or folders")
    return out


def _short(value: object) -> str:
    """A value for a message: an array by its type and shape, anything else by its repr on one short line."""
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return " ".join(repr(value).split())[:60]


def _flag(value: object, name: str, error: type[GeoirError], none: bool = False) -> None:
    """Raise ``error`` naming ``name`` unless ``value`` is a bool (or None where ``none``): a string such as
    ``"no"`` is true in Python, and would switch the option on."""
    if isinstance(value, bool | np.bool_) or (none and value is None):
        return
    raise error(f"{name} must be True or False{' (or None)' if none else ''}, got {_short(value)}")


def _check_tta(model: Model | str | None, tta: bool | None) -> None:
    """A loaded model carries its own test-time averaging: a ``tta`` that says otherwise is a mistake."""
    if isinstance(model, Model) and tta is not None and tta != model.backbone.tta:
        raise ModelError(
            f"the model passed is loaded with tta={model.backbone.tta}; load it with load_model(..., tta={tta}) "
            "or leave tta out"
        )
