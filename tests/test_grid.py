"""Properties of the tiling grid (pure functions, no files)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import shapely
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS
from rasterio.windows import Window

from geoir.errors import TilingError
from geoir.tiling.grid import (
    TilingParams,
    axis_offsets,
    footprints,
    grid_windows,
    make_tiles,
    tile_count,
    tile_id,
)

dims = st.integers(min_value=1, max_value=3000)
sizes = st.integers(min_value=1, max_value=600)


@given(width=dims, height=dims, size=sizes, data=st.data())
@settings(max_examples=200, deadline=None)
def test_tiles_cover_the_grid_and_count_matches_formula(width: int, height: int, size: int, data) -> None:
    stride = data.draw(st.integers(min_value=1, max_value=size))
    windows = list(grid_windows(width, height, size, stride))
    assert len(windows) == tile_count(width, height, size, stride)
    # Every window has the full size; origins stay inside the grid; the last ones touch the edge.
    assert all(w.width == size and w.height == size for w in windows)
    cols = axis_offsets(width, size, stride)
    rows = axis_offsets(height, size, stride)
    assert cols[0] == 0 and rows[0] == 0
    if width >= size:
        assert cols[-1] + size == width
    if height >= size:
        assert rows[-1] + size == height
    # Coverage: consecutive origins are at most `size` apart, so no pixel falls between tiles.
    assert all(b - a <= min(stride, size) for a, b in itertools.pairwise(cols))
    assert all(b - a <= min(stride, size) for a, b in itertools.pairwise(rows))


@given(nx=st.integers(1, 12), ny=st.integers(1, 12), size=st.integers(1, 300))
@settings(max_examples=100, deadline=None)
def test_no_overlap_when_stride_equals_size(nx: int, ny: int, size: int) -> None:
    windows = list(grid_windows(nx * size, ny * size, size, size))
    assert len(windows) == nx * ny
    covered = np.zeros((ny * size, nx * size), dtype=np.int32)
    for w in windows:
        covered[w.row_off : w.row_off + size, w.col_off : w.col_off + size] += 1
    assert (covered == 1).all()


@given(
    a=st.floats(0.1, 100),
    e=st.floats(0.1, 100),
    rot=st.floats(-45, 45),
    col=st.integers(0, 50),
    row=st.integers(0, 50),
    size=st.integers(1, 512),
)
@settings(max_examples=100, deadline=None)
def test_window_footprint_round_trip(a: float, e: float, rot: float, col: int, row: int, size: int) -> None:
    transform = Affine.translation(500_000, 4_000_000) @ Affine.rotation(rot) @ Affine.scale(a, -e)
    win = Window(col * size, row * size, size, size)
    poly = footprints(transform, [win], CRS.from_epsg(32618), CRS.from_epsg(32618))[0]
    # Inverting the transform on the footprint's corners gives back the window.
    xs, ys = np.asarray(poly.exterior.coords).T
    cols, rows = (~transform) @ (xs, ys)
    assert np.allclose(
        [cols.min(), rows.min(), cols.max(), rows.max()],
        [win.col_off, win.row_off, win.col_off + size, win.row_off + size],
        atol=1e-6,
    )
    # Shoelace at coordinates of ~4e6 m carries ~1e-10 m^2 of rounding, whatever the polygon's size.
    assert math.isclose(poly.area, a * e * size * size, rel_tol=1e-9, abs_tol=1e-6)


def test_rotated_transform_gives_rotated_footprint() -> None:
    transform = Affine.translation(500_000, 4_000_000) @ Affine.rotation(30) @ Affine.scale(10, -10)
    tiles = list(make_tiles("s", "fp", transform, 512, 512, CRS.from_epsg(32618), TilingParams()))
    fp = tiles[0].footprint
    # A rotated square is not its own bounding box.
    assert fp.area == pytest.approx(2560**2)
    assert shapely.box(*tiles[0].bounds).area > fp.area * 1.3


def test_footprints_reprojected_and_densified() -> None:
    # A 100 km tile in UTM zone 33N at 70 N: its edges curve in lon/lat.
    transform = Affine(1000, 0, 400_000, 0, -1000, 7_800_000)
    poly = footprints(transform, [Window(0, 0, 100, 100)], CRS.from_epsg(32633))[0]
    assert len(poly.exterior.coords) == 4 * 8 + 1
    west, south, east, north = poly.bounds
    assert 10 < west < east < 20 and 69 < south < north < 71


def test_tile_ids_stable_and_distinct() -> None:
    p = TilingParams()
    ids = {tile_id("abc", w, p) for w in grid_windows(5000, 5000, 256, 128)}
    assert len(ids) == tile_count(5000, 5000, 256, 128)
    assert tile_id("abc", Window(0, 0, 256, 256), p) == tile_id("abc", Window(0, 0, 256, 256), p)
    assert tile_id("abc", Window(0, 0, 256, 256), p) != tile_id("abd", Window(0, 0, 256, 256), p)
    assert all(0 <= i < 2**63 for i in ids)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"size": 0}, "size"), ({"stride": -1}, "stride"), ({"gsd": -1.0}, "gsd"), ({"max_nodata": 1.5}, "max-nodata")],
)
def test_bad_params(kwargs: dict, message: str) -> None:
    with pytest.raises(TilingError, match=message):
        TilingParams(**kwargs)


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5])
def test_bad_overlap(overlap: float) -> None:
    with pytest.raises(TilingError, match="overlap"):
        TilingParams.from_overlap(256, overlap)


def test_stride_left_out_means_no_overlap() -> None:
    assert TilingParams().stride == 256 and TilingParams(size=512).stride == 512
    assert TilingParams(size=512, stride=128).stride == 128


def test_overlap_to_stride() -> None:
    assert TilingParams.from_overlap(256, 0.5).stride == 128
    assert TilingParams.from_overlap(256, 0.0).stride == 256


def test_footprints_across_the_antimeridian_stay_whole() -> None:
    # A lon/lat grid from 179.5 to 180.5 degrees: windows keep continuous longitudes, each moved by a whole
    # turn so its mean lies in [-180, 180); none wraps round the globe.
    transform = Affine(0.005, 0, 179.5, 0, -0.005, 10.0)
    windows = [Window(c, 0, 50, 50) for c in range(0, 200, 50)]
    polys = footprints(transform, windows, CRS.from_epsg(4326))
    bounds = [tuple(round(v, 6) for v in p.bounds) for p in polys]
    assert bounds == [
        (179.5, 9.75, 179.75, 10.0),
        (179.75, 9.75, 180.0, 10.0),
        (-180.0, 9.75, -179.75, 10.0),
        (-179.75, 9.75, -179.5, 10.0),
    ]
    # A window across the line is kept whole, a little beyond +-180.
    across = footprints(transform, [Window(75, 0, 50, 50)], CRS.from_epsg(4326))[0]
    assert across.bounds[2] - across.bounds[0] == pytest.approx(0.25) and abs(across.bounds[0]) > 179


@pytest.mark.parametrize(("epsg", "pole"), [(3413, 90.0), (3031, -90.0)])
def test_a_footprint_round_a_pole_is_the_cap_it_encloses(epsg: int, pole: float) -> None:
    import geopandas as gpd
    from pyproj import CRS as ProjCRS
    from pyproj import Geod, Proj

    from geoir.tiling.grid import to_lonlat

    # 3 x 3 tiles of 1 km in a polar stereographic grid, the pole in the middle one. Its ring goes round
    # every longitude: the footprint is the cap between it and the pole, one valid polygon.
    windows = [Window(c, r, 100, 100) for r in range(0, 300, 100) for c in range(0, 300, 100)]
    polys = footprints(Affine(10, 0, -1500, 0, -10, 1500), windows, CRS.from_epsg(epsg))
    assert all(p.is_valid for p in polys)
    middle = polys[4]
    assert middle.bounds[0] == -180 and middle.bounds[2] == 180 and pole in middle.bounds
    near = [shapely.Point(lon, math.copysign(89.997, pole)) for lon in (-179.9, -120, -45, 0, 37, 120, 179.9)]
    assert all(middle.contains(p) for p in near)
    assert not any(q.intersects(p) for q in (*polys[:4], *polys[5:]) for p in near)
    # Its area on the ellipsoid is the tile's, 1 km2 over the grid's areal scale at the pole (within the 1%
    # its ring bulges out by between vertices 10 degrees of longitude apart).
    geod, scale = Geod(ellps="WGS84"), Proj(ProjCRS.from_epsg(epsg)).get_factors(0, pole).areal_scale
    area = abs(geod.geometry_area_perimeter(shapely.segmentize(middle, 0.5))[0])
    assert area == pytest.approx(1e6 / scale, rel=0.015)
    # An area drawn round the pole (an AOI) becomes such a cap too.
    aoi = to_lonlat(gpd.GeoDataFrame(geometry=[shapely.box(-20_000, -20_000, 20_000, 20_000)], crs=f"EPSG:{epsg}"))
    cap = aoi.geometry[0]
    assert cap.is_valid and cap.bounds[0] == -180 and cap.bounds[2] == 180 and cap.contains(middle)


def test_to_lonlat_keeps_straight_projected_edges_where_they_were_drawn() -> None:
    import geopandas as gpd
    from pyproj import Transformer

    from geoir.tiling.grid import to_lonlat

    # A 200 km wide rectangle in CONUS Albers at about 47°N: its north edge's midpoint, reprojected alone,
    # is where the edge truly runs; vertices alone put the edge 139 m off there.
    x0, y0, x1, y1 = -100_000.0, 2_600_000.0, 100_000.0, 2_650_000.0
    gdf = gpd.GeoDataFrame(geometry=[shapely.box(x0, y0, x1, y1)], crs="EPSG:5070")
    mid_lon, mid_lat = Transformer.from_crs(5070, 4326, always_xy=True).transform(0.0, y1)
    to_utm = Transformer.from_crs(4326, 32614, always_xy=True)
    truth = shapely.Point(to_utm.transform(mid_lon, mid_lat))

    def miss(geom: shapely.Polygon) -> float:
        ring = shapely.transform(geom.exterior, lambda xy: np.column_stack(to_utm.transform(xy[:, 0], xy[:, 1])))
        return float(ring.distance(truth))

    assert miss(to_lonlat(gdf).geometry[0]) < 1.0 and miss(gdf.to_crs(4326).geometry[0]) > 100.0
    # Lon/lat layers are only reprojected (nothing to bend).
    ll = gpd.GeoDataFrame(geometry=[shapely.box(10, 45, 11, 46)], crs="EPSG:4326")
    assert to_lonlat(ll).geometry[0].equals(ll.geometry[0])
    # An area with a hole drawn across the antimeridian in UTM 60S: one valid polygon 0.38 degrees wide, its
    # hole inside it (not a band round the globe, nor a hole a turn away).
    ring = shapely.box(800_000, 8_200_000, 840_000, 8_240_000).difference(
        shapely.box(810_000, 8_210_000, 830_000, 8_230_000)
    )
    fiji = to_lonlat(gpd.GeoDataFrame(geometry=[ring], crs="EPSG:32760")).geometry[0]
    assert fiji.is_valid and fiji.bounds[2] - fiji.bounds[0] == pytest.approx(0.379, abs=1e-3)
    assert shapely.Polygon(fiji.exterior).contains(shapely.Polygon(fiji.interiors[0]))
