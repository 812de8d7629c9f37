"""The tiling grid: windows, tile values and their footprints.

Pure functions over pixel windows and affine transforms; nothing here opens a file. Windows are in
the pixels of the *tiling grid*, which is the native grid of the scene or, with a target ground sample
distance, that grid rescaled (see :meth:`geoir.io.scene.Scene.grid`).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from geoir.errors import TilingError

#: Points inserted along each footprint edge before reprojection, so that curved edges in EPSG:4326
#: (e.g. from a UTM grid at high latitude) are followed rather than cut by straight chords.
DENSIFY_POINTS = 8
#: The largest tile side accepted: the backbone sees 224 px, so larger tiles only cost memory (a batch of 64
#: tiles of 8192 px is 13 GB of pixels).
MAX_TILE_SIZE = 8192
#: The most tiles one scene may give (their list alone takes about 1 GB; a 10 m scene of 100,000 km² at
#: 256 px tiles gives 150,000).
MAX_TILES_PER_SCENE = 5_000_000


@dataclass(frozen=True, slots=True)
class TilingParams:
    """How scenes are cut into tiles; fixed for a whole bundle.

    Attributes:
        size: Tile width and height in grid pixels.
        stride: Step between tile origins in grid pixels (``size`` means no overlap; left out or 0: ``size``).
        gsd: Target ground sample distance in metres, or None to keep each scene's native grid.
        max_nodata: Tiles with a larger fraction of invalid pixels are skipped.
    """

    size: int = 256
    stride: int = 0
    gsd: float | None = None
    max_nodata: float = 0.5

    def __post_init__(self) -> None:
        # Types first (the Python API passes anything): whole pixels (numpy's too, made Python ints), real numbers.
        def whole(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise TilingError(f"{name} must be a whole number of pixels, got {v!r}")
            object.__setattr__(self, name, int(v))

        def real(name: str, optional: bool) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise TilingError(f"{name} must be a number{' or None' if optional else ''}, got {v!r}")
            # Kept as given (not made a float): gsd enters the tile ids as text, and 10 and 10.0 differ there.

        whole("size")
        whole("stride")
        real("gsd", optional=True)
        real("max_nodata", optional=False)
        if not 0 < self.size <= MAX_TILE_SIZE:
            raise TilingError(
                f"tile size must be 1 to {MAX_TILE_SIZE} pixels, got {self.size} (the backbone sees 224 px: for tiles "
                "that cover more ground, give a coarser --gsd)"
            )
        if self.stride == 0:
            object.__setattr__(self, "stride", self.size)  # frozen: set once, here
        if not self.stride > 0:
            raise TilingError(f"stride must be > 0 pixels, got {self.stride}")
        if self.gsd is not None and not self.gsd > 0:
            raise TilingError(f"--gsd must be > 0 metres per pixel, got {self.gsd}")
        if not 0.0 <= self.max_nodata <= 1.0:
            raise TilingError(f"--max-nodata must be a fraction in [0, 1], got {self.max_nodata}")

    @classmethod
    def from_overlap(cls, size: int, overlap: float, **kwargs: float | None) -> TilingParams:
        """Parameters from a fractional overlap in [0, 1) instead of a stride."""
        if not 0.0 <= overlap < 1.0:
            raise TilingError(f"--overlap must be in [0, 1), got {overlap}")
        stride = max(1, round(size * (1.0 - overlap)))
        return cls(size=size, stride=stride, **kwargs)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, float | int | None]:
        return {"size": self.size, "stride": self.stride, "gsd": self.gsd, "max_nodata": self.max_nodata}


def axis_offsets(length: int, size: int, stride: int) -> list[int]:
    """Tile origins along one axis: every ``stride``, the last snapped so it ends at ``length``.

    A length smaller than one tile gives a single origin 0 (a padded tile).
    """
    if length <= size:
        return [0]
    n = math.ceil((length - size) / stride) + 1
    offsets = [min(i * stride, length - size) for i in range(n)]
    # Snapping can make the last origin equal the one before it when stride divides exactly.
    return sorted(set(offsets))


def grid_windows(width: int, height: int, size: int, stride: int) -> Iterator[Window]:
    """Windows of a ``width`` x ``height`` grid, row by row (compare ``rasterio.windows.subdivide``)."""
    cols = axis_offsets(width, size, stride)
    for row in axis_offsets(height, size, stride):
        for col in cols:
            yield Window(col, row, size, size)


def tile_count(width: int, height: int, size: int, stride: int) -> int:
    """Number of windows :func:`grid_windows` yields, by formula."""

    def n(length: int) -> int:
        return 1 if length <= size else math.ceil((length - size) / stride) + 1

    return n(width) * n(height)


def tile_id(scene_fingerprint: str, window: Window, params: TilingParams) -> int:
    """A stable 63-bit id for a tile: the same scene content, window and grid always give the same id.

    FAISS keys vectors by int64; 63 bits keep ids positive. Deterministic ids make re-runs and
    distributed runs produce the same catalog as a single-process run.
    """
    key = f"{scene_fingerprint}:{params.size}:{params.gsd}:{int(window.col_off)}:{int(window.row_off)}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


@dataclass(frozen=True, slots=True)
class Tile:
    """One georeferenced tile of a scene.

    Attributes:
        id: Stable 63-bit tile id (see :func:`tile_id`).
        scene_id: Id of the scene the tile belongs to.
        window: Pixel window in the tiling grid (``col_off, row_off, width, height``).
        transform: Affine transform of the tile's own pixels, in the scene CRS.
        crs: The scene CRS.
    """

    id: int
    scene_id: str
    window: Window
    transform: Affine
    crs: CRS

    @property
    def corners(self) -> np.ndarray:
        """The four corners (x, y) in the scene CRS, clockwise from the top-left."""
        w, h = self.window.width, self.window.height
        return np.array([self.transform @ xy for xy in ((0, 0), (w, 0), (w, h), (0, h))])

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` in the scene CRS."""
        c = self.corners
        return (float(c[:, 0].min()), float(c[:, 1].min()), float(c[:, 0].max()), float(c[:, 1].max()))

    @property
    def footprint(self) -> shapely.Polygon:
        """Footprint polygon in the scene CRS (rotated when the transform is)."""
        return shapely.Polygon(self.corners)


def make_tiles(
    scene_id: str, fingerprint: str, grid_transform: Affine, width: int, height: int, crs: CRS, params: TilingParams
) -> Iterator[Tile]:
    """All tiles of a scene's grid, before any nodata filtering."""
    # Each tile's transform is ``grid_transform @ Affine.translation(col_off, row_off)``, written out
    # with the same arithmetic (so the same floats) but without Affine's per-call overhead, which was
    # most of the cost of listing the tiles of a large scene.
    a, b, c, d, e, f = grid_transform[:6]
    ta, tb, td, te = a * 1.0 + b * 0.0, a * 0.0 + b * 1.0, d * 1.0 + e * 0.0, d * 0.0 + e * 1.0
    for w in grid_windows(width, height, params.size, params.stride):
        x, y = float(w.col_off), float(w.row_off)
        yield Tile(
            id=tile_id(fingerprint, w, params),
            scene_id=scene_id,
            window=w,
            transform=Affine(ta, tb, a * x + b * y + c, td, te, d * x + e * y + f),
            crs=crs,
        )


def window_polygons(transform: Affine, windows: Sequence[Window], densify: int = DENSIFY_POINTS) -> np.ndarray:
    """Densified footprint rings of windows as an array (n, 4 * densify + 1, 2) in the grid's CRS."""
    t = np.linspace(0.0, 1.0, densify, endpoint=False)
    # Unit square walked clockwise from the top-left, densify points per edge, then closed.
    unit = np.concatenate(
        [
            np.stack([t, np.zeros_like(t)], 1),
            np.stack([np.ones_like(t), t], 1),
            np.stack([1 - t, np.ones_like(t)], 1),
            np.stack([np.zeros_like(t), 1 - t], 1),
        ]
    )
    unit = np.vstack([unit, unit[:1]])
    win = np.array([[w.col_off, w.row_off, w.width, w.height] for w in windows], dtype=np.float64)
    cols = win[:, None, 0] + unit[None, :, 0] * win[:, None, 2]
    rows = win[:, None, 1] + unit[None, :, 1] * win[:, None, 3]
    a, b, c, d, e, f = transform[:6]
    xs = a * cols + b * rows + c
    ys = d * cols + e * rows + f
    return np.stack([xs, ys], axis=-1)


def footprints(
    transform: Affine, windows: Sequence[Window], src_crs: CRS, dst_crs: str | CRS = "EPSG:4326"
) -> np.ndarray:
    """Footprint polygons of windows reprojected to ``dst_crs``, with densified edges.

    Returns:
        A numpy array of shapely polygons, one per window.
    """
    if not windows:
        return np.array([], dtype=object)
    # pyproj is imported here, not at module level: workers that only read windows never need it.
    from pyproj import CRS as ProjCRS
    from pyproj import Transformer

    rings = window_polygons(transform, windows)
    n, m, _ = rings.shape
    src = ProjCRS.from_user_input(src_crs.to_wkt() if isinstance(src_crs, CRS) else src_crs)
    dst = ProjCRS.from_user_input(dst_crs.to_wkt() if isinstance(dst_crs, CRS) else dst_crs)
    if not src.equals(dst):
        tr = Transformer.from_crs(src, dst, always_xy=True)
        x, y = tr.transform(rings[..., 0].ravel(), rings[..., 1].ravel())
        rings = np.stack([np.asarray(x).reshape(n, m), np.asarray(y).reshape(n, m)], axis=-1)
    if not np.isfinite(rings).all():
        raise TilingError(f"some tile corners cannot be reprojected from {src.name} to {dst.name}")
    if not dst.is_geographic:
        return shapely.polygons(rings)
    # A window round a pole (in a polar stereographic grid, say) goes round every longitude: its area is the
    # cap between its ring and the pole, not the ring itself.
    caps = {i: cap for i in np.flatnonzero(_jumps(rings[..., 0])) if (cap := _polar_cap(rings[i])) is not None}
    polygons = shapely.polygons(_continuous_longitudes(rings))
    for i, cap in caps.items():
        polygons[i] = shapely.Polygon(cap)
    return polygons


def _jumps(lon: np.ndarray) -> np.ndarray:
    """Which rings of longitudes (n, m) cross the antimeridian: a step of over 180 degrees."""
    return np.asarray((np.abs(np.diff(lon, axis=-1)) > 180).any(axis=-1))


def _polar_cap(ring: np.ndarray) -> np.ndarray | None:
    """The lon/lat ring of the area that a closed ring round a pole encloses, or None for a ring round none.

    Such a ring's longitudes turn a whole 360 degrees. Cut at the antimeridian, it runs from -180 to +180
    (or back); the cap closes it along both sides of the line and the pole's latitude, as polar areas are
    drawn on a plate carree map: one valid polygon, holding the pole and every longitude.
    """
    lon, lat = ring[:-1, 0], ring[:-1, 1]
    step = np.diff(lon, append=lon[:1])  # cyclic: the last step closes the ring
    turn = float(np.sum((step + 180.0) % 360.0 - 180.0))
    if abs(turn) < 180.0:
        return None
    sign = 1.0 if turn > 0 else -1.0
    # Start just after a crossing made in the direction the ring turns, so its longitudes run across +-180.
    j = int(np.flatnonzero(-sign * step > 180.0)[0])
    order = np.roll(np.arange(len(lon)), -(j + 1))
    # The first longitude lies just past the line, in [-180, 180]; a ring that wiggles across the line again
    # would step a hair beyond it, which is clipped back.
    run = np.clip(np.unwrap(lon[order], period=360.0), -180.0, 180.0)
    lats = lat[order]
    # Where the crossing step meets the line, by linear interpolation in longitude.
    start, end = -180.0 * sign, 180.0 * sign
    ahead = run[0] + 360.0 * sign
    t = (end - run[-1]) / (ahead - run[-1]) if ahead != run[-1] else 0.0
    at = float(lats[-1] + t * (lats[0] - lats[-1]))
    pole = 90.0 if lat.mean() > 0 else -90.0
    xs = [start, *run, end, end, start, start]
    ys = [at, *lats, at, pole, pole, at]
    return np.column_stack([xs, ys])


def _continuous_longitudes(rings: np.ndarray) -> np.ndarray:
    """Rings (n, m, 2) in lon/lat with no jump of 360 degrees between neighbouring vertices.

    A window across the antimeridian reprojects to corners near +180 and -180; joined as they are, its
    polygon would wrap round the globe. Each ring is unwrapped into continuous longitudes, then moved by
    a whole turn so its mean longitude lies in [-180, 180): a ring across the line keeps coordinates up
    to its own width beyond +-180, as polygons on a plate carree map must.
    """
    lon = rings[..., 0]
    if (np.abs(np.diff(lon, axis=1)) <= 180).all() and (np.abs(lon) <= 180).all():
        return rings
    closed = lon[:, 0] == lon[:, -1]
    lon = np.unwrap(lon, period=360.0, axis=1)
    lon -= 360.0 * np.floor((lon.mean(axis=1, keepdims=True) + 180.0) / 360.0)
    # unwrap sums its steps: a closed ring's last vertex may miss its first by 1e-13, a sliver of an edge
    # that reads as a self-intersection.
    lon[closed, -1] = lon[closed, 0]
    return np.stack([lon, rings[..., 1]], axis=-1)


#: Edges of vector geometries in a projected CRS are split into at most this many parts of their layer's
#: extent before reprojection to lon/lat, so a straight edge stays where it was drawn (see :func:`to_lonlat`).
DENSIFY_PARTS = 256


def to_lonlat(gdf):  # type: ignore[no-untyped-def]
    """A GeoDataFrame of areas or points reprojected to EPSG:4326, densified first.

    Reprojecting only the vertices bends nothing: a 100 km edge of a rectangle drawn in an Albers or UTM
    CRS would become a straight line in lon/lat, off by 170 m at its middle at 47°N. Edges are split into
    pieces of at most 1/:data:`DENSIFY_PARTS` of the layer's extent first (lon/lat layers are kept as
    they are, their edges already straight in lon/lat).
    """
    projected = gdf.crs is not None and not gdf.crs.is_geographic and len(gdf)
    invalid = ~gdf.geometry.is_valid & gdf.geometry.notna()
    if invalid.any():
        # A self-crossing (bow-tie) polygon, as drawn by hand, is the areas it encloses; densified as it is,
        # GEOS would repair it by dropping one of them.
        gdf = gdf.set_geometry(gdf.geometry.where(~invalid, gdf.geometry[invalid].make_valid()))
    if projected:
        minx, miny, maxx, maxy = gdf.total_bounds
        step = max(maxx - minx, maxy - miny) / DENSIFY_PARTS
        if np.isfinite(step) and step > 0:
            gdf = gdf.set_geometry(gdf.geometry.segmentize(step))
    out = gdf.to_crs("EPSG:4326")
    if projected:
        # An area drawn across the antimeridian (in UTM 60, say) comes back with vertices near +180 and -180:
        # kept so, its polygon would be a band round the globe. Its longitudes are made continuous, as the
        # tiles' footprints are.
        out = out.set_geometry(out.geometry.map(_continuous_geometry))
    return out


def off_the_globe(gdf) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Which geometries of a layer :func:`to_lonlat` returned have coordinates that are not finite: those a
    projection could not place in lon/lat (a mistyped coordinate, far outside the CRS's area of use)."""
    bounds = shapely.bounds(np.asarray(gdf.geometry.values))
    empty = np.asarray(gdf.geometry.isna() | gdf.geometry.is_empty)
    return ~empty & ~np.isfinite(bounds).all(axis=1)


def _continuous_geometry(g: shapely.Geometry | None) -> shapely.Geometry | None:
    """A lon/lat polygon (or multipolygon) whose rings jump 360 degrees, with continuous longitudes as
    footprints get them (:func:`_continuous_longitudes`), its holes next to its shell."""
    if g is None or g.is_empty:
        return g
    if g.geom_type == "MultiPolygon":
        return shapely.MultiPolygon([_continuous_geometry(p) for p in g.geoms])
    if g.geom_type != "Polygon":
        return g
    rings = [np.asarray(g.exterior.coords), *(np.asarray(r.coords) for r in g.interiors)]
    if not any(_jumps(r[:, 0]) for r in rings):
        return g
    cap = _polar_cap(rings[0]) if _jumps(rings[0][:, 0]) else None
    shell, *holes = (_continuous_longitudes(r[None])[0] for r in rings)
    if cap is not None:  # an area round a pole
        shell = cap
    for h in holes:  # each next to its shell, not a turn away
        h[:, 0] += 360.0 * np.round((shell[:, 0].mean() - h[:, 0].mean()) / 360.0)
    return shapely.Polygon(shell, holes)
