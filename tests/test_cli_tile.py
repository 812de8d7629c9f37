"""`geoir tile` end to end through the CLI, reopening what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from click.testing import CliRunner
from PIL import Image

from geoir.cli import cli
from geoir.index.bundle import Bundle, tile_footprint_native
from geoir.tiling.grid import tile_count
from tests.conftest import MakeGeoTiff, editing_catalog, needs_qgis, qgis_probe


def run(*args: str) -> object:
    # Catalog tests skip encoding; tests/test_cli_encode.py covers tile + encode.
    extra = ["--no-encode"] if args[0] == "tile" else []
    return CliRunner().invoke(cli, ["-q", *args, *extra], catch_exceptions=False)


def snapshot(index: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(index.iterdir())
        if p.is_file() and p.name not in (".lock", ".index.lock")
    }


def test_a_crs_without_an_epsg_code_is_not_named_after_another(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """UTM 18 on an unnamed datum was labelled EPSG:3450 (JAD2001, Jamaica) in the catalog and `geoir info`;
    a CRS given only as WKT was "EPSG:?", and `info --json` kept nothing of it."""
    from rasterio.crs import CRS

    index = tmp_path / "idx"
    utm = CRS.from_proj4("+proj=utm +zone=18 +ellps=WGS84")
    lcc = CRS.from_proj4("+proj=lcc +lat_0=39 +lon_0=-76 +lat_1=33 +lat_2=45 +datum=WGS84")
    for name, crs, bounds in (
        ("utm.tif", utm, (500_000.0, 4_000_000.0, 502_560.0, 4_002_560.0)),
        ("lcc.tif", lcc, (0.0, 0.0, 2_560.0, 2_560.0)),
    ):
        assert (
            run("tile", str(make_geotiff(name, crs=crs.to_wkt(), bounds=bounds)), "--index", str(index)).exit_code == 0
        )
    scenes = gpd.read_file(index / "catalog.gpkg", layer="scenes")
    assert not any(c.startswith("EPSG") for c in scenes["crs"])  # stored as WKT, whole
    info = json.loads(run("info", "--index", str(index), "--json").output)
    by_name = {Path(s["path"]).name: s for s in info["scenes"]}
    assert by_name["utm.tif"]["crs"].startswith("+proj=utm +zone=18 +ellps=WGS84")
    assert by_name["lcc.tif"]["crs"].startswith("+proj=lcc +lat_0=39 +lon_0=-76")
    for s in by_name.values():
        assert CRS.from_wkt(s["crs_wkt"]) == CRS.from_user_input(scenes.set_index("path").loc[s["path"], "crs"])
    text = run("info", "--index", str(index)).output
    assert "EPSG:3450" not in text and "EPSG:?" not in text and "+proj=lcc" in text


def test_tile_writes_catalog(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    scene = make_geotiff(shape=(3, 600, 700))
    index = tmp_path / "idx"
    r = run("tile", str(scene), "--index", str(index))
    assert r.exit_code == 0, r.output
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["counts"] == {"scenes": 1, "tiles": tile_count(700, 600, 256, 256)}
    tiles = gpd.read_file(index / "catalog.gpkg", layer="tiles")
    scenes = gpd.read_file(index / "catalog.gpkg", layer="scenes")
    assert tiles.crs.to_epsg() == 4326 and scenes.crs.to_epsg() == 4326
    assert len(tiles) == 9 and tiles["tile_id"].is_unique
    assert set(tiles.columns) >= {"tile_id", "scene_id", "col_off", "row_off", "width", "height", "nodata_fraction"}
    assert sorted(set(tiles["col_off"])) == [0, 256, 444] and sorted(set(tiles["row_off"])) == [0, 256, 344]
    assert set(scenes.columns) >= {
        "scene_id",
        "path",
        "fingerprint",
        "crs",
        "native_gsd",
        "bands",
        "dtype",
        "scaling",
        "geometry",
    }
    assert scenes.loc[0, "crs"] == "EPSG:32618"
    # Rings counter-clockwise, as in the search outputs (they ran clockwise, north-up, in lon/lat).
    assert all(g.exterior.is_ccw for g in [*tiles.geometry, *scenes.geometry])
    # The union of tile footprints is the scene footprint.
    union = shapely.union_all(tiles.geometry.values)
    # Densified edges differ slightly between one scene edge and several tile edges: tolerate 1e-5.
    assert union.symmetric_difference(scenes.geometry[0]).area < 1e-5 * scenes.geometry[0].area


def test_native_footprint_recoverable(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    t = Affine.translation(500_000, 4_000_000) @ Affine.rotation(25) @ Affine.scale(10, -10)
    scene = make_geotiff(transform=t, shape=(3, 512, 512))
    index = tmp_path / "idx"
    assert run("tile", str(scene), "--index", str(index)).exit_code == 0
    bundle = Bundle.open(index)
    record = bundle.scene_records()[0]
    tiles = bundle.tiles()
    row = tiles[(tiles.col_off == 256) & (tiles.row_off == 0)].iloc[0]
    native = tile_footprint_native(record, row.col_off, row.row_off, row.width, row.height)
    expected = shapely.Polygon([t @ xy for xy in ((256, 0), (512, 0), (512, 256), (256, 256))])
    assert native.equals_exact(expected, tolerance=1e-6)
    # Rotated: the footprint is not axis-aligned, in the scene CRS and in lon/lat.
    assert shapely.box(*native.bounds).area > 1.2 * native.area
    assert shapely.box(*row.geometry.bounds).area > 1.2 * row.geometry.area


def test_rerun_adds_nothing_and_new_scenes_append(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    a = make_geotiff("a.tif", seed=1)
    b = make_geotiff("b.tif", seed=2, crs="EPSG:4326", bounds=(10.0, 45.0, 10.05, 45.05))
    index = tmp_path / "idx"
    assert run("tile", str(a), "--index", str(index)).exit_code == 0
    before = gpd.read_file(index / "catalog.gpkg", layer="tiles")
    assert run("tile", str(a), "--index", str(index)).exit_code == 0
    assert len(gpd.read_file(index / "catalog.gpkg", layer="tiles")) == len(before)
    assert run("tile", str(a), str(b), "--index", str(index)).exit_code == 0
    after = gpd.read_file(index / "catalog.gpkg", layer="tiles")
    assert len(after) == 2 * len(before) and after["tile_id"].is_unique
    assert json.loads((index / "manifest.json").read_text())["counts"] == {"scenes": 2, "tiles": 8}
    b_tiles = after[after.scene_id != before.scene_id[0]]
    assert b_tiles.total_bounds == pytest.approx([10.0, 45.0, 10.05, 45.05])


def _two_encoded_scenes(make_geotiff: MakeGeoTiff, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two neighbouring scenes of 4 tiles each, tiled and encoded (test backbone) into ``tmp_path/idx``."""
    a = make_geotiff("a.tif", seed=1)
    b = make_geotiff("b.tif", seed=2, bounds=(510_000.0, 4_000_000.0, 515_120.0, 4_005_120.0))
    index = tmp_path / "idx"
    args = ["--index", str(index), "--backbone", "test", "--device", "cpu", "--workers", "0"]
    assert CliRunner().invoke(cli, ["-q", "tile", str(a), str(b), *args]).exit_code == 0
    return a, b, index


def test_searching_maps_the_float_index_and_changing_reads_it_whole(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    _, b, index = _two_encoded_scenes(make_geotiff, tmp_path)
    bundle = Bundle.open(index)
    searched = bundle.indexes()["float"]
    assert searched.mapped and len(searched) == 8
    # The same Bundle then changes: the index is read whole, changed and saved; a fresh open maps the result.
    b_id = next(r["id"] for r in bundle.scene_records() if r["path"] == str(b))
    with bundle.lock():
        assert bundle.remove_scene(b_id) == 4
    assert not bundle._loaded["float"].mapped and len(bundle.indexes()["float"]) == 4
    again = Bundle.open(index).indexes()["float"]
    assert again.mapped and sorted(again.ids()) == sorted(Bundle.open(index).tiles().tile_id)


def test_a_rerun_with_nothing_to_encode_loads_no_model(
    make_geotiff: MakeGeoTiff, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_geotiff("a.tif", seed=1)
    b = make_geotiff("b.tif", seed=2, bounds=(510_000.0, 4_000_000.0, 515_120.0, 4_005_120.0))
    index = tmp_path / "idx"
    args = ["--index", str(index), "--backbone", "test", "--device", "cpu", "--workers", "0"]
    assert CliRunner().invoke(cli, ["-q", "tile", str(a), *args]).exit_code == 0
    loaded: list[str] = []
    import geoir.cli.tile as tile_module

    real = tile_module.resolve_model

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        loaded.append("model")
        return real(*a, **kw)

    monkeypatch.setattr(tile_module, "resolve_model", spy)
    r = CliRunner().invoke(cli, ["tile", str(a), "--index", str(index)])
    assert r.exit_code == 0 and "already in" in r.output and loaded == [], r.output
    # --tta is still refused on a bundle encoded without it.
    r = CliRunner().invoke(cli, ["tile", str(a), "--index", str(index), "--tta"])
    assert r.exit_code == 2 and "encoded without --tta" in r.output
    # A new scene needs the model.
    assert CliRunner().invoke(cli, ["-q", "tile", str(a), str(b), *args]).exit_code == 0
    assert loaded == ["model"] and len(Bundle.open(index).encoded_scene_ids()) == 2


def test_without_a_model_tiles_are_read_in_the_main_process(
    make_geotiff: MakeGeoTiff, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reader processes feed a model; for --no-encode they cost start-up and copies (2.6x the time, 3.7x the
    # memory on the Sentinel-2 scene at --size 32), so by default there are none. --workers still rules.
    import geoir.tiling.run as run_module

    used: list[int] = []
    real = run_module.read_and_encode

    def spy(source, model, batch_size=64, workers=0, *args, **kwargs):  # type: ignore[no-untyped-def]
        used.append(workers)
        return real(source, model, batch_size, workers, *args, **kwargs)

    monkeypatch.setattr(run_module, "read_and_encode", spy)
    monkeypatch.setattr("geoir.cli.tile.default_workers", lambda: 2)
    a = make_geotiff("a.tif", seed=1)
    assert run("tile", str(a), "--index", str(tmp_path / "i1")).exit_code == 0
    assert run("tile", str(a), "--index", str(tmp_path / "i2"), "--workers", "1").exit_code == 0
    args = ["-q", "tile", str(a), "--index", str(tmp_path / "i3"), "--backbone", "test", "--device", "cpu"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert used == [0, 1, 2]


def test_stored_features_of_tiles_are_read_row_by_row(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    from geoir.errors import BundleError

    _, _, index = _two_encoded_scenes(make_geotiff, tmp_path)
    bundle = Bundle.open(index)
    scenes = bundle.encoded_scene_ids()
    whole = bundle.vectors(scenes)
    pick = whole["ids"][[6, 0, 3, 5]]  # across both scenes, out of order
    expected = whole["features"][[6, 0, 3, 5]]
    np.testing.assert_array_equal(bundle.features_of(pick, scenes), expected)
    # A compressed vector file (written by other code) is read whole instead, with the same result.
    path = bundle.vectors_path(scenes[1])
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(path, **arrays)
    np.testing.assert_array_equal(bundle.features_of(pick, scenes), expected)
    with pytest.raises(BundleError, match=r"tiles \[12345\] have no stored vectors"):
        bundle.features_of([12345], scenes)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BundleError, match="is corrupt"):
        bundle.features_of(pick, scenes)


def test_first_scene_without_tiles_leaves_a_sound_catalog(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    # The first scene of a new bundle gives no tile (its one padded tile is over the nodata limit): the
    # catalog's columns must still get their types from the schema, not from an empty first write.
    small = make_geotiff("small.tif", shape=(3, 100, 70), seed=3)
    a = make_geotiff("a.tif", seed=1, nodata=0)
    index = tmp_path / "idx"
    assert run("tile", str(small), str(a), "--index", str(index), "--max-nodata", "0.2").exit_code == 0
    tiles = Bundle.open(index).tiles()
    assert len(tiles) == 4 and tiles.scene_id.map(type).eq(str).all()
    # Likewise a nodata column is numbers whether or not the first scene declares one.
    nodata = gpd.read_file(index / "catalog.gpkg", layer="scenes")["nodata"]
    assert nodata.dtype == np.float64 and nodata.isna().tolist() == [True, False] and nodata[1] == 0
    # A re-run finds nothing to reconcile and keeps every tile.
    r = CliRunner().invoke(cli, ["tile", str(small), str(a), "--index", str(index), "--no-encode"])
    assert r.exit_code == 0 and "interrupted" not in r.output, r.output
    assert len(Bundle.open(index).tiles()) == 4


def test_a_changed_file_replaces_its_earlier_tiles(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    scene = make_geotiff("s.tif", seed=1)
    other = make_geotiff("o.tif", seed=3, bounds=(510_000.0, 4_000_000.0, 515_120.0, 4_005_120.0))
    index = tmp_path / "idx"
    args = ["tile", str(scene), str(other), "--index", str(index), "--backbone", "test", "--device", "cpu"]
    assert CliRunner().invoke(cli, ["-q", *args, "--workers", "0"]).exit_code == 0
    old = {r["path"]: r["id"] for r in Bundle.open(index).scene_records()}[str(scene)]
    make_geotiff("s.tif", seed=2)  # exported again, with other pixels, to the same path
    r = CliRunner().invoke(cli, [*args, "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert f"changed since it was indexed: its 4 earlier tiles (scene {old}) are replaced" in r.output
    assert "1 scene(s) added (1 replacing a changed file), 1 already indexed" in r.output
    bundle = Bundle.open(index)
    records = bundle.scene_records()
    assert len(records) == 2 and old not in {r["id"] for r in records}
    assert len(bundle.tiles()) == 8 == bundle.manifest["counts"]["tiles"] and old not in set(bundle.tiles().scene_id)
    # Its vectors went with it, from the store and from the FAISS index saved at the end of the run.
    assert not bundle.vectors_path(old).exists() and set(bundle.vectors()["ids"]) == set(bundle.tiles().tile_id)
    assert sorted(Bundle.open(index).indexes()["float"].ids()) == sorted(bundle.tiles().tile_id)


def test_the_bundles_own_size_alone_keeps_its_stride(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    a = make_geotiff("a.tif", seed=1, shape=(3, 128, 128))
    b = make_geotiff("b.tif", seed=2, shape=(3, 128, 128), bounds=(510_000.0, 4_000_000.0, 511_280.0, 4_001_280.0))
    index = tmp_path / "idx"
    assert run("tile", str(a), "--index", str(index), "--size", "64", "--overlap", "0.5").exit_code == 0
    r = run("tile", str(b), "--index", str(index), "--size", "64")
    assert r.exit_code == 0, r.output
    tiles = Bundle.open(index).tiles()
    assert len(tiles) == 18 and sorted(set(tiles.col_off)) == [0, 32, 64]
    # Another size alone still means another grid, which the bundle refuses.
    r = run("tile", str(b), "--index", str(index), "--size", "32")
    assert r.exit_code == 1 and "was tiled with --size 64 --stride 32" in r.output
    # A --gsd the bundle was not tiled with is named as the difference.
    r = run("tile", str(b), "--index", str(index), "--size", "64", "--gsd", "10")
    assert r.exit_code == 1 and "(each scene's own resolution: no --gsd)" in r.output


def test_overlap_stride_and_nodata_limit(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    scene = make_geotiff(dtype="uint16", nodata=0, nodata_block=True, shape=(3, 512, 512))
    r = run("tile", str(scene), "--index", str(tmp_path / "o"), "--overlap", "0.5", "--max-nodata", "0.2")
    assert r.exit_code == 0
    tiles = gpd.read_file(tmp_path / "o" / "catalog.gpkg", layer="tiles")
    # 3x3 grid at stride 128; tiles touching the nodata quarter by more than 20% are skipped.
    assert sorted(set(tiles.col_off)) == [0, 128, 256]
    assert (tiles.nodata_fraction <= 0.2).all()
    assert len(tiles) == 5
    r = run("tile", str(scene), "--index", str(tmp_path / "s"), "--stride", "200", "--size", "300")
    assert r.exit_code == 0
    tiles = gpd.read_file(tmp_path / "s" / "catalog.gpkg", layer="tiles")
    # Origins 0, 200 and 212 (snapped) on each axis; the top-left tile is 73% nodata and skipped.
    assert sorted(set(tiles.col_off)) == [0, 200, 212] and len(tiles) == 8


def test_small_scene_one_padded_tile(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    scene = make_geotiff(shape=(3, 200, 180))
    assert run("tile", str(scene), "--index", str(tmp_path / "i")).exit_code == 0
    tiles = gpd.read_file(tmp_path / "i" / "catalog.gpkg", layer="tiles")
    assert len(tiles) == 1
    assert tiles.nodata_fraction[0] == pytest.approx(1 - 200 * 180 / 256**2)


def test_gsd_gives_same_ground_size(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    fine = make_geotiff("fine.tif", bounds=(500_000, 4_000_000, 505_120, 4_005_120), shape=(3, 1024, 1024))
    coarse = make_geotiff("coarse.tif", bounds=(600_000, 4_000_000, 605_120, 4_005_120), shape=(3, 512, 512))
    index = tmp_path / "g"
    assert run("tile", str(fine), str(coarse), "--index", str(index), "--gsd", "10").exit_code == 0
    bundle = Bundle.open(index)
    records = {r["path"]: r for r in bundle.scene_records()}
    for rec in records.values():
        assert rec["grid_width"] == 512 and Affine(*rec["grid_transform"]).a == pytest.approx(10.0)
    assert bundle.n_tiles() == 8


def test_gsd_measures_mercator_pixels_on_the_ground(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    # Web Mercator at 60 N: a 1 m grid cell is 0.5 m of ground (scale 1/cos 60 = 2). --gsd 2 is 4 cells.
    import pyproj

    x, y = pyproj.Transformer.from_crs(4326, 3857, always_xy=True).transform(10.0, 60.0)
    scene = make_geotiff(
        "merc.tif", crs="EPSG:3857", bounds=(x - 512, y - 512, x + 512, y + 512), shape=(3, 1024, 1024)
    )
    index = tmp_path / "m"
    assert run("tile", str(scene), "--index", str(index), "--gsd", "2").exit_code == 0
    (rec,) = Bundle.open(index).scene_records()
    assert rec["native_gsd"] == pytest.approx(0.5, rel=1e-3)
    assert rec["grid_width"] == 256  # 1024 cells of 0.5 m at 2 m (it was 512: pixels of 1 m on the ground)
    # The true size of a grid pixel on the ground, measured independently at the scene's centre.
    geod = pyproj.Geod(ellps="WGS84")
    to_ll = pyproj.Transformer.from_crs(3857, 4326, always_xy=True)
    step = Affine(*rec["grid_transform"]).a
    (lon0, lon1), (lat0, lat1) = to_ll.transform([x, x + step], [y, y])
    assert geod.inv(lon0, lat0, lon1, lat1)[2] == pytest.approx(2.0, rel=5e-3)


@pytest.mark.parametrize("epsg, lon, lat", [(3031, 30.0, -60.0), (3413, -45.0, 62.0), (3031, 0.0, -85.4)])
def test_gsd_measures_polar_stereographic_pixels_on_the_ground(
    make_geotiff: MakeGeoTiff, tmp_path: Path, epsg: int, lon: float, lat: float
) -> None:
    """Only Mercator's scale was measured: polar stereographic grids (scale 0.97 to 1.04 here) were taken as
    ground metres, so --gsd tiles covered 3 to 4% more or less ground than asked."""
    import pyproj

    x, y = pyproj.Transformer.from_crs(4326, epsg, always_xy=True).transform(lon, lat)
    scene = make_geotiff("polar.tif", crs=f"EPSG:{epsg}", bounds=(x - 5120, y - 5120, x + 5120, y + 5120))
    index = tmp_path / "p"
    assert run("tile", str(scene), "--index", str(index), "--gsd", "40").exit_code == 0
    (rec,) = Bundle.open(index).scene_records()
    to_ll = pyproj.Transformer.from_crs(epsg, 4326, always_xy=True)
    step = Affine(*rec["grid_transform"]).a
    geod = pyproj.Geod(ellps="WGS84")
    for dx, dy in ((step, 0.0), (0.0, step)):  # a grid pixel's two sides, measured on the ellipsoid
        (lon0, lon1), (lat0, lat1) = to_ll.transform([x, x + dx], [y, y + dy])
        assert geod.inv(lon0, lat0, lon1, lat1)[2] == pytest.approx(40.0, rel=2e-3)


def test_gsd_of_a_utm_scene_at_its_own_resolution_does_not_resample(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    # UTM's scale (0.9996 on the central meridian) is within the tolerance: --gsd 10 keeps the 10 m pixels.
    index = tmp_path / "u"
    assert run("tile", str(make_geotiff()), "--index", str(index), "--gsd", "10").exit_code == 0
    (rec,) = Bundle.open(index).scene_records()
    assert rec["native_gsd"] == 10.0 and rec["grid_width"] == 512 and Affine(*rec["grid_transform"]).a == 10.0


def test_export_chips(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    scene = make_geotiff(shape=(3, 512, 512))
    chips = tmp_path / "chips"
    assert run("tile", str(scene), "--index", str(tmp_path / "i"), "--export-chips", str(chips)).exit_code == 0
    files = sorted(chips.glob("*.tif"))
    assert len(files) == 4
    tiles = Bundle.open(tmp_path / "i").tiles()
    with (
        rasterio.open(scene) as src,
        rasterio.open(chips / next(f.name for f in files if "_r256_c256_" in f.name)) as c,
    ):
        assert c.crs == src.crs and c.count == 3 and c.width == 256
        assert c.transform == src.transform @ Affine.translation(256, 256)
        assert np.array_equal(c.read(), src.read(window=((256, 512), (256, 512))))
    assert {int(f.stem.rsplit("_", 1)[1]) for f in files} == set(tiles.tile_id)


def test_stretch_reads_one_place_alike_in_files_of_different_statistics(tmp_path: Path) -> None:
    # Two overlapping files of one 16-bit acquisition, the second half dark water: each file's own 2-98%
    # stretch reads their shared 256 columns differently; one --stretch reads them alike.
    rng = np.random.default_rng(3)
    data = rng.integers(500, 4000, size=(3, 256, 768)).astype("uint16")
    data[:, :, 512:] = rng.integers(50, 200, size=(3, 256, 256))
    transform = Affine(10, 0, 500_000, 0, -10, 4_002_560)
    paths = []
    for name, cols in (("west", slice(0, 512)), ("east", slice(256, 768))):
        paths.append(tmp_path / f"{name}.tif")
        kw = {"driver": "GTiff", "width": 512, "height": 256, "count": 3, "dtype": "uint16", "crs": "EPSG:32618"}
        with rasterio.open(paths[-1], "w", **kw, transform=transform @ Affine.translation(cols.start, 0)) as dst:
            dst.write(data[:, :, cols])

    def shared_tiles(*options: str) -> tuple[np.ndarray, np.ndarray]:
        index, chips = tmp_path / f"i{len(options)}", tmp_path / f"c{len(options)}"
        args = ("tile", *map(str, paths), "--index", str(index), "--export-chips", str(chips), *options)
        assert run(*args).exit_code == 0
        west, east = (next(chips.glob(f"{name}_r0_c{col}_*.tif")) for name, col in (("west", 256), ("east", 0)))
        with rasterio.open(west) as a, rasterio.open(east) as b:
            assert a.bounds == b.bounds  # the same ground
            return a.read().astype(int), b.read().astype(int)

    a, b = shared_tiles()
    assert np.abs(a - b).mean() > 10
    a, b = shared_tiles("--stretch", "0,5000")
    assert np.array_equal(a, b) and np.abs(a - data[:, :, 256:512] * 255.0 / 5000).max() <= 0.5 + 1e-3
    records = Bundle.open(tmp_path / "i2").scene_records()
    fixed = {"low": [0.0] * 3, "high": [5000.0] * 3, "fixed": True}
    assert all(r["scaling"] == fixed for r in records)
    # `geoir info` says how each scene is read.
    info = json.loads(run("info", str(tmp_path / "i2"), "--json").output)
    assert all(s["stretch"] == fixed and s["bands"] == [1, 2, 3] for s in info["scenes"])
    assert "(bands 1,2,3, uint16 stretched 0..5000, fixed)" in run("info", str(tmp_path / "i2")).output
    text = run("info", str(tmp_path / "i0")).output
    assert "(bands 1,2,3, uint16 stretched " in text and text.count("..") == 6  # each file's own, per band
    # A scene tiled with one stretch is kept so when asked for another, or for its own, and said so.
    for asked, said in (("0,4000,0,4000,10,4100", "--stretch 0,4000,0,4000,10,4100"), (None, "its own 2-98% stretch")):
        args = ["tile", str(paths[0]), "--index", str(tmp_path / "i2"), "--no-encode"]
        r = CliRunner().invoke(cli, args + (["--stretch", asked] if asked else []))
        assert r.exit_code == 0 and "with --stretch 0,5000; it is kept so" in r.output and f"to use {said}" in r.output
    r = CliRunner().invoke(cli, ["tile", str(paths[0]), "--index", str(tmp_path / "i0"), "--no-encode"])
    assert r.exit_code == 0 and "kept so" not in r.output  # its own stretch, asked for again


def test_black_tiles_of_an_8_bit_scene_without_nodata_are_named_as_likely_fill(tmp_path: Path) -> None:
    # An aerial mosaic's black collar, no nodata declared: its wholly black tiles would be hits for every dark
    # query. The run names them and the fix; with --nodata 0 they are skipped, and nothing is said.
    data = np.random.default_rng(5).integers(1, 255, size=(3, 512, 512)).astype("uint8")
    data[:, :, :256] = 0
    scene = tmp_path / "collar.tif"
    kw = {"driver": "GTiff", "width": 512, "height": 512, "count": 3, "dtype": "uint8", "crs": "EPSG:32618"}
    with rasterio.open(scene, "w", **kw, transform=Affine(1, 0, 500_000, 0, -1, 4_000_512), photometric="RGB") as dst:
        dst.write(data)
    r = CliRunner().invoke(cli, ["tile", str(scene), "--index", str(tmp_path / "a"), "--no-encode"])
    assert r.exit_code == 0 and "2 of its 4 tiles are black in every pixel" in r.output, r.output
    assert f"geoir remove collar.tif --index {tmp_path / 'a'}" in r.output and "--nodata 0" in r.output
    r = CliRunner().invoke(cli, ["tile", str(scene), "--index", str(tmp_path / "b"), "--no-encode", "--nodata", "0"])
    assert r.exit_code == 0 and "black in every pixel" not in r.output and len(Bundle.open(tmp_path / "b").tiles()) == 2


def test_export_chips_refuses_names_too_long_before_any_work(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    # "_r512_c512_" + 19 digits + ".tif" is 34 bytes: a 221-byte stem fits at most; one over is refused up front.
    fits = make_geotiff("é" * 110 + "a.tif", shape=(3, 512, 512))
    over = make_geotiff("é" * 110 + "ab.tif", shape=(3, 512, 512))
    chips, index = tmp_path / "chips", tmp_path / "i"
    r = CliRunner().invoke(cli, ["-q", "tile", str(fits), str(over), "--index", str(index), "--no-encode",
                                 "--export-chips", str(chips)])  # fmt: skip
    assert r.exit_code == 1 and "chip names would be up to 256 bytes" in r.output and "1 bytes shorter" in r.output
    assert not chips.exists() and not index.exists()
    assert run("tile", str(fits), "--index", str(index), "--export-chips", str(chips)).exit_code == 0
    assert len(list(chips.glob("*.tif"))) == 4


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--size", "0"], 2, "--size"),
        (["--overlap", "1"], 2, "--overlap"),
        (["--overlap", "-0.5"], 2, "--overlap"),
        (["--max-nodata", "2"], 2, "--max-nodata"),
        (["--bands", "a,b"], 2, "--bands"),
        (["--bands", "1,2,9"], 1, "band 9 is out of range"),
        (["--gsd", "-3"], 2, "--gsd"),
        (["--overlap", "0.5", "--stride", "10"], 2, "not both"),
        (["--stretch", "3000,0"], 2, "each HIGH must be above its LOW"),
        (["--stretch", "0,1,2"], 2, "not 2 or 6 finite numbers"),
        (["--stretch", "0,nan"], 2, "not 2 or 6 finite numbers"),
        (["--stretch", "low,high"], 2, "not a comma-separated list of numbers"),
    ],
)
def test_bad_options(make_geotiff: MakeGeoTiff, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    scene = make_geotiff()
    index = tmp_path / "idx"
    r = CliRunner().invoke(cli, ["tile", "--no-encode", str(scene), "--index", str(index), *args])
    assert r.exit_code == code, r.output
    assert message in r.output
    assert not index.exists()


def test_bad_inputs_leave_bundle_untouched(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    good = make_geotiff("good.tif")
    index = tmp_path / "idx"
    assert run("tile", str(good), "--index", str(index)).exit_code == 0
    before = snapshot(index)
    no_crs = make_geotiff("nocrs.tif", crs=None, seed=3)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"\x00" * 100)
    for bad, message in [(tmp_path / "missing.tif", "no such file"), (no_crs, "has no CRS"), (junk, "not a raster")]:
        other = make_geotiff("other.tif", seed=9)
        r = CliRunner().invoke(cli, ["tile", "--no-encode", str(other), str(bad), "--index", str(index)])
        assert r.exit_code == 1 and message in r.output, r.output
        assert r.output.count("\n") <= 2 and "Traceback" not in r.output
        assert snapshot(index) == before
    r = CliRunner().invoke(cli, ["tile", "--no-encode", str(good), "--index", str(index), "--size", "128"])
    assert r.exit_code == 1 and "--size 256" in r.output
    assert snapshot(index) == before


def test_corrupt_or_unwritable_bundle(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    scene = make_geotiff()
    index = tmp_path / "idx"
    assert run("tile", str(scene), "--index", str(index)).exit_code == 0
    (index / "manifest.json").write_text("{not json")
    r = CliRunner().invoke(cli, ["tile", "--no-encode", str(scene), "--index", str(index)])
    assert r.exit_code == 1 and "corrupt" in r.output
    (index / "manifest.json").unlink()
    r = CliRunner().invoke(cli, ["tile", "--no-encode", str(scene), "--index", str(index)])
    assert r.exit_code == 1 and "not a geoir bundle" in r.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = CliRunner().invoke(cli, ["tile", "--no-encode", str(scene), "--index", str(blocker / "sub")])
    assert r.exit_code == 1 and "cannot write the index directory" in r.output


def test_catalog_corrupt(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    scene = make_geotiff()
    index = tmp_path / "idx"
    assert run("tile", str(scene), "--index", str(index)).exit_code == 0
    (index / "catalog.gpkg").write_bytes(b"garbage" * 100)
    r = CliRunner().invoke(cli, ["tile", "--no-encode", str(make_geotiff("b.tif", seed=5)), "--index", str(index)])
    assert r.exit_code == 1 and "catalog.gpkg is corrupt" in r.output


def test_a_bundle_received_with_a_linked_vectors_folder_deletes_nothing_elsewhere(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    """The clean-up of a killed run's leftovers went through a linked vectors folder: a bundle received with
    ``vectors -> ~`` had `geoir tile` delete the dot-files and .npz files there, and exit 0."""
    scene = make_geotiff()
    index = tmp_path / "idx"
    assert run("tile", str(scene), "--index", str(index)).exit_code == 0
    victim = tmp_path / "home"
    victim.mkdir()
    for name in (".bashrc", "results.npz", "0123456789abcdef.npz", ".0123456789abcdef.npz.tmp.npz"):
        (victim / name).write_text("mine")
    assert not (index / "vectors").exists()  # (tiled without encoding)
    (index / "vectors").symlink_to(victim)
    for args in (["tile", str(make_geotiff("b.tif", seed=5))], ["remove", scene.name], ["info"]):
        r = CliRunner().invoke(cli, ["-q", *args, "--index", str(index)])
        assert r.exit_code == 1 and "vectors is a symbolic link" in r.output, r.output
    assert sorted(f.name for f in victim.iterdir()) == sorted(
        (".bashrc", "results.npz", "0123456789abcdef.npz", ".0123456789abcdef.npz.tmp.npz")
    )
    # In the bundle's own folder, only geoir's leftovers go: a user's file there stays, and a link is not
    # followed.
    (index / "vectors").unlink()
    (index / "vectors").mkdir()
    (index / "vectors" / "notes.txt").write_text("mine")
    (index / "vectors" / "fedcba9876543210.npz").symlink_to(victim / "results.npz")
    (index / "vectors" / "0011223344556677.npz").write_text("left by a killed run")
    assert run("tile", str(make_geotiff("b.tif", seed=5)), "--index", str(index)).exit_code == 0
    assert sorted(f.name for f in (index / "vectors").iterdir()) == ["fedcba9876543210.npz", "notes.txt"]
    assert (victim / "results.npz").read_text() == "mine"


@pytest.mark.parametrize("bad_id", ["../../victim/thesis", "/abs/victim/thesis", "0123"])
def test_a_scene_id_that_is_not_one_is_refused_not_used_as_a_file_name(
    make_geotiff: MakeGeoTiff, tmp_path: Path, bad_id: str
) -> None:
    """Scene ids name the vectors files: one edited into a path made `geoir remove` delete, and `geoir encode`
    write, a .npz outside the bundle."""

    scene = make_geotiff()
    index = tmp_path / "idx"
    assert run("tile", str(scene), "--index", str(index)).exit_code == 0
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.npz").write_text("mine")
    bad_id = bad_id.replace("/abs", str(tmp_path))
    with editing_catalog(index) as con:
        ((record,),) = con.execute("SELECT record FROM scenes").fetchall()
        record = json.loads(record)
        record["id"] = bad_id
        con.execute("UPDATE scenes SET scene_id = ?, record = ?", (bad_id, json.dumps(record)))
        con.execute("UPDATE tiles SET scene_id = ?", (bad_id,))
    model = ["--backbone", "test", "--device", "cpu"]
    for args in (["remove", scene.name], ["encode", *model], ["tile", str(make_geotiff("b.tif", seed=5)), *model]):
        r = CliRunner().invoke(cli, ["-q", *args, "--index", str(index)])
        assert r.exit_code == 1 and "is not 16 hex digits" in r.output, (args, r.output)
    assert [f.name for f in victim.iterdir()] == ["thesis.npz"]
    assert sorted(p.name for p in tmp_path.rglob("*.npz")) == ["thesis.npz"]  # none written anywhere


def test_orphan_tiles_from_killed_run_are_reconciled(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    import sqlite3

    a, b = make_geotiff("a.tif", seed=1), make_geotiff("b.tif", seed=2)
    index = tmp_path / "idx"
    assert run("tile", str(a), str(b), "--index", str(index)).exit_code == 0
    # Simulate a run killed after writing b's tiles but before its scene row.
    with sqlite3.connect(index / "catalog.gpkg") as con:
        con.execute("DELETE FROM scenes WHERE path LIKE '%b.tif'")
    bundle = Bundle.open(index)
    assert len(bundle.tiles()) == 4  # readers never see orphans
    assert run("tile", str(a), str(b), "--index", str(index)).exit_code == 0
    tiles = Bundle.open(index).tiles()
    assert len(tiles) == 8 and tiles.tile_id.is_unique


def test_help_has_examples_and_version() -> None:
    r = CliRunner().invoke(cli, ["tile", "--no-encode", "--help"])
    assert r.exit_code == 0 and "$ geoir tile" in r.output
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and "geoir" in r.output


def test_quiet_and_verbose_after_the_command_name(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    scene = make_geotiff(shape=(3, 300, 300))

    def output(*args: str) -> str:
        r = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    summary = "tiles"  # the INFO summary line names what was catalogued
    loud = output("tile", str(scene), "--index", str(tmp_path / "a"), "--no-encode")
    assert summary in loud
    # -q after the command name silences INFO as -q before it does; the two add up with -v.
    for args, quiet in (
        (["tile", "-q"], True),
        (["-q", "tile"], True),
        (["-q", "tile", "-v"], False),
        (["tile", "-v", "-q"], False),
    ):
        index = tmp_path / f"b{len(args)}{args.index('tile')}{int(quiet)}"
        text = output(*args, str(scene), "--index", str(index), "--no-encode")
        assert (text.strip() == "") == quiet, (args, text)
    verbose = output("tile", "-v", str(scene), "--index", str(tmp_path / "c"), "--no-encode")
    assert summary in verbose
    # -v says how the scene was read and cut, and how long it took; the default run does not.
    details = ("EPSG:32618, 300 x 300 px of uint8", "grid 300 x 300 px (native), 4 tiles of 256 px every 256 px",
               "4 tiles read in")  # fmt: skip
    for line in details:
        assert line in verbose and line not in loud, (line, verbose)


def test_progress_in_a_log_is_lines_not_redraws(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """Where stderr is a file (a batch job's log), a bar is plain lines, not carriage-return redraws."""
    import subprocess
    import sys

    scene = make_geotiff(shape=(3, 600, 600))
    with open(tmp_path / "log", "w") as log:
        args = [sys.executable, "-m", "geoir", "tile", str(scene), "--index", str(tmp_path / "i"), "--no-encode"]
        assert subprocess.run(args, stderr=log).returncode == 0
    text = (tmp_path / "log").read_text()
    assert "\r" not in text
    bar = [line for line in text.splitlines() if "tile/s" in line or "?tile/s" in line]
    # The start, then the end once (the bar's closing redraw repeats its count and is dropped).
    assert len(bar) == 2 and "0/9" in bar[0] and "100%|##########| 9/9" in bar[1], text


def test_log_lines_keep_one_line_per_count() -> None:
    import io

    from tqdm import tqdm

    from geoir.cli.options import LogLines

    out = io.StringIO()
    bar = tqdm(total=3, desc="x", unit="tile", file=LogLines(out), mininterval=0, ascii=True)
    for _ in range(3):
        bar.update(1)
        bar.set_postfix_str("same count")  # a redraw at the same count adds no line
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" [")[0].rsplit(" ", 1)[1] for line in lines] == ["0/3", "1/3", "2/3", "3/3"], lines


@needs_qgis
def test_tiles_layer_opens_in_qgis(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    scene = make_geotiff(shape=(3, 600, 700), crs="EPSG:32633")
    index = tmp_path / "idx"
    assert run("tile", str(scene), "--index", str(index)).exit_code == 0
    info = qgis_probe(index / "catalog.gpkg", "tiles", "scenes", labels=True)
    assert info["tiles"]["valid"] and info["tiles"]["crs"] == "EPSG:4326" and info["tiles"]["count"] == 9
    assert info["scenes"]["valid"] and info["scenes"]["count"] == 1
    # Outlines (QGIS' default random fill hid the imagery), and each scene named by its file.
    assert info["tiles"]["fill_brushes"] == [0] and info["scenes"]["fill_brushes"] == [0]
    assert [text for text, _x, _y in info["scenes"]["placed_labels"]] == [scene.name]


def test_writer_killed_inside_a_catalog_transaction(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """A GDAL write killed mid-transaction leaves a hot journal that read-only GDAL cannot open; opening the
    bundle rolls it back."""
    import signal
    import subprocess
    import sys
    import time

    index = tmp_path / "idx"
    assert run("tile", str(make_geotiff("a.tif", seed=1)), "--index", str(index)).exit_code == 0
    code = (
        "import geopandas as gpd, numpy as np, pyogrio, shapely\n"
        "n = 400_000\n"
        "df = gpd.GeoDataFrame({'tile_id': np.arange(n), 'scene_id': ['orphan'] * n}, crs='EPSG:4326',\n"
        "                      geometry=shapely.box(np.zeros(n), np.zeros(n), np.ones(n), np.ones(n)))\n"
        "print('writing', flush=True)\n"
        f"pyogrio.write_dataframe(df, {str(index / 'catalog.gpkg')!r}, layer='tiles', append=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    # Kill it once the transaction is open (its journal exists), however long the writer takes to get there.
    journal, deadline = index / "catalog.gpkg-journal", time.monotonic() + 60
    while not journal.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert journal.exists(), "the writer finished (or never began) its transaction before it could be killed"
    bundle = Bundle.open(index)
    tiles = bundle.tiles()
    assert len(tiles) == 4 and set(tiles.scene_id) != {"orphan"}  # the half-done append was rolled back
    assert run("tile", str(make_geotiff("b.tif", seed=2)), "--index", str(index)).exit_code == 0
    assert len(Bundle.open(index).tiles()) == 8


def test_a_rerun_finishes_an_interrupted_replacement_and_names_other_bands(
    make_geotiff: MakeGeoTiff, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import geoir.tiling.run as tiling_run

    x, index = tmp_path / "x.tif", tmp_path / "idx"
    shutil.copy(make_geotiff("a.tif", seed=1), x)
    assert run("tile", str(x), "--index", str(index)).exit_code == 0
    old = Bundle.open(index).scene_ids()
    shutil.copy(make_geotiff("b.tif", seed=2), x)
    # A run killed after committing the changed file, before removing its old scene: both are there.
    with monkeypatch.context() as m:
        m.setattr(tiling_run, "_remove_earlier_versions", lambda *a: None)
        assert run("tile", str(x), "--index", str(index)).exit_code == 0
    assert len(Bundle.open(index).scene_ids()) == 2
    r = run("tile", str(x), "--index", str(index))
    assert r.exit_code == 0 and "changed since it was indexed" in r.output
    assert Bundle.open(index).scene_ids().isdisjoint(old) and len(Bundle.open(index).scene_ids()) == 1
    # Asked for other bands, a scene already there is skipped, and the message says how to re-tile it.
    r = run("tile", str(x), "--index", str(index), "--bands", "3,2,1")
    assert r.exit_code == 0, r.output
    assert "with --bands 1,2,3" in r.output and f"geoir remove x.tif --index {index}" in r.output


def test_a_moved_scene_is_followed_by_a_rerun(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    import shutil

    (tmp_path / "m1").mkdir()
    shutil.copy(make_geotiff("a.tif"), tmp_path / "m1" / "s.tif")
    index = tmp_path / "idx"
    assert run("tile", str(tmp_path / "m1" / "s.tif"), "--index", str(index)).exit_code == 0
    (tmp_path / "m1").rename(tmp_path / "m2")
    moved = tmp_path / "m2" / "s.tif"
    r = CliRunner().invoke(cli, ["-q", "encode", "--index", str(index), "--backbone", "test", "--workers", "0"])
    assert r.exit_code == 1 and "moved" in r.output
    r = CliRunner().invoke(cli, ["tile", str(moved), "--index", str(index), "--no-encode"])
    assert r.exit_code == 0 and "its path is updated" in r.output, r.output
    (record,) = Bundle.open(index).scene_records()
    assert record["path"] == str(moved) and record["n_tiles"] == 4
    r = CliRunner().invoke(cli, ["-q", "encode", "--index", str(index), "--backbone", "test", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert len(Bundle.open(index).encoded_scene_ids()) == 1


def test_a_scene_kept_as_tiled_says_which_options_it_keeps(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """A re-run asking for other --nodata/--bands keeps the scene as it was tiled, and says how in the options'
    own words ('no --nodata', not Python's None)."""
    scene = make_geotiff(shape=(3, 300, 300))
    index = tmp_path / "idx"
    assert run("tile", str(scene), "--index", str(index)).exit_code == 0
    r = CliRunner().invoke(cli, ["tile", str(scene), "--index", str(index), "--nodata", "0", "--no-encode"])
    assert r.exit_code == 0, r.output
    assert f"was tiled into {index} with no --nodata; it is kept so: `geoir remove {scene.name}" in r.output
    assert "to use --nodata 0\n" in r.output and "None" not in r.output


def test_a_folder_says_which_images_it_leaves_out(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """A folder is searched for rasters by suffix; the PNG and JPEG beside them used to be skipped without a word."""
    folder = tmp_path / "scenes"
    (folder / "sub").mkdir(parents=True)
    scene = make_geotiff(shape=(3, 300, 300))
    scene.rename(folder / "a.tif")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "quicklook.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "sub" / "photo.JPG")
    (folder / "a.tif.aux.xml").write_text("<PAMDataset/>")
    r = CliRunner().invoke(cli, ["tile", str(folder), "--index", str(tmp_path / "idx"), "--no-encode"])
    assert r.exit_code == 0, r.output
    assert f"{folder}: 2 image(s) (.jpg, .png) left out: a folder is searched for .tif, .tiff" in r.output
    assert "name such files to tile them" in r.output and "1 scene(s) added" in r.output
