"""Tile and encode on a Dask distributed cluster, merged into one bundle by the client.

Scenes are cut into blocks of consecutive tiles; each block is one Dask task that reads, scales and
encodes its tiles on a worker and returns the kept tiles' indexes, nodata fractions and vectors. Each
worker process loads the model once (a per-process cache keyed by the model's description). The
client gathers a scene's blocks as they finish and commits the scene exactly as a single-process run
does (vectors, tiles, scene row, FAISS indexes), so the result does not depend on where a block ran:
tile ids are content-derived and the vectors come from the same code on the same kind of device.

A worker that dies loses only its blocks in flight; the scheduler runs them again elsewhere
(``retries`` covers tasks that fail for other reasons). Blocks return their results to the client
rather than writing files, so the cluster needs no shared file system beyond read access to the scenes.

On GPUs each worker process uses one GPU (see :func:`worker_device`), and a GPU worker runs several
threads, so blocks are read concurrently (GDAL reads release the GIL) while another block is encoded.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geoir.encoding.model import Encoded
from geoir.errors import GeoirError, SceneError
from geoir.index.bundle import Bundle
from geoir.io.scene import Scene
from geoir.tiling.grid import TilingParams
from geoir.tiling.run import (
    KnownScenes,
    ProgressFactory,
    TileReport,
    black_tiles,
    commit_scene,
    fill_unmarked,
    skip_unreadable_file,
)
from geoir.tiling.tiler import TileSource

log = logging.getLogger("geoir")

#: Tiles per task: large enough to amortise scheduling, small enough to spread a scene over workers.
BLOCK_TILES = 256

#: Most threads per GPU worker of ``--cluster local:N``. A GPU worker reads several blocks at once (GDAL
#: reads release the GIL), but one process tops out near 1,100 tiles/s whatever its threads (8 threads beat
#: 16 on an H200 host, docs/scaling.md); more worker processes per GPU, with fewer threads each, go further.
GPU_WORKER_THREADS = 8

#: Set in the environment of the workers of geoir's own LocalCluster (see :func:`worker_device`).
LOCAL_CLUSTER_ENV = "GEOIR_LOCAL_CLUSTER"

_MODELS: dict[str, Any] = {}


def local_cluster(n_workers: int, threads_per_worker: int = 1, **kwargs: Any):  # type: ignore[no-untyped-def]
    """The ``distributed.LocalCluster`` of ``--cluster local:N``: N worker processes, named 0..N-1."""
    from distributed import LocalCluster

    # The workers already fill the cores: GDAL decodes in one thread each unless the user says otherwise.
    read_threads = os.environ.get("GEOIR_READ_THREADS", "1")
    env = {"GEOIR_READ_THREADS": read_threads, **kwargs.pop("env", {}), LOCAL_CLUSTER_ENV: "1"}
    if _quiet():
        # -q: no Dask warnings from the workers either (a task cancelled when the cluster closes): their
        # stream handlers pass errors only.
        kwargs.setdefault("silence_logs", logging.ERROR)
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        dashboard_address=":0",
        env=env,
        **kwargs,
    )


def dask_client(scheduler: str | None = None, cluster: str | None = None, threads_per_worker: int = 1):  # type: ignore[no-untyped-def]
    """A ``distributed.Client`` for ``--scheduler tcp://HOST:PORT`` or ``--cluster local:N``.

    Args:
        scheduler: Address of an existing scheduler.
        cluster: ``local:N``: start a LocalCluster of N worker processes.
        threads_per_worker: Threads of each local worker (1 for CPU encoding; GPU workers want more,
            :func:`gpu_worker_threads`).

    Raises:
        GeoirError: dask.distributed is not installed, the option is malformed, or the scheduler cannot be
            reached.
    """
    try:
        from distributed import Client
    except ImportError as exc:
        raise GeoirError("distributed tiling needs Dask: pip install 'geoir[dist]'") from exc
    if _quiet():
        # -q: not Dask's own warnings either ("Worker process still alive after 4.0 seconds, killing" as a
        # LocalCluster closes). Set after importing distributed, whose import configures its loggers.
        logging.getLogger("distributed").setLevel(logging.ERROR)
    if scheduler:
        try:
            return Client(scheduler)
        except (OSError, ValueError) as exc:
            raise GeoirError(
                f"cannot reach the Dask scheduler at {scheduler} ({str(exc).splitlines()[0]}); start one there "
                "(`dask scheduler`, with workers: `dask worker ADDRESS`) or pass --cluster local:N instead"
            ) from None
    assert cluster is not None
    kind, _, n = cluster.partition(":")
    if kind != "local" or not n.isdigit() or int(n) < 1:
        raise GeoirError(f"--cluster {cluster!r}: use local:N with N >= 1 worker processes, e.g. local:4")
    return Client(local_cluster(int(n), threads_per_worker))


def _quiet() -> bool:
    """Whether geoir's messages are turned down (``-q``): its logger passes warnings and worse only."""
    return logging.getLogger("geoir").getEffectiveLevel() > logging.INFO


def gpu_worker_threads(n_workers: int, cores: int | None = None) -> int:
    """Threads for each of ``n_workers`` GPU worker processes on one host: its cores shared among them,
    at most :data:`GPU_WORKER_THREADS` each (2 workers on 32 cores: 8 threads; 16 workers: 2)."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, min(GPU_WORKER_THREADS, cores // max(1, n_workers)))


def worker_device(
    device: str, worker_name: object, device_count: int, visible_devices: str | None = None, local: bool = False
) -> str:
    """The device one worker process runs the model on: one GPU per worker when ``device`` is cuda.

    ``cpu`` and an explicit ``cuda:K`` are kept as given; ``auto`` means cuda when the worker sees a GPU.
    For ``cuda``:

    - worker i of a LocalCluster (named 0..N-1, as ``--cluster local:N`` names them) uses
      ``cuda:(i mod device_count)``, so N workers on a host of N GPUs use one GPU each;
    - a worker whose launcher set ``CUDA_VISIBLE_DEVICES`` for it (``CUDA_VISIBLE_DEVICES=2 dask worker
      ...``, or dask-cuda, which lists each worker's own GPU first) uses ``cuda:0``, the first GPU listed.
      Workers of geoir's own LocalCluster (``local``) inherit the user's ``CUDA_VISIBLE_DEVICES``, which
      for them only limits the GPUs that take turns;
    - any other worker (a name that is not a number) uses ``cuda:0``.

    Args:
        device: The device asked for (``--device``): ``auto``, ``cpu``, ``cuda`` or ``cuda:K``.
        worker_name: ``distributed.get_worker().name`` (None outside a worker).
        device_count: GPUs this process sees (``torch.cuda.device_count()``).
        visible_devices: This process's ``CUDA_VISIBLE_DEVICES`` (None when unset).
        local: The worker belongs to geoir's own LocalCluster.
    """
    name = device.strip().lower()
    if name == "auto":
        name = "cuda" if device_count > 0 else "cpu"
    if name != "cuda" or device_count < 1:
        return name  # cpu, cuda:K, or cuda on a worker with no GPU (loading says so)
    if visible_devices is not None and not local:
        return "cuda:0"
    try:
        i = int(str(worker_name))
    except ValueError:
        return "cuda:0"
    return f"cuda:{i % device_count}"


def this_worker_device(device: str) -> str:
    """:func:`worker_device` for the process this runs in."""
    name = None
    try:
        from distributed import Worker, get_worker

        try:
            name = get_worker().name
        except ValueError:
            # Outside a task (client.run): a worker process holds one Worker.
            workers = list(Worker._instances)
            name = workers[0].name if len(workers) == 1 else None
    except ImportError:
        pass
    count = 0
    if device.strip().lower() in ("auto", "cuda"):
        import torch

        count = torch.cuda.device_count()
    return worker_device(
        device, name, count, os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get(LOCAL_CLUSTER_ENV) == "1"
    )


def spec_for(model, weights: str | None = None, device: str = "cpu") -> ModelSpec:  # type: ignore[no-untyped-def]
    """How workers load the same model as ``model`` (a loaded :class:`~geoir.encoding.model.Model`)."""
    if model.head is None:
        return ModelSpec("backbone", model.backbone.name, weights, device, model.fingerprint)
    return ModelSpec(model.meta.get("path") or "default", None, weights, device, model.fingerprint)


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load the same model as the client (plain values, cheap to ship)."""

    model: str | None
    backbone: str | None
    weights: str | None
    device: str
    fingerprint: str

    def load(self):  # type: ignore[no-untyped-def]
        if self.fingerprint not in _MODELS:
            from geoir.encoding.model import load_model

            device = this_worker_device(self.device)
            m = load_model(self.model, backbone=self.backbone, weights=self.weights, device=device)
            if m.fingerprint != self.fingerprint:
                raise GeoirError(
                    f"worker loaded model {m.fingerprint[:12]}, client {self.fingerprint[:12]}; "
                    "give every worker the same model files and packages"
                )
            _MODELS[self.fingerprint] = m
        return _MODELS[self.fingerprint]


def encode_block(
    record: dict[str, Any], params: dict[str, Any], start: int, stop: int, spec: ModelSpec | None, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """One task: read tiles ``start:stop`` of a scene, keep the valid ones, encode them. A GeoirError (a damaged
    file) comes back as ``{"error": message, "error_type": class name}``, raised by the client."""
    import torch

    source = TileSource(Scene.from_record(record), TilingParams(**params))
    model = spec.load() if spec is not None else None
    idx, fracs, parts = [], [], []
    unmarked, black = fill_unmarked(source.scene), 0
    failed: GeoirError | None = None
    try:
        for b0 in range(start, stop, batch_size):
            reads = [source[i] for i in range(b0, min(b0 + batch_size, stop))]
            frac = np.array([f for _, f in reads])
            keep = source.keep(frac)
            if keep.any():
                idx.append(np.arange(b0, b0 + len(reads))[keep])
                fracs.append(frac[keep])
                if model is not None or unmarked:
                    rgb = np.stack([r for (r, _), k in zip(reads, keep, strict=True) if k])
                    black += black_tiles(rgb) if unmarked else 0
                if model is not None:
                    parts.append(model.encode(torch.from_numpy(rgb)))
    except GeoirError as exc:
        failed = exc
    finally:
        source.close()
    if failed is not None:
        # Returned, not raised: a damaged file stays damaged, so Dask must not retry the block (nor log a
        # "Compute Failed" dump per try), and the client raises it as the one-line error it is (raised here,
        # its rasterio cause could not be unpickled there, leaving a generic Exception with its repr).
        return {"error": np.array(str(failed)), "error_type": np.array(type(failed).__name__)}
    out = {
        "indexes": np.concatenate(idx) if idx else np.empty(0, np.int64),
        "fracs": np.concatenate(fracs) if fracs else np.empty(0),
        "black": np.array(black),
    }
    if parts:
        out["features"] = np.concatenate([p.features for p in parts])
        out["embedding"] = np.concatenate([p.embedding for p in parts])
        if parts[0].codes is not None:
            out["codes"] = np.concatenate([p.codes for p in parts])
    return out


def _raise_if_failed(result: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A block's result, or the GeoirError its worker met (see :func:`encode_block`)."""
    if "error" in result:
        import geoir.errors

        kind = getattr(geoir.errors, str(result["error_type"]), GeoirError)
        if not (isinstance(kind, type) and issubclass(kind, GeoirError)):
            kind = GeoirError
        raise kind(str(result["error"]))
    return result


def _merge(parts: list[dict[str, np.ndarray]], model) -> Encoded:  # type: ignore[no-untyped-def]
    """One scene's vectors from its blocks (in tile order); empty arrays when no tile was kept."""
    return model.concat([Encoded(p["features"], p["embedding"], p.get("codes")) for p in parts if "features" in p])


def tile_scenes_distributed(
    bundle: Bundle,
    scenes: list[Scene],
    client,
    model=None,  # type: ignore[no-untyped-def]
    spec: ModelSpec | None = None,
    progress: ProgressFactory | None = None,
    block_tiles: int = BLOCK_TILES,
    retries: int = 3,
    batch_size: int = 64,
    skip_unreadable: bool = False,
) -> TileReport:
    """Like :func:`geoir.tiling.run.tile_scenes`, with blocks of tiles encoded on a Dask cluster.

    ``batch_size`` is the number of tiles a worker encodes at once (at most ``block_tiles``).
    """
    from distributed import as_completed

    report = TileReport()
    known = KnownScenes(bundle, model)
    params = bundle.params
    todo = []
    for scene in scenes:
        # Scenes the bundle holds are seen to here as by a single-process run: a moved file followed, one
        # catalogued without vectors (--no-encode) encoded by this process, a killed run's leftovers removed.
        if not known.handle(scene, report, batch_size, progress=progress):
            todo.append((scene, TileSource(scene, params)))
            known.have.add(scene.id)
    futures = {}
    run = uuid.uuid4().hex[:8]
    for k, (scene, source) in enumerate(todo):
        record = scene.to_record()
        for start in range(0, len(source), block_tiles):
            stop = min(start + block_tiles, len(source))
            f = client.submit(
                encode_block,
                record,
                params.to_dict(),
                start,
                stop,
                spec,
                batch_size,
                retries=retries,
                pure=False,
                # Unique per run: a run just after a failed one on the same scheduler must not get its
                # cancelled futures back (Dask reuses a key still known to the scheduler).
                key=f"geoir-{scene.id}-{start}-{stop}-{run}",
            )
            futures[f] = (k, start, stop)
    total = sum(len(src) for _, src in todo)
    bar = progress(total, f"{len(todo)} scene(s) on the cluster") if progress and todo else None
    done: dict[int, list[tuple[int, dict[str, np.ndarray]]]] = {k: [] for k in range(len(todo))}
    blocks_left = {k: -(-len(src) // block_tiles) for k, (_, src) in enumerate(todo)}
    failed: set[int] = set()
    read = dict.fromkeys(range(len(todo)), 0)
    try:
        for fut in as_completed(futures):
            k, start, stop = futures[fut]
            if k in failed:
                continue
            try:
                done[k].append((start, _raise_if_failed(fut.result())))
            except SceneError as exc:
                if not skip_unreadable:
                    raise
                # A damaged file: leave the scene out, and drop its other blocks.
                failed.add(k)
                done.pop(k, None)
                for other, (j, _, _) in futures.items():
                    if j == k and other is not fut:
                        other.cancel()
                skip_unreadable_file(report.unreadable, todo[k][0].path, exc)
                if bar is not None:
                    bar.update(len(todo[k][1]) - read[k])  # the rest of the scene's tiles count as done
                continue
            read[k] += stop - start
            if bar is not None:
                bar.update(stop - start)
            blocks_left[k] -= 1
            if blocks_left[k] == 0:
                scene, source = todo[k]
                parts = [r for _, r in sorted(done.pop(k), key=lambda t: t[0])]
                idx = np.concatenate([p["indexes"] for p in parts])
                fracs = np.concatenate([p["fracs"] for p in parts])
                enc = None
                if model is not None:
                    enc = _merge(parts, model)
                black = sum(int(p.get("black", 0)) for p in parts)
                commit_scene(bundle, source, idx, fracs, enc, report, black=black)
    finally:
        if bar is not None:
            bar.close()
        for f in futures:
            f.cancel()
    bundle.flush_indexes()
    log.info("%s: %d block(s) of %d tiles encoded on the cluster", Path(bundle.path).name, len(futures), block_tiles)
    return report
