"""Relocalization on real scenes: does a patch of a scene find where it came from?

For each scene of ../shared/data/scenes (the NAIP series indexed at one date), queries are cut at
random positions off the tile grid, rotated by a random multiple of 90 degrees and given random
brightness/contrast changes; NAIP queries are also cut from the other dates at the same place. A
query counts as found when a returned footprint has IoU >= 0.3 with its true footprint or contains
its centre. Reports recall@1 and recall@10 per scene and query kind, for each model.

    $ python benchmarks/relocalize.py [--models backbone,default] [--queries 20] [--seed 0] [--tta] [--expand N]
        [--json FILE]

With ``--tta`` every model encodes tiles and queries as the mean features of their 8 flips and quarter
turns (``geoir tile --tta``), and its rows are named ``MODEL+tta``. With ``--expand N`` every search is
expanded with its first N hits (``geoir search --expand N``), and the rows are named ``MODEL+expandN``.

With ``--json FILE`` the results go to FILE only; otherwise they replace the relocalize section of
docs/benchmarks.md and benchmarks/results/relocalize.json (with ``--tta`` or ``--expand``: sections and
files of their own, relocalize_tta, relocalize_expandN or relocalize_tta_expandN, so the plain runs stay).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import atomic_write, machine, table, write_section

from geoir.encoding.model import load_model
from geoir.index.bundle import Bundle
from geoir.io.scene import Scene, SceneReader, open_scene
from geoir.retrieval.engine import QueryParts, Searcher
from geoir.tiling.grid import TilingParams, footprints
from geoir.tiling.run import tile_scenes

SCENES = Path(__file__).resolve().parents[2] / "shared" / "data" / "scenes"
NAIP_INDEXED = "m_4709963_se_14_1_20090818.tif"
SIZE = 256


def scene_files() -> list[Path]:
    files = sorted(p for p in SCENES.glob("*.tif"))
    return [*files, SCENES / "naip_timeseries_5m" / NAIP_INDEXED]


def nodata_for(path: Path) -> float | None:
    # Landsat-8 marks fill with 0 but declares no nodata value (see the tiler's warning).
    return 0.0 if path.name.startswith("landsat8") else None


def jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random rotation by k*90 degrees and brightness/contrast change of a (3, H, W) uint8 patch."""
    out = np.rot90(rgb, k=int(rng.integers(0, 4)), axes=(1, 2)).astype(np.float32)
    contrast = rng.uniform(0.8, 1.2)
    brightness = rng.uniform(-20, 20)
    out = (out - out.mean()) * contrast + out.mean() + brightness
    return np.clip(out, 0, 255).astype(np.uint8)


def iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return float(a.intersection(b).area / a.union(b).area)


def found_at(hits, truth: shapely.Polygon) -> int | None:  # type: ignore[no-untyped-def]
    """1-based rank of the first hit that matches the truth (IoU >= 0.3 or contains its centre)."""
    centre = truth.centroid
    for rank, geom in enumerate(hits.geometry, start=1):
        if iou(geom, truth) >= 0.3 or geom.contains(centre):
            return rank
    return None


def chance_at_10(tiles, truth: shapely.Polygon) -> float:  # type: ignore[no-untyped-def]
    """Recall@10 of ten tiles drawn at random from the index: the baseline a search must beat."""
    from math import comb

    m = sum(1 for g in tiles.geometry if iou(g, truth) >= 0.3 or g.contains(truth.centroid))
    n = len(tiles)
    return 1.0 - comb(n - m, 10) / comb(n, 10) if n >= 10 else 1.0


def crops(scene: Scene, n: int, rng: np.random.Generator, min_valid: float = 0.9) -> list[Window]:
    """Random windows off the tile grid, mostly valid pixels."""
    reader = SceneReader(scene)
    out: list[Window] = []
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        col = int(rng.integers(0, max(1, scene.width - SIZE)))
        row = int(rng.integers(0, max(1, scene.height - SIZE)))
        if col % SIZE == 0 or row % SIZE == 0:
            continue
        win = Window(col, row, SIZE, SIZE)
        if reader.read(win)[1].mean() >= min_valid:
            out.append(win)
    reader.close()
    return out


def run_model(
    model_name: str, n_queries: int, seed: int, workdir: Path, tta: bool = False, expand: int = 0
) -> list[dict]:
    model = load_model(model_name, tta=tta)
    label = model_name + ("+tta" if tta else "") + (f"+expand{expand}" if expand else "")
    index = workdir / f"idx-{label}"
    files = scene_files()
    scenes = [open_scene(p, nodata=nodata_for(p)) for p in files]
    bundle = Bundle.open_or_create(index, TilingParams())
    t0 = time.perf_counter()
    with bundle.lock():
        tile_scenes(bundle, scenes, model=model, batch_size=32, workers=1)
    index_s = time.perf_counter() - t0
    searcher = Searcher(Bundle.open(index), model)
    all_tiles = searcher.bundle.tiles()
    rng = np.random.default_rng(seed)
    rows = []
    # The truth of an other-date crop is the same ground area: the NAIP dates share one footprint and CRS.
    jobs: list[tuple[str, str, Scene]] = [("shifted crop", s.path, s) for s in scenes]
    for other in sorted((SCENES / "naip_timeseries_5m").glob("*.tif")):
        if other.name != NAIP_INDEXED:
            jobs.append(("other date", str(other), open_scene(other)))
    for kind, source, query_scene in jobs:
        reader = SceneReader(query_scene)
        r1 = r10 = 0
        chance = 0.0
        wins = crops(query_scene, n_queries, rng)
        for win in wins:
            rgb, _ = reader.read(win)
            q = jitter(rgb, rng)
            parts = QueryParts()
            searcher.add_pixels(parts, q, "crop")
            hits = searcher.search(parts, k=10, expand=expand).hits
            truth = footprints(query_scene.transform, [win], query_scene.crs)[0]
            rank = found_at(hits, truth)
            r1 += rank == 1
            r10 += rank is not None
            chance += chance_at_10(all_tiles, truth)
        reader.close()
        rows.append(
            {
                "model": label,
                "scene": Path(source).name[:40],
                "queries": kind,
                "n": len(wins),
                "recall@1": r1 / max(1, len(wins)),
                "recall@10": r10 / max(1, len(wins)),
                "chance@10": chance / max(1, len(wins)),
            }
        )
        print(rows[-1], flush=True)
    for kind in ("shifted crop", "other date"):
        sel = [r for r in rows if r["queries"] == kind]
        n = sum(r["n"] for r in sel)
        rows.append(
            {
                "model": label,
                "scene": "ALL",
                "queries": kind,
                "n": n,
                "recall@1": sum(r["recall@1"] * r["n"] for r in sel) / n,
                "recall@10": sum(r["recall@10"] * r["n"] for r in sel) / n,
                "chance@10": sum(r["chance@10"] * r["n"] for r in sel) / n,
                "index s": index_s,
                "tiles": len(all_tiles),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="backbone,default")
    ap.add_argument("--queries", type=int, default=20, help="queries per scene and kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tta", action="store_true", help="encode tiles and queries as the mean of their 8 views")
    ap.add_argument("--expand", type=int, default=0, metavar="N", help="query expansion with the first N hits")
    ap.add_argument(
        "--json",
        type=Path,
        help="write the results to this file only, leaving docs/benchmarks.md and benchmarks/results/ as they "
        "are (to score a model file that is not the shipped one)",
    )
    args = ap.parse_args()
    if args.expand < 0:
        ap.error(f"--expand must be 0 (off) or a number of hits, got {args.expand}")
    logging.getLogger("geoir").setLevel(logging.WARNING)
    if not SCENES.exists():
        sys.exit(f"{SCENES} not found: this benchmark needs ../shared/data/scenes")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += run_model(name, args.queries, args.seed, Path(tmp), args.tta, args.expand)
    cols = ["model", "scene", "queries", "n", "recall@1", "recall@10", "chance@10"]
    md = "\n".join(
        [
            "## Relocalization on real scenes"
            + (", test-time averaging" if args.tta else "")
            + (f", query expansion with {args.expand} hits" if args.expand else ""),
            "",
            f"`python benchmarks/relocalize.py --models {args.models} --queries {args.queries} --seed {args.seed}"
            f"{' --tta' if args.tta else ''}{f' --expand {args.expand}' if args.expand else ''}` "
            f"on {machine()}.",
            "Queries: 256 px crops at random positions off the tile grid, random k*90 degree rotation and",
            "brightness/contrast change; NAIP indexed at 2009-08-18 and queried from the other five dates at the",
            "same place. Found = a returned tile footprint with IoU >= 0.3 with the crop, or containing its",
            "centre. chance@10 = recall@10 of ten tiles drawn at random from the same index (all scenes, one",
            "bundle), the floor a search must beat. Searches use geoir's defaults: each query is matched in its",
            "four quarter turns. Targets: shifted crops recall@10 >= 0.95; other-date >= 0.8.",
            "",
            table(rows, cols),
        ]
    )
    payload = {"args": vars(args), "machine": machine(), "rows": rows}
    if args.json:
        atomic_write(args.json, json.dumps(payload, indent=2, default=str) + "\n")
    else:
        write_section(
            "relocalize" + ("_tta" if args.tta else "") + (f"_expand{args.expand}" if args.expand else ""), md, payload
        )
    print(table(rows, cols))


if __name__ == "__main__":
    main()
