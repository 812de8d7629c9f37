"""Write search results: a styled GeoPackage for QGIS, GeoJSON (file or stdout), or FlatGeobuf.

The GeoPackage gets a ``layer_styles`` table (the QGIS convention, also written by QGIS itself), so
``hits`` opens coloured and labelled by rank and ``hits_merged`` as outlines. Files are written under a
temp name in the same directory and renamed, so a failed search leaves no half-written output; a search
added to an existing GeoPackage is written into a copy of it, renamed over it when whole.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import re
import shutil
import sqlite3
import sys
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely

from geoir.errors import QueryError
from geoir.io.files import atomic_target, write_reason

FORMATS = {"gpkg": "GPKG", "geojson": "GeoJSON", "fgb": "FlatGeobuf"}
#: Layers that go beside the hits file (``NAME.LAYER.EXT``) in the one-layer formats.
SIDE_LAYERS = ("hits_merged", "query")
SUFFIXES = {".gpkg": "gpkg", ".geojson": "geojson", ".json": "geojson", ".fgb": "fgb"}
#: GeoJSON as RFC 7946 has it, in files and on stdout alike: WGS 84 longitude, latitude without a ``crs``
#: member, 7 decimals (about 1 cm), and a footprint across the antimeridian cut there into a MultiPolygon
#: (GeoPackage and FlatGeobuf keep it one polygon with continuous longitudes).
GEOJSON_OPTIONS = {"RFC7946": "YES", "WRITE_NAME": "NO"}


#: QGIS styles by kind of layer, (file in geoir/output/styles, description): a search's three layers and the
#: two layers of a bundle's catalog. docs/make_styles.py makes them with QGIS (query.qml is hand-written).
STYLES = {
    "hits": ("hits.qml", "geoir search hits: coloured and labelled by rank, rank 1 on top"),
    "hits_merged": ("merged.qml", "geoir search regions: outlines coloured by best rank"),
    "query": ("query.qml", "geoir search query: dashed outline"),
    "tiles": ("catalog_tiles.qml", "geoir catalog tiles: outlines"),
    "scenes": ("catalog_scenes.qml", "geoir catalog scenes: outlines labelled with the file name"),
}
#: Table names a ``--layer`` may not take, or start with: the GeoPackage's and SQLite's own.
_RESERVED = re.compile(r"^(gpkg_|rtree_|sqlite_|layer_styles$)", re.IGNORECASE)
_LAYER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$")


def style(kind: str) -> tuple[str, str]:
    """The QGIS style (QML) of a kind of layer (a key of :data:`STYLES`), and its description."""
    file, description = STYLES[kind]
    return (resources.files("geoir") / "output" / "styles" / file).read_text(), description


def gpkg_layer_names(layer: str = "hits") -> dict[str, str]:
    """The GeoPackage layers of a search written as ``layer`` (``--layer``), by kind.

    ``hits`` gives ``hits``, ``hits_merged`` and ``query``; any other name NAME gives NAME, NAME_merged and
    NAME_query, so several searches can sit in one GeoPackage.

    Raises:
        QueryError: ``layer`` is not a usable table name.
    """
    if not _LAYER_NAME.match(layer) or _RESERVED.match(layer):
        raise QueryError(
            f"--layer {layer!r} cannot name a GeoPackage layer; use letters, digits, _ and - (at most 63, starting "
            "with a letter or _), not gpkg_, rtree_, sqlite_ or layer_styles"
        )
    return {"hits": layer, "hits_merged": f"{layer}_merged", "query": "query" if layer == "hits" else f"{layer}_query"}


def geopackage_layers(path: Path) -> list[str] | None:
    """The vector and attribute layers of the GeoPackage at ``path``; None when it is no GeoPackage."""
    try:
        with open(path, "rb") as f:
            head = f.read(72)
    except OSError:
        return None
    # A GeoPackage is an SQLite file whose application id (bytes 68-71) spells GPKG (GP10/GP11 before 1.2).
    if len(head) < 72 or not head.startswith(b"SQLite format 3\0") or head[68:70] != b"GP":
        return None
    try:
        return [str(name) for name in pyogrio.list_layers(path)[:, 0]]
    except Exception:  # unreadable, damaged: not a GeoPackage to add to
        return None


def check_gpkg_target(path: Path, layer: str, overwrite: bool) -> bool:
    """Whether a search's layers go into the existing GeoPackage at ``path`` (True) or a new file (False).

    A GeoPackage keeps its other layers: the search's layers are added to it, and with ``overwrite`` replace
    layers of the same names. A file there that is no GeoPackage is only replaced with ``overwrite``.

    Raises:
        QueryError: The search's layers (or a file that is no GeoPackage) are there and ``overwrite`` is false.
    """
    names = gpkg_layer_names(layer)
    if not path.exists():
        return False
    if path.is_dir():
        raise QueryError(f"{path} is a folder; give --out a file name ending in .gpkg")
    present = geopackage_layers(path)
    if present is None:
        if not overwrite:
            raise QueryError(
                f"{path} exists and is not a GeoPackage; pass --overwrite to replace it, or pick another --out"
            )
        return False
    taken = [n for n in names.values() if n in present]
    if taken and not overwrite:
        raise QueryError(
            f"{path} already has the layer(s) {', '.join(taken)}; pass --overwrite to replace them (its other "
            "layers are kept), or --layer NAME to add this search beside them"
        )
    return True


def suffix_format(out: str) -> str | None:
    """The format an output's suffix names (stdout, ``-``, is GeoJSON); None for an unknown suffix."""
    return "geojson" if out == "-" else SUFFIXES.get(Path(out).suffix.lower())


def format_conflict(out: str, fmt: str | None) -> str | None:
    """Why ``--format`` cannot go with ``--out`` (stdout takes only GeoJSON; a known suffix names its format)."""
    named = suffix_format(out)
    if not fmt or named is None or fmt == named:
        return None
    if out == "-":
        return f"{fmt} cannot go to stdout (--out -), only geojson; drop --format or write to a .{fmt} file"
    return (
        f"{fmt} contradicts --out {out}, whose suffix {Path(out).suffix} names {named}; "
        f"drop --format, or give --out the suffix .{fmt}"
    )


def side_paths(out: str, fmt: str, names: Iterable[str] = SIDE_LAYERS) -> dict[str, Path]:
    """Files that the one-layer formats (GeoJSON, FlatGeobuf) write beside ``out``, one per side layer."""
    if out == "-" or fmt == "gpkg":
        return {}
    path = Path(out)
    return {name: path.with_name(f"{path.stem}.{name}{path.suffix or '.' + fmt}") for name in names}


def style_sidecar(path: Path) -> Path | None:
    """Where QGIS looks for a file layer's default style: the file's name with ``.qml`` for its extension
    (``hits.hits_merged.geojson``: ``hits.hits_merged.qml``); None where that is the file itself."""
    sidecar = Path(path).with_suffix(".qml")
    return None if sidecar == Path(path) else sidecar


def sidecar_is_ours(path: Path, kind: str) -> bool:
    """Whether the style file at ``path`` is geoir's style of ``kind`` as it stands (another output of the same
    name, ``hits.geojson`` beside ``hits.fgb``, wrote it): not a user's style, so no --overwrite is needed."""
    try:
        return path.is_file() and path.read_text() == style(kind)[0]
    except (OSError, UnicodeDecodeError):
        return False


def query_frame(geometries: Iterable[tuple[shapely.Geometry, str, bool]] = ()) -> gpd.GeoDataFrame:
    """A search's ``query`` layer from its ``(footprint, label, negative)`` parts, with typed columns, so an
    empty one (a query without a footprint) writes the same field types."""
    rows = list(geometries)
    return gpd.GeoDataFrame(
        {
            "label": pd.Series([r[1] for r in rows], dtype=object),
            "negative": pd.Series([r[2] for r in rows], dtype=bool),
        },
        geometry=gpd.GeoSeries([r[0] for r in rows], crs="EPSG:4326"),
        crs="EPSG:4326",
    )


def _counter_clockwise(df: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """A copy of ``df`` with polygon exterior rings counter-clockwise and holes clockwise."""
    out = df.copy()
    out[out.geometry.name] = gpd.GeoSeries(
        shapely.orient_polygons(np.asarray(df.geometry.values), exterior_cw=False), index=df.index, crs=df.crs
    )
    return out


def write_layers(
    layers: Mapping[str, gpd.GeoDataFrame] | Any,
    out: str | os.PathLike[str],
    fmt: str | None = None,
    overwrite: bool = False,
    layer: str = "hits",
) -> None:
    """Write a search's layers (``hits``, ``hits_merged``, ``query``): a dict of them, or the
    :class:`~geoir.retrieval.engine.Hits` of a search (all three), in ``fmt`` ``gpkg``, ``geojson`` or ``fgb``
    (by default the one ``out``'s suffix names: ``.gpkg``, ``.geojson``/``.json``, ``.fgb``; ``-`` is GeoJSON).

    GeoPackage holds every layer in one file, named after ``layer`` (:func:`gpkg_layer_names`); an existing
    GeoPackage keeps its other layers, and its layers of the same names are replaced only with ``overwrite``.
    It always gets a ``query`` layer, empty when the query has no footprint (so a query layer of an
    earlier search cannot stay behind). GeoJSON on stdout is one FeatureCollection of the hits (what a pipe
    wants); GeoJSON and FlatGeobuf files hold one layer each, so the other layers go beside the main file as
    ``NAME.LAYER.EXT``, and each file's QGIS style beside it (:func:`style_sidecar`).

    Raises:
        QueryError: The output exists and ``overwrite`` is false, or cannot be written.
    """
    layers = _check_layers(layers)
    if fmt is not None and fmt not in FORMATS:
        raise QueryError(f"fmt {fmt!r:.40} is not an output format; give one of {', '.join(FORMATS)}")
    if not isinstance(out, str | os.PathLike):
        raise QueryError(f"out must be a path (str or pathlib.Path) or '-' for stdout, got {out!r:.60}")
    out = os.fspath(out)
    named = suffix_format(out)
    if fmt is None:
        if named is None:
            raise QueryError(f"cannot tell the format of {out} from its suffix; use .gpkg, .geojson or .fgb, or fmt")
        fmt = named
    elif named is not None and fmt != named:
        # (GeoJSON in a .gpkg file: QGIS would refuse it.)
        raise QueryError(f"fmt {fmt!r} contradicts {out}, whose suffix names {named}; leave fmt out, or change it")
    # Exterior rings counter-clockwise, holes clockwise, in every format: RFC 7946 requires it of GeoJSON,
    # and the catalog's rings run clockwise or not with the raster's orientation (south-up flips them).
    layers = {name: _counter_clockwise(df) for name, df in layers.items()}
    if layer != "hits" and fmt != "gpkg":
        raise QueryError(f"--layer names the layers of a GeoPackage; drop it, or write to a .gpkg (not {fmt})")
    if out == "-":
        if fmt != "geojson":
            raise QueryError("only GeoJSON can go to stdout (--out -); drop --format or write to a file")
        buffer = io.BytesIO()
        pyogrio.write_dataframe(layers["hits"], buffer, layer="hits", driver="GeoJSON", layer_options=GEOJSON_OPTIONS)
        sys.stdout.write(buffer.getvalue().decode())
        return
    path = Path(out)
    if fmt == "gpkg":
        _write_gpkg_file(layers, path, overwrite, layer)
        return
    targets = {"hits": path}
    ext = path.suffix or f".{fmt}"
    stale: list[Path] = []
    for name, side in side_paths(out, fmt, dict.fromkeys([*layers, *SIDE_LAYERS])).items():
        if name in layers and name != "hits":
            targets[name] = side
        elif name not in layers and overwrite:
            # Written by an earlier run that had this layer: it would mislead.
            stale += [p for p in (side, style_sidecar(side)) if p is not None and p.exists()]
    # GeoJSON and FlatGeobuf hold no style: QGIS takes a layer's default style from NAME.qml beside the file.
    sidecars = {name: s for name, t in targets.items() if (s := style_sidecar(t)) is not None}
    if not overwrite:
        mine = [s for name, s in sidecars.items() if not sidecar_is_ours(s, name)]
        existing = [p for p in [*targets.values(), *mine] if p.exists()]
        if existing:
            raise QueryError(f"{existing[0]} exists; pass --overwrite to replace it")
    with _write_errors(path):
        # Every file is written and read back under a temp name before any is renamed, so a failure (a full
        # disk, which GDAL's FlatGeobuf and GeoJSON drivers do not always report) leaves no file, and no
        # result set with some of its layers. The temp name ends with the format's extension whatever
        # ``path`` is called: GDAL's FlatGeobuf driver writes a directory of files to a path without ".fgb".
        with contextlib.ExitStack() as stack:
            # FlatGeobuf's spatial index would reorder features; hits must stay in rank order.
            options = {"SPATIAL_INDEX": "NO"} if fmt == "fgb" else GEOJSON_OPTIONS
            for name, target in targets.items():
                tmp = stack.enter_context(atomic_target(target, ext))
                df = layers[name]
                # An empty FlatGeobuf layer of no declared type would be "Unknown"; GeoJSON has no layer type.
                kind = "Polygon" if fmt == "fgb" and not len(df) else None
                pyogrio.write_dataframe(
                    df, tmp, layer=name, driver=FORMATS[fmt], layer_options=options, geometry_type=kind
                )
                _check_written(tmp, {name: df}, one_layer=True)
                if name in sidecars:
                    stack.enter_context(atomic_target(sidecars[name])).write_text(style(name)[0])
        for side in stale:
            side.unlink(missing_ok=True)


def _check_layers(layers: object) -> dict[str, gpd.GeoDataFrame]:
    """The layers to write, by name: a search's :class:`Hits` gives all three; a dict is checked."""
    if hasattr(layers, "hits") and hasattr(layers, "query") and not isinstance(layers, Mapping):
        from geoir.retrieval.engine import merge_hits

        return {"hits": layers.hits, "hits_merged": merge_hits(layers.hits), "query": layers.query}
    kinds = ("hits", *SIDE_LAYERS)
    if not isinstance(layers, Mapping) or "hits" not in layers:
        raise QueryError(f"layers must be a search's Hits, or a dict with a 'hits' GeoDataFrame, got {layers!r:.60}")
    for name, df in layers.items():
        if name not in kinds or not isinstance(df, gpd.GeoDataFrame):
            raise QueryError(f"layers: {name!r:.40} must be one of {', '.join(kinds)}, with a GeoDataFrame")
    return dict(layers)


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """Turn the errors of writing ``path`` into one message naming it."""
    try:
        yield
    except OSError as exc:
        raise QueryError(f"cannot write {path} ({exc.strerror}); pick a writable --out") from exc
    except (
        pyogrio.errors.DataSourceError,
        pyogrio.errors.DataLayerError,
        pyogrio.errors.FeatureError,
        sqlite3.Error,  # the style rows and VACUUM of a GeoPackage
    ) as exc:
        raise QueryError(f"cannot write {path} ({write_reason(exc)}); is the disk full? pick another --out") from exc


def _write_gpkg_file(layers: dict[str, gpd.GeoDataFrame], path: Path, overwrite: bool, layer: str) -> None:
    names = gpkg_layer_names(layer)
    into_existing = check_gpkg_target(path, layer, overwrite)
    named = {names[kind]: df for kind, df in layers.items()}
    if "query" not in layers:
        named[names["query"]] = query_frame()
    with _write_errors(path), atomic_target(path, ".gpkg") as tmp:
        # An existing GeoPackage is changed in a copy renamed over it when whole: a failure leaves it as it was.
        if into_existing:
            shutil.copyfile(path, tmp)
            shutil.copymode(path, tmp)
        for name, df in named.items():
            new_file = not tmp.exists()
            pyogrio.write_dataframe(
                df,
                tmp,
                layer=name,  # an existing layer of that name is replaced, the file's others kept
                driver="GPKG",
                geometry_type=None if len(df) else "Polygon",
                # GeoPackage 1.2 rather than GDAL's newest: QGIS 3.22 and older GDALs read it without warnings.
                dataset_options={"VERSION": "1.2"} if new_file else None,
            )
        with contextlib.closing(sqlite3.connect(tmp)) as con:
            with con:
                add_styles(con, {name: style(kind) for kind, name in names.items()})
            if into_existing and con.execute("PRAGMA freelist_count").fetchone()[0]:
                con.execute("VACUUM")  # the pages of replaced layers
        _check_written(tmp, named)


def _check_written(path: Path, layers: dict[str, gpd.GeoDataFrame], one_layer: bool = False) -> None:
    """Read a written file back: every layer there with all its features (GDAL may not report a full disk).
    ``one_layer``: the file's one layer, whatever it is called (an RFC 7946 GeoJSON file names none)."""
    for name, df in layers.items():
        try:
            got = pyogrio.read_dataframe(path, layer=0 if one_layer else name, columns=[])
        except Exception as exc:  # any reading error means the file is not whole
            raise pyogrio.errors.DataSourceError(f"written file unreadable: {exc}") from exc
        if len(got) != len(df):
            raise pyogrio.errors.DataSourceError(f"layer {name} holds {len(got)} of its {len(df)} features")


def add_styles(con: sqlite3.Connection, styles: dict[str, tuple[str, str]]) -> None:
    """Give layers geoir's default style in QGIS' ``layer_styles`` table: ``{layer: (qml, description)}``.

    Styles geoir gave the same layers before are replaced; styles saved by others are kept (QGIS opens a
    layer with its newest default style, which is this one).
    """
    con.execute(
        """CREATE TABLE IF NOT EXISTS layer_styles (
            id INTEGER PRIMARY KEY AUTOINCREMENT, f_table_catalog TEXT(256), f_table_schema TEXT(256),
            f_table_name TEXT(256), f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT,
            styleSLD TEXT, useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30),
            update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"""
    )
    # QGIS 3.22 lists each of a file's styles twice when two of them share an update time to the second, so
    # the rows added here are a second apart and later than any there (a little in the future at worst).
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    latest = con.execute("SELECT max(update_time) FROM layer_styles").fetchone()[0]
    with contextlib.suppress(TypeError, ValueError):
        now = max(
            now, dt.datetime.fromisoformat(latest).astimezone(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=1)
        )
    # Registering the table as plain attributes keeps the GeoPackage valid for GDAL and QGIS.
    con.execute(
        "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, last_change) "
        "VALUES ('layer_styles', 'attributes', 'layer_styles', ?)",
        (_gpkg_datetime(now),),
    )
    for i, (layer, (qml, description)) in enumerate(styles.items()):
        con.execute("DELETE FROM layer_styles WHERE f_table_name = ? AND styleName = ?", (layer, f"geoir {layer}"))
        geom_col = con.execute(
            "SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (layer,)
        ).fetchone()
        con.execute(
            "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, styleName,"
            " styleQML, styleSLD, useAsDefault, description, owner, ui, update_time)"
            " VALUES ('', '', ?, ?, ?, ?, '', 1, ?, '', '', ?)",
            (
                layer,
                geom_col[0] if geom_col else "geom",
                f"geoir {layer}",
                qml,
                description,
                _gpkg_datetime(now + dt.timedelta(seconds=i)),
            ),
        )


def _gpkg_datetime(t: dt.datetime) -> str:
    """A GeoPackage DATETIME: ISO 8601 in UTC with a Z (SQLite's CURRENT_TIMESTAMP is not one)."""
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")
