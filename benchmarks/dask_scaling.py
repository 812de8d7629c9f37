"""Distributed tiling: tiles/s of `geoir tile` on a Dask LocalCluster of 1 and 2 worker processes
against the single-process path, in the same run, on the same generated scenes.

    $ python benchmarks/dask_scaling.py [--side 2048] [--scenes 2] [--model backbone]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import machine, table, write_section
from tile_throughput import make_scene

from geoir.distributed import spec_for, tile_scenes_distributed
from geoir.encoding.model import load_model
from geoir.index.bundle import Bundle
from geoir.io.scene import open_scene
from geoir.tiling.grid import TilingParams
from geoir.tiling.run import tile_scenes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=2048)
    ap.add_argument("--scenes", type=int, default=2)
    ap.add_argument("--model", default="backbone")
    args = ap.parse_args()
    logging.getLogger("geoir").setLevel(logging.WARNING)
    from distributed import Client, LocalCluster

    model = load_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scenes = [open_scene(make_scene(Path(tmp) / f"s{i}.tif", args.side + 64 * i)) for i in range(args.scenes)]
        n_tiles = None
        t0 = time.perf_counter()
        b = Bundle.open_or_create(Path(tmp) / "single", TilingParams())
        with b.lock():
            n_tiles = tile_scenes(b, scenes, model=model, workers=0).tiles_added
        single = time.perf_counter() - t0
        rows.append(
            {
                "run": "single process (workers 0)",
                "tiles": n_tiles,
                "seconds": single,
                "tiles/s": n_tiles / single,
                "vs single": 1.0,
            }
        )
        for n in (1, 2):
            with (
                LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") as cl,
                Client(cl) as client,
            ):
                spec = spec_for(model)
                # One thread per worker (the cores are the workers), and the model loaded once per worker
                # before timing, as a long run amortises it.
                client.run(lambda: __import__("torch").set_num_threads(1))
                client.run(spec.load)
                b = Bundle.open_or_create(Path(tmp) / f"dist{n}", TilingParams())
                t0 = time.perf_counter()
                with b.lock():
                    added = tile_scenes_distributed(b, scenes, client, model=model, spec=spec).tiles_added
                dt = time.perf_counter() - t0
            rows.append(
                {
                    "run": f"LocalCluster, {n} worker process(es), 1 thread each",
                    "tiles": added,
                    "seconds": dt,
                    "tiles/s": added / dt,
                    "vs single": single / dt,
                }
            )
            print(rows[-1], flush=True)
    cols = ["run", "tiles", "seconds", "tiles/s", "vs single"]
    md = "\n".join(
        [
            "## Distributed tiling (Dask LocalCluster) vs the single-process path",
            "",
            f"`python benchmarks/dask_scaling.py --side {args.side} --scenes {args.scenes} --model {args.model}` on "
            f"{machine()}. Tile + encode ({args.model}, CPU) of {args.scenes} generated scenes; the cluster times",
            "exclude the cluster start and each worker's one-time model load.",
            "",
            table(rows, cols),
        ]
    )
    write_section("distributed", md, {"args": vars(args), "machine": machine(), "rows": rows})
    print(table(rows, cols))


if __name__ == "__main__":
    main()
