"""A search by tile id, from a fresh process: the backbone created up front (before) vs on demand (geoir).

A search by tile, point or example polygon runs the head on the tiles' stored backbone features and never
the backbone; geoir now creates the backbone (timm, its weights) only when pixels are to be encoded. Each
way runs `geoir search tile:ID` in a fresh Python process (imports included, as a user's command pays
them), on a bundle of one real scene tiled with the shipped default model, alternating, best of the rounds.
Both ways must write the same hits.

    $ python benchmarks/search_startup.py [--scene PATH] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import machine, table, write_section

SCENE = Path(__file__).resolve().parents[2] / "shared/data/scenes/rasterio_RGB.byte_landsat7_300m.tif"

# The search command's own path, with the one switch this compares; the wall time covers the whole process.
CHILD = """
import json, sys, time
t0 = time.perf_counter()
from geoir.cli import options
real = options.resolve_model
on_demand = sys.argv[3] == "1"
options.resolve_model = lambda *a, **k: real(*a, **{**k, "backbone_on_demand": on_demand})
from geoir.cli import cli
cli(["-q", "search", f"tile:{sys.argv[2]}", "--index", sys.argv[1], "--out", sys.argv[4], "--overwrite",
     "--device", "cpu"], standalone_mode=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "timm": "timm" in sys.modules}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scene", type=Path, default=SCENE)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not args.scene.exists():
        sys.exit(f"{args.scene} not found; pass --scene PATH (a GeoTIFF)")
    import geopandas as gpd

    from geoir.index.bundle import Bundle

    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "idx"
        tile = [sys.executable, "-m", "geoir.cli", "-q", "tile", str(args.scene), "--index", str(index)]
        subprocess.run([*tile, "--device", "cpu"], check=True)
        tid = int(Bundle.open(index).tiles().tile_id[0])
        ways = {"backbone created up front (before)": "0", "backbone on demand (geoir)": "1"}
        runs: dict[str, list[dict]] = {name: [] for name in ways}
        hits: dict[str, list[int]] = {}
        for _ in range(args.rounds):
            for name, flag in ways.items():
                out = Path(tmp) / f"h{flag}.gpkg"
                r = subprocess.run(
                    [sys.executable, "-c", CHILD, str(index), str(tid), flag, str(out)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
                hits[name] = gpd.read_file(out, layer="hits").tile_id.tolist()
        n_tiles = Bundle.open(index).n_tiles()
    assert len({json.dumps(h) for h in hits.values()}) == 1, "both ways must give the same hits"
    rows = [
        {
            "search tile:ID": name,
            "seconds (best)": min(r["seconds"] for r in rs),
            "seconds (worst)": max(r["seconds"] for r in rs),
            "timm imported": "yes" if rs[0]["timm"] else "no",
        }
        for name, rs in runs.items()
    ]
    cols = list(rows[0])
    md = "\n".join(
        [
            "## A search by tile id from a fresh process: backbone created up front vs on demand",
            "",
            f"`python benchmarks/search_startup.py --rounds {args.rounds}` on {machine()}.",
            f"`geoir search tile:ID` on a bundle of {args.scene.name} ({n_tiles} tiles, the shipped default",
            "model), each way in a fresh Python process (imports included, as a command pays them), alternating;",
            "the before row is the same code with the backbone created when the model loads, as geoir did. A",
            "search by tile, point or example polygon runs the head on stored features only. Same hits both ways.",
            "",
            table(rows, cols),
        ]
    )
    write_section("search_startup", md, {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(),
                                         "rows": rows})  # fmt: skip
    print(table(rows, cols))


if __name__ == "__main__":
    main()
