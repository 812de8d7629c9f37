"""Labelled data sets for training and evaluation, as backbone features computed once and cached.

Two kinds of data set:

* a folder of class folders (``DATASET/CLASS/*.jpg``, like UC Merced): every image is encoded by the
  frozen backbone once; the features are cached under ``$XDG_CACHE_HOME/geoir/features`` keyed by the
  backbone fingerprint and the files' names, sizes and times, so the next run starts training at once;
* a vector file of labelled points or polygons (a ``label`` column) over the scenes of a bundle: the
  tiles under each geometry become training samples, with the backbone features the bundle already
  stores.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geoir.errors import DatasetError
from geoir.io.files import atomic_target
from geoir.training.progress import Progress

log = logging.getLogger("geoir")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp")


@dataclass
class FeatureSet:
    """Backbone features with integer labels.

    Attributes:
        features: ``(N, D)`` float32.
        labels: ``(N,)`` int64 class indexes into ``classes``.
        classes: Class names.
        items: One name per sample (image path relative to the data set, or ``tile:ID``).
        backbone_fingerprint: Fingerprint of the backbone that made the features.
        views: ``(V, N, D)`` features of V augmented copies of every sample (the 7 other flips and quarter
            turns with ``augment="dihedral"``), or None.
        tta: The features are each the mean over a tile's 8 flips and quarter turns (a ``--tta`` bundle's).
    """

    features: np.ndarray
    labels: np.ndarray
    classes: list[str]
    items: list[str]
    backbone_fingerprint: str
    views: np.ndarray | None = None
    tta: bool = False

    def views_of(self, rows: np.ndarray) -> np.ndarray | None:
        """The augmented views of the samples ``rows`` (``(V, len(rows), D)``), or None without views."""
        return None if self.views is None else self.views[:, rows]

    def summary(self) -> dict[str, object]:
        """Counts of samples and classes, and ``items_sha256``: a digest of every item's name and class, equal
        for the same data set wherever it lies on disk (so a model file can say what it was trained on
        without recording a path of the machine that trained it)."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        lines = "".join(f"{item}\t{self.classes[label]}\n" for item, label in zip(self.items, self.labels, strict=True))
        return {
            "samples": len(self.labels),
            "classes": len(self.classes),
            "per_class": dict(zip(self.classes, counts.tolist(), strict=True)),
            "items_sha256": hashlib.sha256(lines.encode("utf-8", "surrogateescape")).hexdigest(),
        }


def list_image_folder(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Images of a folder of class folders, sorted, with their labels.

    Raises:
        DatasetError: The folder is missing, has no class folders, or a class has no image.
    """
    if not root.is_dir():
        raise DatasetError(
            f"{root} is not a folder; pass a folder of class folders (CLASS/*.jpg) or a "
            "GeoPackage with a `label` column"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DatasetError(f"{root} has {len(classes)} class folder(s); training needs at least 2 (CLASS/*.jpg)")
    paths: list[Path] = []
    labels: list[int] = []
    nested: list[Path] = []
    hidden: list[Path] = [
        p for c in root.iterdir() if c.is_dir() and c.name.startswith(".") for p in c.iterdir() if _is_image_name(p)
    ]
    for i, c in enumerate(classes):
        images = [p for p in (root / c).iterdir() if _is_image_name(p)]
        files = sorted(p for p in images if not p.name.startswith("."))
        hidden += [p for p in images if p.name.startswith(".")]
        for p in files:
            if p.is_symlink() and not p.exists():
                raise DatasetError(f"{p} is a broken link (to {os.readlink(p)}); remove it, or fix where it points")
        if not files:
            raise DatasetError(f"class folder {root / c} has no images ({', '.join(IMAGE_SUFFIXES)})")
        paths += files
        labels += [i] * len(files)
        nested += [
            p
            for p in (root / c).glob("*/**/*")
            if _is_image_name(p) and not any(part.startswith(".") for part in p.parts[len(root.parts) :])
        ]
    if hidden:
        log.warning(
            "%d hidden image(s) (named with a leading dot, or in a hidden folder) are left out (e.g. %s); rename "
            "them to count them",
            len(hidden),
            hidden[0].relative_to(root),
        )
    if nested:
        # A class is the images directly in its folder: say what that leaves out, rather than nothing.
        log.warning(
            "%d image(s) in sub-folders of class folders are left out (e.g. %s); a class is the images directly "
            "in CLASS/: move them up to count them",
            len(nested),
            nested[0].relative_to(root),
        )
    return paths, np.asarray(labels, dtype=np.int64), classes


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "geoir" / "features"


def _cache_key(root: Path, paths: list[Path], fingerprint: str) -> str:
    h = hashlib.sha256(fingerprint.encode())
    for p in paths:
        st = p.stat()
        # (surrogateescape: a name that is not UTF-8, as unzipping a Windows archive leaves, is its bytes.)
        h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


AUGMENTS = ("dihedral-codes", "dihedral", "none")
"""Training views: the 7 other flips and quarter turns of every image for the hash head only
(``dihedral-codes``), for every head (``dihedral``), or none."""


def dihedral(img: np.ndarray, view: int) -> np.ndarray:
    """View 0-7 of a ``(C, H, W)`` image: ``view % 4`` quarter turns, then a left-right flip for views 4-7.

    Overhead imagery has no up: a field turned by 90 degrees or mirrored is still the same field, so these
    views teach a head what must not change its vectors.
    """
    out = np.rot90(img, view % 4, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if view >= 4 else out)


def image_folder_features(
    root: str | os.PathLike[str],
    backbone,
    batch_size: int = 64,  # type: ignore[no-untyped-def]
    workers: int = 0,
    progress: Progress | None = None,
    use_cache: bool = True,
    augment: str = "none",
) -> FeatureSet:
    """Backbone features of a folder of class folders (computed once per view, then read from the cache).

    Args:
        augment: One of :data:`AUGMENTS`; all but ``none`` also give the features of the 7 other flips and
            quarter turns of every image (:attr:`FeatureSet.views`; 8 backbone passes the first time).
    """
    if augment not in AUGMENTS:
        raise DatasetError(f"unknown augmentation {augment!r}; use one of {', '.join(AUGMENTS)}")
    root = Path(root)
    paths, labels, classes = list_image_folder(root)
    # An averaging backbone (tta) has its weights' fingerprint but other features: keep them apart; so are
    # features computed on a GPU (in bfloat16 there), which differ a little from the CPU's.
    device = str(getattr(getattr(backbone, "device", None), "type", "cpu"))
    key = _cache_key(
        root,
        paths,
        backbone.fingerprint
        + (":tta" if getattr(backbone, "tta", False) else "")
        + ("" if device == "cpu" else f":{device}"),
    )
    items = [str(p.relative_to(root)) for p in paths]
    n_views = 1 if augment == "none" else 8
    feats = [
        _view_features(root, paths, backbone, key, (v, n_views), batch_size, workers, progress, use_cache)
        for v in range(n_views)
    ]
    views = np.stack(feats[1:]) if n_views > 1 else None
    return FeatureSet(feats[0], labels, classes, items, backbone.fingerprint, views)


def _view_features(
    root: Path,
    paths: list[Path],
    backbone,  # type: ignore[no-untyped-def]
    key: str,
    view_of: tuple[int, int],
    batch_size: int,
    workers: int,
    progress: Progress | None,
    use_cache: bool,
) -> np.ndarray:
    view, n_views = view_of
    # View 0 keeps the cache name it had before views existed.
    cached = cache_dir() / (f"{key}.npz" if view == 0 else f"{key}.view{view}.npz")
    if use_cache and cached.exists():
        try:
            with np.load(cached) as z:
                feats = z["features"]
            width = getattr(backbone, "num_features", None)
            if feats.ndim != 2 or feats.shape[0] != len(paths) or (width is not None and feats.shape[1] != width):
                raise ValueError(f"{feats.shape} features for {len(paths)} images of {width}")
            if not np.isfinite(feats).all():
                raise ValueError("features that are not finite")
            log.info("features of %s (view %d) read from the cache %s", root, view, cached)
            return feats
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("the feature cache %s is damaged (%s); computing the features again", cached, exc)
    label = "features" if n_views == 1 else f"features, view {view + 1}/{n_views}"
    feats = _encode_paths(paths, backbone, batch_size, workers, progress, view, label)
    if use_cache:
        try:
            with atomic_target(cached) as tmp:
                np.savez(tmp, features=feats)
        except OSError as exc:
            # The features are computed: a cache that cannot be written costs the next run, not this one.
            log.warning("cannot write the feature cache %s (%s); set XDG_CACHE_HOME to a writable folder", cached, exc)
    return feats


#: PIL modes of 8-bit images, which convert("RGB") maps faithfully.
_EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


class _ImageFiles:
    """Map-style data set of image files read as uint8 RGB at the backbone's working size."""

    def __init__(self, paths: list[Path], size: int = 256, view: int = 0):
        self.paths = paths
        self.size = size
        self.view = view

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        import warnings

        from PIL import Image

        from geoir.io.images import bomb_size

        path = self.paths[i]
        try:
            with warnings.catch_warnings():
                # Up to twice PIL's limit an image is read, with a warning the message below covers beyond it.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    # PIL reads a 16-bit RGB PNG as mode RGB, keeping the high byte of each value (a near-black
                    # image); 16-bit and float modes it would clip to 255 in convert("RGB"): a white image.
                    if im.mode not in _EIGHT_BIT_MODES or any(";16" in str(t[3]) for t in im.tile):
                        raise DatasetError(f"{path} has {_depth(im)} pixels, not 8-bit; {_EIGHT_BIT_FIX}")
                    rgb = im.convert("RGB")
                    if rgb.size != (self.size, self.size):
                        # Bilinear to a common size so images batch; the backbone then resizes to its input.
                        rgb = rgb.resize((self.size, self.size), Image.Resampling.BILINEAR)
                    return dihedral(np.asarray(rgb).transpose(2, 0, 1), self.view)
        except Image.DecompressionBombError as exc:
            raise DatasetError(
                f"{path} declares {bomb_size(exc)}, too many for a training image (a decompression bomb?); cut it "
                "into tiles (e.g. geoir tile --export-chips) or shrink it"
            ) from exc
        except OSError as exc:
            raster = _raster_kind(path)
            if raster is not None:  # a GeoTIFF PIL cannot read: 16-bit, or more bands than RGB(A)
                count, dtype = raster
                what = "an 8-bit image" if dtype != "uint8" else "an image of 1, 3 or 4 bands"
                raise DatasetError(f"{path} is a {count}-band {dtype} raster, not {what}; {_EIGHT_BIT_FIX}") from exc
            raise DatasetError(f"{path} is not a readable image ({exc}); remove or replace it") from exc


_EIGHT_BIT_FIX = (
    "save the images of the data set as 8-bit PNG or JPEG (stretched as you want them seen; for a scene, "
    "geoir tile --export-chips writes such tiles)"
)


def _depth(im) -> str:  # type: ignore[no-untyped-def]
    """An image's pixel kind for a message: its mode, or "16-bit RGB" where PIL names it RGB."""
    return f"16-bit {im.mode}" if im.mode in _EIGHT_BIT_MODES else im.mode


def _raster_kind(path: Path) -> tuple[int, str] | None:
    """Bands and data type of a file GDAL reads (a GeoTIFF PIL cannot), None for one it cannot read either."""
    import rasterio

    try:
        with rasterio.open(path) as src:
            return src.count, src.dtypes[0]
    except Exception:
        return None


def _encode_paths(
    paths: list[Path],
    backbone,
    batch_size: int,
    workers: int,  # type: ignore[no-untyped-def]
    progress: Progress | None,
    view: int = 0,
    label: str = "features",
) -> np.ndarray:
    import torch
    from torch.utils.data import DataLoader

    # _ImageFiles is a map-style data set (__len__/__getitem__), which DataLoader takes as is.
    loader: DataLoader = DataLoader(
        _ImageFiles(paths, view=view),  # type: ignore[arg-type]
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=lambda items: torch.from_numpy(np.stack(items)),
    )
    bar = progress(len(paths), label, "image") if progress else None
    out = []
    for batch in loader:
        out.append(backbone.features(batch).cpu().numpy())
        if bar is not None:
            bar.update(len(batch))  # type: ignore[attr-defined]
    if bar is not None:
        bar.close()  # type: ignore[attr-defined]
    return np.concatenate(out).astype(np.float32)


def bundle_features(labels_file: str | os.PathLike[str], bundle, label_column: str = "label") -> FeatureSet:  # type: ignore[no-untyped-def]
    """Labelled tiles of a bundle: the tiles that share ground with each labelled geometry of a vector file
    (``FILE`` or ``FILE:LAYER``), as ``geoir search --examples`` selects them: a polygon labels the tiles
    it covers more than 0.1% of (of the smaller area), not those that only touch its edge; a point or line
    labels the tiles it meets.

    Labels are text: surrounding spaces are stripped, whole numbers read as such (``3``, not ``3.0``), and
    geometries with an empty or missing label are left out. A tile under geometries of two different labels
    is ambiguous and left out. Every geometry, tile and class left out is counted in a warning.

    Raises:
        DatasetError: Unreadable file, no ``label`` column, no CRS, or no labelled tile.
    """
    import geopandas as gpd

    from geoir.io.vectors import read_vectors
    from geoir.retrieval.engine import shares_area
    from geoir.tiling.grid import off_the_globe, to_lonlat

    p = Path(labels_file)
    gdf = read_vectors(p, "labels file", DatasetError, "pass a GeoPackage or GeoJSON of labelled points or polygons")
    if label_column not in gdf.columns:
        others = [c for c in gdf.columns if c != gdf.geometry.name]
        near = [c for c in others if c.strip().lower() == label_column.lower()]
        hint = f"rename `{near[0]}` to `{label_column}`" if near else "add one with each geometry's class"
        raise DatasetError(f"{p} has no `{label_column}` column (its columns: {', '.join(others) or 'none'}); {hint}")
    if bundle.model is None:
        raise DatasetError(f"{bundle.path} is not encoded; run `geoir encode --index {bundle.path}` first")
    has_geometry = gdf.geometry.notna() & ~gdf.geometry.is_empty
    shapeless = int((~has_geometry).sum())
    gdf = gdf[has_geometry]
    text = gdf[label_column].map(label_text)
    unlabelled = int(text.isna().sum())
    gdf = to_lonlat(gdf.assign(**{label_column: text})[text.notna()].reset_index(drop=True))
    off = off_the_globe(gdf)
    gdf = gdf[~off].reset_index(drop=True)
    if gdf.empty:
        raise DatasetError(f"{p} has no geometry with a `{label_column}`; label some points or polygons")
    for n, one, many, why in (
        (shapeless, "row", "rows", "no geometry"),
        (unlabelled, "geometry", "geometries", "no label"),
        (int(off.sum()), "geometry", "geometries", "coordinates that its CRS cannot place in lon/lat (mistyped?)"),
    ):
        if n:
            log.warning("%s of %s %s %s: left out", _count(n, one, many), p, "has" if n == 1 else "have", why)
    _warn_case_variants(gdf[label_column], p)
    tiles = bundle.tiles(bbox=tuple(gdf.total_bounds))
    joined = gpd.sjoin(tiles[["tile_id", "geometry"]], gdf[[label_column, "geometry"]], predicate="intersects")
    if not joined.empty:
        footprints = tiles.geometry.values[joined.index.to_numpy()]
        labelled = gdf.geometry.values[joined["index_right"].to_numpy()]
        joined = joined[shares_area(footprints, labelled)]
    n_left = len(gdf) - joined["index_right"].nunique()
    per_tile = joined.groupby("tile_id")[label_column].agg(lambda s: sorted(set(s)))
    ambiguous = int((per_tile.map(len) > 1).sum())
    per_tile = per_tile[per_tile.map(len) == 1].map(lambda v: v[0])
    if per_tile.empty:
        raise DatasetError(f"no tile of {bundle.path} lies under the geometries of {p}; check the area and CRS")
    if n_left:
        log.warning(
            "%d of the %d labelled geometries of %s cover no tile of %s and are left out",
            n_left,
            len(gdf),
            p,
            bundle.path,
        )
    if ambiguous:
        log.warning("%s under geometries of different labels left out", _count(ambiguous, "tile", "tiles"))
    vec = bundle.vectors()
    pos = {int(t): i for i, t in enumerate(vec["ids"])}
    ids = [int(t) for t in per_tile.index if int(t) in pos]
    if len(ids) < len(per_tile):
        # Tiles of scenes tiled with --no-encode have no features yet.
        unencoded = len(per_tile) - len(ids)
        if not ids:
            raise DatasetError(
                f"the {unencoded} tiles under the labels of {p} are not encoded yet; "
                f"run `geoir encode --index {bundle.path}` first"
            )
        log.warning(
            "%d of the %d labelled tiles are not encoded yet and are left out; `geoir encode --index %s` encodes them",
            unencoded,
            len(per_tile),
            bundle.path,
        )
    classes = sorted(set(per_tile.loc[ids]))
    lost = sorted(set(gdf[label_column]) - set(classes))
    if lost:
        log.warning(
            "class%s %s %s no tile left and %s not trained",
            "es" if len(lost) > 1 else "",
            ", ".join(repr(c) for c in lost),
            "have" if len(lost) > 1 else "has",
            "are" if len(lost) > 1 else "is",
        )
    labels = np.array([classes.index(per_tile.loc[t]) for t in ids], dtype=np.int64)
    feats = vec["features"][[pos[t] for t in ids]].astype(np.float32)
    return FeatureSet(
        feats,
        labels,
        classes,
        [f"tile:{t}" for t in ids],
        bundle.model["backbone_fingerprint"],
        tta=bool(bundle.model.get("backbone_tta")),
    )


def label_text(value: object) -> str | None:
    """A label as text: stripped; whole numbers without ``.0`` (a column of integers with a gap reads as
    floats); None for an empty or missing label."""
    import pandas as pd

    if value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value))):  # None, NaN, pd.NA, NaT
        return None
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _warn_case_variants(labels: Any, path: Path) -> None:
    """Warn about labels that differ only in case (``Coast`` and ``coast``): they train as two classes."""
    groups: dict[str, set[str]] = {}
    for label in set(labels):
        groups.setdefault(label.casefold(), set()).add(label)
    for variants in groups.values():
        if len(variants) > 1:
            log.warning(
                "labels %s of %s differ only in case and are trained as different classes; "
                "spell them alike if they are one class",
                " and ".join(repr(v) for v in sorted(variants)),
                path,
            )
