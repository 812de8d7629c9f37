"""Tile scenes into a bundle: the job behind ``geoir tile`` (and the Python API's ``tile``)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import rasterio

from geoir.errors import BundleError, SceneError, TilingError, user_message
from geoir.index.bundle import Bundle
from geoir.io.files import atomic_write_text, file_mode, made_folder
from geoir.io.scene import CHIPS_MARKER, Scaling, Scene, band_numbers, expand_inputs, open_scene, stretch_scaling
from geoir.tiling.grid import Tile, TilingParams
from geoir.tiling.tiler import TileSource

if TYPE_CHECKING:
    from geoir.encoding.batches import Batch
    from geoir.encoding.model import Encoded, Model

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
    #: Scenes removed because their file (same path) changed and was indexed again.
    replaced_scenes: list[str] = field(default_factory=list)
    tiles_added: int = 0
    tiles_skipped_nodata: int = 0
    #: Scenes catalogued before without vectors (``--no-encode``), encoded by this run.
    encoded_scenes: list[str] = field(default_factory=list)
    #: Files left out as unreadable (``skip_unreadable``): their paths and why.
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def prepare_scenes(
    inputs: Sequence[str],
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    exclude: Sequence[str | os.PathLike[str]] = (),
    unreadable: list[tuple[str, str]] | None = None,
    stretch: Sequence[float] | None = None,
) -> list[Scene]:
    """Expand (leaving out the folders in ``exclude``) and open every input before anything is written, so
    bad input changes nothing.

    Args:
        unreadable: When given, a file that cannot be opened as a scene (not a raster, no CRS, bands out of
            range...) is left out with a warning and listed here as (path, reason), instead of stopping.
    """
    bands = band_numbers(bands)  # a bad type is the caller's, not a file's: never skipped as unreadable
    stretch_scaling(stretch)  # the same
    scenes = []
    for p in expand_inputs(inputs, exclude):
        try:
            scenes.append(open_scene(p, bands=bands, nodata=nodata, stretch=stretch))
        except SceneError as exc:
            if unreadable is None:
                raise
            skip_unreadable_file(unreadable, str(p), exc)
    guessed = [s for s in scenes if s.colours_guessed]
    if guessed:
        # One line for the run: an archive of such files is common, and the choice is the same for each.
        others = f" and {len(guessed) - 1} other scene(s)" if len(guessed) > 1 else ""
        log.warning(
            "%s%s: the bands do not say which colour they are, so bands %s are read as red, green, blue; if they "
            "are not, pass --bands (a Landsat 8/9 stack of B2,B3,B4 is blue, green, red: --bands 3,2,1), and if "
            "they are, --bands 1,2,3 says so",
            guessed[0].path,
            others,
            ",".join(map(str, guessed[0].bands)),
        )
    return scenes


def nothing_readable(unreadable: list[tuple[str, str]]) -> SceneError:
    """The error of a run whose every file was left out as unreadable."""
    return SceneError(
        f"none of the {len(unreadable)} file(s) given could be read ({unreadable[0][1]}"
        f"{'; and others, in the warnings above' if len(unreadable) > 1 else ''}); fix or replace them"
    )


def skip_unreadable_file(unreadable: list[tuple[str, str]], path: str, exc: BaseException) -> None:
    """Record and warn about a file left out as unreadable."""
    reason = user_message(exc)
    unreadable.append((path, reason))
    log.warning("skipped: %s", reason)


def tile_scenes(
    bundle: Bundle,
    scenes: Sequence[Scene],
    model: Model | None = None,
    chips_dir: Path | None = None,
    progress: ProgressFactory | None = None,
    batch_size: int = 64,
    workers: int = 0,
    skip_unreadable: bool = False,
) -> TileReport:
    """Tile scenes into ``bundle`` (which the caller has locked), encoding them when a model is given.

    Scenes already in the bundle are skipped; a file indexed before whose content changed is indexed again
    and its earlier tiles removed. Each scene is committed on its own (vectors, then tiles,
    then the scene row, then the in-memory FAISS indexes), so an interrupted run keeps every finished
    scene; the index files are saved once, at the end (a killed run's are rebuilt from the vectors).

    Args:
        bundle: An open bundle; its tiling parameters apply.
        scenes: Scenes from :func:`prepare_scenes`.
        model: Encode kept tiles with this model (None: catalog only).
        chips_dir: Also write each kept tile as a small GeoTIFF here.
        progress: Makes a progress bar for each scene (none when None).
        batch_size: Tiles per batch.
        workers: Reader processes feeding the model (0: read in this process).
        skip_unreadable: A scene whose pixels cannot be read (a damaged file) is left out with a warning,
            its chips removed, and listed in the report's ``unreadable``; without it, the run stops there
            (keeping the scenes committed before it).
    """
    report = TileReport()
    known = KnownScenes(bundle, model)
    params = bundle.params
    for scene in scenes:
        if known.handle(scene, report, batch_size, workers, progress):
            continue
        source = TileSource(scene, params)
        _describe(source)
        bar = progress(len(source), Path(scene.path).name) if progress else None
        written: list[Path] = []
        black, unmarked = [0], fill_unmarked(scene)

        def kept(
            batch: Batch,
            keep: np.ndarray,
            scene: Scene = scene,
            source: TileSource = source,
            written: list[Path] = written,
            black: list[int] = black,
            unmarked: bool = unmarked,
        ) -> None:
            if unmarked:
                black[0] += black_tiles(batch.rgb, keep)
            if chips_dir is not None:
                for j in np.flatnonzero(keep):
                    i = int(batch.indexes[j])
                    # Batches carry no masks; the few partly valid tiles are re-read for theirs.
                    full = batch.nodata_fraction[j] == 0
                    valid = np.ones(batch.rgb.shape[2:], bool) if full else source.read(i).valid
                    written.append(write_chip(chips_dir, scene, source.tiles[i], batch.rgb[j], valid))

        started = time.perf_counter()
        try:
            idx, fracs, enc = read_and_encode(source, model, batch_size, workers, bar, on_kept=kept)
        except SceneError as exc:
            if not skip_unreadable:
                raise
            for chip in written:  # a scene left out leaves no chips either
                chip.unlink(missing_ok=True)
            skip_unreadable_file(report.unreadable, scene.path, exc)
            continue
        took = time.perf_counter() - started
        log.debug(
            "%s: %d tiles %s in %.1f s (%.1f tiles/s; batch size %d, reader processes %d)",
            Path(scene.path).name,
            len(source),
            "read and encoded" if model is not None else "read",
            took,
            len(source) / max(took, 1e-9),
            batch_size,
            workers,
        )
        commit_scene(bundle, source, idx, fracs, enc, report, black=black[0])
        known.have.add(scene.id)
    try:
        bundle.flush_indexes()
    except BundleError as exc:
        raise BundleError(
            f"{exc}; the scenes added are committed, and the next search or tile rebuilds the index from their vectors"
        ) from exc
    return report


class KnownScenes:
    """The start of a tiling run into ``bundle``, and what it does with scenes the bundle already holds.

    Creating it finishes what an interrupted run left (its uncommitted tiles) and binds ``model`` to the bundle.
    """

    def __init__(self, bundle: Bundle, model: Model | None) -> None:
        removed = bundle.reconcile()
        if removed:
            log.info("removed %d tiles left by an interrupted run", removed)
        if model is not None:
            bundle.bind_model(model.describe())
        self.bundle, self.model = bundle, model
        self.have = bundle.scene_ids()
        self.encoded = set(bundle.encoded_scene_ids()) if model is not None else set()
        self.records = {r["id"]: r for r in bundle.scene_records()}

    def handle(
        self,
        scene: Scene,
        report: TileReport,
        batch_size: int = 64,
        workers: int = 0,
        progress: ProgressFactory | None = None,
    ) -> bool:
        """Whether ``scene`` is in the bundle already, after seeing to it: a moved file's path followed, a scene
        catalogued without vectors (``--no-encode``) encoded here when there is a model, earlier versions of a
        changed file that a killed run left removed."""
        bundle, model = self.bundle, self.model
        if scene.id not in self.have:
            return False
        record = self.records.get(scene.id)
        old_path = (record or {}).get("path", scene.path)
        if old_path != scene.path and not Path(old_path).exists():
            # The file was moved or renamed (same content): follow it, so encode, --scene and hits find it.
            bundle.move_scene(scene.id, scene.path)
            log.info("%s is already in %s, as %s, which is gone: its path is updated", scene.path, bundle.path,
                     old_path)  # fmt: skip
        elif model is None or scene.id in self.encoded:
            log.info("%s is already in %s; skipped", scene.path, bundle.path)
        _warn_if_read_otherwise(record, scene, bundle)
        if model is not None and scene.id not in self.encoded and record is not None:
            # Catalogued by a run without a model (--no-encode): a run with one encodes it now, as stored.
            from geoir.encoding.run import encode_catalogued_scene

            encode_catalogued_scene(bundle, {**record, "path": scene.path}, model, batch_size, workers, progress)
            report.encoded_scenes.append(scene.id)
            self.encoded.add(scene.id)
        else:
            report.skipped_scenes.append(scene.id)
        # A run killed between committing a changed file and removing its old scene left both.
        _remove_earlier_versions(bundle, scene, report)
        return True


def read_and_encode(
    source: TileSource,
    model: Model | None,
    batch_size: int = 64,
    workers: int = 0,
    bar: ProgressBar | None = None,
    select: np.ndarray | None = None,
    on_kept: Callable[[Batch, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, Encoded | None]:
    """Stream a scene's tiles, keep those under the nodata limit (and in ``select``), encode them.

    Args:
        source: The scene's tiles.
        model: Encoder (None: only read and filter).
        batch_size: Tiles per batch.
        workers: Reader processes.
        bar: Progress bar advanced per tile read.
        select: Optional boolean mask over ``source.tiles``: only these may be kept.
        on_kept: Called with each batch and its keep mask (e.g. to write chips).

    Returns:
        Indexes of the kept tiles (ascending), their nodata fractions, and their vectors.
    """
    from geoir.encoding.batches import iter_batches

    kept_idx: list[np.ndarray] = []
    fracs: list[np.ndarray] = []
    encoded: list[Encoded] = []
    try:
        for batch in iter_batches(source, batch_size, workers, pin_memory=on_cuda(model)):
            keep = source.keep(batch.nodata_fraction)
            if select is not None:
                keep &= select[batch.indexes]
            if keep.any():
                kept_idx.append(batch.indexes[keep])
                fracs.append(batch.nodata_fraction[keep])
                if model is not None:
                    import torch

                    from geoir.encoding.model import Encoded

                    e = model.encode(torch.from_numpy(batch.rgb[keep]))
                    # Kept as the bundle stores them (features in float16, no continuous codes), not as
                    # computed: a scene's vectors wait in memory until it is committed.
                    encoded.append(Encoded(e.features.astype(np.float16), e.embedding, e.codes))
                if on_kept is not None:
                    on_kept(batch, keep)
            if bar is not None:
                bar.update(len(batch.indexes))
    except RuntimeError as exc:
        # torch's DataLoader when a reader process dies (the kernel's out-of-memory killer, a kill -9).
        if "DataLoader worker" not in str(exc):
            raise
        raise SceneError(
            f"{source.scene.path}: a reader process stopped ({str(exc).splitlines()[0]}); out of memory? "
            f"run again with fewer --workers (0 reads in the main process) or a smaller --batch-size"
        ) from exc
    finally:
        source.close()
        if bar is not None:
            bar.close()
    idx = np.concatenate(kept_idx) if kept_idx else np.empty(0, np.int64)
    frac = np.concatenate(fracs) if fracs else np.empty(0)
    return idx, frac, model.concat(encoded) if model is not None else None


def fill_unmarked(scene: Scene) -> bool:
    """Whether black fill in ``scene`` would go unnoticed: 8-bit data used as it is, with no nodata value, mask or
    alpha (other data's fill of 0 is found by its statistics: :func:`geoir.io.scene.open_scene` warns)."""
    return scene.dtype == "uint8" and scene.scaling.identity and scene.mask_kind == "none"


def black_tiles(rgb: np.ndarray, keep: np.ndarray | None = None) -> int:
    """How many tiles of a batch ``(n, 3, H, W)`` (those in ``keep``) are 0 in every band and pixel."""
    rows = range(len(rgb)) if keep is None else np.flatnonzero(keep)
    return int(sum(not rgb[j].any() for j in rows))


def commit_scene(
    bundle: Bundle,
    source: TileSource,
    kept_idx: np.ndarray,
    fracs: np.ndarray,
    enc: Encoded | None,
    report: TileReport,
    black: int = 0,
) -> None:
    """Commit one scene's kept tiles: vectors, then tiles and the scene row, then the FAISS indexes.

    Args:
        bundle: The locked bundle.
        source: The scene's tile source (grid and tiles).
        kept_idx: Indexes into ``source.tiles`` of the kept tiles, ascending.
        fracs: Their nodata fractions.
        enc: Their vectors, row for row (None: catalog only).
        report: Updated with what was added.
        black: How many kept tiles are black in every pixel (see :func:`fill_unmarked`): said, as likely fill.
    """
    scene = source.scene
    kept = [source.tiles[i] for i in kept_idx]
    ids = np.array([t.id for t in kept], dtype=np.int64)
    if enc is not None:
        bundle.write_vectors(scene.id, ids, enc.features, enc.embedding, enc.codes)
    bundle.add_scene(
        scene,
        source.grid_transform,
        (source.grid_width, source.grid_height),
        source.scene_footprint_lonlat(),
        kept,
        fracs,
        source.footprints_lonlat(kept),
    )
    if enc is not None and len(ids):
        bundle.add_to_indexes(ids, enc.embedding, enc.codes)
    _remove_earlier_versions(bundle, scene, report)
    report.added_scenes.append(scene.id)
    report.tiles_added += len(kept)
    report.tiles_skipped_nodata += len(source) - len(kept)
    if not kept:
        log.warning(
            "%s gave no tile: all %d are over the nodata limit (%g); is the tile size (%d px) larger than the scene?",
            scene.path,
            len(source),
            bundle.params.max_nodata,
            bundle.params.size,
        )
    if black:
        # A wholly black 8-bit tile is fill, not ground, and it would come back for every dark query.
        log.warning(
            "%s: %d of its %d tiles are black in every pixel (0 in every band) and the file sets no nodata value; if "
            "0 is fill there, `geoir remove %s --index %s` and tile it again with --nodata 0 (or set it in the file: "
            "rio edit-info --nodata 0 %s)",
            scene.path,
            black,
            len(kept),
            Path(scene.path).name,
            bundle.path,
            Path(scene.path).name,
        )
    log.info(
        "%s: %d tiles added (%d skipped over the nodata limit)",
        Path(scene.path).name,
        len(kept),
        len(source) - len(kept),
    )


def chip_name(scene: Scene, tile: Tile) -> str:
    """File name of a chip: scene file stem, grid row/col offsets, tile id."""
    return f"{Path(scene.path).stem}_r{int(tile.window.row_off)}_c{int(tile.window.col_off)}_{tile.id}.tif"


#: File systems' limit on a file name, in bytes (ext4, XFS, APFS, NTFS's 255 UTF-16 units hold at least this).
NAME_MAX = 255


def check_chip_names(scene: Scene, params: TilingParams) -> None:
    """Refuse, before any work, a scene whose longest chip name (:func:`chip_name`) would not fit a file name."""
    _, width, height = scene.grid(params.gsd)
    longest = f"{Path(scene.path).stem}_r{height}_c{width}_{2**63 - 1}.tif"
    over = len(longest.encode()) - NAME_MAX
    if over > 0:
        raise TilingError(
            f"{scene.path}: its chip names would be up to {len(longest.encode())} bytes, over the {NAME_MAX}-byte "
            f"limit on a file name; rename the scene file {over} bytes shorter, or leave out --export-chips"
        )


@contextlib.contextmanager
def chips_folder(folder: Path) -> Iterator[Path]:
    """Create the chips folder (and those missing above it) for a run; if the run fails before its first chip
    stays, remove them again, :data:`CHIPS_MARKER` included."""
    with made_folder(folder):
        try:
            yield folder
        except BaseException:
            marker = folder / CHIPS_MARKER
            if marker.is_file() and [p.name for p in folder.iterdir()] == [CHIPS_MARKER]:
                marker.unlink(missing_ok=True)
            raise


def write_chip(chips_dir: Path, scene: Scene, tile: Tile, rgb: np.ndarray, valid: np.ndarray) -> Path:
    """Write a tile as a GeoTIFF (uint8 RGB as the model sees it, with its own transform, CRS and mask)."""
    out = chips_dir / chip_name(scene, tile)
    marker = chips_dir / CHIPS_MARKER
    if not marker.exists():
        atomic_write_text(
            marker,
            "geoir tile --export-chips wrote the chips in this folder. A geoir tile run over a folder above it "
            "leaves them out (they are tiles of scenes already indexed); name this folder to tile them.\n",
        )
    fd, tmp = tempfile.mkstemp(dir=chips_dir, prefix=".chip.", suffix=".tif")
    os.fchmod(fd, file_mode(out))  # mkstemp makes it 0600: the umask's, as any file the user creates
    os.close(fd)
    try:
        with rasterio.open(
            tmp,
            "w",
            driver="GTiff",
            width=rgb.shape[2],
            height=rgb.shape[1],
            count=3,
            dtype="uint8",
            crs=scene.crs,
            transform=tile.transform,
            photometric="RGB",
            compress="deflate",
        ) as dst:
            dst.write(rgb)
            if not valid.all():
                dst.write_mask(valid.astype(np.uint8) * 255)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _describe(source: TileSource) -> None:
    """With -v: how a scene is read (CRS, size, bands, scaling, mask) and the grid it is cut into."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    scene, params = source.scene, source.params
    stretch = (
        "none (uint8)"
        if scene.scaling.identity
        else ", ".join(
            f"{lo:g}..{hi:g}" for lo, hi in zip(scene.scaling.low or (), scene.scaling.high or (), strict=True)
        )
    )
    log.debug(
        "%s: %s, %d x %d px of %s at %.3g m, bands %s, stretch %s, invalid pixels by %s, nodata %s",
        Path(scene.path).name,
        scene.crs.to_string(),
        scene.width,
        scene.height,
        scene.dtype,
        scene.native_gsd,
        ",".join(map(str, scene.bands)),
        stretch,
        scene.mask_kind,
        scene.nodata,
    )
    log.debug(
        "%s: grid %d x %d px (%s), %d tiles of %d px every %d px",
        Path(scene.path).name,
        source.grid_width,
        source.grid_height,
        "native" if params.gsd is None else f"resampled to {params.gsd:g} m",
        len(source),
        params.size,
        params.stride,
    )


def on_cuda(model: Model | None) -> bool:
    return model is not None and model.backbone.device.type == "cuda"


def _remove_earlier_versions(bundle: Bundle, scene: Scene, report: TileReport) -> None:
    """Remove the scenes of ``scene``'s path with other content: the file changed since they were indexed,
    so their tiles describe pixels that are gone. Called once ``scene`` is committed, never before."""
    for old in [sid for sid in bundle.scene_ids_at(scene.path) if sid != scene.id]:
        n = bundle.remove_scene(old)
        report.replaced_scenes.append(old)
        log.warning("%s changed since it was indexed: its %d earlier tiles (scene %s) are replaced", scene.path, n, old)


def _warn_if_read_otherwise(record: dict | None, scene: Scene, bundle: Bundle) -> None:  # type: ignore[type-arg]
    """A scene skipped as already there keeps the bands, nodata and stretch it was tiled with: say so when asked
    otherwise."""
    if record is None:
        return
    asked = {"bands": ",".join(map(str, scene.bands)), "nodata": scene.nodata, "stretch": _stretch(scene.scaling)}
    had = {
        "bands": ",".join(map(str, record["bands"])),
        "nodata": record["nodata"],
        "stretch": _stretch(Scaling.from_dict(record["scaling"])),
    }
    differ = [k for k in asked if asked[k] != had[k] and not (asked[k] != asked[k] and had[k] != had[k])]  # NaN
    if differ:

        def option(k: str, value: object) -> str:
            if k == "stretch":  # "--stretch LOW,HIGH", "" (the file's statistics) or None (8-bit, as it is)
                return str(value) if value else "its own 2-98% stretch" if value == "" else "its 8-bit values as is"
            if value is None:
                return f"no --{k}"
            return f"--{k} {value:g}" if isinstance(value, float) else f"--{k} {value}"

        log.warning(
            "%s was tiled into %s with %s; it is kept so: `geoir remove %s --index %s`, then tile it again, to use %s",
            scene.path,
            bundle.path,
            ", ".join(option(k, had[k]) for k in differ),
            Path(scene.path).name,
            bundle.path,
            ", ".join(option(k, asked[k]) for k in differ),
        )


def _stretch(scaling: Scaling) -> str | None:
    """A scene's stretch for messages: ``--stretch LOW,HIGH`` as given, ``""`` for the file's own statistics, None
    for 8-bit data used as it is."""
    if scaling.low is None or scaling.high is None:
        return None
    if not scaling.fixed:
        return ""
    pairs = [f"{lo:g},{hi:g}" for lo, hi in zip(scaling.low, scaling.high, strict=True)]
    return "--stretch " + (pairs[0] if len(set(pairs)) == 1 else ",".join(pairs))
