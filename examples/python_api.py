"""geoir from Python: tile and encode a scene, then search it with a patch and with a tile id.

    $ python examples/python_api.py SCENE.tif [--index DIR]

Uses the shipped default model. The search results are GeoDataFrames in EPSG:4326.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import rasterio
from rasterio.windows import Window

import geoir
from geoir.io.scene import SceneReader, open_scene


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scene", type=Path)
    ap.add_argument("--index", default="api-demo-index")
    args = ap.parse_args()

    report = geoir.tile([args.scene], index=args.index)
    print(f"{report.tiles_added} tiles added")

    # A 256 px patch of the scene, scaled to 0-255 exactly as the tiler scales it.
    with rasterio.open(args.scene) as src:
        col, row = src.width // 3 + 17, src.height // 3 + 29
    patch, _ = SceneReader(open_scene(args.scene)).read(Window(col, row, 256, 256))
    hits = geoir.search(patch, index=args.index, k=5).hits
    print(hits[["rank", "score", "tile_id", "col_off", "row_off"]].to_string(index=False))

    # The best hit's tile as a new query: tiles that look like it, the tile itself (and any tile overlapping
    # it) excluded; include_query_overlap=True keeps them.
    again = geoir.search(int(hits.tile_id.iloc[0]), index=args.index, k=5)
    print(again.hits[["rank", "score", "tile_id"]].to_string(index=False))
    if again.left_out:
        print(f"({again.left_out} tile(s) of the query's own place would have ranked among these and were left out)")
    if again.hits.empty:
        print(f"no other tile: {args.index} holds only the query's own place; tile a larger scene or more scenes")


if __name__ == "__main__":
    main()
