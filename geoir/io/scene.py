"""Scene I/O: open rasters, choose bands, compute value scaling, read tile windows.

This is the only module of the tiling stage that touches file names. A :class:`Scene` carries what
the rest of the pipeline needs to know about a raster (CRS, grid, bands, scaling) as plain values, so
worker processes can reopen the file themselves from ``Scene.path``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import os
import sys
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Interleaving, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from geoir.errors import SceneError, TilingError

log = logging.getLogger("geoir")

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".img", ".vrt", ".ntf", ".nitf", ".hdf", ".nc")
#: Plain images (not raster formats): a folder search leaves them out, but says so (they may be
#: georeferenced by a world file).
PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")

#: Percentiles used to stretch non-uint8 data to 0-255. 2/98 is the usual "linear 2%" stretch of
#: QGIS and most viewers: robust to a few saturated or dark pixels.
DEFAULT_PERCENTILES = (2.0, 98.0)

#: Longest side of the decimated read used for statistics (between half this and this when the file has
#: overviews); bounded so a 20000x20000 scene costs the same as a small one. Read at full resolution
#: (nearest), 256-512 px a side pin the 2nd/98th percentiles to well under one grey level. An averaged
#: overview has narrower tails: the percentiles it gives can differ by several grey levels (up to 8 on a
#: Sentinel-2 scene), so adding overviews to a file (gdaladdo, a COG) changes its stretch a little.
STATS_MAX_SIDE = 512

_METERS_PER_DEGREE = 111_319.49

#: Head-room added to the block cache a scene's reads need (GDAL's own bookkeeping, a mask band's blocks).
BLOCK_CACHE_MARGIN = 8 << 20

#: Most threads GDAL may use to decode the blocks of a row of tiles (see :func:`read_threads`).
READ_THREADS_MAX = 4

#: Largest array one read-ahead returns; a wider row of blocks is read ahead in pieces of whole blocks.
READ_AHEAD_BYTES = 16 << 20

# GDAL's block cache size when geoir first lowered it (the ceiling for every later scene of the process),
# and the size geoir set last; both guarded by the lock, as readers in threads may open scenes at once.
_cache_ceiling: int | None = None
_cache_set = 0
_cache_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class Scaling:
    """Linear stretch of each selected band from ``[low, high]`` to ``[0, 255]``.

    Computed once per scene from a decimated read and stored in the catalog, so every tile of a
    scene (and a GeoTIFF query cut from it) is scaled identically. ``low``/``high`` are ``None`` for
    uint8 data, which is used as is. ``fixed``: given by the user (``--stretch``), not the file's statistics.
    """

    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    fixed: bool = False

    @property
    def identity(self) -> bool:
        return self.low is None

    def apply(self, data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Scale ``data`` (bands, rows, cols) of any dtype to uint8, into ``out`` when given."""
        if self.low is None or self.high is None:
            if data.dtype == np.uint8:
                if out is None:
                    return data
                if data is not out:
                    np.copyto(out, data)
                return out
            return _to_uint8(np.clip(data, 0, 255), out)
        low = np.asarray(self.low, dtype=np.float32)[:, None, None]
        high = np.asarray(self.high, dtype=np.float32)[:, None, None]
        span = np.maximum(high - low, 1e-6)
        # (data - low) * 255 / span, rounded and clipped, computed in place in one float32 buffer: the
        # same arithmetic as the plain expression (so the same bytes) at a third of the cost per tile.
        buf = data.astype(np.float32)
        buf -= low
        buf *= 255.0 / span
        if not np.issubdtype(data.dtype, np.integer):
            # Integer input cannot give NaN or infinity here (span >= 1e-6); float input can.
            np.nan_to_num(buf, copy=False, nan=0.0)
        buf += 0.5
        np.clip(buf, 0, 255, out=buf)
        return _to_uint8(buf, out)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"low": list(self.low) if self.low else None}
        d["high"] = list(self.high) if self.high else None
        if self.fixed:  # statistics' stretches keep the record they always had
            d["fixed"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scaling:
        low, high = d.get("low"), d.get("high")
        return cls(tuple(low) if low else None, tuple(high) if high else None, bool(d.get("fixed", False)))


def _to_uint8(values: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``values.astype(np.uint8)``, written into ``out`` when given (the same cast either way)."""
    if out is None:
        return values.astype(np.uint8)
    np.copyto(out, values, casting="unsafe")
    return out


@dataclass(frozen=True, slots=True)
class Scene:
    """A raster opened for tiling: its grid, CRS, selected bands and value scaling.

    Attributes:
        id: Short content-derived id (first 16 hex digits of ``fingerprint``).
        path: Absolute path of the raster.
        fingerprint: Sampled content hash (see :func:`content_fingerprint`).
        crs: Coordinate reference system of the raster.
        transform: Affine transform of the native pixel grid.
        width: Native width in pixels.
        height: Native height in pixels.
        count: Number of bands in the file.
        dtype: Numpy dtype name of the bands.
        nodata: Nodata value, if any (file value or user override).
        bands: 1-based band indexes read for each of the three model channels.
        native_gsd: Ground sample distance of the native grid in metres (approximate for
            geographic CRSs).
        scaling: Stretch to 0-255 for non-uint8 data.
        mask_kind: How invalid pixels are found: ``nodata``, ``mask`` (internal mask or alpha),
            ``nan`` (float data), or ``none``.
        colours_guessed: The default bands of 3 or more that the file names no colours of: the first three,
            taken as red, green, blue (a Landsat stack of B2,B3,B4 is blue, green, red). Not stored.
    """

    id: str
    path: str
    fingerprint: str
    crs: CRS
    transform: Affine
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    bands: tuple[int, ...]
    native_gsd: float
    scaling: Scaling = field(default_factory=Scaling)
    mask_kind: str = "none"
    colours_guessed: bool = field(default=False, compare=False)

    def grid_scale(self, gsd: float | None) -> float:
        """Native pixels per grid pixel for a target ground sample distance (1.0 when ``gsd`` is None)."""
        if gsd is None:
            return 1.0
        return gsd / self.native_gsd

    def grid(self, gsd: float | None) -> tuple[Affine, int, int]:
        """The tiling grid at ``gsd``: its transform, width and height in grid pixels."""
        f = self.grid_scale(gsd)
        width = max(1, round(self.width / f))
        height = max(1, round(self.height / f))
        return self.transform @ Affine.scale(self.width / width, self.height / height), width, height

    def to_record(self) -> dict[str, Any]:
        """Plain JSON-able description, as stored in the catalog."""
        d = asdict(self)
        del d["colours_guessed"]  # what a run says, not what a scene is
        d["crs"] = self.crs.to_wkt()
        d["transform"] = list(self.transform)[:6]
        d["bands"] = list(self.bands)
        d["scaling"] = self.scaling.to_dict()
        return d

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> Scene:
        """Inverse of :meth:`to_record`."""
        return cls(
            id=d["id"],
            path=d["path"],
            fingerprint=d["fingerprint"],
            crs=CRS.from_user_input(d["crs"]),
            transform=Affine(*d["transform"]),
            width=int(d["width"]),
            height=int(d["height"]),
            count=int(d["count"]),
            dtype=d["dtype"],
            nodata=d["nodata"],
            bands=tuple(int(b) for b in d["bands"]),
            native_gsd=float(d["native_gsd"]),
            scaling=Scaling.from_dict(d["scaling"]),
            mask_kind=d.get("mask_kind", "none"),
        )


def content_fingerprint(path: str | os.PathLike[str], chunk: int = 1 << 20, files: Sequence[str] | None = None) -> str:
    """A sha256 over the file size and three 1 MiB samples (start, middle, end), and over the other files
    GDAL reads for it.

    Hashing every byte of a 10 GB scene would cost more than tiling it; sampling still changes when
    the file is replaced, re-encoded or appended to, which is what re-running ``geoir tile`` must
    notice. Files under 3 MiB are hashed whole. The other files of the dataset (``files``, GDAL's file
    list; read from the file when None) count by their contents, in 64 KiB samples: a VRT's sources, an
    external overview or mask, a world file. Not ``.aux.xml``: GDAL and QGIS write statistics there when
    they merely look at a file. A file that is the whole dataset has the same fingerprint as before
    geoir looked at other files.
    """
    p = Path(path)
    own = _sampled_hash(p, chunk)
    if files is None:
        try:
            with rasterio.open(p) as src:
                files = src.files
        except RasterioIOError:
            files = []
    me = p.resolve()
    others = [Path(f) for f in files if Path(f).resolve() != me and not f.lower().endswith(".aux.xml")]
    if not others:
        return own
    # By content, in a fixed order, not by path: a mosaic moved with its sources keeps its fingerprint.
    parts = sorted(_sampled_hash(f, 1 << 16) if f.is_file() else "missing" for f in others)
    return hashlib.sha256(f"geoir-fp-files-v1:{own}:{':'.join(parts)}".encode()).hexdigest()


def _sampled_hash(p: Path, chunk: int) -> str:
    size = p.stat().st_size
    h = hashlib.sha256(f"geoir-fp-v1:{size}:".encode())
    with open(p, "rb") as f:
        if size <= 3 * chunk:
            h.update(f.read())
        else:
            for off in (0, size // 2 - chunk // 2, size - chunk):
                f.seek(off)
                h.update(f.read(chunk))
    return h.hexdigest()


def open_scene(
    path: str | os.PathLike[str],
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    stretch: Sequence[float] | None = None,
) -> Scene:
    """Open a raster, validate it and compute what tiling needs.

    Args:
        path: Any GDAL-readable raster with a CRS.
        bands: 1-based band indexes for the three model channels. Default: the red, green and blue
            bands by colour interpretation, else the first three; with fewer than three bands the
            last one is repeated.
        nodata: Override the file's nodata value (e.g. 0 for Landsat fill without a declared nodata).
        percentiles: Low and high percentiles of the stretch for non-uint8 data.
        stretch: A fixed stretch instead, for data of any type (see :func:`stretch_scaling`): the same for
            every scene of a sensor, so their tiles are comparable whatever each file's statistics.

    Raises:
        SceneError: The file is missing, not a raster, has no CRS, or a band is out of range.
        TilingError: ``bands`` or ``stretch`` is not what it must be.
    """
    bands = band_numbers(bands)
    fixed = stretch_scaling(stretch)
    p = Path(path)
    if not p.exists():
        raise SceneError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise SceneError(f"{p} is a directory; pass raster files, a glob, or the directory to `geoir tile`")
    try:
        # Threads decode the blocks of the statistics read (see SceneReader.src).
        # A raster without georeferencing is refused below with its own message; rasterio's warning about
        # it would only add noise before that message.
        with rasterio.Env(GDAL_NUM_THREADS=str(read_threads())), warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(p)
    except RasterioIOError as exc:
        raise SceneError(f"{p} is not a raster GDAL can read ({exc}); pass a GeoTIFF, COG, JP2 or similar") from exc
    with src:
        if src.crs is None and src.gcps[0]:
            raise SceneError(
                f"{p} is georeferenced by ground control points only; warp it to a map grid first "
                f"(gdalwarp -t_srs EPSG:XXXX {p.name} {p.stem}_warped.tif)"
            )
        if src.crs is None and src.rpcs is not None:
            raise SceneError(
                f"{p} is in sensor geometry, placed by RPCs only; orthorectify it onto a map grid first "
                f"(gdalwarp -rpc -t_srs EPSG:XXXX {p.name} {p.stem}_ortho.tif, with -to RPC_DEM=dem.tif if you "
                "have a DEM)"
            )
        if src.crs is None:
            # Say everything that is missing at once, so the suggested command is the whole fix.
            ullr = " -a_ullr ULX ULY LRX LRY" if src.transform.is_identity else ""
            raise SceneError(
                f"{p} has no CRS{' and no geotransform' if ullr else ''}; georeference it first "
                f"(e.g. gdal_edit.py -a_srs EPSG:XXXX{ullr} {p.name})"
            )
        if src.transform.is_identity:
            raise SceneError(f"{p} has a CRS but no geotransform; georeference it first")
        if not (src.crs.is_projected or src.crs.is_geographic):
            # A local (engineering) CRS has no place on Earth: footprints could not be put in lon/lat.
            raise SceneError(
                f"{p} has a local CRS with no place on Earth ({src.crs.to_wkt()[:40]}...); assign its real CRS "
                f"first (gdal_edit.py -a_srs EPSG:XXXX {p.name})"
            )
        chosen = _choose_bands(src, bands, p)
        dtype = src.dtypes[chosen[0] - 1]
        if nodata is not None:
            _check_nodata_fits(nodata, dtype, p)
        nd = nodata if nodata is not None else src.nodata
        mask_kind = _mask_kind(src, chosen, nd)
        scaling = Scaling() if fixed is None else fixed
        if dtype != "uint8" and fixed is None:
            try:
                scaling = _percentile_scaling(src, chosen, nd, mask_kind, percentiles)
            except RasterioIOError as exc:
                raise SceneError(
                    f"{p}: its pixels cannot be read ({gdal_reason(exc)}); the file is truncated or damaged: "
                    "copy or export it again"
                ) from exc
        fp = content_fingerprint(p, files=src.files)
        return Scene(
            id=fp[:16],
            path=str(p.resolve()),
            fingerprint=fp,
            crs=src.crs,
            transform=src.transform,
            width=src.width,
            height=src.height,
            count=src.count,
            dtype=dtype,
            nodata=None if nd is None else float(nd),
            bands=chosen,
            native_gsd=native_gsd(src.crs, src.transform, src.height, src.width),
            scaling=scaling,
            mask_kind=mask_kind,
            colours_guessed=bands is None and _colours_unnamed(list(src.colorinterp)),
        )


def _check_nodata_fits(nodata: float, dtype: str, path: Path) -> None:
    """Refuse a --nodata value no pixel of ``dtype`` can hold (it would match nothing, or fail to fill)."""
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        if not (math.isfinite(nodata) and nodata == int(nodata) and info.min <= nodata <= info.max):
            raise SceneError(
                f"--nodata {nodata:g} is not a {dtype} value, the type of {path.name}'s pixels; give a whole number "
                f"from {info.min} to {info.max}"
            )
    elif np.issubdtype(dt, np.floating) and math.isfinite(nodata) and abs(nodata) > np.finfo(dt).max:
        raise SceneError(f"--nodata {nodata:g} is beyond the {dtype} range of {path.name}'s pixels; give a value in it")


def epsg_code(crs: CRS) -> int | None:
    """The EPSG code of ``crs`` when one matches it closely (90% confidence), else None.

    rasterio's default threshold (70) names a CRS after another one of a different datum: UTM zone 18 on an
    unnamed datum with the WGS 84 ellipsoid came out as EPSG:3450, JAD2001 (Jamaica).
    """
    return crs.to_epsg(confidence_threshold=90)


def crs_label(crs: CRS) -> str:
    """A short name for ``crs``: ``EPSG:32618``, another authority's code, else its PROJ string."""
    epsg = epsg_code(crs)
    if epsg:
        return f"EPSG:{epsg}"
    authority = crs.to_authority(confidence_threshold=90)
    return ":".join(authority) if authority else crs.to_proj4() or "custom CRS (see its WKT)"


def native_gsd(crs: CRS, transform: Affine, height: int, width: int | None = None) -> float:
    """Ground sample distance of a pixel grid in metres (mean of the two pixel axes).

    For geographic CRSs the degree is converted at the grid's centre latitude, which is the best a
    single number can say for a scene in degrees. A projected grid's metres are divided by the projection's
    scale at the grid's centre (see :func:`_projection_scale`), so that its pixels are measured on the
    ground: a Mercator grid's at 60 degrees are half their size in grid units, a polar stereographic
    grid's 2 to 4% off at 60 to 85 degrees.
    """
    sx = math.hypot(transform.a, transform.d)
    sy = math.hypot(transform.b, transform.e)
    if crs.is_geographic:
        lat = transform.f + transform.e * height / 2
        return (sx * math.cos(math.radians(lat)) + sy) / 2 * _METERS_PER_DEGREE
    factor = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    return (sx + sy) / 2 * factor / _projection_scale(crs, transform, height, width)


#: A projection this close to true scale at a scene's centre (UTM's is within 0.1%, national grids' within
#: a few parts in 10,000) keeps its grid units as ground metres: ``--gsd 10`` on a 10 m UTM scene then leaves
#: its pixels as they are instead of resampling them by a factor of 0.9996.
TRUE_SCALE_TOLERANCE = 0.01


def _projection_scale(crs: CRS, transform: Affine, height: int, width: int | None) -> float:
    """The scale of a projected grid at its centre (the geometric mean of its two axes' scales), or 1 where
    it is within :data:`TRUE_SCALE_TOLERANCE` of 1 (Mercator's is always used) or cannot be computed."""
    from pyproj import CRS as ProjCRS
    from pyproj import Proj, Transformer
    from pyproj.exceptions import ProjError

    proj = ProjCRS.from_user_input(crs.to_wkt())
    method = (proj.coordinate_operation.method_name if proj.coordinate_operation else "").lower()
    mercator = "mercator" in method and "transverse" not in method
    try:
        x, y = transform * ((width or 1) / 2, height / 2)
        lon, lat = Transformer.from_crs(proj, proj.geodetic_crs, always_xy=True).transform(x, y)
        factors = Proj(proj).get_factors(lon, lat)
        # (Mercator is conformal: its parallel scale is the scale, as geoir has always measured it.)
        scale = factors.parallel_scale if mercator else math.sqrt(factors.areal_scale)
    except (ProjError, ValueError, TypeError):
        return 1.0
    if not (math.isfinite(scale) and scale > 0):
        return 1.0
    return float(scale) if mercator or abs(scale - 1) > TRUE_SCALE_TOLERANCE else 1.0


def band_numbers(bands: Sequence[int] | None) -> tuple[int, ...] | None:
    """``bands`` as a tuple of Python ints (numpy integers too), checked for type only; None stays None.

    Raises:
        TilingError: ``bands`` is not a sequence of whole numbers (the range is checked per file).
    """
    if bands is None:
        return None
    example = "give 1-based band numbers for red, green, blue, e.g. (4, 3, 2), or one band (1,)"
    out = _numbers(bands, "bands", "band numbers", example, numbers.Integral)
    if not out:
        raise TilingError(f"bands {bands!r}: {example}")
    return tuple(int(b) for b in out)


def _numbers(value: object, name: str, what: str, example: str, kind: type) -> tuple[Any, ...]:
    """``value`` as a tuple of numbers of ``kind`` (not bools), or a TilingError naming ``name``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TilingError(f"{name} {value!r:.60} is not a sequence of {what}; {example}")
    out = tuple(value)
    if not all(isinstance(v, kind) and not isinstance(v, bool) for v in out):
        raise TilingError(f"{name} {value!r:.60}: {example}")
    return out


def stretch_scaling(stretch: Sequence[float] | None) -> Scaling | None:
    """A fixed stretch (``geoir tile --stretch``) as a :class:`Scaling`: ``(low, high)`` for the three channels,
    or ``(low, high)`` per channel, red, green, blue (6 numbers), in the data's own values; None stays None.

    Raises:
        TilingError: Not 2 or 6 finite numbers, or a high not above its low.
    """
    if stretch is None:
        return None
    example = "give LOW,HIGH in the data's values, e.g. (0, 3000), or one pair per channel: (0, 3000, 0, 2800, 0, 2600)"
    values = _numbers(stretch, "stretch", "numbers", example, numbers.Real)
    try:
        limits = [float(v) for v in values]
    except OverflowError:  # a whole number beyond any float
        limits = []
    if len(limits) not in (2, 6) or not all(math.isfinite(v) for v in limits):
        raise TilingError(f"stretch {stretch!r:.60}: {example}")
    pairs = [limits[:2]] * 3 if len(limits) == 2 else [limits[i : i + 2] for i in (0, 2, 4)]
    if any(hi <= lo for lo, hi in pairs):
        raise TilingError(f"stretch {stretch!r:.60}: each HIGH must be above its LOW; {example}")
    return Scaling(tuple(lo for lo, _ in pairs), tuple(hi for _, hi in pairs), fixed=True)


def _choose_bands(src: rasterio.DatasetReader, bands: Sequence[int] | None, path: Path) -> tuple[int, ...]:
    if bands is not None:
        bad = [b for b in bands if not 1 <= b <= src.count]
        if bad:
            raise SceneError(f"{path} has {src.count} band(s); band {bad[0]} is out of range (use 1..{src.count})")
        chosen = list(bands)
        if len(chosen) == 2:
            raise SceneError(
                f"--bands {','.join(map(str, bands))}: give 3 bands (red, green, blue) or 1 (repeated as gray); to "
                f"repeat one of two, name it twice (--bands {bands[0]},{bands[1]},{bands[1]})"
            )
    else:
        ci = list(src.colorinterp)
        if ColorInterp.palette in ci:
            raise SceneError(
                f"{path} is a palette (colour-mapped) raster; expand it to RGB first "
                f"(gdal_translate -expand rgb {path.name} {path.stem}_rgb.tif)"
            )
        rgb = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
        # An alpha band is a mask (see _mask_kind), never a colour: gray + alpha is gray three times.
        colour = [i + 1 for i, c in enumerate(ci) if c != ColorInterp.alpha] or [1]
        chosen = [ci.index(c) + 1 for c in rgb] if all(c in ci for c in rgb) else colour[:3]
        if len(chosen) == 2:
            log.warning(
                "%s has 2 colour bands; they are read as %d,%d,%d (red, green, blue): pass --bands to choose",
                path,
                chosen[0],
                chosen[1],
                chosen[1],
            )
    while len(chosen) < 3:
        chosen.append(chosen[-1])
    if len(chosen) > 3:
        raise SceneError(f"{path}: {len(chosen)} bands selected; the model takes 3 (or 1, repeated)")
    return tuple(chosen)


def _colours_unnamed(ci: list[ColorInterp]) -> bool:
    """Whether a raster of 3 or more colour bands (colour interpretations ``ci``) does not say which is red,
    green and blue: its default bands, the first three, are then a guess."""
    colour = [c for c in ci if c != ColorInterp.alpha]
    return len(colour) >= 3 and not all(c in ci for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue))


def _mask_kind(src: rasterio.DatasetReader, bands: tuple[int, ...], nodata: float | None) -> str:
    if nodata is not None:
        # NaN never equals itself: a NaN nodata value is found with isnan, not ==.
        return "nan" if math.isnan(nodata) else "nodata"
    flags = src.mask_flag_enums[bands[0] - 1]
    if MaskFlags.per_dataset in flags or MaskFlags.alpha in flags:
        return "mask"
    if np.issubdtype(np.dtype(src.dtypes[bands[0] - 1]), np.floating):
        return "nan"
    return "none"


def _percentile_scaling(
    src: rasterio.DatasetReader,
    bands: tuple[int, ...],
    nodata: float | None,
    mask_kind: str,
    percentiles: tuple[float, float],
) -> Scaling:
    # A decimated read goes through overviews when the file has them, so this stays cheap and
    # bounded in memory whatever the scene size.
    f = max(1.0, max(src.width, src.height) / STATS_MAX_SIDE)
    # GDAL serves a decimation from the finest overview at least as fine as asked, and decimates that: a
    # factor of 3.8 decodes the 2x overview whole. An overview within 2x coarser is read as it is instead
    # (a quarter of the decoding, and still over STATS_MAX_SIDE / 2 pixels a side).
    coarser = [o for o in src.overviews(bands[0]) if f < o < 2 * f]
    if coarser:
        f = float(min(coarser))
    shape = (len(bands), max(1, int(src.height / f)), max(1, int(src.width / f)))
    raw = src.read(list(bands), out_shape=shape, resampling=Resampling.nearest)
    data = raw.astype(np.float32)
    valid = valid_mask(src, data, bands, nodata, mask_kind, out_shape=shape)
    # Integers of up to 16 bits: exact order statistics from a histogram, a sixth of the cost of sorting.
    small_int = raw.dtype.kind in "iu" and raw.dtype.itemsize <= 2
    if nodata is None and mask_kind in ("none", "nan"):  # float data's NaN is found; -9999 is not
        # Undeclared fill: one value in every band over a large share of pixels, at the bottom or the top of the
        # data (0, -9999, 65535). Counted in the stretch, it squeezes the real data into a few grey levels.
        finite = data[np.isfinite(data)]
        ends = {0.0, *(float(v) for v in (finite.min(), finite.max()) if finite.size)}
        fill, share = max(((v, float(np.all(data == v, axis=0).mean())) for v in ends), key=lambda t: t[1])
        if share > 0.05:
            log.warning(
                "%s: %.0f%% of pixels are %s in every band and no nodata value is set; if %s is fill, say so: "
                "`geoir tile --nodata %s` for a scene, or once in the file (`rio edit-info --nodata %s %s`), which "
                "a GeoTIFF query needs",
                src.name,
                100 * share,
                *[f"{fill:g}"] * 4,
                Path(src.name).name,
            )
    low, high = [], []
    all_valid = bool(valid.all())
    for i in range(len(bands)):
        # Percentiles depend only on the values, not their order: skip the copy when every pixel counts.
        band = raw[i] if small_int else data[i]
        v = band if all_valid else band[valid]
        if v.dtype.kind == "f":
            # A float band may be NaN (or infinite) where the other bands are valid: stretch on its finite values.
            finite = np.isfinite(v)
            if not finite.all():
                v = v[finite]
        if v.size == 0:
            raise SceneError(f"{src.name} has no valid pixels in band {bands[i]}; check its nodata value")
        lo, hi = _int_percentiles(v, percentiles) if small_int else np.percentile(v, percentiles)
        if hi <= lo:
            hi = lo + 1.0
        low.append(float(lo))
        high.append(float(hi))
    return Scaling(tuple(low), tuple(high))


def _int_percentiles(values: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """``np.percentile(values.astype(np.float32), percentiles)`` (linear method), bit for bit, for small integers.

    The two order statistics around each percentile come from the cumulative histogram instead of a
    partition, then go through numpy's own interpolation arithmetic (same dtypes, same operations).
    """
    v = values.ravel()
    n = v.size
    base = int(v.min())
    cum = np.cumsum(np.bincount(v.astype(np.intp) - base))
    virtual = (n - 1) * np.true_divide(np.asarray(percentiles, dtype=np.float64), 100)
    prev = np.clip(np.floor(virtual), 0, n - 1)
    nxt = np.where(virtual >= n - 1, n - 1, prev + 1)
    gamma = virtual - prev.astype(np.intp)
    a = (np.searchsorted(cum, prev.astype(np.intp), side="right") + base).astype(np.float32)
    b = (np.searchsorted(cum, nxt.astype(np.intp), side="right") + base).astype(np.float32)
    # numpy's _lerp: a + (b - a) * t, or b - (b - a) * (1 - t) where t >= 0.5.
    diff = b - a
    out = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe", dtype=type(out.dtype))
    return out


def valid_mask(
    src: rasterio.DatasetReader,
    data: np.ndarray,
    bands: tuple[int, ...],
    nodata: float | None,
    mask_kind: str,
    window: Window | None = None,
    out_shape: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Boolean (rows, cols) mask of valid pixels for data read from ``src``.

    A pixel is invalid when every selected band equals nodata (GDAL's dataset-mask rule), is NaN,
    or is masked by an internal mask or alpha band.
    """
    if mask_kind == "nodata":
        return ~np.all(data == nodata, axis=0)
    if mask_kind == "nan":
        return ~np.all(np.isnan(data), axis=0)
    if mask_kind == "mask":
        kwargs: dict[str, Any] = {"window": window}
        if out_shape is not None:
            kwargs["out_shape"] = out_shape[1:]
        return src.read_masks(bands[0], **kwargs) > 0
    return np.ones(data.shape[1:], dtype=bool)


class SceneReader:
    """Reads tile windows of one scene as scaled uint8 RGB arrays plus their valid-pixel masks.

    Opens the file lazily and keeps the handle, so a DataLoader worker process that receives a
    reader opens its own dataset handle (GDAL handles must not cross processes).
    """

    def __init__(self, scene: Scene, gsd: float | None = None, resampling: Resampling = Resampling.bilinear):
        self.scene = scene
        self.gsd = gsd
        self.resampling = resampling
        _, gw, gh = scene.grid(gsd)
        self._fx = scene.width / gw
        self._fy = scene.height / gh
        self._src: rasterio.DatasetReader | None = None
        # Whether a window inside the raster must be read with ``fill_value`` (set when the file is opened).
        self._fill_inside = True
        self._cache_fitted = False
        # GDAL's decoding threads for this handle (set when the file is opened).
        self._threads = 1
        # Read-ahead (see _read_ahead): whether it pays for this file, and the native row it has reached.
        self._ahead = False
        self._ahead_to = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_src"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def src(self) -> rasterio.DatasetReader:
        if self._src is None or self._src.closed:
            try:
                # GTiff reads GDAL_NUM_THREADS when a file is opened: requests that span several blocks then
                # decode them in that many threads (what _read_ahead relies on).
                self._threads = read_threads()
                with rasterio.Env(GDAL_NUM_THREADS=str(self._threads)):
                    self._src = rasterio.open(self.scene.path)
            except RasterioIOError as exc:
                raise SceneError(
                    f"{self.scene.path} can no longer be read ({exc}); was it moved? Tile it where it is now (`geoir "
                    f"tile NEW_PATH --index INDEX` updates its path), or take it out of the bundle (`geoir remove "
                    f"{Path(self.scene.path).name} --index INDEX`)"
                ) from exc
            self._fill_inside = _fill_changes_pixels(self._src, self.scene)
            self._cache_fitted = False
            self._ahead_to = 0
        return self._src

    def close(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None

    def read(self, window: Window, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Read a grid window: (3, height, width) uint8 and a (height, width) valid mask.

        Windows are in the tiling grid's pixels; they are mapped to native pixels (possibly
        fractional, when a target GSD resamples). A window reaching past the scene's edge (a scene
        smaller than one tile) gives a padded tile whose padding is masked invalid.

        Args:
            window: The grid window.
            out: A C-contiguous uint8 array of the tile's shape (e.g. a slot of a batch) to write the
                pixels into, and return, instead of a new array.

        Raises:
            SceneError: The pixels cannot be decoded (a truncated or damaged file).
        """
        try:
            return self._read(window, out)
        except RasterioIOError as exc:
            raise SceneError(
                f"{self.scene.path}: the pixels at column {int(window.col_off)}, row {int(window.row_off)} cannot "
                f"be read ({gdal_reason(exc)}); the file is truncated or damaged: copy or export it again"
            ) from exc

    def _read(self, window: Window, out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        sc = self.scene
        out_shape = (len(sc.bands), int(window.height), int(window.width))
        native = Window(
            window.col_off * self._fx, window.row_off * self._fy, window.width * self._fx, window.height * self._fy
        )
        fill = sc.nodata if sc.nodata is not None else 0
        inside = _inside_mask(native, sc.width, sc.height, out_shape[1:])
        src = self.src
        if not self._cache_fitted:
            # A resampled read also takes the rows its kernel needs beyond the window.
            rows = native.height + (0 if self._fy == 1.0 else 2)
            holds = fit_block_cache(src, rows, sc.mask_kind == "mask")
            self._ahead = holds and self._threads > 1 and _blocks_per_row(src, rows) > 1
            self._cache_fitted = True
        if self._ahead:
            self._read_ahead(src, native)
        if inside is not None:
            data, valid = self._read_edge(src, native, out_shape, inside, fill)
        else:
            # A fill value makes rasterio read every band's mask and copy the data through a masked array;
            # it is passed only where it can change a pixel (see _fill_changes_pixels).
            kwargs: dict[str, Any] = {"fill_value": fill} if self._fill_inside else {}
            # uint8 pixels used as they are go straight into ``out``; rasterio may still return another array.
            if out is not None and sc.scaling.identity and sc.dtype == "uint8":
                kwargs["out"] = out
            else:
                kwargs["out_shape"] = out_shape
            data = src.read(list(sc.bands), window=native, resampling=self.resampling, **kwargs)
            valid = valid_mask(src, data, sc.bands, sc.nodata, sc.mask_kind, window=native, out_shape=out_shape)
        rgb = sc.scaling.apply(data, out=out)
        if not valid.all():
            if out is None:
                rgb = rgb.copy()
            rgb[:, ~valid] = 0
        return rgb, valid

    def _read_edge(
        self,
        src: rasterio.DatasetReader,
        native: Window,
        out_shape: tuple[int, int, int],
        inside: np.ndarray,
        fill: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """A window reaching past the scene's edge: the part inside is read, the rest padded and invalid.

        Not rasterio's boundless read: that goes through a warped VRT, which for a rotated or sheared
        geotransform places the pixels of the window wrongly (a tile's pixels came from ground beside its
        footprint), and costs more at every edge tile of any scene.
        """
        sc = self.scene
        data = np.full(out_shape, fill, dtype=sc.dtype)
        valid = np.zeros(out_shape[1:], dtype=bool)
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        if not len(rows) or not len(cols):
            return data, valid
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        # The native pixels under grid rows r0..r1 and columns c0..c1, clipped to the raster (by less than a
        # native pixel where the grid resamples).
        sy, sx = native.height / out_shape[1], native.width / out_shape[2]
        top, left = max(0.0, native.row_off + r0 * sy), max(0.0, native.col_off + c0 * sx)
        bottom = min(float(sc.height), native.row_off + r1 * sy)
        right = min(float(sc.width), native.col_off + c1 * sx)
        part = Window(left, top, right - left, bottom - top)
        shape = (out_shape[0], r1 - r0, c1 - c0)
        kwargs: dict[str, Any] = {"fill_value": fill} if self._fill_inside else {}
        got = src.read(list(sc.bands), window=part, out_shape=shape, resampling=self.resampling, **kwargs)
        data[:, r0:r1, c0:c1] = got
        valid[r0:r1, c0:c1] = valid_mask(src, got, sc.bands, sc.nodata, sc.mask_kind, window=part, out_shape=shape)
        return data, valid

    def _read_ahead(self, src: rasterio.DatasetReader, native: Window) -> None:
        """Decode the rows of blocks under ``native`` not decoded yet, all at once, into GDAL's block cache.

        A tile usually lies inside one block, so its own read decodes blocks one by one. Reading the
        whole width of the new block rows in one request lets GDAL decode them in ``read_threads()``
        threads; the tiles of that row are then copied out of the cache. Tiles come row by row, so a
        high-water mark says what is decoded; only used when the cache holds a row of blocks
        (:func:`fit_block_cache`), so nothing read ahead is evicted before its tiles are read.
        """
        block_rows, block_cols = src.block_shapes[0]
        # One row of margin either side: what a resampling kernel reads beyond the window.
        bottom = min(src.height, math.ceil(native.row_off + native.height) + 1)
        if bottom <= self._ahead_to:
            return
        top = max(self._ahead_to, (max(0, math.floor(native.row_off) - 1) // block_rows) * block_rows)
        bottom = min(src.height, math.ceil(bottom / block_rows) * block_rows)
        if bottom <= top:
            return
        self._ahead_to = bottom
        # A pixel-interleaved block holds every band: GDAL caches all of them when one is read.
        bands = [self.scene.bands[0]] if src.interleaving == Interleaving.pixel else sorted(set(self.scene.bands))
        itemsize = np.dtype(src.dtypes[bands[0] - 1]).itemsize
        cols = READ_AHEAD_BYTES // ((bottom - top) * itemsize * len(bands))
        cols = max(block_cols, cols // block_cols * block_cols)
        for col in range(0, src.width, cols):
            src.read(bands, window=Window(col, top, min(cols, src.width - col), bottom - top))


def gdal_reason(exc: Exception) -> str:
    """GDAL's own reason for a failed read: rasterio's "Read failed. See previous exception" points at an
    exception it chains (the GDAL error), which is the one that says what went wrong."""
    cause = exc.__cause__ or exc.__context__
    text = str(cause if cause is not None and str(cause) else exc)
    return text.splitlines()[0] if text else type(exc).__name__


def read_threads() -> int:
    """Threads GDAL may use to decode a scene's blocks in this process.

    ``GEOIR_READ_THREADS`` when set (1 switches read-ahead off); 1 in a DataLoader worker process
    (the workers already read in parallel); else the usable cores, at most :data:`READ_THREADS_MAX`.
    """
    env = os.environ.get("GEOIR_READ_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise SceneError(f"GEOIR_READ_THREADS={env!r} is not a whole number; set it to e.g. 1 or 4") from None
    if "torch" in sys.modules:
        from torch.utils.data import get_worker_info

        if get_worker_info() is not None:
            return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(READ_THREADS_MAX, cores))


def _blocks_per_row(src: rasterio.DatasetReader, rows: float) -> int:
    """Blocks a full-width read ``rows`` native pixels tall touches (at least 2 for threads to share)."""
    block_rows, block_cols = src.block_shapes[0]
    return math.ceil(src.width / block_cols) * max(1, math.ceil(rows / block_rows))


def block_cache_bytes(src: rasterio.DatasetReader, rows: float, mask: bool = False) -> int:
    """GDAL block cache that reading ``src`` one row of windows after the other needs, in bytes.

    A row of windows ``rows`` native pixels tall touches at most ``ceil(rows / block height) + 1`` rows of
    blocks across the whole width; GDAL decodes all bands of a pixel-interleaved block at once and caches
    each of them. With that much cache every block is decoded once, whatever the scene's height.
    """
    block_rows, block_cols = src.block_shapes[0]
    across = math.ceil(src.width / block_cols)
    down = math.ceil(rows / block_rows) + 1
    bytes_per_pixel = sum(np.dtype(d).itemsize for d in src.dtypes) + (1 if mask else 0)
    return across * down * block_rows * block_cols * bytes_per_pixel


def fit_block_cache(src: rasterio.DatasetReader, rows: float, mask: bool = False) -> bool:
    """Size GDAL's block cache to what reading ``src`` row of windows by row needs; whether it holds that.

    Only when ``GDAL_CACHEMAX`` is set in the environment (the geoir CLI sets it unless the user did),
    and never above the cache size found then, which stays the ceiling for the process. Within it the
    cache is the largest that any scene read so far in the process needs (so readers in threads never
    shrink it under each other): it follows the width of the widest scene, not the area of any.
    Library users who leave ``GDAL_CACHEMAX`` unset keep GDAL's own setting (5 % of the memory).
    """
    global _cache_ceiling, _cache_set
    need = block_cache_bytes(src, rows, mask) + BLOCK_CACHE_MARGIN
    if "GDAL_CACHEMAX" not in os.environ:
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return False
        return need <= memory // 20
    from rasterio.env import get_gdal_config, set_gdal_config

    with _cache_lock:
        if _cache_ceiling is None:
            _cache_ceiling = int(get_gdal_config("GDAL_CACHEMAX"))
        size = min(_cache_ceiling, max(need, _cache_set))
        if size != _cache_set:
            set_gdal_config("GDAL_CACHEMAX", size)
            _cache_set = size
        return need <= size


def _fill_changes_pixels(src: rasterio.DatasetReader, scene: Scene) -> bool:
    """Whether reading a window inside ``src`` with ``fill_value`` can give other pixels than without it.

    rasterio replaces the pixels that a band's GDAL mask hides with the fill value. Nothing is hidden
    when every selected band is all valid; when a band's only mask is its own integer nodata value
    and the fill value is that value, the hidden pixels already hold it. Anything else (internal
    masks, alpha bands, float nodata, which GDAL compares with a tolerance, or a --nodata override
    that differs from the file's) keeps the fill value.
    """
    fill = scene.nodata if scene.nodata is not None else 0
    for b in set(scene.bands):
        flags = src.mask_flag_enums[b - 1]
        if flags == [MaskFlags.all_valid]:
            continue
        nd = src.nodatavals[b - 1]
        integer = np.issubdtype(np.dtype(src.dtypes[b - 1]), np.integer)
        if flags == [MaskFlags.nodata] and integer and nd is not None and nd == fill:
            continue
        return True
    return False


def _inside_mask(native: Window, width: int, height: int, shape: tuple[int, int]) -> np.ndarray | None:
    """Mask of the grid pixels that fall inside the raster (None when the window is fully inside)."""
    if (
        native.col_off >= 0
        and native.row_off >= 0
        and native.col_off + native.width <= width + 1e-6
        and native.row_off + native.height <= height + 1e-6
    ):
        return None
    rows, cols = shape
    ys = native.row_off + (np.arange(rows) + 0.5) * native.height / rows
    xs = native.col_off + (np.arange(cols) + 0.5) * native.width / cols
    return ((ys >= 0) & (ys < height))[:, None] & ((xs >= 0) & (xs < width))[None, :]


#: The file ``geoir tile --export-chips`` leaves in a chips folder, so that a later run over a folder above it
#: does not take the chips for scenes (each place would be indexed twice).
CHIPS_MARKER = ".geoir-chips"


def expand_inputs(inputs: Sequence[str], exclude: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    """Expand files, globs and directories into a sorted, de-duplicated list of raster paths.

    A directory is searched recursively, leaving out hidden files and folders (a killed run's temp files
    start with a dot), the folders in ``exclude`` (e.g. where chips are written) and the chips folders that
    earlier runs exported there (marked by :data:`CHIPS_MARKER`; named itself, a chips folder is tiled).

    Raises:
        SceneError: An input matches nothing.
    """
    import glob

    out: list[Path] = []
    for item in inputs:
        if os.fspath(item) == "":
            # pathlib reads "" as the current folder: every raster below it would be tiled.
            raise SceneError("an empty path names no scene; name files, globs or folders")
        p = Path(item)
        if p.is_dir():
            chips = sorted(m.parent for m in p.rglob(CHIPS_MARKER) if m.parent != p and m.is_file())
            if chips:
                log.info(
                    "%s: left out, chips that geoir tile --export-chips wrote (name the folder to tile them)",
                    ", ".join(map(str, chips)),
                )
            skip = [Path(e).resolve() for e in (*exclude, *chips)]
            files = [
                q
                for q in p.rglob("*")
                if q.is_file()
                and not any(part.startswith(".") for part in q.relative_to(p).parts)
                and not any(q.resolve().is_relative_to(e) for e in skip)
            ]
            found = sorted(q for q in files if q.suffix.lower() in RASTER_SUFFIXES)
            images = sorted({q.suffix.lower() for q in files if q.suffix.lower() in PLAIN_IMAGE_SUFFIXES})
            if images:
                # Not silently: GDAL reads such images too, georeferenced by a world file or .aux.xml.
                n = sum(q.suffix.lower() in PLAIN_IMAGE_SUFFIXES for q in files)
                log.info(
                    "%s: %d image(s) (%s) left out: a folder is searched for %s; name such files to tile them",
                    p,
                    n,
                    ", ".join(images),
                    ", ".join(RASTER_SUFFIXES),
                )
            if not found:
                raise SceneError(f"{p} contains no raster files ({', '.join(RASTER_SUFFIXES)})")
            out.extend(found)
        elif p.exists():
            out.append(p)
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not found:
                raise SceneError(f"{item}: the pattern matches no file")
            out.extend(found)
        else:
            raise SceneError(f"{p}: no such file; check the path")
    seen: set[Path] = set()
    unique = []
    for q in out:
        r = q.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(q)
    return unique
