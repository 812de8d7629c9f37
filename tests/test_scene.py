"""Scene I/O: validation, band choice, scaling, masks, window reads."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.windows import Window

from geoir.errors import SceneError
from geoir.io.scene import SceneReader, expand_inputs, open_scene
from tests.conftest import MakeGeoTiff


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SceneError, match="no such file"):
        open_scene(tmp_path / "nope.tif")


def test_not_a_raster(tmp_path: Path) -> None:
    p = tmp_path / "notes.tif"
    p.write_text("this is not a raster")
    with pytest.raises(SceneError, match="not a raster"):
        open_scene(p)


def test_no_crs(make_geotiff: MakeGeoTiff) -> None:
    with pytest.raises(SceneError, match="has no CRS"):
        open_scene(make_geotiff(crs=None))


def test_band_out_of_range(make_geotiff: MakeGeoTiff) -> None:
    with pytest.raises(SceneError, match="band 5 is out of range"):
        open_scene(make_geotiff(), bands=(1, 2, 5))


def test_default_bands_by_colour_interpretation(make_geotiff: MakeGeoTiff) -> None:
    ci = [ColorInterp.undefined, ColorInterp.blue, ColorInterp.green, ColorInterp.red]
    scene = open_scene(make_geotiff(shape=(4, 64, 64), colorinterp=ci))
    assert scene.bands == (4, 3, 2)


def test_default_bands_first_three_and_repeat(make_geotiff: MakeGeoTiff) -> None:
    ci4 = [ColorInterp.gray, ColorInterp.undefined, ColorInterp.undefined, ColorInterp.undefined]
    assert open_scene(make_geotiff("a.tif", shape=(4, 64, 64), colorinterp=ci4)).bands == (1, 2, 3)
    assert open_scene(make_geotiff("b.tif", shape=(1, 64, 64))).bands == (1, 1, 1)
    assert open_scene(make_geotiff("c.tif", shape=(4, 64, 64)), bands=(2,)).bands == (2, 2, 2)


def test_uint16_scaled_with_percentiles(make_geotiff: MakeGeoTiff) -> None:
    scene = open_scene(make_geotiff(dtype="uint16", shape=(3, 300, 300)))
    assert scene.scaling.low is not None and scene.scaling.high is not None
    # Uniform 0..10000: the 2nd/98th percentiles sit near 200 and 9800.
    assert all(150 < lo < 250 for lo in scene.scaling.low)
    assert all(9750 < hi < 9850 for hi in scene.scaling.high)
    rgb, valid = SceneReader(scene).read(Window(0, 0, 256, 256))
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 256, 256) and valid.all()
    assert rgb.min() == 0 and rgb.max() == 255


def test_float_and_int16(make_geotiff: MakeGeoTiff) -> None:
    for dtype in ("float32", "int16"):
        scene = open_scene(make_geotiff(f"{dtype}.tif", dtype=dtype, shape=(3, 64, 64)))
        rgb, _ = SceneReader(scene).read(Window(0, 0, 64, 64))
        assert rgb.dtype == np.uint8 and 0 < rgb.mean() < 255


def test_nodata_block_masked(make_geotiff: MakeGeoTiff) -> None:
    scene = open_scene(make_geotiff(dtype="uint16", nodata=0, nodata_block=True))
    assert scene.mask_kind == "nodata"
    rgb, valid = SceneReader(scene).read(Window(0, 0, 256, 256))
    assert not valid.any() and (rgb == 0).all()
    _, valid = SceneReader(scene).read(Window(256, 256, 256, 256))
    assert valid.all()
    # Statistics ignore nodata: the low percentile is not dragged to 0.
    assert min(scene.scaling.low) > 100


def test_undeclared_zero_fill_is_named_with_both_fixes(
    make_geotiff: MakeGeoTiff, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning named only `--nodata 0`, an option of `geoir tile` that a GeoTIFF query has no way to pass."""
    path = make_geotiff("fill.tif", dtype="uint16")
    with rasterio.open(path, "r+") as dst:
        data = dst.read()
        data[:, :128, :] = 0
        dst.write(data)
    with caplog.at_level(logging.WARNING, logger="geoir"):
        open_scene(path)
    assert "25% of pixels are 0" in caplog.text
    assert "geoir tile --nodata 0" in caplog.text and "rio edit-info --nodata 0 fill.tif" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="geoir"):
        open_scene(path, nodata=0)  # declared: nothing to say
    assert caplog.text == ""
    # Fill at the top of the data type, or a negative one, is named as well.
    for dtype, fill in (("uint16", 65535), ("int16", -9999), ("float32", -9999.0)):
        caplog.clear()
        other = make_geotiff(f"fill_{dtype}.tif", dtype=dtype)
        with rasterio.open(other, "r+") as dst:
            data = dst.read()
            data[:, :, :64] = fill
            dst.write(data)
        with caplog.at_level(logging.WARNING, logger="geoir"):
            open_scene(other)
        assert f"12% of pixels are {fill:g} in every band" in caplog.text
        assert f"rio edit-info --nodata {fill:g} fill_{dtype}.tif" in caplog.text


def test_a_run_says_when_the_files_do_not_name_their_colours(
    make_geotiff: MakeGeoTiff, caplog: pytest.LogCaptureFixture
) -> None:
    """A Landsat stack of B2,B3,B4 read as red, green, blue gives tiles as far from the true-colour ones as a
    neighbouring tile is: bands taken in file order, without colour interpretation, are named, once a run."""
    from geoir.tiling.run import prepare_scenes

    gray = [ColorInterp.gray, ColorInterp.undefined, ColorInterp.undefined]
    b, c = (make_geotiff(f"{n}.tif", dtype="uint16", colorinterp=gray, seed=i) for i, n in enumerate("bc"))
    rgb = make_geotiff("rgb.tif", dtype="uint16", colorinterp=[ColorInterp.red, ColorInterp.green, ColorInterp.blue])
    one = make_geotiff("one.tif", dtype="uint16", shape=(1, 512, 512), colorinterp=[ColorInterp.gray])
    with caplog.at_level(logging.WARNING, logger="geoir"):
        prepare_scenes([str(b), str(c), str(rgb), str(one)])
    (said,) = [r.getMessage() for r in caplog.records if "colour" in r.getMessage()]
    assert said.startswith(f"{b} and 1 other scene(s): the bands do not say which colour they are, so bands 1,2,3")
    assert "--bands 3,2,1" in said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="geoir"):
        prepare_scenes([str(rgb), str(one)])  # colours named, or one gray band
        prepare_scenes([str(b)], bands=(3, 2, 1))  # chosen
    assert "colour" not in caplog.text


def _write(path: Path, data: np.ndarray, **profile: object) -> Path:
    """A small GeoTIFF in UTM 18N (10 m pixels) with ``data`` (bands, rows, cols) and extra profile keys."""
    kw: dict = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0])
    kw.update(dtype=data.dtype, crs="EPSG:32618", transform=Affine(10, 0, 500_000, 0, -10, 4_200_000))
    kw.update(profile)
    with rasterio.open(path, "w", **kw) as dst:
        dst.write(data)
    return path


@pytest.mark.parametrize("nodata", [float("nan"), None])
def test_nan_pixels_are_invalid_and_left_out_of_the_stretch(tmp_path: Path, nodata: float | None) -> None:
    # Band values 100..1000; the left half is NaN in every band (declared as nodata, or not), and band 1
    # is NaN in the top rows of the right half too, where bands 2 and 3 are valid.
    data = np.random.default_rng(0).uniform(100, 1000, (3, 128, 128)).astype(np.float32)
    data[:, :, :64] = np.nan
    data[0, :16, 64:] = np.nan
    scene = open_scene(_write(tmp_path / "f.tif", data, nodata=nodata))
    assert scene.mask_kind == "nan" and scene.scaling.low is not None and scene.scaling.high is not None
    assert all(100 <= lo < 150 for lo in scene.scaling.low) and all(950 < hi <= 1000 for hi in scene.scaling.high)
    rgb, valid = SceneReader(scene).read(Window(0, 0, 128, 128))
    assert not valid[:, :64].any() and valid[:, 64:].all()
    assert (rgb[:, :, :64] == 0).all() and 60 < rgb[:, 16:, 64:].mean() < 200
    assert (rgb[0, :16, 64:] == 0).all() and rgb[1:, :16, 64:].mean() > 60


def test_alpha_is_a_mask_not_a_colour(tmp_path: Path) -> None:
    gray = np.full((64, 64), 100, np.uint8)
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :32] = 0
    path = _write(tmp_path / "la.tif", np.stack([gray, alpha]), photometric="MINISBLACK", alpha="UNASSOCIATED")
    with rasterio.open(path, "r+") as ds:
        ds.colorinterp = [ColorInterp.gray, ColorInterp.alpha]
    scene = open_scene(path)
    assert scene.bands == (1, 1, 1) and scene.mask_kind == "mask"
    rgb, valid = SceneReader(scene).read(Window(0, 0, 64, 64))
    assert valid.mean() == 0.5 and (rgb[:, :, 32:] == 100).all() and (rgb[:, :, :32] == 0).all()


def test_unplaceable_rasters_are_refused_with_their_fix(tmp_path: Path) -> None:
    data = np.zeros((1, 32, 32), np.uint8)
    palette = _write(tmp_path / "pal.tif", data, photometric="PALETTE")
    with rasterio.open(palette, "r+") as ds:
        ds.write_colormap(1, {0: (255, 0, 0, 255), 1: (0, 0, 255, 255)})
    with pytest.raises(SceneError, match=r"palette .*gdal_translate -expand rgb pal.tif pal_rgb.tif"):
        open_scene(palette)
    local = _write(tmp_path / "local.tif", data, crs='LOCAL_CS["arbitrary",UNIT["metre",1]]')
    with pytest.raises(SceneError, match=r"local CRS with no place on Earth.*gdal_edit.py -a_srs EPSG:XXXX local.tif"):
        open_scene(local)
    gcp = tmp_path / "gcp.tif"
    gcps = [GroundControlPoint(r, c, 500_000 + 10 * c, 4_200_000 - 10 * r) for r, c in ((0, 0), (0, 31), (31, 0))]
    with rasterio.open(gcp, "w", driver="GTiff", width=32, height=32, count=1, dtype="uint8") as dst:
        dst.write(data)
        dst.gcps = (gcps, CRS.from_epsg(32618))
    with pytest.raises(SceneError, match=r"ground control points only.*gdalwarp -t_srs EPSG:XXXX gcp.tif"):
        open_scene(gcp)
    # Corner coordinates (the no-CRS advice) would place a sensor-geometry image on a wrong grid.
    from rasterio.rpc import RPC

    rpc = tmp_path / "rpc.tif"
    coeffs = [0.0] * 20
    with rasterio.open(rpc, "w", driver="GTiff", width=32, height=32, count=1, dtype="uint8") as dst:
        dst.write(data)
        dst.rpcs = RPC(
            height_off=0,
            height_scale=100,
            lat_off=40,
            lat_scale=0.1,
            line_den_coeff=[1.0, *coeffs[1:]],
            line_num_coeff=coeffs,
            line_off=16,
            line_scale=16,
            long_off=-75,
            long_scale=0.1,
            samp_den_coeff=[1.0, *coeffs[1:]],
            samp_num_coeff=coeffs,
            samp_off=16,
            samp_scale=16,
        )
    with pytest.raises(
        SceneError, match=r"sensor geometry, placed by RPCs only.*gdalwarp -rpc -t_srs EPSG:XXXX rpc.tif"
    ):
        open_scene(rpc)


def test_internal_mask_honoured(make_geotiff: MakeGeoTiff) -> None:
    scene = open_scene(make_geotiff(mask_block=True))
    assert scene.mask_kind == "mask"
    _, valid = SceneReader(scene).read(Window(128, 128, 256, 256))
    assert valid.mean() == pytest.approx(0.75)


def test_small_scene_gives_padded_read(make_geotiff: MakeGeoTiff) -> None:
    scene = open_scene(make_geotiff(shape=(3, 100, 150)))
    rgb, valid = SceneReader(scene).read(Window(0, 0, 256, 256))
    assert rgb.shape == (3, 256, 256)
    assert valid.sum() == 100 * 150
    assert valid[:100, :150].all() and not valid[100:, :].any() and not valid[:, 150:].any()


@pytest.mark.parametrize("turn", [0.0, 20.0, -35.0])
@pytest.mark.parametrize("mask", [False, True])
def test_edge_tiles_of_a_rotated_scene_hold_its_own_pixels(make_geotiff: MakeGeoTiff, turn: float, mask: bool) -> None:
    """rasterio's boundless read (a warped VRT) misplaced the pixels of windows past the edge of a rotated or
    sheared raster: a tile's content came from ground beside its footprint, and its valid mask was wrong."""
    transform = Affine.translation(500_000, 4_100_000) * Affine.rotation(turn) * Affine.scale(1.0, -1.0)
    scene = open_scene(make_geotiff(shape=(3, 200, 900), transform=transform, mask_block=mask))
    assert scene.mask_kind == ("mask" if mask else "none")
    reader = SceneReader(scene)
    with rasterio.open(scene.path) as src:
        pixels = src.read()
        inside_valid = src.read_masks(1) > 0
    for col in (0, 256, 644):
        rgb, valid = reader.read(Window(col, 0, 256, 256))
        w = min(256, 900 - col)
        assert not valid[200:].any() and not valid[:, w:].any()
        assert np.array_equal(valid[:200, :w], inside_valid[:, col : col + w])
        expect = np.where(inside_valid[:, col : col + w], pixels[:, :, col : col + w], 0)
        assert np.array_equal(rgb[:, :200, :w], expect)


def test_gsd_resampling(make_geotiff: MakeGeoTiff) -> None:
    # 512 px at 10 m; at a 20 m target the grid is 256 px and a tile covers the whole scene.
    scene = open_scene(make_geotiff())
    assert scene.native_gsd == pytest.approx(10.0)
    transform, w, h = scene.grid(20.0)
    assert (w, h) == (256, 256) and transform.a == pytest.approx(20.0)
    rgb, valid = SceneReader(scene, gsd=20.0).read(Window(0, 0, 256, 256))
    assert rgb.shape == (3, 256, 256) and valid.all()
    with rasterio.open(scene.path) as src:
        full = src.read(out_shape=(3, 256, 256), resampling=rasterio.enums.Resampling.bilinear)
    assert np.abs(rgb.astype(int) - full.astype(int)).mean() < 1.0


def test_geographic_gsd(make_geotiff: MakeGeoTiff) -> None:
    scene = open_scene(make_geotiff(crs="EPSG:4326", bounds=(10.0, 0.0, 10.0512, 0.0512)))
    # 0.0001 degree at the equator is about 11.1 m.
    assert scene.native_gsd == pytest.approx(11.13, rel=0.01)


def test_fingerprint_follows_content(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    a = open_scene(make_geotiff("a.tif", seed=1))
    b = open_scene(make_geotiff("b.tif", seed=1))
    c = open_scene(make_geotiff("c.tif", seed=2))
    assert a.id == b.id and a.id != c.id


def test_fingerprint_of_a_vrt_follows_its_sources(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """Only the VRT's XML was hashed: new pixels in a source left the mosaic "already in" its bundle."""
    import hashlib

    from rasterio.shutil import copy as rio_copy

    from geoir.io.scene import content_fingerprint

    tif = make_geotiff("src.tif", seed=1)
    vrt = tmp_path / "mosaic.vrt"
    rio_copy(tif, vrt, driver="VRT")
    (tmp_path / "src.tif.aux.xml").write_text("<PAMDataset/>")  # statistics QGIS may write: not content
    before = open_scene(vrt)
    assert before.fingerprint == content_fingerprint(vrt)  # from the open dataset, or from the path
    with rasterio.open(tif, "r+") as dst:
        dst.write(np.zeros((3, 512, 512), np.uint8) + 7)
    assert open_scene(vrt).id != before.id
    # A file that is the whole dataset keeps the fingerprint of earlier geoir versions (its bundles stay valid).
    size = tif.stat().st_size
    old = hashlib.sha256(f"geoir-fp-v1:{size}:".encode() + tif.read_bytes()).hexdigest()
    assert content_fingerprint(tif) == old and size <= 3 << 20


def test_record_round_trip(make_geotiff: MakeGeoTiff) -> None:
    from geoir.io.scene import Scene

    t = Affine.translation(500_000, 4_000_000) @ Affine.rotation(20) @ Affine.scale(10, -10)
    scene = open_scene(make_geotiff(transform=t, dtype="uint16"))
    again = Scene.from_record(scene.to_record())
    assert again == scene


def test_expand_inputs(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    a = make_geotiff("a.tif")
    b = make_geotiff("b.tif")
    (tmp_path / "readme.txt").write_text("x")
    assert [p.name for p in expand_inputs([str(tmp_path)])] == ["a.tif", "b.tif"]
    assert [p.name for p in expand_inputs([str(tmp_path / "*.tif"), str(a)])] == ["a.tif", "b.tif"]
    assert expand_inputs([str(b)]) == [b]
    with pytest.raises(SceneError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.jp2")])
    with pytest.raises(SceneError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.tif")])
    # A folder leaves out hidden files and folders (a killed run's temp chips) and the folders excluded
    # (chips written inside it).
    (tmp_path / "chips").mkdir()
    (tmp_path / ".cache").mkdir()
    for hidden in (".chip.x1.tif", "chips/a_0_0.tif", ".cache/c.tif"):
        (tmp_path / hidden).write_bytes(a.read_bytes())
    assert [p.name for p in expand_inputs([str(tmp_path)])] == ["a.tif", "b.tif", "a_0_0.tif"]
    assert [p.name for p in expand_inputs([str(tmp_path)], exclude=[tmp_path / "chips"])] == ["a.tif", "b.tif"]


def test_block_cache_holds_a_row_of_tiles(make_geotiff: MakeGeoTiff, monkeypatch: pytest.MonkeyPatch) -> None:
    from rasterio.env import get_gdal_config, set_gdal_config

    import geoir.io.scene as scene_module
    from geoir.io.scene import BLOCK_CACHE_MARGIN, block_cache_bytes, fit_block_cache

    path = make_geotiff(shape=(3, 1024, 1000))  # 256 px blocks: 4 across
    with rasterio.open(path) as src:
        # A 256 px row of tiles may straddle two rows of blocks; 3 bytes a pixel.
        assert block_cache_bytes(src, 256) == 4 * 2 * 256 * 256 * 3
        assert block_cache_bytes(src, 300, mask=True) == 4 * 3 * 256 * 256 * 4
        before = get_gdal_config("GDAL_CACHEMAX")
        try:
            monkeypatch.setattr(scene_module, "_cache_ceiling", None)
            monkeypatch.setattr(scene_module, "_cache_set", 0)
            monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
            # The library leaves GDAL's own setting alone (5 % of the memory, which holds a row here).
            assert fit_block_cache(src, 256)
            assert get_gdal_config("GDAL_CACHEMAX") == before
            monkeypatch.setenv("GDAL_CACHEMAX", "64")
            set_gdal_config("GDAL_CACHEMAX", 64 << 20)
            fit_block_cache(src, 512)
            wide = block_cache_bytes(src, 512) + BLOCK_CACHE_MARGIN
            assert get_gdal_config("GDAL_CACHEMAX") == wide < 64 << 20
            fit_block_cache(src, 256)  # a scene that needs less does not shrink it under another reader
            assert get_gdal_config("GDAL_CACHEMAX") == wide
            assert not fit_block_cache(src, 256 * 100)  # never above the ceiling seen first: it cannot hold that
            assert get_gdal_config("GDAL_CACHEMAX") == 64 << 20
        finally:
            set_gdal_config("GDAL_CACHEMAX", before)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dtype": "uint8"},
        {"dtype": "uint16", "nodata": 0, "nodata_block": True},
        {"dtype": "float32"},
        {"dtype": "uint8", "mask_block": True},
        {"dtype": "uint8", "shape": (3, 100, 150)},  # padded, boundless read
        {"dtype": "uint8", "nodata": 0, "override": 3},  # rasterio's fill rewrites pixels of valid tiles
    ],
)
def test_read_into_a_batch_slot_gives_the_same_tile(make_geotiff: MakeGeoTiff, kwargs: dict) -> None:
    from geoir.encoding.batches import iter_batches
    from geoir.tiling.grid import TilingParams
    from geoir.tiling.tiler import TileSource

    kwargs = dict(kwargs)
    override = kwargs.pop("override", None)
    path = make_geotiff(**kwargs)
    if override is not None:
        # Zeros in one band only: the file's nodata masks them, the --nodata override does not.
        with rasterio.open(path, "r+") as dst:
            band = dst.read(1)
            band[::7, ::5] = 0
            dst.write(band, 1)
    scene = open_scene(path, nodata=override)
    source = TileSource(scene, TilingParams(size=128, stride=100, max_nodata=1.0))
    reads = [source.read(i) for i in range(len(source))]
    out = np.full((3, 128, 128), 7, np.uint8)
    for i, r in enumerate(reads):
        again = source.read(i, out=out)
        assert again.rgb is out and np.array_equal(out, r.rgb)
        assert np.array_equal(again.valid, r.valid) and again.nodata_fraction == r.nodata_fraction
    batches = list(iter_batches(source, batch_size=3))
    assert np.array_equal(np.concatenate([b.rgb for b in batches]), np.stack([r.rgb for r in reads]))
    assert np.concatenate([b.nodata_fraction for b in batches]).tolist() == [r.nodata_fraction for r in reads]
    assert np.concatenate([b.indexes for b in batches]).tolist() == list(range(len(source)))


@pytest.mark.parametrize("dtype", ["uint16", "int16", "int8"])
def test_histogram_percentiles_equal_numpy(dtype: str) -> None:
    # The statistics of small-integer scenes come from a histogram; they must be numpy's figures, bit for bit.
    from geoir.io.scene import _int_percentiles

    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    for trial in range(600):
        n = int(rng.integers(1, 4000))
        kind = trial % 4
        if kind == 0:
            x = rng.integers(info.min, int(info.max) + 1, n)
        elif kind == 1:
            x = rng.integers(0, 5, n)  # nearly all ties
        elif kind == 2:
            x = np.clip(rng.normal(100, 40, n), info.min, info.max)
        else:
            x = np.full(n, rng.integers(info.min, int(info.max) + 1))
        x = x.astype(dtype)
        q = (2.0, 98.0) if trial % 3 else tuple(sorted(rng.uniform(0, 100, 2).tolist()))
        want = np.percentile(x.astype(np.float32), q)
        got = _int_percentiles(x, q)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (n, q, got, want)


@pytest.mark.parametrize("interleave", ["pixel", "band"])
@pytest.mark.parametrize("gsd", [None, 1.7])
def test_read_ahead_gives_the_same_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interleave: str, gsd: float | None
) -> None:
    """Decoding rows of blocks ahead in GDAL threads changes which calls decode a block, never a pixel."""
    from geoir.tiling.grid import TilingParams
    from geoir.tiling.tiler import TileSource

    rng = np.random.default_rng(3)
    data = rng.integers(0, 5000, (4, 1100, 1300)).astype("uint16")
    data[:, :300, :200] = 0
    path = tmp_path / f"{interleave}.tif"
    profile = dict(
        driver="GTiff", width=1300, height=1100, count=4, dtype="uint16", crs="EPSG:32618", nodata=0,
        transform=Affine(1.0, 0, 500_000, 0, -1.0, 4_100_000), tiled=True, blockxsize=256, blockysize=256,
        compress="deflate", interleave=interleave,
    )  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    scene = open_scene(path)
    params = TilingParams(size=256, max_nodata=1.0, gsd=gsd)
    reads = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("GEOIR_READ_THREADS", threads)
        source = TileSource(scene, params)
        reads[threads] = [source.read(i) for i in range(len(source))]
        reader = source.reader
        assert reader._ahead == (threads == "2")
        # Every row of blocks was read ahead, once, in tile order.
        assert reader._ahead_to == (1100 if threads == "2" else 0)
        source.close()
    for a, b in zip(reads["1"], reads["2"], strict=True):
        assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.valid, b.valid)
    assert any(not r.valid.all() for r in reads["2"])  # the nodata corner is masked either way


def test_read_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from geoir.io.scene import READ_THREADS_MAX, read_threads

    monkeypatch.delenv("GEOIR_READ_THREADS", raising=False)
    assert 1 <= read_threads() <= READ_THREADS_MAX
    monkeypatch.setenv("GEOIR_READ_THREADS", "3")
    assert read_threads() == 3
    monkeypatch.setenv("GEOIR_READ_THREADS", "many")
    with pytest.raises(SceneError, match="GEOIR_READ_THREADS='many' is not a whole number"):
        read_threads()
    monkeypatch.delenv("GEOIR_READ_THREADS")
    import torch.utils.data

    # In a DataLoader worker the workers are the parallelism: GDAL decodes in one thread.
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    assert read_threads() == 1


@pytest.mark.parametrize(("overviews", "side"), [([], 512), ([2, 4, 8], 500), ([2], 512)])
def test_statistics_read_uses_a_coarser_overview_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overviews: list[int], side: int
) -> None:
    """Asked for 1/3.9 of 2000 px, GDAL would decode the 2x overview; the 4x one (500 px) is read instead."""
    path = tmp_path / "ovr.tif"
    data = np.random.default_rng(0).integers(0, 4000, (3, 2000, 2000)).astype("uint16")
    profile = dict(
        driver="GTiff", width=2000, height=2000, count=3, dtype="uint16", crs="EPSG:32618",
        transform=Affine(1.0, 0, 500_000, 0, -1.0, 4_100_000), tiled=True, blockxsize=512, blockysize=512,
    )  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if overviews:
            dst.build_overviews(overviews, Resampling.nearest)
    shapes = []
    real_read = rasterio.io.DatasetReader.read

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        shapes.append(kwargs.get("out_shape"))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    scene = open_scene(path)
    assert shapes[0] == (3, side, side)
    # The sample is uniform on 0-3999: its 2/98 percentiles land within a few grey levels of 80 / 3920.
    assert scene.scaling.low is not None and scene.scaling.high is not None
    assert all(abs(lo - 80) < 40 for lo in scene.scaling.low)
    assert all(abs(hi - 3920) < 40 for hi in scene.scaling.high)


def test_plain_image_queries_in_palette_and_gray_alpha(tmp_path: Path) -> None:
    from PIL import Image as PILImage

    from geoir.io.images import read_image

    idx = np.zeros((40, 60), np.uint8)
    idx[:, 30:] = 1
    pal = PILImage.fromarray(idx, mode="P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    rgb = read_image(tmp_path / "pal.png").rgb
    assert rgb.shape == (3, 40, 60)
    assert (rgb[:, :, :30] == np.array([255, 0, 0])[:, None, None]).all()
    assert (rgb[:, :, 30:] == np.array([0, 0, 255])[:, None, None]).all()
    la = np.stack([np.full((40, 60), 90, np.uint8), np.full((40, 60), 255, np.uint8)], axis=-1)
    PILImage.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert (read_image(tmp_path / "la.png").rgb == 90).all()
