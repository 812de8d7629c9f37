"""Vectors keyed by tile id, searched with FAISS.

A :class:`VectorIndex` holds either float embeddings (SRL head) or packed binary hash codes (DGSSH head), each
keyed by an int64 tile id, and answers k-nearest-neighbour queries with an optional id filter evaluated inside
FAISS. :func:`hybrid_search` chains the two: Hamming candidates from a binary index, re-ranked with exact
float vectors.

Conventions shared by every search in this module:

- ``ids`` are int64 tile ids; missing hits (fewer than ``k`` vectors, or fewer than ``k`` allowed ids) are
  padded with ``-1``.
- ``distances`` are float32, smaller is closer, padded with ``inf``:
  float ``cosine`` -> Euclidean distance between the unit vectors, ``sqrt(2 - 2 cos)``, in [0, 2];
  float ``l2`` -> plain Euclidean distance; binary -> Hamming distance in bits (integral values).
- scores (:meth:`VectorIndex.scores`) are larger-is-better and padded with ``nan``: cosine similarity for
  ``cosine``; ``1 / (1 + distance)`` for ``l2``; ``1 - hamming / nbits`` for binary.
- every row is sorted by ``(distance, id)``. Exact kinds (float/binary flat) also guarantee *which* tied
  vectors make the cut at the k-th distance: the ones with the smallest ids, as brute force with a stable
  ``(distance, id)`` sort would. Binary flat does so by keeping the FAISS storage in ascending-id order (an
  out-of-order ``add`` re-sorts it): FAISS' Hamming scan keeps the earlier-stored of tied codes. FAISS' float
  scan (BLAS on batches) keeps an arbitrary one, so float flat fetches ``k + 8`` and widens the rows whose tie
  group at the k-th distance reaches the end of what was fetched (exact float ties are duplicates, so this
  almost never runs). The tests check both against numpy on data that is nearly all ties. Approximate kinds
  only sort what they return.

Index kinds (``factory``):

- ``None``: exact flat search (``IndexFlatIP``/``IndexFlatL2`` or ``IndexBinaryFlat``) under an
  ``IndexIDMap``.
- a FAISS factory string, e.g. ``"HNSW32"``, ``"IVF1024,PQ32"`` (float) or ``"BIVF256"``, ``"BHNSW32"``
  (binary). IVF kinds keep tile ids natively in their inverted lists with a hash-table direct map (so they
  can reconstruct and remove by id); every other kind sits under an ``IndexIDMap``. ``IndexIDMap2`` is not
  used: its reverse map is a C++ hash map costing about 50 bytes a tile, six times a 64-bit code; lookups by
  id go through a sorted id array here instead.

Removal: flat and IVF kinds remove in place. Graph kinds (HNSW, binary HNSW) cannot delete in FAISS, so
:meth:`VectorIndex.remove` rebuilds them from their own stored vectors (reconstruct, empty a clone, re-add),
which costs a full graph build; kinds that can neither remove nor reconstruct (e.g. ``BHash``) raise
:class:`~geoir.errors.BundleError`.

Filtering: exact kinds and float HNSW/IVF pass an ``IDSelectorBatch`` through ``SearchParameters`` (so ``k``
hits come back when at least ``k`` ids are allowed). Binary approximate kinds do not accept selectors
(checked in FAISS 1.15), and a graph or IVF probe can miss allowed vectors under a tight filter, so
approximate kinds fall back to an exact scan of the allowed subset (reconstructed from the index) when the
filter is tight or when a filtered search came back short. See :meth:`VectorIndex.search`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeAlias

import faiss as _faiss
import numpy as np

from geoir.errors import BundleError, QueryError
from geoir.io.files import file_mode

log = logging.getLogger("geoir")
# A bundle's index files are derived from the vectors it stores, and rebuilt from them when missing.
_REDO = "delete it and search again: it is rebuilt from the vectors stored in the bundle"

# FAISS's bundled stubs (faiss/__init__.pyi) cover only part of the SWIG API: no DirectMap, no
# SearchParametersHNSW, no keyword constructors, no id_map or codes. Typed against them, every correct call
# here fails type checking, so FAISS is used untyped and its objects are annotated with the aliases below.
faiss: Any = _faiss
FaissIndex: TypeAlias = Any  # a faiss.Index or faiss.IndexBinary
FaissObject: TypeAlias = Any  # any other SWIG object: SearchParameters, IDSelector, HNSW

Kind = Literal["float", "binary"]
Metric = Literal["cosine", "l2"]

#: Allowed-id sets up to this size are searched exactly over the subset on approximate kinds: a brute-force
#: scan of a few thousand vectors costs less than a graph walk that has to skip almost every node.
EXACT_SUBSET_MAX = 4096

FLOAT_FACTORY_EXAMPLES = ("HNSW32", "IVF1024,Flat", "IVF1024,PQ32", "OPQ32,IVF4096,PQ32")
BINARY_FACTORY_EXAMPLES = ("BFlat", "BIVF256", "BHNSW32", "BIVF1024,BHNSW")


class VectorSource(Protocol):
    """Anything that gives the float vectors of tile ids: a float :class:`VectorIndex`, an ArrayStore."""

    metric: Metric

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Return the vectors of ``ids`` as float32 rows, in the order given."""
        ...


class VectorIndex:
    """A FAISS index of float embeddings or packed binary codes, keyed by int64 tile ids.

    Args:
        dim: Float dimension, or number of bits for binary codes (a multiple of 8).
        kind: ``"float"`` for embeddings, ``"binary"`` for codes packed 8 bits a byte (``np.packbits``).
        factory: ``None`` for exact search, or a FAISS factory string (see the module docstring).
        metric: Float kinds only. ``"cosine"`` L2-normalises every vector and query and searches by inner
            product; ``"l2"`` searches raw vectors by Euclidean distance.
        max_train: At most this many vectors, sampled with ``seed``, train a kind that needs training.
        seed: Seed of the training sample.

    Raises:
        BundleError: The factory string is not valid FAISS, or the arguments do not describe an index.
    """

    def __init__(
        self,
        dim: int,
        kind: Kind = "float",
        factory: str | None = None,
        metric: Metric = "cosine",
        max_train: int = 100_000,
        seed: int = 0,
    ) -> None:
        if kind not in ("float", "binary"):
            raise BundleError(f"unknown index kind {kind!r}; use 'float' or 'binary'")
        if metric not in ("cosine", "l2"):
            raise BundleError(f"unknown metric {metric!r}; use 'cosine' or 'l2'")
        if dim <= 0 or (kind == "binary" and dim % 8):
            raise BundleError(f"bad {kind} index dimension {dim}; binary codes need a multiple of 8 bits")
        self.dim = dim
        self.kind: Kind = kind
        self.metric: Metric = "cosine" if kind == "binary" else metric
        self.factory = factory
        self.max_train = max_train
        self.seed = seed
        self._index = self._build(factory)
        self._ids = np.empty(0, dtype=np.int64)
        #: Vectors memory-mapped from the file (see :meth:`load`): searchable, not changeable.
        self.mapped = False

    # ------------------------------------------------------------------ construction

    def _build(self, factory: str | None) -> FaissIndex:
        """Create the FAISS index; IVF kinds keep ids natively, the rest go under an IndexIDMap."""
        if self.kind == "binary":
            base = faiss.IndexBinaryFlat(self.dim) if factory is None else self._parse(factory)
            if isinstance(base, faiss.IndexBinaryIVF):
                base.set_direct_map_type(faiss.DirectMap.Hashtable)
                return base
            return faiss.IndexBinaryIDMap(base)
        faiss_metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        base = faiss.IndexFlat(self.dim, faiss_metric) if factory is None else self._parse(factory)
        ivf = faiss.try_extract_index_ivf(base)
        if ivf is not None:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            return base
        return faiss.IndexIDMap(base)

    def _parse(self, factory: str) -> FaissIndex:
        examples = BINARY_FACTORY_EXAMPLES if self.kind == "binary" else FLOAT_FACTORY_EXAMPLES
        hint = f"valid {self.kind} examples: {', '.join(repr(e) for e in examples)}"
        if "IDMap" in factory:
            raise BundleError(f"index factory {factory!r}: leave out IDMap, geoir adds its own; {hint}")
        try:
            if self.kind == "binary":
                if not factory.startswith("B"):
                    raise RuntimeError("binary factory strings start with 'B'")
                return faiss.index_binary_factory(self.dim, factory)
            faiss_metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
            return faiss.index_factory(self.dim, factory, faiss_metric)
        except RuntimeError as err:
            # FAISS prefixes its reason with the C++ function and source line; the reason is what follows.
            reason = re.split(r"\.(?:cpp|h):\d+: ", str(err).strip().splitlines()[-1])[-1][-160:]
            raise BundleError(
                f"cannot build a {self.dim}-{'bit' if self.kind == 'binary' else 'd'} {self.kind} index "
                f"from factory string {factory!r} ({reason}); {hint}"
            ) from None

    # ------------------------------------------------------------------ introspection

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __repr__(self) -> str:
        return f"VectorIndex({self.dim}, {self.kind!r}, factory={self.factory!r}, ntotal={len(self)})"

    @property
    def exact(self) -> bool:
        """True for flat kinds, whose results equal brute force (ties to the smallest ids)."""
        return self._exact

    @property
    def _index(self) -> FaissIndex:
        return self._faiss

    @_index.setter
    def _index(self, index: FaissIndex) -> None:
        # Cached because every search asks, and unwrapping the id map through SWIG costs microseconds.
        self._faiss = index
        self._exact = isinstance(self._base(), faiss.IndexFlat | faiss.IndexBinaryFlat)

    @property
    def is_trained(self) -> bool:
        """False until a kind that needs training (IVF, PQ) has seen :meth:`train` or its first add."""
        return bool(self._index.is_trained)

    @property
    def faiss_index(self) -> FaissIndex:
        """The FAISS index itself (for benchmarks and advanced tuning; searching it bypasses id sorting)."""
        return self._index

    def ids(self) -> np.ndarray:
        """All tile ids in the index, ascending (a copy)."""
        return self._sorted_ids().copy()

    def __contains__(self, tile_id: object) -> bool:
        ids = self._sorted_ids()
        i = int(np.searchsorted(ids, tile_id))  # type: ignore[call-overload]
        return i < len(ids) and ids[i] == tile_id

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Trade speed for recall on approximate kinds; saved with the index.

        Args:
            nprobe: Inverted lists visited per query (IVF kinds).
            ef_search: Candidate list size of the graph walk (HNSW kinds).

        Raises:
            BundleError: The parameter does not apply to this kind.
        """
        if nprobe is not None:
            ivf = self._ivf()
            if ivf is None:
                raise BundleError(f"nprobe applies to IVF kinds only, not {self.factory or 'flat'!r}")
            ivf.nprobe = nprobe
        if ef_search is not None:
            hnsw = self._hnsw()
            if hnsw is None:
                raise BundleError(f"ef_search applies to HNSW kinds only, not {self.factory or 'flat'!r}")
            hnsw.efSearch = ef_search

    # ------------------------------------------------------------------ mutation

    def train(self, vectors: np.ndarray) -> None:
        """Train a kind that needs it on a seeded sample of at most ``max_train`` of ``vectors``.

        Raises:
            BundleError: Too few vectors to train this kind.
        """
        self._check_changeable()
        x = self._prepare(vectors, "training vectors", BundleError)
        if len(x) > self.max_train:
            pick = np.random.default_rng(self.seed).choice(len(x), self.max_train, replace=False)
            x = x[np.sort(pick)]
        need = self.min_train
        advice = (
            f"index factory {self.factory!r} needs at least {need} vectors to train but got {len(x)}; "
            "pick a kind with fewer lists/centroids, or exact search (in a bundle: tile into a new --index "
            "with a smaller --index-kind, or without one)"
        )
        if len(x) < need:
            raise BundleError(advice)
        try:
            self._index.train(x)
        except RuntimeError as err:
            raise BundleError(f"{advice} (FAISS: {str(err).strip().splitlines()[-1][-160:]})") from None

    def add(self, ids: np.ndarray | Sequence[int], vectors: np.ndarray) -> None:
        """Add ``vectors`` under tile ``ids``; trains the index on them first if it is untrained.

        Raises:
            BundleError: An id is already in the index or repeated, or training fails.
            QueryError: ``vectors`` has the wrong shape or dtype.
        """
        self._check_changeable()
        keys = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        x = self._prepare(vectors, "vectors to add", QueryError)
        if len(keys) != len(x):
            raise QueryError(f"got {len(keys)} ids for {len(x)} vectors; pass one id per vector")
        if len(keys) == 0:
            return
        order = np.argsort(keys, kind="stable")
        keys, x = keys[order], x[order]
        current = self._sorted_ids()
        dup = keys[1:][keys[1:] == keys[:-1]]
        if len(dup) == 0 and len(current):
            pos = np.searchsorted(current, keys).clip(max=len(current) - 1)
            dup = keys[current[pos] == keys]
        if len(dup):
            raise BundleError(f"tile ids already in the index or repeated: {dup[:5].tolist()}; remove first")
        if not self.is_trained:
            self.train(x)
        if self.exact and len(current) and keys[0] < current[-1]:
            # Keep flat storage in ascending-id order: that order is what breaks distance ties by id.
            old = self._flat_vectors()
            keys = np.concatenate([current, keys])
            x = np.concatenate([old, x])
            order = np.argsort(keys, kind="stable")
            keys, x = keys[order], x[order]
            self._index.reset()
        self._index.add_with_ids(x, keys)
        if not self.exact:
            self._ids = np.insert(current, np.searchsorted(current, keys), keys)

    def remove(self, ids: np.ndarray | Sequence[int]) -> int:
        """Remove tile ``ids`` (unknown ids are ignored) and return how many were removed.

        Flat and IVF kinds remove in place; HNSW kinds are rebuilt from their stored vectors (slow on large
        indexes: batch your removals).

        Raises:
            BundleError: This kind can neither remove nor reconstruct vectors.
        """
        self._check_changeable()
        keys = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        present = keys[self._members(keys)]
        if len(present) == 0:
            return 0
        # IDSelectorArray tests membership by a linear scan, once per stored vector: quadratic for a scene
        # of a large index. IDSelectorBatch hashes; IVF kinds' direct maps take only the array selector.
        selector = faiss.IDSelectorArray(present) if self._ivf() is not None else faiss.IDSelectorBatch(present)
        try:
            removed = int(self._index.remove_ids(selector))
        except RuntimeError as err:
            if "not implemented" not in str(err):
                raise
            removed = self._rebuild_without(present)
        if not self.exact:
            self._ids = self._ids[~np.isin(self._ids, present)]
        return removed

    def _check_changeable(self) -> None:
        if self.mapped:
            raise RuntimeError("a memory-mapped index cannot change; load it with mapped=False to change it")

    def _rebuild_without(self, present: np.ndarray) -> int:
        """Rebuild a kind FAISS cannot delete from (graphs) from its own stored vectors, minus ``present``."""
        keep = self._sorted_ids()
        keep = keep[~np.isin(keep, present)]
        try:
            x = self.reconstruct(keep)
        except BundleError:
            raise BundleError(
                f"index kind {self.factory!r} can neither remove nor reconstruct vectors; rebuild the index "
                "without these tiles (re-run geoir tile), or use a kind that can (flat, IVF, HNSW)"
            ) from None
        base = self._base()
        clone = faiss.clone_binary_index(base) if self.kind == "binary" else faiss.clone_index(base)
        clone.reset()  # keeps trained state (quantizers), drops vectors and graph
        fresh = faiss.IndexBinaryIDMap(clone) if self.kind == "binary" else faiss.IndexIDMap(clone)
        fresh.add_with_ids(x, keep)
        before = len(self)
        self._index = fresh
        return before - len(keep)

    # ------------------------------------------------------------------ lookup

    def reconstruct(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Return the stored vectors (float32) or codes (uint8) of ``ids``, in the order given.

        Float ``cosine`` vectors come back unit-normalised; PQ kinds return their lossy decoding.

        Raises:
            QueryError: An id is not in the index.
            BundleError: This kind cannot reconstruct vectors.
        """
        keys = np.asarray(ids, dtype=np.int64).reshape(-1)
        found = self._members(keys)
        if not found.all():
            raise QueryError(f"tile id(s) not in the index: {keys[~found][:5].tolist()}")
        if self.exact:
            return self._flat_vectors()[np.searchsorted(self._sorted_ids(), keys)]
        try:
            if self._ivf_native():
                if self.kind == "float":
                    return self._index.reconstruct_batch(keys)
                rows = [self._index.reconstruct(int(i)) for i in keys]
                return np.stack(rows) if rows else self._empty()
            id_map = faiss.vector_to_array(self._index.id_map)
            order = np.argsort(id_map)
            internal = order[np.searchsorted(id_map[order], keys)]
            base = self._base()
            assert base is not None  # not IVF-native, so under an id map
            if self.kind == "float":
                return base.reconstruct_batch(internal)
            return np.stack([base.reconstruct(int(i)) for i in internal]) if len(keys) else self._empty()
        except RuntimeError as err:
            raise BundleError(
                f"index kind {self.factory!r} cannot reconstruct vectors ({str(err).strip()[-120:]})"
            ) from None

    # ------------------------------------------------------------------ search

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the ``k`` nearest tiles of each query, optionally among ``allowed_ids`` only.

        Args:
            queries: ``(nq, dim)`` float vectors or ``(nq, dim // 8)`` packed uint8 codes; one 1-D query is
                accepted too and treated as ``nq = 1``.
            k: Hits per query.
            allowed_ids: If given, only these tile ids can be returned (ids not in the index are ignored).
                With at least ``k`` allowed ids present (or none given and at least ``k`` vectors), every row has
                ``k`` hits: exact kinds and float
                HNSW/IVF filter inside FAISS through an ID selector; approximate kinds scan the allowed subset
                exactly when it is small (``EXACT_SUBSET_MAX``), when the kind takes no selector (binary IVF,
                binary HNSW: post-filtered over-fetch first), or when the filtered search came back short.

        Returns:
            ``(distances, ids)``, both ``(nq, k)``: float32 distances (module conventions; ``inf`` padding)
            and int64 tile ids (``-1`` padding), each row sorted by ``(distance, id)``.

        Raises:
            BundleError: The index is empty.
            QueryError: Bad ``k`` or badly shaped queries.
        """
        if len(self) == 0:
            raise BundleError("the index is empty; run geoir tile first")
        if not isinstance(k, int | np.integer) or k < 1:
            raise QueryError(f"k must be a positive integer, got {k!r}")
        q = self._prepare(queries, "queries", QueryError)
        k = int(k)
        if allowed_ids is None:
            if self.kind == "float" and self._exact:
                return self._float_flat_search(q, k, None, len(self))
            dist, ids = self._finish(*self._index.search(q, k))
            # A graph (HNSW) search can return fewer than k hits when k nears the index size: scan exactly.
            short = (ids >= 0).sum(axis=1) < min(k, len(self))
            if short.any():
                dist[short], ids[short] = self._subset_search(q[short], k, self.ids())
            return dist, ids
        allowed = np.unique(np.asarray(allowed_ids, dtype=np.int64).reshape(-1))
        allowed = allowed[self._members(allowed)]
        if len(allowed) == 0:
            return self._padding(len(q), k)
        if not self.exact and len(allowed) <= EXACT_SUBSET_MAX:
            return self._subset_search(q, k, allowed)
        sel = faiss.IDSelectorBatch(allowed)  # held here: params keep only a pointer in older FAISS
        params = self._params(sel)
        if self.exact and self.kind == "float":
            return self._float_flat_search(q, k, params, len(allowed))
        if params is not None:
            raw_d, raw_i = self._index.search(q, k, params=params)
            dist, ids = self._finish(raw_d, raw_i)
        else:
            dist, ids = self._postfilter_search(q, k, allowed)
        short = (ids >= 0).sum(axis=1) < min(k, len(allowed))
        if short.any():
            dist[short], ids[short] = self._subset_search(q[short], k, allowed)
        return dist, ids

    def scores(self, distances: np.ndarray) -> np.ndarray:
        """Convert distances from :meth:`search` to larger-is-better scores (``nan`` for padding)."""
        d = np.asarray(distances, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            if self.kind == "binary":
                s = 1.0 - d / self.dim
            elif self.metric == "cosine":
                s = 1.0 - d * d / 2.0
            else:
                s = 1.0 / (1.0 + d)
        return np.where(np.isfinite(d), s, np.nan)

    def _float_flat_search(
        self, q: np.ndarray, k: int, params: FaissObject | None, limit: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact float search whose k-th-distance ties go to the smallest ids.

        FAISS' float scan (BLAS for batches) may keep any of several vectors tied at the k-th distance, so
        fetch a few more and widen the rows whose tie group reaches the end of the fetched list. Exact float
        ties only come from duplicate vectors, so the widening almost never runs; the binary flat scan keeps
        the earliest-stored vector among ties (tested), which the ascending-id storage makes the smallest id.
        """
        fetch = min(limit, k + 8)
        dist, ids = self._finish(*self._index.search(q, fetch, params=params))
        while fetch < limit:
            open_rows = np.flatnonzero((ids[:, -1] >= 0) & (dist[:, min(k, fetch) - 1] == dist[:, -1]))
            if len(open_rows) == 0:
                break
            fetch = min(limit, fetch * 4)
            wide_d, wide_i = self._finish(*self._index.search(q[open_rows], fetch, params=params))
            pad_d, pad_i = self._padding(len(q), fetch)
            pad_d[:, : dist.shape[1]], pad_i[:, : ids.shape[1]] = dist, ids
            pad_d[open_rows], pad_i[open_rows] = wide_d, wide_i
            dist, ids = pad_d, pad_i
        out_d, out_i = self._padding(len(q), k)
        width = min(k, dist.shape[1])
        out_d[:, :width], out_i[:, :width] = dist[:, :width], ids[:, :width]
        return out_d, out_i

    def _postfilter_search(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Filter after the fact for kinds without selectors: over-fetch in proportion to the filter."""
        fetch = min(len(self), max(4 * k, math.ceil(2 * k * len(self) / len(allowed))))
        raw_d, raw_i = self._index.search(q, fetch)
        dist, ids = self._finish(raw_d, raw_i)
        keep = np.isin(ids, allowed)
        # Stable sort of "not kept" pushes the allowed hits to the front without reordering them.
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        dist, ids, keep = (np.take_along_axis(a, order, axis=1) for a in (dist, ids, keep))
        out_d, out_i = self._padding(len(q), k)
        width = min(k, fetch)
        out_d[:, :width] = np.where(keep, dist, np.inf)
        out_i[:, :width] = np.where(keep, ids, -1)
        return out_d, out_i

    def _subset_search(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the allowed ids' stored vectors, via a temporary flat index in id order."""
        x = self.reconstruct(allowed)
        if self.kind == "binary":
            flat: FaissIndex = faiss.IndexBinaryFlat(self.dim)
        else:
            flat = faiss.IndexFlat(self.dim, self._index.metric_type)
        flat.add(x)
        raw_d, raw_i = flat.search(q, k)
        return self._finish(raw_d, np.where(raw_i >= 0, allowed[raw_i.clip(min=0)], -1))

    def _finish(self, raw_d: np.ndarray, raw_i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """FAISS output -> module conventions (distances, padding, (distance, id) order)."""
        valid = raw_i >= 0
        padded = not valid.all()
        if self.kind == "binary":
            dist = raw_d.astype(np.float32)
        elif self.metric == "cosine":
            sim = np.where(valid, raw_d, 0.0) if padded else raw_d
            dist = np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0), dtype=np.float32)
        else:
            sq = np.where(valid, raw_d, 0.0) if padded else raw_d
            dist = np.sqrt(np.maximum(sq, 0.0), dtype=np.float32)
        if padded:
            dist[~valid] = np.inf
        # FAISS does not promise an order among equal distances (the float BLAS path returns tied offsets in
        # any order; id maps scramble offset order), so restore (distance, id) order where it is broken.
        # Checking first keeps the common already-ordered case cheap: this runs on every query. The binary
        # flat scan needs no check: it keeps the earliest-stored of tied codes, and storage is in id order.
        if self.kind == "binary" and self._exact:
            return dist, raw_i
        step, same = dist[:, 1:] < dist[:, :-1], dist[:, 1:] == dist[:, :-1]
        if (step | (same & (raw_i[:, 1:] < raw_i[:, :-1]))).any():
            order = np.lexsort((np.where(valid, raw_i, np.iinfo(np.int64).max), dist), axis=1)
            return np.take_along_axis(dist, order, axis=1), np.take_along_axis(raw_i, order, axis=1)
        return dist, raw_i

    def _padding(self, nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full((nq, k), np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)

    def _params(self, sel: FaissObject) -> FaissObject | None:
        """Search parameters carrying ``sel`` for this kind, or None when FAISS takes no selector here."""
        base = self._base()
        if self.kind == "binary":
            # FAISS 1.x: only the binary flat scan reads SearchParameters; IVF, HNSW, Hash reject them.
            return faiss.SearchParameters(sel=sel) if isinstance(base, faiss.IndexBinaryFlat) else None
        ivf, hnsw = self._ivf(), self._hnsw()
        if ivf is not None:
            inner = faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe)
            if isinstance(base, faiss.IndexPreTransform):
                return faiss.SearchParametersPreTransform(sel=sel, index_params=inner)
            return inner
        if hnsw is not None:
            return faiss.SearchParametersHNSW(sel=sel, efSearch=hnsw.efSearch)
        if isinstance(base, faiss.IndexFlat | faiss.IndexFlatCodes):
            return faiss.SearchParameters(sel=sel)
        return None

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` atomically (temp file in the same folder, fsync, rename).

        The file is a plain FAISS index (``faiss.read_index`` / ``read_index_binary`` open it).

        Raises:
            BundleError: The file cannot be written.
        """
        target = Path(path)
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp")
        except OSError as err:
            raise BundleError(
                f"cannot write {target}: {err.strerror}; check the folder exists and is writable"
            ) from None
        # mkstemp makes the file 0600: it gets the mode of the index it replaces, or the umask's.
        os.fchmod(fd, file_mode(target))
        os.close(fd)
        try:
            if self.kind == "binary":
                faiss.write_index_binary(self._index, tmp)
            else:
                faiss.write_index(self._index, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except (RuntimeError, OSError) as err:
            Path(tmp).unlink(missing_ok=True)
            # FAISS' own message is a C++ assertion (file and line); its last line says what failed.
            reason = err.strerror if isinstance(err, OSError) else str(err).strip().splitlines()[-1][:160]
            raise BundleError(f"cannot write {target} ({reason}); check free disk space") from None

    @staticmethod
    def count(path: str | os.PathLike[str]) -> int:
        """How many vectors the index file at ``path`` holds, without reading them (memory-mapped).

        Raises:
            BundleError: The file is missing, corrupt or truncated (as :meth:`load` would find it).
        """
        source = Path(path)
        try:
            with open(source, "rb") as f:
                binary = f.read(4).startswith(b"IB")
            # IO_FLAG_MMAP_IFC maps a flat index's vectors (IO_FLAG_MMAP alone still reads them).
            flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
            index = faiss.read_index_binary(str(source), flags) if binary else faiss.read_index(str(source), flags)
        except OSError as err:
            raise BundleError(f"cannot read index file {source}: {err.strerror}") from None
        except (RuntimeError, MemoryError) as err:
            log.debug("FAISS cannot read %s: %s", source, err)
            raise BundleError(f"index file {source} is corrupt or truncated; {_REDO}") from None
        return int(index.ntotal)

    @classmethod
    def load(cls, path: str | os.PathLike[str], mapped: bool = False) -> VectorIndex:
        """Read an index written by :meth:`save`.

        Args:
            path: The index file.
            mapped: Memory-map a float index's vectors instead of reading them (searching a large bundle
                then reads only the pages it touches). Such an index must not be changed: :attr:`mapped`
                says so, and its owner loads it again unmapped to change it.

        Raises:
            BundleError: The file is missing, corrupt, truncated, or not a geoir vector index.
        """
        source = Path(path)
        redo = _REDO
        try:
            with open(source, "rb") as f:
                magic = f.read(4)
        except FileNotFoundError:
            raise BundleError(f"index file {source} does not exist; run geoir tile first") from None
        except OSError as err:
            raise BundleError(f"cannot read index file {source}: {err.strerror}") from None
        binary = magic.startswith(b"IB")
        mapped = mapped and not binary  # a binary index is 8 bytes per tile at 64 bits: read it
        try:
            if binary:
                index = faiss.read_index_binary(str(source))
            elif mapped:
                index = faiss.read_index(str(source), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
            else:
                index = faiss.read_index(str(source))
        except (RuntimeError, MemoryError) as err:
            log.debug("FAISS cannot read %s: %s", source, err)
            raise BundleError(f"index file {source} is corrupt or truncated; {redo}") from None
        self = cls.__new__(cls)
        self.kind = "binary" if binary else "float"
        self.dim = int(index.d)
        self.metric = "cosine" if binary or index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"
        self.factory = None
        self.max_train, self.seed = 100_000, 0
        self._index = index
        self.mapped = mapped
        if self._base() is None and not self._ivf_native():
            raise BundleError(f"{source} is a FAISS index but not a geoir vector index (no tile ids); {redo}")
        self._ids = np.empty(0, dtype=np.int64)
        if not self.exact:
            self.factory = type(self._base() if not self._ivf_native() else index).__name__
            self._ids = np.sort(self._stored_ids())
        elif len(self) > 1 and not (np.diff(self._sorted_ids()) > 0).all():
            # A flat index written elsewhere: restore the ascending-id storage order that breaks ties by id.
            if mapped:
                return cls.load(source)  # which changes it: read it whole
            ids, x = self._stored_ids(), self._flat_vectors()
            order = np.argsort(ids, kind="stable")
            ids, x = ids[order], x[order]
            self._index.reset()
            self._index.add_with_ids(x, ids)
        return self

    # ------------------------------------------------------------------ internals

    def _prepare(self, vectors: np.ndarray, what: str, error: type[Exception]) -> np.ndarray:
        """Check shape/dtype; return C-contiguous float32 (normalised for cosine) or uint8 codes."""
        arr = np.asarray(vectors)
        if arr.ndim == 1:
            arr = arr[None, :]
        if self.kind == "binary":
            width = self.dim // 8
            if arr.ndim != 2 or arr.shape[1] != width or arr.dtype != np.uint8:
                raise error(
                    f"{what} must be packed uint8 codes of shape (n, {width}) for {self.dim}-bit codes, "
                    f"got {arr.dtype} {arr.shape}; pack bits with numpy.packbits(bits, axis=1)"
                )
            return np.ascontiguousarray(arr)
        if arr.ndim != 2 or arr.shape[1] != self.dim or arr.dtype.kind not in "fiu":
            raise error(f"{what} must have shape (n, {self.dim}), got {arr.dtype} {arr.shape}")
        x = np.ascontiguousarray(arr, dtype=np.float32)
        # One pass gives both checks: a NaN or infinity anywhere makes its row's squared norm non-finite.
        sq = np.einsum("ij,ij->i", x, x)
        if not np.isfinite(sq).all():
            raise error(f"{what} contain NaN or infinite (or overflowing) values")
        if self.metric == "cosine":
            if not sq.all():
                raise error(f"{what} contain an all-zero vector, which has no direction for cosine")
            x = x / np.sqrt(sq)[:, None]
        return x

    def _base(self) -> FaissIndex | None:
        """The index under the id map (the index itself for IVF kinds, which keep ids natively)."""
        if isinstance(self._index, faiss.IndexIDMap | faiss.IndexIDMap2):
            return faiss.downcast_index(self._index.index)
        if isinstance(self._index, faiss.IndexBinaryIDMap | faiss.IndexBinaryIDMap2):
            return faiss.downcast_IndexBinary(self._index.index)
        return self._index if self._ivf_native() else None

    def _ivf_native(self) -> bool:
        if self.kind == "binary":
            return isinstance(self._index, faiss.IndexBinaryIVF)
        idmap = isinstance(self._index, faiss.IndexIDMap | faiss.IndexIDMap2)
        return not idmap and faiss.try_extract_index_ivf(self._index) is not None

    def _ivf(self) -> FaissIndex | None:
        base = self._base()
        if base is None:
            return None
        if self.kind == "binary":
            return base if isinstance(base, faiss.IndexBinaryIVF) else None
        return faiss.try_extract_index_ivf(base)

    def _hnsw(self) -> FaissObject | None:
        base = self._base()
        return base.hnsw if isinstance(base, faiss.IndexHNSW | faiss.IndexBinaryHNSW) else None

    @property
    def min_train(self) -> int:
        """The fewest training vectors FAISS accepts for this kind (centroids need one point each; 1 for kinds
        that need no training)."""
        ivf = self._ivf()
        need = int(ivf.nlist) if ivf is not None else 1
        base = self._base()
        pq = getattr(ivf if ivf is not None else base, "pq", None)
        if pq is not None:
            need = max(need, int(pq.ksub))
        return need

    def _sorted_ids(self) -> np.ndarray:
        """Ascending ids; for flat kinds a zero-copy view of the FAISS id map (kept sorted by :meth:`add`)."""
        if self.exact:
            id_map = self._index.id_map
            n = id_map.size()
            return faiss.rev_swig_ptr(id_map.data(), n).view(np.int64) if n else np.empty(0, dtype=np.int64)
        return self._ids

    def _members(self, keys: np.ndarray) -> np.ndarray:
        ids = self._sorted_ids()
        if len(ids) == 0:
            return np.zeros(len(keys), dtype=bool)
        pos = np.searchsorted(ids, keys).clip(max=len(ids) - 1)
        return ids[pos] == keys

    def _flat_vectors(self) -> np.ndarray:
        """Zero-copy view of a flat index's storage, one row per id in ascending-id order."""
        base = self._base()
        assert base is not None  # flat kinds always sit under an id map
        store = base.xb if self.kind == "binary" else base.codes
        raw = faiss.rev_swig_ptr(store.data(), store.size()) if store.size() else np.empty(0, dtype=np.uint8)
        if self.kind == "binary":
            return raw.reshape(-1, self.dim // 8)
        return raw.view(np.float32).reshape(-1, self.dim)

    def _stored_ids(self) -> np.ndarray:
        """Every id stored, read from the id map or the inverted lists."""
        if not self._ivf_native():
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)
        ivf = self._ivf()
        assert ivf is not None  # IVF-native
        invlists = ivf.invlists
        parts = [np.empty(0, dtype=np.int64)]
        for lst in range(invlists.nlist):
            size = invlists.list_size(lst)
            if size:
                parts.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).view(np.int64).copy())
        return np.concatenate(parts)

    def _empty(self) -> np.ndarray:
        width = self.dim // 8 if self.kind == "binary" else self.dim
        return np.empty((0, width), dtype=np.uint8 if self.kind == "binary" else np.float32)


class ArrayStore:
    """Float vectors in memory, keyed by tile id: a re-ranking source for :func:`hybrid_search`.

    Args:
        ids: int64 tile ids, one per row of ``vectors``, no repeats.
        vectors: ``(n, dim)`` float vectors.
        metric: ``"cosine"`` (rows are L2-normalised here) or ``"l2"``.
    """

    def __init__(self, ids: np.ndarray | Sequence[int], vectors: np.ndarray, metric: Metric = "cosine"):
        keys = np.asarray(ids, dtype=np.int64).reshape(-1)
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or len(x) != len(keys):
            raise QueryError(f"ArrayStore needs one id per vector row, got {len(keys)} ids, shape {x.shape}")
        order = np.argsort(keys, kind="stable")
        self._ids, self._x = keys[order], x[order]
        if len(keys) and (self._ids[1:] == self._ids[:-1]).any():
            raise QueryError("ArrayStore ids repeat; give each vector its own tile id")
        if metric == "cosine":
            self._x = self._x / np.linalg.norm(self._x, axis=1, keepdims=True)
        self.metric: Metric = metric

    def reconstruct(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Return the vectors of ``ids`` in the order given.

        Raises:
            QueryError: An id is not in the store.
        """
        keys = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self._ids, keys).clip(max=max(len(self._ids) - 1, 0))
        if len(self._ids) == 0 or (self._ids[pos] != keys).any():
            missing = keys if len(self._ids) == 0 else keys[self._ids[pos] != keys]
            raise QueryError(f"tile id(s) have no float vector: {missing[:5].tolist()}")
        return self._x[pos]


def hybrid_search(
    codes_index: VectorIndex,
    query_codes: np.ndarray,
    query_vectors: np.ndarray,
    k: int,
    rerank: VectorSource,
    factor: int = 10,
    allowed_ids: np.ndarray | Sequence[int] | None = None,
    order: str = "float",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hamming candidates from ``codes_index``, re-ranked by exact float distance from ``rerank``.

    Each query takes its ``k * factor`` nearest codes (honouring ``allowed_ids``), then orders those
    candidates by the float metric of ``rerank`` (a float :class:`VectorIndex` or an :class:`ArrayStore`),
    ties by ascending id, and keeps ``k``. With ``order="hamming"`` the candidates are ordered by Hamming
    distance first and the float distance only breaks its ties (for codes trained to rank on their own,
    whose float vectors are not the trained ones).

    Args:
        codes_index: A binary :class:`VectorIndex`.
        query_codes: ``(nq, nbits // 8)`` packed codes of the queries.
        query_vectors: ``(nq, dim)`` float vectors of the same queries.
        k: Hits per query.
        rerank: Source of the tiles' float vectors.
        factor: Candidates per hit; larger recovers more of the float ranking at more cost.
        allowed_ids: Optional filter, as in :meth:`VectorIndex.search`.
        order: ``float`` (the float distance ranks) or ``hamming`` (the Hamming distance ranks, the float
            distance breaks ties).

    Returns:
        ``(distances, ids, hamming)``: as in :meth:`VectorIndex.search`, with distances in ``rerank``'s float
        metric, and the hits' Hamming distances (-1 where there is no hit).

    Raises:
        QueryError: Mismatched queries.
        BundleError: A candidate has no float vector (the two indexes disagree).
    """
    if codes_index.kind != "binary":
        raise QueryError("hybrid_search takes candidates from a binary index; codes_index holds floats")
    if factor < 1:
        raise QueryError(f"factor must be at least 1, got {factor}")
    if order not in ("float", "hamming"):
        raise QueryError(f"order must be 'float' or 'hamming', got {order!r}")
    qv = np.asarray(query_vectors, dtype=np.float32)
    qv = qv[None, :] if qv.ndim == 1 else qv
    cand_ham, cand = codes_index.search(query_codes, k * factor, allowed_ids)
    if len(qv) != len(cand):
        raise QueryError(f"got {len(cand)} query codes but {len(qv)} query vectors; pass one of each")
    if rerank.metric == "cosine":
        qv = qv / np.linalg.norm(qv, axis=1, keepdims=True)
    out_d = np.full((len(cand), k), np.inf, dtype=np.float32)
    out_i = np.full((len(cand), k), -1, dtype=np.int64)
    out_h = np.full((len(cand), k), -1, dtype=np.int64)
    for row, (q, ids, ham) in enumerate(zip(qv, cand, cand_ham, strict=True)):
        ham = ham[ids >= 0].astype(np.int64)
        ids = ids[ids >= 0]
        if len(ids) == 0:
            continue
        try:
            x = rerank.reconstruct(ids)
        except QueryError as err:
            raise BundleError(
                f"{err}: the binary and float indexes disagree on the tiles; delete binary.faiss and float.faiss "
                "in the bundle and search again (they are rebuilt from the stored vectors)"
            ) from None
        dist = np.sqrt(np.maximum(((x - q) ** 2).sum(axis=1), 0.0)).astype(np.float32)
        keys = (ids, dist) if order == "float" else (ids, dist, ham)
        best = np.lexsort(keys)[:k]
        out_d[row, : len(best)], out_i[row, : len(best)], out_h[row, : len(best)] = dist[best], ids[best], ham[best]
    return out_d, out_i, out_h
