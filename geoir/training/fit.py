"""Training loops for heads on precomputed backbone features (numpy arrays, CPU, seeded).

* :func:`train_srl`: SRL float embedding (METHODS.md §1.7 pool mode or P x K mode, §1.9 schedule).
* :func:`train_dgssh`: DGSSH hash codes (§2.4 loss, §2.5 class-balanced epoch sampler, §2.4d V-step,
  §2.8 schedule).
* :func:`train_plain`: baseline hash head (label-smoothed cross-entropy + a small quantisation term).

Each holds out a stratified validation split (``val_fraction`` of the training set) and keeps the epoch with
the best validation mAP (validation queries against the rest of the training set, encoded by the head):
the test queries are never looked at. When no class is large enough to give up a validation image, the last
epoch is kept (``history["best_val_mAP"]`` is None). Each returns ``(head, history)``; ``history`` is JSON-able
apart from the ``"V"`` array of :func:`train_dgssh`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from geoir.errors import DatasetError
from geoir.training.heads import HashHead, PlainHead, SRLHead, fuse_trained, gate_angles, retention_mix
from geoir.training.losses import (
    AsymmetricLoss,
    CorrectiveTripletLoss,
    SRLLoss,
    adsh_v_step,
    label_smoothing_cross_entropy,
    similarity_distillation,
    similarity_ratio,
    soft_similarity,
)
from geoir.training.metrics import evaluate_retrieval
from geoir.training.progress import Bar, Progress, relabelled

__all__ = [
    "balanced_chunks",
    "class_holdout",
    "dgssh_batches",
    "stratified_holdout",
    "train_dgssh",
    "train_plain",
    "train_srl",
    "warmup_cosine",
]


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise DatasetError(f"features must be N x D and labels length N; got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise DatasetError("features contain NaN or inf; recompute them with the backbone in eval mode")
    _, counts = np.unique(y, return_counts=True)
    if len(counts) < 2 or counts.min() < 2:
        raise DatasetError(
            f"training needs at least 2 classes of at least 2 images each; class sizes are {counts.tolist()}"
        )
    return x, y


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class into (kept, held out), holding out ``round(fraction * n_c)`` of each class.

    At least one item of every class with 2+ items stays in the kept part. Indices come back sorted.
    """
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep, hold = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        n_hold = min(round(fraction * len(idx)), len(idx) - 1)
        hold.append(idx[:n_hold])
        keep.append(idx[n_hold:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(hold)).astype(np.int64)


def balanced_chunks(labels: np.ndarray, chunk: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """One epoch of class-balanced groups that visits every index exactly once.

    Each class is shuffled and cut into chunks of ``chunk``; round t holds chunk t of every class that still
    has one (class order shuffled). Returns the rounds, each a list of index arrays (one per class).
    """
    y = np.asarray(labels)
    per_class = []
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        per_class.append([idx[s : s + chunk] for s in range(0, len(idx), chunk)])
    rounds = []
    for t in range(max(len(p) for p in per_class)):
        group = [p[t] for p in per_class if t < len(p)]
        rng.shuffle(group)
        rounds.append(group)
    return rounds


def warmup_cosine(total_steps: int, warmup_steps: int, final_fraction: float = 0.01) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from ``1/warmup_steps`` to 1, then cosine decay to ``final_fraction``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(total_steps - warmup_steps, 1)
        t = min((step - warmup_steps) / span, 1.0)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t))

    return f


#: Classes needed to choose on held-out classes: two held out (ranked among themselves) and two kept.
MIN_HOLDOUT_CLASSES = 4


def class_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices by class into (kept, held out): ``round(fraction * C)`` whole classes (at least 2 and at
    most C - 2) are held out. Selecting on held-out *classes* favours heads that generalise to new classes
    (the unseen-classes protocol) over heads that only separate the training classes. Held-out classes are
    ranked among themselves, so one alone would score 1 whatever the head: two at least."""
    y = np.asarray(labels)
    classes = np.unique(y)
    n_hold = min(max(round(fraction * len(classes)), 2), len(classes) - 2)
    if n_hold < 2:
        raise DatasetError(
            f"class-held-out validation needs at least {MIN_HOLDOUT_CLASSES} classes, got {len(classes)}"
        )
    held = np.random.default_rng(seed).choice(classes, size=n_hold, replace=False)
    mask = np.isin(y, held)
    return np.nonzero(~mask)[0], np.nonzero(mask)[0]


def _holdout(y: np.ndarray, val_fraction: float, val_split: str, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(fitting rows, validation rows)``; no validation (None) when ``val_fraction`` is 0 or when no class
    is large enough to give up an image (``round(val_fraction * n_c)`` is 0 for every class), so the caller
    keeps the last epoch instead of selecting on an empty validation set, whose mAP is undefined."""
    if val_fraction <= 0:
        return np.arange(len(y)), None
    if val_split == "stratified":
        fit_idx, val_idx = stratified_holdout(y, val_fraction, seed)
    elif val_split == "classes":
        fit_idx, val_idx = class_holdout(y, val_fraction, seed)
    else:
        raise ValueError(f"val_split must be 'stratified' or 'classes', got {val_split!r}")
    if len(val_idx) == 0:
        return np.arange(len(y)), None
    return fit_idx, val_idx


class _Views:
    """Training features with optional extra views (features of flipped/rotated copies of the same images).

    ``batch(idx)`` returns, for every index, the features of one view drawn at random: augmentation at the
    feature level, since the backbone is frozen and its features are precomputed once per view.
    """

    def __init__(self, x: np.ndarray, views: np.ndarray | None, rows: np.ndarray, rng: np.random.Generator):
        base = torch.from_numpy(np.ascontiguousarray(x[rows]))
        if views is None:
            self.all = base[None]
        else:
            v = np.asarray(views, dtype=np.float32)
            if v.ndim != 3 or v.shape[1:] != x.shape:
                raise DatasetError(f"views must be V x N x D with N x D = {x.shape}; got {v.shape}")
            self.all = torch.cat([base[None], torch.from_numpy(np.ascontiguousarray(v[:, rows]))])
        self.base = base
        self.rng = rng

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        if self.all.shape[0] == 1:
            return self.base[idx]
        pick = torch.from_numpy(self.rng.integers(0, self.all.shape[0], size=len(idx)))
        return self.all[pick, idx]


def _as_float(v: object) -> float:
    """A metric value from an ``evaluate_retrieval`` dict (typed ``object`` there) as a float."""
    return float(v)  # type: ignore[arg-type]


def _val_note(score: float | None) -> str | None:
    """The note an epoch's bar shows: its validation mAP, if it has one."""
    return None if score is None or math.isnan(score) else f"val mAP {score:.3f}"


def _epochs_to_run(epochs: int, stop_after: int | None) -> int:
    return epochs if stop_after is None else max(0, min(epochs, stop_after))


def _seed_all(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


class _Selector:
    """Keeps the state dict of the best validation score (or the last one when there is no validation).

    A score that is not a number (NaN) never counts as an improvement, but the first state offered is always
    kept, so there is a state to load whatever the scores were.
    """

    def __init__(self) -> None:
        self.best: float = -math.inf
        self.epoch: int = -1
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, score: float | None, epoch: int, module: nn.Module) -> bool:
        """Keep ``module``'s state if ``score`` is the best so far (or None); returns whether it was kept."""
        valid = score is not None and not math.isnan(score)
        if score is None or (valid and score > self.best) or self.state is None:
            self.best = score if valid and score is not None else -math.inf
            self.epoch = epoch
            self.state = copy.deepcopy(module.state_dict())
            return True
        return False


def _val_map(
    encode: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    fit_idx: np.ndarray,
    val_idx: np.ndarray,
    metric: Literal["euclidean", "hamming"],
    within: bool = False,
) -> float:
    """Validation mAP, everything encoded by the current head: held-out queries against the fitting set, or
    (``within``, for held-out classes, which the fitting set does not contain) all-vs-all among the held-out
    items, each query excluded from its own ranking."""
    q = encode(x[val_idx])
    if within:
        return _map(q, q, y[val_idx], y[val_idx], metric, within=True)
    return _map(q, encode(x[fit_idx]), y[val_idx], y[fit_idx], metric)


def _map(
    q: np.ndarray,
    db: np.ndarray,
    yq: np.ndarray,
    ydb: np.ndarray,
    metric: Literal["euclidean", "hamming"],
    within: bool = False,
) -> float:
    """mAP of queries against a database (``within``: the queries are the database, each excluded from its
    own ranking)."""
    self_index = np.arange(len(q)) if within else None
    return _as_float(evaluate_retrieval(q, db, yq, ydb, metric=metric, ks=(), self_index=self_index)["mAP"])


def _refit(
    train: Callable[..., tuple[Any, dict[str, Any]]],
    args: dict[str, Any],
    hist: dict[str, Any],
    epoch: int,
) -> tuple[Any, dict[str, Any]]:
    """Train ``train(**args)`` once more on every item, the validation items included, with the same schedule
    stopped after ``epoch`` (the one validation chose), keeping the last epoch; records ``hist["refit"]``."""
    n = len(args["labels"])
    if args["log"]:
        args["log"](f"refit: training again on all {n} items, {epoch} epoch(s) of the same schedule")
    progress = relabelled(args["progress"], "refit on all items")
    head, h = train(**{**args, "val_fraction": 0.0, "refit": False, "stop_after": epoch, "progress": progress})
    hist["refit"] = {"epochs": epoch, "items": n, "seconds": h["seconds"]}
    return head, h


# ----------------------------------------------------------------------------------------------------------
# SRL
# ----------------------------------------------------------------------------------------------------------


def train_srl(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    dim: int | None = None,
    center: bool = True,
    loss: SRLLoss | None = None,
    mode: Literal["pool", "pk"] = "pool",
    queries_per_class: int = 4,
    classes_per_batch: int = 16,
    per_class: int = 5,
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup_epochs: int = 5,
    final_lr_fraction: float = 0.01,
    val_fraction: float = 0.1,
    val_split: Literal["stratified", "classes"] = "stratified",
    views: np.ndarray | None = None,
    patience: int | None = None,
    retain_dim: int = 0,
    retain_angle: float | None = None,
    retain_holdout: float = 0.25,
    retain_gate: bool = False,
    distill: float = 0.0,
    distill_sample: int = 512,
    fuse_codes: dict[str, Any] | None = None,
    refit: bool = False,
    stop_after: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> tuple[SRLHead, dict[str, Any]]:
    """Train an :class:`SRLHead` with :class:`SRLLoss` on precomputed features.

    Pool mode (default, §1.7): each iteration embeds the whole fitting set, draws ``queries_per_class``
    queries of every class (an epoch makes every image a query once) and mines each query against the
    whole pool. P x K mode: batches of ``classes_per_batch`` classes x ``per_class`` images, each member a
    query against its batch. Adam, linear warm-up then cosine decay (§1.9), model selection by validation
    mAP.

    Args:
        features: N x D backbone features.
        labels: N class labels.
        dim: Embedding dimension; default D (identity init), smaller gives a PCA-whitening init.
        center: With the identity init, start from centred features (bias = -mean of the fitting set).
            Default on: it helps mining because pooled ReLU6 features are all non-negative.
        loss: The loss object; default ``SRLLoss(omega_max=2.0)`` (alpha 1.2, margin 0.4, T_n 10, lambda 1,
            kappa 1, omega clipped at 2: unclipped omega gave 0.90 instead of 0.966 test mAP on UC Merced).
        mode: ``"pool"`` or ``"pk"``.
        queries_per_class: I of §1.7 (pool mode).
        classes_per_batch: P (P x K mode).
        per_class: K (P x K mode).
        epochs: Number of epochs (METHODS.md suggests 100; the best validation epoch on UC Merced is
            8-30 at lr 1e-3).
        lr: Peak learning rate (METHODS.md's 1e-4 reaches only 0.76 mAP after 30 epochs on UC Merced).
        weight_decay: Adam weight decay (L2, on the head only).
        warmup_epochs: Linear warm-up length.
        final_lr_fraction: LR at the end of the cosine, as a fraction of ``lr``.
        val_fraction: Held-out fraction for model selection (0, or classes too small to give up an image:
            keep the last epoch).
        val_split: ``"stratified"`` holds out ``val_fraction`` of every class; ``"classes"`` holds out that
            fraction of the classes (selects for generalisation to unseen classes).
        views: Optional V x N x D features of augmented copies (e.g. flips and 90° rotations) of the same
            images; each training draw uses one view at random. Validation uses ``features`` only.
        patience: Stop after this many epochs without a validation improvement (None: never).
        retain_dim: With ``> 0``, append the backbone's own geometry (its top ``retain_dim`` principal axes)
            to the trained embedding (:meth:`SRLHead.set_retention`), so what the labels never named is
            not forgotten. 0: the plain SRL embedding.
        retain_angle: Weight of the retained part (radians). None: chosen by validation alone: a probe head
            is trained without ``retain_holdout`` of the classes, and the angle of :data:`RETAIN_ANGLES` with
            the best mean of its two validation mAPs (held-out images of its classes; the held-out classes
            among themselves) is kept, so the choice weighs the labels against what they never named.
            Without validation (``val_fraction == 0`` or classes too small) or with fewer than 4 classes the
            angle is :data:`RETAIN_DEFAULT_ANGLE`.
        retain_holdout: Fraction of the classes the probe head never sees.
        retain_gate: Let validation also choose a *gate* (:meth:`SRLHead.set_gate`): a retention angle per
            item, small for items near a class the head was taught and large for items far from all of them,
            so the embedding ranks known kinds of scene by the labels and unknown ones by the backbone's
            geometry. Candidates: :data:`GATE_ANGLES_LO` x :data:`GATE_ANGLES_HI` x :data:`GATE_TAUS`,
            besides the fixed angles. Needs a validation split (else the fixed default angle is used) and
            is ignored when ``retain_angle`` is given.
        distill: Weight of a similarity-distillation term (:func:`geoir.training.losses.similarity_distillation`)
            added to the loss: the embeddings' pairwise cosine similarities are pulled towards those of the
            centred backbone features of the same items (the untrained head's own, with the identity
            init), so the head keeps the backbone's geometry wherever the labels do not ask otherwise. 0:
            plain SRL.
        distill_sample: Items per step over which the distillation term is computed (pool mode: a random
            subset of the pool; P x K mode: the batch, up to this many).
        fuse_codes: For a head that will be combined with a DGSSH hash head (:class:`CombinedHead`):
            keyword arguments of :func:`train_dgssh` for a probe hash head, trained with the retention
            probe on the same classes, so validation also chooses the weight of the hash head's continuous
            code in the float embedding (:data:`FUSE_WEIGHTS`, 0 among them; ``hist["fuse"]``). None: no
            fusion (weight 0). Needs retention chosen by validation.
        refit: Once validation has chosen the epoch, train the head again on every item, the validation
            items included, with the same schedule stopped after that epoch, and keep it (``hist["refit"]``);
            validation's other choices (retention, gate, code weight) carry over. No-op without validation.
            Trains the head a second time, for the chosen epochs.
        stop_after: Stop after this epoch (the schedule still spans ``epochs``); what ``refit`` trains with.
        seed: Seeds the split, the sampling and the initialisation.
        log: Called with one line per epoch.
        progress: Progress factory (:data:`geoir.training.progress.Progress`): one bar over the epochs of
            each training loop (this one, a probe's, a refit's), showing the validation mAP.

    Returns:
        The best head (eval mode) and a history dict (per-epoch ``loss``, ``val_mAP``, ``lr``; ``best_epoch``,
        ``best_val_mAP``, ``seconds``, ``config``; with retention ``retain_angle`` and ``retain_val_mAP``).
    """
    args = dict(locals())
    x, y = _check_inputs(features, labels)
    rng = _seed_all(seed)
    fit_idx, val_idx = _holdout(y, val_fraction, val_split, seed)
    within = val_split == "classes"
    xf = _Views(x, views, fit_idx, rng)
    yf = torch.from_numpy(y[fit_idx]).long()
    loss = loss or SRLLoss(omega_max=2.0)
    if not (math.isfinite(distill) and distill >= 0) or distill_sample < 2:
        raise DatasetError(
            f"distill {distill}, distill_sample {distill_sample}: need a finite distill >= 0 and >= 2 items"
        )
    teacher_mean = torch.from_numpy(x[fit_idx].mean(0))

    def with_distill(value: torch.Tensor, emb: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        # Only drawn from rng when on, so a head trained without it is the same as before it existed.
        if distill <= 0:
            return value
        s = torch.from_numpy(np.sort(rng.choice(len(emb), size=min(distill_sample, len(emb)), replace=False)))
        return value + distill * similarity_distillation(emb[s], xb[s] - teacher_mean)

    head = SRLHead(x.shape[1], dim)
    if head.out_dim != head.in_dim:
        head.init_pca_whitening(x[fit_idx])
    elif center:
        head.init_centering(x[fit_idx])
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    chunk = queries_per_class if mode == "pool" else per_class
    steps_per_epoch = _steps_per_epoch(yf.numpy(), chunk, classes_per_batch if mode == "pk" else None)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(epochs * steps_per_epoch, warmup_epochs * steps_per_epoch, final_lr_fraction)
    )
    hist: dict[str, Any] = {"loss": [], "val_mAP": [], "lr": []}
    sel = _Selector()
    t0 = time.perf_counter()
    if val_idx is not None:
        hist["val_mAP_initial"] = _val_map(head.embed, x, y, fit_idx, val_idx, "euclidean", within)
        sel.update(hist["val_mAP_initial"], 0, head)
    stale = 0
    with Bar(progress, _epochs_to_run(epochs, stop_after), "SRL head", "epoch") as bar:
        for epoch in range(1, epochs + 1):
            if stop_after is not None and epoch > stop_after:
                break
            head.train()
            losses = []
            for group in balanced_chunks(yf.numpy(), chunk, rng):
                if mode == "pool":
                    q = torch.from_numpy(np.concatenate(group)).long()
                    xb = xf.batch(torch.arange(len(fit_idx)))
                    emb = head(xb)
                    value = with_distill(loss(emb[q], yf[q], emb, yf, q), emb, xb)
                    losses.append(float(value.detach()))
                    opt.zero_grad()
                    value.backward()
                    opt.step()
                    sched.step()
                else:
                    for s in range(0, len(group), classes_per_batch):
                        b = torch.from_numpy(np.concatenate(group[s : s + classes_per_batch])).long()
                        xb = xf.batch(b)
                        emb = head(xb)
                        value = with_distill(loss(emb, yf[b]), emb, xb)
                        losses.append(float(value.detach()))
                        opt.zero_grad()
                        value.backward()
                        opt.step()
                        sched.step()
            hist["loss"].append(float(np.mean(losses)))
            hist["lr"].append(float(opt.param_groups[0]["lr"]))
            score = _val_map(head.embed, x, y, fit_idx, val_idx, "euclidean", within) if val_idx is not None else None
            hist["val_mAP"].append(score)
            improved = sel.update(score, epoch, head)
            if log:
                log(f"srl epoch {epoch}: loss {hist['loss'][-1]:.4f} val mAP {score}")
            bar.tick(_val_note(score))
            stale = 0 if improved else stale + 1
            if patience is not None and stale >= patience:
                break
    if sel.state is None:  # stopped before the first epoch, without validation: the initial head
        sel.update(None, 0, head)
    assert sel.state is not None
    head.load_state_dict(sel.state)
    head.eval()
    if refit and val_idx is not None:
        # Retention is chosen below as for the first head, and fitted on every item like the refit head.
        head, _ = _refit(train_srl, {**args, "retain_dim": 0, "fuse_codes": None}, hist, sel.epoch)
        fit_idx = np.arange(len(y))
    if retain_dim > 0:
        angle: float | None = retain_angle
        gate: tuple[float, float, float, float] | None = None
        curve: dict[str, Any] = {}
        fuse = 0.0
        default_why = None
        if angle is None and (val_idx is None or len(np.unique(y)) < MIN_HOLDOUT_CLASSES):
            # No validation, or too few classes to hold two out and keep two: the documented default.
            angle = RETAIN_DEFAULT_ANGLE
            default_why = "no validation" if val_idx is None else f"{len(np.unique(y))} classes are too few"
        elif angle is None:
            probe_kw = dict(
                dim=dim,
                center=center,
                loss=loss,
                mode=mode,
                queries_per_class=queries_per_class,
                classes_per_batch=classes_per_batch,
                per_class=per_class,
                epochs=epochs,
                lr=lr,
                weight_decay=weight_decay,
                warmup_epochs=warmup_epochs,
                final_lr_fraction=final_lr_fraction,
                val_fraction=val_fraction,
                patience=patience,
                distill=distill,
                distill_sample=distill_sample,
                seed=seed,
            )
            angle, gate, curve, fuse = _choose_retention(
                x, y, views, retain_dim, retain_holdout, probe_kw, retain_gate, fuse_codes, progress=progress
            )
        head.set_retention(x[fit_idx], angle, retain_dim)
        if gate is not None:
            head.set_gate(x[fit_idx], y[fit_idx], *gate)
        hist.update(
            retain_angle=angle, retain_gate=None if gate is None else list(gate), retain_val_mAP=curve, fuse=fuse
        )
        if log:
            how = (
                f"angle {angle:.2f} rad"
                if gate is None
                else "gate {:.2f}..{:.2f} rad at confidence {:.2f}".format(*gate)
            ) + (f", code weight {fuse:g}" if fuse_codes is not None else "")
            if default_why:
                chosen = f"the default ({default_why})"
            else:  # the whole curve, one entry per candidate, is in the model's recorded history
                key = f"{angle:.2f}" if gate is None else "gate " + " ".join(f"{v:.2f}" for v in gate[:3])
                top = curve[key if fuse_codes is None else f"code {fuse:g} {key}"]
                chosen = (
                    f"val mAP {top['seen']:.4f} on seen and {top['unseen']:.4f} on held-out classes, "
                    f"chosen from {len(curve)} candidates"
                )
            log(f"srl retention: {how} ({head.retain_dim} axes); {chosen}")
    hist.update(
        best_epoch=sel.epoch,
        best_val_mAP=None if val_idx is None else sel.best,
        seconds=time.perf_counter() - t0,
        config={
            "dim": head.out_dim,
            "retain_dim": retain_dim,
            "retain_holdout": retain_holdout,
            "retain_gate": retain_gate,
            "distill": distill,
            "distill_sample": distill_sample,
            "fuse_codes": fuse_codes is not None,
            "refit": refit,
            "mode": mode,
            "queries_per_class": queries_per_class,
            "classes_per_batch": classes_per_batch,
            "per_class": per_class,
            "epochs": epochs,
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup_epochs": warmup_epochs,
            "val_fraction": val_fraction,
            "val_split": val_split,
            "views": 0 if views is None else int(np.shape(views)[0]),
            "seed": seed,
            "alpha": loss.alpha,
            "margin": loss.margin,
            "neg_temperature": loss.neg_temperature,
            "lam": loss.lam,
            "kappa": loss.kappa,
            "k_p": loss.k_p,
            "k_n": loss.k_n,
            "omega_max": loss.omega_max,
        },
    )
    return head.eval(), hist


#: Retention angles tried on the validation split (radians; 0 = the trained embedding alone).
RETAIN_ANGLES = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.05, 1.2)
#: The angle used when there is no validation split to choose one.
RETAIN_DEFAULT_ANGLE = 0.75
#: Retention gates tried on the validation split (:meth:`geoir.training.heads.SRLHead.set_gate`): angles of
#: known and unknown items, confidences at the middle of the step; the step's width is fixed.
GATE_ANGLES_LO = (0.0, 0.3, 0.6)
GATE_ANGLES_HI = (0.9, 1.05, 1.2, 1.4)
GATE_TAUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))
GATE_TEMPERATURE = 0.05
#: Weights of the hash head's continuous code in a fused float embedding tried on the validation split
#: (:func:`geoir.training.heads.fuse_trained`; 0 = the SRL embedding alone).
FUSE_WEIGHTS = (0.0, 0.5, 1.0)


def _choose_retention(
    x: np.ndarray,
    y: np.ndarray,
    views: np.ndarray | None,
    dim: int,
    holdout: float,
    probe_kw: dict[str, Any],
    gate: bool = False,
    code_kw: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> tuple[float, tuple[float, float, float, float] | None, dict[str, Any], float]:
    """The retention (a fixed angle, or with ``gate`` also a gate) with the best mean validation mAP over
    seen and held-out classes; returns ``(angle, gate or None, curve, fuse weight)``.

    A probe head is trained (same settings, no retention) on the classes left after holding out
    ``holdout`` of them; each candidate is scored on the probe's own validation images (seen classes) and
    on the held-out classes all-vs-all (what no label named). A gate's centroids are the probe's classes.
    With ``code_kw`` a probe hash head (:func:`train_dgssh` with those arguments) is trained on the same
    classes too, and every candidate is tried with each of :data:`FUSE_WEIGHTS`.
    """
    seed = int(probe_kw["seed"])
    known, unknown = class_holdout(y, holdout, seed)
    p_fit, p_val = _holdout(y[known], float(probe_kw["val_fraction"]), "stratified", seed)
    if p_val is None:
        # The probe's classes are too small to hold out images of: nothing to choose on.
        return RETAIN_DEFAULT_ANGLE, None, {}, 0.0
    probe_views = None if views is None else views[:, known]
    probe_progress = relabelled(progress, "retention probe")
    probe, _ = train_srl(x[known], y[known], views=probe_views, **{**probe_kw, "progress": probe_progress})
    xk, yk = x[known], y[known]
    # Every candidate embeds with the same trained part and retained part; only the angles change.
    trial = copy.deepcopy(probe).set_retention(xk[p_fit], RETAIN_ANGLES[-1], dim)
    with torch.no_grad():
        xt = torch.as_tensor(x, dtype=torch.float32)
        f, r = trial.trained(xt), trial.retained(xt)
        if gate:
            trial.set_gate(xk[p_fit], yk[p_fit], 0.0, RETAIN_ANGLES[-1], 0.5, GATE_TEMPERATURE)
            confidence = trial.confidence(f)
    codes: torch.Tensor | None = None
    if code_kw is not None:
        code_kw = {"seed": seed, "progress": probe_progress, **code_kw}
        code_probe, _ = train_dgssh(xk, yk, views=probe_views, **code_kw)
        with torch.no_grad():
            codes = code_probe.eval()(xt)
    (q, db), u = (known[p_val], known[p_fit]), unknown

    def score(angles: torch.Tensor, t: torch.Tensor) -> tuple[float, float]:
        e = retention_mix(t, r, angles).numpy()
        return _map(e[q], e[db], y[q], y[db], "euclidean"), _map(e[u], e[u], y[u], y[u], "euclidean", within=True)

    curve: dict[str, Any] = {}
    best: tuple[float, tuple[float, float, float, float] | None, float] = (RETAIN_ANGLES[0], None, 0.0)
    best_score = -1.0
    candidates: list[tuple[float, tuple[float, float, float, float] | None]] = [(a, None) for a in RETAIN_ANGLES]
    if gate:
        candidates += [
            (hi, (lo, hi, tau, GATE_TEMPERATURE)) for lo in GATE_ANGLES_LO for hi in GATE_ANGLES_HI for tau in GATE_TAUS
        ]
    weights = FUSE_WEIGHTS if codes is not None else (0.0,)
    with Bar(progress, len(weights) * len(candidates), "SRL retention choices", "candidate") as bar:
        for w in weights:
            t = f if codes is None else fuse_trained(f, codes, w)
            for angle, g in candidates:
                seen, un = score(torch.full((len(f),), angle) if g is None else gate_angles(confidence, *g), t)
                key = f"{angle:.2f}" if g is None else "gate " + " ".join(f"{v:.2f}" for v in g[:3])
                curve[key if codes is None else f"code {w:g} {key}"] = {"seen": seen, "unseen": un}
                if (seen + un) / 2 > best_score + 1e-9:
                    best, best_score = (angle, g, w), (seen + un) / 2
                bar.tick()
    # Angle 0 wins only when retention helps nowhere; the head then keeps the smallest angle on offer.
    if best[1] is None and best[0] <= 0:
        best = (RETAIN_ANGLES[1], None, best[2])
    return best[0], best[1], curve, best[2]


def _steps_per_epoch(y: np.ndarray, chunk: int, classes_per_batch: int | None) -> int:
    _, counts = np.unique(y, return_counts=True)
    rounds = [int(np.sum(np.ceil(counts / chunk) > t)) for t in range(int(np.ceil(counts.max() / chunk)))]
    if classes_per_batch is None:
        return len(rounds)
    return int(sum(math.ceil(r / classes_per_batch) for r in rounds))


# ----------------------------------------------------------------------------------------------------------
# DGSSH
# ----------------------------------------------------------------------------------------------------------


def dgssh_batches(
    labels: np.ndarray, rng: np.random.Generator, chunk: int = 4, classes_per_batch: int = 8
) -> list[np.ndarray]:
    """Class-balanced epoch order (§2.5): chunks of ``chunk`` images of one class, ``classes_per_batch``
    chunks of different classes per batch; every index appears exactly once per epoch."""
    batches = []
    for group in balanced_chunks(labels, chunk, rng):
        for s in range(0, len(group), classes_per_batch):
            batches.append(np.concatenate(group[s : s + classes_per_batch]))
    # Rounds are consecutive, so a tail of a round can be small; shuffling keeps the order random.
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def train_dgssh(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    bits: int = 64,
    variant: Literal["A", "B"] = "B",
    alpha_cls: float = 20.0,
    beta: float = 200.0,
    margin: float = 0.6,
    gamma: float = 1.0,
    eta: float = 0.0,
    rho: float = 0.0,
    label_smoothing: float = 0.1,
    epochs: int = 100,
    warmup_epochs: int = 5,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    chunk: int = 4,
    classes_per_batch: int = 8,
    recompute_u: bool = True,
    val_fraction: float = 0.1,
    val_split: Literal["stratified", "classes"] = "stratified",
    views: np.ndarray | None = None,
    select_on: Literal["I1", "T"] = "I1",
    refit: bool = False,
    stop_after: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> tuple[HashHead, dict[str, Any]]:
    """Train a :class:`HashHead` with the DGSSH objective and the ADSH V-step.

    Per batch: ``L = L_asy + alpha_cls * L_cls + L_cor (+ rho * quantisation)``, one AdamW step; after each
    epoch, U is recomputed with the current head (if ``recompute_u``) and V gets one DCC sweep.

    Args:
        features: N x D backbone features (the training set = the database).
        labels: N class labels.
        bits: Code length K.
        variant: Asymmetric loss ``"B"`` (ADSH-faithful) or ``"A"`` (code-faithful).
        alpha_cls: Weight of the label-smoothed cross-entropy.
        beta: u-V coupling weight.
        margin: Corrective triplet margin.
        gamma: Weight of the distribution-matching term.
        eta: Extra pairwise-likelihood weight in variant B.
        rho: Quantisation penalty ``mean((u - sgn u)²)`` weight (§2.6).
        label_smoothing: Epsilon of the cross-entropy.
        epochs: Number of epochs (METHODS.md: 50; 100 is a little better here and still ~40 s on one core).
        warmup_epochs: Linear warm-up length.
        lr: Peak AdamW learning rate (cosine decay to 1 %).
        weight_decay: AdamW weight decay.
        chunk: Images of one class per chunk (K_s).
        classes_per_batch: Chunks per batch (P); the batch size is ``chunk * classes_per_batch``.
        recompute_u: Recompute U exactly before the V-step (instead of the stale per-batch rows).
        val_fraction: Held-out fraction for model selection (0, or classes too small to give up an image:
            keep the last epoch).
        val_split: ``"stratified"`` (per class) or ``"classes"`` (whole classes held out).
        views: Optional V x N x D features of augmented copies of the same images (see :func:`train_srl`).
        select_on: Validation protocol for selection: ``"I1"`` (database encoded by the network, as at
            deployment) or ``"T"`` (database = V).
        refit: Once validation has chosen the epoch, train the head again on every item, the validation
            items included, with the same schedule stopped after that epoch, and keep it (``hist["refit"]``;
            ``V`` and ``fit_index`` are then the refit's). No-op without validation.
        stop_after: Stop after this epoch (the schedule still spans ``epochs``); what ``refit`` trains with.
        seed: Seeds the split, the sampling and the initialisation.
        log: Called with one line per epoch.
        progress: Progress factory (:data:`geoir.training.progress.Progress`): one bar over the epochs of
            each training loop (this one, a probe's, a refit's), showing the validation mAP.

    Returns:
        The best head (eval mode; its classifier included) and a history dict with per-epoch ``loss``,
        ``val_mAP_I1``, ``val_mAP_T``, ``bit_agreement``, ``best_epoch``, ``seconds``, ``config``, plus ``V``
        (database codes of the fitting set at the best epoch, int8) and ``fit_index`` (their rows in
        ``features``).
    """
    args = dict(locals())
    x, y = _check_inputs(features, labels)
    if select_on == "T" and val_split == "classes":
        raise ValueError("select_on='T' needs val_split='stratified': held-out classes have no database codes")
    rng = _seed_all(seed)
    fit_idx, val_idx = _holdout(y, val_fraction, val_split, seed)
    within = val_split == "classes"
    classes, y_int = np.unique(y, return_inverse=True)
    xf = _Views(x, views, fit_idx, rng)
    yf = torch.from_numpy(y_int[fit_idx]).long()
    n = len(fit_idx)
    head = HashHead(x.shape[1], bits, len(classes))
    S = soft_similarity(yf, yf, similarity_ratio(yf))
    asy = AsymmetricLoss(bits, beta=beta, variant=variant, eta=eta)
    cor = CorrectiveTripletLoss(margin=margin, gamma=gamma)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n_batches = len(dgssh_batches(yf.numpy(), np.random.default_rng(0), chunk, classes_per_batch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(epochs * n_batches, warmup_epochs * n_batches))
    V = torch.zeros(n, bits)
    U = torch.zeros(n, bits)
    hist: dict[str, Any] = {"loss": [], "val_mAP_I1": [], "val_mAP_T": [], "bit_agreement": []}
    sel = _Selector()
    best_V = V.clone()
    t0 = time.perf_counter()
    with Bar(progress, _epochs_to_run(epochs, stop_after), f"DGSSH head ({bits} bits)", "epoch") as bar:
        for epoch in range(1, epochs + 1):
            if stop_after is not None and epoch > stop_after:
                break
            head.train()
            losses = []
            for b in dgssh_batches(yf.numpy(), rng, chunk, classes_per_batch):
                bi = torch.from_numpy(b).long()
                u = head(xf.batch(bi))
                value = (
                    asy(u, bi, V, S[bi], yf[bi])
                    + alpha_cls * label_smoothing_cross_entropy(head.logits(u), yf[bi], label_smoothing)
                    + cor(u, yf[bi])
                )
                if rho > 0:
                    value = value + rho * ((u - torch.where(u >= 0, 1.0, -1.0)) ** 2).mean()
                opt.zero_grad()
                value.backward()
                opt.step()
                sched.step()
                U[bi] = u.detach()
                losses.append(float(value.detach()))
            if recompute_u:
                with torch.no_grad():
                    head.eval()
                    U = head(xf.base)
            V = adsh_v_step(U, S, torch.arange(n), beta, V if epoch > 1 else None)
            hist["loss"].append(float(np.mean(losses)))
            net_codes = head.codes(x[fit_idx])
            hist["bit_agreement"].append(float((net_codes == V.numpy()).mean()))
            score = None
            if val_idx is not None:
                qc = head.codes(x[val_idx])
                if within:
                    # Held-out classes have no row in V: protocol T does not apply, I1 is all-vs-all.
                    i1 = _val_map(head.codes, x, y, fit_idx, val_idx, "hamming", within=True)
                    t = float("nan")
                else:
                    v_codes = V.numpy().astype(np.int8)
                    i1 = _map(qc, net_codes, y[val_idx], y[fit_idx], "hamming")
                    t = _map(qc, v_codes, y[val_idx], y[fit_idx], "hamming")
                hist["val_mAP_I1"].append(i1)
                hist["val_mAP_T"].append(t)
                score = hist["val_mAP_I1" if select_on == "I1" else "val_mAP_T"][-1]
            if sel.update(score, epoch, head):
                best_V = V.clone()
            if log:
                log(
                    f"dgssh epoch {epoch}: loss {hist['loss'][-1]:.4f} val mAP I1 {score} "
                    f"bit agreement {hist['bit_agreement'][-1]:.3f}"
                )
            bar.tick(_val_note(score))
    assert sel.state is not None
    head.load_state_dict(sel.state)
    if refit and val_idx is not None:
        head, h = _refit(train_dgssh, args, hist, sel.epoch)
        best_V, fit_idx = torch.from_numpy(h["V"].astype(np.float32)), np.asarray(h["fit_index"])
    hist.update(
        best_epoch=sel.epoch,
        best_val_mAP=None if val_idx is None else sel.best,
        seconds=time.perf_counter() - t0,
        V=best_V.numpy().astype(np.int8),
        fit_index=fit_idx.tolist(),
        config={
            "bits": bits,
            "variant": variant,
            "alpha_cls": alpha_cls,
            "beta": beta,
            "margin": margin,
            "gamma": gamma,
            "eta": eta,
            "rho": rho,
            "label_smoothing": label_smoothing,
            "epochs": epochs,
            "warmup_epochs": warmup_epochs,
            "lr": lr,
            "weight_decay": weight_decay,
            "chunk": chunk,
            "classes_per_batch": classes_per_batch,
            "recompute_u": recompute_u,
            "val_fraction": val_fraction,
            "val_split": val_split,
            "views": 0 if views is None else int(np.shape(views)[0]),
            "select_on": select_on,
            "refit": refit,
            "seed": seed,
        },
    )
    return head.eval(), hist


# ----------------------------------------------------------------------------------------------------------
# Plain baseline
# ----------------------------------------------------------------------------------------------------------


def train_plain(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    bits: int = 64,
    epochs: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    label_smoothing: float = 0.1,
    rho: float = 0.1,
    warmup_epochs: int = 5,
    val_fraction: float = 0.1,
    val_split: Literal["stratified", "classes"] = "stratified",
    views: np.ndarray | None = None,
    refit: bool = False,
    stop_after: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> tuple[PlainHead, dict[str, Any]]:
    """Baseline: ``Linear(D, bits) -> tanh -> classifier`` trained with label-smoothed cross-entropy plus
    ``rho * mean((u - sgn u)²)``; AdamW, warm-up + cosine, validation selection every epoch; ``refit``,
    ``stop_after`` and ``progress`` as in :func:`train_dgssh`.

    Returns:
        The best head (eval mode) and a history dict (per-epoch ``loss`` and ``val_mAP``, ``best_epoch``,
        ``seconds``, ``config``).
    """
    args = dict(locals())
    x, y = _check_inputs(features, labels)
    rng = _seed_all(seed)
    fit_idx, val_idx = _holdout(y, val_fraction, val_split, seed)
    within = val_split == "classes"
    classes, y_int = np.unique(y, return_inverse=True)
    xf = _Views(x, views, fit_idx, rng)
    yf = torch.from_numpy(y_int[fit_idx]).long()
    head = PlainHead(x.shape[1], bits, len(classes))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = math.ceil(len(fit_idx) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(epochs * steps, warmup_epochs * steps))
    hist: dict[str, Any] = {"loss": [], "val_mAP": []}
    sel = _Selector()
    t0 = time.perf_counter()
    with Bar(progress, _epochs_to_run(epochs, stop_after), f"plain head ({bits} bits)", "epoch") as bar:
        for epoch in range(1, epochs + 1):
            if stop_after is not None and epoch > stop_after:
                break
            head.train()
            perm = torch.from_numpy(rng.permutation(len(fit_idx))).long()
            losses = []
            for s in range(0, len(perm), batch_size):
                b = perm[s : s + batch_size]
                u = head(xf.batch(b))
                value = label_smoothing_cross_entropy(head.logits(u), yf[b], label_smoothing)
                value = value + rho * ((u - torch.where(u >= 0, 1.0, -1.0)) ** 2).mean()
                opt.zero_grad()
                value.backward()
                opt.step()
                sched.step()
                losses.append(float(value.detach()))
            hist["loss"].append(float(np.mean(losses)))
            score = _val_map(head.codes, x, y, fit_idx, val_idx, "hamming", within) if val_idx is not None else None
            hist["val_mAP"].append(score)
            sel.update(score, epoch, head)
            if log:
                log(f"plain epoch {epoch}: loss {hist['loss'][-1]:.4f} val mAP {score}")
            bar.tick(_val_note(score))
    assert sel.state is not None
    head.load_state_dict(sel.state)
    if refit and val_idx is not None:
        head, _ = _refit(train_plain, args, hist, sel.epoch)
    hist.update(
        best_epoch=sel.epoch,
        best_val_mAP=None if val_idx is None else sel.best,
        seconds=time.perf_counter() - t0,
        config={
            "bits": bits,
            "epochs": epochs,
            "lr": lr,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "label_smoothing": label_smoothing,
            "rho": rho,
            "warmup_epochs": warmup_epochs,
            "val_fraction": val_fraction,
            "val_split": val_split,
            "views": 0 if views is None else int(np.shape(views)[0]),
            "refit": refit,
            "seed": seed,
        },
    )
    return head.eval(), hist
