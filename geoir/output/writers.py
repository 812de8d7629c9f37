"""Write search results: a styled GeoPackage for QGIS, GeoJSON (file or stdout), or FlatGeobuf.

The GeoPackage gets a ``layer_styles`` table (the QGIS convention, also written by QGIS itself), so
``hits`` and ``hits_merged`` open coloured by rank and labelled. Files are written under a temp name
in the same directory and renamed, so a failed search leaves no half-written output.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import shapely

from geoir.errors import QueryError
from geoir.io.files import atomic_target

FORMATS = {"gpkg": "GPKG", "geojson": "GeoJSON", "fgb": "FlatGeobuf"}
#: Layers that go beside the hits file (``NAME.LAYER.EXT``) in the one-layer formats.
SIDE_LAYERS = ("hits_merged", "query")
SUFFIXES = {".gpkg": "gpkg", ".geojson": "geojson", ".json": "geojson", ".fgb": "fgb"}


def hits_style(field: str = "rank") -> str:
    """The QGIS style (QML) for a hits layer, graduated and labelled by ``field``."""
    qml = (resources.files("geoir") / "output" / "styles" / "hits.qml").read_text()
    if field != "rank":
        for attr in ("attr", "field", "fieldName", "name"):
            qml = qml.replace(f'{attr}="rank"', f'{attr}="{field}"')
    return qml


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


def _counter_clockwise(df: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """A copy of ``df`` with polygon exterior rings counter-clockwise and holes clockwise."""
    out = df.copy()
    out[out.geometry.name] = gpd.GeoSeries(
        shapely.orient_polygons(np.asarray(df.geometry.values), exterior_cw=False), index=df.index, crs=df.crs
    )
    return out


def write_layers(layers: dict[str, gpd.GeoDataFrame], out: str, fmt: str, overwrite: bool = False) -> None:
    """Write named layers.

    GeoPackage holds every layer in one file; GeoJSON on stdout is one FeatureCollection of the hits
    (what a pipe wants); GeoJSON and FlatGeobuf files hold one layer each, so the other layers go beside
    the main file as ``NAME.LAYER.EXT``.

    Raises:
        QueryError: The output exists and ``overwrite`` is false, or cannot be written.
    """
    # Exterior rings counter-clockwise, holes clockwise, in every format: RFC 7946 requires it of GeoJSON,
    # and the catalog's rings run clockwise or not with the raster's orientation (south-up flips them).
    layers = {name: _counter_clockwise(df) for name, df in layers.items()}
    if out == "-":
        if fmt != "geojson":
            raise QueryError("only GeoJSON can go to stdout (--out -); drop --format or write to a file")
        sys.stdout.write(layers["hits"].to_json(drop_id=True) + "\n")
        return
    path = Path(out)
    targets = {"hits": path}
    ext = path.suffix or f".{fmt}"
    stale: list[Path] = []
    for name, side in side_paths(out, fmt, dict.fromkeys([*layers, *SIDE_LAYERS])).items():
        if name in layers and name != "hits":
            targets[name] = side
        elif name not in layers and overwrite and side.exists():
            stale.append(side)  # written by an earlier run that had this layer: it would mislead
    if not overwrite:
        existing = [p for p in targets.values() if p.exists()]
        if existing:
            raise QueryError(f"{existing[0]} exists; pass --overwrite to replace it")
    try:
        # Every file is written and read back under a temp name before any is renamed, so a failure (a full
        # disk, which GDAL's FlatGeobuf and GeoJSON drivers do not always report) leaves no file, and no
        # result set with some of its layers. The temp name ends with the format's extension whatever
        # ``path`` is called: GDAL's FlatGeobuf driver writes a directory of files to a path without ".fgb".
        with contextlib.ExitStack() as stack:
            if fmt == "gpkg":
                tmp = stack.enter_context(atomic_target(path, ".gpkg"))
                _write_gpkg(layers, tmp)
                _check_written(tmp, layers)
            else:
                # FlatGeobuf's spatial index would reorder features; hits must stay in rank order.
                options = {"SPATIAL_INDEX": "NO"} if fmt == "fgb" else None
                for name, target in targets.items():
                    tmp = stack.enter_context(atomic_target(target, ext))
                    pyogrio.write_dataframe(layers[name], tmp, layer=name, driver=FORMATS[fmt], layer_options=options)
                    _check_written(tmp, {name: layers[name]})
        for side in stale:
            side.unlink(missing_ok=True)
    except OSError as exc:
        raise QueryError(f"cannot write {path} ({exc.strerror}); pick a writable --out") from exc
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, pyogrio.errors.FeatureError) as exc:
        raise QueryError(f"cannot write {path} ({exc}); is the disk full? pick another --out") from exc


def _check_written(path: Path, layers: dict[str, gpd.GeoDataFrame]) -> None:
    """Read a written file back: every layer there with all its features (GDAL may not report a full disk)."""
    for name, df in layers.items():
        try:
            got = pyogrio.read_dataframe(path, layer=name, columns=[])
        except Exception as exc:  # any reading error means the file is not whole
            raise pyogrio.errors.DataSourceError(f"written file unreadable: {exc}") from exc
        if len(got) != len(df):
            raise pyogrio.errors.DataSourceError(f"layer {name} holds {len(got)} of its {len(df)} features")


def _write_gpkg(layers: dict[str, gpd.GeoDataFrame], path: Path) -> None:
    for i, (name, df) in enumerate(layers.items()):
        geom_type = None if len(df) else "Polygon"
        pyogrio.write_dataframe(
            df,
            path,
            layer=name,
            driver="GPKG",
            geometry_type=geom_type,
            append=i > 0,
            dataset_options={"VERSION": "1.2"} if i == 0 else None,
        )
    query = (resources.files("geoir") / "output" / "styles" / "query.qml").read_text()
    styles = {"hits": hits_style("rank"), "hits_merged": hits_style("best_rank"), "query": query}
    with contextlib.closing(sqlite3.connect(path)) as con, con:
        add_styles(con, {k: v for k, v in styles.items() if k in layers})


def add_styles(con: sqlite3.Connection, styles: dict[str, str]) -> None:
    """Create QGIS's ``layer_styles`` table and add a default style per layer."""
    con.execute(
        """CREATE TABLE IF NOT EXISTS layer_styles (
            id INTEGER PRIMARY KEY AUTOINCREMENT, f_table_catalog TEXT(256), f_table_schema TEXT(256),
            f_table_name TEXT(256), f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT,
            styleSLD TEXT, useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30),
            update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"""
    )
    # GeoPackage DATETIME values are ISO 8601 in UTC with a Z (SQLite's CURRENT_TIMESTAMP is not).
    now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    # Registering the table as plain attributes keeps the GeoPackage valid for GDAL and QGIS.
    con.execute(
        "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, last_change) "
        "VALUES ('layer_styles', 'attributes', 'layer_styles', ?)",
        (now,),
    )
    for layer, qml in styles.items():
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
                json.dumps({"by": "geoir", "field": "rank" if layer == "hits" else "best_rank"}),
                now,
            ),
        )
