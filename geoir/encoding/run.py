"""Encode the committed scenes of a bundle that have no vectors yet (after --no-encode or a crash)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from geoir.encoding.model import Model
from geoir.errors import SceneError
from geoir.index.bundle import Bundle
from geoir.io.scene import Scene, content_fingerprint
from geoir.tiling.run import ProgressFactory, read_and_encode
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
        if rec["id"] not in done:
            total += encode_catalogued_scene(bundle, rec, model, batch_size, workers, progress)
    bundle.flush_indexes()
    return total


def encode_catalogued_scene(
    bundle: Bundle,
    rec: dict,  # type: ignore[type-arg]
    model: Model,
    batch_size: int = 64,
    workers: int = 0,
    progress: ProgressFactory | None = None,
) -> int:
    """Encode the catalogued tiles of one committed scene without vectors (``rec``, its catalog record) into
    the in-memory indexes (the caller flushes them); returns the number of tiles encoded."""
    scene = Scene.from_record(rec)
    if not Path(scene.path).is_file():
        # Not handed to GDAL: a path it would read over the network (/vsicurl/...) in a received bundle, or a
        # file moved away.
        raise SceneError(
            f"{scene.path} can no longer be read (no such file here); was it moved? Tile it where it is now (`geoir "
            f"tile NEW_PATH --index {bundle.path}` updates its path), or take it out of the bundle (`geoir remove "
            f"{Path(scene.path).name} --index {bundle.path}`)"
        )
    if content_fingerprint(scene.path) != scene.fingerprint:
        # Its tiles' footprints and ids are those of the file as it was: other pixels must not fill them.
        raise SceneError(
            f"{scene.path} changed since it was tiled into {bundle.path} (scene {scene.id}); run "
            f"`geoir tile {scene.path} --index {bundle.path}` to index it again (its old tiles are replaced)"
        )
    source = TileSource(scene, bundle.params)
    tiles = bundle.tiles(scene_id=scene.id)
    wanted = {int(t) for t in tiles.tile_id}
    # Only the tiles the catalog kept are encoded; the grid is rebuilt from the stored scene record.
    keep = np.array([t.id in wanted for t in source.tiles])
    bar = progress(len(source), Path(scene.path).name) if progress else None
    idx, _, enc = read_and_encode(source, model, batch_size, workers, bar, select=keep)
    if enc is None or not len(idx):
        return 0
    all_ids = np.array([source.tiles[i].id for i in idx], np.int64)
    bundle.write_vectors(scene.id, all_ids, enc.features, enc.embedding, enc.codes)
    bundle.add_to_indexes(all_ids, enc.embedding, enc.codes)
    log.info("%s: %d tiles encoded", Path(scene.path).name, len(all_ids))
    return len(all_ids)
