"""Shared fixtures: generated rasters with real CRSs, the shared real data, QGIS probing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED_DATA = HERE.parent.parent / "shared" / "data"
SCENES = SHARED_DATA / "scenes"
UCMERCED = SHARED_DATA / "ucmerced"
QGIS_PYTHON = "/usr/bin/python3"


def needs_shared_data(sub: str = "") -> pytest.MarkDecorator:
    """Skip unless ../shared/data (or a sub-folder) is present beside the checkout."""
    path = SHARED_DATA / sub
    return pytest.mark.skipif(not path.exists(), reason=f"real data not found at {path} (../shared/data is absent)")


def needs_repo_file(*names: str) -> pytest.MarkDecorator:
    """Skip unless the repository files a test reads are beside it (tests copied out of a checkout or sdist)."""
    missing = [n for n in names if not (REPO / n).exists()]
    return pytest.mark.skipif(
        bool(missing), reason=f"needs {', '.join(missing)} from a geoir checkout or sdist (not found under {REPO})"
    )


@contextlib.contextmanager
def editing_catalog(index: Path) -> Iterator[sqlite3.Connection]:
    """A connection to a bundle's catalog.gpkg for a test to damage it by hand, committed on leaving.

    GDAL's R-tree triggers call its SQL functions, which plain sqlite3 lacks: stand-ins for such edits.
    """
    with contextlib.closing(sqlite3.connect(index / "catalog.gpkg")) as con, con:
        con.create_function("ST_IsEmpty", 1, lambda _g: 1)
        for f in ("ST_MinX", "ST_MaxX", "ST_MinY", "ST_MaxY"):
            con.create_function(f, 1, lambda _g: 0.0)
        yield con


def scenes_manifest() -> list[dict]:
    return json.loads((SCENES / "scenes_manifest.json").read_text()) if SCENES.exists() else []


MakeGeoTiff = Callable[..., Path]


@pytest.fixture
def make_geotiff(tmp_path: Path) -> MakeGeoTiff:
    """Write a seeded random GeoTIFF and return its path.

    Args (keyword): name, crs (None for no CRS), bounds (left, bottom, right, top) or transform,
    shape (bands, rows, cols), dtype, nodata, nodata_block (fill the top-left quarter with nodata),
    mask_block (an internal mask hiding the top-left quarter), colorinterp, seed, tiled.
    """

    def make(
        name: str = "scene.tif",
        crs: str | None = "EPSG:32618",
        bounds: tuple[float, float, float, float] = (500_000.0, 4_000_000.0, 505_120.0, 4_005_120.0),
        transform: Affine | None = None,
        shape: tuple[int, int, int] = (3, 512, 512),
        dtype: str = "uint8",
        nodata: float | None = None,
        nodata_block: bool = False,
        mask_block: bool = False,
        colorinterp: list | None = None,
        seed: int = 0,
        tiled: bool = True,
    ) -> Path:
        bands, rows, cols = shape
        if transform is None:
            left, bottom, right, top = bounds
            transform = Affine((right - left) / cols, 0, left, 0, -(top - bottom) / rows, top)
        rng = np.random.default_rng(seed)
        if np.issubdtype(np.dtype(dtype), np.integer):
            hi = min(np.iinfo(dtype).max, 10_000)
            lo = 1 if nodata == 0 else 0
            data = rng.integers(lo, hi, size=shape).astype(dtype)
        else:
            data = rng.random(shape).astype(dtype)
        if nodata_block:
            assert nodata is not None
            data[:, : rows // 2, : cols // 2] = nodata
        path = tmp_path / name
        profile = dict(
            driver="GTiff", width=cols, height=rows, count=bands, dtype=dtype, transform=transform, nodata=nodata
        )
        if crs is not None:
            profile["crs"] = CRS.from_user_input(crs)
        if tiled and rows >= 256 and cols >= 256:
            profile.update(tiled=True, blockxsize=256, blockysize=256)
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
            if colorinterp is not None:
                dst.colorinterp = colorinterp
            if mask_block:
                m = np.full((rows, cols), 255, np.uint8)
                m[: rows // 2, : cols // 2] = 0
                dst.write_mask(m)
        return path

    return make


def truncated(make_geotiff: MakeGeoTiff, tmp_path: Path, name: str = "cut.tif") -> Path:
    """A GeoTIFF whose header is whole but whose pixel data stop half-way (an interrupted copy): its first
    256-px row of tiles reads, the second does not."""
    full = make_geotiff(f"full-{name}", shape=(3, 512, 512), tiled=False)
    data = full.read_bytes()
    full.unlink()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) * 7 // 10])
    return cut


def qgis_available() -> bool:
    if not Path(QGIS_PYTHON).exists():
        return False
    r = subprocess.run([QGIS_PYTHON, "-c", "import qgis.core"], capture_output=True)
    return r.returncode == 0


needs_qgis = pytest.mark.skipif(
    not qgis_available(),
    reason="QGIS python bindings not found under /usr/bin/python3 (apt-get install python3-qgis qgis-providers)",
)


def qgis_probe(gpkg: Path, *layers: str, labels: bool = False) -> dict:
    """Open layers of a GeoPackage in real QGIS (headless) and return what it reports (tests/qgis_probe.py);
    with ``labels``, also draw them and report the labels QGIS placed.

    QGIS runs with its own TMPDIR and XDG_RUNTIME_DIR, removed afterwards: Qt leaves
    ``qt_temp-*`` folders behind in whatever temporary folder it is given.
    """
    with tempfile.TemporaryDirectory(prefix="geoir-qgis-") as scratch:
        runtime = Path(scratch) / "runtime"
        runtime.mkdir(mode=0o700)
        env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(runtime), "TMPDIR": scratch}
        env.pop("PYTHONPATH", None)
        r = subprocess.run(
            [QGIS_PYTHON, str(HERE / "qgis_probe.py"), str(gpkg), *layers, *(["--labels"] if labels else [])],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def copy_scene(tmp_path: Path) -> Callable[[str], Path]:
    """Copy a shared real scene into tmp_path (for tests that must modify or move it)."""

    def copy(name: str) -> Path:
        dst = tmp_path / Path(name).name
        shutil.copy(SCENES / name, dst)
        return dst

    return copy


@contextlib.contextmanager
def geoir_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture geoir's warnings in ``caplog`` in this block: its logger stops propagation once a command of
    another test has run, so pytest's own capture misses them."""
    import logging

    caplog.set_level("WARNING", logger="geoir")
    logger = logging.getLogger("geoir")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
