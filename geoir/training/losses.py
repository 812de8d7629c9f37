"""Losses for training retrieval heads on frozen backbone features.

Two methods are implemented, following ``METHODS.md`` (section numbers below refer to it):

* :class:`SRLLoss`, the Similarity Retention Loss (SRL, §1.4-1.6): a ranked-list loss with class-aware
  mining, a per-query weight from the easy/hard positive ratio and softmax weights on hard negatives.
* DGSSH (§2.4): :class:`CorrectiveTripletLoss` (batch-hard triplet + a differentiable distribution-matching
  term), :func:`label_smoothing_cross_entropy`, :func:`pairwise_likelihood_loss` (``L_pair``),
  :class:`AsymmetricLoss` (variants A and B) and the ADSH V-step :func:`adsh_v_step` with its objective
  :func:`adsh_objective`.

The API copies the shape of pytorch-metric-learning (a loss object holds its hyper-parameters and is called
as ``loss(embeddings, labels)``) without its mixin chain. Every loss returns a scalar tensor; the loss
objects also expose ``components(...)`` returning the named parts, for logging.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AsymmetricLoss",
    "CorrectiveTripletLoss",
    "SRLLoss",
    "adsh_objective",
    "adsh_v_step",
    "label_smoothing_cross_entropy",
    "pairwise_distances",
    "pairwise_likelihood_loss",
    "sgn",
    "similarity_distillation",
    "similarity_ratio",
    "soft_similarity",
]

# Distances are sqrt(max(d², _EPS)): the clamp keeps the gradient finite where two embeddings coincide
# (a query against itself, duplicated images); it moves a zero distance to 1e-6, far below any margin.
_EPS = 1e-12


def sgn(x: Tensor) -> Tensor:
    """Sign with ``sgn(0) = +1``, so a binary code never contains 0 (DGSSH defect D-10).

    Args:
        x: Any real tensor.

    Returns:
        A tensor of the same shape and dtype holding only -1 and +1.
    """
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def pairwise_distances(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances between the rows of ``a`` (Q x d) and ``b`` (N x d), differentiable.

    Uses the ``|a|² + |b|² - 2 a·b`` expansion (one matmul, no Q x N x d intermediate), clamped at 1e-12
    before the square root so the gradient stays finite for coincident points.
    """
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return sq.clamp_min(_EPS).sqrt()


# ----------------------------------------------------------------------------------------------------------
# SRL
# ----------------------------------------------------------------------------------------------------------


class SRLLoss(torch.nn.Module):
    """Similarity Retention Loss (METHODS.md §1.4-1.6, the RLL-based reconstruction).

    For each query q of class c, against a candidate set (the pool, or the batch):

    * hard positives ``H = {j != q, y_j = c, d_qj > alpha - margin}``, easy positives ``E`` the rest;
    * hard negatives ``N* = {j : y_j != c, d_qj < alpha}``;
    * ``omega = 1 + kappa |E| / |H|``, ``L_P = omega * mean_{j in H}(d_qj - (alpha - margin))``;
    * ``w = softmax_{N*}(neg_temperature * (alpha - d))``, ``L_N = sum_{j in N*} w_j (alpha - d_qj)``;
    * loss = mean over **all** queries of ``L_P + lam * L_N`` (zero-loss queries included).

    The weights omega and w are detached (constants for the gradient).

    Args:
        alpha: Negative boundary; negatives should be at least this far from the query.
        margin: Positives should lie within ``alpha - margin`` of the query.
        neg_temperature: ``T_n`` of the negative softmax weights (0 gives uniform weights).
        lam: Weight of the negative part.
        kappa: Strength of the easy/hard ratio weight (0 gives plain RLL).
        k_p: If set, keep only the ``k_p`` farthest hard positives of each query (the ratio ``|E|/|H|`` is
            still taken over the uncapped sets, since it describes the class structure).
        k_n: If set, keep only the ``k_n`` nearest hard negatives of each query.
        normalize: L2-normalise the embeddings first (the method assumes unit vectors; tests bypass it).
        omega_max: Optional upper clip of omega (§1.5; default no clip). With a frozen backbone most
            positives start easy, so ``|E|/|H|`` can be large early on; clipping bounds that pull.
    """

    def __init__(
        self,
        alpha: float = 1.2,
        margin: float = 0.4,
        neg_temperature: float = 10.0,
        lam: float = 1.0,
        kappa: float = 1.0,
        k_p: int | None = None,
        k_n: int | None = None,
        normalize: bool = True,
        omega_max: float | None = None,
    ) -> None:
        super().__init__()
        if margin >= alpha:
            raise ValueError(f"margin ({margin}) must be smaller than alpha ({alpha}) so that alpha - margin > 0")
        self.alpha, self.margin = float(alpha), float(margin)
        self.neg_temperature, self.lam, self.kappa = float(neg_temperature), float(lam), float(kappa)
        self.k_p, self.k_n, self.normalize = k_p, k_n, normalize
        self.omega_max = omega_max

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        pool_emb: Tensor | None = None,
        pool_labels: Tensor | None = None,
        query_index_in_pool: Tensor | None = None,
    ) -> Tensor:
        """Mean SRL over the queries.

        Two modes:

        * batch (P x K) mode: ``loss(embeddings, labels)``; every batch member is a query against the batch.
        * pool mode: ``loss(query_emb, query_labels, pool_emb, pool_labels, query_index_in_pool)``; queries
          are ranked against the pool. ``query_index_in_pool[i]`` is the row of query i in the pool (so it
          never mines itself), or -1 when the query is not in the pool.

        Returns:
            A scalar tensor.
        """
        return self.components(embeddings, labels, pool_emb, pool_labels, query_index_in_pool)["loss"]

    def components(
        self,
        embeddings: Tensor,
        labels: Tensor,
        pool_emb: Tensor | None = None,
        pool_labels: Tensor | None = None,
        query_index_in_pool: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Like :meth:`forward`, but also returns the per-query parts.

        Returns:
            ``loss`` (scalar), ``pos`` and ``neg`` (per-query ``L_P`` and ``L_N``), ``omega`` (per query),
            ``n_hard_pos``, ``n_easy_pos``, ``n_hard_neg`` (per-query counts before capping).
        """
        q = F.normalize(embeddings, dim=1, eps=1e-12) if self.normalize else embeddings
        if pool_emb is None:
            if pool_labels is not None or query_index_in_pool is not None:
                raise ValueError("pool_labels / query_index_in_pool given without pool_emb")
            p, pool_labels = q, labels
            query_index_in_pool = torch.arange(q.shape[0], device=q.device)
        else:
            if pool_labels is None:
                raise ValueError("pool mode needs pool_labels along with pool_emb")
            p = F.normalize(pool_emb, dim=1, eps=1e-12) if self.normalize else pool_emb
        d = pairwise_distances(q, p)
        n_q = d.shape[0]
        same = labels[:, None] == pool_labels[None, :]
        is_self = torch.zeros_like(same)
        if query_index_in_pool is not None:
            idx = torch.as_tensor(query_index_in_pool, device=d.device, dtype=torch.long)
            rows = torch.nonzero(idx >= 0).squeeze(1)
            is_self[rows, idx[rows]] = True
        pos = same & ~is_self
        neg = ~same
        dd = d.detach()
        pos_boundary = self.alpha - self.margin
        hard_pos = pos & (dd > pos_boundary)
        easy_pos = pos & ~hard_pos
        hard_neg = neg & (dd < self.alpha)
        n_h = hard_pos.sum(1)
        n_e = easy_pos.sum(1)
        n_n = hard_neg.sum(1)
        # omega uses the uncapped counts: it describes how compact the class is around the query.
        omega = 1.0 + self.kappa * n_e.to(d.dtype) / n_h.clamp_min(1).to(d.dtype)
        if self.omega_max is not None:
            omega = omega.clamp_max(self.omega_max)
        if self.k_p is not None:
            hard_pos = hard_pos & _topk_mask(torch.where(hard_pos, dd, -torch.inf), self.k_p, largest=True)
        if self.k_n is not None:
            hard_neg = hard_neg & _topk_mask(torch.where(hard_neg, dd, torch.inf), self.k_n, largest=False)
        n_h_used = hard_pos.sum(1).clamp_min(1).to(d.dtype)
        viol_pos = torch.where(hard_pos, d - pos_boundary, torch.zeros_like(d))
        loss_pos = omega * viol_pos.sum(1) / n_h_used  # 0 where H is empty
        logits = torch.where(hard_neg, self.neg_temperature * (self.alpha - dd), -torch.inf)
        # softmax of an all -inf row is NaN; such rows (no hard negative) get weight 0.
        w = torch.softmax(logits, dim=1)
        w = torch.where(hard_neg, w, torch.zeros_like(w)).detach()
        loss_neg = (w * torch.where(hard_neg, self.alpha - d, torch.zeros_like(d))).sum(1)
        per_query = loss_pos + self.lam * loss_neg
        return {
            "loss": per_query.sum() / max(n_q, 1),
            "pos": loss_pos,
            "neg": loss_neg,
            "omega": omega,
            "n_hard_pos": n_h,
            "n_easy_pos": n_e,
            "n_hard_neg": n_n,
        }


def similarity_distillation(embeddings: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared difference between the embeddings' cosine similarities and the teacher's.

    ``mean((E Eᵀ - T Tᵀ)²)`` over every ordered pair (diagonal included) of the N rows, with ``E`` the
    embeddings and ``T`` the teacher's vectors of the same items, each row L2-normalised. It keeps the
    pairwise geometry of the teacher (for geoir: the frozen backbone's own features, centred) wherever
    the labels do not pull it elsewhere: the similarity-preserving distillation of Tung and Mori (ICCV
    2019), on cosine Gram matrices. Not part of SRL or DGSSH (METHODS.md); :func:`geoir.training.fit.train_srl`
    adds it with the weight ``distill``.

    Args:
        embeddings: N x d student embeddings (differentiable).
        teacher: N x D teacher vectors (no gradient is taken through them).

    Returns:
        A scalar tensor; 0 when the two Gram matrices agree.
    """
    if embeddings.shape[0] != teacher.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings but {teacher.shape[0]} teacher vectors")
    e = F.normalize(embeddings, dim=1, eps=_EPS)
    t = F.normalize(teacher.detach(), dim=1, eps=_EPS)
    return ((e @ e.T - t @ t.T) ** 2).mean()


def _topk_mask(scores: Tensor, k: int, largest: bool) -> Tensor:
    """Boolean mask of the k best entries per row (entries at +-inf are never chosen as best)."""
    k = min(k, scores.shape[1])
    idx = torch.topk(scores, k, dim=1, largest=largest).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask & torch.isfinite(scores)


# ----------------------------------------------------------------------------------------------------------
# DGSSH
# ----------------------------------------------------------------------------------------------------------


class CorrectiveTripletLoss(torch.nn.Module):
    """DGSSH corrective triplet loss ``L_tri + gamma * L_match`` (METHODS.md §2.4b; D-2..D-5, D-9 fixed).

    Batch-hard selection (hardest positive = farthest same-class item, hardest negative = nearest
    other-class item; ties to the lowest index). Anchors with no in-batch positive (or no negative) are
    dropped. ``L_match = sum_c ||mu_c - nu_c||`` compares each selected class's batch mean ``mu_c`` with the
    mean of its selected samples ``nu_c`` (with multiplicity) and is differentiable through both.

    Args:
        margin: Triplet margin on unit-vector distances.
        gamma: Weight of the distribution-matching term.
        normalize: L2-normalise the embeddings first (DGSSH applies it to ``normalize(u)``).
    """

    def __init__(self, margin: float = 0.6, gamma: float = 1.0, normalize: bool = True) -> None:
        super().__init__()
        self.margin, self.gamma, self.normalize = float(margin), float(gamma), normalize

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Return ``L_cor`` for a batch (0 when no anchor has both a positive and a negative)."""
        return self.components(embeddings, labels)["loss"]

    def components(self, embeddings: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Return ``loss``, ``triplet``, ``match`` and the selected indices.

        ``anchors``, ``positives`` and ``negatives`` are batch indices, one entry per kept anchor.
        """
        e = F.normalize(embeddings, dim=1, eps=1e-12) if self.normalize else embeddings
        b = e.shape[0]
        d = pairwise_distances(e, e)
        dd = d.detach()
        eye = torch.eye(b, dtype=torch.bool, device=e.device)
        same = labels[:, None] == labels[None, :]
        pos = same & ~eye
        neg = ~same
        anchors = torch.nonzero(pos.any(1) & neg.any(1)).squeeze(1)
        zero = e.sum() * 0.0  # keeps the graph (and the dtype) when there is nothing to select
        if anchors.numel() == 0:
            return {
                "loss": zero,
                "triplet": zero,
                "match": zero,
                "anchors": anchors,
                "positives": anchors,
                "negatives": anchors,
            }
        # argmax/argmin return the first optimum, i.e. the lowest index on ties.
        p_sel = torch.where(pos, dd, -torch.inf)[anchors].argmax(1)
        n_sel = torch.where(neg, dd, torch.inf)[anchors].argmin(1)
        d_ap = d[anchors, p_sel]
        d_an = d[anchors, n_sel]
        triplet = F.relu(d_ap - d_an + self.margin).mean()
        # Distribution matching: class means over the batch vs over the selection multiset M.
        classes, inv = torch.unique(labels, return_inverse=True)
        onehot = F.one_hot(inv, classes.numel()).to(e.dtype)  # B x C'
        mult = torch.bincount(torch.cat([p_sel, n_sel]), minlength=b).to(e.dtype)  # multiplicity in M
        n_batch = onehot.sum(0)  # items per class in the batch
        n_sel_c = onehot.T @ mult  # selected items per class (with multiplicity)
        mu = (onehot.T @ e) / n_batch[:, None]
        nu = (onehot.T @ (mult[:, None] * e)) / n_sel_c.clamp_min(1)[:, None]
        present = n_sel_c > 0
        diff = (mu - nu)[present]
        match = ((diff * diff).sum(1) + _EPS).sqrt().sum()
        return {
            "loss": triplet + self.gamma * match,
            "triplet": triplet,
            "match": match,
            "anchors": anchors,
            "positives": p_sel,
            "negatives": n_sel,
        }


def label_smoothing_cross_entropy(logits: Tensor, labels: Tensor, epsilon: float = 0.1) -> Tensor:
    """Label-smoothed cross-entropy ``(1-eps)(-log p_y) + eps * mean_c(-log p_c)`` (timm's form, §2.4a)."""
    return F.cross_entropy(logits, labels, label_smoothing=epsilon)


def pairwise_likelihood_loss(u: Tensor, labels: Tensor) -> Tensor:
    """Balanced pairwise likelihood ``L_pair`` of DGSSH variant A (§2.4c).

    ``theta_ij = u_i·u_j / 2``, ``l_ij = softplus(theta_ij) - s_ij theta_ij`` over ordered off-diagonal
    pairs, positive pairs weighted ``(N0+N1)/N1`` and negative pairs ``(N0+N1)/N0``, averaged over
    ``B(B-1)`` pairs.
    """
    b = u.shape[0]
    if b < 2:
        return u.sum() * 0.0
    theta = 0.5 * (u @ u.T)
    s = (labels[:, None] == labels[None, :]).to(u.dtype)
    off = ~torch.eye(b, dtype=torch.bool, device=u.device)
    n1 = max(int((s.bool() & off).sum()), 1)
    n0 = max(int((~s.bool() & off).sum()), 1)
    w = torch.where(s.bool(), (n0 + n1) / n1, (n0 + n1) / n0).to(u.dtype)
    ell = F.softplus(theta) - s * theta
    return (w * ell)[off].sum() / (b * (b - 1))


def similarity_ratio(labels: Tensor) -> float:
    """``r`` = #ordered pairs with equal labels / #pairs with different labels, diagonal included (§2.2)."""
    counts = torch.bincount(torch.as_tensor(labels).long())
    n = int(counts.sum())
    equal = int((counts * counts).sum())
    differ = n * n - equal
    return equal / max(differ, 1)


def soft_similarity(labels_a: Tensor, labels_b: Tensor, r: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """DGSSH soft similarity: 1 for equal labels, ``-r`` otherwise; rows follow ``labels_a``."""
    same = torch.as_tensor(labels_a)[:, None] == torch.as_tensor(labels_b)[None, :]
    return torch.where(same, torch.tensor(1.0, dtype=dtype), torch.tensor(-float(r), dtype=dtype))


class AsymmetricLoss(torch.nn.Module):
    """DGSSH asymmetric loss between network outputs u and the database codes V (§2.4c).

    * variant ``"B"`` (ADSH-faithful, default):
      ``[sum_i sum_j (u_i·v_j - K S_{pi(i),j})² + beta sum_i ||v_{pi(i)} - u_i||²] / (N B)``, the objective
      the V-step minimises, so both steps descend one function; plus ``eta * L_pair`` if ``eta > 0``.
    * variant ``"A"`` (code-faithful): ``[L_pair + beta sum_i ||v_{pi(i)} - u_i||²] / (N B)``.

    Args:
        bits: Code length K.
        beta: Weight of the u-V coupling.
        variant: ``"A"`` or ``"B"``.
        eta: Weight of an extra ``L_pair`` term in variant B (default 0).
    """

    def __init__(self, bits: int, beta: float = 200.0, variant: Literal["A", "B"] = "B", eta: float = 0.0) -> None:
        super().__init__()
        if variant not in ("A", "B"):
            raise ValueError(f"variant must be 'A' or 'B', got {variant!r}")
        self.bits, self.beta, self.variant, self.eta = int(bits), float(beta), variant, float(eta)

    def forward(
        self,
        u: Tensor,
        batch_index: Tensor,
        V: Tensor,
        S_rows: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Return the asymmetric loss of a batch.

        Args:
            u: Network outputs of the batch, B x K (tanh range).
            batch_index: Database row ``pi(i)`` of each batch item, length B.
            V: Database codes, N x K (held fixed).
            S_rows: Rows ``S[pi(i), :]`` of the soft similarity, B x N (variant B).
            labels: Batch labels, length B (variant A, or variant B with ``eta > 0``).
        """
        n, b = V.shape[0], u.shape[0]
        coupling = ((V[batch_index] - u) ** 2).sum()
        if self.variant == "A":
            if labels is None:
                raise ValueError("variant A needs the batch labels")
            return (pairwise_likelihood_loss(u, labels) + self.beta * coupling) / (n * b)
        if S_rows is None:
            raise ValueError("variant B needs S_rows (the soft-similarity rows of the batch)")
        residual = ((u @ V.T - self.bits * S_rows) ** 2).sum()
        loss = (residual + self.beta * coupling) / (n * b)
        if self.eta > 0:
            if labels is None:
                raise ValueError("eta > 0 needs the batch labels")
            loss = loss + self.eta * pairwise_likelihood_loss(u, labels)
        return loss


@torch.no_grad()
def adsh_v_step(
    U_omega: Tensor,
    S_omega: Tensor,
    omega_index: Tensor,
    beta: float,
    V: Tensor | None = None,
) -> Tensor:
    """ADSH discrete cyclic coordinate descent: one sweep over the bits (§2.4d).

    Minimises ``sum_{i in Omega} sum_j (u_i·v_j - K S_ij)² + beta sum_{i in Omega} ||v_i - u_i||²`` exactly,
    bit by bit, with the other bits fixed; ``V[:, k] = +1`` where ``z <= 0`` (so no bit is ever 0).

    Args:
        U_omega: Outputs of the visited database items, |Omega| x K (rows in visiting order).
        S_omega: Matching rows of the soft similarity, |Omega| x N.
        omega_index: Database row of each visited item, length |Omega|.
        beta: Coupling weight.
        V: Current codes, N x K; zeros when None (the start of training).

    Returns:
        The new codes, N x K, in {-1, +1}, with U's dtype.
    """
    n, k = S_omega.shape[1], U_omega.shape[1]
    V = torch.zeros(n, k, dtype=U_omega.dtype, device=U_omega.device) if V is None else V.clone().to(U_omega.dtype)
    U_bar = torch.zeros(n, k, dtype=U_omega.dtype, device=U_omega.device)
    U_bar[torch.as_tensor(omega_index, device=U_omega.device)] = U_omega
    Q = -2.0 * k * (S_omega.T @ U_omega) - 2.0 * beta * U_bar
    for bit in range(k):
        rest = [c for c in range(k) if c != bit]
        z = Q[:, bit] + 2.0 * V[:, rest] @ (U_omega[:, rest].T @ U_omega[:, bit])
        V[:, bit] = torch.where(z <= 0, 1.0, -1.0).to(V.dtype)
    return V


def adsh_objective(U_omega: Tensor, V: Tensor, S_omega: Tensor, omega_index: Tensor, beta: float) -> float:
    """ADSH objective ``sum (U_Omega V^T - K S_Omega)² + beta ||V_Omega - U_Omega||²`` (§2.4d, test D3)."""
    k = U_omega.shape[1]
    residual = ((U_omega @ V.T - k * S_omega) ** 2).sum()
    coupling = ((V[torch.as_tensor(omega_index)] - U_omega) ** 2).sum()
    return float(residual + beta * coupling)
