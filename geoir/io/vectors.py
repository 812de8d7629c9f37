"""Reading the vector files users hand in: labels, search examples, areas of interest.

A file may be named with one of its layers, ``FILE:LAYER`` (``labels.gpkg:final``), as GDAL's tools
name subdatasets. A file with several layers of geometries and no layer named is refused, listing them:
reading the first one would train or search on a layer the user did not mean.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from geoir.errors import GeoirError

if TYPE_CHECKING:
    import geopandas as gpd


def split_layer(spec: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """``FILE:LAYER`` as (file, layer); a name that exists as it is, or has no ``:``, names no layer."""
    text = os.fspath(spec)
    if Path(text).exists():
        return Path(text), None
    head, sep, layer = text.rpartition(":")
    if sep and head and layer and Path(head).is_file():
        return Path(head), layer
    return Path(text), None


def read_vectors(
    spec: str | os.PathLike[str], what: str, error: type[GeoirError], fix: str, require_crs: bool = True
) -> gpd.GeoDataFrame:
    """The features of a vector file (``FILE`` or ``FILE:LAYER``) as a GeoDataFrame.

    Args:
        spec: The file, optionally with ``:LAYER``.
        what: How messages name the file (``"--aoi labels.gpkg"``, ``"examples file"``...).
        error: The error type to raise.
        fix: What to pass instead, for an unreadable file ("pass a GeoPackage or GeoJSON ...").
        require_crs: Refuse a file without a CRS.

    Raises:
        error: Missing or unreadable file, a layer that is not there, several layers and none named,
            no CRS.
    """
    import geopandas as gpd
    import pyogrio

    path, layer = split_layer(spec)
    if not path.exists():
        raise error(f"{what} {path} does not exist; {fix}")
    try:
        layers = [(str(name), geom) for name, geom in pyogrio.list_layers(path)]
    except Exception as exc:  # pyogrio raises several types for unreadable files
        raise error(f"cannot read {what} {path} ({exc}); {fix}") from exc
    spatial = [name for name, geom in layers if geom is not None]
    names = ", ".join(spatial or [name for name, _ in layers])
    if layer is not None and layer not in {name for name, _ in layers}:
        raise error(f"{what} {path} has no layer {layer!r}; its layers are {names}: name one as {path}:LAYER")
    if layer is None and len(spatial) > 1:
        raise error(f"{what} {path} has {len(spatial)} layers ({names}); name the one to use as {path}:LAYER")
    try:
        gdf = gpd.read_file(
            path, engine="pyogrio", layer=layer if layer is not None else (spatial[0] if spatial else None)
        )
    except Exception as exc:
        raise error(f"cannot read {what} {path} ({exc}); {fix}") from exc
    if not isinstance(gdf, gpd.GeoDataFrame) or gdf.geometry.name not in gdf.columns:
        raise error(f"{what} {path} has no geometries; {fix}")
    if require_crs and gdf.crs is None:
        raise error(f"{what} {path} has no CRS; set one (e.g. EPSG:4326) in the file")
    return gdf


class VectorPathType(click.ParamType):
    """A vector file that exists, optionally with ``:LAYER`` (kept as one path; :func:`read_vectors` splits it)."""

    name = "FILE[:LAYER]"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        if isinstance(value, Path):
            value = os.fspath(value)
        path, _ = split_layer(str(value))
        if not path.exists():
            # A missing input is bad data, as for scenes and images (exit 1), not a usage error.
            hint = f" ({param.get_error_hint(ctx)})" if param is not None and ctx is not None else ""
            raise click.ClickException(f"{path}: no such file or folder{hint}; check the path")
        return Path(str(value))
