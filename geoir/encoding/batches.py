"""Stream a scene's tiles in batches, read in-process or by DataLoader worker processes.

Workers read windows themselves (each opens its own dataset handle, see
:class:`geoir.io.scene.SceneReader`); the main process only receives uint8 arrays, so the model never
waits on GDAL when there are enough workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from geoir.tiling.tiler import TileSource


@dataclass(frozen=True, slots=True)
class Batch:
    """Consecutive tiles of a source: their indexes, pixels (N, 3, H, W) uint8 and nodata fractions."""

    indexes: np.ndarray
    rgb: np.ndarray
    nodata_fraction: np.ndarray


class _Indexed:
    """Map-style data set giving ``(index, rgb, nodata_fraction)``, picklable for worker processes."""

    def __init__(self, source: TileSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, float]:
        rgb, frac = self.source[i]
        return i, rgb, frac


def _collate(items: list[tuple[int, np.ndarray, float]]) -> Batch:
    idx, rgb, frac = zip(*items, strict=True)
    return Batch(np.asarray(idx, dtype=np.int64), np.stack(rgb), np.asarray(frac, dtype=np.float64))


def _collate_shared(items: list[tuple[int, np.ndarray, float]]) -> tuple:  # type: ignore[type-arg]
    # In a worker: a torch tensor travels to the main process through shared memory, where a numpy
    # array would be pickled and copied (50 MB a batch of 256 tiles).
    import torch

    b = _collate(items)
    return b.indexes, torch.from_numpy(b.rgb), b.nodata_fraction


def iter_batches(
    source: TileSource, batch_size: int = 64, workers: int = 0, pin_memory: bool = False
) -> Iterator[Batch]:
    """Batches of a source in tile order.

    Args:
        source: The scene's tiles.
        batch_size: Tiles per batch.
        workers: Reader processes (0 reads in this process and does not import torch).
        pin_memory: Put batches in page-locked memory, so a copy to the GPU runs asynchronously.
    """
    if workers <= 0:
        size = source.params.size
        for start in range(0, len(source), batch_size):
            stop = min(start + batch_size, len(source))
            # Each tile is read straight into its slot of the batch: no per-tile array to stack afterwards.
            rgb = np.empty((stop - start, 3, size, size), np.uint8)
            frac = np.empty(stop - start, np.float64)
            for j, i in enumerate(range(start, stop)):
                frac[j] = source.read(i, out=rgb[j]).nodata_fraction
            yield Batch(np.arange(start, stop, dtype=np.int64), rgb, frac)
        return
    import torch
    from torch.utils.data import DataLoader

    from geoir.index.bundle import close_inherited_locks

    # The parent must not hold an open GDAL handle that forked workers would share.
    source.close()
    threads = torch.get_num_threads()
    if pin_memory:
        # Feeding a GPU, this process needs few CPU threads; idle OpenMP threads spin-wait and would
        # take cores from the reader processes. Restored below: the caller's process keeps its own.
        torch.set_num_threads(max(1, min(threads, 2)))
    # _Indexed is a map-style data set (__len__/__getitem__), which DataLoader takes as is.
    loader: DataLoader = DataLoader(
        _Indexed(source),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate_shared,
        prefetch_factor=4,
        persistent_workers=False,
        pin_memory=pin_memory,
        worker_init_fn=close_inherited_locks,
    )
    batches = iter(loader)
    try:
        for indexes, rgb, frac in batches:
            yield Batch(indexes, rgb.numpy(), frac)
    finally:
        torch.set_num_threads(threads)
        # The reader processes end here, also when a read or the caller failed, not when the garbage collector
        # reaches the iterator: forked, they hold the bundle's lock file open, and with it the lock.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
