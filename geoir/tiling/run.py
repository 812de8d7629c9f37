"""Tile scenes into a bundle: the job behind ``geoir tile`` (and the Python API's ``tile``)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import rasterio

from geoir.errors import BundleError
from geoir.index.bundle import Bundle
from geoir.io.scene import Scene, expand_inputs, open_scene
from geoir.tiling.grid import Tile
from geoir.tiling.tiler import TileRead, TileSource

log = logging.getLogger("geoir")



class ProgressBar(Protocol):
    """What a progress display must offer (tqdm does)."""

    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


#: Factory ``(total, label) -> ProgressBar``; the CLI passes one that makes tqdm bars.
ProgressFactory = Callable[[int, str], ProgressBar]


@dataclass
class TileReport:
    """What a tiling run did."""

    added_scenes: list[str] = field(default_factory=list)
    skipped_scenes: list[str] = field(default_factory=list)
    tiles_added: int = 0
    tiles_skipped_nodata: int = 0


def prepare_scenes(
    inputs: Sequence[str], bands: Sequence[int] | None = None, nodata: float | None = None
) -> list[Scene]:
    """Expand and open every input before anything is written, so bad input changes nothing."""
    return [open_scene(p, bands=bands, nodata=nodata) for p in expand_inputs(inputs)]


def tile_scenes(
    bundle: Bundle,
    scenes: Sequence[Scene],
    chips_dir: Path | None = None,
    progress: ProgressFactory | None = None,
) -> TileReport:
    """Tile scenes into ``bundle`` (which the caller has locked), skipping scenes already there.

    Args:
        bundle: An open bundle; its tiling parameters apply.
        scenes: Scenes from :func:`prepare_scenes`.
        chips_dir: Also write each kept tile as a small GeoTIFF here.
        progress: Makes a progress bar for each scene (none when None).
    """
    report = TileReport()
    removed = bundle.reconcile()
    if removed:
        log.info("removed %d tiles left by an interrupted run", removed)
    have = bundle.scene_ids()
    params = bundle.params
    for scene in scenes:
        if scene.id in have:
            log.info("%s is already in %s; skipped", scene.path, bundle.path)
            report.skipped_scenes.append(scene.id)
            continue
        source = TileSource(scene, params)
        bar = progress(len(source), Path(scene.path).name) if progress else None
        kept: list[Tile] = []
        fracs: list[float] = []
        try:
            for i in range(len(source)):
                read = source.read(i)
                if bar is not None:
                    bar.update(1)
                if not source.keep(read.nodata_fraction):
                    report.tiles_skipped_nodata += 1
                    continue
                kept.append(read.tile)
                fracs.append(read.nodata_fraction)
                if chips_dir is not None:
                    write_chip(chips_dir, scene, read)
        finally:
            source.close()
            if bar is not None:
                bar.close()
        bundle.add_scene(
            scene,
            source.grid_transform,
            (source.grid_width, source.grid_height),
            source.scene_footprint_lonlat(),
            kept,
            fracs,
            source.footprints_lonlat(kept),
        )
        have.add(scene.id)
        report.added_scenes.append(scene.id)
        report.tiles_added += len(kept)
        log.info(
            "%s: %d tiles added (%d skipped over the nodata limit)",
            Path(scene.path).name,
            len(kept),
            len(source) - len(kept),
        )
    return report


def chip_name(scene: Scene, tile: Tile) -> str:
    """File name of a chip: scene file stem, grid row/col offsets, tile id."""
    return f"{Path(scene.path).stem}_r{int(tile.window.row_off)}_c{int(tile.window.col_off)}_{tile.id}.tif"


def write_chip(chips_dir: Path, scene: Scene, read: TileRead) -> Path:
    """Write a tile as a GeoTIFF (uint8 RGB as the model sees it, with its own transform and CRS)."""
    out = chips_dir / chip_name(scene, read.tile)
    fd, tmp = tempfile.mkstemp(dir=chips_dir, prefix=".chip.", suffix=".tif")
    os.close(fd)
    try:
        with rasterio.open(
            tmp,
            "w",
            driver="GTiff",
            width=read.rgb.shape[2],
            height=read.rgb.shape[1],
            count=3,
            dtype="uint8",
            crs=scene.crs,
            transform=read.tile.transform,
            photometric="RGB",
            compress="deflate",
        ) as dst:
            dst.write(read.rgb)
            if read.nodata_fraction > 0:
                dst.write_mask(read.valid.astype(np.uint8) * 255)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def check_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` if needed and make sure files can be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".geoir-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise BundleError(f"cannot write {what} {path} ({exc.strerror}); pick a writable directory") from exc
