"""VectorIndex against brute-force numpy ground truth.

Ties are the hard part of "exact": 64-bit Hamming distances take only 65 values, so a million codes tie by the
thousands. The contract is that rows are ordered by (distance, id) and that exact kinds keep the smallest ids
among vectors tied at the k-th distance. The tie tests build data that is almost all ties (few distinct
vectors or 8/16-bit codes, many ids each, added in shuffled batches) and compare ids exactly with a numpy
``lexsort((ids, distance))``.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geoir.errors import BundleError, GeoirError, QueryError
from geoir.index.vectors import EXACT_SUBSET_MAX, ArrayStore, VectorIndex, hybrid_search

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- ground truth


def hamming(q: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(nq, n) Hamming distances between packed codes, the slow obvious way."""
    return np.unpackbits(q[:, None, :] ^ codes[None, :, :], axis=2).sum(axis=2).astype(np.float64)


def cosine_distance(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(nq, n) Euclidean distance between unit vectors, in float64."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.sqrt(np.maximum(2.0 - 2.0 * (qn.astype(np.float64) @ xn.T.astype(np.float64)), 0.0))


def brute_force(dist: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per row by (distance, id), padded with inf / -1."""
    out_d = np.full((len(dist), k), np.inf)
    out_i = np.full((len(dist), k), -1, dtype=np.int64)
    for row, d in enumerate(dist):
        order = np.lexsort((ids, d))[:k]
        out_d[row, : len(order)], out_i[row, : len(order)] = d[order], ids[order]
    return out_d, out_i


def assert_exact_float(
    dist: np.ndarray, got: np.ndarray, truth_d: np.ndarray, all_d: np.ndarray, all_ids: np.ndarray
) -> None:
    """Float results are exact up to rounding: same distance profile, and each hit's true distance fits."""
    assert_close(dist, truth_d)
    for row in range(len(got)):
        hits = got[row][got[row] >= 0]
        true = all_d[row][np.searchsorted(all_ids, hits)]
        assert_close(dist[row][: len(hits)], true)
        assert len(set(hits.tolist())) == len(hits)


def assert_close(actual: np.ndarray, desired: np.ndarray) -> None:
    """Compare float distances through their squares: sqrt(2 - 2 cos) amplifies float32 rounding near 0."""
    a, d = np.square(actual, dtype=np.float64), np.square(desired, dtype=np.float64)
    np.testing.assert_allclose(a, d, atol=1e-5)


def clustered(rng: np.random.Generator, n: int, dim: int, centres: int = 32) -> np.ndarray:
    """Gaussian blobs on a sphere-ish shell: the structure IVF and HNSW are built for."""
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    return (c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, dim))).astype(np.float32)


def codes_of(x: np.ndarray, nbits: int, seed: int = 1) -> np.ndarray:
    """Sign-of-random-projection codes: similar vectors get close codes, as a trained hash head would give."""
    proj = np.random.default_rng(seed).standard_normal((x.shape[1], nbits)).astype(np.float32)
    return np.packbits(x @ proj > 0, axis=1)


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth, strict=True)]))


# ---------------------------------------------------------------- exact search


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    nbits=st.sampled_from([8, 16, 64]),
    n=st.integers(1, 300),
    k=st.integers(1, 40),
    batches=st.integers(1, 4),
)
def test_binary_flat_equals_brute_force_with_ties(seed: int, nbits: int, n: int, k: int, batches: int):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, nbits // 8), dtype=np.uint8)
    ids = rng.choice(10 * n + 10, n, replace=False).astype(np.int64)  # shuffled: forces out-of-order adds
    index = VectorIndex(nbits, "binary")
    for part in np.array_split(np.arange(n), batches):
        index.add(ids[part], codes[part])
    queries = np.concatenate([codes[:3], rng.integers(0, 256, (30, nbits // 8), dtype=np.uint8)])
    for q in (queries[:1], queries):  # one query and a batch take different FAISS code paths
        dist, got = index.search(q, k)
        truth_d, truth_i = brute_force(hamming(q, codes), ids, k)
        np.testing.assert_array_equal(got, truth_i)
        np.testing.assert_array_equal(dist, truth_d.astype(np.float32))


@pytest.mark.parametrize("nq", [1, 64])
def test_binary_flat_ties_on_a_larger_index(nq: int) -> None:
    # 8-bit codes over 30k ids: each distance value is shared by thousands, across FAISS' scan blocks.
    rng = np.random.default_rng(nq)
    n = 30_000
    codes = rng.integers(0, 256, (n, 1), dtype=np.uint8)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    index = VectorIndex(8, "binary")
    for part in np.array_split(np.arange(n), 5):
        index.add(ids[part], codes[part])
    q = rng.integers(0, 256, (nq, 1), dtype=np.uint8)
    for k in (1, 50, 700):
        _, got = index.search(q, k)
        np.testing.assert_array_equal(got, brute_force(hamming(q, codes), ids, k)[1])


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    distinct=st.integers(1, 6),
    n=st.integers(1, 200),
    k=st.integers(1, 30),
)
def test_float_flat_ties_go_to_smallest_ids(seed: int, distinct: int, n: int, k: int) -> None:
    # A few distinct vectors repeated under many ids: every distance is a tie shared by a whole group.
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((distinct, 16)).astype(np.float32)
    group = rng.integers(0, distinct, n)
    ids = rng.choice(5 * n + 5, n, replace=False).astype(np.int64)
    index = VectorIndex(16)
    for part in np.array_split(rng.permutation(n), 3):
        index.add(ids[part], pool[group[part]])
    queries = rng.standard_normal((25, 16)).astype(np.float32)
    pool_d = cosine_distance(queries, pool)
    gaps = np.diff(np.sort(pool_d, axis=1), axis=1)
    if distinct > 1 and gaps.min() < 1e-4:  # distinct groups too close to rank reliably in float32
        return
    dist, got = index.search(queries, k)
    truth_d, truth_i = brute_force(pool_d[:, group], ids, k)
    np.testing.assert_array_equal(got, truth_i)
    assert_close(dist, truth_d)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_float_flat_equals_brute_force(metric: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 24)).astype(np.float32)
    ids = rng.permutation(10_000)[:500].astype(np.int64)
    index = VectorIndex(24, metric=metric)  # type: ignore[arg-type]
    index.add(ids, x)
    q = rng.standard_normal((40, 24)).astype(np.float32)
    if metric == "cosine":
        all_d = cosine_distance(q, x)
    else:
        all_d = np.sqrt(((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(axis=2))
    dist, got = index.search(q, 10)
    order = np.argsort(ids)
    truth_d, _ = brute_force(all_d, ids, 10)
    assert_exact_float(dist, got, truth_d, all_d[:, order], ids[order])


def test_scores_and_padding_conventions() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    index = VectorIndex(8)
    index.add([7, 3, 5], x)
    dist, got = index.search(x[1], 5)
    assert got[0, 0] == 3 and dist[0, 0] == pytest.approx(0.0, abs=1e-3)
    assert (got[0, 3:] == -1).all() and np.isinf(dist[0, 3:]).all()
    scores = index.scores(dist)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    expect = np.sort(xn @ xn[1])[::-1]
    np.testing.assert_allclose(scores[0, :3], expect, atol=1e-5)
    assert np.isnan(scores[0, 3:]).all()

    codes = VectorIndex(16, "binary")
    codes.add([1, 2], np.array([[0, 0], [255, 0]], dtype=np.uint8))
    d, i = codes.search(np.array([[15, 0]], dtype=np.uint8), 2)
    assert i.tolist() == [[1, 2]] and d.tolist() == [[4.0, 4.0]]
    np.testing.assert_allclose(codes.scores(d), [[0.75, 0.75]])


# ---------------------------------------------------------------- filtered search


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["float", "binary"]),
    n=st.integers(1, 300),
    k=st.integers(1, 20),
    keep=st.floats(0.0, 1.0),
)
def test_filtered_flat_equals_brute_force_filtered(seed: int, kind: str, n: int, k: int, keep: float) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.choice(4 * n, n, replace=False).astype(np.int64)
    allowed = ids[rng.random(n) < keep]
    strangers = np.arange(4 * n, 4 * n + 5)  # allowed ids that are not in the index are ignored
    q_n = 5
    if kind == "binary":
        data = rng.integers(0, 256, (n, 2), dtype=np.uint8)
        queries = rng.integers(0, 256, (q_n, 2), dtype=np.uint8)
        index = VectorIndex(16, "binary")
        all_d = hamming(queries, data)
    else:
        data = rng.standard_normal((n, 8)).astype(np.float32)
        queries = rng.standard_normal((q_n, 8)).astype(np.float32)
        index = VectorIndex(8)
        all_d = cosine_distance(queries, data)
    index.add(ids, data)
    dist, got = index.search(queries, k, np.concatenate([allowed, strangers]))
    mask = np.isin(ids, allowed)
    truth_d, truth_i = brute_force(all_d[:, mask], ids[mask], k)
    assert ((got >= 0).sum(axis=1) == min(k, len(allowed))).all()
    if kind == "binary":
        np.testing.assert_array_equal(got, truth_i)
    else:
        order = np.argsort(ids)
        assert np.isin(got[got >= 0], allowed).all()
        assert_exact_float(dist, got, truth_d, all_d[:, order], ids[order])


@pytest.mark.parametrize(
    ("kind", "factory"),
    [("float", "HNSW16"), ("float", "IVF16,Flat"), ("binary", "BIVF16"), ("binary", "BHNSW16")],
)
@pytest.mark.parametrize("n_allowed", [5, 40, EXACT_SUBSET_MAX + 500])
def test_filtered_approximate_returns_k_allowed_hits(kind: str, factory: str, n_allowed: int) -> None:
    rng = np.random.default_rng(11)
    n = 6000
    x = clustered(rng, n, 32)
    data = codes_of(x, 64) if kind == "binary" else x
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    index = VectorIndex(64 if kind == "binary" else 32, kind, factory)  # type: ignore[arg-type]
    index.add(ids, data)
    allowed = rng.choice(ids, n_allowed, replace=False)
    queries = data[rng.choice(n, 20, replace=False)]
    dist, got = index.search(queries, 10, allowed)
    assert ((got >= 0).sum(axis=1) == min(10, n_allowed)).all(), "a tight filter must still give k hits"
    assert np.isin(got[got >= 0], allowed).all()
    assert (np.diff(dist[:, : min(10, n_allowed)], axis=1) >= 0).all()
    if n_allowed <= EXACT_SUBSET_MAX:
        # Small allowed sets are scanned exactly over the stored (here lossless) vectors.
        mask = np.isin(ids, allowed)
        if kind == "binary":
            _, truth_i = brute_force(hamming(queries, data[mask]), ids[mask], 10)
            np.testing.assert_array_equal(got, truth_i)
        else:
            truth_d, _ = brute_force(cosine_distance(queries, data[mask]), ids[mask], 10)
            assert_close(dist, truth_d)


def test_filter_with_no_allowed_id_in_index_gives_padding() -> None:
    index = VectorIndex(8)
    index.add([1, 2], np.eye(8, dtype=np.float32)[:2])
    dist, got = index.search(np.ones((2, 8), dtype=np.float32), 3, allowed_ids=[99])
    assert (got == -1).all() and np.isinf(dist).all()


# ---------------------------------------------------------------- remove


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["float", "binary"]),
    n=st.integers(1, 200),
    drop=st.floats(0.0, 1.0),
)
def test_removed_ids_never_come_back(seed: int, kind: str, n: int, drop: float) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.choice(3 * n, n, replace=False).astype(np.int64)
    if kind == "binary":
        data, index = rng.integers(0, 256, (n, 1), dtype=np.uint8), VectorIndex(8, "binary")
    else:
        data, index = rng.standard_normal((n, 4)).astype(np.float32), VectorIndex(4)
    index.add(ids, data)
    gone = ids[rng.random(n) < drop]
    assert index.remove(np.concatenate([gone, [-5]])) == len(gone)
    assert len(index) == n - len(gone)
    np.testing.assert_array_equal(index.ids(), np.setdiff1d(ids, gone))
    if len(index) == 0:
        with pytest.raises(BundleError, match="empty"):
            index.search(data[:1], 3)
        return
    _, got = index.search(data, n, allowed_ids=None)
    assert not np.isin(got, gone).any()
    assert (got >= 0).sum(axis=1).tolist() == [n - len(gone)] * n
    # the survivors still rank exactly
    keep = ~np.isin(ids, gone)
    all_d = hamming(data, data[keep]) if kind == "binary" else cosine_distance(data, data[keep])
    truth_d, truth_i = brute_force(all_d, ids[keep], 5)
    dist, got = index.search(data, 5)
    if kind == "binary":
        np.testing.assert_array_equal(got, truth_i)
    assert_close(dist, truth_d)


@pytest.mark.parametrize(
    ("kind", "factory"),
    [("float", "HNSW16"), ("float", "IVF8,PQ4x4"), ("binary", "BIVF8"), ("binary", "BHNSW16")],
)
def test_remove_on_approximate_kinds(kind: str, factory: str) -> None:
    rng = np.random.default_rng(5)
    x = clustered(rng, 1200, 16)
    data = codes_of(x, 32) if kind == "binary" else x
    ids = np.arange(1200, dtype=np.int64) + 1000
    index = VectorIndex(32 if kind == "binary" else 16, kind, factory)  # type: ignore[arg-type]
    index.add(ids, data)
    gone = ids[::3]
    assert index.remove(gone) == len(gone)
    assert len(index) == 800 and not np.isin(index.ids(), gone).any()
    _, got = index.search(data[:50], 20)
    assert not np.isin(got, gone).any()
    index.add(gone[:10], data[::3][:10])  # ids can come back after removal
    assert len(index) == 810


def test_remove_on_kind_that_cannot_reconstruct_is_a_clear_error() -> None:
    index = VectorIndex(16, "binary", "BHash4")
    index.add([1, 2, 3], np.array([[1, 2], [3, 4], [5, 6]], dtype=np.uint8))
    with pytest.raises(BundleError, match="can neither remove nor reconstruct"):
        index.remove([2])
    assert len(index) == 3


# ---------------------------------------------------------------- persistence


@pytest.mark.parametrize(
    ("kind", "factory"),
    [
        ("float", None),
        ("float", "HNSW16"),
        ("float", "IVF8,PQ4x4"),
        ("binary", None),
        ("binary", "BIVF8"),
        ("binary", "BHNSW16"),
    ],
)
def test_save_load_round_trip(tmp_path: Path, kind: str, factory: str | None) -> None:
    rng = np.random.default_rng(2)
    x = clustered(rng, 1000, 16)
    data = codes_of(x, 32) if kind == "binary" else x
    ids = rng.permutation(50_000)[:1000].astype(np.int64)
    index = VectorIndex(32 if kind == "binary" else 16, kind, factory)  # type: ignore[arg-type]
    index.add(ids[:600], data[:600])
    index.add(ids[600:], data[600:])
    index.remove(ids[:7])
    path = tmp_path / "vectors.faiss"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.faiss"], "no temp file left behind"
    again = VectorIndex.load(path)
    assert (again.kind, again.dim, again.metric, again.exact) == (
        index.kind,
        index.dim,
        index.metric,
        index.exact,
    )
    np.testing.assert_array_equal(again.ids(), index.ids())
    allowed = ids[::4]
    for filt in (None, allowed):
        d1, i1 = index.search(data[:30], 10, filt)
        d2, i2 = again.search(data[:30], 10, filt)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(d1, d2)
    # still mutable after load
    again.add([10**9], data[:1])
    assert again.remove([10**9, ids[8]]) == 2
    # Memory-mapped for searching: the same results, and refused changes (its owner reads it whole to change it).
    mapped = VectorIndex.load(path, mapped=True)
    assert mapped.mapped == (kind == "float") and VectorIndex.count(path) == len(index) == len(mapped)
    for filt in (None, allowed):
        d1, i1 = index.search(data[:30], 10, filt)
        d3, i3 = mapped.search(data[:30], 10, filt)
        np.testing.assert_array_equal(i1, i3)
        np.testing.assert_array_equal(d1, d3)
    if mapped.mapped:
        np.testing.assert_array_equal(mapped.reconstruct(ids[10:20]), index.reconstruct(ids[10:20]))
        for change in (lambda: mapped.add([10**9], data[:1]), lambda: mapped.remove(ids[8:9])):
            with pytest.raises(RuntimeError, match="memory-mapped index cannot change"):
                change()


def test_a_mapped_load_of_a_flat_index_stored_out_of_id_order_reads_it_whole(tmp_path: Path) -> None:
    # A flat index written by other code: load() must sort its storage, which a mapped index cannot.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    ids = rng.permutation(1000)[:50].astype(np.int64)
    raw = faiss.IndexIDMap(faiss.IndexFlatIP(8))
    raw.add_with_ids(x / np.linalg.norm(x, axis=1, keepdims=True), ids)
    faiss.write_index(raw, str(tmp_path / "v.faiss"))
    index = VectorIndex.load(tmp_path / "v.faiss", mapped=True)
    assert not index.mapped and (np.diff(faiss.vector_to_array(index._index.id_map)) > 0).all()


def test_removing_many_ids_from_a_large_flat_index_is_not_quadratic(monkeypatch: pytest.MonkeyPatch) -> None:
    # IDSelectorArray scans its ids once per stored vector; IDSelectorBatch hashes them. With 200,000
    # stored and 20,000 removed the scan does 4e9 comparisons (seconds); the hash does not.
    rng = np.random.default_rng(4)
    index = VectorIndex(4)
    ids = rng.permutation(10**7)[:200_000].astype(np.int64)
    index.add(ids, rng.normal(size=(200_000, 4)).astype(np.float32))
    removed = ids[::10]
    calls: list[str] = []
    original = faiss.IDSelectorBatch

    def batch(*args):  # type: ignore[no-untyped-def]
        calls.append("batch")
        return original(*args)

    monkeypatch.setattr(faiss, "IDSelectorBatch", batch)
    assert index.remove(removed) == len(removed)
    assert calls == ["batch"] and len(index) == 180_000
    assert not np.isin(removed, index.ids()).any()


@pytest.mark.parametrize(("kind", "factory"), [("float", "HNSW16"), ("binary", "BHNSW16")])
def test_unfiltered_graph_search_returns_every_hit_asked_for(kind: str, factory: str) -> None:
    # A graph search asked for (nearly) the whole index returns fewer hits than exist; geoir scans exactly.
    rng = np.random.default_rng(5)
    x = clustered(rng, 300, 32)
    data = codes_of(x, 64) if kind == "binary" else x
    index = VectorIndex(64 if kind == "binary" else 32, kind, factory)  # type: ignore[arg-type]
    index.add(np.arange(300, dtype=np.int64), data)
    for k in (300, 500):
        dist, got = index.search(data[:5], k)
        assert ((got >= 0).sum(axis=1) == 300).all() and (np.diff(dist[:, :300], axis=1) >= 0).all()
        assert all(set(row[row >= 0]) == set(range(300)) for row in got)


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "v.faiss"
    first = VectorIndex(4)
    first.add([1], np.ones((1, 4), dtype=np.float32))
    first.save(path)
    second = VectorIndex(4)
    second.add([1, 2], np.eye(4, dtype=np.float32)[:2])
    second.save(path)
    assert len(VectorIndex.load(path)) == 2
    # Readable by others, like the bundle's other files (mkstemp alone would leave it 0600).
    assert path.stat().st_mode & 0o777 == 0o644


def test_load_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"nothing\.faiss does not exist; run geoir tile"):
        VectorIndex.load(tmp_path / "nothing.faiss")
    garbage = tmp_path / "garbage.faiss"
    garbage.write_bytes(b"this is not a FAISS index at all")
    with pytest.raises(BundleError, match=r"garbage\.faiss is corrupt or truncated; delete it and search again"):
        VectorIndex.load(garbage)
    index = VectorIndex(16, factory="IVF4,PQ4x4")
    index.add(np.arange(300), np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32))
    good = tmp_path / "good.faiss"
    index.save(good)
    truncated = tmp_path / "truncated.faiss"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BundleError, match=r"truncated\.faiss is corrupt or truncated"):
        VectorIndex.load(truncated)
    bare = tmp_path / "bare.faiss"
    faiss.write_index(faiss.IndexFlatIP(4), str(bare))
    with pytest.raises(BundleError, match="not a geoir vector index"):
        VectorIndex.load(bare)


# ---------------------------------------------------------------- hybrid


@pytest.mark.parametrize("source", ["index", "array"])
def test_hybrid_reranks_candidates_exactly(source: str) -> None:
    rng = np.random.default_rng(9)
    x = clustered(rng, 2000, 32)
    codes = codes_of(x, 32)
    ids = rng.permutation(10**6)[:2000].astype(np.int64)
    binary = VectorIndex(32, "binary")
    binary.add(ids, codes)
    if source == "index":
        rerank: VectorIndex | ArrayStore = VectorIndex(32)
        rerank.add(ids, x)  # type: ignore[union-attr]
    else:
        rerank = ArrayStore(ids, x)
    q = x[:15] + 0.1 * rng.standard_normal((15, 32)).astype(np.float32)
    qc = codes_of(q, 32)
    k, factor = 10, 8
    allowed = ids[::2]
    bits = np.unpackbits(codes, axis=1)
    for filt in (None, allowed):
        dist, got, ham = hybrid_search(binary, qc, q, k, rerank, factor=factor, allowed_ids=filt)
        by_codes, by_codes_ids, by_codes_ham = hybrid_search(
            binary, qc, q, k, rerank, factor=factor, allowed_ids=filt, order="hamming"
        )
        _, cand = binary.search(qc, k * factor, filt)
        order = np.argsort(ids)
        for row in range(len(q)):
            c = cand[row][cand[row] >= 0]
            rows = order[np.searchsorted(ids[order], c)]
            cd = cosine_distance(q[row : row + 1], x[rows])[0]
            ch = (bits[rows] != np.unpackbits(qc[row])).sum(axis=1)
            truth = c[np.lexsort((c, cd))][:k]
            np.testing.assert_array_equal(np.sort(got[row]), np.sort(truth))
            assert_close(dist[row], np.sort(cd)[:k])
            assert filt is None or np.isin(got[row], filt).all()
            np.testing.assert_array_equal(ham[row], ch[np.lexsort((c, cd))][:k])
            # Ranked by the codes: Hamming distance first, the float distance breaking its ties.
            best = np.lexsort((c, cd, ch))[:k]
            np.testing.assert_array_equal(by_codes_ids[row], c[best])
            np.testing.assert_array_equal(by_codes_ham[row], ch[best])
            assert_close(by_codes[row], cd[best])
            assert (np.diff(by_codes_ham[row]) >= 0).all() and not (np.diff(ham[row]) >= 0).all()


def test_hybrid_rejects_mismatched_inputs() -> None:
    floats = VectorIndex(8)
    floats.add([1], np.ones((1, 8), dtype=np.float32))
    with pytest.raises(QueryError, match="binary index"):
        hybrid_search(floats, np.zeros((1, 1), dtype=np.uint8), np.ones((1, 8)), 1, floats)
    codes = VectorIndex(8, "binary")
    codes.add([1, 2], np.array([[1], [2]], dtype=np.uint8))
    with pytest.raises(BundleError, match=r"no float vector.*indexes disagree"):
        store = ArrayStore([1], np.ones((1, 8)))
        hybrid_search(codes, np.zeros((1, 1), dtype=np.uint8), np.ones((1, 8)), 2, store)


# ---------------------------------------------------------------- approximate kinds


@pytest.mark.parametrize(
    ("kind", "factory", "tune", "floor"),
    [
        ("float", "HNSW32", {"ef_search": 64}, 0.9),
        ("float", "IVF64,Flat", {"nprobe": 8}, 0.9),
        ("float", "IVF64,PQ16x4", {"nprobe": 8}, 0.35),  # 2 bits a dimension: lossy by design
        ("binary", "BIVF64", {"nprobe": 8}, 0.9),
        ("binary", "BHNSW32", {"ef_search": 64}, 0.9),
    ],
)
def test_factory_kinds_reach_sane_recall(kind: str, factory: str, tune: dict[str, int], floor: float) -> None:
    rng = np.random.default_rng(4)
    n, dim, nbits = 8000, 32, 64
    x = clustered(rng, n, dim, centres=64)
    data = codes_of(x, nbits) if kind == "binary" else x
    ids = np.arange(n, dtype=np.int64) * 7
    index = VectorIndex(nbits if kind == "binary" else dim, kind, factory, max_train=4000)  # type: ignore[arg-type]
    index.add(ids, data)
    index.set_search_params(**tune)
    exact = VectorIndex(nbits if kind == "binary" else dim, kind)  # type: ignore[arg-type]
    exact.add(ids, data)
    queries = data[rng.choice(n, 100, replace=False)]
    _, got = index.search(queries, 10)
    _, truth = exact.search(queries, 10)
    if kind == "binary":
        # Hamming ties make id sets ambiguous: a hit counts when its distance is within the true top 10.
        all_d = hamming(queries, data)
        kth = np.sort(all_d, axis=1)[:, 9]
        hit_d = np.take_along_axis(all_d, np.searchsorted(ids, got.clip(min=0)), axis=1)
        r = float(np.mean(hit_d <= kth[:, None]))
    else:
        r = recall(got, truth)
    assert r >= floor, f"{factory} recall@10 = {r:.3f}"


def test_untrained_kind_trains_on_first_add_and_refuses_too_few() -> None:
    index = VectorIndex(16, factory="IVF64,Flat")
    assert not index.is_trained
    with pytest.raises(BundleError, match=r"'IVF64,Flat' needs at least 64 vectors to train but got 10"):
        index.add(np.arange(10), np.random.default_rng(0).standard_normal((10, 16)))
    assert len(index) == 0
    index.add(np.arange(200), np.random.default_rng(0).standard_normal((200, 16)))
    assert index.is_trained and len(index) == 200


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kind", "factory", "example"),
    [
        ("float", "HNSW_nonsense", "HNSW32"),
        ("float", "IVF,PQ", "IVF1024,PQ32"),
        ("binary", "BIVFx", "BIVF256"),
        ("binary", "HNSW32", "BHNSW32"),
        ("float", "IDMap,Flat", "HNSW32"),
    ],
)
def test_bad_factory_string_names_it_and_gives_examples(kind: str, factory: str, example: str) -> None:
    with pytest.raises(BundleError) as err:
        VectorIndex(64, kind, factory)  # type: ignore[arg-type]
    assert repr(factory) in str(err.value) and repr(example) in str(err.value)
    assert isinstance(err.value, GeoirError)


def test_empty_index_search_says_what_to_do() -> None:
    for index in (VectorIndex(8), VectorIndex(8, "binary", "BHNSW8")):
        with pytest.raises(BundleError, match="the index is empty; run geoir tile first"):
            query = np.ones((1, 8), np.float32) if index.kind == "float" else np.ones((1, 1), np.uint8)
            index.search(query, 1)


def test_bad_inputs_are_query_or_bundle_errors() -> None:
    index = VectorIndex(8)
    index.add([1, 2], np.eye(8, dtype=np.float32)[:2])
    with pytest.raises(BundleError, match="already in the index"):
        index.add([2], np.ones((1, 8)))
    with pytest.raises(BundleError, match="repeated"):
        index.add([5, 5], np.ones((2, 8)))
    with pytest.raises(QueryError, match=r"shape \(n, 8\)"):
        index.search(np.ones((1, 7)), 1)
    with pytest.raises(QueryError, match="k must be a positive integer"):
        index.search(np.ones((1, 8)), 0)
    with pytest.raises(QueryError, match="all-zero"):
        index.search(np.zeros((1, 8)), 1)
    with pytest.raises(QueryError, match="2 ids for 1 vectors"):
        index.add([3, 4], np.ones((1, 8)))
    binary = VectorIndex(16, "binary")
    with pytest.raises(QueryError, match="packbits"):
        binary.add([1], np.ones((1, 16), dtype=np.uint8))
    with pytest.raises(BundleError, match="multiple of 8"):
        VectorIndex(12, "binary")
    with pytest.raises(QueryError, match="not in the index"):
        index.reconstruct([42])
