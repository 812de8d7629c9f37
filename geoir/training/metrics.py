"""Retrieval metrics: mAP, mAP@k, P@k, ANMRR, per-class AP and precision-recall points.

Conventions (METHODS.md §0, §2.9):

* Every query ranks the **whole** database by ascending distance. Ties are broken by ascending database
  index (a stable sort), so results are reproducible even with Hamming distances, which tie massively.
* A query that is itself in the database (leave-one-out protocols) is excluded from its own ranking by
  passing ``self_index``: its row is moved to the end and marked irrelevant, which changes none of the
  metrics below for the remaining N-1 items.
* Float embeddings are ranked by Euclidean distance after L2 normalisation (equivalent to cosine).
  Binary codes are ranked by Hamming distance; they may be given as ±1 arrays or packed with
  ``np.packbits`` (uint8).
* Query expansion (``expand=n``, what ``geoir search --expand`` does): each query is replaced by the mean
  of itself and its top ``n`` database items from a first ranking (average query expansion, Chum et al.
  2007), which then ranks the whole database again; for codes the mean is a bitwise majority vote, ties
  to +1. The query's own row stays excluded.

Everything is vectorised numpy; 2100 x 2100 takes well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = [
    "anmrr",
    "average_precision",
    "distance_matrix",
    "evaluate_retrieval",
    "expand_queries",
    "hamming_distances",
    "map_at_k",
    "mean_average_precision",
    "per_class_ap",
    "precision_at_k",
    "precision_recall_curve",
    "rank",
    "relevance",
]

Metric = Literal["euclidean", "hamming"]

_POPCOUNT = np.array([i.bit_count() for i in range(256)], dtype=np.uint8)


def hamming_distances(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """Hamming distances between two sets of codes.

    Args:
        query_codes: Q x K codes in {-1, +1} (any numeric dtype), or Q x K/8 packed uint8 codes.
        db_codes: N x K codes in the same form as ``query_codes``.

    Returns:
        Q x N int32 distances.
    """
    q, d = np.asarray(query_codes), np.asarray(db_codes)
    if q.dtype == np.uint8 and d.dtype == np.uint8:
        # Packed bits: XOR then popcount, in chunks of queries to bound the Q x N x bytes intermediate.
        out = np.empty((q.shape[0], d.shape[0]), dtype=np.int32)
        step = max(1, 4_000_000 // max(1, d.shape[0] * d.shape[1]))
        for s in range(0, q.shape[0], step):
            x = np.bitwise_xor(q[s : s + step, None, :], d[None, :, :])
            out[s : s + step] = _POPCOUNT[x].sum(-1, dtype=np.int32)
        return out
    if np.any(q == 0) or np.any(d == 0):
        raise ValueError("±1 codes must not contain 0; encode with sgn(0) = +1")
    k = q.shape[1]
    # d_H = (K - a·b) / 2 is exact in float64 for any realistic K.
    return np.rint((k - q.astype(np.float64) @ d.astype(np.float64).T) / 2).astype(np.int32)


def distance_matrix(queries: np.ndarray, database: np.ndarray, metric: Metric = "euclidean") -> np.ndarray:
    """Q x N distances: Euclidean between L2-normalised rows, or Hamming between codes."""
    if metric == "hamming":
        return hamming_distances(queries, database)
    if metric != "euclidean":
        raise ValueError(f"unknown metric {metric!r}; use 'euclidean' or 'hamming'")
    q = np.asarray(queries, dtype=np.float64)
    d = np.asarray(database, dtype=np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    return np.sqrt(np.maximum(2.0 - 2.0 * (q @ d.T), 0.0))


def rank(distances: np.ndarray, self_index: np.ndarray | None = None) -> np.ndarray:
    """Database order for every query: ascending distance, ties by ascending index.

    Args:
        distances: Q x N distances.
        self_index: For each query, its row in the database, or -1 if it is not there. That row is moved
            to the end of the ranking.

    Returns:
        Q x N int64 database indices.
    """
    dist = np.asarray(distances, dtype=np.float64)
    if self_index is not None:
        dist = dist.copy()
        si = np.asarray(self_index)
        rows = np.nonzero(si >= 0)[0]
        dist[rows, si[rows]] = np.inf
    return np.argsort(dist, axis=1, kind="stable")


def expand_queries(queries: np.ndarray, database: np.ndarray, order: np.ndarray, n: int, metric: Metric) -> np.ndarray:
    """Average query expansion: every query replaced by the mean of itself and its first ``n`` ranked items.

    Args:
        queries: Q x d embeddings, or Q x K codes (±1, or packed uint8) for ``metric="hamming"``.
        database: N x d embeddings or codes, in the same form.
        order: Q x N ranking of the database for each query (:func:`rank`, the query's own row already last).
        n: Items averaged in (``n >= 1``; at most N).
        metric: ``"euclidean"``: the mean of the L2-normalised vectors, normalised again. ``"hamming"``: the
            bitwise majority of the ``n + 1`` codes, ties to +1 (sgn(0) = +1), in the codes' own form.

    Returns:
        Q expanded queries, in the form of ``queries``.
    """
    if n < 1:
        raise ValueError(f"query expansion needs n >= 1, got {n}")
    top = np.asarray(order)[:, :n]
    if metric == "euclidean":
        qf = np.asarray(queries, dtype=np.float64)
        df = np.asarray(database, dtype=np.float64)
        qf = qf / np.maximum(np.linalg.norm(qf, axis=1, keepdims=True), 1e-12)
        df = df / np.maximum(np.linalg.norm(df, axis=1, keepdims=True), 1e-12)
        out = qf + df[top].sum(axis=1)
        return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.asarray(queries).dtype)
    if metric != "hamming":
        raise ValueError(f"unknown metric {metric!r}; use 'euclidean' or 'hamming'")
    q, d = np.asarray(queries), np.asarray(database)
    packed = q.dtype == np.uint8
    # Packed bits are voted on as ±1 (a padding bit is -1 in every code, so it stays 0 when packed again).
    qi = np.unpackbits(q, axis=1).astype(np.int32) * 2 - 1 if packed else q.astype(np.int32)
    di = np.unpackbits(d, axis=1).astype(np.int32) * 2 - 1 if packed else d.astype(np.int32)
    signs = np.where(qi + di[top].sum(axis=1) >= 0, 1, -1)
    return np.packbits(signs > 0, axis=1) if packed else signs.astype(q.dtype)


def relevance(
    order: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray, self_index: np.ndarray | None = None
) -> np.ndarray:
    """Q x N boolean matrix: is the item at each rank relevant (same label) to the query."""
    db_labels = np.asarray(db_labels)
    rel = db_labels[order] == np.asarray(query_labels)[:, None]
    if self_index is not None:
        si = np.asarray(self_index)
        rel &= order != si[:, None]
    return rel


def average_precision(rel: np.ndarray) -> np.ndarray:
    """Per-query AP over the full ranking: ``(1/R) sum_k k / r_k``; NaN for queries with no relevant item."""
    rel = np.asarray(rel, dtype=bool)
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    n_rel = rel.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(rel, hits / ranks, 0.0).sum(1) / n_rel
    return np.where(n_rel > 0, ap, np.nan)


def mean_average_precision(rel: np.ndarray) -> float:
    """mAP over queries that have at least one relevant item (METHODS.md §0); NaN if there is none."""
    ap = average_precision(rel)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def map_at_k(rel: np.ndarray, k: int) -> float:
    """mAP@k as in METHODS.md §2.9: AP truncated to the first k items, with R_q replaced by the number of
    relevant items in the top k; a query with none in its top k scores 0 and still counts in the mean
    (the intent of DGSSH's ``calc_topMap``, which divides by the number of queries)."""
    top = np.asarray(rel, dtype=bool)[:, :k]
    hits = np.cumsum(top, axis=1)
    ranks = np.arange(1, top.shape[1] + 1)
    n = top.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(top, hits / ranks, 0.0).sum(1) / n
    return float(np.where(n > 0, ap, 0.0).mean())


def precision_at_k(rel: np.ndarray, k: int) -> float:
    """Mean over queries of (relevant items among the first k) / k."""
    return float(np.asarray(rel, dtype=bool)[:, :k].sum(1).mean() / k)


def anmrr(rel: np.ndarray, n_ground_truth: np.ndarray | None = None) -> float:
    """Average Normalised Modified Retrieval Rank, MPEG-7 definition (Manjunath et al., IEEE TCSVT 2001).

    For a query with NG ground-truth items, ``K = min(4 NG, 2 GTM)`` with GTM the largest NG over all
    queries; ``Rank(k)`` is the 1-based rank of the k-th ground-truth item if ``<= K``, else ``1.25 K``;
    ``AVR = sum Rank / NG``; ``MRR = AVR - 0.5 - NG/2``; ``NMRR = MRR / (1.25 K - 0.5 - NG/2)``.
    ANMRR is the mean NMRR: 0 is perfect, 1 is worst.

    Args:
        rel: Q x N relevance in ranked order.
        n_ground_truth: NG per query; defaults to the number of relevant items in the row.
    """
    rel = np.asarray(rel, dtype=bool)
    ng = rel.sum(1) if n_ground_truth is None else np.asarray(n_ground_truth)
    keep = ng > 0
    rel, ng = rel[keep], ng[keep].astype(np.float64)
    if len(ng) == 0:
        return float("nan")
    gtm = ng.max()
    k = np.minimum(4 * ng, 2 * gtm)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)[None, :]
    in_k = rel & (ranks <= k[:, None])
    found = in_k.sum(1)
    total = np.where(in_k, ranks, 0.0).sum(1) + (ng - found) * 1.25 * k
    avr = total / ng
    mrr = avr - 0.5 - ng / 2
    nmrr = mrr / (1.25 * k - 0.5 - ng / 2)
    return float(nmrr.mean())


def per_class_ap(rel: np.ndarray, query_labels: np.ndarray) -> dict[int, float]:
    """Mean AP of the queries of each class that have a relevant item, keyed by label (NaN for a class whose
    queries have none, as :func:`mean_average_precision`)."""
    ap = average_precision(rel)
    labels = np.asarray(query_labels)
    out = {}
    for c in np.unique(labels):
        a = ap[labels == c]
        out[int(c)] = float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")
    return out


def precision_recall_curve(rel: np.ndarray, cutoffs: Sequence[int] | None = None) -> dict[str, list[float]]:
    """Mean precision and recall over queries at rank cutoffs (default: 50 cutoffs spread over the ranking).

    Precision averages every query (as :func:`precision_at_k`); recall, undefined for a query without a
    relevant item, averages the queries that have one (as :func:`mean_average_precision`).

    Returns:
        ``{"k": [...], "precision": [...], "recall": [...]}``, one point per cutoff.
    """
    rel = np.asarray(rel, dtype=bool)
    n = rel.shape[1]
    if cutoffs is None:
        cutoffs = sorted({int(c) for c in np.unique(np.linspace(1, n, 50).round().astype(int))})
    ks = np.asarray(cutoffs, dtype=np.int64)
    hits = np.cumsum(rel, axis=1)[:, ks - 1]
    n_rel = rel.sum(1)
    has = n_rel > 0
    recall = (hits[has] / n_rel[has, None]).mean(0) if has.any() else np.full(len(ks), np.nan)
    return {
        "k": [int(x) for x in ks],
        "precision": (hits / ks[None, :]).mean(0).tolist(),
        "recall": recall.tolist(),
    }


def evaluate_retrieval(
    queries: np.ndarray,
    database: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    metric: Metric = "euclidean",
    self_index: np.ndarray | None = None,
    ks: Sequence[int] = (5, 10, 20, 50, 100),
    map_ks: Sequence[int] = (),
    with_curves: bool = False,
    expand: int = 0,
) -> dict[str, object]:
    """All metrics for one query set against one database.

    Args:
        queries: Q x d embeddings, or Q x K codes (±1 or packed uint8) when ``metric="hamming"``.
        database: N x d embeddings or codes, same form.
        query_labels: Class of each query.
        db_labels: Class of each database item.
        metric: ``"euclidean"`` (on L2-normalised vectors) or ``"hamming"``.
        self_index: Row of each query in the database (-1 if absent) for leave-one-out protocols.
        ks: Cutoffs for P@k (those larger than the database are skipped).
        map_ks: Cutoffs for mAP@k.
        with_curves: Also return ``per_class_ap`` and ``pr_curve``.
        expand: Average query expansion with this many items (0: none): the metrics are those of the second
            ranking (:func:`expand_queries`).

    Returns:
        A JSON-able dict: ``mAP``, ``P@k``, ``mAP@k``, ``ANMRR``, ``n_queries``, ``n_database`` and optionally
        ``per_class_ap`` and ``pr_curve``.
    """
    dist = distance_matrix(queries, database, metric)
    order = rank(dist, self_index)
    if expand:
        # Never the query's own row, which rank() put last.
        n = max(1, min(expand, len(database) - (self_index is not None)))
        queries = expand_queries(queries, database, order, n, metric)
        order = rank(distance_matrix(queries, database, metric), self_index)
    rel = relevance(order, query_labels, db_labels, self_index)
    n_db = rel.shape[1] - (0 if self_index is None else 1)
    out: dict[str, object] = {"mAP": mean_average_precision(rel)}
    for k in map_ks:
        out[f"mAP@{k}"] = map_at_k(rel, k)
    for k in ks:
        if k <= n_db:
            out[f"P@{k}"] = precision_at_k(rel, k)
    out["ANMRR"] = anmrr(rel)
    out["n_queries"] = int(rel.shape[0])
    out["n_database"] = int(n_db)
    if with_curves:
        out["per_class_ap"] = per_class_ap(rel, query_labels)
        out["pr_curve"] = precision_recall_curve(rel[:, :n_db])
    return out
