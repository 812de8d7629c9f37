"""Cut a scene into tiles: which windows to read, reading them, and skipping the empty ones.

:class:`TileSource` is a map-style data set (``__len__``/``__getitem__``), so the same object feeds a
plain loop when only tiling and a ``torch.utils.data.DataLoader`` with worker processes when encoding;
each worker reopens the raster itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from rasterio.enums import Resampling

from geoir.errors import TilingError
from geoir.io.scene import Scene, SceneReader
from geoir.tiling.grid import MAX_TILES_PER_SCENE, Tile, TilingParams, footprints, make_tiles, tile_count


@dataclass(frozen=True, slots=True)
class TileRead:
    """A tile with its pixels: scaled uint8 RGB (3, size, size), valid-pixel mask, invalid fraction."""

    tile: Tile
    rgb: np.ndarray
    valid: np.ndarray
    nodata_fraction: float


def check_grid(scene: Scene, params: TilingParams) -> None:
    """Refuse a grid of more than :data:`MAX_TILES_PER_SCENE` tiles before any is made (creates nothing).

    Raises:
        TilingError: The scene's grid at ``params`` would give too many tiles (a --gsd far finer than the
            scene's, or a tiny --size or --stride).
    """
    _, width, height = scene.grid(params.gsd)
    n = tile_count(width, height, params.size, params.stride)
    if n > MAX_TILES_PER_SCENE:
        at = f" at --gsd {params.gsd:g} (the scene's own is {scene.native_gsd:.3g} m)" if params.gsd else ""
        raise TilingError(
            f"{scene.path}: tiles of {params.size} px every {params.stride} px{at} would be {n:,}; at most "
            f"{MAX_TILES_PER_SCENE:,} per scene: give a larger --size, --stride or --gsd"
        )


class TileSource:
    """All candidate tiles of one scene, read on demand.

    Args:
        scene: The scene, as returned by :func:`geoir.io.scene.open_scene`.
        params: Tiling parameters of the bundle.
        resampling: Resampling used when a target GSD rescales the grid.
    """

    def __init__(self, scene: Scene, params: TilingParams, resampling: Resampling = Resampling.bilinear):
        self.scene = scene
        self.params = params
        self.grid_transform, self.grid_width, self.grid_height = scene.grid(params.gsd)
        check_grid(scene, params)
        self.tiles: list[Tile] = list(
            make_tiles(
                scene.id, scene.fingerprint, self.grid_transform, self.grid_width, self.grid_height, scene.crs, params
            )
        )
        self.reader = SceneReader(scene, params.gsd, resampling)

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> tuple[np.ndarray, float]:
        """Pixels of tile ``i`` and its invalid-pixel fraction (a tuple, so DataLoader can collate it)."""
        read = self.read(i)
        return read.rgb, read.nodata_fraction

    def read(self, i: int, out: np.ndarray | None = None) -> TileRead:
        """Tile ``i`` with its pixels (written into ``out``, a (3, size, size) uint8 array, when given)."""
        rgb, valid = self.reader.read(self.tiles[i].window, out=out)
        # count_nonzero / size is the same float64 as valid.mean(), twenty times faster on a bool array.
        return TileRead(self.tiles[i], rgb, valid, float(1.0 - np.count_nonzero(valid) / valid.size))

    def keep(self, nodata_fraction: float | np.ndarray) -> np.ndarray:
        """Whether tiles with these invalid fractions are kept (at most ``max_nodata``; never an empty tile)."""
        f = np.asarray(nodata_fraction)
        return (f <= self.params.max_nodata) & (f < 1.0)

    def footprints_lonlat(self, tiles: list[Tile]) -> np.ndarray:
        """EPSG:4326 footprints (densified, reprojected) of some of this scene's tiles."""
        return footprints(self.grid_transform, [t.window for t in tiles], self.scene.crs)

    def scene_footprint_lonlat(self) -> shapely.Polygon:
        """EPSG:4326 footprint of the whole scene."""
        from rasterio.windows import Window

        win = Window(0, 0, self.grid_width, self.grid_height)
        return footprints(self.grid_transform, [win], self.scene.crs)[0]

    def close(self) -> None:
        self.reader.close()
