"""Every real scene in ../shared/data/scenes tiles correctly and lands where its manifest says."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from click.testing import CliRunner
from rasterio.windows import Window

from geoir.cli import cli
from geoir.index.bundle import Bundle
from geoir.io.scene import Scene, SceneReader, open_scene
from geoir.tiling.grid import tile_count
from geoir.tiling.tiler import TileSource
from tests.conftest import SCENES, needs_shared_data, scenes_manifest

pytestmark = needs_shared_data("scenes")

MANIFEST = {m["file"]: m for m in scenes_manifest()}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    index = tmp_path_factory.mktemp("real") / "idx"
    files = [str(SCENES / f) for f in MANIFEST if not f.startswith("landsat8")]
    r = CliRunner().invoke(cli, ["-q", "tile", *files, "--index", str(index), "--no-encode"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    # Landsat-8 declares no nodata although 0 is fill: the user says so with --nodata 0.
    r = CliRunner().invoke(
        cli,
        [
            "-q",
            "tile",
            str(SCENES / "landsat8_LC08_L1TP_224078_20200518_30m_B2B3B4.tif"),
            "--nodata",
            "0",
            "--index",
            str(index),
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    return Bundle.open(index)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_scene_lands_where_manifest_says(bundle: Bundle, name: str) -> None:
    m = MANIFEST[name]
    records = {Path(r["path"]).name: r for r in bundle.scene_records()}
    rec = records[Path(name).name]
    scenes = bundle.scenes()
    row = scenes[scenes.scene_id == rec["id"]].iloc[0]
    assert row.crs == m["crs"]
    assert (rec["width"], rec["height"], rec["dtype"]) == (m["width"], m["height"], m["dtype"])
    assert row.geometry.bounds == pytest.approx(m["lonlat_bounds"], abs=2e-5)
    tiles = bundle.tiles(scene_id=rec["id"])
    # Every grid tile is either kept or skipped for nodata; none is invented or lost.
    source = TileSource(Scene.from_record(rec), bundle.params)
    skipped = sum(1 for i in range(len(source)) if not source.keep(source[i][1]))
    assert len(tiles) == rec["n_tiles"] > 0
    assert rec["n_tiles"] + skipped == tile_count(m["width"], m["height"], 256, 256)
    west, south, east, north = m["lonlat_bounds"]
    assert shapely.box(west - 1e-4, south - 1e-4, east + 1e-4, north + 1e-4).contains(
        shapely.union_all(tiles.geometry.values)
    )
    assert (tiles.nodata_fraction <= 0.5).all()


def test_landsat8_fill_tiles_skipped(bundle: Bundle) -> None:
    rec = next(r for r in bundle.scene_records() if "landsat8" in r["path"])
    assert rec["nodata"] == 0 and rec["n_tiles"] < tile_count(2041, 1860, 256, 256)


def test_sentinel2_uint16_four_bands_scaled() -> None:
    scene = open_scene(SCENES / "sentinel2_L1C_utm18n_10m_B4B3B2B8.tif")
    assert scene.bands == (1, 2, 3) and scene.dtype == "uint16" and scene.count == 4
    assert scene.scaling.low is not None
    rgb, valid = SceneReader(scene).read(Window(512, 512, 256, 256))
    assert rgb.dtype == np.uint8 and valid.all()
    # A real stretch uses the range: neither black nor saturated.
    assert 30 < rgb.mean() < 220 and rgb.std() > 10


def test_naip_same_footprint_every_year(bundle: Bundle) -> None:
    scenes = bundle.scenes()
    naip = scenes[scenes.path.str.contains("naip_timeseries")]
    assert len(naip) == 6
    first = naip.geometry.iloc[0]
    for g in naip.geometry:
        assert first.intersection(g).area / first.union(g).area > 0.99


def test_catalog_reads_with_geopandas(bundle: Bundle) -> None:
    tiles = gpd.read_file(bundle.catalog_path, layer="tiles")
    assert tiles.crs.to_epsg() == 4326 and tiles.tile_id.is_unique
    assert len(tiles) == bundle.manifest["counts"]["tiles"]
