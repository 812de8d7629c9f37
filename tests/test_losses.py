"""Losses against the hand-computed cases of METHODS.md §3 and against naive loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geoir.training.losses import (
    AsymmetricLoss,
    CorrectiveTripletLoss,
    SRLLoss,
    adsh_objective,
    adsh_v_step,
    label_smoothing_cross_entropy,
    pairwise_likelihood_loss,
    sgn,
    similarity_distillation,
    similarity_ratio,
    soft_similarity,
)

TOL = 1e-5
T64 = torch.float64


def _t(x: object, dtype: torch.dtype = T64) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


# ------------------------------------------------------------------------------------------------ S1 / S2

S1_POINTS = [(0, 0), (0.5, 0), (1.0, 0), (0, 1.2), (0, -0.6), (-1.0, 0), (2.0, 0)]
S1_LABELS = [0, 0, 0, 0, 1, 1, 2]


def _s1(**kw: float) -> float:
    loss = SRLLoss(normalize=False, **kw)
    pool = _t(S1_POINTS)
    labels = torch.tensor(S1_LABELS)
    return float(loss(pool[:1], labels[:1], pool, labels, torch.tensor([0])))


def test_s1_default() -> None:
    assert _s1() == pytest.approx(1.042806, abs=TOL)


def test_s1_parts() -> None:
    pool, labels = _t(S1_POINTS), torch.tensor(S1_LABELS)
    c = SRLLoss(normalize=False).components(pool[:1], labels[:1], pool, labels, torch.tensor([0]))
    assert float(c["omega"][0]) == pytest.approx(1.5, abs=TOL)
    assert float(c["pos"][0]) == pytest.approx(0.45, abs=TOL)
    assert float(c["neg"][0]) == pytest.approx(0.592806, abs=TOL)
    assert (int(c["n_hard_pos"][0]), int(c["n_easy_pos"][0]), int(c["n_hard_neg"][0])) == (2, 1, 2)


def test_s1_zero_temperature() -> None:
    assert _s1(neg_temperature=0.0) == pytest.approx(0.85, abs=TOL)


def test_s1_kappa_zero() -> None:
    assert _s1(kappa=0.0) == pytest.approx(0.892806, abs=TOL)


def _s2_points() -> tuple[torch.Tensor, torch.Tensor]:
    ang = np.deg2rad([0, 30, 90, 120, 180, 270])
    return _t(np.stack([np.cos(ang), np.sin(ang)], 1)), torch.tensor([0, 0, 0, 1, 1, 1])


def test_s2_batch_mode() -> None:
    e, y = _s2_points()
    c = SRLLoss().components(e, y)
    expected = [1.228427, 0.4, 1.089469, 1.348288, 0.407107, 0.873033]
    per_query = c["pos"] + c["neg"]
    np.testing.assert_allclose(per_query.numpy(), expected, atol=TOL)
    np.testing.assert_allclose(c["neg"].numpy(), [0, 0, 0.682362, 0.682362, 0, 0], atol=TOL)
    assert float(c["loss"]) == pytest.approx(0.891054, abs=TOL)


def test_s2_pool_mode_equals_batch_mode() -> None:
    e, y = _s2_points()
    loss = SRLLoss()
    assert float(loss(e, y, e, y, torch.arange(6))) == pytest.approx(0.891054, abs=TOL)


def test_srl_edge_cases_finite() -> None:
    loss = SRLLoss()
    # One class only: no negatives; two coincident points: no hard positive.
    e = _t([[1.0, 0.0], [1.0, 0.0]]).requires_grad_()
    out = loss(e, torch.tensor([0, 0]))
    assert float(out.detach()) == 0.0
    out.backward()
    assert torch.isfinite(e.grad).all()
    # Every query alone in its class, far from the others: empty H and empty N*.
    e = _t([[1.0, 0.0], [-1.0, 0.0]])
    assert float(loss(e, torch.tensor([0, 1]))) == 0.0


def test_srl_query_not_in_pool() -> None:
    pool, labels = _t(S1_POINTS), torch.tensor(S1_LABELS)
    loss = SRLLoss(normalize=False)
    # Query given separately (index -1): same value, the pool row 0 at distance ~0 is an easy positive.
    v = loss(pool[:1], labels[:1], pool[1:], labels[1:], torch.tensor([-1]))
    assert float(v) == pytest.approx(1.042806, abs=TOL)


def _naive_rll_simpler(e: np.ndarray, y: np.ndarray, alpha: float, margin: float, lam: float) -> float:
    """RLL-Simpler, written as plainly as possible: kappa = 0, T_n = 0."""
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    total = 0.0
    for q in range(len(e)):
        hard_pos, hard_neg = [], []
        for j in range(len(e)):
            if j == q:
                continue
            dist = math.sqrt(sum((a - b) ** 2 for a, b in zip(e[q], e[j], strict=True)))
            if y[j] == y[q] and dist > alpha - margin:
                hard_pos.append(dist - (alpha - margin))
            if y[j] != y[q] and dist < alpha:
                hard_neg.append(alpha - dist)
        lp = sum(hard_pos) / len(hard_pos) if hard_pos else 0.0
        ln = sum(hard_neg) / len(hard_neg) if hard_neg else 0.0
        total += lp + lam * ln
    return total / len(e)


def _naive_srl(
    e: np.ndarray, y: np.ndarray, alpha: float, margin: float, t_n: float, lam: float, kappa: float
) -> float:
    """Full SRL with loops (weights included), for the 5x32 recomputation."""
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    total = 0.0
    for q in range(len(e)):
        hp, ne, hn = [], 0, []
        for j in range(len(e)):
            if j == q:
                continue
            dist = float(np.sqrt(((e[q] - e[j]) ** 2).sum()))
            if y[j] == y[q]:
                if dist > alpha - margin:
                    hp.append(dist - (alpha - margin))
                else:
                    ne += 1
            elif dist < alpha:
                hn.append(alpha - dist)
        lp = (1 + kappa * ne / len(hp)) * sum(hp) / len(hp) if hp else 0.0
        if hn:
            ws = [math.exp(t_n * v) for v in hn]
            ln = sum(w * v for w, v in zip(ws, hn, strict=True)) / sum(ws)
        else:
            ln = 0.0
        total += lp + lam * ln
    return total / len(e)


@pytest.mark.parametrize("seed", range(5))
def test_srl_kappa0_t0_equals_naive_rll_simpler(seed: int) -> None:
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(5, 32))
    y = rng.integers(0, 2, size=5)
    got = SRLLoss(kappa=0.0, neg_temperature=0.0, lam=1.0)(_t(e), torch.tensor(y))
    # Random 32-d vectors sit at distance ~sqrt(2): use a wide alpha so both parts are active.
    assert float(got) == pytest.approx(_naive_rll_simpler(e, y, 1.2, 0.4, 1.0), abs=TOL)
    got = SRLLoss(alpha=1.6, margin=0.4, kappa=0.0, neg_temperature=0.0, lam=0.7)(_t(e), torch.tensor(y))
    assert float(got) == pytest.approx(_naive_rll_simpler(e, y, 1.6, 0.4, 0.7), abs=TOL)


@pytest.mark.parametrize("seed", range(5))
def test_srl_matches_naive_loop(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    e = rng.normal(size=(5, 32))
    y = rng.integers(0, 2, size=5)
    for kw in (
        {"alpha": 1.6, "margin": 0.4, "neg_temperature": 10.0, "lam": 1.0, "kappa": 1.0},
        {"alpha": 1.5, "margin": 0.2, "neg_temperature": 1.0, "lam": 0.5, "kappa": 2.0},
    ):
        got = SRLLoss(**kw)(_t(e), torch.tensor(y))
        want = _naive_srl(e, y, kw["alpha"], kw["margin"], kw["neg_temperature"], kw["lam"], kw["kappa"])
        assert float(got) == pytest.approx(want, abs=TOL)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_srl_pool_permutation_invariant(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pool = _t(rng.normal(size=(12, 8)))
    y = torch.tensor(rng.integers(0, 3, size=12))
    q_idx = torch.tensor([0, 3, 7])
    loss = SRLLoss(alpha=1.5)
    ref = loss(pool[q_idx], y[q_idx], pool, y, q_idx)
    perm = torch.tensor(rng.permutation(12))
    inv = torch.argsort(perm)  # new position of each old row
    got = loss(pool[q_idx], y[q_idx], pool[perm], y[perm], inv[q_idx])
    assert float(got) == pytest.approx(float(ref), abs=1e-9)


def test_srl_weights_are_detached_and_gradient_flows_to_pool() -> None:
    pool, labels = _t(S1_POINTS), torch.tensor(S1_LABELS)
    pool.requires_grad_()
    SRLLoss(normalize=False)(pool[:1], labels[:1], pool, labels, torch.tensor([0])).backward()
    g = pool.grad.numpy()
    # Hard positive 2 at (1, 0): d(L)/d(p2) = omega/|H| * unit vector from query = 0.75 * (1, 0).
    np.testing.assert_allclose(g[2], [0.75, 0.0], atol=TOL)
    # Not-mined point 6 and easy positive 1 get no gradient.
    np.testing.assert_allclose(g[6], [0, 0], atol=TOL)
    np.testing.assert_allclose(g[1], [0, 0], atol=TOL)


def test_srl_omega_clip() -> None:
    pool, labels = _t(S1_POINTS), torch.tensor(S1_LABELS)
    c = SRLLoss(normalize=False, omega_max=1.2).components(pool[:1], labels[:1], pool, labels, torch.tensor([0]))
    assert float(c["omega"][0]) == pytest.approx(1.2) and float(c["pos"][0]) == pytest.approx(1.2 * 0.3, abs=TOL)


def test_srl_caps() -> None:
    pool, labels = _t(S1_POINTS), torch.tensor(S1_LABELS)
    c = SRLLoss(normalize=False, k_p=1, k_n=1).components(pool[:1], labels[:1], pool, labels, torch.tensor([0]))
    # omega keeps the uncapped ratio (1.5); only the farthest hard positive (violation 0.4) is kept;
    # only the nearest hard negative (alpha - d = 0.6) is kept with weight 1.
    assert float(c["pos"][0]) == pytest.approx(1.5 * 0.4, abs=TOL)
    assert float(c["neg"][0]) == pytest.approx(0.6, abs=TOL)


# --------------------------------------------------------------------------------------------------- D1


def test_d1_corrective_triplet_values() -> None:
    e, y = _s2_points()
    c = CorrectiveTripletLoss(margin=0.6, gamma=1.0).components(e, y)
    assert c["positives"].tolist() == [2, 2, 0, 5, 5, 3]
    assert c["negatives"].tolist() == [5, 3, 3, 2, 2, 0]
    assert float(c["triplet"]) == pytest.approx(1.002369, abs=TOL)
    assert float(c["match"]) == pytest.approx(0.584329, abs=TOL)
    assert float(c["loss"]) == pytest.approx(1.586697, abs=TOL)


def test_d1_match_gradient_rows() -> None:
    e, y = _s2_points()
    e.requires_grad_()
    CorrectiveTripletLoss(normalize=False).components(e, y)["match"].backward()
    expected = [
        (0, 0),
        (0.288675, -0.166667),
        (-0.288675, 0.166667),
        (0.166006, -0.014827),
        (-0.332012, 0.029654),
        (0.166006, -0.014827),
    ]
    np.testing.assert_allclose(e.grad.numpy(), expected, atol=TOL)


def test_corrective_drops_anchors_without_positive() -> None:
    e, y = _s2_points()
    # Item 5 alone in its class: it cannot be an anchor, but can still be a negative.
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    c = CorrectiveTripletLoss().components(e, y)
    assert c["anchors"].tolist() == [0, 1, 2, 3, 4]
    # No anchor at all: a finite zero with a graph.
    e2 = e.clone().requires_grad_()
    out = CorrectiveTripletLoss()(e2, torch.arange(6))
    out.backward()
    assert float(out.detach()) == 0.0 and torch.isfinite(e2.grad).all()


# --------------------------------------------------------------------------------------------------- D2


def test_d2_pairwise_likelihood() -> None:
    u = _t([(0.5, 0.5), (0.5, -0.5), (-0.5, 0.5)])
    assert float(pairwise_likelihood_loss(u, torch.tensor([0, 0, 1]))) == pytest.approx(1.327690, abs=TOL)


def test_label_smoothing_ce_formula() -> None:
    z = _t([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    y = torch.tensor([0, 2])
    logp = torch.log_softmax(z, 1)
    want = ((1 - 0.1) * -logp[torch.arange(2), y] + 0.1 * (-logp).mean(1)).mean()
    assert float(label_smoothing_cross_entropy(z, y, 0.1)) == pytest.approx(float(want), abs=1e-12)


# --------------------------------------------------------------------------------------------------- D3


def _d3() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = torch.tensor([0, 0, 1])
    r = similarity_ratio(y)
    S = soft_similarity(y, y, r, dtype=T64)
    U = _t([(0.9, 0.1), (0.8, -0.2), (-0.7, 0.6)])
    return y, S, U


def test_d3_similarity() -> None:
    y, S, _ = _d3()
    assert similarity_ratio(y) == pytest.approx(1.25)
    np.testing.assert_allclose(S.numpy(), [[1, 1, -1.25], [1, 1, -1.25], [-1.25, -1.25, 1]])
    # UCMD: 80 per class, 21 classes -> r = 0.05.
    assert similarity_ratio(torch.arange(21).repeat_interleave(80)) == pytest.approx(0.05)


def test_d3_v_step_and_objective() -> None:
    _, S, U = _d3()
    V = adsh_v_step(U, S, torch.arange(3), beta=1.0)
    np.testing.assert_array_equal(V.numpy(), [[1, -1], [1, -1], [-1, 1]])
    assert adsh_objective(U, V, S, torch.arange(3), beta=1.0) == pytest.approx(15.54, abs=TOL)


def _random_adsh(seed: int, n: int = 10, k: int = 6, omega: int = 7):
    rng = np.random.default_rng(seed)
    y = torch.tensor(rng.integers(0, 3, size=n))
    S = soft_similarity(y, y, similarity_ratio(y), dtype=T64)
    idx = torch.tensor(rng.choice(n, size=omega, replace=False))
    U = _t(np.tanh(rng.normal(size=(omega, k))))
    V0 = _t(np.where(rng.normal(size=(n, k)) >= 0, 1.0, -1.0))
    return S[idx], U, idx, V0, rng


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), beta=st.sampled_from([0.0, 1.0, 200.0]))
def test_v_step_does_not_increase_objective(seed: int, beta: float) -> None:
    S_om, U, idx, V0, _ = _random_adsh(seed)
    V1 = adsh_v_step(U, S_om, idx, beta, V0)
    assert set(torch.unique(V1).tolist()) <= {-1.0, 1.0}
    before = adsh_objective(U, V0, S_om, idx, beta)
    after = adsh_objective(U, V1, S_om, idx, beta)
    assert after <= before + 1e-9


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_v_step_invariant_to_omega_order(seed: int) -> None:
    S_om, U, idx, V0, rng = _random_adsh(seed)
    perm = torch.tensor(rng.permutation(len(idx)))
    a = adsh_v_step(U, S_om, idx, 5.0, V0)
    b = adsh_v_step(U[perm], S_om[perm], idx[perm], 5.0, V0)
    assert torch.equal(a, b)


def test_v_step_zero_z_gives_plus_one() -> None:
    # U = 0 and S = 0 make every z exactly 0: all bits must be +1, never 0.
    V = adsh_v_step(torch.zeros(2, 3, dtype=T64), torch.zeros(2, 4, dtype=T64), torch.tensor([0, 1]), 1.0)
    assert torch.equal(V, torch.ones(4, 3, dtype=T64))


# --------------------------------------------------------------------------------------------------- D4


def test_d4_asymmetric_variant_b() -> None:
    loss = AsymmetricLoss(bits=2, beta=1.0, variant="B")
    u = _t([(0.5, -0.5)])
    V = _t([(1, -1), (-1, 1)])
    S_rows = _t([(1, -1)])
    assert float(loss(u, torch.tensor([0]), V, S_rows)) == pytest.approx(1.25, abs=TOL)


def test_asymmetric_variant_a() -> None:
    u = _t([(0.5, 0.5), (0.5, -0.5), (-0.5, 0.5)])
    V = _t([(1, 1), (1, -1), (-1, 1), (1, 1)])
    y = torch.tensor([0, 0, 1])
    got = AsymmetricLoss(bits=2, beta=2.0, variant="A")(u, torch.tensor([0, 1, 2]), V, labels=y)
    coupling = 3 * 0.5  # each ||v - u||² = 0.25 + 0.25
    assert float(got) == pytest.approx((1.327690 + 2.0 * coupling) / (4 * 3), abs=TOL)


def test_asymmetric_bad_variant() -> None:
    with pytest.raises(ValueError, match="variant"):
        AsymmetricLoss(bits=2, variant="C")  # type: ignore[arg-type]


def test_sgn_never_zero() -> None:
    x = _t([-1.0, -0.0, 0.0, 1e-30, -1e-30])
    np.testing.assert_array_equal(sgn(x).numpy(), [-1, 1, 1, 1, -1])


# ------------------------------------------------------------------------------ similarity distillation


def test_similarity_distillation_hand_case() -> None:
    # E E^T = I; the teacher's rows (1, 0) and (1, 1)/sqrt(2) have cosine 1/sqrt(2): two off-diagonal
    # squared differences of 1/2 over 4 entries.
    assert float(similarity_distillation(_t([[1.0, 0.0], [0.0, 1.0]]), _t([[1.0, 0.0], [1.0, 1.0]]))) == (
        pytest.approx(0.25, abs=TOL)
    )


@given(st.integers(0, 10_000))
@settings(max_examples=20, deadline=None)
def test_similarity_distillation_invariances(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(7, 5, generator=g, dtype=T64)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=T64))
    scale = torch.rand(7, 1, generator=g, dtype=T64) + 0.1
    # A rotation and per-row scales keep every cosine: nothing to distil. Other dimensions are fine.
    assert float(similarity_distillation(scale * (t @ q), t)) == pytest.approx(0.0, abs=1e-12)
    wide = torch.cat([t @ q, torch.zeros(7, 3, dtype=T64)], dim=1)
    assert float(similarity_distillation(wide, t)) == pytest.approx(0.0, abs=1e-12)
    e = torch.randn(7, 4, generator=g, dtype=T64)
    assert float(similarity_distillation(e, t)) > 0


def test_similarity_distillation_gradient_reaches_only_the_student() -> None:
    e = torch.tensor([[1.0, 0.2], [0.3, 1.0], [1.0, 1.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]], requires_grad=True)
    similarity_distillation(e, t).backward()
    assert e.grad is not None and float(e.grad.abs().sum()) > 0
    assert t.grad is None
    with pytest.raises(ValueError, match="teacher"):
        similarity_distillation(e, t[:2])
