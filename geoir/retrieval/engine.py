"""Search a bundle: turn queries into one vector, filter in FAISS, and return hits with their footprints.

Query kinds: image files, existing tile ids, lon/lat points (the tiles under them), and example
geometries (the tiles they cover), each positive or negative. Positives are averaged; negatives push
the query away from them (Rocchio-style: ``q = mean(pos) - beta * mean(neg)``).

Overhead imagery has no fixed "up": a field or a roof seen turned by 90 degrees is the same place. With
``rotations`` (the default), an image query is encoded in its four quarter turns, the combined query is
searched once per turn, and each tile keeps its best (smallest) distance over the turns. Tile queries
(``tile:ID``, points, example geometries) are their stored backbone features encoded by the head, the same
in every turn.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely
import torch

from geoir.encoding.model import Encoded, Model, pack_codes
from geoir.errors import QueryError
from geoir.index.bundle import Bundle
from geoir.io.images import read_image
from geoir.io.scene import Scaling, open_scene
from geoir.output.writers import query_frame
from geoir.tiling.grid import off_the_globe, to_lonlat

#: Without --include-query-overlap, tiles sharing more than this fraction of their area with a georeferenced
#: query are left out (its own place). Tiles that merely touch it, or overlap by a sliver (footprints of
#: scenes of other dates, reprojected, differ by a metre or so), are neighbours and stay.
QUERY_OVERLAP = 0.01

log = logging.getLogger("geoir")

#: Weight of the negative examples' mean in the combined query.
NEGATIVE_WEIGHT = 0.5
#: Hamming candidates per hit before float re-ranking, for models with codes ...
RERANK_FACTOR = 20
#: ... and at least this many in all, so a bundle of up to this many tiles is ranked exactly by the float
#: embedding whatever k is. Re-ranking 1,000 embeddings of 2,048 floats took about 8 ms per query turn on
#: 2 CPU cores (33 ms for an image query's four turns, against 1 ms for the 20 candidates of k = 1;
#: hybrid_search over 20,000 random vectors), a third of the 96 ms the default model took to encode those four
#: turns of a 256 px image there.
MIN_CANDIDATES = 1000


@dataclass
class QueryParts:
    """What a search looks for: encoded positives and negatives, and where the query sits on the map."""

    positives: list[Encoded] = field(default_factory=list)
    negatives: list[Encoded] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    #: EPSG:4326 geometries of georeferenced query parts, with their label and polarity.
    geometries: list[tuple[shapely.Geometry, str, bool]] = field(default_factory=list)
    #: Tile ids the query itself is made of (left out of the hits unless asked otherwise).
    own_tiles: set[int] = field(default_factory=set)
    #: Whether each positive / negative part is an image encoded in its four quarter turns (one row per
    #: turn) rather than tile rows (one row per tile, the same in every turn).
    positive_turned: list[bool] = field(default_factory=list)
    negative_turned: list[bool] = field(default_factory=list)

    @property
    def views(self) -> int:
        """Query vectors to search: 4 when any part was encoded in its quarter turns, else 1."""
        return 4 if any(self.positive_turned) or any(self.negative_turned) else 1


@dataclass
class Hits:
    """Search results: the hits with their footprints, and the query geometries.

    ``own_place`` counts the tiles left out as the query's own place (those sharing ground with a
    georeferenced query, see ``include_query_overlap``), and ``left_out`` those of them that ranked among the
    ``k`` best, in place of the last hits returned.
    """

    hits: gpd.GeoDataFrame
    query: gpd.GeoDataFrame
    own_place: int = 0
    left_out: int = 0


class Searcher:
    """Searches one bundle with its own model.

    Args:
        bundle: An open bundle with vectors.
        model: The model the bundle was built with (checked by fingerprint).
        rotations: Match image queries in any of their four quarter turns (each tile keeps its best turn).
    """

    def __init__(self, bundle: Bundle, model: Model, rotations: bool = True):
        if bundle.manifest["counts"]["tiles"] == 0:
            raise QueryError(f"{bundle.path} has no encoded tiles; run `geoir tile SCENE --index {bundle.path}`")
        if bundle.model is None:
            # Tiles catalogued with --no-encode: encoding them is all that is missing.
            raise QueryError(f"{bundle.path} has no encoded tiles; run `geoir encode --index {bundle.path}`")
        bundle.check_model(model.fingerprint, model.meta.get("name"), model.backbone.tta, model.meta.get("path"))
        self.bundle = bundle
        self.model = model
        # Averaged features (--tta) are the same for every turn of a query: one encoding is enough.
        self.rotations = rotations and not model.backbone.tta
        self.indexes = bundle.indexes()
        if not len(self.indexes["float"]):
            raise QueryError(f"{bundle.path} has no encoded tiles; run `geoir encode --index {bundle.path}`")
        self._records = {r["id"]: r for r in bundle.scene_records()}  # committed scenes by id

    # ------------------------------------------------------------------ building queries
    def add_image(self, parts: QueryParts, path: str | Path, negative: bool = False) -> None:
        """Encode an image file (a georeferenced one keeps its footprint and is scaled like its scene)."""
        image = read_image(path)
        source = self._source_scene_for(image.footprint, image.scene) if image.footprint is not None else None
        if source is not None:
            log.debug("%s: read as the tiles of %s are (bands %s, its stretch)", path, source["path"], source["bands"])
            image = read_image(
                path, Scaling.from_dict(source["scaling"]), tuple(source["bands"]), nodata=source.get("nodata")
            )
        elif image.scene is not None and image.scene.dtype != "uint8":
            log.info(
                "%s: no scene of this bundle with its band count (%d) and data type (%s) lies under it, so it is "
                "stretched by its own statistics, not as any tiles are",
                path,
                image.scene.count,
                image.scene.dtype,
            )
        self.add_pixels(parts, image.rgb, Path(path).name, negative, image.footprint)

    def add_pixels(
        self,
        parts: QueryParts,
        rgb: np.ndarray,
        label: str,
        negative: bool = False,
        footprint: shapely.Geometry | None = None,
    ) -> None:
        """Encode a uint8 RGB array ``(3, H, W)`` (already scaled to 0-255) as a query part."""
        if not (
            isinstance(rgb, np.ndarray)
            and rgb.dtype == np.uint8
            and rgb.ndim == 3
            and rgb.shape[0] == 3
            and min(rgb.shape[1:]) > 0
        ):
            shape = getattr(rgb, "shape", None)
            raise QueryError(
                f"an array query must be uint8 RGB of shape (3, H, W), got {getattr(rgb, 'dtype', type(rgb).__name__)} "
                f"{shape}; scale it to 0-255 and put the bands first"
            )
        turns = [np.rot90(rgb, k, axes=(1, 2)) for k in range(4)] if self.rotations else [rgb]
        if len(turns) > 1 and rgb.shape[1] == rgb.shape[2]:
            enc = self.model.encode(torch.from_numpy(np.ascontiguousarray(np.stack(turns))))
        else:  # one image, or the turns of a non-square one (their shapes differ): encoded one by one
            enc = self.model.concat([self.model.encode_image(t) for t in turns])
        self._append(parts, enc, negative, turned=self.rotations)
        parts.labels.append(("-" if negative else "") + label)
        if footprint is not None:
            parts.geometries.append((footprint, label, negative))

    @staticmethod
    def _append(parts: QueryParts, enc: Encoded, negative: bool, turned: bool) -> None:
        (parts.negatives if negative else parts.positives).append(enc)
        (parts.negative_turned if negative else parts.positive_turned).append(turned)

    def _source_scene_for(self, footprint: shapely.Polygon, scene) -> dict | None:  # type: ignore[no-untyped-def]
        """The record of an indexed scene that a GeoTIFF query was cut from (same place, data type and band
        count), if any: the query is then read with that scene's bands and statistics, like its tiles.

        Of several such scenes (one place at several dates), the one whose statistics the query's own pixels
        are closest to: a crop of one date has that date's radiometry, not another's.
        """
        scenes = self.bundle.scenes()
        candidates = []
        for _, row in scenes[scenes.geometry.contains(footprint.centroid)].iterrows():
            rec = self._records.get(row.scene_id)
            if rec and rec["dtype"] == scene.dtype and rec["count"] == scene.count:
                candidates.append(rec)
        if len(candidates) <= 1 or scene.dtype == "uint8":
            return candidates[0] if candidates else None

        own: dict[tuple[int, ...], Scaling] = {}  # the query's statistics, once per band choice

        def mismatch(rec: dict) -> float:  # type: ignore[type-arg]
            theirs = Scaling.from_dict(rec["scaling"])
            bands = tuple(rec["bands"])
            if bands not in own:
                own[bands] = open_scene(scene.path, bands=bands).scaling
            ours = own[bands]
            if theirs.low is None or ours.low is None or theirs.high is None or ours.high is None:
                return math.inf
            lo, hi, qlo, qhi = (np.asarray(v, dtype=np.float64) for v in (theirs.low, theirs.high, ours.low, ours.high))
            return float(np.mean((np.abs(lo - qlo) + np.abs(hi - qhi)) / np.maximum(hi - lo, 1e-9)))

        return min(candidates, key=mismatch)

    def add_tiles(self, parts: QueryParts, tile_ids: Sequence[int], label: str, negative: bool = False) -> None:
        """Use tiles of the bundle as query parts (their stored backbone features, re-encoded by the head)."""
        # Tile ids are 63-bit: a number outside int64 names no tile (and numpy would overflow on it).
        missing = sorted(int(t) for t in tile_ids if not 0 <= int(t) < 2**63)
        ids = np.asarray([] if missing else tile_ids, dtype=np.int64)
        tiles = self.tiles_by_id(ids)
        missing = missing or sorted(set(ids.tolist()) - set(tiles.tile_id.tolist()))
        if missing:
            raise QueryError(
                f"tile {missing[0]} is not in {self.bundle.path}; take an id from the tile_id field of the `tiles` "
                f"layer of {self.bundle.catalog_path} or of earlier search results"
            )
        self._append(parts, self._encode_tiles(ids, tiles), negative, turned=False)
        parts.labels.append(("-" if negative else "") + label)
        for geom in tiles.geometry:
            parts.geometries.append((geom, label, negative))
        if not negative:
            parts.own_tiles.update(int(t) for t in ids)

    def _encode_tiles(self, ids: np.ndarray, tiles: gpd.GeoDataFrame) -> Encoded:
        """The head's encoding of these committed tiles' stored backbone features (rows in ``ids`` order)."""
        feats = self.bundle.features_of(ids, sorted(set(tiles.scene_id))).astype(np.float32)
        return self.model.encode_features(torch.from_numpy(feats).to(self.model.backbone.device))

    def add_point(self, parts: QueryParts, lon: float, lat: float, negative: bool = False) -> None:
        """The tile(s) whose footprint contains a lon/lat point."""
        pt = shapely.Point(lon, lat)
        # On a tile's edge (a round coordinate where tiles or scenes meet) the point is in both: not in neither.
        tiles = self.bundle.tiles_at(pt, gpd.GeoSeries.intersects)
        if tiles.empty:
            raise QueryError(
                f"no tile of {self.bundle.path} contains the point {lon:g},{lat:g} (lon,lat); check the order "
                f"(longitude first); the `tiles` layer of {self.bundle.catalog_path} shows the area covered"
            )
        self.add_tiles(parts, tiles.tile_id.tolist(), f"point {lon:g},{lat:g}", negative)

    def add_examples(self, parts: QueryParts, path: str | Path) -> None:
        """Example points or polygons from a vector file; a boolean ``negative`` column marks negatives."""
        from geoir.io.vectors import read_vectors

        p = Path(path)
        gdf = read_vectors(p, "examples file", QueryError, "pass a GeoPackage, GeoJSON or shapefile")
        if gdf.empty:
            raise QueryError(f"{p} has no features; add example points or polygons")
        flags = _negative_flags(gdf["negative"], p) if "negative" in gdf.columns else [False] * len(gdf)
        gdf = to_lonlat(gdf)
        off = off_the_globe(gdf)
        for i, (geom, negative) in enumerate(zip(gdf.geometry, flags, strict=True)):
            if geom is None or geom.is_empty:
                raise QueryError(f"example {i} of {p} has no geometry; give it a point or polygon, or delete it")
            if off[i]:
                raise QueryError(f"example {i} of {p} has coordinates that its CRS cannot place in lon/lat; check them")
            tiles = self.bundle.tiles_at(geom, sharing_area())
            if tiles.empty:
                raise QueryError(f"example {i} of {p} touches no tile of {self.bundle.path}")
            self.add_tiles(parts, tiles.tile_id.tolist(), f"{p.name}#{i}", negative)

    # ------------------------------------------------------------------ searching
    def tiles_by_id(self, ids: np.ndarray) -> gpd.GeoDataFrame:
        """Catalog rows of committed tiles with these ids (via SQL on the tile_id index)."""
        if len(ids) == 0:
            return self.bundle.tiles().iloc[:0]
        sql = "SELECT * FROM tiles WHERE tile_id IN ({})".format(",".join(str(int(i)) for i in set(ids.tolist())))
        df = pyogrio.read_dataframe(self.bundle.catalog_path, sql=sql)
        return df[df.scene_id.isin(self._records)].reset_index(drop=True)

    def allowed_ids(
        self,
        bbox: tuple[float, float, float, float] | None = None,
        aoi: shapely.Geometry | None = None,
        scenes: Sequence[str] = (),
    ) -> np.ndarray | None:
        """Tile ids passing the spatial and scene filters (None when there is no filter)."""
        if bbox is None and aoi is None and not scenes:
            return None
        if bbox is not None:
            bbox = check_bbox(bbox)
        tiles = self.bundle.tiles_at(bbox_polygon(bbox), sharing_area()) if bbox is not None else None
        if aoi is not None:
            in_aoi = self.bundle.tiles_at(aoi, sharing_area())
            tiles = in_aoi if tiles is None else tiles[tiles.tile_id.isin(in_aoi.tile_id)]
        if scenes:
            wanted = {self._resolve_scene(s) for s in scenes}
            tiles = self.bundle.tile_ids_of(wanted) if tiles is None else tiles[tiles.scene_id.isin(wanted)]
        assert tiles is not None
        encoded = set(self.bundle.encoded_scene_ids())
        if len(tiles) and not tiles.scene_id.isin(encoded).any():
            names = sorted({Path(self._records[sid]["path"]).name for sid in set(tiles.scene_id)})
            raise QueryError(
                f"the tiles passing the filters are of scenes not encoded yet ({', '.join(names)}); "
                f"run `geoir encode --index {self.bundle.path}` first"
            )
        return tiles.tile_id.to_numpy(np.int64)

    def _resolve_scene(self, s: str) -> str:
        """The id of the one scene that ``s`` names: its id, path (absolute or relative), file name or stem."""
        matches = [
            sid
            for sid, rec in self._records.items()
            if s in (sid, rec["path"], Path(rec["path"]).name, Path(rec["path"]).stem)
            or Path(s).resolve() == Path(rec["path"])
        ]
        if not matches:
            raise QueryError(
                f"no scene {s!r} in {self.bundle.path}; `geoir info --index {self.bundle.path}` lists them"
            )
        if len(matches) > 1:
            raise QueryError(
                f"--scene {s!r} names {len(matches)} scenes of {self.bundle.path} ({', '.join(sorted(matches))}); "
                "pass their ids or paths"
            )
        return matches[0]

    def search(
        self,
        parts: QueryParts,
        k: int = 10,
        allowed: np.ndarray | None = None,
        include_query_overlap: bool = False,
        expand: int = 0,
    ) -> Hits:
        """Run the combined query and return the top ``k`` hits with their footprints.

        Args:
            expand: Query expansion: search once, add the first ``expand`` hits to the query's positives (their
                stored vectors, so the query becomes the mean of its parts and those tiles), and search again
                (average query expansion; 0: off). The tiles added stay in the results, and the hits' ``query``
                field ends with ``+ first N hits``.
        """
        if not parts.positives:
            raise QueryError("give at least one positive query (an image, tile:ID, --point or --examples)")
        check_counts(k, expand)
        # No more hits than tiles: a huge k must not size the search's arrays.
        most = max(1, self.bundle.n_tiles())
        k, expand = min(int(k), most), min(int(expand), most)
        if expand:
            first = self._search_ids(parts, expand, allowed, include_query_overlap)[0][1]
            if len(first):
                # Each hit is a part of its own: the query becomes the mean of its parts and those tiles.
                enc = self._encode_tiles(first, self.tiles_by_id(first))
                hits = [_row(enc, i) for i in range(len(first))]
                parts = replace(
                    parts,
                    positives=[*parts.positives, *hits],
                    positive_turned=[*parts.positive_turned, *[False] * len(hits)],
                    labels=[*parts.labels, f"first {len(first)} hits"],
                )
                log.info("query expanded with the first %d hits", len(first))
                log.debug("tiles added to the query: %s", first.tolist())
        (dist, ids, ham), own_place, left_out = self._search_ids(parts, k, allowed, include_query_overlap)
        scores = self.indexes["float"].scores(dist)
        frame = self._hits_frame(ids, dist, scores, ham, " + ".join(parts.labels))
        return Hits(frame, _query_frame(parts), own_place=own_place, left_out=left_out)

    @property
    def ranks_by_codes(self) -> bool:
        """Whether hits are ranked by Hamming distance: a hash-only model (``dgssh``, ``plain``), whose codes
        are what it was trained to rank with; its float vector is the backbone's and only breaks ties. Models
        with a trained float embedding rank by it, the codes proposing the candidates."""
        return self.model.kind in ("hash", "plain") and "binary" in self.indexes

    def _search_ids(
        self, parts: QueryParts, k: int, allowed: np.ndarray | None, include_query_overlap: bool
    ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray | None], int, int]:
        """Distances, ids and Hamming distances (None without codes) of the top ``k`` tiles for the combined
        query (filters and exclusions applied); the number of tiles excluded as the query's own place, and
        how many of them ranked among the ``k`` best."""
        emb, codes = self._combine(parts)
        excluded: set[int] = set()
        if not include_query_overlap:
            excluded = set(parts.own_tiles)
            for geom, _, negative in parts.geometries:
                if not negative:
                    t = self.bundle.tiles_at(geom, sharing_area(QUERY_OVERLAP, of="tile"))
                    excluded.update(t.tile_id.tolist())
        if allowed is not None:
            if len(allowed) == 0:
                raise QueryError("no tile passes the filters (--bbox/--aoi/--scene); widen them")
            allowed = np.setdiff1d(allowed, np.fromiter(excluded, np.int64, len(excluded)))
            if len(allowed) == 0:
                raise QueryError(
                    "every tile passing the filters (--bbox/--aoi/--scene) is the query's own place; widen them, "
                    "or pass --include-query-overlap to keep those tiles"
                )
            fetch = k
        else:
            fetch = k + len(excluded)
        float_index = self.indexes["float"]
        ham: np.ndarray | None
        if "binary" in self.indexes and codes is not None:
            from geoir.index.vectors import hybrid_search

            factor = max(RERANK_FACTOR, -(-MIN_CANDIDATES // fetch))
            order = "hamming" if self.ranks_by_codes else "float"
            dist, ids, turn_ham = hybrid_search(
                self.indexes["binary"], codes, emb, fetch, float_index, factor=factor, allowed_ids=allowed, order=order
            )
            dist, ids, ham = _best_over_turns(dist, ids, turn_ham, hamming_first=self.ranks_by_codes)
        else:
            dist, ids = float_index.search(emb, fetch, allowed)
            dist, ids, ham = _best_over_turns(dist, ids)
        own = (ids >= 0) & np.isin(ids, np.fromiter(excluded, np.int64, len(excluded)))
        keep = (ids >= 0) & ~own
        kept = np.flatnonzero(keep)
        left_out = int(own[: kept[k - 1] if len(kept) >= k else len(own)].sum())
        return (dist[keep][:k], ids[keep][:k], None if ham is None else ham[keep][:k]), len(excluded), left_out

    def _combine(self, parts: QueryParts) -> tuple[np.ndarray, np.ndarray | None]:
        """One query vector per turn: each turn averages the parts' vectors of that turn (``views`` rows).

        Every part counts once: an image (its vector of that turn), a ``tile:ID`` or a point (the mean of its
        tiles), an example geometry (the mean of the tiles under it), however many tiles it covers.
        """

        def mean(encs: list[Encoded], turned: list[bool], attr: str) -> np.ndarray:
            per_turn = []
            for v in range(parts.views):
                part_means = [
                    getattr(e, attr)[v] if t else getattr(e, attr).mean(axis=0)
                    for e, t in zip(encs, turned, strict=True)
                ]
                per_turn.append(np.mean(part_means, axis=0))
            return np.stack(per_turn)

        emb = mean(parts.positives, parts.positive_turned, "embedding")
        if parts.negatives:
            emb = emb - NEGATIVE_WEIGHT * mean(parts.negatives, parts.negative_turned, "embedding")
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        codes = None
        if parts.positives[0].u is not None:
            u = mean(parts.positives, parts.positive_turned, "u")
            if parts.negatives:
                u = u - NEGATIVE_WEIGHT * mean(parts.negatives, parts.negative_turned, "u")
            codes = pack_codes(u)
        return emb.astype(np.float32), codes

    def _hits_frame(
        self, ids: np.ndarray, dist: np.ndarray, scores: np.ndarray, ham: np.ndarray | None, query: str
    ) -> gpd.GeoDataFrame:
        tiles = self.tiles_by_id(ids).set_index("tile_id")
        found = np.isin(ids, tiles.index.to_numpy())
        if not found.all():
            # A scene removed (or replaced) while this search ran: its tiles were in the index this search
            # read, their catalog rows are gone.
            log.warning(
                "%d hit(s) left out: their scene was removed from %s while this search ran",
                int((~found).sum()),
                self.bundle.path,
            )
            ids, dist, scores = ids[found], dist[found], scores[found]
            ham = None if ham is None else ham[found]
        rows = []
        hams = [None] * len(ids) if ham is None else ham.tolist()
        for rank, (tid, d, sc, h) in enumerate(
            zip(ids.tolist(), dist.tolist(), scores.tolist(), hams, strict=True), start=1
        ):
            t = tiles.loc[tid]
            rec = self._records[t.scene_id]
            rows.append(
                {
                    "rank": rank,
                    "score": float(sc),
                    "distance": float(d),
                    "hamming": h,
                    "tile_id": int(tid),
                    # The id as text, ready to pass as a query: JSON readers that hold numbers as doubles
                    # (jq, JavaScript) round 63-bit ids.
                    "tile": f"tile:{int(tid)}",
                    "scene_id": t.scene_id,
                    "scene": rec["path"],
                    "col_off": int(t.col_off),
                    "row_off": int(t.row_off),
                    "width": int(t.width),
                    "height": int(t.height),
                    "query": query,
                    "geometry": t.geometry,
                }
            )
        columns = [
            "rank",
            "score",
            "distance",
            "hamming",
            "tile_id",
            "tile",
            "scene_id",
            "scene",
            "col_off",
            "row_off",
            "width",
            "height",
            "query",
            "geometry",
        ]
        frame = gpd.GeoDataFrame(rows, columns=columns, geometry="geometry", crs="EPSG:4326")
        # Typed whatever the rows: an empty result, or a model without codes (hamming all null), must give
        # the same field types (INTEGER, REAL) in a GeoPackage as any other.
        return frame.astype(HIT_DTYPES)


#: Column types of a hits frame (``hamming`` is null for a model without hash codes).
HIT_DTYPES = {
    "rank": "int64",
    "score": "float64",
    "distance": "float64",
    "hamming": "Int64",
    "tile_id": "int64",
    "tile": "object",
    "scene_id": "object",
    "scene": "object",
    "col_off": "int64",
    "row_off": "int64",
    "width": "int64",
    "height": "int64",
    "query": "object",
}

#: Values of an examples file's ``negative`` column (case-insensitive); empty or null marks a positive.
NEGATIVE_VALUES = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False, "": False}


def _negative_flags(column: pd.Series, path: Path) -> list[bool]:
    """Parse an examples file's ``negative`` column strictly: booleans, 0/1, true/false, yes/no; else an error."""
    flags = []
    for i, value in enumerate(column.tolist()):
        if isinstance(value, bool | np.bool_):
            flags.append(bool(value))
        elif value is None or (pd.api.types.is_scalar(value) and not isinstance(value, str) and pd.isna(value)):
            flags.append(False)
        elif isinstance(value, int | float | np.integer | np.floating) and value in (0, 1):
            flags.append(bool(value))
        elif isinstance(value, str) and value.strip().lower() in NEGATIVE_VALUES:
            flags.append(NEGATIVE_VALUES[value.strip().lower()])
        else:
            raise QueryError(
                f"{path}: the `negative` column of feature {i} is {value!r}; use true/false, yes/no or 1/0 "
                "(any case), or leave it empty for a positive example"
            )
    return flags


def _row(enc: Encoded, i: int) -> Encoded:
    """Row ``i`` of ``enc`` as an encoding of its own."""

    def take(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[i : i + 1]

    return Encoded(enc.features[i : i + 1], enc.embedding[i : i + 1], take(enc.codes), take(enc.u))


def _best_over_turns(
    dist: np.ndarray, ids: np.ndarray, ham: np.ndarray | None = None, hamming_first: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Merge per-turn results ``(turns, k)``: each tile keeps its best turn, by distance then id (by Hamming
    distance, then distance, then id with ``hamming_first``); ``ham`` (Hamming distances, or None) follows."""
    d, i = dist.ravel(), ids.ravel()
    ok = i >= 0
    d, i = d[ok], i[ok]
    h = None if ham is None else ham.ravel()[ok]
    order = np.lexsort((i, d, h) if hamming_first and h is not None else (i, d))
    d, i = d[order], i[order]
    _, first = np.unique(i, return_index=True)
    first = np.sort(first)
    return d[first], i[first], None if h is None else h[order][first]


def tile_ref(text: str) -> int | None:
    """The tile id in a ``tile:ID`` query (any case: ``TILE:12`` too), or None for a file name.

    A file that exists under that name stays a file.

    Raises:
        QueryError: For ``tile:`` followed by something other than a whole number.
    """
    if text[:5].lower() != "tile:" or Path(text).exists():
        return None
    try:
        return int(text[5:])
    except ValueError:
        example = "tile:4511202077337075870"
        raise QueryError(f"{text!r}: a tile id is tile:ID with a whole-number ID, e.g. {example}") from None


def check_counts(k: object, expand: object = 0) -> None:
    """Raise unless ``k`` is a positive whole number of hits and ``expand`` 0 or one.

    Raises:
        QueryError: Naming the argument.
    """
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
        raise QueryError(f"k must be a positive number of hits, got {k!r:.60}")
    if not isinstance(expand, int | np.integer) or isinstance(expand, bool) or expand < 0:
        raise QueryError(f"expand must be 0 (off) or a whole number of hits, got {expand!r:.60}")


def check_bbox(bbox: object) -> tuple[float, float, float, float]:
    """``bbox`` as 4 floats (west, south, east, north) in degrees, checked; west > east is a box across the
    antimeridian, as RFC 7946 (section 5.2) writes one: ``(179.5, -17, -179.5, -15)`` spans 1 degree. Such a
    box wider than half the globe is refused as west and east swapped.

    Raises:
        QueryError: Not 4 real numbers, or not a box on the globe.
    """
    example = "give 4 numbers, (west, south, east, north) in degrees"
    if isinstance(bbox, str | bytes) or not isinstance(bbox, Iterable):
        raise QueryError(f"bbox {bbox!r:.60}: {example}")
    values = list(bbox)
    if len(values) != 4 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        raise QueryError(f"bbox {tuple(values)!r:.80}: {example}")
    w, s, e, n = (float(v) for v in values)
    if not (-180 <= w <= 180 and -180 <= e <= 180 and w != e and -90 <= s < n <= 90):
        raise QueryError(
            f"bbox {(w, s, e, n)}: need west and east in [-180, 180] and not equal (west > east is a box across "
            "the antimeridian), -90 <= south < north <= 90"
        )
    if w > e and e + 360 - w > 180:
        raise QueryError(
            f"bbox {(w, s, e, n)}: west > east is a box across the antimeridian, here {e + 360 - w:g} degrees wide; "
            "swap west and east"
        )
    return w, s, e, n


def bbox_polygon(bbox: tuple[float, float, float, float]) -> shapely.Polygon:
    """A checked ``bbox`` as a polygon in continuous longitudes: one across the antimeridian runs past 180."""
    w, s, e, n = bbox
    return shapely.box(w, s, e + 360 if e < w else e, n)


def _query_frame(parts: QueryParts) -> gpd.GeoDataFrame:
    return query_frame(parts.geometries)


def merge_hits(hits: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Dissolve hit footprints that overlap or share an edge into regions with best rank, best score, count
    (hits meeting only at a corner stay apart: the union of two such squares is two polygons)."""
    columns = ["region", "best_rank", "best_score", "count", "tile_ids", "geometry"]
    if hits.empty:
        # The types of a non-empty result, so an empty layer's fields are not all TEXT.
        return gpd.GeoDataFrame(
            {
                "region": pd.Series([], dtype="int64"),
                "best_rank": pd.Series([], dtype="int64"),
                "best_score": pd.Series([], dtype="float64"),
                "count": pd.Series([], dtype="int64"),
                "tile_ids": pd.Series([], dtype=object),
            },
            geometry=gpd.GeoSeries([], crs="EPSG:4326"),
            crs="EPSG:4326",
        )
    geoms = hits.geometry.values
    # Regions are the connected groups of footprints joined by an overlap or a shared edge: pairs from an
    # R-tree, joined in a union-find (the union of every footprint, then a search for each part's members,
    # took 9.9 s for 10,000 scattered hits, 0.28 s this way).
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="intersects")
    pair = left < right
    left, right = left[pair], right[pair]
    joined = shapely.get_dimensions(shapely.intersection(geoms[left], geoms[right])) >= 1
    left, right = left[joined], right[joined]
    # A footprint across the antimeridian keeps continuous longitudes on its own side of the line: its
    # neighbour on the other side is 360 degrees away, and meets it only shifted by a turn.
    bounds = shapely.bounds(geoms)
    at_line = np.flatnonzero((bounds[:, 0] <= -180) | (bounds[:, 2] >= 180))
    for turn in (-360.0, 360.0):
        if not len(at_line):
            break
        shifted = _shift(geoms[at_line], turn)
        q, b = tree.query(shifted, predicate="intersects")
        touch = shapely.get_dimensions(shapely.intersection(shifted[q], geoms[b])) >= 1
        left, right = np.concatenate([left, at_line[q[touch]]]), np.concatenate([right, b[touch]])
    parent = np.arange(len(hits))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(len(hits)):
        groups.setdefault(root(i), []).append(i)
    ranks, scores, tile_ids = hits["rank"].to_numpy(), hits.score.to_numpy(), hits.tile_id.to_numpy()
    rows = []
    for n, members in enumerate(groups.values(), start=1):
        idx = np.array(members)
        rows.append(
            {
                "region": n,
                "best_rank": int(ranks[idx].min()),
                "best_score": float(scores[idx].max()),
                "count": len(idx),
                "tile_ids": ",".join(str(t) for t in sorted(tile_ids[idx].tolist())),
                "geometry": geoms[idx[0]] if len(idx) == 1 else _union_across_the_line(geoms[idx], ranks[idx]),
            }
        )
    out = gpd.GeoDataFrame(rows, columns=columns, geometry="geometry", crs="EPSG:4326")
    out = out.sort_values("best_rank").reset_index(drop=True)
    out["region"] = np.arange(1, len(out) + 1)
    return out


def _union_across_the_line(geoms: np.ndarray, ranks: np.ndarray) -> shapely.Geometry:
    """The union of a region's footprints, with continuous longitudes as its footprints have.

    Members on the other side of the antimeridian from the best-ranked one are shifted by a turn to its side
    first. A region that then spans half the globe or more lies round a pole (its members are caps, or
    reach round the pole): its members are cut at +-180 and wrapped into -180..180 instead, which gives the
    cap they make together (shifted to one side, they would make a strip 400 degrees wide).
    """
    xs = shapely.get_x(shapely.centroid(geoms))
    anchor = xs[int(np.argmin(ranks))]
    shifted = geoms.copy()
    turns = np.round((anchor - xs) / 360.0) * 360.0
    for i in np.flatnonzero(turns):
        shifted[i] = _shift(geoms[i], turns[i])
    union = shapely.union_all(shifted)
    lo, _, hi, _ = union.bounds
    if hi - lo < 180:
        return union
    pieces = []
    for k in (-2, -1, 0, 1, 2):  # footprints reach at most 20 degrees beyond +-180, caps span exactly 360
        window = shapely.box(-180 + 360 * k, -90, 180 + 360 * k, 90)
        part = shapely.intersection(geoms, window)
        part = part[~shapely.is_empty(part)]
        pieces += list(_shift(part, -360.0 * k))
    return shapely.union_all(pieces)


def _shift(geoms: Any, dx: float) -> Any:
    """Geometries moved ``dx`` degrees east (a turn, +-360, puts them on the other side of the antimeridian)."""
    return shapely.transform(geoms, lambda xy: xy + np.array([dx, 0.0]))


#: Below this share of the smaller area, a tile and an area only touch: the sliver that densified edges
#: reprojected apart leave between a tile and an area drawn on its neighbour's edge.
TOUCH_TOLERANCE = 1e-3


def sharing_area(
    fraction: float = TOUCH_TOLERANCE, of: str = "smaller"
) -> Callable[[gpd.GeoSeries, shapely.Geometry], np.ndarray]:
    """A predicate for :meth:`Bundle.tiles_at`: footprints that share more than ``fraction`` of an area with
    a polygon, not those that only touch it: of the smaller of the two (``of="smaller"``), or of the tile's
    own (``of="tile"``). A point or line selects the footprints it meets, its edges included."""

    def predicate(footprints: gpd.GeoSeries, geom: shapely.Geometry) -> np.ndarray:
        return shares_area(footprints.values, geom, fraction, of)

    return predicate


def shares_area(footprints: Any, geoms: Any, fraction: float = TOUCH_TOLERANCE, of: str = "smaller") -> np.ndarray:
    """Element-wise (with broadcasting): does each footprint share more than ``fraction`` of an area with its
    geometry (see :func:`sharing_area`)? A point or line shares whatever it meets."""
    single = isinstance(geoms, shapely.Geometry)
    # Made valid before broadcasting, so that one geometry against many footprints is repaired once.
    geoms = _valid(geoms if isinstance(geoms, shapely.Geometry) else np.asarray(geoms, dtype=object))
    fp, geom = np.broadcast_arrays(_valid(np.asarray(footprints, dtype=object)), np.asarray(geoms, dtype=object))
    fp, geom = np.atleast_1d(fp), np.atleast_1d(geom)
    hit = np.asarray(shapely.intersects(fp, geom), dtype=bool).copy()
    geom_area = shapely.area(geom)
    test = hit & (geom_area > 0)
    if test.any() and single:
        # One area against many footprints (--bbox, --aoi, a polygon): the footprints well inside it share all
        # their area; only those across its edge need an intersection.
        area = geom[test][0]
        shapely.prepare(area)
        inside = np.zeros_like(test)
        inside[test] = shapely.contains_properly(area, fp[test])
        test &= ~inside
    if test.any():
        shared = shapely.area(shapely.intersection(fp[test], geom[test]))
        base = shapely.area(fp[test])
        if of == "smaller":
            base = np.minimum(base, geom_area[test])
        hit[test] = shared > fraction * base
    return hit


def _valid(geoms: Any) -> Any:
    """Geometries GEOS can intersect: a user's self-crossing polygon, or a footprint round a pole, made valid
    (GEOS raises a TopologyException on them otherwise)."""
    valid = shapely.is_valid(geoms)
    if np.all(valid):
        return geoms
    if isinstance(geoms, shapely.Geometry):
        return shapely.make_valid(geoms)
    out = np.array(geoms, dtype=object)
    out[~valid] = shapely.make_valid(out[~valid])
    return out
