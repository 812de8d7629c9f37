"""The index bundle: a directory holding the manifest, the tile catalog and (later) the vectors.

Layout::

    geoir-index/
      manifest.json   format version, tiling parameters, model fingerprint, counts (atomic replace)
      catalog.gpkg    layers `scenes` and `tiles` (EPSG:4326 footprints, R-tree index)
      vectors/        one SCENE_ID.npz per encoded scene: tile ids, backbone features (float16),
                      embeddings (float32), packed binary codes (uint8)
      float.faiss     FAISS index of the embeddings, keyed by tile id
      binary.faiss    FAISS binary index of the codes (models with a hash head)
      .lock           advisory lock held by the process writing the bundle
      .index.lock     advisory lock held while an index file is saved (by a writer, or a search that rebuilt it)

Crash safety: a scene is committed by its row in the `scenes` layer, written *after* its tiles.
Tiles whose scene has no row (a run killed mid-scene) are invisible to readers and deleted by the
next writer, so an interrupted ``geoir tile`` leaves a valid bundle and a re-run resumes cleanly.
A scene's vectors are written (temp file + rename) before its row; the FAISS indexes after it. The
index files are rewritten once per writing session (when the lock is released), not after every scene,
since each write costs the whole index. An index whose ids disagree with the committed, encoded scenes
(a run killed before that write) is rebuilt from the vector files when the bundle is next used.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely
import shapely.affinity
from pyogrio.errors import DataLayerError, DataSourceError

from geoir import __version__
from geoir.errors import BundleError, GeoirError, ModelError
from geoir.io.files import atomic_write_text, check_writable_folder, ensure_writable_dir, pid_is_running, write_reason
from geoir.io.scene import Scene, epsg_code
from geoir.output.writers import add_styles, style
from geoir.tiling.grid import Tile, TilingParams, window_polygons

#: How far beyond +-180 degrees a footprint across the antimeridian may reach (a tile of 256 px at 300 m
#: is under a degree wide below 80 degrees of latitude); :meth:`Bundle.tiles_at` looks no further.
_WRAP_MARGIN = 20.0

if TYPE_CHECKING:
    from geoir.index.vectors import VectorIndex

log = logging.getLogger("geoir")

FORMAT = "geoir-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CATALOG = "catalog.gpkg"
VECTORS = "vectors"
INDEX_FILES = {"float": "float.faiss", "binary": "binary.faiss"}
DEFAULT_INDEX = "geoir-index"

TILE_COLUMNS = ["tile_id", "scene_id", "col_off", "row_off", "width", "height", "nodata_fraction"]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def discard_if_unused(path: str | os.PathLike[str]) -> Iterator[None]:
    """Remove the bundle the block creates at ``path`` when the block fails before it holds any tile.

    A run that fails (bad input, an unreadable scene, Ctrl-C) before committing a tile to a new bundle
    would otherwise leave a manifest behind that fixes its model and index kinds for the next run. A
    bundle that already existed, or one that holds committed tiles, is kept: every committed scene is
    whole. A directory that existed (empty) before is emptied, not removed. Only a bundle this block itself
    created is touched: a folder that held anything else, or a bundle another process created meanwhile
    (two runs starting on one new --index), is left alone.
    """
    p = Path(path)
    if (p / MANIFEST).exists():
        yield
        return
    existed = p.is_dir()
    if existed and _holds_files(p):
        yield  # not a bundle, and not empty: creating one there is refused, and nothing of it is ours
        return
    created: set[str] = set()
    token = _CREATED_HERE.set(created)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            if p.is_dir() and str(p.resolve()) in created:
                _remove_if_unused(p, existed)
        raise
    finally:
        _CREATED_HERE.reset(token)


#: File descriptors of the bundle locks this process holds. A forked reader process inherits them, and with
#: them the lock (flock belongs to the open file, not the process): it closes its copies
#: (:func:`close_inherited_locks`), so a writer killed outright frees its bundle at once, not when its
#: orphaned readers end.
HELD_LOCKS: set[int] = set()


def close_inherited_locks(*_: object) -> None:
    """In a forked reader process: close the copies of the parent's bundle locks (a DataLoader worker_init_fn)."""
    for fd in list(HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    HELD_LOCKS.clear()


def _canonical(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, sort_keys=True)


def _holds_files(folder: Path) -> bool:
    """Whether a folder holds anything but a lock file (which a run that lost a race to create a bundle there
    may leave behind): an empty folder may become a bundle."""
    return any(child.name not in (".lock", ".index.lock") for child in folder.iterdir())


def _remove_if_unused(p: Path, existed: bool) -> None:
    """Remove (or empty, where the folder ``existed``) the new bundle at ``p`` unless it holds tiles or another
    process writes it: one that started on the same new --index may have opened this bundle and be tiling into
    it, its first tile not yet committed. The removal holds the bundle's lock, so no writer starts meanwhile."""
    fd = os.open(p / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.debug("kept the new bundle %s: another geoir process is writing it", p)
            return
        mf = p / MANIFEST
        if mf.exists() and json.loads(mf.read_text())["counts"]["tiles"]:
            return
        if existed:
            for child in p.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        else:
            shutil.rmtree(p)
        log.debug("removed the unused new bundle %s", p)
    finally:
        os.close(fd)


def _check_manifest(manifest: dict[str, Any], mf: Path) -> None:
    """Refuse a manifest without the entries every reader relies on (an edited or foreign file)."""
    try:
        TilingParams(**manifest["tiling"])
        counts = manifest["counts"]
        if not all(isinstance(counts[k], int) and counts[k] >= 0 for k in ("scenes", "tiles")):
            raise ValueError("counts")
        model = manifest.get("model")
        if not isinstance(model, dict | None) or not isinstance(manifest.get("index", {}), dict):
            raise ValueError("model")
        if model is not None and not isinstance(model.get("fingerprint"), str):
            raise ValueError("model fingerprint")
    except (KeyError, TypeError, ValueError, GeoirError) as exc:
        raise BundleError(
            f"{mf} is corrupt (bad or missing {exc}); restore it from a backup or re-create the bundle"
        ) from exc


def _left_by_a_dead_process(name: str) -> bool:
    """Whether a dot-file of a bundle's folder is a temp file whose writer is no longer running.

    Temp names carry their writer's pid (``.manifest.json.PID.XXXX.tmp.json``, ``.float.faiss.PID.XXXX.tmp``,
    ``.manifest.json.PID.new``); the catalog's temp file is written by the lock holder alone."""
    if name == ".catalog.tmp.gpkg":
        return True
    if ".tmp" not in name and not name.endswith(".new"):
        return False
    pids = [int(t) for t in name.split(".") if t.isdigit() and 0 < int(t) < 2**22]
    if not pids:
        return False
    return not any(pid_is_running(pid) for pid in pids)


#: Bundles created (their manifest written) inside the innermost :func:`discard_if_unused` block.
_CREATED_HERE: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("geoir_created_here", default=None)


class Bundle:
    """An index bundle on disk.

    Use :meth:`open` for an existing bundle (searching, inspecting) and :meth:`open_or_create` when
    tiling into it. Writers must hold :meth:`lock`.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        # The manifest as this process read or last wrote it: a writer taking the lock checks that nobody
        # changed the file since (see :meth:`lock`).
        self._manifest_seen = _canonical(manifest)
        # FAISS indexes loaded by this process, so a run adding many scenes reads each file once.
        self._loaded: dict[str, VectorIndex] = {}
        # Kinds whose loaded index holds vectors its file lacks (saved by flush_indexes).
        self._unsaved: set[str] = set()
        # Exact kinds: (ids, vectors) added by this run but not yet put into the FAISS index (_apply_pending).
        self._pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Bundle:
        """Open an existing bundle.

        Raises:
            BundleError: No bundle at ``path``, or its manifest is corrupt or of another format.
        """
        p = Path(path)
        mf = p / MANIFEST
        if not mf.exists():
            if p.exists() and not p.is_dir():
                raise BundleError(f"{p} is a file, not an index bundle directory; pass --index DIR")
            raise BundleError(
                f"no index bundle at {p} ({MANIFEST} missing); create one with `geoir tile SCENE --index {p}`"
            )
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{mf} is corrupt ({exc}); restore it from a backup or re-create the bundle") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{mf} is not a geoir bundle manifest; pass the directory `geoir tile` created")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise BundleError(f"{p} was written by a newer geoir (format {manifest['format_version']}); upgrade geoir")
        _check_manifest(manifest, mf)
        bundle = cls(p, manifest)
        vdir = p / VECTORS
        if vdir.is_symlink():
            # geoir deletes what a killed run left in that folder: through a link it would delete elsewhere.
            raise BundleError(
                f"{vdir} is a symbolic link, but geoir keeps the scenes' vectors in a folder of the bundle's own (it "
                "deletes leftovers there); put the real folder in its place, or copy the bundle without links"
            )
        if vdir.exists() and not vdir.is_dir():
            # Every scene would look unencoded: a search would rebuild empty indexes over the good ones.
            raise BundleError(
                f"{vdir} is a file, but geoir keeps the scenes' vectors in a folder of that name; move the file "
                "away and put the bundle's vectors folder back"
            )
        if bundle.catalog_path.exists():
            bundle._check_catalog()
        elif (manifest.get("counts") or {}).get("scenes"):
            # Without the catalog the vectors would look orphaned, and a repair would delete them.
            raise BundleError(
                f"{bundle.catalog_path} is missing, but {p} records {manifest['counts']['scenes']} scene(s); restore "
                f"that file from a backup, or tile the scenes again into a new --index"
            )
        return bundle

    @classmethod
    def open_or_create(cls, path: str | os.PathLike[str], params: TilingParams | None) -> Bundle:
        """Open the bundle at ``path``, or create it with ``params`` (defaults when None).

        Raises:
            BundleError: ``params`` differ from those the bundle was tiled with, or the directory
                cannot be written.
        """
        p = Path(path)
        if (p / MANIFEST).exists():
            bundle = cls.open(p)
            have = bundle.params
            if params is not None and params != have:
                raise BundleError(
                    f"{p} was tiled with {_describe(have)}; re-run with those options, or use another --index"
                    + bundle._empty_hint()
                )
            return bundle
        cls.check_new_location(p)
        made = not p.exists()
        ensure_writable_dir(p, "the index directory", BundleError)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "geoir_version": __version__,
            "created": _now(),
            "updated": _now(),
            "tiling": (params or TilingParams()).to_dict(),
            "model": None,
            "index": {"float": None, "binary": None},
            "counts": {"scenes": 0, "tiles": 0},
        }
        bundle = cls(p, manifest)
        try:
            created_first = bundle._create_manifest()
        except OSError as exc:
            if made:
                with contextlib.suppress(OSError):
                    p.rmdir()  # only if still empty
            raise BundleError(
                f"cannot create the bundle {p} ({exc.strerror}); free space, or pick another --index"
            ) from exc
        if not created_first:
            return cls.open_or_create(p, params)  # another process created it first: use theirs
        created = _CREATED_HERE.get()
        if created is not None:
            created.add(str(p.resolve()))
        return bundle

    def _create_manifest(self) -> bool:
        """Write the manifest of a new bundle unless one appeared meanwhile (False then): a hard link onto the
        name fails if it exists, so of two processes creating one bundle exactly one creates it."""
        target = self.path / MANIFEST
        tmp = self.path / f".{MANIFEST}.{os.getpid()}.new"
        try:
            atomic_write_text(tmp, json.dumps(self.manifest, indent=2) + "\n")
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    @staticmethod
    def check_new_location(path: str | os.PathLike[str]) -> None:
        """Raise unless a new bundle could be created at ``path`` (creates nothing).

        Raises:
            BundleError: ``path`` holds something that is not a bundle, or cannot be written.
        """
        p = Path(path)
        if (p / MANIFEST).exists():
            return
        if p.exists() and (not p.is_dir() or _holds_files(p)):
            raise BundleError(f"{p} exists and is not a geoir bundle; pass an empty or new --index directory")
        check_writable_folder(p, "the index directory", BundleError)

    # ---------------------------------------------------------------- properties
    @property
    def catalog_path(self) -> Path:
        return self.path / CATALOG

    @property
    def params(self) -> TilingParams:
        t = self.manifest["tiling"]
        return TilingParams(size=t["size"], stride=t["stride"], gsd=t["gsd"], max_nodata=t["max_nodata"])

    def write_manifest(self) -> None:
        self.manifest["updated"] = _now()
        atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=2) + "\n")
        self._manifest_seen = _canonical(self.manifest)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the bundle's write lock (advisory, released when the process dies).

        Index changes not yet saved (see :meth:`add_to_indexes`) are saved before the lock is released,
        also when the block raised: what was committed until then stays searchable without a rebuild.
        """
        lock_path = self.path / ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError as exc:
            raise BundleError(
                f"{lock_path} is a folder, but geoir uses a file of that name to lock the bundle; remove that folder"
            ) from exc
        except FileNotFoundError as exc:
            raise self._removed_meanwhile() from exc
        except OSError as exc:
            raise BundleError(
                f"cannot write {self.path} ({exc.strerror}); adding or removing scenes needs write access to the "
                "bundle (searching does not): ask its owner, or copy it"
            ) from exc
        HELD_LOCKS.add(fd)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise BundleError(f"{self.path} is being written by another geoir process; wait for it") from exc
                raise
            if not (self.path / MANIFEST).exists():
                raise self._removed_meanwhile()
            try:
                on_disk = _canonical(json.loads((self.path / MANIFEST).read_text()))
            except (OSError, ValueError):
                on_disk = None
            if on_disk != self._manifest_seen:
                # Another writer committed between this process reading the manifest and taking the lock (a
                # `geoir encode` loading its model while a `geoir tile` ran): writing this copy back would undo
                # that writer's model and counts.
                raise BundleError(
                    f"{self.path} was changed by another geoir process while this one prepared; run this command again"
                )
            try:
                yield
            except BaseException:
                # The original error matters more; an index left unsaved is rebuilt on next use.
                with contextlib.suppress(Exception):
                    self.flush_indexes()
                raise
            try:
                self.flush_indexes()
            except BundleError as exc:
                raise BundleError(
                    f"{exc}; the scenes added are committed, and the next search or tile rebuilds the index from "
                    "their vectors"
                ) from exc
        finally:
            HELD_LOCKS.discard(fd)
            os.close(fd)

    def _removed_meanwhile(self) -> BundleError:
        # Another run that created this new bundle failed before its first tile, and removed it after this
        # process had opened it (see discard_if_unused).
        return BundleError(
            f"{self.path} was removed by another geoir process (a run that created it and failed) while this one "
            "opened it; run this command again"
        )

    def check_writable(self) -> None:
        """Raise unless scenes could be added: the bundle's folder and files writable (creates nothing).

        Raises:
            BundleError: Something there cannot be written.
        """
        for p in (self.path, self.path / VECTORS, self.catalog_path, self.path / MANIFEST):
            if p.exists() and not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0)):
                raise BundleError(
                    f"cannot write {p} (permission denied); adding or removing scenes needs write access to the "
                    "bundle (searching does not): ask its owner, or copy it"
                )

    # ---------------------------------------------------------------- catalog
    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.catalog_path, timeout=30)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """A transaction on the catalog that changes it; a catalog that cannot be written is named."""
        try:
            with contextlib.closing(self._connect()) as con, con:
                yield con
        except sqlite3.OperationalError as exc:
            if "readonly" in str(exc) or "read-only" in str(exc):
                raise BundleError(
                    f"cannot write {self.catalog_path} ({exc}); adding or removing scenes needs write access to the "
                    "bundle (searching does not): ask its owner, or copy it"
                ) from exc
            if "disk is full" in str(exc) or getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise BundleError(
                    f"cannot write {self.catalog_path} (the disk is full); nothing of this change was written: free "
                    "space there, and run the command again"
                ) from exc
            raise

    def _check_catalog(self) -> None:
        # A writer killed mid-transaction leaves a hot rollback journal beside the catalog. SQLite rolls
        # it back on the next read-write open; GDAL opens read-only to read and would fail instead.
        try:
            with contextlib.closing(self._connect()) as con:
                con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as exc:
            # Not corruption: a healthy catalog that cannot be opened now. Saying "corrupt" would have users
            # delete a good bundle.
            if "locked" in str(exc):
                raise BundleError(
                    f"{self.catalog_path} is locked by another program (QGIS, an SQLite tool, a GDAL command?) "
                    "that is writing it; close it there, then run geoir again"
                ) from exc
            if _in_wal_mode(self.catalog_path):
                raise BundleError(
                    f"{self.catalog_path} was switched to SQLite's WAL mode (QGIS does so when it edits a GeoPackage), "
                    f"which SQLite cannot read without write access to {self.path}; with write access, run "
                    f"`sqlite3 {self.catalog_path} 'PRAGMA journal_mode=DELETE'` once"
                ) from exc
            if "readonly" in str(exc) or "read-only" in str(exc):
                raise BundleError(
                    f"{self.catalog_path} holds an unfinished write (a run or program stopped mid-write left its "
                    f"journal), which needs write access to roll back; run `geoir info --index {self.path}` once "
                    "with write access to the bundle, then it opens read-only again"
                ) from exc
            raise BundleError(
                f"cannot open {self.catalog_path} ({exc}); check the file and its folder, or restore it from a backup"
            ) from exc
        except sqlite3.DatabaseError as exc:
            raise BundleError(
                f"{self.catalog_path} is corrupt ({exc}); restore it or re-create the bundle with `geoir tile`"
            ) from exc
        try:
            layers = {name for name, _ in pyogrio.list_layers(self.catalog_path)}
        except (DataSourceError, OSError) as exc:
            raise BundleError(
                f"{self.catalog_path} is corrupt ({exc}); restore it or re-create the bundle with `geoir tile`"
            ) from exc
        if not {"scenes", "tiles"} <= layers:
            raise BundleError(f"{self.catalog_path} lacks the scenes/tiles layers; re-create the bundle")

    def scene_records(self) -> list[dict[str, Any]]:
        """The committed scenes, as stored (plain dicts, see :meth:`Scene.to_record`)."""
        if not self.catalog_path.exists():
            return []
        with contextlib.closing(self._connect()) as con:
            rows = con.execute("SELECT record, n_tiles, added FROM scenes ORDER BY fid").fetchall()
        out = []
        for i, (record, n_tiles, added) in enumerate(rows, start=1):
            try:
                d = json.loads(record)
                if not isinstance(d, dict) or not isinstance(d.get("id"), str) or not isinstance(d.get("path"), str):
                    raise ValueError("no scene id or path")
                if not SCENE_ID.fullmatch(d["id"]):  # it names the scene's vectors file
                    raise ValueError(f"scene id {d['id']!r:.40} is not 16 hex digits")
            except (TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
                raise BundleError(
                    f"{self.catalog_path}: the record of scene row {i} is damaged ({exc}); restore the file from a "
                    "backup, or tile the scenes again into a new --index"
                ) from exc
            d["n_tiles"] = n_tiles
            d["added"] = added
            out.append(d)
        return out

    def scene_ids(self) -> set[str]:
        if not self.catalog_path.exists():
            return set()
        with contextlib.closing(self._connect()) as con:
            ids = {sid for (sid,) in con.execute("SELECT scene_id FROM scenes")}
        bad = [sid for sid in ids if not (isinstance(sid, str) and SCENE_ID.fullmatch(sid))]
        if bad:
            raise BundleError(
                f"{self.catalog_path}: scene id {bad[0]!r:.40} is not 16 hex digits (the file was damaged or edited); "
                "restore it from a backup, or tile the scenes again into a new --index"
            )
        return ids

    def scene_ids_at(self, path: str) -> list[str]:
        """Ids of the committed scenes recorded at ``path`` (one SQL lookup, not a parse of every record)."""
        if not self.catalog_path.exists():
            return []
        with contextlib.closing(self._connect()) as con:
            return [sid for (sid,) in con.execute("SELECT scene_id FROM scenes WHERE path = ? ORDER BY fid", (path,))]

    def tile_ids_of(self, scene_ids: Iterable[str]) -> pd.DataFrame:
        """``tile_id`` and ``scene_id`` of the committed tiles of these scenes, without their geometries (SQL on
        the scene_id index: a ``--scene`` filter used to read the whole catalog)."""
        wanted = sorted(set(scene_ids) & self.scene_ids())
        rows: list[tuple[int, str]] = []
        if wanted:
            with contextlib.closing(self._connect()) as con:
                marks = ",".join("?" * len(wanted))
                rows = con.execute(
                    f"SELECT tile_id, scene_id FROM tiles WHERE scene_id IN ({marks})", wanted
                ).fetchall()
        return pd.DataFrame(
            {"tile_id": np.array([r[0] for r in rows], dtype=np.int64), "scene_id": [r[1] for r in rows]}
        )

    def move_scene(self, scene_id: str, path: str) -> None:
        """Record that a committed scene's file now lies at ``path`` (its content, id and tiles unchanged)."""
        with self._writing() as con:
            # The GeoPackage's R-tree triggers name GDAL's SQL functions; they only run when a row's fid
            # changes, which this update never does, but SQLite needs them to exist to prepare it.
            def unused(*_: object) -> None:
                raise sqlite3.OperationalError("a scene's fid changed")

            for fn in ("ST_IsEmpty", "ST_MinX", "ST_MaxX", "ST_MinY", "ST_MaxY"):
                con.create_function(fn, 1, unused)
            (record,) = con.execute("SELECT record FROM scenes WHERE scene_id = ?", (scene_id,)).fetchone()
            d = json.loads(record)
            d["path"] = str(path)
            con.execute(
                "UPDATE scenes SET path = ?, record = ? WHERE scene_id = ?", (str(path), json.dumps(d), scene_id)
            )

    def scene(self, scene_id: str) -> Scene:
        """The committed scene with this id.

        Raises:
            BundleError: No such scene in the bundle.
        """
        for r in self.scene_records():
            if r["id"] == scene_id:
                return Scene.from_record(r)
        raise BundleError(f"no scene {scene_id} in {self.path}; `geoir info --index {self.path}` lists them")

    def scenes(self) -> gpd.GeoDataFrame:
        """The `scenes` layer."""
        if not self.catalog_path.exists():
            return gpd.GeoDataFrame({"scene_id": []}, geometry=[], crs="EPSG:4326")
        return pyogrio.read_dataframe(self.catalog_path, layer="scenes")

    def tiles(
        self, scene_id: str | None = None, bbox: tuple[float, float, float, float] | None = None
    ) -> gpd.GeoDataFrame:
        """Committed tiles, optionally of one scene or intersecting a lon/lat bbox (uses the R-tree)."""
        if not self.catalog_path.exists():
            return gpd.GeoDataFrame({c: [] for c in TILE_COLUMNS}, geometry=[], crs="EPSG:4326")
        committed = self.scene_ids()
        where = "scene_id = '{}'".format(scene_id.replace("'", "''")) if scene_id else None
        df = pyogrio.read_dataframe(self.catalog_path, layer="tiles", where=where, bbox=bbox)
        return df[df["scene_id"].isin(committed)].reset_index(drop=True)

    def tiles_at(
        self,
        geom: shapely.Geometry,
        predicate: Callable[[gpd.GeoSeries, shapely.Geometry], Any] = gpd.GeoSeries.intersects,
    ) -> gpd.GeoDataFrame:
        """Committed tiles whose footprint meets a lon/lat geometry (``predicate(footprints, geom)``, default
        intersects), across the antimeridian too.

        Footprints across the antimeridian keep continuous longitudes (up to a tile beyond +-180, see
        :func:`geoir.tiling.grid.footprints`), so ``geom`` is also tried a turn east and a turn west.
        """
        frames = []
        for dx in (0.0, 360.0, -360.0):
            g = shapely.affinity.translate(geom, xoff=dx) if dx else geom
            west, _, east, _ = g.bounds
            if dx and (west > 180 + _WRAP_MARGIN or east < -180 - _WRAP_MARGIN):
                continue  # no footprint reaches that far beyond the line
            df = self.tiles(bbox=tuple(g.bounds))  # type: ignore[arg-type]
            frames.append(df[np.asarray(predicate(df.geometry, g), dtype=bool)])
        if len(frames) == 1:
            return frames[0].reset_index(drop=True)
        df = pd.concat(frames, ignore_index=True)
        return df[~df.tile_id.duplicated()].reset_index(drop=True)

    def n_tiles(self) -> int:
        return int(sum(r["n_tiles"] for r in self.scene_records()))

    def reconcile(self) -> int:
        """Delete what a killed run left: tiles and vector files whose scene was never committed, and temp files;
        set the manifest's counts from the catalog (a run killed between a commit and the manifest's update
        leaves them behind it). Call with the write lock held. Returns the tiles removed."""
        removed = 0
        counts = {"scenes": 0, "tiles": 0}
        if self.catalog_path.exists():
            with self._writing() as con:
                cur = con.execute("DELETE FROM tiles WHERE scene_id NOT IN (SELECT scene_id FROM scenes)")
                removed = cur.rowcount
                counts = {
                    "scenes": con.execute("SELECT COUNT(*) FROM scenes").fetchone()[0],
                    "tiles": con.execute("SELECT COUNT(*) FROM tiles").fetchone()[0],
                }
        if counts != self.manifest["counts"]:
            log.warning(
                "%s: the manifest counted %d tiles in %d scenes, the catalog holds %d in %d (a run was killed); "
                "counts corrected",
                self.path,
                self.manifest["counts"]["tiles"],
                self.manifest["counts"]["scenes"],
                counts["tiles"],
                counts["scenes"],
            )
            self.manifest["counts"] = counts
            self.write_manifest()
        committed = self.scene_ids()
        vdir = self.path / VECTORS
        if vdir.is_dir() and not vdir.is_symlink():
            for f in vdir.iterdir():
                # Only files geoir writes there: a scene's vectors never committed, and their temp files.
                ours = _VECTORS_FILE.fullmatch(f.name)
                if ours and (ours["temp"] or ours["id"] not in committed) and _is_plain_file(f):
                    f.unlink(missing_ok=True)
        # Temp files of the manifest, catalog and indexes (written beside them, renamed when whole) whose
        # process is gone: a search may be saving a rebuilt index under a temp name right now.
        for f in self.path.glob(".*"):
            if f.is_file() and _left_by_a_dead_process(f.name):
                f.unlink(missing_ok=True)
        return removed

    def add_scene(
        self,
        scene: Scene,
        grid_transform: Any,
        grid_size: tuple[int, int],
        scene_footprint: shapely.Polygon,
        tiles: list[Tile],
        nodata_fractions: Iterable[float],
        tile_footprints: np.ndarray,
    ) -> None:
        """Commit a scene and its tiles: tiles first, then the scene row that makes them visible."""
        fracs = np.fromiter(nodata_fractions, dtype=np.float64, count=len(tiles))
        # Exterior rings counter-clockwise, as the search outputs have them (and RFC 7946 asks of a catalog
        # converted to GeoJSON): a north-up grid's rings run clockwise in lon/lat.
        tile_footprints = shapely.orient_polygons(np.asarray(tile_footprints, dtype=object), exterior_cw=False)
        scene_footprint = shapely.orient_polygons(scene_footprint, exterior_cw=False)
        tiles_df = gpd.GeoDataFrame(
            {
                "tile_id": np.array([t.id for t in tiles], dtype=np.int64),
                # Typed even when empty: the first write of a new catalog sets each column's type from
                # this frame, and an empty list would make scene_id a REAL column.
                "scene_id": pd.Series([scene.id] * len(tiles), dtype=object),
                "col_off": np.array([t.window.col_off for t in tiles], dtype=np.int32),
                "row_off": np.array([t.window.row_off for t in tiles], dtype=np.int32),
                "width": np.array([t.window.width for t in tiles], dtype=np.int32),
                "height": np.array([t.window.height for t in tiles], dtype=np.int32),
                "nodata_fraction": fracs,
            },
            geometry=gpd.GeoSeries(tile_footprints, crs="EPSG:4326")
            if len(tiles)
            else gpd.GeoSeries([], crs="EPSG:4326"),
            crs="EPSG:4326",
        )
        record = scene.to_record()
        record["grid_transform"] = list(grid_transform)[:6]
        record["grid_width"], record["grid_height"] = grid_size
        epsg = epsg_code(scene.crs)
        scene_df = gpd.GeoDataFrame(
            {
                "scene_id": [scene.id],
                "path": [scene.path],
                "fingerprint": [scene.fingerprint],
                "crs": [f"EPSG:{epsg}" if epsg else scene.crs.to_wkt()],
                "native_gsd": [scene.native_gsd],
                "width": [scene.width],
                "height": [scene.height],
                "bands": [",".join(map(str, scene.bands))],
                "dtype": [scene.dtype],
                "nodata": pd.Series([scene.nodata], dtype="float64"),  # REAL, NULL when unset
                "scaling": [json.dumps(scene.scaling.to_dict())],
                "n_tiles": [len(tiles)],
                "added": [_now()],
                "record": [json.dumps(record)],
            },
            geometry=[scene_footprint],
            crs="EPSG:4326",
        )
        if not self.catalog_path.exists():
            self._create_catalog(scene_df, tiles_df)
        else:
            try:
                if len(tiles_df):
                    pyogrio.write_dataframe(
                        tiles_df, self.catalog_path, layer="tiles", append=True, promote_to_multi=False
                    )
                pyogrio.write_dataframe(scene_df, self.catalog_path, layer="scenes", append=True)
            except (DataSourceError, DataLayerError, OSError) as exc:
                raise BundleError(
                    f"cannot write {self.catalog_path} ({write_reason(exc)}); is the disk full? free space there"
                ) from exc
        counts = self.manifest["counts"]
        counts["scenes"] += 1
        counts["tiles"] += len(tiles)
        self.write_manifest()

    def _create_catalog(self, scene_df: gpd.GeoDataFrame, tiles_df: gpd.GeoDataFrame) -> None:
        # The first write builds the whole file under a temp name, so a bundle never shows half a catalog.
        tmp = self.path / ".catalog.tmp.gpkg"
        tmp.unlink(missing_ok=True)
        try:
            # The temp file needs no per-transaction durability: it is written without a rollback journal or
            # fsyncs (about 35 of them, each up to several ms on a busy disk), then synced once before the rename.
            with _unsynced_sqlite_writes():
                # GeoPackage 1.2 rather than GDAL's newest: QGIS 3.22 and older GDALs read it without warnings.
                pyogrio.write_dataframe(
                    tiles_df,
                    tmp,
                    layer="tiles",
                    driver="GPKG",
                    geometry_type="Polygon",
                    promote_to_multi=False,  # given with the type, pyogrio skips inspecting every geometry
                    dataset_options={"VERSION": "1.2"},
                )
                pyogrio.write_dataframe(
                    scene_df, tmp, layer="scenes", driver="GPKG", geometry_type="Polygon", promote_to_multi=False
                )
            with contextlib.closing(sqlite3.connect(tmp)) as con, con:
                con.execute("PRAGMA synchronous = OFF")
                con.execute("PRAGMA journal_mode = OFF")
                con.execute("CREATE UNIQUE INDEX IF NOT EXISTS tiles_tile_id ON tiles(tile_id)")
                con.execute("CREATE INDEX IF NOT EXISTS tiles_scene_id ON tiles(scene_id)")
                # Outlines in QGIS (its default random fill would hide the imagery), scenes named.
                add_styles(con, {"tiles": style("tiles"), "scenes": style("scenes")})
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.catalog_path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, (DataSourceError, DataLayerError, sqlite3.Error, OSError)):
                raise BundleError(
                    f"cannot write {self.catalog_path} ({write_reason(exc)}); is the disk full? free space there, "
                    "or pick another --index"
                ) from exc
            raise

    # ---------------------------------------------------------------- model
    @property
    def model(self) -> dict[str, Any] | None:
        """What the manifest records about the model that encoded this bundle (None before encoding)."""
        return self.manifest.get("model")

    def bind_model(self, description: dict[str, Any], index_kinds: dict[str, str | None] | None = None) -> None:
        """Record the model on first use; refuse any other model afterwards.

        Raises:
            ModelError: The bundle was encoded with a model of another fingerprint.
        """
        have = self.model
        if have is None:
            self.manifest["model"] = description
            if index_kinds:
                self.manifest["index"] = {**self.manifest.get("index", {}), **index_kinds}
            self.write_manifest()
            return
        self.check_model(
            description["fingerprint"],
            description.get("name"),
            bool(description.get("backbone_tta")),
            description.get("path"),
        )

    def check_model(
        self, fingerprint: str, name: str | None = None, tta: bool | None = None, path: str | None = None
    ) -> None:
        """Raise unless ``fingerprint`` is the bundle's model (``tta``: whether it averages the 8 views;
        ``path``: the file it was loaded from)."""
        have = self.model
        if have is not None and have["fingerprint"] != fingerprint:
            if tta is not None and bool(have.get("backbone_tta")) != tta:
                # Test-time averaging is part of the fingerprint: say so rather than "another model".
                mode = "with" if have.get("backbone_tta") else "without"
                raise ModelError(
                    f"{self.path} was encoded {mode} tta (each tile the mean of its 8 flips and quarter turns); "
                    f"encode {mode} it too (--tta / tta=), or use another --index"
                )
            if have.get("name") == name == "default":
                # Both are geoir's shipped default, from two releases: the old one is not installed any more.
                raise ModelError(
                    f"{self.path} was built with another geoir release's shipped default model (fingerprint "
                    f"{have['fingerprint'][:12]}); this one ships {fingerprint[:12]}, and their vectors cannot be "
                    f"compared: tile the scenes again into a new --index, or pass --model with that release's "
                    f"geoir/models/default.pt"
                )
            replaced = ""
            if have.get("path") and path and Path(have["path"]) == Path(path) and have.get("name") != "default":
                # The model file the bundle names now holds another model (re-trained with --overwrite):
                # "use that model" cannot be followed.
                replaced = (
                    f"; {have['path']} was overwritten with another model since: restore that file, or tile the "
                    "scenes again into a new --index with the new one"
                )
            raise ModelError(
                f"{self.path} was built with model {have.get('name') or '?'} (fingerprint {have['fingerprint'][:12]}), "
                f"not {name or '?'} ({fingerprint[:12]})"
                + (replaced or "; use that model (--model), or another --index")
                + self._empty_hint()
            )

    def _empty_hint(self) -> str:
        """For a refusal: a bundle holding no scene at all (its first run killed before a commit) may simply go."""
        if self.catalog_path.exists():  # written by the first commit
            return ""
        return f" ({self.path} holds no scene: a run stopped before its first commit? delete that folder to start anew)"

    # ---------------------------------------------------------------- vectors
    def vectors_path(self, scene_id: str) -> Path:
        if not SCENE_ID.fullmatch(scene_id):  # the catalog's ids are checked: a path must not come from one
            raise BundleError(f"scene id {scene_id!r:.40} of {self.path} is not 16 hex digits; the catalog is damaged")
        return self.path / VECTORS / f"{scene_id}.npz"

    def write_vectors(
        self, scene_id: str, ids: np.ndarray, features: np.ndarray, embedding: np.ndarray, codes: np.ndarray | None
    ) -> None:
        """Store a scene's vectors (atomic); they count once the scene row is committed."""
        out = self.vectors_path(scene_id)
        out.parent.mkdir(exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp.npz")
        arrays: dict[str, Any] = {
            "ids": np.asarray(ids, np.int64),
            "features": np.asarray(features, np.float16),
            "embedding": np.asarray(embedding, np.float32),
        }
        if codes is not None:
            arrays["codes"] = np.asarray(codes, np.uint8)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())  # durable before the rename, as the manifest and indexes are
            os.replace(tmp, out)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise BundleError(f"cannot write {out} ({exc.strerror}); free space, or pick another --index") from exc
            raise

    def encoded_scene_ids(self) -> list[str]:
        """Committed scenes that have vectors, in commit order."""
        return [r["id"] for r in self.scene_records() if self.vectors_path(r["id"]).exists()]

    def vectors(
        self, scene_ids: Iterable[str] | None = None, keys: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Concatenated vectors of committed, encoded scenes (all of them by default); ``keys``: only these
        arrays (``ids``, ``features``, ``embedding``, ``codes``), not every one."""
        ids_ = list(scene_ids) if scene_ids is not None else self.encoded_scene_ids()
        parts: dict[str, list[np.ndarray]] = {}
        for sid in ids_:
            try:
                with np.load(self.vectors_path(sid)) as z:
                    got = {k: z[k] for k in (z.files if keys is None else [k for k in keys if k in z.files])}
                if any(a.ndim == 0 for a in got.values()):
                    raise ValueError("an array without rows")
                rows = {len(a) for a in got.values()}
                widths = {k: a.shape[1:] for k, a in got.items()}
                if len(rows) > 1:
                    raise ValueError(f"its arrays hold {' and '.join(map(str, sorted(rows)))} rows")
                for k, a in got.items():
                    if parts.get(k) and parts[k][0].shape[1:] != widths[k]:
                        raise ValueError(f"its {k} are {widths[k]} wide, the other scenes' {parts[k][0].shape[1:]}")
                    parts.setdefault(k, []).append(a)
            except (OSError, ValueError, zipfile.BadZipFile, EOFError, MemoryError) as exc:
                # (MemoryError: a header edited to declare a huge array.)
                raise self._damaged_vectors(sid, exc) from exc
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _damaged_vectors(self, scene_id: str, exc: BaseException) -> BundleError:
        return BundleError(
            f"{self.vectors_path(scene_id)} is corrupt ({exc}); delete it, then run `geoir encode --index "
            f"{self.path}` to encode that scene again"
        )

    def features_of(self, tile_ids: Sequence[int] | np.ndarray, scene_ids: Iterable[str]) -> np.ndarray:
        """The stored backbone features of these tiles (of the scenes ``scene_ids``), in ``tile_ids`` order.

        Only the rows asked for are read from each scene's vector file, with its ids: a ``tile:ID`` query
        used to read every array of its scene (seconds and a GB or more for a scene of 65,536 tiles).

        Raises:
            BundleError: A tile is not among those scenes' stored vectors, or a vector file is damaged.
        """
        wanted = np.asarray(tile_ids, dtype=np.int64).reshape(-1)
        out: np.ndarray | None = None
        found = np.zeros(len(wanted), dtype=bool)
        for sid in scene_ids:
            path = self.vectors_path(sid)
            try:
                with zipfile.ZipFile(path) as z:
                    stored = _npz_rows(z, "ids")
                    order = np.argsort(stored, kind="stable")
                    at = np.searchsorted(stored, wanted, sorter=order).clip(max=len(stored) - 1)
                    here = (stored[order[at]] == wanted) & ~found if len(stored) else np.zeros_like(found)
                    rows = _npz_rows(z, "features", order[at[here]])
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, MemoryError) as exc:
                raise self._damaged_vectors(sid, exc) from exc
            if out is None:
                out = np.empty((len(wanted), *rows.shape[1:]), dtype=rows.dtype)
            out[here] = rows
            found |= here
        if out is None or not found.all():
            missing = wanted[~found][:5].tolist()
            raise BundleError(
                f"tiles {missing} have no stored vectors in {self.path}; run `geoir encode --index {self.path}`"
            )
        return out

    # ---------------------------------------------------------------- FAISS indexes
    def index_path(self, kind: str) -> Path:
        return self.path / INDEX_FILES[kind]

    def _new_index(self, kind: str) -> VectorIndex:
        from geoir.index.vectors import VectorIndex

        model = self.model or {}
        factory = (self.manifest.get("index") or {}).get(kind)
        dim = int(model["bits"]) if kind == "binary" else int(model["embedding_dim"])
        return VectorIndex(dim, kind=kind, factory=factory)  # type: ignore[arg-type]

    def index_kinds(self) -> list[str]:
        """Which FAISS indexes this bundle's model calls for."""
        model = self.model
        if model is None:
            return []
        return ["float", "binary"] if model.get("bits") else ["float"]

    def _index(self, kind: str, changing: bool = False) -> VectorIndex | None:
        """The saved FAISS index of ``kind`` (None when there is none yet), read once per process.

        For searching (not ``changing``) a float index's vectors are memory-mapped, not read: a search
        touches a few thousand of them, and reading a large bundle's whole index took seconds and its size in
        memory per search. To change it, it is read whole (again, if it was mapped).
        """
        from geoir.index.vectors import VectorIndex

        if changing and kind in self._loaded and self._loaded[kind].mapped:
            del self._loaded[kind]
        if kind not in self._loaded:
            path = self.index_path(kind)
            if not path.exists():
                return None
            index = VectorIndex.load(path, mapped=not changing)
            model = self.model or {}
            want = model.get("bits") if kind == "binary" else model.get("embedding_dim")
            if want is not None and (index.dim != int(want) or index.kind != kind):
                # Another index file put in its place (a copy gone wrong): searching it would compare vectors of
                # other shapes.
                raise BundleError(
                    f"{path} holds {index.dim}-{'bit' if index.kind == 'binary' else 'd'} {index.kind} vectors, but "
                    f"{self.path}'s model gives {want}-{'bit' if kind == 'binary' else 'd'} {kind} ones; delete "
                    "that file and search again (it is rebuilt from the stored vectors)"
                )
            self._loaded[kind] = index
        self._apply_pending(kind)
        return self._loaded[kind]

    def _apply_pending(self, kind: str) -> None:
        parts = self._pending.pop(kind, None)
        if parts:
            self._loaded[kind].add(np.concatenate([i for i, _ in parts]), np.concatenate([x for _, x in parts]))

    def _save_index(self, kind: str, index: VectorIndex, built_from: list[str] | None = None) -> bool:
        """Save an index file under the bundle's index lock; returns whether it was saved.

        ``built_from``: the encoded scenes a search rebuilt the index from. A search holds no write lock, so a
        writer may have committed or removed scenes since: the index is saved only if they are still exactly
        those (checked under the lock, which writers' saves take too), else kept in memory. Without that
        check, a search's rebuild saved after a writer's save put back the removed scene's vectors and lost
        the new one's, with the same count, which nothing would notice.
        """
        lock_path = self.path / ".index.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise BundleError(f"cannot write {lock_path} ({exc.strerror}); check the bundle's permissions") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if built_from is not None and self.encoded_scene_ids() != built_from:
                log.info("%s changed while its %s index was rebuilt: the rebuilt index is not saved", self.path, kind)
                self._loaded[kind] = index
                return False
            index.save(self.index_path(kind))
        finally:
            os.close(fd)
        self._loaded[kind] = index
        self._unsaved.discard(kind)
        return True

    def flush_indexes(self) -> None:
        """Save the indexes that :meth:`add_to_indexes` changed since they were last saved."""
        for kind in sorted(self._unsaved):
            self._apply_pending(kind)
            self._save_index(kind, self._loaded[kind])

    def encoded_tiles(self) -> int:
        """Tiles of the committed scenes that have vectors: what every FAISS index of the bundle must hold."""
        return sum(r["n_tiles"] for r in self.scene_records() if self.vectors_path(r["id"]).exists())

    def indexes(self) -> dict[str, VectorIndex]:
        """The FAISS indexes, checked against the committed scenes and rebuilt when they disagree."""
        expected = self.encoded_tiles()
        out: dict[str, VectorIndex] = {}
        for kind in self.index_kinds():
            index = self._index(kind)
            if index is None or len(index) != expected:
                log.info("%s index of %s disagrees with the catalog; rebuilding it from the vectors", kind, self.path)
                scenes = self.encoded_scene_ids()
                index = self.rebuild_index(kind, save=False, scene_ids=scenes)
                try:
                    self._save_index(kind, index, built_from=scenes)
                except BundleError as exc:
                    # A bundle others share read-only can still be searched: the rebuilt index serves from memory.
                    log.warning("%s; searching with the rebuilt index in memory", exc)
                    self._loaded[kind] = index
            out[kind] = index
        return out

    def rebuild_index(self, kind: str, save: bool = True, scene_ids: list[str] | None = None) -> VectorIndex:
        """Rebuild one FAISS index from the vector files of the committed scenes (``scene_ids``: those, read
        beforehand) and save it.

        Only the ids and the one array the index holds are read, not the backbone features beside them
        (which made a rebuild of 100,396 2048-d tiles take 6.8 s instead of 2.6 s).
        """
        self._pending.pop(kind, None)  # committed, so in the vector files
        index = self._new_index(kind)
        key = "codes" if kind == "binary" else "embedding"
        vec = self.vectors(scene_ids, keys=("ids", key))
        if vec:
            if not index.is_trained:
                index.train(vec[key])
            index.add(vec["ids"], vec[key])
        if save:
            self._save_index(kind, index)
        return index

    def add_to_indexes(self, ids: np.ndarray, embedding: np.ndarray, codes: np.ndarray | None) -> None:
        """Add a committed scene's vectors to the FAISS indexes (exact kinds), or rebuild them.

        The index changes in memory only: its file is saved by :meth:`flush_indexes`, which :meth:`lock`
        calls on release, so committing a scene costs in proportion to its own tiles, not to the whole
        index (rewriting the file per scene made a run quadratic in its tiles; so did re-sorting a flat
        index per scene, hence the batches below). The first call of a
        process checks the saved index against the catalog and rebuilds it from the vector files if an
        earlier run was killed before saving it.
        """
        for kind in self.index_kinds():
            first = kind not in self._loaded or self._loaded[kind].mapped
            # (not _index when loaded: it applies pending adds)
            index = self._index(kind, changing=True) if first else self._loaded[kind]
            if first:
                # The scene being added is already committed, with its vectors: the rest must be in the file.
                before = self.encoded_tiles() - len(ids)
                if (len(index) if index is not None else 0) != before:
                    log.info("%s index of %s lacks committed scenes; rebuilding it from the vectors", kind, self.path)
                    self.rebuild_index(kind)
                    continue
            if index is None:
                index = self._new_index(kind)
            if not index.is_trained:
                # Approximate kinds train on a sample of everything there is: rebuild from all vectors.
                self.rebuild_index(kind)
                continue
            data = codes if kind == "binary" else embedding
            assert data is not None
            self._loaded[kind] = index
            self._unsaved.add(kind)
            if not index.exact:
                index.add(ids, data)
                continue
            # A flat index keeps its storage in ascending-id order, so adding a scene's (hash-ordered) ids
            # copies the whole index. Scenes are put in in batches that at least double it: each vector
            # is copied a bounded number of times, and the result is the same as adding them one by one.
            pending = self._pending.setdefault(kind, [])
            pending.append((np.asarray(ids, np.int64), np.asarray(data)))
            if sum(len(i) for i, _ in pending) >= len(index):
                self._apply_pending(kind)

    def remove_scene(self, scene_id: str) -> int:
        """Remove a scene and its tiles in one transaction; returns the number of tiles removed."""
        if scene_id not in self.scene_ids():
            raise BundleError(f"no scene {scene_id} in {self.path}; `geoir info --index {self.path}` lists them")
        # An index an earlier run left behind the catalog (killed before saving it) is rebuilt first. Edited as
        # it is, and this run killed in turn before saving it, it could hold as many vectors as the catalog
        # has tiles, of other scenes: the count every reader checks it by would no longer tell.
        expected = self.encoded_tiles()
        held: dict[str, VectorIndex] = {}
        for kind in self.index_kinds():
            index = self._index(kind, changing=True)
            if index is not None and len(index) != expected:
                log.info("%s index of %s disagrees with the catalog; rebuilding it first", kind, self.path)
                self.rebuild_index(kind)
                index = self._loaded[kind]
            if index is not None:
                held[kind] = index
        with self._writing() as con:
            ids = [r[0] for r in con.execute("SELECT tile_id FROM tiles WHERE scene_id = ?", (scene_id,))]
            # Scene row first: from that instant its tiles are invisible, whatever happens next.
            con.execute("DELETE FROM scenes WHERE scene_id = ?", (scene_id,))
            n = con.execute("DELETE FROM tiles WHERE scene_id = ?", (scene_id,)).rowcount
            # The index files go just before the catalog commits, and come back edited after: a run killed (or
            # a disk full) in between leaves none, which the next use rebuilds. Left in place, an index still
            # holding the removed scene, then missing a scene a killed tile run committed, could hold the
            # catalog's count with other scenes' vectors.
            for kind in held:
                self.index_path(kind).unlink(missing_ok=True)
        counts = self.manifest["counts"]
        counts["scenes"] -= 1
        counts["tiles"] -= n
        self.write_manifest()
        self.vectors_path(scene_id).unlink(missing_ok=True)
        try:
            for kind, index in held.items():
                index.remove(np.asarray(ids, dtype=np.int64))
                self._save_index(kind, index)
        except BundleError as exc:
            raise BundleError(f"{exc}; the scene is removed, and the next search or tile rebuilds the index") from exc
        return n


def _npz_rows(z: zipfile.ZipFile, key: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Member ``key`` of an open .npz, or only its ``rows`` (first axis), read by seeking in the member."""
    # geoir stores members uncompressed (np.savez); seeking in a compressed one decompresses from its start.
    stored = z.getinfo(f"{key}.npy").compress_type == zipfile.ZIP_STORED
    with z.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = header(f)
        if rows is None or not stored or fortran or dtype.hasobject or not shape:
            f.seek(0)
            whole = np.lib.format.read_array(f)
            return whole if rows is None else whole[rows]
        start = f.tell()
        row_shape = tuple(shape[1:])
        size = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        out = np.empty((len(rows), *row_shape), dtype=dtype)
        for i, r in enumerate(np.asarray(rows).tolist()):
            f.seek(start + r * size)
            out[i] = np.frombuffer(f.read(size), dtype=dtype).reshape(row_shape)
        return out


#: A scene id: the first 16 hex digits of its file's fingerprint (:func:`geoir.io.scene.content_fingerprint`).
SCENE_ID = re.compile(r"[0-9a-f]{16}")
#: The files of a bundle's vectors folder: ``ID.npz``, and ``.ID.npz.tmp.npz`` while one is written.
_VECTORS_FILE = re.compile(r"(?P<temp>\.)?(?P<id>[0-9a-f]{16})\.npz(?(temp)\.tmp\.npz|)")


def _is_plain_file(path: Path) -> bool:
    """A regular file, not a link to one (a link's target is not the bundle's to delete)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _in_wal_mode(path: Path) -> bool:
    """Whether an SQLite file is in WAL mode (bytes 18 and 19 of its header, the format versions, are 2)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return len(head) == 20 and head[18] == 2


@contextlib.contextmanager
def _unsynced_sqlite_writes() -> Iterator[None]:
    """Let GDAL write SQLite files without fsyncs or rollback journal, for a file nobody else sees yet.

    GDAL configuration options are process-wide; pyogrio bundles its own GDAL, so rasterio is unaffected.
    The previous values are restored on exit.
    """
    options = {"OGR_SQLITE_SYNCHRONOUS": "OFF", "OGR_SQLITE_JOURNAL": "OFF"}
    before = {k: pyogrio.get_gdal_config_option(k) for k in options}
    pyogrio.set_gdal_config_options(options)
    try:
        yield
    finally:
        pyogrio.set_gdal_config_options(before)


def tile_footprint_native(
    record: dict[str, Any], col_off: int, row_off: int, width: int, height: int
) -> shapely.Polygon:
    """Footprint of a catalog tile in its scene CRS, recovered from the scene's grid transform."""
    from affine import Affine
    from rasterio.windows import Window

    ring = window_polygons(Affine(*record["grid_transform"]), [Window(col_off, row_off, width, height)], densify=1)
    return shapely.Polygon(ring[0])


def _describe(p: TilingParams) -> str:
    gsd = f" --gsd {p.gsd:g}" if p.gsd else " (each scene's own resolution: no --gsd)"
    return f"--size {p.size} --stride {p.stride}{gsd} --max-nodata {p.max_nodata:g}"
