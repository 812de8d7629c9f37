"""Encode the committed scenes of a bundle that have no vectors yet (after --no-encode or a crash)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from geoir.encoding.batches import iter_batches
from geoir.encoding.model import Encoded, Model
from geoir.index.bundle import Bundle
from geoir.io.scene import Scene
from geoir.tiling.run import ProgressFactory, on_cuda
from geoir.tiling.tiler import TileSource

log = logging.getLogger("geoir")


def encode_bundle(
    bundle: Bundle, model: Model, batch_size: int = 64, workers: int = 0, progress: ProgressFactory | None = None
) -> int:
    """Encode every committed scene without vectors; returns the number of tiles encoded."""
    bundle.reconcile()
    bundle.bind_model(model.describe())
    done = set(bundle.encoded_scene_ids())
    total = 0
    for rec in bundle.scene_records():
        if rec["id"] in done:
            continue
        scene = Scene.from_record(rec)
        source = TileSource(scene, bundle.params)
        tiles = bundle.tiles(scene_id=scene.id)
        wanted = {int(t) for t in tiles.tile_id}
        # Only the tiles the catalog kept are encoded; the grid is rebuilt from the stored scene record.
        keep = np.array([t.id in wanted for t in source.tiles])
        bar = progress(len(source), Path(scene.path).name) if progress else None
        ids, parts = [], []
        try:
            for batch in iter_batches(source, batch_size, workers, pin_memory=on_cuda(model)):
                sel = keep[batch.indexes]
                if sel.any():
                    ids.append(np.array([source.tiles[i].id for i in batch.indexes[sel]], np.int64))
                    parts.append(model.encode(torch.from_numpy(batch.rgb[sel])))
                if bar is not None:
                    bar.update(len(batch.indexes))
        finally:
            source.close()
            if bar is not None:
                bar.close()
        if not parts:
            continue
        all_ids = np.concatenate(ids)
        enc = Encoded(
            np.concatenate([p.features for p in parts]),
            np.concatenate([p.embedding for p in parts]),
            np.concatenate([p.codes for p in parts]) if parts[0].codes is not None else None,
        )
        bundle.write_vectors(scene.id, all_ids, enc.features, enc.embedding, enc.codes)
        bundle.add_to_indexes(all_ids, enc.embedding, enc.codes)
        total += len(all_ids)
        log.info("%s: %d tiles encoded", Path(scene.path).name, len(all_ids))
    return total
