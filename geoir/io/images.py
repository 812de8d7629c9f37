"""Read image files (PNG, JPEG, GeoTIFF of any size) as uint8 RGB arrays for encoding or querying."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import rasterio
import shapely
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from geoir.errors import QueryError
from geoir.io.scene import Scaling, Scene, gdal_reason, open_scene, valid_mask
from geoir.tiling.grid import footprints

#: Images larger than this (longest side, pixels) are read decimated: the backbone sees 224-ish pixels
#: anyway, and a whole-scene query must not load gigabytes.
MAX_READ_SIDE = 2048


@dataclass(frozen=True)
class Image:
    """An image read for encoding: uint8 RGB pixels and, when georeferenced, its footprint.

    Attributes:
        path: The file.
        rgb: ``(3, H, W)`` uint8.
        footprint: Footprint polygon in EPSG:4326, or None for a plain image.
        scene: The raster as a :class:`~geoir.io.scene.Scene`, for georeferenced images.
    """

    path: Path
    rgb: np.ndarray
    footprint: shapely.Polygon | None = None
    scene: Scene | None = None


def read_image(
    path: str | os.PathLike[str],
    scaling: Scaling | None = None,
    bands: tuple[int, ...] | None = None,
    nodata: float | None = None,
) -> Image:
    """Read an image as uint8 RGB ``(3, H, W)``, with its footprint when georeferenced (see :func:`_read`)."""
    import warnings

    # Plain PNG/JPEG queries have no georeferencing by design: that is not worth a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            return _read(Path(path), scaling, bands, nodata)
        except RasterioIOError as exc:
            raise QueryError(
                f"{path} cannot be read as an image ({gdal_reason(exc)}); the file is truncated or damaged: "
                "copy or export it again"
            ) from exc


def _check_whole_png(p: Path) -> None:
    """GDAL's PNG driver reads a truncated file's missing rows as zeros without an error; PIL's chunk check
    (no decoding) finds the file cut short."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(p) as im:
            im.verify()
    except PILImage.DecompressionBombError as exc:
        raise QueryError(
            f"{p} declares {bomb_size(exc)}, too many for an image query (a decompression bomb?); crop or shrink it "
            "to the place you are looking for"
        ) from exc
    except Exception as exc:  # PIL raises OSError or SyntaxError for a damaged file
        raise QueryError(
            f"{p} cannot be read as an image (truncated or damaged: {exc}); copy or export it again"
        ) from exc


def _read(p: Path, scaling: Scaling | None, bands: tuple[int, ...] | None = None, nodata: float | None = None) -> Image:
    """Read an image as uint8 RGB ``(3, H, W)``, with its footprint when georeferenced.

    Georeferenced rasters are read like tiles: with ``bands`` and ``scaling`` when given (those of the
    scene a query was cut from), else with the default bands and their own percentile statistics, and their
    invalid pixels (nodata, NaN, mask or alpha; ``nodata``, the scene's, where the file declares none) black,
    as a tile's are. Plain images must be 8-bit; one band is repeated, alpha is dropped.

    Raises:
        QueryError: Missing file, not an image, or an unsupported band layout.
    """
    if not p.exists():
        raise QueryError(f"{p}: no such image; check the path")
    try:
        src = rasterio.open(p)
    except RasterioIOError as exc:
        raise QueryError(f"{p} is not an image GDAL can read ({exc}); pass a PNG, JPEG or GeoTIFF") from exc
    with src:
        georeferenced = src.crs is not None and not src.transform.is_identity
        f = max(1.0, max(src.width, src.height) / MAX_READ_SIDE)
        shape = (max(1, round(src.height / f)), max(1, round(src.width / f)))
        driver = src.driver
    if driver == "PNG":
        _check_whole_png(p)
    if georeferenced:
        scene = open_scene(p, bands=bands)
        if scaling is not None:
            scene = replace(scene, scaling=scaling)
        if nodata is not None and scene.mask_kind == "none":
            scene = replace(scene, nodata=nodata, mask_kind="nodata")
        with rasterio.open(p) as src:
            data = src.read(list(scene.bands), out_shape=(3, *shape))
            valid = valid_mask(src, data, scene.bands, scene.nodata, scene.mask_kind, out_shape=(3, *shape))
        rgb = scene.scaling.apply(data)
        if not valid.all():
            rgb[:, ~valid] = 0
        fp = footprints(scene.transform, [Window(0, 0, scene.width, scene.height)], scene.crs)[0]
        return Image(p, rgb, fp, scene)
    with rasterio.open(p) as src:
        if src.dtypes[0] != "uint8":
            raise QueryError(
                f"{p} is {src.dtypes[0]} without georeferencing, so no scene's stretch applies to it; save it as "
                "8-bit PNG/JPEG, or as a georeferenced GeoTIFF cut from the scene (QGIS: Clip Raster by Extent)"
            )
        if src.colorinterp[0] == ColorInterp.palette:
            # A colour-mapped image (a palette PNG or GIF): its pixels are indices into the colour map.
            cmap = src.colormap(1)
            lut = np.zeros((256, 3), dtype=np.uint8)
            for i, rgba in cmap.items():
                lut[i] = rgba[:3]
            return Image(p, np.ascontiguousarray(lut[src.read(1, out_shape=shape)].transpose(2, 0, 1)))
        data = src.read([1, 1, 1] if src.count < 3 else [1, 2, 3], out_shape=(3, *shape))
    return Image(p, data)


def bomb_size(exc: Exception) -> str:
    """The pixel count PIL's ``DecompressionBombError`` names, for a message: "400,000,000 pixels"."""
    declared = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(declared[1]):,} pixels" if declared else "more pixels than PIL allows"
