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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geoir.encoding.model import Encoded
from geoir.errors import GeoirError
from geoir.index.bundle import Bundle
from geoir.io.scene import Scene
from geoir.tiling.grid import TilingParams
from geoir.tiling.run import ProgressFactory, TileReport, commit_scene
from geoir.tiling.tiler import TileSource

log = logging.getLogger("geoir")

#: Tiles per task: large enough to amortise scheduling, small enough to spread a scene over workers.
BLOCK_TILES = 256

_MODELS: dict[str, Any] = {}


def dask_client(scheduler: str | None = None, cluster: str | None = None):  # type: ignore[no-untyped-def]
    """A ``distributed.Client`` for ``--scheduler tcp://HOST:PORT`` or ``--cluster local:N``.

    Raises:
        GeoirError: dask.distributed is not installed, or the option is malformed.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise GeoirError("distributed tiling needs Dask: pip install 'geoir[dist]'") from exc
    if scheduler:
        return Client(scheduler)
    assert cluster is not None
    kind, _, n = cluster.partition(":")
    if kind != "local" or not n.isdigit() or int(n) < 1:
        raise GeoirError(f"--cluster {cluster!r}: use local:N with N >= 1 worker processes, e.g. local:4")
    local = LocalCluster(n_workers=int(n), threads_per_worker=1, processes=True, dashboard_address=":0")
    return Client(local)


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

            m = load_model(self.model, backbone=self.backbone, weights=self.weights, device=self.device)
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
    """One task: read tiles ``start:stop`` of a scene, keep the valid ones, encode them."""
    import torch

    source = TileSource(Scene.from_record(record), TilingParams(**params))
    model = spec.load() if spec is not None else None
    idx, fracs, parts = [], [], []
    try:
        for b0 in range(start, stop, batch_size):
            reads = [source[i] for i in range(b0, min(b0 + batch_size, stop))]
            frac = np.array([f for _, f in reads])
            keep = source.keep(frac)
            if keep.any():
                idx.append(np.arange(b0, b0 + len(reads))[keep])
                fracs.append(frac[keep])
                if model is not None:
                    rgb = np.stack([r for (r, _), k in zip(reads, keep, strict=True) if k])
                    parts.append(model.encode(torch.from_numpy(rgb)))
    finally:
        source.close()
    out = {
        "indexes": np.concatenate(idx) if idx else np.empty(0, np.int64),
        "fracs": np.concatenate(fracs) if fracs else np.empty(0),
    }
    if parts:
        out["features"] = np.concatenate([p.features for p in parts])
        out["embedding"] = np.concatenate([p.embedding for p in parts])
        if parts[0].codes is not None:
            out["codes"] = np.concatenate([p.codes for p in parts])
    return out


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
) -> TileReport:
    """Like :func:`geoir.tiling.run.tile_scenes`, with blocks of tiles encoded on a Dask cluster."""
    from distributed import as_completed

    report = TileReport()
    bundle.reconcile()
    if model is not None:
        bundle.bind_model(model.describe())
    have = bundle.scene_ids()
    params = bundle.params
    todo = []
    for scene in scenes:
        if scene.id in have:
            log.info("%s is already in %s; skipped", scene.path, bundle.path)
            report.skipped_scenes.append(scene.id)
        else:
            todo.append((scene, TileSource(scene, params)))
            have.add(scene.id)
    futures = {}
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
                retries=retries,
                pure=False,
                key=f"geoir-{scene.id}-{start}-{stop}",
            )
            futures[f] = (k, start, stop)
    total = sum(len(src) for _, src in todo)
    bar = progress(total, f"{len(todo)} scene(s) on the cluster") if progress and todo else None
    done: dict[int, list[tuple[int, dict[str, np.ndarray]]]] = {k: [] for k in range(len(todo))}
    blocks_left = {k: -(-len(src) // block_tiles) for k, (_, src) in enumerate(todo)}
    try:
        for fut in as_completed(futures):
            k, start, stop = futures[fut]
            done[k].append((start, fut.result()))
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
                commit_scene(bundle, source, idx, fracs, enc, report)
    finally:
        if bar is not None:
            bar.close()
        for f in futures:
            f.cancel()
    bundle.flush_indexes()
    log.info("%s: %d block(s) of %d tiles encoded on the cluster", Path(bundle.path).name, len(futures), block_tiles)
    return report
