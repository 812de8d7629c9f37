"""Committing many encoded scenes: FAISS index updated and saved after every scene (before) vs once per run.

Each scene is committed as `geoir tile` commits it (vector file, catalog rows, index add) into a fresh
bundle, with random unit embeddings in place of a model's. "per scene" calls ``Bundle.flush_indexes``
after every commit, which puts the scene into the flat index and rewrites its file: what geoir did
before (a re-sort and a rewrite of the whole index per scene, quadratic in the run's tiles); "once per
run" lets scenes into the index in doubling batches and saves it when the run ends, as geoir now does.
Both run in the same process, one after the other, and must give identical search results.

    $ python benchmarks/index_commit.py [--scenes 24] [--tiles 1024] [--dim 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.crs import CRS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, table, write_section

from geoir.index.bundle import Bundle
from geoir.index.vectors import VectorIndex
from geoir.io.scene import Scene
from geoir.tiling.grid import TilingParams
from geoir.tiling.tiler import TileSource


def fake_scene(k: int, side_tiles: int) -> Scene:
    """A scene record (no file behind it) whose grid gives side_tiles x side_tiles tiles of 256 px."""
    fp = f"{k:016x}" + "0" * 48
    side = 256 * side_tiles
    return Scene(
        id=fp[:16],
        path=f"/nonexistent/scene_{k}.tif",
        fingerprint=fp,
        crs=CRS.from_epsg(32618),
        transform=Affine(1.0, 0, 500_000 + k * side, 0, -1.0, 4_200_000),
        width=side,
        height=side,
        count=3,
        dtype="uint8",
        nodata=None,
        bands=(1, 2, 3),
        native_gsd=1.0,
    )


def commit_run(root: Path, scenes: list[Scene], dim: int, per_scene_save: bool) -> dict:
    """Commit every scene into a new bundle; return timings and what the index saves wrote."""
    written = []
    real_save = VectorIndex.save

    def counting_save(self: VectorIndex, path: str) -> None:
        real_save(self, path)
        written.append(Path(path).stat().st_size)

    VectorIndex.save = counting_save  # type: ignore[method-assign]
    try:
        bundle = Bundle.open_or_create(root, TilingParams(max_nodata=1.0))
        rng = np.random.default_rng(0)
        commit = index_time = 0.0
        with bundle.lock():
            bundle.bind_model({"fingerprint": "bench", "name": "bench", "embedding_dim": dim, "bits": None})
            for scene in scenes:
                source = TileSource(scene, bundle.params)
                n = len(source)
                emb = rng.normal(size=(n, dim)).astype(np.float32)
                emb /= np.linalg.norm(emb, axis=1, keepdims=True)
                ids = np.array([t.id for t in source.tiles], np.int64)
                fps = source.footprints_lonlat(source.tiles)
                t0 = time.perf_counter()
                bundle.write_vectors(scene.id, ids, emb.astype(np.float16), emb, None)
                bundle.add_scene(
                    scene,
                    source.grid_transform,
                    (source.grid_width, source.grid_height),
                    source.scene_footprint_lonlat(),
                    source.tiles,
                    np.zeros(n),
                    fps,
                )
                t1 = time.perf_counter()
                bundle.add_to_indexes(ids, emb, None)
                if per_scene_save:
                    bundle.flush_indexes()
                t2 = time.perf_counter()
                commit += t2 - t0
                index_time += t2 - t1
            t0 = time.perf_counter()
        t1 = time.perf_counter()  # the lock's release saved what was left
        commit += t1 - t0
        index_time += t1 - t0
    finally:
        VectorIndex.save = real_save  # type: ignore[method-assign]
    index = Bundle.open(root).indexes()["float"]
    return {
        "commit s": commit,
        "index s": index_time,
        "index saves": len(written),
        "index MB written": sum(written) / 2**20,
        "_index": index,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=24)
    ap.add_argument("--tiles", type=int, default=1024, help="tiles per scene (rounded to a square grid)")
    ap.add_argument("--dim", type=int, default=256)
    args = ap.parse_args()
    side = max(1, round(args.tiles**0.5))
    scenes = [fake_scene(k, side) for k in range(args.scenes)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, per_scene in (("per scene (before)", True), ("once per run (now)", False)):
            res = commit_run(Path(tmp) / label.split()[0], scenes, args.dim, per_scene)
            rows.append({"index save": label, **res})
            print({k: v for k, v in rows[-1].items() if not k.startswith("_")}, flush=True)
    a, b = rows[0].pop("_index"), rows[1].pop("_index")
    queries = np.random.default_rng(1).normal(size=(200, args.dim)).astype(np.float32)
    same = all(np.array_equal(x, y) for x, y in zip(a.search(queries, 10), b.search(queries, 10), strict=True))
    tiles = args.scenes * side * side
    cols = ["index save", "commit s", "index s", "index saves", "index MB written"]
    md = "\n".join(
        [
            "## Committing encoded scenes: index saved per scene vs once per run",
            "",
            f"`python benchmarks/index_commit.py --scenes {args.scenes} --tiles {args.tiles} --dim {args.dim}` on "
            f"{machine()}.",
            f"{args.scenes} scenes of {side * side} tiles ({tiles:,} tiles, {args.dim}-d float vectors, exact index)",
            "committed into a new bundle: vector file, catalog rows, index add. commit = all of it; index = the",
            "index adds and saves. Before, after every scene the flat index was re-sorted in memory (a copy of",
            "all of it) and its whole file rewritten and fsynced, both growing with the square of the run's",
            "tiles; now scenes go into it in batches that at least double it, and it is saved when the run ends",
            "(a run killed before that is rebuilt from the vector files). The before row is the same code with",
            f"`flush_indexes()` after each scene. Same search results: {'yes' if same else 'NO'}.",
            "",
            table(rows, cols),
        ]
    )
    write_section("index_commit", md, {"args": vars(args), "machine": machine(), "rows": rows, "same_results": same})
    print(table(rows, cols))
    if not same:
        raise SystemExit("search results differ")


if __name__ == "__main__":
    main()
