"""tile + encode + search through the CLI: vectors, indexes, filters, outputs, errors, crash safety."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pyproj
import pytest
import rasterio
import rasterio.warp
import shapely
from affine import Affine
from click.testing import CliRunner
from PIL import Image
from rasterio.windows import Window

from geoir.cli import cli
from geoir.cli.info import _human_bytes
from geoir.errors import BundleError
from geoir.index.bundle import Bundle
from tests.conftest import SCENES, MakeGeoTiff, geoir_warnings, needs_qgis, needs_shared_data, qgis_probe

TEST_MODEL = ["--backbone", "test", "--device", "cpu"]
#: For tile and encode, which also take --workers.
TILE_MODEL = [*TEST_MODEL, "--workers", "0"]


def invoke(*args: str, code: int = 0) -> object:
    r = CliRunner().invoke(cli, ["-q", *args])
    assert r.exit_code == code, (r.output, r.exception)
    return r


@pytest.fixture
def bundle2(make_geotiff: MakeGeoTiff, tmp_path: Path) -> Path:
    """Two scenes (UTM and lon/lat) encoded with the tiny test model."""
    a = make_geotiff("a.tif", seed=1, shape=(3, 768, 768))
    b = make_geotiff("b.tif", seed=2, crs="EPSG:4326", bounds=(10.0, 45.0, 10.05, 45.05), shape=(3, 512, 512))
    index = tmp_path / "idx"
    invoke("tile", str(a), str(b), "--index", str(index), *TILE_MODEL)
    return index


def test_tile_encodes_and_indexes(bundle2: Path) -> None:
    bundle = Bundle.open(bundle2)
    assert bundle.model is not None and bundle.model["backbone"] == "test_efficientnet"
    vec = bundle.vectors()
    tiles = bundle.tiles()
    assert sorted(vec["ids"].tolist()) == sorted(tiles.tile_id.tolist()) and len(tiles) == 13
    assert vec["features"].shape == (13, 256) and vec["embedding"].shape == (13, 256)
    assert np.allclose(np.linalg.norm(vec["embedding"], axis=1), 1, atol=1e-5)
    index = bundle.indexes()["float"]
    assert sorted(index.ids().tolist()) == sorted(tiles.tile_id.tolist())


def test_verbose_tile_names_the_model_and_the_encode_rate(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    scene = make_geotiff(shape=(3, 300, 300))
    r = CliRunner().invoke(cli, ["tile", "-v", str(scene), "--index", str(tmp_path / "i"), *TILE_MODEL])
    assert r.exit_code == 0, r.output
    for said in ("model backbone (", "backbone test_efficientnet, 256-d embedding, no code", "on cpu"):
        assert said in r.output, (said, r.output)
    assert re.search(r"4 tiles read and encoded in [\d.]+ s \([\d.]+ tiles/s; batch size 64, reader processes 0\)",
                     r.output), r.output  # fmt: skip


def test_tile_search_returns_itself_first(bundle2: Path, tmp_path: Path) -> None:
    tiles = Bundle.open(bundle2).tiles()
    tid = int(tiles.tile_id[3])
    out = tmp_path / "hits.gpkg"
    invoke(
        "search",
        f"tile:{tid}",
        "--index",
        str(bundle2),
        "--out",
        str(out),
        "-k",
        "5",
        "--include-query-overlap",
        *TEST_MODEL,
    )
    hits = gpd.read_file(out, layer="hits")
    assert hits.tile_id[0] == tid and hits["rank"].tolist() == [1, 2, 3, 4, 5]
    assert hits.score[0] == pytest.approx(1.0, abs=1e-5) and hits["distance"][0] == pytest.approx(0, abs=1e-3)
    assert (np.diff(hits["distance"]) >= 0).all()
    # Without --include-query-overlap the query tile (and its overlaps) are left out.
    out2 = tmp_path / "hits2.gpkg"
    invoke("search", f"tile:{tid}", "--index", str(bundle2), "--out", str(out2), "-k", "5", *TEST_MODEL)
    assert tid not in gpd.read_file(out2, layer="hits").tile_id.tolist()


def test_hits_fields_have_one_type_whatever_the_result(
    bundle2: Path, make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    import geoir as api

    def field_types(gpkg: Path, layer: str = "hits") -> dict[str, str]:
        with sqlite3.connect(gpkg) as con:
            return {row[1]: row[2] for row in con.execute(f"PRAGMA table_info({layer})")}

    tid = int(Bundle.open(bundle2).tiles().tile_id[3])
    full, empty = tmp_path / "full.gpkg", tmp_path / "empty.gpkg"
    invoke("search", f"tile:{tid}", "--index", str(bundle2), "--out", str(full), *TEST_MODEL)
    # A bundle of one tile searched with that tile: nothing but the query's own place, so no hit.
    one = tmp_path / "one"
    invoke("tile", str(make_geotiff("one.tif", shape=(3, 256, 256))), "--index", str(one), *TILE_MODEL)
    own = int(Bundle.open(one).tiles().tile_id[0])
    invoke("search", f"tile:{own}", "--index", str(one), "--out", str(empty), *TEST_MODEL)
    assert len(gpd.read_file(empty, layer="hits")) == 0
    expected = {"rank": "INTEGER", "score": "REAL", "distance": "REAL", "hamming": "INTEGER", "tile_id": "INTEGER",
                "tile": "TEXT", "col_off": "INTEGER", "height": "INTEGER", "query": "TEXT"}  # fmt: skip
    for gpkg in (full, empty):
        types = field_types(gpkg)
        assert {k: types[k] for k in expected} == expected, (gpkg.name, types)
    # The regions and the query too: an empty result's were all TEXT (and a footprint-less query's flag).
    for layer in ("hits_merged", "query"):
        assert field_types(full, layer) == field_types(empty, layer), layer
    assert field_types(empty, "hits_merged")["best_rank"] == "INTEGER"
    plain = tmp_path / "plain.gpkg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "q.png")
    invoke("search", str(tmp_path / "q.png"), "--index", str(bundle2), "--out", str(plain), *TEST_MODEL)
    assert field_types(plain, "query") == field_types(full, "query")
    # The model has no codes: hamming is null, in a typed column.
    hits = api.search(tid, index=bundle2, model=api.load_model("backbone", backbone="test")).hits
    assert str(hits.hamming.dtype) == "Int64" and hits.hamming.isna().all() and hits["rank"].dtype == np.int64


def test_search_matches_brute_force(bundle2: Path, tmp_path: Path) -> None:
    bundle = Bundle.open(bundle2)
    vec = bundle.vectors()
    q = 5
    out = tmp_path / "h.gpkg"
    invoke(
        "search",
        f"tile:{int(vec['ids'][q])}",
        "--index",
        str(bundle2),
        "--out",
        str(out),
        "-k",
        "13",
        "--include-query-overlap",
        *TEST_MODEL,
    )
    hits = gpd.read_file(out, layer="hits")
    emb = vec["embedding"]
    d = np.linalg.norm(emb - emb[q], axis=1)
    order = np.lexsort((vec["ids"], d))
    assert hits.tile_id.tolist() == vec["ids"][order].tolist()
    assert hits["distance"].to_numpy() == pytest.approx(d[order], abs=1e-4)


def test_every_query_part_counts_once_however_many_tiles_it_covers(bundle2: Path, tmp_path: Path) -> None:
    bundle = Bundle.open(bundle2)
    vec, tiles = bundle.vectors(), bundle.tiles()
    emb, ids = vec["embedding"].astype(np.float64), vec["ids"]
    row = {int(t): i for i, t in enumerate(ids)}
    # One example: small discs at the centres of five tiles of scene a (a multipolygon over 5+ tiles).
    a = tiles[tiles.scene_id == tiles.scene_id.iloc[0]]
    geom = shapely.MultiPolygon([shapely.centroid(g).buffer(1e-5) for g in a.geometry.iloc[:5]])
    examples = tmp_path / "ex.gpkg"
    gpd.GeoDataFrame(geometry=[geom], crs="EPSG:4326").to_file(examples)
    under = [row[int(t)] for t in bundle.tiles_at(geom, gpd.GeoSeries.intersects).tile_id]
    assert len(under) >= 5
    q = 7
    hits = _hits(
        bundle2,
        tmp_path / "h.gpkg",
        f"tile:{int(ids[q])}",
        "--examples",
        str(examples),
        "-k",
        "5",
        "--include-query-overlap",
    )
    # The mean of the two parts (the tile, and the mean of the example's tiles), not of all their tiles.
    want = emb[q] + emb[under].mean(0)
    want /= np.linalg.norm(want)
    d = np.linalg.norm(emb - want, axis=1)
    order = np.lexsort((ids, d))[:5]
    assert hits.tile_id.tolist() == ids[order].tolist()
    assert hits["distance"].to_numpy() == pytest.approx(d[order], abs=1e-4)


def _hits(bundle: Path, out: Path, *args: str) -> gpd.GeoDataFrame:
    invoke("search", *args, "--index", str(bundle), "--out", str(out), "--overwrite", *TEST_MODEL)
    return gpd.read_file(out, layer="hits")


@pytest.mark.parametrize("overlap", [True, False])
def test_expand_searches_again_with_the_first_hits_averaged_in(bundle2: Path, tmp_path: Path, overlap: bool) -> None:
    vec = Bundle.open(bundle2).vectors()
    emb, ids = vec["embedding"].astype(np.float64), vec["ids"]
    q = 5
    extra = ["--include-query-overlap"] if overlap else []
    plain = _hits(bundle2, tmp_path / "plain.gpkg", f"tile:{int(ids[q])}", "-k", "13", *extra)
    n = 3
    hits = _hits(bundle2, tmp_path / "exp.gpkg", f"tile:{int(ids[q])}", "-k", "13", "--expand", str(n), *extra)
    # The same tiles are eligible (the query's own tile and its overlaps stay out unless asked for) ...
    assert sorted(hits.tile_id) == sorted(plain.tile_id)
    assert overlap == (int(ids[q]) in hits.tile_id.tolist())
    # ... ranked by the mean of the query and the first n hits of the plain search, normalised.
    row = {int(t): i for i, t in enumerate(ids)}
    first = [row[int(t)] for t in plain.tile_id[:n]]
    expanded = emb[q] + emb[first].sum(0)
    expanded /= np.linalg.norm(expanded)
    eligible = np.array([row[int(t)] for t in plain.tile_id])
    d = np.linalg.norm(emb[eligible] - expanded, axis=1)
    order = eligible[np.lexsort((ids[eligible], d))]
    assert hits.tile_id.tolist() == ids[order].tolist()
    assert hits["distance"].to_numpy() == pytest.approx(np.sort(d), abs=1e-4)
    assert not np.allclose(hits["distance"], plain["distance"], atol=1e-3)  # the second query is another vector
    assert set(hits["query"]) == {f"tile:{int(ids[q])} + first {n} hits"}
    # --expand 0 is the plain search.
    same = _hits(bundle2, tmp_path / "zero.gpkg", f"tile:{int(ids[q])}", "-k", "13", "--expand", "0", *extra)
    assert same.tile_id.tolist() == plain.tile_id.tolist()


def test_filters_bbox_scene_aoi(bundle2: Path, tmp_path: Path) -> None:
    bundle = Bundle.open(bundle2)
    tiles = bundle.tiles()
    b_scene = next(r for r in bundle.scene_records() if r["path"].endswith("b.tif"))
    tid = int(tiles[tiles.scene_id != b_scene["id"]].tile_id.iloc[0])
    out = tmp_path / "f.gpkg"
    invoke(
        "search", f"tile:{tid}", "--index", str(bundle2), "--out", str(out), "-k", "3", "--scene", "b.tif", *TEST_MODEL
    )
    hits = gpd.read_file(out, layer="hits")
    assert len(hits) == 3 and set(hits.scene_id) == {b_scene["id"]}
    # A tight bbox around one b tile: k hits are still returned from inside it when enough tiles intersect.
    invoke(
        "search",
        f"tile:{tid}",
        "--index",
        str(bundle2),
        "--out",
        str(out),
        "-k",
        "4",
        "--overwrite",
        "--bbox",
        "10.0,45.0,10.05,45.05",
        *TEST_MODEL,
    )
    hits = gpd.read_file(out, layer="hits")
    assert len(hits) == 4 and set(hits.scene_id) == {b_scene["id"]}
    aoi = tmp_path / "aoi.geojson"
    gpd.GeoDataFrame(geometry=[shapely.box(10.0, 45.0, 10.01, 45.01)], crs="EPSG:4326").to_file(aoi)
    invoke(
        "search",
        f"tile:{tid}",
        "--index",
        str(bundle2),
        "--out",
        str(out),
        "-k",
        "4",
        "--overwrite",
        "--aoi",
        str(aoi),
        *TEST_MODEL,
    )
    hits = gpd.read_file(out, layer="hits")
    expected = tiles[tiles.geometry.intersects(shapely.box(10.0, 45.0, 10.01, 45.01))]
    assert set(hits.tile_id) == set(expected.tile_id)


def test_areas_select_the_tiles_they_share_ground_with_and_points_on_edges_their_tiles(
    bundle2: Path, tmp_path: Path
) -> None:
    # b.tif is lon/lat, 10.0-10.05 E, 45.0-45.05 N, in 4 tiles of 0.025 degrees: edges on round numbers.
    bundle = Bundle.open(bundle2)
    tiles = bundle.tiles()
    b_id = next(r["id"] for r in bundle.scene_records() if r["path"].endswith("b.tif"))
    a_tile = int(tiles[tiles.scene_id != b_id].tile_id.iloc[0])
    nw = tiles[(tiles.scene_id == b_id) & (tiles.col_off == 0) & (tiles.row_off == 0)]
    out = tmp_path / "f.gpkg"

    def hits(*args: str) -> set[int]:
        invoke("search", f"tile:{a_tile}", "--index", str(bundle2), "--out", str(out), "-k", "13", "--overwrite",
               *args, *TEST_MODEL)  # fmt: skip
        return set(gpd.read_file(out, layer="hits").tile_id)

    # A bbox that is exactly one tile, or an AOI that is its footprint: that tile, not the 3 that touch it.
    assert hits("--bbox", "10.0,45.025,10.025,45.05") == set(nw.tile_id)
    aoi = tmp_path / "aoi.gpkg"
    nw[["geometry"]].to_file(aoi)
    assert hits("--aoi", str(aoi)) == set(nw.tile_id)
    # An AOI sharing only the scene's west edge line selects nothing (it touches, it holds no ground of it).
    gpd.GeoDataFrame(geometry=[shapely.box(9.9, 45.0, 10.0, 45.05)], crs="EPSG:4326").to_file(aoi)
    r = invoke("search", f"tile:{a_tile}", "--index", str(bundle2), "--aoi", str(aoi), "--out", str(out),
               "--overwrite", *TEST_MODEL, code=1)  # fmt: skip
    assert "no tile passes the filters" in r.output
    # A small AOI inside one tile selects that tile.
    gpd.GeoDataFrame(geometry=[shapely.box(10.001, 45.041, 10.002, 45.042)], crs="EPSG:4326").to_file(aoi)
    assert hits("--aoi", str(aoi)) == set(nw.tile_id)
    # A self-crossing (bow-tie) AOI, as drawn by hand, is read as the two triangles it means.
    bow = shapely.Polygon([(10.0, 45.0), (10.05, 45.05), (10.05, 45.0), (10.0, 45.05)])
    gpd.GeoDataFrame(geometry=[bow], crs="EPSG:4326").to_file(aoi)
    assert hits("--aoi", str(aoi)) == set(tiles[tiles.scene_id == b_id].tile_id)
    # A point on the edge two tiles share, or on the scene's north edge, is a query (it was refused).
    for point in ("10.025,45.04", "10.01,45.05"):
        invoke("search", "--point", point, "--index", str(bundle2), "--out", str(out), "--overwrite", *TEST_MODEL)
        assert len(gpd.read_file(out, layer="query")) >= 1


def test_output_rings_run_counter_clockwise_as_geojson_requires(bundle2: Path, tmp_path: Path) -> None:
    tid = int(Bundle.open(bundle2).tiles().tile_id[3])
    out = tmp_path / "h.geojson"
    invoke("search", f"tile:{tid}", "--index", str(bundle2), "--out", str(out), "-k", "6", *TEST_MODEL)
    stdout = invoke("search", f"tile:{tid}", "--index", str(bundle2), "--out", "-", "-k", "6", *TEST_MODEL).output
    collections = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("h*.geojson"))] + [json.loads(stdout)]
    assert len(collections) == 4  # hits, hits_merged, query, stdout
    rings = [shapely.geometry.shape(f["geometry"]) for c in collections for f in c["features"]]
    polygons = [p for g in rings for p in getattr(g, "geoms", [g]) if p.geom_type == "Polygon"]
    assert len(polygons) >= 13 and all(p.exterior.is_ccw for p in polygons)  # RFC 7946 section 3.1.6


def test_an_aoi_drawn_across_the_antimeridian_selects_the_tiles_there(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    # 40 km of UTM 60S over Fiji's 180th meridian (179.80 E to 179.82 W), and a scene half a world away.
    fiji = make_geotiff("fiji.tif", crs="EPSG:32760", bounds=(800_000.0, 8_200_000.0, 840_000.0, 8_240_000.0))
    far = make_geotiff("far.tif", crs="EPSG:4326", bounds=(0.0, -16.2, 0.4, -15.8), seed=3)
    index = tmp_path / "idx"
    invoke("tile", str(fiji), str(far), "--index", str(index), *TILE_MODEL)
    tiles = Bundle.open(index).tiles()
    fiji_id = next(r["id"] for r in Bundle.open(index).scene_records() if r["path"] == str(fiji))
    aoi = tmp_path / "aoi.gpkg"
    gpd.GeoDataFrame(geometry=[shapely.box(801_000, 8_201_000, 839_000, 8_239_000)], crs="EPSG:32760").to_file(aoi)
    out = tmp_path / "h.gpkg"
    far_tile = int(tiles[tiles.scene_id != fiji_id].tile_id.iloc[0])
    invoke("search", f"tile:{far_tile}", "--index", str(index), "--aoi", str(aoi), "--out", str(out), "-k", "20",
           *TEST_MODEL)  # fmt: skip
    hits = gpd.read_file(out, layer="hits")
    # The AOI was a band round the globe in lon/lat, and took in the far scene too.
    assert len(hits) == 4 and set(hits.scene_id) == {fiji_id}
    # A --bbox across the line, west > east as RFC 7946 writes one, selects them too (it was refused) ...
    invoke("search", f"tile:{far_tile}", "--index", str(index), "--bbox", "179.5,-17,-179.5,-15", "--out", str(out),
           "-k", "20", "--overwrite", *TEST_MODEL)  # fmt: skip
    assert set(gpd.read_file(out, layer="hits").tile_id) == set(hits.tile_id)
    # ... and one east of the line alone only the tiles reaching past it.
    invoke("search", f"tile:{far_tile}", "--index", str(index), "--bbox", "-179.9,-17,-179.5,-15", "--out", str(out),
           "-k", "20", "--overwrite", *TEST_MODEL)  # fmt: skip
    east = gpd.read_file(out, layer="hits")
    assert 0 < len(east) < 4 and set(east.tile_id) < set(hits.tile_id)
    # West and east swapped (a box round the rest of the globe) is refused, not searched.
    r = CliRunner().invoke(cli, ["search", f"tile:{far_tile}", "--index", str(index), "--bbox", "10,0,5,1",
                                 "--out", str(tmp_path / "x.gpkg"), *TEST_MODEL])  # fmt: skip
    assert r.exit_code == 2 and "here 355 degrees wide; swap west and east" in r.output


def test_geojson_is_rfc_7946_in_files_and_on_stdout_alike(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """GeoJSON files carried GDAL's 2008 ``crs`` and ``name`` members and 17 digits, and stdout did not: two
    documents for one result. Both are now RFC 7946, footprints across the antimeridian cut there."""
    from geoir.output.writers import write_layers

    fiji = make_geotiff("fiji.tif", crs="EPSG:32760", bounds=(800_000.0, 8_200_000.0, 840_000.0, 8_240_000.0))
    index = tmp_path / "idx"
    invoke("tile", str(fiji), "--index", str(index), *TILE_MODEL)
    tid = int(Bundle.open(index).tiles().tile_id.iloc[0])
    args = ["search", f"tile:{tid}", "--index", str(index), "-k", "4", "--include-query-overlap", *TEST_MODEL]
    invoke(*args, "--out", str(tmp_path / "h.geojson"))
    invoke(*args, "--out", str(tmp_path / "h.gpkg"))
    stdout = json.loads(invoke(*args, "--out", "-").output)
    doc = json.loads((tmp_path / "h.geojson").read_text())
    assert doc == stdout and set(doc) == {"type", "features"}  # RFC 7946 section 4: no crs member
    gpkg = gpd.read_file(tmp_path / "h.gpkg", layer="hits")
    assert [f["properties"]["tile"] for f in doc["features"]] == gpkg.tile.tolist()
    geod = pyproj.Geod(ellps="WGS84")
    cut = 0
    for feature, whole in zip(doc["features"], gpkg.geometry, strict=True):
        shape = shapely.geometry.shape(feature["geometry"])
        xy = shapely.get_coordinates(shape)
        assert shape.is_valid and np.abs(xy[:, 0]).max() <= 180
        assert np.all(np.round(xy, 7) == xy)  # 7 decimals, about 1 cm (section 11.2)
        parts = getattr(shape, "geoms", [shape])
        assert all(p.exterior.is_ccw for p in parts)  # section 3.1.6
        if shape.geom_type == "MultiPolygon":  # cut at the antimeridian (section 3.1.9): a part on each side
            cut += 1
            assert {p.bounds[0] < 0 for p in parts} == {True, False} and whole.geom_type == "Polygon"
        # The same ground as the GeoPackage's polygon with continuous longitudes.
        assert abs(geod.geometry_area_perimeter(shape)[0]) == pytest.approx(
            abs(geod.geometry_area_perimeter(whole)[0]), rel=1e-5
        )
    assert cut >= 1  # (the GeoPackage keeps them whole, with continuous longitudes)
    # An empty FlatGeobuf layer still declares its polygons (it was "Unknown").
    write_layers({"hits": gpkg.iloc[:0]}, str(tmp_path / "empty.fgb"), "fgb")
    assert pyogrio.read_info(tmp_path / "empty.fgb")["geometry_type"] == "Polygon"


def test_negative_moves_results(bundle2: Path, tmp_path: Path) -> None:
    vec = Bundle.open(bundle2).vectors()
    ids = vec["ids"]
    out = tmp_path / "n.gpkg"
    invoke(
        "search",
        f"tile:{int(ids[0])}",
        "--index",
        str(bundle2),
        "--out",
        str(out),
        "-k",
        "13",
        "--include-query-overlap",
        *TEST_MODEL,
    )
    plain = gpd.read_file(out, layer="hits")
    invoke(
        "search",
        f"tile:{int(ids[0])}",
        "--negative",
        f"tile:{int(plain.tile_id[1])}",
        "--index",
        str(bundle2),
        "--out",
        str(out),
        "-k",
        "13",
        "--include-query-overlap",
        "--overwrite",
        *TEST_MODEL,
    )
    pushed = gpd.read_file(out, layer="hits")
    neg = int(plain.tile_id[1])
    assert pushed.tile_id.tolist().index(neg) > 1
    # Brute force of the documented rule: q = normalize(e0 - 0.5 * e_neg).
    e = vec["embedding"]
    q = e[0] - 0.5 * e[list(ids).index(neg)]
    q /= np.linalg.norm(q)
    d = np.linalg.norm(e - q, axis=1)
    assert pushed.tile_id.tolist() == ids[np.lexsort((ids, d))].tolist()


def test_point_query_and_merged_layer(bundle2: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.gpkg"
    invoke("search", "--point", "10.01,45.01", "--index", str(bundle2), "--out", str(out), "-k", "6", *TEST_MODEL)
    hits = gpd.read_file(out, layer="hits")
    query = gpd.read_file(out, layer="query")
    merged = gpd.read_file(out, layer="hits_merged")
    assert len(query) == 1 and query.geometry[0].contains(shapely.Point(10.01, 45.01))
    assert not hits.geometry.intersects(query.geometry[0]).any() or hits.geometry.touches(query.geometry[0]).any()
    # Merged regions are the connected components of the union of hit footprints.
    union = shapely.union_all(hits.geometry.values)
    assert shapely.union_all(merged.geometry.values).symmetric_difference(union).area < 1e-12
    assert merged["count"].sum() == len(hits) and merged.best_rank.min() == 1
    for _, m in merged.iterrows():
        members = hits[hits.tile_id.astype(str).isin(m.tile_ids.split(","))]
        assert m.best_rank == members["rank"].min() and m.best_score == pytest.approx(members.score.max())


def test_verbose_search_lists_the_ranking(bundle2: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.gpkg"
    args = ["search", "--point", "10.01,45.01", "--index", str(bundle2), "--out", str(out), "-k", "4", *TEST_MODEL]
    r = CliRunner().invoke(cli, ["-v", *args])
    assert r.exit_code == 0, r.output
    hits = gpd.read_file(out, layer="hits")
    lines = [line.split() for line in r.output.splitlines() if line.lstrip()[:1].isdigit()]
    assert [int(line[0]) for line in lines] == [1, 2, 3, 4]
    assert [int(line[4]) for line in lines] == hits.tile_id.tolist()
    for line, geom, scene in zip(lines, hits.geometry, hits.scene, strict=True):
        lon, lat = map(float, line[5].split(","))
        assert geom.contains(shapely.Point(lon, lat)) and line[6] == Path(scene).name
    # Without -v only the one-line summary.
    r = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert r.exit_code == 0 and not any(line.lstrip()[:1].isdigit() for line in r.output.splitlines())


def test_scene_across_the_antimeridian(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    # 40 km of UTM 60N centred on 180 degrees at 52N (the Aleutians): footprints must not wrap the globe,
    # and a point or box on either side of the line finds the tiles there.
    x, y = 705_929.0, 5_765_288.0
    scene = make_geotiff("am.tif", crs="EPSG:32660", bounds=(x - 20_000, y - 20_000, x + 20_000, y + 20_000))
    index = tmp_path / "idx"
    invoke("tile", str(scene), "--index", str(index), "--size", "128", *TILE_MODEL)
    bundle = Bundle.open(index)
    tiles = bundle.tiles()
    widths = tiles.geometry.bounds.maxx - tiles.geometry.bounds.minx
    assert len(tiles) == 16 and (widths < 0.2).all()
    assert (bundle.scenes().geometry.bounds.maxx - bundle.scenes().geometry.bounds.minx < 0.7).all()
    # Both sides of the line have tiles, and each tile is stored where most of it lies.
    west_side = (shapely.get_x(shapely.centroid(tiles.geometry.values)) > 0).sum()
    assert 0 < west_side < 16
    # (-179.997, 52.15) lies only in a tile stored east of +180, (179.995, 51.86) only in one stored west
    # of -180: each is found through its copy a turn away.
    for lon, lat in ((-179.997, 52.15), (179.995, 51.86), (179.9, 52.0), (-179.9, 52.0)):
        out = tmp_path / f"p{lon}.gpkg"
        invoke("search", "--point", f"{lon},{lat}", "--index", str(index), "--out", str(out), *TEST_MODEL)
        query = gpd.read_file(out, layer="query").geometry[0]
        assert query.bounds[2] - query.bounds[0] < 0.2
        assert any(query.contains(shapely.Point(lon + dx, lat)) for dx in (0, 360, -360))
    out = tmp_path / "box.gpkg"
    box = "-179.99,51.9,-179.8,52.1"
    invoke("search", "--point", "179.9,52.0", "--bbox", box, "--index", str(index), "--out", str(out), *TEST_MODEL)
    hits = gpd.read_file(out, layer="hits")
    assert len(hits) >= 1 and set(hits.tile_id) <= set(
        bundle.tiles_at(shapely.box(-179.99, 51.9, -179.8, 52.1)).tile_id
    )


def test_examples_file_with_negative_column(bundle2: Path, tmp_path: Path) -> None:
    tiles = Bundle.open(bundle2).tiles()
    ex = tmp_path / "ex.gpkg"
    gpd.GeoDataFrame(
        {"negative": [False, True]}, geometry=[tiles.geometry[0].centroid, tiles.geometry[5].centroid], crs="EPSG:4326"
    ).to_file(ex)
    out = tmp_path / "e.gpkg"
    invoke("search", "--examples", str(ex), "--index", str(bundle2), "--out", str(out), "-k", "3", *TEST_MODEL)
    q = gpd.read_file(out, layer="query")
    assert sorted(q.negative.tolist()) == [False, True]


def test_image_query_and_output_formats(bundle2: Path, tmp_path: Path, make_geotiff: MakeGeoTiff) -> None:
    bundle = Bundle.open(bundle2)
    path = next(r["path"] for r in bundle.scene_records() if r["path"].endswith("a.tif"))
    with rasterio.open(path) as src:
        crop = src.read(window=Window(300, 300, 256, 256))
    png = tmp_path / "q.png"
    Image.fromarray(np.moveaxis(crop, 0, -1)).save(png)
    geo = tmp_path / "hits.geojson"
    invoke("search", str(png), "--index", str(bundle2), "--out", str(geo), "-k", "4", *TEST_MODEL)
    fgb = tmp_path / "hits.fgb"
    invoke("search", str(png), "--index", str(bundle2), "--out", str(fgb), "-k", "4", *TEST_MODEL)
    gpkg = tmp_path / "hits.gpkg"
    invoke("search", str(png), "--index", str(bundle2), "--out", str(gpkg), "-k", "4", *TEST_MODEL)
    a, b, c = (gpd.read_file(p, layer="hits") if p.suffix == ".gpkg" else gpd.read_file(p) for p in (geo, fgb, gpkg))
    assert a.tile_id.tolist() == b.tile_id.tolist() == c.tile_id.tolist()
    assert (tmp_path / "hits.hits_merged.geojson").exists()
    r = CliRunner().invoke(
        cli, ["-q", "search", str(png), "--index", str(bundle2), "--out", "-", "-k", "4", *TEST_MODEL]
    )
    assert r.exit_code == 0
    fc = json.loads(r.stdout)
    assert (
        fc["type"] == "FeatureCollection" and [f["properties"]["tile_id"] for f in fc["features"]] == c.tile_id.tolist()
    )


def test_searches_go_into_a_geopackage_beside_its_other_layers(bundle2: Path, tmp_path: Path) -> None:
    """--out on an existing GeoPackage adds the search's layers and keeps the file's others (--overwrite used to
    replace the whole file, deleting an analyst's own layers); --layer names a search's layers, so several
    searches share one file; --overwrite replaces only the layers of the same names."""
    tid = int(Bundle.open(bundle2).tiles().tile_id[0])
    png = tmp_path / "q.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png)
    project = tmp_path / "project.gpkg"
    mine = gpd.GeoDataFrame({"name": ["a", "b", "c"]}, geometry=[shapely.box(i, 0, i + 1, 1) for i in range(3)])
    mine.set_crs("EPSG:3857").to_file(project, layer="my_aoi")
    search = ["search", "--index", str(bundle2), *TEST_MODEL, "--out", str(project)]

    def layers() -> dict[str, int]:
        return {str(n): len(gpd.read_file(project, layer=str(n))) for n in pyogrio.list_layers(project)[:, 0]}

    def styles() -> list[str]:
        with contextlib.closing(sqlite3.connect(project)) as con:
            return sorted(r[0] for r in con.execute("SELECT f_table_name FROM layer_styles"))

    invoke(*search, f"tile:{tid}", "-k", "3")
    got = layers()
    assert got.pop("hits_merged") >= 1 and got == {"my_aoi": 3, "hits": 3, "query": 1, "layer_styles": 3}
    before = project.read_bytes()
    msg = _fails([*search, f"tile:{tid}", "-k", "4"], 1)
    assert "already has the layer(s) hits, hits_merged, query" in msg and "--layer NAME" in msg
    assert project.read_bytes() == before
    # A second search under its own name; a plain image has no footprint, so its query layer is empty.
    invoke(*search, str(png), "-k", "4", "--layer", "second")
    got = layers()
    assert got["hits"] == 3 and got["second"] == 4 and got["second_query"] == 0 and got["my_aoi"] == 3
    # --overwrite replaces that search's layers (and their styles) only.
    invoke(*search, f"tile:{tid}", "-k", "2", "--layer", "second", "--overwrite")
    got = layers()
    assert got["second"] == 2 and got["second_query"] == 1 and got["hits"] == 3
    assert gpd.read_file(project, layer="my_aoi").name.tolist() == ["a", "b", "c"]
    assert styles() == sorted(["hits", "hits_merged", "query", "second", "second_merged", "second_query"])
    # A file that is not a GeoPackage is only replaced with --overwrite; bad names are usage errors.
    junk = tmp_path / "junk.gpkg"
    junk.write_text("not a geopackage")
    msg = _fails(["search", "--index", str(bundle2), *TEST_MODEL, "--out", str(junk), f"tile:{tid}"], 1)
    assert "is not a GeoPackage; pass --overwrite" in msg and junk.read_text() == "not a geopackage"
    invoke("search", "--index", str(bundle2), *TEST_MODEL, "--out", str(junk), f"tile:{tid}", "--overwrite")
    assert len(gpd.read_file(junk, layer="hits")) == 10
    for bad in ("bad name", "gpkg_contents", "layer_styles", "9lives"):
        assert "'--layer'" in _fails([*search, f"tile:{tid}", "--layer", bad], 2)
    msg = _fails(["search", "--index", str(bundle2), *TEST_MODEL, "--out", str(tmp_path / "h.geojson"), str(png),
                  "--layer", "x"], 2)  # fmt: skip
    assert "GeoPackage" in msg and not (tmp_path / "h.geojson").exists()


@needs_qgis
@pytest.mark.parametrize("fmt", ["geojson", "fgb"])
def test_one_layer_formats_open_styled_in_qgis(bundle2: Path, tmp_path: Path, fmt: str) -> None:
    """GeoJSON and FlatGeobuf hold no style: each file gets NAME.qml beside it, which QGIS applies when the file
    opens (they used to open in random opaque fills, without ranks)."""
    tid = int(Bundle.open(bundle2).tiles().tile_id[0])
    out = tmp_path / f"h.{fmt}"
    invoke("search", f"tile:{tid}", "--index", str(bundle2), "--out", str(out), "-k", "5", *TEST_MODEL)
    assert {p.name for p in tmp_path.glob("h.*qml")} == {"h.qml", "h.hits_merged.qml", "h.query.qml"}
    hits = qgis_probe(out, "hits")["hits"]
    assert hits["renderer"] == "graduatedSymbol" and hits["labels"] and '"rank" DESC' in hits["order_by"]
    merged = qgis_probe(tmp_path / f"h.hits_merged.{fmt}", "hits_merged")["hits_merged"]
    assert merged["renderer"] == "graduatedSymbol" and merged["fill_brushes"] == [0]
    # The other format beside it shares the style files, which are geoir's own: no --overwrite needed.
    other = out.with_suffix(".fgb" if fmt == "geojson" else ".geojson")
    invoke("search", f"tile:{tid}", "--index", str(bundle2), "--out", str(other), "-k", "5", *TEST_MODEL)
    # A style of the user's own in the way is an output like the others: refused without --overwrite.
    for p in tmp_path.glob("h.*"):
        p.unlink()
    (tmp_path / "h.qml").write_text("<qgis>my own style</qgis>")
    r = CliRunner().invoke(cli, ["search", f"tile:{tid}", "--index", str(bundle2), "--out", str(out), *TEST_MODEL])
    assert r.exit_code == 1 and f"{tmp_path / 'h.qml'} exists; pass --overwrite" in r.output, r.output
    assert (tmp_path / "h.qml").read_text() == "<qgis>my own style</qgis>" and not out.exists()


def test_one_layer_formats_overwrite_their_side_files_and_fgb_needs_no_suffix(bundle2: Path, tmp_path: Path) -> None:
    tid = int(Bundle.open(bundle2).tiles().tile_id[0])
    png = tmp_path / "q.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png)
    fgb = tmp_path / "h.fgb"
    search = ["search", "--index", str(bundle2), "-k", "3", *TEST_MODEL]
    invoke(*search, f"tile:{tid}", "--out", str(fgb))
    assert (tmp_path / "h.query.fgb").exists() and (tmp_path / "h.hits_merged.fgb").exists()
    # A plain image has no place: the earlier query's footprint must not stay beside the new hits.
    invoke(*search, str(png), "--out", str(fgb), "--overwrite")
    assert not (tmp_path / "h.query.fgb").exists() and (tmp_path / "h.hits_merged.fgb").exists()
    assert not (tmp_path / "h.query.qml").exists() and (tmp_path / "h.hits_merged.qml").exists()
    # A side file in the way is found before any work, as the main file is.
    fgb.unlink()
    r = invoke(*search, str(png), "--out", str(fgb), code=1)
    assert f"{tmp_path / 'h.hits_merged.fgb'} exists; pass --overwrite" in r.output and not fgb.exists()
    # --format fgb with an --out without the suffix writes files (GDAL alone would make directories).
    plain = tmp_path / "plain"
    for _ in range(2):
        invoke(*search, f"tile:{tid}", "--out", str(plain), "--format", "fgb", "--overwrite")
        assert plain.is_file() and len(gpd.read_file(plain)) == 3
        assert (tmp_path / "plain.query.fgb").is_file() and (tmp_path / "plain.hits_merged.fgb").is_file()
    assert not list(tmp_path.glob(".*tmp*"))


def test_rotated_query_finds_its_tile(bundle2: Path, tmp_path: Path) -> None:
    """A tile's pixels turned by 90 degrees find that tile at distance ~0 (best of the query's four turns);
    with --no-rotations the same query is matched only as given, at a clearly larger distance."""
    bundle = Bundle.open(bundle2)
    rec = next(r for r in bundle.scene_records() if r["path"].endswith("a.tif"))
    tiles = bundle.tiles()
    tile = tiles[(tiles.scene_id == rec["id"]) & (tiles.col_off == 256) & (tiles.row_off == 256)].iloc[0]
    with rasterio.open(rec["path"]) as src:
        pixels = src.read(window=Window(256, 256, 256, 256))
    png = tmp_path / "turned.png"
    Image.fromarray(np.ascontiguousarray(np.moveaxis(np.rot90(pixels, 1, axes=(1, 2)), 0, -1))).save(png)
    turned, plain = tmp_path / "turned.gpkg", tmp_path / "plain.gpkg"
    invoke("search", str(png), "--index", str(bundle2), "--out", str(turned), "-k", "13", *TEST_MODEL)
    invoke("search", str(png), "--index", str(bundle2), "--out", str(plain), "-k", "13", "--no-rotations", *TEST_MODEL)
    a, b = gpd.read_file(turned, layer="hits"), gpd.read_file(plain, layer="hits")
    assert a.tile_id[0] == tile.tile_id and a["distance"][0] == pytest.approx(0, abs=1e-3)
    assert len(set(a.tile_id)) == len(a) == 13 and (np.diff(a["distance"]) >= 0).all()
    d_plain = float(b.loc[b.tile_id == tile.tile_id, "distance"].iloc[0])
    assert d_plain > 0.05
    # Each tile's distance with rotations is its best over the turns, so never above the plain one.
    merged = a.merge(b, on="tile_id", suffixes=("_rot", "_plain"))
    assert len(merged) == 13 and (merged["distance_rot"] <= merged["distance_plain"] + 1e-5).all()


def test_best_over_turns_keeps_each_tile_once() -> None:
    from geoir.retrieval.engine import _best_over_turns

    dist = np.array([[0.5, 0.7, 0.9], [0.2, 0.5, np.inf]], dtype=np.float32)
    ids = np.array([[3, 1, 2], [1, 4, -1]])
    d, i, h = _best_over_turns(dist, ids)
    assert i.tolist() == [1, 3, 4, 2] and d.tolist() == pytest.approx([0.2, 0.5, 0.5, 0.9]) and h is None
    # With Hamming distances: a tile keeps its best turn by distance, or by Hamming distance first.
    ham = np.array([[1, 5, 2], [4, 0, -1]])
    d, i, h = _best_over_turns(dist, ids, ham)
    assert i.tolist() == [1, 3, 4, 2] and h.tolist() == [4, 1, 0, 2]
    d, i, h = _best_over_turns(dist, ids, ham, hamming_first=True)
    assert (
        i.tolist() == [4, 3, 2, 1] and h.tolist() == [0, 1, 2, 4] and d.tolist() == pytest.approx([0.5, 0.5, 0.9, 0.2])
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["tile:123"], 1, "tile 123 is not in"),
        (["tile:abc"], 2, "tile:ID"),
        (["TILE:123"], 1, "tile 123 is not in"),
        (["Tile:x1"], 2, "tile:ID"),
        (["missing.png"], 1, "no such image"),
        (["--point", "0,0"], 1, "contains the point"),
        (["--point", "200,0"], 2, "longitude"),
        (["--bbox", "1,2,3"], 2, "WEST,SOUTH,EAST,NORTH"),
        ([], 2, "give a QUERY"),
        (["--scene", "nope.tif", "--point", "10.01,45.01"], 1, "no scene 'nope.tif'"),
        (["--point", "10.01,45.01", "--expand", "-1"], 2, "--expand"),
        (["tile:99999999999999999999"], 1, "tile 99999999999999999999 is not in"),
        (["tile:-5"], 1, "tile -5 is not in"),
        (["--point", "10.01,45.01", "--bbox", "10.0,45.0,10.011,45.011"], 1, "--include-query-overlap"),
    ],
)
def test_search_errors(bundle2: Path, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    out = tmp_path / "x.gpkg"
    r = CliRunner().invoke(cli, ["search", *args, "--index", str(bundle2), "--out", str(out), *TEST_MODEL])
    assert r.exit_code == code, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.glob(".x*"))


def test_empty_aoi_and_example_without_geometry_are_named(bundle2: Path, tmp_path: Path) -> None:
    aoi = tmp_path / "aoi.gpkg"
    gpd.GeoDataFrame({"name": []}, geometry=[], crs="EPSG:4326").to_file(aoi)
    examples = tmp_path / "ex.gpkg"
    gpd.GeoDataFrame(
        {"negative": [False, False]}, geometry=[shapely.Point(10.01, 45.01), None], crs="EPSG:4326"
    ).to_file(examples)
    for args, message in (
        (["--point", "10.01,45.01", "--aoi", str(aoi)], f"--aoi {aoi} has no geometries"),
        (["--examples", str(examples)], f"example 1 of {examples} has no geometry"),
    ):
        out = tmp_path / "x.gpkg"
        r = CliRunner().invoke(cli, ["search", *args, "--index", str(bundle2), "--out", str(out), *TEST_MODEL])
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
        assert not out.exists()


def test_scene_filter_names_one_scene_and_it_must_be_encoded(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    # The same file name in two folders: --scene NAME is ambiguous, a path (relative too) or an id is not.
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = make_geotiff("one/x.tif", seed=1)
    two = make_geotiff("two/x.tif", seed=2, bounds=(510_000.0, 4_000_000.0, 515_120.0, 4_005_120.0))
    index = tmp_path / "idx"
    invoke("tile", str(one), str(two), "--index", str(index), *TILE_MODEL)
    bundle = Bundle.open(index)
    two_id = next(r["id"] for r in bundle.scene_records() if r["path"] == str(two))
    out = tmp_path / "h.gpkg"
    lon, lat = shapely.centroid(bundle.tiles().geometry.values[0]).coords[0]
    query = ["search", "--point", f"{lon},{lat}", "--index", str(index), "--out", str(out), *TEST_MODEL]
    r = CliRunner().invoke(cli, [*query, "--scene", "x.tif"])
    assert r.exit_code == 1 and "--scene 'x.tif' names 2 scenes" in r.output, r.output
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for name in ("two/x.tif", str(two), two_id):
            r = CliRunner().invoke(cli, [*query, "--scene", name, "--overwrite"])
            assert r.exit_code == 0, r.output
            assert set(gpd.read_file(out, layer="hits").scene_id) == {two_id}
    finally:
        os.chdir(cwd)
    # A scene tiled but not encoded yet: said so, not an empty result.
    three = make_geotiff("three.tif", seed=3, bounds=(520_000.0, 4_000_000.0, 525_120.0, 4_005_120.0))
    invoke("tile", str(three), "--index", str(index), "--no-encode")
    r = CliRunner().invoke(cli, [*query, "--scene", "three.tif", "--overwrite"])
    assert r.exit_code == 1 and "not encoded yet (three.tif)" in r.output and "geoir encode" in r.output, r.output


def test_geotiff_query_is_read_with_its_scenes_bands(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    # A scene tiled with --bands 3,1,2; a GeoTIFF cut from it (all 4 bands) must be read with the same bands
    # and statistics as its tiles, so it finds its own tile at distance ~0.
    scene = make_geotiff("s.tif", dtype="uint16", shape=(4, 512, 512), seed=4)
    index = tmp_path / "idx"
    invoke("tile", str(scene), "--index", str(index), "--bands", "3,1,2", *TILE_MODEL)
    args, crop, _ = _crop_finds_its_tile(scene, index, tmp_path)
    # A crop of 3 of its 4 bands matches no scene of the bundle: it is read with its own statistics, and said so.
    with rasterio.open(crop) as src:
        profile, pixels = src.profile | {"count": 3}, src.read([1, 2, 3])
    with rasterio.open(crop, "w", **profile) as dst:
        dst.write(pixels)
    r = CliRunner().invoke(cli, [*args, "--overwrite", *TEST_MODEL])
    assert r.exit_code == 0 and "band count (3) and data type (uint16)" in r.output, r.output


def test_geotiff_query_of_one_date_is_scaled_like_that_date(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    # One place at two dates, the second darker and offset (0.6 x + 300): a crop of the second date must be
    # read with the second date's statistics, so it finds its own tile at distance ~0.
    a = make_geotiff("a.tif", dtype="uint16", seed=4)
    b = tmp_path / "b.tif"
    with rasterio.open(a) as src:
        profile, data = src.profile, src.read()
    with rasterio.open(b, "w", **profile) as dst:
        dst.write((data * 0.6 + 300).astype("uint16"))
    index = tmp_path / "idx"
    invoke("tile", str(a), str(b), "--index", str(index), *TILE_MODEL)
    _, _, hit = _crop_finds_its_tile(b, index, tmp_path)
    assert hit.scene == str(b)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["nodata 65535", "nodata not in the crop", "alpha"])
def test_geotiff_query_hides_invalid_pixels_as_its_tile_does(tmp_path: Path, kind: str) -> None:
    # A tile partly invalid (39%: fill at the top of the stretch, or real imagery under alpha 0) has those pixels
    # black; a GeoTIFF cut from the scene must have them black too, so it finds its own tile at distance ~0.
    rng = np.random.default_rng(7)
    alpha = kind == "alpha"
    dtype, nodata = ("uint8", None) if alpha else ("uint16", 65535)
    data = rng.integers(0, 255 if alpha else 10_000, size=(4 if alpha else 3, 512, 512)).astype(dtype)
    if alpha:
        data[3] = 255
        data[3, :100, 256:] = 0
    else:
        data[:, :100, 256:] = nodata
    profile = {
        "driver": "GTiff", "width": 512, "height": 512, "count": len(data), "dtype": dtype, "nodata": nodata,
        "crs": "EPSG:32618", "transform": Affine(10, 0, 500_000, 0, -10, 4_005_120),
    }  # fmt: skip
    scene = tmp_path / "s.tif"
    with rasterio.open(scene, "w", **profile, **({"photometric": "RGB", "alpha": "YES"} if alpha else {})) as dst:
        dst.write(data)
    index = tmp_path / "idx"
    invoke("tile", str(scene), "--index", str(index), "--max-nodata", "0.6", *TILE_MODEL)
    # Exported without its nodata, a crop still has the scene's.
    _crop_finds_its_tile(scene, index, tmp_path, **({"nodata": None} if kind == "nodata not in the crop" else {}))


def _crop_finds_its_tile(scene: Path, index: Path, tmp_path: Path, **changes: object) -> tuple[list[str], Path, object]:
    """Cut the tile at column 256, row 0 of ``scene`` into a GeoTIFF (its profile with ``changes``), search ``index``
    with it and check that it finds that tile first at distance ~0; returns the search's arguments, the crop and
    the hit."""
    crop = tmp_path / "crop.tif"
    window = Window(256, 0, 256, 256)
    with rasterio.open(scene) as src:
        cut = src.profile | {"width": 256, "height": 256, "transform": src.window_transform(window)} | changes
        with rasterio.open(crop, "w", **cut) as dst:
            dst.write(src.read(window=window))
    out = tmp_path / "h.gpkg"
    args = ["search", str(crop), "--index", str(index), "--out", str(out), "-k", "1", "--include-query-overlap"]
    invoke(*args, "--no-rotations", *TEST_MODEL)
    hit = gpd.read_file(out, layer="hits").iloc[0]
    assert (hit.col_off, hit.row_off) == (256, 0) and hit["distance"] == pytest.approx(0, abs=1e-3)
    return args, crop, hit


def test_query_overlap_leaves_out_its_place_not_its_neighbours(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    # Two scenes of the same place, the second 1 m east of the first (another date, as reprojected): a tile
    # of the first leaves out its twin (99.96% shared) but keeps the twin's neighbour (a 1 m strip, 0.04%).
    a = make_geotiff("a.tif", seed=1)
    b = make_geotiff("b.tif", seed=2, bounds=(500_001.0, 4_000_000.0, 505_121.0, 4_005_120.0))
    index = tmp_path / "idx"
    invoke("tile", str(a), str(b), "--index", str(index), *TILE_MODEL)
    tiles = Bundle.open(index).tiles()
    a_id = next(r["id"] for r in Bundle.open(index).scene_records() if r["path"] == str(a))
    query = tiles[(tiles.scene_id == a_id) & (tiles.col_off == 0) & (tiles.row_off == 0)].tile_id.iloc[0]
    out = tmp_path / "h.gpkg"
    invoke("search", f"tile:{query}", "--index", str(index), "--out", str(out), "-k", "8", *TEST_MODEL)
    hits = gpd.read_file(out, layer="hits")
    b_hits = hits[hits.scene_id != a_id]
    assert len(hits) == 6 and set(zip(b_hits.col_off, b_hits.row_off, strict=True)) == {(256, 0), (0, 256), (256, 256)}


def test_corrupt_image_and_existing_output(bundle2: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    out = tmp_path / "x.gpkg"
    r = CliRunner().invoke(cli, ["search", str(bad), "--index", str(bundle2), "--out", str(out), *TEST_MODEL])
    assert r.exit_code == 1 and "bad.png" in r.output and not out.exists()
    out.write_text("keep me")
    tid = int(Bundle.open(bundle2).tiles().tile_id[0])
    r = CliRunner().invoke(cli, ["search", f"tile:{tid}", "--index", str(bundle2), "--out", str(out), *TEST_MODEL])
    assert r.exit_code == 1 and "--overwrite" in r.output and out.read_text() == "keep me"


def test_empty_and_missing_bundle(tmp_path: Path, make_geotiff: MakeGeoTiff) -> None:
    r = CliRunner().invoke(cli, ["search", "tile:1", "--index", str(tmp_path / "none"), "--out", "-", *TEST_MODEL])
    assert r.exit_code == 1 and "no index bundle" in r.output
    index = tmp_path / "cat"
    invoke("tile", str(make_geotiff()), "--index", str(index), "--no-encode")
    r = CliRunner().invoke(cli, ["search", "tile:1", "--index", str(index), "--out", "-", *TEST_MODEL])
    # Catalogued with --no-encode: the fix is to encode them, not to tile again.
    assert r.exit_code == 1 and "no encoded tiles" in r.output and f"geoir encode --index {index}" in r.output


def test_missing_query_file_is_named_first(tmp_path: Path) -> None:
    # Before the bundle (missing here too) and the model are opened.
    r = CliRunner().invoke(
        cli, ["search", str(tmp_path / "nope.png"), "--index", str(tmp_path / "none"), "--out", "-", *TEST_MODEL]
    )
    assert r.exit_code == 1 and "nope.png: no such image" in r.output and "no index bundle" not in r.output


def test_model_mismatch_refused(bundle2: Path, make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    before = (bundle2 / "manifest.json").read_text()
    c = make_geotiff("c.tif", seed=7)
    r = CliRunner().invoke(
        cli,
        ["tile", str(c), "--index", str(bundle2), "--model", "backbone", "--backbone", "test_vit", "--workers", "0"],
    )
    assert r.exit_code == 1 and "was built with model" in r.output
    assert (bundle2 / "manifest.json").read_text() == before


def test_a_former_shipped_default_model_is_named_as_such(bundle2: Path) -> None:
    from geoir.errors import ModelError

    manifest = json.loads((bundle2 / "manifest.json").read_text())
    manifest["model"]["name"] = "default"
    (bundle2 / "manifest.json").write_text(json.dumps(manifest))
    bundle = Bundle.open(bundle2)
    with pytest.raises(ModelError, match=r"another geoir release's shipped default model .* tile the scenes again"):
        bundle.check_model("f" * 64, "default")
    with pytest.raises(ModelError, match=r"built with model default .* not mine .*use that model \(--model\)"):
        bundle.check_model("f" * 64, "mine")
    bundle.check_model(manifest["model"]["fingerprint"], "default")  # its own model passes


def test_info_remove_and_encode_later(bundle2: Path, make_geotiff: MakeGeoTiff) -> None:
    r = invoke("info", "--index", str(bundle2), "--json")
    info = json.loads(r.output)
    assert info["counts"] == {"scenes": 2, "tiles": 13} and info["model"]["backbone"] == "test_efficientnet"
    assert "float" in info["index"] and all(s["encoded"] for s in info["scenes"])
    # Every scene named is looked up before any is removed.
    r = invoke("remove", "b.tif", "nosuch.tif", "--index", str(bundle2), code=1)
    assert "no scene 'nosuch.tif'" in r.output and Bundle.open(bundle2).n_tiles() == 13
    invoke("remove", "b.tif", "--index", str(bundle2))
    bundle = Bundle.open(bundle2)
    assert bundle.n_tiles() == 9 and len(bundle.indexes()["float"]) == 9
    invoke("remove", "b.tif", "--index", str(bundle2), code=1)
    c = make_geotiff("c.tif", seed=8)
    invoke("tile", str(c), "--index", str(bundle2), "--no-encode")
    assert len(Bundle.open(bundle2).indexes()["float"]) == 9
    invoke("encode", "--index", str(bundle2), *TILE_MODEL)
    bundle = Bundle.open(bundle2)
    assert len(bundle.indexes()["float"]) == 13 == bundle.n_tiles()
    # Several scenes in one command (it took one).
    a_id = next(r["id"] for r in bundle.scene_records() if Path(r["path"]).name == "a.tif")
    invoke("remove", a_id, str(c), "--index", str(bundle2))
    bundle = Bundle.open(bundle2)
    assert bundle.n_tiles() == 0 and len(bundle.indexes()["float"]) == 0


def test_tile_with_a_model_encodes_what_a_no_encode_run_catalogued(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    import geoir as api

    a, b = make_geotiff("a.tif", seed=1), make_geotiff("b.tif", seed=2)
    index = tmp_path / "idx"
    invoke("tile", str(a), str(b), "--index", str(index), "--no-encode")
    # The same command with a model encodes the catalogued scene it names (it said "skipped" and did nothing).
    r = CliRunner().invoke(cli, ["tile", str(a), "--index", str(index), *TILE_MODEL])
    assert r.exit_code == 0, r.output
    assert "a.tif: 4 tiles encoded" in r.output and "1 catalogued earlier encoded, 0 already indexed" in r.output
    bundle = Bundle.open(index)
    a_id = next(r["id"] for r in bundle.scene_records() if r["path"] == str(a))
    assert bundle.encoded_scene_ids() == [a_id] and len(bundle.indexes()["float"]) == 4
    # Its vectors are those of a run that encoded from the start.
    invoke("tile", str(a), "--index", str(tmp_path / "direct"), *TILE_MODEL)
    direct = Bundle.open(tmp_path / "direct").vectors()
    got = bundle.vectors()
    assert got["ids"].tolist() == direct["ids"].tolist() and np.abs(got["embedding"] - direct["embedding"]).max() < 1e-5
    # So does the Python API; a second run has nothing left to encode.
    report = api.tile([a, b], index=index, model=api.load_model("backbone", backbone="test"))
    assert len(report.encoded_scenes) == 1 and len(report.skipped_scenes) == 1
    assert len(Bundle.open(index).indexes()["float"]) == 8 and Bundle.open(index).n_tiles() == 8


def test_info_takes_the_bundle_as_its_argument(bundle2: Path, tmp_path: Path) -> None:
    by_option = invoke("info", "--index", str(bundle2), "--json").output
    assert invoke("info", str(bundle2), "--json").output == by_option
    assert json.loads(by_option)["counts"]["tiles"] == 13
    # The argument wins over $GEOIR_INDEX, as --index does; naming the bundle twice is refused.
    r = CliRunner().invoke(cli, ["info", str(bundle2), "--json"], env={"GEOIR_INDEX": str(tmp_path / "other")})
    assert r.exit_code == 0 and r.output == by_option
    r = invoke("info", str(bundle2), "--index", str(bundle2), code=2)
    assert "both name what to describe; give one of them" in r.output
    r = invoke("info", str(tmp_path / "none"), code=1)
    assert str(tmp_path / "none") in r.output
    # A file is read as a model whatever its suffix (m.pth was told to pass --index), and said to be none.
    import geoir

    shutil.copy(Path(geoir.__file__).parent / "models" / "default.pt", tmp_path / "m.pth")
    described = json.loads(invoke("info", str(tmp_path / "m.pth"), "--json").output)["model"]
    assert described["fingerprint"] == json.loads(invoke("info", "default", "--json").output)["model"]["fingerprint"]
    (tmp_path / "notes.txt").write_text("not a model")
    r = invoke("info", str(tmp_path / "notes.txt"), code=1)
    assert "is not a readable geoir model" in r.output and "--index" not in r.output


def test_info_says_when_an_index_file_is_corrupt_or_stale(bundle2: Path) -> None:
    r = invoke("info", "--index", str(bundle2))
    assert "exact (flat), 13 vectors" in r.output
    # Sizes in the unit that shows them (13 vectors of 256 floats are kB, not "0.01 MB").
    assert re.search(r"float: exact \(flat\), 13 vectors, \d+\.\d kB", r.output), r.output
    assert (_human_bytes(999), _human_bytes(2_345), _human_bytes(2_410_000), _human_bytes(3_000_000_000)) == (
        "999 B",
        "2.3 kB",
        "2.41 MB",
        "3.00 GB",
    )
    assert json.loads(invoke("info", "--index", str(bundle2), "--json").output)["index"]["float"]["vectors"] == 13
    faiss_file = bundle2 / "float.faiss"
    data = faiss_file.read_bytes()
    faiss_file.write_bytes(data[: len(data) // 2])
    r = CliRunner().invoke(cli, ["info", "--index", str(bundle2)])
    assert r.exit_code == 0, r.output
    assert f"{faiss_file} is corrupt or truncated; delete it and search again" in r.output
    assert "float: exact (flat), unreadable" in r.output
    # An index written for other tiles: counted, and said to be rebuilt by the next search.
    bundle = Bundle.open(bundle2)
    faiss_file.unlink()
    index = bundle.rebuild_index("float")
    index.remove(index.ids()[:3])
    index.save(faiss_file)
    r = CliRunner().invoke(cli, ["info", "--index", str(bundle2)])
    assert "10 vectors, not the 13 of the encoded scenes (the next search rebuilds it)" in r.output
    assert len(Bundle.open(bundle2).indexes()["float"]) == 13


def test_a_bundle_that_cannot_be_written_is_still_searched(
    bundle2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shared read-only (root ignores chmod, so the write is made to fail): a stale index is rebuilt in memory.
    from geoir.errors import BundleError
    from geoir.index.vectors import VectorIndex

    (bundle2 / "float.faiss").unlink()

    def refuse(self: VectorIndex, path: object) -> None:
        raise BundleError(f"cannot write {path}: Read-only file system; check the folder exists and is writable")

    monkeypatch.setattr(VectorIndex, "save", refuse)
    out = tmp_path / "h.gpkg"
    r = CliRunner().invoke(
        cli, ["search", "--point", "10.01,45.01", "--index", str(bundle2), "--out", str(out), *TEST_MODEL]
    )
    assert r.exit_code == 0, r.output
    assert "Read-only file system" in r.output and "searching with the rebuilt index in memory" in r.output
    assert len(gpd.read_file(out, layer="hits")) == 10 and not (bundle2 / "float.faiss").exists()


def test_encode_images_command(tmp_path: Path, make_geotiff: MakeGeoTiff) -> None:
    png = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(png)
    tif = make_geotiff("b.tif", dtype="uint16", shape=(3, 300, 300))
    out = tmp_path / "v.npz"
    invoke("encode", str(png), str(tif), "--out", str(out), *TILE_MODEL)
    z = np.load(out)
    assert z["embedding"].shape == (2, 256) and z["features"].shape == (2, 256)
    assert list(z["paths"]) == [str(png), str(tif)]
    invoke("encode", str(png), "--out", str(out), *TILE_MODEL, code=1)  # exists, no --overwrite
    # A missing image is named before the model (missing too) is opened, and nothing is written.
    other = tmp_path / "w.npz"
    r = CliRunner().invoke(
        cli, ["encode", str(png), str(tmp_path / "gone.png"), "--out", str(other), "--model", str(tmp_path / "m.pt")]
    )
    assert r.exit_code == 1 and "gone.png: no such image" in r.output and not other.exists()


def _signal_after_first_scene(scenes: list[Path], index: Path, sig: int) -> subprocess.Popen:
    """Run `geoir tile` on ``scenes`` in a process and send it ``sig`` once the first scene is committed and
    the second is under way."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "geoir.cli", "tile", *map(str, scenes), "--index", str(index), *TILE_MODEL]
    # A shell's background job starts with SIGINT ignored, and Python then keeps it ignored: give the run the
    # default, as an interactive shell does.
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    manifest = index / "manifest.json"
    while time.time() < deadline:
        if manifest.exists() and json.loads(manifest.read_text())["counts"]["scenes"] >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc


def test_sigkill_mid_tile_leaves_valid_bundle(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    scenes = [make_geotiff(f"s{i}.tif", seed=10 + i, shape=(3, 2048, 2048)) for i in range(6)]
    index = tmp_path / "idx"
    _signal_after_first_scene(scenes, index, signal.SIGKILL).wait()
    bundle = Bundle.open(index)
    n_done = len(bundle.scene_records())
    assert 1 <= n_done < 6
    # The bundle opens and searches after the kill.
    tid = int(bundle.tiles().tile_id[0])
    invoke("search", f"tile:{tid}", "--index", str(index), "--out", str(tmp_path / "h.gpkg"), *TEST_MODEL)
    # A re-run completes with no duplicate and no missing tile.
    invoke("tile", *map(str, scenes), "--index", str(index), *TILE_MODEL)
    bundle = Bundle.open(index)
    tiles = bundle.tiles()
    assert len(tiles) == 6 * 64 and tiles.tile_id.is_unique
    assert sorted(bundle.indexes()["float"].ids().tolist()) == sorted(tiles.tile_id.tolist())
    assert sorted(bundle.vectors()["ids"].tolist()) == sorted(tiles.tile_id.tolist())


def test_index_saved_once_per_run_not_per_scene(
    make_geotiff: MakeGeoTiff, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Committing a scene must not rewrite the whole index file: what a run writes is linear in its tiles."""
    from geoir.index.vectors import VectorIndex

    saved: list[int] = []
    copied: list[int] = []
    real_save, real_add = VectorIndex.save, VectorIndex.add

    def spy(self: VectorIndex, path: str | os.PathLike[str]) -> None:
        saved.append(len(self))
        real_save(self, path)

    def add_spy(self: VectorIndex, ids: np.ndarray, vectors: np.ndarray) -> None:
        copied.append(len(self))  # an add out of id order copies what the flat index holds
        real_add(self, ids, vectors)

    monkeypatch.setattr(VectorIndex, "save", spy)
    monkeypatch.setattr(VectorIndex, "add", add_spy)
    scenes = [make_geotiff(f"s{i}.tif", seed=20 + i) for i in range(8)]  # 4 tiles each
    index = tmp_path / "idx"
    invoke("tile", *map(str, scenes[:6]), "--index", str(index), *TILE_MODEL)
    # One write of the final index, not one per scene (4 + 8 + ... + 24 = 84 vectors written).
    assert saved == [24]
    # Adds in batches that double the index: at most twice the final size copied (0 + 4 + ... + 20 = 60 before).
    assert sum(copied) <= 2 * 24
    saved.clear()
    invoke("tile", *map(str, scenes[6:]), "--index", str(index), *TILE_MODEL)
    assert saved == [32]
    # The index built scene by scene answers exactly as one built from all the vectors at once.
    bundle = Bundle.open(index)
    vec = bundle.vectors()
    grown = bundle.indexes()["float"]
    assert saved == [32]  # it matched the catalog: no rebuild
    fresh = VectorIndex(grown.dim)
    fresh.add(vec["ids"], vec["embedding"])
    for k in (1, 5, 32):
        d1, i1 = grown.search(vec["embedding"], k)
        d2, i2 = fresh.search(vec["embedding"], k)
        assert np.array_equal(i1, i2) and np.array_equal(d1, d2)


def test_run_killed_before_the_index_save(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """A run killed after its last scene commit leaves an index file without its scenes; the next run
    rebuilds it from the vectors before adding to it, so catalog, vectors and index hold the same tiles."""
    from geoir.index.vectors import VectorIndex

    scenes = [make_geotiff(f"s{i}.tif", seed=30 + i) for i in range(4)]
    index = tmp_path / "idx"
    invoke("tile", str(scenes[0]), "--index", str(index), *TILE_MODEL)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Bundle, "flush_indexes", lambda self: None)  # as if SIGKILLed before the save
        invoke("tile", str(scenes[1]), str(scenes[2]), "--index", str(index), *TILE_MODEL)
    assert len(VectorIndex.load(index / "float.faiss")) == 4 and Bundle.open(index).n_tiles() == 12
    invoke("tile", str(scenes[3]), "--index", str(index), *TILE_MODEL)
    bundle = Bundle.open(index)
    tiles = bundle.tiles()
    on_disk = VectorIndex.load(index / "float.faiss")
    assert len(tiles) == 16 and sorted(on_disk.ids().tolist()) == sorted(tiles.tile_id.tolist())
    assert sorted(bundle.vectors()["ids"].tolist()) == sorted(tiles.tile_id.tolist())
    # A search after a killed run rebuilds the file too (and finds every tile).
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Bundle, "flush_indexes", lambda self: None)
        invoke("tile", str(make_geotiff("s4.tif", seed=40)), "--index", str(index), *TILE_MODEL)
    assert len(VectorIndex.load(index / "float.faiss")) == 16
    assert len(Bundle.open(index).indexes()["float"]) == 20 == len(VectorIndex.load(index / "float.faiss"))


def test_a_search_rebuilding_the_index_while_a_writer_changes_the_bundle_does_not_save_it(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    """A search rebuilt a stale index and saved it without any lock: saved after a writer's remove and add,
    it held the removed scene's tiles and lacked the new one's, with the catalog's count, so nothing noticed
    and every later search failed (or, with one index kind, found removed tiles)."""
    from geoir.index.vectors import VectorIndex

    scenes = [make_geotiff(f"s{i}.tif", seed=50 + i) for i in range(3)]
    index = tmp_path / "idx"
    invoke("tile", str(scenes[0]), str(scenes[1]), "--index", str(index), *TILE_MODEL)
    (index / "float.faiss").unlink()  # the index a search must rebuild (as a killed run leaves it)
    reader = Bundle.open(index)
    real = Bundle.rebuild_index

    def rebuild_while_a_writer_works(self: Bundle, kind: str, save: bool = True, scene_ids: object = None) -> object:
        built = real(self, kind, save=save, scene_ids=scene_ids)  # type: ignore[arg-type]
        if self is reader:
            # Meanwhile, in another process: a scene removed, another added (the same count of tiles).
            invoke("remove", str(scenes[0]), "--index", str(index))
            invoke("tile", str(scenes[2]), "--index", str(index), *TILE_MODEL)
        return built

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Bundle, "rebuild_index", rebuild_while_a_writer_works)
        stale = reader.indexes()["float"]
    tiles = Bundle.open(index).tiles()
    on_disk = VectorIndex.load(index / "float.faiss")
    assert len(stale) == len(on_disk) == len(tiles)  # a count check alone cannot tell them apart
    assert sorted(on_disk.ids().tolist()) == sorted(tiles.tile_id.tolist())  # the writer's, not the search's
    assert sorted(stale.ids().tolist()) != sorted(tiles.tile_id.tolist())


@needs_shared_data("scenes")
def test_real_scene_crop_finds_its_place(tmp_path: Path) -> None:
    """Lite0 end to end: a crop off the tile grid, as a plain PNG, finds the tile it came from."""
    scene = SCENES / "oam_5b90f92da0d7280005fab355_4310_manila_0.1m_rgb.tif"
    index = tmp_path / "idx"
    invoke("tile", str(scene), "--index", str(index), "--model", "backbone", "--workers", "1")
    bundle = Bundle.open(index)
    tiles = bundle.tiles()
    found = 0
    rng = np.random.default_rng(0)
    with rasterio.open(scene) as src:
        for i in range(5):
            col, row = (int(v) for v in rng.integers(40, 2048 - 256 - 40, size=2))
            win = Window(col + 37, row + 53, 256, 256)
            crop = src.read(window=win)
            truth = shapely.box(*rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.window_bounds(win)))
            png = tmp_path / f"crop{i}.png"
            Image.fromarray(np.moveaxis(crop, 0, -1)).save(png)
            out = tmp_path / f"h{i}.gpkg"
            invoke("search", str(png), "--index", str(index), "--out", str(out), "-k", "1", "--model", "backbone")
            top = gpd.read_file(out, layer="hits").geometry[0]
            found += top.intersects(truth) and top.intersection(truth).area > 0
    assert len(tiles) == 64
    assert found >= 4, f"only {found}/5 crops found their place"


@needs_qgis
def test_styles_table_uses_geopackage_datetimes(bundle2: Path, tmp_path: Path) -> None:
    """GeoPackage DATETIMEs are ISO 8601 with a Z; SQLite's CURRENT_TIMESTAMP ('2026-11-23 01:00:55') makes
    GDAL warn 'Non-conformant content' on every open."""
    import re
    import sqlite3

    out = tmp_path / "hits.gpkg"
    invoke("search", "--point", "10.01,45.01", "--index", str(bundle2), "--out", str(out), "-k", "3", *TEST_MODEL)
    with sqlite3.connect(out) as con:
        stamps = [r[0] for r in con.execute("SELECT update_time FROM layer_styles")]
        stamps += [r[0] for r in con.execute("SELECT last_change FROM gpkg_contents")]
    assert len(stamps) >= 4
    iso = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")
    assert all(iso.match(t) for t in stamps), stamps


def test_hits_open_styled_in_qgis(bundle2: Path, tmp_path: Path) -> None:
    out = tmp_path / "hits.gpkg"
    invoke("search", "--point", "10.01,45.01", "--index", str(bundle2), "--out", str(out), "-k", "5", *TEST_MODEL)
    info = qgis_probe(out, "hits", "hits_merged", "query")
    assert info["hits"]["valid"] and info["hits"]["crs"] == "EPSG:4326" and info["hits"]["count"] == 5
    assert info["hits"]["renderer"] == "graduatedSymbol" and info["hits"]["labels"]
    assert info["hits_merged"]["valid"] and info["hits_merged"]["renderer"] == "graduatedSymbol"
    assert info["query"]["valid"] and info["query"]["count"] == 1
    # The query's outline only: QGIS's default random fill would hide the imagery under it.
    assert info["query"]["default_style_loaded"] and info["query"]["fill_brush"] == 0


@needs_qgis
def test_qgis_draws_the_best_rank_on_top_and_one_label_per_place(tmp_path: Path) -> None:
    """Two dates of one place give identical footprints: their ranks used to be drawn side by side ("12"
    read as rank 12), and rank 2 painted over rank 1. QGIS now draws rank 1 last, labels each place once
    with its best rank, and draws the regions as outlines (a second fill would tint the imagery twice)."""
    from geoir.output.writers import write_layers
    from geoir.retrieval.engine import merge_hits

    boxes = [shapely.box(0, 0, 0.01, 0.01), shapely.box(0, 0, 0.01, 0.01), shapely.box(0.03, 0, 0.04, 0.01)]
    hits = gpd.GeoDataFrame(
        {"rank": [1, 2, 3], "score": [0.9, 0.8, 0.7], "tile_id": [11, 12, 13]}, geometry=boxes, crs="EPSG:4326"
    )
    out = tmp_path / "h.gpkg"
    write_layers({"hits": hits, "hits_merged": merge_hits(hits)}, str(out), "gpkg")
    info = qgis_probe(out, "hits", "hits_merged", "query", labels=True)
    h, m, q = info["hits"], info["hits_merged"], info["query"]
    assert h["renderer"] == "graduatedSymbol" and '"rank" DESC' in h["order_by"]
    assert sorted(text for text, _x, _y in h["placed_labels"]) == ["1", "3"]
    assert h["label_centroid_inside"] and "rank" in h["label_priority"]
    assert m["renderer"] == "graduatedSymbol" and m["fill_brushes"] == [0] and not m["labels_after_style"]
    assert q["valid"] and q["count"] == 0 and q["fill_brush"] == 0  # always there, empty without a footprint
    # Each style once in QGIS' list of the file's styles (equal update times listed them twice in 3.22).
    assert all(layer["styles_listed"] == layer["styles_distinct"] == 3 for layer in (h, m, q))


def _fails(args: list[str], code: int) -> str:
    """Run a command that must fail cleanly: exit ``code``, one message, no traceback."""
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == code, (r.output, r.exception)
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    return r.output


def test_examples_negative_column_is_parsed_strictly(bundle2: Path, tmp_path: Path) -> None:
    """'no' is a positive, not a negative (any non-empty string used to count as true); an unknown value
    is an error naming the file, the column, the value and the accepted values."""
    tiles = Bundle.open(bundle2).tiles()
    points = [tiles.geometry[i].centroid for i in (0, 5, 9, 12)]
    out = tmp_path / "e.gpkg"
    for values in (["no", "YES", " False ", None], [0, 1, 0, 1], [False, True, None, True]):
        ex = tmp_path / "ex.gpkg"
        gpd.GeoDataFrame({"negative": values}, geometry=points, crs="EPSG:4326").to_file(ex)
        invoke("search", "--examples", str(ex), "--index", str(bundle2), "--out", str(out), "--overwrite", *TEST_MODEL)
        expected = [bool(v) if not isinstance(v, str) else v.strip().lower() == "yes" for v in values]
        assert gpd.read_file(out, layer="query").negative.tolist() == expected, values
    out.unlink()
    bad = tmp_path / "bad.gpkg"
    gpd.GeoDataFrame({"negative": ["yes", "no", "maybe"]}, geometry=points[:3], crs="EPSG:4326").to_file(bad)
    msg = _fails(["search", "--examples", str(bad), "--index", str(bundle2), "--out", str(out), *TEST_MODEL], 1)
    assert "bad.gpkg" in msg and "`negative`" in msg and "'maybe'" in msg and "yes/no" in msg and "1/0" in msg
    assert "positive query" not in msg and not out.exists() and not list(tmp_path.glob(".e*"))


@pytest.mark.parametrize(
    ("out_name", "fmt", "hint"),
    [
        ("s.gpkg", "geojson", "give --out the suffix .geojson"),
        ("s.geojson", "fgb", "drop --format"),
        ("-", "gpkg", "stdout"),
    ],
)
def test_format_contradicting_out_is_usage_error(
    bundle2: Path, tmp_path: Path, out_name: str, fmt: str, hint: str
) -> None:
    """--format against the --out suffix used to write GeoJSON text into a .gpkg (and an extra file beside it)."""
    out = "-" if out_name == "-" else str(tmp_path / out_name)
    before = sorted(tmp_path.iterdir())
    args = ["search", "--point", "10.01,45.01", "--index", str(bundle2), "--out", out, "--format", fmt, *TEST_MODEL]
    msg = _fails(args, 2)
    assert "--format" in msg and hint in msg and "Error:" in msg
    assert sorted(tmp_path.iterdir()) == before


def test_format_names_an_output_without_known_suffix(bundle2: Path, tmp_path: Path) -> None:
    """What --format is for: an --out whose suffix says nothing; agreeing suffixes are fine too."""
    out = tmp_path / "hits.out"
    base = ["search", "--point", "10.01,45.01", "--index", str(bundle2), "-k", "3", *TEST_MODEL]
    invoke(*base, "--out", str(out), "--format", "fgb")
    assert len(gpd.read_file(out)) == 3 and (tmp_path / "hits.hits_merged.out").exists()
    invoke(*base, "--out", str(tmp_path / "h.json"), "--format", "geojson")
    msg = _fails([*base, "--out", str(tmp_path / "h.txt")], 2)
    assert "h.txt" in msg and "--format" in msg and not (tmp_path / "h.txt").exists()


def test_unknown_tile_message_points_to_real_tile_ids(bundle2: Path, tmp_path: Path) -> None:
    """`geoir info` lists no tile ids: the message names where they are, and an id taken from there works."""
    out = tmp_path / "s.gpkg"
    msg = _fails(["search", "tile:123", "--index", str(bundle2), "--out", str(out), *TEST_MODEL], 1)
    catalog = bundle2 / "catalog.gpkg"
    assert "tile 123 is not in" in msg and "tile_id" in msg and str(catalog) in msg and "geoir info" not in msg
    assert not out.exists()
    tid = int(gpd.read_file(catalog, layer="tiles").tile_id[0])
    invoke("search", f"tile:{tid}", "--index", str(bundle2), "--out", str(out), *TEST_MODEL)
    assert out.exists()


def test_unknown_scene_message_gives_a_working_info_command(bundle2: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.gpkg"
    args = ["search", "--point", "10.01,45.01", "--scene", "nosuch", "--index", str(bundle2), "--out", str(out)]
    msg = _fails([*args, *TEST_MODEL], 1)
    command = f"geoir info --index {bundle2}"
    assert "no scene 'nosuch'" in msg and f"`{command}`" in msg and not out.exists()
    r = invoke(*command.split()[1:])
    assert "b.tif" in r.output


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_index_file_message_gives_a_working_fix(bundle2: Path, tmp_path: Path, damage: str) -> None:
    """Re-running `geoir tile` skips indexed scenes and so never repaired a corrupt .faiss file; deleting it does
    (the search rebuilds it from the stored vectors). FAISS's C++ internals stay out of the message."""
    faiss_file = bundle2 / "float.faiss"
    data = faiss_file.read_bytes()
    faiss_file.write_bytes(b"\xcbW\x1eb" + bytes(200) if damage == "garbage" else data[: len(data) // 2])
    out = tmp_path / "s.gpkg"
    args = ["search", "--point", "10.01,45.01", "--index", str(bundle2), "--out", str(out), *TEST_MODEL]
    msg = _fails(args, 1)
    assert str(faiss_file) in msg and "delete it and search again" in msg and "geoir tile" not in msg
    assert "faiss/impl" not in msg and "index_read" not in msg and len(msg.strip().splitlines()) == 1
    assert not out.exists()
    faiss_file.unlink()  # the fix the message gives
    invoke(*args[: -len(TEST_MODEL)], *TEST_MODEL)
    assert len(gpd.read_file(out, layer="hits")) == 10 and faiss_file.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_unwinds_like_ctrl_c(make_geotiff: MakeGeoTiff, tmp_path: Path, sig: signal.Signals) -> None:
    # `timeout`, `kill` and batch schedulers send SIGTERM: the run stops with 143 and leaves a whole bundle.
    # Ctrl-C (SIGINT) exits 130, as the shell reports an interrupted command (click's own answer was 1).
    scenes = [make_geotiff(f"s{i}.tif", seed=30 + i, shape=(3, 2048, 2048)) for i in range(6)]
    index = tmp_path / "idx"
    proc = _signal_after_first_scene(scenes, index, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and ("Stopped by SIGTERM." if sig == signal.SIGTERM else "Aborted!") in err
    bundle = Bundle.open(index)
    assert 1 <= bundle.manifest["counts"]["scenes"] < 6
    assert bundle.manifest["counts"]["tiles"] == len(bundle.tiles())
    # No temp file: the locks alone (the index lock only if an index was saved: a signal between a scene's catalog
    # row and its vectors' turn in the in-memory index leaves nothing to save, and the next use rebuilds it).
    hidden = {p.name for p in index.iterdir() if p.name.startswith(".")}
    assert ".lock" in hidden and hidden <= {".lock", ".index.lock"}, hidden


def test_a_writer_corrects_counts_and_removes_temp_files_a_killed_run_left(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    index = tmp_path / "idx"
    scene = make_geotiff()
    invoke("tile", str(scene), "--index", str(index), *TILE_MODEL)
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["counts"] == {"scenes": 1, "tiles": 4}
    # A run killed after its commit but before the manifest's update; temp files of a dead and a live process.
    manifest["counts"] = {"scenes": 0, "tiles": 0}
    (index / "manifest.json").write_text(json.dumps(manifest))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = index / f".manifest.json.{dead.stdout.strip()}.0a1b2c3d.tmp.json"
    live = index / f".float.faiss.{os.getpid()}.k2j4h5g6.tmp"
    stale.write_text("{half")
    live.write_bytes(b"being saved")
    # Before any writer corrects them, info counts what is committed, not the manifest's stale counts.
    shown = json.loads(invoke("info", "--index", str(index), "--json").output)
    assert shown["counts"] == {"scenes": 1, "tiles": 4}
    invoke("tile", str(scene), "--index", str(index), *TILE_MODEL)  # the scene is there: skipped
    assert Bundle.open(index).manifest["counts"] == {"scenes": 1, "tiles": 4}
    assert not stale.exists() and live.exists()
    out = tmp_path / "h.gpkg"
    invoke(
        "search",
        f"tile:{int(Bundle.open(index).tiles().tile_id[0])}",
        "--index",
        str(index),
        "--out",
        str(out),
        *TEST_MODEL,
    )


def test_two_killed_runs_in_a_row_cannot_leave_an_index_of_the_right_count_and_wrong_tiles(
    make_geotiff: MakeGeoTiff, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import geoir as api
    from geoir.index.vectors import VectorIndex

    model = api.load_model("backbone", backbone="test")
    a, b, c = (make_geotiff(f"{n}.tif", seed=i) for i, n in enumerate("abc"))  # 4 tiles each
    index = tmp_path / "idx"
    api.tile([a, b], index=index, model=model)
    kept = (index / "float.faiss").read_bytes()
    api.tile([c], index=index, model=model)
    # A tile run killed after committing c, before saving the index: the file holds a and b.
    (index / "float.faiss").write_bytes(kept)
    bundle = Bundle.open(index)
    a_id = next(r["id"] for r in bundle.scene_records() if r["path"] == str(a))
    # Then a remove of a killed after its catalog commit, before its index save (the remove raises there).
    monkeypatch.setattr(VectorIndex, "remove", lambda self, ids: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt), bundle.lock():
        bundle.remove_scene(a_id)
    monkeypatch.undo()
    # Killed between its catalog commit and its index save, the remove leaves no index file (rebuilt on next
    # use), not one still holding the removed scene, which a killed tile run could bring to the catalog's count.
    assert not (index / "float.faiss").exists()
    # The index had held a and b: 8 vectors for the catalog's 8 tiles of b and c, and c was never found.
    bundle = Bundle.open(index)
    assert set(bundle.indexes()["float"].ids().tolist()) == set(bundle.tiles().tile_id.tolist())
    assert len(bundle.tiles()) == 8


def test_a_search_that_a_remove_overlaps_leaves_the_removed_scenes_hits_out(
    make_geotiff: MakeGeoTiff, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The search's index still held the removed scene's tiles, their catalog rows gone: a KeyError traceback.
    import geoir as api
    from geoir.retrieval.engine import QueryParts, Searcher

    model = api.load_model("backbone", backbone="test")
    a, b = make_geotiff("a.tif", seed=1), make_geotiff("b.tif", seed=2)
    index = tmp_path / "idx"
    api.tile([a, b], index=index, model=model)
    bundle = Bundle.open(index)
    searcher = Searcher(bundle, model)  # reads the index and the scenes ...
    writer = Bundle.open(index)
    a_id = next(r["id"] for r in writer.scene_records() if r["path"] == str(a))
    with writer.lock():
        writer.remove_scene(a_id)  # ... then a remove commits
    parts = QueryParts()
    searcher.add_tiles(parts, [int(writer.tiles().tile_id[0])], "b", False)
    with geoir_warnings(caplog):
        hits = searcher.search(parts, k=8).hits
    assert set(hits.scene_id) == {writer.scene_records()[0]["id"]} and len(hits) < 8
    assert "hit(s) left out: their scene was removed from" in caplog.text


def test_a_writer_refuses_a_bundle_another_writer_changed_after_it_read_it(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    import geoir as api

    model = api.load_model("backbone", backbone="test")
    index = tmp_path / "idx"
    api.tile([make_geotiff("a.tif", seed=1)], index=index, encode=False)
    # `geoir encode` reads the bundle, then loads its model (seconds); a `geoir tile` commits meanwhile ...
    slow = Bundle.open(index)
    api.tile([make_geotiff("b.tif", seed=2)], index=index, model=model)
    # ... and the encode, writing its copy of the manifest back, undid the other run's model and counts.
    with pytest.raises(BundleError, match="changed by another geoir process while this one prepared"), slow.lock():
        pass
    assert Bundle.open(index).manifest["counts"]["scenes"] == 2 and Bundle.open(index).model is not None
    # Its own writes are no change to it: one process takes the lock again and again.
    bundle = Bundle.open(index)
    for _ in range(2):
        with bundle.lock():
            bundle.reconcile()
            bundle.write_manifest()


@pytest.mark.parametrize("fmt", ["fgb", "geojson", "gpkg"])
def test_an_output_gdal_wrote_short_is_refused_and_leaves_nothing(
    bundle2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    # A full disk that GDAL's drivers do not report (FlatGeobuf): the file is read back before it is renamed.
    import geoir.output.writers as writers

    real = writers.pyogrio.write_dataframe

    def short(df, path, **kw):  # type: ignore[no-untyped-def]
        real(df, path, **kw)
        if kw.get("layer") == "hits_merged" or fmt == "gpkg":
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(writers.pyogrio, "write_dataframe", short)
    out = tmp_path / "res" / f"h.{fmt}"
    tid = int(Bundle.open(bundle2).tiles().tile_id[0])
    r = CliRunner().invoke(
        cli, ["-q", "search", f"tile:{tid}", "--index", str(bundle2), "--out", str(out), *TEST_MODEL]
    )
    assert r.exit_code == 1 and "is the disk full?" in r.output, r.output
    assert not out.parent.exists()  # neither the hits nor a side layer, nor the folder made for them


def test_hits_carry_their_id_as_text_and_a_short_result_says_why(bundle2: Path, tmp_path: Path) -> None:
    tid = int(Bundle.open(bundle2).tiles().tile_id[0])
    out = tmp_path / "h.geojson"
    r = CliRunner().invoke(
        cli, ["search", f"tile:{tid}", "--index", str(bundle2), "--out", str(out), "-k", "500", *TEST_MODEL]
    )
    assert r.exit_code == 0, r.output
    hits = gpd.read_file(out)
    assert (hits.tile == "tile:" + hits.tile_id.astype(str)).all() and len(hits) < 500
    # 13 tiles, one of them the query's own: each reason named.
    assert len(hits) == 12 and "12 of the 500 hits asked for: " in r.output, r.output
    assert f"{bundle2} holds 13 tiles; 1 are the query's own place (--include-query-overlap" in r.output
    assert f"beside it: {tmp_path / 'h.hits_merged.geojson'}" in r.output
    # With enough tiles, the query's own tile is said to have ranked among the hits and been left out.
    r = CliRunner().invoke(
        cli,
        ["search", f"tile:{tid}", "--index", str(bundle2), "--out", str(tmp_path / "k.gpkg"), "-k", "3", *TEST_MODEL],
    )
    assert "left out: 1 tile(s) of the query's own place that ranked among the 3 best" in r.output, r.output
    # The text id is a query as it is.
    invoke("search", hits.tile[0], "--index", str(bundle2), "--out", str(tmp_path / "again.gpkg"), *TEST_MODEL)
    # A plain image has no place of its own, and no filter was given: neither is blamed for a short result.
    png = tmp_path / "q.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png)
    r = CliRunner().invoke(
        cli, ["search", str(png), "--index", str(bundle2), "--out", str(tmp_path / "p.gpkg"), "-k", "50", *TEST_MODEL]
    )
    assert r.exit_code == 0 and f"13 of the 50 hits asked for: {bundle2} holds 13 tiles\n" in r.output, r.output
    assert "own place" not in r.output and "filters" not in r.output
    r = CliRunner().invoke(
        cli,
        ["search", f"tile:{tid}", "--index", str(bundle2), "--out", str(tmp_path / "s.gpkg"), "--scene", "b.tif",
         "-k", "12", *TEST_MODEL],
    )  # fmt: skip
    assert r.exit_code == 0 and "12 hits asked for: " in r.output and " pass the filters" in r.output, r.output


def _merged_by_union(hits: gpd.GeoDataFrame) -> set[tuple[int, int, str]]:
    """Regions as the union of every footprint makes them: (best_rank, count, tile_ids) of each part."""
    union = shapely.union_all(hits.geometry.values)
    out = set()
    for region in getattr(union, "geoms", [union]):
        inside = shapely.area(shapely.intersection(hits.geometry.values, region)) > 0
        members = hits[inside]
        out.add((int(members["rank"].min()), len(members), ",".join(str(t) for t in sorted(members.tile_id))))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_merged_regions_are_those_of_the_union_of_the_hits(seed: int) -> None:
    # Unit squares on a coarse grid (some on the same cell, overlapping; neighbours share an edge; diagonal
    # ones meet at a corner only and stay apart) and a few offset by half a cell (overlapping partly).
    from geoir.retrieval.engine import merge_hits

    rng = np.random.default_rng(seed)
    n = 60
    cells = rng.integers(0, 8, size=(n, 2)).astype(float)
    cells[rng.random(n) < 0.15] += 0.5
    hits = gpd.GeoDataFrame(
        {"rank": np.arange(1, n + 1), "score": np.linspace(1, 0, n), "tile_id": rng.permutation(10**6)[:n]},
        geometry=[shapely.box(x, y, x + 1, y + 1) for x, y in cells],
        crs="EPSG:4326",
    )
    merged = merge_hits(hits)
    got = {(r.best_rank, r.count, r.tile_ids) for r in merged.itertuples()}
    assert got == _merged_by_union(hits)
    assert merged.region.tolist() == list(range(1, len(merged) + 1)) and merged.best_rank.is_monotonic_increasing
    assert shapely.equals(shapely.union_all(merged.geometry.values), shapely.union_all(hits.geometry.values))


@pytest.mark.parametrize("where", ["antimeridian", "north pole", "south pole"])
def test_merged_regions_join_tiles_across_the_antimeridian_and_round_a_pole(where: str) -> None:
    """Tiles either side of the line keep continuous longitudes on their own sides, 360 degrees apart: they
    were two regions, not one; the tiles round a pole made a strip 400 degrees wide."""
    from pyproj import Geod, Transformer
    from rasterio.crs import CRS
    from rasterio.windows import Window

    from geoir.retrieval.engine import merge_hits
    from geoir.tiling.grid import footprints

    if where == "antimeridian":  # 2 x 2 tiles of 2.56 km of UTM 60S, their corner on 180 E at 16.5 S
        x, y = Transformer.from_crs(4326, 32760, always_xy=True).transform(180.0, -16.5)
        windows = [Window(c, r, 256, 256) for r in (0, 256) for c in (0, 256)]
        polys = footprints(Affine(10, 0, x - 2560, 0, -10, y + 2560), windows, CRS.from_epsg(32760))
        assert {p.bounds[0] < 0 for p in polys} == {True, False}  # two on each side
    else:  # 3 x 3 tiles of 1 km of polar stereographic, the pole in the middle one
        windows = [Window(c, r, 100, 100) for r in range(0, 300, 100) for c in range(0, 300, 100)]
        crs = CRS.from_epsg(3413 if where == "north pole" else 3031)
        polys = footprints(Affine(10, 0, -1500, 0, -10, 1500), windows, crs)
    geod = Geod(ellps="WGS84")
    tiles_area = sum(abs(geod.geometry_area_perimeter(shapely.segmentize(p, 0.1))[0]) for p in polys)
    for order in (list(range(len(polys))), list(range(len(polys)))[::-1]):  # the best-ranked on either side
        hits = gpd.GeoDataFrame(
            {"rank": np.arange(1, len(polys) + 1), "score": np.linspace(1, 0.5, len(polys)), "tile_id": order},
            geometry=[polys[i] for i in order],
            crs="EPSG:4326",
        )
        merged = merge_hits(hits)
        assert len(merged) == 1 and merged["count"][0] == len(polys), merged
        region = merged.geometry[0]
        assert region.geom_type == "Polygon" and region.is_valid
        lo, _, hi, _ = region.bounds
        if where == "antimeridian":
            assert hi - lo < 0.1 and (lo < 180 < hi or lo < -180 < hi)  # continuous, on the best tile's side
        else:
            assert (lo, hi) == (-180, 180)  # the cap round the pole
        area = abs(geod.geometry_area_perimeter(shapely.segmentize(region, 0.1))[0])
        assert area == pytest.approx(tiles_area, rel=1e-3)  # the ground the tiles cover, once


@pytest.mark.parametrize("seed", range(3))
def test_sharing_area_of_one_polygon_matches_its_definition(seed: int) -> None:
    # Footprints inside, across the edge of, touching and away from one polygon (with a hole): the
    # predicate (which takes those well inside without an intersection) against the shared area itself.
    from geoir.retrieval.engine import TOUCH_TOLERANCE, shares_area

    rng = np.random.default_rng(seed)
    area = shapely.box(0, 0, 10, 10).difference(shapely.box(4, 4, 6, 6))
    corners = rng.integers(-3, 12, size=(300, 2)).astype(float) * rng.choice([1.0, 0.5], size=(300, 1))
    fps = np.array([shapely.box(x, y, x + 1, y + 1) for x, y in corners], dtype=object)
    shared = shapely.area(shapely.intersection(fps, area))
    for of, base in (("smaller", np.minimum(1.0, area.area)), ("tile", 1.0)):
        expected = shared > TOUCH_TOLERANCE * base
        np.testing.assert_array_equal(shares_area(fps, area, of=of), expected)
    assert 0 < expected.sum() < len(fps)
