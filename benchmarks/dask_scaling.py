"""Distributed tiling: tiles/s of `geoir tile` on a Dask LocalCluster against the single-process path, in
the same run, on the same generated scenes.

CPU (default): LocalClusters of 1 and 2 worker processes of one thread each. GPU (``--device cuda``): the
single-process path on one GPU (DataLoader reader processes feeding the model), then LocalClusters of one
GPU worker and of one worker per GPU (worker i on cuda:i), for each value of ``--threads-per-worker``, or
the clusters ``--clusters`` names (WORKERSxTHREADS; workers take the GPUs in turn, so 16 on 2 GPUs put 8 on each).
Every run is a real run (tiles, vectors, catalog, FAISS indexes); tile counts and tile ids are checked
equal across the runs.

    $ python benchmarks/dask_scaling.py [--side 2048] [--scenes 2] [--model backbone]
    $ python benchmarks/dask_scaling.py --device cuda --side 10240 --step 256 --scenes 24 --batch-size 256 \\
          --clusters 1x8,2x8,8x4,16x2 --scene-dir /tmp/scenes --out "$OUT"
    $ python benchmarks/dask_scaling.py --apply distributed_gpu.json    # write a result made elsewhere
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import machine, table, write_section

from geoir.cli import GDAL_CACHE_MB

COLS_CPU = ["run", "tiles", "seconds", "tiles/s", "vs single"]
COLS_GPU = [
    "run",
    "devices",
    "tiles",
    "seconds",
    "tiles/s",
    "vs single",
    "ids equal",
    "GPU busy %",
    "CPU busy %",
    "commit s",
]


def scene_paths(folder: Path, side: int, step: int, n: int) -> list[Path]:
    # Scenes differ in size, so their content (and scene id) differs.
    return [folder / f"s{i}_{side + step * i}.tif" for i in range(n)]


def _make(path: Path, side: int) -> Path:
    from tile_throughput import make_scene

    part = path.with_name(f".{path.name}.part")
    make_scene(part, side)
    os.replace(part, path)
    return path


def make_scenes(folder: Path, side: int, step: int, n: int, jobs: int) -> list[Path]:
    """Generate the scenes missing from ``folder`` (in parallel processes) and return all their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = scene_paths(folder, side, step, n)
    todo = [p for p in paths if not p.exists()]
    if todo:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max(1, min(jobs, len(todo)))) as ex:
            list(ex.map(_make, todo, [side + step * paths.index(p) for p in todo]))
        print(f"generated {len(todo)} scene(s) in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


class Busy:
    """Mean GPU utilisation (NVML, every GPU) and CPU utilisation over a block of code."""

    def __init__(self, gpus: int) -> None:
        self.gpus, self.samples, self.stop = gpus, [], threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(gpus)]
            self.nvml: Any = pynvml
        except Exception:
            self.handles, self.nvml = [], None

    def _run(self) -> None:
        while not self.stop.wait(0.25):
            self.samples.append([self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles])

    def __enter__(self) -> Busy:
        import psutil

        psutil.cpu_percent(None)
        self.thread = threading.Thread(target=self._run, daemon=True)
        if self.handles:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import psutil

        self.cpu = psutil.cpu_percent(None)
        self.stop.set()
        if self.handles:
            self.thread.join()

    def gpu(self) -> str:
        if not self.samples:
            return "n/a"
        return " / ".join(f"{sum(s[i] for s in self.samples) / len(self.samples):.0f}" for i in range(self.gpus))


def warm(spec, batch_size: int) -> str:  # type: ignore[no-untyped-def]
    """Load the model on a worker and run one batch (cuDNN planning), outside the timed region."""
    import numpy as np
    import torch

    model = spec.load()
    rgb = np.random.default_rng(0).integers(0, 256, (batch_size, 3, 256, 256), dtype=np.uint8)
    model.encode(torch.from_numpy(rgb))
    return str(model.backbone.device)


class CommitTimer:
    """Seconds the client spends committing scenes (vectors, catalog, FAISS), the part no worker shares."""

    def __init__(self) -> None:
        import geoir.distributed
        import geoir.tiling.run

        self.seconds = 0.0
        original = geoir.tiling.run.commit_scene

        def timed(*a: Any, **k: Any) -> None:
            t0 = time.perf_counter()
            try:
                original(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0

        geoir.tiling.run.commit_scene = timed  # type: ignore[assignment]
        geoir.distributed.commit_scene = timed  # type: ignore[assignment]

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


def check_bundle(path: Path) -> tuple[list[int], int]:
    """Sorted tile ids of a bundle and the number of vectors in its float index."""
    from geoir.index.bundle import Bundle

    b = Bundle.open(path)
    return sorted(int(i) for i in b.tiles().tile_id), len(b.indexes()["float"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=2048, help="side of the first generated scene, in pixels")
    ap.add_argument("--step", type=int, default=64, help="each further scene is this many pixels larger")
    ap.add_argument("--scenes", type=int, default=2)
    ap.add_argument("--model", default="backbone")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--gpus", type=int, default=None, help="GPU workers of the largest cluster [default: all GPUs]")
    ap.add_argument("--threads-per-worker", default=None, help="comma-separated list [default: 1 on CPU, 8 on GPU]")
    ap.add_argument(
        "--clusters",
        default=None,
        help="GPU clusters to time as WORKERSxTHREADS, e.g. 1x8,2x8,8x4 (workers take the GPUs in turn) "
        "[default: 1 and --gpus workers for each --threads-per-worker]",
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--block-tiles", type=int, default=None, help="tiles per Dask task [default: geoir's]")
    ap.add_argument(
        "--single-workers", type=int, default=None, help="reader processes of the single GPU run [CLI default]"
    )
    ap.add_argument("--scene-dir", type=Path, default=None, help="generate (or reuse) the scenes here")
    ap.add_argument("--prepare-only", action="store_true", help="only generate the scenes")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes generating scenes")
    ap.add_argument("--time-limit", type=float, default=1e9, help="start no new run after this many seconds")
    ap.add_argument("--out", type=Path, default=None, help="also write the result (JSON + Markdown) here")
    ap.add_argument("--section", default=None, help="docs section [default: distributed, distributed_gpu]")
    ap.add_argument("--apply", type=Path, default=None, help="write a result JSON from --out into the docs")
    args = ap.parse_args()
    if args.apply is not None:
        payload = json.loads(args.apply.read_text())
        write_section(payload["section"], payload["markdown"], payload)
        print(payload["markdown"])
        return
    if args.prepare_only:
        assert args.scene_dir is not None, "--prepare-only needs --scene-dir"
        make_scenes(args.scene_dir, args.side, args.step, args.scenes, args.jobs)
        return
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MB))  # as the CLI does; workers inherit it
    logging.getLogger("geoir").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.scene_dir or Path(tmp) / "scenes"
        paths = make_scenes(folder, args.side, args.step, args.scenes, args.jobs)
        if args.device == "cpu":
            rows, extra = run_cpu(args, paths, Path(tmp))
        else:
            rows, extra = run_gpu(args, paths, Path(tmp))
    report(args, rows, extra)


def run_cpu(args: argparse.Namespace, paths: list[Path], tmp: Path) -> tuple[list[dict], dict]:
    from distributed import Client

    from geoir.distributed import local_cluster, spec_for, tile_scenes_distributed
    from geoir.encoding.model import load_model
    from geoir.index.bundle import Bundle
    from geoir.io.scene import open_scene
    from geoir.tiling.grid import TilingParams
    from geoir.tiling.run import tile_scenes

    threads = int((args.threads_per_worker or "1").split(",")[0])
    block = {"block_tiles": args.block_tiles} if args.block_tiles else {}
    model = load_model(args.model)
    scenes = [open_scene(p) for p in paths]
    rows = []
    t0 = time.perf_counter()
    b = Bundle.open_or_create(tmp / "single", TilingParams())
    with b.lock():
        n_tiles = tile_scenes(b, scenes, model=model, workers=0, batch_size=args.batch_size).tiles_added
    single = time.perf_counter() - t0
    rows.append({"run": "single process (workers 0)", "tiles": n_tiles, "seconds": single})
    for n in (1, 2):
        with local_cluster(n, threads) as cl, Client(cl) as client:
            spec = spec_for(model)
            # One thread per worker (the cores are the workers), and the model loaded once per worker
            # before timing, as a long run amortises it.
            client.run(lambda: __import__("torch").set_num_threads(1))
            client.run(spec.load)
            b = Bundle.open_or_create(tmp / f"dist{n}", TilingParams())
            t0 = time.perf_counter()
            with b.lock():
                added = tile_scenes_distributed(
                    b, scenes, client, model=model, spec=spec, batch_size=args.batch_size, **block
                ).tiles_added
            dt = time.perf_counter() - t0
        rows.append(
            {"run": f"LocalCluster, {n} worker process(es), {threads} thread each", "tiles": added, "seconds": dt}
        )
        print(rows[-1], flush=True)
    for r in rows:
        r["tiles/s"] = r["tiles"] / r["seconds"]
        r["vs single"] = single / r["seconds"]
    return rows, {}


def run_gpu(args: argparse.Namespace, paths: list[Path], tmp: Path) -> tuple[list[dict], dict]:
    import numpy as np
    import torch
    from distributed import Client, wait

    from geoir.cli.options import default_workers
    from geoir.distributed import local_cluster, spec_for, tile_scenes_distributed
    from geoir.encoding.model import load_model
    from geoir.index.bundle import Bundle
    from geoir.io.scene import open_scene
    from geoir.tiling.grid import TilingParams
    from geoir.tiling.run import tile_scenes

    start = time.perf_counter()
    count = torch.cuda.device_count()
    gpus = args.gpus or count
    threads = [int(t) for t in (args.threads_per_worker or "8").split(",")]
    if args.clusters:
        clusters = [(int(n), int(t)) for n, t in (c.split("x") for c in args.clusters.split(","))]
    else:
        clusters = [(n, t) for t in threads for n in sorted({1, gpus})]
    readers = default_workers() if args.single_workers is None else args.single_workers
    block = {"block_tiles": args.block_tiles} if args.block_tiles else {}
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    print(f"{count} GPU(s): {names}; torch {torch.__version__}", flush=True)
    scenes = [open_scene(p) for p in paths]
    rows: list[dict] = []
    ref: list[int] | None = None
    commits = CommitTimer()

    def finish(row: dict, path: Path, added: int) -> None:
        nonlocal ref
        ids, n_vectors = check_bundle(path)
        if ref is None:
            ref = ids
        row["tiles"] = added
        row["commit s"] = commits.take()
        row["ids equal"] = "yes" if ids == ref and n_vectors == added == len(ids) else "NO"
        row["tiles/s"] = added / row["seconds"]
        row["vs single"] = rows[0]["seconds"] / row["seconds"] if rows else 1.0
        rows.append(row)
        shutil.rmtree(path, ignore_errors=True)
        print(json.dumps(row), flush=True)
        if args.out is not None:  # partial results survive a run cut short
            (args.out / "rows.json").write_text(json.dumps(rows, indent=1))

    # The single-process path on one GPU, as `geoir tile --device cuda` runs it.
    model = load_model(args.model, device="cuda:0")
    model.encode(torch.from_numpy(np.random.default_rng(0).integers(0, 256, (args.batch_size, 3, 256, 256), np.uint8)))
    torch.cuda.synchronize()
    path = tmp / "single"
    b = Bundle.open_or_create(path, TilingParams())
    with Busy(count) as busy, b.lock():
        t0 = time.perf_counter()
        added = tile_scenes(b, scenes, model=model, batch_size=args.batch_size, workers=readers).tiles_added
        dt = time.perf_counter() - t0
    finish(
        {
            "run": f"single process, {readers} reader processes",
            "devices": "cuda:0",
            "seconds": dt,
            "GPU busy %": busy.gpu(),
            "CPU busy %": busy.cpu,
        },
        path,
        added,
    )
    spec = spec_for(model, device="cuda")
    cpu_model = load_model(args.model)  # the client only describes the model and merges vectors
    for n, t in clusters:
        if time.perf_counter() - start > args.time_limit:
            print(f"time limit: skipped {n} worker(s) x {t} thread(s)", flush=True)
            continue
        t_start = time.perf_counter()
        with local_cluster(n, t) as cl, Client(cl) as client:
            # Load the model on every worker and plan cuDNN before timing, as a long run amortises it.
            futs = [
                client.submit(warm, spec, args.batch_size, workers=[w], pure=False)
                for w in sorted(client.scheduler_info()["workers"])
            ]
            wait(futs)
            used = sorted(f.result() for f in futs)
            devices = " ".join(f"{d} x{used.count(d)}" if used.count(d) > 1 else d for d in sorted(set(used)))
            started = time.perf_counter() - t_start
            path = tmp / f"dist{n}x{t}"
            b = Bundle.open_or_create(path, TilingParams())
            with Busy(count) as busy, b.lock():
                t0 = time.perf_counter()
                added = tile_scenes_distributed(
                    b, scenes, client, model=cpu_model, spec=spec, batch_size=args.batch_size, **block
                ).tiles_added
                dt = time.perf_counter() - t0
        finish(
            {
                "run": f"LocalCluster, {n} GPU worker(s) x {t} thread(s)",
                "devices": devices,
                "seconds": dt,
                "GPU busy %": busy.gpu(),
                "CPU busy %": busy.cpu,
                "cluster start s": started,
            },
            path,
            added,
        )
    return rows, {"gpus": names, "torch": torch.__version__, "single readers": readers}


def report(args: argparse.Namespace, rows: list[dict], extra: dict) -> None:
    cmd = f"python benchmarks/dask_scaling.py --side {args.side} --scenes {args.scenes} --model {args.model}"
    if args.device == "cpu":
        section, cols = args.section or "distributed", COLS_CPU
        md = "\n".join(
            [
                "## Distributed tiling (Dask LocalCluster) vs the single-process path",
                "",
                f"`{cmd}` on {machine()}. Tile + encode ({args.model}, CPU) of {args.scenes} generated scenes; the "
                "cluster times",
                "exclude the cluster start and each worker's one-time model load.",
                "",
                table(rows, cols),
            ]
        )
    else:
        section, cols = args.section or "distributed_gpu", COLS_GPU
        cmd += (
            f" --step {args.step} --device cuda --batch-size {args.batch_size}"
            + (
                f" --clusters {args.clusters}"
                if args.clusters
                else f" --threads-per-worker {args.threads_per_worker or 8}"
            )
            + (f" --gpus {args.gpus}" if args.gpus else "")
            + (f" --block-tiles {args.block_tiles}" if args.block_tiles else "")
        )
        md = "\n".join(
            [
                "## Distributed tiling on GPUs: one Dask worker per GPU vs the single-process path",
                "",
                f"`{cmd}` on {machine()}; {', '.join(extra['gpus'])}; torch {extra['torch']}.",
                f"Tile + encode ({args.model}, bf16 on the GPU) of {args.scenes} generated scenes, "
                f"{rows[0]['tiles'] if rows else 0:,} tiles, batches of",
                f"{args.batch_size}; every run writes a whole bundle (vectors, catalog, FAISS). The single process "
                f"reads with {extra['single readers']}",
                "DataLoader processes; cluster worker i uses cuda:(i mod GPUs) (`devices`) and reads blocks of tiles "
                "in its threads. Cluster times",
                "exclude the cluster start and each worker's model load and first batch; the single run's model "
                "is loaded and",
                "warmed up before timing too. ids equal: the same tile ids (and as many vectors) as the first run. "
                "GPU busy %: NVML",
                "utilisation of each GPU, averaged over the run; CPU busy %: all cores; commit s: seconds the client "
                "process spent",
                "committing scenes (vectors, catalog, FAISS), which no worker shares.",
                "",
                table(rows, cols),
            ]
        )
    payload = {"section": section, "args": vars(args), "machine": machine(), **extra, "rows": rows, "markdown": md}
    write_section(section, md, payload)
    if args.out is not None:
        (args.out / f"{section}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        (args.out / f"{section}.md").write_text(md + "\n")
    print(table(rows, cols))


if __name__ == "__main__":
    main()
