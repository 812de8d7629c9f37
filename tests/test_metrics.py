"""Retrieval metrics: METHODS.md §3 M1, naive recomputations and edge cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoir.training.metrics import (
    anmrr,
    average_precision,
    distance_matrix,
    evaluate_retrieval,
    expand_queries,
    hamming_distances,
    map_at_k,
    mean_average_precision,
    per_class_ap,
    precision_at_k,
    precision_recall_curve,
    rank,
    relevance,
)

TOL = 1e-5


def test_m1_hamming_map() -> None:
    q = np.array([[1, 1, 1]])
    db = np.array([[1, 1, 1], [1, 1, -1], [1, -1, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(hamming_distances(q, db), [[0, 1, 2, 3]])
    out = evaluate_retrieval(q, db, np.array([1]), np.array([1, 0, 1, 0]), metric="hamming", ks=(2,))
    assert out["mAP"] == pytest.approx(0.833333, abs=TOL)
    assert out["P@2"] == pytest.approx(0.5)


def test_m1_ties_broken_by_index() -> None:
    q = np.array([[1, 1, 1]])
    db = np.array([[1, 1, -1], [1, -1, 1], [1, 1, 1]])
    dist = hamming_distances(q, db)
    np.testing.assert_array_equal(dist, [[1, 1, 0]])
    np.testing.assert_array_equal(rank(dist), [[2, 0, 1]])
    out = evaluate_retrieval(q, db, np.array([1]), np.array([0, 1, 1]), metric="hamming")
    assert out["mAP"] == pytest.approx(0.833333, abs=TOL)


def test_packed_and_pm1_codes_agree() -> None:
    rng = np.random.default_rng(0)
    q = np.where(rng.normal(size=(30, 64)) >= 0, 1, -1).astype(np.int8)
    db = np.where(rng.normal(size=(50, 64)) >= 0, 1, -1).astype(np.int8)
    np.testing.assert_array_equal(
        hamming_distances(q, db), hamming_distances(np.packbits(q > 0, axis=1), np.packbits(db > 0, axis=1))
    )
    naive = np.array([[int((a != b).sum()) for b in db] for a in q])
    np.testing.assert_array_equal(hamming_distances(q, db), naive)


def test_zero_in_pm1_codes_refused() -> None:
    with pytest.raises(ValueError, match="sgn"):
        hamming_distances(np.array([[1, 0]]), np.array([[1, 1]]))


def _naive_ap(ranked_rel: list[bool]) -> float:
    hits, total = 0, 0.0
    for i, r in enumerate(ranked_rel, start=1):
        if r:
            hits += 1
            total += hits / i
    return total / hits if hits else float("nan")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_map_matches_naive_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    q, db = rng.normal(size=(7, 5)), rng.normal(size=(20, 5))
    yq, ydb = rng.integers(0, 3, 7), rng.integers(0, 3, 20)
    dist = distance_matrix(q, db)
    order = rank(dist)
    rel = relevance(order, yq, ydb)
    for i in range(7):
        qi = q[i] / np.linalg.norm(q[i])
        ds = [float(np.linalg.norm(qi - d / np.linalg.norm(d))) for d in db]
        naive_order = sorted(range(20), key=lambda j: (ds[j], j))
        assert list(order[i]) == naive_order
        want = _naive_ap([ydb[j] == yq[i] for j in naive_order])
        got = average_precision(rel[i : i + 1])[0]
        assert (np.isnan(want) and np.isnan(got)) or got == pytest.approx(want, abs=1e-12)


def test_query_without_relevant_items_is_skipped() -> None:
    rel = np.array([[True, False, True], [False, False, False]])
    assert np.isnan(average_precision(rel)[1])
    assert mean_average_precision(rel) == pytest.approx((1 + 2 / 3) / 2)


def test_map_at_k() -> None:
    rel = np.array([[False, True, True, False], [False, False, True, True]])
    # Query 0, top 3: relevant at ranks 2, 3 -> (1/2 + 2/3) / 2. Query 1, top 2: none -> 0.
    assert map_at_k(rel, 3) == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1 / 3) / 2)
    assert map_at_k(rel, 2) == pytest.approx((1 / 2 + 0) / 2)
    assert map_at_k(rel, 4) == pytest.approx(mean_average_precision(rel))


def test_precision_at_k() -> None:
    rel = np.array([[True, False, True, True], [False, True, False, False]])
    assert precision_at_k(rel, 2) == pytest.approx(0.5)
    assert precision_at_k(rel, 4) == pytest.approx((3 / 4 + 1 / 4) / 2)


def test_anmrr_perfect_worst_and_hand_case() -> None:
    perfect = np.array([[True, True, False, False, False, False, False, False, False, False]])
    assert anmrr(perfect) == pytest.approx(0.0)
    # NG = 2, GTM = 2, K = min(8, 4) = 4. Items at ranks 1 and 6: Rank = (1, 1.25*4 = 5), AVR = 3,
    # MRR = 3 - 0.5 - 1 = 1.5, NMRR = 1.5 / (5 - 0.5 - 1) = 0.428571.
    rel = np.zeros((1, 10), dtype=bool)
    rel[0, [0, 5]] = True
    assert anmrr(rel) == pytest.approx(1.5 / 3.5)
    worst = np.zeros((1, 10), dtype=bool)
    worst[0, [8, 9]] = True
    assert anmrr(worst) == pytest.approx(1.0)


def test_self_exclusion_leave_one_out() -> None:
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    y = np.array([0, 0, 1, 1])
    out = evaluate_retrieval(x, x, y, y, self_index=np.arange(4), ks=(1, 3, 4))
    assert out["mAP"] == pytest.approx(1.0)
    assert out["P@1"] == pytest.approx(1.0)
    assert out["P@3"] == pytest.approx(1 / 3)
    assert "P@4" not in out and out["n_database"] == 3
    # Without exclusion each query finds itself first and its class mate second: still 1.0, P@3 = 2/3.
    assert evaluate_retrieval(x, x, y, y, ks=(3,))["P@3"] == pytest.approx(2 / 3)


def test_query_expansion_float_hand_case() -> None:
    # Query at 0 degrees; class mates at 30 and 60 degrees, another class at -35 degrees.
    def at(deg: float) -> list[float]:
        return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]

    q, y_q = np.array([at(0)]), np.array([0])
    db, y_db = np.array([at(30), at(-35), at(60)]), np.array([0, 1, 0])
    # Plain ranking: 30, -35, 60 degrees: AP = (1 + 2/3) / 2.
    assert evaluate_retrieval(q, db, y_q, y_db, ks=())["mAP"] == pytest.approx(5 / 6)
    # Expanded with the first item: the mean of 0 and 30 degrees points at 15 degrees; ranking 30, 60, -35.
    order = rank(distance_matrix(q, db))
    assert expand_queries(q, db, order, 1, "euclidean") == pytest.approx(np.array([at(15)]))
    assert evaluate_retrieval(q, db, y_q, y_db, ks=(), expand=1)["mAP"] == pytest.approx(1.0)


def test_query_expansion_codes_majority_vote_ties_to_plus_one() -> None:
    q = np.array([[1, 1, 1, 1]], dtype=np.int8)
    db = np.array([[-1, 1, 1, 1], [-1, 1, -1, 1], [-1, -1, -1, -1]], dtype=np.int8)
    order = np.array([[0, 1, 2]])
    # Votes with the first two: [-1, 3, 1, 3] -> signs; with the first one: [0, 2, 2, 2] -> the tie goes to +1.
    assert expand_queries(q, db, order, 2, "hamming").tolist() == [[-1, 1, 1, 1]]
    assert expand_queries(q, db, order, 1, "hamming").tolist() == [[1, 1, 1, 1]]
    packed = expand_queries(np.packbits(q > 0, axis=1), np.packbits(db > 0, axis=1), order, 2, "hamming")
    assert packed.dtype == np.uint8 and np.unpackbits(packed, axis=1)[0, :4].tolist() == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="n >= 1"):
        expand_queries(q, db, order, 0, "hamming")


@pytest.mark.parametrize("metric", ["euclidean", "hamming"])
def test_query_expansion_never_uses_the_query_itself(metric: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 16))
    v = np.where(x >= 0, 1, -1).astype(np.int8) if metric == "hamming" else x
    y = rng.integers(0, 3, 40)
    si = np.arange(40)
    out = evaluate_retrieval(v, v, y, y, metric=metric, self_index=si, ks=(), expand=5)
    # The same figure by hand: the first 5 items of each query's own leave-one-out ranking, then rank again.
    order = rank(distance_matrix(v, v, metric), si)
    assert not (order[:, :5] == si[:, None]).any()
    expanded = expand_queries(v, v, order, 5, metric)
    ref = evaluate_retrieval(expanded, v, y, y, metric=metric, self_index=si, ks=())
    assert out["mAP"] == pytest.approx(ref["mAP"])
    # Packed codes give the same figure as ±1 codes.
    if metric == "hamming":
        p = np.packbits(v > 0, axis=1)
        assert evaluate_retrieval(p, p, y, y, metric=metric, self_index=si, ks=(), expand=5)["mAP"] == pytest.approx(
            out["mAP"]
        )
    # Asking for more items than the database holds uses all of them but the query.
    assert evaluate_retrieval(v, v, y, y, metric=metric, self_index=si, ks=(), expand=100)["n_queries"] == 40


def test_curves_and_per_class() -> None:
    rel = np.array([[True, False, True], [False, True, True]])
    pc = per_class_ap(rel, np.array([3, 5]))
    assert pc == {3: pytest.approx((1 + 2 / 3) / 2), 5: pytest.approx((1 / 2 + 2 / 3) / 2)}
    curve = precision_recall_curve(rel, cutoffs=[1, 2, 3])
    assert curve["precision"] == pytest.approx([0.5, 0.5, 2 / 3])
    assert curve["recall"] == pytest.approx([0.25, 0.5, 1.0])
    # A query without a relevant item (its class is not in the database): precision counts it as 0, recall
    # (undefined for it) and AP leave it out, as mAP does; a class of such queries has no AP, and no warning.
    rel3 = np.vstack([rel, [False, False, False]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pc = per_class_ap(rel3, np.array([3, 5, 7]))
        curve = precision_recall_curve(rel3, cutoffs=[1, 2, 3])
    assert pc[3] == pytest.approx((1 + 2 / 3) / 2) and np.isnan(pc[7])
    assert curve["recall"] == pytest.approx([0.25, 0.5, 1.0])
    assert curve["precision"] == pytest.approx([1 / 3, 1 / 3, 4 / 9])


def test_evaluate_with_curves_is_json_able() -> None:
    import json

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 4)), rng.integers(0, 3, 30)
    out = evaluate_retrieval(x, x, y, y, self_index=np.arange(30), map_ks=(10,), with_curves=True)
    json.dumps(out)
    assert set(out["per_class_ap"]) == {0, 1, 2}


def test_packed_and_signed_codes_rank_alike_at_ucmerced_size() -> None:
    # Speed is measured by benchmarks/train_time.py, not here; this pins that both code layouts agree.
    rng = np.random.default_rng(0)
    codes = np.where(rng.normal(size=(2100, 64)) >= 0, 1, -1).astype(np.int8)
    y = np.repeat(np.arange(21), 100)
    packed = np.packbits(codes > 0, axis=1)
    a = evaluate_retrieval(codes, codes, y, y, metric="hamming", self_index=np.arange(2100))
    b = evaluate_retrieval(packed, packed, y, y, metric="hamming", self_index=np.arange(2100))
    assert a == b and a["n_queries"] == 2100
